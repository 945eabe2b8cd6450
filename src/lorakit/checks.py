"""What is checked before a model changes, so that a refused call changes nothing: the ranks that
ΔW = B·A can use at each target (`check_ranks`, before inject allocates anything), and base
weights that a merge would write into while another module shares them (`tied_weight_refusal`,
before merge or unload(merge=True) touches a weight)."""

from __future__ import annotations

import math
from typing import Iterable, Mapping

from torch import nn

from .config import ConfigError, LoraConfig
from .hints import Setting
from .layers import LoraLayer, LoraSlicedLinear
from .layers.quantized import LoraQuantizedLinear


def delta_shape(layer: LoraLayer) -> tuple[int, int]:
    """(d_out, d_in) of one adapter's ΔW = B·A at ``layer``: a slice of a fused projection for a
    sliced layer, (out_channels, in_channels·kernel) for a convolution, (dim, vocab) for an embedding."""
    if isinstance(layer, LoraSlicedLinear):
        return layer.slice_size, layer.in_features
    shape_a, shape_b = layer.adapter_shapes(1)  # A (1, *d_in), B (d_out, 1, ...)
    return shape_b[0], math.prod(shape_a[1:])


def check_ranks(config: LoraConfig, layers: Mapping[str, LoraLayer]) -> None:
    """Refuse a rank above min(d_out, d_in) at any of ``layers`` (module name -> layer).

    ΔW = B·A has rank at most min(d_out, d_in) whatever r is (the paper's r ≪ min(d, k), §4.1), so
    a larger r adds only parameters, gradients and optimizer state: --rank 100000 on SmolLM2's q, v
    is ~23 GB of float32 factors, four times that with gradients and AdamW. PEFT accepts it for
    plain LoRA (only its MiCA and KaSA variants refuse), but no variant here gains from it: DoRA's
    magnitude is apart from r, and PiSSA/OLoRA take at most min(d_out, d_in) directions
    (`weight_init.check_rank`). So the limit is min, not max(d_out, d_in). Ranks above it do
    legitimately arise from factors made elsewhere, never from a choice of r: a PiSSA/OLoRA adapter
    saved as plain LoRA has rank 2r, combine's "cat" Σ rᵢ, and PEFT writes any r; those come in
    with ``inject(check_rank=False)``."""
    over = []  # (module name, its rank, (d_out, d_in)), the tightest first
    for module_name, layer in layers.items():
        rank, shape = config.rank_for(module_name), delta_shape(layer)
        if rank > min(shape):
            over.append((module_name, rank, shape))
    if not over:
        return
    over.sort(key=lambda o: min(o[2]))
    module_name, rank, (d_out, d_in) = over[0]
    more = f" (and {len(over) - 1} more target(s))" if len(over) > 1 else ""
    chosen: list[str | Setting] = [Setting("r", rank), " is"] if rank == config.r else \
        [f"rank_pattern gives {module_name} rank {rank}, which is"]
    raise ConfigError(*chosen, f" more than ΔW = B·A can use at {module_name}{more}: ΔW there is ({d_out}, {d_in}), "
                      f"so its rank is at most {min(d_out, d_in)} whatever the adapter's rank, and a larger one only "
                      f"costs memory. Give at most {min(d_out, d_in)}, or leave such modules out of ",
                      Setting("target_modules"))


def tied_weight_refusal(model: nn.Module, layers: Iterable[LoraLayer]) -> str | None:
    """Why merging the active, unmerged adapters of ``layers`` would be wrong, or None: a base weight
    that the model also uses elsewhere (tied weights: lm_head = embed_tokens under
    ``tie_word_embeddings``; a module reachable by a second path). Merging writes ΔW into that
    shared tensor, so the other user would compute with it too, while the unmerged adapter adds ΔW
    at this layer only: the merged model would not compute what the adapted model does."""
    pending = [(layer, names) for layer in layers if not isinstance(layer, LoraQuantizedLinear)
               for names in [[n for n in layer.active_adapters if n not in layer.merged_adapters]] if names]
    if not pending:
        return None
    # id(weight) -> (path, the LoRA layer whose base holds it there, or None) for every path it is used under
    users: dict[int, list[tuple[str, LoraLayer | None]]] = {}
    wanted = {id(layer.base_weight) for layer, _ in pending}
    modules = dict(model.named_modules(remove_duplicate=False))
    for path, module in modules.items():
        parent = modules.get(path.rpartition(".")[0]) if path else None
        owner = parent if isinstance(parent, LoraLayer) and parent.base_layer is module else None
        for param_name, p in module.named_parameters(recurse=False):
            if id(p) in wanted:
                users.setdefault(id(p), []).append((f"{path}.{param_name}" if path else param_name, owner))
    for layer, names in pending:
        shared = [path for path, owner in users.get(id(layer.base_weight), []) if owner is not layer]
        if shared:
            return (f"{layer.module_name}: its base weight is also {shared[0]} (tied weights), so merging adapter "
                    f"{names[0]!r} would change what {shared[0].rpartition('.')[0] or 'the model'} computes too, and "
                    f"the merged model would not compute what the adapted one does; nothing was merged. Keep the "
                    f"adapter unmerged, or give that module its own copy of the weight before inject, e.g. "
                    f"model.{shared[0]} = torch.nn.Parameter(model.{shared[0]}.detach().clone()) (and "
                    f"model.config.tie_word_embeddings = False for a transformers model)")
    return None
