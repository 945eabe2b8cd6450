"""LoRA+ (Hayou et al. 2024): B's learning rate is ratio × A's, as AdamW parameter groups that the
trainer builds (issue 16). The groups are read from the checkpoint a run writes after each step, so
what is tested is what the optimizer held, and one AdamW step from B = 0 is checked against the
closed form (B moves exactly ratio times as far as without LoRA+; A moves the same)."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.cli import main
from lorakit.train import ResumeError, TrainConfig, lr_factor, train
from lorakit.train.checkpoint import load_checkpoint

from test_cli import e2e_file, model_dir  # noqa: F401 - a tiny local Llama with a tokenizer, E2E lines
from test_train import adapter_tensors, batches, injected, token_examples

LORA = lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["norm"])


def _config(tmp, **kw) -> TrainConfig:
    base = dict(max_steps=4, lr=1e-2, batch_size=8, warmup_steps=2, schedule="linear", save_every=1, eval_every=100,
                log_every=1, out_dir=tmp, progress=False, device="cpu", keep_best=False)
    return TrainConfig(**{**base, **kw})


def _groups_per_step(tmp, **kw) -> list[list[dict]]:
    """The optimizer's param groups (names, lr, weight decay) after each step of a short run."""
    seen = []

    def record(step, metrics):
        seen.append(load_checkpoint(tmp / "checkpoint").state["optimizer_groups"])

    train(injected(LORA), batches(token_examples(), 8), _config(tmp, **kw), on_step=record)
    return seen


def test_b_matrices_get_ratio_times_the_lr_at_every_step_of_the_schedule(tmp_path):
    steps = _groups_per_step(tmp_path, loraplus_ratio=16.0)
    assert len(steps) == 4
    for step, groups in enumerate(steps, start=1):
        a, b, flat = groups
        assert a["params"] and all(".lora_A." in n for n in a["params"])  # the A's (the norm copy is 1-D)
        assert b["params"] and all(".lora_B." in n for n in b["params"])
        assert len(a["params"]) == len(b["params"]) == 2 * 2  # 2 layers × (q, v)
        assert flat["params"] == ["model.norm.modules_to_save.default.weight"]
        expected = 1e-2 * lr_factor(step, total_steps=4, warmup_steps=2, schedule="linear")
        assert a["lr"] == pytest.approx(expected) and flat["lr"] == pytest.approx(expected)
        assert b["lr"] == pytest.approx(16.0 * expected)  # warmup and decay scale both
        assert (a["weight_decay"], b["weight_decay"], flat["weight_decay"]) == (0.01, 0.01, 0.0)
    assert steps[0][0]["lr"] != steps[2][0]["lr"]  # the schedule did move


def test_without_a_ratio_the_groups_are_as_before(tmp_path):
    groups = _groups_per_step(tmp_path)[-1]
    assert len(groups) == 2
    assert {n.split(".lora_")[1][0] for n in groups[0]["params"]} == {"A", "B"}  # A and B share one lr
    assert groups[1]["params"] == ["model.norm.modules_to_save.default.weight"]
    assert "lr_ratio" not in groups[0]


def test_one_adamw_step_moves_b_ratio_times_as_far_and_a_the_same(tmp_path):
    """From B = 0, AdamW's first step is -lr·g/(|g| + eps) per entry (weight decay of 0 is 0), so B
    moves exactly ratio times as far with LoRA+, and A (same lr, same gradient) the same."""
    lora = lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    kw = dict(max_steps=1, warmup_steps=0, schedule="constant")
    train(injected(lora), batches(token_examples(), 8), _config(tmp_path / "plain", **kw))
    train(injected(lora), batches(token_examples(), 8), _config(tmp_path / "plus", loraplus_ratio=4.0, **kw))
    plain, plus = adapter_tensors(tmp_path / "plain" / "adapter"), adapter_tensors(tmp_path / "plus" / "adapter")
    for key in plain:
        if ".lora_B." in key:
            assert plain[key].abs().max() > 0
            torch.testing.assert_close(plus[key], 4.0 * plain[key], rtol=1e-5, atol=1e-8)
        else:
            torch.testing.assert_close(plus[key], plain[key], rtol=0, atol=0)


@pytest.mark.parametrize("ratio", [0, -2.0, float("inf"), True])
def test_bad_ratio_is_refused(ratio):
    with pytest.raises(ValueError, match="loraplus_ratio"):
        TrainConfig(loraplus_ratio=ratio)


def test_ratio_without_lora_factors_is_refused(tmp_path):
    model = injected(LORA)
    for p in model.parameters():  # full fine-tuning of the norm only: nothing for LoRA+ to act on
        p.requires_grad_(False)
    model.model.norm.modules_to_save["default"].weight.requires_grad_(True)
    with pytest.raises(ValueError, match="loraplus_ratio"):
        train(model, batches(token_examples(), 8), _config(tmp_path, loraplus_ratio=16.0), adapter_name=None)


def test_resume_with_another_ratio_is_refused(tmp_path):
    train(injected(LORA), batches(token_examples(), 8), _config(tmp_path, max_steps=2))
    with pytest.raises(ResumeError, match="loraplus_ratio"):
        train(injected(LORA), batches(token_examples(), 8), _config(tmp_path, max_steps=4, loraplus_ratio=16.0),
              resume=True)


def test_resume_keeps_the_b_group(tmp_path):
    """A LoRA+ run resumed from its checkpoint ends with the adapter of an uninterrupted one."""
    data = token_examples()
    train(injected(LORA), batches(data, 8), _config(tmp_path / "whole", loraplus_ratio=8.0))

    def stop(step, metrics):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(injected(LORA), batches(data, 8), _config(tmp_path / "cut", loraplus_ratio=8.0), on_step=stop)
    train(injected(LORA), batches(data, 8), _config(tmp_path / "cut", loraplus_ratio=8.0), resume=True)
    whole, cut = adapter_tensors(tmp_path / "whole" / "adapter"), adapter_tensors(tmp_path / "cut" / "adapter")
    for key in whole:
        torch.testing.assert_close(cut[key], whole[key], rtol=0, atol=0)


def test_cli_flag_reaches_the_optimizer(model_dir, e2e_file, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    assert main(["train", "--model", str(model_dir), "--data", str(e2e_file), "--out", str(out), "--steps", "1",
                 "--batch-size", "4", "--rank", "4", "--lr", "1e-3", "--schedule", "constant",
                 "--loraplus-ratio", "16", "--device", "cpu"]) == 0
    a, b, flat = load_checkpoint(out / "checkpoint").state["optimizer_groups"]
    assert all(".lora_B." in n for n in b["params"]) and not any(".lora_B." in n for n in a["params"])
    assert (a["lr"], b["lr"]) == (pytest.approx(1e-3), pytest.approx(16e-3))


def test_cli_bad_ratio_names_the_flag(tmp_path, capsys):
    rc = main(["train", "--loraplus-ratio", "-1", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "--loraplus-ratio" in err and "got -1.0" in err and "loraplus_ratio" not in err, err
    assert not (tmp_path / "o").exists()
