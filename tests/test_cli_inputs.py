"""What the command line accepts: --out folders of merge and combine, counts, --config files,
--device, adapter and target specs, help texts; and the files it leaves (none on failure, the
usual mode on success)."""

from __future__ import annotations

import argparse
import errno
import os
import re
from pathlib import Path

import pytest
import torch

import lorakit
import lorakit.commands
import lorakit.demo
from lorakit.cli import build_parser, main, parse

from test_cli import model_dir  # noqa: F401 - the tiny local Llama, a fixture
from test_cli_generate_adapters import adapters  # noqa: F401 - two adapters of it, a fixture


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    (choices,) = [a.choices for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(choices)


def refuse_work(monkeypatch) -> None:
    """Loading a model or training is the work; a refused input must come before either."""
    def work(*args, **kwargs):
        raise AssertionError("the command started its work before it checked its input")
    for name in ("load_model", "finetune", "generate_text"):
        monkeypatch.setattr(lorakit.commands, name, work)
    monkeypatch.setattr(lorakit.demo, "run_demo", work)


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# --- merge and combine: --out is new or empty, or replaced whole with --overwrite ---------------

def _combine(model_dir, adapters, out, *extra) -> int:  # noqa: F811
    return main(["combine", "--model", str(model_dir), "--adapter", f"qv={adapters['qv']}",
                 "--adapter", f"mlp={adapters['mlp']}", "--weights", "1,1", "--out", str(out), *extra])


def _merge(model_dir, adapters, out, *extra) -> int:  # noqa: F811
    return main(["merge", "--model", str(model_dir), "--adapter", str(adapters["qv"]), "--out", str(out), *extra])


RUNNERS = {"combine": _combine, "merge": _merge}


@pytest.mark.parametrize("command", RUNNERS)
def test_a_non_empty_out_is_refused_without_overwrite(command, model_dir, adapters, tmp_path, capsys,  # noqa: F811
                                                      monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model-00002-of-00002.safetensors").write_text("a stale shard")
    refuse_work(monkeypatch)
    assert RUNNERS[command](model_dir, adapters, out) == 2
    err = capsys.readouterr().err
    assert f"--out {out}: this folder is not empty" in err and "--overwrite" in err, err
    assert _contents(out) == {"model-00002-of-00002.safetensors": b"a stale shard"}


@pytest.mark.parametrize("command", RUNNERS)
def test_overwrite_replaces_the_folder_whole(command, model_dir, adapters, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    out.mkdir()
    (out / "model-00002-of-00002.safetensors").write_text("a stale shard")
    assert RUNNERS[command](model_dir, adapters, out, "--overwrite") == 0
    names = sorted(p.name for p in out.iterdir())
    assert "model-00002-of-00002.safetensors" not in names
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp folder, no old folder aside
    if command == "combine":
        assert names == ["adapter_config.json", "adapter_model.safetensors"]
    else:
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(out)  # a whole model, no index naming a missing shard


@pytest.mark.parametrize("command", RUNNERS)
@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
@pytest.mark.parametrize("where", ["the adapter", "the folder above it"])
def test_out_is_never_an_input(command, overwrite, where, model_dir, adapters, tmp_path, capsys,  # noqa: F811
                               monkeypatch):
    out = adapters["qv"] if where == "the adapter" else adapters["qv"].parent
    before = _contents(adapters["qv"])
    refuse_work(monkeypatch)
    assert RUNNERS[command](model_dir, adapters, out, *overwrite) == 2
    err = capsys.readouterr().err
    what = "is" if where == "the adapter" else "holds"
    assert f"--out {out}: this folder {what} the input --adapter" in err, err
    assert _contents(adapters["qv"]) == before


def test_combine_overwrite_that_fails_leaves_the_old_folder_whole(model_dir, adapters, tmp_path, capsys,  # noqa: F811
                                                                   monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file")

    def full_disk(model, folder, name):
        Path(folder).mkdir()
        (Path(folder) / "adapter_model.safetensors").write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(lorakit.io, "save_adapter", full_disk)
    assert _combine(model_dir, adapters, out, "--overwrite") == 2
    assert "the disk is full" in capsys.readouterr().err
    assert _contents(out) == {"notes.txt": b"the user's own file"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# --- counts are refused while parsing, naming the flag ------------------------------------------

@pytest.mark.parametrize("argv,says", [
    (["eval", "--data", "x.jsonl", "--limit", "0"], "argument --limit: must be at least 1, got 0"),
    (["eval", "--data", "x.jsonl", "--limit", "-1"], "argument --limit: must be at least 1, got -1"),
    (["eval", "--data", "x.jsonl", "--limit", "two"], "argument --limit: expected a whole number, got 'two'"),
    (["eval", "--data", "x.jsonl", "--batch-size", "0"], "argument --batch-size: must be at least 1"),
    (["generate", "--prompt", "hi", "--max-new-tokens", "0"], "argument --max-new-tokens: must be at least 1"),
    (["generate", "--prompt", "hi", "--beams", "-3"], "argument --beams: must be at least 1, got -3"),
    (["generate", "--prompt", "hi", "--batch-size", "0"], "argument --batch-size: must be at least 1"),
    (["generate", "--prompt", "hi", "--no-repeat-ngram", "-1"], "argument --no-repeat-ngram: must be at least 0"),
    (["train", "--seq-len", "0"], "argument --seq-len: must be at least 1, got 0"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_a_bad_count_is_refused_naming_its_flag(argv, says, capsys, monkeypatch):
    refuse_work(monkeypatch)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"lorakit {argv[0]}: error: {says}" in err, err


# --- --config run.yaml: each value checked as its flag checks it --------------------------------

@pytest.mark.parametrize("text,expected", [
    ("targets: [q_proj, k_proj]\n", {"targets": "q_proj,k_proj"}),
    ("modules_to_save: [lm_head]\n", {"modules_to_save": "lm_head"}),
    ("no_compile: true\n", {"compile": "off"}),
    ("no-compile: false\n", {"compile": "auto"}),
    ("compile: off\n", {"compile": "off"}),  # YAML reads off as false
    ("dora: true\nfsdp: false\n", {"dora": True, "fsdp": False}),
    ("lr: 1e-3\nepochs: 2\nrank: '4'\n", {"lr": 0.001, "epochs": 2.0, "rank": 4}),
    ("steps:\ndevice: cpu\n", {"steps": None, "device": "cpu"}),
], ids=["targets-list", "modules-list", "no_compile", "no-compile-false", "compile-off", "switches", "numbers",
        "null-and-device"])
def test_config_values_read_as_their_flags_read_them(text, expected, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(text)
    args = vars(parse(["train", "--config", str(cfg)]))
    assert {k: args[k] for k in expected} == expected


@pytest.mark.parametrize("text,says", [
    ('dora: "no"\n', "dora: a switch takes true or false, got 'no'"),
    ("dora: 1\n", "dora: a switch takes true or false, got 1"),
    ("rank: 4.5\n", "rank: expected a whole number, got 4.5"),
    ("rank: true\n", "rank: expected a whole number, got True"),
    ("lr: fast\n", "lr: expected a number, got 'fast'"),
    ("seq_len: 0\n", "seq_len: must be at least 1, got 0"),
    ("optimizer: sgd\n", "optimizer: expected one of adamw, adamw8bit, got 'sgd'"),
    ("device: tpu\n", "device: 'tpu' is not a device"),
    ("targets: {q: 1}\n", "targets: expected text"),
    ("data: 5\n", "data: expected text, got 5"),
    ("config: other.yaml\n", "config: a config file cannot name another one"),
    ("rnak: 4\n", "unknown option 'rnak'; did you mean rank?"),
    ("compile: on\nno_compile: true\n", "no_compile and compile set the same option"),
    ("- rank\n", "expected a mapping of option names to values"),
], ids=["switch-text", "switch-number", "float-for-int", "bool-for-int", "text-for-float", "count", "choice",
        "device", "mapping", "number-for-text", "nested", "unknown", "twice", "list"])
def test_a_bad_config_value_names_the_file_and_key_under_train_usage(text, says, tmp_path, capsys, monkeypatch):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(text)
    refuse_work(monkeypatch)
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: lorakit train"), err
    assert f"lorakit train: error: --config {cfg}: {says}" in err, err


# --- --device: the syntax while parsing, whether it exists when the command starts ---------------

@pytest.mark.parametrize("command", ["train", "demo", "serve"])
def test_an_unknown_device_is_refused_while_parsing(command, capsys, monkeypatch):
    refuse_work(monkeypatch)
    assert main([command, "--device", "tpu"]) == 2
    err = capsys.readouterr().err
    assert f"lorakit {command}: error: argument --device: 'tpu' is not a device" in err and "cuda:N" in err, err


@pytest.mark.parametrize("command", ["train", "demo", "serve"])
@pytest.mark.parametrize("device,gpus,says", [
    ("cuda", 0, "--device cuda: this torch"), ("cuda:2", 0, "--device cuda:2: this torch"),
    ("cuda:2", 2, "--device cuda:2: there is no GPU 2, only 2 (cuda:0 to cuda:1)"),
])
def test_a_missing_device_is_refused_before_the_work(command, device, gpus, says, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: gpus > 0)
    refuse_work(monkeypatch)
    assert main([command, "--device", device, *(["--out", str(tmp_path / "run")] if command != "serve" else [])]) == 2
    err = capsys.readouterr().err
    assert f"lorakit {command}: error: {says}" in err, err
    assert ("use --device cpu" if gpus == 0 else "give one of those, or --device cuda") in err, err
    assert not (tmp_path / "run").exists()


def test_mps_where_there_is_none_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    refuse_work(monkeypatch)
    assert main(["train", "--device", "mps", "--out", str(tmp_path / "run")]) == 2
    assert "--device mps: MPS (Apple's GPU) is not available here; use --device cpu" in capsys.readouterr().err


# --- adapter and target specs that say nothing ---------------------------------------------------

@pytest.mark.parametrize("spec,says", [
    ("={qv}", "the name before '=' is empty"),
    ("sql=", "the path after '=' is empty"),
])
def test_an_empty_adapter_name_or_path_says_so(spec, says, model_dir, adapters, capsys, monkeypatch):  # noqa: F811
    refuse_work(monkeypatch)
    spec = spec.format(qv=adapters["qv"])
    assert main(["generate", "--model", str(model_dir), "--adapter", spec, "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert f"--adapter {spec}: {says}" in err and "several" not in err, err


@pytest.mark.parametrize("how", [["--targets", ""], ["--targets", " , "], ["--config", "{yaml}"]],
                         ids=["empty", "commas", "empty-yaml-list"])
def test_empty_targets_are_refused(how, tmp_path, capsys, monkeypatch):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("targets: []\n")
    refuse_work(monkeypatch)
    how = [str(cfg) if a == "{yaml}" else a for a in how]
    assert main(["train", *how, "--out", str(tmp_path / "run"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "lorakit train: error: --targets '" in err and "names no module" in err, err
    assert "target_modules" not in err, err


# --- a failed command leaves no folders behind ---------------------------------------------------

@pytest.mark.parametrize("command", ["generate", "eval"])
def test_a_failed_command_leaves_no_empty_folders(command, model_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "a" / "b" / "out.jsonl"
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "hi", "completion": "there"}\n')
    rc = main([command, "--model", str(model_dir), "--adapter", str(tmp_path / "missing"), "--data", str(data),
               "--out", str(out)])
    assert rc == 2 and "no such adapter directory" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


# --- help ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", sorted(_subparsers()))
def test_help_says_each_default_once_and_describes_the_command(command, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")
    sub = _subparsers()[command]
    assert sub.description and len(sub.description.split()) >= 8, f"{command} has no description"
    formatter = sub._get_formatter()
    for action in sub._actions:
        shown = formatter._expand_help(action) if action.help else ""
        assert shown.count("(default:") <= 1, f"{command} {action.option_strings}: {shown}"
    assert not re.search(r"\(default: [^()]*\)\s*\(default:", " ".join(sub.format_help().split()))


# --- written files get the usual mode, not safetensors' 0600 --------------------------------------

@pytest.fixture
def umask():
    old = os.umask(0o022)
    try:
        yield lambda mask: os.umask(mask)
    finally:
        os.umask(old)


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(mask, mode, umask, tmp_path):
    from safetensors.torch import save_file

    from lorakit.files import atomic_write_dir, atomic_write_files, atomic_write_text

    umask(mask)
    tensors = {"x": torch.zeros(2)}
    atomic_write_files({tmp_path / "a.safetensors": lambda tmp: save_file(tensors, str(tmp))})
    atomic_write_text(tmp_path / "a.json", "{}")

    def folder(tmp: Path) -> None:
        tmp.mkdir()
        save_file(tensors, str(tmp / "b.safetensors"))
        (tmp / "b.json").write_text("{}")

    atomic_write_dir(tmp_path / "dir", folder)
    atomic_write_dir(tmp_path / "replaced", folder)
    atomic_write_dir(tmp_path / "replaced", folder, replace=True)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == 6
    modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in files}
    assert modes == {name: oct(mode) for name in modes}


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
def test_a_combined_adapter_is_readable_by_others_under_umask_022(model_dir, adapters, umask, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    assert _combine(model_dir, adapters, out) == 0
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {
        "adapter_config.json": "0o644", "adapter_model.safetensors": "0o644"}


@pytest.mark.parametrize("command", ["generate", "eval", "train"])
def test_a_missing_data_file_is_named_without_errno(command, tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    assert main([command, "--model", "default", "--data", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"error: {missing}: no such file or folder" in err and "Errno" not in err


def test_lorakits_warnings_print_as_one_line_and_others_keep_their_form(monkeypatch):
    import warnings

    shown = []

    def train(args):  # how a warning would print while the command runs
        shown.append(warnings.formatwarning("the schedule changes", UserWarning, lorakit.commands.__file__, 1))
        shown.append(warnings.formatwarning("from elsewhere", UserWarning, "/elsewhere/module.py", 7))

    before = warnings.formatwarning
    monkeypatch.setattr(lorakit.commands, "train", train)
    assert main(["train"]) == 0
    assert shown[0] == "lorakit train: warning: the schedule changes\n"
    assert shown[1].startswith("/elsewhere/module.py:7: UserWarning: from elsewhere")
    assert warnings.formatwarning is before  # put back for whoever runs next in this process


def test_ctrl_c_in_train_says_how_to_continue(monkeypatch, capsys):
    def train(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(lorakit.commands, "train", train)
    assert main(["train"]) == 130
    assert "interrupted; the run continues from its last checkpoint with the same command and --resume" in \
        capsys.readouterr().err
