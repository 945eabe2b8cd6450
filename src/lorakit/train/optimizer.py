"""The optimizer a training run steps: AdamW (torch's, or bitsandbytes' 8-bit one) over the trainable
tensors in a fixed order, in groups: decayed matrices, LoRA+'s B factors with their own learning
rate, and 1-D tensors without decay. Checkpoints name the tensors in this order (`checkpoint.py`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lorakit.hints import Setting, SettingError
from lorakit.inject import lora_modules
from lorakit.layers import LoraLayer

from .config import TrainConfig


def optimizer_order(named: list[tuple[str, nn.Parameter]],
                    lora_b: frozenset[int] = frozenset()) -> tuple[list[str], list[nn.Parameter]]:
    """(names, params) as the optimizer holds them: matrices (decayed) first, then 1-D tensors
    (biases, norms: not decayed, as is usual for AdamW). With LoRA+, the matrices are the B's
    (ids in ``lora_b``) last, so each group is a contiguous run of the list."""
    matrices = [(n, p) for n, p in named if p.ndim >= 2]
    ordered = [(n, p) for n, p in matrices if id(p) not in lora_b] + [(n, p) for n, p in matrices if id(p) in lora_b] \
        + [(n, p) for n, p in named if p.ndim < 2]
    return [n for n, _ in ordered], [p for _, p in ordered]


def lora_b_ids(model: nn.Module, config: TrainConfig) -> frozenset[int]:
    """With LoRA+ (``config.loraplus_ratio``), the ids of the trainable B factors, found by type; else none."""
    if config.loraplus_ratio is None:
        return frozenset()
    found = frozenset(id(p) for _, m in lora_modules(model) if isinstance(m, LoraLayer)
                      for p in m.lora_B.values() if p.requires_grad)
    if not found:
        raise ValueError("loraplus_ratio gives the B factors of LoRA adapters their own learning rate, and this "
                         "model trains none; inject an adapter, or leave loraplus_ratio unset")
    return found


def make_optimizer(groups: list[dict[str, Any]], config: TrainConfig, fsdp: bool) -> torch.optim.Optimizer:
    """torch's AdamW, or bitsandbytes' 8-bit AdamW (``config.optimizer``), over ``groups``."""
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)
    if fsdp:
        raise SettingError(Setting("optimizer", config.optimizer), " keeps bitsandbytes' quantized state, which FSDP "
                           "does not shard; train under FSDP with ", Setting("optimizer", "adamw"))
    from lorakit.quantize import import_bitsandbytes

    bnb = import_bitsandbytes(Setting("optimizer", config.optimizer))  # bitsandbytes' 8-bit AdamW
    # bitsandbytes keeps 32-bit state for tensors under 4,096 elements (min_8bit_size), as in its own default
    return bnb.optim.AdamW8bit(groups, lr=config.lr, betas=config.betas, eps=config.eps)


def param_groups(params: list[nn.Parameter], config: TrainConfig, lora_b: frozenset[int]) -> list[dict[str, Any]]:
    """AdamW's groups, in the order of ``params``: decayed matrices, (LoRA+: the B's, decayed, with
    ``lr_ratio``, which the schedule multiplies lr by), then the 1-D tensors without decay."""
    matrices = [p for p in params if p.ndim >= 2 and id(p) not in lora_b]
    groups = [{"params": matrices, "weight_decay": config.weight_decay}]
    if lora_b:
        # §LoRA+ (Hayou et al. 2024): η_B = λ·η_A; weight decay as for any other matrix.
        groups.append({"params": [p for p in params if id(p) in lora_b], "weight_decay": config.weight_decay,
                       "lr": config.lr * config.loraplus_ratio, "lr_ratio": float(config.loraplus_ratio)})
    groups.append({"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0})
    return groups
