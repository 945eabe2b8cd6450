"""Adapters on disk in Hugging Face PEFT's exact layout; the only place where keys are mapped.

A directory holds ``adapter_config.json`` (PEFT's LoraConfig fields) and
``adapter_model.safetensors`` with keys such as
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` (the adapter name is not in
the key). Safetensors only: nothing is ever unpickled. Writes are atomic (temp file + rename).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .config import ConfigError, LoraConfig
from .inject import _base_of, _find_saved, delete_adapter, find_targets, inject, lora_modules, lora_state, walk
from .layers import LoraEmbedding, LoraFusedLinear, LoraLayer, TrainableCopy, lora_class_for

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
# lorakit's own config rides in the safetensors header, which PEFT ignores; PEFT reads the JSON.
LORAKIT_METADATA = "lorakit_config"


class AdapterFileError(ValueError):
    """An adapter directory that cannot be loaded as it is; the message names the file and why."""


# --- save -------------------------------------------------------------------------------------

def save_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default", *,
                 base_model_name_or_path: str | None = None) -> Path:
    """Write adapter ``name`` as a PEFT adapter directory (created if missing). Returns the path."""
    state = lora_state(model)
    if name not in state.configs:
        raise KeyError(f"no adapter {name!r} on this model; it has {list(state.configs)}")
    config = state.configs[name]
    tensors = adapter_state_dict(model, name)

    peft_json = config.to_peft_dict(base_model_name_or_path=base_model_name_or_path,
                                    fan_in_fan_out=_has_transposed_targets(model, name))
    fused = [(n, m) for n, m in lora_modules(model) if isinstance(m, LoraFusedLinear) and name in m.lora_A]
    for module_name, layer in fused:
        # PEFT has no slices: it sees rank n_a·r over the whole output, so α is scaled to keep s.
        n = layer.n_adapted
        key = re.escape(module_name)
        alpha = layer.alpha[name] * (n ** 0.5 if config.use_rslora else n)
        peft_json["rank_pattern"] = {key: layer.rank[name] * n, **peft_json["rank_pattern"]}
        peft_json["alpha_pattern"] = {key: alpha, **peft_json["alpha_pattern"]}

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", LORAKIT_METADATA: json.dumps(_config_to_json(config))}
    _atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    _atomic_write(out / CONFIG_NAME, lambda tmp: tmp.write_text(json.dumps(peft_json, indent=2) + "\n"))
    return out


def adapter_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s tensors under PEFT's key names (contiguous copies, safe to save)."""
    config = lora_state(model).configs[name]
    tensors: dict[str, torch.Tensor] = {}
    for module_name, module in lora_modules(model):
        key = PREFIX + module_name
        if isinstance(module, LoraLayer) and name in module.lora_A:
            if isinstance(module, LoraEmbedding):
                tensors[f"{key}.lora_embedding_A"] = module.lora_A[name]
                tensors[f"{key}.lora_embedding_B"] = module.lora_B[name]
            else:
                A, B = module.dense_factors(name) if isinstance(module, LoraFusedLinear) \
                    else (module.lora_A[name], module.lora_B[name])
                tensors[f"{key}.lora_A.weight"] = A
                tensors[f"{key}.lora_B.weight"] = B
            bias = getattr(module.base_layer, "bias", None)
            if config.bias == "lora_only" and bias is not None:
                tensors[f"{key}.base_layer.bias"] = bias
        elif isinstance(module, TrainableCopy) and name in module.modules_to_save:
            for param_name, value in module.modules_to_save[name].state_dict().items():
                tensors[f"{key}.{param_name}"] = value
    if config.bias == "all":
        for param_name, value in model.named_parameters():
            inside_copy = ".modules_to_save." in param_name or ".original_module." in param_name
            if param_name.endswith("bias") and not inside_copy and ".lora_" not in param_name:
                tensors[PREFIX + param_name] = value
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def _has_transposed_targets(model: nn.Module, name: str) -> bool:
    return any(getattr(m, "fan_in_fan_out", False) and name in m.lora_A
               for _, m in lora_modules(model) if isinstance(m, LoraLayer))


def _config_to_json(config: LoraConfig) -> dict[str, Any]:
    d = dataclasses.asdict(config)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# --- load -------------------------------------------------------------------------------------

def read_adapter(path: str | os.PathLike) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Read and check an adapter directory without touching any model."""
    directory = Path(path)
    if not directory.is_dir():
        raise AdapterFileError(f"{directory}: no such adapter directory")
    config_file, weights_file = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not config_file.is_file():
        raise AdapterFileError(f"{config_file}: missing; an adapter directory needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    if not weights_file.is_file():
        hint = " (lorakit never unpickles .bin files: re-save it with safetensors)" \
            if (directory / "adapter_model.bin").exists() else ""
        raise AdapterFileError(f"{weights_file}: missing{hint}")
    try:
        peft_json = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFileError(f"{config_file}: not valid JSON ({e})") from None
    try:
        with safe_open(str(weights_file), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad headers and short files
        raise AdapterFileError(f"{weights_file}: not a readable safetensors file ({e}); it may be truncated "
                               f"or corrupted: save the adapter again") from None
    try:
        config = LoraConfig.from_peft_dict(peft_json, source=str(config_file))
        if LORAKIT_METADATA in metadata:
            config = LoraConfig(**json.loads(metadata[LORAKIT_METADATA]))
    except (ConfigError, TypeError, json.JSONDecodeError) as e:
        raise AdapterFileError(str(e) if isinstance(e, ConfigError) else f"{weights_file}: bad lorakit metadata ({e})") from None
    return config, tensors


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default", *,
                 trainable: bool = False, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load a PEFT/lorakit adapter directory as adapter ``name``, injecting LoRA layers as needed.

    Every key and shape is checked before the model is touched, so a failed load leaves the model
    exactly as it was. The adapter becomes active when no other adapter is; ``trainable=False``
    (the default) leaves its parameters frozen. Biases or base weights that the file carries
    (PEFT's ``bias="all"``, embedding layers) are written into the base model, as PEFT does.
    """
    config, tensors = read_adapter(path)
    weights_file = Path(path) / WEIGHTS_NAME
    state = model.__dict__.get("lora_state")
    if state is not None and name in state.configs:
        raise ValueError(f"adapter {name!r} is already on this model; delete it or load under another name")
    try:
        targets = dict(find_targets(model, config))
        saved = dict(_find_saved(model, config))
    except ConfigError as e:
        raise AdapterFileError(f"{Path(path) / CONFIG_NAME} does not fit this {type(model).__name__}: {e}") from None
    plan = _plan(model, config, tensors, targets, saved, weights_file)

    inject(model, config, name, dtype=dtype)
    try:
        with torch.no_grad():
            for _, (kind, module_name, attr, value) in plan.items():
                module = model.get_submodule(module_name)
                if kind == "lora" and isinstance(module, LoraFusedLinear) and attr == "A":
                    module.load_dense_factors(name, value, plan[("B", module_name)][3])
                elif kind == "lora" and not isinstance(module, LoraFusedLinear):
                    table = module.lora_A if attr == "A" else module.lora_B
                    table[name].copy_(value)
                elif kind == "saved":
                    _tensor(module.modules_to_save[name], attr).copy_(value)
                elif kind == "base":
                    _tensor(module, attr).copy_(value)
    except Exception:
        delete_adapter(model, name)
        raise
    if not trainable:
        for _, module in lora_modules(model):
            if isinstance(module, LoraLayer) and name in module.lora_A:
                module.lora_A[name].requires_grad_(False)
                module.lora_B[name].requires_grad_(False)
            elif isinstance(module, TrainableCopy) and name in module.modules_to_save:
                module.modules_to_save[name].requires_grad_(False)
    return model


def _plan(model, config, tensors, targets, saved, weights_file) -> dict:
    """Map every file key to (kind, module, attribute, tensor), checking shapes; raises on anything
    that does not fit. Nothing is modified."""
    plan: dict[Any, tuple[str, str, str, torch.Tensor]] = {}
    probes = {n: _probe(n, m, config) for n, m in targets.items()}
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            raise AdapterFileError(f"{weights_file}: key {key!r} does not start with {PREFIX!r}; "
                                   f"it is not in PEFT's layout")
        rest = key[len(PREFIX):]
        m = re.fullmatch(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)", rest)
        if m:
            module_name, which = m.group(1), m.group(2)
            if module_name not in probes:
                raise AdapterFileError(f"{weights_file}: {key} is for {module_name}, which the adapter's "
                                       f"config does not target in this {type(model).__name__} "
                                       f"(adapted modules: {len(probes)}, e.g. {list(probes)[:3]})")
            attr = "A" if which[-1] == "A" or which.startswith("lora_A") else "B"
            expected = probes[module_name][0 if attr == "A" else 1]
            _check_shape(weights_file, key, module_name, model, value, expected)
            plan[(attr, module_name)] = ("lora", module_name, attr, value)
            continue
        owner_name = next((n for n in saved if rest.startswith(n + ".")), None)
        if owner_name is not None:
            param = rest[len(owner_name) + 1:].removeprefix("modules_to_save.")
            if param.startswith("original_module."):
                continue  # PEFT also writes the frozen original; it is the base model's own
            target = _tensor(_base_of(saved[owner_name]), param)
            if target is None:
                raise AdapterFileError(f"{weights_file}: {key}: {owner_name} has no parameter {param!r}")
            _check_shape(weights_file, key, owner_name, model, value, tuple(target.shape))
            plan[key] = ("saved", owner_name, param, value)
            continue
        module_name, param = _split_owner(model, rest)
        owner = model.get_submodule(module_name) if module_name else model
        if isinstance(owner, LoraLayer) or module_name in targets:
            param = param.removeprefix("base_layer.")
            owner = _base_of(owner)
            module_name = f"{module_name}.base_layer"  # where it lives once inject() has wrapped it
        target = _tensor(owner, param)
        if target is None:
            raise AdapterFileError(f"{weights_file}: key {key!r} matches no module or parameter of this "
                                   f"{type(model).__name__}")
        _check_shape(weights_file, key, module_name.removesuffix(".base_layer"), model, value, tuple(target.shape))
        plan[key] = ("base", module_name, param, value)
    missing = [f"{n}.lora_{w}" for n in probes for w in "AB" if (w, n) not in plan]
    if missing:
        raise AdapterFileError(f"{weights_file}: the config targets modules whose weights the file lacks: "
                               f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return plan


def _probe(module_name: str, module: nn.Module, config: LoraConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(A shape, B shape) as stored on disk for this module under ``config``, without changing it."""
    rank = config.rank_for(module_name)
    if isinstance(module, LoraLayer):
        layer = module
    else:
        slices = next((v for k, v in config.fused_projections.items()
                       if module_name == k or module_name.endswith("." + k)), None)
        layer = LoraFusedLinear(module, slices, module_name) if slices else lora_class_for(module)(module, module_name)
    if isinstance(layer, LoraFusedLinear):
        n = layer.n_adapted
        return (n * rank, layer.in_features), (layer.out_features, n * rank)
    return layer.adapter_shapes(rank)


def _split_owner(model: nn.Module, dotted: str) -> tuple[str, str]:
    """Split ``a.b.c.weight`` into the deepest module path that exists and the rest."""
    names = {n for n, _ in walk(model)}
    parts = dotted.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if ".".join(parts[:i]) in names:
            return ".".join(parts[:i]), ".".join(parts[i:])
    return "", dotted


def _tensor(module: nn.Module, name: str) -> torch.Tensor | None:
    """The parameter or buffer ``name`` of ``module``, or None."""
    for get in (module.get_parameter, module.get_buffer):
        try:
            return get(name)
        except AttributeError:
            pass
    return None


def _check_shape(weights_file: Path, key: str, module_name: str, model: nn.Module,
                 value: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(value.shape) != tuple(expected):
        base = model.get_submodule(module_name)
        weight = getattr(_base_of(base), "weight", None)
        where = f"{module_name}, which has weight shape {tuple(weight.shape)}" if weight is not None else module_name
        raise AdapterFileError(f"{weights_file}: {key} has shape {tuple(value.shape)}, but {where} needs "
                               f"{tuple(expected)} for this adapter's rank; the adapter was made for "
                               f"another model or another rank")
