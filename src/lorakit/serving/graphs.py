"""Decode steps on fixed shapes, replayed as CUDA graphs on the GPU.

A decode forward is one token for each of n running requests: dozens of small kernels per layer,
so eager decoding is bound by the host launching them. Captured once as a CUDA graph and replayed,
the step costs the device's time alone. A graph fixes every shape and address, so a decode step is
run on fixed buckets:

- rows: n rounded up to a power of two (at most ``max_batch``); the padding rows feed token 0 at
  position 0 into the KV slots past the running ones, which are free or about to be prefilled
  (the engine keeps running requests in slots 0..n-1), and their logits are dropped;
- attended width: the longest cached length + 1, rounded up to a multiple of ``WIDTH_STEP``; the
  attention mask hides every position past a row's own;
- adapters: the dense op over the first ``rank`` components of every bank slot
  (`ops.segmented_lora_dense`, no host sync), or none at all when no row uses an adapter (base
  requests only, or the adapter merged), so base traffic decodes at the base model's cost.

Each (rows, width, rank) bucket has its own input buffers (token ids, cached lengths, bank slots)
and graph, made the first time a step needs it: a warm-up run on a side stream, then the capture.
Both write the same keys and values the replay writes again (the buffers already hold the step's
inputs), so capturing during a real step is harmless. Graphs hold the addresses of the bank's
factors and of the wrapped layers: the engine drops them all when its adapters or layers change.
On a CPU (or ``capture=False``) the same buckets run without capture: what the tests check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

WIDTH_STEP = 256

# run(ids (R, 1), cached (R,), slots (R,), width, rank) -> logits (R, 1, V); rank 0: no adapter term
DecodeRun = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, int], torch.Tensor]


@dataclass
class _Bucket:
    ids: torch.Tensor       # (R, 1) int64
    cached: torch.Tensor    # (R,) int64
    slots: torch.Tensor     # (R,) int64
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None  # the graph's output (R, 1, V), rewritten by every replay


class DecodeGraphs:
    """Bucketed decode steps for one engine; graphs when ``capture`` (a CUDA device)."""

    def __init__(self, run: DecodeRun, *, max_batch: int, max_seq_len: int, device: torch.device,
                 capture: bool) -> None:
        if capture and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the engine's model is on {device}")
        self.run, self.max_batch, self.max_seq_len, self.device = run, max_batch, max_seq_len, device
        self.capture = capture
        self.buckets: dict[tuple[int, int, int], _Bucket] = {}

    def clear(self) -> None:
        """Forget every bucket (after the wrapped layers or the bank's tensors changed)."""
        self.buckets.clear()

    def rows_for(self, n: int) -> int:
        return min(1 << (n - 1).bit_length(), self.max_batch)

    def width_for(self, longest_cached: int) -> int:
        return min(-(-(longest_cached + 1) // WIDTH_STEP) * WIDTH_STEP, self.max_seq_len)

    def logits(self, tokens: list[int], cached: list[int], slots: list[int], rank: int) -> torch.Tensor:
        """(n, V): the next-token logits of n rows feeding ``tokens`` after ``cached`` tokens each,
        through bank ``slots`` (-1: base) at ``rank`` (0: no row uses an adapter)."""
        n = len(tokens)
        rows = self.rows_for(n)
        key = (rows, self.width_for(max(cached)), rank)
        pad = rows - n
        values = torch.tensor([tokens + [0] * pad, cached + [0] * pad, slots + [-1] * pad], dtype=torch.long)
        bucket = self.buckets.get(key)
        fresh = bucket is None
        if fresh:
            bucket = self.buckets[key] = _Bucket(*(torch.empty(s, dtype=torch.long, device=self.device)
                                                   for s in ((rows, 1), (rows,), (rows,))))
        values = values.to(self.device, non_blocking=True)
        bucket.ids.copy_(values[0, :, None])
        bucket.cached.copy_(values[1])
        bucket.slots.copy_(values[2])
        if not self.capture:
            return self.run(bucket.ids, bucket.cached, bucket.slots, key[1], rank)[:n, -1]
        if fresh:
            self._capture(bucket, key)
        bucket.graph.replay()
        return bucket.logits[:n, -1]

    def _capture(self, bucket: _Bucket, key: tuple[int, int, int]) -> None:
        args = (bucket.ids, bucket.cached, bucket.slots, key[1], key[2])
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # lazy initialisation (cuBLAS handles, workspaces) off the graph
            self.run(*args)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            bucket.logits = self.run(*args)
        bucket.graph = graph
