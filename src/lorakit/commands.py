"""What each `lorakit` command does with its parsed arguments (the parsing is in cli.py)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .adapters import merge as merge_adapters
from .config import ALL_LINEAR, LoraConfig
from .data import ClassificationExample, PromptLine, encode_prompt, read_prompts, read_references
from .files import (atomic_write_dir, atomic_write_files, atomic_write_text, create_parent_folders,
                    prepare_output_dir, prepare_output_file)
from .finetune import DEMO_DATA, DataSpec, finetune, is_main_process
from .generate import generate_text
from .hints import Setting, SettingError
from .inject import unload
from .io import load_adapter
from .prefix import PREFIX_FILE, has_prefix, load_prefix, model_hidden_size
from .metrics import SCALES, accuracy, corpus_scores, group_references
from .models import load_model
from .train import TrainConfig


def _targets(text: str) -> list[str] | str:
    """--targets: all-linear, a regular expression, or a comma list of module names."""
    if text == ALL_LINEAR or any(c in text for c in "()[]*+?\\|^$"):
        return text  # all-linear or a regular expression
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise SettingError(Setting("targets"), f" {text!r} names no module: give a comma list (q_proj,v_proj), "
                           "a regular expression or all-linear, or leave it out for the default (q_proj,v_proj; "
                           "query,value for --task classification)")
    return names


def check_device(device: str) -> None:
    """Refuse a --device that this machine or this build of torch does not have, before any work
    (the syntax was checked while parsing: cli.device_name)."""
    import torch

    kind, _, index = device.partition(":")
    if kind == "cuda":
        if not torch.cuda.is_available():
            why = ("no CUDA GPU is visible (check nvidia-smi and CUDA_VISIBLE_DEVICES)"
                   if torch.backends.cuda.is_built() else f"this torch ({torch.__version__}) is built without CUDA")
            raise SettingError(Setting("device", device), f": {why}; use ", Setting("device", "cpu"),
                               " (or auto, which picks cuda where there is one), or install a CUDA build of torch")
        # Under torchrun, plain cuda means cuda:LOCAL_RANK (train.distributed.setup).
        wanted = int(index) if index else int(os.environ.get("LOCAL_RANK", "0"))
        count = torch.cuda.device_count()
        if wanted >= count:
            raise SettingError(Setting("device", device), f": there is no GPU {wanted}, only {count} (cuda:0 to "
                               f"cuda:{count - 1}); give one of those, or ", Setting("device", "cuda"))
    elif kind == "mps" and not torch.backends.mps.is_available():
        raise SettingError(Setting("device", device), ": MPS (Apple's GPU) is not available here; use ",
                           Setting("device", "cpu"), " or auto")


def _quantization(args: argparse.Namespace):
    """The --quantize/--double-quant choice as a lorakit.quantize.Quantization, or None."""
    if args.quantize == "none":
        if args.double_quant:
            raise SettingError(Setting("double_quant"), " quantizes the scales of a 4-bit base: add ",
                               Setting("quantize", "nf4"), " (or fp4)")
        return None
    from .quantize import Quantization

    return Quantization(args.quantize, double_quant=args.double_quant)


def _load_base(args: argparse.Namespace, task: str = "causal", **kwargs):
    """load_model, then the --quantize choice applied (its summary printed)."""
    model, tokenizer = load_model(args.model, task, **kwargs)
    quantization = _quantization(args)
    if quantization is not None:
        from .quantize import quantize_model

        print(quantize_model(model, quantization).summary())
    return model, tokenizer


def train(args: argparse.Namespace) -> None:
    check_device(args.device)
    if args.data == DEMO_DATA and is_main_process():
        # The first line of the run, so nobody mistakes the demo for a run on their own data.
        print("data: the built-in demo task (generated records, lorakit.demo_task), since --data is not given "
              "or is 'demo'; pass --data FILE to train on your own data")
    classify = args.task == "classification"
    # §4.2 defaults: adapt Wq and Wv; a classifier's new head has to train in full.
    targets = args.targets if args.targets is not None else ("query,value" if classify else "q_proj,v_proj")
    saved = args.modules_to_save if args.modules_to_save is not None else ("classifier" if classify else "")
    lora = LoraConfig(r=args.rank, alpha=args.alpha, dropout=args.dropout, target_modules=_targets(targets),
                      modules_to_save=[m for m in saved.split(",") if m] or None, init=args.init,
                      use_dora=args.dora)
    config = TrainConfig(lr=args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup,
                         schedule=args.schedule, label_smoothing=args.label_smoothing, epochs=args.epochs,
                         max_steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                         eval_every=args.eval_every, save_every=args.save_every, log_every=args.log_every, seed=args.seed,
                         out_dir=args.out, overwrite=args.overwrite, device=args.device,
                         fsdp=args.fsdp, compile=args.compile,
                         loraplus_ratio=args.loraplus_ratio, optimizer=args.optimizer)
    data = DataSpec(train=args.data, eval=args.eval_data, format=args.format, seq_len=args.seq_len,
                    chat_template=args.chat_template, skip_bad_lines=args.skip_bad_lines,
                    text_column=args.text_column, text_pair_column=args.text_pair_column,
                    label_column=args.label_column)
    quantization = _quantization(args)  # a bad --quantize/--double-quant pair fails before any work
    prepare_output_dir(args.out)  # before the work: a run that cannot write its files fails now
    finetune(args.model, data, lora, config, task=args.task, resume=args.resume,  # it prints its "done:" line
             missing_targets="drop" if args.allow_missing_targets else "error", quantization=quantization,
             n_prefix=args.n_prefix)


def _read_examples(args: argparse.Namespace, format: str) -> list:
    """The examples that eval scores from `args.data`, saying how many malformed lines were skipped."""
    result = read_references(args.data, format, skip_bad_lines=args.skip_bad_lines)
    if result.n_skipped:
        print(f"{args.data}: skipped {result.n_skipped} malformed line(s), first at line {result.skipped[0][0]}")
    return result


def _model_with_adapter(args: argparse.Namespace, task: str = "causal", adapter: str | None = None):
    model, tokenizer = load_model(args.model, task)
    adapter = adapter if adapter is not None else args.adapter
    if adapter:
        load_adapter(model, adapter)
        if args.merge:
            merge_adapters(model)
    model.eval()
    return model, tokenizer


def _adapter_prefix(model, adapter: str | None):
    """The prefix embeddings saved beside ``adapter`` (train --n-prefix), said once on stderr; else None."""
    if not adapter:
        return None
    prefix = load_prefix(adapter, hidden_size=model_hidden_size(model))
    if prefix is not None:
        print(f"{adapter}: using its {prefix.n_prefix} prefix embeddings ({PREFIX_FILE}) in front of every prompt",
              file=sys.stderr)
        prefix.to(next(model.parameters()).device)
    return prefix


def _generation_kwargs(args: argparse.Namespace) -> dict:
    return dict(chat_template=args.chat_template, max_new_tokens=args.max_new_tokens, num_beams=args.beams,
                length_penalty=args.length_penalty, no_repeat_ngram_size=args.no_repeat_ngram,
                batch_size=args.batch_size)


def generate(args: argparse.Namespace) -> None:
    named = _named_adapters(args.adapter or [])
    if args.prompt:
        lines = [PromptLine(p, 0) for p in args.prompt]
    else:
        lines = read_prompts(args.data, args.format, skip_bad_lines=args.skip_bad_lines)
        if lines.n_skipped:
            print(f"{args.data}: skipped {lines.n_skipped} malformed line(s), first at line {lines.skipped[0][0]}")
    if not lines:
        raise ValueError(f"{args.data}: no prompts found (expected JSONL lines with a \"prompt\", or E2E lines)")
    prompts = [line.prompt for line in lines]
    if args.out:
        prepare_output_file(args.out)  # before the work: a path that cannot be written fails now
    if named is None:
        if any(line.names_adapter for line in lines):
            first = next(line for line in lines if line.names_adapter)
            raise ValueError(f"{args.data}, line {first.line}: names adapter {first.adapter!r}, but no named "
                             f"adapter is given; pass --adapter NAME=PATH for each adapter the lines name")
        model, tokenizer = _model_with_adapter(args, adapter=(args.adapter or [None])[0])
        prefix = _adapter_prefix(model, (args.adapter or [None])[0])
        _positions_needed(args, lines, [None] * len(lines), model, tokenizer, {None: prefix})
        outputs = generate_text(model, tokenizer, prompts, prefix=prefix, **_generation_kwargs(args))
        records = [{"prompt": p, "output": o} for p, o in zip(prompts, outputs)]
    else:
        chosen = _line_adapters(lines, named, args.data)
        outputs = _generate_with_engine(args, named, lines, chosen)
        records = [{"prompt": p, "adapter": a, "output": o} for p, a, o in zip(prompts, chosen, outputs)]
    if args.out:
        create_parent_folders(args.out)  # only now: a command that fails leaves no empty folders behind
        atomic_write_text(args.out, "".join(json.dumps(r) + "\n" for r in records))
        print(f"wrote {len(outputs)} outputs to {args.out}")
    else:
        for r in records:
            label = f"[{r['adapter'] or 'base'}] " if "adapter" in r else ""
            print(f">>> {label}{r['prompt']}\n{r['output']}\n")


def _positions_needed(args: argparse.Namespace, lines: list[PromptLine], adapters: list[str | None], model,
                      tokenizer, prefixes: dict) -> int:
    """The positions the longest request takes: its prompt as encoded, its adapter's prefix
    embeddings and --max-new-tokens less one (the last new token is never fed back). A request the
    model has no room for is refused here, naming its line, before any generation."""
    limit = getattr(model.config, "max_position_embeddings", None)
    need = 0
    for k, (line, adapter) in enumerate(zip(lines, adapters)):
        prefix = prefixes.get(adapter)
        n_prefix = 0 if prefix is None else prefix.n_prefix
        n = len(encode_prompt(line.prompt, tokenizer, args.chat_template)) + n_prefix
        total = n + args.max_new_tokens - 1
        if limit is not None and total > limit:
            where = f"--prompt #{k + 1}" if args.prompt else \
                f"{args.data}, line {line.line}" if line.line else f"{args.data}, prompt {k + 1}"
            with_prefix = f" (with adapter {adapter!r}'s {n_prefix} prefix embeddings)" if n_prefix else ""
            advice = f"lower --max-new-tokens to {limit - n + 1} or less, or" if n <= limit else "the prompt alone " \
                "is too long:"
            raise ValueError(f"{where}: the prompt has {n} tokens{with_prefix}; with --max-new-tokens "
                             f"{args.max_new_tokens} it needs {total} positions, over the model's {limit}: {advice} "
                             f"shorten the prompt")
        need = max(need, total)
    return need


def _named_adapters(specs: list[str]) -> dict[str, str] | None:
    """NAME -> PATH from repeated ``--adapter NAME=PATH``; None for no adapter or one plain PATH."""
    if len(specs) <= 1 and all("=" not in s or Path(s).is_dir() for s in specs):
        return None
    named: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or Path(spec).is_dir():
            raise ValueError(f"--adapter {spec}: with several adapters, give each as NAME=PATH "
                             f"(e.g. --adapter sql=runs/sql/adapter)")
        if not name:
            raise ValueError(f"--adapter {spec}: the name before '=' is empty; give NAME=PATH (e.g. --adapter "
                             f"sql={path}), or the path alone for one unnamed adapter")
        if not path:
            raise ValueError(f"--adapter {spec}: the path after '=' is empty; give NAME=PATH (e.g. --adapter "
                             f"{name}=runs/{name}/adapter)")
        if name in named:
            raise ValueError(f"--adapter {spec}: the name {name!r} is given twice; give each adapter its own name")
        named[name] = path
    return named


def _line_adapters(lines: list[PromptLine], named: dict[str, str], source: str | None) -> list[str | None]:
    """Each prompt's adapter: the one its line names (None: the base model), else the first given."""
    first = next(iter(named))
    chosen = []
    for line in lines:
        if line.names_adapter and line.adapter is not None and line.adapter not in named:
            raise ValueError(f"{source}, line {line.line}: names adapter {line.adapter!r}, which no --adapter "
                             f"gives; the adapters are {list(named)} (or null for the base model)")
        chosen.append(line.adapter if line.names_adapter else first)
    return chosen


def _generate_with_engine(args: argparse.Namespace, named: dict[str, str], lines: list[PromptLine],
                          adapters: list[str | None]) -> list[str]:
    """Several adapters in one batched run: lorakit's serving engine (greedy decoding)."""
    refused = [flag for flag, on in (("--merge", args.merge), (f"--beams {args.beams}", args.beams != 1),
                                     (f"--length-penalty {args.length_penalty}", args.length_penalty != 1.0),
                                     (f"--no-repeat-ngram {args.no_repeat_ngram}", args.no_repeat_ngram != 0)) if on]
    if refused:
        raise ValueError(f"{', '.join(refused)}: these need a single --adapter PATH; with several named adapters "
                         f"lorakit generates greedily, every prompt with its own adapter, from the unmerged base")
    from .io import read_adapter
    from .serving import Engine

    ranks = []
    for name, path in named.items():
        config, _ = read_adapter(path)
        ranks.append(max([config.r, *config.rank_pattern.values()]))
    model, tokenizer = load_model(args.model, "causal")
    model.eval()
    prefixes = {name: load_prefix(path, hidden_size=model_hidden_size(model)) for name, path in named.items()}
    # The KV cache holds what the longest request needs (refused with its line if the model has no room).
    need = _positions_needed(args, lines, adapters, model, tokenizer, prefixes)
    engine = Engine(model, tokenizer, max_batch=args.batch_size, max_adapters=len(named), max_rank=max(ranks),
                    max_seq_len=max(need, 2), chat_template=args.chat_template)
    for name, path in named.items():
        engine.add_adapter(name, path)
        if name in engine.prefixes:
            print(f"{path}: using its {len(engine.prefixes[name])} prefix embeddings ({PREFIX_FILE}) in front of "
                  f"the prompts of adapter {name!r}", file=sys.stderr)
    return engine.generate([line.prompt for line in lines], adapters=adapters, max_new_tokens=args.max_new_tokens)


def eval(args: argparse.Namespace) -> None:  # noqa: A001 - the command's name
    if args.out:
        prepare_output_file(args.out)  # before the work: the scores must not be lost at the end
    examples = _read_examples(args, "classification" if args.task == "classification" else args.format)
    if args.task == "classification" or (examples and isinstance(examples[0], ClassificationExample)):
        scores, hypotheses = _eval_classification(args, examples), None
    else:
        sources, references = group_references([(ex.prompt, ex.completion) for ex in examples])
        if args.limit:
            sources, references = sources[:args.limit], references[:args.limit]
        model, tokenizer = _model_with_adapter(args)
        hypotheses = generate_text(model, tokenizer, sources, prefix=_adapter_prefix(model, args.adapter),
                                   **_generation_kwargs(args))
        scores = corpus_scores(hypotheses, references)
        scores["examples"] = len(sources)
        scores["scales"] = {name: SCALES[name] for name in scores if name in SCALES}
    print(json.dumps(scores, indent=2))
    if args.out:
        out = Path(args.out)
        create_parent_folders(out)  # only now: a command that fails leaves no empty folders behind
        files = {out: lambda tmp: tmp.write_text(json.dumps(scores, indent=2) + "\n")}
        if hypotheses is not None:
            files[out.with_suffix(".hypotheses.txt")] = lambda tmp: tmp.write_text("\n".join(hypotheses) + "\n")
        atomic_write_files(files)


def _eval_classification(args: argparse.Namespace, examples: list) -> dict:
    import torch
    from tqdm.auto import tqdm

    from .data import collate, tokenize_classification

    model, tokenizer = load_model(args.model, "classification", num_labels=max(ex.label for ex in examples) + 1)
    if args.adapter:
        load_adapter(model, args.adapter)
    model.eval()
    examples = examples[:args.limit] if args.limit else examples
    predictions = []
    with torch.inference_mode():
        starts = range(0, len(examples), args.batch_size)
        for i in tqdm(starts, desc="eval", unit="batch", disable=len(starts) < 2):
            chunk = [tokenize_classification(ex, tokenizer, 512) for ex in examples[i:i + args.batch_size]]
            batch = collate(chunk, tokenizer.pad_token_id)
            batch.pop("labels")
            predictions += model(**batch).logits.argmax(-1).tolist()
    return {"accuracy": accuracy(predictions, [ex.label for ex in examples]), "examples": len(examples),
            "scales": {"accuracy": SCALES["accuracy"]}}


def merge(args: argparse.Namespace) -> None:
    _quantization(args)  # a bad --quantize/--double-quant pair fails before anything loads
    out = _replaceable_output_dir(args, {f"--model {args.model}": args.model,  # refused before anything loads
                                         f"--adapter {args.adapter}": args.adapter})
    model, tokenizer = _load_base(args)
    load_adapter(model, args.adapter)
    if has_prefix(args.adapter):
        print(f"warning: {args.adapter} has prefix embeddings ({PREFIX_FILE}); a merged model has no place for "
              "them, so it generates without them (use the adapter unmerged, or generate --merge, to keep them)",
              file=sys.stderr)
    plain = unload(model, merge=True)

    def write(folder: Path) -> None:
        plain.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    atomic_write_dir(out, write, replace=args.overwrite)  # --overwrite: no file of the old folder stays
    print(f"wrote a merged model to {out} (load it with transformers' from_pretrained)")


def _replaceable_output_dir(args: argparse.Namespace, inputs: dict[str, str]) -> Path:
    """--out of merge and combine: a new or empty folder, or with --overwrite a folder to replace
    whole; never one that is, or holds, an input (``inputs``: the option as given -> its path),
    which replacing would delete."""
    out = prepare_output_dir(args.out)
    if out.exists():
        for given, path in inputs.items():
            path = Path(path).resolve()
            if path.exists() and (path == out.resolve() or out.resolve() in path.parents):
                what = "is" if path == out.resolve() else "holds"
                raise ValueError(f"--out {out}: this folder {what} the input {given}, which writing the result "
                                 f"there would destroy, --overwrite or not; give --out a new folder")
        entries = sorted(p.name for p in out.iterdir())
        if entries and not args.overwrite:
            shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
            raise ValueError(f"--out {out}: this folder is not empty (it holds {shown}); give a new or empty "
                             f"folder, or pass --overwrite to replace it and everything in it")
    return out


def combine(args: argparse.Namespace) -> None:
    """`lorakit combine`: load the named adapters on the base model, combine them, write the result."""
    from .combine import check_combination, combine as combine_adapters
    from .inject import check_adapter_name
    from .io import read_adapter, save_adapter

    named: dict[str, str] = {}
    for spec in args.adapter:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter {spec}: give it as NAME=PATH (e.g. --adapter sql=runs/sql/adapter)")
        if name in named:
            raise ValueError(f"--adapter {spec}: the name {name!r} is given twice; give each adapter its own name")
        try:
            check_adapter_name(name)
        except ValueError as e:
            raise ValueError(f"--adapter {spec}: {e}") from None
        named[name] = path
    inputs = {f"--model {args.model}": args.model, **{f"--adapter {n}={p}": p for n, p in named.items()}}
    out = _replaceable_output_dir(args, inputs)  # refused before anything loads
    try:
        weights = [float(w) for w in args.weights.split(",")]
    except ValueError:
        raise ValueError(f"--weights {args.weights}: give comma-separated numbers, one per --adapter "
                         f"(e.g. --weights 0.7,0.3)") from None
    check_combination(len(named), weights, args.method, args.rank, args.density, args.seed)
    for name, path in named.items():  # a bad directory fails now, not after the model loads
        try:
            read_adapter(path)
        except ValueError as e:
            raise ValueError(f"--adapter {name}={path}: {e}") from None
    model, _ = load_model(args.model, "causal")
    for name, path in named.items():
        try:
            load_adapter(model, path, name)
        except ValueError as e:
            raise ValueError(f"--adapter {name}={path}: {e}") from None
    result = next(f"combined{i or ''}" for i in range(len(named) + 1) if f"combined{i or ''}" not in named)
    combine_adapters(model, list(named), weights, result, method=args.method, rank=args.rank, density=args.density,
                     seed=args.seed)
    atomic_write_dir(out, lambda folder: save_adapter(model, folder, result), replace=args.overwrite)
    print(f"wrote the {args.method} combination of {list(named)} (weights {weights}) to {out}")


def demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    check_device(args.device)
    prepare_output_dir(args.out)
    run_demo(out_dir=args.out, steps=args.steps, device=args.device)


def analyze(args: argparse.Namespace) -> None:
    from .analysis import analyze_adapters, common_layers, read_adapter_deltas, write_report

    prepare_output_dir(args.out)
    adapters = [read_adapter_deltas(p) for p in (args.adapter, args.adapter2) if p]
    common_layers(adapters)  # adapters that cannot be compared fail here, before a model loads
    model = None
    _quantization(args)
    if args.model:
        model, _ = _load_base(args, args.task)
    elif args.quantize != "none":
        raise SettingError(Setting("quantize", args.quantize), " quantizes the base model, and no ",
                           Setting("model"), " is given")
    report = analyze_adapters(adapters, model, seed=args.seed, model_name=args.model)
    written = write_report(report, args.out)
    skipped = len(report["skipped"]) + len(report["amplification_skipped"])
    print(f"analysed {len(report['layers'])} layer(s)" + (f", skipped {skipped} (see the report)" if skipped else "")
          + f"; wrote {written['markdown']}, {written['json']} and {len(written['figures'])} figure(s)")


def serve(args: argparse.Namespace) -> None:
    """`lorakit serve`: the base model and the --adapter adapters behind the OpenAI API."""
    from .serving.server import LOOPBACK, ServerOptions, check_api_key, check_port, run

    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ValueError(f"lorakit serve needs the server's packages ({e.name} is missing): "
                         f"pip install 'lorakit[serve]'") from None
    named: dict[str, str] = {}
    for spec in args.adapter or []:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter {spec}: give it as NAME=PATH (e.g. --adapter sql=runs/sql/adapter); NAME "
                             f"is what requests send as \"model\"")
        if name in named:
            raise ValueError(f"--adapter {spec}: the name {name!r} is given twice; give each adapter its own name")
        if name == args.served_model_name:
            raise ValueError(f"--adapter {spec}: {name!r} is the base model's --served-model-name; rename one of them")
        named[name] = path
    for flag, value, least in (("--max-batch", args.max_batch, 1), ("--max-adapters", args.max_adapters, 1),
                               ("--max-rank", args.max_rank, 1), ("--max-queue", args.max_queue, 0),
                               ("--max-body-bytes", args.max_body_bytes, 1), ("--port", args.port, 0)):
        if value < least:
            raise ValueError(f"{flag} {value}: must be at least {least}")
    check_port(args.port)  # before the model loads
    check_api_key(args.api_key)
    check_device(args.device)
    if args.adapter_dir is not None and not Path(args.adapter_dir).is_dir():
        raise FileNotFoundError(f"--adapter-dir {args.adapter_dir}: no such folder; create it or give another")
    api_key = args.api_key if args.api_key is not None else os.environ.get("LORAKIT_API_KEY") or None
    if args.host not in LOOPBACK and api_key is None:
        print(f"warning: --host {args.host} opens the server to the network without --api-key")

    import torch

    from .serving import Engine

    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_model(args.model, "causal")
    model = model.to(device).eval()
    engine = Engine(model, tokenizer, max_batch=args.max_batch, max_adapters=args.max_adapters,
                    max_rank=args.max_rank, max_seq_len=args.max_seq_len)
    for name, path in named.items():
        try:
            engine.add_adapter(name, path)
        except ValueError as e:
            raise ValueError(f"--adapter {name}={path}: {e}") from None
    options = ServerOptions(served_model_name=args.served_model_name, api_key=api_key, adapter_dir=args.adapter_dir,
                            allow_any_adapter_path=args.allow_any_adapter_path, max_queue=args.max_queue,
                            max_body_bytes=args.max_body_bytes)
    print(f"serving {args.served_model_name!r} ({args.model}) and adapters {list(named)} on "
          f"http://{args.host}:{args.port} (OpenAI API under /v1, a page to try it at /)", flush=True)
    run(engine, options, host=args.host, port=args.port, shutdown_timeout=args.shutdown_timeout)
