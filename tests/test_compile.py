"""An injected model works under torch.compile (no graph breaks in LoRA layers) and with
transformers' gradient checkpointing, computing the same values and gradients as eager."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit

from conftest import randomize_adapters, tiny_llama


def injected(dropout: float = 0.0, fused: bool | None = None):
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, dropout=dropout, target_modules="all-linear"))
    randomize_adapters(model)
    for module in model.modules():
        if isinstance(module, lorakit.LoraLayer):
            module.use_fused_op = fused
    return model


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("fused", [None, True])
def test_no_graph_breaks_in_an_injected_model(tokens, training, fused):
    import torch._dynamo as dynamo

    model = injected(dropout=0.1, fused=fused).train(training)
    explanation = dynamo.explain(model)(tokens)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_compiled_layer_matches_eager_values_and_gradients():
    torch._dynamo.reset()
    layer = injected().model.layers[0].mlp.up_proj
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 5, 32, requires_grad=True)
    eager_out = layer(x)
    eager_out.square().sum().backward()
    expected = {n: p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad}, x.grad.clone()
    for p in layer.parameters():
        p.grad = None
    x.grad = None
    out = compiled(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, eager_out)
    for n, p in layer.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, expected[0][n])
    torch.testing.assert_close(x.grad, expected[1])


@pytest.mark.parametrize("fused", [False, True])
def test_gradient_checkpointing_gives_the_same_adapter_gradients(tokens, fused):
    plain = injected(fused=fused).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing_enable()
    assert checkpointed.is_gradient_checkpointing
    for step in range(2):  # the second step runs the fused op's q|k|v and gate|up groups
        for model in (plain, checkpointed):
            model.zero_grad(set_to_none=True)
            model(input_ids=tokens, labels=tokens).loss.backward()
        expected, got = lora_grads(plain), lora_grads(checkpointed)
        assert expected.keys() == got.keys() and len(got) == 2 * 7 * 2  # A, B × 7 linears × 2 layers
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)
    if fused:
        attention = checkpointed.model.layers[0].self_attn
        assert attention.q_proj.shared_input.followers_of(attention.q_proj) == (attention.k_proj, attention.v_proj)
