"""The learning rate as a pure function of the step: linear warmup, then linear, cosine or no decay.

A pure function needs no scheduler state: a resumed run only has to know its step.
"""

from __future__ import annotations

import math


def lr_factor(step: int, *, total_steps: int, warmup_steps: int = 0, schedule: str = "linear") -> float:
    """Multiplier of the peak lr for optimizer step `step` (1-based: the first update is step 1).

    Warmup rises linearly to 1 at step `warmup_steps`. After it, "linear" falls linearly and
    "cosine" along half a cosine, from 1 at the first step after warmup towards 0, which they
    would reach one step after `total_steps`: no update is wasted with lr = 0. "constant" stays 1.
    """
    if warmup_steps > 0 and step <= warmup_steps:
        return step / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 0:
        return 1.0
    # progress is 0 at the first step after warmup and (decay_steps - 1) / decay_steps at the last
    progress = min(max(step - warmup_steps - 1, 0) / decay_steps, 1.0)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}; choose 'linear', 'cosine' or 'constant'")
