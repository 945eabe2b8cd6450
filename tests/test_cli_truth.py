"""The command tells the truth (issue 12): a seed repeats a run, an output path that cannot be written
is refused before the work, --overwrite keeps the old run until the new one can replace it, a target
typo is an error, saved adapters name their base model, and the output holds what a user needs."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open

import lorakit.commands
import lorakit.demo
import lorakit.io
import lorakit.train.trainer
from lorakit.cli import main

from test_cli import e2e_file, model_dir  # noqa: F401 - fixtures: a tiny Llama dir and an E2E file


def train_args(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--batch-size", "4",
            "--rank", "4", "--lr", "1e-2", "--dropout", "0.1", "--device", "cpu", *extra]


def adapter_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def assert_bit_identical(a: Path, b: Path) -> None:
    """Same tensors, bit for bit, and the same adapter_config.json. (The safetensors files are not
    compared as bytes: safetensors writes its metadata map in no fixed order.)"""
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert ta.keys() == tb.keys() and ta
    unequal = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not unequal, f"{len(unequal)} of {len(ta)} tensors differ, e.g. {unequal[0]}"
    assert (a / "adapter_config.json").read_text() == (b / "adapter_config.json").read_text()


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- 1. --seed makes a run repeatable ----------------------------------------------------------

def test_same_seed_gives_bit_identical_adapters(model_dir, e2e_file, tmp_path):
    for name, seed in (("a", "7"), ("b", "7"), ("c", "8")):
        assert main(train_args(model_dir, e2e_file, tmp_path / name, "--steps", "3", "--seed", seed)) == 0
    assert_bit_identical(tmp_path / "a" / "adapter", tmp_path / "b" / "adapter")
    # The seed is what decides: another seed starts from another A (so the test above can fail).
    a, c = adapter_tensors(tmp_path / "a" / "adapter"), adapter_tensors(tmp_path / "c" / "adapter")
    assert not any(torch.equal(a[k], c[k]) for k in a if "lora_A" in k)


# Runs `lorakit train` in this process, and SIGKILLs it during the optimizer step number KILL_AT (its
# KILL_AT-th loss computation: grad_accum is 1), after that step's predecessors were checkpointed.
KILLED_RUN = """
import os, signal, sys
import lorakit.train.trainer as trainer
from lorakit.cli import main

kill_at, real, calls = int(sys.argv[1]), trainer.compute_loss, []

def compute_loss(*args, **kwargs):
    calls.append(1)
    if len(calls) == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)

trainer.compute_loss = compute_loss
sys.exit(main(sys.argv[2:]))
"""


def test_sigkill_then_resume_gives_the_uninterrupted_adapter(model_dir, e2e_file, tmp_path):
    steps = ["--steps", "6", "--save-every", "2", "--seed", "3", "--eval-data", str(e2e_file), "--eval-every", "2"]
    assert main(train_args(model_dir, e2e_file, tmp_path / "whole", *steps)) == 0

    killed = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILLED_RUN, "6", *train_args(model_dir, e2e_file, killed, *steps)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    state = json.loads((killed / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 4 and not (killed / "adapter").exists()  # step 5 was done and lost

    assert main(train_args(model_dir, e2e_file, killed, *steps, "--resume")) == 0
    assert_bit_identical(tmp_path / "whole" / "adapter", killed / "adapter")
    assert_bit_identical(tmp_path / "whole" / "best", killed / "best")


# --- 2, 3, 7. output paths: checked before the work, folders made, errors in one line ----------

def refuse_work(monkeypatch) -> None:
    """Loading a model or generating is the work; a refused output path must come before either."""
    def work(*args, **kwargs):
        raise AssertionError("the command started its work before it checked its output path")
    monkeypatch.setattr(lorakit.commands, "load_model", work)
    monkeypatch.setattr(lorakit.commands, "generate_text", work)
    monkeypatch.setattr(lorakit.commands, "finetune", work)
    monkeypatch.setattr(lorakit.demo, "run_demo", work)


def test_merge_into_an_existing_file_is_refused_before_loading(model_dir, tmp_path, capsys, monkeypatch):
    target = tmp_path / "merged.bin"
    target.write_text("not a folder")
    refuse_work(monkeypatch)
    rc = main(["merge", "--model", str(model_dir), "--adapter", str(tmp_path / "adapter"), "--out", str(target)])
    err = capsys.readouterr().err
    assert rc == 2 and str(target) in err and "is a file" in err
    assert target.read_text() == "not a folder"


@pytest.mark.parametrize("command", ["eval", "generate"])
def test_out_under_a_missing_folder_is_created(command, model_dir, e2e_file, tmp_path):
    out = tmp_path / "new" / "dir" / "out.json"
    assert main([command, "--model", str(model_dir), "--data", str(e2e_file), "--max-new-tokens", "2",
                 "--out", str(out)]) == 0
    assert out.is_file()
    if command == "eval":
        assert "bleu" in json.loads(out.read_text()) and (out.parent / "out.hypotheses.txt").is_file()
    else:
        assert len(out.read_text().splitlines()) == 12


@pytest.mark.parametrize("command", ["eval", "generate", "train", "merge", "analyze", "demo"])
@pytest.mark.parametrize("case", ["under a file", "a folder as a file"])
def test_unwritable_out_is_refused_before_the_work(command, case, model_dir, e2e_file, tmp_path, capsys,
                                                   monkeypatch):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    (tmp_path / "folder").mkdir()
    if case == "under a file":
        out = a_file / "sub" / "out.json"
    elif command in ("train", "merge", "analyze", "demo"):  # these write folders: the wrong kind is a file
        out = a_file
    else:
        out = tmp_path / "folder"
    refuse_work(monkeypatch)
    model = ["--model", str(model_dir)]
    args = {"eval": [*model, "--data", str(e2e_file)], "generate": [*model, "--data", str(e2e_file)],
            "train": [*model, "--data", str(e2e_file)], "merge": [*model, "--adapter", str(tmp_path / "adapter")],
            "analyze": [str(tmp_path / "adapter"), *model], "demo": []}[command]
    rc = main([command, *args, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and str(out) in err and "Traceback" not in err
    assert a_file.read_text() == "x" and not any((tmp_path / "folder").iterdir())


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_folder_is_one_line(model_dir, e2e_file, tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    refuse_work(monkeypatch)
    try:
        rc = main(train_args(model_dir, e2e_file, locked / "run", "--steps", "1"))
    finally:
        locked.chmod(0o755)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and str(locked) in err and "not writable" in err


def enospc_as_python_raises_it(path: Path) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as write() raises it: no file name


def enospc_as_safetensors_raises_it(path: Path) -> None:
    raise SafetensorError(f"Error while serializing: I/O error: No space left on device (os error 28) at path "
                          f'"{path.parent / ".tmpXyZ123"}"')


@pytest.mark.parametrize("how", [enospc_as_python_raises_it, enospc_as_safetensors_raises_it])
@pytest.mark.parametrize("where", ["adapter", "checkpoint"])
def test_disk_full_is_one_line_naming_the_file_and_nothing_is_half_written(where, how, model_dir, e2e_file, tmp_path,
                                                                          capsys, monkeypatch):
    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")  # what a write cut short leaves
        how(Path(filename))

    out = tmp_path / "run"
    module = lorakit.io if where == "adapter" else lorakit.train.checkpoint
    monkeypatch.setattr(module, "save_file", full_disk)  # the adapter at the end, or the first checkpoint
    rc = main(train_args(model_dir, e2e_file, out, "--steps", "2"))
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line or "Traceback" in line]
    assert rc == 2 and len(err) == 1, err
    named = out / "adapter" / "adapter_model.safetensors" if where == "adapter" else out / "checkpoint"
    assert f"{named}: the disk is full" in err[0]
    assert not (out / "checkpoint").exists() if where == "checkpoint" else (out / "checkpoint").is_dir()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp folder left
    if where == "adapter":
        assert [p.name for p in (out / "adapter").iterdir()] == []  # no temp file, no half file
        monkeypatch.undo()  # space again: the last step's checkpoint is whole, so the run resumes
        assert main(train_args(model_dir, e2e_file, out, "--steps", "2", "--resume")) == 0
        assert (out / "adapter" / "adapter_model.safetensors").is_file()


# --- 4. --overwrite keeps the old run until the new one can replace it -------------------------

def test_overwrite_that_fails_leaves_the_old_run_whole_and_resumable(model_dir, e2e_file, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert main(train_args(model_dir, e2e_file, out, "--steps", "4", "--save-every", "2")) == 0
    (out / "notes.txt").write_text("the user's own file")
    before = snapshot(out)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": \n')
    assert main(train_args(model_dir, bad, out, "--steps", "4", "--overwrite")) == 2  # fails reading its data
    assert snapshot(out) == before

    def failing_step(*args, **kwargs):
        raise RuntimeError("the new run fails in its first step")
    monkeypatch.setattr(lorakit.train.trainer, "compute_loss", failing_step)
    with pytest.raises(RuntimeError, match="first step"):  # past the point where the old run was deleted
        main(train_args(model_dir, e2e_file, out, "--steps", "4", "--rank", "2", "--overwrite"))
    assert snapshot(out) == before
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging folder left
    monkeypatch.undo()

    assert main(train_args(model_dir, e2e_file, out, "--steps", "4", "--save-every", "2", "--resume")) == 0

    # An overwrite that succeeds replaces the run's files, and only those.
    assert main(train_args(model_dir, e2e_file, out, "--steps", "2", "--rank", "2", "--overwrite")) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["lora_config"]["r"] == 2 and run["total_steps"] == 2
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 2
    assert (out / "notes.txt").read_text() == "the user's own file"
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()][-1] == 2


# --- 5. a target name that matches nothing ------------------------------------------------------

def test_target_typo_is_refused_with_the_candidates(model_dir, e2e_file, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(train_args(model_dir, e2e_file, out, "--steps", "1", "--targets", "q_proj,nonexistent_proj"))
    err = capsys.readouterr().err
    assert rc == 2 and "--targets entries ['nonexistent_proj'] match no module" in err
    assert "k_proj" in err and "o_proj" in err  # the candidates
    assert "pass --allow-missing-targets" in err and "missing_targets" not in err  # the flag, not the keyword
    assert not (out / "adapter").exists()

    with pytest.warns(UserWarning, match="nonexistent_proj"):
        rc = main(train_args(model_dir, e2e_file, out, "--steps", "1", "--targets", "q_proj,nonexistent_proj",
                             "--allow-missing-targets"))
    assert rc == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj"]


# --- 6. the base model is recorded ----------------------------------------------------------------

def test_adapter_names_its_local_base_model(model_dir, e2e_file, tmp_path):
    out = tmp_path / "run"
    assert main(train_args(model_dir, e2e_file, out, "--steps", "2", "--save-every", "1",
                           "--eval-data", str(e2e_file), "--eval-every", "1")) == 0
    for saved in ("adapter", "best"):
        config = json.loads((out / saved / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(model_dir.resolve())


@pytest.mark.slow
def test_adapter_names_the_embedded_base_model(tmp_path, monkeypatch):
    from lorakit.models import SMOLLM2_NAME

    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "tiny.jsonl"
    data.write_text('{"prompt": "2+2=", "completion": "4"}\n' * 2)
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(out), "--steps", "1", "--batch-size", "1",
                 "--seq-len", "16", "--device", "cpu"]) == 0
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == SMOLLM2_NAME


# --- 8. the output holds what a user needs ----------------------------------------------------------

@pytest.fixture
def transformers_warnings():
    """transformers at its usual verbosity (conftest quiets it for the whole suite), so that the
    tests below see what a user's terminal would show."""
    import transformers

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_warning()
    yield
    transformers.logging.set_verbosity(level)


def test_train_and_resume_print_one_done_line_with_a_loss_and_no_loading_bars(model_dir, e2e_file, tmp_path, capfd,
                                                                              transformers_warnings):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(model_dir)
    assert "Loading weights" in capfd.readouterr().err  # what transformers shows unless lorakit silences it

    out = tmp_path / "run"
    for resume in ([], ["--resume"]):  # the second run resumes at the last step: nothing left to train
        assert main(train_args(model_dir, e2e_file, out, "--steps", "2", *resume)) == 0
        text = "".join(capfd.readouterr())
        assert text.count("done:") == 1 and "train loss None" not in text and "train loss " in text, text
        assert "Loading weights" not in text


def bare_encoder(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny BERT saved without a classification head, as the embedded MiniLM is, and an SST-2 file."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from test_data import SST2_LINES

    rows = SST2_LINES[1:]  # [0] is the header
    words = sorted({w for line in rows for w in line.split("\t")[0].split()})
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tok = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    encoder = tmp_path / "encoder"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64)).save_pretrained(encoder)
    tok.save_pretrained(encoder)
    data = tmp_path / "train.tsv"
    data.write_text("sentence\tlabel\n" + "\n".join(rows * 2) + "\n")
    return encoder, data


def test_classification_prints_no_missing_keys_for_the_new_head(tmp_path, capfd, caplog, transformers_warnings):
    from transformers import AutoModelForSequenceClassification

    encoder, data = bare_encoder(tmp_path)
    AutoModelForSequenceClassification.from_pretrained(encoder)
    assert "MISSING" in caplog.text  # what transformers reports (a log record) unless lorakit handles it
    caplog.clear()
    capfd.readouterr()

    out = tmp_path / "run"
    assert main(["train", "--task", "classification", "--model", str(encoder), "--data", str(data),
                 "--out", str(out), "--steps", "1", "--batch-size", "4", "--device", "cpu"]) == 0
    assert main(["eval", "--task", "classification", "--model", str(encoder), "--adapter", str(out / "adapter"),
                 "--data", str(data)]) == 0
    text = "".join(capfd.readouterr()) + caplog.text
    assert "MISSING" not in text and "LOAD REPORT" not in text and "Loading weights" not in text


def drop_one_weight(model_dir: Path, part: str) -> Path:
    from safetensors.torch import load_file, save_file

    weights = load_file(model_dir / "model.safetensors")
    dropped = next(k for k in weights if part in k)
    save_file({k: v for k, v in weights.items() if k != dropped}, model_dir / "model.safetensors",
              metadata={"format": "pt"})
    return model_dir


def test_a_checkpoint_that_lacks_weights_is_still_reported(tmp_path, model_dir, e2e_file, capsys):
    """The load reports are off in the CLI; what they would have said that matters, lorakit says."""
    import shutil

    encoder, data = bare_encoder(tmp_path)
    drop_one_weight(encoder, "attention.self.query.weight")
    with pytest.warns(UserWarning, match="lacks 1 weight"):
        assert main(["train", "--task", "classification", "--model", str(encoder), "--data", str(data),
                     "--out", str(tmp_path / "cls"), "--steps", "1", "--batch-size", "4", "--device", "cpu"]) == 0
    broken = drop_one_weight(Path(shutil.copytree(model_dir, tmp_path / "llama")), "mlp.up_proj.weight")
    with pytest.warns(UserWarning, match="lacks 1 weight"):
        assert main(train_args(broken, e2e_file, tmp_path / "lm", "--steps", "1")) == 0


def test_a_run_over_an_old_checkpoint_names_the_flags(model_dir, e2e_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(model_dir, e2e_file, out, "--steps", "1")) == 0
    capsys.readouterr()
    assert main(train_args(model_dir, e2e_file, out, "--steps", "1")) == 2
    err = capsys.readouterr().err
    assert "pass --resume to continue it, or --overwrite to start afresh" in err, err
    assert "resume=True" not in err


def test_resume_without_a_checkpoint_names_the_flag(model_dir, e2e_file, tmp_path, capsys):
    assert main(train_args(model_dir, e2e_file, tmp_path / "empty", "--steps", "1", "--resume")) == 2
    err = capsys.readouterr().err
    assert "to start a new run, run without --resume" in err, err
