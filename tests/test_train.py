"""Tests for lorakit.train: schedule, losses, the run directory, accumulation, and exact resume.

Everything runs on a tiny Llama (vocab 100, hidden 32, 2 layers) fed token ids directly. The
resume tests stop a run (an exception from a callback, or SIGKILL of a child process) and check
that the resumed run ends with bit-for-bit the adapter of an uninterrupted run, with LoRA dropout
on, so the random state must be restored too.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import lorakit
from lorakit.data import Batches, collate
from lorakit.train import ResumeError, TrainConfig, causal_lm_loss, classification_loss, lr_factor, read_metrics, train
from lorakit.train import checkpoint as ckpt_mod
from lorakit.hints import SettingError

from conftest import tiny_llama

TESTS = Path(__file__).resolve().parent
LORA = lorakit.LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj"])


def token_examples(n: int = 48, seed: int = 0) -> list[dict[str, list[int]]]:
    """Random sequences of 4..14 tokens; the first two are a 'prompt' without loss."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for length in torch.randint(4, 15, (n,), generator=g).tolist():
        ids = torch.randint(1, 100, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100, -100] + ids[2:]})
    return out


def batches(examples, batch_size: int, seed: int = 0, shuffle: bool = True) -> Batches:
    return Batches(examples, batch_size, seed=seed, shuffle=shuffle, collate_fn=partial(collate, pad_id=0))


def injected(lora: lorakit.LoraConfig = LORA) -> torch.nn.Module:
    return lorakit.inject(tiny_llama(), lora)


def config(tmp: Path, **kw) -> TrainConfig:
    """Float32 on the CPU, also where a GPU is present: exact comparisons need one device."""
    base = dict(max_steps=12, lr=1e-2, batch_size=8, warmup_steps=2, schedule="cosine", save_every=4, eval_every=4,
                log_every=3, label_smoothing=0.1, out_dir=tmp, progress=False, device="cpu")
    return TrainConfig(**{**base, **kw})


def adapter_tensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "adapter_model.safetensors"))


# --- schedule -------------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule, step, expected", [
    ("linear", 1, 0.25), ("linear", 4, 1.0),          # warmup 4: 1/4, ..., 4/4
    ("linear", 5, 1.0), ("linear", 10, 0.5), ("linear", 14, 0.1),  # decay over 10 steps, never 0
    ("cosine", 5, 1.0), ("cosine", 10, 0.5), ("cosine", 14, 0.5 * (1 + math.cos(math.pi * 0.9))),
    ("constant", 2, 0.5), ("constant", 14, 1.0),
])
def test_lr_factor(schedule, step, expected):
    assert lr_factor(step, total_steps=14, warmup_steps=4, schedule=schedule) == pytest.approx(expected)


def test_lr_factor_without_warmup_starts_at_peak():
    assert lr_factor(1, total_steps=5, schedule="linear") == 1.0
    assert lr_factor(1, total_steps=1, schedule="cosine") == 1.0


# --- losses ---------------------------------------------------------------------------------------

def test_causal_lm_loss_is_the_models_own_loss_and_smooths_like_a_float64_reference():
    model = tiny_llama()
    batch = collate(token_examples(4), pad_id=0)
    with torch.no_grad():
        out = model(**batch)
    total, count = causal_lm_loss(out.logits, batch["labels"])
    assert count == sum(len(ex["input_ids"]) - 2 for ex in token_examples(4))
    torch.testing.assert_close(total / count, out.loss)

    eps = 0.1
    total, count = causal_lm_loss(out.logits, batch["labels"], label_smoothing=eps)
    logp = out.logits[:, :-1].double().log_softmax(-1)
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    nll = -logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    uniform = -logp.mean(-1)
    reference = ((1 - eps) * nll + eps * uniform)[keep].sum()
    torch.testing.assert_close(total.double(), reference, rtol=1e-5, atol=1e-5)


def test_classification_loss_matches_cross_entropy():
    logits = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 2, 1, 1, 0])
    total, count = classification_loss(logits, labels, label_smoothing=0.2)
    assert count == 5
    torch.testing.assert_close(total / count, F.cross_entropy(logits, labels, label_smoothing=0.2))


# --- a whole run ----------------------------------------------------------------------------------

def test_run_directory_holds_adapter_best_checkpoint_metrics_plot_and_run_info(tmp_path):
    data = token_examples()
    model = injected()
    result = train(model, batches(data, 8), config(tmp_path, lr=3e-2),
                   eval_batches=batches(data[:16], 8, shuffle=False), eval_fn=lambda m: {"answer": 42})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter", "best", "checkpoint", "loss.png", "metrics.jsonl", "run.json"]
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The checkpoint holds no pickle: safetensors and JSON only.
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == [
        "adapter.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer_state.json"]

    rows = read_metrics(tmp_path / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train_rows] == [3, 6, 9, 12]
    assert [r["step"] for r in eval_rows] == [4, 8, 12]
    assert all(r["eval_answer"] == 42 for r in eval_rows)
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] > 0 for r in train_rows)
    assert eval_rows[-1]["eval_loss"] < eval_rows[0]["eval_loss"]
    best = min(eval_rows, key=lambda r: r["eval_loss"])
    assert (result.best_step, result.best_eval_loss) == (best["step"], best["eval_loss"])

    info = json.loads((tmp_path / "run.json").read_text())
    trainable, total = lorakit.trainable_parameters(model)
    assert (info["trainable_parameters"], info["total_parameters"]) == (trainable, total) == (
        result.trainable_parameters, result.total_parameters)
    assert trainable == 2 * ((4 * 32 + 32 * 4) + (4 * 32 + 16 * 4))  # 2 layers of q (32→32) and v (32→16), r=4
    assert info["result"]["steps"] == 12 and info["config"]["lr"] == 3e-2

    # The saved adapter is the trained one: a fresh model that loads it computes the same logits.
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    model.eval()
    fresh = lorakit.load_adapter(tiny_llama(), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits)


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    """Two batches of 4 accumulated = one batch of 8 (the same examples: Batches slices one
    permutation), because the loss is normalised by the step's target tokens, not per batch."""
    data = token_examples()
    lora = lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    train(injected(lora), batches(data, 8), config(tmp_path / "big", label_smoothing=0.0, max_steps=4))
    train(injected(lora), batches(data, 4), config(tmp_path / "acc", label_smoothing=0.0, max_steps=4, batch_size=4,
                                                   grad_accum=2))
    big, acc = adapter_tensors(tmp_path / "big" / "adapter"), adapter_tensors(tmp_path / "acc" / "adapter")
    assert big.keys() == acc.keys()
    for k in big:
        torch.testing.assert_close(acc[k], big[k], rtol=1e-5, atol=1e-6)


def test_classifier_with_class_labels_reports_accuracy(tmp_path):
    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(100, 16)
            self.proj = torch.nn.Linear(16, 16)
            self.head = torch.nn.Linear(16, 2)

        def forward(self, input_ids, attention_mask=None):
            h = torch.tanh(self.proj(self.embed(input_ids))).mean(1)
            return SimpleNamespace(logits=self.head(h))

    torch.manual_seed(0)
    model = lorakit.inject(Classifier(), lorakit.LoraConfig(r=2, alpha=4, target_modules=["proj", "head"]))
    data = [{"input_ids": ex["input_ids"], "labels": int(ex["input_ids"][0] < 50)} for ex in token_examples(32)]
    result = train(model, batches(data, 8), config(tmp_path, lr=5e-2, max_steps=8), eval_batches=batches(data, 8))
    assert 0.0 <= result.eval_metrics["eval_accuracy"] <= 1.0
    assert result.eval_metrics["eval_loss"] < math.log(2)  # learnt something


def test_early_stopping_after_evals_without_improvement(tmp_path):
    data = token_examples(16)
    # lr so small that the eval loss cannot go down: every eval after the first is "no better".
    result = train(injected(), batches(data, 8), config(tmp_path, lr=1e-30, max_steps=50, eval_every=1,
                                                        early_stopping_patience=2),
                   eval_batches=batches(data, 8))
    assert result.stopped_early and result.steps == 3 and result.best_step == 1
    state = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["stopped_early"]


# --- resume ---------------------------------------------------------------------------------------

class Crash(Exception):
    pass


def crash_at(k: int):
    def on_step(step, metrics):
        if step == k:
            raise Crash(step)
    return on_step


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A 12-step run with dropout, label smoothing, warmup, cosine decay and evaluation."""
    out = tmp_path_factory.mktemp("uninterrupted")
    data = token_examples()
    train(injected(), batches(data, 8), config(out), eval_batches=batches(data[:16], 8))
    return out


def test_resume_after_a_crash_gives_the_uninterrupted_adapter(tmp_path, uninterrupted):
    data = token_examples()
    # An eval_fn that draws random numbers must not change what the training run draws.
    noisy_eval = lambda m: {"noise": torch.rand(1).item()}  # noqa: E731
    with pytest.raises(Crash):
        train(injected(), batches(data, 8), config(tmp_path), eval_batches=batches(data[:16], 8),
              eval_fn=noisy_eval, on_step=crash_at(7))  # the last checkpoint is step 4
    assert json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())["step"] == 4
    # A fresh model, not the crashed one: everything must come from the checkpoint.
    result = train(injected(), batches(data, 8), config(tmp_path), eval_batches=batches(data[:16], 8), resume=True)
    assert result.steps == 12
    expected, got = adapter_tensors(uninterrupted / "adapter"), adapter_tensors(tmp_path / "adapter")
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    for name in ("best", "checkpoint"):
        assert (tmp_path / name).is_dir()
    # metrics.jsonl reads as one run: the crashed run's rows after step 4 were replaced.
    def strip(rows):  # timings and the eval_fn's noise differ between the runs; each process logs its first step's time
        return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "eval_noise")} for r in rows
                if "first_step_s" not in r]
    assert strip(read_metrics(tmp_path / "metrics.jsonl")) == strip(read_metrics(uninterrupted / "metrics.jsonl"))


def test_resume_after_sigkill_gives_the_uninterrupted_adapter(tmp_path, uninterrupted):
    """A child process trains (slowed down by a callback) and is killed with SIGKILL once its
    checkpoint at step 4 or 8 exists; this process resumes the run."""
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(TESTS)!r})
        from test_train import batches, config, injected, token_examples
        from lorakit.train import train
        data = token_examples()
        train(injected(), batches(data, 8), config({str(tmp_path / 'run')!r}),
              eval_batches=batches(data[:16], 8), on_step=lambda step, m: time.sleep(0.25))
    """))
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    child = subprocess.Popen([sys.executable, str(script)], env=env, stderr=subprocess.PIPE)
    state_file = tmp_path / "run" / "checkpoint" / "trainer_state.json"
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and child.poll() is None:
            if state_file.is_file() and json.loads(state_file.read_text())["step"] >= 4:
                break
            time.sleep(0.05)
        assert child.poll() is None, f"the child ended before it was killed: {child.stderr.read().decode()[-2000:]}"
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    killed_at = json.loads(state_file.read_text())["step"]
    assert killed_at < 12 and not (tmp_path / "run" / "adapter").exists()
    data = token_examples()
    train(injected(), batches(data, 8), config(tmp_path / "run"), eval_batches=batches(data[:16], 8), resume=True)
    expected, got = adapter_tensors(uninterrupted / "adapter"), adapter_tensors(tmp_path / "run" / "adapter")
    for k in expected:
        assert torch.equal(got[k], expected[k]), k


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("short")
    train(injected(), batches(token_examples(), 8), config(out, max_steps=2))
    return out


@pytest.mark.parametrize("change, field", [
    (dict(lora=lorakit.LoraConfig(r=2, alpha=8, dropout=0.1)), "lora"),
    (dict(lora=lorakit.LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=["q_proj"])), "lora"),
    (dict(batch_size=4), "batch_size"),
    (dict(seed=1), "seed"),
    (dict(lr=1e-3), "lr"),
    (dict(examples=40), "num_examples"),
])
def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path, short_run, change, field):
    data = token_examples(change.get("examples", 48))
    bs = change.get("batch_size", 8)
    cfg = config(short_run, max_steps=4, **{k: v for k, v in change.items() if k in ("batch_size", "seed", "lr")})
    before = (short_run / "checkpoint" / "adapter.safetensors").read_bytes()
    with pytest.raises(ResumeError, match=field):
        train(injected(change.get("lora", LORA)), batches(data, bs, seed=change.get("seed", 0)), cfg, resume=True)
    assert (short_run / "checkpoint" / "adapter.safetensors").read_bytes() == before


def test_a_new_run_refuses_to_overwrite_a_checkpoint_unless_asked(short_run, tmp_path):
    with pytest.raises(ResumeError, match="resume=True"):
        train(injected(), batches(token_examples(), 8), config(short_run))
    with pytest.raises(ResumeError, match="no checkpoint"):
        train(injected(), batches(token_examples(), 8), config(tmp_path), resume=True)


def test_checkpoint_save_is_atomic(tmp_path, monkeypatch):
    """A save that fails half-way leaves the previous checkpoint whole; a crash between the two
    renames is recovered from the copy that was set aside."""
    params = {"w": torch.ones(3)}
    state = {"step": 1}
    rng = [ckpt_mod.capture_rng(torch.device("cpu"))]
    directory = tmp_path / "checkpoint"
    ckpt_mod.save_checkpoint(directory, params=params, optimizer_tensors={}, rng_states=rng, state=state)

    calls = []

    def failing_save(tensors, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(tensors, path, *a, **k)

    real_save = ckpt_mod.save_file
    monkeypatch.setattr(ckpt_mod, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt_mod.save_checkpoint(directory, params={"w": torch.zeros(3)}, optimizer_tensors={}, rng_states=rng,
                                 state={"step": 2})
    monkeypatch.undo()
    loaded = ckpt_mod.load_checkpoint(directory)
    assert loaded.state["step"] == 1 and torch.equal(loaded.params["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]  # no temp dir left behind

    directory.rename(tmp_path / ".checkpoint.old-1234")  # as if killed between the renames
    assert ckpt_mod.load_checkpoint(directory).state["step"] == 1


def test_config_errors_name_every_bad_field():
    with pytest.raises(ValueError, match=r"schedule='step'.*grad_accum must be >= 1"):
        TrainConfig(schedule="step", grad_accum=0)


def test_batch_size_must_match_the_batches(tmp_path):
    with pytest.raises(ValueError, match="config.batch_size is 8"):
        train(injected(), batches(token_examples(), 4), config(tmp_path))


def test_other_labels_use_the_models_own_loss_weighted_by_target_tokens():
    """Labels that are neither per-input-token nor class ids (here: seq2seq-like targets of another
    length) go to the model's own loss, weighted by their non-ignored count."""
    from lorakit.train.loss import compute_loss

    class Seq2Seq(torch.nn.Module):
        def forward(self, input_ids, labels):
            return SimpleNamespace(loss=torch.tensor(2.5))  # the mean over the 3 target tokens

    batch = {"input_ids": torch.ones(2, 5, dtype=torch.long), "labels": torch.tensor([[1, 2, -100], [3, -100, -100]])}
    total, count, _ = compute_loss(Seq2Seq(), batch)
    assert count == 3 and total == pytest.approx(7.5)
    with pytest.raises(ValueError, match="loss_fn"):
        compute_loss(Seq2Seq(), batch, label_smoothing=0.1)


def test_full_fine_tuning_baseline_saves_a_whole_model(tmp_path):
    """adapter_name=None trains every weight (the paper's baseline) and writes a transformers model."""
    from transformers import LlamaForCausalLM

    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train(model, batches(token_examples(), 8), config(tmp_path, max_steps=3, label_smoothing=0.0),
                   adapter_name=None)
    assert result.trainable_parameters == result.total_parameters
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert "model.layers.0.mlp.down_proj.weight" in moved and "model.embed_tokens.weight" in moved
    reloaded = LlamaForCausalLM.from_pretrained(result.adapter_dir).eval()
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model.eval()(ids).logits)
    assert not list(tmp_path.glob(".*tmp*"))


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
@pytest.mark.parametrize("adapter_name", ["default", None], ids=["adapter", "full fine-tuning"])
def test_a_run_folder_is_readable_by_others_under_umask_022(tmp_path, adapter_name):
    """safetensors writes 0o600; checkpoints, adapters and full models get the umask's mode like any file."""
    model = injected() if adapter_name else tiny_llama()
    old = os.umask(0o022)
    try:
        train(model, batches(token_examples(16), 8), config(tmp_path, max_steps=2, save_every=2,
                                                            label_smoothing=0.0), adapter_name=adapter_name)
    finally:
        os.umask(old)
    modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in tmp_path.rglob("*") if p.is_file()}
    assert any(name.endswith(".safetensors") for name in modes) and any(n.startswith("checkpoint/") for n in modes)
    assert modes == {name: "0o644" for name in modes}


# --- bitsandbytes' 8-bit AdamW (TrainConfig.optimizer, --optimizer) ---------------------------------

def _wide_model() -> torch.nn.Module:
    """A Llama whose adapter matrices have >= 4,096 elements: bitsandbytes keeps smaller ones in 32 bits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    return lorakit.inject(model, lorakit.LoraConfig(r=16, alpha=32, target_modules=["q_proj", "v_proj"],
                                                    dropout=0.1))


def test_adamw8bit_trains_keeps_8bit_state_and_resumes_bit_for_bit(tmp_path):
    pytest.importorskip("bitsandbytes")
    data = token_examples()
    straight = tmp_path / "straight"
    result = train(_wide_model(), batches(data, 8), config(straight, optimizer="adamw8bit", lr=1e-3))
    assert result.train_loss == result.train_loss  # a number
    saved = load_file(str(straight / "checkpoint" / "optimizer.safetensors"))
    assert any(v.dtype == torch.uint8 for v in saved.values())  # the 8-bit moments, not float32 ones
    state = json.loads((straight / "checkpoint" / "trainer_state.json").read_text())
    assert state["fingerprint"]["optimizer"] == "adamw8bit"
    assert any(g.get("scalars") for g in state["optimizer_groups"])  # bitsandbytes' int step, in the JSON
    crashed = tmp_path / "crashed"
    with pytest.raises(Crash):
        train(_wide_model(), batches(data, 8), config(crashed, optimizer="adamw8bit", lr=1e-3), on_step=crash_at(7))
    train(_wide_model(), batches(data, 8), config(crashed, optimizer="adamw8bit", lr=1e-3), resume=True)
    expected, got = adapter_tensors(straight / "adapter"), adapter_tensors(crashed / "adapter")
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    plain = tmp_path / "plain"
    train(_wide_model(), batches(data, 8), config(plain, lr=1e-3))
    assert any(not torch.equal(adapter_tensors(plain / "adapter")[k], expected[k]) for k in expected)  # it differs
    with pytest.raises(ResumeError, match="optimizer"):  # a run resumed with the other optimizer is refused
        train(_wide_model(), batches(data, 8), config(crashed, lr=1e-3, max_steps=16), resume=True)


def test_bad_optimizer_names_the_setting():
    with pytest.raises(SettingError, match="optimizer"):
        TrainConfig(optimizer="sgd")
