"""The mixed-adapter generation engine: many adapters, one base model, one running batch.

    engine = Engine(model, tokenizer, max_batch=64, max_adapters=8, max_rank=64)
    engine.add_adapter("sql", "path/to/peft_adapter")
    outs = engine.generate(prompts, adapters=["sql", None], max_new_tokens=64)

    request = engine.submit(prompt, adapter="sql", max_new_tokens=64)   # the streaming API
    for event in engine.stream(request): ...                            # tokens as they are made

Each row of a batch uses its own adapter (or the base model) through the bank's stacked factors
(`bank.py`) and the segmented op (`ops.py`), inside the model's own forward: the engine wraps the
base model's adapted linear layers (`layers.py`), and its runner (`runner.py`) sets the rows' bank
slots once per forward. This file schedules; the runner makes the logits.

Continuous batching: requests wait in a queue (first come, first served) and join the running
batch between steps, as long as there is a free KV slot (``max_batch``) and a bank slot for their
adapter (at most ``max_adapters`` distinct adapters run together). A step first decodes one token
for every running request (one forward), then prefills the requests that join (one forward, right
padded, their first token sampled from it); a request leaves the batch as soon as it ends. The KV
cache (`kv_cache.py`) has a fixed slot per running request, allocated once at construction; each
forward gets an attention mask and position ids per row, so a request's tokens depend neither on
the other requests in the batch nor on when it joined.

The engine is not thread-safe: one thread (a server's scheduling loop) calls `submit`, `step`,
`cancel` and reads the events.

With ``merge_single_adapter=True``, a forward whose rows all use one adapter runs with that adapter
merged into the base weights, at the base model's cost (`merging.py`: W0 is kept, so switching
never drifts); off by default, since a merged weight is rounded once into the base dtype.

On a CUDA device decode steps run on fixed buckets replayed as CUDA graphs (`graphs.py`), and
every forward (prefill too, eagerly) takes the dense segmented op, which needs no host sync.

An adapter saved with prefix embeddings (`lorakit.prefix`, train --n-prefix) gets them in front of
each of its prompts: the request's prompt starts with n_prefix placeholder ids (so every length
and cache position counts them), and its prefill embeds the prompt with those places overwritten
by the adapter's prefix rows (one inputs_embeds forward for the whole joining batch).

Not built yet: the Triton kernels, chunked prefill mixed into the decode forward.
"""

from __future__ import annotations

import operator
import os
from collections import deque
from typing import Iterator, Sequence, Union

import torch
from torch import nn

from ..data import encode_prompt
from ..generate import end_ids
from ..inject import lora_modules
from ..io import check_adapter_name
from ..prefix import load_prefix, model_hidden_size
from . import attention as attention_names
from .bank import AdapterBank
from .kv_cache import SlotCache
from .layers import SlotRoute, install, uninstall, wrapped
from .merging import MergedWeights
from .reader import AdapterFactors, structure_copy
from .request import (MAX_TOP_LOGPROBS, Event, Request, check_seed, prompt_kind, seeds_for, stop_strings,
                      token_logprobs)
from .runner import Runner
from .sampling import SamplingParams, next_tokens
from .text import IncrementalText

Prompt = Union[str, Sequence[int]]
DEFAULT_MAX_SEQ_LEN = 1024  # per slot, when the model allows as many; the KV cache is max_batch × this


class Engine:
    """Generates from a plain base model with any loaded adapter per prompt.

    ``model`` is a transformers causal LM without LoRA layers (sdpa or eager attention); the engine
    owns it from now on (eval mode; its adapted linear layers wrapped while the engine holds
    adapters; `close` gives the plain model back). ``tokenizer`` encodes string prompts as
    `lorakit generate` does (``chat_template`` and ``separator`` as in training) and decodes
    outputs; it may be None when prompts are token ids and no stop strings are used. ``max_batch``
    requests run together at most, each with up to ``max_seq_len`` tokens (prompt and new tokens;
    default: the model's positions, at most 1024), which sizes the KV cache; at most
    ``max_adapters`` distinct adapters run together; ``max_adapters`` and ``max_rank`` size the bank.
    ``max_prefill_tokens`` bounds one step's prefill forward (joining requests × their longest
    prompt; None: no bound; a longer prompt is prefilled alone), so a burst of arrivals cannot stall
    the running requests' next token for long. ``merge_single_adapter`` merges the adapter of a
    forward whose rows all use it (see `merging.py`). ``cuda_graphs`` (default: on a CUDA device)
    runs decode steps on fixed buckets replayed as CUDA graphs (`graphs.py`) and every forward
    through the dense segmented op; True on a CPU runs the same buckets without capture.
    """

    def __init__(self, model: nn.Module, tokenizer=None, max_batch: int = 64, max_adapters: int = 8,
                 max_rank: int = 64, *, max_seq_len: int | None = None, max_prefill_tokens: int | None = None,
                 merge_single_adapter: bool = False, cuda_graphs: bool | None = None, chat_template: bool = False,
                 separator: str = "\n") -> None:
        _check_plain(model)
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
        config = model.config
        attention = getattr(config, "_attn_implementation", None)
        attention = {v: k for k, v in attention_names.SLOT_ATTENTION.items()}.get(attention, attention)  # an engine's
        if attention not in (None, "sdpa", "eager"):
            raise ValueError(f"the engine passes its own 4D attention masks, which {attention!r} attention does not "
                             f"take; load the model with attn_implementation='sdpa' (or 'eager')")
        positions = getattr(config, "max_position_embeddings", None)
        if max_seq_len is None:
            max_seq_len = min(positions or DEFAULT_MAX_SEQ_LEN, DEFAULT_MAX_SEQ_LEN)
        if not isinstance(max_seq_len, int) or max_seq_len < 2 or (positions and max_seq_len > positions):
            raise ValueError(f"max_seq_len must be an integer from 2 to the model's {positions} positions, "
                             f"got {max_seq_len!r}")
        if max_prefill_tokens is not None and (not isinstance(max_prefill_tokens, int) or max_prefill_tokens < 1):
            raise ValueError(f"max_prefill_tokens must be a positive integer or None, got {max_prefill_tokens!r}")
        first = next(model.parameters())
        self._was_training = model.training  # close() gives the model back in the mode it came in
        self.closed = False
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch, self.max_seq_len, self.max_prefill_tokens = max_batch, max_seq_len, max_prefill_tokens
        self.chat_template, self.separator = chat_template, separator
        self.device = first.device
        self.bank = AdapterBank(structure_copy(model), max_adapters=max_adapters, max_rank=max_rank,
                                dtype=_float_dtype(model), device=self.device)
        self.route = SlotRoute()
        self.prefixes: dict[str, torch.Tensor] = {}  # adapter name -> its prefix embeddings (n, hidden)
        self.merged = MergedWeights(model)
        self.cache = SlotCache.for_model(config, slots=max_batch, max_seq_len=max_seq_len, dtype=_float_dtype(model),
                                         device=self.device)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # running[k] holds KV slot k: the running rows stay packed
        self.runner = Runner(model, self.cache, self.bank, self.route, self.merged, self.prefixes, device=self.device,
                             merge_single_adapter=merge_single_adapter, max_batch=max_batch, max_seq_len=max_seq_len,
                             cuda_graphs=self.device.type == "cuda" if cuda_graphs is None else cuda_graphs)
        # last, so a refused engine leaves the model as it was: decode attention on the slot cache without
        # repeating K/V heads (`attention.py`), until close()
        self._own_attention = attention
        attention_names.register()
        config._attn_implementation = attention_names.SLOT_ATTENTION[attention or "sdpa"]

    @property
    def graphs(self):
        """The runner's `graphs.DecodeGraphs` (None without CUDA graphs)."""
        return self.runner.graphs

    # --- adapters ----------------------------------------------------------------------------

    @property
    def adapters(self) -> list[str]:
        return self.bank.names

    def read_adapter(self, path: str | os.PathLike) -> AdapterFactors:
        """Read and check the adapter at ``path`` for this engine without changing anything; pass
        the result to `add_adapter`. Safe while another thread steps the engine (a server
        reads adapter files here, off the engine's thread)."""
        return self.bank.read(path)

    def add_adapter(self, name: str, path: str | os.PathLike | AdapterFactors) -> None:
        """Load a PEFT/lorakit LoRA adapter directory for this base model as ``name``. A refused
        adapter (`io.AdapterFileError`, `reader.AdapterRefused`) leaves the engine as it was; ``path``
        may also be what `read_adapter` returned. Prefix embeddings saved beside the adapter
        (``prefix_embeddings.safetensors``) are read too and go in front of its prompts. Any
        number of adapters can be added; ``max_adapters`` of them are in the bank's slots at a time,
        and joining requests take the slots of the least recently used adapters that no running
        request uses (see `bank.py`). Requests already running are not affected."""
        self._check_open()
        check_adapter_name(name)  # before any file is read: a bad name is refused as itself
        source = path.path if isinstance(path, AdapterFactors) else path
        prefix = load_prefix(source, hidden_size=model_hidden_size(self.model))  # refused before the bank changes
        self.bank.add(name, path)
        if prefix is not None:
            self.prefixes[name] = prefix.weight.detach().to(self.device, _float_dtype(self.model))
        self._install()

    def remove_adapter(self, name: str) -> None:
        self._check_open()
        users = [r.id for r in (*self.running, *self.waiting) if r.adapter == name]
        if users:
            raise ValueError(f"adapter {name!r} is in use by requests {users}; cancel them or let them finish first")
        self.merged.use(None, self.bank)
        self.bank.remove(name)
        self.prefixes.pop(name, None)
        self._install()
        self.merged.keep_only(self.bank.modules)

    def close(self) -> nn.Module:
        """Cancel every request, unwrap the model's layers and return the plain base model, in the
        train/eval mode it came in. The engine is done then: it refuses every later call (so nothing it
        does can change the model any more); a second close() only returns the model."""
        if self.closed:
            return self.model
        for request in [*self.running, *self.waiting]:
            self.cancel(request)
        self.merged.use(None, self.bank)
        for name in self.bank.names:
            self.bank.remove(name)
        self.prefixes.clear()
        uninstall(self.model)
        if self.graphs is not None:
            self.graphs.clear()
        self.model.config._attn_implementation = self._own_attention
        self.model.train(self._was_training)
        self.closed = True
        return self.model

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this Engine is closed: it gave its model back with close(); make a new Engine "
                               "to serve the model again")

    def _install(self) -> None:
        """Wrap exactly the layers the bank holds factors for; captured graphs read the old layers
        and tensors, so they go."""
        install(self.model, self.bank.modules, self.route)
        if self.graphs is not None:
            self.graphs.clear()

    # --- requests, one at a time -------------------------------------------------------------

    def submit(self, prompt: Prompt, adapter: str | None = None, *, max_new_tokens: int = 64,
               temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
               stop: str | Sequence[str] | None = None, ignore_eos: bool = False,
               logprobs: int | None = None) -> Request:
        """Queue one prompt (a string, or token ids) for ``adapter`` (None: the base model) and
        return its handle; the arguments mean what they mean in `generate`. It runs from the next
        `step` on that has room for it; read its tokens from `stream`, or from the events of `step`.
        ``logprobs=k`` (0 to 20) gives every new token's log-probability and the k most likely
        tokens' (`request.TokenLogprob`, in each event and in ``request.logprobs``)."""
        self._check_open()
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                     or not 0 <= logprobs <= MAX_TOP_LOGPROBS):
            raise ValueError(f"logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS} (the top tokens to report "
                             f"beside each new one) or None, got {logprobs!r}")
        text_in = prompt_kind([prompt])
        ids = self._encode(prompt) if text_in else _token_ids(prompt, 0)
        if adapter is not None and not isinstance(adapter, str):
            raise TypeError(f"adapter must be one adapter's name or None (the base model), got {adapter!r}")
        (request,) = self._requests([ids], [adapter], max_new_tokens, temperature, top_p, [check_seed(seed)], stop,
                                    ignore_eos)
        request.top_logprobs = logprobs
        self.waiting.append(request)
        return request

    def step(self) -> list[Event]:
        """One token for every running request, and the first for those that join now: every
        request's event of this step (requests that end leave the batch, freeing their slots)."""
        self._check_open()
        with torch.inference_mode():
            decoding = list(self.running)
            joining = self._admit()
            events = []
            if decoding:
                events += self._advance(decoding, self.runner.decode(decoding))
            if joining:
                events += self._advance(joining, self.runner.prefill(joining, self._pad_id()))
            for request in sorted((r for r in self.running if r.finished), key=lambda r: -r.row):
                self._leave(request)  # highest row first, so the row moved into a freed one is a live one
        return events

    def stream(self, request: Request) -> Iterator[Event]:
        """``request``'s events, stepping the engine (every request advances) until it ends. The first
        event catches up on what it made before the stream started, if anything. (A server with many
        streams runs one loop that calls `step` and hands each event to its request's consumer.)"""
        if request.tokens or request.finished:
            yield Event(request.id, list(request.tokens), request.text, request.finish_reason)
        while not request.finished:
            if request not in self.waiting and request.row < 0:
                raise ValueError(f"request {request.id} is not in this engine; stream the handle its submit returned")
            yield from (e for e in self.step() if e.request_id == request.id)

    def run_until_done(self) -> Iterator[Event]:
        """Every event of every request, step by step, until nothing waits or runs."""
        while self.waiting or self.running:
            yield from self.step()

    def cancel(self, request: Request) -> None:
        """End ``request`` now ("cancelled"), freeing its KV slot; nothing happens to the others."""
        if request.finished:
            return
        request.finish_reason = "cancelled"
        if request in self.waiting:
            self.waiting.remove(request)
        elif request.row >= 0:
            self._leave(request)

    def cancel_all(self) -> list[Request]:
        """End every waiting and running request ("cancelled") and free every KV slot, whatever
        state a failed `step` left them in (a server's recovery after an error); returns them.
        The adapters, the bank and a merged adapter stay as they are."""
        ended = [r for r in (*self.running, *self.waiting) if not r.finished]
        for request in ended:
            request.finish_reason, request.row = "cancelled", -1
        self.running.clear()
        self.waiting.clear()
        return ended

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
        self._check_open()
        text_in = prompt_kind(prompts)
        ids = [self._encode(p) for p in prompts] if text_in else [_token_ids(p, i) for i, p in enumerate(prompts)]
        adapters = self._check_adapters(adapters, len(prompts))
        requests = self._requests(ids, adapters, max_new_tokens, temperature, top_p, seeds_for(seed, len(prompts)),
                                  stop, ignore_eos)
        self.waiting.extend(requests)
        try:
            while not all(r.finished for r in requests):  # requests submitted before these run along
                self.step()
        except BaseException:  # an interrupted call leaves no requests of its own behind
            for request in requests:
                self.cancel(request)
            raise
        if not text_in:
            return [r.tokens for r in requests]
        return [self._text(r.tokens, stop_strings(stop)) for r in requests]

    def _requests(self, ids: list[list[int]], adapters: list[str | None], max_new_tokens: int, temperature: float,
                  top_p: float, seeds: list[int | None], stop, ignore_eos: bool) -> list[Request]:
        """Checked requests, none queued yet: a bad argument refuses them all."""
        self._check_adapters(adapters, len(ids))
        stops = stop_strings(stop)
        if stops and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer to decode the outputs; make the Engine with one")
        params = SamplingParams(float(temperature), float(top_p))
        n_prefix = [len(self.prefixes[a]) if a in self.prefixes else 0 for a in adapters]
        self._check_lengths(ids, max_new_tokens, n_prefix)  # the prompts as given: an empty one is refused
        # placeholders for an adapter's prefix embeddings (filled in at prefill): they count as prompt tokens
        ids = [[self._pad_id()] * n + list(p) for p, n in zip(ids, n_prefix)]
        return [Request(p, a, params, None if params.greedy else self._generator(sd), max_new_tokens, bool(ignore_eos),
                        IncrementalText(self.tokenizer, stops) if self.tokenizer is not None else None)
                for p, a, sd in zip(ids, adapters, seeds)]

    # --- the running batch -------------------------------------------------------------------

    def _admit(self) -> list[Request]:
        """Move waiting requests into free KV slots, in order, while their adapters get bank slots."""
        names = {r.adapter for r in self.running} - {None}
        joining, width = [], 0
        while self.waiting and len(self.running) + len(joining) < self.max_batch:
            adapter = self.waiting[0].adapter
            if adapter is not None and adapter not in names and len(names) >= self.bank.max_adapters:
                break  # it waits for a bank slot, and the requests behind it wait their turn
            width = max(width, len(self.waiting[0].prompt))
            if joining and self.max_prefill_tokens is not None and width * (len(joining) + 1) > self.max_prefill_tokens:
                break  # the next step's prefill takes it
            joining.append(self.waiting.popleft())
            if adapter is not None:  # base rows take no bank slot
                names.add(adapter)
        if not joining:
            return []
        batch = self.running + joining
        for request, slot in zip(batch, self.bank.slots_for([r.adapter for r in batch])):
            request.bank_slot = slot  # unchanged for running requests: their adapters stay in their slots
        for request in joining:
            request.row = len(self.running)
            self.running.append(request)
        return joining

    def _leave(self, request: Request) -> None:
        """Free ``request``'s KV slot; the last running request moves into it (the rows stay packed)."""
        last = self.running[-1]
        if last is not request:
            self.cache.move(last.row, request.row, last.cached)
            last.row = request.row
            self.running[request.row] = last
        self.running.pop()
        request.row = -1

    def _advance(self, requests: list[Request], logits: torch.Tensor) -> list[Event]:
        """Give each request its next token (from its row of logits (n, V)); its event."""
        eos = self._eos_ids()
        events = []
        chosen = next_tokens(logits, [r.params for r in requests], [r.generator for r in requests])
        chosen_ids = chosen.tolist()
        scored = token_logprobs(logits, chosen, chosen_ids, requests)
        for request, token in zip(requests, chosen_ids):
            text, detok, scores = "", request.detokenizer, []
            if token in eos and not request.ignore_eos:
                request.finish_reason, tokens = "stop", []
            else:
                request.tokens.append(token)
                tokens = [token]
                if request in scored:
                    scores = [scored[request]]
                    request.logprobs.append(scored[request])
                text = detok.push(token) if detok is not None else ""
                if detok is not None and detok.stopped:
                    request.finish_reason = "stop"
                elif len(request.tokens) >= request.max_new_tokens:
                    request.finish_reason = "length"
            if request.finished and detok is not None:
                text += detok.finish()
            events.append(Event(request.id, tokens, text, request.finish_reason, scores))
        return events

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

    def _check_lengths(self, prompts: list[list[int]], max_new_tokens: int, n_prefix: list[int]) -> None:
        """``prompts`` as the caller gave them; ``n_prefix[i]``: the prefix embeddings that go in front of
        prompt i (its adapter's), which count against the positions."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        config = self.model.config
        limit, vocab = getattr(config, "max_position_embeddings", None), getattr(config, "vocab_size", None)
        for i, (prompt, n) in enumerate(zip(prompts, n_prefix)):
            if not prompt:
                raise ValueError(f"prompt {i} has no tokens; a causal LM needs at least one to start from")
            if vocab is not None and not all(0 <= t < vocab for t in prompt):
                raise ValueError(f"prompt {i} has token ids outside this model's vocabulary [0, {vocab})")
            # The last new token is returned but never fed back, so it needs no position.
            needed = n + len(prompt) + max_new_tokens - 1
            tokens = f"{len(prompt)} tokens" + (f" (and {n} prefix embeddings of its adapter)" if n else "")
            if limit is not None and needed > limit:
                raise ValueError(f"prompt {i} has {tokens}; with max_new_tokens={max_new_tokens} it "
                                 f"needs more than the model's {limit} positions: shorten it or lower max_new_tokens")
            if needed > self.max_seq_len:
                raise ValueError(f"prompt {i} has {tokens}; with max_new_tokens={max_new_tokens} it needs "
                                 f"{needed} positions, over the engine's max_seq_len="
                                 f"{self.max_seq_len}: make the Engine with a larger max_seq_len, or lower "
                                 f"max_new_tokens")

    def _generator(self, seed: int | None) -> torch.Generator:
        if seed is None:  # drawn from torch's generator, so torch.manual_seed makes a run repeatable
            seed = int(torch.randint(0, 2**62, ()))
        return torch.Generator(device=self.device).manual_seed(int(seed))

    def _eos_ids(self) -> set[int]:
        """Where a request ends: `generate.end_ids` (the tokenizer's EOS and the generation config's);
        without a tokenizer, the model config's EOS stands in for the tokenizer's."""
        ids = set(end_ids(self.model, self.tokenizer))
        if self.tokenizer is None:
            eos = self.model.config.eos_token_id
            ids |= set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
        return ids

    def _pad_id(self) -> int:  # any id does: padded places are masked
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return pad if pad is not None else next(iter(self._eos_ids()), 0)

    def __repr__(self) -> str:
        return (f"Engine({type(self.model).__name__}, adapters={self.adapters}, max_batch={self.max_batch}, "
                f"max_seq_len={self.max_seq_len}, max_adapters={self.bank.max_adapters}, "
                f"max_rank={self.bank.max_rank}, "
                f"running={len(self.running)}, waiting={len(self.waiting)})")


def _check_plain(model: nn.Module) -> None:
    if any(True for _ in lora_modules(model)) or hasattr(model, "peft_config"):
        raise ValueError("Engine takes a plain base model; this one carries LoRA adapters already. Serve them "
                         "through the engine instead: lorakit.unload(model, merge=False) (or PEFT's unload()), "
                         "save the adapters, then engine.add_adapter(name, path)")
    if wrapped(model):
        raise ValueError("this model is already in use by an Engine; call that engine's close() first")


def _token_ids(prompt, i: int) -> list[int]:
    """Prompt ``i``'s ids as ints: integers only (Python's, numpy's, 0-d integer tensors), never a float
    silently truncated."""
    try:
        return [operator.index(t) for t in prompt]
    except TypeError:
        bad = next(t for t in prompt if not hasattr(t, "__index__"))
        raise TypeError(f"prompt {i} holds {bad!r} ({type(bad).__name__}); token-id prompts are lists of integer "
                        f"ids") from None


def _float_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
