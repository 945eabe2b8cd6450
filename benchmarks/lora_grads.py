"""One LoRA layer's g_low = s·g·B and dB = s·gᵀ·low: two cuBLAS calls against `lora_b_grads`, on CUDA.

- ``cublas``: what `ops/fused.py` runs: ``g_low_i.addmm_(g, B, beta=0, alpha=s)`` into a column
  slice of the (T, Σr) buffer, then ``_mm_as(g.t(), low_i, s, float32)`` (``aten.addmm.dtype``,
  float32 written by the matmul). Each reads all of g.
- ``kernel``: `lora_b_grads(g, low_i, B, s, out=g_low_i)`, one read of g, then a small kernel that sums
  the float32 parts.

Three times per case, medians: ``call`` from CUDA events around one call on an idle GPU (what a
host-bound caller sees); ``gpu`` from events around 50 calls queued behind a sleeping kernel, so the
host's launch work is hidden; ``host`` the wall time the host takes to queue one call. Also the
host time per call on tiny tensors, where launches are all there is. Prints a table and writes
``benchmarks/results/lora_grads_cuda.json``. With ``--sweep`` it also times kernel configurations
per case (what `_b_grads_plan` picks from), compiling them first in ``--jobs`` processes.

    python benchmarks/lora_grads.py [--sweep] [--jobs 8]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from lorakit.ops.fused import _ADDMM_DTYPE, _mm_as
from lorakit.ops.b_grads import (B_GRADS_ACC, B_GRADS_MIN_SPLIT_ROWS, B_GRADS_SMEM, _b_grads_plan,
                                 _lora_b_grads_triton, lora_b_grads, lora_b_grads_pays)
from lorakit.ops.triton_ops import HAVE_TRITON, _cdiv, _multiprocessors

RESULTS = Path(__file__).parent / "results"
CASES = [  # (T, d_out, r): TinyLlama-1.1B, batch 8 × 1024 tokens
    (8192, 2048, 16),   # q_proj, o_proj, down_proj
    (8192, 256, 16),    # k_proj, v_proj
    (8192, 5632, 16),   # gate_proj, up_proj
    (8192, 5632, 8),
    (8192, 5632, 32),
    (8192, 5632, 64),
]
GROUP = 3      # low and g_low are column slices of (T, GROUP·r) buffers, as for q, k, v in fused.py
QUEUED = 50    # calls per `gpu` measurement
SLEEP = 20_000_000  # GPU cycles the queue waits behind (~10 ms), longer than the host takes to queue
# Sweep: (BLOCK_T, num_warps, num_stages) for each BLOCK_N that fits at the case's rank, × programs a
# multiprocessor (the T split follows, as in `_b_grads_plan`)
SWEEP_SHAPES = [(64, 8, 3), (32, 4, 3)]
SWEEP_PROGRAMS = [1, 2]


def layer(T: int, N: int, r: int, seed: int):
    """g (T, N) bf16, low and g_low as column slices of (T, GROUP·r) buffers, B (N, r) bf16, s."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    g = torch.randn(T, N, device="cuda", generator=gen).bfloat16()
    low = torch.randn(T, GROUP * r, device="cuda", generator=gen).bfloat16()[:, r:2 * r]
    B = (torch.randn(N, r, device="cuda", generator=gen) / N ** 0.5).bfloat16()
    g_low = torch.empty(T, GROUP * r, device="cuda", dtype=torch.bfloat16)[:, r:2 * r]
    return g, low, B, g_low, 2.0


def cublas(g, low, B, g_low, s):
    g_low.addmm_(g, B, beta=0, alpha=s)                   # (T, N) @ (N, r) -> (T, r)
    return g_low, _mm_as(g.t(), low, s, torch.float32)    # (N, T) @ (T, r) -> (N, r)


def kernel(g, low, B, g_low, s):
    return lora_b_grads(g, low, B, s, out=g_low)


def per_call(fn, reps: int = 30) -> float:
    """Median seconds between events around one call, the GPU idle before it."""
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def queued(fn, rounds: int = 5, calls: int = QUEUED) -> tuple[float, float]:
    """(GPU seconds, host seconds) per call, medians over rounds of ``calls`` calls queued behind a sleep."""
    gpu, host = [], []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        torch.cuda._sleep(SLEEP)
        start.record()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        host.append((time.perf_counter() - t0) / calls)
        end.record()
        end.synchronize()
        gpu.append(start.elapsed_time(end) / 1e3 / calls)
    if max(host) * calls > 0.008:
        print(f"  (warning: queueing took {max(host) * calls * 1e3:.1f} ms, about as long as the sleep)")
    return statistics.median(gpu), statistics.median(host)


def host_per_call(fn, reps: int = 2000) -> float:
    """Wall seconds per call in a loop on tiny tensors: the GPU keeps up, so this is the host's cost."""
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def sweep_configs(T: int, N: int, r: int):
    """(config, split rows) pairs to time for one case."""
    block_r = max(16, 1 << (r - 1).bit_length())
    sms = _multiprocessors(torch.device("cuda"))
    for block_n in (64, 128, 256, 512):
        smem = 2 * (3 * 64 * (block_n + block_r) + block_n * block_r)
        if block_n * block_r > B_GRADS_ACC or smem > B_GRADS_SMEM or (block_n > 64 and block_n >= 2 * N):
            continue
        for (block_t, warps, stages), per_sm in itertools.product(SWEEP_SHAPES, SWEEP_PROGRAMS):
            n_blocks = _cdiv(N, block_n)
            splits = max(1, min(per_sm * sms // n_blocks, T // B_GRADS_MIN_SPLIT_ROWS))
            split = _cdiv(_cdiv(T, splits), block_t) * block_t
            yield dict(BLOCK_N=block_n, BLOCK_T=block_t, num_warps=warps, num_stages=stages), split, per_sm


def _compile(job) -> str:
    """Run one configuration once (in a worker process), so that Triton's disk cache holds it."""
    (T, N, r), config, split = job
    try:
        _lora_b_grads_triton(*_sweep_args(T, N, r), split=split, config=config)
        torch.cuda.synchronize()
        return ""
    except Exception as err:  # noqa: BLE001 - too much shared memory, say: reported, then skipped
        return f"{config}: {type(err).__name__}: {str(err)[:120]}"


def _sweep_args(T, N, r):
    g, low, B, g_low, s = layer(T, N, r, seed=0)
    return g, low, B, s, g_low


def sweep(jobs: int) -> list[dict]:
    todo = [(case, config, split) for case in CASES for config, split, _ in sweep_configs(*case)]
    unique = list({(c, tuple(sorted(cfg.items()))): (c, cfg, s) for c, cfg, s in todo}.values())
    t0 = time.time()
    with ProcessPoolExecutor(jobs, mp_context=torch.multiprocessing.get_context("spawn")) as pool:
        failures = [msg for msg in pool.map(_compile, unique) if msg]
    print(f"sweep: compiled {len(unique)} configurations in {time.time() - t0:.0f} s; {len(failures)} failed")
    for msg in failures[:10]:
        print("  ", msg)
    rows = []
    for T, N, r in CASES:
        args = _sweep_args(T, N, r)
        plan_config, plan_split = _b_grads_plan(T, N, r, torch.bfloat16, torch.device("cuda"))
        timed = []
        for config, split, per_sm in sweep_configs(T, N, r):
            def run():
                return _lora_b_grads_triton(*args, split=split, config=config)
            try:
                run()  # loads the binary the workers compiled
            except Exception:  # noqa: BLE001 - failed to compile above
                continue
            gpu, _ = queued(run, 3, 20)
            timed.append({"T": T, "N": N, "r": r, "config": config, "split_rows": split,
                          "programs_per_sm": per_sm, "gpu_s": gpu})
        timed.sort(key=lambda row: row["gpu_s"])
        plan = next((row for row in timed if row["config"] == plan_config and row["split_rows"] == plan_split), None)
        print(f"sweep T={T} N={N} r={r}: plan {plan_config} split {plan_split}: "
              f"{plan['gpu_s'] * 1e6:.1f} µs" if plan else f"sweep T={T} N={N} r={r}: plan not in sweep")
        for row in timed[:6]:
            print(f"   {row['gpu_s'] * 1e6:7.1f} µs  {row['config']} split {row['split_rows']} "
                  f"({row['programs_per_sm']}/SM)")
        rows += timed
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time kernel configurations per case")
    parser.add_argument("--jobs", type=int, default=8, help="processes compiling the sweep's configurations")
    opts = parser.parse_args()
    if not (torch.cuda.is_available() and HAVE_TRITON):
        raise SystemExit("needs CUDA and Triton")
    report = {"benchmark": "lora_grads", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": __import__("triton").__version__, "dtype": "bfloat16", "addmm_dtype": _ADDMM_DTYPE,
              "queued_calls": QUEUED}
    if opts.sweep:
        report["sweep"] = sweep(opts.jobs)
    rows = []
    print(f"{'T':>5} {'N':>5} {'r':>3} | {'cublas call':>11} {'gpu':>7} {'host':>6} | {'kernel call':>11} "
          f"{'gpu':>7} {'host':>6} | {'gpu ratio':>9} {'call ratio':>10} | {'g TB/s':>6} {'pays':>5} | "
          f"{'err g_low':>9} {'err dB':>8}  (times in µs)")
    for T, N, r in CASES:
        args = layer(T, N, r, seed=T + N + r)
        g, low, B, _, s = args
        ref_low, ref_dB = s * g.double() @ B.double(), s * g.double().t() @ low.double()
        errors = {}
        for name, fn in (("cublas", cublas), ("kernel", kernel)):
            got_low, got_dB = fn(*args)
            errors[name] = (rel(got_low, ref_low), rel(got_dB, ref_dB))
        del ref_low, ref_dB
        row = {"T": T, "N": N, "r": r, "plan": list(_b_grads_plan(T, N, r, torch.bfloat16, g.device)),
               "pays": lora_b_grads_pays(g, low)}
        for name, fn in (("cublas", cublas), ("kernel", kernel)):
            for _ in range(5):
                fn(*args)
            row[f"{name}_call_s"] = per_call(lambda: fn(*args))
            row[f"{name}_gpu_s"], row[f"{name}_host_s"] = queued(lambda: fn(*args))
            row[f"{name}_rel_err_g_low"], row[f"{name}_rel_err_dB"] = errors[name]
        rows.append(row)
        print(f"{T:>5} {N:>5} {r:>3} | {row['cublas_call_s'] * 1e6:>11.1f} {row['cublas_gpu_s'] * 1e6:>7.1f} "
              f"{row['cublas_host_s'] * 1e6:>6.1f} | {row['kernel_call_s'] * 1e6:>11.1f} "
              f"{row['kernel_gpu_s'] * 1e6:>7.1f} {row['kernel_host_s'] * 1e6:>6.1f} | "
              f"{row['kernel_gpu_s'] / row['cublas_gpu_s']:>8.2f}× {row['kernel_call_s'] / row['cublas_call_s']:>9.2f}× | "
              f"{g.numel() * 2 / row['kernel_gpu_s'] / 1e12:>6.2f} {str(row['pays']):>5} | "
              f"{errors['kernel'][0]:>9.1e} {errors['kernel'][1]:>8.1e}")
    report["rows"] = rows
    # host cost alone: tiny tensors, where the GPU keeps up with any launch rate
    tiny = {}
    for T, N, r in [(64, 64, 16), (1024, 512, 16)]:
        args = layer(T, N, r, seed=1)
        tiny[f"{T}x{N}x{r}"] = {name: host_per_call(lambda: fn(*args)) for name, fn in (("cublas", cublas), ("kernel", kernel))}
        print(f"host per call, T={T} N={N} r={r}: cublas {tiny[f'{T}x{N}x{r}']['cublas'] * 1e6:.1f} µs, "
              f"kernel {tiny[f'{T}x{N}x{r}']['kernel'] * 1e6:.1f} µs")
    report["host_per_call_tiny_s"] = tiny
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "lora_grads_cuda.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
