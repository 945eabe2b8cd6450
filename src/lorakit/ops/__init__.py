"""The LoRA compute, shared by training, merging and serving.

Every function here has a plain torch reference; faster kernels live beside it with the same
signature and a test that compares the two.
"""

from .reference import conv_delta_weight, delta_weight, lora_delta

__all__ = ["lora_delta", "delta_weight", "conv_delta_weight"]
