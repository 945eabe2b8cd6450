"""DoRA (`variants/dora.py`): PEFT's files and outputs both ways (Llama with an embedding, GPT-2's
Conv1D, BERT, a conv net), a float64 recomputation of eq. 5, the norm identity, gradients against
PEFT and against the detached formula (§4.3), merge / unmerge / task switching, bad files, the
config and the CLI flag, a 4-bit base and torch.compile."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit
import lorakit.io as lio
from lorakit.variants.dora import row_norm

from test_io import IDS, logits, tiny_bert, tiny_convnet, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*tie_word_embeddings.*:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*fan_in_fan_out.*:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*save_embedding_layers.*:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*Could not find a config file.*:UserWarning"),
]

ATOL = 1e-5

# (id, build, lorakit LoraConfig fields, PEFT-only fields)
CASES = [
    ("llama-qv-down-embedding", tiny_llama, dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj",
                                                                              "embed_tokens"]), {}),
    ("gpt2-conv1d-fan-in-fan-out", tiny_gpt2, dict(r=4, alpha=8, target_modules=["c_attn", "c_fc"]),
     dict(fan_in_fan_out=True)),
    ("bert-query-value-dense-rslora", tiny_bert,
     dict(r=4, alpha=8, target_modules=["query", "value", "dense"], use_rslora=True), {}),
    ("convnet-conv1d-conv2d-linear", tiny_convnet,
     dict(r=2, alpha=0.02, target_modules=["conv1d", "conv2d", "head", "embed"]), {}),
]
CASE_PARAMS = [pytest.param(*c[1:], id=c[0]) for c in CASES]


def peft_config(kwargs: dict, extra: dict) -> "peft.LoraConfig":
    kw = dict(kwargs)
    kw["lora_alpha"] = kw.pop("alpha")
    return peft.LoraConfig(**kw, **extra, use_dora=True)


def randomize(model: nn.Module, seed: int = 1) -> None:
    """Random A and B (B ≠ 0, so the direction differs from W0's) and m away from ‖W0 + sBA‖, on a
    PEFT or a lorakit model (both call them lora_* and lora_magnitude_vector)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def assert_close_and_adapted(got, want, base) -> None:
    assert (want - base).abs().max() > 100 * ATOL, "the adapter does not change the logits; the test proves nothing"
    diff = (got - want).abs().max().item()
    assert diff <= ATOL, f"max |Δlogits| = {diff:.3g} > {ATOL}"


def file_keys(path: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path / lio.WEIGHTS_NAME), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


# --- PEFT's files, both ways ---------------------------------------------------------------------

@pytest.mark.parametrize("build, kwargs, extra", CASE_PARAMS)
def test_peft_dora_adapter_loads_in_lorakit(build, kwargs, extra, tmp_path) -> None:
    base = build()
    reference = peft.get_peft_model(copy.deepcopy(base), peft_config(kwargs, extra))
    randomize(reference)
    reference.eval().save_pretrained(tmp_path)

    model = lorakit.load_adapter(copy.deepcopy(base), tmp_path)

    assert lorakit.LoraConfig.from_peft_dict(json.loads((tmp_path / lio.CONFIG_NAME).read_text())).use_dora
    assert_close_and_adapted(logits(model), logits(reference), logits(base))


@pytest.mark.parametrize("build, kwargs, extra", CASE_PARAMS)
def test_lorakit_dora_adapter_loads_in_peft_with_peft_keys(build, kwargs, extra, tmp_path) -> None:
    base = build()
    model = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(**kwargs, use_dora=True))
    randomize(model)
    model.eval()
    lorakit.save_adapter(model, tmp_path / "ours")

    reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()

    assert_close_and_adapted(logits(reference), logits(model), logits(base))
    assert json.loads((tmp_path / "ours" / lio.CONFIG_NAME).read_text())["use_dora"] is True
    # the same keys and shapes as PEFT writes for this config (magnitudes as <module>.lora_magnitude_vector)
    reference.save_pretrained(tmp_path / "theirs")
    ours, theirs = file_keys(tmp_path / "ours"), file_keys(tmp_path / "theirs")
    theirs = {k: v for k, v in theirs.items() if not k.endswith("embed_tokens.base_layer.weight")}  # PEFT's
    # save_embedding_layers copies the base embedding beside an embedding adapter; lorakit does not need it
    assert any(k.endswith(".lora_magnitude_vector") for k in ours)
    assert ours == theirs


# --- the math ------------------------------------------------------------------------------------

def dora_reference(x, W0, bias, A, B, m, s):
    """Eq. 5 in float64: x·W'ᵀ + b, W' = m ⊙ (W0 + sBA) / ‖W0 + sBA‖ (rows)."""
    V = W0.double() + s * B.double() @ A.double()
    W = m.double()[:, None] * V / V.norm(dim=1, keepdim=True)
    return x.double() @ W.t() + (0 if bias is None else bias.double())


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "gpt2-conv1d"])
def test_layer_output_is_eq5_recomputed_in_float64(conv1d) -> None:
    torch.manual_seed(0)
    if conv1d:
        from transformers.pytorch_utils import Conv1D
        net = nn.Sequential(Conv1D(12, 16))  # weight (d_in, d_out) = (16, 12)
    else:
        net = nn.Sequential(nn.Linear(16, 12))
    lorakit.inject(net, lorakit.LoraConfig(r=3, alpha=6, target_modules=["0"], use_dora=True))
    randomize(net)
    layer, x = net[0], torch.randn(5, 16)
    W0 = layer.as_dense(layer.base_layer.weight)
    want = dora_reference(x, W0, layer.base_layer.bias, layer.lora_A["default"], layer.lora_B["default"],
                          layer.lora_magnitude_vector["default"], layer.scaling["default"])
    torch.testing.assert_close(net(x).double(), want, rtol=0, atol=1e-5)
    # at init (B = 0, m = ‖W0‖) the layer is the base layer
    fresh = lorakit.inject(copy.deepcopy(net), lorakit.LoraConfig(r=3, alpha=6, target_modules=["0"], use_dora=True),
                           name="fresh")
    lorakit.use(fresh, "fresh")
    torch.testing.assert_close(fresh(x), fresh[0].base_layer(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_norm_identity_matches_the_materialised_norm(dtype) -> None:
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(48, 40, generator=g).to(dtype)
    A, B = torch.randn(6, 40, generator=g) * 0.3, torch.randn(48, 6, generator=g) * 0.3
    want = (W0.double() + 1.5 * B.double() @ A.double()).norm(dim=1)
    got = row_norm(W0, A, B, 1.5)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(got.double(), want, rtol=1e-12 if dtype == torch.float64 else 1e-6, atol=0)


def test_dropout_in_training_matches_peft() -> None:
    """PEFT applies the rescaled base term to the dropped-out input while dropout is active."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 8))
    ours = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(r=3, alpha=6, dropout=0.5, target_modules=["0", "2"],
                                                                 use_dora=True))
    randomize(ours)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=3, lora_alpha=6, lora_dropout=0.5,
                                                                      target_modules=["0", "2"], use_dora=True))
    copy_adapter(ours, theirs)
    ours.train(), theirs.train()
    x = torch.randn(7, 16)
    torch.manual_seed(5)
    got = ours(x)
    torch.manual_seed(5)
    want = theirs(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    with torch.no_grad():
        assert (got - ours.eval()(x)).abs().max() > 1e-3  # dropout did act


def copy_adapter(ours: nn.Module, theirs: nn.Module) -> None:
    """lorakit's adapter "default" into PEFT's model of the same base, tensor by tensor."""
    mapping = {"lora_A.default": "lora_A.default.weight", "lora_B.default": "lora_B.default.weight",
               "lora_magnitude_vector.default": "lora_magnitude_vector.default.weight"}
    target = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            for k, v in mapping.items():
                if name.endswith(k):
                    target["base_model.model." + name[: -len(k)] + v].copy_(p)


def test_gradients_of_m_a_and_b_match_peft_and_the_detached_formula() -> None:
    base = tiny_llama()
    kwargs = dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    ours = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(**kwargs, use_dora=True))
    randomize(ours)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(kwargs, {}))
    copy_adapter(ours, theirs)
    for model in (ours, theirs):
        model(input_ids=IDS, labels=IDS).loss.backward()
    grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    compared = 0
    for name, p in ours.named_parameters():
        if p.requires_grad:
            want = grads["base_model.model." + name + ".weight"]  # PEFT: lora_A.default.weight, ...
            assert p.grad.abs().max() > 0
            torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-6)
            compared += 1
    assert compared == 3 * 2 * 3  # A, B and m of 3 modules in 2 layers


def test_norm_is_detached_from_the_gradient() -> None:
    """§4.3: d/dB of the layer output treats ‖W0 + sBA‖ as a constant; the undetached gradient differs."""
    torch.manual_seed(0)
    net = lorakit.inject(nn.Sequential(nn.Linear(10, 6)), lorakit.LoraConfig(r=2, alpha=4, target_modules=["0"],
                                                                             use_dora=True))
    randomize(net)
    layer, x = net[0], torch.randn(4, 10)
    A, B, m = layer.lora_A["default"], layer.lora_B["default"], layer.lora_magnitude_vector["default"]
    (net(x) ** 2).sum().backward()

    def loss(A, B, m, detach):
        V = layer.base_layer.weight.double() + 2.0 * B @ A
        n = V.norm(dim=1, keepdim=True)
        W = m[:, None] * V / (n.detach() if detach else n)
        return ((x.double() @ W.t() + layer.base_layer.bias.double()) ** 2).sum()

    leaves = [t.detach().double().requires_grad_() for t in (A, B, m)]
    want = torch.autograd.grad(loss(*leaves, True), leaves)
    undetached = torch.autograd.grad(loss(*leaves, False), leaves)
    for got, w, u in zip((A.grad, B.grad, m.grad), want, undetached):
        torch.testing.assert_close(got.double(), w, rtol=1e-5, atol=1e-7)
    assert (B.grad.double() - undetached[1]).abs().max() > 1e-3  # the test can tell the two apart


# --- merge, unmerge, task switching --------------------------------------------------------------

def two_adapters(first_dora: bool = True, second_dora: bool = True):
    model = tiny_llama()
    targets = ["q_proj", "v_proj", "o_proj"]
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=targets, use_dora=first_dora), name="a")
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=4, target_modules=targets, use_dora=second_dora), name="b")
    randomize(model)
    return model


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer.weight" in n}


def assert_weights_close(got, want, rel=1e-6) -> None:
    for name in want:
        error = (got[name] - want[name]).norm() / want[name].norm()
        assert error <= rel, f"{name}: relative error {error:.3g}"


def test_merge_unmerge_restores_w0_and_merged_equals_unmerged() -> None:
    model = two_adapters()
    W0 = weights(model)
    lorakit.use(model, "a")
    unmerged = logits(model)
    lorakit.merge(model)
    assert (weights(model)["model.layers.0.self_attn.q_proj.base_layer.weight"]
            - W0["model.layers.0.self_attn.q_proj.base_layer.weight"]).abs().max() > 1e-3
    torch.testing.assert_close(logits(model), unmerged, rtol=0, atol=ATOL)
    lorakit.unmerge(model)
    assert_weights_close(weights(model), W0)
    torch.testing.assert_close(logits(model), unmerged, rtol=0, atol=ATOL)


@pytest.mark.parametrize("kinds", [(True, True), (False, True), (True, False)], ids=["dora+dora", "lora+dora",
                                                                                    "dora+lora"])
def test_task_switching_and_two_merged_adapters(kinds) -> None:
    model = two_adapters(*kinds)
    W0 = weights(model)
    outputs = {}
    for names in (["a"], ["b"], ["a", "b"]):
        lorakit.use(model, names)
        outputs[tuple(names)] = logits(model)
    lorakit.use(model, "a")
    lorakit.merge(model)
    lorakit.switch(model, "b")  # unmerge a, merge b
    torch.testing.assert_close(logits(model), outputs[("b",)], rtol=0, atol=ATOL)
    lorakit.use(model, ["a", "b"])
    lorakit.merge(model)  # b is merged; a goes on top of it
    torch.testing.assert_close(logits(model), outputs[("a", "b")], rtol=0, atol=ATOL)
    for layer in (m for m in model.modules() if isinstance(m, lorakit.LoraLayer)):
        layer.unmerge(["b"])  # merged first: a comes out and goes back in around it
        assert layer.merged_adapters == ["a"]
    torch.testing.assert_close(logits(model), outputs[("a", "b")], rtol=0, atol=ATOL)  # b unmerged, still active
    lorakit.unmerge(model)
    # seven float32 round trips with ‖sΔW‖ ≈ 10·‖W0‖ (random factors of 0.3 against Llama's init of 0.02)
    assert_weights_close(weights(model), W0, rel=5e-5)


def test_delete_adapter_removes_the_magnitude_and_restores_w0() -> None:
    model = two_adapters()
    W0 = weights(model)
    lorakit.use(model, "a")
    lorakit.merge(model)
    lorakit.delete_adapter(model, "a")
    assert_weights_close(weights(model), W0)
    layer = model.model.layers[0].self_attn.q_proj
    assert list(layer.lora_magnitude_vector) == ["b"] and "a" not in layer.merge_state
    assert not any("lora_magnitude_vector.a" in n for n, _ in model.named_parameters())


def test_unload_merge_gives_the_adapted_outputs() -> None:
    model = two_adapters()
    lorakit.use(model, "a")
    want = logits(model)
    plain = lorakit.unload(model, merge=True)
    assert not any(isinstance(m, lorakit.LoraLayer) for m in plain.modules())
    torch.testing.assert_close(logits(plain), want, rtol=0, atol=ATOL)


def test_inject_trains_m_a_and_b_only() -> None:
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=4, alpha=8, use_dora=True))
    trainable = sorted({n.rsplit(".", 2)[-2] for n, p in model.named_parameters() if p.requires_grad})
    assert trainable == ["lora_A", "lora_B", "lora_magnitude_vector"]


# --- what is refused, and bad files ----------------------------------------------------------------

def saved(tmp_path: Path) -> Path:
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=4, alpha=8, use_dora=True))
    randomize(model)
    return lorakit.save_adapter(model, tmp_path / "a")


def rewrite(path: Path, change) -> None:
    tensors = load_file(str(path / lio.WEIGHTS_NAME))
    change(tensors)
    save_file(tensors, str(path / lio.WEIGHTS_NAME))  # without lorakit's metadata: the JSON rules


KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"


@pytest.mark.parametrize("change, words", [
    (lambda t: t.update({KEY: torch.ones(31)}), ["lora_magnitude_vector has shape (31,)", "needs (32,)"]),
    (lambda t: t.pop(KEY), ["use_dora=true", "lacks the DoRA magnitudes", "q_proj.lora_magnitude_vector"]),
])
def test_bad_magnitudes_are_refused_and_the_model_is_unchanged(change, words, tmp_path) -> None:
    path = saved(tmp_path)
    rewrite(path, change)
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(lio.AdapterFileError) as e:
        lorakit.load_adapter(model, path)
    for w in words:
        assert w in str(e.value)
    assert model.state_dict().keys() == before.keys()


def test_a_magnitude_in_a_plain_lora_file_is_refused(tmp_path) -> None:
    path = saved(tmp_path)
    config = json.loads((path / lio.CONFIG_NAME).read_text())
    config["use_dora"] = False
    (path / lio.CONFIG_NAME).write_text(json.dumps(config))
    rewrite(path, lambda t: None)
    with pytest.raises(lio.AdapterFileError, match="use_dora=false"):
        lorakit.load_adapter(tiny_llama(), path)


def test_dora_on_fused_projection_slices_is_refused() -> None:
    model = tiny_gpt2()
    with pytest.raises(ValueError, match="DoRA on fused_projections"):
        lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["c_attn"], use_dora=True,
                                                 fused_projections={"c_attn": [True, False, True]}))
    assert not any(isinstance(m, lorakit.LoraLayer) for m in model.modules())


def test_config_round_trip_and_other_variants_still_refused() -> None:
    config = lorakit.LoraConfig(r=4, use_dora=True)
    peft_json = config.to_peft_dict()
    assert peft_json["use_dora"] is True
    assert lorakit.LoraConfig.from_peft_dict(peft_json) == config
    assert lorakit.LoraConfig().to_peft_dict()["use_dora"] is False
    with pytest.raises(lorakit.config.ConfigError, match="use_qalora"):
        lorakit.LoraConfig.from_peft_dict({**peft_json, "use_qalora": True})


# --- a 4-bit base, torch.compile, the CLI ----------------------------------------------------------

def test_dora_on_a_4bit_base_matches_peft(tmp_path) -> None:
    pytest.importorskip("bitsandbytes")
    logging.getLogger("bitsandbytes").setLevel(logging.CRITICAL)
    from test_qlora import keep_packed_layout, load_4bit, tiny_llama as llama64

    llama64().save_pretrained(tmp_path / "base")
    ours = lorakit.inject(load_4bit(tmp_path / "base"), lorakit.LoraConfig(r=4, alpha=8, use_dora=True,
                                                                           target_modules=["q_proj", "v_proj"]))
    randomize(ours)
    ours.eval()
    ids = IDS
    with torch.no_grad():
        want = ours(input_ids=ids).logits
    lorakit.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(load_4bit(tmp_path / "base"), tmp_path / "ours").eval()
    keep_packed_layout(theirs)
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, want, rtol=0, atol=ATOL)
    dense = lorakit.unload(ours, merge=True)  # dequantized W0, then DoRA's merge
    with torch.no_grad():
        torch.testing.assert_close(dense(input_ids=ids).logits, want, rtol=0, atol=1e-4)


def test_compiled_dora_matches_eager_values_and_gradients() -> None:
    torch._dynamo.reset()
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear", use_dora=True))
    randomize(model)
    runs = {}
    for name, forward in (("eager", model), ("compiled", torch.compile(model, backend="aot_eager"))):
        model.zero_grad()
        loss = forward(input_ids=IDS, labels=IDS).loss
        loss.backward()
        runs[name] = loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.testing.assert_close(runs["compiled"][0], runs["eager"][0], rtol=1e-5, atol=1e-6)
    for n, g in runs["eager"][1].items():
        torch.testing.assert_close(runs["compiled"][1][n], g, rtol=1e-4, atol=1e-6)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model.train())(IDS, labels=IDS)  # one graph, in training too
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_cli_train_dora_writes_a_dora_adapter_peft_loads(model_dir, e2e_file, tmp_path) -> None:  # noqa: F811
    from transformers import AutoModelForCausalLM

    from lorakit.cli import main

    out = tmp_path / "run"
    assert main(["train", "--model", str(model_dir), "--data", str(e2e_file), "--out", str(out), "--steps", "2",
                 "--batch-size", "4", "--lr", "1e-2", "--rank", "4", "--dora", "--device", "cpu",
                 "--compile", "off"]) == 0
    assert json.loads((out / "adapter" / lio.CONFIG_NAME).read_text())["use_dora"] is True
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    ours = lorakit.load_adapter(AutoModelForCausalLM.from_pretrained(model_dir).eval(), out / "adapter")
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir).eval(), out / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=0, atol=ATOL)
    layer = ours.model.layers[0].self_attn.q_proj
    assert not torch.allclose(layer.lora_magnitude_vector["default"],
                              layer.base_layer.weight.norm(dim=1))  # training moved m


from test_cli import e2e_file, model_dir  # noqa: E402,F401 - fixtures: a tiny local Llama and an E2E file
