"""Data parallelism for LoRA training with torch.distributed (`torchrun --nproc-per-node N`).

Every process reads the same global batch (the same seeded `Batches`) and keeps its own rows;
only the adapter's gradients travel, since DDP all-reduces only parameters that require grad and
nothing else is synchronised: the frozen base model and its buffers are never sent, because every
process loads the same weights. Rank 0 logs and writes files.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Dist:
    """This process's place in the job; rank 0 of 1 when not distributed."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str = "auto") -> tuple[Dist, torch.device, bool]:
    """The process group torchrun asks for (WORLD_SIZE > 1 in the environment) and this rank's device.

    Joins the group when torchrun started us and nobody has yet (gloo on CPU, nccl on CUDA); a
    caller that already called `init_process_group` keeps its own. Returns (Dist, device, whether
    the group was created here, so the caller knows to destroy it).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)  # one GPU per process
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    created = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        created = True
    if dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), local_rank), dev, created
    return Dist(), dev, created


def shard(batch: Mapping[str, Any], d: Dist, allow_empty: bool = False) -> dict[str, Any]:
    """This rank's rows of a global batch: rows rank, rank + N, rank + 2N, ...

    Training needs rows on every rank (DDP's backward is collective); evaluation can do without."""
    if not d.enabled:
        return dict(batch)
    rows = next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor))
    if rows < d.world_size and not allow_empty:
        raise ValueError(f"a batch of {rows} examples cannot be split across {d.world_size} processes; "
                         f"use a batch_size of at least {d.world_size} and Batches(..., drop_last=True)")
    return {k: v[d.rank::d.world_size] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_from_main(tensors: Iterable[torch.Tensor], d: Dist) -> None:
    """Give every rank rank 0's values (the adapter at the start), in place."""
    if d.enabled:
        with torch.no_grad():
            for t in tensors:
                dist.broadcast(t.data, src=0)


def all_gather_json(obj: Any, d: Dist, device: torch.device) -> list[Any]:
    """Every rank's `obj` (JSON-able), in rank order. Sent as UTF-8 bytes: nothing is pickled."""
    if not d.enabled:
        return [obj]
    data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8).to(device)
    size = torch.tensor([data.numel()], device=device)
    sizes = [torch.zeros_like(size) for _ in range(d.world_size)]
    dist.all_gather(sizes, size)
    width = int(max(s.item() for s in sizes))
    padded = torch.zeros(width, dtype=torch.uint8, device=device)
    padded[:data.numel()] = data
    gathered = [torch.empty_like(padded) for _ in range(d.world_size)]
    dist.all_gather(gathered, padded)
    return [json.loads(g[:int(s.item())].cpu().numpy().tobytes()) for g, s in zip(gathered, sizes)]


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def wrap(model: nn.Module, d: Dist, device: torch.device) -> nn.Module:
    """DDP over the trainable (adapter) parameters only; the model itself when not distributed.

    `init_sync=False` and no buffer sync: DDP would otherwise send the whole base model and its
    buffers from rank 0 at start, and the buffers at every forward. The adapter is
    broadcast by the trainer instead (`broadcast_from_main`), before the first step.
    """
    if not d.enabled:
        return model
    ids = [device.index] if device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel
    # torch 2.13 renamed the per-forward switch; with init_sync=False neither syncs at start.
    no_buffer_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters \
        else {"broadcast_buffers": False}
    return ddp(model, device_ids=ids, init_sync=False, **no_buffer_sync)
