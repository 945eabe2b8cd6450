"""A request's life in the engine (`Request`, the handle `Engine.submit` returns) and what a step
reports about it (`Event`)."""

from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .sampling import SamplingParams
from .text import IncrementalText

_ids = itertools.count()


@dataclass(frozen=True)
class TokenLogprob:
    """A new token's log-probability under the model (log-softmax of its raw logits: before
    temperature and top-p), and the ``top`` most likely tokens with theirs, most likely first."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class Event:
    """What one step made for one request: ``tokens``, its new ids (one per step; none when EOS
    ended it), ``text``, the text this step released ("" without a tokenizer, and while a character
    split over tokens or a possible stop string is pending), and ``finish_reason`` once it is over
    ("stop": EOS or a stop string; "length": max_new_tokens; "cancelled"). ``logprobs``: one
    `TokenLogprob` per new token, for a request submitted with ``logprobs``; else empty."""

    request_id: int
    tokens: list[int]
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(eq=False)
class Request:
    """One prompt on its way through the engine. Read ``tokens`` (the new ids so far), ``text`` (the
    released text, when the engine has a tokenizer) and ``finish_reason`` (None while it runs)."""

    prompt: list[int]                   # after n_prefix placeholder ids if its adapter has prefix embeddings
    adapter: str | None                 # None: the base model
    params: SamplingParams
    generator: torch.Generator | None   # None when greedy
    max_new_tokens: int
    ignore_eos: bool
    detokenizer: IncrementalText | None  # None without a tokenizer
    top_logprobs: int | None = None     # None: no log-probabilities; k: the token's and the top k
    id: int = field(default_factory=lambda: next(_ids))
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token, with top_logprobs set
    finish_reason: str | None = None
    # where it runs: its KV-cache slot (-1 while waiting or done) and its adapter's bank slot
    row: int = -1
    bank_slot: int = -1

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return self.detokenizer.text if self.detokenizer is not None else ""

    @property
    def cached(self) -> int:
        """Tokens in its KV slot: the prompt and every new token but the last (not fed back yet)."""
        return len(self.prompt) + max(len(self.tokens) - 1, 0)


def prompt_kind(prompts) -> bool:
    """True for string prompts, False for token-id prompts; refuses a mix, or a bare string."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a list of strings or of token-id lists, got {type(prompts).__name__}")
    if not prompts:
        raise ValueError("no prompts to generate from; pass at least one prompt")
    kinds = {isinstance(p, str) for p in prompts}
    if len(kinds) > 1:
        raise TypeError("prompts mix strings and token-id lists; pass one kind (strings in give strings out, "
                        "ids in give ids out)")
    return kinds.pop()


def stop_strings(stop: str | Sequence[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not isinstance(s, str) or not s for s in stops):
        raise ValueError(f"stop must be a non-empty string or a list of them, got {stop!r}")
    return stops


def seeds_for(seed, n: int) -> list[int | None]:
    """One seed (an integer, numpy's too, or None) per prompt, from one for all or a list of n."""
    if seed is None or hasattr(seed, "__index__"):
        return [check_seed(seed)] * n
    if isinstance(seed, (str, bytes)) or not hasattr(seed, "__iter__"):
        raise TypeError(f"seed must be an integer, None, or one of them per prompt, got {seed!r}")
    seeds = [check_seed(s) for s in seed]
    if len(seeds) != n:
        raise ValueError(f"seed must be an int or one seed per prompt ({n}), got {len(seeds)} seeds")
    return seeds


def check_seed(seed) -> int | None:
    if seed is None:
        return None
    if isinstance(seed, bool) or not hasattr(seed, "__index__"):
        raise TypeError(f"a seed must be an integer or None, got {seed!r}")
    return operator.index(seed)


def token_logprobs(logits: torch.Tensor, chosen: torch.Tensor, chosen_ids: list[int],
                   requests: list[Request]) -> dict[Request, TokenLogprob]:
    """The chosen tokens' log-probabilities (and the top k) for the requests that asked: one
    log-softmax over their rows, in float32, and one copy to the host."""
    rows = [i for i, r in enumerate(requests) if r.top_logprobs is not None]
    if not rows:
        return {}
    index = torch.tensor(rows, device=logits.device)
    scores = logits.index_select(0, index).float().log_softmax(-1)                  # (k, V)
    mine = scores.gather(1, chosen.index_select(0, index)[:, None])[:, 0].tolist()
    k = max(requests[i].top_logprobs for i in rows)
    top = scores.topk(k, dim=-1) if k else None
    top_values, top_ids = (top.values.tolist(), top.indices.tolist()) if top is not None else ([], [])
    out = {}
    for j, i in enumerate(rows):
        r = requests[i]
        best = list(zip(top_ids[j][:r.top_logprobs], top_values[j][:r.top_logprobs])) if k else []
        out[r] = TokenLogprob(chosen_ids[i], mine[j], best)
    return out
