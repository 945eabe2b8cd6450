"""Data-parallel training on CPU: 2 processes with the gloo backend, started as torchrun would
start them (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT in the environment).

- Only the adapter's gradients are all-reduced (counted with a DDP comm hook).
- 2 processes × 4 rows = 1 process × 8 rows: the same final adapter within float tolerance.
- A 2-process run that crashes and resumes ends with the adapter of an uninterrupted 2-process
  run, with dropout on: every rank's random state is checkpointed.
- The same three under FSDP (`fsdp=True`): the model is sharded, only adapter gradients are
  reduce-scattered, and the adapter and checkpoint on disk are whole (loadable by one process).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

import lorakit
from lorakit.data import Batches
from lorakit.io import adapter_state_dict
from lorakit.train import train

from conftest import tiny_llama
from test_train import Crash, adapter_tensors, batches, config, crash_at, injected, token_examples

WORLD = 2
NO_DROPOUT = lorakit.LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_torchrun_would(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # two processes share the machine's cores


def _join(rank: int, port: int):
    """(dist, device, a fresh injected model) in a worker that joined the 2-process group."""
    from lorakit.train import distributed

    _as_torchrun_would(rank, port)
    d, device, created = distributed.setup("cpu")
    assert created and d.world_size == WORLD and d.rank == rank
    return d, device, injected(NO_DROPOUT)


def _worker(rank: int, port: int, out: str) -> None:
    out = Path(out)
    data = token_examples()

    # Only adapter gradients travel.
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from lorakit.train import distributed
    d, device, model = _join(rank, port)
    ddp = distributed.wrap(model, d, device)
    sent: list[int] = []

    def counting_hook(state, bucket):
        sent.append(bucket.buffer().numel())
        return default_hooks.allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, counting_hook)
    batch = distributed.shard(next(iter(batches(data, 8))), d)
    ddp(**batch).loss.backward()
    assert sum(sent) == lorakit.trainable_parameters(model)[0], (sent, lorakit.trainable_parameters(model))

    # The same global batch as the single-process run. train() uses the group set up above; it
    # would create one itself, but a second group on the same port in one process can race.
    train(injected(NO_DROPOUT), batches(data, 8), config(out / "ddp", max_steps=6, label_smoothing=0.0))

    # Crash and resume with dropout: each rank's RNG comes back from the checkpoint.
    train(injected(), batches(data, 8), config(out / "whole", max_steps=8))
    try:
        train(injected(), batches(data, 8), config(out / "resumed", max_steps=8), on_step=crash_at(6))
    except Crash:
        pass
    train(injected(), batches(data, 8), config(out / "resumed", max_steps=8), resume=True)
    torch.distributed.destroy_process_group()


@pytest.mark.slow  # 10-25 s on 2 CPU cores, most of it two processes importing transformers
def test_two_processes_match_one_process_and_resume_exactly(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)

    single = tmp_path / "single"
    train(injected(NO_DROPOUT), batches(token_examples(), 8), config(single, max_steps=6, label_smoothing=0.0))
    one, two = adapter_tensors(single / "adapter"), adapter_tensors(tmp_path / "ddp" / "adapter")
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-5)
    assert any(v.abs().max() > 1e-3 for k, v in two.items() if "lora_B" in k)  # it trained

    whole, resumed = adapter_tensors(tmp_path / "whole" / "adapter"), adapter_tensors(tmp_path / "resumed" / "adapter")
    for k in whole:
        assert torch.equal(resumed[k], whole[k]), k
    state = (tmp_path / "resumed" / "checkpoint" / "trainer_state.json").read_text()
    assert '"world_size": 2' in state


# --- FSDP -----------------------------------------------------------------------------------------

def fsdp_config(tmp: Path, **kw):
    """Batches of 4, two per step (the accumulation path), with evaluation (the best/ save path)."""
    return config(tmp, max_steps=6, label_smoothing=0.0, batch_size=4, grad_accum=2, fsdp=True, **kw)


def eval_batches():
    return batches(token_examples(8, seed=1), 4, shuffle=False)


def _fsdp_worker(rank: int, port: int, out: str) -> None:
    out = Path(out)
    data = token_examples()

    # Sharded, and only the adapter's gradients are reduce-scattered.
    from lorakit.train import distributed
    d, device, model = _join(rank, port)
    trainable = lorakit.trainable_parameters(model)[0]
    distributed.wrap(model, d, device, fsdp=True)
    assert all(distributed.is_sharded(p) for p in model.parameters())
    reduced: list[int] = []
    real = torch.distributed.reduce_scatter_single

    def counting(output, input, *args, **kwargs):
        reduced.append(input.numel())
        return real(output, input, *args, **kwargs)

    torch.distributed.reduce_scatter_single = counting  # FSDP2 looks it up at each call
    try:
        model(**distributed.shard(next(iter(batches(data, 8))), d)).loss.backward()
    finally:
        torch.distributed.reduce_scatter_single = real
    assert sum(reduced) == trainable, (reduced, trainable)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)

    train(injected(NO_DROPOUT), batches(data, 4), fsdp_config(out / "fsdp"), eval_batches=eval_batches())

    train(injected(), batches(data, 8), config(out / "whole", max_steps=8, fsdp=True))
    try:
        train(injected(), batches(data, 8), config(out / "resumed", max_steps=8, fsdp=True), on_step=crash_at(6))
    except Crash:
        pass
    train(injected(), batches(data, 8), config(out / "resumed", max_steps=8, fsdp=True), resume=True)
    torch.distributed.destroy_process_group()


@pytest.mark.slow  # 10-18 s on 2 CPU cores, like the DDP test above
def test_fsdp_matches_one_process_saves_whole_adapter_and_resumes_exactly(tmp_path):
    mp.spawn(_fsdp_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)

    # One process ignores fsdp=True: it has nothing to shard across.
    single = tmp_path / "single"
    train(injected(NO_DROPOUT), batches(token_examples(), 4), fsdp_config(single), eval_batches=eval_batches())
    one, two = adapter_tensors(single / "adapter"), adapter_tensors(tmp_path / "fsdp" / "adapter")
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-5)
    assert any(v.abs().max() > 1e-3 for k, v in two.items() if "lora_B" in k)  # it trained
    assert (tmp_path / "fsdp" / "best" / "adapter_model.safetensors").is_file()

    # The saved adapter is whole: it loads into an unsharded model.
    loaded = lorakit.load_adapter(tiny_llama(), tmp_path / "fsdp" / "adapter")
    for k, v in adapter_state_dict(loaded, "default").items():
        assert torch.equal(v, two[k]), k

    # The checkpoint holds whole tensors too: the same names and shapes as a one-process run's.
    for name in ("adapter.safetensors", "optimizer.safetensors"):
        mine, theirs = load_file(str(single / "checkpoint" / name)), load_file(str(tmp_path / "fsdp" / "checkpoint" / name))
        assert {k: v.shape for k, v in theirs.items()} == {k: v.shape for k, v in mine.items()}, name

    whole, resumed = adapter_tensors(tmp_path / "whole" / "adapter"), adapter_tensors(tmp_path / "resumed" / "adapter")
    for k in whole:
        assert torch.equal(resumed[k], whole[k]), k


@pytest.mark.parametrize("n, batch_size, drop_last, problem", [
    (8, 4, False, None), (9, 4, True, None),
    (9, 4, False, "a batch of 1 examples"),  # the last batch leaves one process without a row
    (8, 1, False, "a batch of 1 examples"),
])
def test_fsdp_refuses_eval_batches_that_leave_a_process_without_rows(n, batch_size, drop_last, problem):
    from lorakit.train import distributed
    from lorakit.train.trainer import _check_fsdp

    eval_batches = Batches(token_examples(n), batch_size, drop_last=drop_last)
    two = distributed.Dist(rank=0, world_size=WORLD)
    if problem is None:
        _check_fsdp("default", eval_batches, None, two)
    else:
        with pytest.raises(ValueError, match=problem):
            _check_fsdp("default", eval_batches, None, two)


def test_fsdp_refuses_eval_fn_and_full_fine_tuning():
    from lorakit.train import distributed
    from lorakit.train.trainer import _check_fsdp

    two = distributed.Dist(rank=0, world_size=WORLD)
    with pytest.raises(ValueError, match="eval_fn runs on rank 0 only"):
        _check_fsdp("default", None, lambda model: {}, two)
    with pytest.raises(ValueError, match="full fine-tuning"):
        _check_fsdp(None, None, None, two)
