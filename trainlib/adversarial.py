"""Adversarial training of classifiers (standard, PGD-AT, TRADES-KL/SE, PGD-AT-SE, direct SCORE).

``AdversarialConfig``'s fields, with their help strings, are the documentation of the recipe (docs/conventions.md §3
for the paper's values). ``train(cfg)`` runs the loop, top to bottom:

    data     real train split (+ generated shards mixed in at ``unsup_fraction``: each global batch holds
             int(B·f) generated images drawn with replacement), an "epoch" of ``epoch_size`` samples, crop + flip;
             the batch sequence is a pure function of (seed, epoch, batch), so resuming mid-epoch is exact
    step     ``trainlib.classifier_step``'s ``Trainer.step``: the objective on the DDP-wrapped model (its attack on
             the unwrapped one), backward through accelerate, non-finite guard, SGD-Nesterov, one-cycle cosine LR,
             EMA update; ``benchmarks.train_step`` times this same function
    epoch    with ``snapshot_every`` N, the EMA weights to ``snapshots/epoch_NNNN.safetensors`` every N epochs (main
             process; a resumed epoch writes its snapshot when it ends); validation on the EMA model: clean and PGD-40
             (CW margin) accuracy on the first ``n_val`` points of the val split, shared out across processes; the
             best EMA weights by robust accuracy go to ``best/``
    end      ``ema.safetensors`` and ``model.safetensors`` in the run directory, then (main process) clean + PGD
             (+ optional AutoAttack) on the first ``n_test`` test points → results.json

PGD random starts come from a generator seeded by (seed, step, micro-batch, rank): runs resume exactly, and a run
without random starts (objective "standard") on w processes equals one on one process with the same global batch,
while adversarial runs on different process counts agree in distribution only. With BN models and several GPUs, BN
is synchronised over the global batch (``sync_bn``). Direct SCORE's data posterior p_d(·|x') comes from
``trainlib.data_posterior`` (``--posterior``). Evaluating a trained run: ``trainlib.evaluate_command``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from datagrad.seeding import seeded_generator

from . import evaluation
from .accuracy import clean_correct, pgd_correct
from .checkpoint import save_weights
from .classifier_step import build_trainer
from .classifiers import snapshot_path, weights_metadata
from .cli import checking_input
from .config import option
from .data_posterior import (
    DEFAULT_ANCHOR_SMOOTHING,
    DEFAULT_NOISE_STD,
    DEFAULT_POSTERIOR_NET,
    DEFAULT_SCORENET,
    check_posterior_options,
    ensure_default_nets,
    posterior_provider,
)
from .datasets import ImageDataset, check_dataset_name, has_closed_form, load_dataset
from .ema import EMA
from .files import atomic_directory, atomic_write_json
from .models import DATASET_STATS
from .npz import load_generated, shard_paths
from .objectives import OBJECTIVES, Objective, build_objective, fixed_posterior
from .sampling import BatchLoader
from .session import EngineOptions

_STREAM_VAL = 1  # validation's random starts (stream 0: the training attacks, trainlib.classifier_step)


@dataclass
class AdversarialConfig(EngineOptions):
    """Adversarial training of a classifier (trainlib.adversarial); flags override --config recipes."""

    # data
    dataset: str = option("digits (embedded 8x8) | cifar10 | cifar100 | gmm-8x8 | gmm-4x4 | digits-mixture | npz:PATH",
                          "digits")
    data_dir: str = option("where CIFAR is downloaded to / read from", "data")
    generated: str | None = option("generated pseudo-data: an .npz, a directory of .npz shards or a glob", None)
    unsup_fraction: float = option("fraction of each batch drawn (with replacement) from --generated", 0.7, ge=0, lt=1)
    epoch_size: int | None = option("samples per epoch (paper: 50000); none: the size of the real train split", None,
                                    ge=1)
    augment: Literal["auto", "on", "off"] = option("random crop (pad 4) + flip; auto: on for CIFAR only", "auto")
    n_val: int = option("validation points (first n of the val split; PGD-40 CW on the EMA model)", 1024, ge=1)
    # model and objective
    model: str = option("wrn-28-10 | wrn-70-16 | wrn-D-W | preact-resnet18 | cnn-small(-bn) = cnn-32(-bn) | "
                        "cnn-C(-bn) | mlp(-bn)", "cnn-small")
    objective: str = option(" | ".join(OBJECTIVES), "trades-se")
    beta: float | None = option("TRADES weight of the robust term (none: 6 for trades-kl, 4 for trades-se)", None, ge=0)
    clip: float = option("SE loss clip c, threshold c^2 K/(K-1) (trades-se, pgd-at-se; 0: no clip)", 0.0, ge=0, lt=1)
    clip_scope: Literal["total", "robust"] = option("trades-se clip on the total loss or on the robust term", "total")
    attack_bn: Literal["eval", "batch"] = option("BN during the training attack: running stats or batch stats", "eval")
    label_smoothing: float = option("label smoothing of the clean / CE targets", 0.0, ge=0, lt=1)
    distance: Literal["kl", "l1", "l2", "se"] = option("direct-score distance D(p_d || p_theta)", "kl")
    clean_weight: float = option("direct-score: weight of an added clean term (0: none)", 0.0, ge=0)
    clean_loss: Literal["ce", "score"] = option("direct-score clean term: CE to the label or D at x", "ce")
    attack_gradient: Literal["full", "model"] = option(
        "direct-score attack: gradient through p_d and p_theta (full, SCORE's) or through p_theta only (model: "
        "p_d(.|x') held at its value, an ablation)", "full")
    attack_losses: tuple[str, ...] = option(
        "direct-score attacks, one PGD each from its own random start; per example the point with the largest D is "
        "trained on: distance (SCORE's inner max) | data-margin (moves p_d(.|x') off the label: -[log p_d(y|x') - "
        "max_k!=y log p_d(k|x')]) | label-ce (moves p_theta off the label: -log p_theta(y|x'), PGD-AT's attack)",
        ("distance",))
    # threat model (training attack and evaluation)
    norm: Literal["linf", "l2"] = option("threat model norm", "linf")
    eps: float = option("radius of the threat ball in [0, 1] pixel units", 0.2, gt=0)
    step_size: float = option("PGD step size of the training attack", 0.05, gt=0)
    pgd_steps: int = option("PGD steps of the training attack", 10, ge=1, renamed_from="steps")
    attack_starts: int = option("random starts of every training attack (each attack loss of direct-score too); per "
                                "example the start ending with the largest attack loss is trained on", 1, ge=1)
    # data posterior (direct-score only; trainlib.data_posterior)
    posterior: Literal["posterior-net", "scorenet", "empirical", "analytic"] = option(
        "p_d(.|x'): posterior net | score-net trajectory | exact smoothed training-set posterior | closed form (gmm-*)",
        "analytic")
    posterior_net: str | None = option("a posterior-net run directory or saved PosteriorNet folder", None)
    posterior_ensemble: tuple[str, ...] = option(
        "further posterior nets: p_d is the mean of their probabilities and --posterior-net's (a deep ensemble)", ())
    scorenet: str | None = option("a score-net run directory or saved ScoreNet folder (posterior=scorenet)", None)
    noise_std: float = option("sigma of p_sigma(y|x) ([0, 1] data units, std; about eps)", DEFAULT_NOISE_STD, gt=0)
    anchor: Literal["posterior-net", "label"] = option(
        "posterior=scorenet: anchor the score integral at p_phi(.|x) of the posterior net, or at the smoothed label "
        "(an ablation: the target then depends on (x, y, x'))", "posterior-net")
    anchor_smoothing: float = option("anchor=label: the smoothing a of (1 - a) onehot(y) + a/K",
                                     DEFAULT_ANCHOR_SMOOTHING, gt=0, lt=1)
    start_quadrature_points: int = option(
        "Gauss-Legendre points on the anchor -> random start segment (0: trapezoid)", 0, ge=0)
    # optimization
    batch_size: int = option("global batch size (all processes, after accumulation)", 128, ge=1)
    epochs: int = option("training epochs", 30, ge=1)
    lr: float = option("peak learning rate of the one-cycle cosine schedule", 0.2, gt=0)
    momentum: float = option("SGD momentum (cycled 0.95 -> 0.85 -> 0.95 instead with --cycle-momentum)", 0.9, ge=0,
                             lt=1)
    cycle_momentum: bool = option("cycle momentum with the LR, as PyTorch's OneCycleLR and the public code", True)
    nesterov: bool = option("Nesterov momentum", True)
    weight_decay: float = option("weight decay (not on normalisation-layer parameters)", 5e-4, ge=0)
    warmup_fraction: float = option("fraction of steps of the LR warm-up", 0.025, gt=0, lt=1)
    ema_tau: float = option("EMA decay tau (0: no averaging, the EMA copies the weights)", 0.995, ge=0, lt=1)
    ema_warmup_fraction: float = option("fraction of steps during which the EMA copies the weights", 0.025, gt=0, lt=1)
    max_steps: int | None = option("stop after this many optimizer steps (schedule still spans --epochs)", None, ge=1)
    # engine (the rest: EngineOptions)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = option(
        "autocast dtype on GPUs (auto: bf16 where supported; always fp32 on the CPU)", "no")
    sync_bn: bool = option("synchronise BN statistics across GPUs (world-size independent)", True)
    seed: int = option("seed of data order, augmentation, attacks and initialisation", 0)
    out: str = option("run directory", "runs/classifier-digits")
    log_every: int = option("average and log training metrics every N steps", 20, ge=1)
    snapshot_every: int = option("write the EMA weights to <out>/snapshots/epoch_NNNN.safetensors every N epochs and "
                                 "after the last (0: off; analysis.dynamics reads them)", 0, ge=0)
    val_every: int = option("validate every N epochs (0: never)", 1, ge=0)
    # final test evaluation
    n_test: int | None = option("test points for the final evaluation (first n; none: all)", None, ge=1)
    autoattack: bool = option("run AutoAttack standard in the final evaluation", False)
    eval_batch_size: int = option("batch size of validation and evaluation", 256, ge=1)

    def validate(self) -> None:
        """Check values that need no files (``--dry-run`` runs this too)."""
        super().validate()
        check_dataset_name(self.dataset)
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; valid: {', '.join(OBJECTIVES)}")
        if self.norm == "linf" and self.eps > 1:
            raise ValueError(f"an l-inf eps above 1 covers the whole [0, 1] image space, got {self.eps}")
        self.micro_batch(self.batch_size)
        if self.objective == "direct-score":
            check_posterior_options(self.posterior, self.anchor, self.scorenet, self.posterior_net, self.dataset,
                                    has_closed_form(self.dataset), self.posterior_ensemble)
            if self.posterior == "scorenet" and (len(self.attack_losses) > 1 or self.attack_starts > 1):
                raise ValueError("several attack_losses or attack_starts need a path-independent posterior: a "
                                 "score-net trajectory (posterior=scorenet) integrates along one attack path")
        # objective options (beta, clip, clean weight, smoothing, distance): the objective's own checks
        make_objective(self, fixed_posterior(None))


@dataclass
class DirectScoreConfig(AdversarialConfig):
    """Direct SCORE: the inner max and outer min of D(p_d(.|x') || p_theta(.|x')); defaults: the digits recipe."""

    objective: str = option(" | ".join(OBJECTIVES), "direct-score")
    posterior: Literal["posterior-net", "scorenet", "empirical", "analytic"] = option(
        "p_d(.|x'): posterior net | score-net trajectory | exact smoothed training-set posterior | closed form (gmm-*)",
        "posterior-net")
    posterior_net: str | None = option("a posterior-net run directory or saved PosteriorNet folder (trained here "
                                       "first if it is the missing default)", DEFAULT_POSTERIOR_NET)
    scorenet: str | None = option("a score-net run directory or saved ScoreNet folder (trained here first if it is "
                                  "the missing default)", DEFAULT_SCORENET)
    # the digits recipe (recipes/digits-direct-score.json holds the same values)
    augment: Literal["auto", "on", "off"] = option("random crop (pad 4) + flip; auto: on for CIFAR only", "off")
    n_val: int = option("validation points (first n of the val split; PGD-40 CW on the EMA model)", 180, ge=1)
    step_size: float = option("PGD step size of the training attack", 0.1, gt=0)
    pgd_steps: int = option("PGD steps of the training attack", 3, ge=1, renamed_from="steps")
    batch_size: int = option("global batch size (all processes, after accumulation)", 64, ge=1)
    epochs: int = option("training epochs", 10, ge=1)
    lr: float = option("peak learning rate of the one-cycle cosine schedule (0.2 diverged at TRADES-SE's budget)",
                       0.1, gt=0)
    cpu_threads: int | None = option("torch threads per process on the CPU (none: torch's default)", 1, ge=1)
    checkpoint_every: int = option("save a checkpoint every N optimizer steps (0: at the end only)", 100, ge=0)
    snapshot_every: int = option("write the EMA weights to <out>/snapshots/epoch_NNNN.safetensors every N epochs and "
                                 "after the last (0: off; analysis.dynamics reads them)", 1, ge=0)
    log_every: int = option("average and log training metrics every N steps", 10, ge=1)
    eval_batch_size: int = option("batch size of validation and evaluation", 360, ge=1)
    out: str = option("run directory", "runs/digits-direct-score")


def make_objective(cfg: AdversarialConfig, provider) -> Objective:
    """The configured objective (``trainlib.objectives.build_objective`` with the config's options)."""
    return build_objective(cfg.objective, cfg, beta=cfg.beta, clip=cfg.clip, clip_scope=cfg.clip_scope,
                           label_smoothing=cfg.label_smoothing, attack_bn=cfg.attack_bn, distance=cfg.distance,
                           clean_weight=cfg.clean_weight, clean_loss=cfg.clean_loss,
                           attack_gradient=cfg.attack_gradient, attack_losses=cfg.attack_losses,
                           attack_starts=cfg.attack_starts, posterior_provider=provider)


# -- data and evaluation ----------------------------------------------------------------------------------------
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
        x, y = evaluation.evaluation_points(val, range(start, stop), device)
        generator = seeded_generator(cfg.seed, _STREAM_VAL, epoch, rank, device=device)
        clean = clean_correct(model, x, y, cfg.eval_batch_size)
        robust = pgd_correct(model, x, y, cfg.eps, cfg.norm, steps=40, loss="cw", generator=generator,
                             batch_size=cfg.eval_batch_size)
        counts += torch.tensor([clean.sum().item(), robust.sum().item(), stop - start], dtype=torch.float64,
                               device=device)
    if world > 1:
        counts = accelerator.reduce(counts, reduction="sum")  # collective: every rank
    clean_count, robust_count, total = counts.tolist()
    return {"val/clean_acc": clean_count / total, "val/pgd40_cw_acc": robust_count / total}


def _save_best(run, ema: EMA, metrics: dict, metadata: dict) -> None:
    """best/ = ema.safetensors + metrics.json, replaced atomically (main process)."""
    with atomic_directory(run.best_dir) as tmp:
        save_weights(tmp / "ema.safetensors", ema.model.state_dict(), metadata)
        atomic_write_json(tmp / "metrics.json", metrics)


# -- training -------------------------------------------------------------------------------------------------
def train(cfg: AdversarialConfig) -> dict | None:
    """Train as configured (module docstring); returns the results (main process of a completed run), else None."""
    with checking_input():
        cfg.validate()
    ensure_default_nets(cfg)  # trains the default nets first where asked (each its own run, its own checks)
    with checking_input():  # bad input fails here, before the run directory is written
        accelerator = cfg.accelerator()
        device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
        micro_batch = cfg.micro_batch(cfg.batch_size, world)
        data = load_data(cfg, accelerator)
        num_classes, image_shape = data.train.num_classes, data.train.image_shape
        provider = posterior_provider(cfg, data.train, device) if cfg.objective == "direct-score" else None
        objective = make_objective(cfg, provider)
        steps_per_epoch = math.ceil((cfg.epoch_size or len(data.train)) / cfg.batch_size)
        total_steps = cfg.epochs * steps_per_epoch
        # micro-batches of B / grad_accumulation; len(loader) = steps_per_epoch · grad_accumulation exactly
        loader = BatchLoader(
            data.train, micro_batch, generated=data.generated, epoch_size=steps_per_epoch * cfg.batch_size,
            unsup_fraction=cfg.unsup_fraction if data.generated else 0, seed=cfg.seed, world_size=world, rank=rank,
            device=device, augment=cfg.augment == "on" or (cfg.augment == "auto" and cfg.dataset in DATASET_STATS))
        trainer = build_trainer(cfg, accelerator, num_classes, image_shape, objective, total_steps)
        session = cfg.session(accelerator, total_steps, cfg.objective)
    ema, metadata = trainer.ema, weights_metadata(cfg, num_classes, image_shape)
    start = session.start(ema)
    started = time.perf_counter()  # the training time of this invocation (results.json: train_seconds)
    best = dict(start.extra.get("best", {}))  # {"val/pgd40_cw_acc": ..., "epoch": ..., "step": ...}
    session.print(f"{cfg.objective} on {data.train.name} ({len(data.train)} real"
                  f"{f' + {len(data.generated)} generated' if data.generated else ''}), {cfg.model}, "
                  f"{total_steps} steps of {cfg.batch_size} on {world} process(es), {device}")

    step, position = start.step, (start.epoch, start.batch_in_epoch)  # position of the next micro-batch
    stopped_early = False
    trainer.model.train()
    for epoch in range(start.epoch, cfg.epochs):
        first = start.batch_for(epoch)
        for batch, (x, y) in enumerate(loader.epoch(epoch, first), first):
            stats, update = trainer.step(x, y, step, batch, session.guard)
            if update is None:
                continue
            step, position = step + 1, (epoch, batch + 1)
            session.log_train(step, stats, lr=trainer.scheduler.get_last_lr()[0], skipped=not update)
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
                          f"PGD-40 CW {metrics['val/pgd40_cw_acc']:.4f}")
            if metrics["val/pgd40_cw_acc"] > best.get("val/pgd40_cw_acc", -1.0):
                best = metrics | {"epoch": epoch + 1, "step": step}
                if accelerator.is_main_process:
                    _save_best(session.run, ema, best, metadata)
    session.flush(step, lr=trainer.scheduler.get_last_lr()[0])
    session.maybe_checkpoint(step, *position, final=True, extra={"best": best})
    if stopped_early:
        session.print(f"stopped at step {step} of {total_steps} (--max-steps); resume with --resume latest")
        session.close()
        return None
    if accelerator.is_main_process:
        save_weights(session.run.path / "ema.safetensors", ema.model.state_dict(), metadata)
        save_weights(session.run.path / "model.safetensors", trainer.attack_model.state_dict(), metadata)
    session.close()
    if not accelerator.is_main_process:
        return None  # the test evaluation runs on the main process only: no collective follows
    return _final_evaluation(cfg, ema.model, data.test, session, best, step, time.perf_counter() - started)


def _final_evaluation(cfg: AdversarialConfig, model: nn.Module, test: ImageDataset, session, best, step,
                      train_seconds: float) -> dict:
    """Clean + PGD (+ AutoAttack) on the first n_test test points with the EMA model → results.json."""
    n = min(cfg.n_test or len(test), len(test))
    x, y = evaluation.evaluation_points(test, range(n), session.accelerator.device)
    result = evaluation.evaluate(model, x, y, cfg.eps, cfg.norm, autoattack=cfg.autoattack, seed=cfg.seed,
                                 batch_size=cfg.eval_batch_size, progress=True)
    record = result.record(name=Path(cfg.out).name, dataset=cfg.dataset, architecture=cfg.model,
                           objective=cfg.objective, weights="ema")
    results = {"test": record, "best_val": best, "steps": step, "train_seconds": round(train_seconds, 3)}
    session.run.write_results(results)
    aa = "" if record["autoattack_acc"] is None else f", AutoAttack {record['autoattack_acc']}"
    session.print(f"test ({n} points, EMA): clean {record['clean_acc']}, PGD-40 CE {record['pgd_ce_acc']}, "
                  f"CW {record['pgd_cw_acc']}{aa} (%); sanity checks passed: {record['sanity_passed']}")
    return results
