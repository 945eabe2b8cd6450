"""Data parallelism for LoRA training with torch.distributed (`torchrun --nproc-per-node N`).

Every process reads the same global batch (the same seeded `Batches`) and keeps its own rows;
only the adapter's gradients travel, since DDP all-reduces only parameters that require grad and
nothing else is synchronised: the frozen base model and its buffers are never sent, because every
process loads the same weights. Rank 0 logs and writes files.

With `fsdp=True` the model is sharded instead (FSDP2, `fully_shard`): each transformer block is
one unit, gathered whole for its forward and backward and sharded again after, so no process
holds the whole base model for long. The frozen base weights get no gradient, so only the
adapter's gradients are reduce-scattered. Parameters and optimizer state are then DTensors; the
helpers below gather them whole (collectives: every rank calls them) for rank 0 to write, and
shard full tensors read from a checkpoint again, so files look the same as under DDP.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
from collections.abc import Iterable, Iterator, Mapping
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


def broadcast_from_main(tensors: Iterable[torch.Tensor], d: Dist, device: torch.device | None = None) -> None:
    """Give every rank rank 0's values (the adapter at the start), in place. Tensors that are not
    yet on `device` (a model that FSDP will move block by block) travel through it: NCCL sends
    only CUDA tensors."""
    if d.enabled:
        with torch.no_grad():
            for t in tensors:
                if device is None or t.device == device:
                    dist.broadcast(t.data, src=0)
                else:
                    staged = t.data.to(device)
                    dist.broadcast(staged, src=0)
                    t.data.copy_(staged)


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


def wrap(model: nn.Module, d: Dist, device: torch.device, fsdp: bool = False) -> nn.Module:
    """DDP over the trainable (adapter) parameters only, or FSDP2 sharding of the whole model in
    place (`fsdp=True`, see `shard_model`); the model itself when not distributed.

    DDP: `init_sync=False` and no buffer sync: DDP would otherwise send the whole base model and its
    buffers from rank 0 at start, and the buffers at every forward. The adapter is
    broadcast by the trainer instead (`broadcast_from_main`), before the first step.
    """
    if not d.enabled:
        return model
    if fsdp:
        return shard_model(model, d, device)
    ids = [device.index] if device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel
    # torch 2.13 renamed the per-forward switch; with init_sync=False neither syncs at start.
    no_buffer_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters \
        else {"broadcast_buffers": False}
    return ddp(model, device_ids=ids, init_sync=False, **no_buffer_sync)


def gradient_sync(wrapped: nn.Module, d: Dist, now: bool) -> contextlib.AbstractContextManager:
    """Reduce gradients in this backward (`now`, the step's last batch) or only accumulate them."""
    if not d.enabled:
        return contextlib.nullcontext()
    if _is_fsdp(wrapped):
        wrapped.set_requires_gradient_sync(now)  # recursive: every block keeps its unsharded grads
        return contextlib.nullcontext()
    return contextlib.nullcontext() if now else wrapped.no_sync()


# --- FSDP ---------------------------------------------------------------------------------------

def shard_model(model: nn.Module, d: Dist, device: torch.device) -> nn.Module:
    """FSDP2 in place: `fully_shard` each transformer block, then the root (embeddings, norm, head).

    Blocks are the model's `_no_split_modules` classes (what transformers keeps on one device),
    else the items of its outermost `nn.ModuleList`s. A block holds frozen base weights beside
    trainable LoRA factors; FSDP2 keeps `requires_grad` per parameter and reduce-scatters only the
    gradients that exist, so the base weights are gathered for compute but their (absent)
    gradients never travel. Parameters move to `device` one block at a time as they are sharded.
    """
    fully_shard, init_device_mesh = _fsdp2()
    mesh = init_device_mesh(device.type, (d.world_size,))
    blocks = _blocks(model)
    if not blocks:
        raise ValueError(f"fsdp: found no transformer blocks to shard in {type(model).__name__} (no "
                         "_no_split_modules classes, no nn.ModuleList); the whole model would be one unit, "
                         "gathered whole on every process: use DDP (fsdp=False) for it")
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the rest: embeddings, final norm, head
    return model


def _fsdp2():
    try:
        from torch.distributed.device_mesh import init_device_mesh
        try:
            from torch.distributed.fsdp import fully_shard  # torch >= 2.6
        except ImportError:
            from torch.distributed._composable.fsdp import fully_shard  # torch 2.4, 2.5
    except ImportError as e:
        raise RuntimeError(f"fsdp=True needs FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.4); this torch "
                           f"{torch.__version__} lacks it ({e}). Upgrade torch, or train with DDP (fsdp=False)") from e
    return fully_shard, init_device_mesh


def _blocks(model: nn.Module) -> list[nn.Module]:
    from lorakit.inject import walk  # walk() does not look inside LoRA wrappers

    names = set(getattr(model, "_no_split_modules", None) or ())
    if names:
        found = [m for _, m in walk(model) if type(m).__name__ in names]
        if found:
            return found
    blocks: list[nn.Module] = []
    inside: set[int] = set()
    for _, module in walk(model):
        if isinstance(module, nn.ModuleList) and id(module) not in inside:
            blocks.extend(module)
            inside.update(id(m) for m in module.modules())
    return blocks


def _is_fsdp(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule  # torch >= 2.6
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import FSDPModule
        except ImportError:
            return False
    return isinstance(module, FSDPModule)


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return None
    return DTensor


def is_sharded(t: torch.Tensor) -> bool:
    DTensor = _dtensor_type()
    return DTensor is not None and isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A sharded tensor gathered whole (a collective); any other tensor as it is."""
    return t.full_tensor() if is_sharded(t) else t


def full_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor whole, detached. A collective under FSDP: every rank calls it, with the same keys."""
    return {k: full_tensor(v.detach()) for k, v in tensors.items()}


def shard_like(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """`full` laid out as `param` is (this rank's shard of it); `full` itself when param is whole.
    Every rank holds `full` (read from the checkpoint), so nothing is sent."""
    if not is_sharded(param):
        return full
    from torch.distributed.tensor import distribute_tensor

    full = full.to(device=param.to_local().device, dtype=param.dtype)
    # src_data_rank=None (torch >= 2.7): each rank cuts its shard from its own copy; older ones scatter rank 0's.
    local_only = {"src_data_rank": None} if "src_data_rank" in inspect.signature(distribute_tensor).parameters else {}
    return distribute_tensor(full, param.device_mesh, param.placements, **local_only)


def clip_grad_norm_(params: list[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """Clip the global gradient norm, whole or sharded, and return it (a plain tensor)."""
    max_norm = max_norm or float("inf")
    if not hasattr(torch.nn.utils, "get_total_norm"):  # torch < 2.6
        return full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm))
    grads = [p.grad for p in params if p.grad is not None]
    norm = full_tensor(torch.nn.utils.get_total_norm(grads))  # sharded: the shards' norms are combined
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


class FullOptimizerState:
    """`optimizer.state_dict()` with every sharded state tensor gathered whole: what
    `checkpoint.optimizer_to_files` reads. A collective under FSDP: every rank builds it."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        sd = optimizer.state_dict()
        self._sd = {**sd, "state": {i: full_tensors(s) if any(is_sharded(v) for v in s.values()) else s
                                    for i, s in sd["state"].items()}}

    def state_dict(self) -> dict[str, Any]:
        return self._sd


def shard_optimizer_state_(optimizer: torch.optim.Optimizer) -> None:
    """After loading full tensors from a checkpoint: each sharded parameter's state (exp_avg, ...)
    sharded like the parameter. Scalars (step) stay as they are."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not is_sharded(p):
                continue
            state = optimizer.state.get(p, {})
            for k, v in state.items():
                if isinstance(v, torch.Tensor) and not is_sharded(v) and v.shape == p.shape:
                    state[k] = shard_like(p, v)


@contextlib.contextmanager
def full_parameters(model: nn.Module, full: Mapping[str, torch.Tensor]) -> Iterator[nn.Module]:
    """The model with the named parameters temporarily replaced by whole tensors (from
    `full_tensors`), so `save_adapter` can read a sharded model's adapter; put back afterwards."""
    replaced = []
    try:
        for name, value in full.items():
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            replaced.append((owner, attr, owner._parameters[attr]))
            owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
        yield model
    finally:
        for owner, attr, param in reversed(replaced):
            owner._parameters[attr] = param
