"""Which modules a config adapts; wrapping them in LoRA layers; taking the wrappers off again."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import nn

from .checks import check_ranks, tied_weight_refusal
from .config import ALL_LINEAR, ConfigError, LoraConfig, init_from_weight, name_matches
from .hints import Setting
from .layers import (LoraLayer, MergeError, TrainableCopy, is_linear_family, kind_of, lora_class_for, refusal,
                     registered_kinds)
from .layers.quantized import LoraQuantizedLinear, is_quantized_layer, keep_packed_layout
from .layers import swiglu


@dataclass
class LoraState:
    """What lorakit remembers on an injected model: each adapter's config, the active adapters,
    and which parameters were trainable before the first injection (restored by ``unload``)."""

    configs: dict[str, LoraConfig] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    requires_grad: dict[str, bool] = field(default_factory=dict)


def lora_state(model: nn.Module) -> LoraState:
    state = model.__dict__.get("lora_state")
    if state is None:
        raise ValueError("this model has no LoRA adapters; call lorakit.inject(model, config) or "
                         "lorakit.load_adapter(model, path) first")
    return state


def lora_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) for every LoraLayer and TrainableCopy, found by type."""
    for name, module in walk(model):
        if isinstance(module, (LoraLayer, TrainableCopy)):
            yield name, module


def walk(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """named_modules() that does not look inside LoRA wrappers, so a wrapped layer is seen under
    its own name (``...q_proj``) and never as ``...q_proj.base_layer``."""
    for child_name, child in model.named_children():
        name = f"{prefix}.{child_name}" if prefix else child_name
        yield name, child
        if not isinstance(child, (LoraLayer, TrainableCopy)):
            yield from walk(child, name)


def _base_of(module: nn.Module) -> nn.Module:
    if isinstance(module, LoraLayer):
        return module.base_layer
    if isinstance(module, TrainableCopy):
        return module.original_module
    return module


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return _base_of(head) if head is not None else None


# Parents that read a child's weight themselves and never call its forward: a LoRA wrapper there
# would be bypassed (nn.MultiheadAttention hands out_proj.weight to F.multi_head_attention_forward).
_READ_BY_PARENT = (nn.MultiheadAttention,)


MISSING_TARGETS = ("warn", "error", "drop")  # what inject does with target names that match nothing


def find_targets(model: nn.Module, config: LoraConfig, *,
                 missing_targets: str = "warn") -> list[tuple[str, nn.Module]]:
    """The modules ``config`` adapts, as (name, module); raises when there are none, or when a
    module selected (by name or by "all-linear") is one lorakit cannot adapt. Changes nothing.

    ``missing_targets`` says what an entry of a target list that matches no module does (a typo,
    most often): "warn" adapts the others after a warning, "error" refuses, naming the modules that
    could be adapted, and "drop" is "warn" for ``inject``, which then leaves the entry out of the
    adapter's config (see ``unmatched_targets``)."""
    if missing_targets not in MISSING_TARGETS:
        raise ValueError(f"missing_targets must be one of {MISSING_TARGETS}, got {missing_targets!r}")
    head = _output_head(model)
    saved = config.modules_to_save or ()
    all_linear = config.target_modules == ALL_LINEAR
    targets, bypassed, copied = [], [], []
    for name, module in walk(model):
        base = _base_of(module)
        if all_linear:
            # is_linear_family, not is_dense: an unknown subclass of nn.Linear is refused below,
            # never silently left out.
            if not is_linear_family(base) or base is head or (saved and name_matches(name, saved)):
                continue
        elif not name_matches(name, config.target_modules):
            continue
        if saved and name_matches(name, saved) and not isinstance(module, LoraLayer):
            copied.append(name)  # PEFT's rule: the full copy replaces the module, so LoRA there would be lost
            continue
        if config.exclude_modules and name_matches(name, config.exclude_modules):
            continue
        if config.layers_to_transform is not None and config.layer_index(name) not in config.layers_to_transform:
            continue
        if isinstance(module, TrainableCopy):
            raise ConfigError(Setting("target_modules"), f" matches {name!r}, which an adapter on this model trains "
                              f"as a full copy (modules_to_save); it cannot carry LoRA as well")
        why = refusal(base)
        if why is not None:
            raise ConfigError(Setting("target_modules"), f" matches {name!r}, a {why}")
        parent_name = name.rpartition(".")[0]
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(parent, _READ_BY_PARENT):
            if all_linear:
                bypassed.append(name)
                continue
            raise ConfigError(Setting("target_modules"), f" matches {name!r}, inside a {type(parent).__name__}, "
                              f"which reads its weight directly and never calls its forward, so LoRA there would "
                              f"have no effect; lorakit does not adapt {type(parent).__name__} (exclude it)")
        kind = kind_of(base)
        if config.fused_slices_for(name) is not None and kind.sliced_class is None:
            sliceable = ", ".join(k.name for k in registered_kinds() if k.sliced_class)
            raise ConfigError(f"fused_projections names {name!r}, a {kind.name}; only {sliceable} can be "
                              f"adapted by slices")
        targets.append((name, module))
    if copied:
        warnings.warn(f"target_modules selects {copied[:3]}{' ...' if len(copied) > 3 else ''}, which modules_to_save "
                      f"also names: they are trained as full copies and get no LoRA (as in PEFT)", stacklevel=3)
    if bypassed:
        warnings.warn(f'target_modules="all-linear" leaves out {bypassed[:3]}{" ..." if len(bypassed) > 3 else ""}: '
                      f"their parent reads their weight directly and never calls their forward, so LoRA "
                      f"there would have no effect", stacklevel=3)
    if not targets:
        listed = not isinstance(config.target_modules, str)
        shown = list(config.target_modules) if listed else config.target_modules
        raise ConfigError(Setting("target_modules"), f" {shown!r} matches no module of this {type(model).__name__}; "
                          f"modules it could adapt: {candidate_names(model)}",
                          *([". (", Setting("missing_targets", "drop"), " would not help: it leaves out the names "
                             "that match no module, and at least one has to match)"] if listed else []))
    unused = [t for t in unmatched_targets(config, targets) if not any(name_matches(n, [t]) for n in copied)]
    if unused and missing_targets == "error":
        raise ConfigError(Setting("target_modules"), f" entries {unused} match no module of this "
                          f"{type(model).__name__}; modules it could adapt: {candidate_names(model)}. To adapt "
                          f"the others and leave these out, pass ", Setting("missing_targets", "drop"))
    if unused:
        warnings.warn(f"target_modules entries {unused} match no module; adapting the others", stacklevel=3)
    for key in config.fused_projections:
        if not any(name_matches(n, [key]) for n, _ in targets):
            raise ConfigError(f"fused_projections names {key!r}, which target_modules does not select; "
                              f"add it to target_modules")
    return targets


def unmatched_targets(config: LoraConfig, targets: list[tuple[str, nn.Module]]) -> list[str]:
    """The entries of a target list that select none of ``targets`` (a regex or "all-linear": none)."""
    if not isinstance(config.target_modules, (list, tuple)):
        return []
    return [t for t in config.target_modules if not any(name_matches(n, [t]) for n, _ in targets)]


def candidate_names(model: nn.Module, limit: int = 30) -> list[str]:
    """Short names (last component, deduplicated) of the modules lorakit could adapt."""
    names = []
    for name, module in walk(model):
        short = name.rsplit(".", 1)[-1]
        if lora_class_for(_base_of(module)) is not None and short not in names:
            names.append(short)
    return names[:limit]


def inject(model: nn.Module, config: LoraConfig, name: str = "default", *,
           dtype: torch.dtype = torch.float32, missing_targets: str = "warn", check_rank: bool = True) -> nn.Module:
    """Add adapter ``name`` to the modules ``config`` selects, in place, and freeze the rest.

    Only the new adapter (plus the biases chosen by ``config.bias`` and its ``modules_to_save``)
    is left trainable. The adapter becomes active when no adapter was active before; otherwise
    the active set is left alone (choose with ``lorakit.use``). Returns ``model``.

    ``missing_targets`` ("warn", "error" or "drop") is what a ``target_modules`` entry that matches
    no module does; see ``find_targets``. With "drop" the adapter's config, and so a saved
    adapter_config.json, lists only the entries that matched.

    A rank above min(d_out, d_in) of a target is refused (`check_ranks`); ``check_rank=False``
    accepts it, for an adapter whose factors come from elsewhere (`load_adapter` passes it).
    """
    check_adapter_name(name)
    state = model.__dict__.get("lora_state")
    if state is not None and name in state.configs:
        raise ValueError(f"adapter {name!r} is already on this model; delete it first or pick another name")
    targets = find_targets(model, config, missing_targets=missing_targets)
    unused = unmatched_targets(config, targets)
    if missing_targets == "drop" and unused:
        config = config.replace(target_modules=[t for t in config.target_modules if t not in unused])
    saved_targets = _find_saved(model, config)
    # Empty layers of the kinds inject puts there (the model's own where it already is one), asked
    # before anything changes: ranks, and PiSSA/OLoRA, which rewrite base weights.
    probes = {module_name: module if isinstance(module, LoraLayer) else
              new_layer(module_name, module, config.fused_slices_for(module_name)) for module_name, module in targets}
    if init_from_weight(config.init):
        for module_name, probe in probes.items():
            probe.check_init(config.rank_for(module_name), config.init)
    if check_rank:
        check_ranks(config, probes)
    if state is None:
        state = LoraState(requires_grad={n: p.requires_grad for n, p in model.named_parameters()})
        model.__dict__["lora_state"] = state

    added: list[nn.Module] = []
    try:
        for module_name, module in targets:
            layer = _wrap(model, module_name, module, config)
            layer.add_adapter(name, config.rank_for(module_name), config.alpha_for(module_name), config.dropout,
                              use_rslora=config.use_rslora, init=config.init, dtype=dtype,
                              variant=variant_name(config))
            added.append(layer)
        for module_name, module in saved_targets:
            wrapper = module if isinstance(module, TrainableCopy) else _replace(
                model, module_name, TrainableCopy(module, module_name).train(module.training))
            wrapper.add_adapter(name)
            added.append(wrapper)
    except Exception:
        for layer in added:  # leave the model as it was
            layer.delete_adapter(name)
        _drop_empty_wrappers(model)
        if not state.configs:
            del model.__dict__["lora_state"]
        raise

    repacked = keep_packed_layout(model)  # bitsandbytes' CPU repacking breaks training through 4-bit layers
    if repacked:
        warnings.warn(f"bitsandbytes repacked the 4-bit weights of {repacked[:3]}{' ...' if len(repacked) > 3 else ''} "
                      f"for its CPU inference kernel before inject; it cannot train through that layout (adapted "
                      f"layers refuse to, others would pass no gradient): to train, load the model again and "
                      f"inject before running it in eval mode", stacklevel=2)
    state.configs[name] = config
    if not state.active:
        state.active = [name]
    for _, module in lora_modules(model):
        module.set_active(state.active)
    _freeze_all_but(model, name, config)
    swiglu.install(model)  # SwiGLU MLPs whose down_proj is now a LoRA layer
    return model




def variant_name(config: LoraConfig) -> str:
    """The LoRA variant (`variants/`) that ``config``'s adapters use."""
    return "dora" if config.use_dora else "lora"


def check_adapter_name(name: str) -> None:
    # The name becomes a key of nn.ParameterDict/ModuleDict, which refuse dots and empty strings.
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name {name!r} is not usable: give a non-empty name without dots")


def _find_saved(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    if not config.modules_to_save:
        return []
    found = [(n, m) for n, m in walk(model) if name_matches(n, config.modules_to_save)
             and not isinstance(m, LoraLayer)]
    missing = [s for s in config.modules_to_save if not any(name_matches(n, [s]) for n, _ in found)]
    adapted = [n for n, m in lora_modules(model) if isinstance(m, LoraLayer) and name_matches(n, missing)]
    if adapted:
        raise ConfigError(Setting("modules_to_save"), f" names {adapted[:3]}{' ...' if len(adapted) > 3 else ''}, "
                          f"which carries LoRA adapters ({', '.join(map(repr, _base_names(model, adapted[0])))}) "
                          f"and cannot also be trained as a full copy; leave it out of modules_to_save, or delete "
                          f"those adapters first")
    if missing:
        raise ConfigError(f"modules_to_save entries {missing} match no module of this {type(model).__name__}")
    return found


def _base_names(model: nn.Module, module_name: str) -> list[str]:
    return model.get_submodule(module_name).adapter_names


def _wrap(model: nn.Module, module_name: str, module: nn.Module, config: LoraConfig) -> LoraLayer:
    slices = config.fused_slices_for(module_name)
    if isinstance(module, LoraLayer):
        existing = getattr(module, "slices", None)
        if (slices is None) != (existing is None) or (slices is not None and tuple(slices) != existing):
            raise ConfigError(f"{module_name} already carries adapters with fused_projections slices {existing}; "
                              f"a new adapter there must use the same (got {slices})")
        return module
    layer = new_layer(module_name, module, slices)
    layer.train(module.training)  # a new wrapper must not switch an eval model's dropout on
    return _replace(model, module_name, layer)


def new_layer(module_name: str, base: nn.Module, slices: Sequence[bool] | None = None) -> LoraLayer:
    """A fresh LoRA layer of base's kind around it (its sliced class when ``slices`` is given);
    find_targets has checked that the kind has one."""
    kind = kind_of(base)
    if kind is None:
        raise ConfigError(f"{module_name} is a {refusal(base)}")
    return kind.lora_class(base, module_name) if slices is None else kind.sliced_class(base, slices, module_name)


def _replace(model: nn.Module, module_name: str, new: nn.Module) -> nn.Module:
    parent_name, _, child = module_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
    return new


def _freeze_all_but(model: nn.Module, name: str, config: LoraConfig) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    for _, module in lora_modules(model):
        if isinstance(module, LoraLayer) and name in module.lora_A:
            module.lora_A[name].requires_grad_(True)
            module.lora_B[name].requires_grad_(True)
            if name in module.lora_magnitude_vector:  # DoRA's m
                module.lora_magnitude_vector[name].requires_grad_(True)
            if config.bias == "lora_only" and getattr(module.base_layer, "bias", None) is not None:
                module.base_layer.bias.requires_grad_(True)
        elif isinstance(module, TrainableCopy) and name in module.modules_to_save:
            module.modules_to_save[name].requires_grad_(True)
    if config.bias == "all":
        for param_name, p in model.named_parameters():
            if param_name == "bias" or param_name.endswith(".bias"):
                p.requires_grad_(True)


def _drop_empty_wrappers(model: nn.Module) -> None:
    for module_name, module in list(lora_modules(model)):
        if not module.adapter_names:
            _replace(model, module_name, _base_of(module))


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` (unmerging it first if merged); layers left with no adapter go back
    to their base module."""
    state = lora_state(model)
    if name not in state.configs:
        raise KeyError(f"no adapter {name!r} on this model; it has {list(state.configs)}")
    for _, module in lora_modules(model):
        if name in module.adapter_names:
            module.delete_adapter(name)
    _drop_empty_wrappers(model)
    del state.configs[name]
    state.active = [a for a in state.active if a != name]
    if not state.configs:
        swiglu.remove(model)
        _restore_requires_grad(model, state)
        del model.__dict__["lora_state"]


def unload(model: nn.Module, merge: bool = True, *, dense_dtype: torch.dtype | None = None) -> nn.Module:
    """Take every LoRA module off. ``merge=True`` folds the active adapters into the base weights
    (and keeps the active trainable copies); ``merge=False`` restores the base model exactly as it
    was, up to float rounding of earlier merges. Returns the plain model. An adapter initialised
    from the base weight (PiSSA, OLoRA) that is not merged gives back the part of W it took.

    A quantized base layer (bitsandbytes 4-bit or 8-bit) is never merged into: with ``merge=True``
    it is replaced by a dense ``nn.Linear`` holding its dequantized weight plus ΔW (summed in
    float32), in ``dense_dtype`` (default: the dtype of the model's other floating-point weights,
    float32 if it has none); with ``merge=False`` it is put back as it was, packed bytes untouched.
    """
    state = lora_state(model)
    if merge:
        why = tied_weight_refusal(model, [m for _, m in lora_modules(model) if isinstance(m, LoraLayer)])
        if why is not None:
            raise MergeError(why)
    if merge and dense_dtype is None and any(isinstance(m, LoraQuantizedLinear) for _, m in lora_modules(model)):
        dense_dtype = _unquantized_dtype(model)
    swiglu.remove(model)
    for module_name, module in list(lora_modules(model)):
        if isinstance(module, LoraQuantizedLinear):
            _replace(model, module_name, module.to_dense(module.active_adapters, dense_dtype) if merge
                     else module.base_layer)
        elif isinstance(module, LoraLayer):
            if merge:
                module.merge(module.active_adapters)
                unmerge_rest = [a for a in module.merged_adapters if a not in module.active_adapters]
                module.unmerge(unmerge_rest)
            else:
                module.unmerge()
            for a in [a for a in module.lora_initial if a not in module.merged_adapters]:
                module.restore_base(a)  # PiSSA/OLoRA: W_res + s·B0·A0 = W; a merged one keeps W_res + s·B·A
            _replace(model, module_name, module.base_layer)
        else:
            _replace(model, module_name, module.current() if merge else module.original_module)
    _restore_requires_grad(model, state)
    del model.__dict__["lora_state"]
    return model



def _unquantized_dtype(model: nn.Module) -> torch.dtype:
    """The dtype most floating-point weights of the model have, leaving out LoRA factors and
    quantized layers (whose packed storage may be a float dtype); float32 if there are none."""
    counts: dict[torch.dtype, int] = {}
    for _, module in walk(model):
        base = _base_of(module)
        if is_quantized_layer(base):
            continue
        for p in (base.parameters() if base is not module else module.parameters(recurse=False)):
            if p.is_floating_point():
                counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def _restore_requires_grad(model: nn.Module, state: LoraState) -> None:
    for param_name, p in model.named_parameters():
        p.requires_grad_(state.requires_grad.get(param_name, True))
