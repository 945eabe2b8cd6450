"""`lorakit train | generate | eval | merge | demo`: parse the command line, call the library.

Every option of `lorakit train` can also come from `--config run.yaml` (same names, dashes or
underscores); options given on the command line win over the file.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # lorakit never downloads models


def _train_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="LoRA fine-tuning of a model on a data file (or --data demo)")
    p.add_argument("--config", help="YAML file with any of these options")
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M), a model dir or a .gguf file")
    p.add_argument("--task", default="causal", choices=["causal", "classification"])
    p.add_argument("--data", default="demo", help="JSONL/CSV/TSV/E2E file, or 'demo' for the generated task")
    p.add_argument("--eval-data", help="held-out file for eval loss (and accuracy)")
    p.add_argument("--format", default="auto", choices=["auto", "jsonl", "e2e", "classification"])
    p.add_argument("--out", default="runs/lora", help="run directory")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--targets", help="comma list, a regex, or all-linear (default: the paper's Wq, Wv: "
                   "q_proj,v_proj; query,value for --task classification)")
    p.add_argument("--modules-to-save", help="comma list of modules trained in full (default for "
                   "--task classification: classifier)")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=int, default=0, help="warmup steps")
    p.add_argument("--schedule", default="linear", choices=["linear", "cosine", "constant"])
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--steps", type=int, help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat-template", action="store_true", help="format examples with the chat template")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip malformed lines (counted) instead of failing")
    p.add_argument("--text-column", default="sentence")
    p.add_argument("--text-pair-column")
    p.add_argument("--label-column", default="label")
    p.add_argument("--device", default="auto")
    compiling = p.add_mutually_exclusive_group()
    compiling.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                           help="torch.compile the training step; auto: on CUDA only (default: %(default)s)")
    compiling.add_argument("--no-compile", dest="compile", action="store_const", const="off",
                           help="train eagerly: the same as --compile off")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun, shard the model across processes (FSDP2) instead of one copy each (DDP)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start afresh in an OUT that has a checkpoint")
    return p


def _generation_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default")
    p.add_argument("--adapter", help="adapter directory (PEFT format)")
    p.add_argument("--merge", action="store_true", help="merge the adapter into the weights first")
    p.add_argument("--chat-template", action="store_true")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--beams", type=int, default=1)
    p.add_argument("--length-penalty", type=float, default=1.0)
    p.add_argument("--no-repeat-ngram", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="Low-Rank Adaptation for PyTorch models")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)

    g = sub.add_parser("generate", help="generate text with a model and an optional adapter")
    _generation_options(g)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    src.add_argument("--data", help="file of prompts (JSONL prompt/completion or E2E)")
    g.add_argument("--out", help="write one JSON line per prompt here")

    e = sub.add_parser("eval", help="BLEU/NIST/ROUGE-L/CIDEr over references, or accuracy")
    _generation_options(e)
    e.add_argument("--data", required=True, help="E2E / JSONL prompt-completion file, or a classification file")
    e.add_argument("--task", default="causal", choices=["causal", "classification"])
    e.add_argument("--limit", type=int, help="score only the first N unique prompts")
    e.add_argument("--out", help="write scores (JSON) here; hypotheses go beside it")

    m = sub.add_parser("merge", help="write a merged full model that transformers loads")
    m.add_argument("--model", default="default")
    m.add_argument("--adapter", required=True)
    m.add_argument("--out", required=True)

    d = sub.add_parser("demo", help="fine-tune the embedded SmolLM2 on the generated demo task (CPU, minutes)")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--steps", type=int, default=60)
    d.add_argument("--device", default="auto")

    a = sub.add_parser("analyze", help="norms, spectra, subspace similarity and ΔW-vs-W amplification of "
                                       "one or two adapters (Hu et al. 2021, §7)")
    a.add_argument("adapter", help="adapter directory (PEFT format)")
    a.add_argument("adapter2", nargs="?", help="a second adapter of the same base model, to compare with")
    a.add_argument("--model", help="base model ('default', a model dir or a .gguf file) for the amplification table")
    a.add_argument("--task", default="causal", choices=["causal", "classification"],
                   help="how to load --model (classification: 'default' is the embedded MiniLM)")
    a.add_argument("--out", required=True, help="directory for report.md, report.json and the PNG figures")
    a.add_argument("--seed", type=int, default=0, help="seed of the random directions in the amplification table")
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        # Options from the file become defaults; what the command line gives wins.
        import yaml

        try:
            values = yaml.safe_load(Path(args.config).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            parser.error(f"--config {args.config}: {e}")
        if not isinstance(values, dict):
            parser.error(f"--config {args.config}: expected a mapping of option names to values")
        known = vars(args)
        values = {k.replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(values) - set(known))
        if unknown:
            parser.error(f"--config {args.config}: unknown option(s) {unknown}")
        sub = parser._subparsers._group_actions[0].choices[args.command]
        sub.set_defaults(**values)
        args = parser.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from . import commands  # heavy imports (torch, transformers) only after parsing

    try:
        return getattr(commands, args.command)(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, KeyError) as e:
        # Our errors say what is wrong and what to do; a traceback adds nothing for a user.
        if os.environ.get("LORAKIT_DEBUG"):
            raise
        print(f"lorakit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
