"""The fused LoRA linear op against a float64 recomputation of the reference math."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from lorakit.ops.fused import _mask, fused_lora_linear


def inputs(dtype, d_in=24, d_out=20, r=4, lead=(3, 7), seed=None):
    fresh = int.from_bytes(os.urandom(4), "little")  # new random inputs every run, never zeros
    g = torch.Generator().manual_seed(seed if seed is not None else fresh)
    x = torch.randn(*lead, d_in, generator=g).to(dtype).requires_grad_()
    W = torch.randn(d_out, d_in, generator=g).to(dtype)
    b = torch.randn(d_out, generator=g).to(dtype).requires_grad_()
    A = (torch.randn(r, d_in, generator=g) * 0.3).requires_grad_()
    B = (torch.randn(d_out, r, generator=g) * 0.3).requires_grad_()
    return x, W, b, A, B


def reference64(x, W, b, A, B, s, mask=None):
    """h = x·W0ᵀ + b + s·(mask⊙x)·Aᵀ·Bᵀ and its gradients, all in float64."""
    x64, W64, b64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, W, b, A, B))
    x_in = x64 * mask.double() if mask is not None else x64
    out = F.linear(x64, W64, b64) + s * (x_in @ A64.t()) @ B64.t()
    return out, (x64, b64, A64, B64)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_matches_float64_reference(dtype, tol, dropout):
    x, W, b, A, B = inputs(dtype)
    torch.manual_seed(123)
    out = fused_lora_linear(x, W, b, A, B, 2.0, dropout, training=True)
    torch.manual_seed(123)
    seed = int(torch.randint(0, 2**62, (1,)).item()) if dropout else 0
    mask = _mask(x.detach(), dropout, seed) if dropout else None
    ref, leaves = reference64(x, W, b, A, B, 2.0, mask)
    assert out.dtype == dtype and rel(out, ref) < tol
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(grad.to(dtype))
    ref.backward(grad.double())
    for mine, theirs in zip((x, b, A, B), leaves):
        assert rel(mine.grad, theirs.grad) < tol, (mine.shape, rel(mine.grad, theirs.grad))
    assert A.grad.dtype == torch.float32 and B.grad.dtype == torch.float32


def test_eval_mode_has_no_dropout_and_is_deterministic():
    x, W, b, A, B = inputs(torch.float32, seed=0)
    out1 = fused_lora_linear(x, W, b, A, B, 1.0, 0.5, training=False)
    out2 = fused_lora_linear(x, W, b, A, B, 1.0, 0.5, training=False)
    ref, _ = reference64(x, W, b, A, B, 1.0)
    assert torch.equal(out1, out2) and rel(out1, ref) < 1e-5


def saved_bytes(fn) -> int:
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_saves_no_dropout_copy_or_mask():
    x, W, b, A, B = inputs(torch.float32, d_in=256, d_out=256, r=8, lead=(4, 128), seed=0)
    W.requires_grad_(False)
    b = b.detach()
    drop = torch.nn.Dropout(0.1).train()

    def reference():
        return F.linear(x, W, b) + ((drop(x) @ A.t()) @ B.t()) * 2.0

    ours = saved_bytes(lambda: fused_lora_linear(x, W, b, A, B, 2.0, 0.1, training=True))
    theirs = saved_bytes(reference)
    x_bytes = x.numel() * 4
    # Ours: x, W, A, B and the (T, r) projection. The reference also keeps a dropped copy of x and a mask.
    assert ours <= x_bytes + W.numel() * 4 + (A.numel() + B.numel()) * 4 + 4 * 128 * 8 * 4
    assert theirs - ours >= x_bytes


def test_layer_with_fused_op_equals_the_reference_path(monkeypatch):
    import lorakit
    import lorakit.layers.linear as linear

    calls = []
    monkeypatch.setattr(linear, "fused_lora_linear", lambda *a: calls.append(1) or fused_lora_linear(*a))

    from conftest import randomize_adapters, tiny_llama

    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    results = []
    for fused in (False, True):
        model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
        randomize_adapters(model)
        for m in model.modules():
            if isinstance(m, lorakit.LoraLayer):
                m.use_fused_op = fused
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (loss_ref, grads_ref), (loss_fused, grads_fused) = results
    assert len(calls) == 2 * 7  # every adapted linear of the fused run took the fused path
    torch.testing.assert_close(loss_fused, loss_ref)
    for name in grads_ref:
        torch.testing.assert_close(grads_fused[name], grads_ref[name], rtol=1e-4, atol=1e-6)
