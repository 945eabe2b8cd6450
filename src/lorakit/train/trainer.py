"""The LoRA training loop, top to bottom: set up, (resume,) step, log, evaluate, checkpoint, save.

One optimizer step = `grad_accum` batches. Each batch is a global batch: under torchrun every
process draws the same batch from the same seeded `Batches` and keeps its own rows. Losses are
summed, then divided once by the number of target tokens of the whole step, so a step means the
same thing for 1 process or N, with any accumulation (see `loss.py`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import shutil
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lorakit.adapters import trainable_parameters
from lorakit.compiling import compile as compile_model
from lorakit.config import init_from_weight
from lorakit.hints import Setting
from lorakit.inject import lora_state
from lorakit.prefix import PrefixEmbedding, prefix_batch
from lorakit.quantize import model_bytes

from . import distributed
from .checkpoint import (ResumeError, capture_rng, check_fingerprint, find_checkpoint, load_checkpoint,
                         optimizer_from_files, optimizer_to_files, restore_rng, save_checkpoint)
from .config import TrainConfig, TrainResult
from .evaluation import EvalFn, evaluate
from .log import MetricsLog, read_metrics, write_json_atomic
from .loss import LossFn, compute_loss
from .optimizer import lora_b_ids, make_optimizer, optimizer_order, param_groups
from .plot import plot_losses
from .run_folder import holds_run, replace_run, run_paths, save_product_on_main, saved_converted
from .schedule import lr_factor

StepCallback = Callable[[int, Mapping[str, float]], None]


def train(model: nn.Module, train_batches: Iterable[Mapping[str, torch.Tensor]], config: TrainConfig, *,
          eval_batches: Iterable[Mapping[str, torch.Tensor]] | None = None, eval_fn: EvalFn | None = None,
          loss_fn: LossFn | None = None, adapter_name: str | None = "default", resume: bool = False,
          on_step: StepCallback | None = None, prefix: PrefixEmbedding | None = None) -> TrainResult:
    """Train the trainable parameters of `model` (an adapter injected with `lorakit.inject`).

    `train_batches` yields collated global batches of `config.batch_size` examples, endlessly
    (a `lorakit.data.Batches` with `epochs=None`; its position is checkpointed). `eval_batches`
    gives the eval loss (and accuracy, for class labels); `eval_fn(model) -> {name: value}` adds
    metrics on rank 0. `loss_fn(outputs, batch) -> (loss sum, item count)` replaces the built-in
    losses (token-level cross-entropy for causal LMs, class cross-entropy for classifiers).
    `on_step(step, metrics)` runs on every rank after each step and its checkpoint.

    Files go to `config.out_dir`: adapter/ (PEFT format), best/, checkpoint/, metrics.jsonl,
    loss.png, run.json. `resume=True` continues from checkpoint/ and ends with the adapter an
    uninterrupted run would have ended with. `config.overwrite` starts afresh in an out_dir that
    holds a run without touching it: the new run writes to a hidden folder in it until its first
    checkpoint, which then replaces the old run's files (only those) in out_dir, so a new run that
    fails early leaves the old one whole and resumable. The model is moved to the run's device.

    Under torchrun, train() joins the process group from the environment and leaves it at the
    end; a program that calls train() more than once per process should call
    `torch.distributed.init_process_group()` itself (train() then leaves the group alone). Every
    rank reads the checkpoint on resume, so out_dir must be on a file system they share.

    `config.compile` ("auto": on CUDA only) runs the training forward and backward under
    `torch.compile`; evaluation and the files use the plain model. The first step's wall time,
    compilation included, is logged (`first_step_s` in metrics.jsonl and run.json, and printed).

    `config.fsdp` shards the model across the processes instead of copying it (FSDP2, see
    `distributed.shard_model`); the model is then left sharded, and the files are the same as
    under DDP: the whole adapter, gathered for rank 0 to write.

    ``prefix`` (LoRA + prefix embeddings, `lorakit.prefix`; causal LMs, one process) is put in front
    of every training and eval batch and trains with the adapter, in AdamW's matrix group; it is in
    the checkpoints (resumed with the rest) and saved beside the adapter as
    ``prefix_embeddings.safetensors`` (adapter/ and best/). ``eval_fn(model)`` gets the model alone:
    a caller's eval_fn that generates should pass the prefix to `generate_ids` itself.
    """
    d, device, created_group = distributed.setup(config.device)
    try:
        return _train(model, train_batches, config, eval_batches, eval_fn, loss_fn, adapter_name, resume,
                      on_step, d, device, prefix)
    finally:
        if created_group:
            torch.distributed.destroy_process_group()


def _train(model, train_batches, config, eval_batches, eval_fn, loss_fn, adapter_name, resume, on_step,
           d: distributed.Dist, device: torch.device, prefix: PrefixEmbedding | None = None) -> TrainResult:
    out = Path(config.out_dir)
    paths = run_paths(out)
    staging = None  # --overwrite: the folder the new run writes to until it replaces the old one
    say = tqdm.write if (config.progress and d.is_main) else (lambda *a, **k: None)  # tqdm.write: the bar stays whole
    bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
    compiled = config.compiles_on(device.type)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    # --- what trains, and how ---------------------------------------------------------------
    lora_config = None  # adapter_name=None: full fine-tuning of whatever requires grad (the baseline)
    if adapter_name is not None:
        lora_config = lora_state(model).configs.get(adapter_name)
        if lora_config is None:
            raise KeyError(f"no adapter {adapter_name!r} on this model; it has {list(lora_state(model).configs)}")
    if getattr(train_batches, "batch_size", config.batch_size) != config.batch_size:
        raise ValueError(f"train_batches yields batches of {train_batches.batch_size} examples but config.batch_size "
                         f"is {config.batch_size}; build Batches(examples, config.batch_size, ...)")
    fsdp = config.fsdp and d.enabled
    if prefix is not None:
        _check_prefix(prefix, adapter_name, d)
        prefix.to(device)
    if fsdp:
        _check_fsdp(adapter_name, eval_batches, eval_fn, d)
    else:
        model.to(device)  # under FSDP each block moves as it is sharded: the whole model never is on device
    named = _trainable(model, prefix)
    if not named:
        raise ValueError("the model has no trainable parameters; inject an adapter with lorakit.inject first")
    names, params = optimizer_order(named, lora_b_ids(model, config))
    per_epoch = len(train_batches) if hasattr(train_batches, "__len__") else None
    if config.max_steps is None and not per_epoch:
        raise ValueError("train_batches has no length, so epochs cannot be counted; set config.max_steps")
    total_steps = config.max_steps or max(1, int(config.epochs * per_epoch) // config.grad_accum)
    n_trainable, n_total = trainable_parameters(model)
    if prefix is not None:  # the prefix is trained, and no part of the model
        n_trainable, n_total = n_trainable + prefix.weight.numel(), n_total + prefix.weight.numel()
    fingerprint = _fingerprint(config, lora_config, adapter_name, named, d, train_batches)
    if prefix is not None:  # only then: a checkpoint of a run without a prefix has no such key
        fingerprint["n_prefix"] = prefix.n_prefix
    if config.optimizer != "adamw":  # likewise: checkpoints from before the option trained with AdamW
        fingerprint["optimizer"] = config.optimizer
    data_hash = _data_hash(train_batches)  # the tokens themselves: another file, --seq-len, --chat-template
    if data_hash is not None:
        fingerprint["data"] = data_hash

    # --- a new run, or the continuation of one ----------------------------------------------
    step, tokens, best_loss, best_step, since_best, window = 0, 0, None, None, 0, [0.0, 0]
    stopped = False
    if resume and config.overwrite:
        raise ResumeError(Setting("resume", True), " continues the run in ", Setting("out_dir"), " and ",
                          Setting("overwrite", True), " replaces it with a new one: choose one of them")
    if resume:
        ckpt = load_checkpoint(paths["checkpoint"])
        if "data" not in ckpt.state["fingerprint"]:  # written before the data was fingerprinted
            fingerprint.pop("data", None)
        check_fingerprint(ckpt.state["fingerprint"], fingerprint, ckpt.path)
        if ckpt.state["step"] > total_steps:
            raise ResumeError(f"{ckpt.path} is at step {ckpt.state['step']}, past the {total_steps} steps this run "
                              "asks for, so its adapter cannot be that of this run; resume with ",
                              Setting("max_steps"), f" >= {ckpt.state['step']}, or start afresh with ",
                              Setting("overwrite", True))
        with torch.no_grad():  # before sharding: every rank holds the whole adapter
            for n, p in named:
                p.copy_(ckpt.params[n])
        if not hasattr(train_batches, "load_state_dict"):
            raise ResumeError("train_batches cannot be put back at the checkpoint's data position; pass a "
                              "lorakit.data.Batches (it has state_dict/load_state_dict)")
        train_batches.load_state_dict(ckpt.state["batches"])
        restore_rng(ckpt.rng_for(d.rank), device)
        s = ckpt.state
        step, tokens, best_loss, best_step = s["step"], s["tokens"], s["best_eval_loss"], s["best_step"]
        since_best, window, stopped = s["evals_since_best"], s["log_window"], s["stopped_early"]
        if s["total_steps"] != total_steps and d.is_main:
            warnings.warn(f"the checkpoint was written for a run of {s['total_steps']} steps, this one has "
                          f"{total_steps}: the lr schedule changes, so the result is not that of one "
                          "uninterrupted run", stacklevel=3)
        say(f"resuming from {ckpt.path} at step {step}")
    else:
        if find_checkpoint(paths["checkpoint"]) is not None and not config.overwrite:
            raise ResumeError(f"{paths['checkpoint']} holds a checkpoint of an earlier run; pass ",
                              Setting("resume", True), " to continue it, or ", Setting("overwrite", True),
                              " to start afresh")
        if config.overwrite and holds_run(out):
            # The old run stays whole, and resumable, until this one has a checkpoint to put in its place.
            staging = out / ".overwrite"  # inside out: the renames stay on its file system
            paths = run_paths(staging)
            if d.is_main:
                shutil.rmtree(staging, ignore_errors=True)  # left by an earlier attempt that was killed
        random.seed(config.seed + d.rank)  # each rank its own dropout masks
        np.random.seed(config.seed + d.rank)
        torch.manual_seed(config.seed + d.rank)
        distributed.broadcast_from_main(params, d, device)  # every rank starts from rank 0's adapter
    distributed.barrier(d)  # nobody trains while rank 0 may still be deleting a killed attempt's files

    log = MetricsLog(paths["metrics"], enabled=d.is_main)
    log.start(step if resume else None)
    run_info = {"config": config.to_json(), "adapter_name": adapter_name, "lora_config": fingerprint["lora"],
                "trainable_parameters": n_trainable, "total_parameters": n_total,
                "n_prefix": prefix.n_prefix if prefix is not None else 0,
                "trainable_fraction": n_trainable / max(n_total, 1),
                "adapter_bytes": sum(p.numel() * p.element_size() for p in params),
                "model_bytes": model_bytes(model),  # a 4-bit base's scales and code books too
                "total_steps": total_steps, "world_size": d.world_size, "device": str(device),
                "precision": "bf16 autocast" if bf16 else "float32", "compiled": compiled, "torch": torch.__version__,
                "lorakit": _lorakit_version(), "resumed_from_step": step if resume else None}
    converted = adapter_name is not None and saved_converted(model, adapter_name)
    if converted:  # PiSSA/OLoRA: the product is for the untouched base model (run_folder.save_product_on_main)
        run_info["saved_adapter"] = {"converted_from": lora_config.init, "r": 2 * lora_config.r}
    if d.is_main:
        paths["run"].parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(paths["run"], run_info)
    say(f"trainable parameters: {n_trainable:,} of {n_total:,} ({100 * n_trainable / max(n_total, 1):.3f}%)"
        f"{f', {prefix.weight.numel():,} of them in {prefix.n_prefix} prefix embeddings' if prefix is not None else ''}; "
        f"{total_steps} steps of {config.batch_size}x{config.grad_accum} examples on {d.world_size} process(es)"
        f"{' (FSDP)' if fsdp else ''}, "
        f"{device}, {run_info['precision']}{', torch.compile' if compiled else ''}")
    if converted:
        say(f"init={lora_config.init!r} took A and B from the base weights and left W - s·B·A in them: adapter/ "
            f"(and best/) will hold the adapter converted to a plain LoRA of rank 2·{lora_config.r} = "
            f"{2 * lora_config.r} (A' = [A; A0], B' = [B | -B0], same scaling) for the untouched base model; "
            f"checkpoint/ keeps the rank-{lora_config.r} factors, and --resume redoes the init")
    elif lora_config is not None and init_from_weight(lora_config.init):
        say(f"init={lora_config.init!r} with a variant that is not additive (DoRA) cannot be converted to plain "
            f"LoRA: adapter/ will hold it as it is, which applies to the residual base (loading it redoes the init)")

    # --- the loop -----------------------------------------------------------------------------
    wrapped = distributed.wrap(model, d, device, fsdp=fsdp)
    # Compiled after DDP/FSDP wrapping, as torch recommends (DDP's graph is then split at its gradient
    # buckets). Only the training forward runs compiled: `model` itself stays plain, for evaluation,
    # eval_fn, checkpoints and the saved adapter (its names get no `_orig_mod.` prefix). dynamic=None,
    # torch's default: a first graph for the first batch's shape; a batch of another length makes
    # torch compile once more with symbolic sizes, and that graph serves every later length. Batches
    # padded to a multiple of 64 run that graph fast; unpadded lengths ran slower than eager on an
    # H200 (docs/performance.md), so `finetune` pads them when compiling.
    # lorakit.compile: torch.compile with the adapted layers' inputs remade in backward (compiling.py).
    forward = compile_model(wrapped) if compiled else wrapped
    # FSDP replaced the parameters with sharded ones (same names): the optimizer holds those.
    named = _trainable(model, prefix)
    lora_b = lora_b_ids(model, config)
    names, params = optimizer_order(named, lora_b)
    optimizer = make_optimizer(param_groups(params, config, lora_b), config, fsdp)
    if resume:
        optimizer_from_files(optimizer, names, ckpt.optimizer_tensors, ckpt.state["optimizer_groups"])
        distributed.shard_optimizer_state_(optimizer)  # full tensors from the file -> this rank's shards
    was_training = model.training
    model.train()
    batches = iter(train_batches)
    bar = tqdm(total=total_steps, initial=step, disable=not (config.progress and d.is_main), unit="step",
               dynamic_ncols=True)
    evaluating = eval_batches is not None or eval_fn is not None
    last_row: dict[str, Any] = {}
    eval_metrics: dict[str, float] = {}
    window_seconds, window_tokens = 0.0, 0  # training time only: evals, saves and the first step are left out
    first_step_s = None  # this process's first step: with torch.compile, mostly compilation
    try:
        while step < total_steps and not stopped:
            step_start = time.perf_counter()
            micro = list(islice(batches, config.grad_accum))
            if len(micro) < config.grad_accum:
                raise ValueError(f"train_batches ran out at step {step}; give it no epoch limit (Batches(..., "
                                 f"epochs=None)): config.max_steps / config.epochs decide how long to train")
            sums = torch.zeros(2, device=device)  # (loss sum, target count) over the step, this rank
            step_tokens = sum(_count_tokens(batch) for batch in micro)
            for i, batch in enumerate(micro):
                local = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                         for k, v in distributed.shard(batch, d).items()}
                # The adapter's gradients are reduced once per step, after the last batch.
                with distributed.gradient_sync(wrapped, d, now=i == len(micro) - 1), \
                        _compile_hint(compiled and first_step_s is None):
                    with autocast():
                        if prefix is not None:
                            local = prefix_batch(model, prefix, local)
                        total, count, _ = compute_loss(forward, local, config.label_smoothing, loss_fn)
                    total.backward()  # the compiled backward is built here, at its first call
                sums += torch.stack([total.detach().float(), torch.as_tensor(count, device=device).float()])
            distributed.all_reduce_sum(sums, d)
            # DDP/FSDP averaged the gradients of the ranks' sums; make them the gradient of the step's mean.
            scale = d.world_size / sums[1].clamp(min=1)
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(scale)
            grad_norm = distributed.clip_grad_norm_(params, config.max_grad_norm)
            lr = config.lr * lr_factor(step + 1, total_steps=total_steps, warmup_steps=config.warmup_steps,
                                       schedule=config.schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_ratio", 1.0)  # LoRA+: B's group runs at ratio × lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss = (sums[0] / sums[1].clamp(min=1)).item()  # .item() waits for the GPU: the step is done
            tokens = tokens + step_tokens
            if first_step_s is None:
                first_step_s = run_info["first_step_s"] = time.perf_counter() - step_start
                log.write({"step": step, "first_step_s": first_step_s, "compiled": compiled})
                say(f"step {step} took {first_step_s:.1f} s" + (" (with torch.compile)" if compiled else ""))
            else:
                window_seconds += time.perf_counter() - step_start
                window_tokens += step_tokens
            window = [window[0] + loss, window[1] + 1]
            bar.update(1)
            last_step = step == total_steps
            if step % config.log_every == 0 or last_step:
                last_row = {"step": step, "epoch": _epoch(train_batches, per_epoch), "loss": window[0] / window[1],
                            "lr": lr, "grad_norm": grad_norm.item(),
                            "tokens_per_s": window_tokens / window_seconds if window_seconds else None,
                            "tokens": tokens}
                log.write(last_row)
                bar.set_postfix(loss=f"{last_row['loss']:.4f}", tok_s=f"{last_row['tokens_per_s'] or 0:.0f}")
                window, window_seconds, window_tokens = [0.0, 0], 0.0, 0
            evaluated = evaluating and (step % config.eval_every == 0 or last_step)
            if evaluated:
                eval_metrics = evaluate(model, eval_batches, eval_fn=eval_fn, loss_fn=loss_fn, d=d, device=device,
                                        autocast=autocast, prefix=prefix)
                log.write({"step": step, **eval_metrics})
                if "eval_loss" in eval_metrics:  # all-reduced: every rank takes the same decisions
                    if best_loss is None or eval_metrics["eval_loss"] < best_loss:
                        best_loss, best_step, since_best = eval_metrics["eval_loss"], step, 0
                        if config.keep_best:
                            save_product_on_main(model, named, paths["best"], adapter_name, d, fsdp, prefix)
                    else:
                        since_best += 1
                        stopped = config.early_stopping_patience is not None and \
                            since_best >= config.early_stopping_patience
            if step % config.save_every == 0 or last_step or stopped:
                rng = distributed.all_gather_json(capture_rng(device), d, device)
                # Whole tensors for the file (gathered from the shards under FSDP: every rank takes part).
                full_params, full_optimizer = distributed.full_tensors(dict(named)), \
                    distributed.FullOptimizerState(optimizer)
                if d.is_main:
                    opt_tensors, opt_groups = optimizer_to_files(full_optimizer, names)
                    save_checkpoint(paths["checkpoint"], params=full_params, optimizer_tensors=opt_tensors,
                                    rng_states=rng, state={"step": step, "total_steps": total_steps, "tokens": tokens,
                                           "batches": _batches_state(train_batches), "fingerprint": fingerprint,
                                           "optimizer_groups": opt_groups, "scheduler": {"step": step, "lr": lr},
                                           "best_eval_loss": best_loss, "best_step": best_step,
                                           "evals_since_best": since_best, "stopped_early": stopped,
                                           "log_window": window})
                    plot_losses(paths["metrics"], paths["plot"])
                    if staging is not None:
                        replace_run(staging, out)
                if staging is not None:  # from now on the run is in out, on every rank
                    staging, paths = None, run_paths(out)
                    log.path = paths["metrics"]
            if on_step is not None:
                on_step(step, {"loss": loss, "lr": lr, "grad_norm": grad_norm.item(),
                               **(eval_metrics if evaluated else {})})
    finally:
        bar.close()
        model.train(was_training)
        if staging is not None and d.is_main:  # failed before its first checkpoint: the old run is untouched
            shutil.rmtree(staging, ignore_errors=True)

    # --- the product ----------------------------------------------------------------------------
    save_product_on_main(model, named, paths["adapter"], adapter_name, d, fsdp, prefix)
    if d.is_main:
        plot = plot_losses(paths["metrics"], paths["plot"])
    distributed.barrier(d)
    train_loss = last_row.get("loss")
    if train_loss is None and resume:  # resumed at the last step: the loss is the one logged before the stop
        train_loss = next((row["loss"] for row in reversed(read_metrics(paths["metrics"]))
                           if row.get("loss") is not None), None)
    result = TrainResult(
        steps=step, train_loss=train_loss, eval_metrics=eval_metrics, best_step=best_step,
        best_eval_loss=best_loss, stopped_early=stopped, tokens=tokens, trainable_parameters=n_trainable,
        total_parameters=n_total, out_dir=out, adapter_dir=paths["adapter"],
        best_dir=paths["best"] if best_step is not None and config.keep_best else None,
        checkpoint_dir=paths["checkpoint"], metrics_path=paths["metrics"],
        plot_path=plot if d.is_main else paths["plot"], run_path=paths["run"])
    if d.is_main:
        write_json_atomic(paths["run"], {**run_info, "result": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in result.__dict__.items()}})
        done = [f"done: {step} steps"] + ([f"train loss {train_loss:.4f}"] if train_loss is not None else []) \
            + ([f"best eval loss {best_loss:.4f} (step {best_step})"] if best_loss is not None else [])
        say(", ".join(done) + f"; adapter in {paths['adapter']}, metrics in {paths['metrics']}")
    return result


def _fingerprint(config: TrainConfig, lora_config: Any, adapter_name: str, named: list[tuple[str, nn.Parameter]],
                 d: distributed.Dist, train_batches: Any) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote the checkpoint."""
    shapes = hashlib.sha256(json.dumps([(n, list(p.shape)) for n, p in named]).encode()).hexdigest()[:16]
    lora = {k: (list(v) if isinstance(v, tuple) else v) for k, v in lora_config.__dict__.items()} \
        if lora_config is not None else None
    same = ("lr", "weight_decay", "betas", "eps", "warmup_steps", "schedule", "max_grad_norm", "label_smoothing",
            "batch_size", "grad_accum", "seed", "loraplus_ratio")
    return {"adapter_name": adapter_name, "lora": json.loads(json.dumps(lora, default=list)),
            "trainable_tensors": shapes, "trainable_parameters": sum(p.numel() for _, p in named),
            "world_size": d.world_size, "num_examples": len(getattr(train_batches, "examples", ())) or None,
            **{k: getattr(config, k) for k in same}}


@contextlib.contextmanager
def _compile_hint(first_compiled_step: bool):
    """On the first compiled step, an error says how to train without torch.compile: it may come from
    the compiler (no C++ compiler on a CPU, an op Inductor cannot lower), not from the model."""
    try:
        yield
    except Exception as e:
        if first_compiled_step and hasattr(e, "add_note"):  # Python >= 3.11
            e.add_note("lorakit: this was the first step, which runs torch.compile; if the error comes from "
                       "compilation, train without it: TrainConfig(compile='off') (--no-compile)")
        raise


PREFIX_PARAM = "prefix_embeddings"  # the prefix's name in checkpoints (no model parameter has it)


def _trainable(model: nn.Module, prefix: PrefixEmbedding | None) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of everything that trains: the model's, then the prefix's."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return named + ([(PREFIX_PARAM, prefix.weight)] if prefix is not None else [])


def _check_prefix(prefix: PrefixEmbedding, adapter_name: str | None, d: distributed.Dist) -> None:
    if d.enabled:
        raise ValueError("n_prefix (prefix embeddings) trains in one process: its gradient is not reduced across "
                         "DDP/FSDP processes; train without torchrun, or without n_prefix")
    if adapter_name is None:
        raise ValueError("n_prefix (prefix embeddings) trains with a LoRA adapter, and this run has none "
                         "(adapter_name=None); inject an adapter")


def _check_fsdp(adapter_name: str | None, eval_batches: Any, eval_fn: EvalFn | None, d: distributed.Dist) -> None:
    """What FSDP cannot do here, said before anything is sharded. Every forward of a sharded model
    is a collective: a rank that skips one (eval_fn runs on rank 0 only; a rank with no eval rows
    skips its forward) would leave the others waiting forever."""
    if adapter_name is None:
        raise ValueError("fsdp=True trains adapters; full fine-tuning (adapter_name=None) is not sharded: "
                         "inject an adapter, or train without fsdp")
    if eval_fn is not None:
        raise ValueError("eval_fn runs on rank 0 only, but a forward of an FSDP-sharded model needs every rank; "
                         "pass eval_batches (the eval loss is computed on every rank), or train without fsdp")
    n, size = len(getattr(eval_batches, "examples", ())), getattr(eval_batches, "batch_size", None)
    if eval_batches is None or not size:
        return
    sizes = [size] * (n // size) + ([n % size] if n % size and not getattr(eval_batches, "drop_last", False) else [])
    if min(sizes, default=d.world_size) < d.world_size:
        raise ValueError(f"eval_batches has a batch of {min(sizes)} examples ({n} examples in batches of {size}), "
                         f"fewer than the {d.world_size} processes: under fsdp every process needs a row of every "
                         "batch. Choose an eval batch_size and number of examples that give each process one")


def _lorakit_version() -> str:
    import lorakit  # at call time: lorakit/__init__ may import this module
    return lorakit.__version__


def _count_tokens(batch: Mapping[str, Any]) -> int:
    """Non-padding input tokens of a (global) batch."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    ids = batch.get("input_ids")
    return int(ids.numel()) if ids is not None else 0


def _epoch(train_batches: Any, per_epoch: int | None) -> float | None:
    if per_epoch and hasattr(train_batches, "epoch"):
        return round(train_batches.epoch + train_batches.index / per_epoch, 4)
    return None


def _data_hash(train_batches: Any) -> str | None:
    """A digest of the tokenized training examples (their keys and integer values), or None when
    the examples are not dicts of token lists/tensors. A resumed run must see the same tokens: the
    same file, read with the same --seq-len, --chat-template and tokenizer."""
    examples = getattr(train_batches, "examples", None)
    if not examples:
        return None
    digest = hashlib.sha256()
    for ex in examples:
        if not isinstance(ex, Mapping):
            return None
        for key in sorted(ex):
            value = ex[key]
            if isinstance(value, torch.Tensor):
                value = value.detach().cpu().numpy()
            try:
                array = np.asarray(value)
            except (TypeError, ValueError):
                return None
            if array.dtype.kind not in "iub":
                return None
            digest.update(f"{key}:{array.shape}".encode())
            digest.update(array.astype(np.int64).tobytes())
    return digest.hexdigest()[:16]


def _batches_state(train_batches: Any) -> dict[str, Any] | None:
    return train_batches.state_dict() if hasattr(train_batches, "state_dict") else None
