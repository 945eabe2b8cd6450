"""Plain LoRA against DoRA, PiSSA and OLoRA at the same rank, targets, data, steps and learning
rate, on the demo task (lorakit.demo_task) with the embedded SmolLM2-135M-Instruct.

    .venv/bin/python benchmarks/variants_quality.py --steps 30 --seeds 0

Each arm is one `lorakit.finetune` run that differs only in its `LoraConfig` (``use_dora=True``;
``init="pissa"``; ``init="olora"``). DoRA trains one magnitude per output row more than the others
(reported). Reported per arm and seed: trainable parameters, the final and best validation loss
(mean NLL per target token on held-out generated records, never seen in training), the training
wall time, and, on the first --score held-out records, greedy decoding: how often the answer is in
the house format and exactly right. The learning rate is the same for every arm (PiSSA's paper
uses a lower one than LoRA's; it is not tuned per arm here). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import lorakit  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from prefix_vs_lora import train_and_score  # noqa: E402

ARMS = {  # name -> LoraConfig fields beside r, alpha, dropout and targets
    "lora": {},
    "dora": {"use_dora": True},
    "pissa": {"init": "pissa"},
    "olora": {"init": "olora"},
}


def lora_config(arm: str, rank: int, targets: list[str]) -> lorakit.LoraConfig:
    return lorakit.LoraConfig(r=rank, alpha=2 * rank, dropout=0.0, target_modules=targets, **ARMS[arm])


def run_arm(arm: str, seed: int, args: argparse.Namespace, out_root: Path) -> dict:
    return {"arm": arm, "seed": seed, "rank": args.rank, "config": ARMS[arm],
            **train_and_score(lora_config(arm, args.rank, args.targets), 0, seed, args, out_root / f"{arm}-s{seed}")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", default=",".join(ARMS), help="comma list of %(default)s")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per arm (default %(default)s)")
    p.add_argument("--seeds", default="0", help="comma list (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=4, help="(default %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="the same for every arm (default %(default)s)")
    p.add_argument("--seq-len", type=int, default=128, help="(default %(default)s)")
    p.add_argument("--rank", type=int, default=8, help="(default %(default)s; alpha = 2 * rank)")
    p.add_argument("--targets", default="q_proj,v_proj", help="(default %(default)s)")
    p.add_argument("--train-examples", type=int, default=2000, help="(default %(default)s)")
    p.add_argument("--eval-examples", type=int, default=32, help="held-out records for the validation loss "
                   "(default %(default)s)")
    p.add_argument("--score", type=int, default=12, help="held-out records decoded for format / exact match "
                   "(default %(default)s)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "variants_quality.json"))
    args = p.parse_args()
    args.targets = args.targets.split(",")
    arms = args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        p.error(f"--arms: unknown {unknown}; known: {list(ARMS)}")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in [int(s) for s in args.seeds.split(",")]:
            for arm in arms:
                rows.append(run_arm(arm, seed, args, Path(tmp)))
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "examples"}), flush=True)

    print(f"\n{'arm':6s} {'seed':>4s} {'params':>9s} {'eval loss':>9s} {'best':>7s} {'format':>6s} {'exact':>6s} "
          f"{'train s':>7s}")
    for r in rows:
        print(f"{r['arm']:6s} {r['seed']:4d} {r['trainable_parameters']:9,d} {r['eval_loss']:9.4f} "
              f"{r['best_eval_loss']:7.4f} {r['format_rate']:6.0%} {r['exact_match']:6.0%} {r['train_seconds']:7.0f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "variants_quality", "model": "SmolLM2-135M-Instruct (embedded)",
                               "task": "lorakit demo task",
                               "settings": {k: v for k, v in vars(args).items() if k != "out"},
                               "torch": torch.__version__, "machine": platform.platform(),
                               "threads": torch.get_num_threads(), "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
