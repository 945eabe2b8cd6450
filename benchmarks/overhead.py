"""Inference overhead of LoRA: forward time of the base model vs an injected (unmerged) model vs
the same adapter merged (§4.2: a merged adapter must cost exactly what the base model costs).

All variants live in memory at once and are timed interleaved, round-robin, so that machine
noise hits each of them alike; the table gives medians and ratios to the base from one run.

    .venv/bin/python benchmarks/overhead.py            # SmolLM2-135M on CPU, batch 4 × 128
    .venv/bin/python benchmarks/overhead.py --device cuda --batch 64 --seq 256 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import lorakit
from lorakit.models import load_causal_lm

RESULTS = Path(__file__).parent / "results"


def build_variants(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    variants = {"base": model}
    for label, cfg in {
        "r8 q,v": lorakit.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]),
        "r16 all-linear": lorakit.LoraConfig(r=16, alpha=32, target_modules="all-linear"),
    }.items():
        unmerged = lorakit.inject(copy.deepcopy(model), cfg)
        with torch.no_grad():  # non-zero B, as after training, so nothing can be skipped
            for m in unmerged.modules():
                if isinstance(m, lorakit.LoraLayer):
                    m.lora_B["default"].normal_(std=0.01)
        merged = copy.deepcopy(unmerged)
        lorakit.merge(merged)
        variants[f"{label} unmerged"] = unmerged
        variants[f"{label} merged"] = merged
    return variants


def time_forward(model: torch.nn.Module, ids: torch.Tensor) -> float:
    if ids.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    model(ids)
    if ids.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()

    dtype = getattr(torch, args.dtype)
    model, _ = load_causal_lm(args.model, dtype=dtype)
    model = model.to(args.device).eval()
    variants = build_variants(model)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq),
                        generator=torch.Generator().manual_seed(0)).to(args.device)
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        for rep in range(args.warmup + args.repeats):
            for name, m in variants.items():
                t = time_forward(m, ids)
                if rep >= args.warmup:
                    times[name].append(t)

    base = statistics.median(times["base"])
    rows = []
    print(f"\nforward, {args.batch} × {args.seq} tokens, {args.dtype}, {args.device}, "
          f"median of {args.repeats} interleaved runs")
    print(f"{'variant':<24} {'ms':>9} {'vs base':>8} {'spread (IQR/median)':>20}")
    for name, ts in times.items():
        med = statistics.median(ts)
        q = statistics.quantiles(ts, n=4)
        rows.append({"variant": name, "median_s": med, "ratio_to_base": med / base,
                     "iqr_over_median": (q[2] - q[0]) / med, "times_s": ts})
        print(f"{name:<24} {med * 1e3:>9.1f} {med / base:>7.3f}× {(q[2] - q[0]) / med:>19.1%}")

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"overhead_{args.device}.json"
    out.write_text(json.dumps({
        "benchmark": "overhead", "model": args.model, "device": args.device, "dtype": args.dtype,
        "batch": args.batch, "seq": args.seq, "repeats": args.repeats, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "machine": platform.machine(), "rows": rows,
    }, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
