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


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives a new file: 0o666 less the umask (0o644 under the
    usual 0o022). Writers that make private files (safetensors writes 0o600) are brought back to it."""
    # os.umask can only read the mask by setting one; 0o077 meanwhile, so a file another thread
    # makes in that instant is too private rather than too open.
    mask = os.umask(0o077)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_files(files: dict[Path, Callable[[Path], Any]]) -> None:
    """Write every file to a temp file beside it, and only when all are written and synced rename
    them into place: a failed write (disk full, an exception) leaves the old set whole, never a new
    file beside an old one. The files get the usual mode (`file_mode`)."""
    tmps: dict[Path, Path] = {}
    mode = file_mode()
    try:
        for path, write in files.items():
            tmps[path] = temp_path(path)
            with naming_path(path):
                write(tmps[path])
            os.chmod(tmps[path], mode)
            with open(tmps[path], "rb") as f:
                os.fsync(f.fileno())
        for path, tmp in tmps.items():
            os.replace(tmp, path)
        fsync_directory(next(iter(files)).parent)
    finally:
        for tmp in tmps.values():
            if tmp.exists():
                tmp.unlink()


def atomic_write_dir(path: Path, write: Callable[[Path], Any], replace: bool = False) -> None:
    """``write(folder)`` fills a temp folder beside ``path``; its files then move into ``path``
    (created if missing) one rename each, so a failure on the way leaves no half-written file there.
    Files already in ``path`` that the new set does not have are left alone, unless ``replace``:
    then the new folder takes the place of the old one whole (`_swap_dir`), and none of the old
    files stays. The files get the usual mode (`file_mode`)."""
    path = Path(path)
    tmp = temp_path(path)
    mode = file_mode()
    try:
        with naming_path(path):
            write(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                os.chmod(f, mode)
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if replace and path.exists():
            _swap_dir(tmp, path)
            return
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


def _swap_dir(new: Path, path: Path) -> None:
    """Put the folder ``new`` in the place of the folder ``path``: two renames (the old one aside,
    the new one in), then the old one is deleted. If the second rename fails, the old folder goes
    back; only a crash between the two renames leaves it aside, whole, under a hidden name."""
    aside = temp_path(path)
    os.replace(path, aside)
    try:
        os.replace(new, path)
    except BaseException:
        os.replace(aside, path)
        raise
    fsync_directory(path.parent)
    shutil.rmtree(aside, ignore_errors=True)


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
    """Check that ``path`` can be written as a file. Creates nothing: the folders above it are made
    when there is a result to write (`create_parent_folders`), so a failed command leaves none behind."""
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{option} {path}: this is a folder, and a file is needed here; "
                              f"give a file path such as {path / 'out.json'}")
    _check_writable_under(path.parent, option, target=path)
    return path


def create_parent_folders(path: str | os.PathLike) -> None:
    """The missing folders above the file ``path``, made just before it is written."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)


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
