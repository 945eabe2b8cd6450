"""LoraLayer: a frozen base layer plus any number of named adapters (A, B, scaling, dropout).

Subclasses (one per base-layer kind) say how an adapter's A and B are shaped and initialised, how
its output is computed and how ΔW looks in the base weight's layout; each adapter's variant
(`variants/`: plain LoRA, ...) says what the adapter does with them. This class owns the
bookkeeping that is the same for every kind: which adapters exist, which are active, which are
merged into the base weight, and which rows a routed forward sends to which adapter.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from .. import variants
from ..routing import LayerRoute


class MergeError(RuntimeError):
    """Merging would write non-finite values into a base weight."""


class LoraLayer(nn.Module):
    """Wraps ``base_layer``; its forward is ``base(x) + Σ_active s·B·A·dropout(x)``.

    Under a routing context (`lorakit.route`), ``route`` says which adapter each row of the input
    uses instead (-1: none); it is set and cleared by the context, never by a forward.
    """

    peft_factor_keys = ("lora_A.weight", "lora_B.weight")  # A's and B's key suffixes in PEFT's files

    def __init__(self, base_layer: nn.Module, module_name: str = "") -> None:
        super().__init__()
        self.base_layer = base_layer
        self.module_name = module_name  # for error messages only
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.rank: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.variants: dict[str, variants.Variant] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.route: LayerRoute | None = None

    # --- what each layer kind defines ---------------------------------------------------------

    def adapter_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of (A, B) for rank r."""
        raise NotImplementedError

    def adapter_output(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """s·B·A·dropout(x) for one adapter, in the adapter's dtype."""
        raise NotImplementedError

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW of one adapter in the base weight's layout, in the adapter's dtype."""
        raise NotImplementedError

    def init_adapter(self, name: str, init: str) -> None:
        """§4.1: B = 0, so ΔW = 0 and the adapted model equals the base model at step 0."""
        A, B = self.lora_A[name], self.lora_B[name]
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(A, std=1.0 / self.rank[name])
            else:  # the reference implementation's choice, also PEFT's default
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            nn.init.zeros_(B)

    # --- adapters ------------------------------------------------------------------------------

    @property
    def base_weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0, *,
                    use_rslora: bool = False, init: str = "kaiming",
                    dtype: torch.dtype = torch.float32, variant: str | variants.Variant = "lora") -> None:
        if name in self.lora_A:
            raise ValueError(f"{self.module_name}: adapter {name!r} already exists; delete it first "
                             f"or pick another name")
        kind = variants.get(variant)
        shape_a, shape_b = self.adapter_shapes(r)
        device = self.base_weight.device
        self.lora_A[name] = nn.Parameter(torch.empty(shape_a, dtype=dtype, device=device))
        self.lora_B[name] = nn.Parameter(torch.empty(shape_b, dtype=dtype, device=device))
        self.lora_dropout[name] = (nn.Dropout(dropout) if dropout > 0 else nn.Identity()).train(self.training)
        self.rank[name] = r
        self.alpha[name] = alpha
        self.scaling[name] = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.variants[name] = kind
        kind.init(self, name, init)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            self.unmerge([name])
        for table in (self.lora_A, self.lora_B, self.lora_dropout):
            del table[name]
        for table in (self.rank, self.alpha, self.scaling, self.variants):
            del table[name]
        if name in self.active_adapters:
            self.active_adapters.remove(name)

    def set_active(self, names: Iterable[str]) -> None:
        self.active_adapters = [n for n in names if n in self.lora_A]

    # --- forward -------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The reference forward: each adapter through its variant, one after another."""
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        route = self.route
        if route is None:
            for name in self.active_adapters:
                if name not in self.merged_adapters:  # a merged adapter is already inside W
                    result = self.variants[name].output(self, x, result, name)
            return result
        index = route.aligned_to(result)  # (N, 1, ...) or (N, L, 1, ...)
        base = result
        for k, name in enumerate(route.names):
            routed = self.variants[name].output(self, x, base, name)
            result = torch.where(index == k, routed, result)
        return result

    def _input_for(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return self.lora_dropout[name](x.to(self.lora_A[name].dtype))

    # --- merge / unmerge -----------------------------------------------------------------------

    def merge(self, names: Iterable[str] | None = None, *, safe: bool = True) -> None:
        """W ← W + ΔW for each named (default: active) adapter not merged yet; idempotent."""
        for name in list(self.active_adapters if names is None else names):
            if name in self.merged_adapters:
                continue
            self._add_to_weight(name, sign=+1, safe=safe)
            self.merged_adapters.append(name)

    def unmerge(self, names: Iterable[str] | None = None) -> None:
        """W ← W − ΔW for each named (default: every merged) adapter; idempotent."""
        for name in list(self.merged_adapters if names is None else names):
            if name not in self.merged_adapters:
                continue
            self._add_to_weight(name, sign=-1, safe=False)
            self.merged_adapters.remove(name)

    @torch.no_grad()
    def merged_weight(self, name: str, sign: int = +1) -> torch.Tensor:
        """The base weight with adapter ``name`` merged in (sign +1) or taken out (-1), computed in at
        least float32 so a bf16/fp16 base rounds once, not per operation."""
        weight = self.base_weight
        acc = weight.to(torch.promote_types(weight.dtype, torch.float32))
        variant = self.variants[name]
        return variant.merged_weight(self, name, acc) if sign > 0 else variant.unmerged_weight(self, name, acc)

    @torch.no_grad()
    def _add_to_weight(self, name: str, sign: int, safe: bool) -> None:
        new = self.merged_weight(name, sign)
        if safe and not torch.isfinite(new).all():
            raise MergeError(f"{self.module_name}: merging adapter {name!r} would write non-finite "
                             f"values into the base weight; the weight was left unchanged")
        self.base_weight.copy_(new.to(self.base_weight.dtype))

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}(r={self.rank[n]}, s={self.scaling[n]:g})" for n in self.adapter_names)
        return f"adapters=[{adapters}], active={self.active_adapters}, merged={self.merged_adapters}"
