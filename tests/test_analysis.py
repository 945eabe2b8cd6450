"""lorakit.analysis: φ against a float64 brute force and constructed cases, amplification on a W
and ΔW with known answers, ΔW read from disk against the layers' own delta_weight, and
`lorakit analyze` end to end on tiny adapters."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

import lorakit
from lorakit.analysis import (AnalysisError, amplification, base_weights, chance_similarity,
                              column_subspace_similarity, effective_rank, read_adapter_deltas, stable_rank,
                              subspace_similarity, write_report)
from lorakit.cli import main

from conftest import randomize_adapters, tiny_gpt2, tiny_llama


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _orthonormal(n, k, seed=0):
    return torch.linalg.qr(_randn(n, k, seed=seed)).Q


# --- subspace similarity ------------------------------------------------------------------------

def _phi_brute_force(X1, X2, left=False):
    """φ(i, j) from a fresh SVD per (i, j), straight from the definition (U_i as columns)."""
    def top(X, i):
        X = X.to(torch.float64)
        if left:
            U = torch.linalg.svd(X, full_matrices=False).U
            return U[:, :min(i, U.shape[1])]
        Vh = torch.linalg.svd(X, full_matrices=False).Vh
        return Vh[:min(i, Vh.shape[0])].t()
    r1, r2 = (X1.shape[1], X2.shape[1]) if left else (X1.shape[0], X2.shape[0])
    phi = torch.empty(r1, r2, dtype=torch.float64)
    for i in range(1, r1 + 1):
        for j in range(1, r2 + 1):
            Ui, Uj = top(X1, i), top(X2, j)
            phi[i - 1, j - 1] = torch.linalg.matrix_norm(Ui.t() @ Uj) ** 2 / min(Ui.shape[1], Uj.shape[1])
    return phi


@pytest.mark.parametrize("r1,r2,d", [(4, 6, 16), (8, 3, 20), (5, 5, 5), (7, 3, 4)],
                         ids=["r1<r2", "r1>r2", "r=d", "r>d"])
def test_phi_matches_brute_force(r1, r2, d):
    A1, A2 = _randn(r1, d, seed=1).float(), _randn(r2, d, seed=2).float()
    phi = subspace_similarity(A1, A2)
    assert phi.shape == (r1, r2) and phi.dtype == torch.float64
    torch.testing.assert_close(phi, _phi_brute_force(A1, A2), rtol=0, atol=1e-12)
    B1, B2 = A1.t().contiguous(), A2.t().contiguous()  # (d, r)
    torch.testing.assert_close(column_subspace_similarity(B1, B2), _phi_brute_force(B1, B2, left=True),
                               rtol=0, atol=1e-12)


def test_phi_is_symmetric_and_within_unit_interval():
    A1, A2 = _randn(6, 24, seed=3), _randn(9, 24, seed=4)
    phi = subspace_similarity(A1, A2)
    torch.testing.assert_close(subspace_similarity(A2, A1), phi.t(), rtol=0, atol=1e-12)
    assert phi.min() >= 0 and phi.max() <= 1
    B1, B2 = _randn(24, 6, seed=5), _randn(24, 9, seed=6)
    torch.testing.assert_close(column_subspace_similarity(B2, B1), column_subspace_similarity(B1, B2).t(),
                               rtol=0, atol=1e-12)


def _case(name):
    d, r = 20, 5
    A = _randn(r, d, seed=7)
    Q = _orthonormal(d, 2 * r + 3, seed=8).t()  # orthonormal rows
    M = _randn(r, r, seed=9) + 3 * torch.eye(r, dtype=torch.float64)  # invertible
    return {
        "identical": (A, A.clone()),
        "orthogonal": (Q[:r], Q[r:2 * r + 3]),
        "invertible_mix": (A, M @ A),
        "nested": (A, torch.cat([A, _randn(3, d, seed=10)])),
    }[name]


@pytest.mark.parametrize("name,check", [
    ("identical", lambda phi: torch.allclose(phi, torch.ones_like(phi), atol=1e-10)),
    ("orthogonal", lambda phi: phi.abs().max() < 1e-12),
    ("invertible_mix", lambda phi: abs(phi[-1, -1] - 1) < 1e-10),
    ("nested", lambda phi: abs(phi[4, -1] - 1) < 1e-10),  # all of A1 lies inside A2's row space
])
def test_phi_constructed_cases(name, check):
    A1, A2 = _case(name)
    assert check(subspace_similarity(A1, A2))
    assert check(column_subspace_similarity(A1.t(), A2.t()))


def test_phi_refuses_factors_of_different_layers():
    with pytest.raises(ValueError, match="share d"):
        subspace_similarity(torch.randn(4, 16), torch.randn(4, 17))
    with pytest.raises(ValueError, match="2-D"):
        subspace_similarity(torch.randn(4, 16, 1), torch.randn(4, 16))


def test_chance_level_is_max_over_d():
    assert chance_similarity(2, 3, 10).tolist() == [[0.1, 0.2, 0.3], [0.2, 0.2, 0.3]]


# --- spectrum and amplification ---------------------------------------------------------------

def test_ranks():
    assert effective_rank(torch.tensor([2.0, 2.0, 2.0, 0.0])) == pytest.approx(3.0)
    assert effective_rank(torch.tensor([5.0, 0.0])) == pytest.approx(1.0)
    assert effective_rank(torch.zeros(3)) == 0.0
    assert stable_rank(torch.tensor([2.0, 1.0])) == pytest.approx(1.25)


@pytest.fixture
def svd_w():
    """W (12, 10) = U·diag(σ)·Vᵀ with known, distinct σ."""
    U, V = _orthonormal(12, 10, seed=11), _orthonormal(10, 10, seed=12)
    sigma = torch.tensor([10.0, 8, 6, 5, 4, 3, 2, 1, 0.5, 0.25], dtype=torch.float64)
    return U @ torch.diag(sigma) @ V.t(), U, V, sigma


def test_amplification_inside_w_top_directions(svd_w):
    W, U, V, sigma = svd_w
    delta = U[:, :2] @ torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64)) @ V[:, :2].t()
    out = amplification(W, delta)
    top2 = math.hypot(10, 8)
    assert out["r"] == 2
    assert out["projected_norm"] == pytest.approx(top2)
    assert out["w_projected_norm"] == pytest.approx(top2)
    assert out["amplification"] == pytest.approx(math.sqrt(10) / top2)
    assert out["w_norm"] == pytest.approx(sigma.norm().item())
    assert 0 < out["random_projected_norm"] <= out["w_projected_norm"]  # Ky Fan: top-r is the maximum


def test_amplification_of_directions_w_does_not_emphasise(svd_w):
    W, U, V, sigma = svd_w
    delta = 2.0 * U[:, 8:10] @ V[:, 8:10].t()
    out = amplification(W, delta)
    assert out["projected_norm"] == pytest.approx(math.hypot(0.5, 0.25))
    assert out["amplification"] == pytest.approx(math.sqrt(8) / math.hypot(0.5, 0.25))
    assert out["w_projected_norm"] == pytest.approx(math.hypot(10, 8))
    # left and right directions that W does not connect: nothing of W there (up to rounding)
    assert amplification(W, U[:, :1] @ V[:, 1:2].t())["projected_norm"] < 1e-12
    zero = amplification(W, torch.zeros_like(W))
    assert zero["r"] == 0 and math.isnan(zero["amplification"])


def test_amplification_random_directions_are_seeded(svd_w):
    W, U, V, _ = svd_w
    delta = U[:, :3] @ V[:, 3:6].t()
    a, b, c = (amplification(W, delta, seed=s)["random_projected_norm"] for s in (0, 0, 1))
    assert a == b != c
    assert amplification(W, delta, r=1)["r"] == 1
    with pytest.raises(ValueError, match="same shape"):
        amplification(W, delta.t())


# --- reading adapters ----------------------------------------------------------------------------

def _saved_adapter(path, model, cfg, seed=1):
    lorakit.inject(model, cfg)
    randomize_adapters(model, seed=seed)
    lorakit.save_adapter(model, path)
    return model


ADAPTER_CASES = {
    "llama-patterns": (tiny_llama, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"],
                                                       rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3.0})),
    "llama-rslora": (tiny_llama, lorakit.LoraConfig(r=8, alpha=4, target_modules="all-linear", use_rslora=True)),
    "gpt2-fused": (tiny_gpt2, lorakit.LoraConfig(r=2, alpha=4, target_modules=["c_attn", "c_proj"],
                                                 fused_projections={"c_attn": [True, False, True]})),
}


@pytest.mark.parametrize("case", ADAPTER_CASES)
def test_deltas_from_disk_match_the_layers(tmp_path, case):
    make_model, cfg = ADAPTER_CASES[case]
    model = _saved_adapter(tmp_path / "a", make_model(), cfg)
    deltas = read_adapter_deltas(tmp_path / "a")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, lorakit.LoraLayer)}
    assert set(deltas.layers) == set(layers)
    for name, layer in layers.items():
        delta = deltas.layers[name]
        expected = layer.delta_weight("default").double()
        if getattr(layer, "fan_in_fan_out", False) or delta.kind == "embedding":
            expected = expected.t()  # the base weight's layout -> ΔW's (d_out, d_in)
        torch.testing.assert_close(delta.dense(), expected, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(delta.svd()[1], torch.linalg.svdvals(delta.dense())[:delta.A.shape[0]],
                                   rtol=1e-9, atol=1e-12)
    # the base weights come out in ΔW's layout: merging adds exactly ΔW to them
    before, _ = base_weights(model, list(deltas.layers.values()))
    lorakit.merge(model)
    after, _ = base_weights(model, list(deltas.layers.values()))
    for name, delta in deltas.layers.items():
        torch.testing.assert_close(after[name] - before[name], delta.dense(), rtol=1e-5, atol=1e-6)


# --- lorakit analyze ---------------------------------------------------------------------------

def _llama(hidden=32, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=hidden, intermediate_size=64,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=64)).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from test_data import make_tokenizer

    root = tmp_path_factory.mktemp("analysis")
    _saved_adapter(root / "r4", _llama(), lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), 1)
    _saved_adapter(root / "r8", _llama(), lorakit.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj",
                                                                                          "k_proj"]), 2)
    _saved_adapter(root / "wide", _llama(hidden=48), lorakit.LoraConfig(r=4, target_modules=["q_proj"]), 3)
    _saved_adapter(root / "mlp", _llama(), lorakit.LoraConfig(r=4, target_modules=["up_proj"]), 4)
    tok = make_tokenizer(bos=False)
    for name, n_layers in (("model", 2), ("shallow", 1)):
        _llama(layers=n_layers).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


def test_analyze_two_adapters_with_model(files, tmp_path, capsys):
    pyplot_before = "matplotlib.pyplot" in sys.modules
    out = tmp_path / "report"
    assert main(["analyze", str(files / "r4"), str(files / "r8"), "--model", str(files / "model"),
                 "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    names = [layer["name"] for layer in report["layers"]]
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert set(report["skipped"]) == {f"model.layers.{i}.self_attn.k_proj" for i in range(2)}
    assert all("only in" in why for why in report["skipped"].values())

    a1, a2 = read_adapter_deltas(files / "r4"), read_adapter_deltas(files / "r8")
    model = _llama()
    layer = report["layers"][1]
    d1, d2 = a1.layers[layer["name"]], a2.layers[layer["name"]]
    assert torch.allclose(torch.tensor(layer["subspace"]["A"], dtype=torch.float64),
                          subspace_similarity(d1.A, d2.A), atol=1e-6)
    assert len(layer["subspace"]["B"]) == 4 and len(layer["subspace"]["B"][0]) == 8
    W = model.get_submodule(layer["name"]).weight
    expected = amplification(W, d2.dense())
    for key in ("w_norm", "delta_norm", "projected_norm", "amplification", "w_projected_norm",
                "random_projected_norm"):
        assert layer["adapters"][1]["amplification"][key] == pytest.approx(expected[key], rel=1e-9), key
    assert layer["adapters"][1]["amplification"]["r"] == 8
    assert layer["adapters"][0]["delta_norm"] == pytest.approx(torch.linalg.matrix_norm(d1.dense()).item())

    assert {f.split("_")[0] for f in report["figures"]} == {"subspace", "spectrum", "amplification.png"}
    for name in report["figures"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    md = (out / "report.md").read_text()
    assert "Skipped layers" in md and "Table 7" in md and "k_proj" in md
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temp files left behind"
    assert pyplot_before or "matplotlib.pyplot" not in sys.modules
    assert "analysed 4 layer(s)" in capsys.readouterr().out


def test_analyze_one_adapter_explains_layers_missing_from_the_model(files, tmp_path):
    out = tmp_path / "one"
    assert main(["analyze", str(files / "r8"), "--model", str(files / "shallow"), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert len(report["layers"]) == 6 and not report["skipped"]
    assert set(report["amplification_skipped"]) == {f"model.layers.1.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")}
    assert all("no module named" in why for why in report["amplification_skipped"].values())
    layer0 = report["layers"][0]["adapters"][0]
    assert "amplification" in layer0 and 0 < layer0["effective_rank"] <= 8 and len(layer0["singular_values"]) == 8
    assert not any(f.startswith("subspace") for f in report["figures"])
    assert all((out / f).stat().st_size > 0 for f in report["figures"])


@pytest.mark.parametrize("other,message", [
    ("wide", ["model.layers.0.self_attn.q_proj", "(32, 32)", "(48, 48)", "different base models"]),
    ("mlp", ["no layer in common"]),
    ("missing", ["no such adapter directory"]),
])
def test_analyze_refuses_adapters_it_cannot_compare(files, tmp_path, capsys, other, message):
    out = tmp_path / "bad"
    assert main(["analyze", str(files / "r4"), str(files / other), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorakit analyze: error:") and all(m in err for m in message), err
    assert not (out / "report.json").exists()


def test_a_failed_write_keeps_the_previous_report_whole(files, tmp_path):
    from lorakit.analysis import analyze_adapters

    report = analyze_adapters([files / "r4"])
    write_report(report, tmp_path)
    good = (tmp_path / "report.json").read_text()
    with pytest.raises(TypeError):
        write_report({**report, "unserialisable": object()}, tmp_path)
    assert (tmp_path / "report.json").read_text() == good
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_library_errors_name_the_layer(files, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    deltas = read_adapter_deltas(files / "r4")
    with pytest.raises(AnalysisError, match=r"self_attn.q_proj: the model's weight is \(48, 48\).*\(32, 32\)"):
        base_weights(_llama(hidden=48), list(deltas.layers.values()))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((files / "r4" / "adapter_config.json").read_text())
    with safe_open(str(files / "r4" / "adapter_model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"}
        save_file(tensors, str(broken / "adapter_model.safetensors"), metadata=f.metadata())
    with pytest.raises(AnalysisError, match="layers.1.self_attn.v_proj has lora_A but no lora_B"):
        read_adapter_deltas(broken)
