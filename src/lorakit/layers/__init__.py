"""LoRA layer kinds, one per file, and the table that says which base module gets which."""

from __future__ import annotations

from torch import nn

from .base import LoraLayer, MergeError
from .conv import CONV_TYPES, LoraConv
from .embedding import LoraEmbedding
from .fused import LoraFusedLinear
from .linear import LoraLinear, is_conv1d_transposed
from .saved import TrainableCopy


def lora_class_for(module: nn.Module) -> type[LoraLayer] | None:
    """The LoRA layer kind for a base module, or None when lorakit cannot adapt it."""
    if isinstance(module, nn.Linear) or is_conv1d_transposed(module):
        return LoraLinear
    if isinstance(module, nn.Embedding):
        return LoraEmbedding
    if isinstance(module, CONV_TYPES):
        return LoraConv
    return None


def is_dense(module: nn.Module) -> bool:
    """A linear layer in the sense of ``target_modules="all-linear"``."""
    return isinstance(module, nn.Linear) or is_conv1d_transposed(module)


__all__ = ["LoraLayer", "LoraLinear", "LoraEmbedding", "LoraConv", "LoraFusedLinear", "TrainableCopy",
           "MergeError", "lora_class_for", "is_dense"]
