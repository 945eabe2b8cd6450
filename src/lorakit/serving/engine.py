"""The mixed-adapter generation engine: many adapters, one base model, one batch.

    engine = Engine(model, tokenizer, max_batch=64, max_adapters=8, max_rank=64)
    engine.add_adapter("sql", "path/to/peft_adapter")
    outs = engine.generate(prompts, adapters=["sql", None], max_new_tokens=64)

Each row of a batch uses its own adapter (or the base model) through the bank's stacked factors
(`bank.py`) and the segmented op (`ops.py`), inside the model's own forward: the engine wraps the
base model's adapted linear layers (`layers.py`) and sets the rows' bank slots once per forward.
Decoding keeps a KV cache (transformers' `DynamicCache`); prompts of different lengths are left
padded, with an attention mask and position ids that start at 0 on each prompt's first token, so
a request's tokens do not depend on the other requests in its batch. A request that finishes
leaves the running batch at once (its cache rows are dropped).

Not built yet: requests joining a running batch (continuous batching), the streaming API, CUDA
graphs and the Triton kernels, the merged fast path.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from dataclasses import dataclass, field
from typing import Sequence, Union

import torch
from torch import nn

from ..data import encode_prompt
from ..inject import lora_modules
from .bank import AdapterBank
from .layers import SlotRoute, install, uninstall, wrapped
from .reader import structure_copy
from .sampling import SamplingParams, next_tokens

Prompt = Union[str, Sequence[int]]


@dataclass
class _Request:
    """One prompt on its way through a batch."""

    ids: list[int]
    adapter: str | None                # None: the base model
    params: SamplingParams
    generator: torch.Generator | None  # None when greedy
    slot: int = -1                     # the adapter's bank slot while its batch runs
    new: list[int] = field(default_factory=list)


class Engine:
    """Generates from a plain base model with any loaded adapter per prompt.

    ``model`` is a transformers causal LM without LoRA layers; the engine owns it from now on
    (eval mode; its adapted linear layers wrapped while the engine holds adapters; `close` gives
    the plain model back). ``tokenizer`` encodes string prompts as `lorakit generate` does
    (``chat_template`` and ``separator`` as in training) and decodes outputs; it may be None when
    prompts are token ids and no stop strings are used. ``max_batch`` prompts run together at most,
    with at most ``max_adapters`` distinct adapters (more run in several batches); ``max_adapters``
    and ``max_rank`` size the bank.
    """

    def __init__(self, model: nn.Module, tokenizer=None, max_batch: int = 64, max_adapters: int = 8,
                 max_rank: int = 64, *, chat_template: bool = False, separator: str = "\n") -> None:
        _check_plain(model)
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
        first = next(model.parameters())
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.chat_template, self.separator = chat_template, separator
        self.device = first.device
        self.bank = AdapterBank(structure_copy(model), max_adapters=max_adapters, max_rank=max_rank,
                                dtype=_float_dtype(model), device=self.device)
        self.route = SlotRoute()
        accepted = inspect.signature(model.forward).parameters
        self._keeps_last_logits = "logits_to_keep" in accepted
        self._cache_argument = "cache" if "cache" in accepted else "past_key_values"  # renamed in transformers 5.x

    # --- adapters ----------------------------------------------------------------------------

    @property
    def adapters(self) -> list[str]:
        return self.bank.names

    def add_adapter(self, name: str, path: str | os.PathLike) -> None:
        """Load a PEFT/lorakit LoRA adapter directory for this base model as ``name``. A refused
        adapter (`io.AdapterFileError`, `reader.AdapterRefused`) leaves the engine as it was. Any
        number of adapters can be added; ``max_adapters`` of them are in the bank's slots at a time,
        and a batch's adapters take the slots of the least recently used ones (see `bank.py`)."""
        self.bank.add(name, path)
        install(self.model, self.bank.modules, self.route)

    def remove_adapter(self, name: str) -> None:
        self.bank.remove(name)
        install(self.model, self.bank.modules, self.route)

    def close(self) -> nn.Module:
        """Unwrap the model's layers and return the plain base model; the engine is empty after."""
        for name in self.bank.names:
            self.bank.remove(name)
        uninstall(self.model)
        return self.model

    # --- generation --------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Prompt], adapters: Sequence[str | None] | None = None, *,
                 max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | Sequence[int | None] | None = None, stop: str | Sequence[str] | None = None,
                 ignore_eos: bool = False) -> list[list[int]] | list[str]:
        """Continue every prompt with its adapter (``adapters[i]``; None: the base model).

        Token-id prompts give the new ids only: no prompt, no padding, cut before the first EOS
        unless ``ignore_eos`` (then exactly ``max_new_tokens`` ids, EOS included where sampled).
        String prompts give strings: the new tokens decoded without special tokens, stripped.

        ``temperature == 0`` is greedy; otherwise tokens are sampled at that temperature from the
        top-p nucleus with the request's own generator, seeded by ``seed`` (an int for every
        request, or one per request; None: drawn from torch's global generator). The same prompt,
        adapter and seed give the same tokens in any batch. ``stop`` strings end a request when its
        decoded text contains one: a string output is cut before it; an ids output keeps the tokens
        up to the one that completed it (a stop string need not end on a token boundary).
        """
        text_in = _prompt_kind(prompts)
        ids = [self._encode(p) for p in prompts] if text_in else [list(map(int, p)) for p in prompts]
        adapters = self._check_adapters(adapters, len(prompts))
        stops = _stops(stop)
        if stops and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer to decode the outputs; make the Engine with one")
        params = SamplingParams(float(temperature), float(top_p))
        self._check_lengths(ids, max_new_tokens)
        seeds = _seeds(seed, len(prompts))
        requests = [_Request(p, a, params, None if params.greedy else self._generator(sd))
                    for p, a, sd in zip(ids, adapters, seeds)]

        with torch.inference_mode():
            for batch in self._batches(requests):
                self._decode(batch, max_new_tokens, stops, ignore_eos)
        if not text_in:
            return [r.new for r in requests]
        return [self._text(r.new, stops) for r in requests]

    # --- decoding ----------------------------------------------------------------------------

    def _batches(self, requests: list[_Request]) -> list[list[_Request]]:
        """Batches of at most ``max_batch`` requests using at most ``max_adapters`` distinct adapters
        each; longest prompts first, so a batch holds little padding."""
        pending = sorted(requests, key=lambda r: -len(r.ids))
        batches = []
        while pending:  # each pass takes at least the first pending request: it fits an empty batch
            batch, names, rest = [], set(), []
            for request in pending:
                a = request.adapter
                fits = a is None or a in names or len(names) < self.bank.max_adapters
                if len(batch) < self.max_batch and fits:
                    batch.append(request)
                    if a is not None:
                        names.add(a)
                else:
                    rest.append(request)
            batches.append(batch)
            pending = rest
        return batches

    def _decode(self, requests: list[_Request], max_new_tokens: int, stops: list[str], ignore_eos: bool) -> None:
        """Decode one batch to the end; each request's ``new`` holds its tokens afterwards."""
        from transformers import DynamicCache

        eos = set() if ignore_eos else self._eos_ids()
        for request, slot in zip(requests, self.bank.slots_for([r.adapter for r in requests])):
            request.slot = slot
        input_ids, mask = _left_pad([r.ids for r in requests], self._pad_id(), self.device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)  # 0 at each prompt's first real token
        cache = DynamicCache(config=self.model.config)
        running = list(requests)
        logits = self._forward(input_ids, mask, positions, cache, running)
        next_position = positions[:, -1:] + 1                                        # (n, 1)
        while True:
            tokens = next_tokens(logits, [r.params for r in running], [r.generator for r in running]).tolist()
            keep = []
            for row, (request, token) in enumerate(zip(running, tokens)):
                if token in eos:
                    continue
                request.new.append(token)
                if len(request.new) < max_new_tokens and not self._stopped(request, stops):
                    keep.append(row)
            if not keep:
                return
            if len(keep) < len(running):  # finished requests leave the batch, and their cache rows
                index = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(index)
                mask, next_position = mask[index], next_position[index]
                running = [running[k] for k in keep]
            step_ids = torch.tensor([[r.new[-1]] for r in running], device=self.device)    # (n, 1)
            mask = torch.cat([mask, mask.new_ones(len(running), 1)], dim=1)
            logits = self._forward(step_ids, mask, next_position, cache, running)
            next_position = next_position + 1

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache,
                 running: list[_Request]) -> torch.Tensor:
        """The last position's logits (n, V) of one forward, each row through its request's adapter."""
        kw = {self._cache_argument: cache, **({"logits_to_keep": 1} if self._keeps_last_logits else {})}
        slots = [r.slot for r in running]
        routed = self.route.rows(torch.tensor(slots, device=self.device), input_ids.shape[1]) \
            if any(s >= 0 for s in slots) else contextlib.nullcontext()
        with routed:
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, **kw)
        return out.logits[:, -1]

    def _stopped(self, request: _Request, stops: list[str]) -> bool:
        return bool(stops) and any(s in self._decoded(request.new) for s in stops)

    # --- inputs and outputs ------------------------------------------------------------------

    def _encode(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("string prompts need a tokenizer; make the Engine with one, or pass token ids")
        return encode_prompt(prompt, self.tokenizer, chat_template=self.chat_template, separator=self.separator)

    def _decoded(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _text(self, tokens: list[int], stops: list[str]) -> str:
        text = self._decoded(tokens)
        cuts = [text.find(s) for s in stops if s in text]
        return (text[:min(cuts)] if cuts else text).strip()

    def _check_adapters(self, adapters: Sequence[str | None] | None, n: int) -> list[str | None]:
        if adapters is None:
            return [None] * n
        if isinstance(adapters, str) or len(adapters) != n:
            raise ValueError(f"adapters must be a list with one entry per prompt ({n}; None: the base model), "
                             f"got {adapters!r}")
        unknown = sorted({a for a in adapters if a is not None and a not in self.bank})
        if unknown:
            raise KeyError(f"adapters {unknown} are not loaded; the engine has {self.adapters} "
                           f"(load one with add_adapter(name, path))")
        return list(adapters)

    def _check_lengths(self, prompts: list[list[int]], max_new_tokens: int) -> None:
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        config = self.model.config
        limit, vocab = getattr(config, "max_position_embeddings", None), getattr(config, "vocab_size", None)
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(f"prompt {i} has no tokens; a causal LM needs at least one to start from")
            if vocab is not None and not all(0 <= t < vocab for t in prompt):
                raise ValueError(f"prompt {i} has token ids outside this model's vocabulary [0, {vocab})")
            # The last new token is returned but never fed back, so it needs no position.
            if limit is not None and len(prompt) + max_new_tokens - 1 > limit:
                raise ValueError(f"prompt {i} has {len(prompt)} tokens; with max_new_tokens={max_new_tokens} it "
                                 f"needs more than the model's {limit} positions: shorten it or lower max_new_tokens")

    def _generator(self, seed: int | None) -> torch.Generator:
        if seed is None:  # drawn from torch's generator, so torch.manual_seed makes a run repeatable
            seed = int(torch.randint(0, 2**62, ()))
        return torch.Generator(device=self.device).manual_seed(int(seed))

    def _eos_ids(self) -> set[int]:
        eos = self.tokenizer.eos_token_id if self.tokenizer is not None else self.model.config.eos_token_id
        return set() if eos is None else {eos} if isinstance(eos, int) else set(eos)

    def _pad_id(self) -> int:  # any id does: padded places are masked
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return pad if pad is not None else next(iter(self._eos_ids()), 0)

    def __repr__(self) -> str:
        return (f"Engine({type(self.model).__name__}, adapters={self.adapters}, max_batch={self.max_batch}, "
                f"max_adapters={self.bank.max_adapters}, max_rank={self.bank.max_rank})")


def _check_plain(model: nn.Module) -> None:
    if any(True for _ in lora_modules(model)) or hasattr(model, "peft_config"):
        raise ValueError("Engine takes a plain base model; this one carries LoRA adapters already. Serve them "
                         "through the engine instead: lorakit.unload(model, merge=False) (or PEFT's unload()), "
                         "save the adapters, then engine.add_adapter(name, path)")
    if wrapped(model):
        raise ValueError("this model is already in use by an Engine; call that engine's close() first")


def _float_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _prompt_kind(prompts) -> bool:
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


def _stops(stop: str | Sequence[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not isinstance(s, str) or not s for s in stops):
        raise ValueError(f"stop must be a non-empty string or a list of them, got {stop!r}")
    return stops


def _seeds(seed, n: int) -> list[int | None]:
    if seed is None or isinstance(seed, int):
        return [seed] * n
    seeds = list(seed)
    if len(seeds) != n:
        raise ValueError(f"seed must be an int or one seed per prompt ({n}), got {len(seeds)} seeds")
    return seeds


def _left_pad(prompts: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), each (n, width): every prompt's last token in the last column."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)
