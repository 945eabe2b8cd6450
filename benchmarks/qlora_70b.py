"""QLoRA on a Llama-3-70B-shaped model on one GPU: training-step speed and peak memory.

The model (hidden 8192, intermediate 28672, 80 layers, 64 heads, 8 KV heads, vocab 128256; seeded
random weights, std 0.02) is built layer by layer straight into 4 bits, so the bf16 model (~140 GB)
never exists: it is made on the meta device, then each decoder layer in turn is materialised in
bf16 on the device, quantized by ``lorakit.quantize.quantize_model`` (bitsandbytes Linear4bit,
NF4, double quantization, compute bf16, packed storage uint8: what ``lorakit train --quantize nf4
--double-quant`` makes) and its dense weights freed. Embeddings, norms and the output head stay
bf16. Then ``lorakit.inject`` r=16 all-linear (attention and MLP), transformers' gradient
checkpointing (non-reentrant), AdamW on the adapters (torch's fused one, or bitsandbytes'
AdamW8bit), random batches of ``--batch`` × ``--seq`` tokens.

Reports the median step, tokens/s, the peak memory of training (``torch.cuda.max_memory_allocated``
after the build) and of the build, and the base's bytes (parameters, buffers and quantization
state, ``lorakit.quantize.model_bytes``); prints a table and writes JSON.

    python benchmarks/qlora_70b.py                           # the 70B shape, CUDA, 1 × 2048, 5 steps
    python benchmarks/qlora_70b.py --optimizer adamw8bit --out benchmarks/results/qlora_70b_cuda_adamw8bit.json
    .venv/bin/python benchmarks/qlora_70b.py --device cpu --layers 2 --hidden 256 --intermediate 512 \\
        --heads 4 --kv-heads 2 --vocab 1000 --seq 64 --steps 1 --warmup 1 --out /tmp/qlora_smoke.json  # smoke test

Writes ``benchmarks/results/qlora_70b_<device>.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from train_speed import git  # noqa: E402

RESULTS = Path(__file__).parent / "results"
LLAMA3_70B = {"hidden": 8192, "intermediate": 28672, "layers": 80, "heads": 64, "kv_heads": 8, "vocab": 128256}
LORA_R, LORA_ALPHA = 16, 32  # all-linear, as train_speed.py's all-linear rows


def llama_config(args):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads,
                       num_key_value_heads=args.kv_heads, max_position_embeddings=max(8192, args.seq),
                       rope_theta=500000.0, tie_word_embeddings=False, initializer_range=0.02,
                       attn_implementation="sdpa")


@torch.no_grad()
def materialize(module: nn.Module, device: torch.device, std: float) -> None:
    """Give a meta module real storage on ``device`` (its dtype kept) and the initialisation
    transformers would: linears and embeddings N(0, std), biases 0, norms 1."""
    module.to_empty(device=device)
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            m.weight.normal_(0.0, std)
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()
        elif hasattr(m, "weight") and isinstance(m.weight, torch.Tensor) and m.weight.dim() == 1:
            m.weight.fill_(1.0)  # RMSNorm


def build(args, quantization):
    """The model, one decoder layer at a time in 4 bits on ``args.device``; the bf16 model never
    exists at once (at most one dense decoder layer does). Returns (model, build seconds)."""
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from lorakit.quantize import quantize_model

    config = llama_config(args)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    start = time.perf_counter()
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # the meta model's dtype, which to_empty keeps
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    std = config.initializer_range
    for part in (model.model.embed_tokens, model.model.norm, model.lm_head):
        materialize(part, device, std)
    with torch.device(device):  # inv_freq is computed at init: a meta one would stay garbage after to_empty
        model.model.rotary_emb = LlamaRotaryEmbedding(config)
    for i, layer in enumerate(model.model.layers):
        materialize(layer, device, std)
        report = quantize_model(layer, quantization)  # returns once this layer's dense weights are gone
        allocated = f", {torch.cuda.memory_allocated() / 2**30:.1f} GiB allocated" if device.type == "cuda" else ""
        print(f"layer {i + 1}/{len(model.model.layers)}: {len(report.quantized)} linears "
              f"{quantization.describe()}, {time.perf_counter() - start:.0f} s{allocated}", file=sys.stderr, flush=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"still on the meta device after the build: {', '.join(left[:5])}")
    return model.train(), time.perf_counter() - start


def checkpoint_activations(model) -> None:
    """transformers' gradient checkpointing, non-reentrant (it also makes the embeddings' output
    require grad, as for PEFT)."""
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.2x; the old name warns
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def make_optimizer(params: list, args):
    if args.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=1e-4)
    return torch.optim.AdamW(params, lr=1e-4, fused=args.device == "cuda")


def run(args) -> dict:
    import lorakit
    from lorakit.quantize import Quantization, model_bytes

    cuda = args.device == "cuda"
    quantization = Quantization(args.quantize, double_quant=args.double_quant,
                                compute_dtype=torch.bfloat16 if cuda else None)
    model, build_s = build(args, quantization)
    weight_bytes = model_bytes(model)
    build_peak = torch.cuda.max_memory_allocated() if cuda else None
    lorakit.inject(model, lorakit.LoraConfig(r=LORA_R, alpha=LORA_ALPHA, target_modules="all-linear"))
    checkpoint_activations(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, args)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(args.device) for _ in range(2)]
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for k in range(args.warmup + args.steps):
        sync()
        start = time.perf_counter()
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.autocast):
            loss = model(input_ids=batches[k % len(batches)], labels=batches[k % len(batches)]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
        print(f"step {k + 1}/{args.warmup + args.steps}: {times[-1] * 1e3:.0f} ms, loss {losses[-1]:.4f}"
              f"{' (warm-up)' if k < args.warmup else ''}", file=sys.stderr, flush=True)
    timed = times[args.warmup:]
    median = statistics.median(timed)
    result = {
        "median_step_s": median, "tokens_per_s": args.batch * args.seq / median,
        "slowest_over_median": max(timed) / median, "first_step_s": times[0],
        "peak_bytes": (torch.cuda.max_memory_allocated() if cuda else
                       resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
        "model_bytes": weight_bytes, "build_s": build_s, "quantization": quantization.describe(),
        "trainable_params": sum(p.numel() for p in params), "adapter_dtypes": sorted({str(p.dtype) for p in params}),
        "step_times_s": times, "losses": losses,
    }
    if cuda:
        result.update(build_peak_bytes=build_peak, peak_reserved_bytes=torch.cuda.max_memory_reserved(),
                      gpu=torch.cuda.get_device_name())
    return result


def report(args, result: dict) -> dict:
    from importlib.metadata import version

    shape = {key: getattr(args, key) for key in LLAMA3_70B}
    return {
        "benchmark": "qlora_70b", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": args.device, "gpu": result.get("gpu"), "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__, "transformers": version("transformers"), "bitsandbytes": version("bitsandbytes"),
        "git_commit": git("rev-parse", "HEAD"), "git_changed_src": git("status", "--porcelain", "src"),
        "args": vars(args), "shape": shape, "llama3_70b_shape": shape == LLAMA3_70B,
        "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "target_modules": "all-linear"}, "result": result,
    }


def print_table(args, result: dict) -> None:
    unit, scale = ("GiB", 2**30) if args.device == "cuda" else ("GB RSS", 1e9)
    shape = "Llama-3-70B" if all(getattr(args, k) == v for k, v in LLAMA3_70B.items()) else \
        f"{args.layers} layers × {args.hidden}"
    print(f"\nQLoRA training step, {shape}, {args.device}{' ' + result['gpu'] if result.get('gpu') else ''}, base "
          f"{result['quantization']}, lorakit r={LORA_R} all-linear, gradient checkpointing, {args.optimizer}, "
          f"batch {args.batch} × {args.seq}, median of {args.steps} steps after {args.warmup} warm-up steps")
    head = (f"{'ms/step':>9} {'tok/s':>9} {'weights ' + unit.split()[0]:>12} {'peak ' + unit:>12} "
            f"{'build peak':>11} {'trainable':>11} {'build s':>8} {'first s':>8} {'slowest':>8}")
    build_peak = f"{result['build_peak_bytes'] / scale:.2f}" if result.get("build_peak_bytes") else "-"
    print(head + "\n" + "-" * len(head))
    print(f"{result['median_step_s'] * 1e3:>9.1f} {result['tokens_per_s']:>9,.0f} "
          f"{result['model_bytes'] / scale:>12.3g} {result['peak_bytes'] / scale:>12.2f} {build_peak:>11} "
          f"{result['trainable_params']:>11,} {result['build_s']:>8.1f} {result['first_step_s']:>8.1f} "
          f"{result['slowest_over_median']:>8.3f}")
    print("weights: the base's parameters, buffers and quantization state, before adapters; peak: training "
          "(after the build); build peak: the build's")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    for key, default in LLAMA3_70B.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=default,
                       help=f"{'decoder layers to build' if key == 'layers' else key} (default %(default)s)")
    p.add_argument("--quantize", default="nf4", choices=["nf4", "fp4"])
    p.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=True,
                   help="quantize the 4-bit block scales too (QLoRA §3; default on)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=5, help="timed steps (default %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default %(default)s)")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw8bit"],
                   help="torch's AdamW (fused on CUDA) or bitsandbytes' AdamW8bit (default %(default)s)")
    p.add_argument("--autocast", action="store_true", help="bf16 autocast around the forward (default off)")
    p.add_argument("--out", help="output JSON (default benchmarks/results/qlora_70b_<device>.json)")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no GPU (for a smoke test: --device cpu with a small --layers, "
                "--hidden, ...)")
    if args.steps < 1:
        p.error("--steps must be at least 1")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        p.error("QLoRA needs bitsandbytes: pip install bitsandbytes")

    result = run(args)
    out = Path(args.out or RESULTS / f"qlora_70b_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report(args, result), indent=2) + "\n")
    print_table(args, result)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
