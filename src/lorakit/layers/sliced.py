"""LoRA on some slices of a stacked projection: one Linear/Conv1D whose output stacks n equal
projections (GPT-2's ``c_attn`` = q|k|v; the config calls them ``fused_projections``). The paper
adapts q and v inside ``c_attn`` (§7.1)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..ops import delta_weight
from .base import LoraLayer
from .linear import dense_features, is_conv1d_transposed


class LoraSlicedLinear(LoraLayer):
    """One (A_k, B_k) per adapted slice k, stored stacked: A (n_a·r, d_in), B (n_a·d_slice, r).

    Output features of the unadapted slices get nothing added; there is no zero block to train.
    On disk it is stored as PEFT, which has no slices, sees it (``dense_factors``), under PEFT's
    linear key names.
    """

    def __init__(self, base_layer: nn.Module, slices: Sequence[bool], module_name: str = "") -> None:
        super().__init__(base_layer, module_name)
        self.fan_in_fan_out = is_conv1d_transposed(base_layer)
        self.in_features, self.out_features = dense_features(base_layer)
        if self.out_features % len(slices):
            raise ValueError(f"{module_name}: {self.out_features} output features do not split into "
                             f"{len(slices)} equal slices (fused_projections={list(slices)})")
        self.slices = tuple(bool(s) for s in slices)
        self.slice_size = self.out_features // len(slices)
        adapted = [k for k, on in enumerate(self.slices) if on]
        columns = torch.cat([torch.arange(k * self.slice_size, (k + 1) * self.slice_size) for k in adapted])
        self.register_buffer("adapted_columns", columns, persistent=False)

    @property
    def n_adapted(self) -> int:
        return sum(self.slices)

    def weight_init_refusal(self) -> str | None:
        return (f"lorakit does not do that for slices of a fused projection (fused_projections={list(self.slices)}): "
                f"drop this module's fused_projections entry to adapt the whole layer (as PEFT does), or use "
                f"init='kaiming'")

    def adapter_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (self.n_adapted * r, self.in_features), (self.n_adapted * self.slice_size, r)

    def adapter_output(self, x: torch.Tensor, name: str) -> torch.Tensor:
        A, B, r, n = self.lora_A[name], self.lora_B[name], self.rank[name], self.n_adapted
        # (..., d_in) @ (d_in, n·r) -> (..., n, r); per slice k: (..., r) @ (r, d_slice)
        low = (self._input_for(x, name) @ A.t()).unflatten(-1, (n, r))
        per_slice = torch.einsum("...nr,nsr->...ns", low, B.view(n, self.slice_size, r))
        full = per_slice.new_zeros(*per_slice.shape[:-2], self.out_features)
        return full.index_copy(-1, self.adapted_columns, per_slice.flatten(-2)) * self.scaling[name]

    def dense_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of rank n_a·r over the whole output, B block-diagonal with zero rows for the
        unadapted slices: B·A equals ΔW/s. This is how PEFT, which has no slices, stores it."""
        A, B, r, n = self.lora_A[name], self.lora_B[name], self.rank[name], self.n_adapted
        dense_b = B.new_zeros(self.out_features, n * r)
        for k, block in enumerate(B.view(n, self.slice_size, r)):
            rows = self.adapted_columns[k * self.slice_size:(k + 1) * self.slice_size]
            dense_b[rows, k * r:(k + 1) * r] = block
        return A, dense_b

    @torch.no_grad()
    def load_dense_factors(self, name: str, A: torch.Tensor, dense_b: torch.Tensor) -> None:
        """Inverse of ``dense_factors``; refuses a B with values outside its blocks."""
        r, n = self.rank[name], self.n_adapted
        blocks = [dense_b[self.adapted_columns[k * self.slice_size:(k + 1) * self.slice_size],
                          k * r:(k + 1) * r] for k in range(n)]
        rebuilt = torch.cat(blocks)
        A_ref, check = self.dense_factors(name)  # shapes of this layer
        if dense_b.shape != check.shape or A.shape != A_ref.shape:
            raise ValueError(f"{self.module_name}: sliced adapter shapes A {tuple(A.shape)}, B {tuple(dense_b.shape)} "
                             f"do not fit A {tuple(A_ref.shape)}, B {tuple(check.shape)}")
        self.lora_A[name].copy_(A)
        self.lora_B[name].copy_(rebuilt)
        if not torch.equal(self.dense_factors(name)[1], dense_b.to(self.lora_B[name].dtype)):
            raise ValueError(f"{self.module_name}: lora_B has non-zero values outside the adapted slices "
                             f"{list(self.slices)}; load it as a plain (unsliced) adapter instead")

    def delta_weight(self, name: str) -> torch.Tensor:
        A, dense_b = self.dense_factors(name)
        dw = delta_weight(A, dense_b, self.scaling[name])  # (d_out, d_in)
        return dw.t() if self.fan_in_fan_out else dw
