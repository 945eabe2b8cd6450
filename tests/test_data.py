"""Tests for lorakit.data: readers, tokenization with prompt masking, collate/pack, resumable batches.

A tiny byte-level BPE tokenizer is trained here (well under a second) so the tests never load a
real model; it has the pieces that matter: EOS, a pad token, optionally BOS, a ChatML template.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from lorakit.data import (
    IGNORE_INDEX,
    Batches,
    ClassificationExample,
    DataFormatError,
    Example,
    collate,
    demo_task,
    encode_prompt,
    load_examples,
    pack,
    read_classification,
    read_e2e,
    read_jsonl,
    split_holdout,
    tokenize_classification,
    tokenize_example,
)
from lorakit.demo_task import LINE_PATTERN

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# Real lines, verbatim (tabs, quotes, trailing spaces and all), from ../shared/data.
RTE_LINES = [
    "index\tsentence1\tsentence2\tlabel",
    "0\tNo Weapons of Mass Destruction Found in Iraq Yet.\tWeapons of Mass Destruction Found in Iraq."
    "\tnot_entailment",
    '12\tValero Energy Corp., on Monday, said it found "extensive" additional damage at its 250,000-barrel-per-day'
    " Port Arthur refinery.\tValero Energy Corp. produces 250,000 barrels per day.\tentailment",
    '358\t"For the first time in history, the players are investing their own money to ensure the future of the'
    ' game," Atlanta Brave pitcher Tom Glavine said.\tTom Glavine plays for the Atlanta Braves.\tentailment',
]
SST2_LINES = [
    "sentence\tlabel",
    "hide new secretions from the parental units \t0",
    "contains no wit , only labored gags \t0",
    "that loves its characters and communicates something rather beautiful about human nature \t1",
]
E2E_LINES = [
    "name : Alimentum | area : city centre | family friendly : no||There is a place in the city centre ,"
    " Alimentum , that is not family - friendly . ",
    "name : Cocum | Type : coffee shop | food : Chinese | price : £ 20 - 25 | customer rating : high |"
    " family friendly : no||Cocum is a coffee shop providing Chinese food in the £ 20 - 25 price range ."
    " Its customer rating is high . ",
    "name : Bibimbap House | area : city centre | near : Café Sicilia||Bibimbap House in city centre near"
    " Café Sicilia . ",
]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_tokenizer(bos: bool) -> PreTrainedTokenizerFast:
    """Byte-level BPE like SmolLM2's; with `bos`, a post-processor puts <s> in front of plain text."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "<|im_end|>", "<pad>", "<|im_start|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([line.split("||")[-1] for line in E2E_LINES] + RTE_LINES + SST2_LINES, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>",
                                   bos_token="<s>" if bos else None)
    fast.chat_template = CHATML
    return fast


@pytest.fixture(scope="module", params=[False, True], ids=["no-bos", "bos"])
def tok(request: pytest.FixtureRequest) -> PreTrainedTokenizerFast:
    return make_tokenizer(request.param)


def write(tmp_path: Path, name: str, lines: list[str]) -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --- tokenization ------------------------------------------------------------------------------

@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
def test_labels_mask_the_prompt_exactly(tok: PreTrainedTokenizerFast, chat: bool) -> None:
    ex = Example("name : Cocum | price : £ 20 - 25", "Cocum is a coffee shop .")
    out = tokenize_example(ex, tok, max_len=512, chat_template=chat)
    prompt = encode_prompt(ex.prompt, tok, chat_template=chat)
    n = len(prompt)
    assert out["input_ids"][:n] == prompt
    assert out["labels"][:n] == [IGNORE_INDEX] * n
    assert out["labels"][n:] == out["input_ids"][n:]
    assert out["input_ids"][-1] == tok.eos_token_id  # the chat template's trailing "\n" is not trained on
    assert tok.decode(out["labels"][n:-1]) == ex.completion
    if chat:
        assert tok.decode(prompt).endswith("<|im_start|>assistant\n") and ex.prompt in tok.decode(prompt)
    else:
        assert tok.decode(prompt, skip_special_tokens=True) == ex.prompt + "\n"
        assert (prompt[0] == tok.bos_token_id) == (tok.bos_token_id is not None)


def test_text_example_trains_on_every_token(tok: PreTrainedTokenizerFast) -> None:
    out = tokenize_example(Example("", "it 's a charming journey ."), tok, max_len=64, chat_template=True)
    start = 1 if tok.bos_token_id is not None else 0  # BOS has no predecessor, hence no target
    assert out["labels"][start:] == out["input_ids"][start:]
    assert out["labels"][:start] == [IGNORE_INDEX] * start


@pytest.mark.parametrize("prompt_words, completion_words, max_len, whole_completion", [
    (200, 5, 40, True),    # long prompt: cut from its start, completion intact
    (5, 200, 40, False),   # long completion: cut at its end after max_len // 2 prompt tokens at most
    (200, 200, 40, False),
])
def test_truncation_keeps_the_completion_when_it_can(tok: PreTrainedTokenizerFast, prompt_words: int,
                                                     completion_words: int, max_len: int,
                                                     whole_completion: bool) -> None:
    ex = Example(" ".join(["prompt"] * prompt_words), " ".join(["reply"] * completion_words))
    full = tokenize_example(ex, tok, max_len=10_000)
    out = tokenize_example(ex, tok, max_len=max_len)
    assert len(out["input_ids"]) == max_len
    n_completion = sum(label != IGNORE_INDEX for label in out["labels"])
    if whole_completion:
        assert out["input_ids"][-n_completion:] == [x for x in full["labels"] if x != IGNORE_INDEX]
    else:
        assert out["input_ids"][-1] != tok.eos_token_id and n_completion >= max_len // 2 - 1
    if tok.bos_token_id is not None:
        assert out["input_ids"][0] == tok.bos_token_id


def test_no_eos_or_no_template_is_a_clear_error() -> None:
    tok = make_tokenizer(bos=False)
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat_template"):
        tokenize_example(Example("a", "b"), tok, 16, chat_template=True)
    tok.eos_token = None
    with pytest.raises(ValueError, match="no eos_token"):
        tokenize_example(Example("a", "b"), tok, 16)


# --- readers -----------------------------------------------------------------------------------

def test_malformed_jsonl_line_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "d.jsonl", [json.dumps({"prompt": "p", "completion": "c"}), "",
                                       json.dumps({"text": "t"}), '{"prompt": "p", "completion": '])
    with pytest.raises(DataFormatError, match=r"d\.jsonl, line 4: not valid JSON") as err:
        read_jsonl(path)
    assert err.value.line == 4 and err.value.path == path


def test_skip_bad_lines_counts_them(tmp_path: Path) -> None:
    path = write(tmp_path, "d.jsonl", [json.dumps({"prompt": "p", "completion": "c"}), "[1, 2]",
                                       json.dumps({"prompt": "only"}), "{oops", json.dumps({"text": "t"})])
    result = read_jsonl(path, skip_bad_lines=True)
    assert list(result) == [Example("p", "c"), Example("", "t")]
    assert result.n_skipped == 3 and [line for line, _ in result.skipped] == [2, 3, 4]


def test_e2e_lines(tmp_path: Path) -> None:
    result = read_e2e(write(tmp_path, "valid.txt", E2E_LINES))
    assert result[1].prompt.endswith("family friendly : no") and "£ 20 - 25" in result[1].completion
    assert result[2].completion == "Bibimbap House in city centre near Café Sicilia ."  # trailing space stripped
    with pytest.raises(DataFormatError, match="line 2"):
        read_e2e(write(tmp_path, "bad.txt", [E2E_LINES[0], "no separator here"]))


def test_rte_tsv_keeps_quotes_and_maps_string_labels(tmp_path: Path) -> None:
    result = read_classification(write(tmp_path, "train.tsv", RTE_LINES), text_column="sentence1",
                                 text_pair_column="sentence2")
    assert result.label_map == {"entailment": 0, "not_entailment": 1}
    assert [ex.label for ex in result] == [1, 0, 0]
    assert 'found "extensive" additional' in result[1].text
    assert result[2].text.startswith('"For the first time') and result[2].text_pair.endswith("Braves.")
    dev = write(tmp_path, "dev.tsv", [RTE_LINES[0], "9\ta\tb\tcontradiction"])
    with pytest.raises(DataFormatError, match="line 2: label 'contradiction'"):
        read_classification(dev, "sentence1", text_pair_column="sentence2", label_map=result.label_map)


def test_sst2_tsv_integer_labels_and_bad_rows(tmp_path: Path) -> None:
    result = read_classification(write(tmp_path, "train.tsv", SST2_LINES + ["a row without a label"]),
                                 skip_bad_lines=True)
    assert [ex.label for ex in result] == [0, 0, 1] and result.label_map == {"0": 0, "1": 1}
    assert result.skipped == [(5, "expected 2 fields ['sentence', 'label'], found 1")]
    with pytest.raises(DataFormatError, match="lacks column"):
        read_classification(write(tmp_path, "x.tsv", SST2_LINES), text_column="text")


def test_csv_and_jsonl_classification(tmp_path: Path) -> None:
    csv_path = write(tmp_path, "d.csv", ["review,stars", '"good, really",pos', "bad,neg"])
    result = read_classification(csv_path, text_column="review", label_column="stars")
    assert [(ex.text, ex.label) for ex in result] == [("good, really", 1), ("bad", 0)]
    jsonl = write(tmp_path, "d.jsonl", [json.dumps({"sentence": "x", "label": 1}), json.dumps({"sentence": "y"})])
    with pytest.raises(DataFormatError, match=r"line 2: missing or empty column\(s\) \['label'\]"):
        load_examples(jsonl)


@pytest.mark.parametrize("name, lines, kind", [
    ("a.jsonl", [json.dumps({"prompt": "p", "completion": "c"})], Example),
    ("a.jsonl", [json.dumps({"sentence": "s", "label": "x"})], ClassificationExample),
    ("a.txt", E2E_LINES[:1], Example),
    ("a.tsv", SST2_LINES, ClassificationExample),
])
def test_load_examples_picks_the_reader(tmp_path: Path, name: str, lines: list[str], kind: type) -> None:
    assert all(isinstance(ex, kind) for ex in load_examples(write(tmp_path, name, lines)))


@pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is not on this machine")
def test_real_files_read_completely() -> None:
    rte = load_examples(DATA / "rte/train.tsv", text_column="sentence1", text_pair_column="sentence2")
    assert len(rte) == 2490 and sum(ex.label == 0 for ex in rte) == 1249  # README: 1,249 entailment
    sst2 = load_examples(DATA / "sst2/train.tsv")
    assert len(sst2) == 67349 and sum(ex.label for ex in sst2) == 37569
    e2e = load_examples(DATA / "e2e/valid.txt")
    assert len(e2e) == 4672 and len({ex.prompt for ex in e2e}) == 547


# --- demo task, holdout ------------------------------------------------------------------------

def test_demo_task_is_deterministic_and_in_house_style() -> None:
    train, held = demo_task(300, 50, seed=0)
    assert (train, held) == demo_task(300, 50, seed=0)
    assert demo_task(300, 50, seed=1)[0] != train
    assert len(train) == 300 and len(held) == 50
    assert all(LINE_PATTERN.match(ex.completion) for ex in train + held)
    assert not {ex.completion for ex in held} & {ex.completion for ex in train}


def test_split_holdout() -> None:
    examples = [Example(f"mr{i // 3}", f"ref{i}") for i in range(300)]
    train, held = split_holdout(examples, 0.1, seed=3)
    assert (train, held) == split_holdout(examples, 0.1, seed=3) and len(held) == 30
    assert sorted(train + held, key=examples.index) == examples and train == [e for e in examples if e not in held]
    train, held = split_holdout(examples, 0.1, seed=3, group_by=lambda ex: ex.prompt)
    assert len(held) == 30 and not {e.prompt for e in train} & {e.prompt for e in held}


# --- batching ----------------------------------------------------------------------------------

@pytest.mark.parametrize("stop", [0, 1, 3, 4, 9])  # 4 batches per epoch: 4 is an epoch boundary
def test_batches_resume_exactly(stop: int) -> None:
    def fresh() -> Batches[int]:
        return Batches(list(range(14)), batch_size=4, seed=7, epochs=3)

    uninterrupted = list(fresh())
    assert len(uninterrupted) == 12
    first = fresh()
    seen = list(itertools.islice(first, stop))
    resumed = fresh()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert seen + list(resumed) == uninterrupted


def test_batches_shuffle_each_epoch_and_refuse_a_foreign_state() -> None:
    batches = Batches(list(range(10)), batch_size=3, seed=1, epochs=2)
    epochs = list(batches)
    assert sorted(sum(epochs[:4], [])) == list(range(10)) and sum(epochs[:4], []) != sum(epochs[4:], [])
    other = Batches(list(range(10)), batch_size=3, seed=2)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(batches.state_dict())


def test_pack_keeps_every_token(tok: PreTrainedTokenizerFast) -> None:
    train, _ = demo_task(7, 0, seed=2)
    tokenized = [tokenize_example(ex, tok, max_len=256) for ex in train]
    blocks = pack(tokenized, block_len=64, pad_id=tok.pad_token_id)
    stream = [x for b in blocks for x, m in zip(b["input_ids"], b["attention_mask"]) if m]
    assert stream == [x for t in tokenized for x in t["input_ids"]]
    assert all(len(b["input_ids"]) == len(b["labels"]) == 64 for b in blocks)
    labels = [y for b in blocks for y, m in zip(b["labels"], b["attention_mask"]) if m]
    expected = [y for t in tokenized for y in [IGNORE_INDEX] + t["labels"][1:]]
    assert labels == expected
    batch = collate(blocks, pad_id=tok.pad_token_id)
    assert batch["input_ids"].shape == (len(blocks), 64)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 99), min_size=1, max_size=12), min_size=1, max_size=6),
       st.sampled_from([None, 1, 8]))
def test_collate_pads_right(seqs: list[list[int]], multiple: int | None) -> None:
    batch = collate([{"input_ids": s, "labels": s} for s in seqs], pad_id=-1, pad_to_multiple_of=multiple)
    width = batch["input_ids"].shape[1]
    assert width >= max(map(len, seqs)) and width % (multiple or 1) == 0
    for row, s in enumerate(seqs):
        n = len(s)
        assert batch["input_ids"][row, :n].tolist() == batch["labels"][row, :n].tolist() == s
        assert (batch["input_ids"][row, n:] == -1).all() and (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)


def test_classification_tokens_and_batch() -> None:
    tok = make_tokenizer(bos=False)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A <|im_end|>", pair="<s> $A <|im_end|> $B:1 <|im_end|>:1",
        special_tokens=[("<s>", 0), ("<|im_end|>", 1)])
    tok.model_input_names = ["input_ids", "token_type_ids", "attention_mask"]  # as BERT's tokenizer has
    items = [tokenize_classification(ClassificationExample("Oil prices fall back .", 1, "Oil prices rise ."), tok, 8),
             tokenize_classification(ClassificationExample("a charming journey", 0), tok, 64)]
    assert len(items[0]["input_ids"]) == 8 and items[0]["token_type_ids"][-1] == 1
    batch = Batches(items, batch_size=2, shuffle=False, collate_fn=lambda b: collate(b, tok.pad_token_id))
    out = next(iter(batch))
    assert out["labels"].tolist() == [1, 0] and out["token_type_ids"].shape == out["input_ids"].shape
    assert torch.equal(out["attention_mask"].sum(1), torch.tensor([len(i["input_ids"]) for i in items]))
