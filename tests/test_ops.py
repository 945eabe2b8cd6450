"""``torch.ops.lorakit.lora_linear`` and its eager twin (`lora_linear_call` outside compile)
against a float64 recomputation of the reference math (`ops/reference.py` plus the base layer),
and torch's own checks of the custom op (schema, fake kernel, autograd registration)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from lorakit.ops.lora_linear import _EagerLoraLinear, _keep_mask, draw_seed
from lorakit.ops.reference import lora_delta

op = torch.ops.lorakit.lora_linear
# relative to the float64 values' scale. bf16: the tests draw fresh operands every run (os.urandom); over
# 2,000 draws of the SwiGLU op's check (bf16 inputs rounded, fp32 accumulation, bf16 output) the tolerance
# each draw needed was 0.0049 at the median, 0.0128 at the 99.9th percentile and 0.0162 at worst, so 1e-2
# failed about one run in 150 (seen on the H200 host's CPU). An error in the math (a missed term, a wrong
# scaling or dropout mask) is of the order of the adapter's own output, far above 2.5e-2.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2.5e-2}


def eager_twin(x, W, b, As, Bs, scalings, route, p, seed):
    return _EagerLoraLinear.apply(x, W, b, route, seed, scalings, p, len(As), *As, *Bs)


@pytest.fixture(params=["custom_op", "eager_twin"])
def call(request):
    """Both ways the forward reaches the math: every test below runs once through each."""
    return op if request.param == "custom_op" else eager_twin


def fresh_generator() -> torch.Generator:
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))


def operands(dtype, n_adapters=1, bias=True, ranks=(4, 3, 5), lead=(2, 7), d_in=24, d_out=20,
             adapter_dtype=torch.float32, weight_grad=False):
    """x, W, b and n adapters with random values (B != 0), every one a leaf that wants a gradient."""
    g = fresh_generator()
    x = torch.randn(*lead, d_in, generator=g).to(dtype).requires_grad_()
    W = (torch.randn(d_out, d_in, generator=g) / d_in ** 0.5).to(dtype).requires_grad_(weight_grad)
    b = torch.randn(d_out, generator=g).to(dtype).requires_grad_() if bias else None
    As = [torch.randn(r, d_in, generator=g).to(adapter_dtype).requires_grad_() for r in ranks[:n_adapters]]
    Bs = [torch.randn(d_out, r, generator=g).to(adapter_dtype).requires_grad_() for r in ranks[:n_adapters]]
    return x, W, b, As, Bs


def reference64(x, W, b, As, Bs, scalings, route=None, mask=None):
    """The reference formula in float64: base + Σ_k [route == k]·s_k·B_k·A_k·(mask ⊙ x)."""
    x64 = x.double()
    out = F.linear(x64, W.double(), None if b is None else b.double())
    x_in = x64 * mask.double().view(x.shape) if mask is not None else x64
    for k, (A, B, s) in enumerate(zip(As, Bs, scalings)):
        delta = lora_delta(x_in, A.double(), B.double(), s)
        out = out + (delta if route is None else delta * (route == k).unsqueeze(-1).double())
    return out


def leaves(x, W, b, As, Bs):
    return [t for t in (x, W, b, *As, *Bs) if t is not None and t.requires_grad]


def check_against_reference(call, dtype, x, W, b, As, Bs, scalings, route=None, p=0.0):
    seed = draw_seed(p)
    out, _ = call(x, W, b, As, Bs, scalings, route, p, seed)
    mask = _keep_mask(x.detach().reshape(-1, x.shape[-1]), p, seed) if p > 0 else None  # the op's own mask
    expected = reference64(x, W, b, As, Bs, scalings, route, mask)
    tol = TOL[dtype]
    assert out.dtype == x.dtype and out.shape == expected.shape
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol * expected.abs().max().item())
    g = torch.randn(out.shape, generator=fresh_generator()).to(out.device)
    inputs = leaves(x, W, b, As, Bs)
    got = torch.autograd.grad(out, inputs, g.to(out.dtype))
    want = torch.autograd.grad(expected, inputs, g.double())
    for t, a, e in zip(inputs, got, want):
        assert a.dtype == t.dtype and a.shape == t.shape
        torch.testing.assert_close(a.double(), e.double(), rtol=tol, atol=tol * e.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_one_adapter_matches_float64_reference(dtype, bias, p, call):
    x, W, b, As, Bs = operands(dtype, bias=bias)
    check_against_reference(call, dtype, x, W, b, As, Bs, [0.7], p=p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_several_adapters_add_up_as_the_reference(dtype, call):
    x, W, b, As, Bs = operands(dtype, n_adapters=3)
    check_against_reference(call, dtype, x, W, b, As, Bs, [0.5, 2.0, 1.25])


@pytest.mark.parametrize("per_token", [False, True])
def test_routed_rows_use_only_their_adapter(per_token, call):
    x, W, b, As, Bs = operands(torch.float32, n_adapters=3, lead=(4, 6))
    g = fresh_generator()
    route = torch.randint(-1, 3, (4, 6) if per_token else (4, 1), generator=g).expand(4, 6).contiguous()
    route[0] = -1  # a whole row on the base model
    check_against_reference(call, torch.float32, x, W, b, As, Bs, [0.5, 2.0, 1.25], route=route)
    out, _ = call(x, W, b, As, Bs, [0.5, 2.0, 1.25], route, 0.0, None)
    torch.testing.assert_close(out[0], F.linear(x[0], W, b))  # base rows are exactly the base layer


def test_trainable_base_weight_gets_its_gradient(call):
    x, W, b, As, Bs = operands(torch.float32, weight_grad=True)
    check_against_reference(call, torch.float32, x, W, b, As, Bs, [1.5])


def test_fp32_adapters_on_bf16_input_compute_in_bf16_and_give_fp32_gradients(call):
    x, W, b, As, Bs = operands(torch.bfloat16, adapter_dtype=torch.float32)
    check_against_reference(call, torch.bfloat16, x, W, b, As, Bs, [2.0])


def test_saves_no_dropout_copy_no_mask_and_no_float32_copy_of_x(call):
    """Backward keeps x itself, the (T, r) projection and the weights: nothing of x's size but x."""
    x, W, b, As, Bs = operands(torch.bfloat16, lead=(8, 16), d_in=64, d_out=48)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _ = call(x, W, b, As, Bs, [1.0], None, 0.5, draw_seed(0.5))
    big = [t for t in saved if t.numel() >= x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr() and big[0].dtype == torch.bfloat16
    out.sum().backward()  # and the mask made again from the seed still gives gradients
    assert As[0].grad is not None and torch.isfinite(As[0].grad).all()


def test_dropout_is_reproducible_from_its_seed_and_differs_between_seeds(call):
    x, W, b, As, Bs = operands(torch.float32)
    seed = draw_seed(0.5)
    first, _ = call(x, W, b, As, Bs, [1.0], None, 0.5, seed)
    again, _ = call(x, W, b, As, Bs, [1.0], None, 0.5, seed.clone())
    other, _ = call(x, W, b, As, Bs, [1.0], None, 0.5, seed + 1)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.allclose(first, other)


@pytest.mark.parametrize("case", ["plain", "no-bias", "several", "routed", "dropout"])
def test_torch_library_opcheck(case):
    """torch's checks: the schema, the fake kernel against the real one, autograd registration."""
    x, W, b, As, Bs = operands(torch.float32, n_adapters=2 if case in ("several", "routed") else 1,
                               bias=case != "no-bias")
    route = torch.tensor([[0, 1, -1, 0, 1, 1, 0], [1, 1, 1, -1, 0, 0, 0]]) if case == "routed" else None
    p = 0.2 if case == "dropout" else 0.0
    torch.library.opcheck(op, (x, W, b, As, Bs, [0.5, 2.0][:len(As)], route, p, draw_seed(p)))


@pytest.mark.parametrize("masked", [False, True])
def test_input_grad_op_opcheck_and_value(masked):
    """The backward's dx op: torch's checks, and drop'(g_low·A) + g·W in float64."""
    g_ = fresh_generator()
    g, W = torch.randn(10, 20, generator=g_), torch.randn(20, 24, generator=g_)
    g_low, A = torch.randn(10, 4, generator=g_), torch.randn(4, 24, generator=g_)
    mask = (torch.rand(10, 24, generator=g_) > 0.3).float() / 0.7 if masked else None
    torch.library.opcheck(torch.ops.lorakit.lora_input_grad, (g, W, g_low, A, mask))
    want = (g_low.double() @ A.double()) * (mask.double() if masked else 1) + g.double() @ W.double()
    torch.testing.assert_close(torch.ops.lorakit.lora_input_grad(g, W, g_low, A, mask).double(), want,
                               rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_vmap_over_inputs_and_over_adapters():
    x, W, b, As, Bs = operands(torch.float32)
    xs = torch.randn(3, *x.shape)
    batched = torch.func.vmap(lambda x_: op(x_, W, b, As, Bs, [1.5], None, 0.0, None)[0])(xs)
    for i in range(3):
        torch.testing.assert_close(batched[i], op(xs[i], W, b, As, Bs, [1.5], None, 0.0, None)[0])
    A_stack = torch.stack([As[0], 2 * As[0]])
    per_adapter = torch.func.vmap(lambda A: op(x, W, b, [A], Bs, [1.5], None, 0.0, None)[0])(A_stack)
    torch.testing.assert_close(per_adapter[1], op(x, W, b, [2 * As[0]], Bs, [1.5], None, 0.0, None)[0])


def test_func_grad_of_the_op_itself_is_still_unsupported_by_torch():
    """LoraLinear takes the reference path under functorch transforms because torch cannot yet
    differentiate a custom op there. When this starts to pass, drop that fallback."""
    x, W, b, As, Bs = operands(torch.float32)
    with pytest.raises(RuntimeError, match="setup_context"):
        torch.func.grad(lambda A: op(x.detach(), W, b, [A], Bs, [1.0], None, 0.0, None)[0].sum())(As[0].detach())
