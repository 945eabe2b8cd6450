"""Subspace similarity between two adapters' factors (Hu et al. 2021, §7.2, Figures 3-4).

For A1 (r1, d) and A2 (r2, d) of the same layer, let U_i be the top-i right-singular vectors of A1
and U_j the top-j of A2 (as columns, (d, i) and (d, j)). Then

    φ(A1, A2, i, j) = ‖U_iᵀ U_j‖_F² / min(i, j)  ∈ [0, 1],

the mean squared cosine of the principal angles between the two subspaces: 1 when the smaller
one lies inside the larger, 0 when they are orthogonal. For independent random subspaces its
expected value is max(i, j) / d (``chance_similarity``).

Each matrix is decomposed once; every (i, j) then follows from one matrix of squared cosines and
two cumulative sums, instead of r1·r2 pairs of SVDs.
"""

from __future__ import annotations

import torch

__all__ = ["subspace_similarity", "column_subspace_similarity", "chance_similarity"]


def subspace_similarity(A1: torch.Tensor, A2: torch.Tensor) -> torch.Tensor:
    """φ(A1, A2, i, j) for every i ≤ r1, j ≤ r2, comparing the row spaces of two lora_A factors.

    Args:
        A1: (r1, d), e.g. ``lora_A.weight`` of one adapter.
        A2: (r2, d), the same layer's ``lora_A.weight`` of another adapter (any rank).

    Returns:
        (r1, r2) float64 tensor whose entry ``[i-1, j-1]`` is φ(A1, A2, i, j). It is symmetric in
        the sense ``subspace_similarity(A2, A1) == subspace_similarity(A1, A2).T``.

    When r > d there are only d singular directions: U_i for i > d is all of them and min(i, j)
    counts the directions that exist. Singular vectors of (numerically) zero singular values are
    arbitrary directions, so φ beyond a factor's rank says nothing (a B still at its zero init).
    """
    _check_pair(A1, A2, "A", "(r, d)", dim=1)
    return _similarity_grid(_right_singular_vectors(A1), _right_singular_vectors(A2), A1.shape[0], A2.shape[0])


def column_subspace_similarity(B1: torch.Tensor, B2: torch.Tensor) -> torch.Tensor:
    """φ for two lora_B factors B1 (d, r1) and B2 (d, r2): the same as ``subspace_similarity``
    on their column spaces, with U_i the top-i left-singular vectors. Returns (r1, r2) float64."""
    _check_pair(B1, B2, "B", "(d, r)", dim=0)
    return _similarity_grid(_right_singular_vectors(B1.t()), _right_singular_vectors(B2.t()),
                            B1.shape[1], B2.shape[1])


def chance_similarity(r1: int, r2: int, d: int) -> torch.Tensor:
    """E[φ(i, j)] = max(i, j) / d for independent uniformly random subspaces of R^d, as (r1, r2):
    E‖U_iᵀU_j‖_F² = i·j/d. The baseline to read a φ grid against."""
    i = torch.arange(1, r1 + 1, dtype=torch.float64).clamp(max=d)
    j = torch.arange(1, r2 + 1, dtype=torch.float64).clamp(max=d)
    return torch.maximum(i[:, None], j[None, :]) / d


def _right_singular_vectors(M: torch.Tensor) -> torch.Tensor:
    """(k, d) with k = min(r, d): the right-singular vectors of M (r, d) as rows, largest first."""
    return torch.linalg.svd(M.detach().to(device="cpu", dtype=torch.float64), full_matrices=False).Vh


def _similarity_grid(V1: torch.Tensor, V2: torch.Tensor, r1: int, r2: int) -> torch.Tensor:
    # (k1, d) @ (d, k2) -> (k1, k2): squared cosines between singular direction a of one and b of the other
    cos2 = (V1 @ V2.t()) ** 2
    # cum[i-1, j-1] = Σ_{a<i, b<j} cos²(a, b) = ‖U_iᵀ U_j‖_F²
    cum = cos2.cumsum(0).cumsum(1)
    i = torch.arange(1, r1 + 1).clamp(max=V1.shape[0])  # past the last direction, U_i stops growing
    j = torch.arange(1, r2 + 1).clamp(max=V2.shape[0])
    phi = cum[i - 1][:, j - 1] / torch.minimum(i[:, None], j[None, :]).to(torch.float64)
    return phi.clamp_(0.0, 1.0)  # rounding can land a hair outside [0, 1]


def _check_pair(X1: torch.Tensor, X2: torch.Tensor, factor: str, layout: str, dim: int) -> None:
    for name, X in ((f"{factor}1", X1), (f"{factor}2", X2)):
        if not isinstance(X, torch.Tensor) or X.ndim != 2 or 0 in X.shape:
            shape = tuple(X.shape) if isinstance(X, torch.Tensor) else type(X).__name__
            raise ValueError(f"{name} must be a non-empty 2-D tensor {layout}, got {shape}")
        if not torch.isfinite(X).all():
            raise ValueError(f"{name} has non-finite values; its singular vectors are undefined")
    if X1.shape[dim] != X2.shape[dim]:
        raise ValueError(f"{factor}1 {tuple(X1.shape)} and {factor}2 {tuple(X2.shape)} must share d "
                         f"(both {layout}): they are not factors of the same layer")
