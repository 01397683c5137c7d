"""Training-state checkpoints that survive crashes, plus safetensors inference snapshots.

Layout: ``<run>/checkpoints/step_000123/`` holds what ``Accelerator.save_state`` writes (model and EMA
weights, optimizer, scheduler, one RNG-state file per rank, registered objects such as the EMA), our
``meta.json`` (step, epoch, batch position, config hash, world size) and, written last,
``manifest.json`` with the size and sha256 of every other file. Folders are named by step, never by
accelerate's automatic counter (which resume does not restore; docs/conventions.md §7).

Saving (``save_checkpoint``, called on EVERY rank, since each rank writes its own RNG state):
  1. the main process creates ``step_000123.tmp-save``; barrier;
  2. every rank runs ``accelerator.save_state`` into it; barrier (all per-rank files are on disk);
  3. the main process writes meta.json, then the manifest (fsyncing each file while hashing it), then
     renames the folder to its final name; barrier.
A crash at any point leaves either the previous checkpoints untouched plus a temporary folder (ignored,
removed by ``cleanup_temporaries``) or a complete new checkpoint.

Loading: ``latest_checkpoint`` returns the newest checkpoint whose manifest exists and matches every
file (truncated or corrupt ones are skipped with a warning); ``load_checkpoint`` first loads every
pickle-based file with ``torch.load(weights_only=True)`` (refusing anything but tensors and plain
containers, so a planted pickle payload never runs; accelerate itself unpickles registered objects with
weights_only=False) and then calls ``accelerator.load_state``.

Inference snapshots (``save_weights``/``load_weights``): a flat state dict of tensors in safetensors,
written atomically; loading never unpickles anything.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .files import atomic_path, atomic_write_json, replace_directory, sha256_file, temporary_path

META_FILE = "meta.json"
MANIFEST_FILE = "manifest.json"
STEP_DIR_PATTERN = re.compile(r"^step_(\d{6,})$")
_SAVE_TAG = "save"  # all ranks must agree on the temporary folder's name
_PICKLE_SUFFIXES = (".pkl", ".bin", ".pt", ".pth")


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped or restored only partially."""


@dataclasses.dataclass
class CheckpointMeta:
    """Where training stands in a checkpoint: (epoch, batch_in_epoch) is the position of the NEXT batch."""

    step: int
    epoch: int = 0
    batch_in_epoch: int = 0
    config_hash: str = ""
    world_size: int = 1
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


# -- manifest -------------------------------------------------------------------------------------------
def _checkpoint_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)


def write_manifest(directory: str | os.PathLike) -> None:
    """Hash (and fsync) every file in ``directory``, then write manifest.json atomically."""
    directory = Path(directory)
    files = {
        p.relative_to(directory).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p, fsync=True)}
        for p in _checkpoint_files(directory)
    }
    atomic_write_json(directory / MANIFEST_FILE, {"format": 1, "files": files})


def verify_checkpoint(directory: str | os.PathLike) -> str | None:
    """None if the checkpoint is complete and intact, else a short description of the problem."""
    directory = Path(directory)
    if not directory.is_dir():
        return "not a directory"
    try:
        listed = json.loads((directory / MANIFEST_FILE).read_text())["files"]
    except FileNotFoundError:
        return "manifest.json missing (incomplete save)"
    except (ValueError, KeyError, TypeError):
        return "manifest.json unreadable"
    present = {p.relative_to(directory).as_posix() for p in _checkpoint_files(directory)}
    unexpected = sorted(present - set(listed))
    if unexpected:
        return f"file {unexpected[0]} is not in the manifest"
    for name, entry in listed.items():
        path = directory / name
        if name not in present:
            return f"file {name} missing"
        if path.stat().st_size != entry["bytes"]:
            return f"file {name} truncated or resized ({path.stat().st_size} bytes, expected {entry['bytes']})"
        if sha256_file(path) != entry["sha256"]:
            return f"file {name} checksum mismatch"
    return None


# -- saving ------------------------------------------------------------------------------------------------
def save_checkpoint(accelerator, path: str | os.PathLike, meta: CheckpointMeta) -> Path:
    """Write the full training state to ``path`` atomically. Must be called on every rank (module docstring)."""
    if accelerator.project_configuration.automatic_checkpoint_naming:
        raise ValueError("disable accelerate's automatic_checkpoint_naming; checkpoints are named by step")
    path = Path(path)
    tmp = temporary_path(path, _SAVE_TAG)
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        meta = dataclasses.replace(meta, world_size=accelerator.num_processes)
        atomic_write_json(tmp / META_FILE, dataclasses.asdict(meta))
        write_manifest(tmp)
        replace_directory(tmp, path)
    accelerator.wait_for_everyone()
    return path


def list_checkpoints(checkpoints_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, folder) of every step-named folder, oldest first (temporaries never match)."""
    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for entry in checkpoints_dir.iterdir():
        match = STEP_DIR_PATTERN.match(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def prune_checkpoints(checkpoints_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the ``keep_last`` newest step folders; returns the deleted ones."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    doomed = [path for _, path in list_checkpoints(checkpoints_dir)[:-keep_last]]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def save_step_checkpoint(
    accelerator, checkpoints_dir: str | os.PathLike, meta: CheckpointMeta, keep_last: int | None = None
) -> Path:
    """``save_checkpoint`` into ``checkpoints_dir/step_<meta.step>``, then keep only the newest ``keep_last``."""
    path = save_checkpoint(accelerator, Path(checkpoints_dir) / step_dir_name(meta.step), meta)
    if keep_last is not None and accelerator.is_main_process:
        prune_checkpoints(checkpoints_dir, keep_last)
    return path


# -- finding and loading -------------------------------------------------------------------------------------
def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete, verified checkpoint under ``run_dir/checkpoints`` (None if there is none)."""
    for step, path in reversed(list_checkpoints(Path(run_dir) / "checkpoints")):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        warnings.warn(f"skipping checkpoint {path} (step {step}): {problem}", CheckpointWarning, stacklevel=2)
    return None


def _resolve_resume(resume: str, run_dir: str | os.PathLike) -> Path | None:
    if resume == "none":
        return None
    if resume == "latest":
        path = latest_checkpoint(run_dir)
        found = list_checkpoints(Path(run_dir) / "checkpoints")
        if path is None and found:
            # Never a crash (checkpoints appear by rename only when complete): damage on disk. Starting over would
            # prune them and silently throw the run away, so stop and let the user decide.
            raise ValueError(
                f"--resume latest: none of the {len(found)} checkpoint(s) under {Path(run_dir) / 'checkpoints'} "
                "passes its manifest check (see the warnings); repair one and resume it by path, or move the run "
                "directory away to start over"
            )
        return path
    path = Path(resume)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint to resume from not found: {path}")
    problem = verify_checkpoint(path)
    if problem is not None:
        raise ValueError(f"cannot resume from {path}: {problem}")
    return path


def resolve_resume(resume: str, run_dir: str | os.PathLike, accelerator=None) -> Path | None:
    """Turn ``--resume latest|PATH|none`` into a verified checkpoint folder (None: start fresh).

    ``latest`` skips damaged checkpoints (with a warning) for the newest good one, starts fresh where there is
    none, and raises ValueError where every checkpoint is damaged (restarting would prune them).

    With an accelerator, the main process resolves (hashing the files once) and broadcasts the answer,
    so every rank resumes from the same folder or raises the same error.
    """
    if accelerator is None or accelerator.num_processes == 1:
        return _resolve_resume(resume, run_dir)
    from accelerate.utils import broadcast_object_list

    answer: list[Any] = [None]
    if accelerator.is_main_process:
        try:
            path = _resolve_resume(resume, run_dir)
            answer = [("ok", None if path is None else str(path))]
        except (ValueError, FileNotFoundError) as e:
            answer = [(type(e).__name__, str(e))]
    broadcast_object_list(answer)
    kind, value = answer[0]
    if kind == "ok":
        return None if value is None else Path(value)
    raise (FileNotFoundError if kind == "FileNotFoundError" else ValueError)(value)


def load_pickle_safely(path: str | os.PathLike) -> Any:
    """``torch.load(weights_only=True)`` of one pickle-based file (numpy RNG states allowed, as accelerate writes
    them); ValueError if it holds anything else (e.g. code), which is refused without running."""
    from accelerate.utils import load

    try:
        return load(path, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"refusing to load {path}: not a plain tensor/container pickle ({first_line})") from None


def check_pickles_safe(directory: str | os.PathLike) -> None:
    """Load every pickle-based file in ``directory`` with weights_only=True; ValueError if one holds code."""
    for path in sorted(Path(directory).iterdir()):
        if path.suffix in _PICKLE_SUFFIXES:
            load_pickle_safely(path)


def read_meta(directory: str | os.PathLike) -> CheckpointMeta:
    data = json.loads((Path(directory) / META_FILE).read_text())
    return CheckpointMeta(**data)


def load_checkpoint(accelerator, path: str | os.PathLike) -> CheckpointMeta:
    """Restore the training state from a checkpoint folder (every rank); returns its meta.

    Call ``resolve_resume``/``latest_checkpoint`` first to verify checksums; this checks that every
    pickle is weights-only, then runs ``accelerator.load_state``.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {path}")
    check_pickles_safe(path)
    meta = read_meta(path)
    if meta.world_size != accelerator.num_processes:
        warnings.warn(
            f"checkpoint {path} was saved by {meta.world_size} process(es), resuming with "
            f"{accelerator.num_processes}: per-rank RNG states are not all restored",
            CheckpointWarning,
            stacklevel=2,
        )
    accelerator.load_state(str(path))
    return meta


# -- inference snapshots --------------------------------------------------------------------------------------
def save_weights(
    path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Write a state dict of tensors (e.g. EMA weights) as safetensors, atomically."""
    from safetensors.torch import save_file

    tensors = {}
    for name, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"save_weights: {name!r} is a {type(value).__name__}, not a tensor")
        tensors[name] = value.detach().cpu().contiguous()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=dict(metadata) if metadata else None)


def load_weights(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors file written by ``save_weights``; clear errors for missing or corrupt files."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"cannot read weights {path}: not a valid safetensors file ({e})") from None


def load_weights_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata stored by ``save_weights``; the same clear errors as ``load_weights``."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"cannot read weights {path}: not a valid safetensors file ({e})") from None
