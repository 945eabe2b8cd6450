"""The serving engine as a demanding user drives it: adapters on the output head (tied or not), bank
slots under pressure from base rows, close() for good, prefix adapters and input checks. Each
request's greedy tokens are compared with transformers' `generate` on a model that has that adapter
loaded by lorakit, alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.prefix import PrefixEmbedding, save_prefix
from lorakit.serving import Engine
from lorakit.serving.layers import wrapped

from conftest import randomize_adapters, tiny_gpt2, tiny_llama

NEW = 6


def tied_llama(seed: int = 0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def saved(make, path, targets, r: int = 4, seed: int = 1):
    """A lorakit adapter with random factors on ``make()``, saved at ``path``: (the adapted model, path)."""
    model = lorakit.inject(make(), lorakit.LoraConfig(r=r, alpha=2 * r, target_modules=targets))
    randomize_adapters(model, seed=seed, std=0.3)
    lorakit.save_adapter(model, path)
    return model.eval(), str(path)


def greedy(model, prompt: list[int], new: int = NEW) -> list[int]:
    """transformers' greedy decoding of one prompt alone, exactly ``new`` tokens (no EOS stop)."""
    model.generation_config.eos_token_id = None
    ids = torch.tensor([prompt])
    config = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return out[0, len(prompt):].tolist()


PROMPTS = [[5, 6, 7], [9, 8, 7, 6, 5, 4, 3], [42], [11, 12]]


@pytest.mark.parametrize("make", [tiny_llama, tied_llama, tiny_gpt2], ids=["llama", "tied-llama", "gpt2"])
@pytest.mark.parametrize("kw", [{}, {"cuda_graphs": True}, {"merge_single_adapter": True}],
                         ids=["reference-op", "dense-op", "merged"])
def test_an_adapter_on_the_output_head_decodes_as_alone(make, kw, tmp_path) -> None:
    # prefill keeps only the last positions' logits (logits_to_keep), so lm_head sees fewer tokens
    # than were routed; and a merge into a tied lm_head would change the input embeddings with it
    attn = ["q_proj"] if make is not tiny_gpt2 else ["c_attn"]
    head, head_path = saved(make, tmp_path / "head", ["lm_head", *attn], seed=2)
    other, other_path = saved(make, tmp_path / "other", attn, seed=3)
    refs = {None: make(), "head": head, "other": other}
    engine = Engine(make(), None, max_batch=4, max_rank=8, **kw)
    engine.add_adapter("head", head_path)
    engine.add_adapter("other", other_path)
    cases = [([PROMPTS[0]], ["head"]),                        # one prompt: lm_head gets 1 of 3 positions
             ([PROMPTS[0], PROMPTS[1]], ["other", "head"]),   # mixed, lm_head gets 5 of 7 per row
             (PROMPTS, ["head"] * 4), (PROMPTS, ["head", None, "other", "head"])]
    for prompts, adapters in cases:
        got = engine.generate(prompts, adapters, max_new_tokens=NEW, ignore_eos=True)
        assert got == [greedy(refs[a], p) for p, a in zip(prompts, adapters)]
    model = engine.close()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), make().state_dict().values()))


def test_base_rows_take_no_bank_slot(tmp_path) -> None:
    paths = {n: saved(tiny_llama, tmp_path / n, ["q_proj", "v_proj"], seed=s)[1] for s, n in enumerate("abc", 1)}
    engine = Engine(tiny_llama(), None, max_batch=4, max_adapters=2, max_rank=8)
    for name, path in paths.items():
        engine.add_adapter(name, path)
    first = [engine.submit(PROMPTS[0], a, max_new_tokens=NEW, ignore_eos=True) for a in "ab"]
    engine.step()
    # a base row joins, then c: c must wait for a bank slot (both are taken), not break the step
    later = [engine.submit(PROMPTS[1], None, max_new_tokens=NEW, ignore_eos=True),
             engine.submit(PROMPTS[2], "c", max_new_tokens=NEW, ignore_eos=True)]
    engine.step()
    assert [r.adapter for r in engine.running] == ["a", "b", None] and engine.waiting[0] is later[1]
    list(engine.run_until_done())
    assert all(r.finish_reason == "length" for r in first + later)
    # one bank slot: a base request does not keep an adapter's request out of the batch
    engine = Engine(tiny_llama(), None, max_batch=4, max_adapters=1, max_rank=8)
    engine.add_adapter("a", paths["a"])
    engine.submit(PROMPTS[0], None, max_new_tokens=NEW)
    engine.submit(PROMPTS[1], "a", max_new_tokens=NEW)
    engine.step()
    assert len(engine.running) == 2 and not engine.waiting


def test_close_gives_the_model_back_for_good(tmp_path) -> None:
    _, path = saved(tiny_llama, tmp_path / "a", ["q_proj", "v_proj"])
    model = tiny_llama().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine = Engine(model, None, max_batch=2, max_rank=8, merge_single_adapter=True)
    engine.add_adapter("a", path)
    running = engine.submit(PROMPTS[0], "a", max_new_tokens=NEW)
    engine.step()  # merged into the weights now
    assert engine.close() is model and running.finish_reason == "cancelled"
    assert model.training  # in the mode it came in
    calls = [lambda: engine.add_adapter("b", path), lambda: engine.generate([PROMPTS[0]], ["a"]),
             lambda: engine.submit(PROMPTS[0]), engine.step, lambda: engine.remove_adapter("a")]
    for call in calls:
        with pytest.raises(RuntimeError, match="closed"):
            call()
    assert engine.close() is model
    assert not wrapped(model) and model.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_prefix_adapter_refuses_an_empty_prompt_and_names_its_prefix_in_length_errors(tmp_path) -> None:
    _, path = saved(tiny_llama, tmp_path / "pre", ["q_proj"])
    save_prefix(PrefixEmbedding(3, 32), path)
    engine = Engine(tiny_llama(), None, max_batch=2, max_rank=8)
    engine.add_adapter("pre", path)
    with pytest.raises(ValueError, match="prompt 0 has no tokens"):
        engine.generate([[]], ["pre"], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"has 60 tokens \(and 3 prefix embeddings of its adapter\)"):
        engine.generate([[1] * 60], ["pre"], max_new_tokens=3)
    assert not engine.waiting and not engine.running
    assert len(engine.generate([[1, 2]], ["pre"], max_new_tokens=2, ignore_eos=True)[0]) == 2


def test_token_ids_seeds_and_counts_must_be_integers() -> None:
    engine = Engine(tiny_llama(), None, max_batch=2, max_rank=8)
    with pytest.raises(TypeError, match="prompt 0 holds 1.7"):
        engine.generate([[1.7, 2.0]], max_new_tokens=2)  # never truncated to [1, 2]
    with pytest.raises(TypeError, match="prompt 1 holds"):
        engine.generate([[1, 2], [[3, 4]]], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer, got True"):
        engine.generate([[1, 2]], max_new_tokens=True)
    with pytest.raises(TypeError, match="adapter must be one adapter's name"):
        engine.submit([1, 2], adapter=["a"])
    with pytest.raises(TypeError, match="seed must be an integer"):
        engine.generate([[1, 2]], temperature=1.0, seed="7", max_new_tokens=2)
    assert not engine.waiting
    kw = dict(temperature=1.0, max_new_tokens=4, ignore_eos=True)
    ints = engine.generate([[1, 2], np.array([3, 4])], seed=[7, 8], **kw)
    assert engine.generate([[1, 2], [3, 4]], seed=[np.int64(7), torch.tensor(8)], **kw) == ints
    request = engine.submit([1, 2], seed=np.int32(7), **kw)
    list(engine.stream(request))
    assert request.tokens == ints[0]


# --- where a completion ends --------------------------------------------------------------------

def test_every_end_id_of_the_generation_config_ends_a_completion():
    """Chat models (Llama-3) end a turn with another id than the tokenizer's EOS, named in
    generation_config.eos_token_id: the engine and generate_ids stop there, as transformers does."""
    from types import SimpleNamespace

    from lorakit.generate import end_ids, generate_ids

    model = tiny_llama()
    model.generation_config = GenerationConfig(eos_token_id=None)
    prompt = [5, 17, 42, 8]
    free = generate_ids(model, [prompt], max_new_tokens=6, eos_token_id=None, pad_token_id=0, progress=False)[0]
    second = free[1]  # the greedy run's second token becomes an end id
    assert free[0] != second
    model.generation_config = GenerationConfig(eos_token_id=[99, second])
    tokenizer = SimpleNamespace(eos_token_id=99, pad_token_id=0)
    assert end_ids(model, tokenizer) == [99, second]
    assert generate_ids(model, [prompt], max_new_tokens=6, eos_token_id=end_ids(model, tokenizer), pad_token_id=0,
                        progress=False)[0] == free[:1]
    engine = Engine(model, None, max_batch=2)
    try:
        assert engine.generate([prompt], max_new_tokens=6) == [free[:1]]
    finally:
        engine.close()
