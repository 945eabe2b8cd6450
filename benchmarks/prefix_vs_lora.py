"""LoRA against LoRA + prefix embeddings (Hu et al. 2021, Table 15: "LoRA+PE") at equal trainable
parameters, on the demo task (lorakit.demo_task) with the embedded SmolLM2-135M-Instruct.

    .venv/bin/python benchmarks/prefix_vs_lora.py --steps 40 --seeds 0

Both arms adapt Wq and Wv (the paper's default). On SmolLM2 (30 layers, hidden 576, 3 KV heads of
64) one unit of rank on q_proj and v_proj costs 30 * (576 + 576 + 576 + 192) = 57,600 parameters,
and a prefix embedding 576, so rank r equals rank r - 1 plus 100 prefix embeddings exactly (the
defaults: r = 8 against r = 7 + 100). Same seed, data, steps, lr and schedule; the prefix arm also
has n_prefix more positions per sequence, so it costs more compute per step.

Reported per arm and seed: trainable parameters, the final and best validation loss (mean NLL per
target token on held-out generated records, never seen in training), and on the first --score of
them, greedy decoding: how often the answer is in the house format and exactly right. Writes JSON
under benchmarks/results/ and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import lorakit  # noqa: E402
from lorakit.data import demo_task  # noqa: E402
from lorakit.demo_task import LINE_PATTERN  # noqa: E402
from lorakit.finetune import DEMO_DATA, DataSpec, finetune  # noqa: E402
from lorakit.generate import generate_text  # noqa: E402
from lorakit.models import load_causal_lm  # noqa: E402
from lorakit.prefix import load_prefix  # noqa: E402
from lorakit.train import TrainConfig  # noqa: E402


def lora_config(rank: int, targets: list[str]) -> lorakit.LoraConfig:
    return lorakit.LoraConfig(r=rank, alpha=2 * rank, dropout=0.0, target_modules=targets)


def planned_count(rank: int, n_prefix: int, targets: list[str]) -> int:
    """Trainable parameters of an arm, counted on the injected model itself."""
    model, _ = load_causal_lm("default")
    lorakit.inject(model, lora_config(rank, targets))
    hidden = model.get_input_embeddings().weight.shape[1]
    return lorakit.trainable_parameters(model)[0] + n_prefix * hidden


def train_and_score(lora: lorakit.LoraConfig, n_prefix: int, seed: int, args: argparse.Namespace,
                    out_dir: Path) -> dict:
    """One `finetune` run of the demo task with ``lora`` (and ``n_prefix`` prefix embeddings), then its
    scores: trainable parameters, validation and training loss, the format and exact-match rates of
    greedy answers to the first ``args.score`` held-out records, the training time, three examples.
    `variants_quality.py` runs its arms through this too."""
    data = DataSpec(train=DEMO_DATA, seq_len=args.seq_len, chat_template=True,
                    demo_examples=(args.train_examples, args.eval_examples))
    _, held_out = demo_task(*data.demo_examples)
    scored = held_out[:args.score]
    config = TrainConfig(lr=args.lr, max_steps=args.steps, warmup_steps=max(args.steps // 10, 1),
                         batch_size=args.batch_size, eval_every=args.steps, save_every=args.steps,
                         log_every=max(args.steps // 4, 1), seed=seed, out_dir=out_dir,
                         overwrite=True, device="cpu", progress=False)
    model, tokenizer = load_causal_lm("default")
    start = time.perf_counter()
    result, model, tokenizer = finetune("default", data, lora, config, model=model, tokenizer=tokenizer,
                                        n_prefix=n_prefix)
    train_s = time.perf_counter() - start
    prefix = load_prefix(result.adapter_dir)
    answers = generate_text(model, tokenizer, [ex.prompt for ex in scored], chat_template=True,
                            max_new_tokens=40, batch_size=len(scored), progress=False, prefix=prefix)
    targets = [ex.completion for ex in scored]
    return {"trainable_parameters": result.trainable_parameters,
            "eval_loss": result.eval_metrics.get("eval_loss"), "best_eval_loss": result.best_eval_loss,
            "train_loss": result.train_loss,
            "format_rate": sum(bool(LINE_PATTERN.match(a)) for a in answers) / len(answers),
            "exact_match": sum(a == t for a, t in zip(answers, targets)) / len(answers),
            "train_seconds": round(train_s, 1), "examples": [{"answer": a, "target": t}
                                                             for a, t in list(zip(answers, targets))[:3]]}


def run_arm(name: str, rank: int, n_prefix: int, seed: int, args: argparse.Namespace, out_root: Path) -> dict:
    return {"arm": name, "seed": seed, "rank": rank, "n_prefix": n_prefix,
            **train_and_score(lora_config(rank, args.targets), n_prefix, seed, args, out_root / f"{name}-s{seed}")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--seeds", default="0", help="comma list")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rank", type=int, default=8, help="plain LoRA's rank")
    p.add_argument("--prefix-rank", type=int, default=7, help="the LoRA rank of the prefix arm")
    p.add_argument("--n-prefix", type=int, default=100)
    p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument("--train-examples", type=int, default=2000)
    p.add_argument("--eval-examples", type=int, default=64, help="held-out records for the validation loss")
    p.add_argument("--score", type=int, default=24, help="held-out records decoded for format / exact match")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "prefix_vs_lora.json"))
    args = p.parse_args()
    args.targets = args.targets.split(",")
    torch.set_num_threads(max(torch.get_num_threads(), 1))

    arms = [("lora", args.rank, 0), ("lora+prefix", args.prefix_rank, args.n_prefix)]
    counts = {name: planned_count(rank, n, args.targets) for name, rank, n in arms}
    for name, rank, n in arms:
        print(f"{name:12s} r={rank} n_prefix={n}: {counts[name]:,} trainable parameters")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in [int(s) for s in args.seeds.split(",")]:
            for name, rank, n in arms:
                rows.append(run_arm(name, rank, n, seed, args, Path(tmp)))
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "examples"}), flush=True)

    print(f"\n{'arm':12s} {'seed':>4s} {'params':>9s} {'eval loss':>9s} {'best':>7s} {'format':>6s} {'exact':>6s} "
          f"{'train s':>7s}")
    for r in rows:
        print(f"{r['arm']:12s} {r['seed']:4d} {r['trainable_parameters']:9,d} {r['eval_loss']:9.4f} "
              f"{r['best_eval_loss']:7.4f} {r['format_rate']:6.0%} {r['exact_match']:6.0%} {r['train_seconds']:7.0f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "prefix_vs_lora", "model": "SmolLM2-135M-Instruct (embedded)",
                               "task": "lorakit demo task", "settings": {k: v for k, v in vars(args).items()
                                                                         if k != "out"},
                               "planned_parameters": counts, "torch": torch.__version__,
                               "machine": platform.platform(), "threads": torch.get_num_threads(),
                               "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
