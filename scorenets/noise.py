"""Noise conventions: the ONE place where data units, diffusion units, ε and scores are converted.

Units
-----
* Data: images are float tensors [B, C, H, W] in [0, 1] everywhere in the project.
* Diffusion model: works in u = 2x − 1 ∈ [−1, 1] (``to_model_range`` / ``to_data_range``).
* Noise std: σ is ALWAYS quoted in [0, 1] data units in public APIs: x̃ = x + σ·n, n ~ N(0, I).
  In [−1, 1] units the same noise has std s = 2σ: ũ = 2x̃ − 1 = u + s·n.

VP (DDPM) diffusion ⇔ additive noise
------------------------------------
The DDPM forward process u_t = sqrt(ᾱ_t)·u + sqrt(1 − ᾱ_t)·ε is a rescaled additive-noise sample:

    ũ = u_t / sqrt(ᾱ_t) = u + s·ε,   s² = (1 − ᾱ_t)/ᾱ_t,   u_t = ũ / sqrt(1 + s²),   ᾱ_t = 1/(1 + s²) = 1/(1 + 4σ²).

Noise prediction → score
------------------------
The optimal noise predictor is ε*(u_t) = −sqrt(1 − ᾱ_t)·∇_{u_t} log p_t(u_t | y). With ∇_ũ = ∇_{u_t}/sqrt(1 + s²) and
sqrt(1 − ᾱ_t)·sqrt(1 + s²) = s:

    ∇_ũ log p(ũ | y) = −ε*/s                         ([−1, 1] units)
    ∇_x̃ log p_σ(x̃ | y) = 2·∇_ũ log p(ũ | y) = −2ε*/s = −ε*/σ      ([0, 1] units, σ = s/2)

so ``noise_to_score(ε̂, σ) = −ε̂/σ`` and ``score_to_noise(score, σ) = −σ·score``.

Names: in formulas ε is the diffusion noise and ε̂ = ε_θ its prediction (DDPM's notation); in code they are
``noise`` and ``noise_pred`` (``ScoreNet.predict_noise``), never ``eps``, which names the threat radius ε of the
attacks everywhere else in the project.

Continuous time
---------------
``NoiseSchedule`` holds diffusers' ``DDPMScheduler`` linear-β schedule (β from 1e-4 to 0.02, 1000 steps; ᾱ_t taken
from the scheduler itself, so samplers and conversions agree exactly at integer t). Between integer steps the
log-SNR λ(t) = log(ᾱ_t/(1 − ᾱ_t)) = −2·log(2σ) is interpolated linearly; λ is strictly decreasing in t, so σ ↔ t is a
monotone bijection on [σ_min, σ_max] ≈ [0.0050, 78.7] (data units). The UNet accepts float timesteps, so any σ in
that range is evaluated at its exact (fractional) t.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import cached_property, lru_cache

import torch
from diffusers import DDPMScheduler
from torch import Tensor

NoisePredictor = Callable[[Tensor, Tensor, Tensor], Tensor]  # (u_t [B,C,H,W], t [B], labels [B]) -> ε̂ [B,C,H,W]


def check_noise_std(sigma: float) -> float:
    """Return σ as a float, or raise a clear error when it is not a positive finite number."""
    sigma = float(sigma)
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"noise_std σ must be a positive finite number (std in [0,1] data units), got {sigma}")
    return sigma


def to_model_range(x: Tensor) -> Tensor:
    """[0, 1] data → [−1, 1] model units: u = 2x − 1."""
    return 2 * x - 1


def to_data_range(u: Tensor) -> Tensor:
    """[−1, 1] model units → [0, 1] data: x = (u + 1)/2."""
    return (u + 1) / 2


def alpha_bar_from_sigma(sigma: float) -> float:
    """ᾱ = 1/(1 + s²) with s = 2σ (σ in data units)."""
    return 1.0 / (1.0 + 4.0 * check_noise_std(sigma) ** 2)


def sigma_from_alpha_bar(alpha_bar: Tensor) -> Tensor:
    """σ = s/2 = sqrt((1 − ᾱ)/ᾱ)/2 (data units)."""
    return ((1 - alpha_bar) / alpha_bar).sqrt() / 2


def model_input(x_noisy: Tensor, sigma: float) -> Tensor:
    """The diffusion state u_t for a noisy image x̃ = x + σn in [0,1] units: u_t = (2x̃ − 1)/sqrt(1 + 4σ²)."""
    return to_model_range(x_noisy) * math.sqrt(alpha_bar_from_sigma(sigma))


def noise_to_score(noise_pred: Tensor, sigma: float) -> Tensor:
    """∇_x̃ log p_σ(x̃ | y) = −ε̂/σ for a noise prediction ε̂ ([0,1] units; see the module docstring for the factor 2)."""
    return -noise_pred / check_noise_std(sigma)


def score_to_noise(score: Tensor, sigma: float) -> Tensor:
    """The noise prediction ε̂ = −σ·∇_x̃ log p_σ(x̃ | y) (inverse of :func:`noise_to_score`)."""
    return -check_noise_std(sigma) * score


@dataclass(frozen=True)
class NoiseSchedule:
    """diffusers' DDPM β schedule with a continuous σ ↔ t map (piecewise-linear log-SNR in t)."""

    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    beta_schedule: str = "linear"

    def scheduler_config(self) -> dict:
        """Keyword arguments for any diffusers scheduler (DDPM, DDIM, DPM-Solver++) with this schedule."""
        return asdict(self)

    @cached_property
    def alphas_cumprod(self) -> Tensor:
        """ᾱ_t at the integer steps t = 0 … T−1, exactly as DDPMScheduler computes them: [T] float64."""
        return DDPMScheduler(**self.scheduler_config()).alphas_cumprod.double()

    @cached_property
    def log_snr(self) -> Tensor:
        """λ_t = log(ᾱ_t/(1 − ᾱ_t)) at integer steps: [T] float64, strictly decreasing."""
        alpha_bar = self.alphas_cumprod
        return alpha_bar.log() - (-alpha_bar).log1p()

    @property
    def sigma_min(self) -> float:
        return float(sigma_from_alpha_bar(self.alphas_cumprod[0]))

    @property
    def sigma_max(self) -> float:
        return float(sigma_from_alpha_bar(self.alphas_cumprod[-1]))

    def log_snr_at(self, t: Tensor) -> Tensor:
        """λ(t) for float t ∈ [0, T−1], linear between integer steps (same device/dtype as t)."""
        table = self.log_snr.to(device=t.device, dtype=t.dtype)
        t = t.clamp(0, self.num_train_timesteps - 1)
        lower = t.floor().long().clamp(max=self.num_train_timesteps - 2)
        frac = t - lower
        return table[lower] + frac * (table[lower + 1] - table[lower])

    def alpha_bar_at(self, t: Tensor) -> Tensor:
        """ᾱ(t) = sigmoid(λ(t)) for float t (exact at integer t)."""
        return torch.sigmoid(self.log_snr_at(t))

    def sigma_at(self, t: Tensor) -> Tensor:
        """σ(t) = exp(−λ(t)/2)/2 in data units, for float t."""
        return torch.exp(-self.log_snr_at(t) / 2) / 2

    def t_at_sigma(self, sigma: Tensor) -> Tensor:
        """The float timesteps t with σ(t) = σ for a tensor of σ (data units; same device/dtype), the inverse of
        ``sigma_at``; σ outside [σ_min, σ_max] maps to the end of the schedule (callers validate the range)."""
        table = -self.log_snr.to(device=sigma.device, dtype=sigma.dtype)  # −λ_t, increasing in t
        target = 2.0 * torch.log(2.0 * sigma)  # −λ(σ)
        lower = (torch.searchsorted(table, target.contiguous(), right=True) - 1).clamp(0, self.num_train_timesteps - 2)
        low, high = table[lower], table[lower + 1]
        frac = ((target - low) / (high - low)).clamp(0.0, 1.0)
        return lower.to(sigma.dtype) + frac

    @lru_cache(maxsize=64)  # noqa: B019 (schedules are few, small and immutable)
    def sigma_to_t(self, sigma: float) -> float:
        """The float timestep t with σ(t) = σ (data units); raises outside [σ_min, σ_max]. Cached: a score-net call
        asks for it every time, and the host-side table lookups would otherwise repeat per call."""
        sigma = check_noise_std(sigma)
        if not self.sigma_min <= sigma <= self.sigma_max:
            raise ValueError(
                f"noise_std σ = {sigma} is outside the schedule's range [{self.sigma_min:.4g}, {self.sigma_max:.4g}] "
                "(data units); the network was never trained there"
            )
        target = -2.0 * math.log(2.0 * sigma)  # λ(σ)
        decreasing = self.log_snr
        # λ decreases in t: find the last step whose λ is still >= target, then interpolate linearly.
        lower = int(torch.searchsorted(-decreasing, torch.tensor(-target, dtype=torch.float64), right=True)) - 1
        lower = min(max(lower, 0), self.num_train_timesteps - 2)
        lam0, lam1 = float(decreasing[lower]), float(decreasing[lower + 1])
        return lower + (target - lam0) / (lam1 - lam0)
