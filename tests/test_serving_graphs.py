"""Decode on fixed buckets (`serving/graphs.py`) and the dense segmented op it runs: the same
tokens as each adapter alone (PEFT + transformers greedy), whatever the bucket padding; on the GPU,
CUDA-graph replays equal eager decoding."""

from __future__ import annotations

import pytest
import torch

from lorakit.serving import Engine
from lorakit.serving.bank import BankModule
from lorakit.serving.ops import segmented_lora_dense, segmented_lora_reference, slot_columns_mask

from conftest import tiny_llama
from test_serving import NEW, PROMPTS, engine_with, greedy, paths, references  # noqa: F401

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def random_module(slots=4, max_rank=8, d_in=12, d_out=10, ranks=(3, 0, 8, 5), seed=0) -> BankModule:
    g = torch.Generator().manual_seed(seed)
    m = BankModule("m", torch.zeros(max_rank, slots, d_in, dtype=torch.float64),
                   torch.zeros(d_out, max_rank, slots, dtype=torch.float64), list(ranks))
    for s, r in enumerate(ranks):
        m.A[s, :r] = torch.randn(r, d_in, generator=g, dtype=torch.float64)
        m.B[s, :, :r] = torch.randn(d_out, r, generator=g, dtype=torch.float64)
    return m


def test_dense_op_equals_the_reference_and_each_slot_alone() -> None:
    m = random_module()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 12, generator=g, dtype=torch.float64)
    token_slots = torch.tensor([2, -1, 0, 3, 3, 1, -1, 2, 0])
    want = segmented_lora_reference(x, m.A, m.B, token_slots)
    for rank in (m.widest_rank, m.A.shape[1]):  # the narrowest rank that holds every slot, and all of it
        A_flat, B_flat = m.flat(rank)
        got = segmented_lora_dense(x, A_flat, B_flat, slot_columns_mask(token_slots, 4, rank, x.dtype))
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for t, s in enumerate(token_slots.tolist()):
        alone = torch.zeros(10, dtype=torch.float64) if s < 0 else m.B[s] @ (m.A[s] @ x[t])
        torch.testing.assert_close(want[t], alone)


def test_flat_views_share_the_banks_storage() -> None:
    m = random_module()
    A_flat, B_flat = m.flat(5)
    assert A_flat.data_ptr() == m.A_by_rank.data_ptr() and B_flat.data_ptr() == m.B_by_rank.data_ptr()
    m.A[1, 2, 3] = 7.0  # a write through the slot-major view shows in the flat one: column 2·S + 1
    assert A_flat[2 * 4 + 1, 3] == 7.0


def test_bucketed_decode_matches_each_adapter_alone_as_requests_join_and_leave(paths, references) -> None:
    """cuda_graphs=True on a CPU runs the GPU's buckets without capture: padded rows, a rounded
    attention width, the dense op, and a base-only bucket (rank 0) when no row uses an adapter."""
    engine = engine_with(paths, names=("qv", "all", "mlp"), max_batch=6, cuda_graphs=True)
    assert engine.graphs is not None and not engine.graphs.capture
    base_only = engine.submit(PROMPTS[3], None, max_new_tokens=3, ignore_eos=True)
    while not base_only.finished:
        engine.step()
    assert {key[2] for key in engine.graphs.buckets} == {0}
    a = engine.submit(PROMPTS[1], "qv", max_new_tokens=12, ignore_eos=True)
    b = engine.submit(PROMPTS[0], "all", max_new_tokens=NEW, ignore_eos=True)
    engine.step()
    c = engine.submit(PROMPTS[2], None, max_new_tokens=5, ignore_eos=True)     # three rows: a bucket of 4
    engine.step()
    engine.add_adapter("own", paths["own"])  # new wrapped layers: the buckets made so far are dropped
    assert not engine.graphs.buckets
    d = engine.submit(PROMPTS[4], "own", max_new_tokens=NEW, ignore_eos=True)
    e = engine.submit(PROMPTS[5], "mlp", max_new_tokens=NEW, ignore_eos=True)
    while engine.running or engine.waiting:
        engine.step()
    for request, n in ((base_only, 3), (a, 12), (b, NEW), (c, 5), (d, NEW), (e, NEW)):
        assert request.tokens == greedy(references[request.adapter], request.prompt, max_new_tokens=n)
    assert {rows for rows, _, _ in engine.graphs.buckets} <= {1, 2, 4, 6}


def test_bucketed_decode_with_a_merged_adapter_runs_the_base_bucket(paths, references) -> None:
    engine = engine_with(paths, names=("qv",), max_batch=4, cuda_graphs=True, merge_single_adapter=True)
    outs = engine.generate([PROMPTS[0], PROMPTS[3]], ["qv", "qv"], max_new_tokens=NEW, ignore_eos=True)
    assert {key[2] for key in engine.graphs.buckets} == {0}  # the adapter is in the weights
    for prompt, out in zip((PROMPTS[0], PROMPTS[3]), outs):
        assert out == greedy(references["qv"], prompt)


@cuda
def test_cuda_graph_decode_equals_eager_decode_on_the_gpu(paths) -> None:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(7)]
    adapters = ["qv", None, "all", "mlp", "own", None, "qv"]
    outs = {}
    for graphs in (False, True):
        engine = Engine(tiny_llama().cuda(), None, max_batch=8, max_rank=16, cuda_graphs=graphs)
        for name in ("qv", "all", "mlp", "own"):
            engine.add_adapter(name, paths[name])
        outs[graphs] = engine.generate(prompts, adapters, max_new_tokens=NEW, ignore_eos=True)
        assert (engine.graphs is not None) == graphs and (not graphs or engine.graphs.capture)
    assert outs[True] == outs[False]
