"""What a new user of `lorakit analyze` meets: reports that stay true when re-run into one folder,
labels and figures that say what they show, and numbers that are not noise presented as findings."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import lorakit
from lorakit.analysis import analyze_adapters, write_report
from lorakit.analysis.plots import _amplification_figure, _spectra_figure
from lorakit.cli import main

from conftest import randomize_adapters, tiny_llama

TARGETS = ["q_proj", "v_proj"]


def _save(path: Path, r: int, seed: int | None, std: float = 0.1, dora: bool = False) -> Path:
    """An adapter of the tiny Llama; ``seed`` None keeps B = 0 (an untrained adapter)."""
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=r, alpha=2 * r, target_modules=TARGETS, use_dora=dora))
    if seed is not None:
        randomize_adapters(model, seed=seed, std=std)
    lorakit.save_adapter(model, path)
    return path


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {"small": _save(root / "small" / "adapter", 4, seed=1, std=0.01),
            "large": _save(root / "large" / "adapter", 8, seed=2, std=1.0),
            "untrained": _save(root / "untrained", 4, seed=None),
            "dora": _save(root / "dora", 4, seed=3, dora=True)}


def test_rerun_into_one_folder_removes_the_earlier_reports_figures(adapters, tmp_path):
    out = tmp_path / "report"
    assert main(["analyze", str(adapters["small"]), str(adapters["large"]), "--out", str(out)]) == 0
    assert any(p.name.startswith("subspace_") for p in out.iterdir())
    (out / "notes.png").write_text("the user's own file")  # not listed by a report: never touched
    assert main(["analyze", str(adapters["small"]), "--out", str(out)]) == 0
    listed = set(json.loads((out / "report.json").read_text())["figures"])
    pngs = {p.name for p in out.glob("*.png")}
    assert pngs == listed | {"notes.png"}, "figures of the earlier two-adapter report are still there"


def test_the_same_adapter_twice_is_labelled_by_its_name_numbered(adapters):
    report = analyze_adapters([adapters["untrained"], adapters["untrained"]])
    assert [a["label"] for a in report["adapters"]] == ["1: untrained", "2: untrained"]


def test_phi_of_a_zero_factor_is_undefined_not_a_number(adapters, tmp_path):
    """B = 0 has no singular directions: φ of B against anything is arbitrary, so the report says n/a."""
    report = analyze_adapters([adapters["untrained"], adapters["small"]])
    for layer in report["layers"]:
        sub = layer["subspace"]
        assert all(math.isnan(v) for row in sub["B"] for v in row), layer["name"]
        assert math.isnan(sub["B_top1"]) and math.isnan(sub["B_full"])
        assert all(0.0 <= v <= 1.0 for row in sub["A"] for v in row)  # A starts random: defined
    written = write_report(report, tmp_path)
    saved = json.loads(written["json"].read_text())
    assert saved["layers"][0]["subspace"]["B"][0][0] is None
    md = written["markdown"].read_text()
    subspace = md.split("## Subspace similarity")[1]
    row = next(line for line in subspace.splitlines() if line.startswith("| `model.layers.0.self_attn.q_proj` |"))
    assert row.count("n/a") == 2, row  # φ_B(1,1) and φ_B(k,k)


def test_a_dora_adapter_is_called_dora_in_the_report(adapters, tmp_path):
    written = write_report(analyze_adapters([adapters["dora"]]), tmp_path)
    md = written["markdown"].read_text()
    assert "DoRA adapter" in md and "lora_magnitude_vector" in md
    assert json.loads(written["json"].read_text())["adapters"][0]["use_dora"] is True


def test_spectra_of_two_adapters_share_one_y_scale(adapters):
    """σ of 0.01-sized and 1-sized adapters side by side: equal axes, or the panels look alike."""
    report = analyze_adapters([adapters["small"], adapters["large"]])
    layers = [layer for layer in report["layers"] if layer["name"].endswith("q_proj")]
    fig = _spectra_figure(layers, layers[0]["group"], [a["label"] for a in report["adapters"]])
    first, second = fig.axes[0], fig.axes[1]
    assert first.get_ylim() == second.get_ylim()


def test_an_untrained_adapter_has_a_spectrum_panel_that_says_why_it_is_empty(adapters):
    report = analyze_adapters([adapters["untrained"], adapters["small"]])
    layers = report["layers"][:1]
    fig = _spectra_figure(layers, layers[0]["group"], [a["label"] for a in report["adapters"]])
    assert any("ΔW = 0" in t.get_text() for t in fig.axes[0].texts)


def test_amplification_figure_shows_each_adapters_own_projections(adapters):
    model = tiny_llama()
    report = analyze_adapters([adapters["small"], adapters["large"]], model)
    labels = [a["label"] for a in report["adapters"]]
    fig = _amplification_figure(report["layers"], labels)
    titles = [ax.get_title() for ax in fig.axes]
    assert len(fig.axes) == 3 and all(any(label in t for t in titles[1:]) for label in labels), titles
    # the U, V of ΔW line of each lower panel is that adapter's projected_norm
    for k, ax in enumerate(fig.axes[1:]):
        got = list(ax.get_lines()[0].get_ydata())
        assert got == pytest.approx([layer["adapters"][k]["amplification"]["projected_norm"]
                                     for layer in report["layers"]])


# --- lorakit demo ----------------------------------------------------------------------------

def test_demo_shows_each_answer_on_one_line(monkeypatch, capsys, tmp_path):
    """An answer with newlines (an untrained or barely trained model writes them) must not break
    the before/after layout: `after:` is flattened like `before:`."""
    import lorakit.demo as demo

    monkeypatch.setattr(demo, "load_causal_lm", lambda spec: (None, None))
    monkeypatch.setattr(demo, "finetune", lambda *a, **k: (None, None, None))
    monkeypatch.setattr(demo, "_answers", lambda model, tok, prompts: ["line one\nline two"] * len(prompts))
    demo.run_demo(out_dir=str(tmp_path / "demo"), steps=1)
    out = capsys.readouterr().out
    for which in ("before:", "after:"):
        shown = [line for line in out.splitlines() if line.strip().startswith(which)]
        assert shown and all(line.endswith("line one line two") for line in shown), (which, shown)
    assert "held-out records first" in out.split("--- held-out example 1")[0]


def test_run_demo_defaults_are_the_commands():
    """`lorakit.demo.run_demo()` in Python is what `lorakit demo` (and `make demo`) runs."""
    import inspect

    from lorakit.cli import build_parser
    from lorakit.demo import run_demo

    demo = build_parser()._subparsers._group_actions[0].choices["demo"]
    defaults = {a.dest: a.default for a in demo._actions if a.dest != "help"}
    params = inspect.signature(run_demo).parameters
    assert {"out_dir": params["out_dir"].default, "steps": params["steps"].default,
            "device": params["device"].default} == {"out_dir": defaults["out"], "steps": defaults["steps"],
                                                    "device": defaults["device"]}


def test_a_loss_curve_of_one_step_is_visible_and_its_steps_are_whole():
    from lorakit.train.plot import loss_figure

    fig = loss_figure([{"step": 1, "loss": 3.2}, {"step": 2, "eval_loss": 3.0}])
    ax = fig.axes[0]
    train = next(line for line in ax.get_lines() if line.get_label() == "train loss")
    assert train.get_marker() not in (None, "None", "")  # one point: only its marker shows
    fig.canvas.draw()
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
    assert loss_figure([{"step": 1, "lr": 0.1}]) is None
