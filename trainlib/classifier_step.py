"""One optimizer step of classifier training: fused SGD, the one-cycle cosine schedule, and ``Trainer.step``.

``build_trainer`` makes what a step uses (the classifier prepared by the accelerator, its unwrapped twin for the
attacks, SGD, the schedule, the EMA); ``Trainer.step`` runs one micro-batch: loss = objective(model (DDP-wrapped),
attack_model (unwrapped), x, y, generator(seed, step, micro-batch, rank)); backward through accelerate (gradient
accumulation, mixed precision on GPUs); non-finite guard; SGD-Nesterov step; one-cycle cosine LR step; EMA update
(BN statistics copied). ``trainlib.adversarial.train`` loops over it and ``benchmarks.train_step`` times it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from datagrad.seeding import seeded_generator

from .classifiers import build_classifier
from .ema import EMA
from .models import param_groups
from .nonfinite import NonFiniteGuard, gradient_norm
from .objectives import Objective

if TYPE_CHECKING:
    from .adversarial import AdversarialConfig

STREAM_TRAIN = 0  # seeded_generator(seed, STREAM_TRAIN, ...): the training attacks' random starts


def build_optimizer(model: nn.Module, cfg: AdversarialConfig) -> torch.optim.SGD:
    """SGD (Nesterov) over ``param_groups`` (no weight decay on normalisation layers), as one fused kernel per step.

    ``fused=True`` applies the same update as the per-parameter loop (equal up to float reassociation) in one
    multi-tensor kernel (benchmarks/README.md has the speed-up).
    """
    return torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum,
                           nesterov=cfg.nesterov and cfg.momentum > 0, fused=True)


def one_cycle_cosine(optimizer, total_steps: int, warmup_fraction: float = 0.025, cycle_momentum: bool = True):
    """PyTorch's ``OneCycleLR`` stepped once per optimizer step, with its defaults (as the public SCORE code).

    lr rises from lr_max/25 to lr_max over the first ``warmup_fraction`` of steps (cosine), then falls (cosine) to
    lr_max/(25·10⁴); with ``cycle_momentum`` the SGD momentum goes 0.95 → 0.85 → 0.95 in antiphase. lr_max is each
    parameter group's ``lr``. ``OneCycleLR`` divides by the warm-up phase's length, ``warmup_fraction·T − 1`` steps:
    where that is exactly 0 (e.g. 2.5 % of 40 steps) it would fail, so the warm-up is then taken just under one step,
    which is what any shorter warm-up already gets (no warm-up phase).
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 < warmup_fraction < 1:
        raise ValueError(f"warmup_fraction must be in (0, 1), got {warmup_fraction}")
    if float(warmup_fraction * total_steps) - 1 == 0:
        warmup_fraction = 0.99 / total_steps
    max_lr = [group["lr"] for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=total_steps,
                                               pct_start=warmup_fraction, anneal_strategy="cos",
                                               cycle_momentum=cycle_momentum)


@dataclass
class Trainer:
    """What one optimizer step of classifier training uses (``build_trainer``); ``step`` runs one micro-batch."""

    accelerator: object
    model: nn.Module  # prepared (DDP-wrapped with several processes)
    attack_model: nn.Module  # unwrapped: attacks never go through the DDP wrapper (docs/conventions.md §7)
    objective: Objective
    optimizer: torch.optim.Optimizer
    scheduler: object
    ema: EMA
    seed: int
    channels_last: bool

    def step(self, x: torch.Tensor, y: torch.Tensor, step: int, batch: int, guard: NonFiniteGuard):
        """Micro-batch ``batch`` of optimizer step ``step`` (steps done so far); (stats, update) where ``update``
        says whether the optimizer step was applied (False: skipped by the guard) and is None while gradients
        accumulate. The generator of the objective's random starts is keyed by (seed, step, micro-batch, rank)."""
        accelerator = self.accelerator
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        micro = batch % accelerator.gradient_accumulation_steps
        generator = seeded_generator(self.seed, STREAM_TRAIN, step, micro, accelerator.process_index,
                                     device=accelerator.device)
        with accelerator.accumulate(self.model):
            output = self.objective(self.model, self.attack_model, x, y, generator)
            accelerator.backward(output.loss)
            update, stats = True, output.stats
            if accelerator.sync_gradients:  # fp16: the grad scaler owns gradient overflow
                grad_norm = gradient_norm(self.model) if accelerator.scaler is None else None
                update = guard.observe(step + 1, output.loss, grad_norm)
                stats = stats | ({"grad_norm": grad_norm} if grad_norm is not None else {})
            if update:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if not accelerator.sync_gradients:
            return stats, None
        if update:  # a skipped step (--nonfinite skip) leaves weights, optimizer, schedule and EMA as they were
            self.scheduler.step()
            self.ema.update(self.model)
        return stats, update


def build_trainer(cfg: AdversarialConfig, accelerator, num_classes: int, image_shape: tuple[int, int, int],
                  objective: Objective, total_steps: int) -> Trainer:
    """The model (the configured classifier, synchronised BN on several GPUs, channels-last on GPUs), fused SGD and
    the one-cycle schedule prepared by the accelerator, the unwrapped attack model and the EMA."""
    model = build_classifier(cfg.model, cfg.dataset, num_classes, image_shape)
    if cfg.sync_bn and accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    channels_last = accelerator.device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg)
    scheduler = one_cycle_cosine(optimizer, total_steps, cfg.warmup_fraction, cfg.cycle_momentum)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    ema = EMA(model, cfg.ema_tau, cfg.ema_warmup_fraction * total_steps)
    return Trainer(accelerator, model, accelerator.unwrap_model(model), objective, optimizer, scheduler, ema,
                   cfg.seed, channels_last)
