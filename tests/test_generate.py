"""Batched generation: the fast path (left padding, KV cache, transformers' generate) against
small reference decoders that run one prompt at a time, without a cache, a full forward per token.

Models are cast to float64 where tokens are compared, so a near-tie between two logits cannot flip
a token: the claims under test are about padding, positions and caching, not about rounding.
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import lorakit
from lorakit.data import encode_prompt
from lorakit.generate import generate_ids, generate_text

from conftest import randomize_adapters, tiny_gpt2, tiny_llama

PROMPTS = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [42], [9, 8, 7, 6, 5], [30, 31]]
MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
PAD = 3  # a real vocabulary id: padding must be masked out, not merely harmless


def reference_greedy(model, prompt: list[int], max_new_tokens: int, eos: int | None = None) -> list[int]:
    """Greedy decoding as the definition reads: re-run the whole sequence, take the argmax."""
    seq, new = list(prompt), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([seq])).logits[0, -1].argmax())
            if token == eos:
                break
            seq.append(token)
            new.append(token)
    return new


def reference_beam(model, prompt: list[int], max_new_tokens: int, num_beams: int,
                   no_repeat_ngram_size: int = 0) -> list[int]:
    """Beam search without eos (so every hypothesis has the same length and the length penalty
    cannot matter): keep the `num_beams` best sums of log-probabilities at every step."""
    beams = [(0.0, list(prompt))]
    with torch.no_grad():
        for _ in range(max_new_tokens):
            candidates = []
            for score, seq in beams:
                logp = torch.log_softmax(model(torch.tensor([seq])).logits[0, -1], -1)
                for banned in banned_tokens(seq, no_repeat_ngram_size):
                    logp[banned] = -float("inf")
                candidates += [(score + float(logp[t]), seq + [t]) for t in range(len(logp))]
            beams = sorted(candidates, key=lambda c: -c[0])[:num_beams]
    return beams[0][1][len(prompt):]


def banned_tokens(seq: list[int], n: int) -> set[int]:
    """Tokens that would complete an n-gram already in `seq` (prompt included, as in transformers)."""
    if n == 0 or len(seq) < n:
        return set()
    tail = seq[len(seq) - n + 1:]
    return {seq[i + n - 1] for i in range(len(seq) - n + 1) if seq[i:i + n - 1] == tail}


@pytest.mark.parametrize("arch", MODELS)
def test_batched_greedy_equals_one_at_a_time_and_the_reference(arch: str) -> None:
    model = MODELS[arch]().double()
    # eos = a token that one prompt produces early, so rows in one batch stop at different steps.
    eos = reference_greedy(model, PROMPTS[0], 10)[3]
    expected = [reference_greedy(model, p, 10, eos) for p in PROMPTS]
    assert len(expected[0]) == 3 and any(len(e) == 10 for e in expected)
    kw = dict(max_new_tokens=10, eos_token_id=eos, pad_token_id=PAD)
    assert generate_ids(model, PROMPTS, batch_size=3, **kw) == expected  # 2 batches, left-padded
    assert [generate_ids(model, [p], **kw)[0] for p in PROMPTS] == expected
    # num_beams=1 is greedy, whatever the length penalty says (it only scores beams).
    assert generate_ids(model, PROMPTS, num_beams=1, length_penalty=0.8, **kw) == expected


def test_pad_equal_to_eos_and_no_eos() -> None:
    model = tiny_llama().double()
    eos = reference_greedy(model, PROMPTS[0], 10)[3]
    assert generate_ids(model, PROMPTS, max_new_tokens=10, eos_token_id=eos, pad_token_id=None) == \
        [reference_greedy(model, p, 10, eos) for p in PROMPTS]
    assert generate_ids(model, PROMPTS, max_new_tokens=6, eos_token_id=None, pad_token_id=None) == \
        [reference_greedy(model, p, 6) for p in PROMPTS]


@pytest.mark.parametrize("arch", MODELS)
def test_beam_search_matches_the_reference_and_does_not_depend_on_batching(arch: str) -> None:
    model = MODELS[arch]().double()
    prompts = PROMPTS[:3]
    kw = dict(max_new_tokens=4, num_beams=3, eos_token_id=None, pad_token_id=PAD)
    expected = [reference_beam(model, p, 4, 3, no_repeat_ngram_size=2) for p in prompts]
    assert generate_ids(model, prompts, no_repeat_ngram_size=2, **kw) == expected
    # The paper's E2E settings (beam, length penalty 0.8, n-gram blocking), with an eos that stops
    # some hypotheses early so that the length penalty takes part: batching must not matter.
    paper = dict(max_new_tokens=8, num_beams=4, length_penalty=0.8, no_repeat_ngram_size=3,
                 eos_token_id=reference_greedy(model, PROMPTS[0], 8)[2], pad_token_id=PAD)
    batched = generate_ids(model, PROMPTS, batch_size=2, **paper)
    assert batched == [generate_ids(model, [p], **paper)[0] for p in PROMPTS]
    for prompt, out in zip(PROMPTS, batched):
        seq = prompt + out
        assert all(seq[i] not in banned_tokens(seq[:i], 3) for i in range(len(prompt), len(seq)))


def test_kv_cache_and_inference_mode_are_used() -> None:
    model = tiny_llama()
    seen: list[tuple[int, bool]] = []
    model.model.register_forward_pre_hook(
        lambda _m, _args, kw: seen.append((kw["input_ids"].shape[1], torch.is_inference_mode_enabled())),
        with_kwargs=True)
    generate_ids(model, PROMPTS[:2], max_new_tokens=5, eos_token_id=None, pad_token_id=PAD)
    assert [n for n, _ in seen] == [11, 1, 1, 1, 1]  # one prefill, then one token per step
    assert all(inference for _, inference in seen)


def test_lora_model_unmerged_and_merged_give_the_same_tokens() -> None:
    model = tiny_llama().double()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    randomize_adapters(model, std=0.3)
    kw = dict(max_new_tokens=8, eos_token_id=None, pad_token_id=PAD, batch_size=2)
    unmerged = generate_ids(model, PROMPTS, **kw)
    assert unmerged == [reference_greedy(model, p, 8) for p in PROMPTS]
    with lorakit.disabled(model):
        assert generate_ids(model, PROMPTS, **kw) != unmerged  # the adapter really takes part
    lorakit.merge(model)
    assert generate_ids(model, PROMPTS, **kw) == unmerged


def test_train_mode_restored_and_dropout_off_while_generating() -> None:
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, dropout=0.5, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model, std=0.3)
    kw = dict(max_new_tokens=6, eos_token_id=None, pad_token_id=PAD)
    expected = generate_ids(model.eval(), PROMPTS, **kw)
    model.train()
    model.model.layers[1].eval()  # a submodule kept in eval on purpose must stay so
    modes = {name: m.training for name, m in model.named_modules()}
    assert generate_ids(model, PROMPTS, **kw) == expected
    assert {name: m.training for name, m in model.named_modules()} == modes


def test_the_models_generation_config_does_not_change_the_tokens() -> None:
    model = tiny_llama().double()
    expected = generate_ids(model, PROMPTS, max_new_tokens=6, eos_token_id=None, pad_token_id=PAD)
    own = model.generation_config
    own.repetition_penalty, own.no_repeat_ngram_size, own.min_length = 5.0, 1, 30
    own.bad_words_ids = [[expected[0][0]]]
    assert generate_ids(model, PROMPTS, max_new_tokens=6, eos_token_id=None, pad_token_id=PAD) == expected
    assert model.generation_config is own and own.repetition_penalty == 5.0


@pytest.mark.parametrize("n_prompts, progress, shown", [(5, True, True), (5, False, False), (2, True, False)])
def test_progress_bar_only_for_several_batches(capsys: pytest.CaptureFixture[str], n_prompts: int,
                                                progress: bool, shown: bool) -> None:
    generate_ids(tiny_llama(), PROMPTS[:n_prompts], max_new_tokens=2, eos_token_id=None, pad_token_id=PAD,
                 batch_size=2, progress=progress)
    assert ("generate" in capsys.readouterr().err) == shown


@pytest.mark.parametrize("prompts, kw, message", [
    ([], {}, "no prompts"),
    ([[1, 2], []], {"max_new_tokens": 4}, "prompt 1 has no tokens"),
    ([[1], list(range(70))], {"max_new_tokens": 4}, "prompt 1 has 70 tokens, which is longer than the model's 64"),
    ([[1], list(range(60))], {"max_new_tokens": 8}, "prompt 1 has 60 tokens, which leaves room for only 5 new"),
    ([[1]], {"num_beams": 0}, "num_beams must be at least 1"),
])
def test_clear_errors(prompts: list[list[int]], kw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate_ids(tiny_gpt2(), prompts, **{"eos_token_id": 0, "pad_token_id": 0, **kw})


def word_tokenizer() -> PreTrainedTokenizerFast:
    """100 whole-word tokens (the tiny models' vocabulary size), specials and a ChatML template."""
    words = ["<s>", "<|im_end|>", "<pad>", "<|im_start|>", "<unk>", "user", "assistant", "name", ":", "|"]
    vocab = {t: i for i, t in enumerate(words + [f"w{i}" for i in range(90)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=["<|im_start|>"])
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return fast


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
def test_generate_text_encodes_as_training_did(chat: bool) -> None:
    model, tok = tiny_llama().double(), word_tokenizer()
    texts = ["name : w3 | w4", "name : w50", "w7 w8 w9 w10 w11 w12"]
    expected = [tok.decode(reference_greedy(model, encode_prompt(t, tok, chat_template=chat), 8, tok.eos_token_id),
                           skip_special_tokens=True).strip() for t in texts]
    got = generate_text(model, tok, texts, chat_template=chat, max_new_tokens=8, batch_size=2)
    assert got == expected
    assert all("<" not in text for text in got)  # special tokens never reach the text
