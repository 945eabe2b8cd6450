"""LoRA variants, one file each, behind one seam (`Variant`): how an adapter is initialised, what
it adds to the layer's output, its ΔW, how it merges into and out of the base weight, and any
tensors it stores beside A and B. Plain LoRA (`lora.py`) is the default; a variant such as DoRA
is one new file that subclasses `Variant` and calls `register`."""

from __future__ import annotations

from .base import Variant
from .dora import Dora
from .lora import Lora

_VARIANTS: dict[str, Variant] = {}


def register(variant: Variant) -> Variant:
    """Make ``variant`` available to ``LoraLayer.add_adapter(..., variant=variant.name)``."""
    _VARIANTS[variant.name] = variant
    return variant


def get(name: str | Variant) -> Variant:
    if isinstance(name, Variant):
        return name
    try:
        return _VARIANTS[name]
    except KeyError:
        raise ValueError(f"no LoRA variant named {name!r}; known: {sorted(_VARIANTS)}") from None


def extra_keys() -> set[str]:
    """The PEFT key suffixes of every registered variant's own tensors (DoRA: lora_magnitude_vector)."""
    return {k for v in _VARIANTS.values() for k in v.extra_keys}


LORA = register(Lora())
DORA = register(Dora())

__all__ = ["Variant", "Lora", "Dora", "LORA", "DORA", "register", "get"]
