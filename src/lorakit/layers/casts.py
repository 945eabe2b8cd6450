"""The fused-path adapters of one model, cast to the compute dtype in one go per optimizer step,
and each fused layer's ready-made call for the model's forward (its ticket)."""

from __future__ import annotations

import torch

from ..ops import fused as fused_op
from .linear import LoraLinear, SharedInput, Ticket, _version


class AdapterCasts:
    """The fused-path adapters of one model, cast to the compute dtype for all layers in one go.

    An optimizer step changes every adapter, and casting them layer by layer on the next forward
    costs two kernel launches per layer, plus one concatenation per sibling group: hundreds of
    launches that a launch-bound forward pays for in full. ``refresh`` (run by the model's forward
    pre-hook) instead concatenates the float adapters and casts them with a couple of kernels into
    one buffer, laid out so that each group's stacked A is a view of it, and hands every layer its
    views through the layer's own cache — as if the layer had cast them itself. A layer called
    outside the model's forward, or in another dtype, finds its cache stale and casts for itself.

    The buffer is written in place and the fused op saves the views it multiplies with, so a graph
    built before an optimizer step fails in backward as autograd's own version check would, rather
    than using the new values.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None  # what the layout was made for
        self._sources: list[torch.Tensor] = []  # flat views of the adapters, in layout order
        self._entries: list[tuple] = []  # (layer, A, B, then A, Aᵀ, B, Bᵀ in dtype) per layer
        self._cats: list[tuple] = []  # (leader, the group's A casts, their stacked view)
        self._buffer: torch.Tensor | None = None
        self._versions: tuple | None = None
        self._expected: list[tuple] = []  # (a group's adapters, the versions its ticket accepts: a list)
        self._epoch: object | None = None  # what the current tickets hold; a new layout makes a new one
        self.token: object | None = None  # the epoch while the model's forward runs, else None

    def end(self) -> None:
        """The model's forward is over: its tickets lapse (a layer called alone takes the general path)."""
        self.token = None

    def refresh(self, layers: list[LoraLinear], groups: list[SharedInput]) -> None:
        self.token = None
        if torch.compiler.is_compiling():
            return
        found, dtypes, key, versions = [], set(), [], []
        for layer in layers:
            base = layer._modules.get("base_layer")
            weight = base._parameters.get("weight") if base is not None else None
            args = layer.fused_args(weight) if weight is not None else None
            if args is not None:
                W, b, A, B, scaling, p = args
                found.append((layer, A, B, args))
                dtypes.add((weight.device.type, weight.dtype))
                key += (id(layer), id(A), id(B), A.data_ptr(), B.data_ptr(), id(W), W.data_ptr(), id(b),
                        scaling, p, layer.training)
                versions += (A._version, B._version)
        if len(dtypes) != 1:  # one buffer, one dtype
            self._drop(layers)
            return
        kind, weight_dtype = dtypes.pop()
        dtype = _compute_dtype(kind, weight_dtype)
        versions = tuple(versions)
        key = (dtype, torch.is_autocast_enabled(kind), tuple(key),
               tuple(tuple(id(f) for f in chain) for group in groups for chain in group.followers.items()))
        new_layout = key != self._key
        if new_layout:
            self._layout(found, groups, dtype)
            self._key = key
        if versions != self._versions or _capturing(kind):  # a graph being captured records the
            with torch.no_grad(), torch.inference_mode(False):  # copy for its replays
                self._buffer.copy_(torch.cat(self._sources))  # one cast for every adapter
            self._versions = versions
            for layer, A, B, *views in self._entries:  # __dict__: nn.Module's __setattr__ is slow
                layer.__dict__["_casts"] = (A, B, (A._version, B._version, A.data_ptr(), B.data_ptr()), dtype, *views)
            for leader, As, A_cat, A_cat_t in self._cats:
                leader.__dict__["_cat"] = (As, A_cat, A_cat_t, tuple(_version(a) for a in As))
            if not new_layout:
                for tensors, expected in self._expected:
                    expected[:] = [t._version for t in tensors]
        if new_layout:
            self._issue_tickets(layers, found, groups, kind, dtype)
        self.token = self._epoch

    def _issue_tickets(self, layers: list[LoraLinear], found: list[tuple], groups: list[SharedInput],
                       kind: str, dtype: torch.dtype) -> None:
        """Give every fused layer its call, made here once per layout rather than on every call: a
        leader gets its group's parameters and plan (casts, transposed weights, scalings), a
        follower a note to take the leader's output. A ticket holds this layout's epoch and is
        honoured only while the model's forward runs (`token`), and only for the adapter versions
        that `refresh` last cast (`_expected`). A layer with dropout gets none (its mask seed is
        drawn per call): the general path serves it, as it does any layer whose ticket does not fit."""
        for layer in layers:
            layer.__dict__["_ticket"] = None
        epoch = self._epoch = object()
        self._expected = []
        autocast = torch.is_autocast_enabled(kind)
        args_of = {layer: args for layer, _, _, args in found}
        chains = {leader: chain for group in groups for leader, chain in group.followers.items()}
        following = {f for chain in chains.values() for f in chain}
        for layer, args in args_of.items():
            if args[-1] != 0 or layer in following:
                continue  # dropout, or a follower (handled with its leader)
            chain = chains.get(layer, ())
            members = [layer] + [f for f in chain if f in args_of and args_of[f][-1] == 0]
            if len(members) != 1 + len(chain):
                continue  # part of a group is off the fused path: its stacked A is not a view of the
                #           buffer, so it is made per call on the general path, after every cast
            specs = [args_of[m][:-1] for m in members]
            casts = layer._cast_adapters(members, specs, dtype)
            transposed = tuple(m._transposed_weight(spec[0], dtype) for m, spec in zip(members, specs))
            params = tuple(t for W, b, A, B, _ in specs for t in (W, b, A, B))
            plan = (tuple(spec[4] for spec in specs), 0.0, 0, *casts, transposed, fused_op.plan_meta(specs))
            tensors = tuple(t for _, _, A, B, _ in specs for t in (A, B))
            expected = [t._version for t in tensors]
            self._expected.append((tensors, expected))
            followers = tuple(members[1:])
            layer.__dict__["_ticket"] = Ticket(epoch, self, kind, autocast, layer.training, dtype, followers,
                                               params, plan, tensors, expected)
            for f in followers:
                f.__dict__["_ticket"] = Ticket(epoch, self, kind, autocast, f.training, dtype, None,
                                           None, None, tensors, expected)

    def _layout(self, found: list[tuple], groups: list[SharedInput], dtype: torch.dtype) -> None:
        """Order the adapters so that each group's A's are adjacent, and make the buffer's views."""
        adapters = {layer: (A, B) for layer, A, B, _ in found}
        chains = [(leader, *chain) for group in groups for leader, chain in group.followers.items()]
        chains = [c for c in chains if all(layer in adapters for layer in c)]
        in_chain = {layer for chain in chains for layer in chain}
        order = [layer for chain in chains for layer in chain] + [x for x in adapters if x not in in_chain]
        # All A's, then all B's: within a chain the A's follow each other, so [A_1; A_2; …] is a view.
        tensors = [adapters[layer][0] for layer in order] + [adapters[layer][1] for layer in order]
        with torch.no_grad(), torch.inference_mode(False):
            self._sources = [t.detach().view(-1) for t in tensors]
            buffer = torch.empty(sum(t.numel() for t in tensors), dtype=dtype, device=tensors[0].device)
            casts, offsets, start = [], {}, 0
            for t in tensors:
                offsets.setdefault(id(t), start)
                casts.append(buffer[start:start + t.numel()].view(t.shape))
                start += t.numel()
            n = len(order)
            self._entries = [(layer, *adapters[layer], casts[k], casts[k].t(), casts[n + k], casts[n + k].t())
                             for k, layer in enumerate(order)]
            self._cats = []
            for chain in chains:
                As = tuple(casts[order.index(layer)] for layer in chain)
                first = offsets[id(adapters[chain[0]][0])]
                rows = sum(a.shape[0] for a in As)
                A_cat = buffer[first:first + rows * As[0].shape[1]].view(rows, -1)
                self._cats.append((chain[0], As, A_cat, A_cat.t()))
        self._buffer, self._versions = buffer, None

    def _drop(self, layers: list[LoraLinear]) -> None:
        if self._key is not None:
            for layer in layers:
                layer.__dict__["_ticket"] = None
            self.__init__()


def _compute_dtype(kind: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype the fused op computes in for a weight on a ``kind`` device: autocast's where it is
    on, else the weight's."""
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else dtype


def _capturing(kind: str) -> bool:
    """Whether a CUDA graph is being captured on the current stream: the Python of this forward runs
    once, and what it skips is skipped at every replay."""
    return kind == "cuda" and torch.cuda.is_current_stream_capturing()
