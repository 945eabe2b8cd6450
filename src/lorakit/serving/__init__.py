"""Serving: many adapters on one base model (`Engine`, continuous batching over a slotted KV cache,
`SlotCache`; `Engine.submit` returns a `Request`, `Engine.step` gives `Event`s), over an adapter
bank (`AdapterBank`) and the segmented LoRA op (`ops.segmented_lora`)."""

from .bank import AdapterBank, BankModule
from .engine import Engine
from .kv_cache import SlotCache
from .ops import segmented_lora, segmented_lora_reference
from .reader import AdapterRefused
from .request import Event, Request
from .sampling import SamplingParams

__all__ = ["Engine", "Request", "Event", "SlotCache", "AdapterBank", "BankModule", "AdapterRefused",
           "SamplingParams", "segmented_lora", "segmented_lora_reference"]
