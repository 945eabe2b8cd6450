"""The paper's §7 questions (Tables 5 and 6) with SmolLM2-135M on E2E NLG, all variants at once on one GPU.

- Which weights (Table 5): Wq, Wk, Wv or Wo at r=8, Wq+Wk and Wq+Wv at r=4, all four at r=2 (the
  paper's scaling of the rank with the number of adapted types). SmolLM2 uses grouped-query
  attention (9 query heads, 3 key/value heads): Wk and Wv map 576 -> 192, so their adapters are
  smaller and the budgets are NOT equal here; every row reports its own trainable parameter count.
- Which rank (Table 6): r = 1, 2, 4, 8, 64 on Wq+Wv and on Wq alone, α fixed at 16 for every rank
  (as the paper fixes α to the first rank it tried and does not retune it as r changes).
- References: the untrained model (no training), full fine-tuning (lr 5e-5), and a second seed of
  Wq+Wv r=8 (qv-r8-seed1) for the seed-to-seed subspace similarity.

Every LoRA variant: dropout 0.1, lr 2e-4, weight decay 0.01, label smoothing 0.1, linear schedule
with 10% warmup, the same steps, batch and data order (seed 0). Validation loss is measured on the
first 1,000 lines of E2E's valid.txt in file order; BLEU/NIST/ROUGE-L/CIDEr on the first 200
distinct MRs of valid.txt (each with all its references), decoded with beam 4, length penalty 0.8,
no-repeat-ngram 4, at most 64 new tokens. Each variant runs in its own process (`--one VARIANT`);
the launcher runs `--parallel` of them at once on the same GPU (one alone is launch-bound and
leaves the GPU mostly idle), kills what is still running at `--deadline` seconds and writes
<out>/summary.json; a variant killed there has no result.json and is reported as not finished.

    # one H200, in one 600 s call (sized for it, not yet measured there)
    python experiments/e2e_studies.py --model SmolLM2.gguf --data-dir E2E_DIR --out runs/e2e_studies; \\
    python experiments/e2e_studies.py --out runs/e2e_studies --pack $OUT/e2e_studies.tar.gz
    python experiments/e2e_studies.py --report runs/e2e_studies      # markdown tables
    # CPU smoke test
    .venv/bin/python experiments/e2e_studies.py --device cpu --limit 40 --steps 3 --batch-size 4 --gen-mrs 4 \\
        --max-new-tokens 8 --variants q-r8,qv-r2,full,untrained --parallel 2 \\
        --out /tmp/e2e_smoke --cache-dir /tmp/e2e_cache

The archive holds summary.json and, per variant, result.json, log.txt, metrics.jsonl, run.json,
hypotheses.txt and the LoRA adapter (never full fine-tuning's weights, checkpoints or the model
cache); one larger than --pack-max-mb is split into FILE.00, FILE.01, ... (`cat FILE.?? > FILE`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from functools import partial
from pathlib import Path

import torch

import lorakit
from lorakit.data import Batches, collate, read_e2e, tokenize_example
from lorakit.generate import generate_text
from lorakit.metrics import corpus_scores, group_references
from lorakit.models import load_causal_lm
from lorakit.train import TrainConfig, evaluate, train

TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
# name -> (weight types, rank), in launch order: the longest run (full) first, then the references,
# Table 5 (rank scaled with the number of types), the rest of Table 6, the second seed
VARIANTS = {
    "full": (None, None), "untrained": (None, None),
    "q-r8": ("q", 8), "k-r8": ("k", 8), "v-r8": ("v", 8), "o-r8": ("o", 8),
    "qk-r4": ("qk", 4), "qv-r4": ("qv", 4), "qkvo-r2": ("qkvo", 2),
    "qv-r8": ("qv", 8), "qv-r1": ("qv", 1), "qv-r2": ("qv", 2), "qv-r64": ("qv", 64),
    "q-r1": ("q", 1), "q-r2": ("q", 2), "q-r4": ("q", 4), "q-r64": ("q", 64),
    "qv-r8-seed1": ("qv", 8),
}
DATA = "data.json"  # the tokenized data, written once by the launcher for every variant (JSON: read in <1 s)
PACKED = ("result.json", "log.txt", "metrics.jsonl", "run.json", "hypotheses.txt")


def write_json(path: Path, obj, indent: int | None = 2) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=indent) + "\n")
    os.replace(tmp, path)


def fmt(value, spec: str) -> str:
    return "–" if value is None else spec.format(value)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def data_settings(args) -> dict:
    return {k: str(getattr(args, k)) for k in ("model", "data_dir", "limit", "valid_lines", "gen_mrs", "max_len")}


def prepare_data(args, tok) -> dict:
    """Tokenized train / validation examples and the generation MRs with all their references."""
    train_ex = read_e2e(Path(args.data_dir) / "train.txt")
    valid_ex = read_e2e(Path(args.data_dir) / "valid.txt")
    if args.limit:  # smoke tests only
        train_ex, valid_ex = train_ex[:args.limit], valid_ex[:args.limit]
    tokenize = partial(tokenize_example, tokenizer=tok, max_len=args.max_len)
    sources, references = group_references([(ex.prompt, ex.completion) for ex in valid_ex])
    return {"settings": data_settings(args), "train": [tokenize(ex) for ex in train_ex],
            "valid": [tokenize(ex) for ex in valid_ex[:args.valid_lines]],
            "sources": sources[:args.gen_mrs], "references": references[:args.gen_mrs]}


def run_one(name: str, args) -> dict:
    """Train (or not) one variant, measure it, write <out>/<name>/result.json."""
    wall = time.perf_counter()
    kinds, rank = VARIANTS[name]
    seed = 1 if name.endswith("seed1") else 0
    out = Path(args.out)
    vdir = out / name
    vdir.mkdir(parents=True, exist_ok=True)
    model, tok = load_causal_lm(args.model, cache_dir=args.cache_dir)
    data = json.loads((out / DATA).read_text()) if (out / DATA).exists() else None
    if data is None or data["settings"] != data_settings(args):
        data = prepare_data(args, tok)
    collate_fn = partial(collate, pad_id=tok.pad_token_id)
    valid_b = Batches(data["valid"], 64, shuffle=False, collate_fn=collate_fn, epochs=1)
    cuda = args.device.startswith("cuda")
    adapter = None
    if kinds is not None:
        torch.manual_seed(seed)
        lorakit.inject(model, lorakit.LoraConfig(r=rank, alpha=args.alpha, dropout=0.1,
                                                 target_modules=[TARGETS[k] for k in kinds]))
        adapter = "default"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    row = {"variant": name, "kinds": kinds, "rank": rank, "alpha": args.alpha if kinds else None, "seed": seed,
           "steps": 0, "batch_size": args.batch_size, "train_examples": len(data["train"]),
           "valid_examples": len(data["valid"]), "total_parameters": sum(p.numel() for p in model.parameters()),
           "trainable_parameters": 0, "adapter_parameters": 0, "adapter_dir": None, "adapter_bytes": None,
           "train_loss": None, "train_seconds": None, "train_tokens_per_s": None}
    start = time.perf_counter()
    if name == "untrained":
        device = torch.device(args.device)
        bf16 = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
        row["eval_loss"] = evaluate(model.to(device), valid_b, device=device, autocast=bf16)["eval_loss"]
    else:
        config = TrainConfig(lr=args.lr if kinds else args.full_lr, weight_decay=0.01, warmup_steps=args.steps // 10,
                             schedule="linear", label_smoothing=0.1, max_steps=args.steps,
                             batch_size=args.batch_size, eval_every=args.steps, save_every=args.steps,
                             log_every=50, keep_best=False, seed=seed, out_dir=vdir, overwrite=True,
                             device=args.device, progress=False)
        train_b = Batches(data["train"], args.batch_size, seed=seed, collate_fn=collate_fn)
        result = train(model, train_b, config, eval_batches=valid_b, adapter_name=adapter)
        seconds = time.perf_counter() - start
        shutil.rmtree(result.checkpoint_dir, ignore_errors=True)  # a one-shot run: never resumed
        row.update(steps=result.steps, eval_loss=result.eval_metrics.get("eval_loss"), train_loss=result.train_loss,
                   trainable_parameters=result.trainable_parameters, total_parameters=result.total_parameters,
                   adapter_parameters=sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n),
                   adapter_dir=os.path.relpath(result.adapter_dir, out), adapter_bytes=dir_bytes(result.adapter_dir),
                   train_seconds=seconds, train_tokens_per_s=result.tokens / seconds)
    print(f"{name}: eval loss {row['eval_loss']:.4f}", flush=True)
    start = time.perf_counter()
    hyps = generate_text(model, tok, data["sources"], max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                         length_penalty=args.length_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
                         batch_size=100, progress=False)
    (vdir / "hypotheses.txt").write_text("\n".join(hyps) + "\n")
    row.update(generate_seconds=time.perf_counter() - start, gen_mrs=len(hyps),
               **corpus_scores(hyps, data["references"]),
               peak_gpu_bytes=torch.cuda.max_memory_allocated() if cuda else None,
               device=torch.cuda.get_device_name() if cuda else args.device, wall_seconds=time.perf_counter() - wall)
    write_json(vdir / "result.json", row)
    print(json.dumps(row), flush=True)
    return row


def launch(args) -> None:
    """Build the model cache and the tokenized data once, then run the variants `--parallel` at a time."""
    start = time.monotonic()
    clock = lambda: time.monotonic() - start  # noqa: E731
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _, tok = load_causal_lm(args.model, cache_dir=args.cache_dir)  # the first load converts the GGUF
    write_json(out / DATA, prepare_data(args, tok), indent=None)
    print(f"[{clock():5.0f} s] model cache and data ready", flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.parallel)))
    waiting, running, status = args.variants.split(","), {}, {}
    try:
        while (waiting or running) and clock() < args.deadline:
            while waiting and len(running) < args.parallel:
                name = waiting.pop(0)
                (out / name).mkdir(exist_ok=True)
                (out / name / "result.json").unlink(missing_ok=True)
                with open(out / name / "log.txt", "w") as log:
                    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--one", name],
                                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
                running[name] = (proc, clock())
                print(f"[{clock():5.0f} s] started {name}", flush=True)
            for name, (proc, began) in list(running.items()):
                if proc.poll() is not None:
                    done = (out / name / "result.json").exists()
                    status[name] = {"status": "finished" if done else f"failed (exit {proc.returncode})",
                                    "seconds": clock() - began}
                    del running[name]
                    print(f"[{clock():5.0f} s] {name}: {status[name]['status']}", flush=True)
            time.sleep(0.5)
    finally:  # the deadline (or an interrupt): end what is still running
        for name, (proc, began) in running.items():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            done = (out / name / "result.json").exists()
            status[name] = {"status": "finished" if done else "killed at the deadline (not finished)",
                            "seconds": clock() - began}
        status.update({n: {"status": "not started (deadline)", "seconds": 0.0} for n in waiting})
        write_json(out / "summary.json", {"deadline_s": args.deadline, "parallel": args.parallel,
                                          "wall_s": clock(), "variants": status})
    print(report(out))


def report(out: Path) -> str:
    rows = {n: json.loads((out / n / "result.json").read_text()) for n in VARIANTS
            if (out / n / "result.json").exists()}
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    specs = {"eval_loss": "{:.4f}", "bleu": "{:.2f}", "nist": "{:.3f}", "rouge_l": "{:.4f}", "cider": "{:.3f}"}

    def cells(name: str) -> str:
        r = rows.get(name)
        if r is None:
            return " – |" * (len(specs) + 2)
        size = fmt(r["adapter_bytes"] and r["adapter_bytes"] / 1e6, "{:.2f} MB")
        return f" {r['trainable_parameters']:,} | {size} |" + "".join(f" {f.format(r[k])} |" for k, f in specs.items())

    head = "| trainable params | saved | val loss | BLEU | NIST | ROUGE-L | CIDEr |"
    parts = ["Which weights (rank scaled with the number of types; with GQA the Wk/Wv adapters are smaller, "
             "so the budgets differ: see the parameter count):", "", f"| adapted | rank {head}",
             "|---|---:" + "|---:" * 7 + "|"]
    for n in ("q-r8", "k-r8", "v-r8", "o-r8", "qk-r4", "qv-r4", "qkvo-r2"):
        kinds, rank = VARIANTS[n]
        parts.append(f"| {'+'.join('W' + k for k in kinds)} | {rank} |{cells(n)}")
    parts += ["", "Which rank (α = 16 for every rank):", "",
              "| rank | Wq+Wv params | Wq+Wv val loss | Wq+Wv BLEU | Wq params | Wq val loss | Wq BLEU |",
              "|---:" * 7 + "|"]
    for r in (1, 2, 4, 8, 64):
        line = f"| {r} |"
        for x in (rows.get(f"qv-r{r}"), rows.get(f"q-r{r}")):
            line += f" {x['trainable_parameters']:,} | {x['eval_loss']:.4f} | {x['bleu']:.2f} |" if x else " – |" * 3
        parts.append(line)
    parts += ["", "References:", "", f"| model {head}", "|---" + "|---:" * 7 + "|"]
    for n, label in [("untrained", "untrained (no training)"), ("full", "full fine-tuning"),
                     ("qv-r8", "LoRA Wq+Wv r=8"), ("qv-r8-seed1", "LoRA Wq+Wv r=8, seed 1")]:
        parts.append(f"| {label} |{cells(n)}")
    statuses = summary.get("variants", {})
    parts += ["", "Runs:", "", "| variant | status | train s | tokens/s | peak GPU GiB | wall s |",
              "|---|---" + "|---:" * 4 + "|"]
    for n in (n for n in VARIANTS if n in rows or n in statuses):
        r = rows.get(n, {})
        cols = [fmt(r.get("train_seconds"), "{:.0f}"), fmt(r.get("train_tokens_per_s"), "{:,.0f}"),
                fmt(r.get("peak_gpu_bytes") and r["peak_gpu_bytes"] / 2**30, "{:.2f}"),
                fmt(r.get("wall_seconds"), "{:.0f}")]
        parts.append(f"| {n} | {statuses.get(n, {}).get('status', 'finished')} | " + " | ".join(cols) + " |")
    return "\n".join(parts)


def pack(out: Path, dest: Path, max_mb: float) -> list[Path]:
    """summary.json, each variant's small files and LoRA adapter into one .tar.gz, split when too big."""
    for old in dest.parent.glob(f"{dest.name}.[0-9][0-9]"):
        old.unlink()
    tmp = dest.with_name(f".{dest.name}.tmp")
    files = [out / "summary.json"] + [out / name / f for name, (kinds, _) in VARIANTS.items()
                                      for f in PACKED + (("adapter",) if kinds else ())]  # full FT's weights stay
    with tarfile.open(tmp, "w:gz") as tar:
        for f in (f for f in files if f.exists()):
            tar.add(f, arcname=f"{out.name}/{f.relative_to(out)}")
    os.replace(tmp, dest)
    limit = int(max_mb * 2**20)
    if dest.stat().st_size <= limit:
        return [dest]
    parts = []
    with open(dest, "rb") as f:
        for i, chunk in enumerate(iter(lambda: f.read(limit), b"")):
            parts.append(dest.with_name(f"{dest.name}.{i:02d}"))
            parts[-1].write_bytes(chunk)
    dest.unlink()
    return parts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", help="'default' or the SmolLM2 .gguf file")
    p.add_argument("--data-dir", default="../shared/data/e2e")
    p.add_argument("--out", default="runs/e2e_studies")
    p.add_argument("--cache-dir", help="converted-model cache shared by all variants (default: $LORAKIT_CACHE)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list, launched in this order")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--full-lr", type=float, default=5e-5)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--valid-lines", type=int, default=1000, help="val loss on the first N lines of valid.txt")
    p.add_argument("--gen-mrs", type=int, default=200, help="score generation on the first N distinct MRs")
    p.add_argument("--num-beams", type=int, default=4)
    p.add_argument("--length-penalty", type=float, default=0.8)
    p.add_argument("--no-repeat-ngram-size", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--limit", type=int, help="use only the first N train/valid lines (smoke tests)")
    p.add_argument("--parallel", type=int, default=10, help="variants running at once")
    p.add_argument("--deadline", type=float, default=540, help="seconds from launch; then kill what still runs")
    p.add_argument("--one", help=argparse.SUPPRESS)  # a launched child: run this variant only
    p.add_argument("--report", metavar="OUT", help="print the markdown tables of the results in OUT")
    p.add_argument("--pack", metavar="FILE", help="archive --out's results, logs and adapters into FILE.tar.gz")
    p.add_argument("--pack-max-mb", type=float, default=15.0, help="split a larger archive into parts")
    args = p.parse_args()
    unknown = [v for v in args.variants.split(",") + ([args.one] if args.one else []) if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    if args.report:
        print(report(Path(args.report)))
    elif args.pack:
        for f in pack(Path(args.out), Path(args.pack), args.pack_max_mb):
            print(f"{f}: {f.stat().st_size / 1e6:.1f} MB")
    elif args.one:
        run_one(args.one, args)
    else:
        launch(args)


if __name__ == "__main__":
    main()
