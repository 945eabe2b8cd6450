"""The LoRA compute, shared by training, merging and serving.

`reference.py` is the plain torch math. `lora_linear.py` is the op every LoraLinear forward calls
(``torch.ops.lorakit.lora_linear``, a custom op with a fake kernel, autograd and vmap rules, so it
composes with ``torch.compile``, CUDA graphs and ``torch.func``; an autograd.Function twin in
eager); `swiglu_linear.py` is the same op for a SwiGLU MLP's down projection, fed by the
product's factors. `tests/test_ops.py` and `tests/test_swiglu.py` compare them with float64
recomputations of the reference.
"""

from . import lora_linear as _lora_linear  # registers torch.ops.lorakit.lora_linear
from . import swiglu_linear as _swiglu_linear  # registers torch.ops.lorakit.lora_swiglu_linear
from .reference import conv_delta_weight, delta_weight, lora_delta

__all__ = ["lora_delta", "delta_weight", "conv_delta_weight"]
