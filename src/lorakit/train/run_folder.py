"""A training run's folder: what it holds, how a finished run replaces an earlier one (--overwrite),
and how the product (the adapter, or the whole model for full fine-tuning) is written there.

    out/adapter/        the final adapter (PEFT format; prefix_embeddings.safetensors beside it with --n-prefix)
    out/best/           the adapter of the best eval loss, with eval data
    out/checkpoint/     the latest checkpoint (`checkpoint.py`), what --resume continues from
    out/metrics.jsonl   one line per logged step; out/loss.png its plot; out/run.json the run's settings
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from torch import nn

from lorakit.config import init_from_weight
from lorakit.files import file_mode, fsync_directory
from lorakit.inject import lora_modules, lora_state
from lorakit.io import save_adapter
from lorakit.layers import LoraLayer
from lorakit.prefix import PrefixEmbedding, has_prefix, prefix_path, save_prefix

from . import distributed
from .checkpoint import find_checkpoint


# What a run directory holds; --overwrite replaces these entries and leaves anything else there alone
# (labels.json is written by lorakit.finetune).
RUN_ENTRIES = ("adapter", "best", "checkpoint", "metrics.jsonl", "loss.png", "run.json", "labels.json")


def run_paths(folder: Path) -> dict[str, Path]:
    return {"adapter": folder / "adapter", "best": folder / "best", "checkpoint": folder / "checkpoint",
            "metrics": folder / "metrics.jsonl", "plot": folder / "loss.png", "run": folder / "run.json"}


def holds_run(folder: Path) -> bool:
    return folder.is_dir() and (any((folder / name).exists() for name in RUN_ENTRIES)
                                or find_checkpoint(folder / "checkpoint") is not None)


def replace_run(new: Path, out: Path) -> None:
    """Put the run in `new` in the place of the run in `out`, entry by entry (renames, one file
    system): the old entries first move to a folder aside, then the new ones in, then the aside
    folder is deleted. Files in `out` that are no part of a run stay."""
    aside = out / f".replaced-{uuid.uuid4().hex[:8]}"
    aside.mkdir()
    leftovers = [*out.glob(".checkpoint.old-*"), *out.glob(".checkpoint.tmp-*")]  # of saves that were killed
    for entry in [out / name for name in RUN_ENTRIES] + leftovers:
        if entry.exists():
            entry.rename(aside / entry.name)
    for entry in sorted(new.iterdir()):
        entry.rename(out / entry.name)
    fsync_directory(out)
    shutil.rmtree(aside, ignore_errors=True)
    shutil.rmtree(new, ignore_errors=True)


def save_product_on_main(model: nn.Module, named: list[tuple[str, nn.Parameter]], path: Path,
                         adapter_name: str | None, d: distributed.Dist, fsdp: bool,
                         prefix: PrefixEmbedding | None = None) -> None:
    """Rank 0 writes the product; under FSDP every rank first helps gather the whole adapter."""
    if not fsdp:
        if d.is_main:
            save_product(model, path, adapter_name)
            if prefix is not None:
                save_prefix(prefix, path, base_model=getattr(model.config, "_name_or_path", None) or None)
            elif has_prefix(path):  # left by an earlier run there: generate would put it in front of this adapter
                prefix_path(path).unlink()
        return
    full = distributed.full_tensors(dict(named))
    if d.is_main:
        with distributed.full_parameters(model, full):
            save_product(model, path, adapter_name)


def save_product(model: nn.Module, path: Path, adapter_name: str | None) -> None:
    """The adapter in PEFT format; for full fine-tuning (no adapter), the whole model as
    transformers writes it (safetensors), via a temp dir so a crash leaves no half-written model."""
    if adapter_name is not None:
        # PiSSA/OLoRA: A and B apply to the residual base in memory; the product is for the untouched base.
        save_adapter(model, path, adapter_name, convert_to_lora=saved_converted(model, adapter_name))
        return
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    mode = file_mode()  # safetensors writes 0o600; a model folder is read like any other
    for f in tmp.rglob("*"):
        if f.is_file():
            os.chmod(f, mode)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def saved_converted(model: nn.Module, adapter_name: str) -> bool:
    """Whether the run's product is a PiSSA/OLoRA adapter converted to plain LoRA (`save_adapter`'s
    convert_to_lora): yes for an additive variant; DoRA's output is not W·x + s·B·A·x, so no."""
    if not init_from_weight(lora_state(model).configs[adapter_name].init):
        return False
    return all(m.variants[adapter_name].additive for _, m in lora_modules(model)
               if isinstance(m, LoraLayer) and adapter_name in m.variants)
