"""dA of a layer whose input is SwiGLU's product: the Triton kernel against torch, on CUDA.

LoRA's dA = gᵀ·x for down_proj, whose input x = act(gate)·up. Three ways, same numbers:

- ``kept x``: x was kept from the forward (what costs memory); one cuBLAS matmul, float32 out.
- ``torch rebuild``: x rebuilt from the factors, then the matmul (`product_grad_reference`).
- ``triton``: `product_grad`, the product formed tile by tile in registers, never in memory.

Prints a table of medians (CUDA events, after warm-up and autotuning) and the relative error of each
against float64, and writes ``benchmarks/results/product_grad_cuda.json``.

    python benchmarks/product_grad.py
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lora_grads import per_call as timed  # events around one call, GPU idle before it (this folder)
from lorakit.ops.fused import _mm_as
from lorakit.ops.triton_ops import HAVE_TRITON, product_grad, product_grad_reference

RESULTS = Path(__file__).parent / "results"
SHAPES = [  # (T, R, K): tokens, summed rank, input width
    (8192, 16, 5632),   # TinyLlama-1.1B down_proj, r=16, batch 8 × 1024
    (8192, 8, 5632),
    (8192, 64, 5632),
    (8192, 16, 14336),  # Llama-3-8B's intermediate width
    (2048, 16, 5632),
]


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def main() -> None:
    if not (torch.cuda.is_available() and HAVE_TRITON):
        raise SystemExit("needs CUDA and Triton")
    rows = []
    print(f"{'T':>6} {'R':>4} {'K':>6} {'kept x ms':>10} {'torch rebuild ms':>17} {'triton ms':>10} "
          f"{'triton/kept':>11} {'triton/torch':>12} {'rel err triton':>14}")
    for T, R, K in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(T + R + K)
        grad = torch.randn(T, R, device="cuda", generator=g).bfloat16()
        a = torch.randn(T, K, device="cuda", generator=g).bfloat16()
        b = torch.randn(T, K, device="cuda", generator=g).bfloat16()
        x = a * b
        ref = grad.double().t() @ x.double()
        kept = timed(lambda: _mm_as(grad.t(), x, 1, torch.float32))
        rebuilt = timed(lambda: product_grad_reference(grad, a, b))
        fast = timed(lambda: product_grad(grad, a, b))
        row = {"T": T, "R": R, "K": K, "kept_x_s": kept, "torch_rebuild_s": rebuilt, "triton_s": fast,
               "rel_err_triton": rel(product_grad(grad, a, b), ref),
               "rel_err_kept": rel(_mm_as(grad.t(), x, 1, torch.float32), ref),
               "rel_err_torch_rebuild": rel(product_grad_reference(grad, a, b), ref)}
        rows.append(row)
        print(f"{T:>6} {R:>4} {K:>6} {kept * 1e3:>10.3f} {rebuilt * 1e3:>17.3f} {fast * 1e3:>10.3f} "
              f"{fast / kept:>10.2f}× {fast / rebuilt:>11.2f}× {row['rel_err_triton']:>14.1e}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "product_grad_cuda.json"
    out.write_text(json.dumps({"benchmark": "product_grad", "gpu": torch.cuda.get_device_name(),
                               "torch": torch.__version__, "dtype": "bfloat16", "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
