"""Crash-safe file output: write to a temporary name in the same directory, fsync, then rename.

A reader therefore sees either the old file or the complete new one, never a partial write. Temporary
names are the final name plus ``.tmp-<tag>`` (the tag is the writer's pid unless given), e.g.
``results.json.tmp-4242`` or ``step_000100.tmp-save``: they never end in a real extension (``.npz``,
``.json``) and never match the ``step_NNNNNN`` pattern, so no reader mistakes them for outputs.
``cleanup_temporaries`` removes the ones a crashed writer left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

TEMP_PATTERN = re.compile(r"\.tmp-[A-Za-z0-9_]+$")


def temporary_path(path: str | os.PathLike, tag: str | int | None = None) -> Path:
    """The temporary sibling of ``path``: ``<name>.tmp-<tag>`` (tag defaults to this process's pid)."""
    path = Path(path)
    tag = os.getpid() if tag is None else tag
    if not re.fullmatch(r"[A-Za-z0-9_]+", str(tag)):
        raise ValueError(f"temporary-name tag must be alphanumeric or '_', got {tag!r}")
    return path.with_name(f"{path.name}.tmp-{tag}")


def is_temporary(path: str | os.PathLike) -> bool:
    return TEMP_PATTERN.search(Path(path).name) is not None


def fsync_directory(directory: str | os.PathLike) -> None:
    """Make a rename inside ``directory`` durable (no-op where directories cannot be opened)."""
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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is fsynced and renamed to ``path``, on error removed."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a binary file for writing that appears at ``path`` only if the ``with`` block succeeds."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        yield f


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def atomic_save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """``np.savez`` (uncompressed, so members can be memory-mapped later) written atomically.

    Writing through a file object keeps numpy from appending ``.npz`` to the temporary name.
    """
    with atomic_open(path) as f:
        np.savez(f, **arrays)


def replace_directory(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename directory ``src`` to ``dst``, replacing an existing ``dst``.

    An existing ``dst`` is first renamed aside to a temporary name and deleted afterwards, so at every
    moment either the old or the new directory is complete (a crash between the two renames leaves only
    temporaries, which ``cleanup_temporaries`` removes).
    """
    src, dst = Path(src), Path(dst)
    old = temporary_path(dst, f"old{os.getpid()}")
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    fsync_directory(dst.parent)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, tag: str | int | None = None) -> Iterator[Path]:
    """Yield ``<path>.tmp-<tag>`` to fill; renamed to ``path`` on success, removed on error.

    ``tag`` defaults to the pid; processes that fill one directory together must agree on it.
    """
    path = Path(path)
    tmp = temporary_path(path, tag)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        replace_directory(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def cleanup_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Remove temporary files and directories (``*.tmp-<tag>``) directly inside ``directory``.

    Call it only while no other process writes into ``directory`` (e.g. on the main process before the
    first barrier of a run). Returns the removed paths.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for entry in sorted(directory.iterdir()):
        if not is_temporary(entry):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


# -- digests ------------------------------------------------------------------------------------------------------
def sha256_file(*paths: str | os.PathLike, fsync: bool = False) -> str:
    """The sha256 hex digest of the files' contents, one after the other (read in 1 MiB chunks); ``fsync``: also
    flush each file to disk while it is open (checkpoint manifests)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                digest.update(chunk)
            if fsync:
                os.fsync(f.fileno())
    return digest.hexdigest()


def sha256_json(obj: Any) -> str:
    """The first 16 hex digits of the sha256 of ``obj`` as canonical JSON (sorted keys, compact separators, other
    objects as ``str``): equal for equal settings, whatever their key order."""
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
