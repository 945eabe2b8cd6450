"""The loss curve of a run, from its metrics.jsonl, as a PNG.

Matplotlib's object API with the Agg canvas: no pyplot, so no global backend is chosen and no
window can open, whatever the caller's matplotlib settings.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..files import atomic_save_figure
from .log import read_metrics


def plot_losses(metrics_path: str | os.PathLike, png_path: str | os.PathLike) -> Path | None:
    """Train loss (and eval loss, where logged) against the step. Returns the PNG's path, or None
    when there is nothing to plot yet."""
    fig = loss_figure(read_metrics(Path(metrics_path)))
    return None if fig is None else atomic_save_figure(fig, Path(png_path))


def loss_figure(rows: list[dict]) -> Any:
    """The figure of `plot_losses` from metrics rows, or None when no row has a loss."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    if not train and not evals:
        return None
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:  # a marker where the points are few, or a single logged step would draw nothing
        ax.plot(*zip(*train), marker="." if len(train) < 30 else None, label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", linewidth=1.2, markersize=3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers, never 1.925
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean per target token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig
