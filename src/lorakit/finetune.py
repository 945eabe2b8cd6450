"""From a model spec and a data file to a trained adapter: the steps `lorakit train` runs.

Kept apart from the CLI (which only parses) so that Python users and the demo run the same path.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from .config import LoraConfig, init_from_weight
from .data import (Batches, ClassificationExample, Example, collate, demo_task, load_examples,
                   tokenize_classification, tokenize_example)
from .hints import Setting, SettingError
from .inject import inject
from .models import load_model, model_info
from .prefix import PrefixEmbedding
from .quantize import Quantization, quantize_model
from .train import TrainConfig, TrainResult, train

DEMO_DATA = "demo"  # `--data demo`: the generated demo task (lorakit.demo_task), no file needed
COMPILED_PAD_MULTIPLE = 64  # batch widths under torch.compile (TrainConfig.compile)


@dataclass
class DataSpec:
    """Where the examples come from and how they become tokens."""

    train: str = DEMO_DATA
    eval: str | None = None
    format: str = "auto"
    seq_len: int = 256
    chat_template: bool = False
    skip_bad_lines: bool = False
    text_column: str = "sentence"
    text_pair_column: str | None = None
    label_column: str = "label"
    demo_examples: tuple[int, int] = (2000, 64)  # (train, eval) sizes for the demo task


def read_data(spec: DataSpec, task: str) -> tuple[list[Any], list[Any] | None, dict[str, int] | None]:
    """(train examples, eval examples or None, label map or None)."""
    if spec.train == DEMO_DATA:
        if task != "causal":
            raise SettingError("the demo task is text generation: use ", Setting("task", "causal"),
                               " with it, or give a classification data file")
        train_ex, eval_ex = demo_task(*spec.demo_examples)
        return train_ex, (eval_ex if spec.eval is None else _read(spec, spec.eval, task, None)[0]), None
    train_ex, label_map = _read(spec, spec.train, task, None)
    eval_ex = _read(spec, spec.eval, task, label_map)[0] if spec.eval else None
    return train_ex, eval_ex, label_map


def _read(spec: DataSpec, path: str, task: str, label_map: dict[str, int] | None):
    if task == "classification":
        result = load_examples(path, "classification", text_column=spec.text_column,
                               text_pair_column=spec.text_pair_column, label_column=spec.label_column,
                               label_map=label_map, skip_bad_lines=spec.skip_bad_lines)
    else:
        result = load_examples(path, spec.format, skip_bad_lines=spec.skip_bad_lines)
        if result and not isinstance(result[0], Example):
            raise SettingError(f"{path} holds classification examples; pass ", Setting("task", "classification"))
    if result.n_skipped and is_main_process():
        print(f"{path}: skipped {result.n_skipped} malformed line(s), first at line {result.skipped[0][0]}")
    if not result:
        raise ValueError(f"{path}: no examples")
    return list(result), getattr(result, "label_map", None)


def tokenize_all(examples: list[Any], tokenizer, spec: DataSpec) -> list[dict[str, Any]]:
    if examples and isinstance(examples[0], ClassificationExample):
        return [tokenize_classification(ex, tokenizer, spec.seq_len) for ex in examples]
    return [tokenize_example(ex, tokenizer, spec.seq_len, chat_template=spec.chat_template) for ex in examples]


def finetune(model_spec: str, data: DataSpec, lora: LoraConfig, config: TrainConfig, *,
             task: str = "causal", resume: bool = False, model=None, tokenizer=None,
             eval_fn=None, missing_targets: str = "warn",
             quantization: Quantization | None = None, n_prefix: int = 0) -> tuple[TrainResult, Any, Any]:
    """Load, inject, train and save; returns (result, model, tokenizer). Prints what a user wants
    to see first: trainable parameters against the total, and the adapter's size against the base's.

    Every random number of the run comes from ``config.seed``: a new classifier head, the adapter's
    initial A, then (in ``train``) data order and dropout. ``missing_targets`` is ``inject``'s.
    ``quantization`` (QLoRA) quantizes the base's linear layers after loading, before inject, and
    prints the base's size before and after (`lorakit.quantize.quantize_model`). ``n_prefix`` > 0
    trains that many prefix embeddings with the adapter (`lorakit.prefix`; causal LMs only), saved
    beside it as prefix_embeddings.safetensors."""
    if n_prefix and task != "causal":
        raise SettingError(Setting("n_prefix", n_prefix), " puts trainable embeddings in front of a causal LM's "
                           f"inputs; task {task!r} is not supported: train it without ", Setting("n_prefix"))
    if n_prefix < 0:
        raise SettingError(Setting("n_prefix"), f" must be >= 0 (0: no prefix embeddings), got {n_prefix}")
    if quantization is not None and init_from_weight(lora.init):  # before any loading or quantizing
        raise SettingError(Setting("init", lora.init), " takes A and B from the base weights and writes W - s·B·A "
                           "back into them, and a quantized base's packed weights are never rewritten: use ",
                           Setting("init", "pissa"), " or ", Setting("init", "olora"), " without ",
                           Setting("quantize"), ", or quantize with the default ", Setting("init", "kaiming"))
    train_ex, eval_ex, label_map = read_data(data, task)
    if model is None:
        model, tokenizer = load_model(model_spec, task, num_labels=max(label_map.values()) + 1 if label_map else 2,
                                      seed=config.seed)
    base_bytes = model_info(model)["size_bytes"]
    if quantization is not None:  # QLoRA: the frozen base in 4 or 8 bits (the output head and saved modules stay)
        report = quantize_model(model, quantization, skip=tuple(lora.modules_to_save or ()))
        base_bytes = report.bytes_after
        if is_main_process():
            print(report.summary())
    # §4.1: A starts random. It is drawn here, before train() seeds its generators, so it is drawn
    # under the run's seed too (a resumed run then overwrites it from the checkpoint).
    torch.manual_seed(config.seed)
    inject(model, lora, missing_targets=missing_targets)  # train() prints trainable vs total parameters
    # From their own generator (seed): A's draw above is the same with or without a prefix.
    prefix = PrefixEmbedding.from_vocabulary(model, n_prefix, seed=config.seed) if n_prefix else None

    # A compiled step gets widths that are multiples of 64: a few shapes, one compile with symbolic
    # sizes, and the fast kernels (unpadded lengths ran slower than eager; docs/performance.md).
    multiple = COMPILED_PAD_MULTIPLE if config.compiles_on(_device_type(config.device)) else None
    collate_fn = partial(collate, pad_id=tokenizer.pad_token_id, pad_to_multiple_of=multiple)
    batches = Batches(tokenize_all(train_ex, tokenizer, data), config.batch_size, seed=config.seed,
                      collate_fn=collate_fn)
    eval_batches = None
    if eval_ex:
        eval_batches = Batches(tokenize_all(eval_ex, tokenizer, data), config.batch_size, shuffle=False,
                               collate_fn=collate_fn, epochs=1)
    result = train(model, batches, config, eval_batches=eval_batches, eval_fn=eval_fn, resume=resume,
                   prefix=prefix)

    if not is_main_process():
        return result, model, tokenizer
    adapter_bytes = sum(f.stat().st_size for f in Path(result.adapter_dir).iterdir() if f.is_file())
    print(f"adapter: {adapter_bytes / 1e6:.2f} MB on disk ({result.adapter_dir}); "
          f"base model: {base_bytes / 1e6:.0f} MB ({base_bytes / adapter_bytes:,.0f}× larger)")
    if label_map:
        (Path(config.out_dir) / "labels.json").write_text(json.dumps(label_map, indent=2) + "\n")
    return result, model, tokenizer


def _device_type(device: str) -> str:
    """The type of device that TrainConfig.device names ("auto": cuda where there is one)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device.split(":")[0]


def is_main_process() -> bool:
    """Rank 0 under torchrun (or a plain single process): the one that prints and writes."""
    return int(os.environ.get("RANK", "0")) == 0
