"""Adversarial training of classifiers (standard, PGD-AT, TRADES-KL/SE, PGD-AT-SE, direct SCORE) and its evaluation.

``AdversarialConfig``'s fields, with their help strings, are the documentation of the recipe (docs/conventions.md §3
for the paper's values). ``train(cfg)`` runs the loop, top to bottom:

    data     real train split (+ generated shards mixed in at ``unsup_fraction``: each global batch holds
             int(B·f) generated images drawn with replacement), an "epoch" of ``epoch_size`` samples, crop + flip;
             the batch sequence is a pure function of (seed, epoch, batch), so resuming mid-epoch is exact
    step     loss = objective(model (DDP-wrapped), attack_model (unwrapped), x, y, generator(seed, step, rank));
             backward through accelerate (gradient accumulation, mixed precision on GPUs); SGD-Nesterov step;
             one-cycle cosine LR step; EMA update (BN statistics copied)
    epoch    with ``snapshot_every`` N, the EMA weights to ``snapshots/epoch_NNNN.safetensors`` every N epochs (main
             process; a resumed epoch writes its snapshot when it ends); validation on the EMA model: clean and PGD-40
             (CW margin) accuracy on the first ``n_val`` points of the val split, shared out across processes; the
             best EMA weights by robust accuracy go to ``best/``
    end      ``ema.safetensors`` and ``model.safetensors`` in the run directory, then (main process) clean + PGD
             (+ optional AutoAttack) on the first ``n_test`` test points → results.json

PGD random starts come from a generator seeded by (seed, step, micro-batch, rank): runs resume exactly, and a run
without random starts (objective "standard") on w processes equals one on one process with the same global batch,
while adversarial runs on different process counts agree in distribution only. With BN models and several GPUs, BN
is synchronised over the global batch (``sync_bn``).

Direct SCORE (``objective="direct-score"``) needs p_d(·|x'): ``posterior="scorenet"`` loads a frozen
``scorenets.ScoreNet`` and anchors a trajectory posterior at each clean batch with smoothed labels (one batched
score-net call for the anchor, then one per PGD step); ``posterior="analytic"`` uses the exact mixture of a
``gmm-*`` toy dataset.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from . import evaluation
from .checkpoint import load_pickle_safely, load_weights, load_weights_metadata, save_weights, verify_checkpoint
from .config import option
from .data import BatchLoader, ImageDataset, load_dataset, load_generated, shard_paths
from .data_posterior import (
    DEFAULT_POSTERIOR_NET,
    DEFAULT_SCORENET,
    check_posterior_options,
    ensure_default_nets,
    posterior_provider,
)
from .ema import EMA
from .engine import (
    DEFAULT_COLLECTIVE_TIMEOUT,
    MIXED_PRECISION,
    TrainingSession,
    check_collective_timeout,
    create_accelerator,
    gradient_norm,
    one_cycle_cosine,
    rank_generator,
)
from .files import atomic_directory, atomic_write_json
from .models import DATASET_STATS, build_model, param_groups
from .objectives import OBJECTIVES, Objective, build_objective, fixed_posterior

WEIGHTS_METADATA_KEY = "trainlib"  # safetensors metadata: JSON with model name, dataset, class count, image shape
_STREAM_TRAIN, _STREAM_VAL = 0, 1
SNAPSHOTS_DIR = "snapshots"
SNAPSHOT_PATTERN = re.compile(r"epoch_(\d{4,})\.safetensors")


@dataclass
class AdversarialConfig:
    """Adversarial training of a classifier (trainlib.adversarial); flags override --config recipes."""

    # data
    dataset: str = option("digits (embedded 8x8) | cifar10 | cifar100 | gmm-8x8 | gmm-4x4 | npz:PATH", "digits")
    data_dir: str = option("where CIFAR is downloaded to / read from", "data")
    generated: str | None = option("generated pseudo-data: an .npz, a directory of .npz shards or a glob", None)
    unsup_fraction: float = option("fraction of each batch drawn (with replacement) from --generated", 0.7)
    epoch_size: int | None = option("samples per epoch (paper: 50000); none: the size of the real train split", None)
    augment: Literal["auto", "on", "off"] = option("random crop (pad 4) + flip; auto: on for CIFAR only", "auto")
    n_val: int = option("validation points (first n of the val split; PGD-40 CW on the EMA model)", 1024)
    # model and objective
    model: str = option("wrn-28-10 | wrn-70-16 | wrn-D-W | preact-resnet18 | cnn-small(-bn) | mlp(-bn)", "cnn-small")
    objective: str = option("standard | pgd-at | trades-kl | trades-se | pgd-at-se | direct-score", "trades-se")
    beta: float | None = option("TRADES weight of the robust term (none: 6 for trades-kl, 4 for trades-se)", None)
    clip: float = option("SE loss clip c, threshold c^2 K/(K-1) (trades-se, pgd-at-se; 0: no clip)", 0.0)
    clip_scope: Literal["total", "robust"] = option("trades-se clip on the total loss or on the robust term", "total")
    attack_bn: Literal["eval", "batch"] = option("BN during the training attack: running stats or batch stats", "eval")
    label_smoothing: float = option("label smoothing of the clean / CE targets", 0.0)
    distance: Literal["kl", "l1", "l2", "se"] = option("direct-score distance D(p_d || p_theta)", "kl")
    clean_weight: float = option("direct-score: weight of an added clean term (0: none)", 0.0)
    clean_loss: Literal["ce", "score"] = option("direct-score clean term: CE to the label or D at x", "ce")
    # threat model (training attack and evaluation)
    norm: Literal["linf", "l2"] = option("threat model norm", "linf")
    eps: float = option("radius of the threat ball in [0, 1] pixel units", 0.2)
    step_size: float = option("PGD step size of the training attack", 0.05)
    steps: int = option("PGD steps of the training attack", 10)
    # data posterior (direct-score only; trainlib.data_posterior)
    posterior: Literal["posterior-net", "scorenet", "empirical", "analytic"] = option(
        "p_d(.|x'): posterior net | score-net trajectory | exact smoothed training-set posterior | closed form (gmm-*)",
        "analytic")
    posterior_net: str | None = option("a posterior-net run directory or saved PosteriorNet folder", None)
    scorenet: str | None = option("a score-net run directory or saved ScoreNet folder (posterior=scorenet)", None)
    noise_std: float = option("sigma of p_sigma(y|x) ([0, 1] data units, std; about eps)", 0.2)
    anchor: Literal["posterior-net", "label"] = option(
        "posterior=scorenet: anchor the score integral at p_phi(.|x) of the posterior net, or at the smoothed label "
        "(an ablation: the target then depends on (x, y, x'))", "posterior-net")
    anchor_smoothing: float = option("anchor=label: the smoothing a of (1 - a) onehot(y) + a/K", 1e-4)
    start_quadrature_points: int = option(
        "Gauss-Legendre points on the anchor -> random start segment (0: trapezoid)", 0
    )
    # optimization
    batch_size: int = option("global batch size (all processes, after accumulation)", 128)
    epochs: int = option("training epochs", 30)
    lr: float = option("peak learning rate of the one-cycle cosine schedule", 0.2)
    momentum: float = option("SGD momentum (cycled 0.95 -> 0.85 -> 0.95 instead with --cycle-momentum)", 0.9)
    cycle_momentum: bool = option("cycle momentum with the LR, as PyTorch's OneCycleLR and the public code", True)
    nesterov: bool = option("Nesterov momentum", True)
    weight_decay: float = option("weight decay (not on normalisation-layer parameters)", 5e-4)
    warmup_fraction: float = option("fraction of steps of the LR warm-up", 0.025)
    ema_tau: float = option("EMA decay tau (0: no averaging, the EMA copies the weights)", 0.995)
    ema_warmup_fraction: float = option("fraction of steps during which the EMA copies the weights", 0.025)
    max_steps: int | None = option("stop after this many optimizer steps (schedule still spans --epochs)", None)
    # engine
    mixed_precision: Literal["no", "bf16", "fp16"] = option("autocast dtype on GPUs (fp32 on the CPU)", "no")
    grad_accumulation: int = option("micro-batches per optimizer step", 1)
    sync_bn: bool = option("synchronise BN statistics across GPUs (world-size independent)", True)
    num_processes: int | None = option("refuse to start unless the world size is this", None)
    cpu_threads: int | None = option("torch threads per process on the CPU (none: torch's default)", None)
    collective_timeout: float = option("seconds a process waits for the others in a collective before failing",
                                       DEFAULT_COLLECTIVE_TIMEOUT)  # fmt: skip
    nonfinite: Literal["stop", "skip"] = option(
        "NaN/inf loss or gradient: stop (exit 3, newest checkpoint = last good) or skip the update (syncs each step)",
        "stop")  # fmt: skip
    seed: int = option("seed of data order, augmentation, attacks and initialisation", 0)
    out: str = option("run directory", "runs/classifier-digits")
    resume: str = option("none | latest | PATH of a checkpoint folder", "none")
    checkpoint_every: int = option("save a checkpoint every N optimizer steps (0: at the end only)", 500)
    keep_last: int = option("step checkpoints to keep", 2)
    snapshot_every: int = option("write the EMA weights to <out>/snapshots/epoch_NNNN.safetensors every N epochs and "
                                 "after the last (0: off; analysis.dynamics reads them)", 0)
    log_every: int = option("average and log training metrics every N steps", 20)
    val_every: int = option("validate every N epochs (0: never)", 1)
    # final test evaluation
    n_test: int | None = option("test points for the final evaluation (first n; none: all)", None)
    autoattack: bool = option("run AutoAttack standard in the final evaluation", False)
    eval_batch_size: int = option("batch size of validation and evaluation", 256)

    def validate(self) -> None:
        """Check values that need no files (``--dry-run`` runs this too)."""
        from .data import check_dataset_name, has_closed_form

        check_dataset_name(self.dataset)
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; valid: {', '.join(OBJECTIVES)}")
        positive = dict(eps=self.eps, step_size=self.step_size, steps=self.steps, batch_size=self.batch_size,
                        epochs=self.epochs, lr=self.lr, noise_std=self.noise_std, eval_batch_size=self.eval_batch_size,
                        grad_accumulation=self.grad_accumulation, keep_last=self.keep_last, log_every=self.log_every,
                        n_val=self.n_val)  # fmt: skip
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        for name in ("epoch_size", "max_steps", "n_test", "num_processes", "cpu_threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 or none, got {getattr(self, name)}")
        if self.norm == "linf" and self.eps > 1:
            raise ValueError(f"an l-inf eps above 1 covers the whole [0, 1] image space, got {self.eps}")
        if self.batch_size % self.grad_accumulation:
            raise ValueError(f"batch_size {self.batch_size} must be divisible by grad_accumulation "
                             f"{self.grad_accumulation}")  # fmt: skip
        if not 0 <= self.unsup_fraction < 1:
            raise ValueError(f"unsup_fraction must be in [0, 1), got {self.unsup_fraction}")
        for name in ("momentum", "ema_tau"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("warmup_fraction", "ema_warmup_fraction"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        if self.weight_decay < 0 or self.checkpoint_every < 0 or self.val_every < 0 or self.snapshot_every < 0:
            raise ValueError("weight_decay, checkpoint_every, val_every and snapshot_every must be >= 0")
        if not 0 < self.anchor_smoothing < 1:
            raise ValueError(f"anchor_smoothing must be in (0, 1), got {self.anchor_smoothing}")
        if self.start_quadrature_points < 0:
            raise ValueError(f"start_quadrature_points must be >= 0, got {self.start_quadrature_points}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}")
        check_collective_timeout(self.collective_timeout)
        if self.objective == "direct-score":
            check_posterior_options(self.posterior, self.anchor, self.scorenet, self.posterior_net, self.dataset,
                                    has_closed_form(self.dataset))
        # objective options (beta, clip, clean weight, smoothing, distance): the objective's own checks
        build_objective(self.objective, self, beta=self.beta, clip=self.clip, clip_scope=self.clip_scope,
                        label_smoothing=self.label_smoothing, attack_bn=self.attack_bn, distance=self.distance,
                        clean_weight=self.clean_weight, clean_loss=self.clean_loss,
                        posterior_provider=fixed_posterior(None))  # fmt: skip


@dataclass
class DirectScoreConfig(AdversarialConfig):
    """Direct SCORE: the inner max and outer min of D(p_d(.|x') || p_theta(.|x')); defaults: the digits recipe."""

    objective: str = option("standard | pgd-at | trades-kl | trades-se | pgd-at-se | direct-score", "direct-score")
    posterior: Literal["posterior-net", "scorenet", "empirical", "analytic"] = option(
        "p_d(.|x'): posterior net | score-net trajectory | exact smoothed training-set posterior | closed form (gmm-*)",
        "posterior-net")
    posterior_net: str | None = option("a posterior-net run directory or saved PosteriorNet folder (trained here "
                                       "first if it is the missing default)", DEFAULT_POSTERIOR_NET)
    scorenet: str | None = option("a score-net run directory or saved ScoreNet folder (trained here first if it is "
                                  "the missing default)", DEFAULT_SCORENET)
    # the digits recipe (recipes/digits-direct-score.json holds the same values)
    augment: Literal["auto", "on", "off"] = option("random crop (pad 4) + flip; auto: on for CIFAR only", "off")
    n_val: int = option("validation points (first n of the val split; PGD-40 CW on the EMA model)", 180)
    step_size: float = option("PGD step size of the training attack", 0.1)
    steps: int = option("PGD steps of the training attack", 3)
    batch_size: int = option("global batch size (all processes, after accumulation)", 64)
    epochs: int = option("training epochs", 10)
    cpu_threads: int | None = option("torch threads per process on the CPU (none: torch's default)", 1)
    checkpoint_every: int = option("save a checkpoint every N optimizer steps (0: at the end only)", 100)
    snapshot_every: int = option("write the EMA weights to <out>/snapshots/epoch_NNNN.safetensors every N epochs and "
                                 "after the last (0: off; analysis.dynamics reads them)", 1)
    log_every: int = option("average and log training metrics every N steps", 10)
    eval_batch_size: int = option("batch size of validation and evaluation", 360)
    out: str = option("run directory", "runs/digits-direct-score")


# -- building blocks ------------------------------------------------------------------------------------------
def build_classifier(name: str, dataset: str, num_classes: int, image_shape: tuple[int, int, int]) -> nn.Module:
    """``models.build_model`` with the dataset's normalisation (CIFAR-100 statistics for cifar100)."""
    mean, std = DATASET_STATS.get(dataset, (None, None))
    return build_model(name, num_classes, in_channels=image_shape[0], image_size=image_shape[1:], mean=mean, std=std)


def build_optimizer(model: nn.Module, cfg: AdversarialConfig) -> torch.optim.SGD:
    """SGD (Nesterov) over ``param_groups`` (no weight decay on normalisation layers), as one fused kernel per step.

    ``fused=True`` applies the same update as the per-parameter loop (equal up to float reassociation) in one
    multi-tensor kernel: 2.8-3.8× faster than the loop on the CPU (benchmarks/README.md).
    """
    return torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum,
                           nesterov=cfg.nesterov and cfg.momentum > 0, fused=True)  # fmt: skip


def weights_metadata(cfg: AdversarialConfig, num_classes: int, image_shape: tuple[int, ...], **extra) -> dict:
    """String metadata stored in every safetensors file we write: enough to rebuild the model without the run."""
    info = dict(model=cfg.model, dataset=cfg.dataset, num_classes=num_classes, image_shape=list(image_shape),
                norm=cfg.norm, eps=cfg.eps, objective=cfg.objective, **extra)  # fmt: skip
    return {WEIGHTS_METADATA_KEY: json.dumps(info)}


def snapshot_path(run_dir: str | Path, epoch: int) -> Path:
    """``<run>/snapshots/epoch_NNNN.safetensors``: the EMA weights after ``epoch`` completed epochs."""
    return Path(run_dir) / SNAPSHOTS_DIR / f"epoch_{epoch:04d}.safetensors"


def list_snapshots(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(epoch, path) of every per-epoch snapshot of a run, in epoch order (temporary files never match)."""
    directory = Path(run_dir) / SNAPSHOTS_DIR
    found = [(int(m.group(1)), p) for p in directory.glob("epoch_*.safetensors")
             if (m := SNAPSHOT_PATTERN.fullmatch(p.name))]  # fmt: skip
    return sorted(found)


@dataclass
class Data:
    train: ImageDataset
    generated: ImageDataset | None
    val: ImageDataset
    test: ImageDataset


def load_data(cfg: AdversarialConfig, accelerator) -> Data:
    """The train/val/test splits and generated shards (downloads on the main process first)."""
    with accelerator.main_process_first():
        train_set = load_dataset(cfg.dataset, "train", cfg.data_dir)
        val = load_dataset(cfg.dataset, "val", cfg.data_dir, train_set.num_classes)
        test = load_dataset(cfg.dataset, "test", cfg.data_dir, train_set.num_classes)
    generated = None
    if cfg.generated is not None and cfg.unsup_fraction > 0:
        shard_paths(cfg.generated)  # FileNotFoundError naming the location when nothing is there
        generated = load_generated(cfg.generated, train_set.num_classes)
    elif cfg.generated is not None:
        raise ValueError("--generated is given but --unsup-fraction is 0")
    return Data(train_set, generated, val, test)


def _sync_batch_norm(model: nn.Module, cfg: AdversarialConfig, accelerator) -> nn.Module:
    if cfg.sync_bn and accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def evaluation_points(dataset: ImageDataset, indices, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of the given points for attacks in [0, 1]: Gaussian-mixture toys (not clipped) are clamped here."""
    x, y = dataset.get(indices, device)
    return (x.clamp_(0.0, 1.0) if dataset.mixture is not None else x), y


@torch.no_grad()
def _counts_to_host(accelerator, counts: torch.Tensor) -> list[float]:
    if accelerator.num_processes > 1:
        counts = accelerator.reduce(counts, reduction="sum")  # collective: every rank
    return counts.tolist()


def validate_robust(model: nn.Module, val: ImageDataset, cfg: AdversarialConfig, accelerator, epoch: int) -> dict:
    """Clean and PGD-40 (CW margin) accuracy of ``model`` (the EMA) on the first n_val val points.

    The points are shared out across processes (contiguous slices) and the counts summed: every rank calls this.
    """
    n = min(cfg.n_val, len(val))
    rank, world = accelerator.process_index, accelerator.num_processes
    start, stop = rank * n // world, (rank + 1) * n // world
    device = accelerator.device
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # clean correct, robust correct, examples
    if stop > start:
        x, y = evaluation_points(val, range(start, stop), device)
        generator = rank_generator(cfg.seed, _STREAM_VAL, epoch, rank, device=device)
        clean = evaluation.clean_correct(model, x, y, cfg.eval_batch_size)
        robust = evaluation.pgd_correct(model, x, y, cfg.eps, cfg.norm, steps=40, loss="cw", generator=generator,
                                        batch_size=cfg.eval_batch_size)  # fmt: skip
        counts += torch.tensor([clean.sum().item(), robust.sum().item(), stop - start], dtype=torch.float64,
                               device=device)  # fmt: skip
    clean_count, robust_count, total = _counts_to_host(accelerator, counts)
    return {"val/clean_acc": clean_count / total, "val/pgd40_cw_acc": robust_count / total}


def _save_best(run, ema: EMA, metrics: dict, metadata: dict) -> None:
    """best/ = ema.safetensors + metrics.json, replaced atomically (main process)."""
    with atomic_directory(run.best_dir) as tmp:
        save_weights(tmp / "ema.safetensors", ema.model.state_dict(), metadata)
        atomic_write_json(tmp / "metrics.json", metrics)


# -- training -------------------------------------------------------------------------------------------------
def train(cfg: AdversarialConfig) -> dict | None:
    """Train as configured (module docstring); returns the results (main process of a completed run), else None."""
    cfg.validate()
    ensure_default_nets(cfg)
    accelerator = create_accelerator(
        mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accumulation, seed=cfg.seed,
        num_processes=cfg.num_processes, cpu_threads=cfg.cpu_threads, collective_timeout=cfg.collective_timeout,
    )  # fmt: skip
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    micro_batch = cfg.batch_size // cfg.grad_accumulation
    if micro_batch % world:
        raise ValueError(f"batch_size / grad_accumulation = {micro_batch} must be divisible by {world} processes")

    # Everything that can fail on bad input happens before the run directory is written.
    data = load_data(cfg, accelerator)
    num_classes, image_shape = data.train.num_classes, data.train.image_shape
    provider = posterior_provider(cfg, data.train, device) if cfg.objective == "direct-score" else None
    objective: Objective = build_objective(
        cfg.objective, cfg, beta=cfg.beta, clip=cfg.clip, clip_scope=cfg.clip_scope,
        label_smoothing=cfg.label_smoothing, attack_bn=cfg.attack_bn, distance=cfg.distance,
        clean_weight=cfg.clean_weight, clean_loss=cfg.clean_loss, posterior_provider=provider,
    )  # fmt: skip
    steps_per_epoch = math.ceil((cfg.epoch_size or len(data.train)) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    # micro-batches of B / grad_accumulation; len(loader) = steps_per_epoch · grad_accumulation exactly
    loader = BatchLoader(
        data.train, micro_batch, generated=data.generated, unsup_fraction=cfg.unsup_fraction if data.generated else 0,
        epoch_size=steps_per_epoch * cfg.batch_size, seed=cfg.seed, world_size=world, rank=rank, device=device,
        augment=cfg.augment == "on" or (cfg.augment == "auto" and cfg.dataset in DATASET_STATS),
    )  # fmt: skip

    model = _sync_batch_norm(build_classifier(cfg.model, cfg.dataset, num_classes, image_shape), cfg, accelerator)
    channels_last = device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg)
    scheduler = one_cycle_cosine(optimizer, total_steps, cfg.warmup_fraction, cfg.cycle_momentum)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    attack_model = accelerator.unwrap_model(model)  # attacks never go through the DDP wrapper (docs/conventions.md §7)
    ema = EMA(model, cfg.ema_tau, cfg.ema_warmup_fraction * total_steps)
    metadata = weights_metadata(cfg, num_classes, image_shape)

    session = TrainingSession(
        accelerator, cfg.out, cfg, resume=cfg.resume, total_steps=total_steps, checkpoint_every=cfg.checkpoint_every,
        keep_last=cfg.keep_last, log_every=cfg.log_every, description=cfg.objective, nonfinite=cfg.nonfinite,
    )  # fmt: skip
    start = session.start(ema)
    started = time.perf_counter()  # the training time of this invocation (results.json: train_seconds)
    best = dict(start.extra.get("best", {}))  # {"val/pgd40_cw_acc": ..., "epoch": ..., "step": ...}
    session.print(f"{cfg.objective} on {data.train.name} ({len(data.train)} real"
                  f"{f' + {len(data.generated)} generated' if data.generated else ''}), {cfg.model}, "
                  f"{total_steps} steps of {cfg.batch_size} on {world} process(es), {device}")  # fmt: skip

    step, position = start.step, (start.epoch, start.batch_in_epoch)  # position of the next micro-batch
    stopped_early = False
    model.train()
    for epoch in range(start.epoch, cfg.epochs):
        first = start.batch_for(epoch)
        for batch, (x, y) in enumerate(loader.epoch(epoch, first), first):
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            generator = rank_generator(cfg.seed, _STREAM_TRAIN, step, batch % cfg.grad_accumulation, rank,
                                       device=device)  # fmt: skip
            with accelerator.accumulate(model):
                output = objective(model, attack_model, x, y, generator)
                accelerator.backward(output.loss)
                update, stats = True, output.stats
                if accelerator.sync_gradients:  # fp16: the grad scaler owns gradient overflow
                    grad_norm = gradient_norm(model) if accelerator.scaler is None else None
                    update = session.guard.observe(step + 1, output.loss, grad_norm)
                    stats = stats | ({"grad_norm": grad_norm} if grad_norm is not None else {})
                if update:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            step, position = step + 1, (epoch, batch + 1)
            if update:  # a skipped step (--nonfinite skip) leaves weights, optimizer, schedule and EMA as they were
                scheduler.step()
                ema.update(model)
            session.log_train(step, stats, lr=scheduler.get_last_lr()[0], skipped=not update)
            session.maybe_checkpoint(step, *position, extra={"best": best})
            if cfg.max_steps is not None and step >= cfg.max_steps:
                stopped_early = step < total_steps
                break
        if stopped_early:
            break
        snapshot_due = cfg.snapshot_every and ((epoch + 1) % cfg.snapshot_every == 0 or epoch + 1 == cfg.epochs)
        if snapshot_due and accelerator.is_main_process:  # a resumed epoch writes it when it ends, as an unbroken one
            save_weights(snapshot_path(session.run.path, epoch + 1), ema.model.state_dict(),
                         weights_metadata(cfg, num_classes, image_shape, epoch=epoch + 1, step=step))
        if cfg.val_every and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs):
            session.check_finite()  # before best/ could receive non-finite weights
            metrics = validate_robust(ema.model, data.val, cfg, accelerator, epoch)
            session.log(metrics | {"epoch": epoch + 1}, step)
            session.print(f"epoch {epoch + 1}/{cfg.epochs}: EMA val clean {metrics['val/clean_acc']:.4f}, "
                          f"PGD-40 CW {metrics['val/pgd40_cw_acc']:.4f}")  # fmt: skip
            if metrics["val/pgd40_cw_acc"] > best.get("val/pgd40_cw_acc", -1.0):
                best = metrics | {"epoch": epoch + 1, "step": step}
                if accelerator.is_main_process:
                    _save_best(session.run, ema, best, metadata)
    session.flush(step, lr=scheduler.get_last_lr()[0])
    session.maybe_checkpoint(step, *position, final=True, extra={"best": best})
    if stopped_early:
        session.print(f"stopped at step {step} of {total_steps} (--max-steps); resume with --resume latest")
        session.close()
        return None
    if accelerator.is_main_process:
        save_weights(session.run.path / "ema.safetensors", ema.model.state_dict(), metadata)
        save_weights(session.run.path / "model.safetensors", attack_model.state_dict(), metadata)
    session.close()
    if not accelerator.is_main_process:
        return None  # the test evaluation runs on the main process only: no collective follows
    return _final_evaluation(cfg, ema.model, data.test, session, best, step, time.perf_counter() - started)


def _final_evaluation(cfg: AdversarialConfig, model: nn.Module, test: ImageDataset, session, best, step,
                      train_seconds: float) -> dict:
    """Clean + PGD (+ AutoAttack) on the first n_test test points with the EMA model → results.json."""
    n = min(cfg.n_test or len(test), len(test))
    x, y = evaluation_points(test, range(n), session.accelerator.device)
    result = evaluation.evaluate(model, x, y, cfg.eps, cfg.norm, autoattack=cfg.autoattack, seed=cfg.seed,
                                 batch_size=cfg.eval_batch_size, progress=True)  # fmt: skip
    record = result.record(name=Path(cfg.out).name, dataset=cfg.dataset, architecture=cfg.model,
                           objective=cfg.objective, weights="ema")  # fmt: skip
    results = {"test": record, "best_val": best, "steps": step, "train_seconds": round(train_seconds, 1)}
    session.run.write_results(results)
    aa = "" if record["autoattack_acc"] is None else f", AutoAttack {record['autoattack_acc']}"
    session.print(
        f"test ({n} points, EMA): clean {record['clean_acc']}, PGD-40 CE {record['pgd_ce_acc']}, "
        f"CW {record['pgd_cw_acc']}{aa} (%); sanity checks passed: {record['sanity_passed']}"
    )
    return results


# -- evaluation command -----------------------------------------------------------------------------------------
@dataclass
class EvaluateConfig:
    """Evaluate a trained classifier: clean, PGD CE/CW and AutoAttack on the first n test points, RobustBench JSON."""

    checkpoint: str = option("run directory, step checkpoint folder or .safetensors weights", "runs/classifier-digits")
    weights: Literal["ema", "model"] = option("which weights of a run / checkpoint: EMA or raw", "ema")
    which: Literal["final", "best"] = option("in a run directory: final weights or best/ (by validation)", "final")
    model: str | None = option("model name (none: from the run config or the weights' metadata)", None)
    dataset: str | None = option("dataset (none: from the run config or the weights' metadata)", None)
    data_dir: str = option("where CIFAR is downloaded to / read from", "data")
    norm: Literal["linf", "l2"] | None = option("threat norm (none: the training one)", None)
    eps: float | None = option("threat radius (none: the training one)", None)
    n_examples: int | None = option("first n test points (none: all)", None)
    autoattack: bool = option("run AutoAttack", True)
    autoattack_version: Literal["standard", "plus", "rand", "apgd-ce"] = option("AutoAttack version", "standard")
    pgd_steps: int = option("PGD steps", 40)
    pgd_restarts: int = option("PGD random restarts", 1)
    eps_curve: tuple[float, ...] = option(
        "eps multipliers of the PGD-CW accuracy-vs-eps figure (empty: none)", (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
    )
    batch_size: int = option("evaluation batch size", 256)
    seed: int = option("seed of PGD starts and AutoAttack", 0)
    cpu_threads: int | None = option("torch threads on the CPU (none: torch's default)", None)
    out: str | None = option("output directory (none: <run>/eval or next to the weights)", None)

    def validate(self) -> None:
        if self.eps is not None and not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        for name in ("n_examples", "pgd_steps", "pgd_restarts", "batch_size", "cpu_threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if any(m < 0 for m in self.eps_curve):
            raise ValueError(f"eps_curve multipliers must be >= 0, got {list(self.eps_curve)}")


def _run_config(run_dir: Path) -> dict:
    path = run_dir / "config.json"
    if not path.is_file():
        return {}
    return json.loads(path.read_text()).get("config", {})


def resolve_weights(cfg: EvaluateConfig) -> tuple[dict[str, torch.Tensor], dict, Path]:
    """(state dict, settings {model, dataset, norm, eps, ...}, default output directory) for ``cfg.checkpoint``."""
    source = Path(cfg.checkpoint)
    if not source.exists():
        raise FileNotFoundError(f"checkpoint not found: {source}")
    if source.is_file():
        settings = json.loads(load_weights_metadata(source).get(WEIGHTS_METADATA_KEY, "{}"))
        return load_weights(source), settings, source.parent / f"eval-{source.stem}"
    if (source / "meta.json").is_file():  # a step checkpoint folder: raw weights or the registered EMA state
        problem = verify_checkpoint(source)
        if problem is not None:
            raise ValueError(f"cannot evaluate checkpoint {source}: {problem}")
        settings = _run_config(source.parent.parent)
        if cfg.weights == "model":
            return load_weights(source / "model.safetensors"), settings, source / "eval"
        state = load_pickle_safely(source / "custom_checkpoint_0.pkl")  # the EMA; refuses anything but tensors
        return state["model"], settings, source / "eval"
    settings = _run_config(source)
    if not settings:
        raise ValueError(f"{source} is neither a run directory (config.json), a checkpoint folder nor a weights file")
    directory = source / "best" if cfg.which == "best" else source
    name = "ema.safetensors" if cfg.which == "best" or cfg.weights == "ema" else "model.safetensors"
    if not (directory / name).is_file():
        raise FileNotFoundError(f"{directory / name} not found (has the run finished? try --which best or a "
                                "checkpoint folder)")  # fmt: skip
    return load_weights(directory / name), settings, source / "eval"


def load_classifier(cfg: EvaluateConfig) -> tuple[nn.Module, dict, ImageDataset, Path]:
    """(model on the CPU, settings with the resolved model / dataset / norm / eps, test split, default output directory)
    for ``cfg.checkpoint``: a run directory (``cfg.which``, ``cfg.weights``), a checkpoint folder or a weights file."""
    state, settings, default_out = resolve_weights(cfg)
    model_name, dataset = cfg.model or settings.get("model"), cfg.dataset or settings.get("dataset")
    norm = cfg.norm or settings.get("norm", "linf")
    eps = cfg.eps if cfg.eps is not None else settings.get("eps")
    if model_name is None or dataset is None or eps is None:
        raise ValueError("cannot tell the model, dataset or eps from the checkpoint; pass --model, --dataset, --eps")
    test = load_dataset(dataset, "test", cfg.data_dir)
    model = build_classifier(model_name, dataset, test.num_classes, test.image_shape)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise ValueError(f"weights of {cfg.checkpoint} do not fit model {model_name!r} on {dataset}: {first}") from None
    return model, settings | dict(model=model_name, dataset=dataset, norm=norm, eps=eps), test, default_out


def evaluate_checkpoint(cfg: EvaluateConfig) -> dict:
    """Evaluate (``EvaluateConfig``); writes robustbench.json, evaluation.json and accuracy_vs_eps.png."""
    cfg.validate()
    model, settings, test, default_out = load_classifier(cfg)
    model_name, dataset, norm, eps = settings["model"], settings["dataset"], settings["norm"], settings["eps"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.cpu_threads is not None and device.type == "cpu":
        torch.set_num_threads(cfg.cpu_threads)
    model.to(device).eval()
    n = min(cfg.n_examples or len(test), len(test))
    x, y = evaluation_points(test, range(n), device)
    result = evaluation.evaluate(
        model, x, y, eps, norm, autoattack=cfg.autoattack, autoattack_version=cfg.autoattack_version,
        pgd_steps=cfg.pgd_steps, pgd_restarts=cfg.pgd_restarts, seed=cfg.seed, batch_size=cfg.batch_size,
        progress=True,
    )  # fmt: skip
    out = Path(cfg.out) if cfg.out else default_out
    out.mkdir(parents=True, exist_ok=True)
    record = result.record(name=Path(cfg.checkpoint).name, dataset=dataset, architecture=model_name,
                           weights=cfg.weights)  # fmt: skip
    atomic_write_json(out / "robustbench.json", record)
    curve = {}
    if cfg.eps_curve:
        eps_values = [m * eps for m in cfg.eps_curve]
        accuracies = evaluation.pgd_accuracy_curve(model, x, y, eps_values, norm, seed=cfg.seed, steps=cfg.pgd_steps,
                                                   batch_size=cfg.batch_size)  # fmt: skip
        curve = {"eps": eps_values, "pgd_cw_acc": accuracies}
        evaluation.plot_accuracy_vs_eps(out / "accuracy_vs_eps.png", eps_values,
                                        {f"PGD-{cfg.pgd_steps} CW": accuracies}, norm,
                                        title=f"{model_name} on {dataset}")  # fmt: skip
    atomic_write_json(out / "evaluation.json", {"record": record, "accuracy_vs_eps": curve,
                                                "checkpoint": str(cfg.checkpoint)})  # fmt: skip
    aa = "" if record["autoattack_acc"] is None else f", AutoAttack {record['autoattack_acc']}"
    print(f"{model_name} on {dataset} ({n} test points, eps {record['eps']} {record['threat_model']}): clean "
          f"{record['clean_acc']}, PGD CE {record['pgd_ce_acc']}, PGD CW {record['pgd_cw_acc']}{aa} (%); "
          f"sanity checks passed: {record['sanity_passed']}; wrote {out}")  # fmt: skip
    return record
