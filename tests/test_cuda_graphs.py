"""A whole LoRA training step (forward, backward, optimizer) captured in a CUDA graph trains as eager
steps do, by hand (torch.cuda.graph) and through torch.compile(mode="reduce-overhead"). GPU only."""

from __future__ import annotations

import pytest
import torch

import lorakit

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def llama_bf16(seed: int = 0, dropout: float = 0.0):
    from transformers import LlamaConfig, LlamaForCausalLM

    # Big enough that cuBLAS picks its model-size kernels: T = 8192 tokens, outputs >= 256 wide.
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
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    opt.step()
    return out.loss.detach(), out.logits.detach()


def optimizer(model, kind="adamw"):
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "sgd":  # updates proportional to the gradients: rounding differences stay small
        return torch.optim.SGD(params, lr=0.5)
    return torch.optim.AdamW(params, lr=1e-3, fused=True, capturable=True)


def adapters(model):
    return torch.cat([p.detach().float().flatten() for p in model.parameters() if p.requires_grad])


def warm_up_and_capture(model, opt, batches):
    """Eager steps on ``batches`` (the last two on a side stream, as torch's capture recipe asks),
    an evaluation forward, then the captured step: (graph, its input, its loss and logits, losses)."""
    losses = []
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for ids in batches:
            losses.append(step(model, opt, ids)[0].item())
            opt.zero_grad(set_to_none=True)
    torch.cuda.current_stream().wait_stream(side)
    static_ids = batches[0].clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss, static_logits = step(model, opt, static_ids)
    return graph, static_ids, static_loss, static_logits, losses


def sgd_steps(model, batches, compile_mode=None, compiler=torch.compile):
    """SGD steps over ``batches`` (compiled by ``compiler`` with ``compile_mode`` if given): (losses, adapters)."""
    opt = optimizer(model, "sgd")
    run = compiler(model, mode=compile_mode) if compile_mode else model
    losses = []
    for ids in batches:
        if compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        losses.append(step(run, opt, ids)[0].item())
        opt.zero_grad(set_to_none=True)
    return losses, adapters(model)


def eager_run(batches):
    return sgd_steps(llama_bf16(), batches)


@cuda
def test_captured_training_step_trains_like_eager_steps():
    # Plain SGD, so that the comparison is of summed gradients: Adam's normalized steps would turn
    # last-bit differences (cuBLAS may pick other algorithms under capture) into sign flips.
    g = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, 512, (8, 1024), generator=g).cuda() for _ in range(8)]
    start = adapters(llama_bf16())
    eager_losses, eager_adapters = eager_run(batches)

    model = llama_bf16()
    opt = optimizer(model, "sgd")
    graph, static_ids, static_loss, _, losses = warm_up_and_capture(model, opt, batches[:4])
    before = adapters(model)
    for ids in batches[4:]:
        static_ids.copy_(ids)
        graph.replay()
        losses.append(static_loss.item())
    assert not torch.equal(before, adapters(model)), "replays did not train the adapters"
    assert losses == pytest.approx(eager_losses, rel=2e-3)
    ours, theirs = adapters(model) - start, eager_adapters - start  # what training changed
    assert ((ours - theirs).norm() / theirs.norm()).item() < 2e-2


@cuda
def test_replays_use_the_adapters_as_they_are_at_replay():
    # A graph whose replays reused anything computed from the adapters before capture would train
    # on stale adapters. Zero every B after capture: the next replay's forward must be the base model's.
    import lorakit

    g = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, 512, (8, 1024), generator=g).cuda() for _ in range(3)]
    model = llama_bf16()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        with lorakit.disabled(model):
            base = model(input_ids=batches[2]).logits.float()
        adapted = model(input_ids=batches[2]).logits.float()
    assert ((adapted - base).norm() / base.norm()).item() > 0.05  # the adapters change the logits
    opt = optimizer(model)
    graph, static_ids, _, static_logits, _ = warm_up_and_capture(model, opt, batches[:2])
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, lorakit.LoraLayer):
                for p in module.lora_B.values():
                    p.zero_()
    static_ids.copy_(batches[2])
    graph.replay()
    replayed = static_logits.float()
    assert ((replayed - base).norm() / base.norm()).item() < 1e-2


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


@cuda
def test_compiled_reduce_overhead_training_trains_like_eager():
    """torch.compile(mode="reduce-overhead") (CUDA graphs of the compiled step) against eager steps."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(4)
    batches = [torch.randint(0, 512, (4, 512), generator=g).cuda() for _ in range(6)]
    start = adapters(llama_bf16())
    eager_losses, eager_adapters = eager_run(batches)
    losses, trained = sgd_steps(llama_bf16(), batches, compile_mode="reduce-overhead")
    assert losses == pytest.approx(eager_losses, rel=1e-2)
    ours, theirs = trained - start, eager_adapters - start
    assert ((ours - theirs).norm() / theirs.norm()).item() < 3e-2


@cuda
def test_lorakit_compile_reduce_overhead_trains_like_eager():
    """lorakit.compile (inputs remade in backward) under CUDA graphs, against eager steps."""
    import lorakit

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(5)
    batches = [torch.randint(0, 512, (4, 512), generator=g).cuda() for _ in range(6)]
    start = adapters(llama_bf16())
    eager_losses, eager_adapters = eager_run(batches)
    losses, trained = sgd_steps(llama_bf16(), batches, compile_mode="reduce-overhead", compiler=lorakit.compile)
    assert losses == pytest.approx(eager_losses, rel=1e-2)
    ours, theirs = trained - start, eager_adapters - start
    assert ((ours - theirs).norm() / theirs.norm()).item() < 3e-2


@cuda
def test_routed_forward_of_several_adapters_is_captured_and_replays_each_rows_adapter():
    """A routed inference forward (two adapters and base rows) in a CUDA graph: the route's masks are
    made on the device, so capture works, and replays follow a route index changed in place."""
    model = llama_bf16().eval()
    lorakit.inject(model, lorakit.LoraConfig(r=8, alpha=16, target_modules="all-linear"), name="other")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, lorakit.LoraLayer):
                module.lora_B["other"].normal_(0, 0.02)
    ids = torch.randint(0, 512, (3, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    index = torch.tensor([0, 1, -1], device="cuda")
    with torch.no_grad(), lorakit.route(model, index, names=["default", "other"]):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            model(input_ids=ids)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = model(input_ids=ids).logits
        for order in ([0, 1, -1], [1, -1, 0]):
            index.copy_(torch.tensor(order, device="cuda"))
            graph.replay()
            want = model(input_ids=ids).logits
            torch.testing.assert_close(captured, want, rtol=0, atol=0)
    with torch.no_grad():  # and the rows are each adapter's: row 0 of the last order is "other" alone
        lorakit.use(model, "other")
        alone = model(input_ids=ids[:1]).logits
    torch.testing.assert_close(captured[:1].float(), alone.float(), rtol=2e-2, atol=2e-2)
