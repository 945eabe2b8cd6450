"""The segmented LoRA op: every row (or token) of a batch through its own adapter of a bank.

    delta[t] = B[slots[t]] · A[slots[t]] · x[t]        (0 where slots[t] == -1: the base model)

A is stacked (S, R, d_in) and B (S, d_out, R), one slot per adapter, ranks zero-padded to R and
the scaling s = α/r already folded into B (`bank.py`), so the op needs no per-adapter numbers and
a slot that a module's adapter does not target is all zeros: its rows get nothing added.

This file holds the torch reference (Punica's SGMV in spirit: rows grouped by slot, two GEMMs per
adapter present), which looks at the slot values on the host (``unique``), so it is not for CUDA
graphs, and the dense form (`segmented_lora_dense`: every slot's projection, masked per token),
which needs no host sync and is what captured decode steps run. Tests compare both with each
adapter run alone. While compiling, the op is
``torch.ops.lorakit.segmented_lora`` (a custom op with a fake kernel, so a graph holds it as one
opaque call); in eager the function is called directly, without the dispatcher's round trip.
"""

from __future__ import annotations

import torch
from torch import Tensor


def segmented_lora_reference(x: Tensor, A: Tensor, B: Tensor, slots: Tensor) -> Tensor:
    """(T, d_out): B[slots[t]] @ A[slots[t]] @ x[t] for each row t of x (T, d_in); 0 where slots[t] < 0."""
    _check(x, A, B, slots)
    out = x.new_zeros(x.shape[0], B.shape[1])
    present = torch.unique(slots).tolist()
    for s in present:
        if s < 0:
            continue
        if len(present) == 1:  # one adapter for the whole batch: no gather, no scatter
            return (x @ A[s].t()) @ B[s].t()
        rows = (slots == s).nonzero().squeeze(1)
        low = x.index_select(0, rows) @ A[s].t()                       # (t, d_in) @ (d_in, R) -> (t, R)
        out.index_copy_(0, rows, low @ B[s].t())                       # (t, R) @ (R, d_out) -> (t, d_out)
    return out


def slot_columns_mask(token_slots: Tensor, slots: int, rank: int, dtype: torch.dtype) -> Tensor:
    """(T, rank·slots): 1 where token t's slot owns column c of the dense op's projection (column
    i·S + s belongs to slot s), else 0; all 0 for a base-model token (slot -1). Device ops only, so
    a CUDA graph captures it; built once per forward and shared by every layer."""
    owner = torch.arange(rank * slots, device=token_slots.device) % slots
    return (token_slots[:, None] == owner).to(dtype)


def segmented_lora_dense(x: Tensor, A_flat: Tensor, B_flat: Tensor, mask: Tensor) -> Tensor:
    """(T, d_out): the same term as `segmented_lora_reference`, as two dense GEMMs over every slot:
    ((x·A_flatᵀ) ⊙ mask)·B_flatᵀ, with A_flat (r·S, d_in), B_flat (d_out, r·S) from
    `bank.BankModule.flat` and ``mask`` from `slot_columns_mask`. It reads the slots' factors once
    (r·S·(d_in + d_out) numbers, under 2% of a 1.1B layer's weights for 8 slots at r=16) and never
    looks at the slot values on the host: no sync, a fixed launch sequence, so CUDA graphs capture
    it. It computes S times the adapter FLOPs of the reference, which decode batches do not notice."""
    return (x @ A_flat.t()).mul_(mask) @ B_flat.t()


def _check(x: Tensor, A: Tensor, B: Tensor, slots: Tensor) -> None:
    if x.dim() != 2 or A.dim() != 3 or B.dim() != 3:
        raise ValueError(f"segmented_lora takes x (T, d_in), A (S, R, d_in), B (S, d_out, R); got x "
                         f"{tuple(x.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}")
    S, R, d_in = A.shape
    if x.shape[1] != d_in or B.shape[0] != S or B.shape[2] != R:
        raise ValueError(f"segmented_lora: shapes do not fit: x {tuple(x.shape)}, A {tuple(A.shape)}, "
                         f"B {tuple(B.shape)} (A is (S, R, d_in), B is (S, d_out, R))")
    if slots.shape != (x.shape[0],) or slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"segmented_lora: slots must be an int tensor of shape ({x.shape[0]},), one slot per "
                         f"row of x (-1: no adapter); got {slots.dtype} {tuple(slots.shape)}")


@torch.library.custom_op("lorakit::segmented_lora", mutates_args=())
def _segmented_lora_op(x: Tensor, A: Tensor, B: Tensor, slots: Tensor) -> Tensor:
    return segmented_lora_reference(x, A, B, slots)


@_segmented_lora_op.register_fake
def _(x, A, B, slots):
    return x.new_empty(x.shape[0], B.shape[1])


def segmented_lora(x: Tensor, A: Tensor, B: Tensor, slots: Tensor) -> Tensor:
    """The segmented LoRA term for x (..., d_in) with one slot per row of x.reshape(-1, d_in):
    returns (..., d_out), in x's dtype. The op while compiling, the reference in eager."""
    x2d = x.reshape(-1, x.shape[-1])
    if torch.compiler.is_compiling():
        out = torch.ops.lorakit.segmented_lora(x2d, A, B, slots)
    else:
        out = segmented_lora_reference(x2d, A, B, slots)
    return out.view(*x.shape[:-1], B.shape[1])
