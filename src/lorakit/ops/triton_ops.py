"""Triton kernels for LoRA's backward, each beside the torch reference it must match.

`product_grad` (here): dA = gᵀ·(a⊙b) straight from the two factors of an elementwise product.
`lora_b_grads` (`b_grads.py`): g_low = s·g·B and dB = s·gᵀ·low from one read of a layer's output
gradient g. This module also holds what both share: whether Triton is there, and the grid helpers.

LoRA's dA = g_lowᵀ·x needs the layer's input x. When x is SwiGLU's product act(gate)·up, the
multiply keeps both factors for its own backward, so x need not be kept as well (`rebuild.py`).
`product_grad` computes g_lowᵀ·(a⊙b) from the factors: on CUDA one kernel reads a and b once each
and forms the product tile by tile in registers, never in memory; elsewhere, and without Triton, it
is `product_grad_reference`, two torch ops.

Both give the same numbers up to summation order: a⊙b is rounded to the factors' dtype exactly as
torch's `a * b` rounds it (bf16: product in float32, rounded to bf16), and the matmul accumulates in
float32. Shapes: g (T, R), a and b (T, K), or any leading shapes that flatten to T rows; the result
is (R, K) in float32. T is the token count (thousands), K the layer's input width (2048..14336), R
the summed LoRA ranks (1..128).

The kernel's grid is (K blocks, T splits). Each program accumulates one split's (R, BLOCK_K) part
in float32 and writes it to its own slice of a (splits, R, K) buffer; torch sums the slices, so the
result is deterministic (no atomics). There are enough splits for about two programs per
multiprocessor, and each split is at least `MIN_SPLIT_ROWS` rows long.

On an H200 (bf16, T = 8192, GPU time under CUDA-graph replay, one run) the kernel took 1.1-1.6× the
time of reading a and b once at 4.3 TB/s, and the reference 5-7× the kernel's time: (R, K) =
(16, 5632) 49 µs against 309, (64, 14336) 129 against 847, (128, 4096) 49 against 320.
"""

from __future__ import annotations

import functools
import math

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

# Every BLOCK_T in _CONFIGS divides ROW_QUANTUM, so a split's rows never start mid-chunk.
ROW_QUANTUM = 128
MIN_SPLIT_ROWS = 4 * ROW_QUANTUM
MAX_RANK = 128  # BLOCK_R = 128 with BLOCK_K = 256 is already 128 float32 accumulators a thread
PROGRAMS_PER_SM = 2  # 4 and 8 measured no faster on an H200
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _as_rows(g: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    """g, a, b as 2-D (T, R), (T, K), (T, K) views (copies only where reshape must)."""
    if g.dim() < 2 or a.dim() < 2:
        raise ValueError(f"product_grad needs g (..., R) and a, b (..., K) with at least 2 dims; "
                         f"got g {tuple(g.shape)}, a {tuple(a.shape)}")
    if a.shape != b.shape:
        raise ValueError(f"product_grad needs the two factors in one shape; got a {tuple(a.shape)} "
                         f"and b {tuple(b.shape)}")
    rows = math.prod(a.shape[:-1])
    if math.prod(g.shape[:-1]) != rows:
        raise ValueError(f"product_grad needs one row of g per row of a: g {tuple(g.shape)} has "
                         f"{math.prod(g.shape[:-1])} rows, a {tuple(a.shape)} has {rows}")
    return g.reshape(rows, g.shape[-1]), a.reshape(rows, a.shape[-1]), b.reshape(rows, b.shape[-1])


def product_grad_reference(g: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """gᵀ·(a⊙b) in plain torch: (R, K) float32, a⊙b formed (and rounded) in the factors' dtype."""
    g, a, b = _as_rows(g, a, b)
    # (R, T) @ (T, K) -> (R, K)
    return torch.mm(g.t().float(), (a * b).float())


def product_grad(g: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """gᵀ·(a⊙b), (R, K) float32; the Triton kernel on CUDA, `product_grad_reference` elsewhere.

    The kernel takes g, a and b of one dtype (bf16, fp16 or fp32) and R <= MAX_RANK; other
    combinations, and empty inputs, go to the reference.
    """
    g2, a2, b2 = _as_rows(g, a, b)
    if (HAVE_TRITON and g2.is_cuda and g2.dtype == a2.dtype == b2.dtype and a2.dtype in _DTYPES
            and g2.shape[1] <= MAX_RANK and g2.numel() > 0 and a2.numel() > 0):
        return _product_grad_triton(g2, a2, b2)
    return product_grad_reference(g2, a2, b2)


def _cdiv(n: int, d: int) -> int:
    return -(-n // d)


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def rows_per_split(rows: int, width: int, device: torch.device) -> int:
    """T rows per split: about PROGRAMS_PER_SM programs per multiprocessor, MIN_SPLIT_ROWS or more each."""
    sms = _multiprocessors(device)
    k_blocks = _cdiv(width, 128)  # at the middle BLOCK_K; the tuner may pick 64 or 256
    splits = max(1, min(_cdiv(PROGRAMS_PER_SM * sms, k_blocks), rows // MIN_SPLIT_ROWS))
    return _cdiv(_cdiv(rows, splits), ROW_QUANTUM) * ROW_QUANTUM


def _product_grad_triton(g: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *,
                         split: int | None = None, config: dict | None = None) -> torch.Tensor:
    """Launch the kernel on 2-D g (T, R), a and b (T, K) of one dtype, on any device Triton runs on.

    `split` (rows per T split) and `config` (BLOCK_K, BLOCK_T, num_warps, num_stages) override the
    defaults; with a config the autotuner is skipped, which Triton's interpreter (TRITON_INTERPRET=1,
    CPU tensors) needs.
    """
    if not HAVE_TRITON:
        raise RuntimeError("_product_grad_triton needs Triton; product_grad falls back to torch without it")
    if not (g.dtype == a.dtype == b.dtype and a.dtype in _DTYPES):
        raise ValueError(f"the product_grad kernel takes g, a, b of one dtype among {_DTYPES}; "
                         f"got {g.dtype}, {a.dtype}, {b.dtype}")
    g, a, b = (t if t.stride(-1) == 1 else t.contiguous() for t in (g, a, b))
    (T, R), K = g.shape, a.shape[1]
    split = split or rows_per_split(T, K, a.device)
    splits = _cdiv(T, split)
    partial = torch.empty(splits, R, K, dtype=torch.float32, device=a.device)
    block_r = max(16, triton.next_power_of_2(R))  # tl.dot needs 16 or more rows
    precision = "ieee" if a.dtype == torch.float32 else "tf32"  # fp32 stays fp32; ignored for 16-bit
    args = (g, a, b, partial, T, R, K, g.stride(0), a.stride(0), b.stride(0), split)

    def grid(meta):
        return (triton.cdiv(K, meta["BLOCK_K"]), splits)

    if config is None:
        _product_grad_tuned[grid](*args, BLOCK_R=block_r, PRECISION=precision)
    else:
        _product_grad_kernel[grid(config)](*args, BLOCK_R=block_r, PRECISION=precision, **config)
    return partial[0] if splits == 1 else partial.sum(0)


if HAVE_TRITON:

    @triton.jit
    def _product_grad_kernel(g_ptr, a_ptr, b_ptr, out_ptr, T, R, K, stride_g, stride_a, stride_b,
                             split_rows, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
                             BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
        """out[split] = g[rows]ᵀ·(a[rows]⊙b[rows]) for one BLOCK_K column block of one T split."""
        cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
        split = tl.program_id(1)
        ranks = tl.arange(0, BLOCK_R)
        first = split * split_rows
        end = tl.minimum(first + split_rows, T)
        col_ok = cols < K
        rank_ok = ranks < R
        acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
        for start in range(first, end, BLOCK_T):
            rows = start + tl.arange(0, BLOCK_T)
            row_ok = rows < end
            rows64 = rows.to(tl.int64)  # T·stride can pass 2³¹ elements
            g = tl.load(g_ptr + rows64[:, None] * stride_g + ranks[None, :],
                        mask=row_ok[:, None] & rank_ok[None, :], other=0.0)           # (BLOCK_T, BLOCK_R)
            tile = row_ok[:, None] & col_ok[None, :]
            a = tl.load(a_ptr + rows64[:, None] * stride_a + cols[None, :], mask=tile, other=0.0)
            b = tl.load(b_ptr + rows64[:, None] * stride_b + cols[None, :], mask=tile, other=0.0)
            # torch's bf16/fp16 a * b: multiply in float32, round once to the factors' dtype
            x = (a.to(tl.float32) * b.to(tl.float32)).to(a.dtype)                     # (BLOCK_T, BLOCK_K)
            # (BLOCK_R, BLOCK_T) @ (BLOCK_T, BLOCK_K) -> (BLOCK_R, BLOCK_K). The transposed form,
            # xᵀ·g with the product as wgmma's register operand, measured up to 1.5× slower on an H200
            acc = tl.dot(tl.trans(g), x, acc, input_precision=PRECISION)
        out = out_ptr + split * R * K + ranks[:, None] * K + cols[None, :]
        tl.store(out, acc, mask=rank_ok[:, None] & col_ok[None, :])

    # (BLOCK_K, BLOCK_T, num_warps, num_stages). Shared memory per stage is BLOCK_T·BLOCK_K·2 tiles
    # of a and b; configs that do not fit (fp32 at the big end) are skipped by the tuner.
    _CONFIGS = [(128, 64, 4, 3), (128, 64, 8, 4), (64, 128, 4, 4), (256, 32, 8, 3), (256, 64, 8, 3),
                (128, 128, 8, 3)]
    _product_grad_tuned = triton.autotune(
        configs=[triton.Config({"BLOCK_K": k, "BLOCK_T": t}, num_warps=w, num_stages=s)
                 for k, t, w, s in _CONFIGS],
        key=["R", "K"],  # the tuner adds the tensors' dtypes to the key
    )(_product_grad_kernel)
