"""The paper's §7 questions on a small encoder: MiniLM (all-MiniLM-L6-v2) on SST-2, on CPU.

- Which weights (Table 5): a fixed budget of trainable adapter parameters spent on Wq, Wk, Wv,
  Wo, Wq+Wk, Wq+Wv or all four (rank 8, 4 or 2 so every variant has the same count).
- Which rank (Table 6): r = 1, 2, 4, 8, 64 on Wq+Wv and on Wq alone, α fixed at 8 (as the paper
  fixes α to the first rank tried).
- References: the untrained model (its new classifier head only, no training) and full fine-tuning.
- A second seed of r=8 on Wq+Wv, for the seed-to-seed subspace similarity.

Accuracy is measured on the first 1,000 examples of a held-out 5% slice of SST-2's train.tsv
(seed 0); the GLUE dev split is kept aside. Every variant: same steps, batch, data order and learning rate; the classifier head
trains in full beside the adapter (as in the paper's GLUE runs).

    .venv/bin/python experiments/minilm_sst2_studies.py --out runs/minilm        # ~30 min on 2 cores
    .venv/bin/python experiments/minilm_sst2_studies.py --report runs/minilm     # markdown tables
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import torch

import lorakit
from lorakit.data import Batches, collate, read_classification, split_holdout, tokenize_classification
from lorakit.models import load_classifier
from lorakit.train import TrainConfig, train

TARGETS = {"q": ["query"], "k": ["key"], "v": ["value"], "o": ["attention.output.dense"]}
# name -> (weight types, rank); the first seven share one parameter budget (Table 5)
VARIANTS = {
    "q-r8": ("q", 8), "k-r8": ("k", 8), "v-r8": ("v", 8), "o-r8": ("o", 8),
    "qk-r4": ("qk", 4), "qv-r4": ("qv", 4), "qkvo-r2": ("qkvo", 2),
    "qv-r1": ("qv", 1), "qv-r2": ("qv", 2), "qv-r8": ("qv", 8), "qv-r64": ("qv", 64),
    "q-r1": ("q", 1), "q-r2": ("q", 2), "q-r4": ("q", 4), "q-r64": ("q", 64),
    "qv-r8-seed1": ("qv", 8),
    "full": (None, None), "untrained": (None, None),
}


def run_variant(name: str, args, train_tok, hold_tok, pad_id: int) -> dict:
    """One variant on already tokenized data (every variant shares MiniLM's tokenizer)."""
    kinds, rank = VARIANTS[name]
    seed = 1 if name.endswith("seed1") else 0
    torch.manual_seed(seed)
    model, _ = load_classifier("default", num_labels=2, seed=seed)
    collate_fn = partial(collate, pad_id=pad_id)
    hold_b = Batches(hold_tok, 128, shuffle=False, collate_fn=collate_fn, epochs=1)
    out = Path(args.out) / name
    adapter = None
    if kinds is not None:
        targets = [t for k in kinds for t in TARGETS[k]]
        lorakit.inject(model, lorakit.LoraConfig(r=rank, alpha=8, dropout=0.1, target_modules=targets,
                                                 modules_to_save=["classifier"]), name="default")
        adapter = "default"
    steps = 0 if name == "untrained" else args.steps
    config = TrainConfig(lr=args.lr if kinds else args.full_lr, weight_decay=0.01, warmup_steps=steps // 10,
                         schedule="linear", max_steps=max(steps, 1), batch_size=args.batch_size,
                         eval_every=10**9, save_every=10**9, log_every=50, seed=seed, out_dir=out,
                         overwrite=True, device="cpu", progress=False)
    start = time.perf_counter()
    if name == "untrained":
        from lorakit.train import evaluate

        result_metrics, trainable = evaluate(model, hold_b), 0
    else:
        train_b = Batches(train_tok, args.batch_size, seed=seed, collate_fn=collate_fn)
        result = train(model, train_b, config, eval_batches=hold_b, adapter_name=adapter)
        result_metrics = result.eval_metrics
        trainable = result.trainable_parameters
    adapter_params = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    row = {"variant": name, "kinds": kinds, "rank": rank, "seed": seed, "steps": steps,
           "adapter_parameters": adapter_params, "trainable_parameters": trainable,
           "accuracy": result_metrics.get("eval_accuracy"), "eval_loss": result_metrics.get("eval_loss"),
           "seconds": time.perf_counter() - start}
    (Path(args.out) / f"{name}.json").write_text(json.dumps(row, indent=2) + "\n")
    print(json.dumps(row), flush=True)
    return row


def report(out: Path) -> str:
    rows = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))}

    def line(name: str, label: str) -> str:
        r = rows.get(name)
        if r is None:
            return f"| {label} | – | – |"
        return f"| {label} | {r['adapter_parameters']:,} | {100 * r['accuracy']:.2f} |"

    parts = ["Which weights (one budget):", "", "| adapted | adapter params | accuracy % |", "|---|---:|---:|"]
    parts += [line(n, lab) for n, lab in [("q-r8", "Wq, r=8"), ("k-r8", "Wk, r=8"), ("v-r8", "Wv, r=8"),
                                          ("o-r8", "Wo, r=8"), ("qk-r4", "Wq+Wk, r=4"), ("qv-r4", "Wq+Wv, r=4"),
                                          ("qkvo-r2", "Wq+Wk+Wv+Wo, r=2")]]
    parts += ["", "Which rank:", "", "| rank | Wq+Wv accuracy % | Wq accuracy % |", "|---:|---:|---:|"]
    for r in (1, 2, 4, 8, 64):
        a, b = rows.get(f"qv-r{r}"), rows.get(f"q-r{r}")
        parts.append(f"| {r} | {100 * a['accuracy']:.2f} |" if a else f"| {r} | – |")
        parts[-1] += f" {100 * b['accuracy']:.2f} |" if b else " – |"
    parts += ["", "References:", "", "| model | trainable params | accuracy % |", "|---|---:|---:|"]
    for n, lab in [("untrained", "untrained (new head, no training)"), ("full", "full fine-tuning"),
                   ("qv-r8", "LoRA Wq+Wv r=8"), ("qv-r8-seed1", "LoRA Wq+Wv r=8, seed 1")]:
        r = rows.get(n)
        parts.append(f"| {lab} | {r['trainable_parameters']:,} | {100 * r['accuracy']:.2f} |" if r else f"| {lab} | – | – |")
    return "\n".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="../shared/data/sst2/train.tsv")
    p.add_argument("--out", default="runs/minilm")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--full-lr", type=float, default=5e-5)
    p.add_argument("--holdout-size", type=int, default=1000, help="score the first N of the held-out slice")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--report")
    args = p.parse_args()
    if args.report:
        print(report(Path(args.report)))
        return
    examples = read_classification(args.data)
    train_ex, hold_ex = split_holdout(list(examples), 0.05, seed=0)
    hold_ex = hold_ex[:args.holdout_size]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    _, tok = load_classifier("default", num_labels=2)
    tokenize = partial(tokenize_classification, tokenizer=tok, max_len=64)
    train_tok, hold_tok = [tokenize(ex) for ex in train_ex], [tokenize(ex) for ex in hold_ex]
    for name in args.variants.split(","):
        run_variant(name, args, train_tok, hold_tok, tok.pad_token_id)


if __name__ == "__main__":
    main()
