"""Quantized base models for QLoRA: turn a model's nn.Linear layers into bitsandbytes 4-bit (NF4,
FP4) or 8-bit (LLM.int8()) layers, measure a model's size, and merge adapters back into 4/8 bits
when a user asks for it (`merge_requantized`).

A model that transformers loaded with ``BitsAndBytesConfig`` needs none of this: lorakit adapts
its Linear4bit/Linear8bitLt layers as they are (`layers/quantized.py`). `quantize_model` is for
the models lorakit loads itself (the embedded SmolLM2, a GGUF file, a model directory): the same
bitsandbytes layers, made from the dense weights after loading (`lorakit train --quantize nf4`).
bitsandbytes is imported only when a function here quantizes.
"""

from __future__ import annotations

import logging

from dataclasses import dataclass, field

import torch
from torch import nn

from .hints import Setting, SettingError
from .inject import _replace, lora_modules, lora_state, walk
from .layers import LoraLayer, TrainableCopy
from .layers.quantized import LoraQuantizedLinear, describe, is_quantized_layer, packed_tensors

SCHEMES = ("nf4", "fp4", "int8")


@dataclass(frozen=True)
class Quantization:
    """How to quantize a base model's linear layers.

    ``scheme``: "nf4" (QLoRA's 4-bit NormalFloat), "fp4" or "int8" (LLM.int8(), outliers of the
    input above ``int8_threshold`` in 16 bits). ``double_quant``: quantize the 4-bit block scales
    too (QLoRA §3; about 0.37 bits per weight saved). ``compute_dtype``: the dtype the 4-bit layer
    dequantizes to and multiplies in (None: the dtype of the weights it quantized). ``quant_storage``:
    the dtype the packed bytes are stored as (uint8; bfloat16 lets FSDP shard them with the rest).
    ``blocksize``: weights per 4-bit scale (bitsandbytes' default, 64).
    """

    scheme: str = "nf4"
    double_quant: bool = False
    compute_dtype: torch.dtype | None = None
    quant_storage: torch.dtype = torch.uint8
    blocksize: int = 64
    int8_threshold: float = 6.0

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise SettingError(Setting("quantize", self.scheme), f" is not one of {SCHEMES}")
        if self.double_quant and self.scheme == "int8":
            raise SettingError(Setting("double_quant"), " quantizes the scales of 4-bit blocks; int8 has none: "
                               "use it with ", Setting("quantize", "nf4"), " or ", Setting("quantize", "fp4"))

    def describe(self) -> str:
        if self.scheme == "int8":
            return f"int8 (LLM.int8(), outlier threshold {self.int8_threshold:g})"
        return f"{self.scheme.upper()}{', double quantization' if self.double_quant else ''}"


@dataclass
class QuantizeReport:
    """What `quantize_model` did: sizes in bytes before and after, which layers it quantized and
    which linear layers it kept dense, with why."""

    quantization: Quantization
    bytes_before: int
    bytes_after: int
    quantized: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)  # module name -> why it stays dense

    def summary(self) -> str:
        kept = f"; kept dense: {', '.join(f'{n} ({why})' for n, why in list(self.kept.items())[:3])}" \
            f"{' ...' if len(self.kept) > 3 else ''}" if self.kept else ""
        return (f"base model quantized to {self.quantization.describe()}: {_size(self.bytes_before)} -> "
                f"{_size(self.bytes_after)} ({self.bytes_before / max(self.bytes_after, 1):.2f}× smaller), "
                f"{len(self.quantized)} linear layer(s){kept}")


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def model_bytes(model: nn.Module) -> int:
    """Bytes the model's weights take: parameters, buffers and the quantization state of quantized
    layers (block scales, code books), each tensor counted once (a tied weight is one)."""
    seen: set[tuple[int, int]] = set()
    total = 0

    def count(t: torch.Tensor) -> None:
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.device.type != "meta" else (id(t), 0)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()

    for t in list(model.parameters()) + list(model.buffers()):
        count(t)
    for module in model.modules():
        if is_quantized_layer(module):
            for name, t in packed_tensors(module).items():
                if name != "weight":
                    count(t)
    return total


def import_bitsandbytes(setting: Setting):
    """``bitsandbytes``, imported without its log line about an optional CPU kernel package
    ("kernels") that lorakit does not use; a missing bitsandbytes is a SettingError naming ``setting``."""
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError:
        raise SettingError(setting, " needs bitsandbytes: pip install bitsandbytes") from None
    finally:
        logger.setLevel(level)
    return bitsandbytes


def quantize_model(model: nn.Module, quantization: Quantization, *, skip: tuple[str, ...] = (),
                   device: torch.device | str | None = None) -> QuantizeReport:
    """Replace the model's plain nn.Linear layers by bitsandbytes Linear4bit / Linear8bitLt, in place.

    Kept dense: the output head (``get_output_embeddings()``; transformers keeps it too), a layer
    whose weight is tied to another module's, the modules named in ``skip`` (and their children),
    and layers that already carry LoRA (quantize before ``inject``). Each layer is quantized on
    ``device`` (default: where its weight is) and stays there. Returns what was done.
    """
    bnb = import_bitsandbytes(Setting("quantize", quantization.scheme))
    if model.__dict__.get("lora_state") is not None:
        raise ValueError("this model carries LoRA adapters already; quantize the base model before "
                         "lorakit.inject / load_adapter")
    before = model_bytes(model)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    owners: dict[int, list[str]] = {}
    for name, module in walk(model):
        for p in module.parameters(recurse=False):
            owners.setdefault(p.untyped_storage().data_ptr(), []).append(name)
    report = QuantizeReport(quantization, before, before)
    for name, module in list(walk(model)):
        if isinstance(module, (LoraLayer, TrainableCopy)) or type(module) is not nn.Linear:
            continue
        if head is not None and module is head:
            report.kept[name] = "the output head"
        elif any(name == s or name.startswith(s + ".") or name.endswith("." + s) for s in skip):
            report.kept[name] = "named in skip"
        elif len(owners.get(module.weight.untyped_storage().data_ptr(), ())) > 1:
            report.kept[name] = "weight tied to another module"
        elif module.weight.device.type == "meta":
            report.kept[name] = "on the meta device"
        else:
            _replace(model, name, _quantized_linear(bnb, module, quantization, device))
            report.quantized.append(name)
    report.bytes_after = model_bytes(model)
    if quantization.scheme == "int8" and report.quantized:
        _say_int8_cast_once()
    return report


class _OnceFilter(logging.Filter):
    """Lets the first record of a message through and drops its repeats."""

    def __init__(self, start: str) -> None:
        super().__init__()
        self.start, self.seen = start, False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.start):
            return True
        seen, self.seen = self.seen, True
        return not seen


def _say_int8_cast_once() -> None:
    """bitsandbytes' int8 matmul logs "inputs will be cast ... to float16" on every forward of every
    layer whose input is not float16 (a float32 base: 14 layers x every step and eval), which buries the
    run's own output; keep the first, which says it."""
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _OnceFilter) for f in logger.filters):
        logger.addFilter(_OnceFilter("MatMul8bitLt: inputs will be cast"))


def _quantized_linear(bnb, dense: nn.Linear, q: Quantization, device) -> nn.Module:
    """One bitsandbytes layer holding ``dense``'s weight quantized (on ``device``) and its bias."""
    device = torch.device(device) if device is not None else dense.weight.device
    weight = dense.weight.detach()
    has_bias = dense.bias is not None
    with torch.device("meta"):  # no dense weight is allocated for the new layer
        if q.scheme == "int8":
            layer = bnb.nn.Linear8bitLt(dense.in_features, dense.out_features, bias=has_bias,
                                        has_fp16_weights=False, threshold=q.int8_threshold)
        else:
            layer = bnb.nn.Linear4bit(dense.in_features, dense.out_features, bias=has_bias,
                                      compute_dtype=q.compute_dtype or weight.dtype,
                                      compress_statistics=q.double_quant, quant_type=q.scheme,
                                      quant_storage=q.quant_storage)
    if q.scheme == "int8":
        layer.weight = bnb.nn.Int8Params(weight.to("cpu", copy=True), requires_grad=False, has_fp16_weights=False)
    else:
        layer.weight = bnb.nn.Params4bit(weight.to("cpu", copy=True), requires_grad=False, quant_type=q.scheme,
                                         compress_statistics=q.double_quant, quant_storage=q.quant_storage,
                                         blocksize=q.blocksize, module=layer)
    if has_bias:
        layer.bias = nn.Parameter(dense.bias.detach().clone(), requires_grad=dense.bias.requires_grad)
    layer = layer.to(device)  # bitsandbytes quantizes the weight here
    if hasattr(layer, "support_avx512bf16_for_cpu"):
        layer.support_avx512bf16_for_cpu = False  # never repacked in place on a CPU: see keep_packed_layout
    return layer.train(dense.training)


# --- merging back into 4/8 bits, on request -------------------------------------------------------

@dataclass
class RequantizeReport:
    """How far `merge_requantized` moved each layer's outputs from the exact merge: the relative
    error ‖Q(W0 + ΔW)·x − (Q(W0) + ΔW)·x‖ / ‖(Q(W0) + ΔW)·x‖ over random inputs, beside the
    adapter's own effect ‖ΔW·x‖ / ‖Q(W0)·x‖ (the move is worth it only when it is much smaller)."""

    output_error: dict[str, float] = field(default_factory=dict)
    adapter_effect: dict[str, float] = field(default_factory=dict)

    @property
    def max_error(self) -> float:
        return max(self.output_error.values(), default=0.0)

    def summary(self) -> str:
        worst = max(self.output_error, key=self.output_error.get, default=None)
        if worst is None:
            return "no quantized layer carried an active adapter"
        return (f"merged into {len(self.output_error)} quantized layer(s); re-quantizing moved the outputs by up "
                f"to {100 * self.max_error:.2f}% ({worst}, where the adapter itself changes them by "
                f"{100 * self.adapter_effect[worst]:.2f}%)")


@torch.no_grad()
def merge_requantized(model: nn.Module, *, samples: int = 64, seed: int = 0) -> tuple[nn.Module, RequantizeReport]:
    """Merge the active adapters into quantized base layers by quantizing Q(W0) + ΔW again (the
    explicit form of what ``lorakit.merge`` refuses), then take every LoRA module off, as
    ``lorakit.unload(model, merge=True)`` does for the rest. Returns the plain model (with new
    packed weights, in the layers' own format) and how far the outputs moved, measured per layer on
    ``samples`` random inputs. Re-quantizing rounds ΔW to the quantization grid: check the report."""
    from .inject import unload

    lora_state(model)  # raises for a model without adapters
    import bitsandbytes as bnb

    report = RequantizeReport()
    generator = torch.Generator().manual_seed(seed)
    for name, layer in list(lora_modules(model)):
        if not isinstance(layer, LoraQuantizedLinear) or not layer.active_adapters:
            continue
        base = layer.base_layer
        exact = layer.to_dense(layer.active_adapters, torch.float32)  # Q(W0) + ΔW
        dequantized = layer.dequantized_weight()  # Q(W0)
        x = torch.randn(samples, layer.in_features, generator=generator).to(exact.weight.device)
        want = exact(x)
        report.adapter_effect[name] = ((x @ (exact.weight - dequantized).t()).norm()
                                       / (x @ dequantized.t()).norm().clamp_min(1e-30)).item()
        state = getattr(base.weight, "quant_state", None)
        q = Quantization("int8", int8_threshold=base.state.threshold) if state is None else \
            Quantization(state.quant_type, double_quant=bool(state.nested), compute_dtype=base.compute_dtype,
                         quant_storage=base.weight.dtype, blocksize=state.blocksize)
        source = state.dtype if state is not None else torch.float32  # the dtype W0 was quantized from
        exact.weight.data = exact.weight.data.to(source)
        new = _quantized_linear(bnb, exact, q, exact.weight.device).train(base.training)
        got = new(x.to(source)).float()
        report.output_error[name] = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
        layer.base_layer = new  # the old packed weight is dropped, never written
    for name, layer in list(lora_modules(model)):
        if isinstance(layer, LoraQuantizedLinear):
            _replace(model, name, layer.base_layer)
    return unload(model, merge=True), report


__all__ = ["Quantization", "QuantizeReport", "RequantizeReport", "SCHEMES", "model_bytes", "quantize_model",
           "merge_requantized", "describe"]
