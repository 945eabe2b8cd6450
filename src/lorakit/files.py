"""Atomic file writes: write beside the target, sync, rename over it; a crash leaves the old file
(or nothing), never half of a new one. Used for adapters, checkpoints, run logs and reports.

Also the checks a command runs on its output paths before any work, so that a path it cannot
write is refused in the first second, not after an hour of generation.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

from safetensors import SafetensorError


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
            with naming_path(path):
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


def atomic_write_dir(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(folder)`` fills a temp folder beside ``path``; its files then move into ``path``
    (created if missing) one rename each, so a failure on the way leaves no half-written file there.
    Files already in ``path`` that the new set does not have are left alone."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with naming_path(path):
            write(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        path.mkdir(parents=True, exist_ok=True)
        for f in sorted(tmp.rglob("*")):
            target = path / f.relative_to(tmp)
            if f.is_dir():
                target.mkdir(exist_ok=True)
            else:
                os.replace(f, target)
        fsync_directory(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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


_OS_ERROR_CODE = re.compile(r"\(os error (\d+)\)")  # how safetensors' Rust writer reports an I/O error


@contextlib.contextmanager
def naming_path(path: Path):
    """A write that fails inside raises an OSError that names a file, so the message a user sees
    says which one: ``path`` where the error names none (write() on a full disk names none), and
    safetensors' own I/O error ("... No space left on device (os error 28) ...") becomes the
    OSError it stands for."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None:  # without an errno, str(e) is a message of its own
            e.filename = str(path)
        raise
    except SafetensorError as e:
        code = _OS_ERROR_CODE.search(str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from e


# --- output paths, checked before the work --------------------------------------------------------

class OutputPathError(ValueError):
    """An output path that cannot be written; the message names it and what to do instead."""


def prepare_output_dir(path: str | os.PathLike, option: str = "--out") -> Path:
    """Check that ``path`` is a folder, or can be made one, that this process can write into.
    Creates nothing: a run creates its folder when it has something to put there."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{option} {path}: this is a file, and a folder is needed here; "
                              f"give a folder path, or move the file away")
    _check_writable_under(path, option)
    return path


def prepare_output_file(path: str | os.PathLike, option: str = "--out") -> Path:
    """Check that ``path`` can be written as a file, and create the folders above it."""
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{option} {path}: this is a folder, and a file is needed here; "
                              f"give a file path such as {path / 'out.json'}")
    _check_writable_under(path.parent, option, target=path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputPathError(f"{option} {path}: cannot create the folder {path.parent} ({e.strerror}); "
                              f"choose a path you can write to") from None
    return path


def _check_writable_under(folder: Path, option: str, target: Path | None = None) -> None:
    """``folder`` (or the nearest part of it that exists) must be a folder this process may write in."""
    target = folder if target is None else target
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputPathError(f"{option} {target}: {existing} is a file, so nothing can be written under it; "
                              f"choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputPathError(f"{option} {target}: the folder {existing} is not writable (permission denied); "
                              f"choose a folder you can write to")
