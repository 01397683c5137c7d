"""Batch estimators of the paper's risks and of Theorem 1 / Corollary 1.

For a batch x ~ p_d(x), a model p_θ, a data posterior p_d(·|x), a distance D and an inner maximizer
over B(x) (``attacks.PGD`` or, for 1-D data, the exact ``attacks.GridSearch``):

    R_Std^D   = E_x D(p_d(·|x)  || p_θ(·|x))
    R_Madry^D = E_x max_{x'∈B(x)} D(p_d(·|x)  || p_θ(·|x'))
    R_SCORE^D = E_x max_{x'∈B(x)} D(p_d(·|x') || p_θ(·|x'))
    C^D       = E_x max_{x'∈B(x)} D(p_d(·|x)  || p_d(·|x'))

    Theorem 1 (D a metric):  |R_Madry^D − C^D| ≤ R_SCORE^D ≤ R_Madry^D + C^D
    Corollary 1:             |R_SCORE^ℓ1 − C^ℓ1| ≤ sqrt(2 · R_Madry^KL)

Each estimator returns the batch mean (``reduction="mean"``) or per-example values [B] (``"none"``).
A maximizer that under-solves the inner problem (PGD) gives lower estimates of the max-based risks.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Protocol

import torch
from torch import Tensor

from .attacks import LossFn
from .distances import Distance, get_distance
from .losses import Model, madry_distance, self_consistent_distance
from .posteriors import DataPosterior, attach_log_posterior


class Maximizer(Protocol):
    def maximize(self, loss_fn: LossFn, x: Tensor, generator: torch.Generator | None = None) -> Tensor: ...


def _reduce(values: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "none":
        return values
    raise ValueError(f"unknown reduction {reduction!r}; valid: mean, none")


def _at_maximum(loss_fn: LossFn, maximizer: Maximizer, x: Tensor, reduction: str, generator) -> Tensor:
    """The per-example loss at the maximizer's x' (no gradient), reduced."""
    x_adv = maximizer.maximize(loss_fn, x, generator)
    with torch.no_grad():
        return _reduce(loss_fn(x_adv), reduction)


@torch.no_grad()
def standard_risk(
    model: Model, x: Tensor, posterior: DataPosterior, distance: str | Distance = "kl", reduction: str = "mean"
) -> Tensor:
    """R_Std^D on a batch: D(p_d(·|x) || p_θ(·|x))."""
    return _reduce(self_consistent_distance(model, x, posterior, distance), reduction)


def madry_risk(
    model: Model,
    x: Tensor,
    posterior: DataPosterior,
    maximizer: Maximizer,
    distance: str | Distance = "kl",
    reduction: str = "mean",
    generator: torch.Generator | None = None,
) -> Tensor:
    """R_Madry^D on a batch: max_{x'} D(p_d(·|x) || p_θ(·|x')), the clean posterior held fixed."""
    distance = get_distance(distance)
    with torch.no_grad():
        log_p_clean = posterior.log_posterior(x)

    def loss_fn(z: Tensor) -> Tensor:
        return madry_distance(model, z, log_p_clean, distance)

    return _at_maximum(loss_fn, maximizer, x, reduction, generator)


def score_risk(
    model: Model,
    x: Tensor,
    posterior: DataPosterior,
    maximizer: Maximizer,
    distance: str | Distance = "kl",
    reduction: str = "mean",
    generator: torch.Generator | None = None,
) -> Tensor:
    """R_SCORE^D on a batch: max_{x'} D(p_d(·|x') || p_θ(·|x')), attacked with the full data gradient."""
    distance = get_distance(distance)

    def loss_fn(z: Tensor) -> Tensor:
        return self_consistent_distance(model, z, posterior, distance)

    return _at_maximum(loss_fn, maximizer, x, reduction, generator)


def intrinsic_risk(
    x: Tensor,
    posterior: DataPosterior,
    maximizer: Maximizer,
    distance: str | Distance = "kl",
    reduction: str = "mean",
    generator: torch.Generator | None = None,
) -> Tensor:
    """C^D of Theorem 1 on a batch: max_{x'} D(p_d(·|x) || p_d(·|x')), the Madry error of p_d itself."""
    distance = get_distance(distance)
    with torch.no_grad():
        log_p_clean = posterior.log_posterior(x)

    def loss_fn(z: Tensor) -> Tensor:
        return distance(log_p_clean, attach_log_posterior(posterior, z))

    return _at_maximum(loss_fn, maximizer, x, reduction, generator)


@dataclass
class Theorem1:
    """Both sides of |R_Madry − C| ≤ R_SCORE ≤ R_Madry + C for one metric D."""

    distance: str
    madry: float
    score: float
    intrinsic: float
    lower_bound: float
    upper_bound: float
    holds: bool

    def to_dict(self) -> dict:
        return asdict(self)


def check_theorem1(
    model: Model,
    x: Tensor,
    posterior: DataPosterior,
    maximizer: Maximizer,
    distance: str | Distance = "l1",
    generator: torch.Generator | None = None,
    tolerance: float = 1e-6,
) -> Theorem1:
    """Estimate the three risks on a batch and test Theorem 1 (``distance`` must be a metric)."""
    distance = get_distance(distance)
    if not distance.is_metric:
        raise ValueError(f"Theorem 1 needs a metric distance (l1 or l2), got {distance.name!r}")
    madry = madry_risk(model, x, posterior, maximizer, distance, generator=generator).item()
    score = score_risk(model, x, posterior, maximizer, distance, generator=generator).item()
    intrinsic = intrinsic_risk(x, posterior, maximizer, distance, generator=generator).item()
    lower, upper = abs(madry - intrinsic), madry + intrinsic
    holds = lower <= score + tolerance and score <= upper + tolerance
    return Theorem1(distance.name, madry, score, intrinsic, lower, upper, holds)


@dataclass
class Corollary1:
    """Both sides of |R_SCORE^ℓ1 − C^ℓ1| ≤ sqrt(2 R_Madry^KL) and the early-stopping floor (C^ℓ1)²/2."""

    score_l1: float
    intrinsic_l1: float
    madry_kl: float
    lhs: float
    rhs: float
    madry_kl_floor: float
    holds: bool

    def to_dict(self) -> dict:
        return asdict(self)


def check_corollary1(
    model: Model,
    x: Tensor,
    posterior: DataPosterior,
    maximizer: Maximizer,
    generator: torch.Generator | None = None,
    tolerance: float = 1e-6,
) -> Corollary1:
    """Estimate both sides of Corollary 1 on a batch. ``madry_kl_floor`` = (C^ℓ1)²/2 is the KL Madry error
    below which the model cannot also reach R_SCORE^ℓ1 = 0 (the paper's explanation of early stopping)."""
    score_l1 = score_risk(model, x, posterior, maximizer, "l1", generator=generator).item()
    intrinsic_l1 = intrinsic_risk(x, posterior, maximizer, "l1", generator=generator).item()
    madry_kl = madry_risk(model, x, posterior, maximizer, "kl", generator=generator).item()
    lhs, rhs = abs(score_l1 - intrinsic_l1), math.sqrt(2 * max(madry_kl, 0.0))
    return Corollary1(score_l1, intrinsic_l1, madry_kl, lhs, rhs, intrinsic_l1**2 / 2, lhs <= rhs + tolerance)
