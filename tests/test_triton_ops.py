"""The Triton ops against a float64 recomputation and their torch references: product_grad, gᵀ·(a⊙b)
from two factors, and lora_b_grads, (s·g·B, s·gᵀ·low) from one read of g."""

from __future__ import annotations

import os

import pytest
import torch

from lorakit.ops.b_grads import lora_b_grads, lora_b_grads_pays, lora_b_grads_reference
from lorakit.ops.triton_ops import HAVE_TRITON, _product_grad_triton, product_grad, product_grad_reference

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}  # relative to float64

gpu = pytest.mark.skipif(not (torch.cuda.is_available() and HAVE_TRITON),
                         reason="needs a CUDA device and Triton")


def factors(lead, r, k, dtype, device="cpu", row_pad=0):
    """g (*lead, r) and a, b (*lead, k); with row_pad, a and b are column slices of wider tensors."""
    fresh = int.from_bytes(os.urandom(4), "little")  # new random inputs every run, never zeros
    gen = torch.Generator(device=device).manual_seed(fresh)
    g = torch.randn(*lead, r, generator=gen, device=device).to(dtype)
    a = torch.randn(*lead, k + row_pad, generator=gen, device=device).to(dtype)[..., :k]
    b = torch.randn(*lead, k + row_pad, generator=gen, device=device).to(dtype)[..., row_pad:]
    return g, a, b


def reference64(g, a, b):
    """gᵀ·(a⊙b) in float64, from the product as torch rounds it in the factors' dtype."""
    # (R, T) @ (T, K) -> (R, K)
    return g.reshape(-1, g.shape[-1]).double().t() @ (a * b).reshape(-1, a.shape[-1]).double()


def rel(x, y):
    return ((x.double() - y.double()).norm() / y.double().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lead, r, k", [
    ((64,), 12, 200),     # R not a power of two, K not a multiple of any block
    ((300,), 48, 200),
    ((3, 40), 16, 96),    # (B, S, K) factors
    ((2, 5, 7), 1, 33),
])
def test_cpu_matches_reference_and_float64(dtype, lead, r, k):
    g, a, b = factors(lead, r, k, dtype)
    out = product_grad(g, a, b)
    ref = product_grad_reference(g, a, b)
    assert out.shape == (r, k) and out.dtype == torch.float32
    assert torch.equal(out, ref)  # without CUDA, product_grad is the reference
    assert rel(ref, reference64(g, a, b)) < TOL[dtype]


def test_low_precision_product_is_rounded_like_torch():
    # with g = I each output entry is one product: gᵀ·(a⊙b) is a⊙b itself, as torch rounds it
    _, a, b = factors((24,), 1, 50, torch.bfloat16)
    eye = torch.eye(24, dtype=torch.bfloat16)
    assert torch.equal(product_grad(eye, a, b), (a * b).float())
    assert not torch.equal((a * b).float(), a.float() * b.float())  # bf16 rounding is visible here


def test_g_rows_may_be_flat_when_factors_are_not():
    g, a, b = factors((3, 40), 8, 64, torch.float32)
    assert torch.equal(product_grad(g.reshape(120, 8), a, b), product_grad(g, a, b))


@pytest.mark.parametrize("shapes, message", [
    (((10, 4), (10, 32), (10, 31)), r"a \(10, 32\) and b \(10, 31\)"),
    (((10, 4), (10, 32), (2, 5, 32)), r"a \(10, 32\) and b \(2, 5, 32\)"),
    (((12, 4), (10, 32), (10, 32)), r"g \(12, 4\) has 12 rows, a \(10, 32\) has 10"),
    (((2, 6, 4), (3, 5, 32), (3, 5, 32)), r"g \(2, 6, 4\) has 12 rows, a \(3, 5, 32\) has 15"),
    (((4,), (10, 32), (10, 32)), r"at least 2 dims"),
])
def test_mismatched_shapes_say_which(shapes, message):
    g, a, b = (torch.randn(shape) for shape in shapes)
    for fn in (product_grad, product_grad_reference):
        with pytest.raises(ValueError, match=message):
            fn(g, a, b)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("lead, r, k, row_pad", [
    ((8192,), 16, 5632, 0),   # TinyLlama's down_proj input
    ((1000,), 12, 200, 0),    # ragged everywhere: T, R and K
    ((4096,), 48, 2048, 0),
    ((4096,), 48, 2048, 96),  # a = wider[:, :K], b = wider[:, 96:]: row stride K + 96
    ((2, 512), 64, 1000, 8),  # (B, S, K) factors, row-strided
])
def test_cuda_kernel_matches_reference_and_float64(dtype, lead, r, k, row_pad):
    g, a, b = factors(lead, r, k, dtype, device="cuda", row_pad=row_pad)
    out = product_grad(g, a, b)
    ref = product_grad_reference(g, a, b)
    assert out.shape == (r, k) and out.dtype == torch.float32 and out.is_cuda
    # the kernel and the reference differ only in float32 summation order
    assert rel(out, ref) < 2e-3 and rel(out, reference64(g, a, b)) < TOL[dtype]
    assert torch.equal(product_grad(g, a, b), out)  # T splits are summed by torch: deterministic


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_kernel_rounds_the_product_like_torch(dtype):
    # g = I: each output entry is a single product, so any other rounding of a⊙b shows as a mismatch
    _, a, b = factors((48,), 1, 300, dtype, device="cuda", row_pad=4)
    eye = torch.eye(48, dtype=dtype, device="cuda")
    assert torch.equal(_product_grad_triton(eye, a, b), (a * b).float())


# --- lora_b_grads ---------------------------------------------------------------------------------

def layer_grads(lead, n, r, dtype, device="cpu", pad=0):
    """g (*lead, n), low (*lead, r) (a column slice of a wider tensor when pad > 0), B (n, r) float32
    and a scale: one LoRA layer's backward inputs, random every run and never zero."""
    fresh = int.from_bytes(os.urandom(4), "little")
    gen = torch.Generator(device=device).manual_seed(fresh)
    g = torch.randn(*lead, n, generator=gen, device=device).to(dtype)
    low = torch.randn(*lead, r + pad, generator=gen, device=device).to(dtype)[..., pad:]
    B = torch.randn(n, r, generator=gen, device=device) / n ** 0.5
    scale = 0.5 + torch.rand(1, generator=gen, device=device).item()
    return g, low, B, scale


def b_grads64(g, low, B, scale):
    """(s·g·B, s·gᵀ·low) in float64, with B as the kernel multiplies it: cast to g's dtype."""
    g64 = g.reshape(-1, g.shape[-1]).double()
    # (T, N) @ (N, r) -> (T, r);  (N, T) @ (T, r) -> (N, r)
    return scale * g64 @ B.to(g.dtype).double(), scale * g64.t() @ low.reshape(-1, low.shape[-1]).double()


def strided_out(rows, r, dtype, device="cpu", left=3, right=5):
    """A (rows, r) column slice of a wider random buffer, and the buffer: out's row stride is not r."""
    wide = torch.randn(rows, left + r + right, device=device).to(dtype)
    return wide[:, left:left + r], wide


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lead, n, r", [
    ((64,), 200, 12),     # r not a power of two, N not a multiple of any block
    ((300,), 130, 48),
    ((3, 40), 96, 16),    # (B, S, N) gradient
    ((2, 5, 7), 33, 1),
])
def test_b_grads_cpu_matches_reference_and_float64(dtype, lead, n, r):
    g, low, B, s = layer_grads(lead, n, r, dtype, pad=2)
    g_low, dB = lora_b_grads(g, low, B, s)
    ref_low, ref_dB = lora_b_grads_reference(g, low, B, s)
    T = g.numel() // n
    assert g_low.shape == (T, r) and g_low.dtype == dtype and dB.shape == (n, r) and dB.dtype == torch.float32
    assert torch.equal(g_low, ref_low) and torch.equal(dB, ref_dB)  # without CUDA, the reference
    low64, dB64 = b_grads64(g, low, B, s)
    assert rel(ref_low, low64) < TOL[dtype] and rel(ref_dB, dB64) < TOL[dtype]
    # g_low is rounded once from float32 (as addmm rounds it), not from a product in g's dtype
    assert torch.equal(ref_low, (s * (g.reshape(T, n).float() @ B.to(dtype).float())).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_b_grads_writes_g_low_into_a_column_slice(dtype):
    g, low, B, s = layer_grads((2, 30), 70, 6, dtype)
    out, wide = strided_out(60, 6, dtype)
    before = wide.clone()
    g_low, dB = lora_b_grads(g, low, B, s, out=out)
    assert g_low.data_ptr() == out.data_ptr() and g_low.stride() == out.stride()
    expect_low, expect_dB = lora_b_grads(g, low, B, s)
    assert torch.equal(out, expect_low) and torch.equal(dB, expect_dB)
    assert torch.equal(wide[:, :3], before[:, :3]) and torch.equal(wide[:, 9:], before[:, 9:])


def test_b_grads_casts_b_to_g_dtype():
    g, low, B, s = layer_grads((40,), 50, 8, torch.bfloat16)
    for got, want in zip(lora_b_grads(g, low, B, s), lora_b_grads(g, low, B.bfloat16(), s)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("shapes, message", [
    (((10, 32), (10, 4), (31, 4), None), r"B of shape \(d_out, r\) = \(32, 4\).* got B \(31, 4\)"),
    (((10, 32), (10, 4), (32, 5), None), r"got B \(32, 5\)"),
    (((10, 32), (12, 4), (32, 4), None), r"g \(10, 32\) has 10 rows, low \(12, 4\) has 12"),
    (((2, 5, 32), (10, 4), (32, 4), (10, 5)), r"out of shape \(10, 4\).* got out \(10, 5\)"),
    (((32,), (10, 4), (32, 4), None), r"at least 2 dims"),
])
def test_b_grads_mismatched_shapes_say_which(shapes, message):
    g, low, B, out = (torch.randn(shape) if shape else None for shape in shapes)
    for fn in (lora_b_grads, lora_b_grads_reference):
        with pytest.raises(ValueError, match=message):
            fn(g, low, B, 2.0, out=out)


def test_b_grads_kernel_never_pays_off_cuda():
    g, low, _, _ = layer_grads((8192,), 256, 16, torch.bfloat16)
    assert not lora_b_grads_pays(g, low)


def test_b_grads_out_must_have_g_dtype():
    g, low, B, s = layer_grads((10,), 32, 4, torch.bfloat16)
    with pytest.raises(ValueError, match=r"dtype torch.bfloat16; got out \(10, 4\) torch.float32"):
        lora_b_grads(g, low, B, s, out=torch.empty(10, 4))


# Kernel against reference: g_low differs only where float32 sums that differ in the last bits round
# to neighbouring values of g's dtype; dB only in float32 summation order.
B_GRADS_KERNEL_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-3, 1e-4), torch.float16: (2e-3, 1e-4)}


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("lead, n, r", [
    ((8192,), 5632, 16),  # TinyLlama-1.1B gate_proj / up_proj, batch 8 × 1024
    ((8192,), 256, 16),   # k_proj / v_proj: one column block, g_low written directly
    ((8192,), 2048, 8),   # q_proj / o_proj / down_proj
    ((8192,), 5632, 64),
    ((1000,), 200, 12),   # ragged everywhere: T, N and r
    ((2, 512), 1000, 64),  # (B, S, N) gradient
    ((2, 60), 100, 4),    # one block and one split: no parts, no second kernel
])
def test_b_grads_cuda_kernel_matches_reference_and_float64(dtype, lead, n, r):
    g, low, B, s = layer_grads(lead, n, r, dtype, device="cuda", pad=3)
    T = g.numel() // n
    out, wide = strided_out(T, r, dtype, device="cuda")
    before = wide.clone()
    g_low, dB = lora_b_grads(g, low, B, s, out=out)
    assert g_low.data_ptr() == out.data_ptr() and dB.shape == (n, r) and dB.dtype == torch.float32
    assert dB.untyped_storage().nbytes() == n * r * 4  # not a view that keeps the kernel's parts alive
    assert torch.equal(wide[:, :3], before[:, :3]) and torch.equal(wide[:, 3 + r:], before[:, 3 + r:])
    ref_low, ref_dB = lora_b_grads_reference(g, low, B, s)
    low_tol, dB_tol = B_GRADS_KERNEL_TOL[dtype]
    assert rel(g_low, ref_low) < low_tol and rel(dB, ref_dB) < dB_tol
    low64, dB64 = b_grads64(g, low, B, s)
    assert rel(g_low, low64) < TOL[dtype] and rel(dB, dB64) < TOL[dtype]
    again_low, again_dB = lora_b_grads(g, low, B, s)  # parts are summed in a fixed order: deterministic
    assert torch.equal(again_low, g_low) and torch.equal(again_dB, dB)
