"""Where the serving engine's decode step spends its time, on a GPU: torch.profiler over 10 decode steps of
64 requests × 256 prompt ids (TinyLlama shape, bf16, random weights), all on the base model, then with 8
adapters mixed. Prints the prefill time, the median step, the GPU-busy time per step and the top ops.

    python benchmarks/profile_engine.py
"""
import sys, time, tempfile, argparse
from pathlib import Path
import torch
sys.path.insert(0, "benchmarks"); sys.path.insert(0, "src")
from serving import build_model, save_adapters
from train_speed import SHAPES
from lorakit.serving import Engine

args = argparse.Namespace(device="cuda", dtype=torch.bfloat16, prompt_len=256, new_tokens=64)
model = build_model(SHAPES["tinyllama"], args)
tmp = tempfile.mkdtemp()
paths = save_adapters(model, 8, Path(tmp))
engine = Engine(model, None, max_batch=64, max_adapters=8, max_rank=16)
for i, p in enumerate(paths):
    engine.add_adapter(f"a{i}", p)
g = torch.Generator().manual_seed(0)
prompts = [torch.randint(0, 32000, (256,), generator=g).tolist() for _ in range(64)]
for label, adapters in (("base", [None] * 64), ("mixed", [f"a{i % 8}" for i in range(64)])):
    engine.generate(prompts[:4], adapters[:4], max_new_tokens=4, ignore_eos=True)
    for p, a in zip(prompts, adapters):
        engine.submit(p, a, max_new_tokens=64, ignore_eos=True)
    torch.cuda.synchronize(); t = time.perf_counter(); engine.step(); torch.cuda.synchronize()
    prefill = time.perf_counter() - t
    steps = []
    for _ in range(10):
        t = time.perf_counter(); engine.step(); steps.append(time.perf_counter() - t)
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            engine.step()
        torch.cuda.synchronize()
    while engine.running or engine.waiting:
        engine.step()
    steps.sort()
    print(f"=== {label}: prefill {prefill*1e3:.1f} ms; decode step median {steps[5]*1e3:.2f} ms (64 rows)")
    ka = prof.key_averages()
    cuda_total = sum(e.self_device_time_total for e in ka) / 10 / 1e3
    print(f"GPU busy per step {cuda_total:.2f} ms")
    print(ka.table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=50))
    print(ka.table(sort_by="self_device_time_total", row_limit=8, max_name_column_width=50))
