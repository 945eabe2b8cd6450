"""Figures of an analysis report as PNGs: φ heatmaps (in the spirit of Hu et al. 2021, Figures 3-4),
singular-value spectra of ΔW, and the amplification of Table 7 per layer.

Matplotlib's object API with the Agg canvas: no pyplot, so no global backend is chosen, no figure
is left registered anywhere and no window can open, whatever the caller's matplotlib settings.
Layers are grouped by module kind (``model.layers.*.self_attn.q_proj``): one figure per group,
layers in number order (the report's order, ``delta.layer_order``).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Sequence

from ..files import atomic_save_figure

__all__ = ["write_figures", "group_of"]

_MAX_COLS = 6


def group_of(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``model.layers.*.self_attn.q_proj``."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name)


def write_figures(report: dict, out_dir: str | os.PathLike) -> list[str]:
    """Write every figure of ``report`` (as ``analyze_adapters`` returns it) into ``out_dir``;
    returns the file names, in the order the report should show them."""
    out = Path(out_dir)
    labels = [a["label"] for a in report["adapters"]]
    written = []
    groups: dict[str, list[dict]] = {}
    for layer in report["layers"]:
        groups.setdefault(layer["group"], []).append(layer)
    for group, layers in groups.items():
        slug = _slug(group)
        if len(labels) == 2:
            for factor in ("A", "B"):
                name = f"subspace_{factor}_{slug}.png"
                _save(_subspace_figure(layers, factor, group, labels), out / name)
                written.append(name)
        name = f"spectrum_{slug}.png"
        _save(_spectra_figure(layers, group, labels), out / name)
        written.append(name)
    amplified = [layer for layer in report["layers"] if "amplification" in layer["adapters"][0]]
    if amplified:
        _save(_amplification_figure(amplified, labels), out / "amplification.png")
        written.append("amplification.png")
    return written


def _subspace_figure(layers: Sequence[dict], factor: str, group: str, labels: Sequence[str]):
    from matplotlib import colormaps

    grids = [[[_finite(v) for v in row] for row in layer["subspace"][factor]] for layer in layers]
    undefined = any(math.isnan(v) for phi in grids for row in phi for v in row)
    fig, axes = _grid_figure(len(layers), cell=(2.4, 2.2), colorbar=True, top=0.8 if undefined else 0.6)
    cmap = colormaps["viridis"].with_extremes(bad="lightgrey")  # nan: past a factor's rank, undefined
    image = None
    for n, (ax, layer, phi) in enumerate(zip(axes, layers, grids)):
        r1, r2 = len(phi), len(phi[0])
        # extent puts i = 1..r1 down the rows and j = 1..r2 along the columns, as in the paper
        image = ax.imshow(phi, vmin=0.0, vmax=1.0, cmap=cmap, aspect="auto", interpolation="nearest",
                          extent=(0.5, r2 + 0.5, r1 + 0.5, 0.5))
        ax.set_title(_short(layer), fontsize=8)
        _outer_labels(ax, n, len(layers), f"j ({labels[1]})", f"i ({labels[0]})")
        _integer_ticks(ax, "x", "y")
        ax.tick_params(labelsize=6)
    singular = "right" if factor == "A" else "left"
    grey = "\ngrey: undefined, i or j past that factor's rank (e.g. B still zero)" if undefined else ""
    fig.suptitle(f"φ(i, j) of {factor} ({singular}-singular vectors), {group}{grey}", fontsize=9)
    if image is not None:
        fig.colorbar(image, cax=fig.axes[-1], label="φ")
    return fig


def _spectra_figure(layers: Sequence[dict], group: str, labels: Sequence[str]):
    """One panel per adapter, one line per layer; a colour bar maps the line colour to the layer number."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    several = len(layers) > 1  # one line needs no colour scale: the title names its layer
    fig, axes = _grid_figure(len(labels), cell=(4.2, 3.2), colorbar=several, left=0.9)
    cmap = colormaps["viridis"]
    # A layer's number where it has one (model.layers.7...), else its position in the group.
    numbers = [layer["index"] if layer.get("index") is not None else n for n, layer in enumerate(layers)]
    low, high = (min(numbers), max(numbers)) if numbers else (0, 0)
    norm = Normalize(low - 0.5, high + 0.5) if low == high else Normalize(low, high)
    for k, (ax, label) in enumerate(zip(axes, labels)):
        drawn = False
        for number, layer in zip(numbers, layers):
            s = [v for v in layer["adapters"][k]["singular_values"] if v > 0]
            if s:
                ax.semilogy(range(1, len(s) + 1), s, "o-", markersize=2, linewidth=0.8, color=cmap(norm(number)))
                drawn = True
        if not drawn:  # a log axis cannot show σ = 0: say so rather than leave a blank panel
            ax.text(0.5, 0.5, "ΔW = 0 in every layer here\n(B still at its zero init?)", transform=ax.transAxes,
                    ha="center", va="center", fontsize=8)
            ax.set_yscale("log")
        ax.set_title(label, fontsize=8)
        ax.set_xlabel("k", fontsize=7)
        ax.set_ylabel("σ_k(ΔW)", fontsize=7)
        _integer_ticks(ax, "x")
        ax.tick_params(which="both", labelsize=7)
        ax.grid(alpha=0.3)
    _share_y(axes)
    if several:
        bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=fig.axes[-1])
        bar.set_label("layer" if any(layer.get("index") is not None for layer in layers) else "position",
                      fontsize=7)
        bar.ax.tick_params(labelsize=6)
        _integer_ticks(bar.ax, "y")
    what = f"{len(layers)} layers" if several else f"{len(layers)} layer"
    fig.suptitle(f"singular values of ΔW, {group} ({what})", fontsize=9)
    return fig


def _amplification_figure(layers: Sequence[dict], labels: Sequence[str]):
    """Bars of the amplification factor per layer and adapter, then, for each adapter, the
    projections it is made of (each adapter has its own U, V and its own r); legends sit right of
    the axes, so they never cover a bar or a line."""
    from matplotlib.figure import Figure

    left, right, top, bottom = 0.9, 1.7, 0.45, 1.1  # inches; right holds the legends
    panel = 3.0
    width_in, height_in = max(7.0, 0.3 * len(layers) + left + right), panel * (1 + len(labels)) + top + bottom
    fig = Figure(figsize=(width_in, height_in), dpi=100)
    upper, *lowers = fig.subplots(1 + len(labels), 1, sharex=True, gridspec_kw=dict(
        left=left / width_in, right=1 - right / width_in, top=1 - top / height_in, bottom=bottom / height_in,
        hspace=0.25))
    x = list(range(len(layers)))
    width = 0.8 / len(labels)
    for k, label in enumerate(labels):
        values = [_finite(layer["adapters"][k]["amplification"]["amplification"]) for layer in layers]
        none = all(math.isnan(v) for v in values)  # ΔW = 0 everywhere: no bar to draw, say why
        upper.bar([i + (k - (len(labels) - 1) / 2) * width for i in x], values, width,
                  label=f"{label} (n/a: ΔW = 0)" if none else label)
    upper.set_ylabel("‖ΔW‖_F / ‖UᵀWV‖_F", fontsize=9)
    upper.set_title("amplification factor (Hu et al. 2021, Table 7)", fontsize=10)
    upper.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, title="adapter",
                 title_fontsize=8)
    upper.grid(axis="y", alpha=0.3)
    for k, (lower, label) in enumerate(zip(lowers, labels)):
        rows = [layer["adapters"][k]["amplification"] for layer in layers]
        for key, name, style in (("projected_norm", "U, V of ΔW", "o-"), ("w_projected_norm", "top-r of W", "s-"),
                                 ("random_projected_norm", "random", "^-"), ("w_norm", "‖W‖_F itself", ":")):
            lower.semilogy(x, [_finite(row[key], floor=True) for row in rows], style, markersize=3, label=name)
        if not any(row["r"] for row in rows):
            lower.text(0.5, 0.5, "ΔW = 0 in every layer: no directions to project W onto", transform=lower.transAxes,
                       ha="center", va="center", fontsize=8)
        lower.set_ylabel("‖UᵀWV‖_F", fontsize=9)
        lower.set_title(f"projections of W onto r directions: {label}", fontsize=9)
        lower.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        lower.grid(alpha=0.3)
    lowers[-1].set_xticks(x, [_short(layer, module=True) for layer in layers], rotation=90, fontsize=8)
    lowers[-1].set_xlabel("layer.module", fontsize=9)
    _share_y(lowers)
    for ax in (upper, *lowers):
        ax.tick_params(axis="y", which="both", labelsize=8)
        ax.set_xlim(-0.6, len(layers) - 0.4)
    return fig


def _share_y(axes) -> None:
    """One y range for every panel that has lines, so adapters side by side compare by eye."""
    ranges = [ax.get_ylim() for ax in axes if ax.get_lines()]
    if len(ranges) > 1:
        low, high = min(r[0] for r in ranges), max(r[1] for r in ranges)
        for ax in axes:
            ax.set_ylim(low, high)


def _grid_figure(n: int, cell: tuple[float, float], colorbar: bool = False, left: float = 0.6, top: float = 0.6):
    """A grid of n axes, at most _MAX_COLS wide, with fixed margins in inches (a constrained layout
    costs seconds per figure at 30 panels); with ``colorbar``, its axes is ``fig.axes[-1]``."""
    from matplotlib.figure import Figure

    cols = min(n, _MAX_COLS)
    rows = math.ceil(n / cols)
    right, bottom = 0.3 + (0.9 if colorbar else 0.0), 0.5  # inches, as `left` and `top`
    width, height = cell[0] * cols + left + right, cell[1] * rows + top + bottom
    fig = Figure(figsize=(width, height), dpi=100)
    axes = fig.subplots(rows, cols, squeeze=False, gridspec_kw=dict(
        left=left / width, right=1 - right / width, top=1 - top / height, bottom=bottom / height,
        wspace=0.35, hspace=0.45)).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    if colorbar:
        fig.add_axes((1 - (right - 0.25) / width, bottom / height, 0.15 / width, 1 - (top + bottom) / height))
    return fig, list(axes[:n])


def _outer_labels(ax, n: int, total: int, xlabel: str, ylabel: str) -> None:
    """Axis labels on the left column and on the lowest panel of each column only."""
    cols = min(total, _MAX_COLS)
    if n % cols == 0:
        ax.set_ylabel(ylabel, fontsize=7)
    if n + cols >= total:
        ax.set_xlabel(xlabel, fontsize=7)


def _save(fig, path: Path) -> None:
    """Render with the Agg canvas into a temp file beside ``path``, then rename it into place."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    atomic_save_figure(fig, path)


def _short(layer: dict, module: bool = False) -> str:
    """``layer 3`` (or ``3.q_proj`` with ``module``); the full name where there is no index."""
    if layer.get("index") is None:
        return layer["name"]
    return f"{layer['index']}.{layer['name'].rsplit('.', 1)[-1]}" if module else f"layer {layer['index']}"


def _integer_ticks(ax, *axes: str) -> None:
    from matplotlib.ticker import MaxNLocator

    for which in axes:
        getattr(ax, f"{which}axis").set_major_locator(MaxNLocator(integer=True))


def _slug(group: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", group.replace(".*", "")).strip("._") or "layers"


def _finite(value: float | None, floor: bool = False) -> float:
    if value is None or not math.isfinite(value):
        return math.nan  # matplotlib leaves a gap
    return value if not floor or value > 0 else math.nan
