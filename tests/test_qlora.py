"""QLoRA: LoRA on bitsandbytes 4-bit (NF4, FP4, double quantization) and 8-bit bases, on the CPU.

What is compared with what: the quantized layer's own output and bitsandbytes' own dequantization
are the reference for the base term; a float64 recomputation is the reference for the adapter term;
PEFT is the reference for interop. The packed bytes are hashed before and after everything lorakit
does to a quantized model.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

import lorakit  # noqa: E402
import lorakit.io as lio  # noqa: E402
from lorakit.data import Batches, collate  # noqa: E402
from lorakit.layers import LoraQuantizedLinear, dense_weight, kind_of  # noqa: E402
from lorakit.layers.quantized import is_repacked_for_cpu, keep_packed_layout, packed_tensors  # noqa: E402
from lorakit.quantize import Quantization, merge_requantized, model_bytes, quantize_model  # noqa: E402
from lorakit.train import TrainConfig, train  # noqa: E402

from conftest import randomize_adapters  # noqa: E402

# bitsandbytes logs at every import that an optional CPU kernel package ("kernels") is missing.
logging.getLogger("bitsandbytes").setLevel(logging.CRITICAL)

# (id, Quantization): the formats of the issue; fp4 with bf16 compute and bf16 packed storage.
CASES = [
    ("nf4", Quantization("nf4")),
    ("nf4-double", Quantization("nf4", double_quant=True)),
    ("fp4-double-bf16", Quantization("fp4", double_quant=True, compute_dtype=torch.bfloat16,
                                     quant_storage=torch.bfloat16)),
    ("fp4-storage-f32", Quantization("fp4", quant_storage=torch.float32)),
    ("int8", Quantization("int8")),
]
QUANTS = [pytest.param(q, id=name) for name, q in CASES]
ALL_LINEAR = lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear")


def tiny_llama(seed: int = 0):
    # hidden 64: bitsandbytes' CPU kernels want d_in >= the 4-bit block size (64).
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def quantized_llama(q: Quantization, seed: int = 0):
    model = tiny_llama(seed)
    quantize_model(model, q)
    return model


def packed_hash(model_or_layers) -> dict[str, str]:
    """sha256 of every tensor each quantized layer is made of (packed weight, scales, code books)."""
    layers = model_or_layers.items() if isinstance(model_or_layers, dict) else \
        ((n, m) for n, m in model_or_layers.named_modules() if kind_of(m) is not None and kind_of(m).quantized)
    out = {}
    for name, layer in layers:
        for key, t in packed_tensors(layer).items():
            raw = t.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes()
            out[f"{name}.{key}"] = f"{t.dtype}:{tuple(t.shape)}:{hashlib.sha256(raw).hexdigest()}"
    return out


def quantized_layers(model) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if kind_of(m) is not None and kind_of(m).quantized}


@pytest.fixture
def tokens():
    return torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(3))


def logits(model, tokens) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


# --- the layer kind ---------------------------------------------------------------------------------

def test_importing_lorakit_does_not_import_bitsandbytes():
    code = "import sys, lorakit, lorakit.layers, lorakit.quantize; print('bitsandbytes' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("q", QUANTS)
def test_adapters_sized_from_the_logical_shape_and_step_zero_equals_base(q, tokens):
    model = quantized_llama(q)
    base = logits(model, tokens)
    lorakit.inject(model, ALL_LINEAR)
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, LoraQuantizedLinear)
    assert layer.lora_A["default"].shape == (4, 128) and layer.lora_B["default"].shape == (64, 4)
    assert layer.base_layer.weight.shape != (64, 128) or q.scheme == "int8"  # 4-bit: packed storage
    assert type(model.lm_head) is nn.Linear  # the output head stays dense, and is not all-linear
    assert torch.equal(logits(model, tokens), base)  # §4.1: B = 0


@pytest.mark.parametrize("q", QUANTS)
def test_forward_is_the_quantized_output_plus_the_adapter_term(q):
    layer_model = nn.Sequential(nn.Linear(64, 96))
    quantize_model(layer_model, q)
    lorakit.inject(layer_model, lorakit.LoraConfig(r=3, alpha=6, target_modules=["0"]))
    randomize_adapters(layer_model)
    layer = layer_model[0]
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        A, B = layer.lora_A["default"].double(), layer.lora_B["default"].double()
        want = layer.base_layer(x).double() + (x.double() @ A.t() @ B.t()) * 2.0
        got = layer(x)
    assert got.dtype == x.dtype
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # ΔW and merged weights read bitsandbytes' own dequantization, in float32
    base = layer.base_layer
    if q.scheme == "int8":  # int8 rows times their scales / 127 (the first forward moved the scales to the state)
        reference = base.weight.data.float() * base.state.SCB.float()[:, None] / 127
    else:
        reference = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state)
    torch.testing.assert_close(dense_weight(layer.base_layer).float(), reference.float())
    torch.testing.assert_close(layer.delta_weight("default").double(), (B @ A) * 2.0)
    torch.testing.assert_close(layer.merged_weight("default"), reference.float() + layer.delta_weight("default"))


def test_a_quantization_that_cannot_be_is_refused_with_the_option_named():
    with pytest.raises(ValueError, match=r"double_quant quantizes the scales of 4-bit blocks; int8 has none"):
        Quantization("int8", double_quant=True)
    with pytest.raises(ValueError, match=r"quantize='nf3' is not one of"):
        Quantization("nf3")


def test_an_unquantized_params4bit_is_refused():
    layer = bnb.nn.Linear4bit(64, 32, quant_type="nf4", device="meta")
    layer.weight = bnb.nn.Params4bit(torch.randn(32, 64), requires_grad=False, quant_type="nf4")  # not .to() yet
    model = nn.Sequential(layer)
    with pytest.raises(ValueError, match=r"not quantized yet.*call model\.to\(device\) first"):
        lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["0"]))
    assert type(model[0]) is bnb.nn.Linear4bit and "lora_state" not in model.__dict__


# --- the packed weights are never written -------------------------------------------------------------

def token_batches(n: int = 16, batch_size: int = 4, seed: int = 0) -> Batches:
    g = torch.Generator().manual_seed(seed)
    examples = []
    for length in torch.randint(5, 12, (n,), generator=g).tolist():
        ids = torch.randint(1, 100, (length,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": ids})
    return Batches(examples, batch_size, seed=seed, collate_fn=partial(collate, pad_id=0))


@pytest.mark.parametrize("q", [QUANTS[1], QUANTS[2], QUANTS[4]])
def test_packed_bytes_survive_inject_training_merge_refusal_and_unload(q, tokens, tmp_path):
    model = quantized_llama(q)
    logits(model, tokens)  # an 8-bit layer moves its scales to its state at the first forward
    packed = packed_hash(model)
    base_layers = quantized_layers(model)
    assert len(packed) >= 14 * 2

    # lm_head stays dense: a merge must refuse before it merges that one either
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "lm_head"]))
    assert packed_hash(base_layers) == packed
    config = TrainConfig(max_steps=8, lr=2e-2, batch_size=4, eval_every=4, save_every=8, log_every=2,
                         out_dir=tmp_path / "run", progress=False, device="cpu")
    result = train(model, token_batches(), config, eval_batches=token_batches(8, seed=1))  # eval in between
    rows = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0], losses
    assert packed_hash(base_layers) == packed
    assert not any(is_repacked_for_cpu(m) for m in base_layers.values())

    model.eval()
    adapted = logits(model, tokens)
    with pytest.raises(lorakit.MergeError, match=r"cannot be merged into this bitsandbytes .*lorakit\.unload"):
        lorakit.merge(model)
    assert all(not m.merged_adapters for m in model.modules() if isinstance(m, lorakit.LoraLayer))  # none anywhere
    assert not model.lm_head.merged_adapters
    lorakit.unmerge(model)
    lorakit.use(model, "default")
    with lorakit.disabled(model):
        logits(model, tokens)
    assert torch.equal(logits(model, tokens), adapted)
    assert packed_hash(base_layers) == packed

    merged = lorakit.unload(copy.deepcopy(model), merge=True)  # a dense model: Q(W0) + ΔW
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    assert kind_of(merged.model.layers[0].self_attn.k_proj).quantized  # not adapted: left quantized
    # the dense model computes in float32; LLM.int8() also quantizes the input, and a bf16 compute dtype rounds
    tol = 0.05 if q.scheme == "int8" else 0.02 if q.compute_dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(logits(merged, tokens), adapted, rtol=tol, atol=tol)

    plain = lorakit.unload(model, merge=False)  # the base, packed bytes as they were
    assert packed_hash(plain) == packed
    assert all(plain.get_submodule(n) is m for n, m in base_layers.items())


def test_a_failed_load_writes_no_packed_byte(tmp_path, tokens):
    q = Quantization("nf4", double_quant=True)
    source = lorakit.inject(quantized_llama(q), lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(source)
    lorakit.save_adapter(source, tmp_path / "good")

    model = quantized_llama(q)
    packed = packed_hash(model)
    weights = tmp_path / "good" / lio.WEIGHTS_NAME
    tensors = load_file(str(weights))
    key = f"{lio.PREFIX}model.layers.1.self_attn.v_proj.lora_B.weight"
    for name, change in [("shape", lambda t: {**t, key: torch.zeros(7, 4)}),
                         ("packed", lambda t: {**t, f"{lio.PREFIX}model.layers.0.self_attn.q_proj.base_layer.weight":
                                               torch.zeros_like(model.model.layers[0].self_attn.q_proj.weight)})]:
        bad = tmp_path / name
        bad.mkdir()
        (bad / lio.CONFIG_NAME).write_text((tmp_path / "good" / lio.CONFIG_NAME).read_text())
        save_file(change(tensors), str(bad / lio.WEIGHTS_NAME))  # no lorakit metadata: the JSON is the config
        with pytest.raises(lorakit.AdapterFileError) as info:
            lorakit.load_adapter(model, bad)
        assert "lora_state" not in model.__dict__ and packed_hash(model) == packed
        if name == "shape":
            assert "which has weight shape (32, 64)" in str(info.value)  # the logical shape, not the packed one
        else:
            assert "would overwrite the packed weight" in str(info.value)


@pytest.mark.parametrize("q", [QUANTS[1], QUANTS[4]])
def test_save_and_load_round_trip(q, tmp_path, tokens):
    model = lorakit.inject(quantized_llama(q), ALL_LINEAR)
    randomize_adapters(model)
    want = logits(model, tokens)
    lorakit.save_adapter(model, tmp_path / "a")
    other = quantized_llama(q)
    packed = packed_hash(other)
    lorakit.load_adapter(other, tmp_path / "a")
    assert torch.equal(logits(other, tokens), want)
    assert packed_hash(quantized_layers(lorakit.unload(other, merge=False))) == packed


def test_merge_requantized_reports_how_far_the_outputs_moved(tokens):
    model = lorakit.inject(quantized_llama(Quantization("nf4", double_quant=True)), ALL_LINEAR)
    randomize_adapters(model, std=0.05)
    old = model.model.layers[0].self_attn.q_proj.base_layer
    old_packed, old_weight = packed_hash({"q": old}), dense_weight(old).clone()
    exact = lorakit.unload(copy.deepcopy(model), merge=True)
    plain, report = merge_requantized(model)
    new = plain.model.layers[0].self_attn.q_proj
    assert "lora_state" not in plain.__dict__ and kind_of(new).quantized and new is not old
    assert new.weight.quant_state.nested and new.weight.quant_state.quant_type == "nf4"  # the layer's own settings
    assert packed_hash({"q": old}) == old_packed  # a new packed weight; the old one was not written
    want = exact.model.layers[0].self_attn.q_proj.weight
    # ΔW is in the new weight, up to NF4's rounding of W0 + ΔW
    assert (dense_weight(new) - want).norm() < 0.5 * (old_weight - want).norm()
    assert len(report.output_error) == 14 and 0 < report.max_error < 1
    # the report's per-layer error is the layer's, and the model's outputs moved accordingly
    moved = (logits(plain, tokens) - logits(exact, tokens)).norm() / logits(exact, tokens).norm()
    assert 0 < moved.item() < 1
    assert "re-quantizing moved the outputs by up to" in report.summary()


def test_bitsandbytes_cpu_repacking_is_kept_off_and_read_through(tokens):
    """bitsandbytes repacks 4-bit weights for its AVX512-BF16 CPU kernel at an inference forward;
    lorakit reads the weight through that layout and keeps it off once injected."""
    q = Quantization("nf4", double_quant=True)
    model = tiny_llama()
    quantize_model(model, q)
    layer = model.model.layers[0].self_attn.q_proj
    want = dense_weight(layer).clone()
    layer.support_avx512bf16_for_cpu = bnb.functional.has_avx512bf16()  # bitsandbytes' own default
    logits(model, tokens)
    if not is_repacked_for_cpu(layer):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack here")
    # read through bitsandbytes' inverse, on copies: what its CPU kernel computes with (block scales
    # rounded to bf16 by the repacking), so the layer's own output is x·Wᵀ for it
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ dense_weight(layer).t().float(), rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(dense_weight(layer).float(), want.float(), rtol=1e-2, atol=1e-3)
    with pytest.warns(UserWarning, match="repacked the 4-bit weights of .*model.layers.0.self_attn.q_proj"):
        lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    assert not model.model.layers[0].self_attn.q_proj.base_layer.support_avx512bf16_for_cpu
    model.train()
    with pytest.raises(RuntimeError, match="cannot train through that layout"):
        model(tokens)


# --- transformers' BitsAndBytesConfig and PEFT, both ways ------------------------------------------

@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(path)
    return path


def load_4bit(path: Path, double: bool = True):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double,
                                bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu",
                                                dtype=torch.float32).eval()


def test_peft_adapter_on_a_transformers_4bit_base_loads_with_equal_outputs(llama_dir, tmp_path, tokens):
    from peft import LoraConfig, get_peft_model

    theirs = get_peft_model(load_4bit(llama_dir), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                             init_lora_weights=False))  # random A and B
    theirs.eval()
    keep_packed_layout(theirs)  # as inject does: bitsandbytes' CPU repacking would change its kernel and rounding
    want = logits(theirs, tokens)
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_4bit(llama_dir)
    packed = packed_hash(ours)
    lorakit.load_adapter(ours, tmp_path / "peft")
    assert isinstance(ours.model.layers[0].mlp.up_proj, LoraQuantizedLinear)
    torch.testing.assert_close(logits(ours, tokens), want, rtol=0, atol=1e-5)
    assert packed_hash(quantized_layers(lorakit.unload(ours, merge=False))) == packed


def test_lorakit_adapter_on_a_4bit_base_loads_in_peft_with_equal_outputs(llama_dir, tmp_path, tokens):
    from peft import PeftModel

    ours = lorakit.inject(load_4bit(llama_dir), lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj",
                                                                                               "gate_proj"]))
    randomize_adapters(ours)
    want = logits(ours, tokens)
    lorakit.save_adapter(ours, tmp_path / "ours")
    theirs = PeftModel.from_pretrained(load_4bit(llama_dir), tmp_path / "ours").eval()
    keep_packed_layout(theirs)
    torch.testing.assert_close(logits(theirs, tokens), want, rtol=0, atol=1e-5)


def test_a_transformers_8bit_base_trains_and_analyses(llama_dir, tmp_path, tokens):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lorakit.analysis import base_weights, read_adapter_deltas

    model = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                                                 device_map="cpu", dtype=torch.float32)
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    logits(model, tokens)
    packed = packed_hash(model)
    config = TrainConfig(max_steps=6, lr=2e-2, batch_size=4, save_every=6, log_every=2, out_dir=tmp_path / "run",
                         progress=False, device="cpu")
    result = train(model, token_batches(), config)
    losses = [json.loads(line)["loss"] for line in result.metrics_path.read_text().splitlines() if "loss" in line]
    assert losses[-1] < losses[0]
    assert packed_hash(model) == packed
    deltas = read_adapter_deltas(result.adapter_dir)
    weights, skipped = base_weights(model, list(deltas.layers.values()))
    assert not skipped and weights["model.layers.0.self_attn.q_proj"].shape == (64, 64)
    torch.testing.assert_close(weights["model.layers.0.self_attn.q_proj"].float(),
                               dense_weight(model.model.layers[0].self_attn.q_proj.base_layer))


# --- sizes and the command line -------------------------------------------------------------------

def test_model_bytes_counts_the_quantization_state():
    model = tiny_llama()
    dense = model_bytes(model)
    report = quantize_model(model, Quantization("nf4", double_quant=True))
    assert report.bytes_before == dense and report.bytes_after == model_bytes(model) < dense
    layer = model.model.layers[0].self_attn.q_proj
    assert model_bytes(nn.Sequential(layer)) > layer.weight.numel()  # absmax and code books count too
    assert "lm_head (the output head)" in report.summary() and len(report.quantized) == 14
    dense_count = lorakit.trainable_parameters(tiny_llama())[1]
    assert lorakit.trainable_parameters(model)[1] == dense_count  # 4-bit weights counted as weights, not bytes


@pytest.mark.slow
def test_cli_train_quantized_says_the_sizes_and_merge_writes_a_dense_model(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from lorakit.cli import main
    from test_data import E2E_LINES, make_tokenizer

    tok = make_tokenizer(bos=False)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    model_dir = tmp_path / "model"
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = tmp_path / "train.txt"
    data.write_text("\n".join(E2E_LINES * 4) + "\n")
    run = tmp_path / "run"
    rc = main(["train", "--model", str(model_dir), "--data", str(data), "--out", str(run), "--steps", "20",
               "--batch-size", "4", "--lr", "1e-2", "--rank", "4", "--targets", "all-linear", "--device", "cpu",
               "--quantize", "nf4", "--double-quant", "--save-every", "20"])  # a loss row every 10 steps
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "base model quantized to NF4, double quantization: " in out and "× smaller), 14 linear layer(s)" in out
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    assert losses[-1] < losses[0]

    assert main(["analyze", str(run / "adapter"), "--model", str(model_dir), "--quantize", "nf4", "--double-quant",
                 "--out", str(tmp_path / "report")]) == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert not report["amplification_skipped"] and report["layers"]
    assert all("amplification" in a for layer in report["layers"] for a in layer["adapters"])

    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(model_dir), "--adapter", str(run / "adapter"), "--out", str(merged),
                 "--quantize", "nf4", "--double-quant"]) == 0
    dense = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert type(dense.model.layers[0].self_attn.q_proj) is nn.Linear and "quantization_config" not in \
        json.loads((merged / "config.json").read_text())
    again = lorakit.load_model(str(model_dir))[0]
    quantize_model(again, Quantization("nf4", double_quant=True))
    lorakit.load_adapter(again, run / "adapter")
    ids = torch.randint(0, len(tok), (2, 7), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(dense, ids), logits(again.eval(), ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("argv, words", [
    (["--double-quant"], ["--double-quant quantizes the scales of a 4-bit base: add --quantize nf4"]),
    (["--quantize", "int8", "--double-quant"], ["--double-quant quantizes the scales of 4-bit blocks; int8 has none",
                                                "--quantize nf4"]),
])
def test_cli_quantize_errors_name_the_flags(argv, words, tmp_path, capsys):
    from lorakit.cli import main

    assert main(["train", "--out", str(tmp_path / "run"), *argv]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
    assert not (tmp_path / "run").exists()


# --- the 4-bit fast path (ops/quantized_linear.py) ---------------------------------------------------

FOUR_BIT = [QUANTS[1], QUANTS[2], QUANTS[3]]  # NF4 + double quant; FP4 bf16 compute/storage; FP4 f32 storage


def _one_layer(q: Quantization, dropout: float = 0.0, bias: bool = True):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96, bias=bias))
    quantize_model(model, q)
    lorakit.inject(model, lorakit.LoraConfig(r=3, alpha=6, target_modules=["0"], dropout=dropout))
    randomize_adapters(model)
    return model[0]


def _dense_twin(layer: LoraQuantizedLinear, dropout: float = 0.0) -> nn.Module:
    """A dense LoraLinear on bitsandbytes' dequantized weight with the same adapter: the reference."""
    base = layer.base_layer
    linear = nn.Linear(64, 96, bias=base.bias is not None)
    with torch.no_grad():
        linear.weight.copy_(dense_weight(base).float())
        if base.bias is not None:
            linear.bias.copy_(base.bias.float())
    twin = nn.Sequential(linear)
    lorakit.inject(twin, lorakit.LoraConfig(r=3, alpha=6, target_modules=["0"], dropout=dropout))
    with torch.no_grad():
        twin[0].lora_A["default"].copy_(layer.lora_A["default"])
        twin[0].lora_B["default"].copy_(layer.lora_B["default"])
    return twin[0]


def _made_by(grad_fn, name: str) -> bool:
    """Whether ``grad_fn`` is the autograd function ``name``, or a dtype cast right after it."""
    if type(grad_fn).__name__ == "ToCopyBackward0":
        grad_fn = grad_fn.next_functions[0][0]
    return type(grad_fn).__name__.startswith(name)


def _run(layer, x, autocast: bool, seed: int = 7):
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)  # the dropout seed is drawn from torch's generator
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = layer(x)
    (out.float() * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    grads = [x.grad, layer.lora_A["default"].grad, layer.lora_B["default"].grad]
    return out.detach(), grads, out.grad_fn


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
@pytest.mark.parametrize("q", FOUR_BIT)
def test_the_4bit_function_equals_a_dense_layer_on_the_dequantized_weight(q, dropout, autocast):
    layer = _one_layer(q, dropout).train()
    if q.compute_dtype is not None and not autocast:
        layer.lora_A["default"].data = layer.lora_A["default"].data.to(q.compute_dtype)
        layer.lora_B["default"].data = layer.lora_B["default"].data.to(q.compute_dtype)
    twin = _dense_twin(layer, dropout).train()
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    got, got_grads, grad_fn = _run(layer, x, autocast)
    assert _made_by(grad_fn, "_QuantizedLoraLinear")  # the fast path, not the reference
    compute = torch.bfloat16 if autocast or q.compute_dtype is not None else torch.float32
    with torch.autocast("cpu", dtype=compute, enabled=compute != torch.float32):
        want, want_grads, _ = _run(twin, x, compute != torch.float32)
    tol = dict(rtol=2e-2, atol=2e-2) if compute != torch.float32 else dict(rtol=1e-5, atol=1e-5)
    assert got.dtype == x.dtype
    torch.testing.assert_close(got.float(), want.float(), **tol)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g.float(), w.float(), **tol)


def test_the_4bit_function_in_float32_is_the_formula_in_float64():
    layer = _one_layer(Quantization("nf4", double_quant=True))
    x = torch.randn(6, 64, dtype=torch.float32, generator=torch.Generator().manual_seed(2), requires_grad=True)
    out = layer(x)
    assert _made_by(out.grad_fn, "_QuantizedLoraLinear")
    W = dense_weight(layer.base_layer).double()
    A, B = layer.lora_A["default"].double(), layer.lora_B["default"].double()
    want = x.double() @ W.t() + layer.base_layer.bias.double() + 2.0 * (x.double() @ A.t()) @ B.t()
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    g = torch.randn(6, 96, generator=torch.Generator().manual_seed(3))
    out.backward(g)
    g = g.double()
    torch.testing.assert_close(x.grad.double(), g @ W + 2.0 * (g @ B) @ A, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_B["default"].grad.double(), 2.0 * g.t() @ (x.double() @ A.t()),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_A["default"].grad.double(), 2.0 * (g @ B).t() @ x.double(),
                               rtol=1e-5, atol=1e-5)


def test_the_4bit_function_never_saves_a_dense_weight():
    layer = _one_layer(Quantization("nf4", double_quant=True)).train()
    x = torch.randn(4, 64, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
    assert _made_by(out.grad_fn, "_QuantizedLoraLinear")
    assert (96, 64) not in saved and (64, 96) not in saved, saved  # W is dequantized again in backward
    assert sum(1 for s in saved if s == (4, 64)) == 1  # x once, in the compute dtype


def test_the_4bit_swiglu_twin_equals_the_reference_and_keeps_gate_and_up(tokens):
    from lorakit.layers import swiglu as swiglu_layers

    model = quantized_llama(Quantization("nf4", double_quant=True))
    lorakit.inject(model, ALL_LINEAR)
    randomize_adapters(model)
    mlp = model.model.layers[0].mlp
    assert isinstance(mlp.__dict__.get("forward"), swiglu_layers.SwiGLUForward)  # the down projection is routed
    model.train()
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(4), requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mlp(x)
    assert _made_by(out.grad_fn, "_QuantizedLoraSwiGLULinear")
    out.float().sum().backward()
    got = [x.grad.clone()] + [p.grad.clone() for p in mlp.down_proj.parameters() if p.requires_grad]
    x.grad = None
    for p in mlp.parameters():
        p.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = type(mlp).forward(mlp, x)  # the class's own forward: down_proj(silu(gate)·up), the plain 4-bit path
    assert _made_by(ref.grad_fn, "_QuantizedLoraLinear")
    ref.float().sum().backward()
    want = [x.grad] + [p.grad for p in mlp.down_proj.parameters() if p.requires_grad]
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2)


def test_8bit_compiling_and_other_dtypes_take_the_reference_path():
    layer = _one_layer(Quantization("int8")).train()
    x = torch.randn(3, 64, requires_grad=True)
    assert layer._op_call(x) is None
    four = _one_layer(Quantization("nf4"))
    four.lora_A["default"].data = four.lora_A["default"].data.double()  # outside autocast: PEFT's adapter dtype
    assert four._op_call(x) is None
    assert _one_layer(Quantization("nf4"))._op_call(x) is not None
