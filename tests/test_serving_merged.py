"""The merged fast path (`serving/merging.py`, ``Engine(merge_single_adapter=True)``): forwards whose
rows all use one adapter run on merged weights and give the tokens of the unmerged engine and of
PEFT; switching between adapters never moves W0."""

from __future__ import annotations

import torch

import lorakit.serving.layers as serving_layers
from lorakit.serving.layers import wrapped

from conftest import tiny_llama
from test_serving import NEW, PROMPTS, engine_with, greedy, paths, references  # noqa: F401 - fixtures

NAMES = ("qv", "all", "mlp", "own")


def base_weights(engine) -> dict[str, torch.Tensor]:
    return {n: m.base_layer.weight.detach().clone() for n, m in wrapped(engine.model).items()}


def test_a_single_adapter_batch_runs_merged_and_decodes_as_peft(paths, references, monkeypatch):  # noqa: F811
    engine = engine_with(paths, merge_single_adapter=True)
    calls = []
    real = serving_layers.segmented_lora
    monkeypatch.setattr(serving_layers, "segmented_lora", lambda *a: calls.append(1) or real(*a))
    for name in NAMES:
        calls.clear()
        got = engine.generate(PROMPTS, adapters=[name] * len(PROMPTS), max_new_tokens=NEW)
        assert engine.merged.name == name and not calls  # the base model's forward: no segmented term
        assert got == [greedy(references[name], p) for p in PROMPTS]


def test_mixed_traffic_switches_and_matches_the_unmerged_engine(paths):  # noqa: F811
    merged, plain = engine_with(paths, merge_single_adapter=True), engine_with(paths)
    plan = [["qv"] * 3, ["qv", "all", None], [None] * 2, ["mlp"] * 4, ["own", "own"], ["all"], [None, "qv"]]
    for adapters in plan:
        prompts = PROMPTS[:len(adapters)]
        assert merged.generate(prompts, adapters=adapters, max_new_tokens=NEW) == \
            plain.generate(prompts, adapters=adapters, max_new_tokens=NEW)
    assert merged.merged.switches >= 6


def test_a_thousand_switches_leave_w0_bit_for_bit(paths):  # noqa: F811
    engine = engine_with(paths, merge_single_adapter=True)
    w0 = base_weights(engine)
    once = {}
    for k in range(1000):
        name = NAMES[k % len(NAMES)]
        engine.merged.use(name, engine.bank)
        weights = base_weights(engine)
        if name in once:  # merging again from W0 gives the same bits, however many switches came between
            assert all(torch.equal(weights[m], once[name][m]) for m in weights)
        once.setdefault(name, weights)
    engine.merged.use(None, engine.bank)
    assert engine.merged.switches == 2 * 1000  # each use() after the first unmerges, then merges
    assert all(torch.equal(w, w0[m]) for m, w in base_weights(engine).items())


def test_merged_weight_is_w0_plus_delta_rounded_once(paths):  # noqa: F811
    engine = engine_with(paths, merge_single_adapter=True)
    w0 = base_weights(engine)
    engine.merged.use("qv", engine.bank)
    factors = engine.bank.entries["qv"].factors.modules
    for module_name, f in factors.items():
        want = (w0[module_name].double() + f.B_scaled.double() @ f.A.double()).float()
        got = wrapped(engine.model)[module_name].base_layer.weight
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_decoding_under_load_with_requests_joining_while_merged(paths):  # noqa: F811
    """Requests of one adapter run merged; one of another adapter joins mid-run (the engine unmerges),
    then leaves (it merges again): every request's tokens are those of the unmerged engine."""
    merged, plain = engine_with(paths, merge_single_adapter=True), engine_with(paths)
    outputs = {}
    for engine in (merged, plain):
        first = [engine.submit(p, adapter="all", max_new_tokens=NEW) for p in PROMPTS[:3]]
        for _ in range(3):
            engine.step()
        late = engine.submit(PROMPTS[3], adapter="mlp", max_new_tokens=3)
        list(engine.run_until_done())
        outputs[engine is merged] = [r.tokens for r in first + [late]]
    assert outputs[True] == outputs[False]
    assert merged.merged.switches >= 3  # merged, unmerged when "mlp" joined, merged again after it left


def test_remove_and_close_give_w0_back(paths):  # noqa: F811
    engine = engine_with(paths, merge_single_adapter=True)
    engine.generate(PROMPTS[:2], adapters=["own", "own"], max_new_tokens=2)
    assert engine.merged.name == "own"
    engine.remove_adapter("own")
    assert engine.merged.name is None
    engine.generate(PROMPTS[:2], adapters=["all", "all"], max_new_tokens=2)
    model = engine.close()
    plain = tiny_llama()
    for name, p in plain.named_parameters():
        assert torch.equal(model.get_parameter(name), p), name
