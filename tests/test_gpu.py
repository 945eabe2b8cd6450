"""The CUDA default path, checked on the device (CI has no GPU: these skip there): the op against a
float64 recomputation at model sizes, the model's forward against the reference forward, the
regression cases of issue 11 on CUDA, and torch.compile against eager."""

from __future__ import annotations

import io

import pytest
import torch

import lorakit
from lorakit.layers import LoraLayer, LoraLinear

from conftest import randomize_adapters
from test_ops import check_against_reference, eager_twin, op

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def cuda_operands(dtype, lead=(4, 512), d_in=2048, d_out=5632, ranks=(16,), bias=False):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(*lead, d_in, device="cuda", generator=g).to(dtype).requires_grad_()
    W = (torch.randn(d_out, d_in, device="cuda", generator=g) / d_in ** 0.5).to(dtype)
    b = torch.randn(d_out, device="cuda", generator=g).to(dtype).requires_grad_() if bias else None
    As = [(torch.randn(r, d_in, device="cuda", generator=g) / d_in ** 0.5).requires_grad_() for r in ranks]
    Bs = [(torch.randn(d_out, r, device="cuda", generator=g) / r ** 0.5).requires_grad_() for r in ranks]
    return x, W, b, As, Bs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["one", "two-with-bias", "dropout"])
def test_cuda_op_matches_float64_reference_at_model_sizes(dtype, case):
    ranks = (16, 8) if case == "two-with-bias" else (16,)
    x, W, b, As, Bs = cuda_operands(dtype, ranks=ranks, bias=case == "two-with-bias")
    for call in (op, eager_twin):
        check_against_reference(call, dtype, x, W, b, As, Bs, [2.0, 0.5][:len(ranks)],
                                p=0.1 if case == "dropout" else 0.0)


def cuda_llama(dtype=torch.bfloat16):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(dtype)
    lorakit.inject(model, lorakit.LoraConfig(r=16, alpha=32, target_modules="all-linear"))
    randomize_adapters(model, std=0.02)
    return model


def reference_logits(model, ids):
    saved = LoraLinear.forward
    LoraLinear.forward = LoraLayer.forward
    try:
        return model(ids).logits.float()
    finally:
        LoraLinear.forward = saved


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_cuda_model_forward_equals_reference_and_follows_data_updates():
    model = cuda_llama().train()
    ids = torch.randint(0, 512, (2, 64), device="cuda")
    assert rel(model(ids).logits, reference_logits(model, ids)) < 1e-2
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLinear):
                module.lora_B["default"].data.mul_(-3.0)
    assert rel(model(ids).logits, reference_logits(model, ids)) < 1e-2
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("autocast", [False, True])
def test_cuda_compiled_equals_eager(autocast):
    torch._dynamo.reset()
    model = cuda_llama().train()
    ids = torch.randint(0, 512, (4, 128), device="cuda")
    compiled = torch.compile(model, fullgraph=True)
    results = []
    for run in (model, compiled):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = run(input_ids=ids, labels=ids)
        out.loss.backward()
        results.append((out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                               if p.requires_grad}))
    (eager_logits, eager_grads), (logits, grads) = results
    assert rel(logits, eager_logits) < 1e-2
    # bf16: Inductor rounds intermediates differently (float32 inside its fused kernels); all adapter
    # gradients together within 1e-2, each tensor within 2e-2 (seen: up to 1.1% for one A).
    assert rel(torch.cat([g.flatten() for g in grads.values()]),
               torch.cat([eager_grads[n].flatten() for n in grads])) < 1e-2
    for name in grads:
        assert rel(grads[name], eager_grads[name]) < 2e-2, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_swiglu_down_op_matches_float64_at_model_sizes(dtype):
    from test_swiglu import check, eager_twin as swiglu_twin

    g = torch.Generator(device="cuda").manual_seed(1)
    gate, up = (torch.randn(4, 512, 5632, device="cuda", generator=g).to(dtype).requires_grad_() for _ in range(2))
    W = (torch.randn(2048, 5632, device="cuda", generator=g) / 5632 ** 0.5).to(dtype)
    As = [(torch.randn(16, 5632, device="cuda", generator=g) / 5632 ** 0.5).requires_grad_()]
    Bs = [(torch.randn(2048, 16, device="cuda", generator=g) / 4).requires_grad_()]
    for call in (torch.ops.lorakit.lora_swiglu_linear, swiglu_twin):
        check(call, dtype, gate, up, W, None, As, Bs, [2.0], p=0.1)
