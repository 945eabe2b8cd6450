"""NF4 dequantization: bitsandbytes' ``dequantize_4bit`` against lorakit's one-launch Triton kernel
(`lorakit.ops.nf4`), on the shapes of Llama-3-8B's linear layers, double quantization on and off.

    python benchmarks/nf4_dequant.py --device cuda

Each row: the median of ``--repeats`` timed calls (CUDA events, after warm-up) for each side, in
the same process, interleaved; the bytes each call moves (packed weight and scales read, the bf16
weight written) over its time; and whether the two weights are equal to the bit. Prints a table
and writes ``benchmarks/results/nf4_dequant_<device>.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
RESULTS = Path(__file__).parent / "results"
SHAPES = {"q_proj/o_proj": (4096, 4096), "k_proj/v_proj": (1024, 4096), "gate_proj/up_proj": (14336, 4096),
          "down_proj": (4096, 14336)}


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda"])
    p.add_argument("--repeats", type=int, default=50, help="timed calls per side and row (default %(default)s)")
    p.add_argument("--out", help="output JSON (default benchmarks/results/nf4_dequant_<device>.json)")
    args = p.parse_args()
    logging.getLogger("bitsandbytes").setLevel(logging.CRITICAL)
    import bitsandbytes.functional as F

    from lorakit.ops.nf4 import dequantize_nf4

    rows = []
    for nested in (True, False):
        for name, shape in SHAPES.items():
            torch.manual_seed(0)
            w = (torch.randn(shape, device=args.device) * 0.02).to(torch.bfloat16)
            q, state = F.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4")
            del w
            ours, theirs = dequantize_nf4(q, state), F.dequantize_4bit(q, state)
            equal = torch.equal(ours, theirs)
            del ours, theirs
            for _ in range(5):
                dequantize_nf4(q, state), F.dequantize_4bit(q, state)
            t_bnb = timed(lambda: F.dequantize_4bit(q, state), args.repeats)
            t_ours = timed(lambda: dequantize_nf4(q, state), args.repeats)
            n = shape[0] * shape[1]
            scale_bytes = n // 64 * (1 if nested else 4)
            moved = n // 2 + scale_bytes + 2 * n
            rows.append({"layer": name, "shape": list(shape), "double_quant": nested, "bitsandbytes_us": t_bnb * 1e6,
                         "lorakit_us": t_ours * 1e6, "speedup": t_bnb / t_ours, "bytes": moved,
                         "lorakit_gb_per_s": moved / t_ours / 1e9, "bitsandbytes_gb_per_s": moved / t_bnb / 1e9,
                         "bit_equal": equal})
    head = f"{'layer':18} {'shape':>12} {'dq':>3} {'bnb µs':>8} {'lorakit µs':>10} {'speed-up':>8} {'GB/s':>7} {'equal':>5}"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['layer']:18} {'x'.join(map(str, r['shape'])):>12} {'y' if r['double_quant'] else 'n':>3} "
              f"{r['bitsandbytes_us']:8.1f} {r['lorakit_us']:10.1f} {r['speedup']:8.2f} {r['lorakit_gb_per_s']:7.0f} "
              f"{str(r['bit_equal']):>5}")
    out = Path(args.out or RESULTS / f"nf4_dequant_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "nf4_dequant",
                               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                               "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows},
                              indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
