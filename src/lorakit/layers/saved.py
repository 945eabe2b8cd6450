"""Modules trained in full beside an adapter (PEFT's ``modules_to_save``), e.g. a classifier head."""

from __future__ import annotations

import copy

import torch
from torch import nn


class TrainableCopy(nn.Module):
    """Keeps the original module frozen and one trainable copy per adapter; the forward uses the
    copy of the first active adapter that has one, else the original."""

    def __init__(self, original: nn.Module, module_name: str = "") -> None:
        super().__init__()
        self.original_module = original
        self.module_name = module_name
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disabled = False

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save.keys())

    def add_adapter(self, name: str) -> None:
        clone = copy.deepcopy(self.original_module)
        for p in clone.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = clone

    def delete_adapter(self, name: str) -> None:
        del self.modules_to_save[name]
        if name in self.active_adapters:
            self.active_adapters.remove(name)

    def set_active(self, names) -> None:
        self.active_adapters = [n for n in names if n in self.modules_to_save]

    def current(self) -> nn.Module:
        if not self.disabled and self.active_adapters:
            return self.modules_to_save[self.active_adapters[0]]
        return self.original_module

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.current()(*args, **kwargs)

    def __getattr__(self, name: str):
        # Code around the module reads attributes such as `weight` (tied heads) or `out_features`.
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Not during construction or copying, when `modules_to_save` does not exist yet.
            if name.startswith("_") or "modules_to_save" not in self.__dict__.get("_modules", {}):
                raise
            return getattr(self.current(), name)
