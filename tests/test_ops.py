"""The fused LoRA linear op against a float64 recomputation of the reference math."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F

from lorakit.ops.fused import _mask, fused_lora_linear, fused_lora_linears


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


def group_inputs(dtype, seed=None, d_in=32, layers=((32, 4, 2.0, True), (8, 2, 0.5, False), (40, 8, 1.0, True))):
    """x and per-layer (W, b, A, B, s) for layers that share x: (d_out, r, scaling, has bias)."""
    fresh = int.from_bytes(os.urandom(4), "little")
    g = torch.Generator().manual_seed(seed if seed is not None else fresh)
    x = torch.randn(3, 5, d_in, generator=g).to(dtype).requires_grad_()
    specs = []
    for d_out, r, s, has_bias in layers:
        W = torch.randn(d_out, d_in, generator=g).to(dtype)
        b = torch.randn(d_out, generator=g).to(dtype).requires_grad_() if has_bias else None
        A = (torch.randn(r, d_in, generator=g) * 0.3).requires_grad_()
        B = (torch.randn(d_out, r, generator=g) * 0.3).requires_grad_()
        specs.append((W, b, A, B, s))
    return x, specs


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_group_of_layers_sharing_x_matches_float64_reference(dtype, tol):
    x, specs = group_inputs(dtype)
    outs = fused_lora_linears(x, specs)
    x64 = x.detach().double().requires_grad_()
    leaves64, refs = [], []
    for W, b, A, B, s in specs:
        b64, A64, B64 = (t.detach().double().requires_grad_() if t is not None else None for t in (b, A, B))
        refs.append(F.linear(x64, W.double(), b64) + s * (x64 @ A64.t()) @ B64.t())
        leaves64.append((b64, A64, B64))
    g = torch.Generator().manual_seed(2)
    grads = [torch.randn(r.shape, generator=g, dtype=torch.float64) for r in refs]
    torch.autograd.backward(outs, [gr.to(dtype) for gr in grads])
    torch.autograd.backward(refs, grads)
    assert rel(x.grad, x64.grad) < tol
    for out, ref, (W, b, A, B, s), theirs in zip(outs, refs, specs, leaves64):
        assert out.dtype == dtype and rel(out, ref) < tol
        for mine, their in zip((b, A, B), theirs):
            if mine is not None:
                assert rel(mine.grad, their.grad) < tol


def test_group_with_an_unused_output_gives_the_used_layers_gradients():
    x, specs = group_inputs(torch.float32)
    outs = fused_lora_linears(x, specs)
    (outs[0].square().sum() + outs[2].sum()).backward()
    x2 = x.detach().clone().requires_grad_()
    ref0 = fused_lora_linear(x2, *specs[0][:4], specs[0][4])
    ref2 = fused_lora_linear(x2, *specs[2][:4], specs[2][4])
    grads = torch.autograd.grad(ref0.square().sum() + ref2.sum(), [x2, specs[0][2], specs[2][3]])
    assert specs[1][3].grad is None and not specs[1][2].grad.any()  # A's shared matmul gives it exact zeros
    assert rel(x.grad, grads[0]) < 1e-5
    assert rel(specs[0][2].grad, grads[1]) < 1e-5 and rel(specs[2][3].grad, grads[2]) < 1e-5


def count_fused_calls(monkeypatch) -> list[int]:
    """Each entry: the number of layers in one fused call."""
    from lorakit.ops import fused

    calls = []
    original = fused.lora_linear_apply

    def counting(x, plan, *params):
        calls.append(len(plan[0]))  # plan = (scalings, dropout, seed, A_cat, Bs)
        return original(x, plan, *params)

    monkeypatch.setattr(fused, "lora_linear_apply", counting)
    return calls


def injected_llama(fused, r=4, dropout=0.0):
    import lorakit
    from conftest import randomize_adapters, tiny_llama

    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=r, alpha=8, dropout=dropout, target_modules="all-linear"))
    randomize_adapters(model)
    for m in model.modules():
        if isinstance(m, lorakit.LoraLayer):
            m.use_fused_op = fused
    return model


def loss_and_grads(model, ids):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_layers_with_fused_op_equal_the_reference_path_and_group_q_k_v(monkeypatch):
    calls = count_fused_calls(monkeypatch)
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    reference = injected_llama(False).train()
    fused = injected_llama(True).train()
    for step in range(3):
        calls.clear()
        loss_ref, grads_ref = loss_and_grads(reference, ids)
        loss_fused, grads_fused = loss_and_grads(fused, ids)
        torch.testing.assert_close(loss_fused, loss_ref)
        for name in grads_ref:
            torch.testing.assert_close(grads_fused[name], grads_ref[name], rtol=1e-4, atol=1e-6)
        n_layers = reference.config.num_hidden_layers
        if step == 0:  # the first forward learns which siblings read one tensor, one layer per call
            assert calls == [1] * 7 * n_layers
        else:  # then q|k|v, o, gate|up, down: four calls per decoder layer
            assert sorted(calls) == sorted([3, 1, 2, 1] * n_layers)
        with torch.no_grad():  # and the optimizer's in-place update must not be served stale outputs
            for model in (reference, fused):
                for p in model.parameters():
                    if p.requires_grad:
                        p.add_(0.01)


def test_fused_groups_work_under_inference_mode(monkeypatch):
    calls = count_fused_calls(monkeypatch)
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    model = injected_llama(True).eval()
    with torch.inference_mode():
        got = [model(input_ids=ids).logits for _ in range(2)]
    assert 3 in calls  # the second forward ran q|k|v as one group
    for m in model.modules():
        if hasattr(m, "use_fused_op"):
            m.use_fused_op = False
    with torch.inference_mode():
        want = model(input_ids=ids).logits
    torch.testing.assert_close(got[1], want)


def test_kept_adapter_casts_follow_replaced_storage():
    model = injected_llama(True).train()
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids).logits.sum().backward()  # keeps casts of every adapter
    for p in model.parameters():  # what .to(device) does: new storage, same Parameter, same version
        if p.requires_grad:
            p.data = p.data * 2
    got = model(input_ids=ids).logits
    for m in model.modules():
        if hasattr(m, "use_fused_op"):
            m.use_fused_op = False
    torch.testing.assert_close(got, model(input_ids=ids).logits)


def bf16_llama_with_optimizer(fused):
    import lorakit
    from conftest import randomize_adapters, tiny_llama

    model = lorakit.inject(tiny_llama().to(torch.bfloat16), lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    randomize_adapters(model)
    for m in model.modules():
        if isinstance(m, lorakit.LoraLayer):
            m.use_fused_op = fused
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in params)
    return model.train(), torch.optim.AdamW(params, lr=1e-2)


def test_adapter_casts_are_made_for_every_layer_at_once():
    from lorakit.inject import lora_state
    from lorakit.layers.linear import LoraLinear

    model, opt = bf16_llama_with_optimizer(True)
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    for _ in range(3):  # the first forward learns the groups; then optimizer steps change every adapter
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    buffer = lora_state(model).casts._buffer
    assert buffer is not None and buffer.dtype == torch.bfloat16
    linears = [m for m in model.modules() if isinstance(m, LoraLinear)]
    leaders = 0
    for layer in linears:
        A, B, _, dtype, A_cast, A_cast_t, B_cast, B_cast_t = layer._casts
        assert torch.equal(A_cast_t, A_cast.t()) and torch.equal(B_cast_t, B_cast.t())
        # the casts this forward multiplied with are views of the one buffer, and exact
        assert A_cast.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
        assert B_cast.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
        assert torch.equal(A_cast, A.detach().to(dtype)) and torch.equal(B_cast, B.detach().to(dtype))
        if layer._cat is not None:  # a group's stacked A: a view too, no concatenation per call
            As, A_cat, A_cat_t, _ = layer._cat
            assert torch.equal(A_cat_t, A_cat.t())
            leaders += 1
            assert A_cat.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
            assert torch.equal(A_cat, torch.cat(As))
    assert leaders == 2 * model.config.num_hidden_layers  # q|k|v and gate|up in each layer


def test_adapter_casts_give_the_reference_losses_over_optimizer_steps():
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    losses = []
    for fused in (False, True):
        model, opt = bf16_llama_with_optimizer(fused)
        losses.append([])
        for _ in range(4):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[-1].append(loss.item())
        # a layer called on its own, outside the model's forward, after a step: casts for itself
        layer = model.model.layers[0].self_attn.q_proj
        x = torch.randn(3, 32, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
        A, B = layer.lora_A["default"], layer.lora_B["default"]
        x64, W64, A64, B64 = (t.detach().double() for t in (x, layer.base_layer.weight, A, B))
        want = x64 @ W64.t() + layer.scaling["default"] * (x64 @ A64.t()) @ B64.t()
        assert rel(layer(x), want) < 1e-2
    ref, got = losses
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=0)  # bf16 rounding of other op orders
    assert ref[-1] < ref[0] - 0.1  # it trained


def test_adapter_casts_made_under_inference_mode_serve_training():
    """An evaluation forward right after an optimizer step refreshes the casts under inference
    mode; the training step after it must still be able to save them for backward."""
    model, opt = bf16_llama_with_optimizer(True)
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.inference_mode():
            model(input_ids=ids)
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_adapter_casts_follow_the_active_adapter_and_deletion():
    import lorakit

    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    models = []
    for fused in (False, True):
        model = injected_llama(fused)
        lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "down_proj"]), "other")
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name and "other" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
        models.append(model)
    for step in (lambda m: lorakit.use(m, "other"), lambda m: lorakit.use(m, "default"),
                 lambda m: lorakit.delete_adapter(m, "other")):
        outs = []
        for model in models:
            step(model)
            model(input_ids=ids)  # learns groups for the new set of active layers
            outs.append(model(input_ids=ids).logits)
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fused", [False, True])
def test_a_graph_kept_across_an_optimizer_step_fails_in_backward(fused):
    model, opt = bf16_llama_with_optimizer(fused)
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    stale = model(input_ids=ids, labels=ids).loss
    opt.step()
    model(input_ids=ids, labels=ids)  # refreshes the casts in place
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        stale.backward()


def test_auto_mode_uses_the_reference_path_on_cpu(monkeypatch):
    calls = count_fused_calls(monkeypatch)
    model = injected_llama(None)
    model(input_ids=torch.randint(0, 100, (1, 5))).logits.sum().backward()
    assert calls == []


class TwoHeads(torch.nn.Module):
    """q and k are siblings; ``mode`` decides what k reads."""

    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(16, 16)
        self.k = torch.nn.Linear(16, 8)
        self.mode = "same"

    def forward(self, x):
        q = self.q(x)
        if self.mode == "same":
            k = self.k(x)
        elif self.mode == "copy":
            k = self.k(x.clone())
        else:  # "mutated": x is changed in place between the two calls
            x.mul_(2)
            k = self.k(x)
        return q.sum(-1) + k.sum(-1)


@pytest.mark.parametrize("mode", ["copy", "mutated"])
def test_shared_input_guess_never_serves_a_wrong_output(mode):
    import lorakit

    torch.manual_seed(0)
    model = lorakit.inject(TwoHeads(), lorakit.LoraConfig(r=2, alpha=4, target_modules=["q", "k"]))
    for m in model.modules():
        if isinstance(m, lorakit.LoraLayer):
            m.use_fused_op = True
            torch.nn.init.normal_(m.lora_B["default"])
    x = torch.randn(4, 16)
    for _ in range(2):  # learn the q -> k grouping
        model(x)
    assert model.q.shared_input.followers_of(model.q) == (model.k,)
    model.mode = mode
    got = model(x.clone())
    for m in model.modules():
        if isinstance(m, lorakit.LoraLayer):
            m.use_fused_op = False
    want = model(x.clone())
    torch.testing.assert_close(got, want)
    assert model.q.shared_input.followers_of(model.q) == ()  # the guess was dropped


def test_cpu_autocast_runs_the_fused_op_in_bf16():
    model = injected_llama(True)
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(3))
    outs = []
    for fused in (True, False):
        for m in model.modules():
            if hasattr(m, "use_fused_op"):
                m.use_fused_op = fused
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(model(input_ids=ids).logits)
    assert outs[0].dtype == outs[1].dtype
    assert rel(outs[0], outs[1]) < 2e-2


def test_group_saves_x_once_and_no_dropout_copies():
    x, specs = group_inputs(torch.float32, seed=0, d_in=256, layers=((256, 8, 2.0, False),) * 3)
    x = x.detach().requires_grad_()
    ours = saved_bytes(lambda: fused_lora_linears(x, specs))
    x_bytes = x.numel() * 4
    weights = sum(W.numel() + A.numel() + B.numel() for W, _, A, B, _ in specs) * 4
    low = x.numel() // 256 * 24 * 4
    assert ours <= x_bytes + weights + low + 24 * 256 * 4  # + the scaled copy of [A1; A2; A3]


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-3), (torch.bfloat16, 1e-2)])
def test_cuda_group_matches_float64_reference_at_model_sizes(dtype, tol):
    # TinyLlama's attention block: q (2048) and GQA k, v (256) read one x; r=16, 4 x 512 tokens.
    x, specs = group_inputs(dtype, d_in=2048, layers=((2048, 16, 2.0, False), (256, 16, 2.0, False),
                                                      (256, 16, 2.0, False)))
    x = torch.randn(4, 512, 2048, device="cuda").to(dtype).requires_grad_()
    specs = [tuple(t.detach().cuda().requires_grad_(t.requires_grad) if torch.is_tensor(t) else t for t in layer)
             for layer in specs]
    outs = fused_lora_linears(x, specs)
    x64 = x.detach().double().requires_grad_()
    refs, leaves = [], []
    for W, _, A, B, s in specs:
        A64, B64 = (t.detach().double().requires_grad_() for t in (A, B))
        refs.append(x64 @ W.double().t() + s * (x64 @ A64.t()) @ B64.t())
        leaves.append((A64, B64))
    grads = [torch.randn_like(r) for r in refs]
    torch.autograd.backward(outs, [g.to(dtype) for g in grads])
    torch.autograd.backward(refs, grads)
    assert rel(x.grad, x64.grad) < tol
    for out, ref, (_, _, A, B, _), (A64, B64) in zip(outs, refs, specs, leaves):
        assert rel(out, ref) < tol and rel(A.grad, A64.grad) < tol and rel(B.grad, B64.grad) < tol


@cuda
def test_cuda_model_takes_the_fused_op_by_default_under_autocast(monkeypatch):
    calls = count_fused_calls(monkeypatch)
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0)).cuda()
    results = []
    for fused in (None, False):
        model = injected_llama(fused).cuda().train()
        for _ in range(2):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        results.append((loss.detach().float(), [p.grad.float() for p in model.parameters() if p.requires_grad]))
        if fused is None:
            assert 3 in calls and 2 in calls  # q|k|v and gate|up ran as groups in the second step
    (loss_auto, grads_auto), (loss_ref, grads_ref) = results
    assert abs(loss_auto - loss_ref) < 1e-2 * abs(loss_ref)
    assert max(rel(a, b) for a, b in zip(grads_auto, grads_ref)) < 3e-2


def ticketed_calls(monkeypatch) -> list[bool]:
    """Each entry: whether a LoraLinear call was served by its ticket (True) or the general path."""
    from lorakit.layers.linear import LoraLinear

    calls = []
    original = LoraLinear._forward_ticketed

    def recording(self, x, ticket):
        out = original(self, x, ticket)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(LoraLinear, "_forward_ticketed", recording)
    return calls


def test_tickets_serve_the_model_forward_and_lapse_after_it(monkeypatch):
    import lorakit

    calls = ticketed_calls(monkeypatch)
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    model = injected_llama(True).train()
    for _ in range(2):  # the second forward runs q|k|v and gate|up as groups
        model(input_ids=ids, labels=ids).loss.backward()
    n_layers = sum(isinstance(m, lorakit.LoraLayer) for m in model.modules())
    assert calls[-n_layers:] == [True] * n_layers
    state = model.__dict__["lora_state"]
    assert state.casts.token is None  # the forward is over
    calls.clear()
    layer = model.model.layers[0].self_attn.q_proj
    layer(torch.randn(2, 9, 32))  # called alone: the general path, without asking the ticket
    assert calls == []


def test_an_adapter_changed_during_the_forward_is_used_as_changed():
    """Tickets are made at the start of the forward; an adapter changed in place after that (here by
    a hook just before its layer runs) must not be served from the casts made before."""
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    outs = []
    for fused in (False, True):
        model = injected_llama(fused)
        model(input_ids=ids)  # groups learned
        layer = model.model.layers[1].self_attn.k_proj  # a follower of q_proj

        def bump(module, args):
            with torch.no_grad():
                module.lora_B["default"].add_(0.5)

        handle = layer.register_forward_pre_hook(bump)
        outs.append(model(input_ids=ids).logits)
        handle.remove()
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)


def test_a_group_with_a_member_off_the_fused_path_follows_optimizer_steps():
    """q|k|v are learned as a group; then v leaves the fused path. q and k still read one x, but
    their stacked A is no longer a view of the shared cast buffer: it must still be made again
    after every optimizer step, not kept from the first."""
    import lorakit

    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    model, opt = bf16_llama_with_optimizer(True)
    model(input_ids=ids)  # groups learned
    for block in model.model.layers:
        block.self_attn.v_proj.use_fused_op = False
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        fused = model(input_ids=ids).logits.float()
        twin = copy.deepcopy(model)  # the same weights on the reference ops, this model left as it is
        for m in twin.modules():
            if isinstance(m, lorakit.LoraLayer):
                m.use_fused_op = False
        assert rel(fused, twin(input_ids=ids).logits.float()) < 1e-2
