"""The merged fast path: while every row of a forward uses one adapter, that adapter is folded into
the base weights (W = W0 + s·B·A) and the forward runs at the base model's cost, with no
segmented term. It is the paper's task switching in service (§4.2: "subtract BA, add B'A'"), as
dLoRA does under skewed traffic.

Switching never drifts: the first merge of a module keeps a pristine copy of its W0 (on the CPU),
every merge computes W0 + ΔW from that copy in float32 and rounds once into the weight's dtype,
and unmerging copies W0 back. So after any number of switches W0 is bit for bit what it was, and a
merged weight differs from the exact W0 + ΔW by one rounding. The price is host memory for the
copies: the size of the base weights that merged adapters touch.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers.linear import is_conv1d_transposed
from .bank import AdapterBank
from .layers import wrapped


class MergedWeights:
    """Which adapter, if any, is merged into ``model``'s wrapped base layers."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.name: str | None = None
        self.switches = 0  # merges and unmerges done, for the engine's statistics
        self._pristine: dict[str, torch.Tensor] = {}  # module name -> W0, on the CPU
        self._changed: list[str] = []  # the modules the merged adapter wrote
        # modules whose weight is also another module's (tied embeddings: lm_head and embed_tokens); a merge
        # there would change the other one too, so an adapter that targets one runs unmerged
        self.tied = tied_modules(model)

    def use(self, name: str | None, bank: AdapterBank) -> None:
        """Make ``name`` the merged adapter (None: none); a no-op when it already is. An adapter that
        adapts a tied weight is never merged (``name`` stays None: its rows are routed unmerged)."""
        if name == self.name:
            return
        self.restore()
        if name is not None and self.tied.isdisjoint(bank.entries[name].factors.modules):
            self._merge(name, bank)

    def restore(self) -> None:
        """W0 back in every layer the merged adapter changed."""
        if self.name is None:
            return
        layers = wrapped(self.model)
        with torch.no_grad():
            for module_name in self._changed:
                if module_name in layers:
                    layers[module_name].base_layer.weight.copy_(self._pristine[module_name])
        self.name, self.switches, self._changed = None, self.switches + 1, []

    def keep_only(self, module_names) -> None:
        """Drop the W0 copies of modules not in ``module_names`` (those the engine no longer wraps);
        call it with nothing merged."""
        keep = set(module_names)
        for module_name in [m for m in self._pristine if m not in keep]:
            del self._pristine[module_name]

    def _merge(self, name: str, bank: AdapterBank) -> None:
        layers = wrapped(self.model)
        with torch.no_grad():
            for module_name, factors in bank.entries[name].factors.modules.items():
                weight = layers[module_name].base_layer.weight
                if module_name not in self._pristine:
                    self._pristine[module_name] = weight.detach().to("cpu", copy=True)
                delta = factors.B_scaled.float() @ factors.A.float()                  # (d_out, d_in)
                if is_conv1d_transposed(layers[module_name].base_layer):
                    delta = delta.t()                                                  # Conv1D: (d_in, d_out)
                w0 = self._pristine[module_name].to(weight.device, torch.float32)
                weight.copy_((w0 + delta.to(weight.device)).to(weight.dtype))
                self._changed.append(module_name)
        self.name, self.switches = name, self.switches + 1


def tied_modules(model: nn.Module) -> set[str]:
    """Names of the modules whose ``weight`` shares its storage with another parameter of ``model``."""
    owners: dict[tuple, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.device.type != "meta":
            key = (p.device, p.untyped_storage().data_ptr())
            owners.setdefault(key, []).append(name)
    return {n.removesuffix(".weight") for names in owners.values() if len(names) > 1
            for n in names if n.endswith(".weight")}
