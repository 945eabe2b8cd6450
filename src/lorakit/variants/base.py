"""The seam every LoRA variant implements; the defaults are plain LoRA's (Hu et al. 2021, eq. 3)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..layers.base import LoraLayer


class Variant:
    """How one adapter of a LoraLayer behaves. Stateless: an adapter's tensors live on the layer
    (``layer.lora_A[name]``, ...), so one instance serves every layer and adapter.

    ``additive``: the adapter's output is ``s·B·A·dropout(x)`` added to the base output, so
    ``LoraLinear`` computes it with one op (`ops/lora_linear.py`), and several such adapters
    (or a routed batch of them) share one call. A variant that is not additive (DoRA rescales the
    base output) says False and its ``output`` is called instead.
    """

    name = "variant"
    additive = False
    extra_keys: tuple[str, ...] = ()  # the key suffixes of ``extra_tensors``

    def init(self, layer: LoraLayer, name: str, init: str) -> None:
        """Initialise A and B (and the variant's own tensors) after ``add_adapter`` made them."""
        layer.init_adapter(name, init)

    def output(self, layer: LoraLayer, x: torch.Tensor, result: torch.Tensor, name: str) -> torch.Tensor:
        """The layer's output with this adapter applied to ``result`` (the output so far)."""
        return result + layer.adapter_output(x, name).to(result.dtype)

    def delta_weight(self, layer: LoraLayer, name: str) -> torch.Tensor:
        """ΔW in the base weight's layout: what merging adds (for an additive variant)."""
        return layer.delta_weight(name)

    def merged_weight(self, layer: LoraLayer, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The base weight with this adapter merged in; ``weight`` is in >= float32."""
        return weight + self.delta_weight(layer, name).to(weight.dtype)

    def unmerged_weight(self, layer: LoraLayer, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The inverse of ``merged_weight``."""
        return weight - self.delta_weight(layer, name).to(weight.dtype)

    def merge_state(self, layer: LoraLayer, name: str) -> torch.Tensor | None:
        """What ``unmerged_weight`` will need that the merged weight does not hold, taken just before
        the merge; the layer keeps it in ``layer.merge_state[name]`` until the unmerge. None: nothing."""
        return None

    def extra_tensors(self, layer: LoraLayer, name: str) -> dict[str, torch.Tensor]:
        """Tensors beside A and B, by their PEFT key suffix (DoRA: ``lora_magnitude_vector``)."""
        return {}

    def extra_shapes(self, layer: LoraLayer) -> dict[str, tuple[int, ...]]:
        """The shapes of ``extra_tensors`` on ``layer`` (which needs no adapter): what a file must hold."""
        return {}
