"""Rebuild an adapted layer's input in backward from tensors autograd keeps anyway.

LoRA's dA = g_lowᵀ·x needs the layer's input x, and a frozen base layer does not: keeping x is
LoRA's whole activation cost. In transformer blocks x is usually an elementwise product whose
factors the multiply already saved for its own backward:

    RMSNorm output   x = weight · cast(h · rsqrt(mean(h²) + ε))    (the inner multiply keeps h, rsqrt)
    SwiGLU product   x = act(gate) · up                            (the multiply keeps both factors)

`plan(x)` walks x's autograd graph a few nodes up and returns a recipe that recomputes x from those
saved tensors — the same ops on the same operands, so bit for bit the same x — or None, and the
caller saves x as before. Only two node kinds are followed: a tensor-tensor multiply and a dtype /
device copy. The recipe holds graph nodes, never tensors, so nothing is kept alive that autograd
would not keep anyway; the multiplies' own backward runs after the adapter's (they are upstream of
x), so their saved tensors are still there when the recipe is used.
"""

from __future__ import annotations

import torch

MAX_DEPTH = 3  # multiply → copy → multiply covers RMSNorm's tail


def _hooks_active() -> bool:
    """Saved-tensor hooks (activation checkpointing, offloading) already manage what is saved."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None


def plan(x: torch.Tensor, products_only: bool = False) -> tuple | None:
    """A recipe that rebuilds x exactly in backward, or None. ``products_only``: only when x is the
    product of two tensors the multiply keeps (SwiGLU's), so that rebuilding is one multiply — or
    none at all, where the consumer can take the two factors (`factors`)."""
    if x.grad_fn is None or _hooks_active():
        return None
    if products_only:
        recipe = _plan(x.grad_fn, 1)
        return recipe if recipe is not None and factors(recipe) is not None else None
    return _plan(x.grad_fn, MAX_DEPTH)


def factors(recipe: tuple) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(a, b) when the recipe is x = a·b of two kept tensors of x's dtype and shape, else None."""
    if recipe[0] != "mul" or recipe[1][0] != "saved" or recipe[2][0] != "saved":
        return None
    a, b = rebuild(recipe[1]), rebuild(recipe[2])
    return (a, b) if a.dtype == b.dtype and a.shape == b.shape else None


def _plan(node, depth: int) -> tuple | None:
    if node is None or depth == 0:
        return None
    kind = type(node).__name__
    if kind == "MulBackward0":  # tensor · tensor
        parts = []
        for attr, (child, _) in zip(("_saved_self", "_saved_other"), node.next_functions):
            if getattr(node, attr) is not None:  # kept for the multiply's own backward
                parts.append(("saved", node, attr))
            else:  # not kept (it needs no gradient through this product): rebuild it in turn
                part = _plan(child, depth - 1)
                if part is None:
                    return None
                parts.append(part)
        return ("mul", *parts)
    if kind == "ToCopyBackward0":
        meta = getattr(node, "_input_metadata", None)  # the copy's output dtype and device
        part = _plan(node.next_functions[0][0], depth - 1) if meta else None
        return None if part is None else ("to", meta[0].dtype, meta[0].device, part)
    return None


def rebuild(recipe: tuple) -> torch.Tensor:
    kind = recipe[0]
    if kind == "saved":
        _, node, attr = recipe
        return getattr(node, attr)
    if kind == "mul":
        return rebuild(recipe[1]) * rebuild(recipe[2])
    _, dtype, device, part = recipe
    return rebuild(part).to(device=device, dtype=dtype)
