"""How ΔW relates to W (Hu et al. 2021, §7.3, Table 7).

Project the pre-trained W onto the r-dimensional subspace of ΔW, ‖Uᵀ·W·V‖_F with U, V the top-r
left/right singular vectors of ΔW, and compare it with the same projection onto W's own top-r
singular directions and onto random ones. The paper finds ΔW's directions are more correlated
with W than random ones, yet far from W's top directions: ΔW amplifies features W already has but
does not emphasise, by ‖ΔW‖_F / ‖Uᵀ·W·V‖_F (≈ 21.5 for r = 4 on GPT-3's W_q, layer 48).
"""

from __future__ import annotations

import math

import torch

from .delta import LayerDelta
from .spectrum import numerical_rank

__all__ = ["amplification"]


def amplification(W: torch.Tensor, delta_w: torch.Tensor | LayerDelta, r: int | None = None, *,
                  seed: int = 0) -> dict:
    """Table 7's numbers for one layer, computed in float64.

    Args:
        W: the base weight (d_out, d_in), in the same layout as ``delta_w``.
        delta_w: ΔW (d_out, d_in) as a tensor, or a ``LayerDelta`` (its factored SVD is used, so a
            large layer never needs a dense SVD of ΔW).
        r: how many singular directions of ΔW to project onto; defaults to ΔW's numerical rank.
        seed: seeds the random orthonormal directions (QR of a Gaussian matrix).

    Returns:
        ``r``; ``w_norm`` ‖W‖_F; ``delta_norm`` ‖ΔW‖_F; ``projected_norm`` ‖Uᵀ·W·V‖_F with U, V
        ΔW's top-r directions; ``amplification`` = delta_norm / projected_norm (inf when W has
        nothing in those directions, nan when ΔW = 0); ``w_projected_norm`` the same projection
        onto W's own top-r directions (= the root of the sum of W's r largest σ²);
        ``random_projected_norm`` onto random orthonormal U, V; ``seed``.
    """
    shape = tuple(delta_w.shape)
    if not isinstance(W, torch.Tensor) or W.ndim != 2 or tuple(W.shape) != shape:
        got = tuple(W.shape) if isinstance(W, torch.Tensor) else type(W).__name__
        raise ValueError(f"W {got} and ΔW {shape} must be matrices of the same shape (d_out, d_in)")
    W = W.detach().to(device="cpu", dtype=torch.float64)
    if isinstance(delta_w, LayerDelta):
        U, S, Vh = delta_w.svd()
        dtype = delta_w.stored_dtype
    else:
        dtype = delta_w.dtype
        U, S, Vh = torch.linalg.svd(delta_w.detach().to(device="cpu", dtype=torch.float64), full_matrices=False)
    rank = numerical_rank(S, shape, dtype)
    r = rank if r is None else r
    if not 0 <= r <= S.numel():
        raise ValueError(f"r={r}: ΔW has {S.numel()} singular directions to project onto")
    delta_norm = S.square().sum().sqrt().item()
    # (r, d_out) @ (d_out, d_in) @ (d_in, r) -> (r, r)
    projected = torch.linalg.matrix_norm(U[:, :r].t() @ W @ Vh[:r].t()).item()
    w_top = torch.linalg.svdvals(W)[:r]
    g = torch.Generator().manual_seed(seed)
    U_rand = torch.linalg.qr(torch.randn(shape[0], r, generator=g, dtype=torch.float64)).Q
    V_rand = torch.linalg.qr(torch.randn(shape[1], r, generator=g, dtype=torch.float64)).Q
    return {
        "r": r,
        "w_norm": torch.linalg.matrix_norm(W).item(),
        "delta_norm": delta_norm,
        "projected_norm": projected,
        "amplification": _ratio(delta_norm, projected),
        "w_projected_norm": w_top.square().sum().sqrt().item(),
        "random_projected_norm": torch.linalg.matrix_norm(U_rand.t() @ W @ V_rand).item(),
        "seed": seed,
    }


def _ratio(a: float, b: float) -> float:
    if b > 0:
        return a / b
    return math.inf if a > 0 else math.nan
