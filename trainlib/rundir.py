"""A run directory: everything one training or generation run writes, in one place.

    <run>/config.json     {"config": resolved options, "run": git revision, world size, start time, versions}
    <run>/log.txt         plain-text log, one timestamped line per message
    <run>/metrics.jsonl   one JSON record per ``log_metrics`` call ({"step", "time", ...}), flushed at once
    <run>/tb/             TensorBoard event files (created on the first metric)
    <run>/checkpoints/    step-named training states (``trainlib.checkpoint``)
    <run>/best/           the best checkpoint by validation metric
    <run>/results.json    final results (written atomically)

Only the main process writes; on other ranks every method is a no-op, so callers need no branches.
An existing run directory is never deleted: starting again with ``resume=True`` appends to the log and
metrics (and records changed options in the log); starting a fresh run into a directory that already
holds one is refused with a ValueError. A resume first cuts a partial last line that a crash in the middle of an
append left in metrics.jsonl, so the file stays valid JSON lines. ``metrics_size``/``rewind_metrics`` let a
training session cut metrics.jsonl back to what it held when the resumed checkpoint was saved (the resumed run
writes those records again), so every step appears once.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from .config import config_to_dict
from .files import atomic_write_json, cleanup_temporaries

_PROJECT_ROOT = Path(__file__).resolve().parent.parent


def git_revision(directory: str | os.PathLike = _PROJECT_ROOT) -> str:
    """The commit hash of the checkout holding ``directory`` (+ "-dirty" if tracked files changed), or "unknown"."""

    def git(*args: str) -> str:
        result = subprocess.run(
            ["git", "--no-optional-locks", "-C", str(directory), *args],
            capture_output=True, text=True, timeout=10, check=True,
        )
        return result.stdout.strip()

    try:
        revision = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return revision + ("-dirty" if dirty else "")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "accelerate", "diffusers", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def drop_partial_last_line(path: str | os.PathLike, chunk: int = 1 << 16) -> bool:
    """Truncate a line-oriented file after its last newline (a crash mid-append); True if bytes were cut."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb+") as f:
        end = f.seek(0, os.SEEK_END)
        if end == 0:
            return False
        f.seek(end - 1)
        if f.read(1) == b"\n":
            return False
        position = end
        while position > 0:  # scan backwards for the last complete line
            start = max(0, position - chunk)
            f.seek(start)
            newline = f.read(position - start).rfind(b"\n")
            if newline >= 0:
                f.truncate(start + newline + 1)
                return True
            position = start
        f.truncate(0)
        return True


def is_unfinished_run(path: str | os.PathLike) -> bool:
    """A training run directory (config.json) without results.json: still running, or interrupted. The networks a
    run saves at each checkpoint (score net, posterior net) are then intermediate EMA networks."""
    return (Path(path) / "config.json").is_file() and not (Path(path) / "results.json").is_file()


def saved_network_dir(path: str | os.PathLike, subdir: str, config_name: str) -> Path:
    """The folder of a network saved at ``path``: the folder itself, or a run directory's ``subdir`` (with a warning
    when that run has not finished: its network is the last checkpoint's)."""
    path = Path(path)
    if (path / subdir).is_dir() and not (path / config_name).exists():
        if is_unfinished_run(path):
            warnings.warn(f"{path} is an unfinished training run (no results.json): {subdir}/ holds the EMA network "
                          "of its last checkpoint", stacklevel=3)
        return path / subdir
    return path


def check_fresh_start(path: str | os.PathLike, resume: bool) -> None:
    """ValueError unless the run may start in ``path``: a fresh start (``resume`` False) needs a directory that holds
    no run yet (no config.json). Reads only, so every rank of a multi-process run can call it and fail together."""
    if not resume and (Path(path) / "config.json").exists():
        raise ValueError(f"run directory {path} already holds a run; resume it (--resume latest) or choose another "
                         "output directory")


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _scalar(value: Any) -> Any:
    """A JSON-ready metric value: tensors/numpy scalars become Python numbers, non-finite floats null."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunDir:
    """Writer for one run directory (see module docstring)."""

    def __init__(
        self,
        path: str | os.PathLike,
        config: Any = None,
        *,
        is_main_process: bool = True,
        world_size: int = 1,
        resume: bool = False,
    ):
        self.path = Path(path)
        self.is_main_process = is_main_process
        self._tb = None
        if not is_main_process:
            return
        check_fresh_start(self.path, resume)
        config_file = self.path / "config.json"
        previous = json.loads(config_file.read_text()) if config_file.exists() else None
        self.path.mkdir(parents=True, exist_ok=True)
        cleanup_temporaries(self.path)
        cut = previous is not None and drop_partial_last_line(self.path / "metrics.jsonl")
        record = {
            "config": config_to_dict(config) if config is not None else {},
            "run": {
                "git_revision": git_revision(),
                "world_size": world_size,
                "start_time": _now(),
                "command": sys.argv,
                "resumed": previous is not None,
                "versions": package_versions(),
            },
        }
        atomic_write_json(config_file, record)
        self.log(f"{'resumed' if previous is not None else 'started'} run in {self.path} (world size {world_size})")
        if cut:
            self.log("removed a partial last line of metrics.jsonl left by an interrupted write")
        if previous is not None:
            old, new = previous.get("config", {}), record["config"]
            for key in sorted(set(old) | set(new)):
                if old.get(key) != new.get(key):
                    self.log(f"option changed on resume: {key}: {old.get(key)!r} -> {new.get(key)!r}")

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def best_dir(self) -> Path:
        return self.path / "best"

    def log(self, message: str) -> None:
        """Print a message (tqdm-safe) and append it with a timestamp to log.txt."""
        if not self.is_main_process:
            return
        from tqdm import tqdm

        tqdm.write(message)
        with open(self.path / "log.txt", "a") as f:
            f.write(f"[{_now()}] {message}\n")

    def metrics_size(self) -> int:
        """Bytes in metrics.jsonl now (0 where there is none, and on other ranks): a position to rewind to."""
        path = self.path / "metrics.jsonl"
        return path.stat().st_size if self.is_main_process and path.is_file() else 0

    def rewind_metrics(self, size: int) -> int:
        """Cut metrics.jsonl back to its first ``size`` bytes (a ``metrics_size()`` taken earlier); returns the number
        of records removed (main process only).

        Used on resume: everything written after the resumed checkpoint is recomputed by the resumed run. (TensorBoard
        needs no help: its reader drops the older events when a step repeats after a restart.)
        """
        path = self.path / "metrics.jsonl"
        if not self.is_main_process or not path.is_file() or path.stat().st_size <= size:
            return 0
        with open(path, "rb+") as f:
            if size:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    raise ValueError(f"{path}: byte {size} is not the end of a record; was the file edited?")
            f.seek(size)
            dropped = f.read().count(b"\n")
            f.truncate(size)
            os.fsync(f.fileno())
        return dropped

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Append {"step", "time", **metrics} to metrics.jsonl and numeric values to TensorBoard."""
        if not self.is_main_process:
            return
        values = {name: _scalar(value) for name, value in metrics.items()}
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "time": round(time.time(), 3), **values}) + "\n")
        for name, value in values.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                self.tensorboard.add_scalar(name, value, step)
        self.tensorboard.flush()

    @property
    def tensorboard(self):
        """The run's ``torch.utils.tensorboard.SummaryWriter`` (main process only), created on first use."""
        if not self.is_main_process:
            raise RuntimeError("only the main process writes TensorBoard logs")
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.path / "tb"))
        return self._tb

    def write_results(self, results: Mapping[str, Any]) -> Path:
        """Write results.json atomically."""
        path = self.path / "results.json"
        if self.is_main_process:
            atomic_write_json(path, dict(results))
        return path

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
