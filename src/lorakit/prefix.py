"""LoRA + prefix embeddings (Hu et al. 2021, §5.1 and Table 15, "LoRA+PE"): ``n_prefix`` trainable
virtual-token embeddings in front of every input, trained together with a LoRA adapter.

The prefix is the input-layer half of the paper's PrefixEmbed baseline (Li & Liang 2021): rows
of the input embedding that belong to no token, so the model reads them exactly as it reads
tokens. lorakit places them through *placeholder ids*: a sequence gets ``n_prefix`` extra ids
right before its first real token, and after the embedding lookup those positions are overwritten
with the prefix rows. Everything that counts positions (attention masks, position ids from the
mask's cumulative sum, KV-cache lengths in the serving engine) then just works, and a left-padded
prompt gets its prefix after its padding, at positions 0..n_prefix-1, as if it ran alone.

On disk the prefix lives beside the adapter, in its own file; the adapter directory stays what
PEFT writes and reads (PEFT ignores the extra file):

    adapter/
      adapter_config.json               PEFT's
      adapter_model.safetensors         PEFT's
      prefix_embeddings.safetensors     one float32 tensor "prefix_embeddings" (n_prefix, hidden),
                                        metadata: format, format_version, n_prefix, hidden_size,
                                        base_model (when known)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .data import IGNORE_INDEX
from .files import atomic_write_files

PREFIX_FILE = "prefix_embeddings.safetensors"
PREFIX_KEY = "prefix_embeddings"
FORMAT = "lorakit.prefix_embeddings"
FORMAT_VERSION = "1"


class PrefixFileError(ValueError):
    """A prefix file that cannot be used with this model; the message says why and what to do."""


class PrefixEmbedding(nn.Module):
    """``n_prefix`` trainable input embeddings (float32, shape (n_prefix, hidden)).

    Initialised from the model's own input-embedding rows of ``n_prefix`` vocabulary tokens drawn
    at random (``seed``): prompt tuning (Lester et al. 2021, §3.2 and Fig. 3b) found sampled
    vocabulary rows train better than random vectors, since they start where the model's inputs
    live (the right norm, a region the first layer has seen) rather than anywhere in R^hidden.
    """

    def __init__(self, n_prefix: int, hidden_size: int) -> None:
        super().__init__()
        if not isinstance(n_prefix, int) or isinstance(n_prefix, bool) or n_prefix < 1:
            raise ValueError(f"n_prefix (the number of prefix embeddings) must be a positive integer, got {n_prefix!r}")
        self.weight = nn.Parameter(torch.zeros(n_prefix, hidden_size, dtype=torch.float32))

    @property
    def n_prefix(self) -> int:
        return self.weight.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.weight.shape[1]

    @classmethod
    def from_vocabulary(cls, model: nn.Module, n_prefix: int, seed: int = 0) -> PrefixEmbedding:
        """A prefix for ``model`` whose rows are copies of its input embeddings of ``n_prefix``
        distinct tokens drawn with ``seed``; on the embedding's device."""
        table = model.get_input_embeddings().weight                                  # (V, hidden)
        prefix = cls(n_prefix, table.shape[1])
        g = torch.Generator().manual_seed(seed)
        rows = torch.randperm(table.shape[0], generator=g)[:n_prefix]
        if rows.numel() < n_prefix:
            raise ValueError(f"n_prefix={n_prefix} is larger than the vocabulary ({table.shape[0]} tokens)")
        with torch.no_grad():
            prefix.weight.copy_(table.detach()[rows.to(table.device)].float())
        return prefix.to(table.device)

    def inputs_embeds(self, model: nn.Module, input_ids: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        """The model's input embeddings of ``input_ids`` (B, T) with columns ``starts[b] ..
        starts[b] + n_prefix - 1`` of row b replaced by the prefix; differentiable in the prefix."""
        embeds = model.get_input_embeddings()(input_ids)                                  # (B, T, H)
        n = self.n_prefix
        column = torch.arange(input_ids.shape[1], device=input_ids.device)[None]          # (1, T)
        offset = column - starts.to(input_ids.device)[:, None]                            # (B, T)
        inside = (offset >= 0) & (offset < n)
        placed = self.weight.to(embeds.dtype)[offset.clamp(0, n - 1)]                     # (B, T, H)
        return torch.where(inside[..., None], placed, embeds)


# --- batches ------------------------------------------------------------------------------------

def insert_placeholders(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, n_prefix: int,
                        placeholder_id: int = 0, labels: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Make room for the prefix: ``n_prefix`` placeholder columns right before each row's first
    real token (column 0 for right-padded or unpadded rows, after the padding for left-padded ones).

    Returns (input_ids, attention_mask, labels, starts), each (B, T + n_prefix) but ``starts`` (B,),
    the column where each row's prefix begins. The prefix columns have attention mask 1 and label
    -100 (no loss on them); every other column moves with its token."""
    batch, width = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    starts = attention_mask.ne(0).int().argmax(dim=1)  # first real column (argmax returns the first maximum)
    column = torch.arange(width + n_prefix, device=input_ids.device)[None]               # (1, T + n)
    s = starts[:, None]
    # Where each output column reads from in cat([x, prefix columns], dim=1): before the start its
    # own column, then the n prefix columns (width .. width+n-1), then the row shifted by n.
    source = torch.where(column < s, column, torch.where(column < s + n_prefix, width + column - s, column - n_prefix))

    def spliced(x: torch.Tensor, fill: int) -> torch.Tensor:
        extra = torch.full((batch, n_prefix), fill, dtype=x.dtype, device=x.device)
        return torch.cat([x, extra], dim=1).gather(1, source)

    return (spliced(input_ids, placeholder_id), spliced(attention_mask, 1),
            spliced(labels, IGNORE_INDEX) if labels is not None else None, starts)


def prefix_batch(model: nn.Module, prefix: PrefixEmbedding, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A causal-LM batch {input_ids, attention_mask, labels, ...} as the model runs it with the
    prefix: {inputs_embeds, attention_mask, labels, ...}, n_prefix columns longer (see
    `insert_placeholders`). Other per-token keys are refused; other keys pass through."""
    ids, labels = batch.get("input_ids"), batch.get("labels")
    if ids is None:
        raise ValueError("a prefix (n_prefix) is put in front of input_ids; this batch has none")
    if labels is not None and labels.shape != ids.shape:
        raise ValueError(f"n_prefix (prefix embeddings) trains causal LMs, whose labels are shaped like input_ids "
                         f"{tuple(ids.shape)}; these labels have shape {tuple(labels.shape)} (a classifier?): "
                         "train without n_prefix")
    others = [k for k, v in batch.items() if k not in ("input_ids", "attention_mask", "labels")
              and isinstance(v, torch.Tensor) and v.shape[:2] == ids.shape]
    if others:
        raise ValueError(f"the batch has per-token {others}, which a prefix would shift; n_prefix takes batches of "
                         "input_ids, attention_mask and labels only")
    new_ids, mask, new_labels, starts = insert_placeholders(ids, batch.get("attention_mask"), prefix.n_prefix,
                                                            labels=labels)
    out = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "labels")}
    out.update(inputs_embeds=prefix.inputs_embeds(model, new_ids, starts), attention_mask=mask)
    if new_labels is not None:
        out["labels"] = new_labels
    return out


# --- files --------------------------------------------------------------------------------------

def prefix_path(adapter_dir: str | os.PathLike) -> Path:
    return Path(adapter_dir) / PREFIX_FILE


def has_prefix(adapter_dir: str | os.PathLike) -> bool:
    return prefix_path(adapter_dir).is_file()


def save_prefix(prefix: PrefixEmbedding, adapter_dir: str | os.PathLike, base_model: str | None = None) -> Path:
    """Write ``prefix`` as ``adapter_dir/prefix_embeddings.safetensors`` (atomically: temp file, sync,
    rename), beside an adapter saved there; returns the file's path."""
    path = prefix_path(adapter_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "n_prefix": str(prefix.n_prefix),
                "hidden_size": str(prefix.hidden_size)}
    if base_model:
        metadata["base_model"] = str(base_model)
    tensor = prefix.weight.detach().float().cpu().contiguous()
    atomic_write_files({path: lambda tmp: save_file({PREFIX_KEY: tensor}, str(tmp), metadata=metadata)})
    return path


def load_prefix(adapter_dir: str | os.PathLike, hidden_size: int | None = None) -> PrefixEmbedding | None:
    """The prefix saved beside the adapter in ``adapter_dir``, or None when there is no prefix file.
    ``hidden_size`` (the model's) is checked against the file's, so a prefix for another model is
    refused here, by name, rather than failing inside a forward."""
    path = prefix_path(adapter_dir)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            keys = list(f.keys())
            if keys != [PREFIX_KEY]:
                raise PrefixFileError(f"{path} holds tensors {keys}; a prefix file holds one, {PREFIX_KEY!r}. "
                                      "Save it with lorakit.prefix.save_prefix, or remove the file")
            weight = f.get_tensor(PREFIX_KEY)
    except (SafetensorError, OSError) as e:
        raise PrefixFileError(f"{path} cannot be read as safetensors ({e}); it is damaged: save the prefix "
                              "again, or remove the file to use the adapter without its prefix") from None
    if metadata.get("format") != FORMAT:
        raise PrefixFileError(f"{path} is not a lorakit prefix file (metadata format {metadata.get('format')!r}, "
                              f"expected {FORMAT!r})")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise PrefixFileError(f"{path} has prefix format {metadata.get('format_version')!r}, this lorakit reads "
                              f"{FORMAT_VERSION!r}: use the lorakit version that wrote it")
    if weight.ndim != 2 or [str(s) for s in weight.shape] != [metadata.get("n_prefix"), metadata.get("hidden_size")]:
        raise PrefixFileError(f"{path}: the tensor has shape {tuple(weight.shape)}, its metadata says n_prefix="
                              f"{metadata.get('n_prefix')}, hidden_size={metadata.get('hidden_size')}; the file "
                              "is damaged: save the prefix again")
    if not weight.dtype.is_floating_point or not torch.isfinite(weight).all():
        raise PrefixFileError(f"{path}: the prefix embeddings are not finite floats ({weight.dtype}); the run "
                              "that wrote them diverged: train again")
    if hidden_size is not None and weight.shape[1] != hidden_size:
        base = f" (written for {metadata['base_model']})" if metadata.get("base_model") else ""
        raise PrefixFileError(f"{path} has prefix embeddings of hidden size {weight.shape[1]}{base}, this model's "
                              f"input embeddings have {hidden_size}: use the adapter with the base model it was "
                              "trained on")
    prefix = PrefixEmbedding(weight.shape[0], weight.shape[1])
    with torch.no_grad():
        prefix.weight.copy_(weight.float())
    return prefix


def model_hidden_size(model: nn.Module) -> int:
    """The width of ``model``'s input embeddings (what a prefix row must have)."""
    return model.get_input_embeddings().weight.shape[1]
