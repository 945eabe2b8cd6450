"""lorakit.combine and `lorakit combine` against PEFT's add_weighted_adapter (issue 16), on tiny Llama
models built from configs: every method, the same DARE masks for the same seed, exact `cat` in
float64, PEFT loading the saved result, and errors that leave the model as it was."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.cli import main
from lorakit.combine import CombineError
from lorakit.io import CONFIG_NAME, WEIGHTS_NAME

from conftest import randomize_adapters, tiny_llama
from test_cli import model_dir  # noqa: F401 - a tiny local Llama with a tokenizer

peft = pytest.importorskip("peft")

QV = ["q_proj", "v_proj"]


def _adapted(configs: dict[str, lorakit.LoraConfig], seed: int = 1, dtype=torch.float32):
    """A tiny Llama with the named adapters, each with random A and B (B = 0 would hide errors)."""
    model = tiny_llama()
    for name, config in configs.items():
        lorakit.inject(model, config, name, dtype=dtype)
    randomize_adapters(model, seed=seed, std=0.3)
    return model


def _peft_twin(model, tmp_path: Path, names: list[str]):
    """The same base with the same adapters, loaded by PEFT from lorakit's files."""
    base = tiny_llama()
    for name in names:
        lorakit.save_adapter(model, tmp_path / name, name)
    twin = peft.PeftModel.from_pretrained(base, tmp_path / names[0], adapter_name=names[0])
    for name in names[1:]:
        twin.load_adapter(tmp_path / name, adapter_name=name)
    return twin.eval()


def _lorakit_deltas(model, name: str) -> dict[str, torch.Tensor]:
    return {n: m.delta_weight(name).detach() for n, m in model.named_modules()
            if isinstance(m, lorakit.LoraLayer) and name in m.lora_A}


def _peft_deltas(twin, name: str) -> dict[str, torch.Tensor]:
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    out = {}
    for n, m in twin.base_model.model.named_modules():
        if isinstance(m, PeftLoraLayer) and name in m.lora_A:
            out[n] = m.get_delta_weight(name).detach()
    return out


def _peft_factors(twin, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    return {n: (m.lora_A[name].weight.detach(), m.lora_B[name].weight.detach())
            for n, m in twin.base_model.model.named_modules() if isinstance(m, PeftLoraLayer) and name in m.lora_A}


def _assert_close(ours: dict, theirs: dict, rtol: float = 1e-4) -> None:
    assert ours.keys() == theirs.keys()
    for key in ours:
        a, b = ours[key].double(), theirs[key].double()
        assert a.shape == b.shape, key
        scale = b.abs().max().clamp(min=1e-12)
        assert (a - b).abs().max() <= rtol * scale, f"{key}: max |Δ| {(a - b).abs().max():.3g}, scale {scale:.3g}"


# (method, extra keyword arguments); PEFT's names: svd_rank for rank, combination_type for method
METHODS = [("cat", {}), ("svd", {"rank": 3}), ("linear", {}), ("ties", {"density": 0.5}),
           ("dare_linear", {"density": 0.6, "seed": 7}), ("dare_ties", {"density": 0.4, "seed": 3}),
           ("magnitude_prune", {"density": 0.3})]

TARGETS = {  # adapter a, adapter b
    "same targets": (QV, QV),
    "different targets": (QV, ["q_proj", "k_proj"]),
}


def _peft_combine(twin, names, weights, new, method, kwargs):
    peft_kwargs = {"combination_type": method}
    if "rank" in kwargs:
        peft_kwargs["svd_rank"] = kwargs["rank"]
    if "density" in kwargs:
        peft_kwargs["density"] = kwargs["density"]
    if "seed" in kwargs:
        torch.manual_seed(kwargs["seed"])
    twin.add_weighted_adapter(names, weights, new, **peft_kwargs)


@pytest.mark.parametrize("targets", list(TARGETS), ids=list(TARGETS))
@pytest.mark.parametrize("method,kwargs", METHODS, ids=[m for m, _ in METHODS])
def test_every_method_gives_what_peft_gives(method, kwargs, targets, tmp_path):
    a, b = TARGETS[targets]
    model = _adapted({"a": lorakit.LoraConfig(r=4, alpha=8, target_modules=a),
                      "b": lorakit.LoraConfig(r=4, alpha=16, target_modules=b)})
    twin = _peft_twin(model, tmp_path, ["a", "b"])
    weights = [0.7, -0.4]
    lorakit.combine(model, ["a", "b"], weights, "ab", method=method, **kwargs)
    _peft_combine(twin, ["a", "b"], weights, "ab", method, kwargs)
    _assert_close(_lorakit_deltas(model, "ab"), _peft_deltas(twin, "ab"))
    if method != "svd":  # an SVD's factors are unique only up to signs; ΔW is compared above
        ours = {n: (m.lora_A["ab"].detach(), m.lora_B["ab"].detach()) for n, m in model.named_modules()
                if isinstance(m, lorakit.LoraLayer) and "ab" in m.lora_A}
        theirs = _peft_factors(twin, "ab")
        _assert_close({k: v[0] for k, v in ours.items()}, {k: v[0] for k, v in theirs.items()})
        _assert_close({k: v[1] for k, v in ours.items()}, {k: v[1] for k, v in theirs.items()})


@pytest.mark.parametrize("method,kwargs", [("cat", {}), ("svd", {"rank": 5})], ids=["cat", "svd"])
def test_adapters_of_different_ranks_combine_as_in_peft(method, kwargs, tmp_path):
    model = _adapted({"a": lorakit.LoraConfig(r=4, alpha=8, target_modules=QV),
                      "b": lorakit.LoraConfig(r=2, alpha=4, target_modules=QV)})
    twin = _peft_twin(model, tmp_path, ["a", "b"])
    lorakit.combine(model, ["a", "b"], [0.5, 1.5], "ab", method=method, **kwargs)
    _peft_combine(twin, ["a", "b"], [0.5, 1.5], "ab", method, kwargs)
    _assert_close(_lorakit_deltas(model, "ab"), _peft_deltas(twin, "ab"))
    expected_rank = 6 if method == "cat" else 5
    assert {m.rank["ab"] for m in model.modules() if isinstance(m, lorakit.LoraLayer)} == {expected_rank}


def test_factorwise_methods_keep_per_layer_ranks(tmp_path, tokens):
    """rank_pattern adapters: each layer keeps its rank (PEFT would give every layer the largest)."""
    config = lorakit.LoraConfig(r=4, alpha=8, target_modules=QV, rank_pattern={"v_proj": 2},
                                alpha_pattern={"v_proj": 2})
    model = _adapted({"a": config, "b": config})
    lorakit.combine(model, ["a", "b"], [0.6, 0.4], "ab", method="linear")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, lorakit.LoraLayer)}
    assert {n.rsplit(".", 1)[1]: m.rank["ab"] for n, m in layers.items()} == {"q_proj": 4, "v_proj": 2}
    assert {m.scaling["ab"] for m in layers.values()} == {1.0}
    for m in layers.values():  # linear, by its definition: Σ ±√|wᵢsᵢ|Aᵢ and Σ √|wᵢsᵢ|Bᵢ
        c = [0.6 * m.scaling["a"], 0.4 * m.scaling["b"]]
        expected_A = c[0] ** 0.5 * m.lora_A["a"] + c[1] ** 0.5 * m.lora_A["b"]
        torch.testing.assert_close(m.lora_A["ab"], expected_A)
    lorakit.use(model, "ab")
    with torch.no_grad():
        ours = model(tokens).logits
    lorakit.save_adapter(model, tmp_path, "ab")
    reference = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    with torch.no_grad():
        assert (reference(tokens).logits - ours).abs().max() <= 1e-5


def test_cat_is_exactly_the_weighted_sum_of_delta_weights_in_float64():
    configs = {"a": lorakit.LoraConfig(r=4, alpha=8, target_modules=QV),
               "b": lorakit.LoraConfig(r=3, alpha=5, target_modules=["q_proj", "k_proj"], use_rslora=True),
               "c": lorakit.LoraConfig(r=2, alpha=2, target_modules=["v_proj"])}
    model = _adapted(configs, dtype=torch.float64)
    weights = {"a": 0.7, "b": -0.3, "c": 2.0}
    before = {name: _lorakit_deltas(model, name) for name in weights}
    lorakit.combine(model, list(weights), list(weights.values()), "abc", method="cat")
    combined = _lorakit_deltas(model, "abc")
    assert set(combined) == set().union(*before.values())
    for module_name, delta in combined.items():
        assert delta.dtype == torch.float64
        expected = sum(w * before[a][module_name] for a, w in weights.items() if module_name in before[a])
        torch.testing.assert_close(delta, expected, rtol=1e-12, atol=1e-12)
    assert {m.rank["abc"] for m in model.modules() if isinstance(m, lorakit.LoraLayer)} == {4 + 3 + 2}


def test_cat_may_sum_to_a_rank_above_what_delta_w_can_use():
    """v_proj is (16, 32): two r=12 adapters cat to r=24, which a new adapter would be refused."""
    configs = {name: lorakit.LoraConfig(r=12, alpha=12, target_modules=["v_proj"]) for name in ("a", "b")}
    model = _adapted(configs, dtype=torch.float64)
    with pytest.raises(ValueError, match="more than"):
        lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=24, target_modules=["v_proj"]))
    before = {name: _lorakit_deltas(model, name) for name in configs}
    lorakit.combine(model, ["a", "b"], [1.0, 0.5], "ab", method="cat")
    for module_name, delta in _lorakit_deltas(model, "ab").items():
        torch.testing.assert_close(delta, before["a"][module_name] + 0.5 * before["b"][module_name])
    assert {m.rank["ab"] for m in model.modules() if isinstance(m, lorakit.LoraLayer)} == {24}


def test_svd_at_full_rank_is_exact_and_truncation_is_the_best_approximation():
    model = _adapted({"a": lorakit.LoraConfig(r=4, alpha=8, target_modules=QV),
                      "b": lorakit.LoraConfig(r=4, alpha=8, target_modules=QV)}, dtype=torch.float64)
    a, b = _lorakit_deltas(model, "a"), _lorakit_deltas(model, "b")
    lorakit.combine(model, ["a", "b"], [1.0, 0.5], "full", method="svd", rank=8)
    lorakit.combine(model, ["a", "b"], [1.0, 0.5], "low", method="svd", rank=3)
    for module_name, full in _lorakit_deltas(model, "full").items():
        expected = a[module_name] + 0.5 * b[module_name]
        torch.testing.assert_close(full, expected, rtol=1e-10, atol=1e-10)
        s = torch.linalg.svdvals(expected)
        error = torch.linalg.matrix_norm(_lorakit_deltas(model, "low")[module_name] - expected)
        torch.testing.assert_close(error, s[3:].square().sum().sqrt(), rtol=1e-8, atol=1e-10)  # Eckart–Young


def test_dare_seed_gives_the_same_result_and_leaves_the_global_generator_alone():
    model = _adapted({"a": lorakit.LoraConfig(r=4, alpha=8, target_modules=QV),
                      "b": lorakit.LoraConfig(r=4, alpha=8, target_modules=QV)})
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    for new, seed in (("s1", 11), ("s1_again", 11), ("s2", 12)):
        lorakit.combine(model, ["a", "b"], [0.5, 0.5], new, method="dare_linear", density=0.5, seed=seed)
    assert torch.equal(torch.rand(3), expected_next)  # a seeded combine draws from its own generator
    d = {n: _lorakit_deltas(model, n) for n in ("s1", "s1_again", "s2")}
    assert all(torch.equal(d["s1"][k], d["s1_again"][k]) for k in d["s1"])
    assert not all(torch.equal(d["s1"][k], d["s2"][k]) for k in d["s1"])
    torch.manual_seed(11)  # seed=None draws from torch's global generator, as PEFT does
    lorakit.combine(model, ["a", "b"], [0.5, 0.5], "global", method="dare_linear", density=0.5)
    assert all(torch.equal(d["s1"][k], _lorakit_deltas(model, "global")[k]) for k in d["s1"])


def test_dare_keeps_about_density_of_the_entries_rescaled():
    model = _adapted({"a": lorakit.LoraConfig(r=8, alpha=8, target_modules=QV),
                      "b": lorakit.LoraConfig(r=8, alpha=8, target_modules=QV)})
    lorakit.combine(model, ["a", "b"], [1.0, 0.0], "dare", method="dare_linear", density=0.25, seed=0)
    kept = total = 0
    for m in model.modules():
        if isinstance(m, lorakit.LoraLayer):
            A, A_a = m.lora_A["dare"], m.lora_A["a"]  # weight 0 for b: A' = mask ⊙ A_a / 0.25 (scaling 1)
            nonzero = A != 0
            torch.testing.assert_close(A[nonzero], (A_a[nonzero] / 0.25).to(A.dtype))
            kept, total = kept + int(nonzero.sum()), total + A.numel()
    assert 0.2 < kept / total < 0.3  # 1024 draws: a 0.25 rate is far from both bounds


def test_saved_combination_loads_in_peft_with_equal_logits(tmp_path, tokens):
    model = _adapted({"a": lorakit.LoraConfig(r=4, alpha=8, target_modules=QV),
                      "b": lorakit.LoraConfig(r=2, alpha=8, target_modules=["q_proj", "o_proj"])})
    lorakit.combine(model, ["a", "b"], [0.7, 0.3], "ab", method="cat")
    lorakit.use(model, "ab")
    with torch.no_grad():
        ours = model(tokens).logits
    lorakit.save_adapter(model, tmp_path / "ab", "ab")
    config = json.loads((tmp_path / "ab" / CONFIG_NAME).read_text())
    assert config["r"] == 6 and config["lora_alpha"] == 6 and config["use_rslora"] is False
    assert sorted(config["target_modules"]) == ["o_proj", "q_proj", "v_proj"]
    reference = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ab").eval()
    with torch.no_grad():
        theirs = reference(tokens).logits
    assert (ours - theirs).abs().max() <= 1e-5
    with lorakit.disabled(model), torch.no_grad():
        assert (model(tokens).logits - ours).abs().max() > 1e-3  # the adapter does something
    # and the files load back into lorakit with the same outputs
    again = lorakit.load_adapter(tiny_llama(), tmp_path / "ab")
    with torch.no_grad():
        assert (again(tokens).logits - ours).abs().max() <= 1e-5


def test_combined_adapter_is_frozen_inactive_and_changes_no_other_trainability():
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=QV), "a")
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=QV), "b")  # inject leaves b trainable
    randomize_adapters(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    lorakit.combine(model, ["a", "b"], [1, 1], "ab", method="linear")
    assert lorakit.active_adapters(model) == ["a"]
    assert {n: p.requires_grad for n, p in model.named_parameters() if n in flags} == flags
    assert not any(p.requires_grad for n, p in model.named_parameters() if n not in flags)


def test_targets_the_union_cannot_describe_are_written_as_module_names(tmp_path, tokens):
    model = _adapted({"a": lorakit.LoraConfig(r=4, target_modules=QV, layers_to_transform=[0]),
                      "b": lorakit.LoraConfig(r=4, target_modules=["q_proj"])})
    lorakit.combine(model, ["a", "b"], [1, 1], "ab", method="cat")
    targets = lorakit.adapters.lora_state(model).configs["ab"].target_modules
    assert sorted(targets) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                               "model.layers.1.self_attn.q_proj"]
    lorakit.use(model, "ab")
    with torch.no_grad():
        ours = model(tokens).logits
    lorakit.save_adapter(model, tmp_path, "ab")
    reference = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    with torch.no_grad():
        assert (reference(tokens).logits - ours).abs().max() <= 1e-5


# --- errors: clear, and the model is left as it was ------------------------------------------------

def _snapshot(model):
    state = lorakit.adapters.lora_state(model)
    return ({k: v.clone() for k, v in model.state_dict().items()}, list(state.configs), list(state.active),
            {n: p.requires_grad for n, p in model.named_parameters()})


def _same(a, b) -> bool:
    return (a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
            and a[1:] == b[1:])


BAD = [  # id, (adapters, weights, keyword arguments), error type, words the message must hold
    ("unknown adapter", (["a", "zz"], [1, 1], {}), KeyError, ["'zz'", "it has"]),
    ("weights length", (["a", "b"], [1], {}), CombineError, ["weights", "1 value(s) for 2 adapter(s)"]),
    ("non-finite weight", (["a", "b"], [1, float("nan")], {}), CombineError, ["weights", "finite"]),
    ("svd without rank", (["a", "b"], [1, 1], {"method": "svd"}), CombineError, ["give rank"]),
    ("svd rank too large", (["a", "b"], [1, 1], {"method": "svd", "rank": 40}), CombineError,
     ["rank=40", "at most 32"]),
    ("rank with cat", (["a", "b"], [1, 1], {"method": "cat", "rank": 4}), CombineError,
     ["rank", "'svd' only"]),
    ("density missing", (["a", "b"], [1, 1], {"method": "ties"}), CombineError, ["give density"]),
    ("density zero", (["a", "b"], [1, 1], {"method": "dare_ties", "density": 0.0}), CombineError,
     ["density", "(0, 1]"]),
    ("density above one", (["a", "b"], [1, 1], {"method": "magnitude_prune", "density": 1.5}), CombineError,
     ["density", "(0, 1]"]),
    ("seed without dare", (["a", "b"], [1, 1], {"method": "cat", "seed": 1}), CombineError, ["seed", "dare"]),
    ("unknown method", (["a", "b"], [1, 1], {"method": "mean"}), CombineError, ["method='mean'"]),
    ("same adapter twice", (["a", "a"], [1, 1], {}), CombineError, ["more than once"]),
    ("different ranks for linear", (["a", "c"], [1, 1], {"method": "linear"}), CombineError,
     ["equal ranks", "method='cat'", "method='svd'"]),
    ("different ranks for ties", (["a", "c"], [1, 1], {"method": "ties", "density": 0.5}), CombineError,
     ["equal ranks"]),
    ("existing name", (["a", "b"], [1, 1], {"name": "b"}), ValueError, ["already on this model"]),
    ("modules_to_save", (["a", "s"], [1, 1], {}), CombineError, ["modules_to_save"]),
]


@pytest.mark.parametrize("args,error,words", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_combination_is_refused_and_the_model_is_unchanged(args, error, words):
    model = _adapted({"a": lorakit.LoraConfig(r=4, target_modules=QV),
                      "b": lorakit.LoraConfig(r=4, target_modules=QV),
                      "c": lorakit.LoraConfig(r=2, target_modules=QV),
                      "s": lorakit.LoraConfig(r=4, target_modules=QV, modules_to_save=["lm_head"])})
    adapters, weights, kwargs = args
    kwargs = dict(kwargs)
    name = kwargs.pop("name", "new")
    before = _snapshot(model)
    with pytest.raises(error) as info:
        lorakit.combine(model, adapters, weights, name, **kwargs)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"
    assert _same(_snapshot(model), before)


# --- the command line ------------------------------------------------------------------------------

def _from_dir(path: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def cli_setup(model_dir, tmp_path_factory):  # noqa: F811 - test_cli's tiny model directory (with a tokenizer)
    """Two adapters (different ranks and targets) for the tiny model in model_dir."""
    root = tmp_path_factory.mktemp("combine")
    model = _from_dir(model_dir)
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=QV), "a")
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=8, target_modules=["q_proj", "k_proj"]), "b")
    randomize_adapters(model, std=0.3)
    for name in ("a", "b"):
        lorakit.save_adapter(model, root / name, name)
    (root / "model").symlink_to(model_dir)
    return root


def test_cli_combine_writes_an_adapter_peft_loads(cli_setup, tmp_path):
    out = tmp_path / "ab"
    rc = main(["combine", "--model", str(cli_setup / "model"), "--adapter", f"a={cli_setup / 'a'}",
               "--adapter", f"b={cli_setup / 'b'}", "--weights", "0.7,0.3", "--method", "cat", "--out", str(out)])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    assert not [p for p in tmp_path.iterdir() if p.name != "ab"]  # no temp folder left beside it
    # the expected outputs: the same combination made in Python
    model = lorakit.load_adapter(_from_dir(cli_setup / "model"), cli_setup / "a", "a")
    lorakit.load_adapter(model, cli_setup / "b", "b")
    lorakit.combine(model, ["a", "b"], [0.7, 0.3], "ab", method="cat")
    lorakit.use(model, "ab")
    reference = peft.PeftModel.from_pretrained(_from_dir(cli_setup / "model"), out).eval()
    tokens = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours, theirs = model(tokens).logits, reference(tokens).logits
        assert (theirs - ours).abs().max() <= 1e-5
        with lorakit.disabled(model):
            assert (model(tokens).logits - ours).abs().max() > 1e-4


@pytest.mark.parametrize("extra,words", [
    (["--weights", "0.7"], ["--weights", "1 value(s) for 2 adapter(s)"]),
    (["--weights", "0.7,x"], ["--weights 0.7,x", "comma-separated numbers"]),
    (["--weights", "1,1", "--method", "svd"], ["give --rank"]),
    (["--weights", "1,1", "--method", "ties", "--density", "1.5"], ["--density", "(0, 1]"]),
    (["--weights", "1,1", "--method", "dare_ties"], ["give --density"]),
    (["--weights", "1,1", "--method", "cat", "--seed", "3"], ["--seed", "dare"]),
    (["--weights", "1,1", "--method", "linear"], ["equal ranks", "--method cat", "--method svd"]),
], ids=["weights-count", "weights-text", "svd-rank", "density-range", "density-missing", "seed", "linear-ranks"])
def test_cli_errors_name_the_flag_and_write_nothing(cli_setup, tmp_path, capsys, extra, words):
    out = tmp_path / "out"
    rc = main(["combine", "--model", str(cli_setup / "model"), "--adapter", f"a={cli_setup / 'a'}",
               "--adapter", f"b={cli_setup / 'b'}", "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("lorakit combine: error: ")
    for word in words:
        assert word in err, f"{word!r} not in {err}"
    assert not out.exists() and not list(tmp_path.iterdir())


def test_cli_bad_adapter_spec_is_named(cli_setup, tmp_path, capsys):
    for spec, words in (("nopath", ["--adapter nopath", "NAME=PATH"]),
                        (f"x={tmp_path / 'missing'}", ["--adapter x=", "no such adapter directory"])):
        rc = main(["combine", "--model", str(cli_setup / "model"), "--adapter", spec, "--adapter",
                   f"b={cli_setup / 'b'}", "--weights", "1,1", "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert rc == 2 and all(w in err for w in words), err


# --- PEFT round trips on three model families ---------------------------------------------------------

def _tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    return BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=64)).eval()


def _families():
    from conftest import tiny_gpt2

    return {"llama": (tiny_llama, ["q_proj", "v_proj"], ["q_proj", "o_proj"], False),
            "gpt2": (tiny_gpt2, ["c_attn"], ["c_attn", "c_proj"], True),   # Conv1D: fan_in_fan_out
            "bert": (_tiny_bert, ["query", "value"], ["query", "dense"], False)}


def _output(model, tokens) -> torch.Tensor:
    with torch.no_grad():
        out = model(tokens)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("method,kwargs", [("cat", {}), ("svd", {"rank": 3})], ids=["cat", "svd"])
def test_combined_adapters_round_trip_with_peft_both_ways(family, method, kwargs, tmp_path):
    factory, targets_a, targets_b, transposed = _families()[family]
    tokens = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(5))
    # lorakit combines, PEFT loads
    model = factory()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=targets_a), "sql")
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=4, target_modules=targets_b), "chat")
    randomize_adapters(model)
    lorakit.combine(model, ["sql", "chat"], [0.7, 0.3], "ab", method=method, **kwargs)
    lorakit.use(model, "ab")
    ours = _output(model, tokens)
    lorakit.save_adapter(model, tmp_path / "ours", "ab")
    theirs = _output(peft.PeftModel.from_pretrained(factory(), tmp_path / "ours").eval(), tokens)
    assert (ours - theirs).abs().max() <= 1e-5
    assert (ours - _output(factory(), tokens)).abs().max() > 1e-3  # the combination does something
    # PEFT combines, lorakit loads
    base = factory()
    peft_model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets_a,
                                                           fan_in_fan_out=transposed), adapter_name="sql")
    peft_model.add_adapter("chat", peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets_b,
                                                fan_in_fan_out=transposed))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.add_weighted_adapter(["sql", "chat"], [0.7, 0.3], "ab", combination_type=method,
                                    **({"svd_rank": kwargs["rank"]} if "rank" in kwargs else {}))
    peft_model.set_adapter("ab")
    peft_model.eval()
    theirs = _output(peft_model, tokens)
    assert (theirs - _output(factory(), tokens)).abs().max() > 1e-3
    peft_model.save_pretrained(tmp_path / "theirs", selected_adapters=["ab"])
    ours = _output(lorakit.load_adapter(factory(), tmp_path / "theirs" / "ab"), tokens)
    assert (ours - theirs).abs().max() <= 1e-5
