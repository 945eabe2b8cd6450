"""The built-in demo task: departure-board lines for fictional trains.

**All of this data is generated** from a seed by the code below; none of it is real. It exists so
that `make demo` can fine-tune a small instruct model without any data files, and show a change
that is easy to see: the base model answers in chatty prose, the adapted model answers in the
house style.

A record (train, origin, destination, time, platform, status, carriages) is shown to the model as
`key: value` lines in a random order and with everyday wording (`delayed 12 minutes`). The target
is one telegraphic line in a fixed field order, with upper-cased stations and fixed symbols::

    KR417 // OSTVIK > BRENNHOLM // 07:45 // PL3 // LATE+12 // 6C

No instruct model writes this by itself, yet every part of it is a copy or a small rewrite of the
input, so a 135M model learns it within a few hundred small steps. `LINE_PATTERN` checks the
format, so the demo can report how often the output follows it.

`demo_pairs` gives plain (prompt, completion) strings; `demo_task` (re-exported by `lorakit.data`)
wraps them as `Example`s.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lorakit.data import Example

# Fictional operators and station-name parts; any resemblance to real places is accidental.
OPERATORS = ("KR", "NV", "TL", "BX", "OM", "SD", "VE", "QA")
_STATION_HEADS = ("Ost", "Brenn", "Lund", "Kalm", "Vest", "Ager", "Mor", "Hald", "Sil", "Tarn",
                  "Ulf", "Rav", "Eik", "Fjell")
_STATION_TAILS = ("vik", "holm", "by", "dal", "stad", "berg", "moor", "ness", "haven", "field")
_INSTRUCTION = "Board line:"

# The house style, field by field; see `render_line`.
LINE_PATTERN = re.compile(
    r"^[A-Z]{2}\d{3} // [A-Z]+ > [A-Z]+ // \d\d:\d\d // PL\d{1,2} // (OK|XX|LATE\+\d+) // \d{1,2}C$"
)


@dataclass(frozen=True)
class Departure:
    """One generated record. `delay` is minutes late: 0 = on time, None = cancelled."""

    operator: str
    number: int
    origin: str
    destination: str
    time: str
    platform: int
    delay: int | None
    cars: int


def random_departure(rng: random.Random) -> Departure:
    """Draw one record; all randomness comes from `rng`, so a seed fixes the whole data set."""
    origin = rng.choice(_STATION_HEADS) + rng.choice(_STATION_TAILS)
    destination = origin
    while destination == origin:
        destination = rng.choice(_STATION_HEADS) + rng.choice(_STATION_TAILS)
    status = rng.random()
    delay = 0 if status < 0.5 else (None if status < 0.65 else rng.choice((2, 3, 5, 7, 10, 12, 15, 20, 25, 40)))
    return Departure(
        operator=rng.choice(OPERATORS),
        number=rng.randint(100, 999),
        origin=origin,
        destination=destination,
        time=f"{rng.randint(5, 23):02d}:{rng.randrange(0, 60, 5):02d}",
        platform=rng.randint(1, 12),
        delay=delay,
        cars=rng.randint(2, 12),
    )


def render_prompt(d: Departure, rng: random.Random) -> str:
    """The record as the model sees it: fields in a random order, so the fixed output order must be learnt."""
    if d.delay is None:
        status = "cancelled"
    elif d.delay == 0:
        status = "on time"
    else:
        status = f"delayed {d.delay} min"
    fields = [
        f"train: {d.operator} {d.number}",
        f"from: {d.origin}",
        f"to: {d.destination}",
        f"departs: {d.time}",
        f"platform: {d.platform}",
        f"status: {status}",
        f"carriages: {d.cars}",
    ]
    rng.shuffle(fields)
    return "\n".join([_INSTRUCTION, *fields])


def render_line(d: Departure) -> str:
    """The house style: train // ORIGIN > DESTINATION // time // PLn // OK|XX|LATE+m // nC."""
    status = "XX" if d.delay is None else ("OK" if d.delay == 0 else f"LATE+{d.delay}")
    return (f"{d.operator}{d.number} // {d.origin.upper()} > {d.destination.upper()} // {d.time}"
            f" // PL{d.platform} // {status} // {d.cars}C")


def demo_pairs(n_train: int, n_eval: int, seed: int = 0) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(prompt, completion) pairs for training and evaluation, generated from `seed`.

    Every record is distinct (by its target line), so no evaluation target is also a training
    target: the evaluation measures the format on unseen records, not memory.
    """
    if n_train < 0 or n_eval < 0:
        raise ValueError(f"n_train and n_eval must be >= 0, got {n_train} and {n_eval}")
    rng = random.Random(seed)
    seen: set[str] = set()
    pairs: list[tuple[str, str]] = []
    while len(pairs) < n_train + n_eval:
        d = random_departure(rng)
        line = render_line(d)
        if line in seen:
            continue
        seen.add(line)
        pairs.append((render_prompt(d, rng), line))
    return pairs[:n_train], pairs[n_train:]


def demo_task(n_train: int, n_eval: int, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """The built-in demo as `lorakit.data.Example`s: GENERATED departure-board records, house style.

    No files are needed and nothing is real. The same seed gives the same examples; evaluation
    records never repeat a training target. A couple of thousand training examples (e.g.
    `demo_task(2000, 100)`) are plenty for SmolLM2-135M to pick up the format in a few hundred
    steps of batch 8.
    """
    from lorakit.data import Example  # here, not at the top: lorakit.data re-exports this function

    train, held = demo_pairs(n_train, n_eval, seed)
    return [Example(p, c) for p, c in train], [Example(p, c) for p, c in held]
