"""The trainer under torch.compile (`TrainConfig.compile`, `--compile` / `--no-compile`).

A compiled run (Inductor, on the CPU) follows the eager run's loss curve, logs its first step's
time, saves the same adapter keys (no `_orig_mod.` prefix) and resumes, also with gradient
checkpointing and under DDP and FSDP2 (slow). Batches are padded to one width (16), so each test
process compiles the training step about once: compiling takes seconds here.
"""

from __future__ import annotations

import json
import re
import warnings
from functools import partial
from itertools import islice
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import lorakit
from lorakit import cli, commands
from lorakit.data import Batches, collate
from lorakit.train import TrainConfig, read_metrics, train

from conftest import tiny_llama
from test_train import Crash, adapter_tensors, config, crash_at, token_examples

NO_DROPOUT = lorakit.LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])


def padded_batches(examples, batch_size: int = 8) -> Batches:
    return Batches(examples, batch_size, seed=0, collate_fn=partial(collate, pad_id=0, pad_to_multiple_of=16))


def run(out, compile: str, checkpointing: bool = False, fsdp: bool = False, **train_kw):
    """6 steps of the same run, eager or compiled; eval on the plain model every 3 steps."""
    data = token_examples()
    model = lorakit.inject(tiny_llama(), NO_DROPOUT)
    if checkpointing:
        with warnings.catch_warnings():  # transformers 5 renamed it activation_checkpointing_enable
            warnings.simplefilter("ignore", FutureWarning)
            model.gradient_checkpointing_enable()
    cfg = config(out, max_steps=6, log_every=1, save_every=3, eval_every=3, label_smoothing=0.0, compile=compile,
                 fsdp=fsdp)
    return train(model, padded_batches(data), cfg, eval_batches=padded_batches(data[:16]), **train_kw)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile")
    run(out / "eager", "auto")  # auto on the CPU: eager
    run(out / "compiled", "on")
    return out


def train_rows(directory):
    return [r for r in read_metrics(directory / "metrics.jsonl") if "loss" in r]


def test_compiled_training_follows_the_eager_loss_curve(runs):
    eager, compiled = train_rows(runs / "eager"), train_rows(runs / "compiled")
    assert [r["step"] for r in compiled] == [r["step"] for r in eager] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "grad_norm"):
        torch.testing.assert_close(torch.tensor([r[key] for r in compiled]), torch.tensor([r[key] for r in eager]),
                                   rtol=1e-4, atol=0)
    expected, got = adapter_tensors(runs / "eager" / "adapter"), adapter_tensors(runs / "compiled" / "adapter")
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-4, atol=1e-6)
    # Evaluation runs on the plain model, between compiled steps, and agrees too.
    evals = [[r["eval_loss"] for r in read_metrics(runs / name / "metrics.jsonl") if "eval_loss" in r]
             for name in ("eager", "compiled")]
    torch.testing.assert_close(torch.tensor(evals[1]), torch.tensor(evals[0]), rtol=1e-4, atol=0)


def test_compiled_training_with_gradient_checkpointing_follows_eager(tmp_path, runs):
    """transformers' gradient checkpointing (torch.utils.checkpoint) inside the compiled forward."""
    run(tmp_path, "on", checkpointing=True)
    eager, compiled = train_rows(runs / "eager"), train_rows(tmp_path)
    torch.testing.assert_close(torch.tensor([r["loss"] for r in compiled]), torch.tensor([r["loss"] for r in eager]),
                               rtol=1e-4, atol=0)
    expected, got = adapter_tensors(runs / "eager" / "adapter"), adapter_tensors(tmp_path / "adapter")
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-4, atol=1e-6)


def test_run_log_reports_the_first_steps_time_with_compilation(runs):
    for name, compiled in (("eager", False), ("compiled", True)):
        first = [r for r in read_metrics(runs / name / "metrics.jsonl") if "first_step_s" in r]
        assert len(first) == 1 and first[0]["step"] == 1 and first[0]["compiled"] is compiled
        info = json.loads((runs / name / "run.json").read_text())
        assert info["compiled"] is compiled and info["first_step_s"] == first[0]["first_step_s"] > 0
        assert info["config"]["compile"] == ("on" if compiled else "auto")
        # The first step (compilation) is left out of the throughput: row 1 has no step to time.
        assert train_rows(runs / name)[0]["tokens_per_s"] is None
        assert all(r["tokens_per_s"] > 0 for r in train_rows(runs / name)[1:])


def test_the_first_steps_time_is_printed(tmp_path, runs, capsys):
    model = lorakit.inject(tiny_llama(), NO_DROPOUT)  # the graph compiled for `runs` serves it too
    train(model, padded_batches(token_examples()), config(tmp_path, max_steps=2, label_smoothing=0.0, compile="on",
                                                          progress=True))
    printed = capsys.readouterr().out
    assert "float32, torch.compile" in printed and re.search(r"step 1 took \d+\.\d s \(with torch.compile\)", printed)


def test_saved_adapter_and_checkpoint_have_the_plain_parameter_names(runs):
    for name in ("adapter/adapter_model.safetensors", "checkpoint/adapter.safetensors"):
        eager, compiled = load_file(str(runs / "eager" / name)), load_file(str(runs / "compiled" / name))
        assert sorted(compiled) == sorted(eager) and not any("_orig_mod" in k for k in compiled)
    fresh = lorakit.load_adapter(tiny_llama(), runs / "compiled" / "adapter")  # loads as any adapter does
    assert any(isinstance(m, lorakit.LoraLayer) for m in fresh.modules())


@pytest.mark.parametrize("resume_compile", ["on", "off"])
def test_a_compiled_run_resumes_with_or_without_compile(tmp_path, runs, resume_compile):
    """compile is not part of the resume fingerprint: it changes how the step is computed, not what."""
    with pytest.raises(Crash):
        run(tmp_path, "on", on_step=crash_at(5))  # the last checkpoint is step 3
    result = run(tmp_path, resume_compile, resume=True)
    assert result.steps == 6
    expected, got = adapter_tensors(runs / "compiled" / "adapter"), adapter_tensors(tmp_path / "adapter")
    # Not bit for bit even when both halves compile: the resumed run shares this process's Dynamo
    # cache, which may already hold a dynamic-shape graph (batches come in several padded widths),
    # and its kernels add in another order than the first run's static ones (CI saw it).
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-4, atol=1e-6)
    resumed = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "first_step_s" in r]
    assert [(r["step"], r["compiled"]) for r in resumed] == [(1, True), (4, resume_compile == "on")]


def test_an_error_in_the_first_compiled_step_says_how_to_train_without_compile(tmp_path):
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.proj(x)

    def failing_loss(outputs, batch):
        raise RuntimeError("boom")

    model = lorakit.inject(Tiny(), lorakit.LoraConfig(r=2, alpha=4, target_modules=["proj"]))
    with pytest.raises(RuntimeError, match="boom") as error:
        train(model, [{"x": torch.randn(2, 4)}] * 2, config(tmp_path, max_steps=1, batch_size=2, compile="on"),
              loss_fn=failing_loss)
    if hasattr(error.value, "add_note"):  # Python >= 3.11
        assert "--no-compile" in "".join(error.value.__notes__)


def test_compile_option_is_checked_and_reads_yaml_booleans():
    with pytest.raises(ValueError, match=r"compile='yes' is not one of \('auto', 'on', 'off'\)"):
        TrainConfig(compile="yes")
    assert TrainConfig(compile=False).compile == "off" and TrainConfig(compile=True).compile == "on"
    assert TrainConfig().compile == "auto"


@pytest.fixture
def train_config(monkeypatch):
    """The TrainConfig that `lorakit train` builds; the command stops there, before loading a model."""
    seen = {}

    def fake_finetune(model, data, lora, config, **kw):
        seen["config"] = config
        raise KeyboardInterrupt

    monkeypatch.setattr(commands, "finetune", fake_finetune)

    def run_cli(*argv):
        assert cli.main(["train", *argv]) == 130  # the interrupt's exit status
        return seen.pop("config")
    return run_cli


@pytest.mark.parametrize("argv, expected", [
    ([], "auto"), (["--no-compile"], "off"), (["--compile", "on"], "on"), (["--compile", "off"], "off"),
])
def test_cli_compile_flags_reach_the_train_config(train_config, tmp_path, argv, expected):
    assert train_config("--out", str(tmp_path), *argv).compile == expected


def test_cli_compile_from_a_yaml_config(train_config, tmp_path):
    """YAML reads `compile: off` as the boolean False; it still means --compile off."""
    path = tmp_path / "run.yaml"
    path.write_text("compile: off\n")
    assert yaml.safe_load(path.read_text()) == {"compile": False}
    assert train_config("--config", str(path), "--out", str(tmp_path)).compile == "off"
    assert train_config("--config", str(path), "--out", str(tmp_path), "--compile", "on").compile == "on"


@pytest.mark.parametrize("compile, widths_of_64", [("on", True), ("off", False)])
def test_finetune_pads_batches_to_a_multiple_of_64_when_compiling(tmp_path, monkeypatch, compile, widths_of_64):
    """Few shapes for the compiler (and the fast kernels); eager runs keep the shortest padding."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit import finetune as finetune_mod
    from test_data import E2E_LINES, make_tokenizer

    seen = {}

    def fake_train(model, batches, config, eval_batches=None, **kw):
        seen["widths"] = {batch["input_ids"].shape[1] for batch in islice(batches, 8)}
        raise KeyboardInterrupt  # nothing to compile: the batches are what is tested

    monkeypatch.setattr(finetune_mod, "train", fake_train)
    tok = make_tokenizer(bos=False)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256))
    path = tmp_path / "train.txt"
    path.write_text("\n".join(E2E_LINES) + "\n")
    with pytest.raises(KeyboardInterrupt):
        finetune_mod.finetune("unused", finetune_mod.DataSpec(train=str(path)), NO_DROPOUT,
                              config(tmp_path, batch_size=2, compile=compile), model=model, tokenizer=tok)
    assert all(w % 64 == 0 for w in seen["widths"]) is widths_of_64, seen["widths"]


def _distributed_worker(rank: int, port: int, out: str) -> None:
    from test_train_distributed import _join

    _join(rank, port)
    for fsdp in (False, True):
        run(Path(out) / f"fsdp-{fsdp}", "on", fsdp=fsdp)
    torch.distributed.destroy_process_group()


@pytest.mark.slow  # about 60 s on 2 CPU cores: two processes, each compiling the DDP and the FSDP step
def test_compiled_ddp_and_fsdp_match_one_eager_process(tmp_path, runs):
    """torch.compile of the DDP-wrapped and of the FSDP2-sharded model (compiled after wrapping)."""
    import torch.multiprocessing as mp

    from test_train_distributed import WORLD, _free_port

    mp.spawn(_distributed_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    expected = adapter_tensors(runs / "eager" / "adapter")
    for fsdp in (False, True):
        got = adapter_tensors(tmp_path / f"fsdp-{fsdp}" / "adapter")
        assert got.keys() == expected.keys()
        for k in expected:
            torch.testing.assert_close(got[k], expected[k], rtol=1e-4, atol=1e-6)
        losses = [r["loss"] for r in train_rows(tmp_path / f"fsdp-{fsdp}")]
        torch.testing.assert_close(torch.tensor(losses), torch.tensor([r["loss"] for r in train_rows(runs / "eager")]),
                                   rtol=1e-4, atol=0)
