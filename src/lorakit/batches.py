"""Token batches: `collate` pads examples into tensors, `pack` concatenates them into blocks of one
length, `Batches` shuffles with a seed and saves its position, so a resumed run sees exactly the
batches it would have seen (step 3 of `lorakit.data`'s pipeline)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Generic, TypeVar

import numpy as np
import torch

IGNORE_INDEX = -100  # torch.nn.CrossEntropyLoss's default ignore_index, which HF models use
T = TypeVar("T")


_PAD_VALUES = {"labels": IGNORE_INDEX, "attention_mask": 0, "token_type_ids": 0}


def collate(batch: Sequence[Mapping[str, Any]], pad_id: int,
            pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad a list of tokenized examples into (B, T) tensors, with `attention_mask`.

    List values are padded (`input_ids` with `pad_id`, `labels` with -100 so pads carry no loss,
    `attention_mask`/`token_type_ids` with 0); scalar values (a class label) become a (B,) tensor.
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    lengths = [len(item["input_ids"]) for item in batch]
    width = math.ceil(max(lengths) / (pad_to_multiple_of or 1)) * (pad_to_multiple_of or 1)
    out: dict[str, torch.Tensor] = {}
    for key, first in batch[0].items():
        values = [item[key] for item in batch]
        if isinstance(first, (list, tuple)):
            if [len(v) for v in values] != lengths:
                raise ValueError(f"{key!r} and 'input_ids' differ in length in this batch")
            pad = _PAD_VALUES.get(key, pad_id)
            out[key] = torch.tensor([list(v) + [pad] * (width - len(v)) for v in values], dtype=torch.long)
        else:
            out[key] = torch.tensor(values)
    if "attention_mask" not in out:
        out["attention_mask"] = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    return out


def pack(tokenized: Sequence[Mapping[str, list[int]]], block_len: int, pad_id: int) -> list[dict[str, list[int]]]:
    """Concatenate tokenized examples and cut the stream into blocks of `block_len` tokens.

    No token is dropped: the last block is right-padded (labels -100, attention_mask 0). Labels at
    the boundaries: each example's first token gets -100, so no loss asks the model to predict one
    example from the end of the previous one (in an unpacked batch that position has no target
    either). An example that spans two blocks loses one target, the token at the start of the
    second block, which the next-token shift leaves without a predecessor. Attention is not reset
    between examples (as in GPT pre-training); each example ends with EOS, which marks the seam.
    """
    if block_len < 1:
        raise ValueError(f"block_len must be >= 1, got {block_len}")
    ids = [x for ex in tokenized for x in ex["input_ids"]]
    labels = [y for ex in tokenized for y in [IGNORE_INDEX, *ex["labels"][1:]][:len(ex["labels"])]]
    blocks = []
    for start in range(0, len(ids), block_len):
        n = min(block_len, len(ids) - start)
        blocks.append({"input_ids": ids[start:start + n] + [pad_id] * (block_len - n),
                       "labels": labels[start:start + n] + [IGNORE_INDEX] * (block_len - n),
                       "attention_mask": [1] * n + [0] * (block_len - n)})
    return blocks


class Batches(Generic[T]):
    """Seeded, shuffled batches over `examples` that can resume exactly where a run stopped.

    Epoch e visits the examples in the order `permutation(seed, e)`, a pure function of the seed
    and the epoch, so the position (epoch, index of the next batch) is the whole state. The
    position advances as each batch is handed out: a `state_dict()` taken after a training step
    resumes with the next batch. Iteration continues from the position and runs `epochs` epochs
    in total (None: forever; stop it with `itertools.islice` or a step count). One consumer at a
    time: two live iterators would share the position.
    """

    def __init__(self, examples: Sequence[T], batch_size: int, seed: int = 0, *, shuffle: bool = True,
                 drop_last: bool = False, collate_fn: Callable[[list[T]], Any] | None = None,
                 epochs: int | None = None) -> None:
        if batch_size < 1 or seed < 0:
            raise ValueError(f"batch_size must be >= 1 and seed >= 0, got {batch_size} and {seed}")
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.shuffle, self.drop_last, self.collate_fn, self.epochs = shuffle, drop_last, collate_fn, epochs
        self.epoch, self.index = 0, 0

    def __len__(self) -> int:
        """Batches per epoch."""
        n, b = len(self.examples), self.batch_size
        return n // b if self.drop_last else math.ceil(n / b)

    def order(self, epoch: int) -> np.ndarray:
        """The example order of `epoch`, the same in every run."""
        n = len(self.examples)
        return np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)

    def __iter__(self) -> Iterator[Any]:
        per_epoch = len(self)
        while per_epoch and (self.epochs is None or self.epoch < self.epochs):
            epoch, order = self.epoch, self.order(self.epoch)
            for i in range(self.index, per_epoch):
                items = [self.examples[j] for j in order[i * self.batch_size:(i + 1) * self.batch_size]]
                self.epoch, self.index = (epoch, i + 1) if i + 1 < per_epoch else (epoch + 1, 0)
                yield self.collate_fn(items) if self.collate_fn else items

    def state_dict(self) -> dict[str, int]:
        """The position plus what it depends on, JSON-serialisable, for the training checkpoint."""
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed,
                "batch_size": self.batch_size, "num_examples": len(self.examples)}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Restore a position; refuses one saved with another seed, batch size or data size."""
        mine = self.state_dict()
        differ = [k for k in ("seed", "batch_size", "num_examples") if state.get(k) != mine[k]]
        if differ:
            raise ValueError(f"cannot resume: the saved batches had {[(k, state.get(k)) for k in differ]}, "
                             f"these have {[(k, mine[k]) for k in differ]}; resume with the same data and settings")
        if not 0 <= state["index"] < max(len(self), 1):
            raise ValueError(f"saved index {state['index']} is outside 0..{len(self) - 1}")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
