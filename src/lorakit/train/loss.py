"""Losses as (sum, count) pairs, so gradient accumulation and data parallelism weigh every target
token (or example) equally, whatever the padding and however the batch is split.

A mean per batch would not: with grad_accum = 2, a batch of 10 target tokens and one of 1000
would count the same. The trainer adds up sums and counts over the micro-batches and processes
of one step and divides once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from lorakit.data import IGNORE_INDEX

# (model outputs, batch) -> (summed loss, number of items summed over)
LossFn = Callable[[Any, Mapping[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor,
                   label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy summed over target tokens, as Hugging Face causal LMs compute it
    (labels unshifted, -100 ignored, float32 logits), with optional label smoothing."""
    # (B, T, V) -> predictions for positions 1..T-1; labels (B, T) -> targets 1..T-1
    logits = logits[:, :-1, :].float()
    targets = labels[:, 1:].to(logits.device)
    total = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum", label_smoothing=label_smoothing)
    return total, (targets != IGNORE_INDEX).sum()


def classification_loss(logits: torch.Tensor, labels: torch.Tensor,
                        label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy over classes, summed over the examples; labels are class ids, shape (B,)."""
    labels = labels.to(logits.device)
    total = F.cross_entropy(logits.float(), labels, reduction="sum", label_smoothing=label_smoothing)
    return total, torch.tensor(labels.numel(), device=logits.device)


def is_token_level(batch: Mapping[str, torch.Tensor]) -> bool:
    """Labels shaped like input_ids (or like inputs_embeds' first two dims: a prefixed batch,
    `lorakit.prefix`) are per-token targets (causal LM); (B,) are class ids."""
    labels, ids, embeds = batch.get("labels"), batch.get("input_ids"), batch.get("inputs_embeds")
    if labels is None:
        return False
    if ids is not None:
        return labels.shape == ids.shape
    return embeds is not None and labels.shape == embeds.shape[:2]


def compute_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], label_smoothing: float = 0.0,
                 loss_fn: LossFn | None = None) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Run the model on `batch` and return (loss sum, count, outputs).

    With `loss_fn`, the model gets the whole batch and `loss_fn(outputs, batch)` decides. Otherwise
    labels shaped like input_ids (causal LM) and (B,) class ids are scored here from the logits,
    and the model is called without `labels`, so it does not compute its own loss a second time.
    Any other labels (seq2seq targets, multi-label or regression targets) use the model's own mean
    loss, weighted by its items: target tokens for integer labels, rows for float ones.
    """
    if loss_fn is not None:
        outputs = model(**batch)
        total, count = loss_fn(outputs, batch)
        return total, torch.as_tensor(count), outputs
    labels = batch.get("labels")
    if labels is None:
        raise ValueError("the batch has no 'labels'; collate them in, or pass loss_fn=")
    classes = labels.ndim == 1 and not labels.dtype.is_floating_point
    if is_token_level(batch) or classes:
        outputs = model(**{k: v for k, v in batch.items() if k != "labels"})
        score = causal_lm_loss if is_token_level(batch) else classification_loss
        total, count = score(outputs.logits, labels, label_smoothing)
        return total, count, outputs
    if label_smoothing > 0:
        raise ValueError(f"label_smoothing is applied to causal-LM or class labels; these labels have shape "
                         f"{tuple(labels.shape)} and dtype {labels.dtype}: pass loss_fn= to smooth them")
    outputs = model(**batch)
    count = (labels != IGNORE_INDEX).sum() if not labels.dtype.is_floating_point else torch.tensor(labels.shape[0])
    count = count.to(outputs.loss.device)
    return outputs.loss * count, count, outputs
