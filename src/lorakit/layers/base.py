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
from ..config import ConfigError, init_from_weight
from ..routing import LayerRoute
from .weight_init import InitialFactors, as_plain_lora, check_rank, factors_from_weight


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
        # DoRA's m (Liu et al. 2024, §4.1), for the adapters whose variant has one; PEFT's name
        self.lora_magnitude_vector = nn.ParameterDict()
        # What a merged adapter's variant needs to take it out again that the merged weight no longer
        # holds (DoRA: the row norms ‖W0 + sBA‖ at merge time); set by merge, dropped by unmerge.
        self.merge_state: dict[str, torch.Tensor] = {}
        # PiSSA/OLoRA adapters (init_from_weight): their A0, B0, which the base weight no longer holds
        self.lora_initial = nn.ModuleDict()
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

    def weight_init_refusal(self) -> str | None:
        """Why this kind cannot take A and B from its base weight (PiSSA, OLoRA), or None if it can."""
        return (f"lorakit (like PEFT) does that for nn.Linear and Conv1D layers only, and this is a "
                f"{type(self.base_layer).__name__}: leave it out of target_modules or use init='kaiming'")

    def check_init(self, r: int, init: str) -> None:
        """Raise a ConfigError when ``init`` cannot start a rank-r adapter on this layer; changes nothing.
        `inject` asks every target before it touches one, as PiSSA/OLoRA rewrite base weights."""
        if not init_from_weight(init):
            return
        why = self.weight_init_refusal()
        if why is not None:
            raise ConfigError(f"{self.module_name}: init={init!r} takes A and B from the base weight; {why}")
        check_rank(init, tuple(self.as_dense(self.base_weight).shape), r, self.module_name)

    def init_adapter(self, name: str, init: str) -> None:
        """§4.1: B = 0, so ΔW = 0 and the adapted model equals the base model at step 0. PiSSA and
        OLoRA instead take A and B from W and leave W − s·B·A in the base: ΔW = 0 all the same."""
        if init_from_weight(init):
            return self._init_from_weight(name, init)
        A, B = self.lora_A[name], self.lora_B[name]
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(A, std=1.0 / self.rank[name])
            else:  # the reference implementation's choice, also PEFT's default
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            nn.init.zeros_(B)

    @torch.no_grad()
    def _init_from_weight(self, name: str, init: str) -> None:
        weight = self.base_weight
        dense = self.as_dense(weight)  # (d_out, d_in)
        A, B = self.lora_A[name], self.lora_B[name]
        A0, B0 = factors_from_weight(init, dense, self.rank[name], self.scaling[name], self.module_name)
        A.copy_(A0)
        B.copy_(B0)
        # The residual from the factors as stored (an adapter dtype below float32 rounds them), so
        # W_res + s·B·A is W at step 0 up to the rounding of the base dtype.
        residual = dense.to(A0.dtype) - self.scaling[name] * (B.to(A0.dtype) @ A.to(A0.dtype))
        weight.copy_(self.from_dense(residual).to(weight.dtype))
        self.lora_initial[name] = InitialFactors(A.detach().clone(), B.detach().clone())

    @torch.no_grad()
    def restore_base(self, name: str) -> None:
        """W ← W + s·B0·A0 for an adapter whose init (PiSSA, OLoRA) took that part of W, and forget
        its initial factors; nothing for other adapters. Deleting or unloading the adapter calls it,
        so the base weight is W again, up to the rounding of the base dtype."""
        if name not in self.lora_initial:
            return
        initial = self.lora_initial.pop(name)
        weight = self.base_weight
        acc = self.as_dense(weight).to(torch.promote_types(weight.dtype, torch.float32))
        acc = acc + self.scaling[name] * (initial.B.to(acc.dtype) @ initial.A.to(acc.dtype))
        weight.copy_(self.from_dense(acc).to(weight.dtype))

    def plain_lora_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A PiSSA/OLoRA adapter as a plain LoRA of rank 2r on the untouched base weight, same scaling:
        (A', B') = ([A; A0], [B | −B0]), so s·B'·A' = s·(B·A − B0·A0) (`weight_init.as_plain_lora`)."""
        if name not in self.lora_initial:
            raise ValueError(f"{self.module_name}: adapter {name!r} did not take its A and B from the base weight "
                             f"(init 'pissa' or 'olora'), so it is a plain LoRA already")
        if not self.variants[name].additive:  # DoRA: W_res's norm enters the output, BA − B0A0 is not all
            raise ValueError(f"{self.module_name}: adapter {name!r} is a {self.variants[name].name} adapter, whose "
                             f"output is not W·x + s·B·A·x, so it cannot be written as a plain LoRA")
        initial = self.lora_initial[name]
        return as_plain_lora(self.lora_A[name], self.lora_B[name], initial.A, initial.B)

    # --- adapters ------------------------------------------------------------------------------

    @property
    def base_weight(self) -> torch.Tensor:
        return self.base_layer.weight

    # Model code reads an adapted module's weight and bias as it would the plain layer's: T5's
    # feed-forward casts to `self.wo.weight.dtype`, `get_input_embeddings().weight` feeds tying and
    # resizing. They are the base layer's (read-only here; the adapter's own tensors are lora_A/B).
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def as_dense(self, weight: torch.Tensor) -> torch.Tensor:
        """A weight in the base layer's layout as the (d_out, d_in) matrix of eq. 3 (a view)."""
        return weight

    def from_dense(self, dense: torch.Tensor) -> torch.Tensor:
        """The inverse of ``as_dense``: a (d_out, d_in) matrix in the base layer's layout."""
        return dense

    @torch.no_grad()
    def unmerged_base_weight(self) -> torch.Tensor:
        """W0 in the base layer's layout, as if no adapter were merged: the base weight itself when
        none is, else a float32 copy with the merged adapters taken out, the last merged first.
        A variant whose output depends on W0 (DoRA's norm) reads it here, so its outputs and its merge
        agree however many adapters are merged."""
        weight = self.base_weight
        if not self.merged_adapters:
            return weight
        acc = weight.to(torch.promote_types(weight.dtype, torch.float32), copy=True)
        for name in reversed(self.merged_adapters):
            acc = self.variants[name].unmerged_weight(self, name, acc)
        return acc

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
        self.check_init(r, init)
        shape_a, shape_b = self.adapter_shapes(r)
        device = self.base_weight.device
        self.lora_A[name] = nn.Parameter(torch.empty(shape_a, dtype=dtype, device=device))
        self.lora_B[name] = nn.Parameter(torch.empty(shape_b, dtype=dtype, device=device))
        self.lora_dropout[name] = (nn.Dropout(dropout) if dropout > 0 else nn.Identity()).train(self.training)
        self.rank[name] = r
        self.alpha[name] = alpha
        self.scaling[name] = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.variants[name] = kind
        try:
            kind.init(self, name, init)
        except Exception:  # e.g. PiSSA with r above the weight's smaller side: no half-made adapter stays
            self.delete_adapter(name)
            raise

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            self.unmerge([name])
        self.restore_base(name)
        for table in (self.lora_A, self.lora_B, self.lora_dropout):
            del table[name]
        if name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]
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
        dtype = self.lora_A[name].dtype
        if dtype == torch.float32 and torch.is_autocast_enabled(x.device.type):
            # the adapter's matmuls compute in autocast's dtype: a float32 copy of x would only be cast back
            # (and that second copy kept for backward, beside the x the base layer keeps)
            dtype = torch.get_autocast_dtype(x.device.type)
        return self.lora_dropout[name](x.to(dtype))

    # --- merge / unmerge -----------------------------------------------------------------------

    def merge(self, names: Iterable[str] | None = None, *, safe: bool = True) -> None:
        """W ← W + ΔW for each named (default: active) adapter not merged yet; idempotent.

        Adapters that are not additive (DoRA rescales W) do not commute: they go into W in the order
        the forward applies them (``active_adapters``; others after them), so that merged outputs
        equal unmerged ones; merged adapters that come later in that order come out first."""
        new = [n for n in dict.fromkeys(self.active_adapters if names is None else names)
               if n not in self.merged_adapters]
        if not new:
            return
        wanted = self.merged_adapters + new
        if not all(self.variants[n].additive for n in wanted):
            order = {n: i for i, n in enumerate(self.active_adapters)}
            wanted = sorted(wanted, key=lambda n: order.get(n, len(order)))  # stable: the rest keep their order
            keep = 0
            while keep < len(self.merged_adapters) and self.merged_adapters[keep] == wanted[keep]:
                keep += 1
            if keep < len(self.merged_adapters):
                self.unmerge(self.merged_adapters[keep:])
            new = wanted[keep:]
        for name in new:
            self._add_to_weight(name, sign=+1, safe=safe)
            self.merged_adapters.append(name)

    def unmerge(self, names: Iterable[str] | None = None) -> None:
        """W ← W − ΔW for each named (default: every merged) adapter; idempotent.

        Merges are undone last in, first out, where the order matters: a variant that is not
        additive (DoRA rescales the whole weight) only inverts on the weight its merge produced, so
        the adapters merged after it come out first and go back in afterwards."""
        targets = [n for n in (self.merged_adapters if names is None else names) if n in self.merged_adapters]
        if not targets:
            return
        first = min(self.merged_adapters.index(n) for n in targets)
        later = self.merged_adapters[first:]
        if all(self.variants[n].additive for n in later):  # sums commute: take out just those named
            later = [n for n in later if n in targets]
        for name in reversed(later):
            self._add_to_weight(name, sign=-1, safe=False)
            self.merged_adapters.remove(name)
        self.merge([n for n in later if n not in targets], safe=False)

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
        state = self.variants[name].merge_state(self, name) if sign > 0 else None  # before W changes
        new = self.merged_weight(name, sign)
        if safe and not torch.isfinite(new).all():
            raise MergeError(f"{self.module_name}: merging adapter {name!r} would write non-finite "
                             f"values into the base weight; the weight was left unchanged")
        self.base_weight.copy_(new.to(self.base_weight.dtype))
        if state is not None:
            self.merge_state[name] = state
        elif sign < 0:
            self.merge_state.pop(name, None)

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}(r={self.rank[n]}, s={self.scaling[n]:g})" for n in self.adapter_names)
        return f"adapters=[{adapters}], active={self.active_adapters}, merged={self.merged_adapters}"
