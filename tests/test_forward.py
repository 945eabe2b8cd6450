"""The default LoRA forward computes what the reference forward computes in the cases that broke the
old run-time-cached fast path (issue 11): adapters changed through ``.data``, ``torch.save`` of a
whole model, ``torch.func`` transforms, a forward that raised, subclasses and variants, and routing
(the per-row adapter choice the serving engine builds on)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import lorakit
from lorakit import variants
from lorakit.layers import LoraLayer, LoraLinear

from conftest import randomize_adapters, tiny_llama


def reference_logits(model, tokens):
    """The model's logits with every LoraLinear on the reference forward (adapter by adapter)."""
    saved = LoraLinear.forward
    LoraLinear.forward = LoraLayer.forward
    try:
        return model(tokens).logits
    finally:
        LoraLinear.forward = saved


def injected(dropout=0.0, targets="all-linear"):
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, dropout=dropout, target_modules=targets))
    randomize_adapters(model)
    return model


@pytest.mark.parametrize("training", [False, True])
def test_adapters_changed_through_data_are_seen(tokens, training):
    model = injected().train(training)
    model(tokens)  # a forward before the change: nothing may remember it
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLinear):
                module.lora_A["default"].data.mul_(-2.0)   # in place through .data: no version bump
                module.lora_B["default"].data = module.lora_B["default"].data + 0.05  # new storage
    torch.testing.assert_close(model(tokens).logits, reference_logits(model, tokens))


def test_torch_save_of_the_whole_model_after_a_forward(tokens):
    model = injected()
    expected = model(tokens).logits
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(tokens).logits, expected)
    torch.testing.assert_close(copy.deepcopy(model)(tokens).logits, expected)


def test_func_grad_over_functional_call_equals_autograd(tokens):
    model = injected()
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def loss(p):
        return torch.func.functional_call(model, p, (tokens,), {"labels": tokens}).loss

    grads = torch.func.grad(loss)(params)
    model(tokens, labels=tokens).loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6)


def test_vmap_over_a_lora_layer():
    layer = injected().model.layers[0].self_attn.q_proj
    xs = torch.randn(3, 2, 5, 32)
    batched = torch.func.vmap(layer)(xs)
    for i in range(3):
        torch.testing.assert_close(batched[i], layer(xs[i]))


def test_a_forward_that_raised_leaves_nothing_behind(tokens):
    model = injected()
    expected = model(tokens).logits
    with pytest.raises(Exception):
        model.model.layers[0].self_attn.q_proj(torch.randn(2, 3, 31))  # wrong width
    with pytest.raises(Exception):
        with lorakit.route(model, ["default", None]):
            model(torch.full((2, 9), 10_000))  # ids out of range, inside a routing context
    assert all(m.route is None for m in model.modules() if isinstance(m, LoraLayer))
    torch.testing.assert_close(model(tokens).logits, expected)


class HalvedLinear(LoraLinear):
    """A subclass with its own adapter output: the forward must use it."""

    def adapter_output(self, x, name):
        return 0.5 * super().adapter_output(x, name)


def test_a_subclass_adapter_output_is_honoured():
    base = nn.Linear(16, 12)
    plain, halved = LoraLinear(base), HalvedLinear(base)
    for layer in (plain, halved):
        layer.add_adapter("a", 4, 8.0)
        layer.set_active(["a"])
    with torch.no_grad():
        halved.lora_A["a"].copy_(torch.randn(4, 16))
        halved.lora_B["a"].copy_(torch.randn(12, 4))
        plain.lora_A["a"].copy_(halved.lora_A["a"])
        plain.lora_B["a"].copy_(halved.lora_B["a"])
    x = torch.randn(3, 16)
    base_out = base(x)
    torch.testing.assert_close(halved(x) - base_out, 0.5 * (plain(x) - base_out), rtol=1e-5, atol=1e-6)


class Doubled(variants.Variant):
    """A test variant: not additive, twice the plain adapter's effect, merges as such."""

    name = "doubled-test"

    def output(self, layer, x, result, name):
        return result + 2 * layer.adapter_output(x, name).to(result.dtype)

    def delta_weight(self, layer, name):
        return 2 * layer.delta_weight(name)


def test_a_variant_owns_output_delta_and_merge():
    variants.register(Doubled())
    base = nn.Linear(16, 12)
    layer = LoraLinear(copy.deepcopy(base))
    layer.add_adapter("a", 4, 8.0, variant="doubled-test")
    layer.set_active(["a"])
    with torch.no_grad():
        layer.lora_B["a"].copy_(torch.randn(12, 4))
    x = torch.randn(3, 16)
    expected = base(x) + 2 * (x @ layer.lora_A["a"].t() @ layer.lora_B["a"].t()) * layer.scaling["a"]
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    layer.merge()
    torch.testing.assert_close(layer.base_layer(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, base.weight, rtol=0, atol=1e-6)


def test_unknown_variant_is_refused_by_name():
    with pytest.raises(ValueError, match="no LoRA variant named 'nope'"):
        LoraLinear(nn.Linear(4, 4)).add_adapter("a", 2, 2.0, variant="nope")


# --- routing -----------------------------------------------------------------------------------

def two_adapters():
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear"), name="a")
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]), name="b")
    randomize_adapters(model)
    return model


def logits_with(model, adapter, tokens):
    if adapter is None:
        with lorakit.disabled(model):
            return model(tokens).logits
    lorakit.use(model, adapter)
    return model(tokens).logits


def test_route_gives_each_row_its_adapters_logits():
    """Rows routed to a, b and the base model equal each one run alone; b targets fewer modules."""
    model = two_adapters()
    tokens = torch.randint(0, 100, (4, 7), generator=torch.Generator().manual_seed(5))
    choice = ["a", None, "b", "a"]
    with lorakit.route(model, choice):
        routed = model(tokens).logits
    for row, adapter in enumerate(choice):
        alone = logits_with(model, adapter, tokens[row:row + 1])
        torch.testing.assert_close(routed[row:row + 1], alone, rtol=1e-5, atol=1e-5)


def test_route_per_token_and_reference_agree():
    model = two_adapters()
    tokens = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(6))
    index = torch.tensor([[0, 1, -1, 0, 1, 1], [1, 1, 0, 0, -1, -1]])
    with lorakit.route(model, index, names=["a", "b"]):
        fast = model(tokens).logits
        slow = reference_logits(model, tokens)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


def test_route_refuses_bad_requests_clearly():
    model = two_adapters()
    with pytest.raises(KeyError, match="'zzz'"):
        with lorakit.route(model, ["zzz"]):
            pass
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        with lorakit.route(model, torch.tensor([0, 2]), names=["a", "b"]):
            pass
    with pytest.raises(ValueError, match="shape"):
        with lorakit.route(model, ["a", "b", None]):
            model(torch.zeros(2, 4, dtype=torch.long))
    lorakit.use(model, "a")
    lorakit.merge(model)
    with pytest.raises(ValueError, match="unmerge"):
        with lorakit.route(model, ["a", None]):
            pass
