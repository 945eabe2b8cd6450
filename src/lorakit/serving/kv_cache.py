"""The engine's KV cache: fixed slots, one per running request, allocated once.

    keys, values (per layer): (max_batch, kv_heads, max_seq_len, head_dim)

Slot k holds one request's keys and values at cache positions 0, 1, ... (position j is the
request's token j: no padding inside a slot). The running requests occupy slots 0..n-1 (the
engine keeps them packed: when one leaves, the last one moves into its slot), so a forward over
rows [start, stop) reads a view of the storage, never a gather. Positions past a request's length
hold stale values from an earlier occupant or from padding; the attention mask hides them.

A forward is described by a `CacheWindow` (which slots, how many tokens each already has, how many
new tokens come in); transformers' attention layers call `SlotCache.update`, which writes the new
keys and values in place and returns the window's view. The engine passes the window's own 4D
mask and position ids, so transformers never asks the cache for lengths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

try:
    from transformers.cache_utils import Cache, CacheLayerMixin
except ImportError as error:  # the per-layer Cache API came with transformers' cache refactor (late 4.x)
    raise ImportError("lorakit.serving needs a transformers whose Cache is a list of layers "
                      "(transformers.cache_utils.CacheLayerMixin); upgrade it: pip install -U transformers") from error


@dataclass(frozen=True)
class CacheWindow:
    """The slots one forward reads and writes: rows ``start .. start + len(offsets)`` of every layer.
    ``offsets[i]`` tokens of row i are cached already; the forward brings ``new_tokens`` more per row
    (right padded: a row's tokens past its own length are padding, written but never attended to)."""

    start: int
    offsets: torch.Tensor   # (n,) int64, on the cache's device
    new_tokens: int
    width: int              # max(offsets) + new_tokens: the cache positions the forward attends over

    @property
    def rows(self) -> int:
        return self.offsets.shape[0]

    def positions(self) -> torch.Tensor:
        """(n, new_tokens): each new token's position in its request (its cache position)."""
        return self.offsets[:, None] + torch.arange(self.new_tokens, device=self.offsets.device)

    def attention_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """(n, 1, new_tokens, width) additive mask: 0 where a query may look (cache positions up to
        its own), the dtype's lowest value elsewhere (padding, stale slots, the future)."""
        keys = torch.arange(self.width, device=self.offsets.device)
        visible = keys[None, None, :] <= self.positions()[:, :, None]                # (n, q, width)
        mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
        return mask.masked_fill_(~visible, torch.finfo(dtype).min)[:, None]


class SlotLayer(CacheLayerMixin):
    """One attention layer's slots; `update` writes the window's new keys and values in place."""

    is_sliding = False

    def __init__(self, owner: "SlotCache", index: int, shape: tuple[int, int, int, int], dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.owner, self.index = owner, index
        self.keys = torch.zeros(shape, dtype=dtype, device=device)    # (slots, heads, max_seq_len, head_dim)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass  # allocated at construction

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        w = self.owner.window
        if w is None:
            raise RuntimeError("SlotCache: a forward ran without a window; the engine sets one around each forward")
        n, heads, q, dim = key_states.shape
        if (n, q) != (w.rows, w.new_tokens) or (heads, dim) != (self.keys.shape[1], self.keys.shape[3]):
            raise ValueError(f"SlotCache layer {self.index}: the model gave keys of shape {tuple(key_states.shape)}, "
                             f"but the window has {w.rows} rows of {w.new_tokens} tokens and the cache holds "
                             f"{self.keys.shape[1]} heads of size {self.keys.shape[3]}; this model's attention "
                             f"layout is not the one read from its config")
        rows = torch.arange(w.start, w.start + n, device=self.keys.device)[:, None]           # (n, 1)
        positions = w.positions()                                                              # (n, q)
        # keys[rows, :, positions] is (n, q, heads, dim): the advanced indices come first
        self.keys[rows, :, positions] = key_states.transpose(1, 2).to(self.keys.dtype)
        self.values[rows, :, positions] = value_states.transpose(1, 2).to(self.values.dtype)
        stop = w.start + n
        return self.keys[w.start:stop, :, :w.width], self.values[w.start:stop, :, :w.width]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.window.width, 0

    def get_seq_length(self) -> int:
        raise RuntimeError("SlotCache has a length per slot; pass position_ids and the window's attention mask")

    def get_max_length(self) -> int:
        return self.keys.shape[2]


class SlotCache(Cache):
    """Fixed KV slots for ``slots`` requests of up to ``max_seq_len`` tokens each, in every layer."""

    def __init__(self, *, layers: int, slots: int, kv_heads: int, head_dim: int, max_seq_len: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (slots, kv_heads, max_seq_len, head_dim)
        super().__init__(layers=[SlotLayer(self, i, shape, dtype, device) for i in range(layers)])
        self.slots, self.max_seq_len, self.dtype = slots, max_seq_len, dtype
        self.window: CacheWindow | None = None

    @classmethod
    def for_model(cls, config, *, slots: int, max_seq_len: int, dtype: torch.dtype,
                  device: torch.device) -> "SlotCache":
        """Sized from a transformers config (Llama's or GPT-2's names; GPT-2 maps its own)."""
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(layers=config.num_hidden_layers, slots=slots, kv_heads=kv_heads, head_dim=head_dim,
                   max_seq_len=max_seq_len, dtype=dtype, device=device)

    def open(self, start: int, offsets: list[int], new_tokens: int) -> CacheWindow:
        """Set the window of the next forward (and return it): rows ``start ..`` with these cached lengths."""
        if start + len(offsets) > self.slots or max(offsets) + new_tokens > self.max_seq_len:
            raise ValueError(f"SlotCache: rows {start}..{start + len(offsets)} with up to {max(offsets) + new_tokens} "
                             f"tokens do not fit {self.slots} slots of {self.max_seq_len}")
        device = self.layers[0].keys.device
        self.window = CacheWindow(start, torch.tensor(offsets, dtype=torch.long, device=device), new_tokens,
                                  max(offsets) + new_tokens)
        return self.window

    def move(self, source: int, target: int, length: int) -> None:
        """Copy slot ``source``'s first ``length`` positions into slot ``target`` (packing the running rows)."""
        for layer in self.layers:
            layer.keys[target, :, :length] = layer.keys[source, :, :length]
            layer.values[target, :, :length] = layer.values[source, :, :length]

    def nbytes(self) -> int:
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in self.layers)
