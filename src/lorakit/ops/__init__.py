"""The LoRA compute, shared by training, merging and serving.

`reference.py` is the plain torch math. `fused.py` is the fused autograd op that LoraLinear uses on
CUDA (one call for layers that share an input); `tests/test_ops.py` compares it with a float64
recomputation of the reference. `rebuild.py` recomputes a layer's input in backward from tensors
autograd keeps anyway (opt-in, `fused.REBUILD_INPUTS`).
"""

from .reference import conv_delta_weight, delta_weight, lora_delta

__all__ = ["lora_delta", "delta_weight", "conv_delta_weight"]
