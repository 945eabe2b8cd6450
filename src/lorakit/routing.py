"""Per-call routing: which rows (or tokens) of a forward's input use which adapter.

    with lorakit.route(model, ["sql", None, "chat", "sql"]):    # one adapter (or None) per row
        logits = model(input_ids).logits

    with lorakit.route(model, index, names=["sql", "chat"]):   # index: (N,) or (N, L), -1 = base
        ...

Inside the block each LoRA layer holds a `LayerRoute`: its own adapters among the routed ones and
the index remapped to them (a layer that lacks an adapter gives those rows the base output). The
layers compute it with the same op as training (`ops/lora_linear.py`), which is the one-route case.
The context sets the routes on entry and clears them on exit, even when the forward raises.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn


@dataclass(frozen=True)
class LayerRoute:
    """One layer's view of a route: ``index`` values point into ``names`` (-1: no adapter)."""

    names: tuple[str, ...]
    index: torch.Tensor  # int64, (N,) per row or (N, L) per token

    def aligned_to(self, out: torch.Tensor) -> torch.Tensor:
        """The index viewed to broadcast against ``out`` (N, ...) or (N, L, ...)."""
        index = self.index
        if tuple(out.shape[:index.dim()]) != tuple(index.shape):
            raise ValueError(f"the route has shape {tuple(index.shape)} (one adapter per row, or per token), "
                             f"but this layer's output has shape {tuple(out.shape)}: route as many rows as "
                             f"the batch has")
        return index.view(*index.shape, *(1,) * (out.dim() - index.dim()))

    def rows_of(self, x: torch.Tensor) -> torch.Tensor:
        """The index expanded to x's rows, x.shape[:-1], for a linear layer's input."""
        return self.aligned_to(x[..., :1]).expand(x.shape[:-1] + (1,))[..., 0]


@contextlib.contextmanager
def route(model: nn.Module, adapters: Sequence[str | None] | torch.Tensor,
          names: Sequence[str] | None = None) -> Iterator[nn.Module]:
    """Route rows of the next forwards to adapters: ``adapters`` gives one adapter name (or None for
    the base model) per row, or is an int index tensor of shape (N,) or (N, L) into ``names``
    (-1: the base model). Adapters must not be merged (a merged adapter is inside every row's weight)."""
    from .inject import lora_modules, lora_state
    from .layers import LoraLayer

    state = lora_state(model)
    index, names = _index_and_names(adapters, names)
    unknown = [n for n in names if n not in state.configs]
    if unknown:
        raise KeyError(f"route names adapters {unknown} that this model does not have; it has {list(state.configs)}")
    layers = [m for _, m in lora_modules(model) if isinstance(m, LoraLayer)]
    merged = sorted({n for layer in layers for n in layer.merged_adapters})
    if merged:
        raise ValueError(f"adapters {merged} are merged into the base weights, so every row would use them; "
                         f"call lorakit.unmerge(model) before routing")
    device = next((p.device for p in model.parameters()), index.device)
    index = index.to(device)
    remapped: dict[tuple[str, ...], LayerRoute] = {}  # one remapped index per distinct adapter set
    try:
        for layer in layers:
            own = tuple(n for n in names if n in layer.lora_A)
            if own not in remapped:
                table = torch.tensor([own.index(n) if n in own else -1 for n in names] + [-1], device=device)
                local = index if own == tuple(names) else table[index]  # -1 picks the table's last entry: -1
                remapped[own] = LayerRoute(own, local)
            layer.route = remapped[own]
        yield model
    finally:
        for layer in layers:
            layer.route = None


def _index_and_names(adapters, names) -> tuple[torch.Tensor, tuple[str, ...]]:
    if isinstance(adapters, torch.Tensor):
        if names is None:
            raise ValueError("a route given as an index tensor needs names=[...], the adapters its values point to")
        if adapters.dtype not in (torch.int32, torch.int64) or adapters.dim() not in (1, 2):
            raise ValueError(f"a route index must be an int tensor of shape (N,) or (N, L), got "
                             f"{adapters.dtype} {tuple(adapters.shape)}")
        names = tuple(names)
        bad = adapters[(adapters < -1) | (adapters >= len(names))]
        if bad.numel():
            raise ValueError(f"route index values must be in [-1, {len(names) - 1}] for names {list(names)}; "
                             f"got {bad[0].item()}")
        return adapters.long(), names
    if names is not None:
        raise ValueError("names=... goes with an index tensor; a list of adapter names is its own names")
    names = tuple(dict.fromkeys(n for n in adapters if n is not None))
    return torch.tensor([names.index(n) if n is not None else -1 for n in adapters], dtype=torch.long), names
