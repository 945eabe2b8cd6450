"""Reference LoRA math in plain torch (Hu et al. 2021, eq. 3): h = W0·x + s·B·A·x."""

from __future__ import annotations

import torch


def lora_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """The adapter's contribution s·B·A·x for a batch of row vectors.

    Never forms the dense ΔW: two thin matmuls cost 2·T·r·(d_in + d_out) FLOPs instead of
    T·d_in·d_out.
    """
    # (..., d_in) @ (d_in, r) -> (..., r) @ (r, d_out) -> (..., d_out)
    return (x @ A.t()) @ B.t() * scaling


def delta_weight(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """ΔW = s·B·A in nn.Linear's (d_out, d_in) layout."""
    return (B @ A) * scaling


def conv_delta_weight(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """ΔW of a convolution whose adapter is conv_A (kernel k, in -> r) then a 1×…×1 conv_B (r -> out).

    A: (r, c_in, *k), B: (c_out, r, 1, …); composing the two convolutions is the same as one
    convolution with kernel Σ_r B[o, r]·A[r, i, …].
    """
    return torch.einsum("or,ri...->oi...", B.flatten(1), A) * scaling
