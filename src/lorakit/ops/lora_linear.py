"""One LoRA linear layer as one compile-native op: h = x·Wᵀ + b + Σ_k s_k·(drop(x)·A_kᵀ)·B_kᵀ.

``torch.ops.lorakit.lora_linear`` is a ``torch.library.custom_op`` with a fake (meta) kernel and an
autograd formula, so ``torch.compile(model, fullgraph=True)`` sees one opaque op per adapted
layer, Inductor fuses what lies around it (norms, activations, casts), and CUDA graphs capture it.
It holds no state: everything it computes from is an argument. In eager mode `lora_linear_call`
runs the same math through a plain autograd.Function instead (the custom op's dispatch costs ~4×
a small layer's math on the host); while compiling it emits the custom op.

Adapters: one or more (A_k, B_k, s_k), for several active adapters or for a routed batch. With
``route`` (one adapter index per row of x, -1 = none), row t uses only adapter route[t]; without
it, every row uses every adapter (their outputs add, as several active adapters do). The
projections of all adapters are one matmul, low = x·[A_1; …; A_n]ᵀ, masked per row by the route.

Forward, in x's dtype (a float32 adapter on a bf16 input computes in bf16, as autocast would):

    low  = s ⊙ route_mask ⊙ (drop(x)·A_catᵀ)        (T, Σr)   returned too: backward needs it
    h    = low·B_catᵀ + b,  then  h += x·Wᵀ         (T, d_out) the base GEMM accumulates onto h

Saved for backward: x, low, the weights. Never a dropped copy of x or a dropout mask: the mask is
made again in backward from ``seed`` (a CPU int64 tensor the caller draws from torch's generator,
so runs are reproducible and resumable). Backward (g the output's gradient):

    dB_k = gᵀ·low_k                  g_low = s ⊙ route_mask ⊙ (g·B_cat)      (T, Σr)
    dA   = g_lowᵀ·drop(x)            dx    = drop'(g_low·A_cat) + g·W

Backward is plain torch, so under ``torch.compile`` it is traced into the backward graph, and the
partitioner may recompute x from its producer (an RMSNorm, a SwiGLU product) instead of keeping
it. `tests/test_ops.py` compares everything with a float64 recomputation of `reference.py`.

torch's custom-op autograd does not run under ``torch.func.grad`` (it needs a ``setup_context``
the generated autograd.Function lacks), so `LoraLinear` takes the reference path under functorch
transforms; ``vmap`` of the op itself works (`_vmap`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor


@torch.library.custom_op("lorakit::dropout_keep_mask", mutates_args=())
def dropout_keep_mask(like: Tensor, p: float, seed: Tensor) -> Tensor:
    """The same keep-mask, scaled by 1/(1-p), every time it is made from the same seed. An op of its
    own so that a compiled backward treats it as opaque (the seed becomes a Python int only here)."""
    if like.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("LoRA dropout > 0 cannot be captured in a CUDA graph: every replay would reuse "
                           "one mask. Train with lora_dropout=0 under CUDA graphs (torch.compile "
                           "mode='reduce-overhead'), or without CUDA graphs")
    generator = torch.Generator(device=like.device)
    generator.manual_seed(int(seed))
    keep = torch.empty(like.shape, device=like.device, dtype=like.dtype)
    return keep.bernoulli_(1.0 - p, generator=generator).div_(1.0 - p)


@dropout_keep_mask.register_fake
def _(like, p, seed):
    return torch.empty_like(like, memory_format=torch.contiguous_format)


_keep_mask = dropout_keep_mask


def _route_mask(route: Tensor, ranks: Sequence[int], dtype: torch.dtype) -> Tensor:
    """(T, Σr): 1 where row t's adapter owns column c of low, else 0. Made on the route's device from
    Python numbers (fills, no host-to-device copy), so a CUDA graph can capture it."""
    owner = torch.cat([route.new_full((r,), k) for k, r in enumerate(ranks)])  # (Σr,)
    return (route.reshape(-1, 1) == owner).to(dtype)


def _column_scales(scalings: Sequence[float], ranks: Sequence[int], like: Tensor) -> Tensor | float:
    """s_k for each column of low: a number for one adapter, a (Σr,) vector (fills) for several."""
    if len(ranks) == 1:
        return scalings[0]
    return torch.cat([like.new_full((r,), s) for s, r in zip(scalings, ranks)])


def _cat(tensors: Sequence[Tensor], dim: int, dtype: torch.dtype) -> Tensor:
    if len(tensors) == 1:
        return _as(tensors[0], dtype)
    return torch.cat([_as(t, dtype) for t in tensors], dim)


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype``; no call at all when it already is (the op's body runs as Python on every
    call, compiled or not, so each torch call saved is host time saved)."""
    return t if t.dtype == dtype else t.to(dtype)


def _forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], As: Sequence[Tensor], Bs: Sequence[Tensor],
             scalings: Sequence[float], route: Optional[Tensor], dropout: float,
             seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(h, low): the layer's output (*x.shape[:-1], d_out) and the scaled projection (T, Σr)."""
    dt = x.dtype
    x2d = x.reshape(-1, x.shape[-1])                                   # (T, d_in)
    x_in = x2d * _keep_mask(x2d, dropout, seed) if dropout > 0 else x2d
    low = torch.mm(x_in, _cat(As, 0, dt).t())                          # (T, d_in) @ (d_in, Σr) -> (T, Σr)
    ranks = [A.shape[0] for A in As]
    low.mul_(_column_scales(scalings, ranks, low))                     # in place: low is ours
    if route is not None:
        low.mul_(_route_mask(route, ranks, dt))
    B_cat_t = _cat(Bs, 1, dt).t()                                      # (Σr, d_out)
    if bias is not None:
        out = torch.addmm(_as(bias, dt), low, B_cat_t)
    else:
        out = torch.mm(low, B_cat_t)                                   # (T, Σr) @ (Σr, d_out) -> (T, d_out)
    out.addmm_(x2d, _as(weight, dt).t())                               # the base GEMM accumulates onto it
    return out.view(*x.shape[:-1], weight.shape[0]), low


def _gradients(grad_out: Tensor, x: Tensor, weight: Tensor, low: Tensor, route: Optional[Tensor],
               seed: Optional[Tensor], As: Sequence[Tensor], Bs: Sequence[Tensor], scalings: Sequence[float],
               dropout: float, wants: tuple, traced: bool):
    """(dx, dW, db, dAs, dBs) from the output's gradient; None where ``wants`` says no. ``traced``:
    the custom op's backward, which torch.compile traces (dx then goes through its own op)."""
    wants_x, wants_w, wants_b, wants_A, wants_B = wants
    dt = x.dtype
    ranks = [A.shape[0] for A in As]
    x2d = x.reshape(-1, x.shape[-1])
    g = _as(grad_out.reshape(-1, grad_out.shape[-1]), dt)              # (T, d_out)

    dBs = [None] * len(Bs)
    if any(wants_B):
        dB_cat = torch.mm(g.t(), low)                                  # (d_out, T) @ (T, Σr): s, route in low
        dBs = [_as(dB, B.dtype) if want else None
               for dB, B, want in zip(dB_cat.split(ranks, 1), Bs, wants_B)]
    g_low = torch.mm(g, _cat(Bs, 1, dt)).mul_(_column_scales(scalings, ranks, g))  # (T, Σr)
    if route is not None:
        g_low.mul_(_route_mask(route, ranks, dt))
    mask = _keep_mask(x2d, dropout, seed) if dropout > 0 else None
    dAs = [None] * len(As)
    if any(wants_A):
        dA_cat = torch.mm(g_low.t(), x2d * mask if mask is not None else x2d)  # (Σr, T) @ (T, d_in)
        dAs = [_as(dA, A.dtype) if want else None for dA, A, want in zip(dA_cat.split(ranks, 0), As, wants_A)]
    dx = None
    if wants_x:
        input_grad = torch.ops.lorakit.lora_input_grad if traced else _input_grad
        dx = input_grad(g, _as(weight, dt), g_low, _cat(As, 0, dt), mask).view(x.shape)
    dW = _as(torch.mm(g.t(), x2d), weight.dtype) if wants_w else None
    db = g.sum(0) if wants_b else None
    return dx, dW, db, dAs, dBs


def _input_grad(g: Tensor, weight: Tensor, g_low: Tensor, A_cat: Tensor, mask: Optional[Tensor]) -> Tensor:
    """dx = drop'(g_low·A_cat) + g·W, the base GEMM accumulating onto the adapter's term in one
    buffer. An op of its own because a traced ``addmm_`` is functionalised into an out-of-place
    addmm, which copies its accumulator first (one device-to-device copy of dx per layer and step,
    3% of a compiled TinyLlama step on an H200)."""
    dx = g_low @ A_cat                                                 # (T, Σr) @ (Σr, d_in)
    if mask is not None:
        dx = dx * mask
    return dx.addmm_(g, weight)                                        # + g·W, in the same buffer


lora_input_grad = torch.library.custom_op("lorakit::lora_input_grad", _input_grad, mutates_args=())


@lora_input_grad.register_fake
def _(g, weight, g_low, A_cat, mask):
    return g.new_empty(g.shape[0], weight.shape[1])


def _wants(x, weight, bias, As, Bs) -> tuple:
    return (x.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad,
            [A.requires_grad for A in As], [B.requires_grad for B in Bs])


@torch.library.custom_op("lorakit::lora_linear", mutates_args=())
def lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], As: list[Tensor], Bs: list[Tensor],
                scalings: list[float], route: Optional[Tensor], dropout: float,
                seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(h, low): the layer's output (*x.shape[:-1], d_out) and the scaled projection (T, Σr)."""
    return _forward(x, weight, bias, As, Bs, scalings, route, dropout, seed)


@lora_linear.register_fake
def _(x, weight, bias, As, Bs, scalings, route, dropout, seed):
    rows = x.numel() // x.shape[-1]
    return (x.new_empty(*x.shape[:-1], weight.shape[0]),
            x.new_empty(rows, sum(A.shape[0] for A in As)))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, As, Bs, scalings, route, dropout, seed = inputs
    ctx.save_for_backward(x, weight, output[1], route, seed, *As, *Bs)
    ctx.n = len(As)
    ctx.scalings, ctx.dropout = scalings, dropout
    ctx.wants = _wants(x, weight, bias, As, Bs)


def _backward(ctx, grad_out: Tensor, grad_low: Tensor | None):
    x, weight, low, route, seed, *adapters = ctx.saved_tensors
    As, Bs = adapters[:ctx.n], adapters[ctx.n:]
    dx, dW, db, dAs, dBs = _gradients(grad_out, x, weight, low, route, seed, As, Bs, ctx.scalings,
                                      ctx.dropout, ctx.wants, traced=True)
    return dx, dW, db, dAs, dBs, None, None, None, None


lora_linear.register_autograd(_backward, setup_context=_setup_context)


class _EagerLoraLinear(torch.autograd.Function):
    """The op's eager twin: the same `_forward` and `_gradients`, without the dispatcher's round
    trips (a custom op's Python wrapper costs ~120 µs a forward on the host, four times the math
    of a small layer; eager training is host-bound on many small layers). Adapters come flattened:
    autograd.Function tracks only tensors passed as arguments, not tensors inside lists."""

    @staticmethod
    def forward(ctx, x, weight, bias, route, seed, scalings, dropout, n, *adapters):
        As, Bs = adapters[:n], adapters[n:]
        out, low = _forward(x, weight, bias, As, Bs, scalings, route, dropout, seed)
        ctx.save_for_backward(x, weight, low, route, seed, *adapters)
        ctx.n, ctx.scalings, ctx.dropout = n, scalings, dropout
        ctx.wants = _wants(x, weight, bias, As, Bs)
        ctx.mark_non_differentiable(low)
        return out, low

    @staticmethod
    def backward(ctx, grad_out, grad_low):
        x, weight, low, route, seed, *adapters = ctx.saved_tensors
        As, Bs = adapters[:ctx.n], adapters[ctx.n:]
        dx, dW, db, dAs, dBs = _gradients(grad_out, x, weight, low, route, seed, As, Bs, ctx.scalings,
                                          ctx.dropout, ctx.wants, traced=False)
        return dx, dW, db, None, None, None, None, None, *dAs, *dBs


def lora_linear_call(x: Tensor, weight: Tensor, bias: Optional[Tensor], As: Sequence[Tensor],
                     Bs: Sequence[Tensor], scalings: Sequence[float], route: Optional[Tensor] = None,
                     dropout: float = 0.0, seed: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """``torch.ops.lorakit.lora_linear`` while compiling (so the graph holds one opaque op), its
    eager twin otherwise: the same math either way."""
    if torch.compiler.is_compiling():
        return torch.ops.lorakit.lora_linear(x, weight, bias, list(As), list(Bs), list(scalings), route, dropout, seed)
    return _EagerLoraLinear.apply(x, weight, bias, route, seed, list(scalings), dropout, len(As), *As, *Bs)


def _vmap(info, in_dims, x, weight, bias, As, Bs, scalings, route, dropout, seed):
    """vmap over the op: a batch of inputs only is more rows of x; anything else runs per item."""
    x_dim, w_dim, b_dim, A_dims, B_dims, _, route_dim, _, seed_dim = in_dims
    if route is None and all(d is None for d in (w_dim, b_dim, seed_dim, *A_dims, *B_dims)):
        out, low = lora_linear(x.movedim(x_dim, 0), weight, bias, As, Bs, scalings, route, dropout, seed)
        return (out, low.view(info.batch_size, -1, low.shape[-1])), (0, 0)

    def item(t, d, i):
        return t if t is None or d is None else t.select(d, i)

    outs = [lora_linear(item(x, x_dim, i), item(weight, w_dim, i), item(bias, b_dim, i),
                        [item(A, d, i) for A, d in zip(As, A_dims)], [item(B, d, i) for B, d in zip(Bs, B_dims)],
                        scalings, item(route, route_dim, i), dropout, item(seed, seed_dim, i))
            for i in range(info.batch_size)]
    return (torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])), (0, 0)


lora_linear.register_vmap(_vmap)


def draw_seed(p: float) -> Tensor | None:
    """A dropout seed from torch's CPU generator (no device sync; a resumed run draws the same)."""
    return torch.randint(0, 2**62, (), dtype=torch.int64) if p > 0 else None
