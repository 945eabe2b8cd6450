"""The down projection of a SwiGLU MLP as one op fed by the product's two factors:
h = silu(gate)·up, out = `lora_linear`(h).

``torch.ops.lorakit.lora_swiglu_linear`` computes `lora_linear`'s forward and gradients
(`lora_linear._forward`, `lora_linear._gradients`) on h, but keeps gate and up for backward
instead of h and makes h again there. A frozen model keeps gate and up anyway (SiLU's and the
product's gradients need them), so the adapter's dA costs no saved (T, d_ff) tensor, the largest
input of a Llama layer. `layers/swiglu.py` decides which MLPs use it. As for `lora_linear`, eager
calls run an autograd.Function twin of the same math, compiled ones the custom op.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .lora_linear import _forward, _gradients, _wants


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """SwiGLU's product silu(gate) ⊙ up, in the inputs' dtype (as transformers' MLPs compute it)."""
    return torch.nn.functional.silu(gate) * up


def _swiglu_grads(gate: Tensor, up: Tensor, grad_h: Tensor, silu_gate: Tensor) -> tuple[Tensor, Tensor]:
    """(d_gate, d_up) of h = silu(gate)·up, as autograd computes them for that formula: d_up = dh·silu(gate)
    and d_gate = SiLU's own backward kernel on dh·up, in the inputs' dtype (float32 inside each kernel).
    ``silu_gate`` is silu(gate), made once for h and reused here."""
    d_up = grad_h * silu_gate
    d_gate = torch.ops.aten.silu_backward(grad_h * up, gate)
    return d_gate.to(gate.dtype), d_up.to(up.dtype)


@torch.library.custom_op("lorakit::lora_swiglu_linear", mutates_args=())
def lora_swiglu_linear(gate: Tensor, up: Tensor, weight: Tensor, bias: Optional[Tensor], As: list[Tensor],
                       Bs: list[Tensor], scalings: list[float], route: Optional[Tensor], dropout: float,
                       seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """`lora_linear` on h = silu(gate)·up. Backward keeps gate and up (a frozen model keeps them
    too, for SiLU's and the product's gradients) and makes h again, so the adapter's dA costs no
    saved (T, d_ff) tensor: the largest input of a Llama layer."""
    return _forward(swiglu(gate, up), weight, bias, As, Bs, scalings, route, dropout, seed)


@lora_swiglu_linear.register_fake
def _(gate, up, weight, bias, As, Bs, scalings, route, dropout, seed):
    rows = gate.numel() // gate.shape[-1]
    return (gate.new_empty(*gate.shape[:-1], weight.shape[0]),
            gate.new_empty(rows, sum(A.shape[0] for A in As)))


def _swiglu_setup_context(ctx, inputs, output) -> None:
    gate, up, weight, bias, As, Bs, scalings, route, dropout, seed = inputs
    ctx.save_for_backward(gate, up, weight, output[1], route, seed, *As, *Bs)
    ctx.n, ctx.scalings, ctx.dropout = len(As), scalings, dropout
    ctx.wants = _swiglu_wants(gate, up, weight, bias, As, Bs)


def _swiglu_wants(gate, up, weight, bias, As, Bs) -> tuple:
    return ((gate.requires_grad or up.requires_grad), *_wants(gate, weight, bias, As, Bs)[1:])


def _swiglu_gradients(grad_out, gate, up, weight, low, route, seed, As, Bs, scalings, dropout, wants, traced):
    silu_gate = torch.nn.functional.silu(gate)
    h = silu_gate * up                                                 # made again, not saved
    dh, dW, db, dAs, dBs = _gradients(grad_out, h, weight, low, route, seed, As, Bs, scalings, dropout, wants,
                                      traced)
    d_gate, d_up = _swiglu_grads(gate, up, dh, silu_gate) if dh is not None else (None, None)
    return d_gate, d_up, dW, db, dAs, dBs


def _swiglu_backward(ctx, grad_out: Tensor, grad_low: Tensor | None):
    gate, up, weight, low, route, seed, *adapters = ctx.saved_tensors
    grads = _swiglu_gradients(grad_out, gate, up, weight, low, route, seed, adapters[:ctx.n], adapters[ctx.n:],
                              ctx.scalings, ctx.dropout, ctx.wants, traced=True)
    return *grads, None, None, None, None


lora_swiglu_linear.register_autograd(_swiglu_backward, setup_context=_swiglu_setup_context)


class _EagerLoraSwiGLULinear(torch.autograd.Function):
    """`lora_swiglu_linear`'s eager twin, as `_EagerLoraLinear` is `lora_linear`'s."""

    @staticmethod
    def forward(ctx, gate, up, weight, bias, route, seed, scalings, dropout, n, *adapters):
        As, Bs = adapters[:n], adapters[n:]
        out, low = _forward(swiglu(gate, up), weight, bias, As, Bs, scalings, route, dropout, seed)
        ctx.save_for_backward(gate, up, weight, low, route, seed, *adapters)
        ctx.n, ctx.scalings, ctx.dropout = n, scalings, dropout
        ctx.wants = _swiglu_wants(gate, up, weight, bias, As, Bs)
        ctx.mark_non_differentiable(low)
        return out, low

    @staticmethod
    def backward(ctx, grad_out, grad_low):
        gate, up, weight, low, route, seed, *adapters = ctx.saved_tensors
        d_gate, d_up, dW, db, dAs, dBs = _swiglu_gradients(
            grad_out, gate, up, weight, low, route, seed, adapters[:ctx.n], adapters[ctx.n:], ctx.scalings,
            ctx.dropout, ctx.wants, traced=False)
        return d_gate, d_up, dW, db, None, None, None, None, None, *dAs, *dBs


def lora_swiglu_linear_call(gate: Tensor, up: Tensor, weight: Tensor, bias: Optional[Tensor],
                            As: Sequence[Tensor], Bs: Sequence[Tensor], scalings: Sequence[float],
                            route: Optional[Tensor] = None, dropout: float = 0.0,
                            seed: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """`lora_linear_call` on silu(gate)·up: the custom op while compiling, its twin in eager."""
    if torch.compiler.is_compiling():
        return torch.ops.lorakit.lora_swiglu_linear(gate, up, weight, bias, list(As), list(Bs), list(scalings),
                                                    route, dropout, seed)
    return _EagerLoraSwiGLULinear.apply(gate, up, weight, bias, route, seed, list(scalings), dropout, len(As),
                                        *As, *Bs)
