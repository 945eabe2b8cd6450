"""`lorakit train | generate | eval | merge | demo | analyze | serve | combine`: parse the command
line, call the library.

Every option of `lorakit train` can also come from `--config run.yaml`: a flag's name with dashes
or underscores (`seq-len`, `no_compile`), a switch as true or false, a comma list (`targets`) as a
YAML list too; each value is checked as the flag checks it. Options given on the command line win
over the file.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from typing import Callable

from .cli_values import config_defaults, device_name, non_negative_int, positive_int

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # lorakit never downloads models


MODEL_HELP = "'default' (the embedded SmolLM2-135M-Instruct), a model directory or a .gguf file"
DEVICE_HELP = "auto: cuda if there is one (cuda:LOCAL_RANK under torchrun), else cpu; or cpu, cuda, cuda:1, ..., mps"
# The rule is lorakit.data.tokenize_example's (separator="\n"); generate and eval follow it.
PROMPT_ENCODING = (
    "How prompts are encoded: as `lorakit train` encoded them. A prompt is followed by a newline "
    "(\"\\n\"), and the model writes the completion after it, ending with EOS; the tokenizer adds its "
    "special tokens (BOS, where it has one) in front. With --chat-template, the prompt is the user turn of "
    "the tokenizer's chat template and the model writes the assistant turn. To use a merged model elsewhere, "
    "prompt it the same way: the prompt text plus \"\\n\".")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default after its help, except where the default is None or False (a switch
    is off unless given, and an option without a value says in its help what its absence means) or
    the help already says "(default: ...)" itself."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or "(default:" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)



def _train_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="LoRA fine-tuning of a model on a data file (or the demo task)",
                       description="LoRA fine-tuning of a model on a data file. Without --data, the built-in "
                                   "demo task is trained (generated records; see `lorakit demo`), and the run "
                                   "says so in its first line.",
                       formatter_class=HelpFormatter)
    p.add_argument("--config", help="YAML file with any of these options: a flag's name with dashes or underscores "
                   "(seq-len, no_compile), a switch as true or false, --targets also as a list; the command line "
                   "wins over it (default: none)")
    p.add_argument("--model", default="default", help=MODEL_HELP)
    p.add_argument("--task", default="causal", choices=["causal", "classification"],
                   help="causal: prompt -> completion; classification: text (or a pair) -> label")
    p.add_argument("--data", default="demo",
                   help="training file: JSONL (prompt/completion, or text), CSV/TSV/JSONL with a label "
                        "(--task classification) or E2E (MR||reference); 'demo', the default, is the "
                        "built-in generated demo task, for trying lorakit without data")
    p.add_argument("--eval-data", help="held-out file for eval loss (and accuracy) (default: none: no "
                   "evaluation; the demo task brings its own held-out examples)")
    p.add_argument("--format", default="auto", choices=["auto", "jsonl", "e2e", "classification"],
                   help="how to read --data; auto: from the file's extension and first line")
    p.add_argument("--out", default="runs/lora", help="run directory: adapter/, checkpoint/, metrics.jsonl, "
                   "loss.png, run.json")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r of ΔW = B·A")
    p.add_argument("--alpha", type=float, default=16, help="LoRA α: ΔW is scaled by α/r")
    p.add_argument("--init", default="kaiming",
                   help="how A and B start: kaiming (A kaiming-uniform, B = 0, as PEFT), gaussian (A ~ N(0, 1/r)), "
                        "pissa (PiSSA: A, B from the top-r singular vectors of W, exact SVD), pissa_niter_K "
                        "(PiSSA by randomized SVD with K iterations, e.g. pissa_niter_4) or olora (OLoRA: from W's "
                        "QR); pissa and olora leave W − s·B·A in the base, so the saved adapter is converted to a "
                        "plain LoRA of rank 2·--rank for the untouched base (docs/variants.md) (default: kaiming)")
    p.add_argument("--targets", help="comma list, a regex, or all-linear (default: the paper's Wq, Wv: "
                   "q_proj,v_proj; query,value for --task classification)")
    p.add_argument("--allow-missing-targets", action="store_true",
                   help="adapt the --targets names that match a module and leave out (with a warning, and "
                        "from adapter_config.json) those that match none (default: off: a name that matches "
                        "no module is an error that lists the names there are)")
    p.add_argument("--modules-to-save", help="comma list of modules trained in full (default: none; for "
                   "--task classification: classifier)")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout on the adapter's input (LoRA dropout)")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate of AdamW, reached after --warmup")
    p.add_argument("--weight-decay", type=float, default=0.01,
                   help="AdamW weight decay of the LoRA matrices (never of biases or norms)")
    p.add_argument("--dora", action="store_true",
                   help="DoRA (Liu et al. 2024): train a magnitude per output row beside the LoRA direction, "
                        "W' = m·(W0 + s·B·A)/‖W0 + s·B·A‖ (PEFT's use_dora; docs/variants.md); the serving bank "
                        "refuses DoRA adapters: merge them to serve (default: off: plain LoRA)")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw8bit"],
                   help="adamw: torch's AdamW; adamw8bit: bitsandbytes' 8-bit AdamW (Dettmers et al. 2022, QLoRA's "
                        "optimizer: a quarter of the optimizer state; needs bitsandbytes) (default: adamw)")
    p.add_argument("--loraplus-ratio", type=float,
                   help="LoRA+ (Hayou et al. 2024): the B matrices learn at this many times --lr, the rest at --lr "
                        "(the paper suggests 16) (default: none: off, one learning rate for all)")
    p.add_argument("--n-prefix", type=int, default=0,
                   help="LoRA + prefix embeddings (Hu et al. 2021, Table 15): train this many virtual-token "
                        "embeddings put in front of every input, with the adapter; saved beside it as "
                        "prefix_embeddings.safetensors, used by generate and serve (causal LMs, one process); "
                        "0: off")
    p.add_argument("--warmup", type=int, default=0, help="steps of linear warmup from 0 to --lr")
    p.add_argument("--schedule", default="linear", choices=["linear", "cosine", "constant"],
                   help="learning rate after warmup: linear or cosine decay to 0, or constant")
    p.add_argument("--label-smoothing", type=float, default=0.0,
                   help="label smoothing of the loss (the paper's E2E runs use 0.1)")
    p.add_argument("--epochs", type=float, default=1.0,
                   help="passes over the training data (fractions allowed); --steps overrides it")
    p.add_argument("--steps", type=int, help="optimizer steps (default: as many as --epochs takes)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per batch, across all processes")
    p.add_argument("--grad-accum", type=int, default=1, help="batches per optimizer step (gradient accumulation)")
    p.add_argument("--seq-len", type=positive_int, default=256,
                   help="longest example in tokens; a longer one loses prompt tokens from its start first")
    p.add_argument("--eval-every", type=int, default=100, help="steps between evaluations on the held-out data")
    p.add_argument("--log-every", type=int, default=10,
                   help="steps per metrics.jsonl row and loss.png point (the loss is their mean)")
    p.add_argument("--save-every", type=int, default=100,
                   help="steps between resumable checkpoints (one is also written at the end)")
    p.add_argument("--seed", type=int, default=0, help="seed of the run's random numbers (data order, dropout, "
                   "the adapter's initialisation)")
    p.add_argument("--chat-template", action="store_true",
                   help="format examples with the tokenizer's chat template (prompt: user turn, completion: "
                        "assistant turn) instead of prompt + newline + completion")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip malformed lines (counted) instead of failing")
    p.add_argument("--text-column", default="sentence", help="classification: the column that holds the text")
    p.add_argument("--text-pair-column", help="classification: the column of a pair's second text, e.g. RTE's "
                   "sentence2 (default: none: single texts)")
    p.add_argument("--label-column", default="label", help="classification: the column that holds the label")
    _quantize_options(p, "then train the adapter on it (QLoRA; docs/qlora.md); the run prints the base's "
                         "size before and after")
    p.add_argument("--device", default="auto", type=device_name, help=DEVICE_HELP)
    compiling = p.add_mutually_exclusive_group()
    compiling.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                           help="torch.compile the training step; auto: on CUDA only (default: %(default)s)")
    compiling.add_argument("--no-compile", dest="compile", action="store_const", const="off",
                           help="train eagerly: the same as --compile off")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun, shard the model across processes (FSDP2) instead of one copy each (DDP)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an OUT that holds a run; the old run stays whole (and resumable) "
                        "until the new one writes its first checkpoint, which then replaces it")
    return p


def _quantize_options(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--quantize", default="none", choices=["none", "nf4", "fp4", "int8"],
                   help=f"quantize the base model's linear layers with bitsandbytes on load, {what}: nf4 "
                        f"(QLoRA's 4-bit NormalFloat), fp4, or int8 (LLM.int8()); the output head stays dense; "
                        f"none: keep the weights as they load")
    p.add_argument("--double-quant", action="store_true",
                   help="with --quantize nf4 or fp4: quantize the 4-bit blocks' scales too (QLoRA's double "
                        "quantization, about 0.4 bits per weight less) (default: off)")


def _generation_options(p: argparse.ArgumentParser, formats: list[str], several_adapters: bool = False) -> None:
    p.add_argument("--model", default="default", help=MODEL_HELP)
    if several_adapters:
        p.add_argument("--adapter", action="append", metavar="[NAME=]PATH",
                       help="adapter directory (PEFT format); repeat as NAME=PATH to generate with several "
                            "adapters at once, each prompt with its own: a --data JSONL line names its adapter "
                            "with \"adapter\": NAME (null: the base model); lines without one, and --prompt, "
                            "use the first. With several, decoding is greedy from the unmerged base: --merge, --beams, "
                            "--length-penalty and --no-repeat-ngram need a single adapter (default: none: the base "
                            "model alone)")
    else:
        p.add_argument("--adapter", help="adapter directory (PEFT format) (default: none: the base model alone)")
    p.add_argument("--merge", action="store_true",
                   help="merge the adapter into the weights first (same outputs, the base model's speed)")
    p.add_argument("--chat-template", action="store_true",
                   help="wrap each prompt in the tokenizer's chat template, for an adapter trained with "
                        "train --chat-template (see 'How prompts are encoded' below)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, help="most tokens generated per prompt")
    p.add_argument("--beams", type=positive_int, default=1,
                   help="beam width; 1 is greedy decoding (the paper decodes E2E with 10 beams)")
    p.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam search only: a hypothesis scores its log-probability / length^penalty, so a "
                        "larger value favours longer outputs (the paper: 0.8 for E2E)")
    p.add_argument("--no-repeat-ngram", type=non_negative_int, default=0,
                   help="never repeat an n-gram of this many tokens, the prompt's included; 0: off")
    p.add_argument("--batch-size", type=positive_int, default=16, help="prompts generated together")
    p.add_argument("--format", default="auto", choices=formats,
                   help="how to read --data; auto: from the file's extension and first line")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip malformed lines of --data (counted) instead of failing")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="Low-Rank Adaptation for PyTorch models")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)

    g = sub.add_parser("generate", help="generate text with a model and an optional adapter",
                       description="Generate a completion for each prompt with a model and an optional adapter.",
                       epilog=PROMPT_ENCODING, formatter_class=HelpFormatter)
    _generation_options(g, ["auto", "jsonl", "e2e"], several_adapters=True)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a prompt (repeatable); give --prompt or --data")
    src.add_argument("--data", help="file of prompts: JSONL (prompt, optionally adapter; a completion is ignored) "
                     "or E2E (MR||reference)")
    g.add_argument("--out", help="write one JSON line {prompt, output} per prompt here, with its adapter when "
                   "named adapters are given (default: print them)")

    e = sub.add_parser("eval", help="BLEU/NIST/ROUGE-L/CIDEr over references, or accuracy",
                       description="Score an adapter: generate for each unique prompt and compare with all of its "
                                   "references (BLEU 0-100, NIST, ROUGE-L 0-1, CIDEr), or, for a classifier, "
                                   "accuracy (0-1). The JSON holds each metric's scale under 'scales'.",
                       epilog=PROMPT_ENCODING, formatter_class=HelpFormatter)
    _generation_options(e, ["auto", "jsonl", "e2e", "classification"])
    e.add_argument("--data", required=True, help="E2E / JSONL prompt-completion file, or a classification file")
    e.add_argument("--task", default="causal", choices=["causal", "classification"],
                   help="causal: generate and score against references; classification: accuracy of a classifier")
    e.add_argument("--limit", type=positive_int, help="score only the first N unique prompts (default: all)")
    e.add_argument("--out", help="write scores (JSON) here; hypotheses go beside it (default: print only)")

    m = sub.add_parser("merge", help="write a merged full model that transformers loads",
                       description="Fold an adapter into its base model (W = W0 + BA) and write a plain "
                                   "transformers model with its tokenizer.", formatter_class=HelpFormatter)
    m.add_argument("--model", default="default", help=MODEL_HELP)
    m.add_argument("--adapter", required=True, help="adapter directory (PEFT format) to merge")
    m.add_argument("--out", required=True, help="new (or empty) directory for the merged model and its tokenizer")
    m.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out whole: every file in it goes, once the merged model is written "
                        "beside it (default: off: a non-empty --out is refused)")
    _quantize_options(m, "as the adapter was trained on it (train --quantize): the merged model is then the "
                         "dequantized base plus ΔW, in float32, the model the adapter was trained with")

    d = sub.add_parser("demo", help="fine-tune the embedded SmolLM2 on the generated demo task (CPU, minutes)",
                       description="Fine-tune the embedded SmolLM2-135M on the generated demo task and show "
                                   "held-out outputs before and after (what `make demo` runs).",
                       formatter_class=HelpFormatter)
    d.add_argument("--out", default="runs/demo", help="run directory (as for train --out)")
    d.add_argument("--steps", type=int, default=60, help="optimizer steps of the demo run")
    d.add_argument("--device", default="auto", type=device_name, help=DEVICE_HELP)

    a = sub.add_parser("analyze", help="norms, spectra, subspace similarity and ΔW-vs-W amplification of "
                                       "one or two adapters (Hu et al. 2021, §7)",
                       description="Study an adapter as the LoRA paper does (Hu et al. 2021, §7): the norms and "
                                   "singular values of each layer's ΔW = B·A; with a second adapter, how much of "
                                   "their subspaces two adapters share; with --model, how strongly ΔW amplifies "
                                   "directions of W. Writes report.md, report.json and PNG figures to --out.",
                       formatter_class=HelpFormatter)
    a.add_argument("adapter", help="adapter directory (PEFT format)")
    a.add_argument("adapter2", nargs="?", help="a second adapter of the same base model, to compare with "
                   "(default: none: one adapter alone)")
    a.add_argument("--model", help="base model ('default', a model dir or a .gguf file) for the amplification "
                   "table (default: none: no amplification table)")
    a.add_argument("--task", default="causal", choices=["causal", "classification"],
                   help="how to load --model (classification: 'default' is the embedded MiniLM)")
    a.add_argument("--out", required=True, help="directory for report.md, report.json and the PNG figures")
    a.add_argument("--seed", type=int, default=0, help="seed of the random directions in the amplification table")
    _quantize_options(a, "as the adapter was trained on it: the amplification table then reads the "
                         "dequantized weights")
    _serve_parser(sub)
    _combine_parser(sub)
    return parser


def _combine_parser(sub) -> argparse.ArgumentParser:
    c = sub.add_parser("combine", help="one new adapter from several, weighted (PEFT's add_weighted_adapter)",
                       description="Combine adapters of one base model into a new PEFT-format adapter: cat "
                                   "(exact: ΔW = Σ wᵢ·ΔWᵢ, rank Σ rᵢ), svd (that sum truncated to --rank), or, "
                                   "on A and B separately (equal ranks), linear, ties, dare_linear, dare_ties, "
                                   "magnitude_prune (these keep a fraction --density of the entries). See "
                                   "docs/variants.md.", formatter_class=HelpFormatter)
    c.add_argument("--model", default="default", help=MODEL_HELP)
    c.add_argument("--adapter", action="append", metavar="NAME=PATH", required=True,
                   help="an adapter directory (PEFT format) under a name; repeat for each adapter to combine")
    c.add_argument("--weights", required=True, help="comma list of weights, one per --adapter, in order "
                   "(e.g. 0.7,0.3; negative subtracts)")
    c.add_argument("--method", default="cat", choices=["cat", "svd", "linear", "ties", "dare_linear", "dare_ties",
                                                       "magnitude_prune"], help="how to combine them")
    c.add_argument("--rank", type=int, help="svd: rank of the result (default: none; required with --method svd)")
    c.add_argument("--density", type=float, help="ties, dare_*, magnitude_prune: fraction of entries kept, in "
                   "(0, 1] (default: none; required with those methods)")
    c.add_argument("--seed", type=int, help="dare_*: seed of the random masks; PEFT after torch.manual_seed(S) "
                   "draws the same (default: none: torch's unseeded generator)")
    c.add_argument("--out", required=True, help="new (or empty) directory for the combined adapter (written "
                   "atomically); never one of the --adapter folders")
    c.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out whole: every file in it goes, once the combined adapter is "
                        "written beside it (default: off: a non-empty --out is refused)")
    return c


def _serve_parser(sub) -> argparse.ArgumentParser:
    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server: one base model, many adapters",
                       description="Serve the OpenAI API (/v1/completions, /v1/chat/completions, /v1/models) from "
                                   "one base model and many adapters: a request's \"model\" is an adapter's name or "
                                   "the base's served name. Also /v1/load_lora_adapter and /v1/unload_lora_adapter "
                                   "(vLLM's), /health, /metrics (Prometheus) and a page to try it at /. "
                                   "Stops on SIGTERM or Ctrl-C.",
                       epilog="Completion prompts are encoded as `lorakit train` encoded them (the prompt text "
                              "plus \"\\n\"); chat messages go through the tokenizer's chat template.",
                       formatter_class=HelpFormatter)
    s.add_argument("--model", default="default", help=MODEL_HELP)
    s.add_argument("--adapter", action="append", metavar="NAME=PATH",
                   help="an adapter (PEFT format) served as model NAME; repeatable (default: none: the base model "
                        "alone, until adapters are loaded at run time)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 opens it to the network "
                   "(then set --api-key)")
    s.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    s.add_argument("--api-key", help="every /v1 route needs the header Authorization: Bearer KEY (default: "
                   "$LORAKIT_API_KEY if set, else none: no key needed)")
    s.add_argument("--adapter-dir", help="folder that /v1/load_lora_adapter loads adapters from; lora_path is "
                   "relative to it, and paths that leave it are refused (default: none: no loading at run time)")
    s.add_argument("--allow-any-adapter-path", action="store_true",
                   help="let /v1/load_lora_adapter load from any path the server can read (default: off: only "
                        "from under --adapter-dir)")
    s.add_argument("--served-model-name", default="base", help="the name requests give as \"model\" for the base "
                   "model, and /v1/models lists")
    s.add_argument("--max-batch", type=int, default=16, help="requests that run together (the KV cache holds "
                   "this many sequences of --max-seq-len tokens)")
    s.add_argument("--max-adapters", type=int, default=8, help="distinct adapters in one running batch (bank "
                   "slots); more can be loaded and take turns")
    s.add_argument("--max-rank", type=int, default=64, help="largest adapter rank the server can load")
    s.add_argument("--max-seq-len", type=int, help="tokens per request, prompt and completion together "
                   "(default: the model's positions, at most 1024)")
    s.add_argument("--max-queue", type=int, default=64, help="requests that may wait for the running batch; "
                   "more are answered 503 with Retry-After")
    s.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body; larger ones "
                   "are answered 413")
    s.add_argument("--shutdown-timeout", type=float, default=10.0, help="seconds that running requests get "
                   "to finish after SIGTERM before they are cancelled")
    s.add_argument("--device", default="auto", type=device_name, help=DEVICE_HELP)
    return s


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    return parser._subparsers._group_actions[0].choices[command]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        # Options from the file become defaults; what the command line gives wins.
        sub = _subparser(parser, args.command)
        sub.set_defaults(**config_defaults(args.config, sub))
        args = parser.parse_args(argv)
    return args



# Library keywords that a flag of another name sets: TrainConfig.warmup_steps is --warmup, and so on.
_KEYWORD_DESTS = {"warmup_steps": "warmup", "max_steps": "steps", "out_dir": "out", "r": "rank",
                  "target_modules": "targets", "num_beams": "beams", "no_repeat_ngram_size": "no_repeat_ngram",
                  "adapters": "adapter", "max_len": "seq_len"}


def command_flags(command: str) -> dict[str, str]:
    """Library keyword -> the flag of `lorakit COMMAND` that sets it (`skip_bad_lines` -> `--skip-bad-lines`)."""
    sub = _subparser(build_parser(), command)
    flags: dict[str, str] = {}
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            flags.setdefault(action.dest, action.option_strings[0])  # --compile before --no-compile
    flags.update({keyword: flags[dest] for keyword, dest in _KEYWORD_DESTS.items() if dest in flags})
    if "--allow-missing-targets" in flags.values():
        flags["missing_targets=drop"] = "--allow-missing-targets"
    return flags


def _message(error: BaseException, command: str) -> str:
    """The error's text; where it names options (a SettingError), named by this command's flags."""
    from .hints import SettingError

    return error.render(command_flags(command)) if isinstance(error, SettingError) else str(error)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse(argv)
    except SystemExit as e:  # argparse printed the usage and the error (or the help): its status is ours
        return e.code if isinstance(e.code, int) else 0
    import warnings

    python_form = _format_own_warnings(args.command)
    try:
        return _run(args)
    finally:
        warnings.formatwarning = python_form  # main may run again in this process (tests)


def _run(args: argparse.Namespace) -> int:
    """The command, with its errors as one line each (exit status 2) and Ctrl-C as 130."""
    from . import commands  # heavy imports (torch, transformers) only after parsing
    from .models import quiet_transformers

    try:
        with quiet_transformers():  # no "Loading weights" bars or load reports: lorakit says what matters
            return getattr(commands, args.command)(args) or 0
    except KeyboardInterrupt:
        resume = "; the run continues from its last checkpoint with the same command and --resume" \
            if args.command == "train" else ""
        print(f"interrupted{resume}", file=sys.stderr)
        return 130
    except FileNotFoundError as e:  # the system's (errno set) says which path; ours say more
        if os.environ.get("LORAKIT_DEBUG"):
            raise
        message = _os_error_message(e) if e.errno is not None and e.filename else _message(e, args.command)
        print(f"lorakit {args.command}: error: {message}", file=sys.stderr)
        return 2
    except (ValueError, KeyError) as e:
        # Our errors say what is wrong and what to do; a traceback adds nothing for a user.
        if os.environ.get("LORAKIT_DEBUG"):
            raise
        print(f"lorakit {args.command}: error: {_message(e, args.command)}", file=sys.stderr)
        return 2
    except OSError as e:
        # A full disk, a read-only folder, a file where a folder should be: the path and what to do.
        if os.environ.get("LORAKIT_DEBUG"):
            raise
        print(f"lorakit {args.command}: error: {_os_error_message(e)}", file=sys.stderr)
        return 2


def _format_own_warnings(command: str) -> Callable:
    """lorakit's own warnings as one line, `lorakit train: warning: ...`, not Python's form with a
    source file and line; other packages' warnings keep theirs. Returns the formatter it replaced."""
    import warnings

    package = os.path.dirname(os.path.abspath(__file__))
    python_form = warnings.formatwarning

    def formatted(message, category, filename, lineno, line=None):
        if os.path.abspath(filename).startswith(package + os.sep) and issubclass(category, UserWarning):
            return f"lorakit {command}: warning: {message}\n"
        return python_form(message, category, filename, lineno, line)

    warnings.formatwarning = formatted
    return python_form


_OS_ADVICE = {
    errno.ENOSPC: "the disk is full: free some space, or write somewhere else",
    errno.EDQUOT: "the disk quota is used up: free some space, or write somewhere else",
    errno.EACCES: "permission denied: choose a folder you can write to",
    errno.EPERM: "permission denied: choose a folder you can write to",
    errno.EROFS: "the file system is read-only: choose a folder you can write to",
    errno.ENOTDIR: "a part of this path is a file, not a folder: choose another path",
    errno.EISDIR: "this is a folder, and a file is needed here: give a file path",
    errno.EEXIST: "something is already there: move it away or choose another path",
    errno.ENOENT: "no such file or folder: check the path",
}


def _os_error_message(error: OSError) -> str:
    """One line: the path the system refused, and what the user can do about it."""
    if error.errno is None:
        return str(error)
    advice = _OS_ADVICE.get(error.errno, error.strerror or str(error))
    return f"{error.filename}: {advice}" if error.filename else advice


if __name__ == "__main__":
    sys.exit(main())
