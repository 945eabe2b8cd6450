"""LoRA on a quantized base layer (QLoRA, Dettmers et al. 2023): bitsandbytes' ``Linear4bit``
(NF4 or FP4, with or without double quantization, any ``compute_dtype`` and ``quant_storage``)
and ``Linear8bitLt`` (LLM.int8()).

The packed weight stays frozen and is never written here: the forward is the quantized layer's
own output plus the adapter term, ``h = Q(W0)·x + s·B·A·dropout(x)``; ΔW, merging and analysis
read the dequantized weight (bitsandbytes' own dequantization), in float32. A and B are sized from
the layer's logical shape (``in_features``, ``out_features``), never from the packed storage
(a (d_out·d_in/2, 1) column of bytes for NF4).

Merging into the packed weight is refused (`merge`): quantizing ``W0 + ΔW`` again rounds it to
the 4-bit grid, which can move the outputs more than the adapter does. `to_dense` gives the
merged layer as a plain ``nn.Linear`` instead (what ``lorakit.unload(model, merge=True)`` puts in
its place); ``lorakit.quantize.merge_requantized`` merges back into 4/8 bits on request and
reports how far the outputs moved.

bitsandbytes is never imported by importing lorakit: the kinds name its types by their qualified
names, and the dequantizing functions import it when called, which only happens for a module
whose type comes from it (so it is imported already).
"""

from __future__ import annotations

import copy
import functools
import importlib.util
from functools import partial
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import nf4
from ..ops.quantized_linear import quantized_lora_linear_call, quantized_lora_swiglu_linear_call
from .base import LoraLayer, MergeError
from .kinds import LayerKind, qualified_name, register_kind
from .linear import LoraLinear

BNB_MODULE = "bitsandbytes.nn.modules"
LINEAR_4BIT_NAMES = tuple(f"{BNB_MODULE}.{n}" for n in ("Linear4bit", "LinearNF4", "LinearFP4"))
LINEAR_8BIT_NAMES = (f"{BNB_MODULE}.Linear8bitLt",)


def dequantize_4bit(layer: nn.Module) -> torch.Tensor:
    """The (d_out, d_in) weight of a bitsandbytes Linear4bit, dequantized by bitsandbytes (on a
    GPU, double-quantized NF4 by `ops.nf4`'s one-launch kernel, which gives bitsandbytes' values), in the dtype it
    was quantized from; a new tensor (the packed one is only read)."""
    import bitsandbytes.functional as bnbf  # a Linear4bit exists, so bitsandbytes is imported already

    weight = layer.weight
    state = getattr(weight, "quant_state", None)
    if state is None or not getattr(weight, "bnb_quantized", True):
        raise ValueError(f"this {type(layer).__name__} is not quantized yet (bitsandbytes quantizes a "
                         f"Params4bit when it is moved to a device): call .to(device) on the model first")
    data = weight.data
    if getattr(state, "packing_format_for_cpu", False):
        # Repacked for bitsandbytes' AVX512-BF16 CPU kernel (see `keep_packed_layout`), which also
        # rounded the block scales to bf16 and laid them out (d_in/block, d_out): unpack copies with
        # bitsandbytes' own inverse (it rewrites the state it is given), keeping those bf16 scales,
        # which is what the kernel computes with, rather than quantizing them again.
        state = copy.deepcopy(state)
        state.original_nested = False
        data, state = bnbf._convert_weight_packed_for_cpu_inverse(data.clone(), state)
        state.absmax = state.absmax.t().reshape(-1).float()
    elif data.is_cuda and state.nested and _have_triton() and nf4.supports(data, state):
        # one launch where bitsandbytes needs three, its values to the bit (tests/test_nf4.py); 1.2-1.4x
        # faster on an H200 with double quantization, slower without it (benchmarks/results/nf4_dequant_cuda.json)
        return nf4.dequantize_nf4(data, state)
    return bnbf.dequantize_4bit(data, state)


@functools.cache
def _have_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def dequantize_8bit(layer: nn.Module) -> torch.Tensor:
    """The (d_out, d_in) weight of a bitsandbytes Linear8bitLt in float32: int8 rows times their
    scales (SCB) / 127, as bitsandbytes dequantizes them. A layer that keeps fp16 weights
    (``has_fp16_weights=True``) holds a plain weight: it is returned as it is, in float32."""
    import bitsandbytes.functional as bnbf

    weight = layer.weight
    if weight.dtype != torch.int8:
        return weight.detach().float()
    scales = weight.SCB if getattr(weight, "SCB", None) is not None else layer.state.SCB  # the first
    # forward moves SCB from the weight to the layer's state
    if scales is None:
        raise ValueError(f"this {type(layer).__name__} has int8 weights but no row scales (SCB); it was "
                         f"not quantized by bitsandbytes")
    return bnbf.int8_vectorwise_dequant(weight.data, scales).float()


def packed_tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor a quantized layer's weight is made of (the packed weight and its quantization
    state), by name: what must stay bit for bit the same while an adapter trains on it."""
    weight = layer.weight
    tensors = {"weight": weight.data}
    state = getattr(weight, "quant_state", None)
    if state is not None:  # Linear4bit: absmax, code and, with double quantization, their own state
        tensors.update({"absmax": state.absmax, "code": state.code})
        if getattr(state, "nested", False):
            tensors.update({"offset": state.offset, "nested.absmax": state.state2.absmax,
                            "nested.code": state.state2.code})
    scales = getattr(weight, "SCB", None)
    if scales is None:
        scales = getattr(getattr(layer, "state", None), "SCB", None)
    if scales is not None and weight.dtype == torch.int8:
        tensors["SCB"] = scales
    return {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}


def is_repacked_for_cpu(layer: nn.Module) -> bool:
    """Whether bitsandbytes has repacked this Linear4bit's weight for its AVX512-BF16 CPU kernel."""
    return bool(getattr(getattr(layer.weight, "quant_state", None), "packing_format_for_cpu", False))


def keep_packed_layout(model: nn.Module) -> list[str]:
    """Stop bitsandbytes from repacking the model's 4-bit weights for its CPU kernel; returns the
    names of the layers it has repacked already.

    bitsandbytes 0.50, on a CPU with AVX512-BF16, rewrites a Linear4bit's packed weight and quant
    state in place at the layer's first inference-mode forward (eval, no grad), into a layout its
    training forward cannot use: afterwards a forward with a bias fails, and one without returns
    no gradient for its input, so the adapters below it would train on wrong gradients. Training
    with evaluation in between (lorakit's trainer) would hit both. The switch is bitsandbytes' own
    per-layer flag (``support_avx512bf16_for_cpu``), so 4-bit inference on such a CPU uses its
    generic kernel instead; it changes nothing on a GPU.
    """
    repacked = []
    for name, module in model.named_modules():
        if qualified_name(type(module)) in LINEAR_4BIT_NAMES and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            if is_repacked_for_cpu(module):
                repacked.append(name)
    return repacked


def describe(layer: nn.Module) -> str:
    """E.g. "NF4, double quantization, compute bfloat16, storage uint8" or "int8 (LLM.int8(), outlier threshold 6)"."""
    weight = layer.weight
    state = getattr(weight, "quant_state", None)
    if state is not None:
        compute = getattr(layer, "compute_dtype", None)
        return (f"{state.quant_type.upper()}{', double quantization' if state.nested else ''}, "
                f"compute {str(compute).removeprefix('torch.') if compute else 'the input dtype'}, "
                f"storage {str(weight.dtype).removeprefix('torch.')}")
    threshold = getattr(getattr(layer, "state", None), "threshold", 0.0)
    return f"int8 (LLM.int8(), outlier threshold {threshold:g})"


class LoraQuantizedLinear(LoraLinear):
    """h = Q(W0)·x + s·B·A·dropout(x) on a bitsandbytes Linear4bit / Linear8bitLt.

    On a 4-bit base in eager mode, one autograd function computes the layer
    (`ops/quantized_linear.py`): bitsandbytes' dequantization of the packed weight, in forward and
    again in backward (never saved), and `lora_linear`'s math around it, all in the compute dtype
    (autocast's, else the layer's ``compute_dtype``): the adapter's term, then the base GEMM
    accumulating onto it. That is what bitsandbytes' ``matmul_4bit`` computes for the base (a
    dequantization and a GEMM) plus the adapter, keeping only x and the (T, r) projection. A
    Llama-style MLP's down projection gets the SwiGLU twin (`forward_swiglu`).

    The reference path (the quantized layer's own output, then each adapter's term by
    `ops.lora_delta`, added in the output's dtype, as PEFT's QLoRA layers compute it) serves the
    rest: 8-bit bases (LLM.int8() is not a dequantization and a GEMM), compiling, routed rows,
    functorch transforms, non-additive variants (DoRA), and adapters of another dtype than the
    compute dtype outside autocast (PEFT computes those in the adapter's dtype; so does lorakit).
    """

    def __init__(self, base_layer: nn.Module, module_name: str = "") -> None:
        weight = base_layer.weight
        if hasattr(weight, "quant_state") and (weight.quant_state is None or not weight.bnb_quantized):
            raise ValueError(f"{module_name} is a bitsandbytes {type(base_layer).__name__} whose weight is not "
                             f"quantized yet (bitsandbytes quantizes it when the model is moved to a device): "
                             f"call model.to(device) first")
        super().__init__(base_layer, module_name)
        self.fan_in_fan_out = False
        # The logical shape: the packed storage says nothing about it.
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features

    def weight_init_refusal(self) -> str | None:
        # PEFT dequantizes for OLoRA and refuses PiSSA; lorakit never writes a packed weight.
        return (f"this is a quantized bitsandbytes {type(self.base_layer).__name__}, whose packed weight lorakit "
                f"never rewrites: load the base unquantized to use PiSSA/OLoRA, or use init='kaiming' on the "
                f"quantized base (QLoRA)")

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.training and torch.is_grad_enabled() and is_repacked_for_cpu(self.base_layer):
            raise RuntimeError(f"{self.module_name}: bitsandbytes repacked this 4-bit weight for its CPU inference "
                               f"kernel (at an inference-mode forward before lorakit.inject), and it cannot train "
                               f"through that layout; load the model again and inject before running it in eval "
                               f"mode (lorakit.inject then keeps the layout: see keep_packed_layout)")
        call = None if args or kwargs else self._op_call(x)
        if call is None:
            return LoraLayer.forward(self, x, *args, **kwargs)
        x_c, (dequantize, bias, As, Bs, scalings, p, seed) = call
        out, _ = quantized_lora_linear_call(x_c, dequantize, bias, As, Bs, scalings, p, seed)
        return out if out.dtype == x.dtype else out.to(x.dtype)  # bitsandbytes answers in the input's dtype

    def forward_swiglu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        call = self._op_call(gate)
        if call is None:
            return self(F.silu(gate) * up)
        gate_c, (dequantize, bias, As, Bs, scalings, p, seed) = call
        out, _ = quantized_lora_swiglu_linear_call(gate_c, up.to(gate_c.dtype), dequantize, bias, As, Bs, scalings,
                                                   p, seed)
        return out if out.dtype == gate.dtype else out.to(gate.dtype)

    def _op_call(self, x: torch.Tensor):
        """(x in the compute dtype, the QLoRA function's other operands) when
        `ops.quantized_linear` computes this forward, else None (the reference forward)."""
        base = self.base_layer
        if not hasattr(base.weight, "quant_state") or torch.compiler.is_compiling():
            return None  # 8-bit, or compiling: the reference forward
        call = super()._op_call(x)  # the adapters that apply, dropout, functorch, autocast
        if call is None:
            return None
        x_c, (_, bias, As, Bs, scalings, route, p, seed) = call
        if route is not None:
            return None
        if not getattr(base, "compute_type_is_set", True):  # bitsandbytes' first forward does this too
            base.set_compute_type(x)
            base.compute_type_is_set = True
        if not torch.is_autocast_enabled(x.device.type):
            dtype = base.compute_dtype or x.dtype  # bitsandbytes computes in it
            if any(t.dtype != dtype for t in (*As, *Bs)):
                return None  # the adapter's own dtype, as PEFT computes it: the reference forward
            x_c = x.to(dtype)
        if bias is not None:
            bias = bias.to(x_c.dtype)
        return x_c, (partial(dequantize_4bit, base), bias, As, Bs, scalings, p, seed)

    @torch.no_grad()
    def dequantized_weight(self) -> torch.Tensor:
        """Q(W0) as a dense (d_out, d_in) float32 tensor (a new one, each call)."""
        return dense_weight(self.base_layer).float()

    @torch.no_grad()
    def unmerged_base_weight(self) -> torch.Tensor:
        """Q(W0), dense: nothing is ever merged into the packed weight."""
        return self.dequantized_weight()

    @torch.no_grad()
    def merged_weight(self, name: str, sign: int = +1) -> torch.Tensor:
        """Q(W0) ± ΔW in float32: the weight a merge would mean, never written into the layer."""
        acc = self.dequantized_weight()
        variant = self.variants[name]
        return variant.merged_weight(self, name, acc) if sign > 0 else variant.unmerged_weight(self, name, acc)

    def merge_refusal(self, name: str) -> str:
        return (f"{self.module_name}: adapter {name!r} cannot be merged into this bitsandbytes "
                f"{type(self.base_layer).__name__} ({describe(self.base_layer)}): its packed weight would have to "
                f"be quantized again with ΔW in it, which rounds ΔW away or moves the outputs more than the "
                f"adapter does; nothing was merged. For a merged model use lorakit.unload(model, merge=True) "
                f"(dense layers: dequantized W0 + ΔW in float32) or `lorakit merge`; to merge back into the "
                f"quantized format anyway, call lorakit.quantize.merge_requantized(model), which reports how "
                f"far the outputs moved")

    def _add_to_weight(self, name: str, sign: int, safe: bool) -> None:
        raise MergeError(self.merge_refusal(name))

    @torch.no_grad()
    def to_dense(self, names: Iterable[str], dtype: torch.dtype) -> nn.Linear:
        """A plain nn.Linear holding Q(W0) + Σ ΔW of ``names`` (summed in float32, then cast to
        ``dtype``) and the base layer's bias: the merged layer, ready to replace this one."""
        weight = self.dequantized_weight()
        for name in names:
            weight = self.variants[name].merged_weight(self, name, weight)
        if not torch.isfinite(weight).all():
            raise MergeError(f"{self.module_name}: merging adapters {list(names)} gives non-finite weights; "
                             f"nothing was merged")
        bias = self.base_layer.bias
        dense = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device="meta")
        dense.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
        if bias is not None:
            dense.bias = nn.Parameter(bias.detach().to(dtype).clone(), requires_grad=False)
        return dense.train(self.base_layer.training)


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The kinds' reader: Q(W0) of a Linear4bit or Linear8bitLt as (d_out, d_in)."""
    return dequantize_4bit(module) if hasattr(module.weight, "quant_state") else dequantize_8bit(module)


def is_quantized_layer(module: nn.Module) -> bool:
    """A bitsandbytes Linear4bit/Linear8bitLt that lorakit adapts (by exact type name)."""
    return qualified_name(type(module)) in LINEAR_4BIT_NAMES + LINEAR_8BIT_NAMES


register_kind(LayerKind("bitsandbytes Linear4bit", LoraQuantizedLinear, dequantize_4bit,
                        type_names=LINEAR_4BIT_NAMES, linear=True, quantized=True))
register_kind(LayerKind("bitsandbytes Linear8bitLt", LoraQuantizedLinear, dequantize_8bit,
                        type_names=LINEAR_8BIT_NAMES, linear=True, quantized=True))
