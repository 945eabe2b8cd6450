"""The LoRA compute, shared by training, merging and serving.

`reference.py` is the plain torch math. `fused.py` is the fused autograd op that LoraLinear uses on
CUDA (one call for layers that share an input); `tests/test_ops.py` compares it with a float64
recomputation of the reference. `rebuild.py` recomputes a layer's input in backward from tensors
autograd keeps anyway (`fused.REBUILD_INPUTS`; by default SwiGLU's product). The Triton kernels sit
beside their torch references: `triton_ops.py` computes dA from a product's two factors,
`b_grads.py` g·B with gᵀ·low from one read of g (`tests/test_triton_ops.py`).
"""

from .reference import conv_delta_weight, delta_weight, lora_delta

__all__ = ["lora_delta", "delta_weight", "conv_delta_weight"]
