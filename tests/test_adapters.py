"""Named adapters on one model: use, disabled, merge/unmerge and task switching (§4.2)."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.layers import MergeError

from conftest import randomize_adapters, tiny_llama


def two_adapter_model():
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), name="a")
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=2, target_modules=["v_proj", "down_proj"]), name="b")
    randomize_adapters(model, std=0.2)
    return model


def base_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" not in n}


def test_use_selects_and_sums_adapters(tokens):
    model = two_adapter_model()
    with lorakit.disabled(model):
        base = model(tokens).logits
    lorakit.use(model, "a")
    out_a = model(tokens).logits
    lorakit.use(model, "b")
    out_b = model(tokens).logits
    lorakit.use(model, ["a", "b"])
    out_ab = model(tokens).logits
    assert not torch.allclose(out_a, out_b)
    # Each adapter's forward contribution is additive at every layer, and only the v_proj layers are
    # shared, so the sum is checked layer-wise: v_proj output with both = base + Δa + Δb.
    v = model.model.layers[0].self_attn.v_proj
    x = torch.randn(3, 32)
    both = v(x)
    lorakit.use(model, "a")
    only_a = v(x)
    lorakit.use(model, "b")
    only_b = v(x)
    assert torch.allclose(both, only_a + only_b - v.base_layer(x), atol=1e-5)
    assert not torch.allclose(out_ab, base)
    with pytest.raises(KeyError, match=r"no adapter named \['c'\].*\['a', 'b'\]"):
        lorakit.use(model, "c")


def test_disabled_is_base_even_when_merged(tokens):
    model = two_adapter_model()
    with lorakit.disabled(model):
        base = model(tokens).logits
    lorakit.use(model, "a")
    unmerged = model(tokens).logits
    lorakit.merge(model)
    with lorakit.disabled(model):
        assert torch.allclose(model(tokens).logits, base, atol=1e-5)
    assert torch.allclose(model(tokens).logits, unmerged, atol=1e-5)
    assert all(m.merged_adapters == ["a"] for m in model.modules()
               if isinstance(m, lorakit.LoraLayer) and "a" in m.lora_A)


def test_merge_twice_is_a_no_op_and_unmerge_restores():
    model = two_adapter_model()
    w0 = base_weights(model)
    lorakit.use(model, ["a", "b"])
    lorakit.merge(model)
    once = base_weights(model)
    lorakit.merge(model)
    assert all(torch.equal(once[n], p) for n, p in base_weights(model).items())
    lorakit.unmerge(model)
    assert all(torch.allclose(w0[n], p, atol=1e-6) for n, p in base_weights(model).items())


def test_safe_merge_leaves_no_layer_half_merged():
    model = two_adapter_model()
    w0 = base_weights(model)
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.lora_B["a"].fill_(float("nan"))
    lorakit.use(model, "a")
    with pytest.raises(MergeError, match=r"layers\.1\.self_attn\.v_proj.*nothing was merged"):
        lorakit.merge(model)
    assert all(torch.equal(w0[n], p) for n, p in base_weights(model).items())


def test_task_switching_1000_times_drift_and_outputs(tokens):
    """§4.2: switch tasks on a merged model by subtracting BA and adding B'A', in place."""
    model = two_adapter_model()
    w0 = base_weights(model)
    reference = {}
    for name in ("a", "b"):
        lorakit.use(model, name)
        reference[name] = model(tokens).logits  # unmerged outputs
    lorakit.use(model, "a")
    lorakit.merge(model)
    for i in range(1000):
        lorakit.switch(model, "b" if i % 2 == 0 else "a")
    current = lorakit.active_adapters(model)[0]
    assert current == "a"
    assert torch.allclose(model(tokens).logits, reference["a"], atol=1e-5)  # merged == unmerged
    lorakit.switch(model, "b")
    assert torch.allclose(model(tokens).logits, reference["b"], atol=1e-5)
    lorakit.unmerge(model)
    drift = max((p - w0[n]).norm() / w0[n].norm() for n, p in base_weights(model).items())
    assert drift < 1e-5, f"base weights drifted by {drift:.2e} relative after 1,000 switches"


def test_switching_in_bfloat16_does_not_accumulate():
    # A bf16 base rounds every merge to 8 bits of mantissa; merging in float32 and rounding once
    # keeps the drift at the order of bf16's resolution instead of growing with every switch.
    def drift_after(switches):
        model = two_adapter_model().to(torch.bfloat16)
        w0 = base_weights(model)
        lorakit.use(model, "a")
        lorakit.merge(model)
        for i in range(switches):
            lorakit.switch(model, "b" if i % 2 == 0 else "a")
        lorakit.unmerge(model)
        return max(((p.float() - w0[n].float()).norm() / w0[n].float().norm()).item()
                   for n, p in base_weights(model).items())

    few, many = drift_after(10), drift_after(100)
    assert many < 0.03 and many <= 1.5 * few
