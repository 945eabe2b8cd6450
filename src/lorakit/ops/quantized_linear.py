"""LoRA on a 4-bit base layer (QLoRA) as one autograd function per layer:
h = x·Q(W)ᵀ + b + Σ_k s_k·(drop(x)·A_kᵀ)·B_kᵀ, with Q(W) the dequantized packed weight.

The math is `lora_linear`'s (`_forward`, `_gradients`): the adapter's term first, then the base
GEMM accumulating onto it in one buffer, and the same in backward for dx. What differs is where W
comes from: ``dequantize()`` (bitsandbytes' own dequantization, as its ``matmul_4bit`` does for
more than a few rows) makes it in forward and again in backward, and it is never saved, so the
layer keeps what a frozen 4-bit layer keeps plus x and the (T, Σr) projection. The reference path
(the quantized layer's output, then each adapter's term in its own ops) keeps a second copy of x
per adapter under autocast and reads and writes the (T, d_out) output three more times.

The SwiGLU twin takes the down projection's input as its factors (gate, up) and makes the product
again in backward, as `swiglu_linear` does for a dense weight.

Eager only: while compiling, `LoraQuantizedLinear` takes the reference path (bitsandbytes' packed
weight and quant state are not tensors a custom op's schema can take as they are).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .lora_linear import _forward, _gradients
from .swiglu_linear import _swiglu_grads, swiglu

Dequantize = Callable[[], Tensor]  # () -> the (d_out, d_in) weight, a new tensor each call


def _wants(x_like: Tensor, bias: Optional[Tensor], As: Sequence[Tensor], Bs: Sequence[Tensor]) -> tuple:
    # The packed weight never gets a gradient.
    return (x_like.requires_grad, False, bias is not None and bias.requires_grad,
            [A.requires_grad for A in As], [B.requires_grad for B in Bs])


class _QuantizedLoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dequantize, bias, seed, scalings, dropout, n, *adapters):
        As, Bs = adapters[:n], adapters[n:]
        out, low = _forward(x, dequantize(), bias, As, Bs, scalings, None, dropout, seed)
        ctx.save_for_backward(x, low, seed, *adapters)
        ctx.dequantize, ctx.n, ctx.scalings, ctx.dropout = dequantize, n, scalings, dropout
        ctx.wants = _wants(x, bias, As, Bs)
        ctx.mark_non_differentiable(low)
        return out, low

    @staticmethod
    def backward(ctx, grad_out, grad_low):
        x, low, seed, *adapters = ctx.saved_tensors
        weight = ctx.dequantize() if ctx.wants[0] else None  # only dx needs W
        dx, _, db, dAs, dBs = _gradients(grad_out, x, weight, low, None, seed, adapters[:ctx.n], adapters[ctx.n:],
                                         ctx.scalings, ctx.dropout, ctx.wants, traced=False)
        return dx, None, db, None, None, None, None, *dAs, *dBs


class _QuantizedLoraSwiGLULinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, dequantize, bias, seed, scalings, dropout, n, *adapters):
        As, Bs = adapters[:n], adapters[n:]
        out, low = _forward(swiglu(gate, up), dequantize(), bias, As, Bs, scalings, None, dropout, seed)
        ctx.save_for_backward(gate, up, low, seed, *adapters)
        ctx.dequantize, ctx.n, ctx.scalings, ctx.dropout = dequantize, n, scalings, dropout
        wants_h = gate.requires_grad or up.requires_grad
        ctx.wants = (wants_h, *_wants(gate, bias, As, Bs)[1:])
        ctx.mark_non_differentiable(low)
        return out, low

    @staticmethod
    def backward(ctx, grad_out, grad_low):
        gate, up, low, seed, *adapters = ctx.saved_tensors
        silu_gate = torch.nn.functional.silu(gate)
        h = silu_gate * up  # made again, not saved
        weight = ctx.dequantize() if ctx.wants[0] else None
        dh, _, db, dAs, dBs = _gradients(grad_out, h, weight, low, None, seed, adapters[:ctx.n], adapters[ctx.n:],
                                         ctx.scalings, ctx.dropout, ctx.wants, traced=False)
        del h
        d_gate, d_up = _swiglu_grads(gate, up, dh, silu_gate) if dh is not None else (None, None)
        return d_gate, d_up, None, db, None, None, None, None, *dAs, *dBs


def quantized_lora_linear_call(x: Tensor, dequantize: Dequantize, bias: Optional[Tensor], As: Sequence[Tensor],
                               Bs: Sequence[Tensor], scalings: Sequence[float], dropout: float = 0.0,
                               seed: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(h, low) in x's dtype; ``dequantize`` is called once in forward and once in backward."""
    return _QuantizedLoraLinear.apply(x, dequantize, bias, seed, list(scalings), dropout, len(As), *As, *Bs)


def quantized_lora_swiglu_linear_call(gate: Tensor, up: Tensor, dequantize: Dequantize, bias: Optional[Tensor],
                                      As: Sequence[Tensor], Bs: Sequence[Tensor], scalings: Sequence[float],
                                      dropout: float = 0.0, seed: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """`quantized_lora_linear_call` on silu(gate)·up, keeping gate and up instead of the product."""
    return _QuantizedLoraSwiGLULinear.apply(gate, up, dequantize, bias, seed, list(scalings), dropout, len(As),
                                            *As, *Bs)
