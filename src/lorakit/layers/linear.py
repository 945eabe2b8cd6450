"""LoRA on a dense layer: ``nn.Linear`` or transformers' ``Conv1D`` (GPT-2, weight stored transposed)."""

from __future__ import annotations

import torch
from torch import nn

from ..ops import delta_weight, lora_delta
from ..ops.fused import fused_lora_linear
from .base import LoraLayer


def is_conv1d_transposed(module: nn.Module) -> bool:
    """transformers' Conv1D: a linear layer whose weight is (d_in, d_out) — the fan_in_fan_out case."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def dense_features(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an nn.Linear or a Conv1D."""
    if is_conv1d_transposed(module):
        d_in, d_out = module.weight.shape
    else:
        d_out, d_in = module.weight.shape
    return d_in, d_out


class LoraLinear(LoraLayer):
    """h = W0·x + s·B·A·dropout(x), A: (r, d_in), B: (d_out, r)."""

    def __init__(self, base_layer: nn.Module, module_name: str = "") -> None:
        super().__init__(base_layer, module_name)
        self.fan_in_fan_out = is_conv1d_transposed(base_layer)
        self.in_features, self.out_features = dense_features(base_layer)
        # Opt-in until it is measured on a GPU: one autograd function for base + adapter
        # (ops/fused.py) that keeps no dropout copy or mask for backward.
        self.use_fused_op = False

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        pending = [n for n in self.active_adapters if n not in self.merged_adapters]
        fused = (self.use_fused_op and not self.disabled and not self.fan_in_fan_out and len(pending) == 1
                 and not args and not kwargs and not torch.is_autocast_enabled(x.device.type))
        if not fused:
            return super().forward(x, *args, **kwargs)
        name, base = pending[0], self.base_layer
        dropout = self.lora_dropout[name]
        p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
        return fused_lora_linear(x, base.weight, base.bias, self.lora_A[name], self.lora_B[name],
                                 self.scaling[name], p, self.training)

    def adapter_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (r, self.in_features), (self.out_features, r)

    def adapter_output(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return lora_delta(self._input_for(x, name), self.lora_A[name], self.lora_B[name], self.scaling[name])

    def delta_weight(self, name: str) -> torch.Tensor:
        dw = delta_weight(self.lora_A[name], self.lora_B[name], self.scaling[name])  # (d_out, d_in)
        return dw.t() if self.fan_in_fan_out else dw
