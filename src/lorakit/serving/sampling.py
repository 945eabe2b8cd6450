"""Choosing each request's next token: greedy, or temperature and top-p (nucleus) sampling with the
request's own random generator, so a request's tokens depend on its seed, never on its batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks tokens. ``temperature == 0``: greedy (argmax)."""

    temperature: float = 0.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0):
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {self.temperature!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches ``top_p`` (the most likely
    one always), renormalized; probs (V,) -> (V,)."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(descending=True)
    before = sorted_probs.cumsum(0) - sorted_probs      # mass of the tokens ranked above each one
    keep_sorted = before < top_p
    keep = torch.zeros_like(keep_sorted).scatter_(0, order, keep_sorted)
    kept = probs * keep
    return kept / kept.sum()


def next_tokens(logits: torch.Tensor, params: list[SamplingParams],
                generators: list[torch.Generator | None]) -> torch.Tensor:
    """(N,) int64: row i's next token from logits (N, V), by ``params[i]``, drawing from ``generators[i]``."""
    tokens = logits.argmax(-1)
    for i, (p, g) in enumerate(zip(params, generators)):
        if p.greedy:
            continue
        probs = torch.softmax(logits[i].float() / p.temperature, dim=-1)
        tokens[i] = torch.multinomial(top_p_filter(probs, p.top_p), 1, generator=g)[0]
    return tokens
