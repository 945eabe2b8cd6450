"""The run's written record: `metrics.jsonl` (one JSON object per line) and `run.json`.

Both are written by rank 0 only. On resume, rows logged after the checkpoint's step by the killed
run are dropped, so the file reads as if the run had never stopped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..files import atomic_write_text, naming_path


def write_json_atomic(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


class MetricsLog:
    """Appends rows to a JSONL file; `enabled=False` (ranks other than 0) makes every call a no-op."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path, self.enabled = Path(path), enabled

    def start(self, resume_step: int | None) -> None:
        """A new run empties the file; a resumed one keeps the rows up to its checkpoint's step."""
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [row for row in read_metrics(self.path) if row.get("step", 0) <= resume_step] \
            if resume_step is not None else []
        atomic_write_text(self.path, "".join(json.dumps(row) + "\n" for row in kept))

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        with naming_path(self.path), open(self.path, "a") as f:  # a full disk names this file
            f.write(json.dumps(clean) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl; a last line cut short by a kill is skipped."""
    if not Path(path).is_file():
        return []
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
