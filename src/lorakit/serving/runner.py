"""The engine's forwards: the running rows through the base model, each row through its own adapter.

The engine (`engine.py`) decides which requests run and what their tokens are; the runner makes
their logits. A decode forward feeds every running request's last token (rows 0..n-1, one KV slot
each); a prefill forward feeds the joining requests' prompts, right padded, into their fresh slots.
Each forward routes its rows to their bank slots (`layers.SlotRoute`: -1 is the base model) after
the merge policy had its say (`merging.py`: a forward whose rows all use one adapter may run with it
merged, and then routes nothing), and reads and writes the slot cache through one window
(`kv_cache.py`). With CUDA graphs on (`graphs.py`), decode runs on fixed buckets and every forward,
prefill too, takes the dense segmented op, which needs no host sync.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
from torch import nn

from .bank import AdapterBank
from .graphs import DecodeGraphs
from .kv_cache import CacheWindow, SlotCache
from .layers import SlotRoute
from .merging import MergedWeights
from .request import Request


class Runner:
    """Forwards of ``model`` for an engine's rows. ``prefixes`` (adapter name -> its prefix
    embeddings) is the engine's own dict, read at each prefill. ``cuda_graphs``: decode on the
    buckets of `graphs.DecodeGraphs`, captured when the model is on a CUDA device."""

    def __init__(self, model: nn.Module, cache: SlotCache, bank: AdapterBank, route: SlotRoute,
                 merged: MergedWeights, prefixes: dict[str, torch.Tensor], *, device: torch.device,
                 merge_single_adapter: bool, cuda_graphs: bool, max_batch: int, max_seq_len: int) -> None:
        self.model, self.cache, self.bank, self.route, self.merged = model, cache, bank, route, merged
        self.prefixes = prefixes
        self.merge_single_adapter = merge_single_adapter
        self.device = device
        self.graphs = DecodeGraphs(self._decode_run, max_batch=max_batch, max_seq_len=max_seq_len, device=self.device,
                                   capture=self.device.type == "cuda") if cuda_graphs else None
        accepted = inspect.signature(model.forward).parameters
        self._keeps_logits = "logits_to_keep" in accepted
        self._cache_argument = "cache" if "cache" in accepted else "past_key_values"  # renamed in transformers 5.x

    def decode(self, requests: list[Request]) -> torch.Tensor:
        """Rows 0..n-1 (the running requests) feed their last token: logits (n, V)."""
        if self.graphs is not None:
            slots = self._slots(requests)
            rank = self.bank.widest_rank if any(s >= 0 for s in slots) else 0
            return self.graphs.logits([r.tokens[-1] for r in requests], [r.cached for r in requests], slots, rank)
        window = self.cache.open(0, [r.cached for r in requests], 1)
        ids = torch.tensor([[r.tokens[-1]] for r in requests], device=self.device)             # (n, 1)
        return self._forward(ids, window, requests)[:, -1]

    def prefill(self, requests: list[Request], pad_id: int) -> torch.Tensor:
        """The joining requests' prompts, right padded with ``pad_id``, into their fresh slots:
        last-token logits (k, V)."""
        width = max(len(r.prompt) for r in requests)
        ids = torch.full((len(requests), width), pad_id, dtype=torch.long)
        for i, r in enumerate(requests):
            ids[i, :len(r.prompt)] = torch.tensor(r.prompt, dtype=torch.long)
        # Logits of the last positions only, from the shortest prompt's last token on: an int
        # logits_to_keep means that in every transformers version (a per-row index tensor does not).
        kept = width - min(len(r.prompt) for r in requests) + 1
        window = self.cache.open(requests[0].row, [0] * len(requests), width)
        ids = ids.to(self.device)
        logits = self._forward(ids, window, requests, keep=kept, inputs_embeds=self._prefixed_embeds(ids, requests))
        first = width - logits.shape[1]  # 0 when the model gave every position's logits
        last = torch.tensor([[len(r.prompt) - 1 - first] for r in requests], device=self.device)  # (k, 1)
        logits = logits.gather(1, last[..., None].expand(-1, -1, logits.shape[-1]))
        return logits[:, 0]

    def _prefixed_embeds(self, ids: torch.Tensor, requests: list[Request]) -> torch.Tensor | None:
        """The prefill's input embeddings (k, T, H) with each prefixed request's placeholders (its
        first n_prefix columns) replaced by its adapter's prefix rows; None when no request has one."""
        rows = [(i, self.prefixes[r.adapter]) for i, r in enumerate(requests) if r.adapter in self.prefixes]
        if not rows:
            return None
        embeds = self.model.get_input_embeddings()(ids)                                   # (k, T, H)
        for i, prefix in rows:
            embeds[i, :prefix.shape[0]] = prefix.to(embeds.dtype)
        return embeds

    def _forward(self, input_ids: torch.Tensor, window: CacheWindow, requests: list[Request],
                 keep: int = 1, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """One forward through the cache window, each row through its request's adapter: logits.
        With ``inputs_embeds`` (a prefill with prefix embeddings), those go in instead of the ids."""
        slots = self._slots(requests)
        # with CUDA graphs on, prefill takes the dense op too: no host sync, one GEMM pair per layer
        dense = (self.bank.max_adapters, self.bank.widest_rank, self.cache.dtype) if self.graphs is not None else None
        routed = self.route.rows(torch.tensor(slots, device=self.device), input_ids.shape[1], dense=dense) \
            if any(s >= 0 for s in slots) else contextlib.nullcontext()
        inputs = {"input_ids": input_ids} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
        return self._call(inputs, window, routed, keep)

    def _call(self, inputs: dict[str, torch.Tensor], window: CacheWindow, routed, keep: int) -> torch.Tensor:
        """The model's forward on ``inputs`` through the open cache ``window``, inside ``routed`` (the
        rows' bank slots, or a null context): logits of the last ``keep`` positions."""
        kw = {self._cache_argument: self.cache}
        if self._keeps_logits:
            kw["logits_to_keep"] = keep
        try:
            with routed:
                out = self.model(**inputs, attention_mask=window.attention_mask(self.cache.dtype),
                                 position_ids=window.positions(), use_cache=True, **kw)
        finally:
            self.cache.window = None
        return out.logits

    def _slots(self, requests: list[Request]) -> list[int]:
        """The bank slot of each row of the next forward (-1: base), after merging its one adapter
        if the policy says so (every row's adapter is then in the weights: -1 everywhere)."""
        adapters = {r.adapter for r in requests}
        alone = next(iter(adapters)) if len(adapters) == 1 else None
        self.merged.use(alone if self.merge_single_adapter else None, self.bank)
        if self.merged.name is not None:
            return [-1] * len(requests)
        return [r.bank_slot for r in requests]

    def _decode_run(self, ids: torch.Tensor, cached: torch.Tensor, slots: torch.Tensor, width: int,
                    rank: int) -> torch.Tensor:
        """The decode forward of `graphs.DecodeGraphs` on its buffers: rows 0..R-1, one token each,
        attending over ``width`` cache positions, through the dense op at ``rank`` (0: base only)."""
        window = self.cache.window = CacheWindow(0, cached, 1, width)
        dense = (self.bank.max_adapters, rank, self.cache.dtype)
        routed = self.route.rows(slots, 1, dense=dense) if rank else contextlib.nullcontext()
        return self._call({"input_ids": ids}, window, routed, keep=1)
