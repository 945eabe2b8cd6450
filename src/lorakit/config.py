"""LoraConfig: what to adapt and how, and its mapping to PEFT's ``adapter_config.json``.

The field names follow the paper where PEFT does not force a name (``alpha`` for α); the JSON
written to disk uses PEFT's names so that PEFT reads it (``lora_alpha``, ``lora_dropout``, ...).
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from .hints import Setting, SettingError

# Module-name components under which transformers models keep their repeated blocks; the number
# after one of them is the layer index that `layers_to_transform` refers to (as in PEFT).
LAYER_CONTAINERS = ("layers", "h", "block", "blocks", "layer")
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:%s)\.(\d+)(?:\.|$)" % "|".join(LAYER_CONTAINERS))

ALL_LINEAR = "all-linear"
BIAS_MODES = ("none", "all", "lora_only")
INIT_MODES = ("kaiming", "gaussian", "pissa", "olora")  # and "pissa_niter_K" (K >= 1): see init_from_weight
_PISSA_NITER = re.compile(r"pissa_niter_(\w*)")


def init_from_weight(init: str) -> bool:
    """True for PiSSA ("pissa", "pissa_niter_K") and OLoRA ("olora"): inits that take A and B from
    the base weight and leave the residual W − s·B·A in it (`layers/weight_init.py`)."""
    return init in ("pissa", "olora") or _PISSA_NITER.fullmatch(init) is not None


def pissa_niter(init: str) -> int | None:
    """K of "pissa_niter_K" (randomized SVD with K subspace iterations), None for any other init."""
    m = _PISSA_NITER.fullmatch(init)
    return int(m.group(1)) if m else None


class ConfigError(SettingError):
    """A LoraConfig that cannot be used as given (a ValueError; `Setting` parts name the field)."""


@dataclass(frozen=True)
class LoraConfig:
    """How to adapt a model (Hu et al. 2021, §4.1).

    Args:
        r: rank of ΔW = B·A.
        alpha: α in the scaling s = α / r (or α / √r with ``use_rslora``).
        dropout: dropout applied to the adapter's input only, never to the base path.
        target_modules: a list of module names, each matching exactly or as a dotted suffix
            (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``); a string is a regular
            expression that must match the whole module name; ``"all-linear"`` adapts every
            linear layer except the output head.
        exclude_modules: names (list: exact or dotted suffix) or a regex (string) never adapted.
        rank_pattern / alpha_pattern: ``{regex: value}``; a module whose name ends with a match of
            the regex gets that rank / alpha instead of ``r`` / ``alpha`` (PEFT's semantics).
        layers_to_transform: adapt only blocks with these indices (``layers.N``, ``h.N``, ...).
        layers_pattern: the name (or names) of the container whose index ``layers_to_transform``
            means, as PEFT's field: ``"layer"`` picks ``layer.N`` in T5's ``block.1.layer.0...``;
            None: the first of ``layers``, ``h``, ``block``, ``blocks``, ``layer`` in the name.
        bias: ``"none"``, ``"all"`` (every bias of the model trains) or ``"lora_only"`` (biases
            of adapted layers train).
        modules_to_save: modules trained in full beside the adapter (e.g. a classifier head);
            same matching rules as a list of ``target_modules``.
        fused_projections: ``{module name: [bool, ...]}`` for a layer whose output stacks equal
            projections (GPT-2's ``c_attn`` = q|k|v); only the slices marked True get an adapter.
            The paper adapts q and v inside ``c_attn``: ``{"c_attn": [True, False, True]}``.
        use_rslora: scale by α/√r (Kalajdzievski 2023), which keeps updates stable across ranks.
        use_dora: DoRA (Liu et al. 2024, arXiv 2402.09353): W' = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖,
            a trainable magnitude m per output row beside the LoRA direction, as PEFT's
            ``use_dora`` (`variants/dora.py`). Not additive: the serving bank refuses it; merge it
            (``lorakit merge``) to serve it.
        init: ``"kaiming"`` (A kaiming-uniform, as PEFT and the reference code) or ``"gaussian"``
            (A ~ N(0, 1/r), the paper's §4.1 wording); B = 0 either way. ``"pissa"`` (Meng et al.
            2024: A, B from the top-r singular triplets of W; ``"pissa_niter_K"``: a randomized SVD
            with K iterations) and ``"olora"`` (Büyükakyüz 2024: from W's QR decomposition) take A
            and B from the base weight and write the residual W − s·B·A into it, so the adapted
            model still equals the base model at step 0 (docs/variants.md).
    """

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: Sequence[str] | str = ("q_proj", "v_proj")
    exclude_modules: Sequence[str] | str | None = None
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    layers_to_transform: Sequence[int] | None = None
    layers_pattern: Sequence[str] | str | None = None
    bias: str = "none"
    modules_to_save: Sequence[str] | None = None
    fused_projections: Mapping[str, Sequence[bool]] = field(default_factory=dict)
    use_rslora: bool = False
    init: str = "kaiming"
    use_dora: bool = False

    def __post_init__(self) -> None:
        # One name or index stands for a list of one (PEFT takes an int layers_to_transform; a string
        # modules_to_save would otherwise be read letter by letter).
        if isinstance(self.modules_to_save, str):
            object.__setattr__(self, "modules_to_save", (self.modules_to_save,))
        if _is_int(self.layers_to_transform):
            object.__setattr__(self, "layers_to_transform", (self.layers_to_transform,))
        # Lists become tuples so the frozen config is hashable and cannot change under a model.
        for name in ("target_modules", "exclude_modules", "modules_to_save", "layers_to_transform", "layers_pattern"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                object.__setattr__(self, name, tuple(value))
        object.__setattr__(self, "fused_projections",
                           {k: tuple(bool(b) for b in v) for k, v in dict(self.fused_projections).items()})
        object.__setattr__(self, "rank_pattern", dict(self.rank_pattern))
        object.__setattr__(self, "alpha_pattern", dict(self.alpha_pattern))
        self._validate()

    def _validate(self) -> None:
        if not _is_int(self.r) or self.r <= 0:
            raise ConfigError(Setting("r"), f" must be a positive integer (the LoRA rank), got {self.r!r}")
        if not _is_real(self.alpha) or self.alpha <= 0:
            raise ConfigError(Setting("alpha"), f" must be a positive number, got {self.alpha!r}")
        if not _is_real(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(Setting("dropout"), f" must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules:
            raise ConfigError("target_modules is empty: name the modules to adapt, "
                              "e.g. ['q_proj', 'v_proj'] or 'all-linear'")
        for name in ("target_modules", "exclude_modules", "modules_to_save", "layers_pattern"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str) and not _is_names(value):
                raise ConfigError(Setting(name), f" must be a list of module names (strings)"
                                  f"{' or a regular expression' if name.endswith('_modules') else ''}, "
                                  f"got {list(value)!r}")
        layers = self.layers_to_transform
        if layers is not None and (isinstance(layers, str) or not all(_is_int(i) and i >= 0 for i in layers)):
            raise ConfigError(Setting("layers_to_transform"), f" must be a list of layer indices (integers >= 0), "
                              f"got {layers!r}")
        for flag in ("use_rslora", "use_dora"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(Setting(flag), f" must be True or False, got {getattr(self, flag)!r}")
        for pattern, alpha in self.alpha_pattern.items():
            if not _is_real(alpha) or alpha <= 0:
                raise ConfigError(f"alpha_pattern[{pattern!r}] must be a positive number (as alpha), got {alpha!r}")
        if self.bias not in BIAS_MODES:
            raise ConfigError(f"bias must be one of {BIAS_MODES}, got {self.bias!r}")
        if not isinstance(self.init, str) or not (self.init in INIT_MODES or _PISSA_NITER.fullmatch(self.init)):
            raise ConfigError(Setting("init"), f" must be one of {INIT_MODES} or 'pissa_niter_K' (K a positive "
                              f"integer, e.g. 'pissa_niter_4'), got {self.init!r}")
        niter = _PISSA_NITER.fullmatch(self.init)
        if niter and not (re.fullmatch(r"[0-9]+", niter.group(1)) and int(niter.group(1)) >= 1):
            raise ConfigError(Setting("init"), f" {self.init!r}: K in 'pissa_niter_K' is the number of subspace "
                              f"iterations of the randomized SVD and must be a positive integer, e.g. "
                              f"'pissa_niter_4' (or 'pissa' for the exact SVD)")
        for pattern, rank in self.rank_pattern.items():
            if not _is_int(rank) or rank <= 0:
                raise ConfigError(f"rank_pattern[{pattern!r}] must be a positive integer, got {rank!r}")
        for pattern in [*self.rank_pattern, *self.alpha_pattern]:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"pattern {pattern!r} is not a valid regular expression: {e}") from None
        if isinstance(self.target_modules, str) and self.target_modules != ALL_LINEAR:
            try:
                re.compile(self.target_modules)
            except re.error as e:
                raise ConfigError(f"target_modules {self.target_modules!r} is a string, so it is read as a "
                                  f"regular expression, and it is not a valid one: {e}") from None
        for name, mask in self.fused_projections.items():
            if len(mask) < 2 or not any(mask):
                raise ConfigError(f"fused_projections[{name!r}] must list >= 2 slices with at least one "
                                  f"True, got {list(mask)}")

    # --- per-module values -------------------------------------------------------------------

    def rank_for(self, module_name: str) -> int:
        return _pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        return _pattern_value(self.alpha_pattern, module_name, self.alpha)

    def layer_index(self, module_name: str) -> int | None:
        """The block index ``layers_to_transform`` refers to in ``module_name`` (see ``layer_index``)."""
        return layer_index(module_name, self.layers_pattern)

    def fused_slices_for(self, module_name: str) -> tuple[bool, ...] | None:
        """The slice mask for a fused projection, or None for an ordinary layer."""
        return next((v for k, v in self.fused_projections.items() if name_matches(module_name, [k])), None)

    def scaling(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def replace(self, **changes: Any) -> "LoraConfig":
        return dataclasses.replace(self, **changes)

    # --- PEFT adapter_config.json ------------------------------------------------------------

    def to_peft_dict(self, *, fan_in_fan_out: bool = False,
                     base_model_name_or_path: str | None = None) -> dict[str, Any]:
        """The fields PEFT's LoraConfig reads, under PEFT's names."""
        targets = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        excluded = self.exclude_modules if isinstance(self.exclude_modules, (str, type(None))) \
            else list(self.exclude_modules)
        return {
            "peft_type": "LORA",
            "task_type": None,
            "base_model_name_or_path": base_model_name_or_path,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": targets,
            "exclude_modules": excluded,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "layers_to_transform": list(self.layers_to_transform) if self.layers_to_transform else None,
            "layers_pattern": self.layers_pattern if isinstance(self.layers_pattern, (str, type(None)))
            else list(self.layers_pattern),
            "bias": self.bias,
            "modules_to_save": list(self.modules_to_save) if self.modules_to_save else None,
            "fan_in_fan_out": fan_in_fan_out,
            "use_rslora": self.use_rslora,
            "init_lora_weights": True if self.init == "kaiming" else self.init,  # PEFT's strings otherwise
            "use_dora": self.use_dora,
            "inference_mode": True,
        }

    @classmethod
    def from_peft_dict(cls, d: Mapping[str, Any], *, source: str = "adapter_config.json") -> "LoraConfig":
        """Read PEFT's JSON; refuse what lorakit cannot reproduce rather than load it wrongly.

        Every field read is first checked for its JSON type (`_check_peft_types`), so a bad value
        is an error that names ``source`` and the key, never a TypeError from deep inside."""
        peft_type = d.get("peft_type")
        if peft_type != "LORA":
            raise ConfigError(f"{source}: peft_type is {peft_type!r}; lorakit reads LoRA adapters only "
                              f"(peft_type 'LORA')")
        _check_peft_types(d, source)
        for flag in ("use_qalora", "use_bdlora", "lora_bias"):
            if d.get(flag):
                raise ConfigError(f"{source}: {flag}=true is a LoRA variant lorakit does not implement")
        targets = d.get("target_modules")
        if targets is None:
            raise ConfigError(f"{source}: target_modules is missing")
        layers = d.get("layers_to_transform")
        if isinstance(layers, int):
            layers = [layers]
        try:
            return cls(
                r=d.get("r", 8),
                alpha=float(d.get("lora_alpha", 8)),
                dropout=float(d.get("lora_dropout") or 0.0),
                target_modules=targets if isinstance(targets, str) else list(targets),
                exclude_modules=d.get("exclude_modules"),
                rank_pattern=d.get("rank_pattern") or {},
                alpha_pattern=d.get("alpha_pattern") or {},
                layers_to_transform=layers,
                layers_pattern=d.get("layers_pattern") or None,
                bias=d.get("bias", "none"),
                modules_to_save=d.get("modules_to_save"),
                use_rslora=bool(d.get("use_rslora") or False),
                use_dora=bool(d.get("use_dora") or False),
                init=_init_from_peft(d.get("init_lora_weights", True)),
            )
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is no rank


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _is_real(value: Any) -> bool:
    """A finite real number of any numeric type (a numpy float too), but no bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _is_names(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)


# What each field of adapter_config.json that from_peft_dict reads must hold: (check, what to say).
# A key that is absent takes its default; `null` is accepted only where PEFT's field is Optional.
_PEFT_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "r": (lambda v: _is_int(v) and v > 0, "a positive integer (the LoRA rank)"),
    "lora_alpha": (lambda v: _is_number(v) and v > 0, "a positive number (α)"),
    "lora_dropout": (lambda v: v is None or (_is_number(v) and 0 <= v < 1), "a number in [0, 1)"),
    "target_modules": (lambda v: isinstance(v, str) or _is_names(v),
                       "a list of module names or a string (a regular expression, or 'all-linear')"),
    "exclude_modules": (lambda v: v is None or isinstance(v, str) or _is_names(v),
                        "null, a list of module names or a string (a regular expression)"),
    "rank_pattern": (lambda v: v is None or (isinstance(v, dict) and all(_is_int(k) and k > 0 for k in v.values())),
                     "an object mapping patterns to positive integers"),
    "alpha_pattern": (lambda v: v is None or (isinstance(v, dict) and all(_is_number(a) for a in v.values())),
                      "an object mapping patterns to numbers"),
    "layers_to_transform": (lambda v: v is None or _is_int(v) or
                            (isinstance(v, (list, tuple)) and all(map(_is_int, v))),
                            "null, a layer index or a list of layer indices"),
    "layers_pattern": (lambda v: v is None or isinstance(v, str) or _is_names(v),
                       "null, a string or a list of strings"),
    "bias": (lambda v: v in BIAS_MODES, f"one of {list(BIAS_MODES)}"),
    "modules_to_save": (lambda v: v is None or _is_names(v), "null or a list of module names"),
    "init_lora_weights": (lambda v: v is None or isinstance(v, (bool, str)), "true, false or the name of an init"),
    **{flag: (lambda v: v is None or isinstance(v, bool), "true or false")
       for flag in ("use_rslora", "use_dora", "use_qalora", "use_bdlora", "lora_bias")},
}


def _check_peft_types(d: Mapping[str, Any], source: str) -> None:
    """Refuse, in one message naming ``source``, every field whose value is not what it must hold."""
    bad = [f"{key} is {json.dumps(d[key], default=repr)}, expected {expected}"
           for key, (ok, expected) in _PEFT_FIELDS.items() if key in d and not ok(d[key])]
    if bad:
        raise ConfigError(f"{source}: " + "; ".join(bad))


def _init_from_peft(value: Any) -> str:
    """PEFT's init_lora_weights as a lorakit init. PiSSA and OLoRA are kept (PEFT redoes them on load:
    the base weight becomes the residual, then A and B come from the file); other PEFT inits only
    choose A and B, which the file overwrites, so they read as "kaiming"."""
    if isinstance(value, str):
        lowered = value.lower()
        if lowered in ("gaussian", "pissa", "olora") or _PISSA_NITER.fullmatch(lowered):
            return lowered
    return "kaiming"


def _pattern_value(patterns: Mapping[str, Any], module_name: str, default: Any) -> Any:
    # PEFT: a key applies when the module name ends with a match of it, at a dot boundary.
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?(?:{pattern})$", module_name):
            return value
    return default


def layer_index(module_name: str, layers_pattern: Sequence[str] | str | None = None) -> int | None:
    """The block index in a name like ``model.layers.3.mlp.up_proj`` (3), or None. With
    ``layers_pattern`` (PEFT's field), the index after the first of those container names (tried in
    order, as PEFT does: ``"layer"`` gives 0 in ``block.1.layer.0.SelfAttention.q``)."""
    if not layers_pattern:
        m = _LAYER_INDEX.search(module_name)
        return int(m.group(1)) if m else None
    for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
        m = re.match(rf"(?:^|.*?\.){pattern}\.(\d+)(?:\.|$)", module_name)
        if m:
            return int(m.group(1))
    return None


def name_matches(module_name: str, names: Sequence[str] | str) -> bool:
    """A list matches a name exactly or as a dotted suffix; a string is a full-match regex."""
    if isinstance(names, str):
        return re.fullmatch(names, module_name) is not None
    return any(module_name == n or module_name.endswith("." + n) for n in names)
