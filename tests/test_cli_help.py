"""The command tells the truth and helps (issue 12): help texts with defaults, errors that name the
flag to change, the prompt/completion boundary, progress, metric scales, the public model loader,
and the `analyze` figures."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.cli import build_parser, main

from test_cli import model_dir  # noqa: F401 - the tiny local Llama (its tokenizer has a chat template)
from test_data import E2E_LINES, SST2_LINES, make_tokenizer

README = Path(__file__).resolve().parents[1] / "README.md"


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (choices,) = [a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(choices)


def _flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def e2e_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "valid.txt"
    path.write_text("\n".join(E2E_LINES) + "\n")
    return path


# --- help --------------------------------------------------------------------------------------

COMMANDS = sorted(_subparsers())


def test_every_command_is_covered():
    assert {"train", "generate", "eval", "merge", "demo", "analyze"} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_help_and_shows_its_default(command, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")  # no wrapping, so a default reads as one piece
    sub = _subparsers()[command]
    text = _flat(sub.format_help())
    # one of a required group (generate's --prompt | --data) is as good as required
    in_required_group = {id(a) for g in sub._mutually_exclusive_groups if g.required for a in g._group_actions}
    for action in sub._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help and len(action.help.split()) >= 3, f"{command} {name} has no help worth reading"
        takes_value = action.nargs != 0  # switches (store_true, store_const) are off unless given
        if not takes_value or action.required or id(action) in in_required_group:
            continue
        if action.default is None:
            # No value: the help says what happens without the option.
            assert "default:" in action.help, f"{command} {name}: say what its absence means"
        else:
            assert f"(default: {action.default})" in text, f"{command} {name}: default {action.default!r} not shown"


def test_options_of_the_issue_show_their_defaults(monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")
    helps = {name: _flat(sub.format_help()) for name, sub in _subparsers().items()}
    for command, option, default in (("train", "--rank", 8), ("train", "--lr", 0.0002), ("train", "--save-every", 100),
                                     ("train", "--seed", 0), ("generate", "--beams", 1), ("eval", "--beams", 1),
                                     ("merge", "--model", "default"), ("demo", "--steps", 60),
                                     ("demo", "--out", "runs/demo")):
        # "--rank RANK <meaning> (default: 8)", the meaning being this option's, not the next one's
        found = re.search(rf"(?:^| ){option} [A-Z_]+ (.+?) \(default: {re.escape(str(default))}\)", helps[command])
        own = found and not re.search(r"--[a-z-]+ [A-Z_]{2,} ", found[1])  # no other option's flag and metavar
        assert own and len(found[1].split()) >= 2, (command, option)


def test_help_exits_cleanly_from_the_command_line():
    out = subprocess.run([sys.executable, "-m", "lorakit", "train", "--help"], capture_output=True, text=True,
                         env={"COLUMNS": "2000", "PATH": ""}, check=True).stdout
    assert "(default: 8)" in out and "demo" in out


# --- training without --data -------------------------------------------------------------------

def test_train_without_data_says_it_trains_the_demo_task(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")
    data_help = next(a.help for a in _subparsers()["train"]._actions if a.dest == "data")
    assert "demo" in data_help and "default" in data_help
    out = tmp_path / "run"
    assert main(["train", "--model", str(model_dir), "--out", str(out), "--steps", "1", "--batch-size", "2",
                 "--eval-every", "1", "--device", "cpu"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("data: the built-in demo task") and "--data FILE" in first, first
    assert (out / "adapter" / "adapter_config.json").is_file()


def test_train_on_a_file_does_not_mention_the_demo(model_dir, e2e_file, tmp_path, capsys):
    assert main(["train", "--model", str(model_dir), "--data", str(e2e_file), "--out", str(tmp_path / "run"),
                 "--steps", "1", "--batch-size", "2", "--device", "cpu"]) == 0
    assert "demo task" not in capsys.readouterr().out


# --- errors name the flag from the command line, the keyword from Python -----------------------

def _no_chat_template_model(model_dir: Path, tmp_path: Path) -> Path:
    import shutil

    from transformers import AutoTokenizer

    path = tmp_path / "no-template"
    shutil.copytree(model_dir, path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = None
    tok.save_pretrained(path)
    for name in ("chat_template.jinja", "chat_template.json"):
        (path / name).unlink(missing_ok=True)
    return path


def _files(tmp_path: Path) -> dict[str, Path]:
    files = {
        "bad.jsonl": '{"prompt": "a", "completion": "b"}\n{"prompt": 1}\n',
        "plain.txt": "hello\nworld\n",
        "no_text.csv": "text,label\nnice,1\n",
        "labels.tsv": "sentence\tlabel\nnice\t1\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return {name: tmp_path / name for name in files}


# (argv after the command's --model/--out, what the CLI must say, the Python spelling it must not use)
HINTS = {
    "skip-bad-lines": (["train", "--data", "{bad.jsonl}"], "pass --skip-bad-lines to skip", "skip_bad_lines="),
    "skip-bad-lines-generate": (["generate", "--data", "{bad.jsonl}"], "pass --skip-bad-lines to skip",
                                "skip_bad_lines="),
    "format": (["train", "--data", "{plain.txt}"], "set --format to 'jsonl'", "set format"),
    "format-eval": (["eval", "--data", "{plain.txt}"], "set --format to 'jsonl'", "set format"),
    "text-column": (["train", "--task", "classification", "--data", "{no_text.csv}"],
                    "set --text-column / --text-pair-column / --label-column", "text_column"),
    "task": (["train", "--data", "{labels.tsv}"], "pass --task classification", "task="),
    "rank": (["train", "--data", "{bad.jsonl}", "--skip-bad-lines", "--rank", "0"],
             "--rank must be a positive integer", "r must"),
    "beams": (["generate", "--prompt", "hi", "--beams", "0"], "argument --beams: must be at least 1, got 0", "num_beams"),
    "chat-template": (["generate", "--prompt", "hi", "--chat-template"],
                      "--chat-template was given, but the tokenizer has no chat_template", "chat_template=True"),
}


@pytest.mark.parametrize("case", HINTS)
def test_hints_name_the_flag(case, model_dir, tmp_path, capsys):
    argv, says, python_spelling = HINTS[case]
    files = _files(tmp_path)
    argv = [files[a[1:-1]].as_posix() if a.startswith("{") else a for a in argv]
    model = _no_chat_template_model(model_dir, tmp_path) if case == "chat-template" else model_dir
    if argv[0] == "train":
        argv += ["--out", str(tmp_path / "run"), "--steps", "1", "--device", "cpu"]
    if argv[0] == "train" and "--task" in argv:
        model = None  # the classification error comes from the data, before any model loads
    rc = main([*argv, *(["--model", str(model)] if model else [])])
    err = capsys.readouterr().err
    assert rc == 2 and f"lorakit {argv[0]}: error: " in err, err
    message = err.split(f"lorakit {argv[0]}: error: ", 1)[1]
    assert says in message, err
    assert python_spelling not in message.replace(says, ""), err


def test_library_users_read_keywords(tmp_path, model_dir):
    from transformers import AutoTokenizer

    from lorakit.config import LoraConfig
    from lorakit.data import encode_prompt, load_examples, read_classification, read_jsonl
    from lorakit.finetune import DataSpec, read_data

    files = _files(tmp_path)
    with pytest.raises(ValueError, match=r"pass skip_bad_lines=True to skip") as e:
        read_jsonl(files["bad.jsonl"])
    assert "--" not in str(e.value)
    with pytest.raises(ValueError, match="set format to 'jsonl'"):
        load_examples(files["plain.txt"])
    with pytest.raises(ValueError, match="set text_column / text_pair_column / label_column"):
        read_classification(files["no_text.csv"])
    with pytest.raises(ValueError, match=r"holds classification examples; pass task='classification'$"):
        read_data(DataSpec(train=str(files["labels.tsv"])), "causal")
    with pytest.raises(ValueError, match=r"^r must be a positive integer"):
        LoraConfig(r=0, target_modules=["q_proj"])
    tok = AutoTokenizer.from_pretrained(_no_chat_template_model(model_dir, tmp_path))
    with pytest.raises(ValueError, match=r"^chat_template=True was given"):
        encode_prompt("hi", tok, chat_template=True)


def test_setting_error_spells_each_setting():
    from lorakit.hints import Setting, SettingError

    e = SettingError("a {brace} ", Setting("skip_bad_lines", True), ", ", Setting("format", "jsonl"), ", ",
                     Setting("chat_template", False), ", ", Setting("text_column"), ", ", Setting("lr", -1.0))
    assert str(e) == "a {brace} skip_bad_lines=True, format='jsonl', chat_template=False, text_column, lr=-1.0"
    flags = {"skip_bad_lines": "--skip-bad-lines", "format": "--format", "chat_template": "--chat-template",
             "text_column": "--text-column"}
    assert e.render(flags) == ("a {brace} --skip-bad-lines, --format jsonl, no --chat-template, --text-column, "
                               "lr=-1.0")  # lr has no flag here: the keyword stays


def test_command_flags_know_renamed_keywords():
    from lorakit.cli import command_flags

    flags = command_flags("train")
    assert (flags["warmup_steps"], flags["max_steps"], flags["r"], flags["lr"], flags["compile"]) == (
        "--warmup", "--steps", "--rank", "--lr", "--compile")
    assert command_flags("generate")["num_beams"] == "--beams"


# --- empty files -------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["train", "generate", "eval"])
@pytest.mark.parametrize("name", ["empty.jsonl", "empty.txt", "blank.csv"])
def test_an_empty_data_file_says_it_is_empty(command, name, model_dir, tmp_path, capsys):
    data = tmp_path / name
    data.write_text("" if name.startswith("empty") else "\n  \n")
    argv = [command, "--model", str(model_dir), "--data", str(data)]
    if command == "train":
        argv += ["--out", str(tmp_path / "run"), "--steps", "1", "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{data} is empty" in err and "cannot tell" not in err, err


def test_an_empty_file_is_empty_in_every_format(tmp_path):
    from lorakit.data import load_examples

    path = tmp_path / "e.jsonl"
    path.write_text("\n")
    for fmt in ("auto", "jsonl", "e2e", "classification"):
        with pytest.raises(ValueError, match="is empty"):
            load_examples(path, fmt)


# --- --lr -1 and friends: one message per bad value, naming the flag -------------------------

def test_bad_learning_rate_names_the_flag(model_dir, e2e_file, tmp_path, capsys):
    base = ["train", "--model", str(model_dir), "--data", str(e2e_file), "--out", str(tmp_path / "run"),
            "--steps", "1", "--device", "cpu"]
    assert main([*base, "--lr", "-1"]) == 2
    err = capsys.readouterr().err
    assert "--lr (the peak learning rate) must be > 0, got -1.0" in err, err
    assert "warmup" not in err and "weight" not in err, err
    assert main([*base, "--lr", "0", "--warmup", "-2", "--weight-decay", "-0.5"]) == 2
    sentences = capsys.readouterr().err.split("bad training settings:", 1)[1].strip().split("; ")
    assert sentences == ["--lr (the peak learning rate) must be > 0, got 0.0",
                         "--weight-decay must be >= 0, got -0.5",
                         "--warmup (steps of linear warmup) must be >= 0, got -2"], sentences
    assert not (tmp_path / "run").exists()


def test_train_config_names_keywords_for_python():
    from lorakit.train import TrainConfig

    with pytest.raises(ValueError) as e:
        TrainConfig(lr=-1, warmup_steps=-3)
    assert str(e.value) == ("bad training settings: lr (the peak learning rate) must be > 0, got -1; "
                            "warmup_steps (steps of linear warmup) must be >= 0, got -3")


# --- the prompt/completion boundary ----------------------------------------------------------

def test_generate_help_and_readme_state_the_boundary(monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")
    for command in ("generate", "eval"):
        text = _flat(_subparsers()[command].format_help())
        assert 'followed by a newline ("\\n")' in text and "the prompt text plus \"\\n\"" in text, command
    readme = _flat(README.read_text())
    assert '`prompt + "\\n"`' in readme and "prompted with the prompt text plus a newline" in readme


def test_the_documented_boundary_is_the_one_generate_uses(model_dir, tmp_path):
    """What the help promises, checked against transformers directly: generate continues prompt + "\\n"."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.data import Example, tokenize_example

    tok = AutoTokenizer.from_pretrained(model_dir)
    prompt = "name : Alimentum | area : city centre"
    ids = tok(prompt + "\n")["input_ids"]
    trained = tokenize_example(Example(prompt, "There is"), tok, 256)
    assert trained["input_ids"][:len(ids)] == ids and set(trained["labels"][:len(ids)]) == {-100}

    out = tmp_path / "gen.jsonl"
    assert main(["generate", "--model", str(model_dir), "--prompt", prompt, "--max-new-tokens", "6",
                 "--out", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        expected = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, len(ids):]
    expected = expected.tolist()
    expected = expected[:expected.index(tok.eos_token_id)] if tok.eos_token_id in expected else expected
    assert json.loads(out.read_text())["output"] == tok.decode(expected, skip_special_tokens=True).strip()


# --- progress and metric scales ---------------------------------------------------------------

def test_generate_and_eval_show_progress_over_batches(model_dir, e2e_file, tmp_path, capsys):
    assert main(["generate", "--model", str(model_dir), "--data", str(e2e_file), "--batch-size", "1",
                 "--max-new-tokens", "2", "--out", str(tmp_path / "g.jsonl")]) == 0
    n = len(E2E_LINES)  # generate: every line's prompt, one batch each
    err = capsys.readouterr().err
    assert "generate: 100%" in err and f"{n}/{n}" in err, err
    assert main(["eval", "--model", str(model_dir), "--data", str(e2e_file), "--batch-size", "1",
                 "--max-new-tokens", "2"]) == 0
    err = capsys.readouterr().err
    assert "generate: 100%" in err and "3/3" in err, err  # eval: the 3 unique prompts


def test_eval_json_states_each_metric_scale(model_dir, e2e_file, tmp_path):
    out = tmp_path / "scores.json"
    assert main(["eval", "--model", str(model_dir), "--data", str(e2e_file), "--max-new-tokens", "4",
                 "--out", str(out)]) == 0
    scores = json.loads(out.read_text())
    assert set(scores["scales"]) == {"bleu", "nist", "rouge_l", "cider"}
    assert scores["scales"]["bleu"].startswith("0-100") and scores["scales"]["rouge_l"].startswith("0-1 ")
    assert scores["scales"]["cider"].startswith("0-10")
    assert 0 <= scores["bleu"] <= 100 and 0 <= scores["rouge_l"] <= 1 and 0 <= scores["cider"] <= 10


def test_classification_eval_shows_progress_and_the_accuracy_scale(tmp_path, capsys):
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    rows = SST2_LINES[1:]
    words = sorted({w for line in rows for w in line.split("\t")[0].split()})
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tok = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    model_dir = tmp_path / "bert"
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=64)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = tmp_path / "dev.tsv"
    data.write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    out = tmp_path / "scores.json"
    assert main(["eval", "--task", "classification", "--model", str(model_dir), "--data", str(data),
                 "--batch-size", "1", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "eval: 100%" in err and f"{len(rows)}/{len(rows)}" in err, err
    assert json.loads(out.read_text())["scales"] == {"accuracy": "0-1 (fraction correct)"}


# --- the public model loader ------------------------------------------------------------------

def test_load_model_is_public_and_lazy(model_dir):
    assert "load_model" in lorakit.__all__
    code = "import sys, lorakit; assert 'transformers' not in sys.modules; lorakit.load_model; print('ok')"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "ok"
    model, tokenizer = lorakit.load_model(model_dir)
    assert model.config.num_hidden_layers == 2 and tokenizer.pad_token is not None
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    assert 0 < lorakit.trainable_parameters(model)[0]
    with pytest.raises(ValueError, match="task must be"):
        lorakit.load_model(model_dir, task="seq2seq")
    readme = README.read_text()
    assert 'lorakit.load_model("default")' in readme


@pytest.mark.slow
def test_load_model_default_is_the_embedded_smollm2(tmp_path):
    model, tokenizer = lorakit.load_model("default", cache_dir=tmp_path)
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.vocab_size) == (30, 576, 49152)
    assert tokenizer.pad_token is not None and tokenizer.chat_template


# --- lorakit analyze figures --------------------------------------------------------------------

@pytest.fixture(scope="module")
def twelve_layers(tmp_path_factory) -> Path:
    """Two adapters of a 12-layer model (so text order would put layer 10 before layer 2) and the model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import randomize_adapters

    def model():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32,
                                            num_hidden_layers=12, num_attention_heads=2, num_key_value_heads=1,
                                            max_position_embeddings=32)).eval()

    root = tmp_path_factory.mktemp("twelve")
    for name, r, seed in (("r2", 2, 1), ("r4", 4, 2)):
        m = lorakit.inject(model(), lorakit.LoraConfig(r=r, alpha=2 * r, target_modules=["q_proj", "v_proj"]))
        randomize_adapters(m, seed=seed)
        lorakit.save_adapter(m, root / name)
    model().save_pretrained(root / "model")
    make_tokenizer(bos=False).save_pretrained(root / "model")
    return root


def test_analyze_orders_layers_by_number(twelve_layers, tmp_path):
    from lorakit.analysis import read_adapter_deltas

    saved = list(read_adapter_deltas(twelve_layers / "r2").layers)
    assert saved.index("model.layers.10.self_attn.q_proj") < saved.index("model.layers.2.self_attn.q_proj")
    out = tmp_path / "report"
    assert main(["analyze", str(twelve_layers / "r2"), str(twelve_layers / "r4"), "--model",
                 str(twelve_layers / "model"), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [layer["name"] for layer in report["layers"]] == [
        f"model.layers.{i}.self_attn.{p}" for i in range(12) for p in ("q_proj", "v_proj")]
    md = (out / "report.md").read_text()
    positions = [md.index(f"model.layers.{i}.self_attn.q_proj") for i in range(12)]
    assert positions == sorted(positions)


def _figures(twelve_layers):
    from lorakit.analysis import analyze_adapters
    from lorakit.analysis import plots

    model = lorakit.load_model(twelve_layers / "model")[0]
    report = analyze_adapters([twelve_layers / "r2", twelve_layers / "r4"], model)
    group = [layer for layer in report["layers"] if layer["name"].endswith("q_proj")]
    labels = [a["label"] for a in report["adapters"]]
    return plots, report, group, labels


def test_analyze_figures_number_order_colour_bar_and_legends(twelve_layers):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    plots, report, group, labels = _figures(twelve_layers)
    subspace = plots._subspace_figure(group, "A", "q_proj", labels)
    titles = [ax.get_title() for ax in subspace.axes if ax.get_title()]
    assert titles == [f"layer {i}" for i in range(12)]

    spectrum = plots._spectra_figure(group, "q_proj", labels)
    bar = spectrum.axes[-1]
    assert bar.get_ylabel() == "layer"
    assert [float(v) for v in bar.get_ylim()] == [0.0, 11.0]  # the bar spans layer numbers 0..11

    figure = plots._amplification_figure(report["layers"], labels)
    FigureCanvasAgg(figure).draw()
    renderer = figure.canvas.get_renderer()
    for ax in figure.axes:
        legend = ax.get_legend()
        assert legend is not None
        # the legend lies right of the plotting area, so it cannot cover a bar or a line
        assert legend.get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1
    lower = figure.axes[-1]  # the lowest panel carries the layer names (one panel per adapter above it)
    ticks = lower.get_xticklabels()
    assert [t.get_text() for t in ticks][:4] == ["0.q_proj", "0.v_proj", "1.q_proj", "1.v_proj"]
    assert min(t.get_fontsize() for t in ticks) >= 8
    # neighbouring tick labels do not overlap
    boxes = [t.get_window_extent(renderer) for t in ticks]
    assert all(a.x1 <= b.x0 for a, b in zip(boxes, boxes[1:]))
