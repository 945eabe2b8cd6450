"""The public API as a demanding user drives it, on tiny models from configs (Llama, tied Llama,
T5, RoBERTa): merges that must compute what the unmerged model computes, PEFT files that must
load, and wrong input that must be refused with a clear error, leaving the model as it was.

PEFT is the reference where it does the same thing; logits are compared in float64.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.inject import lora_modules

import conftest

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*tie_word_embeddings.*:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*tied.*:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*save_embedding_layers.*:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*Could not find a config file.*:UserWarning"),
]

VOCAB = 100
IDS = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(5))


def tiny_llama(tied: bool = False) -> torch.nn.Module:
    return conftest.tiny_llama(tied=tied).double().eval()


def tiny_t5() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                   decoder_start_token_id=0)  # tie_word_embeddings: shared = lm_head
    return transformers.T5ForConditionalGeneration(config).double().eval()


def tiny_roberta() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=64, max_position_embeddings=64, num_labels=3, pad_token_id=1)
    return transformers.RobertaForSequenceClassification(config).double().eval()


def logits(model: torch.nn.Module) -> torch.Tensor:
    inner = getattr(getattr(model, "base_model", None), "model", model)
    with torch.no_grad():
        if isinstance(inner, transformers.T5ForConditionalGeneration):
            return model(input_ids=IDS, decoder_input_ids=IDS[:, :4]).logits
        return model(input_ids=IDS).logits


def randomize(model: torch.nn.Module, seed: int = 1) -> None:
    """Random LoRA factors and trainable copies (B and embedding A too), on PEFT or lorakit models."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name or ".modules_to_save." in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


# --- merging into a weight that another module also uses --------------------------------------

TIED = [
    pytest.param(lambda: tiny_llama(tied=True), ["embed_tokens", "q_proj"], "lm_head", id="llama-tied-embedding"),
    pytest.param(lambda: tiny_llama(tied=True), ["embed_tokens", "lm_head"], "lm_head", id="llama-tied-both-adapted"),
    pytest.param(lambda: tiny_llama(tied=True), ["lm_head"], "embed_tokens", id="llama-tied-lm-head"),
    pytest.param(tiny_t5, ["shared", "q"], "embed_tokens", id="t5-shared"),
]


@pytest.mark.parametrize("build, targets, words", TIED)
def test_merge_into_a_tied_weight_is_refused_and_changes_nothing(build, targets, words) -> None:
    model = lorakit.inject(build(), lorakit.LoraConfig(r=4, alpha=8, target_modules=targets), dtype=torch.float64)
    randomize(model)
    adapted, before = logits(model), snapshot(model)
    with pytest.raises(lorakit.MergeError, match=f"tied weights.*{words}|{words}.*tied weights"):
        lorakit.merge(model)
    assert_same_state(model, before)
    with pytest.raises(lorakit.MergeError, match="tied weights"):
        lorakit.unload(model, merge=True)
    assert_same_state(model, before)
    assert torch.equal(logits(model), adapted)  # still the adapted model, unmerged


def test_merge_after_untying_gives_the_unmerged_outputs() -> None:
    model = tiny_llama(tied=True)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # what the error says to do
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["embed_tokens", "q_proj"]),
                   dtype=torch.float64)
    randomize(model)
    adapted = logits(model)
    lorakit.merge(model)
    assert (logits(model) - adapted).abs().max() < 1e-10
    plain = lorakit.unload(model, merge=True)
    assert (logits(plain) - adapted).abs().max() < 1e-10


# --- PEFT files lorakit must read --------------------------------------------------------------

def test_peft_bias_all_with_a_nested_trainable_copy_loads(tmp_path: Path) -> None:
    # RoBERTa's classifier holds dense and out_proj; with bias="all" PEFT writes the copy's biases as
    # classifier.modules_to_save.default.dense.bias (its adapter name kept in the key).
    base = tiny_roberta()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"],
                             bias="all")
    reference = peft.get_peft_model(copy.deepcopy(base), config)
    randomize(reference)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if name.endswith("bias") and ".original_module." not in name:
                p.add_(0.5)  # trained biases, in the copy and in the base
    reference.eval().save_pretrained(tmp_path)
    model = lorakit.load_adapter(copy.deepcopy(base), tmp_path, dtype=torch.float64)
    assert (logits(reference) - logits(base)).abs().max() > 1e-2
    assert (logits(model) - logits(reference)).abs().max() < 1e-10


def test_peft_layers_pattern_selects_the_same_layers(tmp_path: Path) -> None:
    # T5's names hold two indices, block.1.layer.0: layers_pattern="layer" picks the second.
    base = tiny_t5()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], layers_to_transform=[0],
                             layers_pattern="layer")
    reference = peft.get_peft_model(copy.deepcopy(base), config)
    randomize(reference)
    reference.eval().save_pretrained(tmp_path / "peft")
    model = lorakit.load_adapter(copy.deepcopy(base), tmp_path / "peft", dtype=torch.float64)
    want = sorted(n.removeprefix("base_model.model.") for n, m in reference.named_modules()
                  if isinstance(m, peft.tuners.lora.LoraLayer))
    assert sorted(n for n, _ in lora_modules(model)) == want
    assert (logits(model) - logits(reference)).abs().max() < 1e-10

    lorakit.save_adapter(model, tmp_path / "lorakit")
    saved = json.loads((tmp_path / "lorakit" / "adapter_config.json").read_text())
    assert saved["layers_pattern"] == "layer" and saved["layers_to_transform"] == [0]
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lorakit").eval()
    assert (logits(again) - logits(reference)).abs().max() < 1e-10


def test_target_that_modules_to_save_also_names_saves_and_loads(tmp_path: Path) -> None:
    # PEFT's rule: the full copy wins and the module gets no LoRA; the saved adapter must load again.
    config = lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "lm_head"], modules_to_save=["lm_head"])
    with pytest.warns(UserWarning, match="modules_to_save"):
        model = lorakit.inject(tiny_llama(), config, dtype=torch.float64)
    assert not any(n == "lm_head" for n, m in lora_modules(model) if isinstance(m, lorakit.LoraLayer))
    randomize(model)
    lorakit.save_adapter(model, tmp_path)
    with pytest.warns(UserWarning, match="modules_to_save"):
        again = lorakit.load_adapter(tiny_llama(), tmp_path, dtype=torch.float64)
    assert (logits(again) - logits(model)).abs().max() < 1e-10
    in_peft = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert (logits(in_peft) - logits(model)).abs().max() < 1e-10


# --- wrong input: a clear error, nothing changed -----------------------------------------------

BAD_CONFIGS = [
    pytest.param(dict(target_modules=[1, 2]), "target_modules", id="target-not-names"),
    pytest.param(dict(exclude_modules=[3]), "exclude_modules", id="exclude-not-names"),
    pytest.param(dict(alpha="8"), "alpha", id="alpha-string"),
    pytest.param(dict(r=True), "r must", id="r-bool"),
    pytest.param(dict(dropout="0.1"), "dropout", id="dropout-string"),
    pytest.param(dict(layers_to_transform="0"), "layers_to_transform", id="layers-string"),
    pytest.param(dict(layers_to_transform=[0.5]), "layers_to_transform", id="layers-float"),
    pytest.param(dict(alpha_pattern={"q_proj": -2.0}), "alpha_pattern", id="alpha-pattern-negative"),
    pytest.param(dict(use_rslora="yes"), "use_rslora", id="rslora-string"),
]


@pytest.mark.parametrize("kwargs, words", BAD_CONFIGS)
def test_bad_config_values_are_config_errors(kwargs, words) -> None:
    with pytest.raises(lorakit.ConfigError, match=words):
        lorakit.LoraConfig(**kwargs)


def test_one_name_or_index_stands_for_a_list_of_one() -> None:
    config = lorakit.LoraConfig(target_modules=["q_proj"], modules_to_save="lm_head", layers_to_transform=1)
    assert config.modules_to_save == ("lm_head",) and config.layers_to_transform == (1,)
    model = lorakit.inject(tiny_llama(), config)
    names = [n for n, _ in lora_modules(model)]
    assert names == ["model.layers.1.self_attn.q_proj", "lm_head"]


@pytest.mark.parametrize("names, error, words", [
    pytest.param(["a", "a"], ValueError, "more than once", id="twice"),
    pytest.param(3, TypeError, "adapter name", id="not-a-name"),
    pytest.param([None], TypeError, "adapter name", id="list-of-none"),
])
def test_use_refuses_what_would_compute_wrongly(names, error, words) -> None:
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj"]), name="a",
                           dtype=torch.float64)
    randomize(model)
    adapted = logits(model)
    with pytest.raises(error, match=words):
        lorakit.use(model, names)
    assert lorakit.active_adapters(model) == ["a"]
    assert torch.equal(logits(model), adapted)


def test_modules_to_save_on_an_adapted_module_names_the_adapter() -> None:
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj"]), name="a")
    before = snapshot(model)
    with pytest.raises(lorakit.ConfigError, match="carries LoRA adapters .*'a'"):
        lorakit.inject(model, lorakit.LoraConfig(target_modules=["k_proj"], modules_to_save=["q_proj"]), name="b")
    assert lorakit.adapter_names(model) == ["a"]
    assert_same_state(model, before)


# --- model code that reads an adapted module's weight ----------------------------------------------

def test_model_code_reads_an_adapted_modules_weight_and_bias(tmp_path):
    """T5's feed-forward reads `self.wo.weight.dtype`: an adapted wo must answer with the base
    layer's weight, and the model then computes what PEFT computes."""
    model = lorakit.inject(tiny_t5(), lorakit.LoraConfig(r=2, alpha=4, target_modules=["wo", "wi"]),
                           dtype=torch.float64)
    randomize(model, seed=3)
    layer = model.get_submodule("encoder.block.0.layer.1.DenseReluDense.wo")
    assert layer.weight is layer.base_layer.weight and layer.bias is None
    ours = logits(model)
    lorakit.save_adapter(model, tmp_path)
    reference = peft.PeftModel.from_pretrained(tiny_t5(), tmp_path).eval()
    torch.testing.assert_close(ours, logits(reference), rtol=1e-10, atol=1e-10)


def test_an_adapter_of_another_model_says_so(tmp_path):
    gpt2 = lorakit.inject(conftest.tiny_gpt2(), lorakit.LoraConfig(r=2, target_modules=["c_attn"]))
    lorakit.save_adapter(gpt2, tmp_path, base_model_name_or_path="gpt2-tiny")
    with pytest.raises(lorakit.io.AdapterFileError) as e:
        lorakit.load_adapter(tiny_llama(), tmp_path)
    message = str(e.value)
    assert "['c_attn'] match no module of this LlamaForCausalLM" in message and "'gpt2-tiny'" in message
    assert "missing_targets" not in message
