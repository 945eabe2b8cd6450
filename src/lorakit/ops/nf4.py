"""NF4 dequantization of a bitsandbytes 4-bit weight in one Triton launch.

bitsandbytes packs two 4-bit codes per byte (the even element in the high nibble) and keeps one
float32 scale per ``blocksize`` elements (``absmax``). With double quantization those scales are
themselves 8-bit codes into ``state2.code`` with one float32 scale per ``state2.blocksize`` of
them, plus a float32 ``offset``: ``scale[b] = code2[absmax[b]] · absmax2[b // blocksize2] + offset``.
bitsandbytes' own ``dequantize_4bit`` makes the scales in two launches (a blockwise dequantization
and the offset's add, each with its float32 tensor) and then the weight in a third. Here one
kernel reads the packed bytes and the 8-bit scales and writes the weight:

    W[2i]   = NF4[byte[i] >> 4]  · scale[2i // blocksize]
    W[2i+1] = NF4[byte[i] & 15]  · scale[2i // blocksize]

each product in float32, then rounded once to the weight's dtype, with no fused multiply-add
(``enable_fp_fusion=False``), so the result is bitsandbytes' to the bit (`tests/test_nf4.py`
checks that under ``TRITON_INTERPRET=1`` on the CPU, and on the GPU). FP4 and packed layouts other
than bitsandbytes' (n/2, 1) column go to bitsandbytes (`supports`). The 4-bit layers use it on a
GPU with double quantization only: there it was 1.2-1.4x faster than bitsandbytes on an H200,
without double quantization slower (bitsandbytes needs one launch there too;
`benchmarks/results/nf4_dequant_cuda.json`).
"""

from __future__ import annotations

import functools

import torch

_BYTES_PER_PROGRAM = 1024


def supports(weight: torch.Tensor, state) -> bool:
    """Whether `dequantize_nf4` takes this packed weight and quant state."""
    return (state.quant_type == "nf4" and state.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and weight.is_contiguous() and weight.shape[0] != 1
            and (not state.nested or state.state2.blocksize > 0)
            and not getattr(state, "packing_format_for_cpu", False))


def dequantize_nf4(weight: torch.Tensor, state) -> torch.Tensor:
    """The (d_out, d_in) weight in ``state.dtype`` from a Linear4bit's packed ``weight`` (any
    ``quant_storage``: its bytes are read) and its ``quant_state``; a new tensor."""
    import triton

    packed = weight.reshape(-1).view(torch.uint8)
    n_bytes = packed.numel()
    out = torch.empty(state.shape, dtype=state.dtype, device=weight.device)
    if out.numel() != 2 * n_bytes:
        raise ValueError(f"the packed weight has {n_bytes} bytes, but its quant state's shape {tuple(state.shape)} "
                         f"needs {(out.numel() + 1) // 2}")
    nested = bool(state.nested)
    absmax = state.absmax
    absmax2 = state.state2.absmax if nested else absmax
    code2 = state.state2.code if nested else state.code
    offset = state.offset if nested else absmax  # a float32 tensor (never read when not nested)
    if nested and not isinstance(offset, torch.Tensor):
        offset = torch.tensor(float(offset), dtype=torch.float32, device=weight.device)
    grid = (triton.cdiv(n_bytes, _BYTES_PER_PROGRAM),)
    _kernel()[grid](packed, absmax, absmax2, code2, offset, state.code, out, n_bytes,
                    BLOCKSIZE=state.blocksize, BLOCKSIZE2=state.state2.blocksize if nested else 1, NESTED=nested,
                    BLOCK=_BYTES_PER_PROGRAM, enable_fp_fusion=False)
    return out


@functools.cache
def _kernel():
    """The jitted kernel, made at first use: importing lorakit never imports Triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def nf4_dequantize(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, out_ptr, n_bytes,
                       BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                       BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)       # byte indices
        mask = offs < n_bytes
        byte = tl.load(packed_ptr + offs, mask=mask, other=0).to(tl.int32)
        block = (2 * offs) // BLOCKSIZE                                            # both nibbles' scale block
        if NESTED:
            q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
            scale = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=mask, other=0.0)
            scale = scale + tl.load(offset_ptr)
        else:
            scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
        high = tl.load(code_ptr + (byte >> 4)) * scale
        low = tl.load(code_ptr + (byte & 15)) * scale
        pairs = tl.join(high, low).to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne")                 # (BLOCK, 2): W[2i], W[2i+1]
        index = tl.join(2 * offs, 2 * offs + 1)
        tl.store(out_ptr + index, pairs, mask=tl.join(mask, mask))

    return nf4_dequantize
