"""product_grad, gᵀ·(a⊙b) from two factors, against a float64 recomputation and the torch reference."""

from __future__ import annotations

import os

import pytest
import torch

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
