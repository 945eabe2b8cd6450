"""Rebuilding an adapted layer's input in backward (ops/rebuild.py): exact, or not attempted."""

from __future__ import annotations

import pytest
import torch

from lorakit.ops import rebuild

from test_ops import count_fused_calls, injected_llama, loss_and_grads


def rms_norm(h, weight, eps=1e-6):
    """LlamaRMSNorm's arithmetic, in the order transformers writes it."""
    dtype = h.dtype
    hs = h.to(torch.float32)
    hs = hs * torch.rsqrt(hs.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hs.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_and_swiglu_outputs_are_rebuilt_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 7, 16, generator=g).to(dtype).requires_grad_()
    weight = (torch.rand(16, generator=g) + 0.5).to(dtype)  # frozen, as in LoRA training
    x = rms_norm(h, weight)
    recipe = rebuild.plan(x)
    assert recipe is not None
    assert torch.equal(rebuild.rebuild(recipe), x)

    gate = torch.randn(3, 7, 32, generator=g).to(dtype).requires_grad_()
    up = torch.randn(3, 7, 32, generator=g).to(dtype).requires_grad_()
    p = torch.nn.functional.silu(gate) * up
    assert torch.equal(rebuild.rebuild(rebuild.plan(p)), p)


def test_other_inputs_are_not_rebuilt():
    h = torch.randn(4, 8, requires_grad=True)
    assert rebuild.plan(h) is None  # a leaf
    assert rebuild.plan(h.t().contiguous()) is None  # a copy of another layout
    assert rebuild.plan(h * 2.0) is None  # tensor · scalar
    assert rebuild.plan(torch.tanh(h)) is None
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        assert rebuild.plan(h * h) is None  # checkpointing / offloading decides what is kept


def fused_activation_bytes(loss: torch.Tensor) -> int:
    """Bytes of the non-parameter tensors the fused op's graph nodes keep for backward."""
    seen, stack, storages = set(), [loss.grad_fn], {}
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "LoraLinearFunctionBackward":
            for t in node.saved_tensors:
                if not isinstance(t, torch.nn.Parameter):
                    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        stack += [child for child, _ in node.next_functions]
    return sum(storages.values())


@pytest.mark.parametrize("mode", ["products", True])
def test_a_llama_keeps_fewer_inputs_and_grads_do_not_change(monkeypatch, mode):
    import lorakit.ops.fused as fused

    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    calls = count_fused_calls(monkeypatch)
    recipes, from_factors = [], []
    original = fused.rebuild_input.plan
    monkeypatch.setattr(fused.rebuild_input, "plan", lambda x, **kw: recipes.append(original(x, **kw)) or recipes[-1])
    product_grad = fused.product_grad
    monkeypatch.setattr(fused, "product_grad", lambda *a: from_factors.append(a) or product_grad(*a))
    results, saved = [], []
    for rebuild_inputs in (False, mode):
        monkeypatch.setattr(fused, "REBUILD_INPUTS", rebuild_inputs)
        model = injected_llama(True).train()
        loss_and_grads(model, ids)  # learns the q|k|v and gate|up groups
        recipes.clear()
        calls.clear()
        from_factors.clear()
        loss = model(input_ids=ids, labels=ids).loss
        saved.append(fused_activation_bytes(loss))
        loss.backward()
        factor_calls = list(from_factors)
        model.zero_grad(set_to_none=True)
        results.append(loss_and_grads(model, ids))
    assert calls[:8] == [3, 1, 2, 1] * 2  # the first forward of the rebuilding model: q|k|v, o, gate|up, down
    hidden, inter, tokens = 32, 64, 2 * 9
    if mode == "products":
        # Only down_proj's input, SwiGLU's product, is rebuilt — and never formed: dA comes from
        # its two factors, once per layer.
        assert [r is not None for r in recipes[:8]] == [False, False, False, True] * 2
        assert [a.shape for _, a, _ in factor_calls] == [(2, 9, inter)] * 2
        assert saved[0] - saved[1] == 2 * tokens * inter * 4
    else:
        # q|k|v and gate|up rebuild RMSNorm's output, down rebuilds SwiGLU's; o_proj reads the
        # attention output, a reshaped copy, and keeps it. Layer 0's attention input comes from the
        # frozen embedding: it needs no gradient, has no graph to rebuild it from, and is kept.
        assert [r is not None for r in recipes[:8]] == [False, False, True, True] + [True, False, True, True]
        # float32: the MLP input and the SwiGLU product of both layers and layer 1's attention input
        assert saved[0] - saved[1] >= tokens * (3 * hidden + 2 * inter) * 4
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_autocast_rebuild_gives_the_same_loss_and_grads(monkeypatch):
    import lorakit.ops.fused as fused

    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0)).cuda()
    results = []
    for rebuild_inputs in (False, "products", True):
        monkeypatch.setattr(fused, "REBUILD_INPUTS", rebuild_inputs)
        model = injected_llama(None).cuda().train()
        for _ in range(2):  # the second step runs the groups
            model.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters() if p.requires_grad]))
    (loss_a, grads_a), *rebuilt = results
    for loss_b, grads_b in rebuilt:  # the Triton kernel sums in another order than cuBLAS: not bit for bit
        torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=0)
        for a, b in zip(grads_a, grads_b):
            torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-6)
