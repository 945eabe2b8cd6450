"""E2E NLG with SmolLM2-135M: LoRA r=4 on Wq, Wv (the paper's setting) vs full fine-tuning.

Same data, same steps, same batches (same seed); each variant in its own process (run them on
two GPUs at once). Reports validation loss, BLEU/NIST/ROUGE-L/CIDEr on the validation MRs with the
paper's decoding (beam 10, length penalty 0.8, no-repeat-ngram 4), trainable parameters, the size
of what each run writes, peak GPU memory and training throughput.

    python experiments/e2e_lora_vs_full.py --variant lora --data-dir E2E_DIR --out runs/e2e
    python experiments/e2e_lora_vs_full.py --variant full --data-dir E2E_DIR --out runs/e2e
    python experiments/e2e_lora_vs_full.py --report runs/e2e      # the markdown table

The paper's hyper-parameters for LoRA on E2E (GPT-2 M, `examples/NLG/README.md` of
microsoft/LoRA): r=4, α=32, dropout 0.1, lr 2e-4, linear schedule with 500 warmup steps, label
smoothing 0.1, weight decay 0.01, batch 8, 5 epochs. Here: the same adapter settings, a shorter
run (``--steps``), and lr 5e-5 for full fine-tuning (a usual full-FT rate; 2e-4 is LoRA's).
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import torch

import lorakit
from lorakit.data import Batches, collate, read_e2e, tokenize_example
from lorakit.generate import generate_text
from lorakit.metrics import corpus_scores, group_references
from lorakit.models import load_causal_lm
from lorakit.train import TrainConfig, train


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def run(args) -> dict:
    model, tok = load_causal_lm(args.model, cache_dir=Path(args.out) / "cache")
    train_ex = read_e2e(Path(args.data_dir) / "train.txt")
    valid_ex = read_e2e(Path(args.data_dir) / "valid.txt")
    if args.limit:  # smoke tests only
        train_ex, valid_ex = train_ex[:args.limit], valid_ex[:args.limit]
    tokenize = partial(tokenize_example, tokenizer=tok, max_len=128)
    collate_fn = partial(collate, pad_id=tok.pad_token_id)
    train_b = Batches([tokenize(ex) for ex in train_ex], args.batch_size, seed=0, collate_fn=collate_fn)
    valid_b = Batches([tokenize(ex) for ex in valid_ex], 64, shuffle=False, collate_fn=collate_fn, epochs=1)

    lora = args.variant == "lora"
    if lora:
        lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=32, dropout=0.1, target_modules=["q_proj", "v_proj"]))
    out = Path(args.out) / args.variant
    config = TrainConfig(lr=2e-4 if lora else 5e-5, weight_decay=0.01, warmup_steps=min(500, args.steps // 10),
                         schedule="linear", label_smoothing=0.1, max_steps=args.steps, batch_size=args.batch_size,
                         eval_every=args.steps, save_every=args.steps, log_every=50, seed=0, out_dir=out,
                         overwrite=True, device=args.device)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = train(model, train_b, config, eval_batches=valid_b, adapter_name="default" if lora else None)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else 0

    sources, references = group_references([(ex.prompt, ex.completion) for ex in valid_ex])
    model.eval()
    start = time.perf_counter()
    hyps = generate_text(model, tok, sources, max_new_tokens=64, num_beams=10, length_penalty=0.8,
                         no_repeat_ngram_size=4, batch_size=64, progress=False)
    gen_seconds = time.perf_counter() - start
    (out / "valid_hypotheses.txt").write_text("\n".join(hyps) + "\n")
    scores = corpus_scores(hyps, references)
    report = {
        "variant": args.variant, "steps": result.steps, "batch_size": args.batch_size,
        "examples_seen": result.steps * args.batch_size, "train_examples": len(train_ex),
        "eval_loss": result.eval_metrics.get("eval_loss"), "train_loss": result.train_loss,
        "trainable_parameters": result.trainable_parameters, "total_parameters": result.total_parameters,
        "saved_bytes": dir_bytes(result.adapter_dir), "peak_gpu_bytes": peak,
        "train_seconds": seconds, "train_tokens_per_s": result.tokens / seconds, "generate_seconds": gen_seconds,
        "valid_mrs": len(sources), **scores, "gpu": torch.cuda.get_device_name() if cuda else None,
    }
    (Path(args.out) / f"result_{args.variant}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report


def markdown(out: Path) -> str:
    rows = [json.loads((out / f"result_{v}.json").read_text()) for v in ("lora", "full")
            if (out / f"result_{v}.json").exists()]
    lines = ["| variant | trainable params | saved | val loss | BLEU | NIST | ROUGE-L | CIDEr | peak GPU | tokens/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['trainable_parameters']:,} ({100 * r['trainable_parameters'] / r['total_parameters']:.2f}%) "
                     f"| {r['saved_bytes'] / 1e6:.1f} MB | {r['eval_loss']:.4f} | {r['bleu']:.2f} | {r['nist']:.3f} "
                     f"| {r['rouge_l']:.4f} | {r['cider']:.3f} | {r['peak_gpu_bytes'] / 2**30:.2f} GiB "
                     f"| {r['train_tokens_per_s']:,.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", choices=["lora", "full"])
    p.add_argument("--model", default="default", help="'default' or the SmolLM2 .gguf file")
    p.add_argument("--data-dir", default="../shared/data/e2e")
    p.add_argument("--out", default="runs/e2e")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cuda")
    p.add_argument("--limit", type=int, help="use only the first N train/valid lines (smoke tests)")
    p.add_argument("--report", help="print the markdown table of the results in this directory")
    args = p.parse_args()
    if args.report:
        print(markdown(Path(args.report)))
    else:
        run(args)


if __name__ == "__main__":
    main()
