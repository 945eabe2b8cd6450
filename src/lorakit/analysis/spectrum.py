"""The singular-value spectrum of a ΔW and the numbers read off it: norms and ranks (Hu et al.
2021, §7.2 asks which rank suffices; a spectrum that falls off after a few values says few do)."""

from __future__ import annotations

import math

import torch

__all__ = ["effective_rank", "stable_rank", "numerical_rank", "spectrum_summary"]


def effective_rank(singular_values: torch.Tensor) -> float:
    """Entropy-based effective rank (Roy & Vetterli 2007): exp(H(p)) with p_k = σ_k / Σσ.

    1 for a rank-1 matrix, k for k equal singular values, in between for a decaying spectrum;
    0 for the zero matrix.
    """
    s = singular_values.detach().to(torch.float64).clamp(min=0)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return math.exp(-(p * p.log()).sum().item())


def stable_rank(singular_values: torch.Tensor) -> float:
    """‖ΔW‖_F² / ‖ΔW‖_2² = Σσ² / σ_max²; 0 for the zero matrix."""
    s = singular_values.detach().to(torch.float64)
    top = s.max() if s.numel() else torch.tensor(0.0, dtype=torch.float64)
    return (s.square().sum() / top.square()).item() if top > 0 else 0.0


def numerical_rank(singular_values: torch.Tensor, shape: tuple[int, int],
                   dtype: torch.dtype = torch.float64) -> int:
    """How many σ exceed max(shape)·eps(dtype)·σ_max (the rule of numpy's matrix_rank), with the
    eps of the dtype the matrix came in: a float32 product carries float32 noise."""
    s = singular_values.detach().to(torch.float64)
    if not s.numel() or s.max() <= 0:
        return 0
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float64).eps
    return int((s > max(shape) * eps * s.max()).sum().item())


def spectrum_summary(singular_values: torch.Tensor, shape: tuple[int, int],
                     dtype: torch.dtype = torch.float64) -> dict:
    """Everything the report says about one ΔW, from its singular values (largest first).

    ``delta_norm`` is ‖ΔW‖_F = sqrt(Σσ²) and ``spectral_norm`` σ_max; ``effective_rank`` is the
    entropy-based one, ``stable_rank`` Σσ²/σ_max², ``numerical_rank`` as ``numerical_rank``.
    """
    s = singular_values.detach().to(torch.float64)
    return {
        "delta_norm": s.square().sum().sqrt().item(),
        "spectral_norm": s.max().item() if s.numel() else 0.0,
        "effective_rank": effective_rank(s),
        "stable_rank": stable_rank(s),
        "numerical_rank": numerical_rank(s, shape, dtype),
        "singular_values": s.tolist(),
    }
