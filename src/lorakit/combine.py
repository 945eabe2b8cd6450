"""One new adapter from several: weighted sums, concatenation, SVD truncation and the sparsifying
merges (TIES, Yadav et al. 2023; DARE, Yu et al. 2024), with the semantics of PEFT's
``add_weighted_adapter``.

Two families, by what they combine:

- on ΔW itself: ``cat`` stacks the factors, ``A' = [w₁s₁A₁; w₂s₂A₂; ...]``, ``B' = [B₁ | B₂ | ...]``,
  so ``B'A' = Σ wᵢ·ΔWᵢ`` exactly at rank Σ rᵢ; ``svd`` takes the best rank-k approximation of
  ``Σ wᵢ·ΔWᵢ`` (Eckart–Young) as ``B' = U_k·S_k``, ``A' = V_kᵀ``.
- on A and B separately (every adapter needs the same rank there): each factor gets ``√|wᵢsᵢ|``
  (A carries the sign), then ``linear`` sums them, ``magnitude_prune`` keeps the largest ``density``
  of each first, ``ties`` also elects a sign per entry and averages the entries that agree with it,
  ``dare_linear``/``dare_ties`` drop entries at random (kept with probability ``density``, rescaled
  by 1/density) instead of by magnitude. ``B'A'`` is *not* ``Σ wᵢ·ΔWᵢ`` here (cross terms
  ``BᵢAⱼ`` appear): these are PEFT's heuristics, reproduced, not endorsed.

The new adapter has α = r (scaling 1: the adapters' scalings are folded into its factors) and is
added to the model like any other: frozen, not activated, usable with `lorakit.use` and
`lorakit.save_adapter`.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .config import ConfigError, LoraConfig, init_from_weight
from .hints import Setting, SettingError
from .inject import check_adapter_name, delete_adapter, find_targets, inject, lora_modules, lora_state
from .layers import LoraEmbedding, LoraLayer, LoraSlicedLinear

METHODS = ("cat", "svd", "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
PRUNING = ("ties", "dare_linear", "dare_ties", "magnitude_prune")  # the methods that take a density
FACTORWISE = ("linear", *PRUNING)  # the methods that combine A's with A's and B's with B's
RANDOM = ("dare_linear", "dare_ties")  # the methods that draw random masks (and take a seed)


class CombineError(SettingError):
    """Adapters that cannot be combined as asked; nothing on the model was changed."""


@dataclass(frozen=True)
class _Factors:
    """One source adapter at one layer."""

    adapter: str
    A: torch.Tensor  # (r, ...)
    B: torch.Tensor  # (d_out, r, ...)
    scaling: float


def check_combination(n_adapters: int, weights: Sequence[float], method: str, rank: int | None,
                      density: float | None, seed: int | None) -> list[float]:
    """The weights as floats, or a CombineError naming every bad argument. Needs no model, so the
    command line runs it before a model loads."""
    problems: list[list[str | Setting]] = []
    if method not in METHODS:
        problems.append([Setting("method", method), f" is not one of {METHODS}"])
    try:
        weights = [float(w) for w in weights]
    except (TypeError, ValueError):
        problems.append([Setting("weights"), f" must be numbers, got {list(weights)!r}"])
        weights = []
    else:
        if len(weights) != n_adapters:
            problems.append([Setting("weights"), f" has {len(weights)} value(s) for {n_adapters} adapter(s); "
                             f"give one weight per adapter, in the same order"])
        if not all(math.isfinite(w) for w in weights):
            problems.append([Setting("weights"), f" must be finite numbers, got {weights}"])
    if method == "svd":
        if rank is None:
            problems.append(["method 'svd' truncates to a rank: give ", Setting("rank")])
        elif isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            problems.append([Setting("rank"), f" must be a positive integer, got {rank!r}"])
    elif rank is not None:
        problems.append([Setting("rank"), f" applies to method 'svd' only (the rank of {method!r} follows from "
                         f"the adapters'); leave it out"])
    if method in PRUNING:
        if density is None:
            problems.append([f"method {method!r} keeps a fraction of the entries: give ", Setting("density"),
                             " in (0, 1]"])
        elif not (isinstance(density, (int, float)) and 0.0 < density <= 1.0):
            problems.append([Setting("density"), f" must be in (0, 1] (the fraction of entries kept), "
                             f"got {density!r}"])
    elif density is not None:
        problems.append([Setting("density"), f" applies to {PRUNING} only; leave it out for {method!r}"])
    if seed is not None and method not in RANDOM:
        problems.append([Setting("seed"), f" applies to {RANDOM} only ({method!r} draws nothing at random); "
                         f"leave it out"])
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        problems.append([Setting("seed"), f" must be an integer >= 0, got {seed!r}"])
    if problems:
        raise CombineError.joined(problems, prefix="cannot combine: ")
    return weights


def combine(model: nn.Module, adapters: Sequence[str], weights: Sequence[float], name: str, *,
            method: str = "cat", rank: int | None = None, density: float | None = None,
            seed: int | None = None) -> nn.Module:
    """Add adapter ``name``, a combination of ``adapters`` weighted by ``weights``; returns ``model``.

    ``method``: "cat" (exact: ΔW = Σ wᵢ·ΔWᵢ, rank Σ rᵢ), "svd" (that sum truncated to ``rank``),
    or, on A and B separately with equal ranks, "linear", "ties", "dare_linear", "dare_ties",
    "magnitude_prune" (the last four keep a fraction ``density`` in (0, 1] of the entries).
    Weights may be negative (to subtract an adapter).

    DARE's random masks come from a generator seeded with ``seed``, drawn in the order PEFT draws
    them, so ``seed=s`` gives what PEFT's ``add_weighted_adapter`` gives after ``torch.manual_seed(s)``
    on the same device; ``seed=None`` draws from torch's global generator, as PEFT does.

    A layer that only some of the adapters adapt combines those that it has (as PEFT does). Every
    check runs before the model is touched: on an error the model is as it was. Unlike PEFT, one
    adapter is combined by the method asked for (PEFT switches to "linear"), and an existing
    ``name`` is an error (PEFT returns silently).
    """
    adapters = list(adapters) if not isinstance(adapters, str) else [adapters]
    weights = check_combination(len(adapters), weights, method, rank, density, seed)
    state = lora_state(model)
    check_adapter_name(name)
    if name in state.configs:
        raise ValueError(f"adapter {name!r} is already on this model; delete it first or pick another name")
    if not adapters:
        raise CombineError("cannot combine: ", Setting("adapters"), " is empty; name the adapters to combine")
    unknown = [a for a in adapters if a not in state.configs]
    if unknown:
        raise KeyError(f"no adapter named {unknown} on this model; it has {list(state.configs)}")
    twice = sorted(a for a, n in Counter(adapters).items() if n > 1)
    if twice:
        raise CombineError("cannot combine: ", Setting("adapters"), f" names {twice} more than once; give each "
                           f"adapter once and put its whole weight in ", Setting("weights"))
    for a in adapters:
        config = state.configs[a]
        if config.modules_to_save:
            raise CombineError(f"cannot combine adapter {a!r}: it trains full copies of {list(config.modules_to_save)} "
                               f"(modules_to_save), which are not low-rank factors and cannot be combined")
        if init_from_weight(config.init):
            raise CombineError(f"cannot combine adapter {a!r}: its init {config.init!r} moved part of the base weights "
                               f"into its A and B, so it applies to that residual base only; save it with "
                               f"save_adapter(..., convert_to_lora=True), load that on the untouched base model, "
                               f"and combine there")
        if config.fused_projections:
            raise CombineError(f"cannot combine adapter {a!r}: it adapts slices of fused projections "
                               f"({list(config.fused_projections)}), which combine does not handle yet")

    layers = _layers_with(model, adapters)
    weight_of = dict(zip(adapters, weights))
    ranks = _new_ranks(layers, adapters, method, rank)
    config = _new_config(model, [state.configs[a] for a in adapters], layers, ranks)
    generator = None  # seed=None: torch's global generator
    if method in RANDOM and seed is not None:
        device = next(iter(layers.values()))[1][0].A.device
        generator = torch.Generator(device=device).manual_seed(seed)
    if method in RANDOM:
        _replay_peft_init_draws(layers, ranks, config.init, generator)
    factors = {module_name: _combine_layer(layer, sources, weight_of, method, ranks[module_name], density, generator)
               for module_name, (layer, sources) in layers.items()}

    dtype = next(iter(layers.values()))[1][0].A.dtype
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    cuda = sorted({s.A.device.index or 0 for _, sources in layers.values() for s in sources if s.A.is_cuda})
    with torch.random.fork_rng(devices=cuda):  # the new adapter's initial values are overwritten: draw nothing
        # A "cat" of several adapters may sum to a rank above what ΔW can use: the factors are
        # still exactly the sum of the inputs' ΔW, so the rank check of a new adapter does not apply.
        inject(model, config, name, dtype=dtype, check_rank=False)
    try:
        with torch.no_grad():
            for module_name, (layer, _) in layers.items():
                A, B = factors[module_name]
                if layer.scaling[name] != 1.0:  # α = r per layer is what the config says: a bug if not
                    raise RuntimeError(f"{module_name}: the combined adapter's scaling is {layer.scaling[name]}, not 1")
                layer.lora_A[name].copy_(A)
                layer.lora_B[name].copy_(B)
    except Exception:
        delete_adapter(model, name)
        raise
    finally:
        # inject() made the new adapter the only trainable part; combine changes no one's trainability,
        # and the new adapter is frozen, as a loaded one is.
        for param_name, p in model.named_parameters():
            p.requires_grad_(requires_grad.get(param_name, False))
    return model


# --- which layers, which ranks -------------------------------------------------------------------

def _layers_with(model: nn.Module, adapters: list[str]) -> dict[str, tuple[LoraLayer, list[_Factors]]]:
    """module name -> (layer, the factors of the adapters it has, in the order of ``adapters``), in
    the model's module order (the order in which PEFT draws DARE's masks)."""
    layers: dict[str, tuple[LoraLayer, list[_Factors]]] = {}
    for module_name, module in lora_modules(model):
        if not isinstance(module, LoraLayer):
            continue
        present = [a for a in adapters if a in module.lora_A]
        if not present:
            continue
        if isinstance(module, LoraSlicedLinear):
            raise CombineError(f"cannot combine at {module_name}: it is adapted by slices (fused_projections), "
                               f"which combine does not handle yet")
        for a in present:
            variant = module.variants[a]
            if not variant.additive or variant.name != "lora":
                raise CombineError(f"cannot combine adapter {a!r}: at {module_name} it is a {variant.name!r} "
                                   f"adapter; combine handles plain LoRA adapters only")
        layers[module_name] = (module, [_Factors(a, module.lora_A[a].detach(), module.lora_B[a].detach(),
                                                 module.scaling[a]) for a in present])
    if not layers:
        raise CombineError(f"cannot combine: the adapters {adapters} adapt no layer of this model")
    return layers


def _new_ranks(layers: dict[str, tuple[LoraLayer, list[_Factors]]], adapters: list[str], method: str,
               rank: int | None) -> dict[str, int]:
    """The combined adapter's rank at each layer."""
    if method == "cat":
        # PEFT's choice: Σ of each adapter's largest rank at every layer, the unused part zero.
        largest = {a: max(s.A.shape[0] for _, sources in layers.values() for s in sources if s.adapter == a)
                   for a in adapters}
        return {m: sum(largest.values()) for m in layers}
    if method == "svd":
        for module_name, (layer, sources) in layers.items():
            d_out, d_in = sources[0].B.shape[0], sources[0].A[0].numel()
            if rank > min(d_out, d_in):
                raise CombineError(f"cannot combine at {module_name}: ", Setting("rank", rank), f" is more than "
                                   f"ΔW there can have (its shape is ({d_out}, {d_in})); give at most "
                                   f"{min(d_out, d_in)}")
        return {m: rank for m in layers}
    ranks = {}
    for module_name, (_, sources) in layers.items():
        found = {s.adapter: s.A.shape[0] for s in sources}
        if len(set(found.values())) > 1:
            raise CombineError(f"cannot combine at {module_name}: method {method!r} combines A with A and B with B, "
                               f"so it needs equal ranks, and the adapters have {found} there; use ",
                               Setting("method", "cat"), " (exact) or ", Setting("method", "svd"),
                               " (truncated to a rank)")
        ranks[module_name] = next(iter(found.values()))
    return ranks


def _new_config(model: nn.Module, configs: list[LoraConfig], layers: dict, ranks: dict[str, int]) -> LoraConfig:
    """The combined adapter's config: α = r (scaling 1), targets that select exactly ``layers``."""
    first = configs[0]
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {_exact(m): k for m, k in ranks.items() if k != r}
    base = LoraConfig(r=r, alpha=float(r), dropout=first.dropout, target_modules=list(layers),
                      rank_pattern=pattern, alpha_pattern={k: float(v) for k, v in pattern.items()},
                      bias=first.bias, init=first.init)
    # The adapters' own target lists, joined, when they select exactly these layers (PEFT writes the
    # union); the full module names otherwise (another layers_to_transform, a regex, an exclusion).
    if all(isinstance(c.target_modules, (list, tuple)) for c in configs):
        union = list(dict.fromkeys(t for c in configs for t in c.target_modules))
        joined = base.replace(target_modules=union)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                selected = [n for n, _ in find_targets(model, joined, missing_targets="error")]
        except ConfigError:
            selected = None
        if selected is not None and sorted(selected) == sorted(layers):
            return joined
    return base


def _exact(module_name: str) -> str:
    # rank_pattern keys are regexes matched at a dotted suffix: the escaped full name selects one module.
    return module_name.replace(".", r"\.")


def _replay_peft_init_draws(layers: dict, ranks: dict[str, int], init: str, generator: torch.Generator | None) -> None:
    """Draw, and throw away, the random numbers PEFT (0.21) draws between ``torch.manual_seed`` and
    DARE's first mask: ``add_weighted_adapter`` first injects the new adapter, and each new layer's
    factors are made by ``nn.Linear``/``nn.ConvNd`` (a kaiming-uniform init of A and of B; embeddings:
    ``randn`` of both) and then initialised again (A kaiming-uniform or gaussian; embeddings: B
    normal), before the masks overwrite them. Replaying those draws, shape for shape, in PEFT's
    module order is what makes ``seed=s`` give PEFT's masks; `tests/test_combine.py` fails if PEFT
    changes them."""
    for module_name, (layer, sources) in layers.items():
        r, device = ranks[module_name], sources[0].A.device
        shape_a, shape_b = layer.adapter_shapes(r)

        def scratch(shape):
            return torch.empty(shape, device=device)

        if isinstance(layer, LoraEmbedding):
            torch.randn(shape_a, generator=generator, device=device)
            torch.randn(shape_b, generator=generator, device=device)
            nn.init.normal_(scratch(shape_b), generator=generator)
            continue
        for shape in (shape_a, shape_b):  # nn.Linear / nn.ConvNd(bias=False).reset_parameters()
            nn.init.kaiming_uniform_(scratch(shape), a=math.sqrt(5), generator=generator)
        if init == "gaussian":
            nn.init.normal_(scratch(shape_a), std=1 / r, generator=generator)
        else:
            nn.init.kaiming_uniform_(scratch(shape_a), a=math.sqrt(5), generator=generator)


# --- the math --------------------------------------------------------------------------------------

def _combine_layer(layer: LoraLayer, sources: list[_Factors], weight_of: dict[str, float], method: str,
                   rank: int, density: float | None, generator: torch.Generator | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') of the combined adapter at one layer, in the adapters' dtype, with scaling 1."""
    dtype = sources[0].A.dtype
    work = torch.promote_types(dtype, torch.float32)  # a bf16 adapter is combined in float32, rounded once
    A0, B0 = sources[0].A, sources[0].B
    if method == "cat":
        A = torch.zeros((rank, *A0.shape[1:]), dtype=work, device=A0.device)
        B = torch.zeros((B0.shape[0], rank, *B0.shape[2:]), dtype=work, device=B0.device)
        at = 0
        for s in sources:  # PEFT's layout: the adapters present here first, in order; zeros after
            r = s.A.shape[0]
            A[at:at + r] = s.A.to(work) * (weight_of[s.adapter] * s.scaling)
            B[:, at:at + r] = s.B.to(work)
            at += r
        return A.to(dtype), B.to(dtype)
    if method == "svd":
        # Σ wᵢ·sᵢ·Bᵢ·Aᵢ as a matrix: (d_out, r) @ (r, d_in·kernel) -> (d_out, d_in·kernel)
        delta = sum(weight_of[s.adapter] * s.scaling * (s.B.to(work).flatten(1) @ s.A.to(work).flatten(1))
                    for s in sources)
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        B = (U[:, :rank] * S[:rank]).reshape(B0.shape[0], rank, *B0.shape[2:])  # U_k·diag(S_k)
        A = Vh[:rank].reshape(rank, *A0.shape[1:])
        return A.to(dtype), B.to(dtype)
    # Factor by factor: √|w·s| on each side, the sign on A's, so that a lone adapter gives w·s·B·A.
    scale = [weight_of[s.adapter] * s.scaling for s in sources]
    weights_A = torch.tensor([math.copysign(math.sqrt(abs(c)), c) for c in scale], dtype=work, device=A0.device)
    weights_B = torch.tensor([math.sqrt(abs(c)) for c in scale], dtype=work, device=B0.device)
    A = _merge_tensors([s.A.to(work) for s in sources], weights_A, method, density, generator)
    B = _merge_tensors([s.B.to(work) for s in sources], weights_B, method, density, generator)
    return A.to(dtype), B.to(dtype)


def _merge_tensors(tensors: list[torch.Tensor], weights: torch.Tensor, method: str, density: float | None,
                   generator: torch.Generator | None) -> torch.Tensor:
    """One of the factor-wise merges of equally shaped tensors (PEFT's merge_utils semantics)."""
    if method in ("ties", "magnitude_prune"):
        tensors = [_keep_largest(t, density) for t in tensors]
    elif method in RANDOM:
        tensors = [_keep_random(t, density, generator) for t in tensors]
    stacked = torch.stack(tensors)  # (n, *shape)
    weighted = stacked * weights.view(-1, *([1] * (stacked.dim() - 1)))
    if method not in ("ties", "dare_ties"):
        return weighted.sum(0)
    # TIES: elect each entry's sign by the sum of the (pruned, unweighted) values, then average the
    # weighted entries whose sign agrees; an entry that no adapter keeps stays 0.
    elected = torch.where(stacked.sum(0) >= 0, 1.0, -1.0).to(stacked.dtype)
    agrees = stacked.sign() == elected
    return (weighted * agrees).sum(0) / agrees.sum(0).clamp(min=1)


def _keep_largest(t: torch.Tensor, density: float) -> torch.Tensor:
    """``t`` with all but its int(density·numel) largest-magnitude entries set to 0."""
    if density >= 1:
        return t
    keep = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    keep[torch.topk(t.abs().flatten(), k=int(density * t.numel())).indices] = 1
    return t * keep.view(t.shape)


def _keep_random(t: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` and rescale by 1/density, so E[result] = t.
    One Bernoulli draw per entry, shaped like ``t`` (as PEFT draws it, so seeds give the same masks)."""
    if density >= 1:
        return t
    kept = torch.bernoulli(torch.full_like(t, density), generator=generator)
    return t * kept / density
