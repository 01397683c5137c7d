"""Datasets, memory-mapped generated shards, the paper's real/generated batch mixing, and augmentation.

Conventions. An ``ImageDataset`` stores pixels NHWC as numpy arrays (uint8 0..255, or float32 in [0, 1];
possibly ``np.memmap``s) with int64 labels; ``dataset.get(indices)`` returns model-ready tensors
``x`` [B, C, H, W] float32 in [0, 1] and ``y`` [B] int64, converting uint8 to float in one tensor op on the
target device (so only the gathered batch ever leaves the memory map). ``BatchLoader`` moves the gathered uint8
batch to the device (pinned, non-blocking on GPUs), crops and flips it there, and converts it last: bit-identical
to converting first, and on the CPU 2x faster on one thread, 12x on two busy ones (benchmarks/README.md).
Gaussian-mixture toys are the one exception to [0, 1]: their samples are not clipped, so the closed-form
posterior stays exact.

Datasets (``load_dataset(name, split, data_dir)``; splits "train", "val", "test", "trainval" = train+val):
  digits     scikit-learn's 1,797 real 8×8 digits (values 0..16 → /16), 1 channel, 10 classes, embedded
             (no download). Fixed split from ``RandomState(0).permutation(1797)``: the first 360 are
             test, the next 180 val, the remaining 1,257 train.
  cifar10    torchvision CIFAR-10 / CIFAR-100, downloaded into ``data_dir`` (md5-verified pickles).
  cifar100   As in the public code, val = the first 1,024 training images, train = the other 48,976.
  gmm-8x8    ``GaussianMixture`` toys rendered as images (``TOY_MIXTURES``; ``toy_mixture(name)`` gives the
  gmm-4x4    exact mixture): fixed-seed samples, 10,000 train / 1,000 val / 2,000 test.
  digits-mixture  a digit mixture with exact truth: p_d = (1/N) Σ_i N(x_i, h²I) over the N = 1,257 training digits
             (``datagrad.KernelMixture``, h = 0.1; ``digits-mixture:H`` for another h), sampled afresh with fixed
             seeds, 10,000 train / 1,000 val / 2,000 test: the images look like digits, p_σ(y|x) is exact at every σ
             (kernel std sqrt(h² + σ²)); samples are not clipped, as for gmm-*.
  npz:PATH   keys ``image`` (N, H, W, C) uint8 or float32 in [0, 1] and ``label`` (N,) int. A ``{split}`` in
             PATH is replaced by the split name; without it the file is the "train"/"trainval" split only.

Generated pseudo-data (DeepMind / SCORE format: uncompressed .npz, ``image`` uint8 (N, 32, 32, 3), ``label``
int64) is read by ``load_generated`` without loading it: each stored zip member's data offset is located
and ``np.memmap``ed with the .npy header's dtype/shape/order (``np.load(mmap_mode=...)`` does not map npz
members). A compressed member is loaded into memory with a warning.

Mixing (docs/conventions.md §3): ``MixedBatchSampler`` builds each global batch of B from int(B·f) generated images
(f = unsup_fraction, drawn with replacement) and B − int(B·f) real ones (an endless stream of seeded
permutations, so every real image is seen once per pass), shuffled together; an epoch is
ceil(epoch_size / B) batches (epoch_size 50,000 for CIFAR, as in the public code). Everything is a pure
function of (seed, epoch, batch): resuming mid-epoch just starts at the batch, and rank r of w takes
the r-th contiguous slice of B/w, so the union over ranks does not depend on the process count. Random
crop (zero padding 4) + horizontal flip parameters are drawn the same way for the global batch.
"""

from __future__ import annotations

import glob
import math
import os
import struct
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from datagrad import GaussianMixture

SPLITS = ("train", "val", "test", "trainval")


# -- the dataset container ----------------------------------------------------------------------------------
def to_device(x: Tensor, device: torch.device | str) -> Tensor:
    """A CPU tensor on ``device``. To a GPU it goes through pinned memory without blocking the host: a copy from
    pageable memory would first wait for every kernel already queued (a host-device sync per batch)."""
    device = torch.device(device)
    if device.type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


def to_float_nchw(x: Tensor) -> Tensor:
    """Images [B, C, H, W] of any strides (e.g. a permuted NHWC batch), uint8 (0..255) or float → a contiguous
    float32 [B, C, H, W] in [0, 1], converted, divided and laid out in ONE pass (uint8: x / 255 in float32)."""
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    return torch.div(x, 255.0, out=out) if x.dtype == torch.uint8 else out.copy_(x)


class ImageDataset:
    """Labelled images stored as one or more NHWC pixel arrays (``parts``) with int64 labels."""

    def __init__(
        self,
        parts: Sequence[np.ndarray],
        labels: np.ndarray,
        num_classes: int,
        name: str = "",
        mixture: GaussianMixture | None = None,
    ):
        parts, name = list(parts), name or "dataset"
        if not parts or any(p.ndim != 4 for p in parts):
            raise ValueError(f"{name}: pixel arrays must be [N, H, W, C]")
        if len({p.shape[1:] for p in parts}) != 1:
            raise ValueError(f"{name}: pixel arrays differ in shape: {sorted({p.shape[1:] for p in parts})}")
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != (sum(len(p) for p in parts),):
            raise ValueError(f"{name}: {labels.shape[0]} labels for {sum(len(p) for p in parts)} images")
        self.parts, self.labels, self.num_classes = parts, labels, int(num_classes)
        self.name, self.mixture = name, mixture
        self._starts = np.cumsum([0] + [len(p) for p in parts])  # part i holds [starts[i], starts[i+1])

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the tensors ``get`` returns."""
        height, width, channels = self.parts[0].shape[1:]
        return channels, height, width

    @classmethod
    def concat(cls, datasets: Sequence[ImageDataset], name: str = "") -> ImageDataset:
        """The datasets one after the other (indices of the second start at len(first), ...)."""
        classes = {d.num_classes for d in datasets}
        if len(classes) != 1:
            raise ValueError(f"cannot combine datasets with different class counts: {sorted(classes)}")
        shapes = {d.image_shape for d in datasets}
        if len(shapes) != 1:
            raise ValueError(f"cannot combine datasets with different image shapes (C, H, W): {sorted(shapes)}")
        parts = [p for d in datasets for p in d.parts]
        return cls(parts, np.concatenate([d.labels for d in datasets]), classes.pop(), name)

    def get(self, indices: Sequence[int] | np.ndarray, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """x [B, C, H, W] float32 in [0, 1] and y [B] int64 on ``device`` for the given indices."""
        raw, y = self.gather(indices, device)
        return to_float_nchw(raw), y

    def gather(self, indices: Sequence[int] | np.ndarray, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """The stored pixels as x [B, C, H, W] (a permuted view of NHWC memory) and y [B] int64, on ``device``.

        x is uint8 (0..255) when every selected image is stored as uint8, else float32 in [0, 1] (uint8 rows of a
        mixed batch divided by 255 here). Only the gathered rows leave the memory maps, and they cross to the device
        in their stored width (uint8: 1 byte per value); :func:`to_float_nchw` makes the model-ready tensor.
        """
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"{self.name}: index out of range [0, {len(self)})")
        part_of = np.searchsorted(self._starts[1:], indices, side="right")
        order = np.argsort(part_of, kind="stable")  # rows grouped by part: one slice per part, no per-part scan
        selected, first = np.unique(part_of[order], return_index=True)
        uint8 = all(self.parts[part].dtype == np.uint8 for part in selected)
        raw = np.empty((len(indices), *self.parts[0].shape[1:]), dtype=np.uint8 if uint8 else np.float32)
        bounds = np.append(first, len(order))
        for part, lo, hi in zip(selected, bounds[:-1], bounds[1:], strict=True):
            rows = order[lo:hi]
            block = self.parts[part][indices[rows] - self._starts[part]]  # [b, H, W, C]
            raw[rows] = block if uint8 or block.dtype != np.uint8 else block / np.float32(255.0)
        x = to_device(torch.from_numpy(raw), device).permute(0, 3, 1, 2)  # [B, C, H, W] view
        return x, to_device(torch.from_numpy(self.labels[indices]), device)

    def tensors(self, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """All images [N, C, H, W] float32 and labels [N] (meant for small datasets)."""
        return self.get(np.arange(len(self)), device)

    def __repr__(self) -> str:
        return f"ImageDataset({self.name!r}, n={len(self)}, shape={self.image_shape}, classes={self.num_classes})"


# -- npz files: validation and memory mapping -------------------------------------------------------------------
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


# -- named datasets ---------------------------------------------------------------------------------------------
def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")


def _load_digits(split: str, data_dir: str | os.PathLike) -> ImageDataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = (digits.images / 16.0).astype(np.float32)[..., None]  # [1797, 8, 8, 1]
    order = np.random.RandomState(0).permutation(len(pixels))
    rows = {"test": order[:360], "val": order[360:540], "train": order[540:], "trainval": order[360:]}[split]
    return ImageDataset([pixels[rows]], digits.target[rows], 10, f"digits/{split}")


def _load_cifar(name: str, split: str, data_dir: str | os.PathLike) -> ImageDataset:
    import torchvision

    cls, num_classes = (torchvision.datasets.CIFAR10, 10) if name == "cifar10" else (torchvision.datasets.CIFAR100, 100)
    try:
        data = cls(root=str(data_dir), train=split != "test", download=True)
    except (OSError, RuntimeError) as e:
        raise FileNotFoundError(f"{name} is not in {data_dir} and could not be downloaded ({e})") from None
    pixels, labels = data.data, np.asarray(data.targets, dtype=np.int64)  # [N, 32, 32, 3] uint8
    rows = {"val": slice(0, 1024), "train": slice(1024, None)}.get(split, slice(None))
    return ImageDataset([pixels[rows]], labels[rows], num_classes, f"{name}/{split}")


def _hadamard_patterns(num_classes: int, side: int) -> np.ndarray:
    """Rows 1..K of the Sylvester–Hadamard matrix of order side², as ±1 patterns [K, side²].

    h(i, j) = (−1)^popcount(i & j): stripes and checkerboards, any two differing in exactly half the pixels.
    """
    index = np.arange(side * side)
    rows = np.arange(1, num_classes + 1)
    popcount = np.vectorize(lambda n: bin(n).count("1"))(rows[:, None] & index[None, :])
    return (1.0 - 2.0 * (popcount % 2)).astype(np.float64)


# name: (classes K, image side, pattern amplitude a, per-pixel std s); means 0.5 + a·pattern, equal priors.
TOY_MIXTURES = {
    "gmm-8x8": (10, 8, 0.10, 0.15),
    "gmm-4x4": (3, 4, 0.15, 0.15),
}
_TOY_SIZES = {"train": 10_000, "val": 1_000, "test": 2_000}
_TOY_SEEDS = {"train": 1, "val": 2, "test": 3}


def toy_mixture(name: str) -> GaussianMixture:
    """The exact ``GaussianMixture`` (event shape (1, side, side)) behind a toy dataset.

    Means 0.5 + a·h_k with h_k ±1 Hadamard patterns (so ||μ_j − μ_k||² = 2·d·a² for all j ≠ k), isotropic
    std s, uniform priors.
    """
    if name not in TOY_MIXTURES:
        raise ValueError(f"unknown toy mixture {name!r}; valid: {', '.join(TOY_MIXTURES)}")
    num_classes, side, amplitude, std = TOY_MIXTURES[name]
    means = 0.5 + amplitude * _hadamard_patterns(num_classes, side)
    return GaussianMixture(means, [std] * num_classes, [1.0 / num_classes] * num_classes, (1, side, side))


DIGITS_MIXTURE = "digits-mixture"
DIGITS_MIXTURE_BANDWIDTH = 0.1


def digits_mixture(name: str = DIGITS_MIXTURE):
    """The ``datagrad.KernelMixture`` behind ``digits-mixture[:H]``: kernels of std h at the real training digits."""
    from datagrad import KernelMixture

    bandwidth = DIGITS_MIXTURE_BANDWIDTH
    if name != DIGITS_MIXTURE:
        try:
            bandwidth = float(name[len(DIGITS_MIXTURE) + 1 :])
        except ValueError:
            raise ValueError(f"{name!r}: the kernel std goes after a colon, e.g. {DIGITS_MIXTURE}:0.05") from None
        if not bandwidth > 0:
            raise ValueError(f"{name!r}: the kernel std must be > 0")
    digits = _load_digits("train", "")
    x, y = digits.tensors()
    return KernelMixture(x.double(), y, digits.num_classes, bandwidth)


def dataset_mixture(name: str):
    """The exact distribution behind a toy dataset (gmm-*, digits-mixture[:H]), else None."""
    if name in TOY_MIXTURES:
        return toy_mixture(name)
    if name == DIGITS_MIXTURE or name.startswith(DIGITS_MIXTURE + ":"):
        return digits_mixture(name)
    return None


def _load_sampled(name: str, split: str) -> ImageDataset:
    """A fixed-seed sample of a toy distribution (gmm-*, digits-mixture), not clipped, with its exact mixture."""
    mixture = dataset_mixture(name)
    parts = ["train", "val"] if split == "trainval" else [split]
    pixels, labels = [], []
    for part in parts:
        x, y = mixture.sample(_TOY_SIZES[part], torch.Generator().manual_seed(_TOY_SEEDS[part]))
        pixels.append(x.permute(0, 2, 3, 1).numpy())  # [n, side, side, 1]
        labels.append(y.numpy())
    return ImageDataset(
        [np.concatenate(pixels)], np.concatenate(labels), mixture.num_classes, f"{name}/{split}", mixture
    )


def _load_npz_split(path: str, split: str, num_classes: int | None) -> ImageDataset:
    if "{split}" in path:
        return load_npz(path.replace("{split}", split), num_classes, f"npz:{path}/{split}")
    if split not in ("train", "trainval"):
        raise ValueError(
            f"npz:{path} is a single file and has no {split!r} split; put '{{split}}' in the path "
            "(e.g. npz:data/set_{split}.npz) to use one file per split"
        )
    return load_npz(path, num_classes, f"npz:{path}")


DATASET_NAMES = ("digits", "cifar10", "cifar100", *TOY_MIXTURES, DIGITS_MIXTURE, "npz:PATH")


def check_dataset_name(name: str) -> None:
    """ValueError naming the valid choices unless ``name`` is a known dataset or ``npz:PATH`` (no files read)."""
    if not (name in DATASET_NAMES or name.startswith("npz:") or name.startswith(DIGITS_MIXTURE + ":")):
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")


def has_closed_form(name: str) -> bool:
    """Whether the dataset's exact posterior is known (gmm-*, digits-mixture[:H])."""
    return name in TOY_MIXTURES or name == DIGITS_MIXTURE or name.startswith(DIGITS_MIXTURE + ":")


def load_dataset(
    name: str, split: str = "train", data_dir: str | os.PathLike = "data", num_classes: int | None = None
) -> ImageDataset:
    """Load a named dataset split (see module docstring); ``num_classes`` bounds labels of npz data."""
    _check_split(split)
    check_dataset_name(name)
    if name.startswith("npz:"):
        return _load_npz_split(name[len("npz:") :], split, num_classes)
    if name == "digits":
        return _load_digits(split, data_dir)
    if name in ("cifar10", "cifar100"):
        return _load_cifar(name, split, data_dir)
    return _load_sampled(name, split)  # gmm-*, digits-mixture[:H]


# -- sampling ----------------------------------------------------------------------------------------------------------
_REAL_STREAM, _MIX_STREAM, _AUGMENT_STREAM = 0, 1, 2


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(key))))


class MixedBatchSampler:
    """Deterministic, resumable batches of real + generated indices (module docstring).

    Indices address ``ImageDataset.concat([real, generated])``: real in [0, num_real), generated in
    [num_real, num_real + num_generated).
    """

    def __init__(
        self,
        num_real: int,
        batch_size: int,
        *,
        num_generated: int = 0,
        unsup_fraction: float = 0.0,
        epoch_size: int | None = None,
        seed: int = 0,
        world_size: int = 1,
        rank: int = 0,
    ):
        if batch_size < 1 or batch_size % world_size:
            raise ValueError(f"global batch size {batch_size} must be positive and divisible by {world_size} processes")
        if not 0.0 <= unsup_fraction <= 1.0:
            raise ValueError(f"unsup_fraction must be in [0, 1], got {unsup_fraction}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world size {world_size}")
        self.generated_per_batch = int(batch_size * unsup_fraction)
        self.real_per_batch = batch_size - self.generated_per_batch
        if self.generated_per_batch and num_generated < 1:
            raise ValueError(f"unsup_fraction {unsup_fraction} needs generated data, but none was given")
        if self.real_per_batch and num_real < 1:
            raise ValueError("no real training data")
        self.num_real, self.num_generated, self.batch_size = num_real, num_generated, batch_size
        self.seed, self.world_size, self.rank = seed, world_size, rank
        self.epoch_size = num_real if epoch_size is None else epoch_size
        self.num_batches = math.ceil(self.epoch_size / batch_size)
        self._permutations: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.num_batches

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.world_size

    def _real_permutation(self, sweep: int) -> np.ndarray:
        if sweep not in self._permutations:
            self._permutations = {k: v for k, v in self._permutations.items() if k >= sweep - 1}
            self._permutations[sweep] = _rng(self.seed, _REAL_STREAM, sweep).permutation(self.num_real)
        return self._permutations[sweep]

    def global_batch(self, epoch: int, batch: int) -> np.ndarray:
        """All B indices of batch ``batch`` of epoch ``epoch`` (identical on every rank)."""
        if not 0 <= batch < self.num_batches:
            raise ValueError(f"batch {batch} out of range for an epoch of {self.num_batches} batches")
        start = (epoch * self.num_batches + batch) * self.real_per_batch  # position in the real stream
        positions = np.arange(start, start + self.real_per_batch)
        real = np.empty(self.real_per_batch, dtype=np.int64)
        for sweep in np.unique(positions // max(self.num_real, 1)):
            mask = positions // self.num_real == sweep
            real[mask] = self._real_permutation(int(sweep))[positions[mask] % self.num_real]
        rng = _rng(self.seed, _MIX_STREAM, epoch, batch)
        generated = self.num_real + rng.integers(0, max(self.num_generated, 1), self.generated_per_batch)
        return np.concatenate([real, generated])[rng.permutation(self.batch_size)]

    def batch_indices(self, epoch: int, batch: int) -> np.ndarray:
        """This rank's contiguous slice (B / world_size indices) of the global batch."""
        local = self.local_batch_size
        return self.global_batch(epoch, batch)[self.rank * local : (self.rank + 1) * local]

    def augment_generator(self, epoch: int, batch: int) -> torch.Generator:
        """A CPU generator for the global batch's augmentation parameters (same on every rank)."""
        seed = int(_rng(self.seed, _AUGMENT_STREAM, epoch, batch).integers(0, 2**63 - 1))
        return torch.Generator().manual_seed(seed)


# -- augmentation ------------------------------------------------------------------------------------------------
def crop_flip(x: Tensor, top: Tensor, left: Tensor, flip: Tensor, padding: int = 4) -> Tensor:
    """Crop each image of x [B, C, H, W] from its zero-padded version at (top, left) ∈ [0, 2p]², then mirror
    it horizontally where ``flip`` [B] is true: out[b, :, i, j] = pad(x)[b, :, top_b + i, left_b + j'] with
    j' = W − 1 − j if flip_b else j. Two gathers for the whole batch (rows, then columns), on x's device, in x's
    dtype and memory layout (pure data movement: on uint8 pixels it commutes exactly with the float conversion)."""
    batch, channels, height, width = x.shape
    device = x.device
    top, left, flip = (to_device(t, device) if t.device != device else t for t in (top, left, flip))
    padded = F.pad(x, (padding, padding, padding, padding))  # [B, C, H + 2p, W + 2p]
    rows = top[:, None] + torch.arange(height, device=device)  # [B, H]
    columns = torch.arange(width, device=device).expand(batch, width)
    columns = torch.where(flip[:, None], width - 1 - columns, columns) + left[:, None]  # [B, W]
    cropped = padded.gather(2, rows[:, None, :, None].expand(batch, channels, height, padded.shape[3]))
    return cropped.gather(3, columns[:, None, None, :].expand(batch, channels, height, width))


def random_crop_flip_params(batch: int, padding: int = 4, generator: torch.Generator | None = None):
    """(top, left, flip) for ``crop_flip``: offsets uniform in [0, 2p], flip with probability 1/2."""
    device = generator.device if generator is not None else torch.device("cpu")
    top = torch.randint(0, 2 * padding + 1, (batch,), generator=generator, device=device)
    left = torch.randint(0, 2 * padding + 1, (batch,), generator=generator, device=device)
    flip = torch.rand(batch, generator=generator, device=device) < 0.5
    return top, left, flip


def random_crop_flip(x: Tensor, padding: int = 4, generator: torch.Generator | None = None) -> Tensor:
    """Random crop with ``padding`` zero pixels + random horizontal flip of a whole batch x [B, C, H, W]."""
    return crop_flip(x, *random_crop_flip_params(x.shape[0], padding, generator), padding=padding)


# -- batch iteration ---------------------------------------------------------------------------------------------
class BatchLoader:
    """Training batches for one rank: (x [B/w, C, H, W] float32 in [0, 1], y [B/w] int64) on ``device``.

    Do not pass it to ``accelerator.prepare``: it already shards by rank and resumes by (epoch, batch).
    """

    def __init__(
        self,
        real: ImageDataset,
        batch_size: int,
        *,
        generated: ImageDataset | None = None,
        unsup_fraction: float = 0.0,
        epoch_size: int | None = None,
        seed: int = 0,
        world_size: int = 1,
        rank: int = 0,
        device: torch.device | str = "cpu",
        augment: bool = False,
        padding: int = 4,
    ):
        if generated is not None:
            if generated.num_classes != real.num_classes:
                raise ValueError(f"generated data has {generated.num_classes} classes, real data {real.num_classes}")
            if generated.image_shape != real.image_shape:
                raise ValueError(
                    f"generated images are {generated.image_shape}, real ones {real.image_shape} (C, H, W)"
                )
        self.dataset = real if generated is None else ImageDataset.concat([real, generated], name="real+generated")
        self.sampler = MixedBatchSampler(
            len(real),
            batch_size,
            num_generated=0 if generated is None else len(generated),
            unsup_fraction=unsup_fraction,
            epoch_size=epoch_size,
            seed=seed,
            world_size=world_size,
            rank=rank,
        )
        self.device, self.augment, self.padding = torch.device(device), augment, padding

    def __len__(self) -> int:
        return len(self.sampler)

    def batch(self, epoch: int, batch: int) -> tuple[Tensor, Tensor]:
        x, y = self.dataset.gather(self.sampler.batch_indices(epoch, batch), self.device)  # stored dtype (uint8)
        if self.augment:  # on the stored pixels, before the float conversion (4× less memory traffic for uint8)
            top, left, flip = random_crop_flip_params(
                self.sampler.batch_size, self.padding, self.sampler.augment_generator(epoch, batch)
            )
            local = slice(self.sampler.rank * len(y), (self.sampler.rank + 1) * len(y))
            x = crop_flip(x, top[local], left[local], flip[local], self.padding)
        return to_float_nchw(x), y

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches start_batch, ..., len(self) − 1 of ``epoch``."""
        for batch in range(start_batch, len(self)):
            yield self.batch(epoch, batch)


def ordered_batches(
    dataset: ImageDataset, batch_size: int, device: torch.device | str = "cpu", limit: int | None = None
) -> Iterator[tuple[Tensor, Tensor]]:
    """The first ``limit`` (default all) examples in order, in batches (for evaluation)."""
    stop = len(dataset) if limit is None else min(limit, len(dataset))
    for start in range(0, stop, batch_size):
        yield dataset.get(np.arange(start, min(start + batch_size, stop)), device)
