"""Serving: many adapters on one base model (`Engine`), over an adapter bank (`AdapterBank`) and
the segmented LoRA op (`ops.segmented_lora`)."""

from .bank import AdapterBank, BankModule
from .engine import Engine
from .ops import segmented_lora, segmented_lora_reference
from .reader import AdapterRefused
from .sampling import SamplingParams

__all__ = ["Engine", "AdapterBank", "BankModule", "AdapterRefused", "SamplingParams", "segmented_lora",
           "segmented_lora_reference"]
