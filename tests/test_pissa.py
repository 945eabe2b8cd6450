"""PiSSA and OLoRA initialisation (layers/weight_init.py): the same A, B and residual base as PEFT,
the model unchanged at step 0, the conversion to a plain rank-2r LoRA for the untouched base (both
ways with PEFT), float64 identities, restoring the base, the trainer's product and resume, and
the inputs that are refused."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import lorakit
from lorakit.config import ConfigError, LoraConfig

from conftest import tiny_gpt2, tiny_llama
from test_cli import e2e_file, model_dir  # noqa: F401 - fixtures: a tiny Llama dir and an E2E file
from test_train import Crash, adapter_tensors, batches, config, crash_at, token_examples

peft = pytest.importorskip("peft")

TOL = 1e-5


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    return BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=64)).eval()


# model -> (factory, targets); "dense" in BERT is the attention output, the MLP and the pooler
MODELS = {
    "llama": (tiny_llama, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj", "c_fc"]),  # transformers' Conv1D: weight (d_in, d_out)
    "bert": (tiny_bert, ["query", "key", "value", "dense"]),
}
# PEFT's olora_init does not transpose a Conv1D weight, so on GPT-2 it builds factors of the wrong
# shapes (c_attn: forward fails; square c_proj: a wrong ΔW). lorakit does OLoRA on W as (d_out, d_in)
# there; test_olora_on_conv1d checks it by its properties instead.
PEFT_CASES = [(m, i) for m in MODELS for i in ("pissa", "olora") if (m, i) != ("gpt2", "olora")]


def ids() -> torch.Tensor:
    return torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(3))


def output(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=x)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def lorakit_model(base, init: str, targets, **kw):
    cfg = LoraConfig(r=4, alpha=8, target_modules=targets, init=init, **kw)
    return lorakit.inject(copy.deepcopy(base), cfg)


def peft_model(base, init: str, targets, **kw):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=init, **kw)
    return peft.get_peft_model(copy.deepcopy(base), cfg)


def peft_layers(pm) -> dict[str, torch.nn.Module]:
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    return {n.removeprefix("base_model.model."): m for n, m in pm.named_modules() if isinstance(m, PeftLoraLayer)}


def lora_layers(model) -> dict[str, lorakit.LoraLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, lorakit.LoraLayer)}


def perturb(model, seed: int = 1, std: float = 0.05) -> None:
    """Move every A and B away from its init, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for table in (layer.lora_A, layer.lora_B):
                for p in table.values():
                    p.add_(torch.randn(p.shape, generator=g) * std)


def copy_factors(src, pm) -> None:
    """lorakit's (trained) A and B into the PEFT model's layers of the same names."""
    theirs = peft_layers(pm)
    with torch.no_grad():
        for name, layer in lora_layers(src).items():
            theirs[name].lora_A["default"].weight.copy_(layer.lora_A["default"])
            theirs[name].lora_B["default"].weight.copy_(layer.lora_B["default"])


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


# --- the init: PEFT's A, B and residual; the model unchanged ----------------------------------

@pytest.mark.parametrize("model_name, init", PEFT_CASES)
def test_init_matches_peft_and_keeps_the_model(model_name, init):
    factory, targets = MODELS[model_name]
    base = factory()
    x = ids()
    before = output(base, x)
    lk, pm = lorakit_model(base, init, targets), peft_model(base, init, targets)
    ours, theirs = lora_layers(lk), peft_layers(pm)
    assert ours.keys() == theirs.keys() and ours
    for name, layer in ours.items():
        other = theirs[name]
        assert max_diff(layer.lora_A["default"], other.lora_A["default"].weight) <= TOL, name
        assert max_diff(layer.lora_B["default"], other.lora_B["default"].weight) <= TOL, name
        assert max_diff(layer.base_layer.weight, other.base_layer.weight) <= TOL, name  # the residual
    assert max_diff(output(lk, x), before) <= TOL  # step 0: W_res + s·B0·A0 = W
    assert max_diff(output(pm, x), before) <= TOL


@pytest.mark.parametrize("model_name, init", [(m, i) for m in MODELS for i in ("pissa", "olora")])
def test_residual_identity_in_float64(model_name, init):
    """W_res + s·B0·A0 = W, recomputed in float64; PiSSA's s·B0·A0 is W's rank-r truncation, OLoRA's B0
    has orthonormal columns and A0 is upper triangular."""
    factory, targets = MODELS[model_name]
    base = factory()
    originals = {n: m.weight.detach().clone() for n, m in base.named_modules() if hasattr(m, "weight")}
    lk = lorakit_model(base, init, targets)
    for name, layer in lora_layers(lk).items():
        A, B, s = layer.lora_A["default"].double(), layer.lora_B["default"].double(), layer.scaling["default"]
        W = originals[name].double()
        W = W.t() if layer.fan_in_fan_out else W  # (d_out, d_in)
        residual = layer.base_layer.weight.double()
        residual = residual.t() if layer.fan_in_fan_out else residual
        assert (residual + s * B @ A - W).abs().max().item() <= 1e-6, name
        if init == "pissa":
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            truncation = U[:, :4] @ torch.diag(S[:4]) @ Vh[:4]
            assert (s * B @ A - truncation).abs().max().item() <= TOL, name
        else:
            assert (B.t() @ B - torch.eye(4, dtype=B.dtype)).abs().max().item() <= TOL, name
            assert torch.equal(torch.tril(A, diagonal=-1), torch.zeros_like(A)), name


def test_olora_on_conv1d():
    """GPT-2's Conv1D: OLoRA of W as (d_out, d_in), so the adapted model equals the base at step 0."""
    base = tiny_gpt2()
    x = ids()
    lk = lorakit_model(base, "olora", ["c_attn", "c_proj", "c_fc"])
    assert max_diff(output(lk, x), output(base, x)) <= TOL
    layer = lk.transformer.h[0].attn.c_attn
    assert tuple(layer.lora_A["default"].shape) == (4, 32) and tuple(layer.lora_B["default"].shape) == (96, 4)
    W = base.transformer.h[0].attn.c_attn.weight.detach().t()  # (d_out, d_in)
    Q, R = torch.linalg.qr(W)
    assert max_diff(layer.lora_B["default"], Q[:, :4]) <= TOL and max_diff(layer.lora_A["default"], R[:4]) <= TOL


def _replay_peft_draws(d_in: int, d_out: int, r: int) -> None:
    """PEFT builds lora_A and lora_B as nn.Linear (each drawing a kaiming-uniform init) before
    pissa_init's randomized SVD draws; lorakit draws nothing before it. Replaying the two draws puts
    torch's generator where PEFT's is when it calls svd_lowrank."""
    torch.nn.Linear(d_in, r, bias=False)
    torch.nn.Linear(r, d_out, bias=False)


@pytest.mark.parametrize("niter", [1, 4])
def test_pissa_niter_matches_peft_with_the_same_generator(niter):
    base = tiny_llama()
    init, targets = f"pissa_niter_{niter}", ["q_proj"]
    torch.manual_seed(7)
    pm = peft_model(base, init, targets, layers_to_transform=[0])
    torch.manual_seed(7)
    _replay_peft_draws(32, 32, 4)
    lk = lorakit_model(base, init, targets, layers_to_transform=[0])
    (name, layer), = lora_layers(lk).items()
    other = peft_layers(pm)[name]
    assert max_diff(layer.lora_A["default"], other.lora_A["default"].weight) <= TOL
    assert max_diff(layer.lora_B["default"], other.lora_B["default"].weight) <= TOL
    assert max_diff(layer.base_layer.weight, other.base_layer.weight) <= TOL
    x = ids()
    assert max_diff(output(lk, x), output(base, x)) <= TOL


def test_pissa_niter_properties_and_seed():
    """A randomized SVD: the same seed gives the same factors, the residual identity holds, and
    B0's columns are orthogonal (U·diag(√S))."""
    base = tiny_llama()
    targets = ["q_proj", "v_proj", "down_proj"]
    torch.manual_seed(0)
    a = lorakit_model(base, "pissa_niter_2", targets)
    torch.manual_seed(0)
    b = lorakit_model(base, "pissa_niter_2", targets)
    for (name, la), lb in zip(lora_layers(a).items(), lora_layers(b).values()):
        assert torch.equal(la.lora_A["default"], lb.lora_A["default"]), name
        B = la.lora_B["default"].double()
        gram = B.t() @ B
        assert (gram - torch.diag(torch.diagonal(gram))).abs().max().item() <= TOL, name
    x = ids()
    assert max_diff(output(a, x), output(base, x)) <= TOL


# --- conversion to a plain LoRA for the untouched base ----------------------------------------

CONVERT_CASES = [(m, i, {}) for m, i in PEFT_CASES] + [
    ("gpt2", "olora", {}),
    ("llama", "pissa", {"use_rslora": True}),
    ("llama", "pissa_niter_2", {"rank_pattern": {"down_proj": 2}, "alpha_pattern": {"v_proj": 3.0}}),
]


@pytest.mark.parametrize("model_name, init, extra", CONVERT_CASES)
def test_converted_adapter_gives_the_trained_model_on_the_untouched_base(model_name, init, extra, tmp_path):
    factory, targets = MODELS[model_name]
    base = factory()
    x = ids()
    torch.manual_seed(0)
    lk = lorakit_model(base, init, targets, **extra)
    perturb(lk)
    trained = output(lk, x)
    out = lorakit.save_adapter(lk, tmp_path / "converted", convert_to_lora=True)
    saved = json.loads((out / "adapter_config.json").read_text())
    factor = math.sqrt(2) if extra.get("use_rslora") else 2
    assert saved["init_lora_weights"] is True and saved["r"] == 8 and saved["lora_alpha"] == pytest.approx(8 * factor)
    assert saved["rank_pattern"] == {k: 2 * v for k, v in extra.get("rank_pattern", {}).items()}
    assert saved["alpha_pattern"] == pytest.approx({k: v * factor for k, v in extra.get("alpha_pattern", {}).items()})
    tensors = adapter_tensors(out)
    assert all(t.shape[0 if "lora_A" in k else 1] in (4, 8) for k, t in tensors.items())  # 2r (rank_pattern: 2·2)

    loaded = lorakit.load_adapter(copy.deepcopy(base), out)
    assert max_diff(output(loaded, x), trained) <= TOL
    in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(out))
    assert max_diff(output(in_peft, x), trained) <= TOL


@pytest.mark.parametrize("model_name, init", PEFT_CASES)
def test_peft_converted_adapter_loads_in_lorakit(model_name, init, tmp_path):
    """PEFT's save_pretrained(..., path_initial_model_for_weight_conversion=...) and lorakit's
    convert_to_lora write the same tensors and config, and both give the trained model."""
    factory, targets = MODELS[model_name]
    base = factory()
    x = ids()
    lk = lorakit_model(base, init, targets)
    pm = peft_model(base, init, targets)
    pm.save_pretrained(str(tmp_path / "initial"))  # before training, as PEFT's docs say
    perturb(lk)
    copy_factors(lk, pm)
    trained = output(lk, x)
    assert max_diff(output(pm, x), trained) <= TOL
    pm.save_pretrained(str(tmp_path / "peft"), path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    lorakit.save_adapter(lk, tmp_path / "ours", convert_to_lora=True)

    theirs, ours = adapter_tensors(tmp_path / "peft"), adapter_tensors(tmp_path / "ours")
    assert theirs.keys() == ours.keys()
    for k in ours:
        assert max_diff(ours[k], theirs[k]) <= TOL, k
    their_cfg, our_cfg = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("peft", "ours"))
    for key in ("r", "lora_alpha", "init_lora_weights", "rank_pattern", "alpha_pattern", "use_rslora"):
        assert our_cfg[key] == their_cfg[key], key
    loaded = lorakit.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    assert max_diff(output(loaded, x), trained) <= TOL


def test_unconverted_adapter_redoes_the_init_on_load_as_peft_does(tmp_path):
    """A PiSSA adapter saved as it is (init_lora_weights "pissa", rank r): loading it on the untouched
    base redoes the SVD, writes the residual, then takes A and B from the file, in lorakit and PEFT."""
    base = tiny_llama()
    x = ids()
    lk = lorakit_model(base, "pissa", ["q_proj", "v_proj"])
    perturb(lk)
    trained = output(lk, x)
    out = lorakit.save_adapter(lk, tmp_path / "pissa")
    assert json.loads((out / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
    assert max_diff(output(lorakit.load_adapter(copy.deepcopy(base), out), x), trained) <= TOL
    assert max_diff(output(peft.PeftModel.from_pretrained(copy.deepcopy(base), str(out)), x), trained) <= TOL


# --- the base weight is given back ----------------------------------------------------------

@pytest.mark.parametrize("how", ["unload", "delete"])
def test_taking_the_adapter_off_restores_the_base(how):
    base = tiny_gpt2()
    x = ids()
    lk = lorakit_model(base, "pissa", ["c_attn", "c_proj"])
    perturb(lk)
    plain = lorakit.unload(lk, merge=False) if how == "unload" else (lorakit.delete_adapter(lk, "default") or lk)
    assert not lora_layers(plain)
    for (name, p), q in zip(plain.state_dict().items(), base.state_dict().values()):
        assert max_diff(p, q) <= 1e-6, name
    assert max_diff(output(plain, x), output(base, x)) <= TOL


def test_unload_with_merge_keeps_the_trained_model():
    base = tiny_llama()
    x = ids()
    lk = lorakit_model(base, "olora", ["q_proj", "down_proj"])
    perturb(lk)
    trained = output(lk, x)
    assert max_diff(output(lorakit.unload(lk, merge=True), x), trained) <= TOL


# --- refused inputs ---------------------------------------------------------------------------

@pytest.mark.parametrize("init", ["pissa_niter_0", "pissa_niter_x", "pissa_niter_", "pissa_niter_-1", "svd", "PiSSA"])
def test_bad_init_names_the_field(init):
    with pytest.raises(ConfigError, match=r"init .*pissa_niter"):
        LoraConfig(init=init)


def test_init_round_trips_through_peft_names():
    for init, peft_value in (("kaiming", True), ("gaussian", "gaussian"), ("pissa", "pissa"),
                             ("pissa_niter_4", "pissa_niter_4"), ("olora", "olora")):
        d = LoraConfig(init=init).to_peft_dict()
        assert d["init_lora_weights"] == peft_value
        assert LoraConfig.from_peft_dict(d).init == init
    d = LoraConfig().to_peft_dict()
    for value, init in (("loftq", "kaiming"), (False, "kaiming"), ("OLoRA", "olora")):
        assert LoraConfig.from_peft_dict({**d, "init_lora_weights": value}).init == init


def test_rank_above_the_smaller_side_is_an_error_and_changes_nothing():
    base = tiny_llama()
    model = copy.deepcopy(base)
    with pytest.raises(ConfigError, match=r"k_proj.*shape \(16, 32\).*only 16.*rank_pattern"):
        lorakit.inject(model, LoraConfig(r=20, alpha=20, target_modules=["q_proj", "k_proj"], init="pissa"))
    assert not lora_layers(model) and "lora_state" not in model.__dict__
    for (name, p), q in zip(model.state_dict().items(), base.state_dict().values()):
        assert torch.equal(p, q), name


def conv_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 2))


def quantized_llama():
    pytest.importorskip("bitsandbytes")
    from lorakit.quantize import Quantization, quantize_model

    model = tiny_llama()
    quantize_model(model, Quantization("nf4"))
    return model


@pytest.mark.parametrize("make, targets, match", [
    (tiny_llama, ["embed_tokens"], "nn.Linear and Conv1D layers only.*leave it out of target_modules"),
    (conv_model, ["0"], "nn.Linear and Conv1D layers only"),
    (quantized_llama, ["q_proj"], "quantized bitsandbytes.*load the base unquantized"),
])
def test_kinds_without_weight_init_are_refused(make, targets, match):
    model = make()
    with pytest.raises(ConfigError, match=match):
        lorakit.inject(model, LoraConfig(r=2, alpha=2, target_modules=targets, init="pissa"))
    assert not lora_layers(model)


def test_fused_slices_are_refused():
    cfg = LoraConfig(target_modules=["c_attn"], fused_projections={"c_attn": [True, False, True]}, init="olora")
    with pytest.raises(ConfigError, match="fused_projections"):
        lorakit.inject(tiny_gpt2(), cfg)


def test_convert_to_lora_of_a_plain_adapter_is_an_error(tmp_path):
    model = lorakit.inject(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="convert_to_lora is for adapters initialised with 'pissa' or 'olora'"):
        lorakit.save_adapter(model, tmp_path / "a", convert_to_lora=True)


def test_combine_and_the_serving_bank_refuse_an_unconverted_adapter(tmp_path):
    from lorakit.combine import CombineError
    from lorakit.serving.reader import AdapterRefused, read_adapter_factors, structure_copy

    base = tiny_llama()
    lk = lorakit_model(base, "pissa", ["q_proj"])
    with pytest.raises(CombineError, match="convert_to_lora=True"):
        lorakit.combine(lk, ["default"], weights=[1.0], name="c")
    lorakit.save_adapter(lk, tmp_path / "raw")
    with pytest.raises(AdapterRefused, match="convert_to_lora=True"):
        read_adapter_factors(structure_copy(base), tmp_path / "raw")
    lorakit.save_adapter(lk, tmp_path / "converted", convert_to_lora=True)
    assert read_adapter_factors(structure_copy(base), tmp_path / "converted").modules


# --- training: the product is converted; resume redoes the init -------------------------------

PISSA_LORA = LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj"], init="pissa")


def pissa_injected():
    return lorakit.inject(tiny_llama(), PISSA_LORA)


def test_training_saves_the_converted_adapter_and_resumes(tmp_path):
    from lorakit.train import train

    data = token_examples(24)
    cfg = dict(max_steps=4, save_every=2, eval_every=100, warmup_steps=0)
    whole = pissa_injected()
    train(whole, batches(data, 8), config(tmp_path / "whole", **cfg))
    x = ids()
    trained = output(whole.eval(), x)
    saved = json.loads((tmp_path / "whole" / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["init_lora_weights"] is True
    run = json.loads((tmp_path / "whole" / "run.json").read_text())
    assert run["saved_adapter"] == {"converted_from": "pissa", "r": 8}
    on_base = lorakit.load_adapter(tiny_llama(), tmp_path / "whole" / "adapter")
    assert max_diff(output(on_base, x), trained) <= TOL

    with pytest.raises(Crash):
        train(pissa_injected(), batches(data, 8), config(tmp_path / "resumed", **cfg), on_step=crash_at(3))
    train(pissa_injected(), batches(data, 8), config(tmp_path / "resumed", **cfg), resume=True)
    expected, got = adapter_tensors(tmp_path / "whole" / "adapter"), adapter_tensors(tmp_path / "resumed" / "adapter")
    assert expected.keys() == got.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k


def test_cli_train_with_pissa_says_the_rank_doubles(model_dir, e2e_file, tmp_path, capsys):  # noqa: F811
    from lorakit.cli import main

    out = tmp_path / "run"
    args = ["train", "--model", str(model_dir), "--data", str(e2e_file), "--out", str(out), "--steps", "1",
            "--batch-size", "2", "--rank", "4", "--device", "cpu"]
    assert main([*args, "--init", "pissa_niter_2"]) == 0
    printed = capsys.readouterr()
    assert "plain LoRA of rank 2·4 = 8" in printed.out + printed.err
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 8
    assert main([*args, "--init", "pissa_niter_0", "--overwrite"]) == 2
    assert "--init" in capsys.readouterr().err
