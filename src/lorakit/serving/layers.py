"""Serving wrappers: a base linear layer plus the bank's segmented LoRA term for the current batch.

    h = W0·x + B[slot]·A[slot]·x        (slot: the bank slot of x's row; -1: the base model)

Which slot each token uses is a `SlotRoute`, one object shared by every wrapper of a model: the
engine sets it once per forward (`SlotRoute.rows`), so a forward's routing metadata is built once,
not per layer. Outside that context a wrapper is its base layer.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from .bank import BankModule
from .ops import segmented_lora, segmented_lora_dense, slot_columns_mask


class SlotRoute:
    """The bank slot of every token of the forward in progress, or None (no adapter anywhere).
    With ``dense`` set, the forward's layers run the dense op (`ops.segmented_lora_dense`) over the
    first ``dense.rank`` components of every slot, with the column mask made once here."""

    def __init__(self) -> None:
        self.token_slots: torch.Tensor | None = None  # (N·L,) int64, row-major over (N, L)
        self.row_slots: torch.Tensor | None = None    # (N,): the slot of each row (all its tokens share it)
        self.dense: DenseRoute | None = None

    @contextlib.contextmanager
    def rows(self, slots: torch.Tensor, tokens_per_row: int, *, dense: tuple[int, int, torch.dtype] | None = None
             ) -> Iterator[None]:
        """Route the next forward: row i of its (N, L) input uses bank slot ``slots[i]`` (-1: base).
        ``dense``: (bank slots, rank, dtype) for the dense op, else the reference op runs."""
        if slots.dim() != 1:
            raise ValueError(f"slots must be (N,), one bank slot per row; got shape {tuple(slots.shape)}")
        self.row_slots = slots
        self.token_slots = slots if tokens_per_row == 1 else slots.repeat_interleave(tokens_per_row)  # (N·L,)
        if dense is not None:
            count, rank, dtype = dense
            self.dense = DenseRoute(rank, slot_columns_mask(self.token_slots, count, rank, dtype), count, dtype)
        try:
            yield
        finally:
            self.token_slots, self.row_slots, self.dense = None, None, None

    def for_input(self, x: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(token slots (T,), dense mask (T, rank·slots) or None) for a layer input ``x`` (..., d_in).
        Usually x has every routed token; the output head may see fewer, the last L' < L positions
        of each row (``logits_to_keep``): x is then (N, L', d_in), and each row keeps its slot."""
        tokens = x.numel() // x.shape[-1]
        if tokens == self.token_slots.shape[0]:
            return self.token_slots, self.dense.mask if self.dense is not None else None
        rows = self.row_slots.shape[0]
        if x.dim() != 3 or x.shape[0] != rows or tokens > self.token_slots.shape[0]:
            raise ValueError(f"{name}: the route has {self.token_slots.shape[0]} tokens in {rows} rows but this "
                             f"layer's input has shape {tuple(x.shape)}; route as many rows and tokens as the "
                             f"batch has")
        slots = self.row_slots.repeat_interleave(x.shape[1])                                # (N·L',)
        d = self.dense
        return slots, slot_columns_mask(slots, d.slots, d.rank, d.dtype) if d is not None else None


@dataclass(frozen=True)
class DenseRoute:
    rank: int            # components 0..rank-1 of every slot (at least every loaded adapter's rank)
    mask: torch.Tensor   # (N·L, rank·slots), `ops.slot_columns_mask`
    slots: int           # the bank's slots
    dtype: torch.dtype   # the mask's


class BankedLinear(nn.Module):
    """A base linear layer (nn.Linear or transformers' Conv1D) with the bank's term for its module."""

    def __init__(self, base_layer: nn.Module, factors: BankModule, route: SlotRoute) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.factors = factors  # the bank's tensors: not this module's parameters or buffers
        self.route = route

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.route.token_slots is None:
            return out
        slots, mask = self.route.for_input(x, self.factors.name)
        f, dense = self.factors, self.route.dense
        if dense is not None:
            A_flat, B_flat = f.flat(dense.rank)
            x2d = x.reshape(-1, x.shape[-1]).to(A_flat.dtype)
            if out.dtype == A_flat.dtype and out.is_contiguous():
                # the expand GEMM accumulates onto the base output in its buffer: no (T, d_out) delta, no add
                low = (x2d @ A_flat.t()).mul_(mask)                                  # (T, r·S)
                out.view(-1, out.shape[-1]).addmm_(low, B_flat.t())
                return out
            delta = segmented_lora_dense(x2d, A_flat, B_flat, mask).view(*x.shape[:-1], -1)
        else:
            r = f.widest_rank  # the columns past every slot's rank are zero padding: leave them out
            delta = segmented_lora(x.to(f.A.dtype), f.A[:, :r], f.B[:, :, :r], slots)
        return out + delta.to(out.dtype)

    def extra_repr(self) -> str:
        f = self.factors
        return f"bank: {f.A.shape[0]} slots, max_rank={f.A.shape[1]}, ranks={f.ranks}"


def install(model: nn.Module, modules: dict[str, BankModule], route: SlotRoute) -> None:
    """Wrap every module the bank holds factors for (and not wrapped yet); unwrap the wrappers whose
    module the bank no longer holds. Afterwards the wrapped set is exactly ``modules``."""
    for name, wrapper in list(wrapped(model).items()):
        if name not in modules:
            _replace(model, name, wrapper.base_layer)
        elif wrapper.factors is not modules[name]:
            wrapper.factors = modules[name]
    current = wrapped(model)
    for name, factors in modules.items():
        if name not in current:
            _replace(model, name, BankedLinear(model.get_submodule(name), factors, route))


def uninstall(model: nn.Module) -> None:
    """Every wrapper back to its base layer: the model is the plain model again."""
    for name, wrapper in wrapped(model).items():
        _replace(model, name, wrapper.base_layer)


def wrapped(model: nn.Module) -> dict[str, BankedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, BankedLinear)}


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
