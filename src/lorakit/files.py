"""Atomic file writes: write beside the target, sync, rename over it; a crash leaves the old file
(or nothing), never half of a new one. Used for adapters, checkpoints, run logs and reports."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Callable


def temp_path(path: Path) -> Path:
    """A hidden, unique name beside ``path`` (same directory, so the rename stays atomic)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def atomic_write_files(files: dict[Path, Callable[[Path], Any]]) -> None:
    """Write every file to a temp file beside it, and only when all are written and synced rename
    them into place: a failed write (disk full, an exception) leaves the old set whole, never a new
    file beside an old one."""
    tmps: dict[Path, Path] = {}
    try:
        for path, write in files.items():
            tmps[path] = temp_path(path)
            write(tmps[path])
            with open(tmps[path], "rb") as f:
                os.fsync(f.fileno())
        for path, tmp in tmps.items():
            os.replace(tmp, path)
        fsync_directory(next(iter(files)).parent)
    finally:
        for tmp in tmps.values():
            if tmp.exists():
                tmp.unlink()


def atomic_save_figure(fig: Any, path: Path) -> Path:
    """A matplotlib figure as PNG, written like every other file here."""
    path = Path(path)
    atomic_write_files({path: lambda tmp: fig.savefig(tmp, format="png")})
    return path


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_files({Path(path): lambda tmp: tmp.write_text(text, encoding="utf-8")})


def fsync_directory(directory: Path) -> None:
    """Make renames inside ``directory`` durable; not every platform can open a directory."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
