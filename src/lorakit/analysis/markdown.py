"""The analysis report as Markdown: the adapters, per-layer norms and ranks, subspace similarity,
Table 7's amplification, skipped layers with reasons, the figures and the definitions."""

from __future__ import annotations

import math

__all__ = ["render_markdown"]


def render_markdown(report: dict) -> str:
    adapters, layers = report["adapters"], report["layers"]
    lines = ["# LoRA adapter analysis", ""]
    lines += _table(["#", "adapter", "r", "α", "scaling", "targets", "layers", "rank/alpha patterns"],
                    [[str(k + 1), f"`{a['path']}` ({a['label']})", str(a["r"]), _num(a["alpha"]),
                      "α/√r (rsLoRA)" if a["use_rslora"] else "α/r", _targets(a["target_modules"]), str(a["layers"]),
                      _patterns(a)] for k, a in enumerate(adapters)])
    if report.get("model"):
        lines += ["", f"Base model: `{report['model']}`."]
    lines += ["", f"{len(layers)} layer(s) analysed" + (" (adapted by both)." if len(adapters) == 2 else ".")]
    for a in adapters:
        if a.get("use_dora"):
            lines.append(f"- `{a['label']}` is a DoRA adapter: ΔW here is s·B·A, the update of the direction; "
                         "its magnitude vectors (`lora_magnitude_vector`) rescale each output row of the merged "
                         "weight as well, so the merged weight changes by more than ΔW.")
        if a["ignored_tensors"]:
            lines.append(f"- `{a['label']}`: {len(a['ignored_tensors'])} tensor(s) that are not LoRA factors "
                         f"(biases, modules_to_save) are not analysed.")
    if report["skipped"]:
        lines += ["", "## Skipped layers", ""]
        lines += [f"- `{name}`: {why}" for name, why in report["skipped"].items()]

    for k, a in enumerate(adapters):
        lines += ["", f"## ΔW per layer: {a['label']}", ""]
        lines += _table(["layer", "r", "s", "‖ΔW‖_F", "σ_max", "effective rank", "stable rank", "numerical rank"],
                        [[f"`{layer['name']}`", str(s["stored_rank"]), _num(s["scaling"]), _num(s["delta_norm"]),
                          _num(s["spectral_norm"]), _num(s["effective_rank"], 2), _num(s["stable_rank"], 2),
                          str(s["numerical_rank"])]
                         for layer in layers for s in [layer["adapters"][k]]])

    if len(adapters) == 2 and layers:
        lines += ["", "## Subspace similarity (§7.2)", "",
                  f"φ between `{adapters[0]['label']}` (i) and `{adapters[1]['label']}` (j); k = the smaller "
                  f"rank; chance = the expected φ(k, k) of random subspaces; n/a where k exceeds a factor's "
                  f"numerical rank (a B still at its zero init has no directions to compare).", ""]
        lines += _table(["layer", "k", "φ_A(1,1)", "φ_A(k,k)", "chance_A(k,k)", "φ_B(1,1)", "φ_B(k,k)",
                         "chance_B(k,k)"],
                        [[f"`{layer['name']}`", str(s["k"]), _num(s["A_top1"], 3), _num(s["A_full"], 3),
                          _num(s["A_chance_full"], 3), _num(s["B_top1"], 3), _num(s["B_full"], 3),
                          _num(s["B_chance_full"], 3)] for layer in layers for s in [layer["subspace"]]])

    amplified = [layer for layer in layers if "amplification" in layer["adapters"][0]]
    if amplified or report.get("amplification_skipped"):
        lines += ["", "## ΔW vs W: amplification (§7.3, Table 7)", "",
                  "‖UᵀWV‖_F with U, V the top-r singular directions of ΔW, of W itself, and random "
                  f"(seed {report['seed']}).", ""]
        rows = []
        for layer in amplified:
            for a, s in zip(adapters, layer["adapters"]):
                amp = s["amplification"]
                rows.append([f"`{layer['name']}`", a["label"], str(amp["r"]), _num(amp["projected_norm"]),
                             _num(amp["w_projected_norm"]), _num(amp["random_projected_norm"]),
                             _num(amp["w_norm"]), _num(amp["delta_norm"]), _num(amp["amplification"], 3)])
        if rows:
            lines += _table(["layer", "adapter", "r", "ΔW dirs", "W top-r", "random", "‖W‖_F", "‖ΔW‖_F",
                             "amplification"], rows)
        if report.get("amplification_skipped"):
            lines += ["", "Layers without a base weight in the model:", ""]
            lines += [f"- `{name}`: {why}" for name, why in report["amplification_skipped"].items()]

    if report.get("figures"):
        lines += ["", "## Figures", ""]
        lines += [f"![{name}]({name})" for name in report["figures"]]
    lines += ["", "## Definitions", ""]
    lines += [f"- **{key}**: {text}" for key, text in report["definitions"].items()]
    return "\n".join(lines) + "\n"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]


def _num(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    return f"{value:.{digits}g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"


def _targets(targets) -> str:
    return f"`{targets}`" if isinstance(targets, str) else ", ".join(f"`{t}`" for t in targets)


def _patterns(a: dict) -> str:
    parts = [f"r `{k}`={v}" for k, v in a["rank_pattern"].items()]
    parts += [f"α `{k}`={v}" for k, v in a["alpha_pattern"].items()]
    return "; ".join(parts) or "none"
