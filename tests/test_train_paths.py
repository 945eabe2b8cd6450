"""Paths of `lorakit train` beyond the basics: resume with other steps or other data, resume and
overwrite together, PiSSA on a quantized base, and the int8 base's log.

Everything runs on the tiny Llama of conftest (vocab 100, hidden 32, 2 layers), fed token ids."""

from __future__ import annotations

import logging
from functools import partial

import pytest
import torch
from torch import nn

import lorakit
from lorakit.data import Batches, collate
from lorakit.finetune import DataSpec, finetune
from lorakit.hints import SettingError
from lorakit.train import ResumeError, TrainConfig, train

from conftest import tiny_llama

LORA = lorakit.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"])


def examples(n: int = 16, length: int = 10) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 100, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] + ids[1:]})
    return out


def batches(data) -> Batches:
    return Batches(data, 4, seed=0, collate_fn=partial(collate, pad_id=0))


def config(out, **kw) -> TrainConfig:
    return TrainConfig(**{**dict(max_steps=2, batch_size=4, save_every=2, out_dir=out, progress=False, device="cpu"), **kw})


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    out = tmp_path_factory.mktemp("two")
    train(lorakit.inject(tiny_llama(), LORA), batches(examples()), config(out))
    return out


def test_resume_refuses_a_checkpoint_past_the_steps_asked_for(two_steps):
    # It used to "resume" at step 2 of a 1-step run, train nothing and save step 2's adapter.
    with pytest.raises(ResumeError, match="at step 2, past the 1 steps"):
        train(lorakit.inject(tiny_llama(), LORA), batches(examples()), config(two_steps, max_steps=1), resume=True)


def test_resume_refuses_other_tokens_of_as_many_examples(two_steps):
    # Another file of as many lines, or another --seq-len / --chat-template, used to resume silently.
    shorter = [{k: v[:6] for k, v in ex.items()} for ex in examples()]
    with pytest.raises(ResumeError, match="data"):
        train(lorakit.inject(tiny_llama(), LORA), batches(shorter), config(two_steps, max_steps=4), resume=True)


def test_resume_with_the_same_tokens_is_accepted(two_steps, tmp_path):
    import shutil
    out = tmp_path / "run"
    shutil.copytree(two_steps, out)
    result = train(lorakit.inject(tiny_llama(), LORA), batches(examples()), config(out, max_steps=3), resume=True)
    assert result.steps == 3


def test_resume_and_overwrite_together_are_refused(two_steps):
    with pytest.raises(ResumeError, match="resume=True.*overwrite=True.*choose one"):
        train(lorakit.inject(tiny_llama(), LORA), batches(examples()), config(two_steps, overwrite=True),
              resume=True)


def test_pissa_on_a_quantized_base_is_refused_before_any_work(tmp_path):
    from lorakit.quantize import Quantization
    # The data file does not exist: the refusal must come before it is read and the base quantized.
    with pytest.raises(SettingError, match="init='pissa'.*quantize") as e:
        finetune("default", DataSpec(train=str(tmp_path / "missing.jsonl")),
                 lorakit.LoraConfig(r=2, alpha=4, init="pissa"), config(tmp_path), quantization=Quantization("nf4"))
    assert "--init pissa" in e.value.render({"init": "--init", "quantize": "--quantize"})


def test_an_int8_base_says_its_float16_cast_once_not_per_forward(caplog):
    pytest.importorskip("bitsandbytes")
    from lorakit.quantize import Quantization, quantize_model

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)

        def forward(self, x):
            return self.b(self.a(x))

    torch.manual_seed(0)
    model = Two()
    quantize_model(model, Quantization("int8"))
    model.eval()  # in eval mode (the run's evaluations) bitsandbytes' CPU path logs the cast on every call
    with caplog.at_level(logging.WARNING, logger="bitsandbytes"):
        for _ in range(3):
            model(torch.randn(2, 64))
    casts = [r for r in caplog.records if "inputs will be cast" in r.getMessage()]
    assert len(casts) <= 1  # without the filter: one per layer and forward (6)


def test_run_json_model_bytes_counts_a_4bit_bases_quantization_state(tmp_path):
    pytest.importorskip("bitsandbytes")
    import json
    from transformers import LlamaConfig, LlamaForCausalLM
    from lorakit.quantize import Quantization, model_bytes, quantize_model

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    quantize_model(model, Quantization("nf4", double_quant=True))
    lorakit.inject(model, LORA)
    train(model, batches(examples()), config(tmp_path, max_steps=1))
    # It was the parameters' packed bytes alone, without the block scales that QLoRA's size includes.
    assert json.loads((tmp_path / "run.json").read_text())["model_bytes"] == model_bytes(model)
