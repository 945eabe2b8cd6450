"""LoRA layers against an independent float64 recomputation of h = W0·x + s·B·A·x."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.layers import LoraConv, LoraEmbedding, LoraLinear, LoraSlicedLinear, MergeError

G = torch.Generator().manual_seed(0)


def rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=G, dtype=dtype)


def randomize(layer, name="default"):
    with torch.no_grad():
        layer.lora_A[name].copy_(rand(*layer.lora_A[name].shape) * 0.3)
        layer.lora_B[name].copy_(rand(*layer.lora_B[name].shape) * 0.3)


def f64(t):
    return t.detach().to(torch.float64)


# Each case: a base module, an input, and the float64 reference forward given (base, A, B, s).
def linear_case():
    base = nn.Linear(12, 10)
    x = rand(3, 5, 12)
    ref = lambda A, B, s: f64(x) @ f64(base.weight).T + f64(base.bias) + s * f64(x) @ A.T @ B.T
    return base, x, ref


def conv1d_transposed_case():
    base = Conv1D(10, 12)  # nf=10 outputs, nx=12 inputs; weight (12, 10)
    nn.init.normal_(base.weight)
    x = rand(3, 5, 12)
    ref = lambda A, B, s: f64(x) @ f64(base.weight) + f64(base.bias) + s * f64(x) @ A.T @ B.T
    return base, x, ref


def embedding_case():
    base = nn.Embedding(20, 8, padding_idx=0)
    x = torch.randint(0, 20, (3, 6), generator=G)
    ref = lambda A, B, s: f64(base.weight)[x] + s * (A.T[x] @ B.T)
    return base, x, ref


def conv_case(dims, **kw):
    def make():
        cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        conv_fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
        base = cls(3, 5, **kw)
        x = rand(2, 3, *([9] * dims))
        opts = {k: v for k, v in kw.items() if k in ("stride", "padding", "dilation")}

        def ref(A, B, s):
            dw = torch.einsum("or,ri...->oi...", B.flatten(1), A)  # composed kernel, float64
            return conv_fn(f64(x), f64(base.weight) + s * dw, f64(base.bias), **opts)
        return base, x, ref
    return make


CASES = {
    "linear": (linear_case, LoraLinear),
    "conv1d_transposed": (conv1d_transposed_case, LoraLinear),
    "embedding": (embedding_case, LoraEmbedding),
    "conv1d_k3": (conv_case(1, kernel_size=3, padding=1), LoraConv),
    "conv2d_k3_s2_d2": (conv_case(2, kernel_size=3, stride=2, padding=2, dilation=2), LoraConv),
    "conv2d_k1": (conv_case(2, kernel_size=1), LoraConv),
    "conv2d_k(2,3)": (conv_case(2, kernel_size=(2, 3), padding=(1, 0)), LoraConv),
    "conv3d_k2": (conv_case(3, kernel_size=2, stride=2), LoraConv),
}


@pytest.mark.parametrize("case", CASES)
def test_injected_layer_equals_base_at_init(case):
    make, cls = CASES[case]
    base, x, _ = make()
    expected = base(x)
    layer = cls(base, case)
    layer.add_adapter("default", r=4, alpha=8)
    layer.set_active(["default"])
    assert torch.equal(layer(x), expected)  # §4.1: ΔW = 0 at start, exactly


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_forward_and_merge_match_float64_reference(case, use_rslora):
    make, cls = CASES[case]
    base, x, ref = make()
    layer = cls(base, case)
    layer.add_adapter("default", r=3, alpha=6, use_rslora=use_rslora)
    layer.set_active(["default"])
    randomize(layer)
    s = 6 / math.sqrt(3) if use_rslora else 2.0
    expected = ref(f64(layer.lora_A["default"]), f64(layer.lora_B["default"]), s)
    out = layer(x)
    assert torch.allclose(f64(out), expected, rtol=1e-4, atol=1e-4)
    layer.merge()
    assert torch.allclose(f64(layer(x)), expected, rtol=1e-4, atol=1e-4)
    layer.unmerge()
    assert torch.allclose(f64(layer(x)), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", CASES)
def test_merge_is_idempotent_and_unmerge_restores(case):
    make, cls = CASES[case]
    base, _, _ = make()
    w0 = base.weight.detach().clone()
    layer = cls(base, case)
    layer.add_adapter("default", r=2, alpha=2)
    layer.set_active(["default"])
    randomize(layer)
    layer.merge()
    once = base.weight.detach().clone()
    layer.merge()  # a no-op, not a double add
    assert torch.equal(base.weight, once)
    assert not torch.allclose(once, w0)
    layer.unmerge()
    layer.unmerge()
    assert torch.allclose(base.weight, w0, atol=1e-6)
    assert layer.merged_adapters == []


def test_safe_merge_refuses_non_finite_and_leaves_weight():
    base = nn.Linear(4, 4)
    layer = LoraLinear(base, "model.fc")
    layer.add_adapter("bad", r=2, alpha=2)
    layer.set_active(["bad"])
    with torch.no_grad():
        layer.lora_B["bad"].fill_(float("inf"))
    w0 = base.weight.detach().clone()
    with pytest.raises(MergeError, match="model.fc.*'bad'.*non-finite"):
        layer.merge()
    assert torch.equal(base.weight, w0) and layer.merged_adapters == []


def test_fused_projection_adapts_only_chosen_slices():
    for base in (nn.Linear(8, 12), Conv1D(12, 8)):
        nn.init.normal_(base.weight)
        layer = LoraSlicedLinear(base, [True, False, True], "attn.c_attn")
        layer.add_adapter("default", r=2, alpha=4)
        layer.set_active(["default"])
        randomize(layer)
        x = rand(2, 3, 8)
        w = f64(base.weight) if isinstance(base, Conv1D) else f64(base.weight).T  # (d_in, d_out)
        A = f64(layer.lora_A["default"]).view(2, 2, 8)  # (slice, r, d_in)
        B = f64(layer.lora_B["default"]).view(2, 4, 2)  # (slice, d_slice, r)
        delta = torch.zeros(2, 3, 12, dtype=torch.float64)
        for k, cols in enumerate((slice(0, 4), slice(8, 12))):
            delta[..., cols] = 2.0 * f64(x) @ A[k].T @ B[k].T
        expected = f64(x) @ w + f64(base.bias) + delta
        out = layer(x)
        assert torch.allclose(f64(out), expected, atol=1e-5)
        assert torch.equal(out[..., 4:8], base(x)[..., 4:8])  # k untouched
        A_dense, B_dense = layer.dense_factors("default")
        assert torch.allclose(f64(B_dense @ A_dense) * 2.0, f64(layer.delta_weight("default")).T
                              if isinstance(base, Conv1D) else f64(layer.delta_weight("default")))
        layer.merge()
        assert torch.allclose(f64(layer(x)), expected, atol=1e-5)


def test_fused_projection_rejects_uneven_split():
    with pytest.raises(ValueError, match="do not split into 3 equal slices"):
        LoraSlicedLinear(nn.Linear(4, 10), [True, False, True], "c_attn")


def test_grouped_conv_gives_clear_error():
    with pytest.raises(TypeError, match="grouped convolution.*groups=2"):
        LoraConv(nn.Conv2d(4, 4, 3, groups=2), "features.0")


@pytest.mark.parametrize("base_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_base_with_float32_adapter(base_dtype):
    base = nn.Linear(16, 8).to(base_dtype)
    layer = LoraLinear(base, "fc")
    layer.add_adapter("default", r=4, alpha=8)
    layer.set_active(["default"])
    randomize(layer)
    assert layer.lora_A["default"].dtype == torch.float32
    x = rand(4, 16).to(base_dtype)
    out = layer(x)
    assert out.dtype == base_dtype
    A, B = f64(layer.lora_A["default"]), f64(layer.lora_B["default"])
    expected = f64(x) @ f64(base.weight).T + f64(base.bias) + 2.0 * f64(x) @ A.T @ B.T
    err = (f64(out) - expected).norm() / expected.norm()
    assert err < (1e-2 if base_dtype != torch.float32 else 1e-5)
    out.float().sum().backward()
    assert layer.lora_B["default"].grad is not None and layer.lora_B["default"].grad.dtype == torch.float32


def test_dropout_touches_the_adapter_path_only():
    base = nn.Linear(16, 16)
    layer = LoraLinear(base, "fc")
    layer.add_adapter("default", r=4, alpha=4, dropout=0.5)
    layer.set_active(["default"])
    randomize(layer)
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    x = rand(64, 16)
    layer.train()
    from lorakit.ops.lora_linear import _keep_mask, draw_seed

    torch.manual_seed(5)
    out = layer(x)
    torch.manual_seed(5)
    dropped = x * _keep_mask(x, 0.5, draw_seed(0.5))  # the mask the forward made from its seed
    assert (dropped == 0).float().mean() > 0.3
    assert torch.allclose(out, base(x) + (dropped @ A.T) @ B.T, atol=1e-5)
    layer.eval()
    assert torch.allclose(layer(x), base(x) + (x @ A.T) @ B.T, atol=1e-5)


def test_gaussian_init_and_several_adapters_with_own_rank():
    layer = LoraLinear(nn.Linear(32, 8), "fc")
    layer.add_adapter("a", r=2, alpha=4, init="gaussian")
    layer.add_adapter("b", r=8, alpha=4, dropout=0.1)
    assert layer.lora_A["a"].shape == (2, 32) and layer.lora_B["b"].shape == (8, 8)
    assert layer.scaling == {"a": 2.0, "b": 0.5}
    assert abs(layer.lora_A["a"].std().item() - 0.5) < 0.2  # N(0, 1/r)
    with pytest.raises(ValueError, match="already exists"):
        layer.add_adapter("a", r=2, alpha=4)


@settings(max_examples=40, deadline=None)
@given(d_in=st.integers(1, 24), d_out=st.integers(1, 24), r=st.integers(1, 8),
       lead=st.lists(st.integers(1, 4), min_size=0, max_size=3), transposed=st.booleans())
def test_linear_any_shape_matches_reference(d_in, d_out, r, lead, transposed):
    base = Conv1D(d_out, d_in) if transposed else nn.Linear(d_in, d_out)
    nn.init.normal_(base.weight)
    layer = LoraLinear(base, "fc")
    layer.add_adapter("default", r=r, alpha=2 * r)
    layer.set_active(["default"])
    randomize(layer)
    x = rand(*lead, d_in)
    out = layer(x)
    assert out.shape == (*lead, d_out)
    w = f64(base.weight) if transposed else f64(base.weight).T
    A, B = f64(layer.lora_A["default"]), f64(layer.lora_B["default"])
    assert torch.allclose(f64(out), f64(x) @ w + f64(base.bias) + 2.0 * f64(x) @ A.T @ B.T, atol=1e-4)


@settings(max_examples=25, deadline=None)
@given(kernel=st.integers(1, 4), stride=st.integers(1, 3), padding=st.integers(0, 2),
       dilation=st.integers(1, 2), r=st.integers(1, 4), size=st.integers(8, 12))
def test_conv2d_any_geometry_merges_to_same_output(kernel, stride, padding, dilation, r, size):
    base = nn.Conv2d(2, 3, kernel, stride=stride, padding=padding, dilation=dilation)
    layer = LoraConv(base, "conv")
    layer.add_adapter("default", r=r, alpha=r)
    layer.set_active(["default"])
    randomize(layer)
    x = rand(1, 2, size, size)
    unmerged = layer(x)
    layer.merge()
    assert torch.allclose(layer(x), unmerged, atol=1e-4)
