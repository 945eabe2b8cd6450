"""Inputs that are wrong are refused with a message that says where and what to change: adapter files
of the wrong JSON or tensor types, ranks that ΔW cannot use, data lines of the wrong shape, and the
options of `lorakit train` named by their flags."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import lorakit
from lorakit import io as lio
from lorakit.cli import main
from lorakit.config import ConfigError, LoraConfig
from lorakit.data import DataFormatError, Example, read_jsonl, read_prompts, read_references, tokenize_example
from lorakit.hints import SettingError

from conftest import tiny_llama
from test_cli import e2e_file, model_dir  # noqa: F401 - fixtures: a tiny Llama dir and an E2E file
from test_data import make_tokenizer

QV = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    """A valid adapter of the tiny Llama (r=4 on q, v), saved once; tests copy it before breaking it."""
    path = tmp_path_factory.mktemp("adapter")
    return lorakit.save_adapter(lorakit.inject(tiny_llama(), LoraConfig(r=4, alpha=8, target_modules=QV)), path)


def _copy(adapter_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(adapter_dir, tmp_path / "adapter"))


# --- 1. adapter_config.json: every field of the right JSON type ---------------------------------

# (fields written over PEFT's JSON, words the message must hold besides the file's path)
BAD_FIELDS = {
    "nulls": ({"r": None, "lora_alpha": None, "target_modules": 5},
              ["r is null, expected a positive integer", "lora_alpha is null, expected a positive number",
               "target_modules is 5, expected a list of module names or a string"]),
    "r-string": ({"r": "eight"}, ['r is "eight", expected a positive integer']),
    "r-bool": ({"r": True}, ["r is true, expected a positive integer"]),
    "r-float": ({"r": 4.5}, ["r is 4.5, expected a positive integer"]),
    "alpha-string": ({"lora_alpha": "abc"}, ['lora_alpha is "abc", expected a positive number']),
    "dropout-range": ({"lora_dropout": 1.5}, ["lora_dropout is 1.5, expected a number in [0, 1)"]),
    "targets-ints": ({"target_modules": [1, 2]}, ["target_modules is [1, 2], expected a list of module names"]),
    "flag-string": ({"use_rslora": "false"}, ['use_rslora is "false", expected true or false']),
    "rank-pattern": ({"rank_pattern": {"q_proj": 2.5}}, ["rank_pattern is", "positive integers"]),
    "saved-string": ({"modules_to_save": "lm_head"}, ['modules_to_save is "lm_head", expected null or a list']),
    "layers-strings": ({"layers_to_transform": ["0"]}, ["layers_to_transform is", "layer indices"]),
    "bias": ({"bias": None}, ["bias is null, expected one of"]),
}


@pytest.mark.parametrize("case", BAD_FIELDS)
def test_bad_config_field_names_file_key_and_expectation(case, adapter_dir, tmp_path):
    fields, words = BAD_FIELDS[case]
    path = _copy(adapter_dir, tmp_path)
    config_file = path / lio.CONFIG_NAME
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **fields}))
    with pytest.raises(lio.AdapterFileError) as e:
        lorakit.load_adapter(tiny_llama(), path)
    message = str(e.value)
    assert message.startswith(f"{config_file}: "), message
    for word in words:
        assert word in message, message


def test_from_peft_dict_names_the_source_without_a_file():
    d = {**LoraConfig(target_modules=QV).to_peft_dict(), "r": None}
    with pytest.raises(ConfigError, match=r"^their/adapter_config.json: r is null, expected a positive integer"):
        LoraConfig.from_peft_dict(d, source="their/adapter_config.json")


# --- 2. factors are floating point -------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool])
def test_integer_factors_are_refused(dtype, adapter_dir, tmp_path):
    path = _copy(adapter_dir, tmp_path)
    file = path / lio.WEIGHTS_NAME
    with safe_open(str(file), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    tensors[key] = tensors[key].to(dtype)
    save_file(tensors, str(file), metadata=metadata)
    with pytest.raises(lio.AdapterFileError, match="floating point") as e:
        lio.read_adapter(path)
    assert str(file) in str(e.value) and key in str(e.value) and str(dtype) in str(e.value)


# --- 3. a rank above min(d_out, d_in) ----------------------------------------------------------

@pytest.mark.parametrize("config, words", [
    (LoraConfig(r=17, target_modules=QV), ["r=17", "v_proj", "(16, 32)", "at most 16"]),
    (LoraConfig(r=8, target_modules=QV, rank_pattern={"q_proj": 40}), ["rank_pattern gives", "q_proj rank 40",
                                                                        "(32, 32)", "at most 32"]),
    (LoraConfig(r=33, target_modules=["embed_tokens"]), ["r=33", "embed_tokens", "(32, 100)"]),
], ids=["r", "rank_pattern", "embedding"])
def test_rank_above_what_delta_w_can_have_is_refused(config, words):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError) as e:
        lorakit.inject(model, config)
    for word in words:
        assert word in str(e.value), str(e.value)
    assert "lora_state" not in model.__dict__
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    lorakit.inject(model, config.replace(r=16, rank_pattern={}))  # the largest rank that can change ΔW: fine


def test_a_file_of_higher_rank_still_loads(tmp_path):
    """Factors made elsewhere (PEFT, a converted PiSSA adapter, combine's "cat") may exceed the limit."""
    config = LoraConfig(r=20, target_modules=QV)
    source = lorakit.inject(tiny_llama(), config, check_rank=False)
    lorakit.save_adapter(source, tmp_path / "a")
    loaded = lorakit.load_adapter(tiny_llama(), tmp_path / "a")
    assert {m.rank["default"] for m in loaded.modules() if isinstance(m, lorakit.LoraLayer)} == {20}


def train_args(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--batch-size", "4",
            "--device", "cpu", *extra]


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert ": error: " in err, err
    return err.split(": error: ", 1)[1]


def test_cli_rank_too_large_names_rank(model_dir, e2e_file, tmp_path, capsys):
    assert main(train_args(model_dir, e2e_file, tmp_path / "run", "--steps", "1", "--rank", "100000")) == 2
    message = _error(capsys)
    assert "--rank 100000 is more than" in message and "v_proj" in message and "(16, 32)" in message
    assert "r=" not in message and "target_modules" not in message


# --- 4. options named by their flags -----------------------------------------------------------

# (extra train flags, what the message says, Python spellings it must not use)
TRAIN_HINTS = {
    "steps": (["--steps", "0"], "--steps must be >= 1 (or leave it unset to run --epochs passes",
              ["None", "max_steps"]),
    "epochs": (["--epochs", "0"], "--epochs must be > 0 (or set --steps", ["None", "max_steps"]),
    "seq-len": (["--steps", "1", "--seq-len", "1"], "--seq-len (the longest example, in tokens) must be at least 2",
                ["max_len"]),
    "targets": (["--steps", "1", "--targets", "nosuchlayer"],
                "--targets ['nosuchlayer'] matches no module", ["target_modules", "missing_targets"]),
}


@pytest.mark.parametrize("case", TRAIN_HINTS)
def test_train_errors_name_the_flags(case, model_dir, e2e_file, tmp_path, capsys):
    extra, says, python = TRAIN_HINTS[case]
    assert main(train_args(model_dir, e2e_file, tmp_path / "run", *extra)) == 2
    message = _error(capsys)
    assert says in message, message
    for word in python:
        assert word not in message, message
    if case == "targets":
        assert "--allow-missing-targets would not help" in message and "k_proj" in message


def test_seq_len_below_two_is_a_setting_error():
    """The library names max_len; the command line maps it to its flag (`lorakit train --seq-len`)."""
    tok = make_tokenizer(bos=False)
    short = Example("a", "b")
    for max_len in (0, 1):
        with pytest.raises(SettingError) as e:
            tokenize_example(short, tok, max_len)  # refused even where the example would fit
        assert str(e.value).startswith("max_len (the longest example, in tokens) must be at least 2")
        assert e.value.render({"max_len": "--seq-len"}).startswith("--seq-len (the longest example")


# --- 5. resuming a run with other settings -----------------------------------------------------

def test_resume_with_other_settings_shows_each_difference(model_dir, e2e_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(model_dir, e2e_file, out, "--steps", "1", "--rank", "4")) == 0
    capsys.readouterr()
    assert main(train_args(model_dir, e2e_file, out, "--steps", "1", "--rank", "2", "--resume")) == 2
    message = _error(capsys)
    assert "lora.r: 4 in the checkpoint, 2 now" in message, message
    assert "trainable_parameters: " in message and "..." not in message  # the values, not a cut dump
    assert "--overwrite instead of --resume" in message and "another --out" in message
    assert "out_dir" not in message and "overwrite=" not in message


# --- 6. data lines and adapter paths that say what is wrong ------------------------------------

def test_eval_file_of_text_lines_says_which_keys_eval_needs(tmp_path):
    path = tmp_path / "texts.jsonl"
    path.write_text('{"text": "hello"}\n{"text": "world"}\n')
    with pytest.raises(ValueError, match="has no prompt/reference fields") as e:
        read_references(path)
    assert str(path) in str(e.value) and '"prompt" and "completion" (the reference)' in str(e.value)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"prompt": "a", "completion": "b"}\n{"text": "world"}\n')
    with pytest.raises(DataFormatError, match='line 2: holds only "text"'):
        read_references(mixed)
    assert [(ex.prompt, ex.completion) for ex in read_references(mixed, skip_bad_lines=True)] == [("a", "b")]
    assert len(read_jsonl(mixed)) == 2  # training reads text lines as before


@pytest.mark.parametrize("line, says", [
    ('{"prompt": 5, "completion": "b"}', '"prompt" must be a string, got 5 (a number)'),
    ('{"prompt": "a", "completion": null}', '"completion" must be a string, got null'),
    ('{"text": ["a"]}', '"text" must be a string, got a JSON list'),
    ('[1, 2]', 'expected a JSON object with "prompt" and "completion", or "text"; got a JSON list'),
])
def test_wrong_value_types_are_named_by_line(line, says, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n' + line + "\n")
    with pytest.raises(DataFormatError, match="line 2: ") as e:
        read_jsonl(path)
    assert says in str(e.value), str(e.value)


def test_prompt_that_is_no_string_is_named(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": 5}\n')
    with pytest.raises(DataFormatError, match=r'line 2: "prompt" must be a string, got 5 \(a number\)'):
        read_prompts(path)


def test_cli_eval_names_the_line_of_a_prompt_that_is_no_string(model_dir, tmp_path, capsys):
    path = tmp_path / "eval.jsonl"
    path.write_text('{"prompt": 5, "completion": "b"}\n')
    assert main(["eval", "--model", str(model_dir), "--data", str(path)]) == 2
    message = _error(capsys)
    assert "line 1" in message and '"prompt" must be a string' in message and "keys" not in message


def test_cli_eval_of_a_text_only_file_says_which_keys_it_needs(model_dir, tmp_path, capsys):
    path = tmp_path / "texts.jsonl"
    path.write_text('{"text": "hello"}\n{"text": "world"}\n')
    assert main(["eval", "--model", str(model_dir), "--data", str(path)]) == 2
    message = _error(capsys)
    assert "has no prompt/reference fields" in message and "has no tokens" not in message


def test_adapter_file_instead_of_folder_suggests_the_folder(adapter_dir, model_dir, tmp_path, capsys):
    file = adapter_dir / lio.WEIGHTS_NAME
    with pytest.raises(lio.AdapterFileError) as e:
        lio.read_adapter(file)
    assert f"{file} is a file, not an adapter directory" in str(e.value)
    assert f"its folder {adapter_dir} holds {lio.CONFIG_NAME}: give that folder" in str(e.value)
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes(file.read_bytes())
    with pytest.raises(lio.AdapterFileError) as e:
        lio.read_adapter(lone)
    assert "is a file" in str(e.value) and "give that folder" not in str(e.value)

    assert main(["generate", "--model", str(model_dir), "--adapter", str(file), "--prompt", "hi"]) == 2
    message = _error(capsys)
    assert "is a file, not an adapter directory" in message and "no such" not in message


def test_log_every_sets_the_metrics_rows(model_dir, e2e_file, tmp_path, capsys):
    from lorakit.train import read_metrics

    out = tmp_path / "run"
    assert main(train_args(model_dir, e2e_file, out, "--steps", "3", "--log-every", "1")) == 0
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r] == [1, 2, 3]
    capsys.readouterr()
    assert main(train_args(model_dir, e2e_file, tmp_path / "other", "--steps", "3", "--log-every", "0")) == 2
    assert "--log-every must be >= 1" in _error(capsys)
