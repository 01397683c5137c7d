"""Labelled image datasets: the container, the named datasets and their splits.

An ``ImageDataset`` stores pixels NHWC as numpy arrays (uint8 0..255, or float32 in [0, 1];
possibly ``np.memmap``s) with int64 labels; ``dataset.get(indices)`` returns model-ready tensors
``x`` [B, C, H, W] float32 in [0, 1] and ``y`` [B] int64, converting uint8 to float in one tensor op on the
target device (so only the gathered batch ever leaves the memory map). ``BatchLoader`` moves the gathered uint8
batch to the device (pinned, non-blocking on GPUs), crops and flips it there, and converts it last: bit-identical
to converting first, and faster (``python -m benchmarks.data_path``; figures in benchmarks/README.md).
Gaussian-mixture toys are the one exception to [0, 1]: their samples are not clipped, so the closed-form
posterior stays exact.

Datasets (``load_dataset(name, split, data_dir)``; splits "train", "val", "test", "trainval" = train+val):
  digits     scikit-learn's 1,797 real 8×8 digits (values 0..16 → /16), 1 channel, 10 classes, embedded
             (no download). Fixed split from ``RandomState(0).permutation(1797)``: the first 360 are
             test, the next 180 val, the remaining 1,257 train.
  cifar10    torchvision CIFAR-10 / CIFAR-100, downloaded into ``data_dir`` (md5-verified pickles).
  cifar100   As in the public code, val = the first 1,024 training images, train = the other 48,976.
  gmm-8x8    ``GaussianMixture`` toys rendered as images (``TOY_MIXTURES``; ``toy_mixture(name)`` gives the
  gmm-4x4    exact mixture): fixed-seed samples, 10,000 train / 1,000 val / 2,000 test (``train_samples``: a larger
             fixed-seed train sample, for estimators studied at more data than the classifiers get).
  digits-mixture  a digit mixture with exact truth: p_d = (1/N) Σ_i N(x_i, h²I) over the N = 1,257 training digits
             (``datagrad.KernelMixture``, h = 0.1; ``digits-mixture:H`` for another h), sampled afresh with fixed
             seeds, 10,000 train / 1,000 val / 2,000 test: the images look like digits, p_σ(y|x) is exact at every σ
             (kernel std sqrt(h² + σ²)); samples are not clipped, as for gmm-*.
  npz:PATH   keys ``image`` (N, H, W, C) uint8 or float32 in [0, 1] and ``label`` (N,) int. A ``{split}`` in
             PATH is replaced by the split name; without it the file is the "train"/"trainval" split only.

Raw files: ``trainlib.npz`` (npz and generated shards); batches: ``trainlib.sampling``; augmentation:
``trainlib.augment``. The toy mixtures' math lives in ``datagrad.toys`` and ``datagrad.kernels``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from datagrad import GaussianMixture
from datagrad.toys import TOY_MIXTURES, toy_mixture

SPLITS = ("train", "val", "test", "trainval")


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


_TOY_SIZES = {"train": 10_000, "val": 1_000, "test": 2_000}
_TOY_SEEDS = {"train": 1, "val": 2, "test": 3}


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


def _load_sampled(name: str, split: str, train_samples: int | None = None) -> ImageDataset:
    """A fixed-seed sample of a toy distribution (gmm-*, digits-mixture), not clipped, with its exact mixture;
    ``train_samples`` replaces the train part's 10,000."""
    mixture = dataset_mixture(name)
    parts = ["train", "val"] if split == "trainval" else [split]
    sizes = _TOY_SIZES | ({"train": train_samples} if train_samples else {})
    pixels, labels = [], []
    for part in parts:
        x, y = mixture.sample(sizes[part], torch.Generator().manual_seed(_TOY_SEEDS[part]))
        pixels.append(x.permute(0, 2, 3, 1).numpy())  # [n, side, side, 1]
        labels.append(y.numpy())
    return ImageDataset(
        [np.concatenate(pixels)], np.concatenate(labels), mixture.num_classes, f"{name}/{split}", mixture
    )


def _load_npz_split(path: str, split: str, num_classes: int | None) -> ImageDataset:
    from .npz import load_npz

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
    name: str, split: str = "train", data_dir: str | os.PathLike = "data", num_classes: int | None = None,
    train_samples: int | None = None,
) -> ImageDataset:
    """Load a named dataset split (see module docstring); ``num_classes`` bounds labels of npz data;
    ``train_samples`` (sampled toys only) the size of their train sample (none: 10,000)."""
    _check_split(split)
    check_dataset_name(name)
    if train_samples is not None and not has_closed_form(name):
        raise ValueError(f"--train-samples draws from a known distribution (gmm-*, digits-mixture), not {name!r}")
    if name.startswith("npz:"):
        return _load_npz_split(name[len("npz:") :], split, num_classes)
    if name == "digits":
        return _load_digits(split, data_dir)
    if name in ("cifar10", "cifar100"):
        return _load_cifar(name, split, data_dir)
    return _load_sampled(name, split, train_samples)  # gmm-*, digits-mixture[:H]


