"""Adapters on disk in Hugging Face PEFT's exact layout; the only place where keys are mapped.

A directory holds ``adapter_config.json`` (PEFT's LoraConfig fields) and
``adapter_model.safetensors`` with keys such as
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` (the adapter name is not in
the key). Safetensors only: nothing is ever unpickled. Writes are atomic (temp file + rename).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .config import ConfigError, LoraConfig, init_from_weight, name_matches
from .files import atomic_write_files
from .inject import (_base_of, _find_saved, check_adapter_name, delete_adapter, find_targets, inject, lora_modules,
                     lora_state, new_layer, variant_name, walk)
from .layers import LoraLayer, LoraSlicedLinear, TrainableCopy, factor_key, kind_of, peft_factor_keys
from .layers.quantized import is_quantized_layer
from . import variants

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
# lorakit's own config rides in the safetensors header, which PEFT ignores; PEFT reads the JSON.
LORAKIT_METADATA = "lorakit_config"


class AdapterFileError(ValueError):
    """An adapter directory that cannot be loaded as it is; the message names the file and why."""


# --- save -------------------------------------------------------------------------------------

def save_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default", *,
                 base_model_name_or_path: str | None = None, convert_to_lora: bool = False) -> Path:
    """Write adapter ``name`` as a PEFT adapter directory (created if missing). Returns the path.

    ``base_model_name_or_path`` (which base the adapter is for) defaults, as in PEFT, to the
    model's ``name_or_path``: what transformers' from_pretrained or lorakit's loaders recorded.

    ``convert_to_lora=True``, for an adapter initialised with PiSSA or OLoRA (whose A and B apply to
    the residual base weight this model now holds), writes it as a plain LoRA of rank 2r for the
    untouched base model instead: A' = [A; A0], B' = [B | −B0], r and α doubled (α·√2 with
    ``use_rslora``) so the scaling stays, init "kaiming" (PEFT's ``save_pretrained(...,
    path_initial_model_for_weight_conversion=...)``). It loads anywhere a LoRA loads."""
    if base_model_name_or_path is None:
        recorded = model.__dict__.get("name_or_path")  # "" for a model built from a config
        base_model_name_or_path = str(recorded) if recorded else None
    state = lora_state(model)
    if name not in state.configs:
        raise KeyError(f"no adapter {name!r} on this model; it has {list(state.configs)}")
    config = state.configs[name]
    if convert_to_lora:
        if not init_from_weight(config.init):
            raise ValueError(f"adapter {name!r} has init={config.init!r}: it applies to the untouched base model "
                             f"already; convert_to_lora is for adapters initialised with 'pissa' or 'olora'")
        config = as_plain_lora_config(config)
    tensors = adapter_state_dict(model, name, convert_to_lora=convert_to_lora)

    peft_json = config.to_peft_dict(base_model_name_or_path=base_model_name_or_path,
                                    fan_in_fan_out=_has_transposed_targets(model, name))
    if isinstance(config.target_modules, str) and config.layers_to_transform is not None:
        # PEFT refuses layers_to_transform beside a regex (or "all-linear"): name the modules instead.
        peft_json["target_modules"] = [n for n, m in lora_modules(model)
                                       if isinstance(m, LoraLayer) and name in m.lora_A]
        peft_json["layers_to_transform"] = peft_json["layers_pattern"] = None
    sliced = [(n, m) for n, m in lora_modules(model) if isinstance(m, LoraSlicedLinear) and name in m.lora_A]
    for module_name, layer in sliced:
        # PEFT has no slices: it sees rank n_a·r over the whole output, so α is scaled to keep s.
        n = layer.n_adapted
        key = re.escape(module_name)
        alpha = layer.alpha[name] * (n ** 0.5 if config.use_rslora else n)
        peft_json["rank_pattern"] = {key: layer.rank[name] * n, **peft_json["rank_pattern"]}
        peft_json["alpha_pattern"] = {key: alpha, **peft_json["alpha_pattern"]}

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", LORAKIT_METADATA: json.dumps(_config_to_json(config))}
    atomic_write_files({
        out / WEIGHTS_NAME: lambda tmp: save_file(tensors, str(tmp), metadata=metadata),
        out / CONFIG_NAME: lambda tmp: tmp.write_text(json.dumps(peft_json, indent=2) + "\n"),
    })
    return out


def adapter_state_dict(model: nn.Module, name: str, *, convert_to_lora: bool = False) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s tensors under PEFT's key names (contiguous copies, safe to save);
    ``convert_to_lora``: a PiSSA/OLoRA adapter's factors as the rank-2r plain LoRA (`save_adapter`)."""
    config = lora_state(model).configs[name]
    tensors: dict[str, torch.Tensor] = {}
    for module_name, module in lora_modules(model):
        key = PREFIX + module_name
        if isinstance(module, LoraLayer) and name in module.lora_A:
            if convert_to_lora:
                A, B = module.plain_lora_factors(name)
            else:
                A, B = module.dense_factors(name) if isinstance(module, LoraSlicedLinear) \
                    else (module.lora_A[name], module.lora_B[name])
            key_a, key_b = peft_factor_keys(module)  # each layer kind owns its PEFT key names
            tensors[f"{key}.{key_a}"] = A
            tensors[f"{key}.{key_b}"] = B
            for suffix, value in module.variants[name].extra_tensors(module, name).items():
                tensors[f"{key}.{suffix}"] = value  # DoRA: <module>.lora_magnitude_vector, as PEFT writes it
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


def as_plain_lora_config(config: LoraConfig) -> LoraConfig:
    """The config of a PiSSA/OLoRA adapter written as plain LoRA: every rank doubled, every α scaled
    so that each module keeps its scaling (×2 for α/r; ×√2 for α/√r with rslora, where PEFT
    doubles the alpha_pattern values too and so refuses rslora beside patterns), init "kaiming"."""
    factor = math.sqrt(2) if config.use_rslora else 2.0
    return config.replace(r=2 * config.r, alpha=config.alpha * factor, init="kaiming",
                          rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
                          alpha_pattern={k: v * factor for k, v in config.alpha_pattern.items()})


def _has_transposed_targets(model: nn.Module, name: str) -> bool:
    return any(getattr(m, "fan_in_fan_out", False) and name in m.lora_A
               for _, m in lora_modules(model) if isinstance(m, LoraLayer))


def _config_to_json(config: LoraConfig) -> dict[str, Any]:
    d = dataclasses.asdict(config)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


# --- load -------------------------------------------------------------------------------------

def read_adapter(path: str | os.PathLike) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Read and check an adapter directory without touching any model."""
    directory = Path(path)
    if directory.is_file():  # a file of the adapter (adapter_model.safetensors), most often
        beside = directory.parent / CONFIG_NAME
        hint = f"; its folder {directory.parent} holds {CONFIG_NAME}: give that folder" if beside.is_file() else ""
        raise AdapterFileError(f"{directory} is a file, not an adapter directory: an adapter is the folder that "
                               f"holds {CONFIG_NAME} and {WEIGHTS_NAME}{hint}")
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
    if not isinstance(peft_json, dict):
        raise AdapterFileError(f"{config_file}: holds a JSON {type(peft_json).__name__}, not an object of "
                               f"LoRA config fields")
    _check_factor_dtypes(tensors, weights_file)
    try:
        config = LoraConfig.from_peft_dict(peft_json, source=str(config_file))
    except ConfigError as e:
        raise AdapterFileError(str(e)) from None
    if LORAKIT_METADATA in metadata:
        try:
            own = LoraConfig(**json.loads(metadata[LORAKIT_METADATA]))
        except (ConfigError, TypeError, ValueError) as e:
            raise AdapterFileError(f"{weights_file}: bad lorakit metadata ({e})") from None
        _check_same_config(config, own, config_file, weights_file)
        config = own  # it also knows what PEFT's JSON cannot say (fused_projections slices, init)
    return config, tensors


def _check_factor_dtypes(tensors: dict[str, torch.Tensor], weights_file: Path) -> None:
    """A and B (and a variant's own tensors, DoRA's magnitudes) are learned real numbers: an integer
    or bool tensor there is no adapter (copied into a float parameter it would load silently)."""
    for key, value in tensors.items():
        rest = key.removeprefix(PREFIX)
        if (factor_key(rest) is not None or rest.rpartition(".")[2] in variants.extra_keys()) \
                and not value.is_floating_point():
            raise AdapterFileError(f"{weights_file}: {key} holds {value.dtype} values; LoRA factors must be "
                                   f"floating point (float32, bfloat16, float16, ...): the file was not written "
                                   f"as an adapter, or was converted wrongly")


def _check_same_config(from_json: LoraConfig, own: LoraConfig, config_file: Path, weights_file: Path) -> None:
    """lorakit writes its config twice: PEFT's JSON and its own copy in the safetensors header. When
    they disagree (the JSON was edited, or the files come from different saves), PEFT would use the
    JSON and lorakit its copy, with different outputs: refuse instead."""
    def fields(c: LoraConfig) -> dict[str, Any]:
        d = {f.name: getattr(c, f.name) for f in dataclasses.fields(c)}
        del d["fused_projections"]  # PEFT has no slices: save_adapter writes them as rank/alpha patterns
        for name in ("modules_to_save", "layers_to_transform"):
            d[name] = d[name] or None  # the JSON writes an empty list as null
        if isinstance(own.target_modules, str) and own.layers_to_transform is not None:
            del d["target_modules"], d["layers_to_transform"], d["layers_pattern"]  # save_adapter wrote the names
        return d
    json_fields, own_fields = fields(from_json), fields(own)
    if own.fused_projections:  # rank/alpha patterns of the sliced modules come on top of the user's
        for name in ("rank_pattern", "alpha_pattern"):
            json_fields[name] = {k: v for k, v in json_fields[name].items() if k in own_fields[name]}
    differ = [f"{k}: {json_fields[k]!r} vs {own_fields[k]!r}" for k in own_fields if json_fields[k] != own_fields[k]]
    if differ:
        raise AdapterFileError(f"{config_file} and the lorakit config in {weights_file} disagree "
                               f"({'; '.join(differ)}); the JSON was edited or the files come from different "
                               f"saves: save the adapter again")


@dataclasses.dataclass(frozen=True)
class CheckedAdapter:
    """An adapter directory checked against a model, before anything on the model changes."""

    config: LoraConfig  # as read, less modules_to_save entries that match nothing (as PEFT drops them)
    config_file: Path
    weights_file: Path
    layers: dict[str, LoraLayer]  # module name -> an empty layer of the kind inject() would make there
    plan: dict[Any, tuple[str, str, str, torch.Tensor]]  # file key -> (kind, module name, attribute, tensor);
    # kind "lora" (A or B of a layer), "saved" (a modules_to_save copy) or "base" (a base tensor)


def _another_model(model: nn.Module, config: LoraConfig, config_file: Path) -> str:
    """The message for an adapter none of whose target_modules names a module of ``model``."""
    try:
        base = json.loads(config_file.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        base = None
    made_for = f" ({base!r}, says its base_model_name_or_path)" if base else ""
    targets = config.target_modules if isinstance(config.target_modules, str) else list(config.target_modules)
    return (f"{config_file}: the adapter's target_modules {targets!r} match no module of this "
            f"{type(model).__name__}: it was made for another base model{made_for}; load it on that model")


def check_adapter(model: nn.Module, path: str | os.PathLike) -> CheckedAdapter:
    """Read adapter ``path`` and check every key and shape against ``model``; changes nothing.

    Raises `AdapterFileError` for a file or config that does not load or does not fit: what
    `load_adapter` checks before it injects, for code that uses the factors otherwise (the
    serving bank)."""
    config, tensors = read_adapter(path)
    config_file, weights_file = Path(path) / CONFIG_NAME, Path(path) / WEIGHTS_NAME
    config = _drop_unmatched_saved(model, config)
    try:
        targets = dict(find_targets(model, config))
        saved = dict(_find_saved(model, config))
        probes = {n: _probe(n, m, config) for n, m in targets.items()}
    except (ConfigError, ValueError, TypeError) as e:
        if not any(name_matches(n, config.target_modules) for n, _ in model.named_modules() if n):
            raise AdapterFileError(_another_model(model, config, config_file)) from None
        raise AdapterFileError(f"{config_file} does not fit this {type(model).__name__}: {e}") from None
    plan = _plan(model, config, tensors, probes, saved, weights_file)
    return CheckedAdapter(config, config_file, weights_file, probes, plan)


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default", *,
                 trainable: bool = False, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load a PEFT/lorakit adapter directory as adapter ``name``, injecting LoRA layers as needed.

    Every key and shape is checked before the model is touched, so a failed load leaves the model
    exactly as it was. The adapter becomes active when no other adapter is; ``trainable=False``
    (the default) leaves its parameters frozen. Biases or base weights that the file carries
    (PEFT's ``bias="all"``, embedding layers) are written into the base model, as PEFT does.
    """
    check_adapter_name(name)
    state = model.__dict__.get("lora_state")
    if state is not None and name in state.configs:
        raise ValueError(f"adapter {name!r} is already on this model; delete it or load under another name")
    checked = check_adapter(model, path)
    config, config_file, plan = checked.config, checked.config_file, checked.plan

    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        inject(model, config, name, dtype=dtype, check_rank=False)  # the file's rank: PEFT loads any r
    except ConfigError as e:  # e.g. a layer that already carries adapters with other slices
        raise AdapterFileError(f"{config_file} does not fit this {type(model).__name__}: {e}") from None
    overwritten: list[tuple[torch.Tensor, torch.Tensor]] = []  # base tensors and their old values
    try:
        with torch.no_grad():
            for _, (kind, module_name, attr, value) in plan.items():
                module = model.get_submodule(module_name)
                if kind == "lora" and isinstance(module, LoraSlicedLinear) and attr == "A":
                    module.load_dense_factors(name, value, plan[("B", module_name)][3])
                elif kind == "lora" and not isinstance(module, LoraSlicedLinear):
                    table = module.lora_A if attr == "A" else module.lora_B
                    table[name].copy_(value)
                elif kind == "extra":  # a variant's own tensor (DoRA: lora_magnitude_vector)
                    getattr(module, attr)[name].copy_(value)
                elif kind == "saved":
                    _tensor(module.modules_to_save[name], attr).copy_(value)
                elif kind == "base":
                    target = _tensor(module, attr)
                    overwritten.append((target, target.detach().clone()))
                    target.copy_(value)
    except Exception:
        with torch.no_grad():
            for target, old in reversed(overwritten):
                target.copy_(old)
        delete_adapter(model, name)
        for param_name, p in model.named_parameters():
            p.requires_grad_(requires_grad.get(param_name, p.requires_grad))
        raise
    if not trainable:
        # inject() froze everything but this adapter (and the biases its config trains); freeze those too.
        for p in model.parameters():
            p.requires_grad_(False)
    return model


def _drop_unmatched_saved(model: nn.Module, config: LoraConfig) -> LoraConfig:
    """PEFT ignores ``modules_to_save`` entries that match no module, and writes some on its own:
    ``task_type="SEQ_CLS"`` adds both "classifier" and "score", of which a model has one. Drop
    those here, as PEFT does; a file tensor for a dropped entry still fails the key check."""
    if not config.modules_to_save:
        return config
    names = [n for n, _ in walk(model)]
    kept = tuple(s for s in config.modules_to_save if any(name_matches(n, [s]) for n in names))
    return config if kept == tuple(config.modules_to_save) else config.replace(modules_to_save=kept or None)


def _plan(model, config, tensors, probes, saved, weights_file) -> dict:
    """Map every file key to (kind, module, attribute, tensor), checking shapes; raises on anything
    that does not fit. Nothing is modified."""
    plan: dict[Any, tuple[str, str, str, torch.Tensor]] = {}
    shapes = {n: _stored_shapes(layer, config.rank_for(n)) for n, layer in probes.items()}
    variant = variants.get(variant_name(config))
    # Frozen originals of modules_to_save, by storage: a tied weight (lm_head = embed_tokens) is one.
    originals = {t.data_ptr(): n for n, m in saved.items() for t in _base_of(m).parameters()}
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            raise AdapterFileError(f"{weights_file}: key {key!r} does not start with {PREFIX!r}; "
                                   f"it is not in PEFT's layout")
        rest = key[len(PREFIX):]
        factor = factor_key(rest)
        if factor is not None:
            module_name, attr = factor.module, factor.factor
            if module_name not in probes:
                raise AdapterFileError(f"{weights_file}: {key} is for {module_name}, which the adapter's "
                                       f"config does not target in this {type(model).__name__} "
                                       f"(adapted modules: {len(probes)}, e.g. {list(probes)[:3]})")
            own = peft_factor_keys(probes[module_name])
            if factor.suffix not in own:
                kind = kind_of(probes[module_name].base_layer)
                raise AdapterFileError(f"{weights_file}: {key} names a factor {factor.suffix!r}, but "
                                       f"{module_name} is adapted as {kind.name}, whose factors PEFT "
                                       f"stores as {own[0]!r} and {own[1]!r}; the file was made for "
                                       f"another model")
            expected = shapes[module_name][0 if attr == "A" else 1]
            _check_shape(weights_file, key, module_name, model, value, expected)
            plan[(attr, module_name)] = ("lora", module_name, attr, value)
            continue
        module_name, _, suffix = rest.rpartition(".")
        if module_name in probes and suffix in variants.extra_keys():
            expected = variant.extra_shapes(probes[module_name])
            if suffix not in expected:
                raise AdapterFileError(f"{weights_file}: {key} is a {suffix} (a DoRA magnitude), but "
                                       f"{weights_file.parent / CONFIG_NAME} has use_dora=false; the files come "
                                       f"from different saves, or the JSON was edited")
            _check_shape(weights_file, key, module_name, model, value, expected[suffix])
            plan[(suffix, module_name)] = ("extra", module_name, suffix, value)
            continue
        owner_name = next((n for n in saved if rest.startswith(n + ".")), None)
        if owner_name is not None:
            param = rest[len(owner_name) + 1:].removeprefix("modules_to_save.")
            if param.startswith("original_module."):
                continue  # PEFT also writes the frozen original; it is the base model's own
            target = _tensor(_base_of(saved[owner_name]), param)
            adapter, _, nested = param.partition(".")
            if target is None and rest.startswith(f"{owner_name}.modules_to_save.{adapter}.") and nested:
                # PEFT takes its adapter name out of a key only before the last component: bias="all" writes
                # the trained copy's nested biases as modules_to_save.<adapter name>.dense.bias (RoBERTa's head)
                param, target = nested, _tensor(_base_of(saved[owner_name]), nested)
            if target is None:
                raise AdapterFileError(f"{weights_file}: {key}: {owner_name} has no parameter {param!r}")
            _check_shape(weights_file, key, owner_name, model, value, tuple(target.shape))
            plan[key] = ("saved", owner_name, param, value)
            continue
        module_name, param = _split_owner(model, rest)
        owner = model.get_submodule(module_name) if module_name else model
        if isinstance(owner, LoraLayer) or module_name in probes:
            param = param.removeprefix("base_layer.")
            owner = _base_of(owner)
            module_name = f"{module_name}.base_layer"  # where it lives once inject() has wrapped it
        target = _tensor(owner, param)
        if target is None:
            raise AdapterFileError(f"{weights_file}: key {key!r} matches no module or parameter of this "
                                   f"{type(model).__name__}")
        if is_quantized_layer(owner) and param != "bias":
            raise AdapterFileError(f"{weights_file}: {key} would overwrite the packed weight of "
                                   f"{module_name.removesuffix('.base_layer')}, a quantized bitsandbytes "
                                   f"{type(owner).__name__}; lorakit never writes a packed weight: load this "
                                   f"adapter on an unquantized base")
        _check_shape(weights_file, key, module_name.removesuffix(".base_layer"), model, value, tuple(target.shape))
        if target.data_ptr() in originals:
            raise AdapterFileError(f"{weights_file}: {key} would overwrite a weight tied to "
                                   f"{originals[target.data_ptr()]}, which the adapter trains a copy of "
                                   f"(modules_to_save); the file expects the copies to be tied (PEFT's "
                                   f"ensure_weight_tying), which lorakit does not do")
        plan[key] = ("base", module_name, param, value)
    missing = [f"{n}.{k}" for n, layer in probes.items() for w, k in zip("AB", peft_factor_keys(layer))
               if (w, n) not in plan]
    lacking = [f"{n}.{k}" for n, layer in probes.items() for k in variant.extra_shapes(layer) if (k, n) not in plan]
    if lacking and not missing:
        raise AdapterFileError(f"{weights_file}: the config has use_dora=true, but the file lacks the DoRA "
                               f"magnitudes of {lacking[:5]}{' ...' if len(lacking) > 5 else ''}; save the "
                               f"adapter again")
    if missing:
        raise AdapterFileError(f"{weights_file}: the config targets modules whose weights the file lacks: "
                               f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for module_name, layer in probes.items():
        if isinstance(layer, LoraSlicedLinear):
            _check_sliced(layer, config.rank_for(module_name), plan, module_name, weights_file)
    return plan


def _probe(module_name: str, module: nn.Module, config: LoraConfig) -> LoraLayer:
    """A fresh LoRA layer of the kind ``config`` puts on this module, around its base layer; the
    model's own module (even one that already carries adapters) is never changed."""
    base = _base_of(module)
    slices = getattr(module, "slices", None) if isinstance(module, LoraLayer) else \
        config.fused_slices_for(module_name)
    return new_layer(module_name, base, slices or None)


def _stored_shapes(layer: LoraLayer, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(A shape, B shape) as stored on disk: a sliced layer is stored as PEFT sees it (rank n_a·r)."""
    if isinstance(layer, LoraSlicedLinear):
        n = layer.n_adapted
        return (n * rank, layer.in_features), (layer.out_features, n * rank)
    return layer.adapter_shapes(rank)


def _check_sliced(layer: LoraSlicedLinear, rank: int, plan: dict, module_name: str, weights_file: Path) -> None:
    """A sliced layer stores only the blocks of its adapted slices; try the file's B on the probe."""
    A, B = plan[("A", module_name)][3], plan[("B", module_name)][3]
    layer.add_adapter("_check", rank, 1.0)
    try:
        layer.load_dense_factors("_check", A, B)
    except ValueError as e:
        raise AdapterFileError(f"{weights_file}: {PREFIX}{module_name}.lora_B.weight: {e}") from None


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
        base = _base_of(model.get_submodule(module_name))
        weight = getattr(base, "weight", None)
        shape = (base.out_features, base.in_features) if is_quantized_layer(base) else \
            tuple(weight.shape) if weight is not None else None  # a packed weight's storage says nothing
        where = f"{module_name}, which has weight shape {shape}" if shape is not None else module_name
        raise AdapterFileError(f"{weights_file}: {key} has shape {tuple(value.shape)}, but {where} needs "
                               f"{tuple(expected)} for this adapter's rank; the adapter was made for "
                               f"another model or another rank")
