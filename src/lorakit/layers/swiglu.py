"""SwiGLU MLPs (Llama, Mistral, Qwen2, ...) whose down projection carries LoRA.

Such an MLP computes ``down(silu(gate(x)) · up(x))``. The adapter's dA needs the down projection's
input, the product: a (tokens, d_ff) tensor, the largest input of a decoder layer, that a frozen
model never keeps (its backward needs only gate and up). Here the MLP hands the product's two
factors to the down projection's op (`LoraLinear.forward_swiglu`), which keeps gate and up and
makes the product again in backward: 1.9 GiB of a TinyLlama step, 7 GiB of a Llama-3-8B one.

`install` decides which MLPs get this at inject time, from their structure (gate_proj, up_proj,
down_proj and a SiLU act_fn) confirmed by running the module's own forward once on a small input
and comparing; `remove` takes it off at unload. The MLP's forward is replaced by a
`SwiGLUForward` object in the instance's ``__dict__`` (picklable, copied by deepcopy), which
computes exactly what the class's forward computes and falls back to it whenever the down
projection is not a LoRA layer.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.swiglu_linear import swiglu
from .linear import LoraLinear

SILU_TYPES = ("SiLU", "SiLUActivation")  # torch's and transformers' modules for F.silu


class SwiGLUForward:
    """The forward of one SwiGLU MLP: its down projection takes the product as its factors."""

    def __init__(self, mlp: nn.Module) -> None:
        self.mlp = mlp

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mlp = self.mlp
        if not isinstance(mlp.down_proj, LoraLinear):
            return type(mlp).forward(mlp, x)
        return mlp.down_proj.forward_swiglu(mlp.gate_proj(x), mlp.up_proj(x))


def looks_like_swiglu(module: nn.Module) -> bool:
    """gate_proj, up_proj, down_proj and a SiLU act_fn: the structure `install` then checks by value."""
    return (all(isinstance(getattr(module, n, None), nn.Module) for n in ("gate_proj", "up_proj", "down_proj"))
            and type(getattr(module, "act_fn", None)).__name__ in SILU_TYPES)


def install(model: nn.Module) -> list[str]:
    """Route the down projection of every SwiGLU MLP whose down_proj is a LoRA linear layer through
    `LoraLinear.forward_swiglu`; returns the MLPs' names."""
    names = []
    for name, module in model.named_modules():
        if "forward" in module.__dict__ or not looks_like_swiglu(module):
            continue
        if isinstance(module.down_proj, LoraLinear) and _computes_swiglu(module):
            module.forward = SwiGLUForward(module)
            names.append(name)
    return names


def remove(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), SwiGLUForward):
            del module.forward


def _computes_swiglu(mlp: nn.Module) -> bool:
    """Whether the class's own forward is down(silu(gate(x)) · up(x)): one small input, in eval mode
    (no dropout, no random numbers drawn from torch's generator), compared with that formula."""
    weight = getattr(mlp.down_proj.base_layer, "weight", None)
    if weight is None or weight.device.type == "meta":
        return False
    dtype = weight.dtype if weight.dtype.is_floating_point else getattr(getattr(weight, "quant_state", None), "dtype",
                                                                         None)  # a 4-bit base: its dtype before
    if dtype is None:
        return False
    d_in = getattr(mlp.gate_proj, "in_features", None)
    if d_in is None:
        return False
    modes = {m: m.training for m in mlp.modules()}
    x = torch.randn(3, d_in, generator=torch.Generator().manual_seed(0)).to(weight.device, dtype)
    try:
        mlp.eval()
        with torch.no_grad():
            want = type(mlp).forward(mlp, x)
            got = mlp.down_proj(swiglu(mlp.gate_proj(x), mlp.up_proj(x)))
    except Exception:  # a forward that wants other arguments is not this structure
        return False
    finally:
        for m, training in modes.items():
            m.training = training
    return isinstance(want, torch.Tensor) and want.shape == got.shape and torch.equal(want, got)
