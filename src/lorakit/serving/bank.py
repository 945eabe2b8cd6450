"""The adapter bank: every loaded adapter's factors, stacked per module, one slot per adapter.

For each module that at least one loaded adapter targets:

    A: (max_adapters, max_rank, d_in)     B: (max_adapters, d_out, max_rank)

stored rank-major, (max_rank, slots, d_in) and (d_out, max_rank, slots), and read through views
in the slot-major shapes above. Rank-major, the first r·S rows of A and columns of B are every
slot's components 0..r-1 (column i·S + s is slot s's component i): one contiguous block that the
graph-safe dense op (`ops.segmented_lora_dense`) multiplies by without a copy, at the narrowest
rank that holds every loaded adapter.

Slot k of every module belongs to one adapter. Its rank r ≤ max_rank fills A[k, :r] and
B[k, :, :r]; the rest is zero, so padding adds nothing. The scaling s is folded into B at load, so
the segmented op (`ops.py`) needs no per-adapter numbers. A module that adapter k does not target
keeps slot k all zeros: its rows get the base output there. Invariant: a free slot is zero in every
module, so loading an adapter writes only the modules it targets.

More adapters than slots: every added adapter is kept on the CPU (pinned when the bank is on a
GPU); one that has no slot gets one when a batch needs it (`slots_for`), taking the slot of the
least recently used adapter that batch does not need. Module buffers are made when an added
adapter first targets the module and dropped when none does any more (`modules` changes then;
the engine wraps and unwraps layers to match).

Not built yet: copying into a slot while other requests run (loading happens between batches).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..inject import check_adapter_name
from ..layers import dense_weight, is_dense
from .reader import AdapterFactors, AdapterRefused, ModuleFactors, read_adapter_factors


@dataclass
class BankModule:
    """One module's stacked factors, on the bank's device and in its dtype."""

    name: str
    A_by_rank: torch.Tensor  # (max_rank, slots, d_in)
    B_by_rank: torch.Tensor  # (d_out, max_rank, slots), s folded in
    ranks: list[int]         # per slot: the rank written there, 0 for none (for kernels that skip padding)

    @property
    def A(self) -> torch.Tensor:
        """(slots, max_rank, d_in): a view; A[k] is slot k's factor."""
        return self.A_by_rank.transpose(0, 1)

    @property
    def B(self) -> torch.Tensor:
        """(slots, d_out, max_rank): a view, the scaling folded in; B[k] is slot k's factor."""
        return self.B_by_rank.permute(2, 0, 1)

    def flat(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (rank·S, d_in), B (d_out, rank·S)): views of every slot's first ``rank`` components,
        column i·S + s being slot s's component i (what `ops.segmented_lora_dense` takes)."""
        R, S, d_in = self.A_by_rank.shape
        return self.A_by_rank[:rank].reshape(rank * S, d_in), self.B_by_rank[:, :rank].reshape(-1, rank * S)

    @property
    def widest_rank(self) -> int:
        """The largest rank in any slot: A[:, :widest_rank] and B[:, :, :widest_rank] hold every factor."""
        return max(max(self.ranks), 1)

    @property
    def d_in(self) -> int:
        return self.A.shape[2]

    @property
    def d_out(self) -> int:
        return self.B.shape[1]


@dataclass
class BankEntry:
    """An added adapter: its factors on the CPU (what every copy into a slot comes from) and its
    slot, None while it has none."""

    factors: AdapterFactors
    slot: int | None = None


class AdapterBank:
    """Adapters for one base model, stacked for mixed batches. ``skeleton`` is the base model's
    `reader.structure_copy` (names, types and shapes: what adapters are checked against)."""

    def __init__(self, skeleton: nn.Module, *, max_adapters: int = 8, max_rank: int = 64,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        for name, value in (("max_adapters", max_adapters), ("max_rank", max_rank)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.skeleton = skeleton
        self.max_adapters = max_adapters
        self.max_rank = max_rank
        self.dtype = dtype
        self.device = torch.device(device)
        self.modules: dict[str, BankModule] = {}
        self.entries: dict[str, BankEntry] = {}
        self._recent: OrderedDict[str, None] = OrderedDict()  # adapters in slots, least recently used first

    # --- adapters ----------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def slot_of(self, name: str) -> int | None:
        """The slot adapter ``name`` is in now, or None while it waits on the CPU."""
        return self._entry(name).slot

    def read(self, path: str | os.PathLike) -> AdapterFactors:
        """The adapter at ``path``, read and checked for this bank (`reader.read_adapter_factors`,
        plus its rank against ``max_rank``), without changing the bank: safe on another thread
        while the engine runs, so a server reads files without pausing generation."""
        factors = read_adapter_factors(self.skeleton, path)
        if factors.max_rank > self.max_rank:
            where = next(n for n, f in factors.modules.items() if f.rank == factors.max_rank)
            raise AdapterRefused(f"adapter {path} has rank {factors.max_rank} at {where}, over the bank's "
                                 f"max_rank={self.max_rank}; make the engine with a larger max_rank")
        if self.device.type == "cuda":  # pinned, so a copy into a slot does not stage through pageable memory
            factors = _pinned(factors)
        return factors

    def add(self, name: str, source: str | os.PathLike | AdapterFactors) -> None:
        """Add the adapter at ``source`` (a path, or what `read` returned) as ``name``, into a free
        slot if there is one.

        Everything is read and checked before the bank changes, so a refused adapter (see `read`,
        plus: a name in use) leaves the bank exactly as it was."""
        check_adapter_name(name)
        if name in self.entries:
            raise ValueError(f"adapter {name!r} is already in the bank; remove it first or pick another name")
        factors = source if isinstance(source, AdapterFactors) else self.read(source)
        created = [m for m in factors.modules if m not in self.modules]
        try:
            for module_name in created:
                self.modules[module_name] = self._new_module(module_name)
        except Exception:
            for module_name in created:
                self.modules.pop(module_name, None)
            raise
        self.entries[name] = BankEntry(factors)
        free = self._free_slots()
        if free:
            self._load(name, free[0])

    def remove(self, name: str) -> None:
        """Forget ``name`` (its slot is zeroed); modules no adapter targets any more are dropped."""
        entry = self._entry(name)
        if entry.slot is not None:
            self._unload(name)
        del self.entries[name]
        still_used = {m for e in self.entries.values() for m in e.factors.modules}
        for module_name in entry.factors.modules:
            if module_name not in still_used:
                del self.modules[module_name]

    def slots_for(self, names: Sequence[str | None]) -> list[int]:
        """The slot of each name (None: -1, the base model), after putting every named adapter that
        waits on the CPU into a slot: a free one, else that of the least recently used adapter
        not among ``names``. A batch can use at most ``max_adapters`` distinct adapters."""
        wanted = list(dict.fromkeys(n for n in names if n is not None))
        for name in wanted:
            self._entry(name)
        if len(wanted) > self.max_adapters:
            raise AdapterRefused(f"a batch uses {len(wanted)} distinct adapters, but the bank has "
                                 f"max_adapters={self.max_adapters} slots; batch fewer adapters together or make "
                                 f"the engine with a larger max_adapters")
        for name in wanted:
            if self.entries[name].slot is None:
                free = self._free_slots()
                if not free:
                    victim = next(n for n in self._recent if n not in wanted)
                    free = [self.entries[victim].slot]
                    self._unload(victim)
                self._load(name, free[0])
            self._recent.move_to_end(name)
        return [-1 if n is None else self.entries[n].slot for n in names]

    @property
    def widest_rank(self) -> int:
        """The largest rank of any adapter in a slot, in any module (at least 1)."""
        return max((m.widest_rank for m in self.modules.values()), default=1)

    def nbytes(self) -> int:
        """Memory the stacked factors take on the bank's device."""
        return sum(m.A.nbytes + m.B.nbytes for m in self.modules.values())

    # --- the pieces --------------------------------------------------------------------------

    def _entry(self, name: str) -> BankEntry:
        if name not in self.entries:
            raise KeyError(f"no adapter {name!r} in the bank; it has {self.names}")
        return self.entries[name]

    def _free_slots(self) -> list[int]:
        taken = {e.slot for e in self.entries.values()}
        return [k for k in range(self.max_adapters) if k not in taken]

    def _load(self, name: str, slot: int) -> None:
        entry = self.entries[name]
        with torch.no_grad():
            for module_name, f in entry.factors.modules.items():
                module, r = self.modules[module_name], f.rank
                module.A[slot, :r].copy_(f.A, non_blocking=True)            # (r, d_in); the rest stays 0
                module.B[slot, :, :r].copy_(f.B_scaled, non_blocking=True)  # (d_out, r)
                module.ranks[slot] = r
        entry.slot = slot
        self._recent[name] = None

    def _unload(self, name: str) -> None:
        entry = self.entries[name]
        with torch.no_grad():
            for module_name in entry.factors.modules:
                module = self.modules[module_name]
                module.A[entry.slot].zero_()
                module.B[entry.slot].zero_()
                module.ranks[entry.slot] = 0
        entry.slot = None
        del self._recent[name]

    def _new_module(self, module_name: str) -> BankModule:
        base = self.skeleton.get_submodule(module_name)
        if not is_dense(base):  # the reader refuses these; this is the bank's own guard
            raise AdapterRefused(f"{module_name} is not a linear layer; the serving bank adapts linear layers only")
        d_out, d_in = dense_weight(base).shape
        kw = {"dtype": self.dtype, "device": self.device}
        return BankModule(module_name,
                          A_by_rank=torch.zeros(self.max_rank, self.max_adapters, d_in, **kw),
                          B_by_rank=torch.zeros(d_out, self.max_rank, self.max_adapters, **kw),
                          ranks=[0] * self.max_adapters)


def _pinned(factors: AdapterFactors) -> AdapterFactors:
    modules = {n: ModuleFactors(f.A.pin_memory(), f.B_scaled.pin_memory()) for n, f in factors.modules.items()}
    return AdapterFactors(factors.path, factors.config, modules)
