"""LoRA linear layers as one autograd function: h_i = x·W_iᵀ + b_i + s_i·(drop(x)·A_iᵀ)·B_iᵀ.

One call serves one layer, or several layers that read the same input (q, k, v; gate, up): their
A-projections are one matmul, low = x·[A_1; …; A_n]ᵀ, and their input gradient is one tensor, so
autograd sums no per-layer copies of dx.

Saved for backward: the (T, Σr) projection and x, which dA needs — unless x is rebuilt from
tensors autograd keeps anyway (``REBUILD_INPUTS``, `ops/rebuild.py`): by default SwiGLU's
product act(gate)·up, whose dA then comes from the two factors without forming x
(`triton_ops.product_grad`). Never a dropped copy of x or a dropout mask: the mask is regenerated in
backward from a seed drawn from torch's CPU generator, so training stays reproducible and
resumable. Each adapter's output is written first and the base matmul accumulates onto it in place
(`addmm_`, C read in the GEMM's epilogue): one write of the output, not a read-modify-write pass.
Backward, per layer and then once for the group:

    g_low_i = s_i·g_i·B_i      (T, r_i)      dB_i = s_i·g_iᵀ·low_i      (d_out_i, r_i)   one read of g_i
    dA = g_lowᵀ·drop(x)        (Σr, d_in)    dx = drop'(g_low·A) + Σ_i g_i·W_i   (one buffer)

The scalings ride in the matmuls' alpha, so no pass scales anything. Matmuls run in x's dtype (a
float32 adapter on a bf16 base computes in bf16, as autocast would); A and B gradients come back in
the adapters' dtype (on CUDA straight from the matmul, accumulated in float32). The caller may pass
the adapters already cast to x's dtype (`LoraLinear` keeps them between optimizer steps): at these
sizes kernel launches, not FLOPs, are the cost. `tests/test_ops.py` compares all of this with a
float64 recomputation of the reference math (`reference.lora_delta` plus the base layer).
"""

from __future__ import annotations

from typing import Sequence

import torch

from . import rebuild as rebuild_input
from .b_grads import lora_b_grads, lora_b_grads_pays
from .triton_ops import product_grad

PER_LAYER = 4  # tensors per layer in LoraLinearFunction.apply: weight, bias, A, B
# Which inputs of frozen layers are rebuilt in backward instead of kept (ops/rebuild.py):
#   "products" (default): SwiGLU's act(gate)·up, whose factors the multiply keeps; dA is then
#       g_lowᵀ·(a⊙b), straight from the factors (a Triton kernel on CUDA: no product in memory).
#   True: RMSNorm's outputs as well (four more elementwise passes each, in float32);  False: none.
REBUILD_INPUTS: bool | str = "products"
# True: on CUDA, g_low_i = s·g_i·B_i and dB_i = s·g_iᵀ·low_i from one read of g_i
# (`b_grads.lora_b_grads`) where that kernel takes less GPU time than two cuBLAS matmuls
# (`lora_b_grads_pays`: large g, r <= 16). None (default): only in a backward being captured in a
# CUDA graph. On an H200 the kernel saves ~1.35 ms of GPU time per TinyLlama step but adds ~45 µs of
# launch time per call, and an eager step is bound by the host; replays of a graph launch nothing.
FUSED_B_GRADS: bool | None = None
_ADDMM_DTYPE = hasattr(torch.ops.aten.addmm, "dtype")  # mixed-precision output (CUDA, torch >= 2.9)


def _mask(like: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """The same keep-mask, scaled by 1/(1-p), every time it is asked for with the same seed."""
    if like.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("LoRA dropout > 0 cannot be captured in a CUDA graph: the seed is drawn on the "
                           "host, so every replay would reuse one mask. Set lora_dropout=0 for graphed "
                           "training, or train without CUDA graphs")
    g = torch.Generator(device=like.device)
    g.manual_seed(seed)
    keep = torch.empty(like.shape, device=like.device, dtype=like.dtype).bernoulli_(1.0 - p, generator=g)
    return keep.div_(1.0 - p)


def _mm_as(a: torch.Tensor, b: torch.Tensor, alpha: float, dtype: torch.dtype) -> torch.Tensor:
    """alpha·a@b in ``dtype``; on CUDA a bf16/fp16 product is written as float32 by the matmul itself."""
    global _ADDMM_DTYPE
    if dtype != a.dtype and a.is_cuda and _ADDMM_DTYPE:
        out = torch.empty(a.shape[0], b.shape[1], device=a.device, dtype=dtype)
        try:
            return torch.ops.aten.addmm.dtype(out, a, b, dtype, beta=0, alpha=alpha)
        except (RuntimeError, NotImplementedError):  # this build or dtype pair lacks it: cast after
            _ADDMM_DTYPE = False
    out = a @ b
    return (out.mul_(alpha) if alpha != 1 else out).to(dtype)


def cast_adapters(As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], dtype: torch.dtype):
    """The operands the fused op multiplies with, detached, in ``dtype``: (A_cat, A_catᵀ, Bs, Bsᵀ),
    A_cat = [A_1; …; A_n]. The transposes are views; callers that keep casts keep them too, which
    saves the forward one call per matmul operand."""
    A_cat = (torch.cat([A.detach() for A in As]) if len(As) > 1 else As[0].detach()).to(dtype)
    Bs_ = tuple(B.detach().to(dtype) for B in Bs)
    return A_cat, A_cat.t(), Bs_, tuple(B.t() for B in Bs_)


class LoraLinearFunction(torch.autograd.Function):
    """apply(x, plan, W_1, b_1, A_1, B_1, …, W_n, b_n, A_n, B_n) -> n outputs, where
    plan = (scalings, dropout, seed, A_cat, A_catᵀ, Bs, Bsᵀ, Wsᵀ, meta): the adapters in x's dtype as
    `cast_adapters` gives them, the weights transposed (None where a weight is not in x's dtype), and
    what `plan_meta` says about the layers' tensors (made once per group, not per call)."""

    @staticmethod
    def forward(ctx, x, plan, *params):
        scalings, dropout, seed, A_cat, A_cat_t, Bs_, Bts, Wts, meta = plan
        ranks, _, _, weights_train = meta
        ctx.set_materialize_grads(False)  # a layer whose output goes unused costs nothing in backward
        x2d = x.reshape(-1, x.shape[-1])
        x_in = x2d * _mask(x2d, dropout, seed) if dropout > 0 else x2d
        weights = params[0::PER_LAYER]
        low = torch.mm(x_in, A_cat_t)                            # (T, Σr)
        lows = low.split_with_sizes(ranks, 1) if len(ranks) > 1 else (low,)
        outs = []
        lead, rows = x.shape[:-1], x2d.shape[0]
        for W, Wt, b, Bt, lo, s in zip(weights, Wts, params[1::PER_LAYER], Bts, lows, scalings):
            if b is not None:
                y = torch.addmm(b.to(x.dtype), lo, Bt, alpha=s)
            else:
                y = x2d.new_empty(rows, Bt.shape[1]).addmm_(lo, Bt, beta=0, alpha=s)
            y.addmm_(x2d, Wt if Wt is not None else W.to(x.dtype).t())  # base matmul onto the adapter's output
            outs.append(y.view(*lead, y.shape[1]))
        # dA needs x. When x is an elementwise product whose factors autograd keeps anyway
        # (SwiGLU's; with REBUILD_INPUTS=True RMSNorm's too), it is rebuilt instead of kept.
        recipe = None
        if REBUILD_INPUTS and not weights_train:
            recipe = rebuild_input.plan(x, products_only=REBUILD_INPUTS == "products")
        # The adapter casts are saved too: they may be views of a buffer that the next optimizer
        # step's refresh overwrites in place (AdapterCasts), and autograd then says so.
        ctx.save_for_backward(*(() if recipe else (x,)), low, A_cat, *Bs_, *weights)
        ctx.recipe, ctx.x_shape, ctx.plan = recipe, x.shape, (scalings, dropout, seed, meta)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        needs = ctx.needs_input_grad  # x, plan, then (W, b, A, B) per layer
        wants_dA, wants_dW = any(needs[4::PER_LAYER]), any(needs[2::PER_LAYER])
        scalings, dropout, seed, (ranks, param_dtypes, bias_needs_grad, _) = ctx.plan
        saved = ctx.saved_tensors
        x = saved[0] if ctx.recipe is None else None
        low, A_cat, *rest = saved[1:] if ctx.recipe is None else saved
        Bs_, weights = rest[:len(ranks)], rest[len(ranks):]
        factors = None  # x = a·b, never formed: dA comes from the factors
        if ctx.recipe is not None:
            if dropout == 0 and not wants_dW:
                factors = rebuild_input.factors(ctx.recipe)
            if factors is None and (wants_dA or wants_dW):
                x = rebuild_input.rebuild(ctx.recipe)
        x2d = x.reshape(-1, x.shape[-1]) if x is not None else None
        dt = low.dtype
        layer_grads: list = [None] * (PER_LAYER * len(ranks))
        g_low = low.new_empty(low.shape)                         # (T, Σr)
        if len(ranks) > 1:
            g_lows, lows = g_low.split_with_sizes(ranks, 1), low.split_with_sizes(ranks, 1)
        else:
            g_lows, lows = (g_low,), (low,)
        g2ds = []  # each used layer's (T, d_out) gradient in x's dtype, with its weight, for dx below
        fused_b = low.is_cuda and (FUSED_B_GRADS if FUSED_B_GRADS is not None
                                   else torch.cuda.is_current_stream_capturing())
        for i, (g, B_, s, g_low_i, lo) in enumerate(zip(grads, Bs_, scalings, g_lows, lows)):
            if g is None:  # this layer's output was not used
                g_low_i.zero_()
                continue
            g2d = g.reshape(-1, g.shape[-1])
            if g2d.dtype != dt:
                g2d = g2d.to(dt)
            g2ds.append((g2d, weights[i]))
            base = 2 + PER_LAYER * i
            if needs[base + 3] and fused_b and lora_b_grads_pays(g2d, lo):  # one read of g for both
                _, dB = lora_b_grads(g2d, lo, B_, s, out=g_low_i)
                layer_grads[PER_LAYER * i + 3] = dB.to(param_dtypes[i][1])
            else:
                g_low_i.addmm_(g2d, B_, beta=0, alpha=s)           # gradient of x·A_iᵀ
                if needs[base + 3]:
                    layer_grads[PER_LAYER * i + 3] = _mm_as(g2d.t(), lo, s, param_dtypes[i][1])
            if needs[base]:
                layer_grads[PER_LAYER * i] = (g2d.t() @ x2d).to(weights[i].dtype)
            if bias_needs_grad[i]:
                layer_grads[PER_LAYER * i + 1] = g2d.sum(0)
        mask = None
        if dropout > 0:
            like = x2d if x2d is not None else low.new_empty(low.shape[0], ctx.x_shape[-1])  # x's rows
            mask = _mask(like, dropout, seed)
        if wants_dA:
            a_dtype = param_dtypes[0][0]
            if factors is not None:
                dA_cat = product_grad(g_low, *factors).to(a_dtype)  # gᵀ·(a⊙b), (Σr, d_in)
            else:
                x_in = x2d * mask if mask is not None else x2d
                dA_cat = _mm_as(g_low.t(), x_in, 1, a_dtype)      # (Σr, d_in)
            for i, dA in enumerate(dA_cat.split_with_sizes(ranks) if len(ranks) > 1 else (dA_cat,)):
                layer_grads[PER_LAYER * i + 2] = dA if param_dtypes[i][0] == a_dtype else dA.to(param_dtypes[i][0])
        grad_x = None
        if needs[0]:
            grad_x = g_low @ A_cat                               # (T, d_in), the adapters' part
            if mask is not None:
                grad_x.mul_(mask)
            for g2d, W in g2ds:
                grad_x.addmm_(g2d, W if W.dtype == dt else W.to(dt))
            grad_x = grad_x.view(ctx.x_shape)
        return (grad_x, None, *layer_grads)


def plan_meta(layers: Sequence[tuple]) -> tuple:
    """What the fused op needs to know of a group's ``(weight, bias, A, B, …)`` tensors besides the
    tensors: (ranks, (A dtype, B dtype) per layer, whether each bias trains, whether any weight does)."""
    return (tuple(layer[2].shape[0] for layer in layers), tuple((layer[2].dtype, layer[3].dtype) for layer in layers),
            tuple(layer[1] is not None and layer[1].requires_grad for layer in layers),
            any(layer[0].requires_grad for layer in layers))


_apply_in_c = super(torch.autograd.Function, LoraLinearFunction).apply  # torch's C entry point


def lora_linear_apply(x: torch.Tensor, plan: tuple, *params: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """``LoraLinearFunction.apply`` without the Python wrapper of ``Function.apply``: that wrapper
    checks each argument for functorch, a few µs per call that a launch-bound forward pays ~90
    times. Under a functorch transform (vmap, grad) the wrapper is needed and used."""
    if torch._C._are_functorch_transforms_active():
        return lora_linear_apply(x, plan, *params)
    return _apply_in_c(x, plan, *params)


def draw_seed(p: float) -> int:
    """A dropout seed from the CPU generator: no device sync, and a resumed run draws the same seeds."""
    return int(torch.randint(0, 2**62, (1,)).item()) if p > 0 else 0


def fused_lora_linears(x: torch.Tensor, layers: Sequence[tuple], dropout: float = 0.0,
                       training: bool = False, casts: tuple | None = None,
                       transposed: tuple | None = None) -> tuple[torch.Tensor, ...]:
    """Several linear layers reading the same x, each with one adapter: ``layers`` holds
    ``(weight, bias, A, B, scaling)`` per layer. Returns one output per layer. ``casts``:
    ``cast_adapters(As, Bs, x.dtype)`` when the caller keeps them; ``transposed``: each weight's
    transposed view (None where the weight is not in x's dtype), likewise."""
    p = dropout if training else 0.0
    params = [t for W, b, A, B, _ in layers for t in (W, b, A, B)]
    if casts is None:
        casts = cast_adapters([layer[2] for layer in layers], [layer[3] for layer in layers], x.dtype)
    weights_t = tuple(W.t() if W.dtype == x.dtype else None for W, *_ in layers) if transposed is None else transposed
    plan = (tuple(layer[4] for layer in layers), p, draw_seed(p), *casts, weights_t, plan_meta(layers))
    return lora_linear_apply(x, plan, *params)


def fused_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                      B: torch.Tensor, scaling: float, dropout: float = 0.0, training: bool = False) -> torch.Tensor:
    """Base linear plus one adapter; dropout applies only when ``training`` and ``dropout > 0``."""
    return fused_lora_linears(x, [(weight, bias, A, B, scaling)], dropout, training)[0]
