"""LoRA on a dense layer: ``nn.Linear`` or transformers' ``Conv1D`` (GPT-2, weight stored transposed)."""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
from torch import nn

from ..ops import delta_weight, lora_delta
from ..ops import fused as fused_op
from ..ops.fused import fused_lora_linears
from .base import LoraLayer


def is_conv1d_transposed(module: nn.Module) -> bool:
    """transformers' Conv1D: a linear layer whose weight is (d_in, d_out) — the fan_in_fan_out case."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def dense_features(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an nn.Linear or a Conv1D."""
    if is_conv1d_transposed(module):
        d_in, d_out = module.weight.shape
    else:
        d_out, d_in = module.weight.shape
    return d_in, d_out


class Ticket(NamedTuple):
    """A fused layer's call, made once per layout by `AdapterCasts` rather than on every call."""

    epoch: object  # honoured while it is the owner's token: during the model's forward
    owner: object  # the AdapterCasts that made it
    kind: str  # device type
    autocast: bool  # autocast on when it was made
    training: bool
    dtype: torch.dtype  # the compute dtype
    followers: tuple | None  # a leader's followers (maybe none); None for a follower
    params: tuple | None  # the leader's (W, b, A, B) per member, as LoraLinearFunction takes them
    plan: tuple | None  # and its plan
    tensors: tuple  # the group's adapters ...
    versions: list  # ... and the versions they were last cast at (updated in place by the owner)


class LoraLinear(LoraLayer):
    """h = W0·x + s·B·A·dropout(x), A: (r, d_in), B: (d_out, r).

    On CUDA the forward goes through the fused op (`ops/fused.py`): base and adapter in one autograd
    function that saves no dropout copy, and — for sibling layers found to read the same tensor,
    like q/k/v or gate/up — one A-projection and one input gradient for the whole group.
    ``use_fused_op``: None (default) = on CUDA only; True/False force it on or off.
    """

    def __init__(self, base_layer: nn.Module, module_name: str = "") -> None:
        super().__init__(base_layer, module_name)
        self.fan_in_fan_out = is_conv1d_transposed(base_layer)
        self.in_features, self.out_features = dense_features(base_layer)
        self.use_fused_op: bool | None = None
        self.shared_input: SharedInput | None = None  # set by link_siblings()
        self._casts: tuple | None = None  # (A, B, versions, dtype, then A, Aᵀ, B, Bᵀ in dtype)
        self._cat: tuple | None = None  # (the A casts it was made from, their concatenation, its
        #                                   transpose, the casts' versions then)
        self._weight_t: tuple | None = None  # (weight, its data pointer, its transposed view)
        self._ticket: Ticket | None = None  # its ready-made fused call, made by AdapterCasts

    def fused_args(self, x: torch.Tensor) -> tuple | None:
        """(weight, bias, A, B, scaling, dropout p) when this call can take the fused op, else None.

        Called on every forward, so it reads the module tables directly rather than through
        nn.Module's attribute lookup."""
        use = self.use_fused_op
        if not (x.is_cuda if use is None else use) or self.disabled or self.fan_in_fan_out:
            return None
        modules = self._modules
        base = modules["base_layer"]
        if type(base) is not nn.Linear or torch.compiler.is_compiling():  # the compiler fuses the reference ops
            return None
        pending = self.active_adapters
        if self.merged_adapters:
            pending = [n for n in pending if n not in self.merged_adapters]
        if len(pending) != 1:
            return None
        name = pending[0]
        dropout = modules["lora_dropout"]._modules[name]
        p = dropout.p if self.training and type(dropout) is nn.Dropout else 0.0
        weights = base._parameters
        return (weights["weight"], weights["bias"], modules["lora_A"]._parameters[name],
                modules["lora_B"]._parameters[name], self.scaling[name], p)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        ticket = self._ticket
        if ticket is not None and ticket[0] is ticket[1].token and not args and not kwargs:
            out = self._forward_ticketed(x, ticket)
            if out is not None:
                return out
        fused = None if args or kwargs or not x.is_floating_point() else self.fused_args(x)
        if fused is None:
            return super().forward(x, *args, **kwargs)
        group = self.shared_input
        if group is not None and fused[-1] == 0:
            out = group.take(self, x, fused)
            if out is not None:
                return out
        x_run = x
        kind = "cuda" if x.is_cuda else x.device.type
        if torch.is_autocast_enabled(kind):  # compute in the autocast dtype, as F.linear would
            x_run = x.to(torch.get_autocast_dtype(kind))
        *layer, p = fused
        grouped = group is not None and p == 0  # a dropout mask is per layer: no sharing then
        followers = [(f, args_) for f in group.followers_of(self)
                     if (args_ := f.fused_args(x)) is not None and args_[-1] == 0] if grouped else []
        layers = [layer] + [a[:-1] for _, a in followers]
        owners = [self] + [f for f, _ in followers]
        casts = self._cast_adapters(owners, layers, x_run.dtype)
        transposed = tuple(owner._transposed_weight(W, x_run.dtype) for owner, (W, *_) in zip(owners, layers))
        outs = fused_lora_linears(x_run, layers, p, training=p > 0, casts=casts, transposed=transposed)
        if grouped:
            if followers:
                group.stash(x, {f: (a, o) for (f, a), o in zip(followers, outs[1:])})
            group.observe(self, x)
        return outs[0]

    def _forward_ticketed(self, x: torch.Tensor, ticket: tuple) -> torch.Tensor | None:
        """The fused call that `AdapterCasts` prepared for this layout (`Ticket`), or None where
        anything it was made for no longer holds (then the general path decides)."""
        token, _, kind, autocast, training, dtype, followers, params, plan, tensors, versions = ticket
        if (self.training is not training or torch.is_autocast_enabled(kind) is not autocast
                or any(t._version != v for t, v in zip(tensors, versions))):
            return None
        group = self.shared_input
        if followers is None:  # a follower: the output its leader computed from this very x
            return group.take_ticketed(self, x, token)
        x_run = x
        if x.dtype != dtype:
            if not autocast or not x.is_floating_point():
                return None
            x_run = x.to(dtype)  # the autocast dtype, as F.linear would compute in
        outs = fused_op.lora_linear_apply(x_run, plan, *params)
        if group is not None:
            if followers:
                group.stash_ticketed(x, dict(zip(followers, outs[1:])), token)
            group.observe(self, x)
        return outs[0]

    def _cast_adapter(self, A: torch.Tensor, B: torch.Tensor, dtype: torch.dtype) -> tuple:
        """(A, Aᵀ, B, Bᵀ) in ``dtype``, detached, made again only after an optimizer step (or any other
        in-place change) touches them: two fewer kernel launches per layer and call."""
        versions = (A._version, B._version, A.data_ptr(), B.data_ptr())  # .to() swaps storage, not version
        c = self._casts
        if c is None or c[0] is not A or c[1] is not B or c[2] != versions or c[3] != dtype:
            A_cast, B_cast = A.detach().to(dtype), B.detach().to(dtype)
            c = self.__dict__["_casts"] = (A, B, versions, dtype, A_cast, A_cast.t(), B_cast, B_cast.t())
        return c[4:]

    def _cast_adapters(self, owners: list[LoraLinear], layers: list[tuple], dtype: torch.dtype) -> tuple:
        """(A_cat, A_catᵀ, Bs, Bsᵀ) for the fused op: the layers' adapters in ``dtype``, A's stacked."""
        casts = [owner._cast_adapter(A, B, dtype) for owner, (_, _, A, B, _) in zip(owners, layers)]
        if len(casts) == 1:
            A_cast, A_cast_t, B_cast, B_cast_t = casts[0]
            return A_cast, A_cast_t, (B_cast,), (B_cast_t,)
        As = tuple(c[0] for c in casts)
        Bs, Bts = tuple(c[2] for c in casts), tuple(c[3] for c in casts)
        # Casts that are views of AdapterCasts' buffer keep their identity across optimizer steps;
        # their version counter is what moves.
        c = self._cat
        versions = tuple(_version(a) for a in As)
        if (c is None or len(c[0]) != len(As) or any(a is not b for a, b in zip(c[0], As))
                or c[3] != versions):
            A_cat = torch.cat(As)
            c = self.__dict__["_cat"] = (As, A_cat, A_cat.t(), versions)
        return c[1], c[2], Bs, Bts

    def _transposed_weight(self, W: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """Wᵀ as a view kept between calls (it follows in-place changes; a new storage makes a new
        one), or None when W is not in ``dtype`` and the fused op must cast it."""
        if W.dtype != dtype:
            return None
        c = self._weight_t
        if c is None or c[0] is not W or c[1] != W.data_ptr():
            with torch.inference_mode(False):  # kept for later calls, which may record autograd
                c = self.__dict__["_weight_t"] = (W, W.data_ptr(), W.detach().t())
        return c[2]

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self._casts = self._cat = None  # let the deleted adapter's tensors go

    def adapter_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (r, self.in_features), (self.out_features, r)

    def adapter_output(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return lora_delta(self._input_for(x, name), self.lora_A[name], self.lora_B[name], self.scaling[name])

    def delta_weight(self, name: str) -> torch.Tensor:
        dw = delta_weight(self.lora_A[name], self.lora_B[name], self.scaling[name])  # (d_out, d_in)
        return dw.t() if self.fan_in_fan_out else dw


def _version(t: torch.Tensor) -> int | None:
    """In-place version counter; inference-mode tensors have none (they are never changed in place
    within a forward in practice, and identity still has to match)."""
    return None if t.is_inference() else t._version


class SharedInput:
    """Sibling LoRA linears (one parent, one input width) that may read the same tensor.

    Whether they do is learned at run time: a layer called with the very tensor (same object, same
    version) the previous sibling call got becomes that sibling's follower. Learned changes wait
    until ``promote()`` (called at the start of the model's next forward), so a forward and its
    checkpointed recomputation always run the same ops. From then on the leader computes its
    followers' outputs in the same fused call and keeps them here until each follower asks with
    that same tensor; a follower that asks with anything else (or never asks) gets its own output
    computed and is dropped from the group at the next promotion. Correctness never rests on the
    guess: a kept output is handed out only for the exact input, weights and adapters it came from.
    """

    def __init__(self) -> None:
        self.followers: dict[LoraLinear, tuple[LoraLinear, ...]] = {}  # in effect
        self._next: dict[LoraLinear, tuple[LoraLinear, ...]] | None = None  # learned, not yet in effect
        self._stash: dict[LoraLinear, tuple] = {}
        self._last: tuple | None = None  # (weakref to x, version, layer) of the latest leading call

    def promote(self) -> None:
        if self._next is not None:
            self.followers = {k: v for k, v in self._next.items() if v}
            self._next = None
        for layer in self._stash:  # outputs of the last forward that nobody asked for
            self._drop(layer)
        self._stash, self._last = {}, None

    def followers_of(self, leader: LoraLinear) -> tuple[LoraLinear, ...]:
        return self.followers.get(leader, ())

    @staticmethod
    def _key(x: torch.Tensor, args: tuple) -> tuple:
        """What a kept output depends on: x's and the layer's tensors' versions, scaling, grad mode."""
        return (_version(x), torch.is_grad_enabled(), torch.is_autocast_enabled(x.device.type), args[4],
                *(_version(t) for t in args[:4] if t is not None))

    def take(self, layer: LoraLinear, x: torch.Tensor, now: tuple | None) -> torch.Tensor | None:
        """The output kept for ``layer``, if it was computed from this very x and from the tensors
        ``now`` (the layer's `fused_args` for this call) names, unchanged; else None."""
        entry = self._stash.pop(layer, None)
        if entry is None:
            return None
        ref, args, key, out = entry
        if (type(args) is tuple and ref() is x and now is not None and all(a is b for a, b in zip(now[:4], args[:4]))
                and key == self._key(x, now)):
            return out
        self._drop(layer)
        return None

    def take_ticketed(self, layer: LoraLinear, x: torch.Tensor, token: object) -> torch.Tensor | None:
        """`take` for a follower whose ticket says its leader computed it in this forward: only x
        (the very tensor, unchanged) and the grad mode are left to check."""
        entry = self._stash.pop(layer, None)
        if entry is None:
            return None
        ref, args, key, out = entry
        if args is token and ref() is x and key == (_version(x), torch.is_grad_enabled()):
            return out
        self._drop(layer)
        return None

    def stash_ticketed(self, x: torch.Tensor, outs: dict[LoraLinear, torch.Tensor], token: object) -> None:
        """`stash` for a leader that ran its ticket: the outputs are for this forward's tickets."""
        for layer in self._stash:
            self._drop(layer)
        ref, key = weakref.ref(x), (_version(x), torch.is_grad_enabled())
        self._stash = {layer: (ref, token, key, out) for layer, out in outs.items()}

    def stash(self, x: torch.Tensor, entries: dict[LoraLinear, tuple[tuple, torch.Tensor]]) -> None:
        """Keep each follower's output, with the fused_args it was computed from."""
        for layer in self._stash:  # computed last time and never asked for
            self._drop(layer)
        ref = weakref.ref(x)
        self._stash = {layer: (ref, args, self._key(x, args), out) for layer, (args, out) in entries.items()}

    def observe(self, layer: LoraLinear, x: torch.Tensor) -> None:
        """Called after a layer computed its own output from x: learn who reads the same x.
        Once the groups are learned this only records the latest leading call (no plan copy)."""
        last = self._last
        same_input = (last is not None and last[2] is not layer and last[0]() is x
                      and last[1] == _version(x))
        plan = self._next if self._next is not None else self.followers
        if any(layer in chain for chain in plan.values()):
            return  # a follower computing alone (its kept output did not fit) leads nothing
        if same_input and not plan.get(layer):
            plan = self._plan()
            plan[last[2]] = plan.get(last[2], ()) + (layer,)
        else:
            self._last = (weakref.ref(x), _version(x), layer)

    def _plan(self) -> dict[LoraLinear, tuple[LoraLinear, ...]]:
        if self._next is None:
            self._next = dict(self.followers)
        return self._next

    def _drop(self, layer: LoraLinear) -> None:
        plan = self._plan()
        for leader, chain in list(plan.items()):
            if layer in chain:
                plan[leader] = tuple(f for f in chain if f is not layer)


def link_siblings(model: nn.Module) -> list[SharedInput]:
    """Give sibling LoraLinear layers with the same input width a SharedInput (q/k/v/o, gate/up)."""
    groups = []
    for parent in model.modules():
        by_width: dict[int, list[LoraLinear]] = {}
        for child in parent.children():
            if isinstance(child, LoraLinear) and not child.fan_in_fan_out:
                by_width.setdefault(child.in_features, []).append(child)
        for members in by_width.values():
            group = SharedInput() if len(members) > 1 else None
            groups += [group] if group else []
            for layer in members:
                layer.shared_input = group
    return groups
