"""The `lorakit` command end to end on a tiny local model: train, generate, eval, merge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.cli import main, parse

from test_data import E2E_LINES, make_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer(bos=False)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    path = tmp_path_factory.mktemp("tiny-model")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def e2e_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.txt"
    path.write_text("\n".join(E2E_LINES * 4) + "\n")
    return path


@pytest.fixture(scope="module")
def trained(model_dir, e2e_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    rc = main(["train", "--model", str(model_dir), "--data", str(e2e_file), "--eval-data", str(e2e_file),
               "--out", str(out), "--steps", "4", "--batch-size", "4", "--lr", "1e-2", "--rank", "4",
               "--targets", "q_proj,v_proj", "--eval-every", "2", "--save-every", "2", "--device", "cpu"])
    assert rc == 0
    return out


def test_train_writes_run_directory_and_a_peft_adapter(trained, model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "metrics.jsonl",
                 "loss.png", "run.json"):
        assert (trained / name).exists(), name
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ours = lorakit.load_adapter(AutoModelForCausalLM.from_pretrained(model_dir).eval(), trained / "adapter")
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir).eval(), trained / "adapter")
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, theirs(ids).logits, atol=1e-5)
        assert not torch.allclose(ours(ids).logits, base(ids).logits, atol=1e-4)  # training moved B


def test_config_file_gives_defaults_and_command_line_wins(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("rank: 4\nlr: 0.001\nseq-len: 64\ntargets: all-linear\n")
    args = parse(["train", "--config", str(cfg), "--lr", "0.5"])
    assert (args.rank, args.lr, args.seq_len, args.targets) == (4, 0.5, 64, "all-linear")
    cfg.write_text("rnak: 4\n")
    with pytest.raises(SystemExit):
        parse(["train", "--config", str(cfg)])


def test_malformed_data_line_is_named(model_dir, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n')
    rc = main(["train", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "o"),
               "--steps", "1", "--device", "cpu"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "line 2" in err


def test_generate_merged_equals_unmerged(trained, model_dir, e2e_file, tmp_path):
    outs = []
    for merge in ([], ["--merge"]):
        out = tmp_path / f"gen{len(merge)}.jsonl"
        assert main(["generate", "--model", str(model_dir), "--adapter", str(trained / "adapter"), *merge,
                     "--data", str(e2e_file), "--max-new-tokens", "8", "--out", str(out)]) == 0
        outs.append([json.loads(line)["output"] for line in out.read_text().splitlines()])
    assert outs[0] == outs[1] and len(outs[0]) == 12


def test_eval_scores_unique_prompts(trained, model_dir, e2e_file, tmp_path):
    out = tmp_path / "scores.json"
    assert main(["eval", "--model", str(model_dir), "--adapter", str(trained / "adapter"), "--data", str(e2e_file),
                 "--max-new-tokens", "8", "--beams", "2", "--out", str(out)]) == 0
    scores = json.loads(out.read_text())
    assert scores["examples"] == 3 and set(scores) >= {"bleu", "nist", "rouge_l", "cider"}


def test_merge_writes_a_model_transformers_loads(trained, model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    assert main(["merge", "--model", str(model_dir), "--adapter", str(trained / "adapter"), "--out", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    adapted = lorakit.load_adapter(AutoModelForCausalLM.from_pretrained(model_dir).eval(), trained / "adapter")
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-5)
    assert (out / "tokenizer.json").exists()


def test_missing_adapter_is_a_clear_error(model_dir, tmp_path, capsys):
    rc = main(["generate", "--model", str(model_dir), "--adapter", str(tmp_path / "nope"), "--prompt", "hi"])
    assert rc == 2 and "no such adapter directory" in capsys.readouterr().err


def test_classification_train_and_eval(tmp_path):
    """`--task classification` defaults to the paper's query/value targets and trains the new head."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    from test_data import SST2_LINES

    rows = SST2_LINES[1:]  # [0] is the header
    words = sorted({w for line in rows for w in line.split("\t")[0].split()})
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tok = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    model_dir = tmp_path / "bert"
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=64)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = tmp_path / "train.tsv"
    data.write_text("sentence\tlabel\n" + "\n".join(rows * 4) + "\n")
    out = tmp_path / "run"
    assert main(["train", "--task", "classification", "--model", str(model_dir), "--data", str(data),
                 "--eval-data", str(data), "--out", str(out), "--steps", "3", "--batch-size", "4",
                 "--device", "cpu"]) == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["query", "value"] and config["modules_to_save"] == ["classifier"]
    scores = tmp_path / "scores.json"
    assert main(["eval", "--task", "classification", "--model", str(model_dir), "--adapter", str(out / "adapter"),
                 "--data", str(data), "--out", str(scores)]) == 0
    result = json.loads(scores.read_text())
    assert result["examples"] == 4 * len(rows) and 0.0 <= result["accuracy"] <= 1.0
