"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv 2402.09353).

The adapted weight is split into a magnitude and a direction (eq. 5):

    W' = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖

with the norm taken over each output row of the (d_out, d_in) matrix (an output channel of a
convolution, an embedding dimension of an embedding), and ``m`` a trainable vector that starts at
``‖W0 + s·B·A‖`` (= ‖W0‖, since B = 0 at start), so the adapted model equals the base at step 0.
§4.3: the norm is a constant for backpropagation (detached), which saves memory and, per the
paper, costs no accuracy; gradients reach ``m`` and, through the direction, A and B.

The forward is PEFT's (`peft/tuners/lora/dora.py`), so outputs and gradients agree with it: with
``r = m / ‖W0 + s·B·A‖`` and the output so far ``h`` (the base layer's, bias included),

    h' = h + (r − 1)·(h − bias) + r·s·B·A·x

where, while dropout is active (training, p > 0), ``h − bias`` is replaced by ``W0·dropout(x)``:
dropout then applies to the whole adapted path, as PEFT does. Embeddings: ``h' = r·h + r·s·B·A[x]``.
It is computed as ``r·(h − bias + s·B·A·x) + bias``, which is the same sum and leaves backward one
(tokens, d_out) tensor to keep for m's gradient where PEFT's order of operations keeps two.

The norm is computed without forming ``W0 + s·B·A`` (`row_norm`), in float32 at least.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .base import Variant

if TYPE_CHECKING:
    from ..layers.base import LoraLayer

MAGNITUDE = "lora_magnitude_vector"  # PEFT's name, on the layer and in the file (``<module>.lora_magnitude_vector``)
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def row_norm(W0: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """‖W0 + s·B·A‖ of each row, for W0 (d_out, d_in), A (r, d_in), B (d_out, r), without the
    (d_out, d_in) sum: per row i,

        ‖W0_i + s·(BA)_i‖² = ‖W0_i‖² + 2s·⟨W0_i, (BA)_i⟩ + s²·‖(BA)_i‖²
        ⟨W0_i, (BA)_i⟩ = Σ_j (W0·Aᵀ)_ij·B_ij,   ‖(BA)_i‖² = Σ_j (B·A·Aᵀ)_ij·B_ij

    O(d_out·d_in·r) work and (d_out, r) temporaries. Computed in float32 at least (a bf16 W0 is
    read as float32); the three terms cancel only when ΔW nearly cancels a row of W0, where the
    relative error grows as (‖W0_i‖² + ‖sΔW_i‖²) / ‖W0_i + sΔW_i‖² times float32's 6e-8.
    """
    dtype = torch.promote_types(torch.promote_types(W0.dtype, A.dtype), torch.float32)
    W0, A, B = W0.to(dtype), A.to(dtype), B.to(dtype)
    WA = W0 @ A.t()  # (d_out, d_in) @ (d_in, r) -> (d_out, r)
    gram = A @ A.t()  # (r, d_in) @ (d_in, r) -> (r, r)
    squared = (torch.linalg.vector_norm(W0, dim=1).square() + (2 * scaling) * (WA * B).sum(1)
               + (scaling * scaling) * ((B @ gram) * B).sum(1))
    return squared.clamp_min(0).sqrt()


def magnitude_shape(layer: LoraLayer) -> tuple[int, ...]:
    """The shape of m on ``layer``, as PEFT stores it: (d_out,); (1, c_out, 1, …) for a convolution."""
    base = layer.base_layer
    if isinstance(base, _CONV_TYPES):
        return (1, base.out_channels, *(1,) * len(base.kernel_size))
    if isinstance(base, nn.Embedding):
        return (base.embedding_dim,)
    return (layer.out_features,)


def _norm(layer: LoraLayer, name: str) -> torch.Tensor:
    """‖W0 + s·B·A‖ per output row (detached), with W0 as no merge had happened."""
    W0 = layer.as_dense(layer.unmerged_base_weight()).detach()
    # as dense factors; a convolution's are (r, c_in·k…) and (c_out, r)
    A, B = layer.lora_A[name].detach().flatten(1), layer.lora_B[name].detach().flatten(1)
    return row_norm(W0, A, B, layer.scaling[name])


class Dora(Variant):
    name = "dora"
    additive = False  # it rescales the base output: LoraLinear's one-op forward cannot take it
    extra_keys = (MAGNITUDE,)

    def init(self, layer: LoraLayer, name: str, init: str) -> None:
        from ..layers.sliced import LoraSlicedLinear  # here, not at the top: layers import variants

        if isinstance(layer, LoraSlicedLinear):
            raise ValueError(f"{layer.module_name}: DoRA on fused_projections slices is not supported (PEFT has no "
                             f"slices either); adapt the whole layer, or leave use_dora off")
        layer.init_adapter(name, init)
        A = layer.lora_A[name]
        with torch.no_grad():  # §4.1: m = ‖W0 + s·B·A‖, so W' = W0 at start
            m = _norm(layer, name).to(A.dtype).reshape(magnitude_shape(layer))
        layer.lora_magnitude_vector[name] = nn.Parameter(m, requires_grad=A.requires_grad)

    def _scale(self, layer: LoraLayer, name: str) -> torch.Tensor:
        m = layer.lora_magnitude_vector[name]
        return m / _norm(layer, name).to(m.dtype).reshape(m.shape)  # §4.3: the norm is a constant

    def output(self, layer: LoraLayer, x: torch.Tensor, result: torch.Tensor, name: str) -> torch.Tensor:
        scale = self._scale(layer, name)  # (d_out,), or (1, c_out, 1, …)
        base = layer.base_layer
        if isinstance(base, nn.Embedding):
            return (scale * result + scale * layer.adapter_output(x, name)).to(result.dtype)
        A, B, s = layer.lora_A[name], layer.lora_B[name], layer.scaling[name]
        x = x.to(A.dtype)
        dropout = layer.lora_dropout[name]
        conv = isinstance(base, _CONV_TYPES)
        plain = isinstance(dropout, nn.Identity) or not layer.training
        if not plain:  # PEFT: the rescaled base term then sees the dropped-out input too
            x = dropout(x)
        if conv:
            # (N, c_in, *spatial) -> (N, r, *spatial') -> (N, c_out, *spatial'), as LoraConv computes it
            lora = torch.einsum("nr...,or->no...", base._conv_forward(x, A, None), B.flatten(1))
        else:
            lora = (x @ A.t()) @ B.t()  # (..., d_in) -> (..., r) -> (..., d_out)
        # h + (r − 1)·base + r·s·lora, written as r·(base + s·lora) + (h − base): backward keeps one
        # (tokens, d_out) tensor for dm instead of two.
        if plain:  # base = h − bias
            bias = base.bias
            if bias is None:
                return (scale * (result + lora * s)).to(result.dtype)
            bias = bias.view(1, -1, *(1,) * (result.dim() - 2)) if conv else bias
            return (scale * (result - bias + lora * s) + bias).to(result.dtype)
        W0 = layer.unmerged_base_weight().to(x.dtype)
        base_out = base._conv_forward(x, W0, None) if conv else F.linear(x, layer.as_dense(W0))
        return (result - base_out + scale * (base_out + lora * s)).to(result.dtype)

    def merge_state(self, layer: LoraLayer, name: str) -> torch.Tensor:
        # The merged weight's rows have norm |m|: ‖W0 + s·B·A‖ is gone from it, and unmerging needs it.
        return _norm(layer, name)

    def merged_weight(self, layer: LoraLayer, name: str, weight: torch.Tensor) -> torch.Tensor:
        """(m / ‖W0 + s·B·A‖) ⊙ (W + s·B·A), the norm from W0 without any merge (as the forward
        sees it), so merging on top of other merged adapters gives the unmerged forward's outputs."""
        scale = self._merge_scale(layer, name, _norm(layer, name), weight.dtype)
        dense = layer.as_dense(weight + layer.delta_weight(name).to(weight.dtype))
        return layer.from_dense(scale * dense)

    def unmerged_weight(self, layer: LoraLayer, name: str, weight: torch.Tensor) -> torch.Tensor:
        norm = layer.merge_state.get(name)
        if norm is None:
            raise RuntimeError(f"{layer.module_name}: DoRA adapter {name!r} is not merged into this layer, so "
                               f"there is nothing to unmerge (its norm at merge time is not known)")
        scale = self._merge_scale(layer, name, norm, weight.dtype)
        return layer.from_dense(layer.as_dense(weight) / scale) - layer.delta_weight(name).to(weight.dtype)

    @staticmethod
    def _merge_scale(layer: LoraLayer, name: str, norm: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        m = layer.lora_magnitude_vector[name].detach().reshape(-1).to(dtype)
        return (m / norm.to(m.device, dtype)).unsqueeze(1)  # (d_out, 1): one factor per row of the dense weight

    def delta_weight(self, layer: LoraLayer, name: str) -> torch.Tensor:
        """The effective ΔW = W' − W0 (not s·B·A: DoRA also rescales W0), in the base layout."""
        W0 = layer.unmerged_base_weight()
        W0 = W0.to(torch.promote_types(W0.dtype, torch.float32))
        return (self.merged_weight(layer, name, W0) - W0).to(layer.lora_A[name].dtype)

    def extra_tensors(self, layer: LoraLayer, name: str) -> dict[str, torch.Tensor]:
        return {MAGNITUDE: layer.lora_magnitude_vector[name]}

    def extra_shapes(self, layer: LoraLayer) -> dict[str, tuple[int, ...]]:
        return {MAGNITUDE: magnitude_shape(layer)}
