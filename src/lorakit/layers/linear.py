"""LoRA on a dense layer: ``nn.Linear`` or transformers' ``Conv1D`` (GPT-2, weight stored transposed)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import delta_weight, lora_delta
from ..ops.lora_linear import draw_seed, lora_linear_call
from ..ops.swiglu_linear import lora_swiglu_linear_call
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
    """h = W0·x + s·B·A·dropout(x), A: (r, d_in), B: (d_out, r).

    The forward is one call of the LoRA linear op (`ops/lora_linear.py`: the custom op
    ``torch.ops.lorakit.lora_linear`` while compiling, its autograd.Function twin in eager) on
    every device, for every additive adapter that applies: the active ones, or the
    routed ones under `lorakit.route`. The reference forward (`LoraLayer.forward`, adapter by
    adapter) serves what the op does not take: a variant that is not additive, a subclass with its
    own ``adapter_output``, a dropout module other than ``nn.Dropout``, several adapters with
    dropout in training (each draws its own mask there), and functorch transforms (``torch.func.grad``
    cannot differentiate a custom op; `tests/test_layers.py` fails when that changes or breaks).
    """

    def __init__(self, base_layer: nn.Module, module_name: str = "") -> None:
        super().__init__(base_layer, module_name)
        self.fan_in_fan_out = is_conv1d_transposed(base_layer)
        self.in_features, self.out_features = dense_features(base_layer)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        call = None if args or kwargs else self._op_call(x)
        if call is None:  # the reference forward (base alone when disabled or no adapter applies)
            return super().forward(x, *args, **kwargs)
        x, operands = call
        out, _ = lora_linear_call(x, *operands)
        return out

    def forward_swiglu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """``self(silu(gate) * up)``, with the product made again in backward instead of kept, when
        the op serves this call (`layers/swiglu.py` routes a Llama-style MLP's down projection here)."""
        call = self._op_call(gate)
        if call is None:
            return self(F.silu(gate) * up)
        gate, operands = call
        out, _ = lora_swiglu_linear_call(gate, up.to(gate.dtype), *operands)
        return out

    def _unmerged_active(self) -> list[str]:
        return [n for n in self.active_adapters if n not in self.merged_adapters]

    def _op_call(self, x: torch.Tensor):
        """(x in the compute dtype, the op's other operands) when one op call computes this forward,
        else None (the reference forward, or the base layer alone, computes it)."""
        route = self.route
        names = route.names if route is not None else self._unmerged_active()
        if self.disabled or not names:
            return None
        p = self._op_dropout(names)
        if p is None or torch._C._are_functorch_transforms_active():
            return None
        if torch.is_autocast_enabled(x.device.type):  # compute in autocast's dtype, as F.linear would
            x = x.to(torch.get_autocast_dtype(x.device.type))
        weight, bias = self.base_layer.weight, self.base_layer.bias
        return x, (weight.t() if self.fan_in_fan_out else weight, bias,
                   [self.lora_A[n] for n in names], [self.lora_B[n] for n in names], [self.scaling[n] for n in names],
                   route.rows_of(x) if route is not None else None, p, draw_seed(p))

    def _op_dropout(self, names) -> float | None:
        """The dropout p of one op call for ``names``, or None when the op cannot serve them."""
        if type(self).adapter_output is not LoraLinear.adapter_output or type(self)._input_for is not LoraLayer._input_for:
            return None  # a subclass that computes its adapters its own way
        p = 0.0
        for name in names:
            dropout = self.lora_dropout[name]
            if not self.variants[name].additive:
                return None
            if type(dropout) is nn.Dropout:
                if self.training and dropout.p > 0:
                    if len(names) > 1:
                        return None  # one mask per adapter, as the reference draws them
                    p = dropout.p
            elif type(dropout) is not nn.Identity:
                return None
        return p

    def adapter_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (r, self.in_features), (self.out_features, r)

    def weight_init_refusal(self) -> str | None:
        return None  # PiSSA/OLoRA (layers/weight_init.py) on W as (d_out, d_in): a Conv1D's is transposed first

    def as_dense(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.t() if self.fan_in_fan_out else weight  # Conv1D stores (d_in, d_out)

    def from_dense(self, dense: torch.Tensor) -> torch.Tensor:
        return dense.t() if self.fan_in_fan_out else dense

    def adapter_output(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return lora_delta(self._input_for(x, name), self.lora_A[name], self.lora_B[name], self.scaling[name])

    def delta_weight(self, name: str) -> torch.Tensor:
        dw = delta_weight(self.lora_A[name], self.lora_B[name], self.scaling[name])  # (d_out, d_in)
        return dw.t() if self.fan_in_fan_out else dw
