"""Tests for lorakit.io: adapters on disk in PEFT's exact layout.

PEFT is the reference: an adapter PEFT saves must give the same logits in lorakit, and one lorakit
saves must give the same logits in PEFT. Every adapter here is random (B ≠ 0, embedding A ≠ 0),
so a tensor loaded into the wrong place, transposed or scaled wrongly changes the logits.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import lorakit
import lorakit.io as lio
from lorakit.inject import lora_state
from lorakit.layers import LoraSlicedLinear

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

pytestmark = [
    # PEFT's notes on tied embeddings, Conv1D's fan_in_fan_out and saving embedding layers are
    # expected for these configs; they are noise here.
    pytest.mark.filterwarnings("ignore:.*tie_word_embeddings.*:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*fan_in_fan_out.*:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*save_embedding_layers.*:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*Could not find a config file.*:UserWarning"),
    pytest.mark.filterwarnings("ignore:Careful, disabling adapter layers with bias:UserWarning"),
]

ATOL = 1e-5
VOCAB = 100
IDS = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1234))


# --- tiny models from configs ------------------------------------------------------------------

def tiny_llama(tied: bool = False, hidden: int = 32) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(config).float().eval()


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(config).float().eval()


def tiny_bert() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64, num_labels=3)
    return transformers.BertForSequenceClassification(config).float().eval()


class TinyConvNet(torch.nn.Module):
    """Not a Transformer (DESIGN checklist 8): Conv1d, Conv2d and Linear over embedded tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, 8)
        self.conv1d = torch.nn.Conv1d(8, 8, kernel_size=3, padding=1)
        self.conv2d = torch.nn.Conv2d(1, 4, kernel_size=3, stride=2, padding=1)
        self.head = torch.nn.Linear(4 * 4 * 4, VOCAB)

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        h = self.conv1d(self.embed(input_ids).transpose(1, 2))  # (N, 8, T)
        h = self.conv2d(h[:, None, :, :7])                      # (N, 1, 8, 7) -> (N, 4, 4, 4)
        return SimpleNamespace(logits=self.head(h.flatten(1)))


def tiny_convnet() -> torch.nn.Module:
    torch.manual_seed(0)
    return TinyConvNet().eval()


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def randomize_adapter(model: torch.nn.Module, bias: str = "none", seed: int = 1) -> None:
    """Random normal values for every LoRA factor (B and embedding A included, which start at 0),
    every trainable copy, and the biases that ``bias`` trains. Works on PEFT and lorakit models:
    both name these ``lora_A/lora_B/lora_embedding_*``, ``modules_to_save`` and ``base_layer``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            trained_bias = name.endswith("bias") and ".original_module." not in name and (
                bias == "all" or (bias == "lora_only" and name.endswith(".base_layer.bias")))
            if ".lora_" in name or ".modules_to_save." in name or trained_bias:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


# --- the table of (model, config) cases --------------------------------------------------------

@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[], torch.nn.Module]
    kwargs: dict[str, Any]  # lorakit.LoraConfig fields; PEFT's are derived by peft_config()
    peft_extra: dict[str, Any] = field(default_factory=dict)  # PEFT-only fields (fan_in_fan_out, task_type)

    def lorakit_config(self) -> lorakit.LoraConfig:
        return lorakit.LoraConfig(**self.kwargs)

    def peft_config(self) -> "peft.LoraConfig":
        kw = copy.deepcopy(self.kwargs)  # PEFT extends modules_to_save in place (task_type="SEQ_CLS")
        kw["lora_alpha"] = kw.pop("alpha")
        kw["lora_dropout"] = kw.pop("dropout", 0.0)
        kw["init_lora_weights"] = {"kaiming": True, "gaussian": "gaussian"}[kw.pop("init", "kaiming")]
        return peft.LoraConfig(**kw, **self.peft_extra)

    @property
    def bias(self) -> str:
        return self.kwargs.get("bias", "none")


LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CASES = [
    Case("llama-all-linear", tiny_llama, dict(r=4, alpha=8, target_modules=LLAMA_ALL)),
    Case("llama-rank-alpha-pattern", tiny_llama,
         dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
              rank_pattern={"v_proj": 2, r"layers\.1\.mlp\.down_proj": 6},
              alpha_pattern={"q_proj": 3.0, r"layers\.0\.mlp\.down_proj": 20.0})),
    Case("llama-embedding", tiny_llama, dict(r=4, alpha=8, target_modules=["embed_tokens", "q_proj"])),
    Case("llama-tied-embedding", lambda: tiny_llama(tied=True),
         dict(r=4, alpha=8, target_modules=["embed_tokens", "q_proj"])),
    # Tied input/output embeddings (as in SmolLM2): PEFT deep-copies lm_head, so the trainable copy
    # is untied from embed_tokens, which keeps the base weight.
    Case("llama-tied-lm-head-saved", lambda: tiny_llama(tied=True),
         dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])),
    Case("gpt2-c_attn-conv1d", tiny_gpt2, dict(r=4, alpha=8, target_modules=["c_attn"]),
         peft_extra=dict(fan_in_fan_out=True)),
    Case("bert-classifier-bias-all", tiny_bert,
         dict(r=4, alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"], bias="all")),
    Case("bert-bias-lora-only", tiny_bert, dict(r=4, alpha=8, target_modules=["query", "value"], bias="lora_only")),
    # PEFT's task_type="SEQ_CLS" writes modules_to_save=["classifier", "score"]; BERT has no "score".
    Case("bert-seq-cls-task-type", tiny_bert,
         dict(r=4, alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"]),
         peft_extra=dict(task_type="SEQ_CLS")),
    Case("llama-rslora-causal-lm", tiny_llama, dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True),
         peft_extra=dict(task_type="CAUSAL_LM")),
    Case("llama-exclude-layers-gaussian", tiny_llama,
         dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], layers_to_transform=[0, 1],
              exclude_modules=["model.layers.0.mlp.up_proj"], init="gaussian")),
    # Small α: with random A and B (fan-in 72) the adapter would otherwise swamp the logits (~200).
    Case("convnet-conv1d-conv2d-linear", tiny_convnet,
         dict(r=2, alpha=0.02, target_modules=["conv1d", "conv2d", "head"])),
]
CASE_PARAMS = [pytest.param(c, id=c.id) for c in CASES]

# lorakit only: adapters on the q and v slices of GPT-2's fused c_attn (the paper's setting, §7.1).
FUSED = Case("gpt2-fused-q-v", tiny_gpt2,
             dict(r=4, alpha=8, target_modules=["c_attn"], fused_projections={"c_attn": [True, False, True]}))
FUSED_RSLORA_BIAS = Case("gpt2-fused-q-v-rslora-bias-all", tiny_gpt2,
                         dict(r=4, alpha=8, target_modules=["c_attn", "c_fc"], use_rslora=True, bias="all",
                              fused_projections={"c_attn": [True, False, True]}))
# PEFT refuses layers_to_transform beside a string target_modules; lorakit allows it.
REGEX_LAYERS = Case("llama-regex-layers", tiny_llama,
                    dict(r=4, alpha=8, target_modules=r".*\.(q|v)_proj", layers_to_transform=[1],
                         exclude_modules=r".*\.v_proj"))
ALL_LINEAR_LAYERS = Case("gpt2-all-linear-layers", tiny_gpt2,
                         dict(r=4, alpha=8, target_modules="all-linear", layers_to_transform=[0]))
LORAKIT_CASE_PARAMS = [*CASE_PARAMS, *(pytest.param(c, id=c.id)
                                       for c in (FUSED, FUSED_RSLORA_BIAS, REGEX_LAYERS, ALL_LINEAR_LAYERS))]


def peft_adapted(case: Case, base: torch.nn.Module) -> torch.nn.Module:
    model = peft.get_peft_model(copy.deepcopy(base), case.peft_config())
    randomize_adapter(model, case.bias)
    return model.eval()


def lorakit_adapted(case: Case, base: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    model = lorakit.inject(copy.deepcopy(base), case.lorakit_config())
    randomize_adapter(model, case.bias, seed=seed)
    return model.eval()


def assert_close_and_adapted(got: torch.Tensor, want: torch.Tensor, base: torch.Tensor) -> None:
    # A tiny BERT's class logits are ~1e-2, so "changed" is measured against the tolerance.
    assert (want - base).abs().max() > 100 * ATOL, "the adapter does not change the logits; the test proves nothing"
    diff = (got - want).abs().max().item()
    assert diff <= ATOL, f"max |Δlogits| = {diff:.3g} > {ATOL}"


# --- 1. PEFT -> lorakit ------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASE_PARAMS)
def test_peft_adapter_loads_in_lorakit(case: Case, tmp_path: Path) -> None:
    base = case.build()
    reference = peft_adapted(case, base)
    reference.save_pretrained(tmp_path)

    model = lorakit.load_adapter(copy.deepcopy(base), tmp_path)

    assert lorakit.adapter_names(model) == ["default"]
    assert_close_and_adapted(logits(model), logits(reference), logits(base))
    with reference.disable_adapter(), lorakit.disabled(model):  # what the file wrote into the base, if anything
        assert (logits(model) - logits(reference)).abs().max() <= ATOL


def test_tied_lm_head_copy_is_untied_as_in_peft(tmp_path: Path) -> None:
    """PEFT deep-copies a tied lm_head into modules_to_save: the copy is trained and saved, the
    input embedding keeps the base matrix. lorakit must do the same, not tie the copy back."""
    case = next(c for c in CASES if c.id == "llama-tied-lm-head-saved")
    base = case.build()
    assert base.lm_head.weight is base.model.embed_tokens.weight
    reference = peft_adapted(case, base)
    reference.save_pretrained(tmp_path)

    model = lorakit.load_adapter(copy.deepcopy(base), tmp_path)

    copy_weight = model.lm_head.modules_to_save["default"].weight
    assert torch.equal(copy_weight, reference.base_model.model.lm_head.modules_to_save["default"].weight)
    assert torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)
    assert copy_weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


# --- 2. lorakit -> PEFT ------------------------------------------------------------------------

@pytest.mark.parametrize("case", LORAKIT_CASE_PARAMS)
def test_lorakit_adapter_loads_in_peft(case: Case, tmp_path: Path) -> None:
    base = case.build()
    model = lorakit_adapted(case, base)
    lorakit.save_adapter(model, tmp_path)

    reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()

    assert_close_and_adapted(logits(reference), logits(model), logits(base))
    with reference.disable_adapter(), lorakit.disabled(model):
        assert (logits(model) - logits(reference)).abs().max() <= ATOL


def test_adapter_with_dropout_loads_into_eval_model_deterministically(tmp_path: Path) -> None:
    base = tiny_llama()  # in eval mode
    case = Case("dropout", tiny_llama, dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"], dropout=0.5))
    reference = peft_adapted(case, base)
    reference.save_pretrained(tmp_path)

    model = lorakit.load_adapter(copy.deepcopy(base), tmp_path)

    assert [n for n, m in model.named_modules() if m.training] == []
    assert_close_and_adapted(logits(model), logits(reference), logits(base))


def test_merged_adapter_saves_as_unmerged(tmp_path: Path) -> None:
    """Merging folds ΔW into the base weights; the file still holds only A and B, once."""
    base = tiny_llama()
    model = lorakit_adapted(CASES[0], base)
    lorakit.merge(model)
    lorakit.save_adapter(model, tmp_path)

    reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()

    assert_close_and_adapted(logits(reference), logits(model), logits(base))


@pytest.mark.parametrize("case", [FUSED, FUSED_RSLORA_BIAS], ids=lambda c: c.id)
def test_fused_adapter_loads_back_as_fused(case: Case, tmp_path: Path) -> None:
    base = case.build()
    model = lorakit_adapted(case, base)
    lorakit.save_adapter(model, tmp_path)

    loaded = lorakit.load_adapter(copy.deepcopy(base), tmp_path)

    layers = [m for n, m in loaded.named_modules() if n.endswith("c_attn")]
    assert len(layers) == 2 and all(type(m) is LoraSlicedLinear for m in layers)
    assert all(m.slices == (True, False, True) for m in layers)
    assert_close_and_adapted(logits(loaded), logits(model), logits(base))


# --- 3. lorakit -> lorakit ---------------------------------------------------------------------

@pytest.mark.parametrize("case", LORAKIT_CASE_PARAMS)
def test_round_trip_keeps_config_and_tensors(case: Case, tmp_path: Path) -> None:
    base = case.build()
    model = lorakit_adapted(case, base)
    lorakit.save_adapter(model, tmp_path)

    loaded = lorakit.load_adapter(copy.deepcopy(base), tmp_path, name="task")

    assert lora_state(loaded).configs["task"] == case.lorakit_config()
    saved, back = lio.adapter_state_dict(model, "default"), lio.adapter_state_dict(loaded, "task")
    assert saved.keys() == back.keys()
    for key in saved:
        assert torch.equal(saved[key], back[key]), key
    # The factors themselves, not only their PEFT view, come back bit for bit.
    own = {n.replace(".default", ""): p for n, p in model.named_parameters() if ".lora_" in n}
    got = {n.replace(".task", ""): p for n, p in loaded.named_parameters() if ".lora_" in n}
    assert own.keys() == got.keys()
    assert all(torch.equal(own[k], got[k]) for k in own)
    assert torch.equal(logits(loaded), logits(model))


# --- 4. bad input ------------------------------------------------------------------------------

QV = Case("llama-q-v", tiny_llama, dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))


def snapshot(model: torch.nn.Module) -> dict[str, Any]:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "types": [(n, type(m)) for n, m in model.named_modules()],
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "adapters": lorakit.adapter_names(model),
    }


def assert_unchanged(model: torch.nn.Module, before: dict[str, Any]) -> None:
    after = snapshot(model)
    assert after["types"] == before["types"]
    assert after["adapters"] == before["adapters"]
    assert after["grad"] == before["grad"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key


def rewrite_tensors(directory: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    file = directory / lio.WEIGHTS_NAME
    with safe_open(str(file), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    change(tensors)
    save_file(tensors, str(file), metadata=metadata)


def rewrite_json(directory: Path, change: Callable[[dict[str, Any]], None]) -> None:
    file = directory / lio.CONFIG_NAME
    d = json.loads(file.read_text())
    change(d)
    file.write_text(json.dumps(d))


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def _missing_dir(d: Path) -> Path:
    return d / "nope"


def _no_config(d: Path) -> Path:
    (d / lio.CONFIG_NAME).unlink()
    return d


def _no_weights(d: Path) -> Path:
    (d / lio.WEIGHTS_NAME).unlink()
    return d


def _only_bin(d: Path) -> Path:
    (d / lio.WEIGHTS_NAME).rename(d / "adapter_model.bin")
    return d


def _bad_json(d: Path) -> Path:
    (d / lio.CONFIG_NAME).write_text('{"peft_type": "LORA", "r": 4,')
    return d


def _ia3(d: Path) -> Path:
    rewrite_json(d, lambda j: j.update(peft_type="IA3"))
    return d


def _unknown_lora_key(d: Path) -> Path:
    rewrite_tensors(d, lambda t: t.update({
        "base_model.model.model.layers.0.self_attn.nope.lora_A.weight": torch.zeros(4, 32)}))
    return d


def _unknown_other_key(d: Path) -> Path:
    rewrite_tensors(d, lambda t: t.update({"base_model.model.model.nope.weight": torch.zeros(3)}))
    return d


def _bad_shape(d: Path) -> Path:
    rewrite_tensors(d, lambda t: t.update({f"{Q0}.lora_B.weight": torch.zeros(32, 5)}))
    return d


def _truncated(d: Path) -> Path:
    file = d / lio.WEIGHTS_NAME
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    return d


def _garbage(d: Path) -> Path:
    g = torch.Generator().manual_seed(3)
    (d / lio.WEIGHTS_NAME).write_bytes(bytes(torch.randint(0, 256, (4096,), generator=g, dtype=torch.uint8).tolist()))
    return d


def _json_not_object(d: Path) -> Path:
    (d / lio.CONFIG_NAME).write_text("[]")
    return d


def _json_edited(d: Path) -> Path:
    rewrite_json(d, lambda j: j.update(lora_alpha=32))  # PEFT would use 32, lorakit's own copy says 8
    return d


def _no_prefix(d: Path) -> Path:
    rewrite_tensors(d, lambda t: t.update({"model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32)}))
    return d


def _tensor_missing(d: Path) -> Path:
    rewrite_tensors(d, lambda t: t.pop(f"{Q0}.lora_B.weight"))
    return d


C0 = "base_model.model.transformer.h.0.attn.c_attn"


def _fused_b_outside_slices(d: Path) -> Path:
    def change(t):
        t[f"{C0}.lora_B.weight"][40, 0] = 1.0  # row 40 is in the k slice (32..63), which has no adapter
    rewrite_tensors(d, change)
    return d


# GPT-2, q and v slices of c_attn, bias="all": the file carries biases, which are written into the
# base model, so a failure after that point must put them back.
FUSED_BIAS = Case("gpt2-fused-bias-all", tiny_gpt2,
                  dict(r=4, alpha=8, target_modules=["c_attn"], bias="all",
                       fused_projections={"c_attn": [True, False, True]}))
OTHER_ADAPTER = {QV.id: ["k_proj", "q_proj"], FUSED_BIAS.id: ["c_fc"]}

# (id, adapter, how to break its directory, words the message must contain)
BAD_INPUTS = [
    ("missing-directory", QV, _missing_dir, ["nope", "no such adapter directory"]),
    ("missing-config", QV, _no_config, [lio.CONFIG_NAME, "missing"]),
    ("missing-safetensors", QV, _no_weights, [lio.WEIGHTS_NAME, "missing"]),
    ("only-adapter_model.bin", QV, _only_bin, [lio.WEIGHTS_NAME, "missing", ".bin"]),
    ("invalid-json", QV, _bad_json, [lio.CONFIG_NAME, "not valid JSON"]),
    ("json-not-an-object", QV, _json_not_object, [lio.CONFIG_NAME, "list"]),
    ("peft_type-IA3", QV, _ia3, [lio.CONFIG_NAME, "IA3"]),
    ("json-disagrees-with-lorakit-copy", QV, _json_edited, [lio.CONFIG_NAME, lio.WEIGHTS_NAME, "disagree", "alpha"]),
    ("lora-key-for-no-module", QV, _unknown_lora_key, [lio.WEIGHTS_NAME, "self_attn.nope"]),
    ("other-key-for-no-module", QV, _unknown_other_key, [lio.WEIGHTS_NAME, "model.nope.weight", "matches no"]),
    ("key-without-peft-prefix", QV, _no_prefix, [lio.WEIGHTS_NAME, "base_model.model."]),
    ("tensor-missing", QV, _tensor_missing, [lio.WEIGHTS_NAME, "q_proj.lora_B", "lacks"]),
    ("shape-does-not-fit", QV, _bad_shape, [lio.WEIGHTS_NAME, "q_proj.lora_B", "(32, 5)", "(32, 4)"]),
    ("truncated-safetensors", QV, _truncated, [lio.WEIGHTS_NAME, "truncated"]),
    ("garbage-safetensors", QV, _garbage, [lio.WEIGHTS_NAME, "not a readable safetensors"]),
    ("fused-b-outside-slices", FUSED_BIAS, _fused_b_outside_slices, [lio.WEIGHTS_NAME, "c_attn.lora_B", "outside"]),
]


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory) -> Callable[[Case], Path]:
    """A valid lorakit adapter directory per case, saved once; tests copy it before breaking it."""
    cache: dict[str, Path] = {}

    def get(case: Case) -> Path:
        if case.id not in cache:
            cache[case.id] = tmp_path_factory.mktemp(case.id)
            lorakit.save_adapter(lorakit_adapted(case, case.build()), cache[case.id])
        return cache[case.id]
    return get


def copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for file in src.iterdir():
        (dst / file.name).write_bytes(file.read_bytes())
    return dst


@pytest.mark.parametrize("with_adapter", [False, True], ids=["plain-model", "model-with-adapter"])
@pytest.mark.parametrize("case, breaks, words", [pytest.param(c, b, w, id=i) for i, c, b, w in BAD_INPUTS])
def test_bad_adapter_is_refused_and_model_untouched(saved_adapter, tmp_path, case, breaks, words,
                                                     with_adapter) -> None:
    path = breaks(copy_dir(saved_adapter(case), tmp_path / "adapter"))
    model = case.build()
    if with_adapter:
        lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=OTHER_ADAPTER[case.id]), name="other")
        randomize_adapter(model, seed=9)
    before = snapshot(model)

    with pytest.raises(lorakit.AdapterFileError) as info:
        lorakit.load_adapter(model, path, name="task")

    message = str(info.value)
    assert all(w in message for w in words), message
    assert_unchanged(model, before)


@pytest.mark.parametrize("build, words", [
    pytest.param(lambda: tiny_llama(hidden=48), [lio.WEIGHTS_NAME, "(4, 32)", "(4, 48)"], id="llama-hidden-48"),
    pytest.param(tiny_gpt2, [lio.CONFIG_NAME, "made for another base model", "GPT2LMHeadModel", "q_proj"], id="gpt2"),
])
def test_adapter_for_another_base_model_is_refused(saved_adapter, build, words) -> None:
    model = build()  # the adapter is for a Llama of hidden size 32
    before = snapshot(model)

    with pytest.raises(lorakit.AdapterFileError) as info:
        lorakit.load_adapter(model, saved_adapter(QV))

    message = str(info.value)
    assert all(w in message for w in words), message
    assert_unchanged(model, before)


def test_loading_under_an_existing_name_is_refused(saved_adapter) -> None:
    model = lorakit_adapted(QV, QV.build(), seed=7)
    before = snapshot(model)

    with pytest.raises(ValueError, match="'default' is already on this model"):
        lorakit.load_adapter(model, saved_adapter(QV), name="default")

    assert_unchanged(model, before)


def test_peft_adapter_with_tied_trainable_copies_is_refused(tmp_path: Path) -> None:
    """PEFT's ensure_weight_tying ties the trainable copies of lm_head and embed_tokens and saves both;
    lorakit cannot tie copies, and writing lm_head.weight into the base would overwrite the tied
    base embedding for good (lorakit.disabled would no longer give the base model)."""
    base = tiny_llama(tied=True)
    case = Case("tied", lambda: base, dict(r=4, alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]),
                peft_extra=dict(ensure_weight_tying=True))
    peft_adapted(case, base).save_pretrained(tmp_path)
    model = copy.deepcopy(base)
    before = snapshot(model)

    with pytest.raises(lorakit.AdapterFileError, match="lm_head.weight would overwrite a weight tied to") as info:
        lorakit.load_adapter(model, tmp_path)

    assert lio.WEIGHTS_NAME in str(info.value)
    assert_unchanged(model, before)


# --- loading beside other adapters, trainability -----------------------------------------------

def test_peft_adapter_loads_beside_another_adapter(tmp_path: Path) -> None:
    base = tiny_llama()
    reference = peft_adapted(CASES[0], base)
    reference.save_pretrained(tmp_path)
    model = lorakit_adapted(QV, base, seed=5)
    own = logits(model)

    lorakit.load_adapter(model, tmp_path, name="task2")

    assert lorakit.adapter_names(model) == ["default", "task2"]
    assert lorakit.active_adapters(model) == ["default"]  # loading does not switch tasks
    assert torch.equal(logits(model), own)
    lorakit.use(model, "task2")
    assert (logits(model) - logits(reference)).abs().max() <= ATOL
    lorakit.use(model, "default")
    assert torch.equal(logits(model), own)


@pytest.mark.parametrize("trainable", [False, True])
def test_loaded_adapter_is_frozen_unless_asked(saved_adapter, trainable: bool) -> None:
    case = next(c for c in CASES if c.id == "bert-classifier-bias-all")
    model = lorakit.load_adapter(case.build(), saved_adapter(case), trainable=trainable)

    grads = {n for n, p in model.named_parameters() if p.requires_grad}

    injected = lorakit.inject(case.build(), case.lorakit_config())
    assert grads == ({n for n, p in injected.named_parameters() if p.requires_grad} if trainable else set())
    assert any(".lora_B." in n for n in grads) == trainable


@pytest.mark.parametrize("name", ["task.v2", ""])
def test_unusable_adapter_name_is_refused(saved_adapter, name: str) -> None:
    model = QV.build()
    before = snapshot(model)

    with pytest.raises(ValueError, match="adapter name .* is not usable"):
        lorakit.load_adapter(model, saved_adapter(QV), name=name)

    assert_unchanged(model, before)


# --- 5. atomic writes --------------------------------------------------------------------------

def test_save_leaves_no_temp_files(tmp_path: Path) -> None:
    model = lorakit_adapted(QV, QV.build())
    lorakit.save_adapter(model, tmp_path)
    lorakit.save_adapter(model, tmp_path)  # over an existing adapter too
    assert sorted(os.listdir(tmp_path)) == [lio.CONFIG_NAME, lio.WEIGHTS_NAME]


def _fail_weights(monkeypatch) -> None:
    def partial_then_fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 100)  # a half-written file, as a crash would leave
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(lio, "save_file", partial_then_fail)


def _fail_config(monkeypatch) -> None:
    real = Path.write_text

    def partial_then_fail(self, data, *args, **kwargs):
        if self.parent.name == "adapter" and self.name != lio.CONFIG_NAME:  # the temp file of the config
            real(self, data[: len(data) // 2], *args, **kwargs)
            raise OSError(28, "No space left on device")
        return real(self, data, *args, **kwargs)
    monkeypatch.setattr(Path, "write_text", partial_then_fail)


@pytest.mark.parametrize("fail", [_fail_weights, _fail_config], ids=["weights-write-fails", "config-write-fails"])
def test_failed_save_keeps_previous_adapter(tmp_path: Path, monkeypatch, fail) -> None:
    base = QV.build()
    directory = tmp_path / "adapter"
    old = lorakit_adapted(QV, base, seed=1)
    lorakit.save_adapter(old, directory)
    # The new adapter differs in rank too, so new weights under the old config would not even load.
    new = lorakit.inject(copy.deepcopy(base), QV.lorakit_config().replace(r=2))
    randomize_adapter(new, seed=2)

    fail(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        lorakit.save_adapter(new, directory)
    monkeypatch.undo()

    assert sorted(os.listdir(directory)) == [lio.CONFIG_NAME, lio.WEIGHTS_NAME]
    loaded = lorakit.load_adapter(copy.deepcopy(base), directory)
    assert lora_state(loaded).configs["default"] == QV.lorakit_config()
    assert torch.equal(logits(loaded), logits(old))


# --- 6. the same keys as PEFT ------------------------------------------------------------------

def _peft_only(key: str) -> bool:
    """Keys PEFT writes that lorakit leaves out on purpose: the base embedding matrix when an
    embedding is adapted (PEFT's save_embedding_layers="auto", for resized vocabularies), and with
    bias="all" the wrapper-internal duplicates of a saved module's bias."""
    return key.endswith("embed_tokens.base_layer.weight") or ".original_module." in key \
        or ".modules_to_save." in key


@pytest.mark.parametrize("case", [pytest.param(QV, id=QV.id), *CASE_PARAMS])
def test_saved_keys_are_exactly_peft_keys(case: Case, tmp_path: Path) -> None:
    base = case.build()
    peft_adapted(case, base).save_pretrained(tmp_path / "peft")
    lorakit.save_adapter(lorakit_adapted(case, base), tmp_path / "lorakit")

    def keys(directory: Path) -> set[str]:
        with safe_open(str(directory / lio.WEIGHTS_NAME), framework="pt") as f:
            return set(f.keys())

    peft_keys = keys(tmp_path / "peft")
    assert keys(tmp_path / "lorakit") == {k for k in peft_keys if not _peft_only(k)}
    if case is QV:
        assert keys(tmp_path / "lorakit") == peft_keys and len(peft_keys) == 8  # 2 layers × (q, v) × (A, B)
