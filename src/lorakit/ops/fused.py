"""A LoRA linear layer as one autograd function: h = x·W0ᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ.

What it saves for backward is what a frozen base layer plus LoRA strictly needs: the input x
(which the caller usually holds anyway) and the (T, r) projection x·Aᵀ — no dropped copy of x and
no dropout mask: the mask is regenerated in backward from a seed drawn from torch's global RNG
(so training stays reproducible and resumable). x·Aᵀ is computed once and reused; the adapter's
output is added into the base output in place (`addmm_`); backward reads each operand once:

    g_low = s·g·B          (T, r)        dB = s·gᵀ·low  (d_out, r)
    dA = g_lowᵀ·drop(x)    (r, d_in)     dx = g·W0 + drop'(g_low·A)

Same signature and results as `reference.lora_delta` plus the base layer; `tests/test_ops.py`
compares the two against a float64 recomputation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _mask(like: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """The same keep-mask, scaled by 1/(1-p), every time it is asked for with the same seed."""
    g = torch.Generator(device=like.device)
    g.manual_seed(seed)
    keep = torch.empty(like.shape, device=like.device, dtype=like.dtype).bernoulli_(1.0 - p, generator=g)
    return keep.div_(1.0 - p)


class LoraLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scaling: float, dropout: float, seed: int):
        # Compute in x's dtype: a float32 adapter on a bf16 base runs its matmuls in bf16, as autocast would.
        A_, B_ = A.to(x.dtype), B.to(x.dtype)
        x_in = x * _mask(x, dropout, seed) if dropout > 0 else x
        out = F.linear(x, weight, bias)
        low = x_in @ A_.t()                                     # (..., d_in) @ (d_in, r) -> (..., r)
        out2d, low2d = out.view(-1, out.shape[-1]), low.reshape(-1, low.shape[-1])
        out2d.addmm_(low2d, B_.t(), alpha=scaling)              # += s·(T, r) @ (r, d_out), in place
        ctx.save_for_backward(x, weight, A, B, low)
        ctx.scaling, ctx.dropout, ctx.seed = scaling, dropout, seed
        ctx.bias_needs_grad = bias is not None and bias.requires_grad
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, A, B, low = ctx.saved_tensors
        s = ctx.scaling
        g = grad_out.reshape(-1, grad_out.shape[-1])            # (T, d_out)
        low2d = low.reshape(-1, low.shape[-1])                   # (T, r)
        A_, B_ = A.to(g.dtype), B.to(g.dtype)
        g_low = (g @ B_) * s                                     # (T, r)
        grad_x = grad_A = grad_B = grad_w = grad_b = None
        if ctx.needs_input_grad[4]:
            grad_B = ((g.t() @ low2d) * s).to(B.dtype)           # (d_out, r)
        mask = _mask(x, ctx.dropout, ctx.seed) if ctx.dropout > 0 else None
        if ctx.needs_input_grad[3]:
            x2d = x.reshape(-1, x.shape[-1])
            x_in = x2d * mask.reshape(-1, x.shape[-1]) if mask is not None else x2d
            grad_A = (g_low.t() @ x_in).to(A.dtype)              # (r, d_in)
        if ctx.needs_input_grad[0]:
            lora_dx = g_low @ A_                                 # (T, d_in)
            if mask is not None:
                lora_dx = lora_dx * mask.reshape(-1, x.shape[-1])
            grad_x = torch.addmm(lora_dx, g, weight.to(g.dtype)).view(x.shape)
        if ctx.needs_input_grad[1]:
            grad_w = g.t() @ x.reshape(-1, x.shape[-1])
        if ctx.bias_needs_grad:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b, grad_A, grad_B, None, None, None


def fused_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                      B: torch.Tensor, scaling: float, dropout: float = 0.0, training: bool = False) -> torch.Tensor:
    """Base linear plus one adapter; dropout applies only when ``training`` and ``dropout > 0``."""
    p = dropout if training else 0.0
    # The seed comes from the CPU generator: no device sync, and a resumed run draws the same seeds.
    seed = int(torch.randint(0, 2**62, (1,)).item()) if p > 0 else 0
    return LoraLinearFunction.apply(x, weight, bias, A, B, scaling, p, seed)
