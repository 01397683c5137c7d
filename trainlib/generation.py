"""Class-conditional pseudo-data from a trained score net, as SCORE/DeepMind-format shards (``train/generate.py``).

Output directory (``--out``):

    shard_00000.npz …   ``image`` uint8 [n, H, W, C] and ``label`` int64 [n]; uncompressed ``np.savez`` (so
                        ``trainlib.npz.load_generated`` memory-maps them), each written atomically
    generation.json     the settings, the rules below, the shard list and ``complete`` (written by the main process)
    grid.png            the first ``grid_columns`` generated images of every class; row c = class c

Which image is which. Nothing depends on the batch size or the number of processes (the pixel values depend on the
batch size only through the rounding of batched float kernels, e.g. cuDNN algorithm choice; a fixed batch size gives
bit-identical shards for any process count and across resumes):

    global index  i = 0 … N−1
    label(i)      = i mod K                 (balanced: class counts differ by at most one, lower classes first)
    seed(i)       = SeedSequence([seed, i]) → a 63-bit integer; the sampler draws image i with its own generator
    shard s       = indices [s·S, min((s + 1)·S, N)), S = ``shard_size``; process r of w writes the shards s ≡ r (mod w)

Resuming: a shard that exists, loads, and holds the expected number of images with the expected labels is kept;
one that does not (truncated, corrupt, wrong contents) is regenerated with a warning. Shards are written through a
temporary file renamed into place, so an interrupted run never leaves a partial ``shard_*.npz``; temporaries a
crash left behind are removed at the next start. A directory holding shards made with other settings (score-net
weights, sampler, seed, …) is refused rather than mixed.

Filtering (``--filter-classifier PATH --keep-fraction f``): per shard and per class c with n_c images in the shard,
m_c = ceil(n_c/f) candidates are drawn (candidate j of class c with seed SeedSequence([seed, 1, s, c, j])), the
classifier's confidence p(c | x) in the intended class is computed on the uint8-rounded images, and the n_c
candidates with the highest confidence are kept (ties: the lower j), in candidate order, filling the shard's slots
of class c in index order. Labels stay i mod K; the kept fraction is f per class and shard up to rounding. Use a
classifier other than the quality report's, or the report measures its own selection.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from datagrad.seeding import derived_seed
from scorenets import DEFAULT_STEPS, SAMPLERS, ScoreNet, sample, to_uint8_nhwc

from .accelerator import check_collective_timeout, check_world_size, process_group_kwargs
from .cli import checking_input
from .config import Options, config_to_dict, option
from .files import atomic_path, atomic_save_npz, atomic_write_json, cleanup_temporaries, sha256_file
from .npz import load_npz
from .quality import load_reference
from .rundir import git_revision, package_versions
from .scorenet_training import find_scorenet_dir, load_scorenet

MANIFEST = "generation.json"
GRID = "grid.png"
SHARD_PATTERN = "shard_{:05d}.npz"
CLASSIFIER_CHUNK = 512  # fixed classification chunk: confidences do not depend on --batch-size
_CANDIDATE_STREAM = 1
GENERATION_COLLECTIVE_TIMEOUT = 6 * 3600.0  # seconds: ranks wait at the end for up to one shard of another rank


@dataclass
class GenerateConfig(Options):
    """Generate class-conditional pseudo-data shards from a trained score net (trainlib.generation)."""

    scorenet: str = option("score-net run directory or its scorenet/ folder", "runs/scorenet-digits")
    out: str = option("output directory of the shards, generation.json and grid.png", "runs/generated-digits")
    num_images: int = option("images to generate (label of image i: i mod K)", 1000, ge=1)
    sampler: Literal["ddpm", "ddim", "dpmsolver++"] = option("diffusers sampler", "dpmsolver++")
    sampler_steps: int | None = option(f"sampler steps (none: {DEFAULT_STEPS})", None, ge=1, renamed_from="steps")
    guidance_scale: float = option("classifier-free guidance w (1: plain conditional model, 0: unconditional)", 1.0)
    seed: int = option("base seed of the per-image seeds", 0)
    shard_size: int = option("images per shard", 10000, ge=1)
    batch_size: int = option("images per sampler call (does not change the output)", 250, ge=1)
    filter_classifier: str | None = option("classifier run directory or .safetensors: keep the most confident", None)
    keep_fraction: float = option("with --filter-classifier: fraction kept per class (oversampling 1/f)", 0.2, gt=0,
                                  le=1)
    grid_columns: int = option("images per class in grid.png (0: no grid)", 10, ge=0)
    num_processes: int | None = option("refuse to start unless the world size is this", None, ge=1)
    collective_timeout: float = option(
        "seconds a process waits for the others before failing; the final barrier waits for the slowest rank's last "
        "shard, so this must exceed one shard's generation time", GENERATION_COLLECTIVE_TIMEOUT, gt=0)

    def validate(self) -> None:
        """Check values that need no files (``--dry-run`` runs this too)."""
        super().validate()
        if not (math.isfinite(self.guidance_scale) and self.guidance_scale >= 0):
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {self.guidance_scale}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; valid samplers: {', '.join(SAMPLERS)}")
        check_collective_timeout(self.collective_timeout)


# -- the index rules ---------------------------------------------------------------------------------------------------
def image_labels(start: int, stop: int, num_classes: int) -> np.ndarray:
    """label(i) = i mod K for i in [start, stop): int64 [stop − start]."""
    return np.arange(start, stop, dtype=np.int64) % num_classes


def shard_ranges(num_images: int, shard_size: int) -> list[tuple[int, int]]:
    """[start, stop) of every shard."""
    return [(start, min(start + shard_size, num_images)) for start in range(0, num_images, shard_size)]


def candidate_count(kept: int, keep_fraction: float) -> int:
    """m = ceil(n / f) candidates to keep n (the quotient rounded to 9 decimals first: 4 / 0.2 gives 20, not 21)."""
    return math.ceil(round(kept / keep_fraction, 9))


def shard_path(out: str | os.PathLike, shard: int) -> Path:
    return Path(out) / SHARD_PATTERN.format(shard)


# -- drawing images ----------------------------------------------------------------------------------------------------
def draw(
    scorenet: ScoreNet, labels: np.ndarray, seeds: list[int], cfg: GenerateConfig, progress: tqdm | None = None
) -> np.ndarray:
    """Images for (label, seed) pairs in batches of ``cfg.batch_size``: uint8 [n, H, W, C]."""
    chunks = []
    for start in range(0, len(labels), cfg.batch_size):
        stop = min(start + cfg.batch_size, len(labels))
        images = sample(scorenet, labels[start:stop], seeds[start:stop], sampler=cfg.sampler,
                        num_steps=cfg.sampler_steps, guidance_scale=cfg.guidance_scale)
        chunks.append(to_uint8_nhwc(images))
        if progress is not None:
            progress.update(stop - start)
    return np.concatenate(chunks)


@torch.no_grad()
def confidences(classifier: nn.Module, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """p(label | image) from ``classifier`` for uint8 NHWC images, in fixed chunks: float64 [n]."""
    device = next(classifier.parameters()).device
    out = []
    for start in range(0, len(images), CLASSIFIER_CHUNK):
        x = torch.from_numpy(images[start : start + CLASSIFIER_CHUNK]).to(device).permute(0, 3, 1, 2).float() / 255
        y = torch.from_numpy(labels[start : start + CLASSIFIER_CHUNK]).to(device)
        probs = classifier(x).float().softmax(dim=1)  # [b, K]
        out.append(probs.gather(1, y[:, None]).squeeze(1).double().cpu())
    return torch.cat(out).numpy()


def draw_filtered(
    scorenet: ScoreNet, classifier: nn.Module, shard: int, start: int, stop: int, cfg: GenerateConfig, progress=None
) -> np.ndarray:
    """The images of shard ``shard`` (indices [start, stop)) with classifier filtering (module docstring)."""
    num_classes = scorenet.num_classes
    labels = image_labels(start, stop, num_classes)
    counts = np.bincount(labels, minlength=num_classes)
    candidates = [(c, j) for c in range(num_classes) for j in range(candidate_count(counts[c], cfg.keep_fraction))]
    candidate_labels = np.array([c for c, _ in candidates], dtype=np.int64)
    seeds = [derived_seed(cfg.seed, _CANDIDATE_STREAM, shard, c, j) for c, j in candidates]
    images = draw(scorenet, candidate_labels, seeds, cfg, progress)
    confidence = confidences(classifier, images, candidate_labels)
    result = np.empty((stop - start, *images.shape[1:]), dtype=np.uint8)
    for c in range(num_classes):
        pool = np.flatnonzero(candidate_labels == c)  # candidate order
        slots = np.flatnonzero(labels == c)
        best = np.sort(np.argsort(-confidence[pool], kind="stable")[: len(slots)])
        result[slots] = images[pool[best]]
    return result


def shard_problem(path: Path, labels: np.ndarray, image_shape: tuple[int, int, int]) -> str | None:
    """None if the shard at ``path`` is complete with the expected labels and image shape, else the problem."""
    channels, height, width = image_shape
    try:
        data = load_npz(path)
    except (ValueError, FileNotFoundError) as e:
        return str(e)
    if data.parts[0].dtype != np.uint8 or data.parts[0].shape[1:] != (height, width, channels):
        return f"holds {data.parts[0].dtype} images of shape {data.parts[0].shape[1:]}, expected uint8 " \
               f"{(height, width, channels)}"
    if len(data) != len(labels) or not np.array_equal(data.labels, labels):
        return f"holds {len(data)} images whose labels are not the expected {len(labels)} (i mod K)"
    return None


# -- loading the inputs ------------------------------------------------------------------------------------------------
def scorenet_digest(path: str | os.PathLike) -> str:
    """A short sha256 of the saved score net's files (identifies the weights in generation.json)."""
    directory = find_scorenet_dir(path)
    return sha256_file(*sorted(p for p in directory.rglob("*") if p.is_file()))[:16]


def output_settings(cfg: GenerateConfig, scorenet_sha: str, classifier_sha: str | None) -> dict:
    """The settings the images depend on (a directory made with other ones is refused)."""
    settings = {key: value for key, value in config_to_dict(cfg).items()
                if key not in ("out", "batch_size", "grid_columns", "num_processes", "scorenet", "filter_classifier",
                               "collective_timeout")}
    settings["sampler_steps"] = cfg.sampler_steps if cfg.sampler_steps is not None else DEFAULT_STEPS[cfg.sampler]
    settings["keep_fraction"] = cfg.keep_fraction if classifier_sha is not None else 1.0
    return settings | {"scorenet_sha256": scorenet_sha, "filter_classifier_sha256": classifier_sha}


def _check_existing(out: Path, settings: dict) -> None:
    manifest = out / MANIFEST
    if not manifest.is_file():
        return
    try:
        previous = json.loads(manifest.read_text())["settings"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{manifest} is unreadable; remove it (and the shards) or choose another --out") from None
    changed = sorted(key for key in set(previous) | set(settings) if previous.get(key) != settings.get(key))
    if changed:
        details = ", ".join(f"{key}: {previous.get(key)!r} -> {settings.get(key)!r}" for key in changed)
        raise ValueError(f"{out} holds images generated with other settings ({details}); choose another --out")


# -- the grid ----------------------------------------------------------------------------------------------------------
def save_grid(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray, num_classes: int, columns: int) -> Path:
    """PNG mosaic of uint8 NHWC images: row c shows the first ``columns`` images of class c (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    height, width, channels = images.shape[1:]
    pad = 1
    mosaic = np.full((num_classes * (height + pad) + pad, columns * (width + pad) + pad, channels), 255, np.uint8)
    for c in range(num_classes):
        for k, index in enumerate(np.flatnonzero(labels == c)[:columns]):
            top, left = pad + c * (height + pad), pad + k * (width + pad)
            mosaic[top : top + height, left : left + width] = images[index]
    scale = max(1, 32 // height)
    figure, axes = plt.subplots(figsize=(max(2.0, 0.45 * columns * scale * width / 32 + 0.6),
                                         max(2.0, 0.45 * num_classes * scale * height / 32)))
    axes.imshow(mosaic.squeeze(-1) if channels == 1 else mosaic, cmap="gray", vmin=0, vmax=255,
                interpolation="nearest")
    rows = range(num_classes)
    axes.set_yticks([pad + c * (height + pad) + height / 2 for c in rows], [str(c) for c in rows])
    axes.set_xticks([])
    axes.set_ylabel("class")
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    finally:
        plt.close(figure)
    return path


def _grid_from_shards(out: Path, ranges: list[tuple[int, int]], num_classes: int, columns: int) -> None:
    """grid.png from the first shards (enough images to fill every row, when there are that many)."""
    images, labels = [], []
    for shard, _ in enumerate(ranges):
        data = load_npz(shard_path(out, shard))
        images.append(np.asarray(data.parts[0]))
        labels.append(data.labels)
        if min(np.bincount(np.concatenate(labels), minlength=num_classes)) >= columns:
            break
    save_grid(out / GRID, np.concatenate(images), np.concatenate(labels), num_classes, columns)


# -- the command -------------------------------------------------------------------------------------------------------
def generate(cfg: GenerateConfig, *, rank: int | None = None, world_size: int | None = None) -> dict | None:
    """Write the shards this process owns (module docstring); the main process then writes the manifest and grid.

    rank/world_size: None uses the launcher's process group (``accelerate launch``); given explicitly, this call
    acts as process ``rank`` of ``world_size`` without any collective (to split work by hand, or in tests). Returns
    the manifest on the main process (rank 0), None elsewhere.
    """
    with checking_input():  # bad input fails here, before anything is written
        cfg.validate()
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither")
        state = None
        if rank is None:
            from accelerate import PartialState
            from accelerate.utils import parse_flag_from_env

            timeout = process_group_kwargs(cfg.collective_timeout).to_kwargs()  # {"timeout": timedelta}
            state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"), **timeout)  # Accelerator reads the flag
            check_world_size(state, cfg.num_processes)
            rank, world_size, device = state.process_index, state.num_processes, state.device
        else:
            if not 0 <= rank < world_size:
                raise ValueError(f"rank {rank} out of range for world size {world_size}")
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        is_main = rank == 0

        def barrier() -> None:
            if state is not None:
                state.wait_for_everyone()

        scorenet = load_scorenet(cfg.scorenet, device=device)
        num_classes, image_shape = scorenet.num_classes, tuple(scorenet.image_shape)
        classifier, classifier_sha = None, None
        if cfg.filter_classifier is not None:
            classifier, info = load_reference(cfg.filter_classifier, device)
            if info["num_classes"] != num_classes or tuple(info["image_shape"]) != image_shape:
                raise ValueError(f"filter classifier {cfg.filter_classifier} is for {info['num_classes']} classes and "
                                 f"images {tuple(info['image_shape'])}, the score net for {num_classes} classes and "
                                 f"{image_shape} (C, H, W)")
            classifier_sha = info["sha256"]
        settings = output_settings(cfg, scorenet_digest(cfg.scorenet), classifier_sha)
        out = Path(cfg.out)
        _check_existing(out, settings)
    ranges = shard_ranges(cfg.num_images, cfg.shard_size)
    manifest = {
        "settings": settings,
        "scorenet": str(find_scorenet_dir(cfg.scorenet)),
        "filter_classifier": cfg.filter_classifier,
        "num_images": cfg.num_images,
        "num_classes": num_classes,
        "image_shape_nhwc": [image_shape[1], image_shape[2], image_shape[0]],
        "images_per_class": np.bincount(image_labels(0, cfg.num_images, num_classes), minlength=num_classes).tolist(),
        "rules": {
            "label": "label(i) = i mod K",
            "seed": "seed(i) = SeedSequence([seed, i]).generate_state(1, uint64) & (2**63 - 1)",
            "filter": "per shard s and class c: ceil(n_c / keep_fraction) candidates, candidate j seeded by "
            "SeedSequence([seed, 1, s, c, j]); keep the n_c most confident, in candidate order",
            "shards": "shard s holds indices [s * shard_size, (s + 1) * shard_size)",
        },
        "shards": [{"file": shard_path(out, s).name, "start": a, "count": b - a} for s, (a, b) in enumerate(ranges)],
        "git_revision": git_revision(),
        "versions": package_versions(),
        "complete": False,
    }
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        cleanup_temporaries(out)
        if not (out / MANIFEST).is_file():
            atomic_write_json(out / MANIFEST, manifest)
    barrier()
    out.mkdir(parents=True, exist_ok=True)  # a rank called on its own (rank/world_size given) may come first

    mine = [s for s in range(len(ranges)) if s % world_size == rank]
    todo = []
    for shard in mine:
        start, stop = ranges[shard]
        problem = shard_problem(shard_path(out, shard), image_labels(start, stop, num_classes), image_shape)
        if problem is None:
            continue
        if shard_path(out, shard).exists():
            warnings.warn(f"regenerating {shard_path(out, shard)}: {problem}", stacklevel=2)
        todo.append(shard)
    keep = cfg.keep_fraction if classifier is not None else 1.0
    per_class = [np.bincount(image_labels(*ranges[s], num_classes), minlength=num_classes) for s in todo]
    total = sum(candidate_count(n, keep) for counts in per_class for n in counts)
    with tqdm(total=total, desc=f"generating ({cfg.sampler})", disable=not is_main, dynamic_ncols=True) as progress:
        for shard in todo:
            start, stop = ranges[shard]
            labels = image_labels(start, stop, num_classes)
            if classifier is None:
                seeds = [derived_seed(cfg.seed, i) for i in range(start, stop)]
                images = draw(scorenet, labels, seeds, cfg, progress)
            else:
                images = draw_filtered(scorenet, classifier, shard, start, stop, cfg, progress)
            atomic_save_npz(shard_path(out, shard), image=images, label=labels)
    barrier()
    if not is_main:
        return None
    missing = [s for s in range(len(ranges)) if not shard_path(out, s).is_file()]
    manifest["complete"] = not missing
    if missing:
        manifest["missing_shards"] = [shard_path(out, s).name for s in missing]
    elif cfg.grid_columns:
        _grid_from_shards(out, ranges, num_classes, cfg.grid_columns)
    atomic_write_json(out / MANIFEST, manifest)
    done = "all" if not missing else f"{len(ranges) - len(missing)} of"
    grid = f"; grid in {out / GRID}" if not missing and cfg.grid_columns else ""
    tqdm.write(f"{done} {len(ranges)} shard(s) of {cfg.num_images} images in {out}{grid}")
    return manifest
