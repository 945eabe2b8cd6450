"""The resumable state of a training run, as one directory that is replaced atomically.

    checkpoint/
      trainer_state.json       step, data position, best eval, log window, optimizer hyper-
                               parameters, Python/numpy RNG states per rank, and the fingerprint
                               of the run (what must not change on resume)
      adapter.safetensors      the trainable tensors, by parameter name
      optimizer.safetensors    AdamW's state per parameter: "<param name>/exp_avg", ".../step", ...
      rng.safetensors          torch generator states per rank ("rank0/torch_cpu", ...; uint8)

Nothing is pickled: tensors go to safetensors, the rest to JSON. A save writes a temp directory
beside the old checkpoint, syncs it, moves the old one aside, renames the new one into place and
only then deletes the old one; `find_checkpoint` falls back to the set-aside copy if a crash
fell between the two renames, so a kill at any moment leaves one whole checkpoint.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.hints import Setting, SettingError

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..files import file_mode, fsync_directory, naming_path, temp_path

FORMAT_VERSION = 1
STATE, ADAPTER, OPTIMIZER, RNG = "trainer_state.json", "adapter.safetensors", "optimizer.safetensors", "rng.safetensors"


class ResumeError(SettingError):
    """A checkpoint that this run cannot continue; the message says why and what to do (naming
    options as `Setting`s, so the command line reads its flags)."""


# --- RNG ----------------------------------------------------------------------------------------

def capture_rng(device: torch.device) -> dict[str, Any]:
    """This process's generator states, JSON-able (torch's uint8 states as base64)."""
    def b64(t: torch.Tensor) -> str:
        return base64.b64encode(t.cpu().numpy().tobytes()).decode()
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"python": [version, list(internal), gauss_next],
            "numpy": [name, keys.tolist(), pos, has_gauss, gauss],
            "torch_cpu": b64(torch.get_rng_state()),
            "torch_cuda": b64(torch.cuda.get_rng_state(device)) if device.type == "cuda" else None}


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(_from_b64(state["torch_cpu"]))
    if device.type == "cuda" and state.get("torch_cuda"):
        torch.cuda.set_rng_state(_from_b64(state["torch_cuda"]), device)


def _from_b64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


# --- optimizer ----------------------------------------------------------------------------------

def optimizer_to_files(optimizer: torch.optim.Optimizer, names: list[str]) -> tuple[dict[str, torch.Tensor], list]:
    """(tensors keyed "<param name>/<state key>", param groups with names instead of indices).

    `names` are the parameter names in the order the optimizer holds them (group by group). A state
    value that is a dict (bitsandbytes' 8-bit AdamW packs its quantization state in one) is walked,
    its tensors keyed "<param name>/<key>/<inner key>"; values that are not tensors (bitsandbytes'
    ``step`` is an int) go into the groups' JSON, under the group's "scalars"."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[int, dict[str, Any]] = {}
    seen: set[int] = set()  # storages already written: safetensors refuses two names for one (a shared code book)
    for i, state in sd["state"].items():
        for path, value in _walk(state):
            if isinstance(value, torch.Tensor):
                value = value.detach().cpu().contiguous()
                if value.untyped_storage().data_ptr() in seen:
                    value = value.clone()
                seen.add(value.untyped_storage().data_ptr())
                tensors[f"{names[i]}/{path}"] = value
            else:
                scalars.setdefault(i, {})[path] = value
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[i] for i in g["params"]],
               **({"scalars": {names[i]: scalars[i] for i in g["params"] if i in scalars}} if scalars else {})}
              for g in sd["param_groups"]]
    return tensors, json.loads(json.dumps(groups))


def _walk(state: dict[str, Any], prefix: str = ""):
    for key, value in state.items():
        if "/" in key:
            raise ValueError(f"optimizer state key {key!r} holds a '/', which checkpoints use as a separator")
        if isinstance(value, dict):
            yield from _walk(value, f"{prefix}{key}/")
        else:
            yield f"{prefix}{key}", value


def _put(state: dict[str, Any], path: str, value: Any) -> None:
    *outer, last = path.split("/")
    for key in outer:
        state = state.setdefault(key, {})
    state[last] = value


def optimizer_from_files(optimizer: torch.optim.Optimizer, names: list[str], tensors: dict[str, torch.Tensor],
                         groups: list[dict[str, Any]]) -> None:
    index = {n: i for i, n in enumerate(names)}
    saved_names = [n for g in groups for n in g["params"]]
    if saved_names != names:
        raise ResumeError(f"the checkpoint's optimizer holds parameters {_short(saved_names)}, this model trains "
                          f"{_short(names)}; resume with the same adapter config")
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        name, _, path = key.partition("/")  # parameter names hold dots, never a '/'
        _put(state.setdefault(index[name], {}), path, value)
    for g in groups:
        for name, values in g.get("scalars", {}).items():
            for path, value in values.items():
                _put(state.setdefault(index[name], {}), path, value)
    param_groups = [{**{k: v for k, v in g.items() if k != "scalars"}, "params": [index[n] for n in g["params"]]}
                    for g in groups]
    for g in param_groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def _short(names: list[str], n: int = 4) -> str:
    return str(names[:n])[:-1] + (f", ... ({len(names)} in all)]" if len(names) > n else "]")


# --- save / load --------------------------------------------------------------------------------

def save_checkpoint(directory: Path, *, params: dict[str, torch.Tensor], optimizer_tensors: dict[str, torch.Tensor],
                    rng_states: list[dict[str, Any]], state: dict[str, Any]) -> None:
    """Write a checkpoint to `directory`, replacing any old one atomically (see the module doc).

    `rng_states` holds one capture_rng() per rank; `state` the JSON part (step, fingerprint, ...)."""
    directory = Path(directory)
    parent = directory.parent
    parent.mkdir(parents=True, exist_ok=True)
    for stale in parent.glob(f".{directory.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)  # left by a run that was killed while saving
    tmp = temp_path(directory)
    tmp.mkdir()
    try:
        rng_tensors: dict[str, torch.Tensor] = {}
        rng_json = []
        for rank, rng in enumerate(rng_states):
            for key in ("torch_cpu", "torch_cuda"):
                if rng.get(key):
                    rng_tensors[f"rank{rank}/{key}"] = _from_b64(rng[key])
            rng_json.append({"python": rng["python"], "numpy": rng["numpy"]})
        full_state = {"format_version": FORMAT_VERSION, **state, "rng": rng_json}
        with naming_path(directory):  # a full disk names the checkpoint, not a temp file
            save_file({k: v.detach().cpu().contiguous() for k, v in params.items()}, str(tmp / ADAPTER))
            save_file(optimizer_tensors, str(tmp / OPTIMIZER))
            save_file(rng_tensors, str(tmp / RNG))
            (tmp / STATE).write_text(json.dumps(full_state, indent=1) + "\n")
        mode = file_mode()  # safetensors writes 0o600; a checkpoint is read like any other file
        for f in tmp.iterdir():
            os.chmod(f, mode)
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_directory(tmp)
        old = parent / f".{directory.name}.old-{uuid.uuid4().hex[:8]}"
        if directory.exists():
            directory.rename(old)
        tmp.rename(directory)  # the commit point
        fsync_directory(parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def find_checkpoint(directory: Path) -> Path | None:
    """`directory` if it holds a complete checkpoint, else a complete copy set aside by a save that
    was interrupted between its two renames, else None."""
    directory = Path(directory)
    if (directory / STATE).is_file():
        return directory
    aside = [p for p in directory.parent.glob(f".{directory.name}.old-*") if (p / STATE).is_file()]
    return max(aside, key=lambda p: p.stat().st_mtime) if aside else None


@dataclass
class Checkpoint:
    path: Path
    state: dict[str, Any]
    params: dict[str, torch.Tensor]
    optimizer_tensors: dict[str, torch.Tensor]

    def rng_for(self, rank: int) -> dict[str, Any]:
        return self.state["rng"][rank] | self._rng_tensors(rank)

    def _rng_tensors(self, rank: int) -> dict[str, Any]:
        tensors = load_file(str(self.path / RNG))
        return {key: base64.b64encode(tensors[f"rank{rank}/{key}"].numpy().tobytes()).decode()
                if f"rank{rank}/{key}" in tensors else None for key in ("torch_cpu", "torch_cuda")}


def load_checkpoint(directory: Path) -> Checkpoint:
    found = find_checkpoint(directory)
    if found is None:
        raise ResumeError(f"no checkpoint in {directory} to resume from; to start a new run, run without ",
                          Setting("resume"))
    try:
        state = json.loads((found / STATE).read_text())
        params = load_file(str(found / ADAPTER))
        optimizer_tensors = load_file(str(found / OPTIMIZER))
    except (OSError, ValueError) as e:
        raise ResumeError(f"{found} cannot be read ({e}); it is damaged: start a new run") from None
    if state.get("format_version") != FORMAT_VERSION:
        raise ResumeError(f"{found} has checkpoint format {state.get('format_version')}, this lorakit reads "
                          f"{FORMAT_VERSION}: resume it with the lorakit version that wrote it")
    return Checkpoint(found, state, params, optimizer_tensors)


def check_fingerprint(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse to continue a run with other settings: the result would be neither run. The message
    lists each setting that differs, down to the field of a nested one (`lora.r`), with both values."""
    saved, current = json.loads(json.dumps(saved)), json.loads(json.dumps(current))
    differ = [f"{key}: {json.dumps(old)} in the checkpoint, {json.dumps(new)} now"
              for key, old, new in _differences(saved, current)]
    if differ:
        raise ResumeError(f"cannot resume from {path}: it belongs to a run with other settings ("
                          + "; ".join(differ) + "). Resume with the same settings, or start afresh: with ",
                          Setting("overwrite", True), " instead of ", Setting("resume", True), " (the old run is "
                          "replaced at the new one's first checkpoint), or in another ", Setting("out_dir"))


def _differences(saved: Any, current: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, saved value, current value) for every leaf where two JSON objects differ."""
    if not (isinstance(saved, dict) and isinstance(current, dict)):
        return [] if saved == current else [(prefix.rstrip("."), saved, current)]
    return [d for k in sorted(set(saved) | set(current))
            for d in _differences(saved.get(k), current.get(k), f"{prefix}{k}.")]
