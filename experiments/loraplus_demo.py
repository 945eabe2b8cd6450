"""LoRA+ against plain LoRA on the built-in demo task (SmolLM2-135M-Instruct, CPU), issue 16.

Same seed, data, rank, steps and peak lr for every run; only `loraplus_ratio` changes. Prints a
table of train loss (mean of each logged window) and eval loss, and writes JSON to
experiments/results/loraplus_demo.json. One seed per setting: differences of a few percent are
within what another seed could give, and the table says so.

    .venv/bin/python experiments/loraplus_demo.py --steps 60 --ratios none,16
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lorakit.config import LoraConfig
from lorakit.files import atomic_write_text
from lorakit.finetune import DEMO_DATA, DataSpec, finetune
from lorakit.models import load_causal_lm
from lorakit.train import TrainConfig, read_metrics

RESULTS = Path(__file__).resolve().parent / "results" / "loraplus_demo.json"


def run(ratio: float | None, args: argparse.Namespace, out: Path) -> dict:
    model, tokenizer = load_causal_lm("default")
    data = DataSpec(train=DEMO_DATA, seq_len=128, chat_template=True, demo_examples=(2000, 24))
    lora = LoraConfig(r=args.rank, alpha=2 * args.rank, target_modules="all-linear")
    config = TrainConfig(lr=args.lr, max_steps=args.steps, warmup_steps=args.steps // 10, batch_size=args.batch_size,
                         eval_every=args.eval_every, save_every=args.steps, log_every=5, seed=args.seed,
                         out_dir=out, overwrite=True, device="cpu", progress=False, loraplus_ratio=ratio)
    start = time.perf_counter()
    result, _, _ = finetune("default", data, lora, config, model=model, tokenizer=tokenizer)
    rows = read_metrics(result.metrics_path)
    return {"loraplus_ratio": ratio, "seconds": time.perf_counter() - start,
            "train_loss": [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None],
            "eval_loss": [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4, help="peak lr of A (and of B without LoRA+)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--ratios", default="none,16", help="comma list; none is plain LoRA")
    p.add_argument("--out", default="runs/loraplus_demo")
    p.add_argument("--results", default=str(RESULTS), help="JSON file for the results")
    args = p.parse_args()
    runs = []
    for text in args.ratios.split(","):
        ratio = None if text == "none" else float(text)
        runs.append(run(ratio, args, Path(args.out) / f"ratio_{text}"))
        print(f"ratio {text}: eval loss {runs[-1]['eval_loss']}, {runs[-1]['seconds']:.0f} s", flush=True)
    steps = [s for s, _ in runs[0]["train_loss"]]
    print("\nstep | " + " | ".join(f"train loss, ratio {r['loraplus_ratio']}" for r in runs))
    for i, step in enumerate(steps):
        print(f"{step} | " + " | ".join(f"{r['train_loss'][i][1]:.4f}" for r in runs))
    print("\nstep | " + " | ".join(f"eval loss, ratio {r['loraplus_ratio']}" for r in runs))
    for i, (step, _) in enumerate(runs[0]["eval_loss"]):
        print(f"{step} | " + " | ".join(f"{r['eval_loss'][i][1]:.4f}" for r in runs))
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(results, json.dumps({"settings": vars(args), "runs": runs}, indent=1) + "\n")
    print(f"\nwrote {results}")


if __name__ == "__main__":
    main()
