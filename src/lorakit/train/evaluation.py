"""Evaluation during training: mean loss per target token over the eval set (and accuracy for a
classifier), plus whatever a caller's `eval_fn(model)` measures (BLEU of generations, ...).

The eval loss never uses label smoothing: it is the plain negative log-likelihood, comparable
across runs. Under torchrun each rank scores its rows and the sums are added; `eval_fn` runs on
rank 0 only. Nothing here moves the training run's random state (see `preserved_rng`), so a run
that evaluates more or less often still trains the same adapter.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import islice
from typing import Any

import numpy as np
import torch
from torch import nn

from ..prefix import PrefixEmbedding, prefix_batch
from . import distributed
from .loss import LossFn, compute_loss

EvalFn = Callable[[nn.Module], Mapping[str, float]]


@contextlib.contextmanager
def preserved_rng(device: torch.device) -> Iterator[None]:
    """Run the block, then put torch's (CPU and this CUDA device's), Python's and numpy's
    generators back as they were."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def one_pass(batches: Iterable[Mapping[str, torch.Tensor]]) -> Iterator[Mapping[str, torch.Tensor]]:
    """One epoch of `batches` from its start; a `Batches` is put back at its position afterwards."""
    if not hasattr(batches, "state_dict"):
        yield from batches
        return
    saved = batches.state_dict()
    batches.load_state_dict({**saved, "epoch": 0, "index": 0})
    try:
        yield from islice(iter(batches), len(batches))
    finally:
        batches.load_state_dict(saved)


@torch.no_grad()
def evaluate(model: nn.Module, eval_batches: Iterable[Mapping[str, torch.Tensor]] | None, *,
             eval_fn: EvalFn | None = None, loss_fn: LossFn | None = None, d: distributed.Dist = distributed.Dist(),
             device: torch.device = torch.device("cpu"), autocast: Callable[[], Any] = contextlib.nullcontext,
             prefix: PrefixEmbedding | None = None) -> dict[str, float]:
    """Metrics named `eval_*`; the model is left in the mode it came in. ``prefix`` (`lorakit.prefix`)
    goes in front of every eval batch; `eval_fn` gets the model alone."""
    was_training = model.training
    model.eval()
    metrics: dict[str, float] = {}
    try:
        with preserved_rng(device):
            if eval_batches is not None:
                metrics.update(_eval_loss(model, eval_batches, loss_fn, d, device, autocast, prefix))
            if eval_fn is not None and d.is_main:
                with autocast():
                    extra = eval_fn(model)
                metrics.update({(k if k.startswith("eval_") else f"eval_{k}"): float(v) for k, v in extra.items()})
    finally:
        model.train(was_training)
    return metrics


def _eval_loss(model: nn.Module, eval_batches: Iterable[Mapping[str, torch.Tensor]], loss_fn: LossFn | None,
               d: distributed.Dist, device: torch.device, autocast: Callable[[], Any],
               prefix: PrefixEmbedding | None = None) -> dict[str, float]:
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, items, correct classes
    classes = False  # class-id labels: accuracy is reported too
    for batch in one_pass(eval_batches):
        labels = batch.get("labels")
        classes = loss_fn is None and labels is not None and labels.ndim == 1 and not labels.dtype.is_floating_point
        local = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                 for k, v in distributed.shard(batch, d, allow_empty=True).items()}
        if next(v for v in local.values() if isinstance(v, torch.Tensor)).shape[0] == 0:
            continue  # fewer rows than ranks: this one has none
        with autocast():
            if prefix is not None:
                local = prefix_batch(model, prefix, local)
            total, count, outputs = compute_loss(model, local, 0.0, loss_fn)
        sums[0] += total.double()
        sums[1] += count.double()
        if classes:
            sums[2] += (outputs.logits.argmax(-1) == local["labels"]).sum()
    distributed.all_reduce_sum(sums, d)
    if sums[1] == 0:
        return {}
    out = {"eval_loss": (sums[0] / sums[1]).item()}
    if classes:
        out["eval_accuracy"] = (sums[2] / sums[1]).item()
    return out
