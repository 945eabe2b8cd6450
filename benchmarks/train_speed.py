"""Training-step speed and memory of LoRA on a Llama: lorakit vs PEFT vs the frozen floor, eager and compiled.

Variants (``--variants``):

- ``floor``: the frozen base, no adapters, no optimizer; forward + backward with activation
  gradients only (the input embeddings require grad, so gradients flow through every layer into
  no weight). LoRA cannot be cheaper than this.
- ``lorakit``: ``lorakit.inject(model, LoraConfig(...))``, nothing else set; compiled rows use
  ``lorakit.compile`` (``torch.compile`` whose partitioner may recompute the adapted layers' inputs
  in backward), or plain ``torch.compile`` with ``--recompute-inputs off``.
- ``peft``: ``peft.get_peft_model`` with the same r, alpha and targets, dropout 0.
- ``lorakit-dora``, ``peft-dora`` (not in the default list): the same with DoRA (``use_dora=True``).
- ``full`` (not in the default list): every weight trains.

Targets (``--targets``): ``all-linear`` (r=16, alpha 32) and ``qv`` (q_proj, v_proj; r=8, alpha 16).
Modes: ``--compile off,on`` (``torch.compile(model)`` for floor and PEFT, ``--compile-mode``) × ``--autocast off,bf16``.
Base weights bf16 on CUDA (fp32 on CPU), adapters as each library makes them (fp32), AdamW
(``fused=True`` on CUDA; ``--optimizer adamw8bit``: bitsandbytes' 8-bit AdamW), random batches,
seeded random weights (``--shape``).

QLoRA (``--quantize nf4|fp4|int8``, ``--double-quant``): the decoder's linear layers become
bitsandbytes Linear4bit (compute dtype bf16 on CUDA, packed storage uint8) or Linear8bitLt, made
by ``lorakit.quantize.quantize_model`` as ``lorakit train --quantize`` makes them, one decoder layer
at a time (each layer's dense weights are freed once it is quantized); the output head stays dense.
Floor, lorakit and PEFT rows get the same quantized base (PEFT wraps the bitsandbytes layers in its
own QLoRA layers, as for a model transformers loaded in 4/8 bits). ``full`` cannot run on it.
``--grad-checkpoint``: transformers' gradient checkpointing (non-reentrant) in every row, and every
row's embeddings output requires grad, as the floor's does (the work of PEFT's
``enable_input_require_grads``, without its hook). A row records the setting, the weights' bytes
(``model_bytes``: parameters, buffers and quantization state; the base, before adapters) and, on
CUDA, the build's peak memory. ``--compile on`` works on a quantized base, but bitsandbytes' layers
may break the graph (the row's ``graph_breaks`` counts them); QLoRA rows are meant eager first.

Each (shape, targets, variant, mode) row runs in a fresh process with its own empty compile cache,
so peaks and caches do not leak between rows. A row times ``--warmup`` untimed steps (the first
one includes the compile) and ``--steps`` timed steps, and reports the median step, tokens/s, its
ratio to the floor of the same mode (compiled to compiled, eager to eager), peak memory and its
ratio to the floor, the slowest timed step over the median (steadiness) and the first step's time.
Rows run most important first; the JSON is rewritten after every row, and ``--time-budget`` skips
rows that would not fit, so a time limit loses nothing that was measured. ``--resume FILE`` keeps
the measured rows of an earlier run and measures only the rest.

``--interleave`` is the CPU comparison: every variant in one process, taking turns step by step on
the same batches, so machine noise hits each alike; it reports ratios of medians.

    .venv/bin/python benchmarks/train_speed.py --device cpu --shape tiny --steps 2 --warmup 1 \\
        --out /tmp/train_speed_smoke.json                                   # smoke test
    .venv/bin/python benchmarks/train_speed.py --interleave --shape smollm2 --steps 20
    python benchmarks/train_speed.py --device cuda --shape tinyllama --time-budget 510
    python benchmarks/train_speed.py --device cuda --shape tinyllama,llama3-8b --time-budget 510 \\
        --resume benchmarks/results/train_speed_cuda.json
    python benchmarks/train_speed.py --device cuda --shape llama3-8b --quantize nf4 --double-quant \\
        --grad-checkpoint --compile off --autocast off --out benchmarks/results/train_speed_cuda_qlora.json

Writes ``benchmarks/results/train_speed_<device>.json`` (``--out``), or
``train_interleaved_<device>.json`` for ``--interleave``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Shape:
    """A Llama's shape and the batch it trains on."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    batch: int
    seq: int
    tie_embeddings: bool = False
    rope_theta: float = 10000.0


SHAPES = {
    "tiny": Shape(128, 344, 4, 4, 2, 1024, 2, 64),  # CPU smoke runs
    "smollm2": Shape(576, 1536, 30, 9, 3, 49152, 4, 128, tie_embeddings=True),  # SmolLM2-135M
    "tinyllama": Shape(2048, 5632, 22, 32, 4, 32000, 8, 1024),  # TinyLlama-1.1B
    "llama3-8b": Shape(4096, 14336, 32, 32, 8, 128256, 4, 2048, rope_theta=500000.0),  # Llama-3-8B
}
LORA = {  # --targets name -> (rank, alpha, target_modules)
    "all-linear": (16, 32, "all-linear"),
    "qv": (8, 16, ["q_proj", "v_proj"]),
}
VARIANTS = ("floor", "lorakit", "peft", "lorakit-dora", "peft-dora", "full")  # the order rows of one mode run in
ADAPTED = ("lorakit", "peft", "lorakit-dora", "peft-dora")  # the variants with targets


@dataclass(frozen=True)
class Row:
    """One measurement: a variant of a shape in one mode. ``targets`` is None for floor and full."""

    shape: str
    variant: str
    targets: str | None
    compile: bool
    autocast: bool

    @property
    def mode(self) -> str:
        return f"{'compiled' if self.compile else 'eager'}{' + bf16 autocast' if self.autocast else ''}"

    @property
    def label(self) -> str:
        return f"{self.shape} {self.variant}{' ' + self.targets if self.targets else ''}, {self.mode}"


def plan(args) -> list[Row]:
    """The rows, most important first: per shape, per targets, compiled before eager and autocast
    before none; in each mode floor, lorakit, peft. The floor of a mode runs once, with the first
    targets that need it."""
    modes = sorted(((c, a) for c in args.compile for a in args.autocast), key=lambda m: (not m[0], not m[1]))
    rows: list[Row] = []
    for shape in args.shape:
        for targets in args.targets:
            for compiled, autocast in modes:
                for variant in [v for v in VARIANTS if v in args.variants]:
                    row = Row(shape, variant, targets if variant in ADAPTED else None, compiled, autocast)
                    if row not in rows:
                        rows.append(row)
    return rows


# --- one row, in its own process ---------------------------------------------------------------


def build_model(shape: Shape, args):
    """A Llama of ``shape`` with seeded random weights in ``args.dtype``, made on the device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                      num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                      num_key_value_heads=shape.kv_heads, max_position_embeddings=max(2048, shape.seq),
                      tie_word_embeddings=shape.tie_embeddings, rope_theta=shape.rope_theta,
                      attn_implementation=args.attention)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # made in the weights' dtype: an 8B model never exists in fp32
    try:
        with torch.device(args.device):
            return LlamaForCausalLM(cfg).train()
    finally:
        torch.set_default_dtype(default)


def base_model(shape: Shape, args):
    """`build_model`, then ``--quantize`` and ``--grad-checkpoint`` applied: the base every row of a
    run starts from."""
    model = build_model(shape, args)
    if args.quantize != "none":
        quantize_base(model, args)
    if args.grad_checkpoint:
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.2x; the old name warns
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def quantize_base(model, args) -> None:
    """The decoder's linear layers in 4 or 8 bits, in place, by lorakit's own helper (what
    ``lorakit train --quantize`` runs), one decoder layer at a time: the dense weights of a layer are
    freed as soon as it is quantized, so an 8B model peaks at its bf16 size plus one layer, not at
    bf16 plus 4 bits. The output head stays dense (the helper keeps it; it is outside the layers)."""
    from lorakit.quantize import Quantization, quantize_model

    q = Quantization(args.quantize, double_quant=args.double_quant,
                     compute_dtype=torch.bfloat16 if args.device == "cuda" else None)  # CPU: the weights' fp32
    for layer in model.model.layers:
        quantize_model(layer, q)
    # What transformers' bitsandbytes loader sets: PEFT reads it to wrap these layers in its QLoRA layers.
    setattr(model, "is_loaded_in_8bit" if args.quantize == "int8" else "is_loaded_in_4bit", True)


def input_requires_grad(row: Row, args) -> bool:
    """Whether the row looks its embeddings up outside the model and makes them require grad
    (`forward`): the floor always (its only gradients), and under gradient checkpointing every row
    that does not train the embeddings, so that every row computes the same activation gradients."""
    return row.variant == "floor" or (args.grad_checkpoint and row.variant != "full")


def make_optimizer(params: list, args):
    """AdamW on the trainable parameters (None for the floor): torch's, fused on CUDA, or
    bitsandbytes' 8-bit AdamW (``--optimizer adamw8bit``; it keeps 32-bit state for tensors of
    fewer than 4096 elements)."""
    if not params:
        return None
    if args.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=1e-4)
    return torch.optim.AdamW(params, lr=1e-4, fused=args.device == "cuda")


def prepare(model, row: Row):
    """Set up the variant in place; returns (model, trainable parameters)."""
    if row.variant == "full":
        return model, list(model.parameters())
    if row.variant == "floor":
        model.requires_grad_(False)  # the embeddings' output requires grad instead, see `forward`
        return model, []
    r, alpha, targets = LORA[row.targets]
    dora = row.variant.endswith("-dora")
    if row.variant.startswith("peft"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0,
                                                 use_dora=dora))
    else:
        import lorakit

        lorakit.inject(model, lorakit.LoraConfig(r=r, alpha=alpha, target_modules=targets, use_dora=dora))
    return model, [p for p in model.parameters() if p.requires_grad]


def forward(model, embed, ids: torch.Tensor, autocast: bool):
    """The loss. With ``embed`` (the floor; every row under gradient checkpointing) the embeddings
    are looked up outside the model and made to require grad: the same work as
    ``enable_input_require_grads``, whose hook breaks torch.compile's graph."""
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        if embed is None:
            return model(input_ids=ids, labels=ids).loss
        return model(inputs_embeds=embed(ids).detach().requires_grad_(), labels=ids).loss


def compile_model(model, row: Row, args):
    """``lorakit.compile`` for lorakit rows (``--recompute-inputs``), ``torch.compile`` for the others."""
    mode = None if args.compile_mode == "default" else args.compile_mode
    if row.variant.startswith("lorakit"):
        import lorakit

        return lorakit.compile(model, mode=mode, recompute_inputs=args.recompute_inputs == "on")
    return torch.compile(model, mode=mode)


def measure(row: Row, args) -> dict:
    """Time training steps of one row in this process."""
    shape = SHAPES[row.shape]
    batch, seq = args.batch or shape.batch, args.seq or shape.seq
    cuda = args.device == "cuda"
    from lorakit.quantize import model_bytes

    model = base_model(shape, args)
    weight_bytes = model_bytes(model)
    build_peak = torch.cuda.max_memory_allocated() if cuda else None
    model, params = prepare(model, row)
    embed = model.get_input_embeddings() if input_requires_grad(row, args) else None
    opt = make_optimizer(params, args)
    if row.compile:
        model = compile_model(model, row, args)
    graphed = row.compile and args.compile_mode in ("reduce-overhead", "max-autotune")  # CUDA graph trees
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, shape.vocab, (batch, seq), generator=g).to(args.device) for _ in range(4)]
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.empty_cache()  # the blocks that quantizing freed: peak_reserved_bytes is the training's
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []

    def step(k: int) -> torch.Tensor:
        if graphed:
            torch.compiler.cudagraph_mark_step_begin()
        loss = forward(model, embed, batches[k % len(batches)], row.autocast)
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss

    with sdpa_backend(args.sdpa_backend):
        for k in range(args.warmup + args.steps):
            sync()
            start = time.perf_counter()
            loss = step(k)
            sync()
            times.append(time.perf_counter() - start)
            losses.append(loss.item())
    timed = times[args.warmup:]
    median = statistics.median(timed)
    profile = None
    if args.profile:
        with sdpa_backend(args.sdpa_backend):
            profile = profile_steps(row, args, lambda k: step(k), steps=3)
    result = {
        "median_step_s": median, "tokens_per_s": batch * seq / median, "slowest_over_median": max(timed) / median,
        "first_step_s": times[0], "peak_bytes": (torch.cuda.max_memory_allocated() if cuda else
                                                 resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
        "batch": batch, "seq": seq, "trainable_params": sum(p.numel() for p in params), "model_bytes": weight_bytes,
        "adapter_dtypes": sorted({str(p.dtype) for p in params}), "step_times_s": times, "losses": losses,
    }
    if profile:
        result["profile"] = profile
    if cuda:
        result["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
        result["build_peak_bytes"] = build_peak
        result["gpu"] = torch.cuda.get_device_name()
    if row.compile:
        from torch._dynamo.utils import counters

        result["graphs"] = counters["stats"]["unique_graphs"]
        result["graph_breaks"] = sum(counters["graph_break"].values())
    return result


def kernel_kind(name: str) -> str:
    """A GPU kernel's family, from its name (cuBLAS/CUTLASS GEMMs, attention, Inductor's Triton)."""
    low = name.lower()
    if any(k in low for k in ("flash", "fmha", "attention", "sdpa")):
        return "attention"
    if any(k in low for k in ("gemm", "nvjet", "cutlass", "sm90_xmma", "cublas", "matmul")):
        return "gemm"
    if low.startswith("triton"):
        return "inductor (triton)"
    if "adam" in low or "foreach" in low:
        return "optimizer"
    return "other"


def profile_steps(row: Row, args, step, steps: int) -> dict:
    """``steps`` more steps under torch.profiler: device time per step by kernel family, the top
    kernels, and how much of the wall step the device was busy (low = host-bound). The table goes
    to ``--profile DIR``."""
    from torch.profiler import ProfilerActivity, profile

    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for k in range(steps):
            step(k)
        sync()
    wall = (time.perf_counter() - start) / steps
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0]
    by_kind: dict[str, float] = {}
    for e in kernels:
        by_kind[kernel_kind(e.key)] = by_kind.get(kernel_kind(e.key), 0.0) + e.self_device_time_total / 1e3 / steps
    device_ms = sum(by_kind.values())
    top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:25]
    name = f"profile_{row.shape}_{row.variant}_{row.targets or 'none'}_{row.mode.replace(' + ', '_').replace(' ', '_')}.txt"
    path = Path(args.profile) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    path.write_text(f"{row.label}: {steps} steps, wall {wall * 1e3:.1f} ms/step, device busy {device_ms:.1f} ms/step\n"
                    + "".join(f"  {k:<20} {v:8.2f} ms/step\n" for k, v in sorted(by_kind.items(), key=lambda x: -x[1]))
                    + "\n" + events.table(sort_by=sort, row_limit=40, max_name_column_width=90))
    return {"wall_ms_per_step": wall * 1e3, "device_ms_per_step": device_ms,
            "device_ms_by_kind": by_kind, "file": str(path),
            "top_kernels": [{"name": e.key[:120], "ms_per_step": e.self_device_time_total / 1e3 / steps,
                             "calls_per_step": e.count / steps} for e in top]}


def sdpa_backend(name: str):
    """A context that pins SDPA's backend, or one that leaves torch's choice."""
    if name == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([{"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                         "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]])


# --- the matrix: one process per row -----------------------------------------------------------

SETTINGS = {"quantize": "none", "double_quant": False, "grad_checkpoint": False, "optimizer": "adamw"}  # and defaults


def settings(args) -> dict:
    """The options every row of a run shares that change what a row measures; each row records them
    (a row of an older file without them had the defaults)."""
    return {key: getattr(args, key) for key in SETTINGS}


def run_row(row: Row, args, timeout: float | None) -> dict:
    """Measure ``row`` in a fresh process (own process group, own compile cache); a failure or a
    timeout becomes a row with its error, never an exception here."""
    spec = json.dumps({"row": asdict(row), "args": vars(args)})
    cache = tempfile.mkdtemp(prefix="train_speed_compile_") if args.compile_cache == "fresh" else None
    env = dict(os.environ, **({"TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": os.path.join(cache, "triton")}
                              if cache else {}))
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--one", spec], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        status = "ok" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the row's process and its compile workers
        out, err = proc.communicate()
        status, err = "timeout", f"killed after {timeout:.0f} s\n{err}"
    except BaseException:  # this run is being stopped (Ctrl-C, SIGTERM): the row's group goes with it
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    finally:
        if cache:
            shutil.rmtree(cache, ignore_errors=True)
    result = {**asdict(row), "mode": row.mode, **settings(args), "status": status,
              "wall_s": time.perf_counter() - start}
    line = next((ln for ln in out.splitlines() if ln.startswith("RESULT ")), None)
    if status == "ok" and line:
        result.update(json.loads(line[len("RESULT "):]))
    else:
        result["status"] = "failed" if status == "ok" else status
        result["error"] = err[-4000:] or f"exit code {proc.returncode}, no output"
    return result


def add_ratios(rows: list[dict]) -> None:
    """Speed and memory of each measured row over the floor of its shape and mode, and of lorakit
    over PEFT with the same targets and mode."""
    def find(r, variant, targets):
        return next((x for x in rows if x["status"] == "ok" and x["variant"] == variant and x["targets"] == targets
                     and (x["shape"], x["compile"], x["autocast"]) == (r["shape"], r["compile"], r["autocast"])), None)

    for r in (r for r in rows if r["status"] == "ok"):
        others = {"floor": find(r, "floor", None), "peft": find(r, r["variant"].replace("lorakit", "peft"), r["targets"])
                  if r["variant"].startswith("lorakit") else None}
        for name, other in others.items():
            if other is not None:
                r[f"speed_vs_{name}"] = r["tokens_per_s"] / other["tokens_per_s"]
                r[f"memory_vs_{name}"] = r["peak_bytes"] / other["peak_bytes"]


def run_matrix(args) -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `run_row` can end its row's processes
    rows = plan(args)
    kept = {}
    if args.resume:
        for r in json.loads(Path(args.resume).read_text())["rows"]:
            same = all(r.get(key, default) == getattr(args, key) for key, default in SETTINGS.items())
            if r["status"] == "ok" and same:  # a row measured with another --quantize etc. is measured again
                kept[Row(r["shape"], r["variant"], r["targets"], r["compile"], r["autocast"])] = r
    out = Path(args.out or RESULTS / f"train_speed_{args.device}.json")
    start = time.perf_counter()
    longest: dict[tuple, float] = {}  # (shape, compiled) -> the longest such row so far, seconds
    results = []
    for i, row in enumerate(rows):
        left = args.time_budget - (time.perf_counter() - start) if args.time_budget else None
        if row in kept:
            results.append(kept[row])
            continue
        guess = longest.get((row.shape, row.compile),  # else another shape's row of this kind
                            max((t for (_, c), t in longest.items() if c == row.compile), default=None))
        if left is not None and (left <= 0 or (guess is not None and guess > left)):
            results.append({**asdict(row), "mode": row.mode, **settings(args), "status": "skipped",
                            "error": f"time budget: {max(left, 0):.0f} s left, such a row took {guess or 0:.0f} s"})
            print(f"[{i + 1}/{len(rows)}] {row.label}: skipped (time budget)", file=sys.stderr, flush=True)
        else:  # a row of a new kind may run past the budget by the grace, no further
            timeout = args.row_timeout if left is None else min(args.row_timeout, left + args.grace)
            result = run_row(row, args, timeout)
            results.append(result)
            longest[(row.shape, row.compile)] = max(result["wall_s"], longest.get((row.shape, row.compile), 0))
            print(f"[{i + 1}/{len(rows)}] {row.label}: {result['status']} in {result['wall_s']:.0f} s"
                  + (f", {result['median_step_s'] * 1e3:.1f} ms/step" if result["status"] == "ok" else
                     "\n    " + result["error"].strip().splitlines()[-1][:300]), file=sys.stderr, flush=True)
        add_ratios(results)
        write_json(out, report(args, results, complete=False))
    write_json(out, report(args, results, complete=True))
    print_table(results, args)
    print(f"\nwrote {out}")


def git(*cmd: str) -> str | None:
    """``git *cmd`` in the repository (its stripped output), or None without git or a repository:
    what every benchmark's JSON records of the tree it ran on."""
    try:
        return subprocess.run(["git", *cmd], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).parent.parent).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def report(args, rows: list[dict], complete: bool) -> dict:
    """The JSON document: environment, arguments, rows (``complete`` False while a run is going)."""
    from importlib.metadata import version

    # from the rows: a CUDA context in this process would hold GPU memory the rows' processes lack
    gpu = next((r["gpu"] for r in rows if r.get("gpu")), None) or (
        torch.cuda.get_device_name() if torch.cuda.is_initialized() else None)
    return {
        "benchmark": "train_speed", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": args.device, "gpu": gpu,
        "cpu": platform.processor() or platform.machine(), "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__, "transformers": version("transformers"), "peft": version("peft"),
        "git_commit": git("rev-parse", "HEAD"), "git_changed_src": git("status", "--porcelain", "src"),
        "args": {k: v for k, v in vars(args).items() if k != "one"},
        "shapes": {name: asdict(SHAPES[name]) for name in args.shape}, "complete": complete, "rows": rows,
    }


def write_json(path: Path, payload: dict) -> None:
    """Write atomically (temp file, then rename): a run killed mid-write leaves the previous file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)


def print_table(rows: list[dict], args) -> None:
    unit, scale = ("GiB", 2**30) if args.device == "cuda" else ("GB RSS", 1e9)
    print(f"\ntraining step, {args.device}, {args.dtype} weights, median of {args.steps} steps after "
          f"{args.warmup} warm-up steps (first one timed separately), compile mode {args.compile_mode}, "
          f"lorakit recompute-inputs {args.recompute_inputs}")
    base = "dense" if args.quantize == "none" else f"{args.quantize}{' + double quant' if args.double_quant else ''}"
    print(f"base linear layers {base}, gradient checkpointing {'on' if args.grad_checkpoint else 'off'}, "
          f"optimizer {args.optimizer}")
    head = (f"{'shape':<10} {'targets':<10} {'variant':<8} {'mode':<27} {'ms/step':>8} {'tok/s':>9} {'×floor':>7} "
            f"{'weights':>8} {'peak ' + unit:>11} {'×floor':>7} {'×peft':>6} {'slowest':>8} {'first s':>8}")
    print(head + "\n" + "-" * len(head))
    for r in rows:
        start = f"{r['shape']:<10} {r['targets'] or '-':<10} {r['variant']:<8} {r['mode']:<27}"
        if r["status"] != "ok":
            print(f"{start} {r['status']}: {r['error'].strip().splitlines()[-1][:80] if r.get('error') else ''}")
            continue
        ratio = lambda key: f"{r[key]:.3f}" if key in r else "-"  # noqa: E731
        weights = f"{r['model_bytes'] / scale:.3g}" if "model_bytes" in r else "-"
        print(f"{start} {r['median_step_s'] * 1e3:>8.1f} {r['tokens_per_s']:>9,.0f} {ratio('speed_vs_floor'):>7} "
              f"{weights:>8} {r['peak_bytes'] / scale:>11.2f} {ratio('memory_vs_floor'):>7} "
              f"{ratio('speed_vs_peft'):>6} {r['slowest_over_median']:>8.3f} {r['first_step_s']:>8.1f}")
    print("×floor: tokens/s (or peak) over the floor of the same shape and mode; ×peft: lorakit's tokens/s over "
          f"PEFT's; weights: the base's parameters, buffers and quantization state ({unit.split()[0]}); slowest: the "
          "slowest timed step over the median")


# --- interleaved: every variant in one process, taking turns ----------------------------------


def interleave(args) -> None:
    """Step times of several variants in one process, alternating step by step on the same batches
    (the order rotates each round): steadier than separate runs on a small, noisy machine. No
    memory figures (one process holds every model)."""
    shape = SHAPES[args.shape[0]]
    batch, seq = args.batch or shape.batch, args.seq or shape.seq
    compiled, autocast = args.compile[0], args.autocast[0]
    rows = [r for r in plan(args) if (r.compile, r.autocast, r.shape) == (compiled, autocast, args.shape[0])]
    setups = []
    for row in rows:
        model, params = prepare(base_model(shape, args), row)
        opt = make_optimizer(params, args)
        embed = model.get_input_embeddings() if input_requires_grad(row, args) else None
        setups.append((row, compile_model(model, row, args) if compiled else model, opt, embed))
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, shape.vocab, (batch, seq), generator=g).to(args.device) for _ in range(4)]
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    times = {row: [] for row in rows}
    for step in range(args.warmup + args.steps):
        turn = step % len(setups)
        for row, model, opt, embed in setups[turn:] + setups[:turn]:
            sync()
            start = time.perf_counter()
            forward(model, embed, batches[step % len(batches)], autocast).backward()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
            sync()
            if step >= args.warmup:
                times[row].append(time.perf_counter() - start)
        print(f"round {step + 1}/{args.warmup + args.steps} done", file=sys.stderr, flush=True)
    result = [{**asdict(row), "mode": row.mode, **settings(args), "median_step_s": statistics.median(t),
               "step_times_s": t}
              for row, t in times.items()]
    print(f"\ninterleaved in one process: {args.shape[0]}, batch {batch} × {seq}, {args.device}, {rows[0].mode}, "
          f"median of {args.steps} steps after {args.warmup} warm-up steps")
    for r in result:
        print(f"{r['variant']:<8} {r['targets'] or '-':<10} {r['median_step_s'] * 1e3:9.1f} ms/step")
    pairs = []
    for targets in args.targets:
        ours = next((r for r in result if (r["variant"], r["targets"]) == ("lorakit", targets)), None)
        theirs = next((r for r in result if (r["variant"], r["targets"]) == ("peft", targets)), None)
        if ours and theirs:
            per_round = sorted(a / b for a, b in zip(ours["step_times_s"], theirs["step_times_s"]))
            q = len(per_round) // 4
            pairs.append({"targets": targets, "lorakit_over_peft": ours["median_step_s"] / theirs["median_step_s"],
                          "per_round_median": statistics.median(per_round),
                          "per_round_iqr": [per_round[q], per_round[-q - 1]]})
            print(f"lorakit / PEFT, {targets}: step time {pairs[-1]['lorakit_over_peft']:.3f}× (ratio of medians; "
                  f"per-round ratios median {pairs[-1]['per_round_median']:.3f}, IQR "
                  f"{per_round[q]:.3f}–{per_round[-q - 1]:.3f})")
    out = Path(args.out or RESULTS / f"train_interleaved_{args.device}.json")
    payload = report(args, result, complete=True)
    payload["benchmark"], payload["lorakit_vs_peft"] = "train_speed --interleave", pairs
    write_json(out, payload)
    print(f"wrote {out}")


def comma_list(choices):
    """An argparse type: comma-separated names, each one of ``choices``."""
    def parse(text: str) -> list[str]:
        names = [x for x in text.split(",") if x]
        wrong = [x for x in names if x not in choices]
        if wrong or not names:
            raise argparse.ArgumentTypeError(f"{','.join(wrong) or text!r}: choose from {', '.join(choices)}")
        return names
    return parse


def on_off(on: str):
    """An argparse type: ``off``, ``on`` or both, comma-separated, as booleans."""
    return lambda text: [x == on for x in comma_list(["off", on])(text)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--shape", type=comma_list(list(SHAPES)), help="comma-separated shapes: " + ", ".join(
        f"{n} ({s.batch} × {s.seq})" for n, s in SHAPES.items()) + "; default tinyllama on CUDA, smollm2 on CPU")
    p.add_argument("--variants", type=comma_list(VARIANTS), default=["floor", "lorakit", "peft"])
    p.add_argument("--targets", type=comma_list(list(LORA)), default=list(LORA))
    p.add_argument("--compile", type=on_off("on"), default=[True, False], help="off,on (default both)")
    p.add_argument("--compile-mode", default="default", choices=["default", "reduce-overhead", "max-autotune",
                                                                 "max-autotune-no-cudagraphs"])
    p.add_argument("--recompute-inputs", default="on", choices=["on", "off"], help="compiled lorakit rows: "
                   "lorakit.compile lets Inductor remake the adapted layers' inputs (norm outputs) in "
                   "backward (on), or plain torch.compile (off) (default: %(default)s)")
    p.add_argument("--compile-cache", default="fresh", choices=["fresh", "shared"], help="fresh: every row "
                   "compiles with an empty inductor/Triton cache (honest first-step times); shared: the usual one")
    p.add_argument("--autocast", type=on_off("bf16"), default=[True, False], help="off,bf16 (default both)")
    p.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], help="base weights (default "
                   "bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--quantize", default="none", choices=["none", "nf4", "fp4", "int8"], help="QLoRA: the decoder's "
                   "linear layers as bitsandbytes Linear4bit (nf4, fp4) or Linear8bitLt (int8) (default: %(default)s)")
    p.add_argument("--double-quant", action="store_true", help="quantize the 4-bit block scales too (QLoRA §3)")
    p.add_argument("--grad-checkpoint", action="store_true", help="gradient checkpointing (transformers', "
                   "non-reentrant) in every row")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw8bit"], help="torch's AdamW (fused on "
                   "CUDA) or bitsandbytes' AdamW8bit (default: %(default)s)")
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--sdpa-backend", default="default", choices=["default", "cudnn", "flash", "efficient", "math"])
    p.add_argument("--batch", type=int, help="override every shape's batch")
    p.add_argument("--seq", type=int, help="override every shape's sequence length")
    p.add_argument("--steps", type=int, default=20, help="timed steps per row")
    p.add_argument("--warmup", type=int, help="untimed steps first, the compile included (default 5 on CUDA, 2 on CPU)")
    p.add_argument("--time-budget", type=float, help="seconds for the whole matrix: a row that would not fit "
                   "(judged by the longest row so far of its shape, compiled or eager) is skipped and recorded as such")
    p.add_argument("--grace", type=float, default=45, help="seconds a row may run past the budget before it is killed")
    p.add_argument("--row-timeout", type=float, default=900, help="seconds before one row is killed")
    p.add_argument("--profile", metavar="DIR", help="after the timed steps, profile 3 more steps of every row: "
                   "device time by kernel family in the JSON, the kernel table in DIR")
    p.add_argument("--resume", metavar="JSON", help="keep the measured rows of this earlier output; measure the rest")
    p.add_argument("--out", help="output JSON (default benchmarks/results/train_speed_<device>.json, or "
                   "train_interleaved_<device>.json with --interleave)")
    p.add_argument("--interleave", action="store_true", help="all variants and targets in one process, one mode "
                   "(the first of --compile and of --autocast), alternating steps; default eager, no autocast")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one row, print RESULT json
    args = p.parse_args()

    if args.one:
        spec = json.loads(args.one)
        print("RESULT " + json.dumps(measure(Row(**spec["row"]), argparse.Namespace(**spec["args"]))))
        return
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no GPU")
    if args.double_quant and args.quantize not in ("nf4", "fp4"):
        p.error("--double-quant quantizes the scales of a 4-bit base: add --quantize nf4 (or fp4)")
    if args.quantize != "none" and "full" in args.variants:
        p.error(f"--quantize {args.quantize}: the full variant would train the packed weights; leave it out of "
                f"--variants")
    # looked for, not imported: importing bitsandbytes here would open a CUDA context the rows' processes lack
    if (args.quantize != "none" or args.optimizer == "adamw8bit") and importlib.util.find_spec("bitsandbytes") is None:
        p.error(f"--quantize {args.quantize} / --optimizer {args.optimizer} need bitsandbytes: "
                "pip install bitsandbytes")
    args.shape = args.shape or ["tinyllama" if cuda else "smollm2"]
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 2)
    if args.interleave:
        if "--compile" not in sys.argv:
            args.compile = [False]
        if "--autocast" not in sys.argv:
            args.autocast = [False]
        interleave(args)
    else:
        run_matrix(args)


if __name__ == "__main__":
    main()
