"""Generation throughput of the mixed-adapter engine beside transformers and PEFT, in one run.

Rows (all in one process, on one model, greedy, ``ignore_eos``: every request makes exactly
``--new-tokens`` tokens):

1. ``hf_dynamic``: transformers ``generate`` on the base model, dynamic cache, all requests in one
   batch (left padded; with the equal-length prompts used here there is no padding).
2. ``hf_static``: the same with ``cache_implementation="static"``; with ``--compile-static``,
   transformers' own ``torch.compile`` of the decode forward (if it fails, the error is recorded and
   the row runs uncompiled).
3. ``engine_base``: `lorakit.serving.Engine`, every request on the base model (the engine holds the
   K adapters, as it would while serving; no request uses one).
4. ``engine_mixed``: the same engine, the K adapters round-robin over the requests.
5. ``engine_merged``: a second engine with ``merge_single_adapter=True``, every request on adapter 0.
6. ``peft_mixed``: PEFT with the K adapters loaded, mixed via ``generate(adapter_names=...)``.

Each row runs a short untimed warm-up, then times, ``--repeats`` times (medians reported), the
prefill of the whole batch (time to the first token of every request: for the engine the first
`step()` after submitting everything, for transformers ``generate`` with ``max_new_tokens=1``) and
a full run (output tokens/s = requests × new tokens / wall time, prefill included). Ratios are to
the engine's base row and to transformers' dynamic-cache row of this run. Memory: the bank's
stacked A/B bytes and the KV cache's bytes, read from the engine objects. Checks (in the JSON,
``tokens_match`` and ``checks``): the engine's base tokens equal transformers' greedy tokens of the
same prompts decoded alone, the merged row equals the mixed row's adapter-0 requests, PEFT's mixed
tokens equal the engine's, and the adapters change the tokens at all.

Weights are seeded random (a LlamaConfig of ``--shape``), bf16 on CUDA and fp32 on CPU; adapters
are r=16, alpha 32, all-linear, random non-zero factors, saved by PEFT (``get_peft_model`` +
``save_pretrained``) into a temporary directory. ``--time-budget`` skips rows that would not fit
(judged by the longest row so far; PEFT's row is guessed at ``PEFT_SLOWER`` × that). On CPU the
default is one thread (``--threads``): on a small, busy machine more threads than free cores made
the tiny shape's smoke run about 200× slower (4 s against 0.02 s) and its ratios noise.

On CUDA the token checks compare bf16 greedy decodes, which flip on near-ties of a random model
once batch shapes differ: read them as agreement counts. ``logprob_max_abs_diff_vs_transformers``
is the check that holds there: the engine's log-probability of each token it chose (a batch of the
check requests) against transformers' log-softmax of the same prefix run alone.

``--sweep-adapters 1,2,4,8,16,32`` times the engine with k distinct adapters in the batch and plots
throughput against k (``<out>.adapters.png``).

``--poisson RATE`` adds the issue's serving scenario: ``--bank-adapters`` (64) distinct adapters in
one engine with ``--adapters`` (8) bank slots, requests arriving as a Poisson process of RATE per
second, each for a uniformly drawn adapter; it reports throughput, time to first token and
inter-token latency p50/p90/p99 (from each request's arrival), and the cost of an adapter swap from
the CPU into a slot (``poisson`` in the JSON).

    .venv/bin/python benchmarks/serving.py --device cpu --shape tiny --requests 8 --prompt-len 16 \\
        --new-tokens 8 --adapters 2 --out /tmp/serving_smoke.json          # smoke test
    python benchmarks/serving.py --device cuda --shape tinyllama --compile-static --time-budget 540
    python benchmarks/serving.py --device cuda --shape llama3-8b --requests 32 --time-budget 540

Writes ``benchmarks/results/serving_<device>.json`` (``--out``), rewritten after every row.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import torch

from lorakit.cli import HelpFormatter  # the defaults shown once, None ones not at all

RESULTS = Path(__file__).parent / "results"
ROWS = ("hf_dynamic", "hf_static", "engine_base", "engine_mixed", "engine_merged", "peft_mixed")
LABELS = {
    "hf_dynamic": "transformers generate, dynamic cache, base",
    "hf_static": "transformers generate, static cache, base",
    "engine_base": "engine, base model",
    "engine_mixed": "engine, K adapters mixed",
    "engine_merged": "engine, merged, one adapter",
    "peft_mixed": "PEFT, K adapters mixed (adapter_names=)",
}
PEFT_SLOWER = 8.0  # guess of PEFT's mixed row over the longest row so far, for --time-budget
LORA_R, LORA_ALPHA, FACTOR_STD = 16, 32, 0.05  # std 0.05: ΔW = s·B·A has entries of std ~0.02, as W0's init


# The shapes (layers and widths) of train_speed.py; its batch and sequence fields are not used here.
from train_speed import SHAPES, Shape, git  # noqa: E402


# --- setup -----------------------------------------------------------------------------------


def build_model(shape: Shape, args):
    """A Llama of ``shape`` with seeded random weights in the run's dtype, made on the device. No EOS
    (nothing stops early; the engine's ``ignore_eos`` and transformers' missing EOS agree)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                      num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                      num_key_value_heads=shape.kv_heads,
                      max_position_embeddings=max(2048, args.prompt_len + args.new_tokens),
                      tie_word_embeddings=shape.tie_embeddings, rope_theta=shape.rope_theta,
                      attn_implementation="sdpa", bos_token_id=None, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(args.dtype)  # made in the weights' dtype: an 8B model never exists in fp32
    try:
        with torch.device(args.device):
            model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.requires_grad_(False)


def save_adapters(model, k: int, root: Path, first: int = 0) -> list[str]:
    """K PEFT adapters for ``model`` (r=16 all-linear, random non-zero A and B, seeds first+1..first+K)
    under ``root``; ``model`` is left plain (PEFT's ``unload``)."""
    from peft import LoraConfig, get_peft_model

    paths = []
    for i in range(first, first + k):
        peft_model = get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules="all-linear",
                                                      lora_dropout=0.0))
        g = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:  # PEFT starts B at 0, which would make every adapter the base model
                    p.copy_(torch.randn(p.shape, generator=g) * FACTOR_STD)
        path = root / f"a{i}"
        peft_model.save_pretrained(str(path))
        model = peft_model.unload()
        paths.append(str(path))
    return paths


# --- the rows --------------------------------------------------------------------------------


def timed(fn, device: str):
    """(seconds, result) of ``fn()``, synchronized on CUDA."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - start, out


def left_padded(prompts: list[list[int]], device: str):
    """(input_ids, attention_mask), left padded with id 0."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def hf_run(model, prompts, args, *, static: bool = False, compiled: bool = False, extra: dict | None = None) -> dict:
    """transformers ``generate`` rows (and PEFT's, whose model's ``generate`` takes ``extra``)."""
    from transformers import CompileConfig, GenerationConfig

    ids, mask = left_padded(prompts, args.device)
    extra = extra or {}

    def config(new: int) -> GenerationConfig:
        cfg = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0,
                               cache_implementation="static" if static else None, disable_compile=not compiled)
        if compiled:
            cfg.compile_config = CompileConfig()
            cfg.compile_config._compile_all_devices = True  # transformers compiles on GPUs only, unless told
        return cfg

    def generate(new: int):
        with torch.inference_mode():
            return model.generate(input_ids=ids, attention_mask=mask, generation_config=config(new), **extra)

    generate(args.new_tokens if compiled else 2)  # warm-up (a compiled one at the timed shapes)
    prefills = [timed(lambda: generate(1), args.device)[0] for _ in range(args.repeats)]
    totals, outs = zip(*(timed(lambda: generate(args.new_tokens), args.device) for _ in range(args.repeats)))
    return {"prefill_s": statistics.median(prefills), "total_s": statistics.median(totals),
            "prefill_times_s": prefills, "total_times_s": list(totals), "tokens": outs[-1][:, ids.shape[1]:].tolist()}


def engine_run(engine, prompts, adapters, args) -> dict:
    """Submit every request, time the first step (the whole batch's prefill) and the run to the end."""
    engine.generate(prompts, adapters=adapters, max_new_tokens=2, ignore_eos=True)  # warm-up
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    prefills, totals = [], []
    for _ in range(args.repeats):
        requests = [engine.submit(p, adapter=a, max_new_tokens=args.new_tokens, ignore_eos=True)
                    for p, a in zip(prompts, adapters)]
        sync()
        start = time.perf_counter()
        engine.step()
        sync()
        prefills.append(time.perf_counter() - start)
        steps = 1
        while engine.waiting or engine.running:
            engine.step()
            steps += 1
        sync()
        totals.append(time.perf_counter() - start)
    return {"prefill_s": statistics.median(prefills), "total_s": statistics.median(totals),
            "prefill_times_s": prefills, "total_times_s": totals, "steps": steps,
            "tokens": [r.tokens for r in requests], "merge_switches": engine.merged.switches}


# --- the run ---------------------------------------------------------------------------------


class Run:
    """The rows in order, a shared model, and the JSON rewritten after each row."""

    def __init__(self, args) -> None:
        self.args, self.start, self.rows, self.longest = args, time.perf_counter(), [], 0.0
        self.out = Path(args.out or RESULTS / f"serving_{args.device}.json")
        self.memory, self.checks, self.setup = {}, {}, {}
        self.sweep: list[dict] = []  # --sweep-adapters points
        self.poisson: dict = {}  # --poisson workload
        self.plot: Path | None = None

    def wanted(self, name: str) -> bool:
        return name in self.args.rows

    def measure(self, name: str, fn) -> dict | None:
        """Run ``fn`` as row ``name`` unless the budget says no; a failure becomes a row with its error."""
        if not self.wanted(name):
            return None
        guess = self.longest * (PEFT_SLOWER if name == "peft_mixed" else 1.0)
        left = self.args.time_budget - (time.perf_counter() - self.start) if self.args.time_budget else None
        if left is not None and (left <= 0 or guess > left):
            row = {"row": name, "status": "skipped",
                   "error": f"time budget: {max(left, 0):.0f} s left, guessed {guess:.0f} s for this row"}
        else:
            begun = time.perf_counter()
            try:
                row = {"row": name, "status": "ok", **fn()}
            except Exception as error:  # noqa: BLE001 - a row's failure is a result, the next rows still run
                row = {"row": name, "status": "failed", "error": f"{type(error).__name__}: {error}",
                       "traceback": traceback.format_exc()[-3000:]}
            row["wall_s"] = time.perf_counter() - begun
            self.longest = max(self.longest, row["wall_s"])
        if row["status"] == "ok":
            n = self.args.requests * self.args.new_tokens
            row["tokens_per_s"] = n / row["total_s"]
            # (total - prefill) / decode steps; for transformers the prefill is timed in its own generate
            row["ms_per_decode_step"] = 1e3 * (row["total_s"] - row["prefill_s"]) / max(self.args.new_tokens - 1, 1)
        row["label"] = LABELS[name]
        self.rows.append(row)
        print(f"{name}: {row['status']} in {row.get('wall_s', 0):.1f} s"
              + (f", {row['tokens_per_s']:,.0f} tok/s" if row["status"] == "ok" else f": {row['error'][:200]}"),
              file=sys.stderr, flush=True)
        self.write(complete=False)
        return row if row["status"] == "ok" else None

    def ok(self, name: str) -> dict | None:
        return next((r for r in self.rows if r["row"] == name and r["status"] == "ok"), None)

    def add_ratios(self) -> None:
        bases = {"engine_base": self.ok("engine_base"), "hf_dynamic": self.ok("hf_dynamic")}
        for row in (r for r in self.rows if r["status"] == "ok"):
            for key, base in bases.items():
                if base is not None:
                    row[f"speed_vs_{key}"] = row["tokens_per_s"] / base["tokens_per_s"]
                    row[f"prefill_vs_{key}"] = row["prefill_s"] / base["prefill_s"]

    def targets(self) -> dict:
        """The issue's targets, as measured in this run (None where a row is missing)."""
        def ratio(a, b, key):
            ra, rb = self.ok(a), self.ok(b)
            if ra is None or rb is None:
                return None
            return ra[key] / rb[key]

        return {
            "engine_base_over_hf_static_tokens_per_s (target >= 2)": ratio("engine_base", "hf_static", "tokens_per_s"),
            "engine_mixed_over_engine_base_tokens_per_s (target >= 0.85)":
                ratio("engine_mixed", "engine_base", "tokens_per_s"),
            "engine_mixed_over_engine_base_prefill_s (target <= 1.15)":
                ratio("engine_mixed", "engine_base", "prefill_s"),
            "engine_merged_over_engine_base_tokens_per_s (target >= 0.95)":
                ratio("engine_merged", "engine_base", "tokens_per_s"),
            "peft_mixed_over_hf_dynamic_tokens_per_s (issue: 0.06)": ratio("peft_mixed", "hf_dynamic", "tokens_per_s"),
        }

    def write(self, complete: bool) -> None:
        from importlib.metadata import version

        self.add_ratios()
        args = self.args
        payload = {
            "benchmark": "serving",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": args.device, "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
            "cpu": platform.processor() or platform.machine(), "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": version("transformers"), "peft": version("peft"),
            "git_commit": git("rev-parse", "HEAD"), "git_changed_src": git("status", "--porcelain", "src"),
            "args": {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in vars(args).items()},
            "shape": {args.shape: asdict(SHAPES[args.shape])},
            "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "targets": "all-linear", "factor_std": FACTOR_STD},
            "setup": self.setup, "memory": self.memory,
            "tokens_match": self.checks.get("tokens_match"), "checks": self.checks,
            "targets": self.targets(), "complete": complete, "sweep": self.sweep,
            "sweep_plot": str(self.plot) if self.plot else None, "poisson": self.poisson,
            "rows": [{k: v for k, v in r.items() if k != "tokens"} | ({"tokens_first_2": r["tokens"][:2]}
                                                                       if "tokens" in r else {}) for r in self.rows],
        }
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        tmp.replace(self.out)


def run(args) -> None:
    from lorakit.serving import Engine

    bench = Run(args)
    shape = SHAPES[args.shape]
    g = torch.Generator().manual_seed(1234)
    prompts = torch.randint(1, shape.vocab, (args.requests, args.prompt_len), generator=g).tolist()
    names = [f"a{i}" for i in range(args.adapters)]
    mixed = [names[i % len(names)] for i in range(args.requests)]  # round robin
    tmp = tempfile.TemporaryDirectory(prefix="serving_adapters_")

    took, model = timed(lambda: build_model(shape, args), args.device)
    bench.setup["build_model_s"] = took
    took, paths = timed(lambda: save_adapters(model, args.adapters, Path(tmp.name)), args.device)
    bench.setup["save_adapters_s"] = took

    # 1, 2: transformers on the base model
    bench.measure("hf_dynamic", lambda: hf_run(model, prompts, args))

    def static_row() -> dict:
        if args.compile_static:
            try:
                return {**hf_run(model, prompts, args, static=True, compiled=True), "compiled": True}
            except Exception as error:  # noqa: BLE001 - recorded, then the row runs uncompiled
                torch._dynamo.reset()
                failed = f"{type(error).__name__}: {str(error)[:1500]}"
                return {**hf_run(model, prompts, args, static=True), "compiled": False, "compile_error": failed}
        return {**hf_run(model, prompts, args, static=True), "compiled": False}

    bench.measure("hf_static", static_row)

    # 3, 4: one engine holding the K adapters; base requests, then mixed
    max_seq_len = args.prompt_len + args.new_tokens
    engine_rows = ("engine_base", "engine_mixed", "engine_merged")
    if any(bench.wanted(r) for r in engine_rows):
        engine = Engine(model, None, max_batch=args.requests, max_adapters=args.adapters, max_rank=LORA_R,
                        max_seq_len=max_seq_len)
        for name, path in zip(names, paths):
            engine.add_adapter(name, path)
        bench.memory = {"bank_bytes": engine.bank.nbytes(), "kv_cache_bytes": engine.cache.nbytes(),
                        "bank_modules": len(engine.bank.modules),
                        "base_weight_bytes": sum(p.nbytes for p in model.parameters())}
        bench.measure("engine_base", lambda: engine_run(engine, prompts, [None] * args.requests, args))
        bench.measure("engine_mixed", lambda: engine_run(engine, prompts, mixed, args))
        model = engine.close()
        del engine

        # 5: merged fast path, every request on adapter 0
        def merged_row() -> dict:
            merged_engine = Engine(model, None, max_batch=args.requests, max_adapters=args.adapters, max_rank=LORA_R,
                                   max_seq_len=max_seq_len, merge_single_adapter=True)
            try:
                merged_engine.add_adapter(names[0], paths[0])
                return engine_run(merged_engine, prompts, [names[0]] * args.requests, args)
            finally:
                merged_engine.close()

        bench.measure("engine_merged", merged_row)

    # 6: PEFT with the K adapters, mixed in the batch
    def peft_row() -> dict:
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(model, paths[0], adapter_name=names[0]).eval()
        for name, path in zip(names[1:], paths[1:]):
            peft_model.load_adapter(path, adapter_name=name)
        try:
            return hf_run(peft_model, prompts, args, extra={"adapter_names": mixed})
        finally:
            peft_model.unload()

    bench.measure("peft_mixed", peft_row)

    if args.sweep_adapters:
        model = sweep_adapters(bench, model, prompts, paths, Path(tmp.name) / "sweep", args)
    if args.poisson:
        model = poisson_run(bench, model, prompts, paths, Path(tmp.name) / "poisson", args)
    check(bench, model, prompts, mixed, args)
    bench.write(complete=True)
    tmp.cleanup()
    print_table(bench)
    print(f"\nwrote {bench.out}")


def sweep_adapters(bench: Run, model, prompts, paths: list[str], root: Path, args):
    """Engine throughput with k distinct adapters round-robin over the batch, for each k of
    ``--sweep-adapters``; the points go to the JSON (``sweep``) and a plot beside it. Returns the model."""
    from lorakit.serving import Engine

    ks = [k for k in args.sweep_adapters if k <= args.requests]
    need = max(ks, default=0) - len(paths)
    paths = paths + (save_adapters(model, need, root, first=len(paths)) if need > 0 else [])
    for k in ks:
        left = args.time_budget - (time.perf_counter() - bench.start) if args.time_budget else None
        if left is not None and (left <= 0 or bench.longest > left):
            bench.sweep.append({"distinct_adapters": k, "status": "skipped", "error": "time budget"})
            continue
        engine = Engine(model, None, max_batch=args.requests, max_adapters=k, max_rank=LORA_R,
                        max_seq_len=args.prompt_len + args.new_tokens)
        begun = time.perf_counter()
        try:
            for i in range(k):
                engine.add_adapter(f"s{i}", paths[i])
            result = engine_run(engine, prompts, [f"s{i % k}" for i in range(args.requests)], args)
        finally:
            model = engine.close()
        bench.longest = max(bench.longest, time.perf_counter() - begun)
        bench.sweep.append({"distinct_adapters": k, "status": "ok", "prefill_s": result["prefill_s"],
                            "total_s": result["total_s"],
                            "tokens_per_s": args.requests * args.new_tokens / result["total_s"]})
        print(f"sweep: {k} distinct adapters, {bench.sweep[-1]['tokens_per_s']:,.0f} tok/s", file=sys.stderr, flush=True)
        bench.write(complete=False)
    plot_sweep(bench)
    return model


def percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50": pick(0.50), "p90": pick(0.90), "p99": pick(0.99), "max": ordered[-1], "n": len(ordered)}


def poisson_run(bench: Run, model, prompts, paths: list[str], root: Path, args):
    """``--bank-adapters`` distinct adapters added to one engine with ``--adapters`` bank slots; the
    ``--requests`` requests arrive as a Poisson process of ``--poisson`` requests/s, each for an
    adapter drawn uniformly. Reports throughput, time to first token and inter-token latency
    percentiles (from each request's arrival), and the cost of putting an adapter from the CPU
    into a slot (a swap). Returns the model."""
    import random

    from lorakit.serving import Engine

    need = args.bank_adapters - len(paths)
    paths = paths + (save_adapters(model, need, root, first=len(paths)) if need > 0 else [])
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    engine = Engine(model, None, max_batch=args.requests, max_adapters=args.adapters, max_rank=LORA_R,
                    max_seq_len=args.prompt_len + args.new_tokens)
    try:
        names = [f"p{i}" for i in range(args.bank_adapters)]
        for name, path in zip(names, paths):
            engine.add_adapter(name, path)
        rng = random.Random(0)
        arrivals, t = [], 0.0
        for _ in range(args.requests):
            t += rng.expovariate(args.poisson)
            arrivals.append(t)
        wanted = [rng.choice(names) for _ in range(args.requests)]
        engine.generate(prompts[:2], [wanted[0], None], max_new_tokens=2, ignore_eos=True)  # warm-up
        arrived, stamps = {}, {}
        pending = list(zip(arrivals, prompts, wanted))
        start = time.perf_counter()
        while pending or engine.waiting or engine.running:
            now = time.perf_counter() - start
            while pending and pending[0][0] <= now:
                at, prompt, adapter = pending.pop(0)
                request = engine.submit(prompt, adapter, max_new_tokens=args.new_tokens, ignore_eos=True)
                arrived[request.id], stamps[request.id] = at, []
            if not (engine.waiting or engine.running):
                time.sleep(max(0.0, pending[0][0] - (time.perf_counter() - start)))
                continue
            events = engine.step()
            sync()
            done = time.perf_counter() - start
            for event in events:
                stamps[event.request_id].extend([done] * len(event.tokens))
        wall = time.perf_counter() - start
        ttft = [stamps[i][0] - arrived[i] for i in arrived if stamps[i]]
        itl = [b - a for i in arrived for a, b in zip(stamps[i], stamps[i][1:])]
        # a swap: an adapter waiting on the CPU into a slot, evicting the least recently used one
        bank, swaps = engine.bank, []
        for name in names:
            if len(swaps) == 8:
                break
            if bank.slot_of(name) is None:
                sync()
                begun = time.perf_counter()
                bank.slots_for([name])
                sync()
                swaps.append(time.perf_counter() - begun)
        bench.poisson = {
            "rate_per_s": args.poisson, "bank_adapters": args.bank_adapters, "slots": args.adapters,
            "requests": args.requests, "wall_s": wall,
            "tokens_per_s": sum(len(v) for v in stamps.values()) / wall,
            "ttft_s": percentiles(ttft), "inter_token_s": percentiles(itl), "swap_s": percentiles(swaps),
            "adapter_bytes_fp32": sum(f.A.nbytes + f.B_scaled.nbytes
                                      for f in bank.entries[names[0]].factors.modules.values()),
        }
    finally:
        model = engine.close()
    p = bench.poisson
    print(f"poisson: {p['tokens_per_s']:,.0f} tok/s; TTFT p50 {p['ttft_s']['p50']*1e3:.0f} ms, p99 "
          f"{p['ttft_s']['p99']*1e3:.0f} ms; inter-token p50 {p['inter_token_s']['p50']*1e3:.1f} ms, p99 "
          f"{p['inter_token_s']['p99']*1e3:.1f} ms; swap p50 {p['swap_s'].get('p50', float('nan'))*1e3:.2f} ms",
          file=sys.stderr, flush=True)
    bench.write(complete=False)
    return model


def plot_sweep(bench: Run) -> None:
    """Throughput against the number of distinct adapters in the batch, with the base rows as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [p for p in bench.sweep if p["status"] == "ok"]
    if not points:
        return
    args = bench.args
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot([p["distinct_adapters"] for p in points], [p["tokens_per_s"] for p in points], "o-",
            label="engine, k adapters mixed")
    for name, style in (("engine_base", "--"), ("hf_dynamic", ":"), ("hf_static", "-.")):
        row = bench.ok(name)
        if row is not None:
            ax.axhline(row["tokens_per_s"], linestyle=style, color="gray", label=LABELS[name])
    ax.set_xscale("log", base=2)
    ax.set_xticks([p["distinct_adapters"] for p in points], [str(p["distinct_adapters"]) for p in points])
    ax.set_xlabel("distinct adapters in the batch (r=16, all-linear)")
    ax.set_ylabel("output tokens/s")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{args.shape} shape, {args.device}, {args.requests} requests x {args.prompt_len} prompt "
                 f"+ {args.new_tokens} new tokens", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    bench.plot = bench.out.with_suffix(".adapters.png")
    fig.savefig(bench.plot, dpi=110)
    plt.close(fig)


def check(bench: Run, model, prompts, mixed, args) -> None:
    """Token checks: the engine's base rows against transformers' greedy decoding of each prompt alone."""
    from transformers import GenerationConfig

    c = bench.checks
    base = bench.ok("engine_base")
    if base is not None:
        cfg = GenerationConfig(max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
        alone = []
        for p in prompts[:args.check_requests]:
            with torch.inference_mode():
                ids = torch.tensor([p], device=args.device)
                alone.append(model.generate(input_ids=ids, generation_config=cfg)[0, len(p):].tolist())
        c["tokens_match"] = all(a == e for a, e in zip(alone, base["tokens"]))
        c["tokens_match_requests"] = len(alone)
        c["checked_distinct_tokens"] = len({t for a in alone for t in a})  # a check of constant outputs is weak
        # per checked request, the first new token where the engine and transformers differ (None: none does);
        # bf16 on a GPU may differ late, where two logits are within rounding of each other
        c["first_mismatch"] = [next((j for j, (x, y) in enumerate(zip(a, e)) if x != y), None)
                               for a, e in zip(alone, base["tokens"])]
    hf = bench.ok("hf_dynamic")
    if base is not None and hf is not None:
        c["engine_base_equals_hf_dynamic_batch"] = f"{sum(a == b for a, b in zip(base['tokens'], hf['tokens']))}" \
                                                    f"/{args.requests}"
    mix, merged, peft = bench.ok("engine_mixed"), bench.ok("engine_merged"), bench.ok("peft_mixed")
    if mix is not None and merged is not None:
        rows = [i for i, a in enumerate(mixed) if a == "a0"]
        c["merged_equals_mixed_adapter0_requests"] = f"{sum(merged['tokens'][i] == mix['tokens'][i] for i in rows)}" \
                                                     f"/{len(rows)}"
    if mix is not None and peft is not None:
        c["peft_mixed_equals_engine_mixed_requests"] = f"{sum(a == b for a, b in zip(mix['tokens'], peft['tokens']))}" \
                                                       f"/{args.requests}"
    if mix is not None and base is not None:  # adapters that change nothing would make the mixed rows meaningless
        c["mixed_differs_from_base_requests"] = f"{sum(a != b for a, b in zip(mix['tokens'], base['tokens']))}" \
                                                f"/{args.requests}"
    if any(bench.ok(r) for r in ("engine_base", "engine_mixed", "engine_merged")):
        c.update(logprob_check(model, prompts, args))
    print("checks: " + json.dumps(c), file=sys.stderr)


def logprob_check(model, prompts, args, new: int = 4) -> dict:
    """The numbers behind the tokens: the engine's log-probability of each token it chose (the
    check requests in one batch, base model) against transformers' log-softmax for the same prefix
    run alone. On a GPU in bf16 greedy tokens can flip on near-ties while these stay close."""
    from lorakit.serving import Engine

    batch = [list(p) for p in prompts[:args.check_requests]]
    engine = Engine(model, None, max_batch=len(batch), max_seq_len=args.prompt_len + new)
    try:
        requests = [engine.submit(p, None, max_new_tokens=new, ignore_eos=True, logprobs=0) for p in batch]
        for _ in engine.run_until_done():
            pass
    finally:
        engine.close()
    worst = 0.0
    with torch.inference_mode():
        for request in requests:
            for n, lp in enumerate(request.logprobs):
                ids = torch.tensor([request.prompt + request.tokens[:n]], device=args.device)
                want = model(input_ids=ids).logits[0, -1].float().log_softmax(-1)[lp.token].item()
                worst = max(worst, abs(want - lp.logprob))
    return {"logprob_max_abs_diff_vs_transformers": worst, "logprob_checked_tokens": sum(len(r.logprobs) for r in requests)}


def print_table(bench: Run) -> None:
    a = bench.args
    dtype = str(a.dtype).replace("torch.", "")
    print(f"\ngeneration, {a.device}, {a.shape} shape, {dtype} weights, {a.requests} requests "
          f"× {a.prompt_len} prompt tokens × {a.new_tokens} new tokens (greedy, ignore_eos), {a.adapters} adapters "
          f"r={LORA_R} all-linear")
    head = (f"{'row':<55} {'tok/s':>10} {'total s':>8} {'prefill s':>9} {'×eng base':>9} {'×hf dyn':>8} "
            f"{'prefill×eng':>11} {'prefill×hf':>10}")
    print(head + "\n" + "-" * len(head))
    for r in bench.rows:
        label = r["label"] + (" (compiled)" if r.get("compiled") else "")
        if r["status"] != "ok":
            print(f"{label:<55} {r['status']}: {r['error'].strip().splitlines()[-1][:70]}")
            continue
        f = lambda key: f"{r[key]:.3f}" if key in r else "-"  # noqa: E731
        print(f"{label:<55} {r['tokens_per_s']:>10,.1f} {r['total_s']:>8.3f} {r['prefill_s']:>9.4f} "
              f"{f('speed_vs_engine_base'):>9} {f('speed_vs_hf_dynamic'):>8} {f('prefill_vs_engine_base'):>11} "
              f"{f('prefill_vs_hf_dynamic'):>10}")
    m = bench.memory
    if m:
        print(f"bank: {m['bank_bytes'] / 2**20:,.1f} MiB ({m['bank_modules']} modules × {a.adapters} slots × r "
              f"{LORA_R}); KV cache: {m['kv_cache_bytes'] / 2**20:,.1f} MiB; base weights: "
              f"{m['base_weight_bytes'] / 2**20:,.1f} MiB")
    if any(r.get("compile_error") for r in bench.rows):
        print("static cache: torch.compile failed, the row ran uncompiled (compile_error in the JSON)")
    print("tok/s: requests × new tokens / wall time, prefill included; prefill: the whole batch to its first token; "
          "×: ratios within this run")
    print("checks: " + ", ".join(f"{k}={v}" for k, v in bench.checks.items()))
    if bench.poisson:
        p, ms = bench.poisson, lambda d, k: f"{d[k] * 1e3:.1f}" if k in d else "-"  # noqa: E731
        print(f"poisson: {p['requests']} requests at {p['rate_per_s']:g}/s over {p['bank_adapters']} adapters "
              f"({p['slots']} slots): {p['tokens_per_s']:,.0f} tok/s; TTFT p50/p99 {ms(p['ttft_s'], 'p50')}/"
              f"{ms(p['ttft_s'], 'p99')} ms; inter-token p50/p99 {ms(p['inter_token_s'], 'p50')}/"
              f"{ms(p['inter_token_s'], 'p99')} ms; swap from CPU p50 {ms(p['swap_s'], 'p50')} ms")


def comma_list(choices):
    def parse(text: str) -> list[str]:
        names = [x for x in text.split(",") if x]
        wrong = [x for x in names if x not in choices]
        if wrong or not names:
            raise argparse.ArgumentTypeError(f"{','.join(wrong) or text!r}: choose from {', '.join(choices)}")
        return names
    return parse


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--shape", default="tinyllama", choices=list(SHAPES))
    p.add_argument("--requests", type=int, default=64, help="requests, all submitted at once (the batch)")
    p.add_argument("--prompt-len", type=int, default=256, help="prompt tokens per request (random ids)")
    p.add_argument("--new-tokens", type=int, default=128, help="new tokens per request (exactly, ignore_eos)")
    p.add_argument("--adapters", type=int, default=8, help="K adapters, r=16 all-linear")
    p.add_argument("--rows", type=comma_list(ROWS), default=list(ROWS), help="comma-separated rows to run")
    p.add_argument("--compile-static", action="store_true", help="torch.compile the static-cache row's decode "
                   "forward (transformers' own compile); a failure is recorded and the row runs uncompiled")
    p.add_argument("--check-requests", type=int, default=4, help="requests whose engine base tokens are "
                   "compared with transformers' greedy decoding of the prompt alone")
    p.add_argument("--time-budget", type=float, help="seconds for the whole run: a row that would not fit "
                   f"(guessed as the longest row so far, PEFT's as {PEFT_SLOWER:g}× that) is skipped")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: 1 on CPU: on a small, busy machine "
                   "more threads than free cores make every step wait on the slowest; torch's default on CUDA)")
    p.add_argument("--repeats", type=int, help="timed runs per row, medians reported (default: 3 on CPU, 1 on CUDA)")
    p.add_argument("--sweep-adapters", type=lambda t: [int(x) for x in t.split(",") if x], default=[],
                   help="also time the engine with k distinct adapters mixed, for each k of this comma list "
                        "(the issue's plot: 1,2,4,8,16,32); the plot goes beside --out as .adapters.png "
                        "(default: no sweep)")
    p.add_argument("--poisson", type=float, metavar="RATE", help="also run the Poisson workload: requests "
                   "arriving at RATE per second, each for one of --bank-adapters adapters (default: not run)")
    p.add_argument("--bank-adapters", type=int, default=64, help="distinct adapters of the Poisson workload, "
                   "--adapters of them in bank slots at a time (default: %(default)s)")
    p.add_argument("--out", help="output JSON (default: benchmarks/results/serving_<device>.json)")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no GPU")
    if args.adapters < 1 or args.requests < 1 or args.prompt_len < 1 or args.new_tokens < 2:
        p.error("--adapters, --requests and --prompt-len must be positive, --new-tokens at least 2")
    args.threads = args.threads or (1 if args.device == "cpu" else None)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.repeats = args.repeats or (3 if args.device == "cpu" else 1)
    args.dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    run(args)


if __name__ == "__main__":
    main()
