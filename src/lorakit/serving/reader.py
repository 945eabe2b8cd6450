"""Reading an adapter directory for the bank: its factors per module, checked against the base
model, without injecting anything.

Every file and config check is `io.check_adapter`'s (what `lorakit.load_adapter` checks before it
touches a model: the files, the target search, the key and shape plan); this file only adds what
the bank refuses on top: what cannot be mixed row by row with other adapters.

The checks run on a *structure copy* of the base model (`structure_copy`): the same module types
and names, with weights on the meta device (no memory). The engine's model has its linear layers
wrapped for serving, so it is not the plain model that io's checks expect; the copy is.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import io
from ..config import LoraConfig, init_from_weight
from ..layers import LoraLinear


class AdapterRefused(ValueError):
    """An adapter the bank cannot hold as it is (rank, kind of target, a bank that is full...)."""


@dataclass(frozen=True)
class ModuleFactors:
    """One module's factors from the file, in float32: A (r, d_in) and B (d_out, r) with the
    scaling s (α/r, or α/√r with rsLoRA) already multiplied into B."""

    A: torch.Tensor
    B_scaled: torch.Tensor

    @property
    def rank(self) -> int:
        return self.A.shape[0]


@dataclass(frozen=True)
class AdapterFactors:
    """An adapter read for the bank: its config and the factors of every module it targets."""

    path: Path
    config: LoraConfig
    modules: dict[str, ModuleFactors]

    @property
    def max_rank(self) -> int:
        return max(f.rank for f in self.modules.values())


def structure_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s modules with every parameter and buffer on the meta device: names,
    types and shapes for io's checks, no memory for weights. Tied weights stay tied."""
    memo: dict[int, torch.Tensor] = {}
    for t in [*model.parameters(), *model.buffers()]:
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=False) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def read_adapter_factors(skeleton: nn.Module, path: str | os.PathLike) -> AdapterFactors:
    """Read adapter ``path`` for the base model that ``skeleton`` (a `structure_copy`) describes.

    Raises `io.AdapterFileError` for a file or config that does not load (corrupt safetensors, a
    variant lorakit does not implement, keys or shapes of another model) and `AdapterRefused` for an
    adapter that loads in lorakit but cannot be mixed per row: a DoRA one, one that writes base
    weights (``bias="all"`` or ``"lora_only"`` with biases in the file, ``modules_to_save``), adapts
    embeddings or other non-linear layers, uses ``fused_projections`` slices, or holds non-finite
    values."""
    checked = io.check_adapter(skeleton, path)
    config, config_file, weights_file = checked.config, checked.config_file, checked.weights_file
    if config.modules_to_save:
        raise AdapterRefused(f"{config_file}: modules_to_save={list(config.modules_to_save)} trains full copies of "
                             f"base modules, which every row of a batch would share; the serving bank mixes "
                             f"adapters per row, so it takes LoRA factors only (merge this adapter and serve "
                             f"the merged model instead)")
    if config.fused_projections:
        raise AdapterRefused(f"{config_file}: fused_projections slices are not supported by the serving bank yet")
    if init_from_weight(config.init):
        raise AdapterRefused(f"{config_file}: init_lora_weights={config.init!r}: this PiSSA/OLoRA adapter applies to "
                             f"the residual base its init leaves (W − s·B0·A0), not to the base model the bank "
                             f"serves; save it with lorakit.save_adapter(..., convert_to_lora=True) (lorakit train "
                             f"does) and serve that")
    if config.use_dora:
        raise AdapterRefused(f"{config_file}: use_dora=true: a DoRA adapter rescales each layer's base output "
                             f"(W' = m·(W0 + s·B·A)/‖W0 + s·B·A‖), so it is not a low-rank term the bank can "
                             f"add per row; merge it into the base (`lorakit merge`, or lorakit.unload(model, "
                             f"merge=True)) and serve the merged model instead")
    probes, plan = checked.layers, checked.plan
    other = {n: type(p).__name__ for n, p in probes.items() if type(p) is not LoraLinear}
    if other:
        name, kind = next(iter(other.items()))
        raise AdapterRefused(f"{config_file}: adapts {name} as {kind}; the serving bank adapts linear layers only "
                             f"({len(other)} such module(s))")
    written = [key for key, (kind, *_rest) in plan.items() if kind != "lora"]
    if written:
        raise AdapterRefused(f"{weights_file}: holds base-model tensors ({written[:3]}; bias={config.bias!r}), "
                             f"which every row of a batch would share; the serving bank takes LoRA factors only")
    modules = {}
    for module_name in probes:
        A = plan[("A", module_name)][3].float()
        B = plan[("B", module_name)][3].float()
        scaling = config.scaling(config.rank_for(module_name), config.alpha_for(module_name))
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise AdapterRefused(f"{weights_file}: the factors of {module_name} hold non-finite values; the file is "
                                 f"corrupted or the training diverged")
        modules[module_name] = ModuleFactors(A.contiguous(), (B * scaling).contiguous())
    return AdapterFactors(Path(path), config, modules)
