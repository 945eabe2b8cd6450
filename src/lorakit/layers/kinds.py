"""The registry of base-layer kinds: which base modules lorakit adapts, and with what.

A kind names the exact base-module type(s) it accepts, the LoRA layer class that wraps them,
whether they count as linear for ``target_modules="all-linear"``, and how to read their weight
as a dense (d_out, d_in) matrix, the layout of eq. 3 (``h = W0·x + ΔW·x``). Lookup is by exact
type: a subclass of a supported type (bitsandbytes' ``Linear4bit`` is an ``nn.Linear``; so is any
``class MyLinear(nn.Linear)``) may store or compute its weight in a way lorakit cannot know, so
it is refused by name, never guessed (`refusal`).

Quantized kinds are registered by the file that supports them (`register_kind`, at its import:
`quantized.py` for bitsandbytes), with ``quantized=True`` and a ``dense_weight`` that dequantizes;
they name their types in ``type_names``, so that importing lorakit never imports bitsandbytes.

Each LoRA layer class owns the PEFT key names of its factors (its ``peft_factor_keys``
attribute); `factor_key` parses a file key with the names of every registered kind, and is the
one place where io.py and analysis/ learn them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from .base import LoraLayer
from .conv import LoraConv
from .embedding import LoraEmbedding
from .linear import LoraLinear, is_conv1d_transposed
from .sliced import LoraSlicedLinear

@dataclass(frozen=True)
class LayerKind:
    """One kind of base module lorakit adapts."""

    name: str  # for messages: "nn.Linear", "transformers Conv1D", ...
    lora_class: type[LoraLayer]  # wraps the base module
    dense_weight: Callable[[nn.Module], torch.Tensor]  # the base weight as (d_out, d_in), a view where it can be
    types: tuple[type, ...] = ()  # accepted by exact type
    type_names: tuple[str, ...] = ()  # or by the exact type's qualified name, for a type lorakit does not
    # import (bitsandbytes' "bitsandbytes.nn.modules.Linear4bit"): importing lorakit never imports it
    accepts: Callable[[nn.Module], bool] | None = None  # or by this test, for a type lorakit does not import
    subclass_of: Callable[[type], bool] | None = None  # and with `accepts`: is a class derived from that type?
    linear: bool = False  # selected by target_modules="all-linear"
    sliced_class: type[LoraLayer] | None = None  # wraps it when fused_projections names it; None: refused
    quantized: bool = False  # its weight is packed: dense_weight dequantizes

    def matches(self, module: nn.Module) -> bool:
        return (type(module) in self.types or self.names(type(module))
                or (self.accepts is not None and self.accepts(module)))

    def names(self, cls: type) -> bool:
        """True when ``cls`` is one of this kind's types named in ``type_names``."""
        return bool(self.type_names) and qualified_name(cls) in self.type_names

    def is_ancestor_of(self, cls: type) -> bool:
        """True when ``cls`` derives from one of this kind's types (without being one)."""
        if cls in self.types or self.names(cls):
            return False
        if any(issubclass(cls, t) for t in self.types) or any(self.names(c) for c in cls.__mro__[1:]):
            return True
        return self.subclass_of is not None and self.subclass_of(cls)


def _nearest_ancestor(cls: type) -> LayerKind | None:
    """The kind of the nearest class ``cls`` derives from (a subclass of a registered Linear4bit is
    one of Linear4bit, not of nn.Linear)."""
    for ancestor in cls.__mro__[1:]:
        kind = next((k for k in _KINDS if ancestor in k.types or k.names(ancestor)), None)
        if kind is not None:
            return kind
    return next((k for k in _KINDS if k.is_ancestor_of(cls)), None)


def _is_conv1d_subclass(cls: type) -> bool:
    # transformers' Conv1D, found by name like `is_conv1d_transposed` (lorakit does not import it
    # to adapt GPT-2): a class whose ancestors, not itself, include it.
    return cls.__name__ != "Conv1D" and any(
        c.__name__ == "Conv1D" and c.__module__.startswith("transformers") for c in cls.__mro__[1:])


_KINDS: list[LayerKind] = [
    LayerKind("nn.Linear", LoraLinear, lambda m: m.weight,
              types=(nn.Linear, NonDynamicallyQuantizableLinear),  # the latter: nn.MultiheadAttention.out_proj
              linear=True, sliced_class=LoraSlicedLinear),
    LayerKind("transformers Conv1D", LoraLinear, lambda m: m.weight.t(),  # stored (d_in, d_out)
              accepts=is_conv1d_transposed, subclass_of=_is_conv1d_subclass,
              linear=True, sliced_class=LoraSlicedLinear),
    LayerKind("nn.Embedding", LoraEmbedding, lambda m: m.weight.t(),  # (vocab, d) = ΔWᵀ
              types=(nn.Embedding,)),
    LayerKind("nn.Conv1d/2d/3d", LoraConv, lambda m: m.weight.flatten(1),  # (c_out, c_in, *k) -> (c_out, c_in·k…)
              types=(nn.Conv1d, nn.Conv2d, nn.Conv3d)),
]


def register_kind(kind: LayerKind) -> None:
    """Add a kind (the QLoRA file adds bitsandbytes' Linear4bit / Linear8bitLt at its import).

    A type belongs to one kind: registering a type twice is refused, so which kind a module
    gets never depends on the order of imports.
    """
    taken = [(qualified_name(t), k.name) for k in _KINDS for t in kind.types if t in k.types]
    taken += [(t, k.name) for k in _KINDS for t in kind.type_names if t in k.type_names]
    if taken:
        raise ValueError(f"layer kind {kind.name!r}: {taken[0][0]} is already "
                         f"registered, as kind {taken[0][1]!r}")
    _KINDS.append(kind)


def registered_kinds() -> tuple[LayerKind, ...]:
    return tuple(_KINDS)


def kind_of(module: nn.Module) -> LayerKind | None:
    """The kind of a base module, or None when lorakit cannot adapt it."""
    return next((k for k in _KINDS if k.matches(module)), None)


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def refusal(module: nn.Module) -> str | None:
    """Why lorakit cannot adapt this base module (to follow "<module name> is a ..."), or None."""
    if kind_of(module) is not None:
        return None
    cls = type(module)
    parent = _nearest_ancestor(cls)
    if parent is not None:
        return (f"{qualified_name(cls)}, a subclass of {parent.name} that lorakit does not know: it cannot "
                f"know how such a layer stores or computes its weight (a quantized one packs it), so it "
                f"refuses rather than guess. QLoRA covers bitsandbytes' Linear4bit and Linear8bitLt "
                f"themselves (docs/qlora.md; torchao and HQQ are not supported yet); leave this module out "
                f"with exclude_modules, or, if it holds and uses a plain weight, vouch for it with "
                f"lorakit.layers.register_kind")
    return f"{qualified_name(cls)}; lorakit adapts {', '.join(k.name for k in _KINDS)} only"


def lora_class_for(module: nn.Module) -> type[LoraLayer] | None:
    """The LoRA layer class for a base module, or None when lorakit cannot adapt it."""
    kind = kind_of(module)
    return kind.lora_class if kind is not None else None


def is_dense(module: nn.Module) -> bool:
    """A linear layer in the sense of ``target_modules="all-linear"``."""
    kind = kind_of(module)
    return kind is not None and kind.linear


def is_linear_family(module: nn.Module) -> bool:
    """A linear kind's module, or an unknown subclass of one: what "all-linear" must look at, so
    that an unknown subclass is refused rather than silently left out."""
    kind = kind_of(module)
    if kind is not None:
        return kind.linear
    return any(k.linear and k.is_ancestor_of(type(module)) for k in _KINDS)


def dense_weight(module: nn.Module) -> torch.Tensor | None:
    """A base module's weight in the (d_out, d_in) layout of ΔW, or None for a module lorakit
    cannot read."""
    kind = kind_of(module)
    return kind.dense_weight(module) if kind is not None else None


# --- PEFT key names -----------------------------------------------------------------------------

def peft_factor_keys(layer: LoraLayer | type[LoraLayer]) -> tuple[str, str]:
    """(A key, B key): what a LoRA layer class stores its factors under, after ``<module name>.``."""
    return layer.peft_factor_keys  # LoraLayer's default: PEFT's linear names, lora_A.weight / lora_B.weight


@dataclass(frozen=True)
class FactorKey:
    """A file key of a LoRA factor, split: ``<module>.<suffix>``."""

    module: str  # e.g. model.layers.0.self_attn.q_proj (without PEFT's base_model.model. prefix)
    factor: str  # "A" or "B"
    suffix: str  # e.g. lora_A.weight
    owners: tuple[type[LoraLayer], ...]  # the layer classes that store a factor under this suffix


def _suffixes() -> dict[str, tuple[str, tuple[type[LoraLayer], ...]]]:
    """suffix -> (factor, owning classes), from every registered kind's layer classes."""
    table: dict[str, tuple[str, tuple[type[LoraLayer], ...]]] = {}
    classes = dict.fromkeys(c for k in _KINDS for c in (k.lora_class, k.sliced_class) if c is not None)
    for cls in classes:
        for factor, suffix in zip("AB", peft_factor_keys(cls)):
            known, owners = table.get(suffix, (factor, ()))
            if known != factor:
                raise ValueError(f"{qualified_name(cls)} stores lora_{factor} under {suffix!r}, which "
                                 f"{owners[0].__name__} uses for lora_{known}")
            table[suffix] = (factor, owners + (cls,))
    return table


def factor_key(key: str) -> FactorKey | None:
    """Split a key (without PEFT's prefix) naming a LoRA factor; None for any other key."""
    table = _suffixes()
    # Longest suffix first, so that no suffix can shadow a longer one that ends with it.
    alternatives = "|".join(re.escape(s) for s in sorted(table, key=len, reverse=True))
    m = re.fullmatch(rf"(.+)\.({alternatives})", key)
    if m is None:
        return None
    factor, owners = table[m.group(2)]
    return FactorKey(module=m.group(1), factor=factor, suffix=m.group(2), owners=owners)
