"""LoRA on ``nn.Embedding``: the row looked up in A (r, vocab) is projected by B (d, r)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import delta_weight
from .base import LoraLayer


class LoraEmbedding(LoraLayer):
    """h = W0[x] + s·B·A[:, x]; A = 0 and B random at start (the transpose of the linear case).

    Dropout does not apply: the input is a token id, not a feature vector.
    """

    peft_factor_keys = ("lora_embedding_A", "lora_embedding_B")  # PEFT's names: not modules, plain tensors

    def adapter_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        num_embeddings, dim = self.base_layer.weight.shape
        return (r, num_embeddings), (dim, r)

    def as_dense(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.t()  # (vocab, d) -> (d, vocab), the layout of B·A

    def from_dense(self, dense: torch.Tensor) -> torch.Tensor:
        return dense.t()

    def init_adapter(self, name: str, init: str) -> None:
        with torch.no_grad():
            nn.init.zeros_(self.lora_A[name])
            nn.init.normal_(self.lora_B[name])

    def adapter_output(self, x: torch.Tensor, name: str) -> torch.Tensor:
        base = self.base_layer
        # (..., ) ids -> (..., r) rows of Aᵀ -> (..., d)
        rows = F.embedding(x, self.lora_A[name].t(), base.padding_idx, base.max_norm, base.norm_type,
                           base.scale_grad_by_freq, base.sparse)
        return rows @ self.lora_B[name].t() * self.scaling[name]

    def delta_weight(self, name: str) -> torch.Tensor:
        # Embedding weight is (vocab, d): the transpose of B·A.
        return delta_weight(self.lora_A[name], self.lora_B[name], self.scaling[name]).t()
