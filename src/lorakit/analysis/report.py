"""Analyse one or two adapters layer by layer, and write the result as report.md, report.json and
PNG figures (what ``lorakit analyze`` does).

With one adapter: ‖ΔW‖_F, the singular values of ΔW and its ranks per layer. With two: the same
for both, on the layers both adapt, plus φ grids of A and B (§7.2). With a base model: Table 7's
projections of W per layer and adapter (§7.3).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..config import layer_index
from ..files import atomic_write_text
from .amplification import amplification
from .delta import AdapterDeltas, common_layers, base_weights, read_adapter_deltas
from .markdown import render_markdown
from .plots import group_of, write_figures
from .spectrum import numerical_rank, spectrum_summary
from .subspace import chance_similarity, column_subspace_similarity, subspace_similarity

__all__ = ["analyze_adapters", "write_report"]

REPORT_JSON, REPORT_MD = "report.json", "report.md"


def analyze_adapters(adapters: Sequence[str | os.PathLike | AdapterDeltas], model: nn.Module | None = None, *,
                     seed: int = 0, model_name: str | None = None) -> dict:
    """The report of one or two adapters (directories, or already read with ``read_adapter_deltas``).

    Layers that not every adapter adapts are skipped, with the reason under ``skipped``; adapters
    whose common layers differ in shape raise AnalysisError. With ``model``, each layer's base
    weight is looked up by module name for the amplification numbers; a layer the model lacks is
    listed under ``amplification_skipped``. Values are plain Python (inf/nan where they arise);
    ``write_report`` turns those into JSON nulls.
    """
    if not 1 <= len(adapters) <= 2:
        raise ValueError(f"analyze takes one or two adapters, got {len(adapters)}")
    adapters = [a if isinstance(a, AdapterDeltas) else read_adapter_deltas(a) for a in adapters]
    names, skipped = common_layers(adapters)
    weights, amplification_skipped = {}, {}
    if model is not None:
        weights, amplification_skipped = base_weights(model, [adapters[0].layers[n] for n in names])
    layers = [_layer_entry(name, [a.layers[name] for a in adapters], weights.get(name), seed) for name in names]
    labels = _labels([a.path for a in adapters])
    return {
        "adapters": [_adapter_entry(a, label) for a, label in zip(adapters, labels)],
        "model": model_name if model_name is not None else (type(model).__name__ if model is not None else None),
        "seed": seed,
        "layers": layers,
        "skipped": skipped,
        "amplification_skipped": amplification_skipped,
        "definitions": DEFINITIONS,
    }


DEFINITIONS = {
    "delta_w": "ΔW = s·B·A in the (d_out, d_in) layout, s = α/r (α/√r with use_rslora), per-layer r and α "
               "from rank_pattern / alpha_pattern",
    "effective_rank": "entropy-based effective rank (Roy & Vetterli 2007): exp(-Σ p_k log p_k), p_k = σ_k / Σσ",
    "stable_rank": "Σσ² / σ_max²",
    "numerical_rank": "number of σ_k > max(d_out, d_in)·eps·σ_max, eps of the stored dtype",
    "phi": "φ(i, j) = ‖U_iᵀU_j‖_F² / min(i, j), U_i the top-i right-singular vectors of A (left-singular "
           "of B) of the first adapter, U_j the top-j of the second (Hu et al. 2021, §7.2); entry [i-1][j-1]; "
           "null where i or j exceeds that factor's numerical rank (e.g. a B still at its zero init), since its "
           "singular directions there are arbitrary",
    "chance": "expected φ for random subspaces: max(i, j) / d",
    "amplification": "‖ΔW‖_F / ‖UᵀWV‖_F, U, V the top-r singular vectors of ΔW, r its numerical rank; "
                     "w_projected_norm uses W's own top-r, random_projected_norm seeded random orthonormal "
                     "directions (Hu et al. 2021, §7.3, Table 7)",
}


def _layer_entry(name: str, deltas, W, seed: int) -> dict:
    first = deltas[0]
    entry = {"name": name, "group": group_of(name), "index": _index(name), "kind": first.kind,
             "shape": list(first.shape), "adapters": []}
    for delta in deltas:
        _, S, _ = delta.svd()
        stats = {"rank": delta.rank, "stored_rank": delta.A.shape[0], "alpha": delta.alpha,
                 "scaling": delta.scaling, **spectrum_summary(S, delta.shape, delta.stored_dtype)}
        if W is not None:
            stats["amplification"] = amplification(W, delta, seed=seed)
        entry["adapters"].append(stats)
    if len(deltas) == 2:
        d1, d2 = deltas
        # Singular directions past a factor's rank are arbitrary (a B still at its zero init has no
        # directions at all), so φ there is noise that would read as a finding: nan (JSON null) instead.
        phi_a = _defined(subspace_similarity(d1.A, d2.A), _rank(d1.A, d1), _rank(d2.A, d2))
        phi_b = _defined(column_subspace_similarity(d1.B, d2.B), _rank(d1.B, d1), _rank(d2.B, d2))
        k = min(d1.A.shape[0], d2.A.shape[0])
        d_out, d_in = first.shape
        entry["subspace"] = {
            "A": _rounded(phi_a), "B": _rounded(phi_b), "k": k,
            "A_top1": phi_a[0, 0].item(), "A_full": phi_a[k - 1, k - 1].item(),
            "B_top1": phi_b[0, 0].item(), "B_full": phi_b[k - 1, k - 1].item(),
            "A_chance_full": chance_similarity(k, k, d_in)[-1, -1].item(),
            "B_chance_full": chance_similarity(k, k, d_out)[-1, -1].item(),
        }
    return entry


def _rank(factor, delta) -> int:
    """The numerical rank of one LoRA factor, with the eps of the dtype it was stored in."""
    return numerical_rank(torch.linalg.svdvals(factor), tuple(factor.shape), delta.stored_dtype)


def _defined(phi: torch.Tensor, rank1: int, rank2: int) -> torch.Tensor:
    """φ(i, j) where both subspaces exist (i ≤ rank1, j ≤ rank2); nan elsewhere."""
    phi = phi.clone()
    phi[rank1:, :] = math.nan
    phi[:, rank2:] = math.nan
    return phi


def _adapter_entry(a: AdapterDeltas, label: str) -> dict:
    c = a.config
    targets = c.target_modules if isinstance(c.target_modules, str) else list(c.target_modules)
    return {"path": a.path, "label": label, "r": c.r, "alpha": c.alpha, "use_rslora": c.use_rslora,
            "use_dora": c.use_dora,
            "rank_pattern": dict(c.rank_pattern), "alpha_pattern": dict(c.alpha_pattern),
            "target_modules": targets, "layers": len(a.layers), "ignored_tensors": list(a.ignored)}


def write_report(report: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write the figures, then report.md, then report.json into ``out_dir`` (created if missing).

    Every file goes to a temp file beside it and is renamed into place, so a crash leaves either
    the previous file or the new one, never half of one; report.json comes last, so when it is
    there the run finished. Returns {"json": ..., "markdown": ..., "figures": [...]} paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    earlier = _earlier_figures(out / REPORT_JSON)
    figures = write_figures(report, out)
    report = {**report, "figures": figures}
    md, js = out / REPORT_MD, out / REPORT_JSON
    atomic_write_text(md, render_markdown(report))
    atomic_write_text(js, json.dumps(_json_safe(report), indent=1, allow_nan=False) + "\n")
    # An earlier report's figures that this one does not make (a second adapter, a model) would sit
    # beside it looking current; only files that report.json listed go, nothing else in the folder.
    for name in earlier - set(figures):
        (out / name).unlink(missing_ok=True)
    return {"json": js, "markdown": md, "figures": [out / f for f in figures]}


def _earlier_figures(path: Path) -> set[str]:
    """The figure files that the report.json at ``path`` lists (plain PNG names in its folder)."""
    try:
        listed = json.loads(path.read_text(encoding="utf-8")).get("figures", [])
    except (OSError, ValueError, AttributeError):
        return set()
    return {name for name in listed if isinstance(name, str) and name.endswith(".png")
            and Path(name).name == name and not name.startswith(".")}


def _json_safe(value):
    """JSON has no inf or nan: they become null (the markdown says ∞ / n/a)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _rounded(grid) -> list[list[float]]:
    return [[round(v, 6) for v in row] for row in grid.tolist()]


def _index(name: str) -> int | None:
    index = layer_index(name)
    if index is None:
        m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
        index = int(m.group(1)) if m else None
    return index


def _labels(paths: Sequence[str]) -> list[str]:
    """Short names for figures: the directory name, with more of the path where two would clash."""
    parts = [Path(p).resolve().parts for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    # The same folder twice: its name, numbered (the full path is in the report's table).
    return [f"{i + 1}: {p[-1]}" for i, p in enumerate(parts)]
