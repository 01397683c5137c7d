"""npz files: validated, memory-mapped image/label arrays and the generated pseudo-data shards.

Generated pseudo-data (DeepMind / SCORE format: uncompressed .npz, ``image`` uint8 (N, 32, 32, 3), ``label``
int64) is read by ``load_generated`` without loading it: each stored zip member's data offset is located
and ``np.memmap``ed with the .npy header's dtype/shape/order (``np.load(mmap_mode=...)`` does not map npz
members). A compressed member is loaded into memory with a warning.
"""

from __future__ import annotations

import glob
import math
import os
import struct
import warnings
import zipfile
from pathlib import Path

import numpy as np

from .datasets import ImageDataset


def _memmap_member(path: Path, f, info: zipfile.ZipInfo) -> np.ndarray:
    """Memory-map one stored (uncompressed) .npy member of a zip archive."""
    f.seek(info.header_offset)
    header = f.read(30)
    if header[:4] != b"PK\x03\x04":
        raise ValueError(f"{path}: corrupt zip entry {info.filename}")
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    start = info.header_offset + 30 + name_length + extra_length
    f.seek(start)
    version = np.lib.format.read_magic(f)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(f)
    if dtype.hasobject:
        raise ValueError(f"{path}: member {info.filename} holds Python objects; only plain arrays are read")
    offset = f.tell()
    nbytes = math.prod(shape) * dtype.itemsize
    if offset + nbytes > start + info.file_size:
        raise ValueError(f"{path}: member {info.filename} is truncated")
    if nbytes == 0:
        return np.empty(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran_order else "C")


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of an .npz file, memory-mapped where stored uncompressed (never unpickles anything)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"npz file not found: {path}")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        raise ValueError(f"{path} is not a valid .npz file (not a zip archive, or truncated)") from None
    arrays = {}
    with archive, open(path, "rb") as f:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                continue
            key = info.filename[: -len(".npy")]
            try:
                if info.compress_type == zipfile.ZIP_STORED:
                    arrays[key] = _memmap_member(path, f, info)
                else:
                    warnings.warn(
                        f"{path}: member {key!r} is compressed and is loaded into memory; write shards with "
                        "np.savez (not savez_compressed) to memory-map them",
                        stacklevel=2,
                    )
                    with archive.open(info) as member:
                        arrays[key] = np.lib.format.read_array(member, allow_pickle=False)
            except (ValueError, EOFError, zipfile.BadZipFile, OSError) as e:
                raise ValueError(f"{path}: cannot read member {key!r}: {e}") from None
    return arrays


def _check_float_images(image: np.ndarray, source: str, chunk: int = 4096) -> None:
    for start in range(0, len(image), chunk):
        block = np.asarray(image[start : start + chunk])
        if not np.isfinite(block).all():
            raise ValueError(f"{source}: 'image' holds NaN or infinite values")
        if block.min() < 0.0 or block.max() > 1.0:
            raise ValueError(
                f"{source}: float 'image' values must lie in [0, 1], found [{block.min():.4g}, {block.max():.4g}]"
            )


def validate_images_and_labels(
    image: np.ndarray, label: np.ndarray, source: str, num_classes: int | None = None
) -> tuple[np.ndarray, int]:
    """Check an (image, label) pair; returns labels as int64 and the class count (max label + 1 if not given)."""
    if image.dtype not in (np.uint8, np.float32):
        raise ValueError(f"{source}: 'image' must be uint8 (0..255) or float32 in [0, 1], got {image.dtype}")
    if image.ndim != 4:
        raise ValueError(f"{source}: 'image' must have shape (N, H, W, C), got {image.shape}")
    if len(image) == 0:
        raise ValueError(f"{source}: no images")
    if not np.issubdtype(label.dtype, np.integer):
        raise ValueError(f"{source}: 'label' must hold integers, got {label.dtype}")
    if label.ndim != 1:
        raise ValueError(f"{source}: 'label' must have shape (N,), got {label.shape}")
    if len(label) != len(image):
        raise ValueError(f"{source}: {len(label)} labels for {len(image)} images")
    labels = np.asarray(label, dtype=np.int64)
    if labels.min() < 0:
        raise ValueError(f"{source}: negative label {labels.min()}")
    if num_classes is not None and labels.max() >= num_classes:
        raise ValueError(f"{source}: label {labels.max()} out of range for {num_classes} classes")
    if image.dtype == np.float32:
        _check_float_images(image, source)
    return labels, int(num_classes if num_classes is not None else labels.max() + 1)


def load_npz(path: str | os.PathLike, num_classes: int | None = None, name: str | None = None) -> ImageDataset:
    """An ``ImageDataset`` from an .npz with ``image`` (N, H, W, C) and ``label`` (N,), validated, memory-mapped."""
    arrays = read_npz(path)
    missing = [key for key in ("image", "label") if key not in arrays]
    if missing:
        raise ValueError(f"{path}: missing key(s) {missing}; found {sorted(arrays)} (need 'image' and 'label')")
    labels, num_classes = validate_images_and_labels(arrays["image"], arrays["label"], str(path), num_classes)
    return ImageDataset([arrays["image"]], labels, num_classes, name or f"npz:{path}")


def shard_paths(location: str | os.PathLike) -> list[Path]:
    """The .npz files of a directory, a glob pattern, or a single file (sorted; temporaries never match)."""
    location = str(location)
    if os.path.isdir(location):
        paths = sorted(Path(location).glob("*.npz"))
    elif glob.has_magic(location):
        paths = sorted(Path(p) for p in glob.glob(location) if p.endswith(".npz"))
    else:
        paths = [Path(location)]
    if not paths:
        raise FileNotFoundError(f"no .npz shards found at {location}")
    return paths


def load_generated(location: str | os.PathLike, num_classes: int) -> ImageDataset:
    """Generated pseudo-data (one .npz or a directory/glob of shards), memory-mapped and validated."""
    shards = [load_npz(path, num_classes) for path in shard_paths(location)]
    return ImageDataset.concat(shards, name=f"generated:{location}")


