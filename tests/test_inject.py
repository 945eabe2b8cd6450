"""Which modules a config selects, what gets frozen, and taking LoRA off again."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorakit
from lorakit.config import ConfigError
from lorakit.layers import LoraConv, LoraEmbedding, LoraSlicedLinear, LoraLinear, TrainableCopy

from conftest import randomize_adapters, tiny_gpt2, tiny_llama


def adapted(model):
    return {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, lorakit.LoraLayer)}


@pytest.mark.parametrize("targets, expected", [
    (["q_proj", "v_proj"], {f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")}),
    (["model.layers.1.mlp.up_proj"], {"model.layers.1.mlp.up_proj"}),
    (r"model\.layers\.0\.self_attn\.(k|o)_proj", {"model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.o_proj"}),
    ("all-linear", {f"model.layers.{i}.{p}" for i in (0, 1) for p in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}),
    (["embed_tokens"], {"model.embed_tokens"}),
])
def test_target_selection(llama, targets, expected):
    lorakit.inject(llama, lorakit.LoraConfig(target_modules=targets))
    assert set(adapted(llama)) == expected
    assert "lm_head" not in adapted(llama)  # all-linear never adapts the output head


def test_suffix_matching_is_by_dotted_component(llama):
    # "proj" is not a component of "q_proj": nothing matches, and the error lists candidates.
    with pytest.raises(ConfigError, match=r"matches no module.*q_proj"):
        lorakit.inject(llama, lorakit.LoraConfig(target_modules=["proj"]))
    assert not adapted(llama) and "lora_state" not in llama.__dict__


def test_exclude_layers_and_patterns(llama):
    cfg = lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear", exclude_modules=["down_proj"],
                             layers_to_transform=[1], rank_pattern={r"self_attn\.q_proj": 2},
                             alpha_pattern={"v_proj": 32})
    lorakit.inject(llama, cfg)
    names = adapted(llama)
    assert all(".layers.1." in n for n in names) and not any("down_proj" in n for n in names)
    q = llama.get_submodule("model.layers.1.self_attn.q_proj")
    v = llama.get_submodule("model.layers.1.self_attn.v_proj")
    k = llama.get_submodule("model.layers.1.self_attn.k_proj")
    assert (q.rank["default"], q.scaling["default"]) == (2, 4.0)
    assert (v.rank["default"], v.scaling["default"]) == (4, 8.0)
    assert (k.rank["default"], k.scaling["default"]) == (4, 2.0)


def test_unsupported_target_names_module_and_type(llama):
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.input_layernorm.*LlamaRMSNorm"):
        lorakit.inject(llama, lorakit.LoraConfig(target_modules=["input_layernorm"]))
    with pytest.raises(ConfigError, match=r"self_attn.*LlamaAttention"):
        lorakit.inject(llama, lorakit.LoraConfig(target_modules=["self_attn"]))
    assert not adapted(llama)


@pytest.mark.parametrize("kwargs, message", [
    ({"r": 0}, "r must be a positive integer"),
    ({"alpha": -1}, "alpha must be a positive"),
    ({"dropout": 1.0}, "dropout must be in"),
    ({"target_modules": []}, "target_modules is empty"),
    ({"bias": "some"}, "bias must be one of"),
    ({"rank_pattern": {"q": 0}}, "rank_pattern"),
    ({"target_modules": "q_proj("}, "not a valid one"),
    ({"fused_projections": {"c_attn": [False, False]}}, "at least one True"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        lorakit.LoraConfig(**kwargs)


def test_injected_model_equals_base_and_freezes_everything_else(llama, tokens):
    expected = llama(tokens).logits
    lorakit.inject(llama, lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert torch.equal(llama(tokens).logits, expected)
    trainable = {n for n, p in llama.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    n_lora = sum(p.numel() for n, p in llama.named_parameters() if ".lora_" in n)
    n_total = sum(p.numel() for p in set(llama.parameters()))
    assert lorakit.trainable_parameters(llama) == (n_lora, n_total)
    assert n_lora == 2 * 4 * ((32 + 32) + (32 + 16))  # 2 layers × r × ((d+d) for q + (d+d_kv) for v)


def test_bias_modes_and_modules_to_save(gpt2):
    lorakit.inject(gpt2, lorakit.LoraConfig(target_modules=["c_attn"], bias="lora_only"))
    trainable = {n for n, p in gpt2.named_parameters() if p.requires_grad}
    assert "transformer.h.0.attn.c_attn.base_layer.bias" in trainable
    assert "transformer.h.0.attn.c_proj.bias" not in trainable

    llama = tiny_llama()
    llama.model.norm.register_parameter("bias", nn.Parameter(torch.zeros(32)))  # a bias to find
    lorakit.inject(llama, lorakit.LoraConfig(target_modules=["q_proj"], bias="all", modules_to_save=["lm_head"]))
    trainable = {n for n, p in llama.named_parameters() if p.requires_grad}
    assert "model.norm.bias" in trainable
    assert "lm_head.modules_to_save.default.weight" in trainable
    assert isinstance(llama.lm_head, TrainableCopy)
    assert "lm_head.original_module.weight" not in trainable


def test_modules_to_save_copy_is_used_and_tied_original_untouched(tokens):
    llama = tiny_llama()
    embed_before = llama.model.embed_tokens.weight.detach().clone()
    lorakit.inject(llama, lorakit.LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with torch.no_grad():
        llama.lm_head.modules_to_save["default"].weight.add_(1.0)
    changed = llama(tokens).logits
    with lorakit.disabled(llama):
        base = llama(tokens).logits
    assert not torch.allclose(changed, base)
    assert torch.equal(llama.model.embed_tokens.weight, embed_before)


def test_unload_merge_gives_plain_model_that_transformers_saves(tmp_path, tokens):
    from transformers import LlamaForCausalLM

    llama = tiny_llama()
    lorakit.inject(llama, lorakit.LoraConfig(r=4, target_modules="all-linear"))
    randomize_adapters(llama)
    expected = llama(tokens).logits
    plain = lorakit.unload(llama, merge=True)
    assert not any(isinstance(m, (lorakit.LoraLayer, TrainableCopy)) for m in plain.modules())
    assert "lora_state" not in plain.__dict__
    assert all(p.requires_grad for p in plain.parameters())  # as before inject
    assert torch.allclose(plain(tokens).logits, expected, atol=1e-5)
    plain.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.allclose(reloaded(tokens).logits, expected, atol=1e-5)


def test_unload_without_merge_restores_base(tokens):
    llama = tiny_llama()
    state = copy.deepcopy(llama.state_dict())
    expected = llama(tokens).logits
    lorakit.inject(llama, lorakit.LoraConfig(r=4, target_modules="all-linear"))
    randomize_adapters(llama)
    lorakit.merge(llama)
    plain = lorakit.unload(llama, merge=False)
    assert plain.state_dict().keys() == state.keys()
    assert all(torch.allclose(plain.state_dict()[k], v, atol=1e-6) for k, v in state.items())
    assert torch.allclose(plain(tokens).logits, expected, atol=1e-5)


def test_delete_adapter_restores_layers(llama, tokens):
    expected = llama(tokens).logits
    lorakit.inject(llama, lorakit.LoraConfig(target_modules=["q_proj"]), name="a")
    lorakit.inject(llama, lorakit.LoraConfig(target_modules=["q_proj", "v_proj"]), name="b")
    randomize_adapters(llama)
    lorakit.delete_adapter(llama, "b")
    assert set(adapted(llama)) == {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}
    assert lorakit.adapter_names(llama) == ["a"]
    lorakit.delete_adapter(llama, "a")
    assert not adapted(llama) and "lora_state" not in llama.__dict__
    assert torch.equal(llama(tokens).logits, expected)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        lorakit.delete_adapter(llama, "a")


def test_second_adapter_keeps_active_set_and_name_clash(llama):
    lorakit.inject(llama, lorakit.LoraConfig(target_modules=["q_proj"]), name="a")
    lorakit.inject(llama, lorakit.LoraConfig(target_modules=["q_proj"]), name="b")
    assert lorakit.active_adapters(llama) == ["a"]
    trainable = {n for n, p in llama.named_parameters() if p.requires_grad}
    assert trainable and all(".b" in n for n in trainable)  # the newest adapter is the one to train
    with pytest.raises(ValueError, match="already on this model"):
        lorakit.inject(llama, lorakit.LoraConfig(target_modules=["q_proj"]), name="a")


def test_gpt2_fused_c_attn_paper_setting(gpt2, tokens):
    expected = gpt2(tokens).logits
    cfg = lorakit.LoraConfig(r=4, target_modules=["c_attn"], fused_projections={"c_attn": [True, False, True]})
    lorakit.inject(gpt2, cfg)
    layer = gpt2.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoraSlicedLinear) and layer.fan_in_fan_out
    assert torch.equal(gpt2(tokens).logits, expected)
    assert lorakit.trainable_parameters(gpt2)[0] == 2 * 2 * 4 * (32 + 32)  # layers × {q,v} × r × (d_in+d_slice)
    with pytest.raises(ConfigError, match="fused_projections names 'c_proj'"):
        lorakit.inject(tiny_gpt2(), lorakit.LoraConfig(target_modules=["c_attn"], fused_projections={"c_proj": [1, 1]}))


class SmallCNN(nn.Module):
    """Paper §8's point: any network with dense layers, not only Transformers."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2),
                                      nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x):
        return self.head(self.pool(self.features(x)))


def test_non_transformer_network_trains_only_adapter():
    torch.manual_seed(0)
    net = SmallCNN()
    x = torch.randn(4, 3, 10, 10)
    lorakit.inject(net, lorakit.LoraConfig(r=2, alpha=2, target_modules=["features.0", "features.2", "head.1"]))
    assert isinstance(net.features[0], LoraConv) and isinstance(net.head[1], LoraLinear)
    frozen = {n: p.detach().clone() for n, p in net.named_parameters() if not p.requires_grad}
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in net.named_parameters() if n in frozen)
    assert net.features[0].lora_B["default"].abs().sum() > 0  # B moved away from 0


def test_embedding_target(llama, tokens):
    lorakit.inject(llama, lorakit.LoraConfig(r=4, target_modules=["embed_tokens"]))
    emb = llama.model.embed_tokens
    assert isinstance(emb, LoraEmbedding)
    assert torch.all(emb.lora_A["default"] == 0) and emb.lora_B["default"].abs().sum() > 0


def test_inject_keeps_eval_mode_so_dropout_stays_off(llama, tokens):
    lorakit.inject(llama, lorakit.LoraConfig(target_modules=["q_proj"], dropout=0.5))
    assert not any(m.training for m in llama.modules())
    randomize_adapters(llama)
    assert torch.equal(llama(tokens).logits, llama(tokens).logits)


@pytest.mark.parametrize("name", ["a.b", ""])
def test_unusable_adapter_name_leaves_model_untouched(llama, name):
    with pytest.raises(ValueError, match="not usable"):
        lorakit.inject(llama, lorakit.LoraConfig(target_modules=["q_proj"]), name=name)
    assert not adapted(llama) and "lora_state" not in llama.__dict__
