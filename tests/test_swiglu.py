"""The down projection of a SwiGLU MLP fed by the product's factors (`layers/swiglu.py`): the op
against float64, what it keeps for backward, which MLPs get it, and a whole model with it against
the same model without it."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit.layers import swiglu
from lorakit.layers.swiglu import SwiGLUForward
from lorakit.ops.lora_linear import _keep_mask, draw_seed
from lorakit.ops.swiglu_linear import _EagerLoraSwiGLULinear
from lorakit.ops.reference import lora_delta

from conftest import randomize_adapters, tiny_llama
from test_ops import TOL, fresh_generator

op = torch.ops.lorakit.lora_swiglu_linear


def eager_twin(gate, up, W, b, As, Bs, scalings, route, p, seed):
    return _EagerLoraSwiGLULinear.apply(gate, up, W, b, route, seed, scalings, p, len(As), *As, *Bs)


@pytest.fixture(params=["custom_op", "eager_twin"])
def call(request):
    return op if request.param == "custom_op" else eager_twin


def operands(dtype, bias=False, n_adapters=1, lead=(2, 5), d_ff=24, d_out=12):
    g = fresh_generator()
    gate = torch.randn(*lead, d_ff, generator=g).to(dtype).requires_grad_()
    up = torch.randn(*lead, d_ff, generator=g).to(dtype).requires_grad_()
    W = (torch.randn(d_out, d_ff, generator=g) / d_ff ** 0.5).to(dtype)
    b = torch.randn(d_out, generator=g).to(dtype).requires_grad_() if bias else None
    As = [torch.randn(r, d_ff, generator=g).requires_grad_() for r in (4, 3)[:n_adapters]]
    Bs = [torch.randn(d_out, r, generator=g).requires_grad_() for r in (4, 3)[:n_adapters]]
    return gate, up, W, b, As, Bs


def reference64(gate, up, W, b, As, Bs, scalings, route=None, mask=None):
    h = F.silu(gate.double()) * up.double()
    out = F.linear(h, W.double(), None if b is None else b.double())
    h_in = h * mask.double().view(h.shape) if mask is not None else h
    for k, (A, B, s) in enumerate(zip(As, Bs, scalings)):
        delta = lora_delta(h_in, A.double(), B.double(), s)
        out = out + (delta if route is None else delta * (route == k).unsqueeze(-1).double())
    return out


def check(call, dtype, gate, up, W, b, As, Bs, scalings, route=None, p=0.0):
    seed = draw_seed(p)
    out, _ = call(gate, up, W, b, As, Bs, scalings, route, p, seed)
    mask = None
    if p > 0:
        like = gate.detach().reshape(-1, gate.shape[-1])
        mask = _keep_mask(like, p, seed)
    expected = reference64(gate, up, W, b, As, Bs, scalings, route, mask)
    tol = TOL[dtype]
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol * expected.abs().max().item())
    grad = torch.randn(out.shape, generator=fresh_generator()).to(out.device)
    inputs = [t for t in (gate, up, b, *As, *Bs) if t is not None]
    got = torch.autograd.grad(out, inputs, grad.to(out.dtype))
    want = torch.autograd.grad(expected, inputs, grad.double())
    for t, a, e in zip(inputs, got, want):
        assert a.dtype == t.dtype and a.shape == t.shape
        torch.testing.assert_close(a.double(), e.double(), rtol=tol, atol=tol * e.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_op_matches_float64_down_of_silu_gate_times_up(dtype, p, call):
    gate, up, W, b, As, Bs = operands(dtype)
    check(call, dtype, gate, up, W, b, As, Bs, [0.75], p=p)


def test_op_with_bias_and_routed_adapters(call):
    gate, up, W, b, As, Bs = operands(torch.float32, bias=True, n_adapters=2, lead=(3, 4))
    route = torch.tensor([[0, 1, -1, 1], [1, 1, 0, 0], [-1, -1, -1, -1]])
    check(call, torch.float32, gate, up, W, b, As, Bs, [0.5, 2.0], route=route)


@pytest.mark.parametrize("case", ["plain", "dropout"])
def test_torch_library_opcheck(case):
    gate, up, W, b, As, Bs = operands(torch.float32, bias=True)
    p = 0.2 if case == "dropout" else 0.0
    torch.library.opcheck(op, (gate, up, W, b, As, Bs, [0.5], None, p, draw_seed(p)))


def test_keeps_gate_and_up_never_the_product(call):
    """Nothing of the product's size is saved but gate and up themselves."""
    gate, up, W, b, As, Bs = operands(torch.bfloat16, lead=(8, 16), d_ff=64, d_out=32)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _ = call(gate, up, W, b, As, Bs, [1.0], None, 0.0, None)
    big = sorted(t.data_ptr() for t in saved if t.numel() >= gate.numel())
    assert big == sorted([gate.data_ptr(), up.data_ptr()])


# --- which MLPs, and a whole model -------------------------------------------------------------


def injected(dropout=0.0):
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, dropout=dropout, target_modules="all-linear"))
    randomize_adapters(model)
    return model


def routed_mlps(model):
    return [m for m in model.modules() if isinstance(m.__dict__.get("forward"), SwiGLUForward)]


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_model_with_it_equals_the_model_without(tokens, dropout):
    model = injected(dropout).train()
    plain = copy.deepcopy(model)
    swiglu.remove(plain)
    assert len(routed_mlps(model)) == model.config.num_hidden_layers and not routed_mlps(plain)
    results = []
    for m in (model, plain):
        torch.manual_seed(5)  # the same dropout seeds, drawn in the same order
        out = m(input_ids=tokens, labels=tokens)
        out.loss.backward()
        results.append((out.logits.detach(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad}))
    (logits, grads), (plain_logits, plain_grads) = results
    torch.testing.assert_close(logits, plain_logits, rtol=1e-5, atol=1e-6)
    assert grads.keys() == plain_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=1e-4, atol=1e-6)


def saved_bytes(model, tokens) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=tokens, labels=tokens).loss.backward()
    return total


def test_model_keeps_two_products_fewer_per_layer(tokens):
    """Measured with saved-tensor hooks, in eager: the plain path keeps the product (the op's input)
    and silu(gate) (eager autograd's multiply keeps both factors); routed, only gate and up are kept,
    which both paths keep. So two (tokens × d_ff) float32 tensors fewer per layer."""
    model = injected().train()
    plain = copy.deepcopy(model)
    swiglu.remove(plain)
    cfg = model.config
    product = tokens.numel() * cfg.intermediate_size * 4  # float32
    assert saved_bytes(plain, tokens) - saved_bytes(model, tokens) == 2 * cfg.num_hidden_layers * product


def test_only_mlps_that_compute_swiglu_get_it():
    class Swapped(nn.Module):  # the same parts, another formula: down(silu(up(x)) · gate(x))
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)
            self.act_fn = nn.SiLU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))

    class Gelu(Swapped):
        def __init__(self):
            super().__init__()
            self.act_fn = nn.GELU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    class Right(Gelu):
        def __init__(self):
            super().__init__()
            self.act_fn = nn.SiLU()

    model = nn.ModuleDict({"swapped": Swapped(), "gelu": Gelu(), "right": Right()})
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["down_proj"]))
    assert [n for n, m in model.named_children() if m in routed_mlps(model)] == ["right"]


def test_the_check_draws_no_random_numbers_and_keeps_training_modes():
    model = tiny_llama().train()
    lorakit.inject(model, lorakit.LoraConfig(r=2, dropout=0.3, target_modules=["down_proj"]))
    swiglu.remove(model)
    state = torch.get_rng_state()
    assert swiglu.install(model)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(m.training for m in model.modules())


def test_unload_and_delete_take_it_off_and_the_model_pickles(tokens):
    model = injected().eval()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert len(routed_mlps(loaded)) == len(routed_mlps(model)) > 0
    torch.testing.assert_close(loaded(input_ids=tokens).logits, model(input_ids=tokens).logits)
    lorakit.unload(model, merge=False)
    assert not routed_mlps(model)
    lorakit.delete_adapter(loaded, "default")
    assert not routed_mlps(loaded)


def test_routed_merged_and_disabled_forwards_agree_with_the_plain_path(tokens):
    model = tiny_llama().eval()
    for name in ("a", "b"):
        lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear"), name=name)
    randomize_adapters(model)
    plain = copy.deepcopy(model)
    swiglu.remove(plain)
    assert routed_mlps(model)
    with torch.no_grad():
        with lorakit.route(model, ["b", None]), lorakit.route(plain, ["b", None]):
            torch.testing.assert_close(model(input_ids=tokens).logits, plain(input_ids=tokens).logits)
        with lorakit.disabled(model), lorakit.disabled(plain):
            torch.testing.assert_close(model(input_ids=tokens).logits, plain(input_ids=tokens).logits)
        lorakit.use(model, "a"), lorakit.use(plain, "a")
        lorakit.merge(model), lorakit.merge(plain)
        torch.testing.assert_close(model(input_ids=tokens).logits, plain(input_ids=tokens).logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_gradients_are_autograds_of_the_plain_product_to_the_bit(dtype):
    from lorakit.ops.swiglu_linear import _swiglu_grads

    g = torch.Generator().manual_seed(0)
    gate = torch.randn(37, 24, generator=g).to(dtype).requires_grad_(True)
    up = torch.randn(37, 24, generator=g).to(dtype).requires_grad_(True)
    dh = torch.randn(37, 24, generator=g).to(dtype)
    (F.silu(gate) * up).backward(dh)
    d_gate, d_up = _swiglu_grads(gate.detach(), up.detach(), dh, F.silu(gate.detach()))
    assert d_gate.dtype == d_up.dtype == dtype
    assert torch.equal(d_gate, gate.grad) and torch.equal(d_up, up.grad)
