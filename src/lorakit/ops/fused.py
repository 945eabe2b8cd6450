"""LoRA linear layers as one autograd function: h_i = x·W_iᵀ + b_i + s_i·(drop(x)·A_iᵀ)·B_iᵀ.

One call serves one layer, or several layers that read the same input (q, k, v; gate, up): their
A-projections are one matmul, x·[s_1·A_1; …; s_n·A_n]ᵀ, and their input gradient is one tensor, so
autograd sums no per-layer copies of dx.

What it saves for backward is what frozen base layers plus LoRA strictly need: the input x (which
the base layers keep anyway) and the (T, Σr) projection — no dropped copy of x and no dropout mask
(the mask is regenerated in backward from a seed drawn from torch's CPU generator, so training stays
reproducible and resumable). The adapter's output is written first and the base matmul accumulates
onto it in place (`addmm_`, C read in the GEMM's epilogue), so the adapter costs one write of the
output rather than a read-modify-write pass. Backward, per layer and then once for the group:

    g_low_i = g_i·B_i          (T, r_i)      dB_i = g_iᵀ·low_i          (d_out_i, r_i)
    dA = g_lowᵀ·drop(x)        (Σr, d_in)    dx = drop'(g_low·A) + Σ_i g_i·W_i   (one buffer)

Matmuls run in x's dtype (a float32 adapter on a bf16 base computes in bf16, as autocast would);
A and B gradients come back in the adapters' own dtype. `tests/test_ops.py` compares this against a
float64 recomputation of the reference math (`reference.lora_delta` plus the base layer).
"""

from __future__ import annotations

from typing import Sequence

import torch

PER_LAYER = 4  # tensors per layer in LoraLinearFunction.apply: weight, bias, A, B


def _mask(like: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """The same keep-mask, scaled by 1/(1-p), every time it is asked for with the same seed."""
    g = torch.Generator(device=like.device)
    g.manual_seed(seed)
    keep = torch.empty(like.shape, device=like.device, dtype=like.dtype).bernoulli_(1.0 - p, generator=g)
    return keep.div_(1.0 - p)


class LoraLinearFunction(torch.autograd.Function):
    """apply(x, scalings, dropout, seed, W_1, b_1, A_1, B_1, …, W_n, b_n, A_n, B_n) -> n outputs."""

    @staticmethod
    def forward(ctx, x, scalings: tuple[float, ...], dropout: float, seed: int, *params):
        ctx.set_materialize_grads(False)  # a layer whose output goes unused costs nothing in backward
        dt = x.dtype
        x2d = x.reshape(-1, x.shape[-1])
        x_in = x2d * _mask(x2d, dropout, seed) if dropout > 0 else x2d
        weights, biases, As, Bs = (params[k::PER_LAYER] for k in range(PER_LAYER))
        # The scaling is folded into A, so `low` is already s·x·Aᵀ.
        A_cat = torch.cat([A.to(dt) * s for A, s in zip(As, scalings)])
        low = x_in @ A_cat.t()                                   # (T, Σr)
        outs = []
        for W, b, B, lo in zip(weights, biases, Bs, low.split([A.shape[0] for A in As], dim=1)):
            B_ = B.to(dt)
            y = torch.addmm(b.to(dt), lo, B_.t()) if b is not None else lo @ B_.t()
            y.addmm_(x2d, W.to(dt).t())                          # base matmul onto the adapter's output
            outs.append(y.view(*x.shape[:-1], y.shape[-1]))
        ctx.save_for_backward(x, low, A_cat, *weights, *Bs)
        ctx.scalings, ctx.dropout, ctx.seed = scalings, dropout, seed
        ctx.ranks = [A.shape[0] for A in As]
        ctx.param_dtypes = [(A.dtype, B.dtype) for A, B in zip(As, Bs)]
        ctx.bias_needs_grad = [b is not None and b.requires_grad for b in biases]
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        n = len(ctx.ranks)
        x, low, A_cat, *rest = ctx.saved_tensors
        weights, Bs = rest[:n], rest[n:]
        needs = ctx.needs_input_grad
        x2d = x.reshape(-1, x.shape[-1])
        dt = x.dtype
        layer_grads: list = [None] * (PER_LAYER * n)
        g_lows = []
        for i, (g, W, B, lo) in enumerate(zip(grads, weights, Bs, low.split(ctx.ranks, dim=1))):
            if g is None:  # this layer's output was not used
                g_lows.append(torch.zeros_like(lo))
                continue
            g2d = g.reshape(-1, g.shape[-1]).to(dt)
            g_lows.append(g2d @ B.to(dt))                        # (T, r_i), gradient of s·x·A_iᵀ
            base = 4 + PER_LAYER * i
            if needs[base]:
                layer_grads[PER_LAYER * i] = (g2d.t() @ x2d).to(W.dtype)
            if ctx.bias_needs_grad[i]:
                layer_grads[PER_LAYER * i + 1] = g2d.sum(0)
            if needs[base + 3]:
                layer_grads[PER_LAYER * i + 3] = (g2d.t() @ lo).to(ctx.param_dtypes[i][1])
        g_low = torch.cat(g_lows, dim=1) if n > 1 else g_lows[0]  # (T, Σr)
        mask = _mask(x2d, ctx.dropout, ctx.seed) if ctx.dropout > 0 else None
        if any(needs[4 + PER_LAYER * i + 2] for i in range(n)):
            x_in = x2d * mask if mask is not None else x2d
            dA_cat = g_low.t() @ x_in                            # (Σr, d_in), gradient of s_i·A_i
            for i, (dA, s) in enumerate(zip(dA_cat.split(ctx.ranks), ctx.scalings)):
                layer_grads[PER_LAYER * i + 2] = (dA * s).to(ctx.param_dtypes[i][0])
        grad_x = None
        if needs[0]:
            grad_x = g_low @ A_cat                               # (T, d_in), the adapters' part
            if mask is not None:
                grad_x.mul_(mask)
            for g, W in zip(grads, weights):
                if g is not None:
                    grad_x.addmm_(g.reshape(-1, g.shape[-1]).to(dt), W.to(dt))
            grad_x = grad_x.view(x.shape)
        return (grad_x, None, None, None, *layer_grads)


def draw_seed(p: float) -> int:
    """A dropout seed from the CPU generator: no device sync, and a resumed run draws the same seeds."""
    return int(torch.randint(0, 2**62, (1,)).item()) if p > 0 else 0


def fused_lora_linears(x: torch.Tensor, layers: Sequence[tuple], dropout: float = 0.0,
                       training: bool = False) -> tuple[torch.Tensor, ...]:
    """Several linear layers reading the same x, each with one adapter: ``layers`` holds
    ``(weight, bias, A, B, scaling)`` per layer. Returns one output per layer."""
    p = dropout if training else 0.0
    params = [t for W, b, A, B, _ in layers for t in (W, b, A, B)]
    return LoraLinearFunction.apply(x, tuple(s for *_, s in layers), p, draw_seed(p), *params)


def fused_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                      B: torch.Tensor, scaling: float, dropout: float = 0.0, training: bool = False) -> torch.Tensor:
    """Base linear plus one adapter; dropout applies only when ``training`` and ``dropout > 0``."""
    return fused_lora_linears(x, [(weight, bias, A, B, scaling)], dropout, training)[0]
