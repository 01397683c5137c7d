"""Exponential moving average (EMA) of model weights, as in the paper's recipe (docs/conventions.md §3).

Called once after every optimizer step; on its t-th call (t = 1, 2, ...):

    θ_ema ← θ                                   while t < warmup_steps   (plain copy: no averaging yet)
    θ_ema ← d_t · θ_ema + (1 − d_t) · θ          otherwise, with
    d_t   = min(τ, (1 + δ) / (10 + δ)),  δ = t − warmup_steps

and buffers (BatchNorm running mean / var / num_batches_tracked) are copied, not averaged, so the EMA
model normalizes with the live model's statistics. This is our reading of the public SCORE / Gowal et al.
code (``ema_update`` with ``dynamic_decay=True``, called with global_step = number of optimizer steps
taken, and ``update_bn`` copying BN statistics): there the decay is multiplied by [t ≥ warmup_steps],
which makes the warm-up a copy, and δ counts from the warm-up's end, so the first averaged step has
d = 0.1 and d reaches τ = 0.995 after about 1,800 steps. ``warmup_steps`` may be fractional (the public
code uses 2.5 % of the total step count, e.g. 0.025 · 400 · 98 = 980).

The update is fused over all tensors (``torch._foreach_lerp_`` / ``_foreach_copy_``). The EMA model lives
on the device of the model it was built from; build it from the prepared (device-placed) model or move
it with ``.to(device)``. Both the constructor and ``update`` take the model as it is, wrapped or not: the average is
of the plain module inside DataParallel / DistributedDataParallel / torch.compile wrappers (accelerate's
``extract_model_from_parallel``; compile around DDP, the order ``accelerator.prepare`` wraps in, included).
``state_dict``/``load_state_dict`` let ``accelerator.register_for_checkpointing``
save and restore it with the training state (τ and the warm-up come from the constructor).
"""

from __future__ import annotations

import copy

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn


class EMA:
    """EMA of ``model``'s parameters with warm-up and the (1 + δ)/(10 + δ) decay ramp (module docstring)."""

    def __init__(self, model: nn.Module, tau: float = 0.995, warmup_steps: float = 0.0):
        if not 0.0 <= tau < 1.0:
            raise ValueError(f"EMA tau must be in [0, 1), got {tau}")
        if warmup_steps < 0:
            raise ValueError(f"EMA warmup_steps must be >= 0, got {warmup_steps}")
        self.tau = float(tau)
        self.warmup_steps = float(warmup_steps)
        self.num_updates = 0
        plain = extract_model_from_parallel(model, keep_torch_compile=False)
        self.model = copy.deepcopy(plain).eval().requires_grad_(False)

    def decay(self, t: int) -> float:
        """d_t for the t-th update: 0 (copy) during warm-up, then min(τ, (1 + δ)/(10 + δ)), δ = t − warmup."""
        if t < self.warmup_steps:
            return 0.0
        delta = t - self.warmup_steps
        return min(self.tau, (1.0 + delta) / (10.0 + delta))

    @torch.no_grad()
    def update(self, model: nn.Module) -> float:
        """Fold the current weights of ``model`` into the average; returns the decay used."""
        model = extract_model_from_parallel(model, keep_torch_compile=False)
        ema_params, params = list(self.model.parameters()), list(model.parameters())
        ema_buffers, buffers = list(self.model.buffers()), list(model.buffers())
        if len(ema_params) != len(params) or len(ema_buffers) != len(buffers):
            raise ValueError("EMA.update: the model's parameters/buffers do not match the averaged model's")
        self.num_updates += 1
        decay = self.decay(self.num_updates)
        if decay == 0.0:
            torch._foreach_copy_(ema_params, params)
        else:
            torch._foreach_lerp_(ema_params, params, 1.0 - decay)  # θ_ema + (1 − d)(θ − θ_ema)
        if buffers:
            torch._foreach_copy_(ema_buffers, buffers)
        return decay

    def to(self, device: torch.device | str) -> EMA:
        self.model.to(device)
        return self

    def state_dict(self) -> dict:
        return {
            "num_updates": self.num_updates,
            "tau": self.tau,
            "warmup_steps": self.warmup_steps,
            "model": self.model.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.num_updates = int(state["num_updates"])
