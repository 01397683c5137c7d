"""The fixed-step Adam loop shared by the networks trained on noised data: score nets and posterior nets.

``AdamLoopOptions`` holds the fields both configs share (data, optimization, engine); ``fit`` runs the loop, top to
bottom, on the shared engine (``trainlib.accelerator`` and ``trainlib.session``):

    step     loss, stats = loss_fn(model, x, y, generator), the generator seeded by (seed, step, micro-batch, rank);
             backward through accelerate (gradient accumulation, bf16/fp16 autocast on GPUs, fp32 on the CPU);
             gradient-norm clip; fused Adam step; linear warm-up then cosine (or constant) learning rate; EMA update
    save     every ``checkpoint_every`` steps and at the end: the full training state in ``checkpoints/step_N/`` and,
             through ``save_model(ema_model, out)`` on the main process, the EMA network in its loadable form

Batches come from a ``BatchLoader`` (a pure function of (seed, epoch, batch)), so resuming mid-epoch is exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from datagrad.seeding import seeded_generator

from .cli import checking_input
from .config import option
from .datasets import ImageDataset, check_dataset_name, load_dataset
from .ema import EMA
from .nonfinite import gradient_norm
from .sampling import BatchLoader
from .session import EngineOptions

LossFn = Callable[[nn.Module, Tensor, Tensor, torch.Generator], tuple[Tensor, dict[str, Tensor]]]
FLIP_DATASETS = ("cifar10", "cifar100")  # horizontal flips preserve these classes (not digits or Hadamard toys)


@dataclass
class AdamLoopOptions(EngineOptions):
    """Options shared by score-net and posterior-net training (``fit``): the engine's, data and optimization."""

    # data
    dataset: str = option("digits (embedded 8x8) | cifar10 | cifar100 | gmm-8x8 | gmm-4x4 | digits-mixture | npz:PATH",
                          "digits")
    data_dir: str = option("where CIFAR is downloaded to / read from", "data")
    train_samples: int | None = option("gmm-* / digits-mixture: draw a train sample of this size from the known "
                                       "distribution (none: the fixed 10,000 every classifier trains on)", None, ge=1)
    augment: Literal["auto", "on", "off"] = option("random horizontal flips; auto: on for CIFAR only", "auto")
    # optimization
    batch_size: int = option("global batch size (all processes, after accumulation)", 64, ge=1)
    train_steps: int = option("optimizer steps", 2000, ge=1, renamed_from="steps")
    lr: float = option("peak Adam learning rate", 1e-3, gt=0)
    lr_schedule: Literal["cosine", "constant"] = option("after the warm-up: cosine decay to 0, or constant", "cosine")
    warmup_steps: int = option("linear learning-rate warm-up steps", 100, ge=0)
    grad_clip: float = option("clip the global gradient norm to this (0: no clipping)", 1.0, ge=0)
    ema_tau: float = option("EMA decay tau of the saved network (ramped in as (1+t)/(10+t))", 0.999, ge=0, lt=1)

    def validate(self) -> None:
        """Check values that need no files (``--dry-run`` runs this too)."""
        super().validate()
        check_dataset_name(self.dataset)
        self.micro_batch(self.batch_size)


def open_training_data(cfg: AdamLoopOptions) -> tuple[object, ImageDataset, int]:
    """(accelerator, the real train split, per-process micro-batch): validates the options, makes the accelerator
    and loads the data (main process first). Call inside ``checking_input``: bad input raises here."""
    cfg.validate()
    accelerator = cfg.accelerator()
    micro_batch = cfg.micro_batch(cfg.batch_size, accelerator.num_processes)
    with accelerator.main_process_first():
        train_set = load_dataset(cfg.dataset, "train", cfg.data_dir, train_samples=cfg.train_samples)
    return accelerator, train_set, micro_batch


def batch_loader(cfg: AdamLoopOptions, accelerator, train_set: ImageDataset, micro_batch: int,
                 generated: ImageDataset | None = None, unsup_fraction: float = 0.0) -> BatchLoader:
    """The loader of ``fit``: epochs of whole global batches covering the train split, horizontal flips where
    ``cfg.augment`` says (``auto``: ``FLIP_DATASETS`` only; never crops: ``padding=0`` makes every crop offset 0)."""
    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    flip = cfg.augment == "on" or (cfg.augment == "auto" and cfg.dataset in FLIP_DATASETS)
    return BatchLoader(
        train_set, micro_batch, generated=generated, unsup_fraction=unsup_fraction if generated else 0.0,
        epoch_size=steps_per_epoch * cfg.batch_size, seed=cfg.seed, world_size=accelerator.num_processes,
        rank=accelerator.process_index, device=accelerator.device, augment=flip, padding=0,
    )


def learning_rate_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """lr(step)/lr_peak for the optimizer step ``step`` (0-based): linear warm-up, then cosine to 0 or constant.

    warm-up: (step + 1)/w for step < w = warmup_steps; then cosine: ½(1 + cos(π·(step − w)/(T − w))), T = total_steps.

    Why not diffusers' ``get_cosine_schedule_with_warmup`` / ``get_constant_schedule_with_warmup``: they cannot give
    these numbers. Their warm-up factor is step/w, so optimizer step 0 runs at lr 0 and every warm-up step one step
    behind ours (ours at step s equals theirs at s + 1 for s < w); after the warm-up the factors are equal (the cosine
    formula is the same; tested). The trained score and posterior nets were made with this schedule, and adopting
    theirs would change every run's weights.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def fit(
    cfg: AdamLoopOptions,
    accelerator,
    loader: BatchLoader,
    model: nn.Module,
    loss_fn: LossFn,
    save_model: Callable[[nn.Module, Path], None],
    *,
    description: str,
    summary: str,
    results: dict,
    saved_message: str,
) -> dict | None:
    """Train ``model`` for ``cfg.train_steps`` optimizer steps (module docstring); returns ``results`` with the step
    count on the main process (also written to results.json), None elsewhere.

    Call on every rank after loading the data and building the model (bad input must fail before this: the run
    directory is created here). ``summary`` is the first log line, ``saved_message`` the last.
    """
    device, rank = accelerator.device, accelerator.process_index
    out = Path(cfg.out)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)  # one multi-tensor kernel per step
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, cfg.warmup_steps, cfg.train_steps, cfg.lr_schedule)
    )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    ema = EMA(model, cfg.ema_tau)

    with checking_input():  # a run directory already in use, a checkpoint to resume that is not there: bad input
        session = cfg.session(accelerator, cfg.train_steps, description)
    start = session.start(ema)
    session.print(summary)

    def save() -> None:
        if accelerator.is_main_process:
            save_model(ema.model, out)
        accelerator.wait_for_everyone()

    step, position = start.step, (start.epoch, start.batch_in_epoch)  # position of the next micro-batch
    saved_step = -1  # step of the last EMA network saved by this session
    model.train()
    epoch = start.epoch
    while step < cfg.train_steps:
        first = start.batch_for(epoch)
        for batch, (x, y) in enumerate(loader.epoch(epoch, first), first):
            generator = seeded_generator(cfg.seed, step, batch % cfg.grad_accumulation, rank, device=device)
            with accelerator.accumulate(model):
                loss, stats = loss_fn(model, x, y, generator)
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
            stats = stats | ({"grad_norm": grad_norm.detach()} if grad_norm is not None else {})
            session.log_train(step, stats, lr=scheduler.get_last_lr()[0], skipped=not update)
            if session.maybe_checkpoint(step, *position) is not None:
                save()
                saved_step = step
            if step >= cfg.train_steps:
                break
        epoch += 1
    session.flush(step, lr=scheduler.get_last_lr()[0])
    session.maybe_checkpoint(step, *position, final=True)
    if saved_step != step:
        save()
    results = {"steps": step, **results}
    session.run.write_results(results)
    session.print(saved_message)
    session.close()
    return results if accelerator.is_main_process else None
