"""Named adapters on one model: which are active, base behaviour on demand, merge/unmerge and
task switching (Hu et al. 2021, §4.2: W = W0 + BA for deployment; recover W0 by subtracting BA
and add B'A' to switch tasks)."""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from .checks import tied_weight_refusal
from .inject import lora_modules, lora_state
from .layers import LoraLayer, LoraQuantizedLinear, MergeError


def adapter_names(model: nn.Module) -> list[str]:
    """Every adapter on the model, in the order they were added."""
    state = model.__dict__.get("lora_state")
    return list(state.configs) if state else []


def active_adapters(model: nn.Module) -> list[str]:
    return list(lora_state(model).active)


def use(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make ``names`` the active adapter(s); several active adapters add their outputs.

    An adapter that is merged but no longer active is unmerged, so the weights never hold an
    adapter the forward does not use.
    """
    state = lora_state(model)
    if isinstance(names, str):
        names = [names]
    elif isinstance(names, Iterable) and not isinstance(names, Mapping):
        names = list(names)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"use() takes an adapter name or a list of names, got {names!r}; the model has "
                        f"{list(state.configs)}")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:  # the forward would add such an adapter twice, and merge it once
        raise ValueError(f"use() names {twice} more than once; name each active adapter once")
    unknown = [n for n in names if n not in state.configs]
    if unknown:
        raise KeyError(f"no adapter named {unknown} on this model; it has {list(state.configs)}")
    for _, module in lora_modules(model):
        if isinstance(module, LoraLayer):
            module.unmerge([m for m in module.merged_adapters if m not in names])
        module.set_active(names)
    state.active = names


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes exactly what the base model computes. Merged adapters
    are unmerged on entry and merged back on exit."""
    modules = [m for _, m in lora_modules(model)]
    merged = {id(m): list(m.merged_adapters) for m in modules if isinstance(m, LoraLayer)}
    for m in modules:
        if isinstance(m, LoraLayer):
            m.unmerge()
        m.disabled = True
    try:
        yield model
    finally:
        for m in modules:
            m.disabled = False
            if isinstance(m, LoraLayer):
                m.merge(merged[id(m)])


def merge(model: nn.Module, *, safe: bool = True) -> None:
    """Fold the active adapters into the base weights, so inference costs what the base model
    costs. Idempotent: merging again adds nothing. ``safe`` checks for non-finite values before
    anything is written. Adapters on a quantized base (bitsandbytes) are refused, before anything is
    merged: see `lorakit.unload(model, merge=True)` for a dense merged model."""
    layers = [m for _, m in lora_modules(model) if isinstance(m, LoraLayer)]
    for layer in layers:  # a quantized base is refused before any layer is merged
        pending = [n for n in layer.active_adapters if n not in layer.merged_adapters]
        if pending and isinstance(layer, LoraQuantizedLinear):
            raise MergeError(layer.merge_refusal(pending[0]))
    why = tied_weight_refusal(model, layers)
    if why is not None:  # so is a weight another module shares (tied embeddings)
        raise MergeError(why)
    if safe:  # check every layer first, so a bad adapter leaves no layer half-merged
        for layer in layers:
            for name in layer.active_adapters:
                if name not in layer.merged_adapters:
                    _check_finite(layer, name)
    for layer in layers:
        layer.merge(safe=False)


def _check_finite(layer: LoraLayer, name: str) -> None:
    if not torch.isfinite(layer.merged_weight(name)).all():
        raise MergeError(f"{layer.module_name}: merging adapter {name!r} would write non-finite values "
                         f"into the base weight; nothing was merged")


def unmerge(model: nn.Module) -> None:
    """Subtract every merged adapter from the base weights (W0 = W − BA)."""
    for _, module in lora_modules(model):
        if isinstance(module, LoraLayer):
            module.unmerge()


def switch(model: nn.Module, name: str | Sequence[str]) -> None:
    """Task switching on a merged model: subtract the merged adapter(s), add ``name``'s, in place."""
    use(model, name)  # unmerges what is no longer active
    merge(model)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) tensors are counted once, and a 4-bit
    quantized weight as the weights it holds (not its packed bytes)."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = _logical_numel(p)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def _logical_numel(p: torch.Tensor) -> int:
    """Weights a parameter stands for: a bitsandbytes 4-bit weight packs two per byte of its storage,
    and its quantization state knows the shape it was quantized from."""
    state = getattr(p, "quant_state", None)
    shape = getattr(state, "shape", None)
    return shape.numel() if isinstance(shape, torch.Size) else p.numel()
