"""The registry of base-layer kinds: which module types lorakit adapts, which it refuses by name,
and the PEFT key names each LoRA layer kind owns."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers.pytorch_utils import Conv1D

import lorakit
import lorakit.io as lio
from lorakit.config import ConfigError
from lorakit.layers import (LoraConv, LoraEmbedding, LoraLinear, LoraSlicedLinear, dense_weight, factor_key,
                            is_dense, is_linear_family, kind_of, lora_class_for, peft_factor_keys, refusal,
                            register_kind, registered_kinds)
from lorakit.layers import kinds as kinds_module

from conftest import tiny_gpt2


class MyLinear(nn.Linear):
    """A user's subclass: lorakit cannot know what it changed."""


class MyEmbedding(nn.Embedding):
    pass


class MyConv(nn.Conv2d):
    pass


class MyConv1D(Conv1D):
    pass


# (id, module, LoRA class, counts for "all-linear", its weight as (d_out, d_in))
ACCEPTED = [
    ("Linear", lambda: nn.Linear(4, 3), LoraLinear, True, lambda m: m.weight),
    ("NonDynamicallyQuantizableLinear", lambda: NonDynamicallyQuantizableLinear(4, 3), LoraLinear, True,
     lambda m: m.weight),
    ("transformers-Conv1D", lambda: Conv1D(3, 4), LoraLinear, True, lambda m: m.weight.t()),  # stored (d_in, d_out)
    ("Embedding", lambda: nn.Embedding(10, 4), LoraEmbedding, False, lambda m: m.weight.t()),
    ("Conv1d", lambda: nn.Conv1d(2, 3, 5), LoraConv, False, lambda m: m.weight.reshape(3, 10)),
    ("Conv2d", lambda: nn.Conv2d(2, 3, (2, 3)), LoraConv, False, lambda m: m.weight.reshape(3, 12)),
    ("Conv3d", lambda: nn.Conv3d(2, 3, 1), LoraConv, False, lambda m: m.weight.reshape(3, 2)),
]


@pytest.mark.parametrize("build, lora_class, linear, math_weight",
                         [pytest.param(*c[1:], id=c[0]) for c in ACCEPTED])
def test_accepted_kinds(build, lora_class, linear, math_weight):
    module = build()
    assert kind_of(module) is not None and refusal(module) is None
    assert lora_class_for(module) is lora_class
    assert is_dense(module) is linear and is_linear_family(module) is linear
    assert torch.equal(dense_weight(module), math_weight(module))


# (id, module, words the refusal must contain, is in the linear family)
REFUSED = [
    ("subclass-of-Linear", lambda: MyLinear(4, 3), [f"{__name__}.MyLinear", "subclass of nn.Linear",
                                                    "cannot know how", "QLoRA"], True),
    ("subclass-of-Conv1D", lambda: MyConv1D(3, 4), [f"{__name__}.MyConv1D", "subclass of transformers Conv1D"], True),
    ("subclass-of-Embedding", lambda: MyEmbedding(10, 4), [f"{__name__}.MyEmbedding", "subclass of nn.Embedding"],
     False),
    ("subclass-of-Conv2d", lambda: MyConv(2, 3, 1), [f"{__name__}.MyConv", "subclass of nn.Conv1d/2d/3d"], False),
    ("LayerNorm", lambda: nn.LayerNorm(4), ["torch.nn.modules.normalization.LayerNorm", "lorakit adapts nn.Linear"],
     False),
]


@pytest.mark.parametrize("build, words, family", [pytest.param(*c[1:], id=c[0]) for c in REFUSED])
def test_refused_kinds_are_named(build, words, family):
    module = build()
    assert kind_of(module) is None and lora_class_for(module) is None and dense_weight(module) is None
    assert not is_dense(module) and is_linear_family(module) is family
    why = refusal(module)
    assert all(w in why for w in words), why


# --- inject refuses an unknown subclass, and changes nothing -------------------------------------

class Block(nn.Module):
    def __init__(self, proj: type[nn.Linear] = nn.Linear):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.proj = proj(8, 8)

    def forward(self, x):
        return self.proj(torch.relu(self.fc(x)))


def snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "types": [(n, type(m)) for n, m in model.named_modules()],
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "lora_state": "lora_state" in model.__dict__,
    }


def assert_unchanged(model: nn.Module, before: dict[str, Any]) -> None:
    after = snapshot(model)
    assert after["types"] == before["types"]
    assert after["grad"] == before["grad"]
    assert after["lora_state"] == before["lora_state"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key


@pytest.mark.parametrize("cfg", [
    pytest.param(dict(target_modules=["proj"]), id="named"),
    pytest.param(dict(target_modules=r".*proj"), id="regex"),
    pytest.param(dict(target_modules="all-linear"), id="all-linear"),
])
def test_inject_refuses_unknown_linear_subclass(cfg):
    model = Block(proj=MyLinear)
    model.fc.weight.requires_grad_(False)  # a mix of frozen and trainable, to see it is not touched
    before = snapshot(model)
    with pytest.raises(ConfigError) as info:
        lorakit.inject(model, lorakit.LoraConfig(r=2, **cfg))
    message = str(info.value)
    assert all(w in message for w in ["'proj'", f"{__name__}.MyLinear", "cannot know how"]), message
    assert_unchanged(model, before)


def test_unknown_subclass_left_out_by_exclude_modules():
    model = Block(proj=MyLinear)
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules="all-linear", exclude_modules=["proj"]))
    assert isinstance(model.fc, LoraLinear) and type(model.proj) is MyLinear


def test_load_adapter_refuses_unknown_subclass(tmp_path):
    plain = lorakit.inject(Block(), lorakit.LoraConfig(r=2, target_modules=["fc", "proj"]))
    lorakit.save_adapter(plain, tmp_path / "a")
    model = Block(proj=MyLinear)
    before = snapshot(model)
    with pytest.raises(lorakit.AdapterFileError) as info:
        lorakit.load_adapter(model, tmp_path / "a")
    message = str(info.value)
    assert all(w in message for w in [lio.CONFIG_NAME, "'proj'", f"{__name__}.MyLinear"]), message
    assert_unchanged(model, before)


def test_vouched_subclass_is_adapted(monkeypatch):
    monkeypatch.setattr(kinds_module, "_KINDS", list(registered_kinds()))  # registrations stay inside this test
    register_kind(kinds_module.LayerKind("MyLinear", LoraLinear, lambda m: m.weight, types=(MyLinear,), linear=True))
    model = Block(proj=MyLinear)
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules="all-linear"))
    assert isinstance(model.proj, LoraLinear) and type(model.proj.base_layer) is MyLinear

    class MySubLinear(MyLinear):
        pass
    assert "a subclass of MyLinear that lorakit does not know" in refusal(MySubLinear(2, 2))  # the nearest kind


def test_a_type_belongs_to_one_kind(monkeypatch):
    monkeypatch.setattr(kinds_module, "_KINDS", list(registered_kinds()))
    with pytest.raises(ValueError, match=r"torch\.nn\.modules\.linear\.Linear is already registered"):
        register_kind(kinds_module.LayerKind("again", LoraLinear, lambda m: m.weight, types=(nn.Linear,)))


def test_sliced_projection_needs_a_kind_with_slices():
    model = nn.Sequential(nn.Embedding(10, 6))
    before = snapshot(model)
    with pytest.raises(ConfigError, match=r"fused_projections names '0', a nn\.Embedding; only nn\.Linear"):
        lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["0"], fused_projections={"0": [True, False]}))
    assert_unchanged(model, before)


# --- nn.MultiheadAttention ---------------------------------------------------------------------

class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(self.attn(x, x, x, need_weights=False)[0])


def test_non_dynamically_quantizable_linear_is_a_linear_kind():
    torch.manual_seed(0)
    model = nn.Sequential(NonDynamicallyQuantizableLinear(8, 4))  # the type of MHA's out_proj, on its own
    x = torch.randn(3, 8)
    expected = model(x)
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules="all-linear"))
    assert isinstance(model[0], LoraLinear)
    assert torch.equal(model(x), expected)


def test_multihead_attention_out_proj_is_refused_when_named():
    # nn.MultiheadAttention passes out_proj.weight to F.multi_head_attention_forward and never
    # calls out_proj: a wrapper there would be bypassed (or, without a .weight, break the forward).
    model = Attention()
    before = snapshot(model)
    with pytest.raises(ConfigError, match=r"'attn\.out_proj', inside a MultiheadAttention, which reads its weight"):
        lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["out_proj"]))
    assert_unchanged(model, before)


def test_all_linear_leaves_out_multihead_attention_out_proj_with_a_warning():
    torch.manual_seed(0)
    model = Attention().eval()
    x = torch.randn(2, 3, 8)
    with torch.no_grad():  # MHA takes its fast path only without grad: the same path before and after
        expected = model(x)
    with pytest.warns(UserWarning, match=r"all-linear.*attn\.out_proj.*never calls their forward"):
        lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules="all-linear"))
    assert isinstance(model.fc, LoraLinear) and type(model.attn.out_proj) is NonDynamicallyQuantizableLinear
    with torch.no_grad():
        assert torch.equal(model(x), expected)


# --- bitsandbytes: Linear4bit/Linear8bitLt are kinds (tests/test_qlora.py); a subclass of one is ----
# --- refused by name, bit for bit untouched ------------------------------------------------------

def nf4_model(subclass: bool = True) -> nn.Module:
    bnb = pytest.importorskip("bitsandbytes")

    class MyLinear4bit(bnb.nn.Linear4bit):
        """A subclass lorakit cannot know: it might dequantize its own way."""

    cls = MyLinear4bit if subclass else bnb.nn.Linear4bit
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    for i in (0, 2):
        dense = model[i]
        q = cls(64, dense.out_features, bias=True, compute_dtype=torch.float32,
                compress_statistics=True, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(dense.weight.detach().clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)
        q.bias = nn.Parameter(dense.bias.detach().clone())
        model[i] = q
    model = model.to("cpu")  # Params4bit quantizes on .to(device), CPU included
    assert model[0].weight.dtype == torch.uint8 and model[0].weight.quant_state is not None
    return model.eval()


def quantized_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor a Linear4bit is made of: the packed weight, the bias and the quant state."""
    tensors = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if getattr(weight, "quant_state", None) is not None:
            tensors[f"{name}.weight"] = weight.data.clone()
            for key, value in weight.quant_state.as_dict(packed=True).items():
                tensors[f"{name}.quant_state.{key}"] = value.clone()
    return tensors


@pytest.mark.parametrize("targets", [["0", "2"], "all-linear"], ids=["named", "all-linear"])
def test_subclass_of_bitsandbytes_linear4bit_is_refused_and_untouched(targets, caplog):
    caplog.set_level(logging.ERROR)  # bitsandbytes logs that an optional CPU kernel package is missing
    model = nf4_model()
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x)
    before, packed = snapshot(model), quantized_snapshot(model)
    assert len(packed) > 4  # weights and quant states of both layers were found

    with pytest.raises(ConfigError) as info:
        lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=targets))
    message = str(info.value)
    assert all(w in message for w in ["'0'", "MyLinear4bit, a subclass of bitsandbytes Linear4bit",
                                      "cannot know how"]), message

    assert_unchanged(model, before)
    after = quantized_snapshot(model)
    assert after.keys() == packed.keys()
    for key, value in packed.items():
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_bitsandbytes_linear4bit_itself_is_a_linear_kind():
    model = nf4_model(subclass=False)
    assert kind_of(model[0]).quantized and is_dense(model[0]) and refusal(model[0]) is None


def test_subclass_of_bitsandbytes_linear8bit_is_refused():
    bnb = pytest.importorskip("bitsandbytes")

    class MyLinear8bit(bnb.nn.Linear8bitLt):
        pass

    layer = MyLinear8bit(16, 8, has_fp16_weights=False)
    layer.weight = bnb.nn.Int8Params(torch.randn(8, 16), requires_grad=False, has_fp16_weights=False)
    model = nn.Sequential(layer.to("cpu"))
    with pytest.raises(ConfigError, match=r"MyLinear8bit, a subclass of bitsandbytes Linear8bitLt"):
        lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules="all-linear"))


# --- PEFT key names, owned by the layer kinds ---------------------------------------------------

@pytest.mark.parametrize("cls, keys", [
    (LoraLinear, ("lora_A.weight", "lora_B.weight")),
    (LoraSlicedLinear, ("lora_A.weight", "lora_B.weight")),
    (LoraConv, ("lora_A.weight", "lora_B.weight")),
    (LoraEmbedding, ("lora_embedding_A", "lora_embedding_B")),
])
def test_each_layer_kind_owns_its_key_names(cls, keys):
    assert peft_factor_keys(cls) == keys


@pytest.mark.parametrize("key, expected", [
    ("model.layers.0.self_attn.q_proj.lora_A.weight", ("model.layers.0.self_attn.q_proj", "A", LoraLinear)),
    ("transformer.h.0.attn.c_attn.lora_B.weight", ("transformer.h.0.attn.c_attn", "B", LoraSlicedLinear)),
    ("model.embed_tokens.lora_embedding_A", ("model.embed_tokens", "A", LoraEmbedding)),
    ("model.embed_tokens.lora_embedding_B", ("model.embed_tokens", "B", LoraEmbedding)),
    ("lora_A.lora_A.weight", ("lora_A", "A", LoraConv)),  # a module may be named like a factor
    ("model.layers.0.self_attn.q_proj.base_layer.bias", None),
    ("model.lm_head.modules_to_save.weight", None),
    ("lora_A.weight", None),  # no module name
    ("model.q_proj.lora_A.bias", None),
])
def test_factor_key(key, expected):
    parsed = factor_key(key)
    if expected is None:
        assert parsed is None
    else:
        module, factor, owner = expected
        assert (parsed.module, parsed.factor) == (module, factor) and owner in parsed.owners


class LoraOwnKeys(LoraLinear):
    peft_factor_keys = ("lora_own_A", "lora_own_B")


def test_key_names_come_from_the_registered_kinds(monkeypatch, tmp_path):
    """A kind registered with its own key names is saved, loaded and analysed under them."""
    monkeypatch.setattr(kinds_module, "_KINDS", list(registered_kinds()))
    assert factor_key("proj.lora_own_A") is None
    register_kind(kinds_module.LayerKind("MyLinear", LoraOwnKeys, lambda m: m.weight, types=(MyLinear,),
                                         linear=True))
    assert factor_key("proj.lora_own_A").owners == (LoraOwnKeys,)

    model = lorakit.inject(Block(proj=MyLinear), lorakit.LoraConfig(r=2, target_modules="all-linear"))
    with torch.no_grad():
        model.proj.lora_B["default"].normal_()
    saved = lio.adapter_state_dict(model, "default")
    assert set(saved) == {f"{lio.PREFIX}{k}" for k in ("fc.lora_A.weight", "fc.lora_B.weight",
                                                       "proj.lora_own_A", "proj.lora_own_B")}
    lorakit.save_adapter(model, tmp_path / "a")
    other = lorakit.load_adapter(Block(proj=MyLinear), tmp_path / "a")
    assert torch.equal(other.proj.lora_B["default"], model.proj.lora_B["default"])

    from lorakit.analysis.delta import read_adapter_deltas
    deltas = read_adapter_deltas(tmp_path / "a")
    assert set(deltas.layers) == {"fc", "proj"} and not deltas.ignored


def test_a_factor_under_another_kinds_key_is_refused(tmp_path):
    """An embedding's factors are lora_embedding_A/B; the same tensors as lora_A/B.weight would be
    a file for another model, refused before anything changes."""
    model = lorakit.inject(nn.Sequential(nn.Embedding(10, 6)), lorakit.LoraConfig(r=2, target_modules=["0"]))
    lorakit.save_adapter(model, tmp_path / "a")
    path = tmp_path / "a" / lio.WEIGHTS_NAME
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = {k.replace("lora_embedding_A", "lora_A.weight"): v for k, v in load_file(path).items()}
    save_file(tensors, str(path), metadata=metadata)
    fresh = nn.Sequential(nn.Embedding(10, 6))
    before = snapshot(fresh)
    with pytest.raises(lorakit.AdapterFileError, match=r"0\.lora_A\.weight names a factor 'lora_A\.weight', "
                       r"but 0 is adapted as nn\.Embedding, whose factors PEFT stores as 'lora_embedding_A'"):
        lorakit.load_adapter(fresh, tmp_path / "a")
    assert_unchanged(fresh, before)


def test_gpt2_keeps_working_through_the_registry(tokens):
    """GPT-2's Conv1D is found by the registry for plain and sliced LoRA alike."""
    gpt2 = tiny_gpt2()
    expected = gpt2(tokens).logits
    lorakit.inject(gpt2, lorakit.LoraConfig(r=2, target_modules="all-linear",
                                            fused_projections={"c_attn": [True, False, True]}))
    assert isinstance(gpt2.transformer.h[0].attn.c_attn, LoraSlicedLinear)
    assert type(gpt2.transformer.h[0].mlp.c_fc) is LoraLinear
    assert torch.equal(gpt2(tokens).logits, expected)
