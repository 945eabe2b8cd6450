"""`lorakit.compile`: ``torch.compile`` for a model with LoRA adapters, at the frozen model's memory.

A frozen layer's backward needs only its weight (dx = g·W); a LoRA layer's also needs its input,
for dA = g_lowᵀ·x. Those inputs are mostly tensors the frozen model never keeps: the RMSNorm outputs
that q|k|v and gate|up read. Inductor's partitioner could make them again in backward from what it
keeps anyway (the residual stream and the norm's statistics: one pointwise pass), but by default it
never recomputes a tensor that a matmul in backward reads ("materialized in backward": recomputing
is then not free). For LoRA that trade is the right one: one extra pass over a (tokens × d) tensor
per norm, against holding every such tensor from forward to backward.

So `compile` is ``torch.compile(model, mode=...)`` whose backend runs Inductor with that one
partitioner rule lifted (``torch._functorch.config.ban_recompute_materialized_backward``), only
while this model's graphs are partitioned: nothing process-wide changes, and a model compiled with
plain ``torch.compile`` beside it is compiled as usual. Measured on one H200 in
`docs/performance.md`; `tests/test_compile.py` checks that the saved tensors shrink and that values
and gradients equal eager.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class _Backend(torch._TorchCompileInductorWrapper):
    """Inductor, as ``torch.compile(mode=...)`` configures it, with the partitioner allowed to
    recompute inputs that backward's matmuls read. Subclassing torch's own wrapper keeps
    everything ``mode`` means (CUDA graph trees for "reduce-overhead", autotuning, CUPTI setup)."""

    def __init__(self, mode: Optional[str], dynamic: Optional[bool], recompute_inputs: bool):
        super().__init__(mode, None, dynamic)
        self.recompute_inputs = recompute_inputs

    def __call__(self, model_, inputs_, **kwargs):
        with torch._functorch.config.patch(ban_recompute_materialized_backward=not self.recompute_inputs):
            return super().__call__(model_, inputs_, **kwargs)

    def __eq__(self, other):
        return super().__eq__(other) and self.recompute_inputs == getattr(other, "recompute_inputs", None)

    __hash__ = None  # torch's wrapper defines __eq__ only: keep instances unhashable alike


def compile(model: nn.Module | Any, *, mode: Optional[str] = None, fullgraph: bool = False,
            dynamic: Optional[bool] = None, recompute_inputs: bool = True):
    """``torch.compile(model, mode=mode, fullgraph=fullgraph, dynamic=dynamic)``, and with
    ``recompute_inputs`` (the default) the adapted layers' inputs are made again in backward where
    Inductor can (norm outputs) instead of kept from forward. ``recompute_inputs=False`` is exactly
    ``torch.compile``. Works on any module or function, adapted or not."""
    if mode not in (None, *MODES):
        raise ValueError(f"mode={mode!r} is not a torch.compile mode; one of {', '.join(MODES)}")
    backend = _Backend(mode, dynamic, recompute_inputs)
    return torch.compile(model, backend=backend, fullgraph=fullgraph, dynamic=dynamic)
