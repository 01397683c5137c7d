"""Data path: images/s the training loader delivers over 1M memory-mapped generated 32×32×3 images, with the paper's
mixing and augmentation, and the peak memory of the process holding it and a WRN-28-10.

    python -m benchmarks.data_path                     # 1M images in 100 shards under /tmp (~3.1 GB, deleted after)
    python -m benchmarks.data_path --workdir /scratch --keep

Setup: ``--num-images`` synthetic uint8 images (random pixels, labels i mod 10) written as the generator writes them
(``trainlib.generation.shard_path`` / ``shard_ranges``, 10,000 per shard, uncompressed ``.npz`` via
``atomic_save_npz``), an in-memory "real" set of CIFAR-10's training size (48,976), and the trainer's resident state:
a WRN-28-10 with its EMA copy and SGD momentum buffers. The loader is ``trainlib.sampling.BatchLoader`` exactly as the
trainer builds it: ``load_generated`` (memory-mapped), batch 512 with 70 % generated images drawn with replacement,
random crop (pad 4) + horizontal flip on the whole batch. Compared, alternately, on the same batch indices:

* ours: ``BatchLoader.batch`` → x [512, 3, 32, 32] float32 in [0, 1], y [512];
* per-image PIL: what the public code does per image (``PIL.Image.fromarray`` → torchvision ``RandomCrop(32,
  padding=4)`` → ``RandomHorizontalFlip`` → ``ToTensor``, then ``torch.stack``), reading the same memory maps;
* gather only (the limit): copying the batch's uint8 rows out of the maps, no conversion, no augmentation.

Memory is read from /proc/self/status after every batch: RssAnon is the process's own memory (model, optimizer, EMA,
real data, batches); RssFile counts the pages of the memory-mapped shards the process has touched, which are the
kernel's page cache: shared, clean and reclaimable under memory pressure, and bounded by the data size (a random
sample touches them all eventually). The 1.5 GB target is therefore stated for RssAnon, the memory a training process
needs for itself; VmHWM (peak RssAnon + RssFile + RssShmem) is reported next to it.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from trainlib.adversarial import AdversarialConfig
from trainlib.classifier_step import build_optimizer
from trainlib.classifiers import build_classifier
from trainlib.cli import run_cli
from trainlib.config import option, parse_config
from trainlib.datasets import ImageDataset
from trainlib.ema import EMA
from trainlib.files import atomic_save_npz
from trainlib.generation import shard_path, shard_ranges
from trainlib.npz import load_generated
from trainlib.sampling import BatchLoader

from .common import BenchConfig, Report, alternate, median, memory_status, ratio, setup, spread

GB = 1e9


@dataclass
class DataPathConfig(BenchConfig):
    """Images/s and peak memory of the training loader over memory-mapped generated shards (benchmarks.data_path)."""

    num_images: int = option("generated images written as shards", 1_000_000)
    shard_size: int = option("images per shard (the generator's default)", 10_000)
    num_real: int = option("images of the in-memory real set (CIFAR-10 train split: 48,976)", 48_976)
    batch_size: int = option("global batch (Table 4: 512)", 512)
    unsup_fraction: float = option("fraction of each batch drawn from the generated shards", 0.7)
    batches: int = option("batches per timed run", 20)
    model: str = option("classifier held in memory with its EMA and momentum buffers (none: no model)", "wrn-28-10")
    workdir: str = option("directory for the temporary shard folder", tempfile.gettempdir())
    keep: bool = option("keep the shards (reused by a later run with the same --workdir and sizes)", False)

    def validate(self) -> None:
        super().validate()
        for name in ("num_images", "shard_size", "num_real", "batch_size", "batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.unsup_fraction < 1:
            raise ValueError(f"unsup_fraction must be in (0, 1), got {self.unsup_fraction}")
        if not Path(self.workdir).is_dir():
            raise FileNotFoundError(f"workdir not found: {self.workdir}")


def write_shards(folder: Path, num_images: int, shard_size: int) -> float:
    """Random uint8 shards in the generator's layout (image i has label i mod 10); returns the seconds taken.
    Shards already there with the right size are kept (``--keep``)."""
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    for shard, (lo, hi) in enumerate(tqdm(shard_ranges(num_images, shard_size), desc="writing shards", leave=False)):
        path = shard_path(folder, shard)
        if path.is_file() and path.stat().st_size > (hi - lo) * 3072:
            continue
        images = rng.integers(0, 256, (hi - lo, 32, 32, 3), dtype=np.uint8)
        atomic_save_npz(path, image=images, label=(np.arange(lo, hi) % 10).astype(np.int64))
    return time.perf_counter() - start


def per_image_pil(dataset: ImageDataset, indices: np.ndarray):
    """The per-image torchvision/PIL pipeline of the public code, on the same memory-mapped parts."""
    from PIL import Image
    from torchvision import transforms

    transform = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                    transforms.ToTensor()])
    part_of = np.searchsorted(dataset._starts[1:], indices, side="right")
    images = [transform(Image.fromarray(np.asarray(dataset.parts[p][i - dataset._starts[p]])))
              for p, i in zip(part_of, indices, strict=True)]
    return torch.stack(images), torch.from_numpy(dataset.labels[indices])


def gather_only(dataset: ImageDataset, indices: np.ndarray) -> np.ndarray:
    """The uint8 rows of the batch copied out of the maps (no conversion, no augmentation): the limit."""
    part_of = np.searchsorted(dataset._starts[1:], indices, side="right")
    out = np.empty((len(indices), *dataset.parts[0].shape[1:]), dtype=np.uint8)
    for part in np.unique(part_of):
        rows = np.flatnonzero(part_of == part)
        out[rows] = dataset.parts[part][indices[rows] - dataset._starts[part]]
    return out


class MemoryPeaks:
    """Maximum of each /proc/self/status field over the readings taken."""

    def __init__(self):
        self.peaks: dict[str, int] = {}

    def read(self) -> dict[str, int]:
        status = memory_status()
        for key, value in status.items():
            self.peaks[key] = max(self.peaks.get(key, 0), value)
        return status


def trainer_state(name: str):
    """A classifier with its EMA copy and SGD momentum buffers, as the trainer holds them (none: nothing)."""
    if name == "none":
        return None
    cfg = AdversarialConfig(model=name, dataset="cifar10")
    model = build_classifier(name, "cifar10", 10, (3, 32, 32))
    optimizer = build_optimizer(model, cfg)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # allocates the momentum buffers
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer, EMA(model)


def run(cfg: DataPathConfig) -> dict:
    device = setup(cfg)
    report = Report("data_path", cfg, device)
    memory = MemoryPeaks()
    baseline = memory.read()
    state = trainer_state(cfg.model)
    after_model = memory.read()

    folder = Path(cfg.workdir) / f"benchmark-shards-{cfg.num_images}-{cfg.shard_size}"
    folder.mkdir(exist_ok=True)
    try:
        write_seconds = write_shards(folder, cfg.num_images, cfg.shard_size)
        generated = load_generated(folder, 10)
        rng = np.random.default_rng(1)
        real = ImageDataset([rng.integers(0, 256, (cfg.num_real, 32, 32, 3), dtype=np.uint8)],
                            np.arange(cfg.num_real) % 10, 10, "synthetic real")
        loader = BatchLoader(real, cfg.batch_size, generated=generated, unsup_fraction=cfg.unsup_fraction,
                             epoch_size=50_000, seed=0, device=device, augment=True)
        after_setup = memory.read()
        position = {"batch": 0}

        def next_indices():
            epoch, batch = divmod(position["batch"], len(loader))
            position["batch"] += 1
            return epoch, batch, loader.sampler.batch_indices(epoch, batch)

        def ours():
            for _ in range(cfg.batches):
                epoch, batch, _ = next_indices()
                loader.batch(epoch, batch)
                memory.read()

        def pil():
            for _ in range(cfg.batches):
                per_image_pil(loader.dataset, next_indices()[2])
                memory.read()

        def limit():
            for _ in range(cfg.batches):
                gather_only(loader.dataset, next_indices()[2])
                memory.read()

        runs = {"ours (BatchLoader)": ours, "per-image PIL (public code)": pil, "gather only (limit)": limit}
        times = alternate(runs, cfg.repeats, cfg.warmup, device)
    finally:
        if not cfg.keep:
            shutil.rmtree(folder, ignore_errors=True)
    final = memory.read()
    del state

    images = cfg.batches * cfg.batch_size
    rate = {name: images / median(t) for name, t in times.items()}
    ours_name = "ours (BatchLoader)"
    rows = [[name, f"{rate[name]:,.0f}", spread([images / s for s in times[name]]),
             f"{ratio(times[name], times[ours_name]):.2f}"] for name in runs]
    report.table(
        f"{cfg.num_images:,} memory-mapped generated + {cfg.num_real:,} in-memory real images, batch {cfg.batch_size}"
        f" ({cfg.unsup_fraction:.0%} generated), crop + flip, {cfg.batches} batches per run, "
        f"{torch.get_num_threads()} thread(s), {cfg.repeats} rounds",
        ["loader", "images/s (median)", "min–max", "time ÷ ours"], rows,
    )
    gb = lambda status, key: f"{status.get(key, 0) / GB:.2f}"
    stages = [("start", baseline), (f"+ {cfg.model}, EMA, momentum", after_model),
              ("+ shards mapped, real set, loader", after_setup), ("end of the runs", final),
              ("peak over all readings", memory.peaks)]
    report.table("resident memory of the process (GB = 1e9 bytes)", ["stage", "RssAnon", "RssFile", "VmRSS", "VmHWM"],
                 [[name, gb(s, "RssAnon"), gb(s, "RssFile"), gb(s, "VmRSS"), gb(s, "VmHWM")] for name, s in stages])
    report.note(f"shards: {cfg.num_images:,} images in {len(shard_ranges(cfg.num_images, cfg.shard_size))} files, "
                f"{cfg.num_images * 3072 / GB:.2f} GB of pixels, written in {write_seconds:.0f} s"
                f"{' (reused)' if write_seconds < 1 else ''}; the public code would hold them in RssAnon")
    peak_anon, peak_total = memory.peaks.get("RssAnon", 0) / GB, memory.peaks.get("VmHWM", 0) / GB
    report.results = {"images_per_second": rate, "times": times, "memory": {k: dict(s) for k, s in stages},
                      "write_seconds": write_seconds}
    ours_rate, pil_rate, limit_rate = (rate[name] for name in runs)
    report.finish(f"ours {ours_rate:,.0f} images/s (target ≥ 10,000; {ours_rate / pil_rate:.1f}× per-image PIL, "
                  f"{ours_rate / limit_rate:.2f} of the gather-only limit); peak RssAnon {peak_anon:.2f} GB with "
                  f"{cfg.model} (target < 1.5), VmHWM {peak_total:.2f} GB with the maps' page cache")
    return report.results


def main() -> None:
    run_cli(lambda: run(parse_config(DataPathConfig, prog="python -m benchmarks.data_path")))


if __name__ == "__main__":
    main()
