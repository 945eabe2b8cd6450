"""Decode attention straight on the slot cache: grouped-query attention without repeating K and V.

With a mask (the engine always passes one: slots hold stale positions), transformers' SDPA path
cannot ask torch for grouped-query attention on CUDA, so it repeats every key and value head
``heads / kv_heads`` times (``repeat_kv``): a copy of the whole cache window, per layer and step.
On an H200 with TinyLlama's shape (4 KV heads for 32 query heads), 64 requests, those copies were
58% of a decode step's GPU time (`benchmarks/results/profiles/serving_cuda_decode_before_slot_attention.txt`).

For one new token per row, the 8 query heads that share a KV head are 8 rows of one small matmul
against that head's keys, so the cache's keys and values are read once, as views:

    scores = q (n, kv, g, d) @ Kᵀ (n, kv, d, W)  ->  (n, kv, g, W), scaled, + mask, softmax in float32
    out    = probs (n, kv, g, W) @ V (n, kv, W, d)  ->  (n, kv, g, d)  =  (n, 1, heads, d)

with the softmax in float32. The scores keep the precision of the attention the model was loaded
with: behind eager attention they are rounded to the cache dtype (its matmul's output), behind SDPA
they stay float32, as SDPA's kernels keep them (for a bf16 cache: `torch.bmm(..., out_dtype=float32)`
on CUDA, float32 operands elsewhere). Rounding them to bf16 moves a 2,000-position softmax enough
to flip near-tied greedy tokens against transformers' own decode. Prefill
(more than one query per row), dropout, sliding windows, soft-capping and sinks go to the
attention the model was loaded with. The engine selects this by the names below, through
transformers' attention registry, for the time it owns the model (`Engine.close` puts the
model's own name back).
"""

from __future__ import annotations

import sys

import torch

SLOT_ATTENTION = {"sdpa": "lorakit_slots_sdpa", "eager": "lorakit_slots_eager"}  # the model's own -> ours
_UNSUPPORTED = ("sliding_window", "softcap", "s_aux", "head_mask")


def _fallback(original: str, module):
    if original == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise RuntimeError(f"{type(module).__name__}: no eager_attention_forward in {type(module).__module__} to "
                           f"prefill with; load the model with attn_implementation='sdpa'")
    return eager


def _scores(q: torch.Tensor, key: torch.Tensor, acc: torch.dtype, exact: bool) -> torch.Tensor:
    """q (n, kv, g, d) @ keyᵀ (n, kv, d, W) -> (n, kv, g, W) in `acc`; rounded to q's dtype first
    unless `exact`."""
    if not exact or q.dtype == acc:
        return torch.matmul(q, key.transpose(-1, -2)).to(acc)
    n, kv, g, d = q.shape
    if q.is_cuda:  # one GEMM that writes float32 (no kernel for it on other devices)
        scores = torch.bmm(q.reshape(n * kv, g, d), key.reshape(n * kv, -1, d).transpose(1, 2), out_dtype=acc)
        return scores.reshape(n, kv, g, -1)
    return torch.matmul(q.to(acc), key.to(acc).transpose(-1, -2))


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                     scaling: float, float_scores: bool = False) -> torch.Tensor:
    """Attention of one query per row: query (n, heads, 1, d), key and value (n, kv, W, d) (views of
    the cache are fine), mask additive and broadcastable to (n, 1, 1, W) or None. (n, 1, heads, d).
    `float_scores`: q·kᵀ kept in float32 for 16-bit inputs (as SDPA does) instead of rounded."""
    n, heads, _, d = query.shape
    kv = key.shape[1]
    q = query.reshape(n, kv, heads // kv, d)                                   # head h -> KV head h // g
    acc = torch.promote_types(query.dtype, torch.float32)                     # the softmax's dtype
    scores = _scores(q, key, acc, float_scores) * scaling                     # (n, kv, g, W)
    if mask is not None:
        scores = scores + mask.reshape(n, 1, 1, -1).to(acc)
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    return torch.matmul(probs, value).reshape(n, 1, heads, value.shape[-1])   # (n, kv, g, d) -> (n, 1, H, d)


def _make(original: str):
    def slot_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if (query.shape[2] != 1 or dropout or key.shape[1] == 0 or query.shape[1] % key.shape[1]
                or (attention_mask is not None and (attention_mask.dim() != 4 or attention_mask.shape[0] != query.shape[0]
                                                    or attention_mask.shape[-2] != 1))
                or any(kwargs.get(k) is not None for k in _UNSUPPORTED)):
            return _fallback(original, module)(module, query, key, value, attention_mask, scaling=scaling,
                                                dropout=dropout, **kwargs)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return decode_attention(query, key, value, attention_mask, scale, float_scores=original == "sdpa"), None

    return slot_attention


def register() -> None:
    """Make the names of `SLOT_ATTENTION` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    for original, name in SLOT_ATTENTION.items():
        AttentionInterface.register(name, _make(original))
        # masks that transformers builds itself (a generate() on the model while an engine holds it) as for
        # the model's own attention; the engine's forwards pass their 4D masks ready-made
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
