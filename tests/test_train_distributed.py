"""Data-parallel training on CPU: 2 processes with the gloo backend, started as torchrun would
start them (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT in the environment).

- Only the adapter's gradients are all-reduced (counted with a DDP comm hook).
- 2 processes × 4 rows = 1 process × 8 rows: the same final adapter within float tolerance.
- A 2-process run that crashes and resumes ends with the adapter of an uninterrupted 2-process
  run, with dropout on: every rank's random state is checkpointed.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import lorakit
from lorakit.train import train

from test_train import Crash, adapter_tensors, batches, config, crash_at, injected, token_examples

WORLD = 2
NO_DROPOUT = lorakit.LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # two processes share the machine's cores
    out = Path(out)
    data = token_examples()

    # Only adapter gradients travel.
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from lorakit.train import distributed
    d, device, created = distributed.setup("cpu")
    assert created and d.world_size == WORLD and d.rank == rank
    model = injected(NO_DROPOUT)
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
