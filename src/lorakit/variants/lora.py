"""Plain LoRA: h = W0·x + s·B·A·dropout(x), ΔW = s·B·A (Hu et al. 2021, eq. 3). Every default of
`Variant` is plain LoRA's; this class only says that its output is additive."""

from __future__ import annotations

from .base import Variant


class Lora(Variant):
    name = "lora"
    additive = True
