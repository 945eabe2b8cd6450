"""Adapters whose A and B come from the base weight: PiSSA and OLoRA.

PiSSA (Meng et al. 2024, "PiSSA: Principal Singular Values and Singular Vectors Adaptation of
Large Language Models", arXiv 2404.02948) starts A and B at W's top-r singular triplets; OLoRA
(Büyükakyüz 2024, "OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models", arXiv
2406.01775) at the first r columns of Q and rows of R of W = QR. Either way the base weight then
holds the residual ``W_res = W − s·B0·A0``, so the adapted model equals the base model at step 0
and training moves the principal (PiSSA) or leading orthonormal (OLoRA) part of W.

The conventions are PEFT's (``tuners/lora/layer.py``: ``pissa_init``, ``olora_init``), so an
adapter initialised here has PEFT's A, B and residual: PiSSA divides the singular values by s
before splitting them between A and B (so ``s·B0·A0`` is exactly the rank-r truncation of W);
OLoRA does not (``s·B0·A0 = s·Q_r·R_r``). Everything here takes and returns W as the (d_out, d_in)
matrix of eq. 3; the layer transposes a Conv1D weight first.

Because the base weight changed, the trained adapter only works on the residual base. To ship it
for the untouched base, `as_plain_lora` writes it as a plain LoRA of rank 2r (PEFT's
``subtract_mutated_init``): ``s·B'·A' = s·(B·A − B0·A0)`` with ``A' = [A; A0]``, ``B' = [B | −B0]``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ConfigError, init_from_weight, pissa_niter


class InitialFactors(nn.Module):
    """A0 (r, d_in) and B0 (d_out, r) of an adapter whose init took them from the base weight: what
    turns the trained adapter into a plain LoRA (`as_plain_lora`) and what gives the base weight its
    original value back when the adapter is deleted. Non-persistent buffers: they move with the
    layer (``.to``) but are in no state_dict, no optimizer and no saved adapter."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("A", A, persistent=False)
        self.register_buffer("B", B, persistent=False)


def factors_from_weight(init: str, weight: torch.Tensor, r: int, scaling: float,
                        where: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """(A0, B0) for ``init`` ("pissa", "pissa_niter_K" or "olora") from the dense (d_out, d_in)
    weight, in float32 (float64 for a float64 weight). The caller writes W − s·B0·A0 into the base."""
    if not init_from_weight(init):
        raise ValueError(f"init {init!r} does not take A and B from the base weight")
    if not weight.is_floating_point():
        raise ConfigError(f"{where}: init={init!r} needs a floating-point base weight, this one is {weight.dtype}")
    check_rank(init, tuple(weight.shape), r, where)
    w = weight.detach().to(torch.promote_types(weight.dtype, torch.float32))
    if init == "olora":
        return _olora(w, r)
    return _pissa(w, r, scaling, pissa_niter(init))


def check_rank(init: str, shape: tuple[int, int], r: int, where: str = "") -> None:
    """Refuse r above min(d_out, d_in). PEFT silently keeps min(d_out, d_in) directions with a scaling
    computed for r, and its saved adapter then holds tensors of another rank than its config says."""
    d_out, d_in = shape
    if r > min(d_out, d_in):
        raise ConfigError(f"{where}: init={init!r} takes the top r={r} directions of the base weight, which has "
                          f"shape ({d_out}, {d_in}) and so only {min(d_out, d_in)}: lower r, give this module a "
                          f"smaller rank with rank_pattern, or leave it out of target_modules")


def _pissa(w: torch.Tensor, r: int, scaling: float, niter: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    # W = U·diag(S)·Vh; split √(S_r/s) between the factors so that s·B0·A0 = U_r·diag(S_r)·Vh_r.
    if niter is None:
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)  # U (d_out, k), S (k,), Vh (k, d_in)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:  # Halko et al. 2011: q = r, K subspace iterations; random, from torch's global generator
        U, S, V = torch.svd_lowrank(w, q=r, niter=niter)
        Vh = V.t()
    root = torch.sqrt(S / scaling)  # (r,)
    A = root[:, None] * Vh  # (r, d_in)
    B = U * root[None, :]  # (d_out, r)
    return A.contiguous(), B.contiguous()


def _olora(w: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    # W = Q·R, Q (d_out, k) orthonormal columns, R (k, d_in) upper triangular; no division by s (PEFT).
    Q, R = torch.linalg.qr(w)
    return R[:r].contiguous(), Q[:, :r].contiguous()


def as_plain_lora(A: torch.Tensor, B: torch.Tensor, A0: torch.Tensor,
                  B0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') of rank 2r with B'·A' = B·A − B0·A0: a trained PiSSA/OLoRA adapter as a plain LoRA on
    the untouched base W = W_res + s·B0·A0, with the same scaling s (the config doubles r and α)."""
    A_cat = torch.cat([A, A0.to(A.dtype)], dim=0)  # (2r, d_in)
    B_cat = torch.cat([B, -B0.to(B.dtype)], dim=1)  # (d_out, 2r)
    return A_cat, B_cat
