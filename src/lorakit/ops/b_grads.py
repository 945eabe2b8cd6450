"""g_low = s·g·B and dB = s·gᵀ·low from one read of g, as a Triton kernel beside its torch reference.

`lora_b_grads` serves one layer h = x·Wᵀ + s·low·Bᵀ, low = x·Aᵀ: from g = ∂L/∂h (T, N) it gives
g_low = s·g·B (T, r), in g's dtype, and dB = s·gᵀ·low (N, r), in float32. Two cuBLAS calls read g
twice, and g is the big operand (T = 8192, N = 5632 in bf16 is 92 MB, against 0.3 MB for low); the
kernel reads it once and feeds each tile to both products. They reduce in different directions,
g_low over N and dB over T, so neither is finished by one program: the grid is (N blocks, T splits)
and each program keeps its dB block (BLOCK_N, r) in registers across its rows, writing it once at
the end, and writes the g_low part of its column block (BLOCK_T, r) for each row block. A second,
small kernel sums the float32 parts in a fixed order (deterministic, no atomics) and rounds g_low
once to its dtype. The parts cost (N blocks·T + T splits·N)·r·4 bytes, written and read once each
(11% of g's bytes at N = 5632, r = 16); `_b_grads_plan` picks BLOCK_N and the split to make that
small, with one program a multiprocessor, in one wave.

On an H200 (bf16, T = 8192, GPU time of 50 calls queued behind a sleeping kernel, one run), against
the two cuBLAS calls of `fused.py`: (N, r) = (5632, 16) 38 µs against 54, (2048, 16) 15 against 23,
(256, 16) 8.4 against 11.8, (5632, 8) 45 against 56; (5632, 32) 52 against 52 and (5632, 64) 71
against 56, so `lora_b_grads_pays` says no above r = 16. At 38 µs the kernel reads g at 2.4 TB/s,
short of the 4 TB/s or so a copy reaches. The host's time is worse: about 100 µs a call against
55 for the cuBLAS calls on that machine's CPU, one Triton launch costing about what two torch
calls do there (on tiny tensors, a call that needs no parts, so one launch, took 57 µs against 56).
"""

from __future__ import annotations

import functools
import math

import torch

from .triton_ops import _DTYPES, HAVE_TRITON, _cdiv, _multiprocessors

if HAVE_TRITON:
    import triton
    import triton.language as tl

B_GRADS_MAX_RANK = 128
B_GRADS_PAYS_MIN_SIZE = 8192 * 256  # see lora_b_grads_pays: the smallest g measured, TinyLlama's k_proj
B_GRADS_PAYS_MAX_RANK = 16
B_GRADS_ACC = 16384  # float32 entries of a program's dB block, BLOCK_N·BLOCK_R: 64 registers a thread at 8 warps
B_GRADS_SMEM = 224 * 1024  # shared memory a program may use (an H100/H200 multiprocessor has 227 KiB)
B_GRADS_PROGRAMS_PER_SM = 1  # big programs write fewer parts; 2 a multiprocessor measured slower on an H200
B_GRADS_MIN_SPLIT_ROWS = 128  # a split writes N·r·4 bytes of dB parts for every split_rows·N·2 it reads


def _b_grads_rows(g: torch.Tensor, low: torch.Tensor, B: torch.Tensor, out: torch.Tensor | None):
    """g (T, N) and low (T, r) as 2-D views, after checking them against B (N, r) and out (T, r)."""
    if g.dim() < 2 or low.dim() < 2:
        raise ValueError(f"lora_b_grads needs g (..., d_out) and low (..., r) with at least 2 dims; "
                         f"got g {tuple(g.shape)}, low {tuple(low.shape)}")
    rows = math.prod(g.shape[:-1])
    if math.prod(low.shape[:-1]) != rows:
        raise ValueError(f"lora_b_grads needs one row of low per row of g: g {tuple(g.shape)} has {rows} "
                         f"rows, low {tuple(low.shape)} has {math.prod(low.shape[:-1])}")
    N, r = g.shape[-1], low.shape[-1]
    if tuple(B.shape) != (N, r):
        raise ValueError(f"lora_b_grads needs B of shape (d_out, r) = ({N}, {r}) for g {tuple(g.shape)} "
                         f"and low {tuple(low.shape)}; got B {tuple(B.shape)}")
    if out is not None and (tuple(out.shape) != (rows, r) or out.dtype != g.dtype):
        raise ValueError(f"lora_b_grads writes g_low into out of shape ({rows}, {r}) and dtype {g.dtype}; "
                         f"got out {tuple(out.shape)} {out.dtype}")
    return g.reshape(rows, N), low.reshape(rows, r)


def lora_b_grads_reference(g: torch.Tensor, low: torch.Tensor, B: torch.Tensor, scale: float,
                           out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(g_low, dB) = (s·g·B, s·gᵀ·low) in plain torch: g_low (T, r) in g's dtype, written into ``out``
    when given (any row stride), dB (N, r) float32. B is cast to g's dtype, as the kernel multiplies it."""
    g2, low2 = _b_grads_rows(g, low, B, out)
    gf = g2.float()
    # (T, N) @ (N, r) -> (T, r): accumulated in float32, rounded once to g's dtype
    g_low = (torch.mm(gf, B.to(g2.dtype).float()) * scale).to(g2.dtype)
    # (N, T) @ (T, r) -> (N, r)
    dB = torch.mm(gf.t(), low2.float()) * scale
    return (out.copy_(g_low) if out is not None else g_low), dB


def lora_b_grads(g: torch.Tensor, low: torch.Tensor, B: torch.Tensor, scale: float,
                 out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(g_low, dB) = (s·g·B, s·gᵀ·low) for one LoRA layer: the Triton kernel on CUDA, the reference elsewhere.

    g (..., N) is the layer's output gradient, low (..., r) = x·Aᵀ from the forward, B (N, r) in any
    float dtype. g_low comes back as (T, r) in g's dtype, T the flattened leading dims, written into
    ``out`` when given (e.g. a column slice of a (T, Σr) buffer); dB as (N, r) float32. The kernel
    takes g and low of one dtype (bf16, fp16 or fp32) and r <= B_GRADS_MAX_RANK; other combinations,
    and empty inputs, go to the reference.
    """
    g2, low2 = _b_grads_rows(g, low, B, out)
    if _b_grads_kernel_takes(g2, low2) and B.is_floating_point():
        return _lora_b_grads_triton(g2, low2, B.to(g2.dtype), scale, out)
    return lora_b_grads_reference(g2, low2, B, scale, out)


def _b_grads_kernel_takes(g: torch.Tensor, low: torch.Tensor) -> bool:
    return (HAVE_TRITON and g.is_cuda and g.dtype == low.dtype and g.dtype in _DTYPES
            and 0 < low.shape[-1] <= B_GRADS_MAX_RANK and g.numel() > 0)


def lora_b_grads_pays(g: torch.Tensor, low: torch.Tensor) -> bool:
    """Whether `lora_b_grads` runs its kernel on g and low and, going by benchmarks/lora_grads.py on an
    H200, takes less GPU time than the two cuBLAS calls it replaces: g of B_GRADS_PAYS_MIN_SIZE
    entries or more, r <= B_GRADS_PAYS_MAX_RANK. At r = 32 the two were even, at r = 64 the kernel
    was slower: its float32 parts, and its dots, grow with r. Host time is another matter: the
    kernel's two launches cost more than cuBLAS's two calls (see the module's docstring)."""
    return (_b_grads_kernel_takes(g, low) and g.numel() >= B_GRADS_PAYS_MIN_SIZE
            and low.shape[-1] <= B_GRADS_PAYS_MAX_RANK)


@functools.lru_cache(maxsize=256)
def _b_grads_plan(T: int, N: int, R: int, dtype: torch.dtype, device: torch.device,
                  programs_per_sm: int = B_GRADS_PROGRAMS_PER_SM) -> tuple[dict, int]:
    """(config, rows per T split): the BLOCK_N whose float32 parts are fewest among those that give
    nearly every multiprocessor a program; a narrower block unless a wider one saves over 5%.
    Cached: called once per layer shape."""
    block_r = max(16, 1 << (R - 1).bit_length())
    sms = _multiprocessors(device)
    candidates = []
    for block_n in (64, 128, 256, 512):
        # 3 stages of (64, BLOCK_N) g and (64, BLOCK_R) low tiles, and B's (BLOCK_N, BLOCK_R), in 16 bits
        smem = 2 * (3 * 64 * (block_n + block_r) + block_n * block_r)
        if block_n > 64 and (block_n * block_r > B_GRADS_ACC or smem > B_GRADS_SMEM or block_n >= 2 * N):
            continue
        n_blocks = _cdiv(N, block_n)  # one wave: a second one, however short, takes a program's time
        splits = max(1, min(programs_per_sm * sms // n_blocks, T // B_GRADS_MIN_SPLIT_ROWS))
        # rows of r float32 written as parts and read back: g_low's per column block, dB's per split
        parts = (n_blocks * T if n_blocks > 1 else 0) + (splits * N if splits > 1 else 0)
        candidates.append((n_blocks * splits >= 0.75 * sms, parts, block_n, splits))
    full = [c for c in candidates if c[0]] or [max(candidates, key=lambda c: c[3] * _cdiv(N, c[2]))]
    _, parts, block_n, splits = full[0]
    for _, more_parts, wider, wider_splits in full[1:]:
        if more_parts < 0.95 * parts:
            parts, block_n, splits = more_parts, wider, wider_splits
    if dtype == torch.float32:  # float32 tiles take twice the shared memory, and ieee dots registers
        config = dict(BLOCK_N=min(block_n, 128), BLOCK_T=16, num_warps=4, num_stages=2)
    else:  # measured best on an H200 (benchmarks/lora_grads.py --sweep): 64 rows, 8 warps, 3 stages
        config = dict(BLOCK_N=block_n, BLOCK_T=64, num_warps=8, num_stages=3)
    split_rows = _cdiv(_cdiv(T, splits), config["BLOCK_T"]) * config["BLOCK_T"]
    return config, split_rows


@functools.lru_cache(maxsize=256)
def _sum_plan(T: int, N: int, R: int, n_blocks: int, splits: int) -> tuple[tuple, dict]:
    """Grid and block sizes of `_sum_parts_kernel`: each program loads up to SUM_PARTS parts of its rows at
    once (a 3-D tile of about SUM_TILE entries), so that no chain of dependent loads sets its time."""
    block_r = max(16, 1 << (R - 1).bit_length())

    def sizes(parts: int) -> tuple[int, int]:
        block_p = min(SUM_PARTS, max(2, 1 << (parts - 1).bit_length()))
        return block_p, max(2, SUM_TILE // (block_p * block_r))

    glow_p, glow_rows = sizes(n_blocks)
    db_p, db_rows = sizes(splits)
    glow_programs = _cdiv(T, glow_rows) if n_blocks > 1 else 0
    db_programs = _cdiv(N, db_rows) if splits > 1 else 0
    return (glow_programs + db_programs,), dict(glow_programs=glow_programs, GLOW_ROWS=glow_rows, GLOW_P=glow_p,
                                               DB_ROWS=db_rows, DB_P=db_p, BLOCK_R=block_r)


def _lora_b_grads_triton(g: torch.Tensor, low: torch.Tensor, B: torch.Tensor, scale: float,
                         out: torch.Tensor | None = None, *, split: int | None = None,
                         config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernels on 2-D g (T, N), low (T, r) and B (N, r) of one dtype, on any device Triton runs on.

    `split` (rows per T split) and `config` (BLOCK_N, BLOCK_T, num_warps, num_stages) override
    `_b_grads_plan`, for tests in Triton's interpreter (TRITON_INTERPRET=1, CPU tensors) and sweeps.
    Host time matters (one call per adapted layer per step): at most three allocations and two launches.
    """
    if not HAVE_TRITON:
        raise RuntimeError("_lora_b_grads_triton needs Triton; lora_b_grads falls back to torch without it")
    if not (g.dtype == low.dtype == B.dtype and g.dtype in _DTYPES):
        raise ValueError(f"the lora_b_grads kernel takes g, low, B of one dtype among {_DTYPES}; "
                         f"got {g.dtype}, {low.dtype}, {B.dtype}")
    if g.stride(1) != 1:
        g = g.contiguous()
    if low.stride(1) != 1:
        low = low.contiguous()
    (T, N), R = g.shape, low.shape[1]
    if config is None or split is None:
        plan_config, plan_split = _b_grads_plan(T, N, R, g.dtype, g.device)
        config, split = config or plan_config, split or plan_split
    n_blocks, splits = _cdiv(N, config["BLOCK_N"]), _cdiv(T, split)
    if out is None:
        out = torch.empty(T, R, dtype=g.dtype, device=g.device)
    dB = torch.empty(N, R, dtype=torch.float32, device=g.device)  # on its own: it outlives the parts
    # The parts, in one float32 buffer of R-wide rows: dB's (N rows per T split), then g_low's
    # (T rows per column block), each only where there is more than one.
    glow_row0 = N * splits if splits > 1 else 0
    parts = glow_row0 + (n_blocks * T if n_blocks > 1 else 0)
    ws = torch.empty(parts, R, dtype=torch.float32, device=g.device) if parts else dB
    _lora_b_grads_kernel[(n_blocks, splits)](
        g, low, B, out, dB, ws, T, N, R, g.stride(0), low.stride(0), B.stride(0), B.stride(1), out.stride(0),
        out.stride(1), split, glow_row0, float(scale), BLOCK_R=max(16, triton.next_power_of_2(R)),
        PRECISION="ieee" if g.dtype == torch.float32 else "tf32",  # fp32 stays fp32; ignored for 16-bit
        GLOW_PARTS=n_blocks > 1, DB_PARTS=splits > 1, **config)
    if n_blocks > 1 or splits > 1:
        grid, sizes = _sum_plan(T, N, R, n_blocks, splits)
        _sum_parts_kernel[grid](ws, out, dB, T, N, R, n_blocks, splits, out.stride(0), out.stride(1), glow_row0,
                                **sizes)
    return out, dB


SUM_PARTS = 32    # parts a program of _sum_parts_kernel loads at once
SUM_TILE = 4096   # float32 entries it loads at once: 32 values and 32 addresses a thread at 4 warps

if HAVE_TRITON:

    @triton.jit
    def _lora_b_grads_kernel(g_ptr, low_ptr, b_ptr, out_ptr, db_ptr, ws_ptr, T, N, R, stride_g, stride_low,
                             stride_b, stride_b_col, stride_out, stride_out_col, split_rows, glow_row0, scale,
                             BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                             PRECISION: tl.constexpr, GLOW_PARTS: tl.constexpr, DB_PARTS: tl.constexpr):
        """One BLOCK_N column block of g, over the rows of one T split: that block's s·gᵀ·low, and the
        block's part of s·g·B for each BLOCK_T rows (g_low itself when one block spans all N)."""
        block = tl.program_id(0)
        split = tl.program_id(1)
        cols = block * BLOCK_N + tl.arange(0, BLOCK_N)
        ranks = tl.arange(0, BLOCK_R)
        col_ok = cols < N
        rank_ok = ranks < R
        b = tl.load(b_ptr + cols[:, None] * stride_b + ranks[None, :] * stride_b_col,
                    mask=col_ok[:, None] & rank_ok[None, :], other=0.0)              # (BLOCK_N, BLOCK_R)
        acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
        glow_ptr = ws_ptr + (glow_row0 + block.to(tl.int64) * T) * R  # this block's (T, R) parts
        first = split * split_rows
        end = tl.minimum(first + split_rows, T)
        # low's rows are loaded one block ahead, by hand: with r < 16, or r not a multiple of 16, its
        # masked loads cannot be vectorized, and Triton's pipelining (async copies) then skips them
        rows = first + tl.arange(0, BLOCK_T)
        low_next = tl.load(low_ptr + rows.to(tl.int64)[:, None] * stride_low + ranks[None, :],
                           mask=(rows < end)[:, None] & rank_ok[None, :], other=0.0)
        for start in range(first, end, BLOCK_T):
            rows = start + tl.arange(0, BLOCK_T)
            row_ok = rows < end
            rows64 = rows.to(tl.int64)  # T·stride can pass 2³¹ elements
            low = low_next                                                            # (BLOCK_T, BLOCK_R)
            ahead = rows64 + BLOCK_T
            low_next = tl.load(low_ptr + ahead[:, None] * stride_low + ranks[None, :],
                               mask=(ahead < end)[:, None] & rank_ok[None, :], other=0.0)
            g = tl.load(g_ptr + rows64[:, None] * stride_g + cols[None, :],
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0,
                        eviction_policy="evict_first")  # read once; the parts should stay in L2
            # (BLOCK_N, BLOCK_T) @ (BLOCK_T, BLOCK_R) -> (BLOCK_N, BLOCK_R): dB over these rows
            acc = tl.dot(tl.trans(g), low, acc, input_precision=PRECISION)
            # (BLOCK_T, BLOCK_N) @ (BLOCK_N, BLOCK_R) -> (BLOCK_T, BLOCK_R): g_low over these columns
            part = tl.dot(g, b, input_precision=PRECISION) * scale
            low_ok = row_ok[:, None] & rank_ok[None, :]
            if GLOW_PARTS:
                tl.store(glow_ptr + rows64[:, None] * R + ranks[None, :], part, mask=low_ok)
            else:  # rounded once, from float32, like the reference
                tl.store(out_ptr + rows64[:, None] * stride_out + ranks[None, :] * stride_out_col,
                         part.to(out_ptr.dtype.element_ty), mask=low_ok)
        if DB_PARTS:  # this split's (N, R) parts
            db_ptr = ws_ptr + split.to(tl.int64) * N * R
        tl.store(db_ptr + cols[:, None] * R + ranks[None, :], acc * scale,
                 mask=col_ok[:, None] & rank_ok[None, :])

    @triton.jit
    def _sum_parts(src_ptr, parts, rows_total, R, dst_ptr, stride_dst, stride_dst_col, block,
                   BLOCK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr):
        """dst[rows] = Σ_p src[p, rows] over the parts of BLOCK rows, BLOCK_P parts a load, in one fixed
        order; rounded once to dst's dtype."""
        rows = (block * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
        ranks = tl.arange(0, BLOCK_R)
        ok = (rows < rows_total)[:, None] & (ranks < R)[None, :]
        offsets = rows[:, None] * R + ranks[None, :]                                  # (BLOCK, BLOCK_R)
        acc = tl.zeros((BLOCK, BLOCK_R), dtype=tl.float32)
        for first in range(0, parts, BLOCK_P):
            p = first + tl.arange(0, BLOCK_P)
            x = tl.load(src_ptr + p.to(tl.int64)[:, None, None] * rows_total * R + offsets[None, :, :],
                        mask=(p < parts)[:, None, None] & ok[None, :, :], other=0.0)  # (BLOCK_P, BLOCK, BLOCK_R)
            acc += tl.sum(x, axis=0)
        tl.store(dst_ptr + rows[:, None] * stride_dst + ranks[None, :] * stride_dst_col,
                 acc.to(dst_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _sum_parts_kernel(ws_ptr, out_ptr, db_ptr, T, N, R, n_blocks, splits, stride_out, stride_out_col, glow_row0,
                          glow_programs, GLOW_ROWS: tl.constexpr, GLOW_P: tl.constexpr, DB_ROWS: tl.constexpr,
                          DB_P: tl.constexpr, BLOCK_R: tl.constexpr):
        """The first glow_programs programs sum g_low's parts over column blocks into out, the rest
        dB's over T splits into db."""
        pid = tl.program_id(0)
        if pid < glow_programs:
            _sum_parts(ws_ptr + glow_row0.to(tl.int64) * R, n_blocks, T, R, out_ptr, stride_out, stride_out_col,
                       pid, GLOW_ROWS, GLOW_P, BLOCK_R)
        else:
            _sum_parts(ws_ptr, splits, N, R, db_ptr, R, 1, pid - glow_programs, DB_ROWS, DB_P, BLOCK_R)
