"""Denoising score matching (noise prediction ε̂ of the added noise ε) with label dropout to the null class.

For images x ∈ [0, 1] (converted inside to u = 2x − 1), labels y ∈ {0 … K−1}, t ~ U[0, T−1] (continuous; ᾱ(t)
from the interpolated log-SNR of :class:`scorenets.noise.NoiseSchedule`, exact at integer steps) and ε ~ N(0, I):

    u_t  = sqrt(ᾱ(t))·u + sqrt(1 − ᾱ(t))·ε
    y'   = K (null class) with probability p_drop, else y
    loss = mean_{c,h,w} (ε_θ(u_t, t, y') − ε)²          (per example)

Its minimiser is ε*(u_t, t, y) = −sqrt(1 − ᾱ)·∇ log p_t(u_t | y) for every class and, through the dropped labels,
for the unconditional p_t(u_t) at label K, which is what :meth:`ScoreNet.class_scores` turns into scores.
Continuous t trains the network at the fractional timesteps that arbitrary noise levels σ map to.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .noise import NoisePredictor, NoiseSchedule, to_model_range


def dsm_loss(
    model: NoisePredictor,
    x: Tensor,
    labels: Tensor,
    num_classes: int,
    schedule: NoiseSchedule | None = None,
    label_dropout: float = 0.1,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
) -> Tensor:
    """ε-prediction loss on a batch x [B, C, H, W] in [0, 1] with labels [B] in [0, K).

    ``model`` is a :class:`ScoreNet` or its DDP/accelerate wrapper (anything callable as model(u_t, t, labels)).
    ``generator`` (on x's device) draws t, ε and the dropout mask. Returns the mean, or [B] for ``reduction="none"``.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if not 0.0 <= label_dropout <= 1.0:
        raise ValueError(f"label_dropout must be a probability in [0, 1], got {label_dropout}")
    if labels.shape != (x.shape[0],) or bool((labels < 0).any()) or bool((labels >= num_classes).any()):
        raise ValueError(f"labels must be a [B] = [{x.shape[0]}] tensor in [0, {num_classes}), got {labels}")
    schedule = schedule or NoiseSchedule()
    batch, device = x.shape[0], x.device
    t = torch.rand(batch, generator=generator, device=device) * (schedule.num_train_timesteps - 1)
    noise = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype)
    alpha_bar = schedule.alpha_bar_at(t).to(x.dtype).view(batch, 1, 1, 1)
    u_t = alpha_bar.sqrt() * to_model_range(x) + (1 - alpha_bar).sqrt() * noise
    dropped = torch.rand(batch, generator=generator, device=device) < label_dropout
    labels = torch.where(dropped, torch.full_like(labels, num_classes), labels)
    per_example = (model(u_t, t, labels) - noise).pow(2).flatten(1).mean(dim=1)  # [B]
    return per_example.mean() if reduction == "mean" else per_example
