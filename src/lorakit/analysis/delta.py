"""ΔW = s·B·A of every layer of an adapter directory, read without a model; matching two adapters'
layers; the base weights W that a model holds for them.

Every ΔW here is in the "math" layout (d_out, d_in) of eq. 3, h = W0·x + ΔW·x: nn.Linear's own
layout. Where a module stores its weight otherwise, the base weight is brought to this layout
(transformers' Conv1D and nn.Embedding are transposed; a convolution's kernel is flattened to
(c_out, c_in·k…), which is how its ΔW is flattened too), so W and ΔW always line up. Each
base-layer kind says how (`layers.kinds`: `dense_weight`); key names come from the kinds too.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..config import LoraConfig, name_matches
from ..io import PREFIX, read_adapter
from ..layers import LoraEmbedding, LoraLayer, TrainableCopy, dense_weight, factor_key, refusal

__all__ = ["AnalysisError", "LayerDelta", "AdapterDeltas", "read_adapter_deltas", "common_layers",
           "layer_order", "base_weights"]

class AnalysisError(ValueError):
    """Adapters (or an adapter and a model) that cannot be analysed together; says which layer."""


@dataclass(frozen=True)
class LayerDelta:
    """One adapted layer: ΔW = scaling · B · A, with A (r, d_in) and B (d_out, r) in float64."""

    name: str            # module name in the model, e.g. model.layers.0.self_attn.q_proj
    kind: str            # "linear", "embedding" or "conv"
    A: torch.Tensor      # (r, d_in); a convolution's (r, c_in, *k) flattened to (r, c_in·k…)
    B: torch.Tensor      # (d_out, r)
    scaling: float       # α/r, or α/√r with use_rslora, with rank_pattern/alpha_pattern applied
    rank: int            # the r of the scaling (a fused projection stores n·r rows of A)
    alpha: float
    stored_dtype: torch.dtype = torch.float32

    @property
    def shape(self) -> tuple[int, int]:
        """(d_out, d_in) of ΔW."""
        return self.B.shape[0], self.A.shape[1]

    def dense(self) -> torch.Tensor:
        """ΔW (d_out, d_in), float64."""
        return (self.B @ self.A) * self.scaling

    def svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U (d_out, k), S (k,), Vh (k, d_in)) of ΔW, k ≤ r, without forming the dense ΔW.

        B = Q_b·R_b and Aᵀ = Q_a·R_a, so ΔW = Q_b·(s·R_b·R_aᵀ)·Q_aᵀ: only the small core needs an
        SVD, which costs O(r²·(d_out + d_in)) instead of O(d_out·d_in·min(d_out, d_in)).
        """
        Q_b, R_b = torch.linalg.qr(self.B)      # (d_out, k_b), (k_b, r)
        Q_a, R_a = torch.linalg.qr(self.A.t())  # (d_in, k_a), (k_a, r)
        U, S, Vh = torch.linalg.svd(self.scaling * R_b @ R_a.t(), full_matrices=False)  # (k_b, k_a) core
        return Q_b @ U, S, Vh @ Q_a.t()


@dataclass(frozen=True)
class AdapterDeltas:
    """An adapter directory read for analysis."""

    path: str
    config: LoraConfig
    layers: dict[str, LayerDelta]                  # module name -> ΔW factors, in file order
    ignored: list[str] = field(default_factory=list)  # keys that are not LoRA factors (biases, copies)


def read_adapter_deltas(path: str | os.PathLike) -> AdapterDeltas:
    """Read an adapter directory (PEFT layout, via ``io.read_adapter``) into per-layer ΔW factors.

    The scaling of each layer is the one the adapter is applied with: ``config.scaling`` of
    ``rank_for`` / ``alpha_for`` of that module, so rank_pattern, alpha_pattern and use_rslora all
    count. Raises AdapterFileError for an unreadable directory and AnalysisError for factors that
    do not fit each other or the config.
    """
    config, tensors = read_adapter(path)
    factors: dict[str, dict[str, torch.Tensor]] = {}
    embeddings: set[str] = set()
    ignored = []
    for key, value in tensors.items():
        factor = factor_key(key.removeprefix(PREFIX)) if key.startswith(PREFIX) else None
        if factor is None:
            ignored.append(key)
            continue
        factors.setdefault(factor.module, {})[factor.factor] = value
        if any(issubclass(owner, LoraEmbedding) for owner in factor.owners):
            embeddings.add(factor.module)
    layers = {name: _layer_delta(name, f, name in embeddings, config, path) for name, f in factors.items()}
    return AdapterDeltas(path=str(path), config=config, layers=layers, ignored=ignored)


def _layer_delta(name: str, f: dict[str, torch.Tensor], embedding: bool, config: LoraConfig, path) -> LayerDelta:
    where = f"{Path(path) / 'adapter_model.safetensors'}: {name}"
    if "A" not in f or "B" not in f:
        have, lack = ("A", "B") if "A" in f else ("B", "A")
        raise AnalysisError(f"{where} has lora_{have} but no lora_{lack}; the file is incomplete: "
                            f"save the adapter again")
    A, B = f["A"], f["B"]
    kind = "embedding" if embedding else "conv" if A.ndim > 2 else "linear"
    # A conv adapter is conv_A (r, c_in, *k) then a 1×…×1 conv_B (c_out, r, 1, …): flatten both.
    fits = A.ndim >= 2 and B.ndim == A.ndim and B.shape[2:].numel() == 1 and B.shape[1] == A.shape[0]
    if not fits:
        raise AnalysisError(f"{where}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} do not "
                            f"multiply (B must be (d_out, r) for A (r, d_in)); the file is damaged")
    A2, B2 = A.reshape(A.shape[0], -1), B.reshape(B.shape[0], -1)
    rank, alpha = config.rank_for(name), config.alpha_for(name)
    fused = name_matches(name, list(config.fused_projections))
    if A2.shape[0] != rank and not (fused and A2.shape[0] % rank == 0):
        raise AnalysisError(f"{where}: lora_A has {A2.shape[0]} rows but the config gives this layer rank "
                            f"{rank} (r / rank_pattern), so its scaling α/r would be wrong; the config "
                            f"and the weights come from different saves")
    return LayerDelta(name=name, kind=kind, A=A2.to(torch.float64), B=B2.to(torch.float64),
                      scaling=config.scaling(rank, alpha), rank=rank, alpha=alpha, stored_dtype=A.dtype)


def common_layers(adapters: Sequence[AdapterDeltas]) -> tuple[list[str], dict[str, str]]:
    """The layers every adapter adapts, in layer order (numbers compare as numbers, so
    ``layers.2`` comes before ``layers.10``), and why each other was skipped.

    Raises AnalysisError when a common layer's ΔW has different shapes in two adapters: they were
    made for different base models, and comparing them would be meaningless.
    """
    first = adapters[0]
    common = sorted((n for n in first.layers if all(n in a.layers for a in adapters[1:])), key=layer_order)
    skipped: dict[str, str] = {}
    for a in adapters:
        for n in a.layers:
            if n not in common and n not in skipped:
                having = [b.path for b in adapters if n in b.layers]
                lacking = [b.path for b in adapters if n not in b.layers]
                skipped[n] = f"adapted only in {', '.join(having)}; not in {', '.join(lacking)}"
    for n in common:
        for a in adapters[1:]:
            x, y = first.layers[n], a.layers[n]
            if x.shape != y.shape or x.kind != y.kind:
                raise AnalysisError(
                    f"layer {n}: ΔW is {x.kind} {x.shape} (d_out, d_in) in {first.path} but {y.kind} "
                    f"{y.shape} in {a.path}; the adapters were made for different base models and "
                    f"cannot be compared")
    if len(adapters) > 1 and not common:
        raise AnalysisError(f"the adapters have no layer in common ({first.path} adapts "
                            f"{_some(first.layers)}; {adapters[1].path} adapts {_some(adapters[1].layers)})")
    return common, skipped


def layer_order(name: str) -> tuple:
    """Sort key of a module name that compares its numbers as numbers: ``model.layers.2.q_proj`` <
    ``model.layers.10.q_proj`` (a safetensors file lists its keys as text: 0, 1, 10, 11, ..., 2)."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name))


def base_weights(model: nn.Module, layers: Sequence[LayerDelta]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The base weight W of each layer in ΔW's (d_out, d_in) layout (float64), found in ``model``
    by module name; and, for each layer the model cannot give, why.

    A module that already carries LoRA layers gives its base layer's weight (merged adapters
    included: pass a model without adapters for the paper's W). Raises AnalysisError when a weight
    exists but its shape differs from ΔW's (the adapter is for another model).
    """
    modules = dict(model.named_modules())
    weights: dict[str, torch.Tensor] = {}
    skipped: dict[str, str] = {}
    for delta in layers:
        module = modules.get(delta.name)
        if module is None:
            skipped[delta.name] = (f"no module named {delta.name} in the {type(model).__name__}; the adapter "
                                   f"was made for another model or module naming")
            continue
        if isinstance(module, LoraLayer):
            module = module.base_layer
        elif isinstance(module, TrainableCopy):
            module = module.original_module
        why = refusal(module)
        if why is not None:
            skipped[delta.name] = f"lorakit cannot read the weight of {delta.name}, a {why}"
            continue
        weight = module.weight
        W = dense_weight(module).detach().to(device="cpu", dtype=torch.float64)
        if tuple(W.shape) != delta.shape:
            raise AnalysisError(f"layer {delta.name}: the model's weight is {tuple(W.shape)} (d_out, d_in; stored "
                                f"{tuple(weight.shape)} by {type(module).__name__}) but the adapter's ΔW is "
                                f"{delta.shape}; the adapter was made for another base model")
        weights[delta.name] = W
    return weights, skipped


def _some(names, n: int = 3) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "") if names else "nothing"

