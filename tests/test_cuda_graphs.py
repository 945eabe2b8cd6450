"""A whole LoRA training step (forward, backward, optimizer) captured in a CUDA graph trains exactly
as eager steps do: the fused op's host-side state (adapter casts, sibling groups, rebuilt inputs,
the one-read B-gradient kernel used under capture) must all be recorded, not skipped. GPU only."""

from __future__ import annotations

import pytest
import torch

import lorakit

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def llama_bf16(seed: int = 0, dropout: float = 0.0):
    from transformers import LlamaConfig, LlamaForCausalLM

    # Big enough that every Triton path runs: T = 8192 tokens, q/o/gate/up/down outputs >= 256 wide
    # (the one-read B-gradient kernel), and down_proj's input is SwiGLU's product (product_grad).
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      attn_implementation="sdpa")
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model = lorakit.inject(model, lorakit.LoraConfig(r=16, alpha=32, dropout=dropout,
                                                      target_modules="all-linear"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B != 0, so that every adapter term counts from the first step
        for module in model.modules():
            if isinstance(module, lorakit.LoraLayer):
                for p in module.lora_B.values():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model.train()


def step(model, opt, ids):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    return loss.detach()


def adapters(model):
    return torch.cat([p.detach().float().flatten() for p in model.parameters() if p.requires_grad])


@cuda
def test_captured_training_step_trains_like_eager_steps():
    g = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, 512, (8, 1024), generator=g).cuda() for _ in range(8)]

    def optimizer(model):
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=1e-3, fused=True, capturable=True)

    eager = llama_bf16()
    opt = optimizer(eager)
    eager_losses = []
    for ids in batches:
        eager_losses.append(step(eager, opt, ids).item())
        opt.zero_grad(set_to_none=True)

    graphed = llama_bf16()
    opt = optimizer(graphed)
    losses = []
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # four eager steps, the last two on a side stream (capture recipe)
        for ids in batches[:4]:
            losses.append(step(graphed, opt, ids).item())
            opt.zero_grad(set_to_none=True)
    torch.cuda.current_stream().wait_stream(side)
    with torch.no_grad():  # an evaluation forward: the adapter casts are now up to date, and capture
        graphed(input_ids=batches[0])  # must still record their refresh for the replays
    static_ids = batches[0].clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step(graphed, opt, static_ids)
    before = adapters(graphed)
    for ids in batches[4:]:
        static_ids.copy_(ids)
        graph.replay()
        losses.append(static_loss.item())
    assert not torch.equal(before, adapters(graphed)), "replays did not train the adapters"
    assert losses == pytest.approx(eager_losses, rel=2e-3)
    a, b = adapters(graphed), adapters(eager)
    assert ((a - b).norm() / b.norm()).item() < 1e-2


@cuda
def test_dropout_refuses_capture_with_a_clear_error():
    model = llama_bf16(dropout=0.1)
    ids = torch.randint(0, 512, (1, 16), device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        model(input_ids=ids, labels=ids).loss.backward()
    torch.cuda.current_stream().wait_stream(side)
    model.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError) as caught:
        with torch.cuda.graph(graph):
            model(input_ids=ids, labels=ids).loss.backward()
    chain, error = [], caught.value
    while error is not None:  # ending the aborted capture may raise on top of ours
        chain.append(str(error))
        error = error.__context__
    assert any("lora_dropout=0" in message for message in chain), chain
