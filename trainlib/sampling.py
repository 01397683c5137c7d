"""Batches: the paper's real/generated mixing, deterministic and resumable, sharded by rank.

Mixing (docs/conventions.md §3): ``MixedBatchSampler`` builds each global batch of B from int(B·f) generated images
(f = unsup_fraction, drawn with replacement) and B − int(B·f) real ones (an endless stream of seeded
permutations, so every real image is seen once per pass), shuffled together; an epoch is
ceil(epoch_size / B) batches (epoch_size 50,000 for CIFAR, as in the public code). Everything is a pure
function of (seed, epoch, batch): resuming mid-epoch just starts at the batch, and rank r of w takes
the r-th contiguous slice of B/w, so the union over ranks does not depend on the process count. Random
crop (zero padding 4) + horizontal flip parameters are drawn the same way for the global batch.

``BatchLoader`` moves the gathered uint8 batch to the device (pinned, non-blocking on GPUs), crops and flips it there,
and converts it last: bit-identical to converting first, and faster (benchmarks/README.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from datagrad.seeding import numpy_generator

from .augment import crop_flip, random_crop_flip_params
from .datasets import ImageDataset, to_float_nchw

_REAL_STREAM, _MIX_STREAM, _AUGMENT_STREAM = 0, 1, 2


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
            self._permutations[sweep] = numpy_generator(self.seed, _REAL_STREAM, sweep).permutation(self.num_real)
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
        rng = numpy_generator(self.seed, _MIX_STREAM, epoch, batch)
        generated = self.num_real + rng.integers(0, max(self.num_generated, 1), self.generated_per_batch)
        return np.concatenate([real, generated])[rng.permutation(self.batch_size)]

    def batch_indices(self, epoch: int, batch: int) -> np.ndarray:
        """This rank's contiguous slice (B / world_size indices) of the global batch."""
        local = self.local_batch_size
        return self.global_batch(epoch, batch)[self.rank * local : (self.rank + 1) * local]

    def augment_generator(self, epoch: int, batch: int) -> torch.Generator:
        """A CPU generator for the global batch's augmentation parameters (same on every rank)."""
        seed = int(numpy_generator(self.seed, _AUGMENT_STREAM, epoch, batch).integers(0, 2**63 - 1))
        return torch.Generator().manual_seed(seed)




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
