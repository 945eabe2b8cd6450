"""Continuous batching and streaming in the serving engine: requests join and leave the running
batch between steps, and each still decodes exactly as its adapter alone does (PEFT +
transformers greedy); the KV cache is allocated once; streamed tokens and text are what
`generate` returns; the output text grows at a cost linear in its length."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lorakit.data import encode_prompt
from lorakit.serving import Engine
from lorakit.serving.kv_cache import SlotLayer
from lorakit.serving.runner import Runner
from lorakit.serving.text import IncrementalText

from conftest import tiny_llama
from test_generate import word_tokenizer
from test_serving import NEW, PEFT_ADAPTERS, PROMPTS, engine_with, greedy, paths, references, save_peft  # noqa: F401


def run_to_end(engine: Engine, on_step=None) -> None:
    while engine.waiting or engine.running:
        engine.step()
        if on_step is not None:
            on_step(engine)


def test_a_request_decodes_as_alone_whenever_it_joins(paths, references) -> None:
    engine = engine_with(paths, names=("qv", "all", "mlp"), max_batch=3)
    a = engine.submit(PROMPTS[1], "qv", max_new_tokens=12, ignore_eos=True)        # 11 prompt tokens: a long slot
    for _ in range(3):
        engine.step()
    b = engine.submit(PROMPTS[0], "all", max_new_tokens=NEW, ignore_eos=True)      # joins a running batch
    engine.step()
    engine.add_adapter("own", paths["own"])  # new bank modules (k_proj, gate_proj) wrapped while a and b run
    c = engine.submit(PROMPTS[3], None, max_new_tokens=4, ignore_eos=True)
    while not a.finished:
        engine.step()
    # d takes the slot a left: it holds a's longer, stale keys and values, which d must not see
    d = engine.submit(PROMPTS[2], "mlp", max_new_tokens=NEW, ignore_eos=True)
    run_to_end(engine)
    for request, n in ((a, 12), (b, NEW), (c, 4), (d, NEW)):
        assert request.tokens == greedy(references[request.adapter], request.prompt, max_new_tokens=n)
        assert request.finish_reason == "length"
    # sampling: a seeded request's tokens do not depend on when it joined either
    kw = dict(max_new_tokens=NEW, temperature=1.3, top_p=0.9, seed=5, ignore_eos=True)
    alone = engine.generate([PROMPTS[4]], ["own"], **kw)[0]
    engine.submit(PROMPTS[5], "qv", max_new_tokens=NEW, ignore_eos=True)
    for _ in range(2):
        engine.step()
    late = engine.submit(PROMPTS[4], "own", **kw)
    run_to_end(engine)
    assert late.tokens == alone


def test_gpt2_requests_join_later_with_absolute_positions(tmp_path) -> None:
    from peft import PeftModel

    from conftest import tiny_gpt2

    path = save_peft(tmp_path / "gpt2", 4, base=tiny_gpt2(), r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                     fan_in_fan_out=True)
    models = {"a": PeftModel.from_pretrained(tiny_gpt2(), path).eval(), None: tiny_gpt2()}
    engine = Engine(tiny_gpt2(), None, max_batch=2, max_rank=4)
    engine.add_adapter("a", path)
    a = engine.submit(PROMPTS[1], "a", max_new_tokens=NEW, ignore_eos=True)
    for _ in range(3):
        engine.step()
    b = engine.submit(PROMPTS[0], None, max_new_tokens=4, ignore_eos=True)
    c = engine.submit(PROMPTS[3], "a", max_new_tokens=NEW, ignore_eos=True)     # waits for b's slot
    run_to_end(engine)
    for request, n in ((a, NEW), (b, 4), (c, NEW)):
        assert request.tokens == greedy(models[request.adapter], request.prompt, max_new_tokens=n)


def test_cancel_frees_the_slot_and_the_others_continue_unchanged(paths, references) -> None:
    engine = engine_with(paths, max_batch=3)
    a, b, c = (engine.submit(p, n, max_new_tokens=NEW, ignore_eos=True)
               for p, n in ((PROMPTS[0], "qv"), (PROMPTS[1], "all"), (PROMPTS[3], "own")))
    d = engine.submit(PROMPTS[5], "mlp", max_new_tokens=NEW, ignore_eos=True)      # no slot left: waits
    for _ in range(2):
        engine.step()
    assert [r.row for r in (a, b, c)] == [0, 1, 2] and d.row == -1 and not d.tokens
    engine.cancel(b)                       # the middle row: c moves into its slot
    assert b.finish_reason == "cancelled" and b.row == -1 and engine.running == [a, c] and c.row == 1
    e = engine.submit(PROMPTS[2], None, max_new_tokens=NEW)
    engine.cancel(e)                       # cancelled while waiting: never runs
    engine.step()
    assert d.row == 2 and len(d.tokens) == 1   # d joined in the freed slot
    run_to_end(engine)
    for request in (a, c, d):
        assert request.tokens == greedy(references[request.adapter], request.prompt)
    assert b.tokens == greedy(references["all"], PROMPTS[1])[:2] and e.tokens == [] and e.finish_reason == "cancelled"
    engine.cancel(a)                       # cancelling a finished request changes nothing
    assert a.finish_reason == "length"


def test_more_requests_than_slots_queue_and_finish(paths, references) -> None:
    engine = engine_with(paths, max_batch=2, max_adapters=2)
    adapters = ["qv", "all", "mlp", "own", None, "qv", "mlp"]
    requests = [engine.submit(PROMPTS[i % len(PROMPTS)], a, max_new_tokens=NEW - i, ignore_eos=True)
                for i, a in enumerate(adapters)]
    seen = []

    def check(e: Engine) -> None:
        assert len(e.running) <= 2 and len({r.adapter for r in e.running} - {None}) <= 2
        assert all(r.row == k for k, r in enumerate(e.running))
        seen.append(len(e.running))

    run_to_end(engine, check)
    assert max(seen) == 2
    for i, request in enumerate(requests):
        assert request.tokens == greedy(references[request.adapter], request.prompt, max_new_tokens=NEW - i)


def test_a_prefill_budget_spreads_arrivals_over_steps(paths, references, monkeypatch) -> None:
    engine = engine_with(paths, max_prefill_tokens=12)
    sizes, prefill = [], Runner.prefill

    def recording(self, requests, pad_id):
        sizes.append((len(requests), max(len(r.prompt) for r in requests)))
        return prefill(self, requests, pad_id)

    monkeypatch.setattr(Runner, "prefill", recording)
    adapters = ["qv", "all", None, "mlp", "own", "qv"]
    requests = [engine.submit(p, a, max_new_tokens=NEW, ignore_eos=True) for p, a in zip(PROMPTS, adapters)]
    run_to_end(engine)
    assert sizes == [(1, 3), (1, 11), (2, 5), (2, 4)]   # [3] | [11] | [1, 5] | [2, 4]: at most 12 padded tokens
    for request in requests:
        assert request.tokens == greedy(references[request.adapter], request.prompt)


def test_streaming_yields_what_generate_returns(tmp_path) -> None:
    tok = word_tokenizer()
    engine = Engine(tiny_llama(), tok, max_batch=2, max_rank=8)
    engine.add_adapter("qv", save_peft(tmp_path / "qv", 3, **PEFT_ADAPTERS["qv"]))
    texts = ["name : w3 | w4", "w7 w8 w9 w10 w11 w12", "w50", "name : w60"]
    adapters = ["qv", None, "qv", None]
    expected_ids = engine.generate([encode_prompt(t, tok) for t in texts], adapters, max_new_tokens=NEW)
    expected = engine.generate(texts, adapters, max_new_tokens=NEW)
    stop = next(w for e in expected for w in e.split()[2:3])             # a word some output has
    stopped = engine.generate(texts, adapters, max_new_tokens=NEW, stop=stop)
    assert any(s != e for s, e in zip(stopped, expected))

    handles = [engine.submit(t, a, max_new_tokens=NEW) for t, a in zip(texts, adapters)]
    events = {h.id: [] for h in handles}
    for event in engine.run_until_done():
        events[event.request_id].append(event)
    for h, ids, text in zip(handles, expected_ids, expected):
        got = events[h.id]
        assert [t for e in got for t in e.tokens] == ids == h.tokens
        assert "".join(e.text for e in got).strip() == text
        assert [e.finished for e in got] == [False] * (len(got) - 1) + [True]

    for t, a, text in zip(texts, adapters, stopped):     # one request streamed at a time, with a stop string
        h = engine.submit(t, a, max_new_tokens=NEW, stop=stop)
        got = list(engine.stream(h))
        assert "".join(e.text for e in got).strip() == text and stop not in "".join(e.text for e in got)
        assert got[-1].finish_reason in ("stop", "length") and h.finished
    h = engine.submit(texts[0], "qv", max_new_tokens=NEW)
    for _ in range(2):
        engine.step()
    assert [t for e in engine.stream(h) for t in e.tokens] == expected_ids[0]  # catches up, then follows


def test_the_kv_cache_is_allocated_once_and_attention_reads_views_of_it(paths, monkeypatch) -> None:
    engine = engine_with(paths, names=("qv",), max_batch=3)
    storage = [(layer.keys.data_ptr(), layer.values.data_ptr(), layer.keys.shape) for layer in engine.cache.layers]
    assert engine.cache.nbytes() == 2 * 2 * 3 * 2 * 64 * 8 * 4  # layers × (K, V) × slots × heads × 64 × 8 × fp32
    returned = []
    update = SlotLayer.update

    def recording(self, *args, **kwargs):
        keys, values = update(self, *args, **kwargs)
        returned.append(keys.untyped_storage().data_ptr() == self.keys.untyped_storage().data_ptr()
                        and values.untyped_storage().data_ptr() == self.values.untyped_storage().data_ptr())
        return keys, values

    monkeypatch.setattr(SlotLayer, "update", recording)
    requests = [engine.submit(p, "qv" if i % 2 else None, max_new_tokens=3 + i, ignore_eos=True)
                for i, p in enumerate(PROMPTS)]
    engine.step()
    engine.cancel(requests[1])
    run_to_end(engine)
    assert returned and all(returned)
    assert [(layer.keys.data_ptr(), layer.values.data_ptr(), layer.keys.shape) for layer in engine.cache.layers] \
        == storage


def test_limits_and_refusals(paths) -> None:
    engine = engine_with(paths, names=("qv",), max_seq_len=16)
    with pytest.raises(ValueError, match="max_seq_len=16"):
        engine.submit(PROMPTS[1], "qv", max_new_tokens=7)                        # 11 + 7 - 1 > 16
    assert not engine.waiting
    engine.submit(PROMPTS[1], "qv", max_new_tokens=6, ignore_eos=True)            # exactly fits
    with pytest.raises(ValueError, match="in use by requests"):
        engine.remove_adapter("qv")
    run_to_end(engine)
    engine.remove_adapter("qv")
    with pytest.raises(ValueError, match="max_seq_len must be"):
        Engine(tiny_llama(), None, max_seq_len=65)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """One token per UTF-8 byte (GPT-2's byte-level alphabet, no merges): characters span tokens."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


class CountingTokenizer:
    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.decoded = tokenizer, 0

    def decode(self, tokens, **kw) -> str:
        self.decoded += len(tokens)
        return self.tokenizer.decode(tokens, **kw)


TEXT = "héllo wörld ✓ 日本語 and plain words, then ünïcödé again " * 6


@pytest.mark.parametrize("stops", [[], ["wörld"], ["日本", "✓ 日"], ["again " * 3], ["not there"]],
                         ids=["none", "multibyte", "overlapping", "late", "absent"])
def test_incremental_text_is_the_full_decoding_cut_before_the_stop(stops: list[str]) -> None:
    tok = CountingTokenizer(byte_tokenizer())
    ids = tok.tokenizer.encode(TEXT)
    text = IncrementalText(tok, stops)
    parts, pushed = [], 0
    for token in ids:
        parts.append(text.push(token))
        pushed += 1
        if text.stopped:
            break
    parts.append(text.finish())
    full = tok.tokenizer.decode(ids[:pushed])
    cuts = [full.find(s) for s in stops if s in full]
    assert "".join(parts) == text.text == (full[:min(cuts)] if cuts else full)
    if cuts:  # it stopped at the token that completed the stop string
        assert not any(s in tok.tokenizer.decode(ids[:pushed - 1]) for s in stops)
    assert all(s not in p for p in parts for s in stops)
    assert tok.decoded < 8 * pushed  # a few tokens per step, not the whole output each time (~n²/2)


def test_incremental_text_keeps_the_space_after_a_skipped_special_token() -> None:
    """A word-level tokenizer (no decoder: decode joins tokens with spaces) with a special token
    inside the output: the streamed text is the full decoding, space included."""
    tok = word_tokenizer()
    ids = tok.convert_tokens_to_ids(["w79", "<s>", "w43", "<|im_start|>", "<pad>", "w5", "w6"])
    text = IncrementalText(tok, [])
    parts = [text.push(t) for t in ids] + [text.finish()]
    assert "".join(parts) == tok.decode(ids, skip_special_tokens=True) == "w79 w43 w5 w6"


def test_the_rust_decoder_is_taken_only_where_it_decodes_as_the_tokenizer_does() -> None:
    from lorakit.models import load_causal_lm
    from lorakit.serving.text import decoder

    tok = load_causal_lm("default")[1]  # the embedded SmolLM2's byte-level BPE, special tokens in its vocabulary
    ids = torch.randint(0, len(tok), (400,), generator=torch.Generator().manual_seed(0)).tolist() + [0, 1, 2]
    fast = decoder(tok)
    assert fast.__code__ is not decoder(CountingTokenizer(tok)).__code__  # the backend's decode, not .decode
    for n in (1, 2, 7, 50, len(ids)):
        assert fast(ids[:n]) == tok.decode(ids[:n], skip_special_tokens=True)
    cleaning = word_tokenizer()
    cleaning.clean_up_tokenization_spaces = True  # the backend does not clean up: .decode must be used
    counting = CountingTokenizer(cleaning)
    decoder(counting)([5, 6])
    assert counting.decoded == 2 and decoder(cleaning)([5, 6]) == cleaning.decode([5, 6], skip_special_tokens=True)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_edges_one_token_requests_eos_at_prefill_and_both_attention_kinds(attention: str) -> None:
    model = tiny_llama()
    model.config._attn_implementation = attention
    engine = Engine(model, None, max_batch=2)
    base = tiny_llama()
    full = greedy(base, PROMPTS[1])
    long = engine.submit(PROMPTS[1], max_new_tokens=NEW, ignore_eos=True)
    engine.step()
    one = engine.submit(PROMPTS[3], max_new_tokens=1)                     # done at its prefill
    engine.step()
    assert one.tokens == greedy(base, PROMPTS[3], max_new_tokens=1) and one.finish_reason == "length"
    engine.model.config.eos_token_id = greedy(base, PROMPTS[5])[0]      # the first token it makes: EOS
    at_eos = engine.submit(PROMPTS[5], max_new_tokens=NEW)
    events = list(engine.stream(at_eos))
    assert at_eos.tokens == [] and at_eos.finish_reason == "stop" and events[-1].tokens == []
    engine.model.config.eos_token_id = None
    run_to_end(engine)
    assert long.tokens == full
    with pytest.raises(ValueError, match="not in this engine"):
        next(engine.stream(Engine(tiny_llama(), None).submit(PROMPTS[0], max_new_tokens=2)))  # another engine's request


def test_an_interrupted_generate_leaves_nothing_behind(paths, monkeypatch) -> None:
    engine = engine_with(paths, names=("qv",), max_batch=2)
    step, calls = Engine.step, []

    def failing(self):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step(self)

    monkeypatch.setattr(Engine, "step", failing)
    with pytest.raises(KeyboardInterrupt):
        engine.generate(PROMPTS, ["qv", None] * 3, max_new_tokens=NEW)
    assert not engine.running and not engine.waiting
    monkeypatch.setattr(Engine, "step", step)
    assert engine.generate(PROMPTS[:1], ["qv"], max_new_tokens=NEW, ignore_eos=True) == \
        engine_with(paths, names=("qv",)).generate(PROMPTS[:1], ["qv"], max_new_tokens=NEW, ignore_eos=True)


def test_prefill_asks_only_for_an_int_logits_to_keep(paths, references, monkeypatch) -> None:
    """transformers before 5.2x reads a per-row index tensor as one index for every row (the
    engine's first H200 run failed on it): the engine keeps the last positions with an int and
    picks each row's last token itself, so prompts of different lengths still decode right."""
    engine = engine_with(paths, names=("qv",), max_batch=4)
    forward, seen = engine.model.forward, []

    def int_only(*args, logits_to_keep=0, **kwargs):
        seen.append(logits_to_keep)
        assert isinstance(logits_to_keep, int)
        return forward(*args, logits_to_keep=logits_to_keep, **kwargs)

    monkeypatch.setattr(engine.model, "forward", int_only)
    prompts = [PROMPTS[1], PROMPTS[2], PROMPTS[3]]  # 11, 1 and 5 tokens: one prefill
    outs = engine.generate(prompts, ["qv", None, "qv"], max_new_tokens=NEW, ignore_eos=True)
    assert seen[0] == 11  # the last 11 positions: from the 1-token prompt's last token on
    for prompt, adapter, out in zip(prompts, ["qv", None, "qv"], outs):
        assert out == greedy(references[adapter], prompt)


def test_logprobs_are_the_models_log_softmax_of_each_chosen_token(paths, references) -> None:
    """With logprobs=k every new token comes with log_softmax(logits)[token] and the k most likely
    tokens, as PEFT + transformers compute them for the same prefix (greedy: the chosen token is the
    top one); requests without logprobs report none."""
    engine = engine_with(paths, names=("qv",), max_batch=3)
    a = engine.submit(PROMPTS[1], "qv", max_new_tokens=5, ignore_eos=True, logprobs=3)
    b = engine.submit(PROMPTS[0], None, max_new_tokens=5, ignore_eos=True)
    c = engine.submit(PROMPTS[3], None, max_new_tokens=4, ignore_eos=True, logprobs=0)
    events = list(engine.run_until_done())
    assert not b.logprobs and all(not e.logprobs for e in events if e.request_id == b.id)
    assert [lp.token for lp in a.logprobs] == a.tokens and len(c.logprobs) == len(c.tokens) == 4
    assert all(lp.top == [] for lp in c.logprobs)
    for request in (a, c):
        model = references[request.adapter]
        for n, lp in enumerate(request.logprobs):
            with torch.no_grad():
                logits = model(torch.tensor([request.prompt + request.tokens[:n]])).logits[0, -1].double()
            want = logits.log_softmax(-1)
            assert abs(lp.logprob - want[lp.token].item()) < 1e-4
            if request.top_logprobs:
                ids = want.topk(request.top_logprobs).indices.tolist()
                assert [t for t, _ in lp.top] == ids and lp.top[0][0] == lp.token
                assert all(abs(v - want[t].item()) < 1e-4 for t, v in lp.top)
    with pytest.raises(ValueError, match="logprobs must be an integer from 0 to 20"):
        engine.submit(PROMPTS[0], None, logprobs=21)


def test_cancel_all_ends_every_request_and_the_engine_serves_on(paths, references) -> None:
    engine = engine_with(paths, names=("qv",), max_batch=2)
    running = [engine.submit(PROMPTS[i], "qv", max_new_tokens=NEW, ignore_eos=True) for i in range(3)]
    engine.step()  # two run, one waits
    assert len(engine.running) == 2 and len(engine.waiting) == 1
    ended = engine.cancel_all()
    assert sorted(r.id for r in ended) == sorted(r.id for r in running)
    assert all(r.finish_reason == "cancelled" and r.row == -1 for r in running)
    assert not engine.running and not engine.waiting
    assert engine.generate([PROMPTS[4]], ["qv"], max_new_tokens=NEW, ignore_eos=True)[0] == \
        greedy(references["qv"], PROMPTS[4])
