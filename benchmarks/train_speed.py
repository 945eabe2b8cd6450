"""Training-step speed and memory of LoRA: lorakit vs PEFT vs full fine-tuning vs the frozen floor.

One run measures every variant, each in its own fresh process (so peak memory is its own), on the
same model, seed and batches, and prints a table of medians and ratios:

- ``full``: every weight trains (AdamW).
- ``floor``: the frozen base; forward + backward with activation gradients only, no optimizer.
  LoRA cannot be cheaper than this.
- ``peft-*`` / ``lorakit-*``: LoRA r=8 on q,v and r=16 on all linear layers, lorakit as it runs by
  default (the fused op of ``ops/fused.py`` on CUDA, the plain torch reference ops on CPU).
- Ablations of lorakit: ``reference-*`` (the torch reference ops forced), ``fused-*`` (the fused op
  forced, also on CPU), ``ungrouped-*`` (the fused op, one call per layer: no shared q|k|v and
  gate|up projections), ``keep-*`` (``REBUILD_INPUTS = False``: every adapted layer's input is
  kept, SwiGLU's product too), ``rebuild-*`` (``REBUILD_INPUTS = True``: RMSNorm's outputs are
  rebuilt in backward as well, ``ops/rebuild.py``), ``cublas-*`` (``FUSED_B_GRADS = False``: g·B
  and gᵀ·low as two cuBLAS matmuls, each reading g, even in a captured step, where lorakit uses
  the one-read Triton kernel), ``bgrads-*`` (``FUSED_B_GRADS = True``: that kernel in eager steps too).

``--cuda-graphs`` captures each variant's whole step (forward, backward, optimizer) in one CUDA
graph after the warm-up steps and times its replays: every variant then runs at the GPU's speed,
with no host launch cost, which is how a launch-bound model is trained fast in practice.

The optimizer is AdamW for every variant that has one; on CUDA its fused implementation
(``fused=True``, one kernel for all parameters), for PEFT and full fine-tuning alike.

CPU (this repo's default): SmolLM2-135M, float32, batch 4 × 128; peak memory is the process's
peak RSS. GPU: a Llama of TinyLlama-1.1B's shape with random weights, bf16, sdpa attention,
batch 8 × 1024; peak memory is ``torch.cuda.max_memory_allocated``.

    .venv/bin/python benchmarks/train_speed.py                 # CPU table
    python benchmarks/train_speed.py --device cuda             # GPU table
    python benchmarks/train_speed.py --device cuda --cuda-graphs   # GPU table, each step one graph
    python benchmarks/train_speed.py --check-equivalence       # lorakit vs PEFT: same loss after 20 steps
    .venv/bin/python benchmarks/train_speed.py --interleave lorakit-qv-r8,peft-qv-r8 --steps 20   # one-process ratio
    python benchmarks/train_speed.py --device cuda --phases floor,lorakit-all-r16   # is a phase host-bound?
    .venv/bin/python benchmarks/train_speed.py --count-ops floor,fused-all-r16,peft-all-r16   # host work
    .venv/bin/python benchmarks/train_speed.py --host-proxy floor,fused-all-r16,peft-all-r16 --steps 40

Writes ``benchmarks/results/train_speed_<device>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
VARIANTS = ["floor", "full", "peft-qv-r8", "lorakit-qv-r8", "fused-qv-r8", "peft-all-r16", "lorakit-all-r16",
            "fused-all-r16"]
LIBRARIES = ("lorakit", "reference", "fused", "ungrouped", "keep", "rebuild", "cublas", "bgrads")
LORA = {  # variant suffix -> (rank, alpha, targets)
    "qv-r8": (8, 16, ["q_proj", "v_proj"]),
    "all-r16": (16, 32, "all-linear"),
}


def build_model(device: str):
    """SmolLM2-135M (float32) on CPU; TinyLlama-1.1B's shape (bf16, random weights) on CUDA."""
    if device == "cpu":
        from lorakit.models import load_causal_lm

        model, _ = load_causal_lm("default", dtype=torch.float32)
        return model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(cfg).to(torch.bfloat16)


def prepare(model, variant: str):
    """Set up the variant in place; returns (model, trainable parameters)."""
    if variant == "full":
        return model, list(model.parameters())
    if variant == "floor":
        model.requires_grad_(False)
        model.enable_input_require_grads()  # gradients flow through every layer, into no weight
        return model, []
    library, suffix = variant.split("-", 1)
    r, alpha, targets = LORA[suffix]
    if library == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0))
    else:
        import lorakit

        lorakit.inject(model, lorakit.LoraConfig(r=r, alpha=alpha, target_modules=targets))
        import lorakit.ops.fused

        if library in ("keep", "rebuild"):
            lorakit.ops.fused.REBUILD_INPUTS = library == "rebuild"
        if library in ("cublas", "bgrads"):
            lorakit.ops.fused.FUSED_B_GRADS = library == "bgrads"
        for module in model.modules():
            if isinstance(module, lorakit.LoraLayer) and library != "lorakit":
                module.use_fused_op = library != "reference"
                if library == "ungrouped":
                    module.shared_input = None
    return model, [p for p in model.parameters() if p.requires_grad]


def step_work(model, opt, ids: torch.Tensor, device: str) -> torch.Tensor:
    """Forward (bf16 autocast on CUDA), backward and optimizer step; returns the loss, unsynchronized."""
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    if opt is not None:
        opt.step()
    return loss.detach()


def train_step(model, opt, ids: torch.Tensor, device: str, losses: list | None = None) -> float:
    """One eager training step; returns its wall time in seconds (and appends the loss to ``losses``)."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    loss = step_work(model, opt, ids, device)
    if opt is not None:
        opt.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if losses is not None:
        losses.append(loss.item())
    return seconds


class GraphedStep:
    """The whole training step (forward, backward, optimizer) captured once in a CUDA graph and
    replayed: the host issues one launch a step instead of thousands, so the step takes the GPU's
    time. Every variant is captured the same way; the optimizer must be ``capturable``. Gradients
    are set to None before capture, so each replay writes them afresh, as eager steps with
    ``zero_grad(set_to_none=True)`` do. The batch is copied into a fixed input tensor first."""

    def __init__(self, model, opt, example: torch.Tensor, device: str) -> None:
        self.ids = example.clone()
        side = torch.cuda.Stream()  # warm-up on a side stream, as torch's capture recipe asks
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step_work(model, opt, self.ids, device)
                if opt is not None:
                    opt.zero_grad(set_to_none=True)
        torch.cuda.current_stream().wait_stream(side)
        if opt is None:  # the floor: no optimizer, and nothing may hold a gradient across replays
            model.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = step_work(model, opt, self.ids, device)

    def __call__(self, ids: torch.Tensor, losses: list | None = None) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        self.ids.copy_(ids)
        self.graph.replay()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        if losses is not None:
            losses.append(self.loss.item())
        return seconds


def setup(variant: str, args):
    """(model ready to train, its AdamW or None, trainable parameter count, the 4 batches)."""
    model = build_model(args.device)
    model.train()
    model, params = prepare(model, variant)
    opt = (torch.optim.AdamW(params, lr=1e-4, fused=args.device == "cuda", capturable=args.cuda_graphs)
           if params else None)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g).to(args.device)
               for _ in range(4)]
    return model, opt, sum(p.numel() for p in params), batches


def attention_backend(args):
    """A context that pins SDPA's backend (``--attention``), or one that leaves torch's choice."""
    if args.attention == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([{"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                         "efficient": SDPBackend.EFFICIENT_ATTENTION}[args.attention]])


def measure(variant: str, args) -> dict:
    """Time training steps of one variant in this process."""
    with attention_backend(args):
        return _measure(variant, args)


def _measure(variant: str, args) -> dict:
    model, opt, n_trainable, batches = setup(variant, args)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses = []
    step = lambda ids: train_step(model, opt, ids, args.device, losses)  # noqa: E731
    if args.cuda_graphs:  # eager warm-up steps (groups learned, kernels tuned), then capture
        for k in range(args.warmup):
            step(batches[k % len(batches)])
        step = GraphedStep(model, opt, batches[0], args.device)
        step = functools.partial(step, losses=losses)
    times = [step(batches[k % len(batches)]) for k in range(args.warmup + args.steps)][args.warmup:]
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:  # ru_maxrss is KiB on Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    median = statistics.median(times)
    return {"variant": variant, "median_step_s": median, "tokens_per_s": args.batch * args.seq / median,
            "peak_bytes": peak, "trainable_params": n_trainable, "step_times_s": times, "losses": losses}


def interleave(pair: str, args) -> dict:
    """Step-time ratio of two variants measured in one process, alternating steps on the same
    batches: on a small, noisy machine this is steadier than two separate runs (no memory figure)."""
    names = pair.split(",")
    setups = [(name, *setup(name, args)) for name in names]
    times = {name: [] for name in names}
    for step in range(args.warmup + args.steps):
        for name, model, opt, _, batches in (setups if step % 2 == 0 else setups[::-1]):  # alternate who goes first
            seconds = train_step(model, opt, batches[step % len(batches)], args.device)
            if step >= args.warmup:
                times[name].append(seconds)
    a, b = names
    ratios = sorted(x / y for x, y in zip(times[a], times[b]))
    q = len(ratios) // 4
    result = {"pair": names, "steps": args.steps, "median_s": {n: statistics.median(t) for n, t in times.items()},
              "ratio_median": statistics.median(ratios), "ratio_iqr": [ratios[q], ratios[-q - 1]], "step_times_s": times}
    print(f"{a} / {b}: step time {result['ratio_median']:.3f}× (per-step ratios, IQR "
          f"{ratios[q]:.3f}–{ratios[-q - 1]:.3f}; medians {result['median_s'][a]:.3f} s vs {result['median_s'][b]:.3f} s)")
    return result


def phases(variant: str, args) -> dict:
    """Per phase (forward, backward, optimizer): how long the host takes to issue its work, and how
    long until the device has done it. Where the two are close, the phase is bound by the host."""
    model, opt, _, batches = setup(variant, args)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    rows = {name: {"host": [], "wall": []} for name in ("forward", "backward", "optimizer")}
    for step in range(args.warmup + args.steps):
        ids = batches[step % len(batches)]

        def forward():
            with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.device == "cuda"):
                return model(input_ids=ids, labels=ids).loss

        def optimize():
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)

        sync()
        loss = None
        for name, work in (("forward", forward), ("backward", lambda: loss.backward()), ("optimizer", optimize)):
            start = time.perf_counter()
            out = work()
            issued = time.perf_counter()
            sync()
            if step >= args.warmup:
                rows[name]["host"].append(issued - start)
                rows[name]["wall"].append(time.perf_counter() - start)
            loss = out if name == "forward" else loss
    result = {name: {k: statistics.median(v) for k, v in r.items()} for name, r in rows.items()}
    for name, r in result.items():
        print(f"{variant} {name:<9}: host {r['host'] * 1e3:7.1f} ms, until done {r['wall'] * 1e3:7.1f} ms")
    return {"variant": variant, "phases_s": result}


def host_proxy(variants: list[str], args) -> list[dict]:
    """Host time per phase on the CPU, for a model of TinyLlama's depth (22 layers, the same modules)
    but tiny width (hidden 64, 8 tokens, one thread), where the arithmetic is negligible: what is
    left is Python and dispatch, the work a GPU step's host does. All variants live in one process
    and alternate, so machine noise hits each alike; medians and minimums of ``args.steps`` steps."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=176, num_hidden_layers=22,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      attn_implementation="sdpa")
    runs = {}
    for variant in variants:
        torch.manual_seed(0)
        model, params = prepare(LlamaForCausalLM(cfg).train(), variant)
        runs[variant] = (model, torch.optim.AdamW(params, lr=1e-4) if params else None)
    ids = torch.randint(0, cfg.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    times = {v: {"forward": [], "backward": [], "optimizer": []} for v in variants}
    for step in range(args.warmup + args.steps):
        for variant in (variants if step % 2 else variants[::-1]):
            model, opt = runs[variant]
            t0 = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
            t3 = time.perf_counter()
            if step >= args.warmup:
                for phase, seconds in zip(times[variant], (t1 - t0, t2 - t1, t3 - t2)):
                    times[variant][phase].append(seconds)
    rows = []
    for variant, phases_ in times.items():
        row = {"variant": variant, **{f"{phase}_median_s": statistics.median(t) for phase, t in phases_.items()},
               **{f"{phase}_min_s": min(t) for phase, t in phases_.items()}}
        rows.append(row)
        print(f"{variant:<18} " + "  ".join(f"{phase} {row[phase + '_median_s'] * 1e3:6.2f} ms (min "
                                            f"{row[phase + '_min_s'] * 1e3:6.2f})" for phase in phases_))
    return rows


def count_ops(variant: str, args) -> dict:
    """Torch operator calls per phase of one training step (after two warm-up steps, so groups and
    casts are settled): what the host pays for, independent of how fast this machine is."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = Counter()

        def __torch_dispatch__(self, func, types, args_=(), kwargs=None):
            self.calls[str(func.overloadpacket)] += 1
            return func(*args_, **(kwargs or {}))

    model, opt, _, batches = setup(variant, args)
    for _ in range(2):
        train_step(model, opt, batches[0], args.device)
    counts = {name: Count() for name in ("forward", "backward", "optimizer")}
    with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.device == "cuda"):
        with counts["forward"]:
            loss = model(input_ids=batches[0], labels=batches[0]).loss
    with counts["backward"]:
        loss.backward()
    if opt is not None:
        with counts["optimizer"]:
            opt.step()
            opt.zero_grad(set_to_none=True)
    result = {name: sum(c.calls.values()) for name, c in counts.items()}
    print(f"{variant}: torch calls forward {result['forward']}, backward {result['backward']}, "
          f"optimizer {result['optimizer']}")
    return {"variant": variant, "calls": result,
            "top": {name: c.calls.most_common(12) for name, c in counts.items()}}


def profile(variant: str, args) -> str:
    """torch.profiler table (top operators by device time) of a few steps of one variant."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    model, opt, _, batches = setup(variant, args)
    for _ in range(3):
        train_step(model, opt, batches[0], args.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(3):
            train_step(model, opt, batches[0], args.device)
    key = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=60)


def check_equivalence(args) -> dict:
    """lorakit and PEFT compute the same function: from one initial adapter (random B, so the
    check is not trivial), 20 AdamW steps on the same batches give the same losses."""
    import copy

    import lorakit
    from peft import LoraConfig, get_peft_model

    device = args.device
    base = build_model(device)
    r, alpha, targets = LORA["qv-r8"]
    ours = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(r=r, alpha=alpha, target_modules=targets))
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=alpha, target_modules=targets))
    g = torch.Generator().manual_seed(1)
    lookup = {n: m for n, m in theirs.base_model.model.named_modules()}
    with torch.no_grad():
        for name, layer in ours.named_modules():
            if isinstance(layer, lorakit.LoraLayer):
                layer.lora_B["default"].copy_(torch.randn(layer.lora_B["default"].shape, generator=g) * 0.01)
                lookup[name].lora_A["default"].weight.copy_(layer.lora_A["default"])
                lookup[name].lora_B["default"].weight.copy_(layer.lora_B["default"])
    losses = {}
    data = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, base.config.vocab_size, (2, 64), generator=data).to(device) for _ in range(20)]
    for label, model in (("lorakit", ours), ("peft", theirs)):
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        losses[label] = []
        for ids in batches:
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[label].append(loss.item())
    diff = max(abs(a - b) for a, b in zip(losses["lorakit"], losses["peft"]))
    print(f"loss after 20 steps: lorakit {losses['lorakit'][-1]:.6f}, peft {losses['peft'][-1]:.6f}, "
          f"max |Δloss| over the 20 steps {diff:.2e}")
    return {"losses": losses, "max_abs_loss_diff": diff}


def write_results(kind: str, results: list[dict], args) -> None:
    """``results/train_<kind>_<device>.json`` with the run's settings."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"train_{kind}_{args.device}.json").write_text(json.dumps(
        {"device": args.device, "batch": args.batch, "seq": args.seq, "torch": torch.__version__,
         "results": results}, indent=2) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch", type=int)
    p.add_argument("--seq", type=int)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, help="untimed steps first (default 5 on CUDA, where lorakit's "
                   "first timed steps ran slow in one run, 2 on CPU)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--attention", default="default", choices=["default", "cudnn", "flash", "efficient"],
                   help="pin SDPA's backend for every variant (default: torch's choice, which may differ "
                   "between eager steps and a graph capture)")
    p.add_argument("--cuda-graphs", action="store_true", help="capture each variant's whole step in a CUDA "
                   "graph and time replays (GPU time, no launch cost); writes train_speed_cuda_graphs.json")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one variant, print JSON
    p.add_argument("--check-equivalence", action="store_true")
    p.add_argument("--profile", metavar="VARIANT", help="print and save a torch.profiler table of VARIANT")
    p.add_argument("--phases", metavar="A,B", help="host time vs time until done, per phase, for each "
                   "variant; writes train_phases_<device>.json")
    p.add_argument("--count-ops", metavar="A,B", help="torch operator calls per phase of one step, for "
                   "each variant (the host's work); writes train_ops_<device>.json")
    p.add_argument("--host-proxy", metavar="A,B", help="host time per phase on CPU for a 22-layer model of "
                   "tiny width (Python and dispatch only), variants alternating in one process; writes "
                   "train_host_cpu.json")
    p.add_argument("--interleave", metavar="A,B[;C,D…]", help="step-time ratios of pairs of variants, "
                   "each pair in one process with alternating steps; writes train_interleaved_<device>.json")
    args = p.parse_args()
    args.batch = args.batch or (8 if args.device == "cuda" else 4)
    args.warmup = args.warmup if args.warmup is not None else (5 if args.device == "cuda" else 2)
    args.seq = args.seq or (1024 if args.device == "cuda" else 128)
    if args.cuda_graphs and args.device != "cuda":
        p.error("--cuda-graphs needs --device cuda")

    if args.one:
        print("RESULT " + json.dumps(measure(args.one, args)))
        return
    if args.interleave:
        write_results("interleaved", [interleave(pair, args) for pair in args.interleave.split(";")], args)
        return
    if args.host_proxy:
        args.device = "cpu"
        write_results("host", host_proxy(args.host_proxy.split(","), args), args)
        return
    if args.count_ops:
        write_results("ops", [count_ops(variant, args) for variant in args.count_ops.split(",")], args)
        return
    if args.phases:
        write_results("phases", [phases(variant, args) for variant in args.phases.split(",")], args)
        return
    if args.profile:
        table = profile(args.profile, args)
        print(table)
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"profile_{args.profile}_{args.device}.txt").write_text(table + "\n")
        return
    if args.check_equivalence:
        result = check_equivalence(args)
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"train_equivalence_{args.device}.json").write_text(json.dumps(result, indent=2) + "\n")
        return

    rows = []
    for variant in args.variants.split(","):
        cmd = [sys.executable, __file__, "--one", variant, "--device", args.device, "--batch", str(args.batch),
               "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup)]
        cmd += ["--attention", args.attention] + (["--cuda-graphs"] if args.cuda_graphs else [])
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"{variant}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(line[len("RESULT "):]))
        print(f"measured {variant}", file=sys.stderr)

    by = {r["variant"]: r for r in rows}
    floor = by.get("floor")
    unit = "GiB" if args.device == "cuda" else "GB RSS"
    scale = 2**30 if args.device == "cuda" else 1e9
    mode = (", whole step in a CUDA graph" if args.cuda_graphs else "") + (
        f", {args.attention} attention" if args.attention != "default" else "")
    print(f"\ntraining step, batch {args.batch} × {args.seq}, {args.device}{mode}, median of {args.steps} steps")
    print(f"{'variant':<18} {'tokens/s':>10} {'s/step':>8} {'peak ' + unit:>12} {'trainable':>12} "
          f"{'speed/floor':>11} {'mem/floor':>9}")
    for r in rows:
        speed = r["tokens_per_s"] / floor["tokens_per_s"] if floor else float("nan")
        mem = r["peak_bytes"] / floor["peak_bytes"] if floor else float("nan")
        r["speed_vs_floor"], r["memory_vs_floor"] = speed, mem
        print(f"{r['variant']:<18} {r['tokens_per_s']:>10,.0f} {r['median_step_s']:>8.3f} "
              f"{r['peak_bytes'] / scale:>12.2f} {r['trainable_params']:>12,} {speed:>10.2f}× {mem:>8.2f}×")
    ratios = {}
    for suffix in LORA:
        theirs = by.get(f"peft-{suffix}")
        for library in LIBRARIES:
            ours = by.get(f"{library}-{suffix}")
            if ours and theirs:
                key = f"{library}-{suffix}"
                ratios[key] = {"step_time_over_peft": ours["median_step_s"] / theirs["median_step_s"],
                               "peak_over_peft": ours["peak_bytes"] / theirs["peak_bytes"]}
                print(f"{key} / PEFT: step time {ratios[key]['step_time_over_peft']:.3f}×, "
                      f"peak memory {ratios[key]['peak_over_peft']:.3f}×")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_file = RESULTS / f"train_speed_{args.device}{'_graphs' if args.cuda_graphs else ''}.json"
    out_file.write_text(json.dumps({
        "benchmark": "train_speed", "device": args.device, "batch": args.batch, "seq": args.seq,
        "steps": args.steps, "cuda_graphs": args.cuda_graphs, "attention": args.attention, "torch": torch.__version__, "machine": platform.machine(),
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "rows": rows, "lorakit_vs_peft": ratios,
    }, indent=2) + "\n")
    print(f"\nwrote {out_file}")


if __name__ == "__main__":
    main()
