"""`lorakit generate --adapter NAME=PATH ...`: several adapters in one run, each prompt with its own
(a JSONL line's "adapter", null for the base model), against `generate` with one adapter at a time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import lorakit
from lorakit.cli import main

from conftest import randomize_adapters
from test_cli import model_dir  # noqa: F401 - the tiny local model, a fixture

PROMPTS = ["name[Alimentum], area[city centre]", "name[Aromi], eatType[coffee shop]", "name[Bibimbap House]"]


@pytest.fixture(scope="module")
def adapters(model_dir, tmp_path_factory) -> dict[str, Path]:  # noqa: F811
    """Two adapters of the tiny model with different ranks and targets, random non-zero factors."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("adapters")
    paths = {}
    for name, r, targets, seed in (("qv", 4, ["q_proj", "v_proj"], 1), ("mlp", 8, ["gate_proj", "down_proj"], 2)):
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        lorakit.inject(model, lorakit.LoraConfig(r=r, alpha=2 * r, target_modules=targets))
        randomize_adapters(model, seed=seed, std=0.5)
        paths[name] = root / name
        lorakit.save_adapter(model, paths[name])
    return paths


def one_adapter_outputs(model_dir, adapter, out: Path) -> list[str]:  # noqa: F811
    args = ["generate", "--model", str(model_dir), "--max-new-tokens", "8", "--out", str(out)]
    args += ["--adapter", str(adapter)] if adapter else []
    for p in PROMPTS:
        args += ["--prompt", p]
    assert main(args) == 0
    return [json.loads(line)["output"] for line in out.read_text().splitlines()]


def test_each_line_uses_the_adapter_it_names(model_dir, adapters, tmp_path):  # noqa: F811
    alone = {name: one_adapter_outputs(model_dir, adapters.get(name), tmp_path / f"{name}.jsonl")
             for name in ("qv", "mlp", None)}
    assert alone["qv"] != alone[None] and alone["mlp"] != alone[None]  # each adapter changes something
    lines = [{"prompt": PROMPTS[0], "adapter": "mlp"}, {"prompt": PROMPTS[1], "adapter": None},
             {"prompt": PROMPTS[2]}, {"prompt": PROMPTS[0], "adapter": "qv"}, {"prompt": PROMPTS[1], "adapter": "mlp"}]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "mixed.jsonl"
    assert main(["generate", "--model", str(model_dir), "--adapter", f"qv={adapters['qv']}",
                 "--adapter", f"mlp={adapters['mlp']}", "--data", str(data), "--max-new-tokens", "8",
                 "--out", str(out)]) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["adapter"] for g in got] == ["mlp", None, "qv", "qv", "mlp"]  # no field: the first --adapter
    want = [alone["mlp"][0], alone[None][1], alone["qv"][2], alone["qv"][0], alone["mlp"][1]]
    assert [g["output"] for g in got] == want


def test_prompts_print_with_their_adapter(model_dir, adapters, capsys):  # noqa: F811
    assert main(["generate", "--model", str(model_dir), "--adapter", f"a={adapters['qv']}",
                 "--adapter", f"b={adapters['mlp']}", "--prompt", PROMPTS[0], "--max-new-tokens", "4"]) == 0
    assert f">>> [a] {PROMPTS[0]}" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["unknown name", "not an adapter field", "unnamed among several",
                                  "name twice", "beams", "no named adapters"])
def test_mistakes_are_refused_with_the_flag_or_the_line(case, model_dir, adapters, tmp_path, capsys):  # noqa: F811
    data = tmp_path / "prompts.jsonl"
    lines = [{"prompt": PROMPTS[0]}, {"prompt": PROMPTS[1], "adapter": "sql"}]
    if case == "not an adapter field":
        lines[1]["adapter"] = 3
    if case == "beams":
        lines[1]["adapter"] = "qv"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    named = ["--adapter", f"qv={adapters['qv']}", "--adapter", f"mlp={adapters['mlp']}"]
    extra = {"unknown name": named, "not an adapter field": named,
             "unnamed among several": ["--adapter", str(adapters["qv"]), "--adapter", f"mlp={adapters['mlp']}"],
             "name twice": ["--adapter", f"x={adapters['qv']}", "--adapter", f"x={adapters['mlp']}"],
             "beams": named + ["--beams", "3"], "no named adapters": ["--adapter", str(adapters["qv"])]}[case]
    out = tmp_path / "out.jsonl"
    rc = main(["generate", "--model", str(model_dir), "--data", str(data), "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    expected = {"unknown name": "line 2: names adapter 'sql', which no --adapter gives",
                "not an adapter field": "line 2",
                "unnamed among several": "give each as NAME=PATH",
                "name twice": "the name 'x' is given twice",
                "beams": "--beams 3: these need a single --adapter PATH",
                "no named adapters": "line 2: names adapter 'sql', but no named adapter is given"}[case]
    assert expected in err, err


def test_prompt_only_jsonl_lines_generate(model_dir, tmp_path):  # noqa: F811
    """A generation file needs no completions: {"prompt": ...} lines are enough."""
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--model", str(model_dir), "--data", str(data), "--max-new-tokens", "4",
                 "--out", str(out)]) == 0
    assert [json.loads(line)["prompt"] for line in out.read_text().splitlines()] == PROMPTS


def test_the_engine_holds_what_the_longest_request_needs(model_dir, adapters, tmp_path, monkeypatch):  # noqa: F811
    """Not the engine's default 1024 positions: --max-new-tokens up to the model's positions works."""
    from lorakit.data import encode_prompt
    from lorakit.serving import Engine
    from transformers import AutoTokenizer

    sizes = []
    init = Engine.__init__

    def recording(self, *args, **kwargs):
        sizes.append(kwargs.get("max_seq_len"))
        init(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "__init__", recording)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    longest = max(len(encode_prompt(p, tokenizer)) for p in PROMPTS[:2])
    assert main(["generate", "--model", str(model_dir), "--adapter", f"qv={adapters['qv']}", "--adapter",
                 f"mlp={adapters['mlp']}", "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--max-new-tokens", "3",
                 "--out", str(tmp_path / "out.jsonl")]) == 0
    assert sizes == [longest + 3 - 1]


@pytest.mark.parametrize("several", [True, False], ids=["several adapters", "one adapter"])
def test_a_request_past_the_models_positions_names_its_line_and_the_flag(model_dir, adapters, tmp_path, capsys,
                                                                         several):  # noqa: F811
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": PROMPTS[0]}) + "\n" + json.dumps({"prompt": PROMPTS[1] * 4}) + "\n")
    adapter = ["--adapter", f"qv={adapters['qv']}", "--adapter", f"mlp={adapters['mlp']}"] if several else \
        ["--adapter", str(adapters["qv"])]
    # the tiny model has 256 positions
    assert main(["generate", "--model", str(model_dir), *adapter, "--data", str(data), "--max-new-tokens", "200"]) == 2
    err = capsys.readouterr().err
    assert f"{data}, line 2: the prompt has" in err and "--max-new-tokens 200" in err and "over the model's 256" in err
    assert "max_new_tokens" not in err and "max_seq_len" not in err and "prompt 1" not in err
