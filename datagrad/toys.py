"""Analytic data distributions with closed-form posteriors and scores.

``GaussianMixture`` has isotropic class-conditional Gaussians x | y ~ N(μ_y, s_y² I) in d dimensions
with priors π_y. Adding Gaussian noise of standard deviation σ (``noise_std``; x̃ = x + σ·n, n ~ N(0, I))
keeps it a mixture with variances v_y = s_y² + σ²:

    log p_σ(x|y)   = −d/2 · log(2π v_y) − ||x − μ_y||² / (2 v_y)
    log p_σ(y|x)   = log π_y + log p_σ(x|y) − logsumexp_k [log π_k + log p_σ(x|k)]
    ∇ log p_σ(x|y) = −(x − μ_y) / v_y
    ∇ log p_σ(x)   = Σ_k p_σ(k|x) ∇ log p_σ(x|k)
    ∇ log p_σ(y|x) = ∇ log p_σ(x|y) − ∇ log p_σ(x)

Inputs may have any trailing shape that flattens to d (e.g. 1×8×8 images for d = 64); the mixture's
``event_shape`` is the shape ``sample`` returns. Computation happens in the input's dtype (float64 works).

The mixture itself is the σ = 0 ``DataPosterior`` with the closed-form gradient above; ``mixture.at(σ)`` is p_σ(y|x)
at a fixed noise std, and with ``differentiable=True`` (the default there) losses take its input gradient by autograd
through ``log_posterior`` instead (``datagrad.posteriors``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


class GaussianMixture:
    """Isotropic class-conditional Gaussian mixture; implements ``datagrad.DataPosterior``."""

    def __init__(
        self,
        means: Tensor | Sequence,
        stds: Tensor | Sequence,
        priors: Tensor | Sequence,
        event_shape: Sequence[int] | None = None,
    ):
        means = torch.as_tensor(means, dtype=torch.float64)
        stds = torch.as_tensor(stds, dtype=torch.float64)
        priors = torch.as_tensor(priors, dtype=torch.float64)
        if means.dim() != 2:
            raise ValueError(f"means must have shape [K, d], got {tuple(means.shape)}")
        num_classes, dim = means.shape
        if stds.shape != (num_classes,) or priors.shape != (num_classes,):
            raise ValueError(
                f"stds and priors must have shape [K] = [{num_classes}], got {tuple(stds.shape)} and "
                f"{tuple(priors.shape)}"
            )
        if not bool((stds > 0).all()):
            raise ValueError(f"stds must be positive, got {stds.tolist()}")
        if not bool((priors > 0).all()) or abs(priors.sum().item() - 1.0) > 1e-6:
            raise ValueError(f"priors must be positive and sum to 1, got {priors.tolist()}")
        self.event_shape = tuple(event_shape) if event_shape is not None else (dim,)
        if math.prod(self.event_shape) != dim:
            raise ValueError(f"event_shape {self.event_shape} does not flatten to d = {dim}")
        self.means, self.stds, self.priors = means, stds, priors
        self.num_classes, self.dim = num_classes, dim

    # -- helpers --------------------------------------------------------------------------------------
    def _flatten(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or math.prod(x.shape[1:]) != self.dim:
            raise ValueError(
                f"expected a batch [B, ...] whose trailing shape flattens to d = {self.dim}, "
                f"got shape {tuple(x.shape)}"
            )
        return x.reshape(x.shape[0], self.dim)

    def _variances(self, noise_std: float, like: Tensor) -> Tensor:
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        return (self.stds**2 + noise_std**2).to(like)  # [K]

    def log_likelihood(self, x: Tensor, noise_std: float = 0.0) -> Tensor:
        """log p_σ(x|y) for every class: [B, K]."""
        flat = self._flatten(x)  # [B, d]
        variances = self._variances(noise_std, flat)
        # The direct form: cdist's matrix-product shortcut loses precision in float32.
        sq_dist = torch.cdist(flat, self.means.to(flat), compute_mode="donot_use_mm_for_euclid_dist").pow(2)  # [B, K]
        return -0.5 * self.dim * torch.log(2 * math.pi * variances) - sq_dist / (2 * variances)

    def _class_scores(self, flat: Tensor, noise_std: float) -> Tensor:
        """∇ log p_σ(x|y) for every class: [B, K, d]."""
        variances = self._variances(noise_std, flat)
        return -(flat.unsqueeze(1) - self.means.to(flat)) / variances[:, None]

    # -- DataPosterior --------------------------------------------------------------------------------
    def log_joint(self, x: Tensor, noise_std: float = 0.0) -> Tensor:
        """log π_y + log p_σ(x|y): [B, K]."""
        return self.priors.log().to(x) + self.log_likelihood(x, noise_std)

    def log_marginal(self, x: Tensor, noise_std: float = 0.0) -> Tensor:
        """log p_σ(x): [B]."""
        return self.log_joint(x, noise_std).logsumexp(dim=1)

    def log_posterior(self, x: Tensor, noise_std: float = 0.0) -> Tensor:
        """log p_σ(y|x): [B, K]."""
        return self.log_joint(x, noise_std).log_softmax(dim=1)

    def grad_log_posterior(self, x: Tensor, noise_std: float = 0.0) -> Tensor:
        """∇_x log p_σ(y|x) for every class: [B, K, *x.shape[1:]]."""
        flat = self._flatten(x)
        class_scores = self._class_scores(flat, noise_std)  # [B, K, d]
        posterior = self.log_posterior(x, noise_std).exp()  # [B, K]
        marginal_score = torch.einsum("bk,bkd->bd", posterior, class_scores)
        return (class_scores - marginal_score.unsqueeze(1)).reshape(x.shape[0], self.num_classes, *x.shape[1:])

    def score(self, x: Tensor, y: Tensor | None = None, noise_std: float = 0.0) -> Tensor:
        """∇_x log p_σ(x|y) for labels y [B], or ∇_x log p_σ(x) when y is None; same shape as x."""
        flat = self._flatten(x)
        class_scores = self._class_scores(flat, noise_std)  # [B, K, d]
        if y is None:
            posterior = self.log_posterior(x, noise_std).exp()
            out = torch.einsum("bk,bkd->bd", posterior, class_scores)
        else:
            y = torch.as_tensor(y, device=x.device).long()
            if y.shape != (x.shape[0],) or bool((y < 0).any()) or bool((y >= self.num_classes).any()):
                raise ValueError(f"labels must be a [B] tensor in [0, {self.num_classes}), got {y.tolist()}")
            out = class_scores[torch.arange(x.shape[0], device=x.device), y]
        return out.reshape(x.shape)

    def at(self, noise_std: float, differentiable: bool = True) -> MixturePosterior:
        """p_σ(y|x) at the fixed noise std σ = ``noise_std`` as a ``DataPosterior`` (σ = 0: p_d itself)."""
        self._variances(noise_std, self.stds)  # validates σ
        return MixturePosterior(self, float(noise_std), differentiable)

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        noise_std: float = 0.0,
        dtype: torch.dtype = torch.float32,
    ) -> tuple[Tensor, Tensor]:
        """Draw n pairs (x [n, *event_shape], y [n]) from p_σ(x, y) on the generator's device (CPU default)."""
        if n < 1:
            raise ValueError(f"number of samples must be >= 1, got {n}")
        device = generator.device if generator is not None else torch.device("cpu")
        y = torch.multinomial(self.priors.to(device), n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, device=device, dtype=torch.float64)
        std = self._variances(noise_std, noise).sqrt()
        x = self.means.to(device)[y] + std[y, None] * noise
        return x.to(dtype).reshape(n, *self.event_shape), y


@dataclass(frozen=True)
class MixturePosterior:
    """p_σ(y|x) of a ``GaussianMixture`` at a fixed noise std σ: a ``DataPosterior`` (``GaussianMixture.at``)."""

    mixture: GaussianMixture
    noise_std: float
    differentiable: bool = True

    @property
    def num_classes(self) -> int:
        return self.mixture.num_classes

    def log_posterior(self, x: Tensor) -> Tensor:
        """log p_σ(y|x): [B, K], differentiable in x by autograd."""
        return self.mixture.log_posterior(x, self.noise_std)

    def grad_log_posterior(self, x: Tensor) -> Tensor:
        """∇_x log p_σ(y|x) in closed form: [B, K, *x.shape[1:]]."""
        return self.mixture.grad_log_posterior(x, self.noise_std)


def seed_toy() -> GaussianMixture:
    """The seed's 1-D mixture: p(y=0)=5/6, p(y=1)=1/6; x|y=0 ~ N(−1, 2²), x|y=1 ~ N(1, 1²) (stds 2 and 1).

    Its true log-odds are log p(y=1|x)/p(y=0|x) = −0.375 x² + 1.25 x + ½·log 4 − log 5 − 0.375.
    """
    return GaussianMixture(means=[[-1.0], [1.0]], stds=[2.0, 1.0], priors=[5 / 6, 1 / 6])


# -- the Gaussian-mixture image toys (gmm-*) ------------------------------------------------------------------------
def _hadamard_patterns(num_classes: int, side: int) -> np.ndarray:
    """Rows 1..K of the Sylvester–Hadamard matrix of order side², as ±1 patterns [K, side²].

    h(i, j) = (−1)^popcount(i & j): stripes and checkerboards, any two differing in exactly half the pixels.
    """
    index = np.arange(side * side)
    rows = np.arange(1, num_classes + 1)
    popcount = np.vectorize(lambda n: bin(n).count("1"))(rows[:, None] & index[None, :])
    return (1.0 - 2.0 * (popcount % 2)).astype(np.float64)


# name: (classes K, image side, pattern amplitude a, per-pixel std s); means 0.5 + a·pattern, equal priors.
TOY_MIXTURES = {
    "gmm-8x8": (10, 8, 0.10, 0.15),
    "gmm-4x4": (3, 4, 0.15, 0.15),
}


def toy_mixture(name: str) -> GaussianMixture:
    """The exact ``GaussianMixture`` (event shape (1, side, side)) behind a toy dataset.

    Means 0.5 + a·h_k with h_k ±1 Hadamard patterns (so ||μ_j − μ_k||² = 2·d·a² for all j ≠ k), isotropic
    std s, uniform priors.
    """
    if name not in TOY_MIXTURES:
        raise ValueError(f"unknown toy mixture {name!r}; valid: {', '.join(TOY_MIXTURES)}")
    num_classes, side, amplitude, std = TOY_MIXTURES[name]
    means = 0.5 + amplitude * _hadamard_patterns(num_classes, side)
    return GaussianMixture(means, [std] * num_classes, [1.0 / num_classes] * num_classes, (1, side, side))


