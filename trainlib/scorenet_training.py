"""Training class-conditional score networks by denoising score matching (``train/train_scorenet.py``).

``ScoreNetConfig``'s fields, with their help strings, are the documentation of the recipe. ``train(cfg)`` runs the
loop, top to bottom, on the shared engine (``trainlib.engine``: accelerator, run directory, resume, checkpoints,
logging):

    data     the real train split of ``dataset`` (images in [0, 1]); batches are a pure function of (seed, epoch,
             batch), so resuming mid-epoch is exact; horizontal flips (CIFAR only by default; never crops, which
             would teach the generator black borders)
    step     ε-prediction DSM loss ``scorenets.dsm_loss`` with label dropout to the null class K (noise, timesteps
             and dropout drawn from a generator seeded by (seed, step, micro-batch, rank)); backward through
             accelerate (gradient accumulation, bf16/fp16 autocast on GPUs, fp32 on the CPU); gradient-norm clip;
             Adam step; linear warm-up then cosine (or constant) learning rate; EMA update
    save     every ``checkpoint_every`` steps and at the end: the full training state in ``checkpoints/step_N/``
             (model, EMA, optimizer, scheduler, RNG) and the EMA score net in ``<out>/scorenet/``
             (``ScoreNet.save_pretrained``: diffusers UNet + our settings, replaced atomically)

Everything that reads a trained score net (``scorenets.ScoreNetPosterior``, generation, validation, direct SCORE)
loads it with ``load_scorenet(path)``, which accepts the run directory or its ``scorenet/`` folder.

Default recipe (digits, tiny8 preset, CPU): batch 64, Adam lr 1e-3 with 100 warm-up steps and cosine decay to 0,
gradient norm clipped at 1, EMA τ = 0.999, 2,000 steps: about 3.5 minutes on one CPU core (0.095 s per step), and
the generated digits are classified as their intended class 97 % of the time (real test digits: 98 %).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from scorenets import PRESETS, ScoreNet, dsm_loss
from scorenets.unet import CONFIG_NAME

from .config import option
from .data import BatchLoader, ImageDataset, check_dataset_name, load_dataset
from .ema import EMA
from .engine import (
    DEFAULT_COLLECTIVE_TIMEOUT,
    TrainingSession,
    check_collective_timeout,
    create_accelerator,
    gradient_norm,
    rank_generator,
)

SCORENET_SUBDIR = "scorenet"  # <run>/scorenet: the EMA score net, readable with ScoreNet.from_pretrained
PRESET_BY_IMAGE_SIZE = {8: "tiny8", 16: "small16", 32: "cifar32"}
FLIP_DATASETS = ("cifar10", "cifar100")  # horizontal flips preserve these classes (not digits or Hadamard toys)


@dataclass
class ScoreNetConfig:
    """Train a class-conditional score network (trainlib.scorenet_training); flags override --config recipes."""

    # data
    dataset: str = option("digits (embedded 8x8) | cifar10 | cifar100 | gmm-8x8 | gmm-4x4 | npz:PATH", "digits")
    data_dir: str = option("where CIFAR is downloaded to / read from", "data")
    augment: Literal["auto", "on", "off"] = option("random horizontal flips; auto: on for CIFAR only", "auto")
    # model
    preset: str | None = option("UNet preset tiny8 | small16 | cifar32 (none: by image size 8 / 16 / 32)", None)
    channels: tuple[int, ...] = option("UNet block widths per level, multiples of its norm groups (empty: preset)", ())
    label_dropout: float = option("probability of replacing a label by the null class K (classifier-free)", 0.1)
    # optimization
    batch_size: int = option("global batch size (all processes, after accumulation)", 64)
    steps: int = option("optimizer steps", 2000)
    lr: float = option("peak Adam learning rate", 1e-3)
    lr_schedule: Literal["cosine", "constant"] = option("after the warm-up: cosine decay to 0, or constant", "cosine")
    warmup_steps: int = option("linear learning-rate warm-up steps", 100)
    grad_clip: float = option("clip the global gradient norm to this (0: no clipping)", 1.0)
    ema_tau: float = option("EMA decay tau of the saved score net (ramped in as (1+t)/(10+t))", 0.999)
    # engine
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = option("auto: bf16 on GPUs, fp32 on the CPU", "auto")
    grad_accumulation: int = option("micro-batches per optimizer step", 1)
    num_processes: int | None = option("refuse to start unless the world size is this", None)
    collective_timeout: float = option("seconds a process waits for the others in a collective before failing",
                                       DEFAULT_COLLECTIVE_TIMEOUT)  # fmt: skip
    nonfinite: Literal["stop", "skip"] = option(
        "NaN/inf loss or gradient: stop (exit 3, newest checkpoint = last good) or skip the update (syncs each step)",
        "stop")  # fmt: skip
    seed: int = option("seed of initialisation, data order, noise and label dropout", 0)
    out: str = option("run directory (the EMA score net goes to <out>/scorenet)", "runs/scorenet-digits")
    resume: str = option("none | latest | PATH of a checkpoint folder", "none")
    checkpoint_every: int = option("save a checkpoint and the EMA score net every N steps (0: at the end only)", 500)
    keep_last: int = option("step checkpoints to keep", 2)
    log_every: int = option("average and log training metrics every N steps", 50)

    def validate(self) -> None:
        """Check values that need no files (``--dry-run`` runs this too)."""
        check_dataset_name(self.dataset)
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"unknown UNet preset {self.preset!r}; valid presets: {', '.join(PRESETS)}")
        positive = dict(batch_size=self.batch_size, steps=self.steps, lr=self.lr, log_every=self.log_every,
                        keep_last=self.keep_last, grad_accumulation=self.grad_accumulation)  # fmt: skip
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        for name in ("warmup_steps", "grad_clip", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if any(width < 1 for width in self.channels):
            raise ValueError(f"channels must be positive widths, got {list(self.channels)}")
        if not 0 <= self.label_dropout < 1:
            raise ValueError(f"label_dropout must be in [0, 1), got {self.label_dropout}")
        if not 0 <= self.ema_tau < 1:
            raise ValueError(f"ema_tau must be in [0, 1), got {self.ema_tau}")
        if self.batch_size % self.grad_accumulation:
            raise ValueError(f"batch_size {self.batch_size} must be divisible by grad_accumulation "
                             f"{self.grad_accumulation}")  # fmt: skip
        if self.num_processes is not None and self.num_processes < 1:
            raise ValueError(f"num_processes must be >= 1 or none, got {self.num_processes}")
        check_collective_timeout(self.collective_timeout)


# -- loading a trained score net -----------------------------------------------------------------------------------
def find_scorenet_dir(path: str | os.PathLike) -> Path:
    """The saved score net at ``path``: a ``save_pretrained`` folder, or a run directory holding ``scorenet/``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"score net not found: {path} (train one with train/train_scorenet.py)")
    if (path / SCORENET_SUBDIR).is_dir() and not (path / CONFIG_NAME).exists():
        return path / SCORENET_SUBDIR
    return path


def load_scorenet(
    path: str | os.PathLike, expected_num_classes: int | None = None, device: torch.device | str | None = None
) -> ScoreNet:
    """``ScoreNet.from_pretrained`` on a run directory or a score-net folder; eval mode, no parameter gradients."""
    scorenet = ScoreNet.from_pretrained(find_scorenet_dir(path), expected_num_classes, device)
    return scorenet.requires_grad_(False).eval()


# -- building blocks -------------------------------------------------------------------------------------------------
def resolve_preset(preset: str | None, image_shape: tuple[int, int, int]) -> str:
    """The UNet preset: the one asked for, else the one for the image size (8 → tiny8, 16 → small16, 32 → cifar32)."""
    if preset is not None:
        return preset
    size = image_shape[1]
    if size not in PRESET_BY_IMAGE_SIZE:
        raise ValueError(f"no default UNet preset for {size}×{size} images; choose one with --preset "
                         f"({', '.join(PRESETS)})")  # fmt: skip
    return PRESET_BY_IMAGE_SIZE[size]


def resolve_mixed_precision(mixed_precision: str) -> str:
    """Mixed precision "auto" → "bf16" on a CUDA GPU that supports it, else "no" (fp32); other values pass through."""
    if mixed_precision != "auto":
        return mixed_precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def learning_rate_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """lr(step)/lr_peak for the optimizer step ``step`` (0-based): linear warm-up, then cosine to 0 or constant.

    warm-up: (step + 1)/warmup_steps for step < warmup_steps; cosine: ½(1 + cos(π·(step − w)/(T − w))).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def resolve_channels(preset: str, channels: tuple[int, ...]) -> tuple[int, ...]:
    """The UNet block widths: ``channels`` if given (one per level, multiples of the preset's norm groups)."""
    levels, groups = PRESETS[preset]["block_out_channels"], PRESETS[preset]["norm_num_groups"]
    if not channels:
        return tuple(levels)
    if len(channels) != len(levels) or any(width % groups for width in channels):
        raise ValueError(f"preset {preset!r} needs {len(levels)} block widths, each a multiple of its {groups} norm "
                         f"groups; got channels {list(channels)}")  # fmt: skip
    return tuple(channels)


def _check_resumed_scorenet(out: Path, num_classes: int, image_shape: tuple[int, int, int], preset: str,
                            channels: tuple[int, ...]) -> None:  # fmt: skip
    """Refuse to resume a run whose saved score net is for other data (a clear error instead of a size mismatch)."""
    settings_file = out / SCORENET_SUBDIR / CONFIG_NAME
    if not settings_file.is_file():
        return
    settings = json.loads(settings_file.read_text())
    unet_file = out / SCORENET_SUBDIR / "unet" / "config.json"
    widths = tuple(json.loads(unet_file.read_text()).get("block_out_channels", ())) if unet_file.is_file() else ()
    found = (settings.get("num_classes"), tuple(settings.get("image_shape", ())), settings.get("preset"), widths)
    wanted = (num_classes, tuple(image_shape), preset, channels)
    if found != wanted:
        raise ValueError(f"{out} holds a score net for (classes, image shape, preset, channels) = {found}, this run "
                         f"trains {wanted}; choose another --out")  # fmt: skip


def _save_scorenet(ema: EMA, out: Path, accelerator) -> None:
    """The EMA score net → <out>/scorenet (main process; ``save_pretrained`` replaces the folder atomically)."""
    if accelerator.is_main_process:
        ema.model.save_pretrained(out / SCORENET_SUBDIR)
    accelerator.wait_for_everyone()


# -- training --------------------------------------------------------------------------------------------------------
def train(cfg: ScoreNetConfig) -> dict | None:
    """Train as configured (module docstring); returns a summary on the main process, None elsewhere."""
    cfg.validate()
    accelerator = create_accelerator(
        mixed_precision=resolve_mixed_precision(cfg.mixed_precision), gradient_accumulation_steps=cfg.grad_accumulation,
        seed=cfg.seed, num_processes=cfg.num_processes, collective_timeout=cfg.collective_timeout,
    )  # fmt: skip
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    micro_batch = cfg.batch_size // cfg.grad_accumulation
    if micro_batch % world:
        raise ValueError(f"batch_size / grad_accumulation = {micro_batch} must be divisible by {world} processes")

    # Everything that can fail on bad input happens before the run directory is written.
    with accelerator.main_process_first():
        train_set: ImageDataset = load_dataset(cfg.dataset, "train", cfg.data_dir)
    num_classes, image_shape = train_set.num_classes, train_set.image_shape
    preset = resolve_preset(cfg.preset, image_shape)
    channels = resolve_channels(preset, cfg.channels)
    out = Path(cfg.out)
    if cfg.resume != "none":
        _check_resumed_scorenet(out, num_classes, image_shape, preset, channels)
    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    flip = cfg.augment == "on" or (cfg.augment == "auto" and cfg.dataset in FLIP_DATASETS)
    loader = BatchLoader(
        train_set, micro_batch, epoch_size=steps_per_epoch * cfg.batch_size, seed=cfg.seed, world_size=world,
        rank=rank, device=device, augment=flip, padding=0,  # padding 0: crop offsets are 0, so flips only
    )  # fmt: skip

    model = ScoreNet.build(preset, num_classes, image_shape, block_out_channels=channels)
    schedule = model.schedule
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)  # one kernel: 3x faster than the loop
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, cfg.warmup_steps, cfg.steps, cfg.lr_schedule)
    )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    ema = EMA(model, cfg.ema_tau)

    session = TrainingSession(
        accelerator, out, cfg, resume=cfg.resume, total_steps=cfg.steps, checkpoint_every=cfg.checkpoint_every,
        keep_last=cfg.keep_last, log_every=cfg.log_every, description="score net", nonfinite=cfg.nonfinite,
    )  # fmt: skip
    start = session.start(ema)
    parameters = sum(p.numel() for p in ema.model.parameters())
    session.print(f"DSM on {train_set.name} ({len(train_set)} images {image_shape}, {num_classes} classes), "
                  f"{preset} UNet ({parameters / 1e6:.2f}M parameters), {cfg.steps} steps of {cfg.batch_size} on "
                  f"{world} process(es), {device}")  # fmt: skip

    step, position = start.step, (start.epoch, start.batch_in_epoch)  # position of the next micro-batch
    scorenet_step = -1  # step of the last EMA score net saved by this session
    model.train()
    epoch = start.epoch
    while step < cfg.steps:
        first = start.batch_for(epoch)
        for batch, (x, y) in enumerate(loader.epoch(epoch, first), first):
            generator = rank_generator(cfg.seed, step, batch % cfg.grad_accumulation, rank, device=device)
            with accelerator.accumulate(model):
                loss = dsm_loss(model, x, y, num_classes, schedule, cfg.label_dropout, generator)
                accelerator.backward(loss)
                grad_norm, update = None, True
                if accelerator.sync_gradients:
                    if cfg.grad_clip > 0:  # the norm before clipping
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    elif accelerator.scaler is None:
                        grad_norm = gradient_norm(model)
                    # fp16: the grad scaler owns gradient overflow, only the loss is watched
                    update = session.guard.observe(step + 1, loss, grad_norm if accelerator.scaler is None else None)
                if update:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            step, position = step + 1, (epoch, batch + 1)
            if update:  # a skipped step (--nonfinite skip) leaves weights, optimizer, schedule and EMA as they were
                scheduler.step()
                ema.update(model)
            stats = {"loss": loss.detach()} | ({"grad_norm": grad_norm.detach()} if grad_norm is not None else {})
            session.log_train(step, stats, lr=scheduler.get_last_lr()[0], skipped=not update)
            if session.maybe_checkpoint(step, *position) is not None:
                _save_scorenet(ema, out, accelerator)
                scorenet_step = step
            if step >= cfg.steps:
                break
        epoch += 1
    session.flush(step, lr=scheduler.get_last_lr()[0])
    session.maybe_checkpoint(step, *position, final=True)
    if scorenet_step != step:
        _save_scorenet(ema, out, accelerator)
    summary = {"steps": step, "scorenet": str(out / SCORENET_SUBDIR), "preset": preset, "parameters": parameters,
               "dataset": cfg.dataset, "num_classes": num_classes, "image_shape": list(image_shape)}  # fmt: skip
    session.run.write_results(summary)
    session.print(f"saved the EMA score net to {out / SCORENET_SUBDIR} (load it with ScoreNet.from_pretrained)")
    session.close()
    return summary if accelerator.is_main_process else None
