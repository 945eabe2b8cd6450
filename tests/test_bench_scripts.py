"""The QLoRA benchmark scripts run, in-process on tiny shapes: benchmarks/qlora_70b.py builds its
model layer by layer into 4 bits and trains a step; benchmarks/train_speed.py gives floor, lorakit
and PEFT rows the same quantized base. Timing is not checked here (benchmarks are not timed tests)."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes")
logging.getLogger("bitsandbytes").setLevel(logging.CRITICAL)

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script runs
    spec.loader.exec_module(module)
    return module


TINY_70B = dict(device="cpu", layers=2, hidden=128, intermediate=256, heads=4, kv_heads=2, vocab=100, batch=1, seq=16,
                steps=1, warmup=1, quantize="nf4", double_quant=True, optimizer="adamw", autocast=False)


def test_qlora_70b_builds_in_4_bits_and_trains_lorakit_adapters():
    qlora = load_script("qlora_70b")
    result = qlora.run(argparse.Namespace(**{**TINY_70B, "optimizer": "adamw8bit"}))
    assert result["quantization"] == "NF4, double quantization"
    assert all(math.isfinite(x) for x in result["losses"]) and len(result["step_times_s"]) == 2
    per_layer = 16 * ((128 + 128) * 2 + (128 + 64) * 2 + (128 + 256) * 3)  # r·(d_in + d_out): q, o; k, v; mlp
    assert result["trainable_params"] == 2 * per_layer
    dense = (2 * 100 * 128 + 128 + 2 * 2 * 128) * 4  # fp32 on CPU: embeddings, head, norms
    assert dense < result["model_bytes"] < dense + 2 * 7 * 128 * 256  # + the 4-bit linears, well under 1 byte/weight


def test_qlora_70b_build_never_leaves_a_dense_decoder_linear_or_a_meta_tensor():
    from lorakit.quantize import Quantization

    qlora = load_script("qlora_70b")
    model, _ = qlora.build(argparse.Namespace(**TINY_70B), Quantization("nf4", double_quant=True))
    linears = {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linears.pop("lm_head") == "Linear" and set(linears.values()) == {"Linear4bit"} and len(linears) == 14
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])


def test_train_speed_gives_every_row_the_same_quantized_base(tmp_path):
    speed = load_script("train_speed")
    args = argparse.Namespace(device="cpu", dtype="float32", attention="sdpa", sdpa_backend="default", batch=1, seq=16,
                              steps=1, warmup=1, profile=None, quantize="nf4", double_quant=True,
                              grad_checkpoint=True, optimizer="adamw8bit")
    rows = {v: speed.measure(speed.Row("tiny", v, None if v == "floor" else "qv", False, False), args)
            for v in ("floor", "lorakit", "peft")}
    assert len({r["model_bytes"] for r in rows.values()}) == 1
    assert rows["floor"]["trainable_params"] == 0 and rows["lorakit"]["trainable_params"] == rows["peft"][
        "trainable_params"] > 0
    # same base, same batches, B = 0: the same first loss
    assert rows["lorakit"]["losses"][0] == pytest.approx(rows["peft"]["losses"][0], rel=1e-5)
    assert rows["floor"]["losses"][0] == pytest.approx(rows["peft"]["losses"][0], rel=1e-5)
