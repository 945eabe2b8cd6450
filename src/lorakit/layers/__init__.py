"""LoRA layer kinds, one per file, and the registry (`kinds.py`) that says which base module gets which."""

from __future__ import annotations

from .base import LoraLayer, MergeError
from .conv import LoraConv
from .embedding import LoraEmbedding
from .kinds import (FactorKey, LayerKind, dense_weight, factor_key, is_dense, is_linear_family, kind_of,
                    lora_class_for, peft_factor_keys, qualified_name, refusal, register_kind,
                    registered_kinds)
from .linear import LoraLinear
from .quantized import LoraQuantizedLinear  # registers bitsandbytes' Linear4bit and Linear8bitLt kinds
from .saved import TrainableCopy
from .sliced import LoraSlicedLinear

__all__ = ["LoraLayer", "LoraLinear", "LoraQuantizedLinear", "LoraEmbedding", "LoraConv", "LoraSlicedLinear", "TrainableCopy",
           "MergeError", "LayerKind", "FactorKey", "register_kind", "registered_kinds", "kind_of", "lora_class_for",
           "is_dense", "is_linear_family", "refusal", "dense_weight", "peft_factor_keys", "factor_key",
           "qualified_name"]
