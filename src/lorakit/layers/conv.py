"""LoRA on ``nn.Conv1d/2d/3d``: A is a convolution like the base (kernel, stride, padding,
dilation) from c_in to r channels, B a 1×…×1 convolution from r to c_out channels."""

from __future__ import annotations

import torch
from torch import nn

from ..ops import conv_delta_weight
from .base import LoraLayer

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class LoraConv(LoraLayer):
    def __init__(self, base_layer: nn.Module, module_name: str = "") -> None:
        if base_layer.groups != 1:
            raise TypeError(f"{module_name}: LoRA on a grouped convolution (groups={base_layer.groups}) "
                            f"is not supported; target a convolution with groups=1")
        super().__init__(base_layer, module_name)

    def adapter_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        base = self.base_layer
        ones = (1,) * len(base.kernel_size)
        return (r, base.in_channels, *base.kernel_size), (base.out_channels, r, *ones)

    def adapter_output(self, x: torch.Tensor, name: str) -> torch.Tensor:
        # The base layer's own _conv_forward applies its stride, padding (and padding mode) and dilation.
        hidden = self.base_layer._conv_forward(self._input_for(x, name), self.lora_A[name], None)
        return _pointwise(hidden, self.lora_B[name]) * self.scaling[name]

    def as_dense(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.flatten(1)  # (c_out, c_in, *k) -> (c_out, c_in·k…)

    def from_dense(self, dense: torch.Tensor) -> torch.Tensor:
        return dense.reshape(self.base_layer.weight.shape)

    def delta_weight(self, name: str) -> torch.Tensor:
        return conv_delta_weight(self.lora_A[name], self.lora_B[name], self.scaling[name])


def _pointwise(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # (N, r, *spatial) -> (N, c_out, *spatial), a 1×…×1 convolution as one matmul over channels.
    return torch.einsum("nr...,or->no...", x, weight.flatten(1))
