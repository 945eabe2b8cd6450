"""The serving engine against PEFT + transformers, each adapter alone: a mixed batch (adapters of
different ranks and target sets, and base rows) must give every row the greedy tokens that row's
adapter gives by itself; the bank must refuse bad adapters and stay as it was."""

from __future__ import annotations


import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.data import encode_prompt
from lorakit.io import AdapterFileError, WEIGHTS_NAME
from lorakit.serving import AdapterRefused, Engine, segmented_lora, segmented_lora_reference
from lorakit.serving.layers import BankedLinear
from lorakit.serving.sampling import SamplingParams, next_tokens, top_p_filter

from conftest import randomize_adapters, tiny_llama
from test_generate import word_tokenizer

PROMPTS = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [42], [9, 8, 7, 6, 5], [30, 31], [60, 61, 62, 63]]
NEW = 10

# name -> PEFT LoraConfig fields: different ranks, scalings and target sets
PEFT_ADAPTERS = {
    "qv": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "all": dict(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True),
    "mlp": dict(r=16, lora_alpha=16, target_modules=["o_proj", "up_proj", "down_proj"], layers_to_transform=[1],
                rank_pattern={"down_proj": 2}, alpha_pattern={"up_proj": 3.0}),
}


def random_factors(model, seed: int, std: float = 0.3) -> None:
    """Non-zero A and B everywhere (PEFT starts B at 0, which would hide a wrong computation)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def save_peft(path, seed: int, base=None, **fields) -> str:
    model = get_peft_model(base if base is not None else tiny_llama(), PeftLoraConfig(**fields))
    random_factors(model, seed)
    model.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("adapters")
    out = {name: save_peft(root / name, seed, **fields) for seed, (name, fields) in enumerate(PEFT_ADAPTERS.items(), 1)}
    own = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=6, alpha=12, target_modules=["k_proj", "gate_proj"]))
    randomize_adapters(own, seed=9, std=0.3)
    out["own"] = str(lorakit.save_adapter(own, root / "own"))  # a lorakit-saved adapter, read by PEFT below
    return out


@pytest.fixture(scope="module")
def references(paths):
    """adapter (None: base) -> the model PEFT + transformers decode that adapter alone with."""
    refs = {None: tiny_llama()}
    for name, path in paths.items():
        refs[name] = PeftModel.from_pretrained(tiny_llama(), path).eval()
    return refs


def greedy(model, prompt: list[int], max_new_tokens: int = NEW, eos: int | None = None) -> list[int]:
    """transformers' greedy decoding of one prompt (no padding), new tokens cut before eos."""
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=0)
    with torch.no_grad():
        new = model.generate(input_ids=torch.tensor([prompt]), generation_config=config)[0, len(prompt):].tolist()
    return new[:new.index(eos)] if eos is not None and eos in new else new


def engine_with(paths, names=("qv", "all", "mlp", "own"), **kw) -> Engine:
    engine = Engine(tiny_llama(), None, **{"max_rank": 16, **kw})
    for name in names:
        engine.add_adapter(name, paths[name])
    return engine


def snapshot(engine: Engine) -> dict:
    bank = engine.bank
    return {"slots": {n: bank.slot_of(n) for n in bank.names},
            "modules": {n: (m.A.clone(), m.B.clone(), list(m.ranks)) for n, m in bank.modules.items()},
            "wrapped": sorted(n for n, m in engine.model.named_modules() if isinstance(m, BankedLinear))}


def same_snapshot(a: dict, b: dict) -> bool:
    return (a["slots"] == b["slots"] and a["wrapped"] == b["wrapped"] and a["modules"].keys() == b["modules"].keys()
            and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) and x[2] == y[2]
                    for x, y in zip(a["modules"].values(), b["modules"].values())))


# --- the op ---------------------------------------------------------------------------------

@pytest.mark.parametrize("slots", [[0, 2, -1, 2, 1, 0, -1], [1] * 7, [-1] * 7], ids=["mixed", "one", "base"])
def test_segmented_op_equals_each_rows_adapter_in_float64(slots: list[int]) -> None:
    g = torch.Generator().manual_seed(0)
    S, R, d_in, d_out = 3, 5, 8, 6
    x, A, B = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((7, d_in), (S, R, d_in), (S, d_out, R)))
    index = torch.tensor(slots)
    expected = torch.stack([B[s] @ (A[s] @ x[t]) if s >= 0 else torch.zeros(d_out, dtype=torch.float64)
                            for t, s in enumerate(slots)])
    torch.testing.assert_close(segmented_lora_reference(x, A, B, index), expected)
    # (N, L, d_in) input with a slot per token, as the engine routes it
    torch.testing.assert_close(segmented_lora(x.view(1, 7, d_in), A, B, index), expected.view(1, 7, d_out))
    torch.library.opcheck(torch.ops.lorakit.segmented_lora, (x, A, B, index))


# --- the engine against PEFT ------------------------------------------------------------------

def test_each_row_of_a_mixed_batch_decodes_as_its_adapter_alone(paths, references) -> None:
    engine = engine_with(paths)
    adapters = ["qv", None, "all", "mlp", "own", "qv"]
    got = engine.generate(PROMPTS, adapters, max_new_tokens=NEW, ignore_eos=True)
    expected = [greedy(references[a], p) for p, a in zip(PROMPTS, adapters)]
    assert got == expected
    for name in ("qv", "all", "mlp", "own"):  # each adapter changes some output, so the check above can fail
        assert any(greedy(references[name], p) != greedy(references[None], p) for p in PROMPTS), name


def test_mixed_batch_logits_equal_each_adapters_own_forward(paths, references) -> None:
    engine = engine_with(paths)
    adapters = ["qv", None, "all", "own", "mlp"]
    ids = torch.randint(0, 100, (len(adapters), 7), generator=torch.Generator().manual_seed(1))
    slots = torch.tensor(engine.bank.slots_for(adapters))
    with torch.no_grad(), engine.route.rows(slots, tokens_per_row=ids.shape[1]):
        got = engine.model(ids).logits
    with torch.no_grad():
        expected = torch.cat([references[a](ids[i:i + 1]).logits for i, a in enumerate(adapters)])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_requests_tokens_do_not_depend_on_its_batch(paths) -> None:
    engine = engine_with(paths)
    for kw in ({}, {"temperature": 1.3, "top_p": 0.9, "seed": 7}):
        alone = engine.generate([PROMPTS[1]], ["all"], max_new_tokens=NEW, ignore_eos=True, **kw)[0]
        for others in ([None, "qv"], ["mlp", "all", "own", None, "qv"]):
            batch = [PROMPTS[1], *(PROMPTS[2:] + PROMPTS[:1])[:len(others)]]
            assert engine.generate(batch, ["all", *others], max_new_tokens=NEW, ignore_eos=True, **kw)[0] == alone
        split = engine_with(paths, max_batch=2).generate(PROMPTS, ["qv", "all", None, "own", "mlp", "all"],
                                                         max_new_tokens=NEW, ignore_eos=True, **kw)
        assert split[1] == alone


def test_ids_in_ids_out_cut_before_eos_unless_ignore_eos(paths, references) -> None:
    engine = engine_with(paths, names=("qv",))
    prompt = PROMPTS[3]
    full = greedy(references["qv"], prompt)
    eos = next(t for t in full[1:] if t != full[0])  # a token that comes up after the first one
    engine.model.config.eos_token_id = eos           # no tokenizer: the model's eos id
    cut = engine.generate([prompt], ["qv"], max_new_tokens=NEW)[0]
    assert cut == greedy(references["qv"], prompt, eos=eos) == full[:full.index(eos)]
    assert engine.generate([prompt], ["qv"], max_new_tokens=NEW, ignore_eos=True)[0] == full
    assert all(isinstance(t, int) for t in cut)


def test_strings_in_strings_out_with_stop_strings(tmp_path) -> None:
    tok = word_tokenizer()
    path = save_peft(tmp_path / "qv", 3, **PEFT_ADAPTERS["qv"])
    reference = PeftModel.from_pretrained(tiny_llama(), path).eval()
    engine = Engine(tiny_llama(), tok, max_rank=8)
    engine.add_adapter("qv", path)
    texts = ["name : w3 | w4", "w7 w8 w9 w10 w11 w12", "w50"]
    adapters = ["qv", None, "qv"]
    got = engine.generate(texts, adapters, max_new_tokens=NEW)
    models = {"qv": reference, None: tiny_llama()}
    expected = [tok.decode(greedy(models[a], encode_prompt(t, tok), eos=tok.eos_token_id), skip_special_tokens=True)
                .strip() for t, a in zip(texts, adapters)]
    assert got == expected and all(isinstance(s, str) for s in got)
    words = next(e for e in expected if len(e.split()) >= 3).split()
    stop = words[2]                                     # cut where this word first comes up
    for text, out in zip(texts, engine.generate(texts, adapters, max_new_tokens=NEW, stop=[stop, "w99 w98"])):
        full = expected[texts.index(text)]
        assert out == (full[:full.index(stop)].strip() if stop in full else full)
    # ids in: the tokens up to the one that completed the stop string
    text = next(t for t in texts if stop in expected[texts.index(t)])
    a = adapters[texts.index(text)]
    ids = engine.generate([encode_prompt(text, tok)], [a], max_new_tokens=NEW, stop=stop)[0]
    assert stop in tok.decode(ids) and stop not in tok.decode(ids[:-1])
    assert ids == greedy(models[a], encode_prompt(text, tok), eos=tok.eos_token_id)[:len(ids)]


def test_sampling_with_a_seed_is_reproducible(paths) -> None:
    engine = engine_with(paths, names=("qv",))
    kw = dict(max_new_tokens=NEW, temperature=1.5, ignore_eos=True)
    first = engine.generate(PROMPTS, ["qv"] * 6, seed=11, **kw)
    assert engine.generate(PROMPTS, ["qv"] * 6, seed=11, **kw) == first
    assert engine.generate(PROMPTS, ["qv"] * 6, seed=12, **kw) != first
    per_request = engine.generate(PROMPTS[:2], ["qv"] * 2, seed=[11, 12], **kw)
    assert per_request[0] == first[0] and per_request[1] != first[1]
    greedy_out = engine.generate(PROMPTS, ["qv"] * 6, max_new_tokens=NEW, ignore_eos=True)
    assert engine.generate(PROMPTS, ["qv"] * 6, seed=11, top_p=1e-6, **kw) == greedy_out  # nucleus of one


def test_top_p_keeps_the_smallest_nucleus() -> None:
    probs = torch.tensor([0.1, 0.5, 0.05, 0.3, 0.05])
    torch.testing.assert_close(top_p_filter(probs, 0.7), torch.tensor([0, 0.625, 0, 0.375, 0]))
    torch.testing.assert_close(top_p_filter(probs, 0.5), torch.tensor([0, 1.0, 0, 0, 0]))
    g = torch.Generator().manual_seed(0)
    logits = probs.log().repeat(200, 1)
    drawn = next_tokens(logits, [SamplingParams(1.0, 0.7)] * 200, [g] * 200)
    assert set(drawn.tolist()) == {1, 3}


# --- the bank -------------------------------------------------------------------------------

def _other_base(tmp_path):
    return save_peft(tmp_path / "other", 5, base=LlamaForCausalLM(LlamaConfig(
        vocab_size=100, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)), **PEFT_ADAPTERS["qv"])


def _truncated(tmp_path):
    path = save_peft(tmp_path / "cut", 5, **PEFT_ADAPTERS["qv"])
    weights = tmp_path / "cut" / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:200])
    return path


BAD = {
    "another base": (_other_base, AdapterFileError, "has shape"),
    "rank over max_rank": (lambda p: save_peft(p / "r32", 5, r=32, target_modules=["q_proj"]), AdapterRefused,
                           "max_rank=16"),
    "DoRA": (lambda p: save_peft(p / "dora", 5, r=4, target_modules=["q_proj"], use_dora=True), AdapterRefused,
             "use_dora=true.*lorakit merge"),
    "corrupted file": (_truncated, AdapterFileError, "not a readable safetensors"),
    "embedding target": (lambda p: save_peft(p / "emb", 5, r=4, target_modules=["embed_tokens"]), AdapterRefused,
                         "linear layers only"),
    "modules_to_save": (lambda p: save_peft(p / "mts", 5, r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
                        AdapterRefused, "modules_to_save"),
    "no directory": (lambda p: str(p / "missing"), AdapterFileError, "no such adapter directory"),
    "name in use": (lambda p: "qv", ValueError, "already in the bank"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_adapters_are_refused_and_the_bank_is_unchanged(case: str, paths, tmp_path) -> None:
    make, error, message = BAD[case]
    engine = engine_with(paths, names=("qv", "mlp"))
    before = snapshot(engine)
    outputs = engine.generate(PROMPTS, ["qv", "mlp", None] * 2, max_new_tokens=4, ignore_eos=True)
    path = make(tmp_path)
    with pytest.raises(error, match=message):
        engine.add_adapter("qv" if case == "name in use" else "new", paths["qv"] if case == "name in use" else path)
    assert same_snapshot(snapshot(engine), before) and engine.adapters == ["qv", "mlp"]
    assert engine.generate(PROMPTS, ["qv", "mlp", None] * 2, max_new_tokens=4, ignore_eos=True) == outputs


def test_more_adapters_than_slots_wait_on_the_cpu_and_take_the_least_recently_used_slot(paths, references) -> None:
    engine = engine_with(paths, names=("qv", "all", "mlp"), max_adapters=2)
    bank = engine.bank
    assert (bank.slot_of("qv"), bank.slot_of("all"), bank.slot_of("mlp")) == (0, 1, None)
    check = [("mlp", PROMPTS[0]), ("all", PROMPTS[1]), (None, PROMPTS[2])]
    got = engine.generate([p for _, p in check], [a for a, _ in check], max_new_tokens=NEW, ignore_eos=True)
    assert got == [greedy(references[a], p) for a, p in check]
    assert (bank.slot_of("qv"), bank.slot_of("mlp"), bank.slot_of("all")) == (None, 0, 1)  # qv was used least recently
    # qv's factors left slot 0 when mlp, which targets no q_proj or v_proj, took it
    assert not any(m.A[0].any() or m.B[0].any() for n, m in bank.modules.items() if n.endswith(("q_proj", "v_proj")))
    # one generate call with three adapters and two slots: run in two batches, each row still right
    check = [("qv", PROMPTS[3]), ("all", PROMPTS[4]), ("mlp", PROMPTS[5]), ("qv", PROMPTS[0])]
    got = engine.generate([p for _, p in check], [a for a, _ in check], max_new_tokens=NEW, ignore_eos=True)
    assert got == [greedy(references[a], p) for a, p in check]
    engine.remove_adapter("qv")
    assert engine.adapters == ["all", "mlp"]
    with pytest.raises(KeyError, match="not loaded"):
        engine.generate(PROMPTS[:1], ["qv"])
    with pytest.raises(AdapterRefused, match="3 distinct adapters"):
        engine_with(paths, names=("qv", "all", "mlp"), max_adapters=2).bank.slots_for(["qv", "all", "mlp"])


def test_remove_unwraps_modules_no_adapter_targets_and_close_gives_the_plain_model(paths) -> None:
    engine = engine_with(paths, names=("qv", "mlp"))
    wrapped = snapshot(engine)["wrapped"]
    assert "model.layers.0.self_attn.q_proj" in wrapped and "model.layers.1.mlp.up_proj" in wrapped
    engine.remove_adapter("mlp")
    assert snapshot(engine)["wrapped"] == [n for n in wrapped if n.endswith(("q_proj", "v_proj"))]
    with pytest.raises(KeyError, match="no adapter 'mlp'"):
        engine.remove_adapter("mlp")
    plain = engine.close()
    assert not any(isinstance(m, BankedLinear) for m in plain.modules())
    ids = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, tiny_llama()(ids).logits, rtol=0, atol=0)


def test_bank_folds_the_scaling_into_B_and_pads_the_rank(paths, references) -> None:
    engine = engine_with(paths, names=("mlp",))
    slot, module = engine.bank.slot_of("mlp"), engine.bank.modules["model.layers.1.mlp.down_proj"]
    layer = references["mlp"].base_model.model.model.layers[1].mlp.down_proj
    scaling = layer.scaling["default"]
    assert module.ranks[slot] == 2 and scaling == 16 / 2  # rank_pattern's rank, r's alpha
    torch.testing.assert_close(module.B[slot, :, :2], layer.lora_B["default"].weight * scaling)
    torch.testing.assert_close(module.A[slot, :2], layer.lora_A["default"].weight)
    assert not module.A[slot, 2:].any() and not module.B[slot, :, 2:].any()


# --- inputs ----------------------------------------------------------------------------------

@pytest.mark.parametrize("prompts, kw, error, message", [
    ([[1, 2], "w1"], {}, TypeError, "mix strings"),
    ("w1 w2", {}, TypeError, "list of strings"),
    ([[1, 2]], {"adapters": ["nope"]}, KeyError, "not loaded"),
    ([[1, 2]], {"adapters": [None, None]}, ValueError, "one entry per prompt"),
    ([[1, 2]], {"temperature": -1.0}, ValueError, "temperature"),
    ([[1, 2]], {"top_p": 0.0}, ValueError, "top_p"),
    ([["w1"][0]], {}, ValueError, "need a tokenizer"),
    ([[1, 2]], {"stop": "x"}, ValueError, "need a tokenizer"),
    ([[1] * 60], {"max_new_tokens": 10}, ValueError, "positions"),
    ([[1, 200]], {}, ValueError, "vocabulary"),
    ([[]], {}, ValueError, "no tokens"),
])
def test_clear_errors(prompts, kw, error, message) -> None:
    with pytest.raises(error, match=message):
        Engine(tiny_llama(), None).generate(prompts, **kw)


def test_a_model_with_lora_layers_is_refused() -> None:
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=2))
    with pytest.raises(ValueError, match="plain base model"):
        Engine(model, None)
    with pytest.raises(ValueError, match="plain base model"):
        Engine(get_peft_model(tiny_llama(), PeftLoraConfig(r=2, target_modules=["q_proj"])), None)


def test_gpt2_conv1d_layers_are_served_like_linear_ones(tmp_path) -> None:
    """transformers' Conv1D stores its weight (d_in, d_out); PEFT's factors are the same as for nn.Linear."""
    from conftest import tiny_gpt2

    path = save_peft(tmp_path / "gpt2", 4, base=tiny_gpt2(), r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                     fan_in_fan_out=True)
    reference = PeftModel.from_pretrained(tiny_gpt2(), path).eval()
    engine = Engine(tiny_gpt2(), None, max_rank=4)
    engine.add_adapter("a", path)
    adapters = ["a", None, "a"]
    got = engine.generate(PROMPTS[:3], adapters, max_new_tokens=NEW, ignore_eos=True)
    assert got == [greedy(reference if a else tiny_gpt2(), p) for p, a in zip(PROMPTS[:3], adapters)]
    assert got[0] != greedy(tiny_gpt2(), PROMPTS[0])


def test_a_banked_layer_compiles_into_one_graph_with_the_custom_op(paths) -> None:
    engine = engine_with(paths, names=("qv", "all"))
    layer = engine.model.get_submodule("model.layers.0.self_attn.q_proj")
    x = torch.randn(3, 4, 32, generator=torch.Generator().manual_seed(0))
    slots = torch.tensor([engine.bank.slot_of("all"), -1, engine.bank.slot_of("qv")])
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)  # fullgraph: no break around the op
    with torch.no_grad(), engine.route.rows(slots, tokens_per_row=4):
        torch.testing.assert_close(compiled(x), layer(x))
        assert not torch.equal(layer(x)[0], layer.base_layer(x)[0]) and torch.equal(layer(x)[1], layer.base_layer(x)[1])


# --- decode attention on the slot cache (serving/attention.py) ---------------------------------------

@pytest.mark.parametrize("heads, kv_heads", [(8, 2), (4, 4), (6, 1)])
def test_decode_attention_equals_repeated_kv_attention_in_float64(heads: int, kv_heads: int) -> None:
    from lorakit.serving.attention import decode_attention

    g = torch.Generator().manual_seed(0)
    n, width, d, slots_len = 3, 11, 16, 20
    storage_k = torch.randn(n + 1, kv_heads, slots_len, d, generator=g, dtype=torch.float64)
    storage_v = torch.randn(n + 1, kv_heads, slots_len, d, generator=g, dtype=torch.float64)
    key, value = storage_k[1:, :, :width], storage_v[1:, :, :width]       # strided views, as the cache returns
    query = torch.randn(n, 1, heads, d, generator=g, dtype=torch.float64).transpose(1, 2)  # (n, H, 1, d)
    visible = torch.arange(width)[None, :] <= torch.tensor([4, 10, 7])[:, None]
    mask = torch.zeros(n, 1, 1, width, dtype=torch.float64).masked_fill_(~visible[:, None, None], float("-inf"))
    got = decode_attention(query, key, value, mask, d ** -0.5)
    rep = heads // kv_heads
    want = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1), attn_mask=mask)  # (n, H, 1, d)
    torch.testing.assert_close(got, want.transpose(1, 2), rtol=1e-12, atol=1e-12)


def bf16_decode_case(device: str = "cpu", width: int = 2048):
    """A long bf16 window whose scores are large, so rounding them to bf16 moves the softmax."""
    g = torch.Generator(device=device).manual_seed(1)
    n, heads, kv, d = 4, 8, 2, 64
    query = (3 * torch.randn(n, heads, 1, d, generator=g, device=device)).bfloat16()
    key = torch.randn(n, kv, width, d, generator=g, device=device).bfloat16()
    value = torch.randn(n, kv, width, d, generator=g, device=device).bfloat16()
    return query, key, value, d ** -0.5


def float64_decode(query, key, value, scaling):
    rep = query.shape[1] // key.shape[1]
    k, v = (t.double().repeat_interleave(rep, 1) for t in (key, value))
    probs = torch.softmax(query.double() @ k.transpose(-1, -2) * scaling, dim=-1)
    return (probs @ v).transpose(1, 2)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_behind_sdpa_bf16_scores_stay_float32_as_sdpa_keeps_them(device: str) -> None:
    from lorakit.serving.attention import decode_attention

    query, key, value, scaling = bf16_decode_case(device)
    want = float64_decode(query, key, value, scaling)
    exact = decode_attention(query, key, value, None, scaling, float_scores=True)
    rounded = decode_attention(query, key, value, None, scaling)
    err = lambda out: (out.double() - want).abs().max().item()
    assert exact.dtype == torch.bfloat16 and exact.shape == (4, 1, 8, 64)
    assert err(exact) < 0.5 * err(rounded), (err(exact), err(rounded))
    if device == "cuda":  # within bf16 rounding of the output of torch's own SDPA
        sdpa = torch.nn.functional.scaled_dot_product_attention(query, key, value, enable_gqa=True).transpose(1, 2)
        assert err(exact) <= 1.5 * err(sdpa) + 1e-3, (err(exact), err(sdpa))


def test_the_engine_decodes_through_its_slot_attention_and_gives_the_model_its_own_back(paths, monkeypatch) -> None:
    from lorakit.serving import attention

    calls = []
    original = attention.decode_attention
    monkeypatch.setattr(attention, "decode_attention", lambda *a, **k: calls.append(a[1].shape) or original(*a, **k))
    model = tiny_llama()
    own = model.config._attn_implementation
    engine = Engine(model, None, max_batch=2)
    assert model.config._attn_implementation == attention.SLOT_ATTENTION[own]
    engine.add_adapter("a", paths["own"])
    out = engine.generate([PROMPTS[0], PROMPTS[1]], adapters=["a", None], max_new_tokens=4, ignore_eos=True)
    layers = model.config.num_hidden_layers
    assert len(calls) == 3 * layers  # every decode step (3 after the prefill's first token), every layer
    assert out[1] == greedy(tiny_llama(), PROMPTS[1], max_new_tokens=4)  # the base row, as transformers decodes it
    assert greedy(model, PROMPTS[1], max_new_tokens=4) == out[1]  # generate() on the held model still works
    assert engine.close() is model and model.config._attn_implementation == own
    first = Engine(model, None, max_batch=2)  # no adapter installed: a second engine may take the model
    second = Engine(model, None, max_batch=2)
    assert second.generate([PROMPTS[1]], max_new_tokens=4, ignore_eos=True)[0] == out[1]
    second.close(), first.close()
    assert model.config._attn_implementation == own


def test_a_refused_engine_leaves_the_models_attention_as_it_was() -> None:
    model = tiny_llama()
    own = model.config._attn_implementation
    with pytest.raises(ValueError):
        Engine(model, None, max_batch=2, max_rank=0)
    assert model.config._attn_implementation == own
