"""Distances D(p || q) between batches of categorical distributions.

Every distance takes LOG-probabilities ``log_p, log_q`` of shape ``[B, K]`` and returns ``[B]``.
Working in log space keeps KL exact when p has zeros or tiny entries; the metrics (ℓ1, ℓ2) and the
squared error act on ``p = exp(log_p)``.

    kl(p, q) = Σ_k p_k (log p_k − log q_k)          (0·log 0 = 0)
    l1(p, q) = Σ_k |p_k − q_k|
    l2(p, q) = (Σ_k (p_k − q_k)²)^{1/2}
    se(p, q) = Σ_k (p_k − q_k)²                     (the paper's "SE", squared ℓ2)

ℓ1 and ℓ2 are metrics, so Theorem 1's bounds apply to them; KL and SE are not metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


def kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) = Σ_k p_k (log p_k − log q_k), with 0·log 0 = 0 and finite gradients there."""
    p = log_p.exp()
    positive = p > 0
    # Replace log p where p == 0 so that neither the value nor the gradient sees 0·(−inf).
    safe_log_p = torch.where(positive, log_p, torch.zeros_like(log_p))
    terms = torch.where(positive, p * (safe_log_p - log_q), torch.zeros_like(p))
    return terms.sum(dim=-1)


def l1(log_p: Tensor, log_q: Tensor) -> Tensor:
    """ℓ1 distance Σ_k |p_k − q_k| (twice the total-variation distance)."""
    return (log_p.exp() - log_q.exp()).abs().sum(dim=-1)


def se(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Squared error Σ_k (p_k − q_k)² between probability vectors."""
    return (log_p.exp() - log_q.exp()).pow(2).sum(dim=-1)


def l2(log_p: Tensor, log_q: Tensor) -> Tensor:
    """ℓ2 distance (Σ_k (p_k − q_k)²)^{1/2}; the gradient at p = q is defined as 0."""
    squared = se(log_p, log_q)
    positive = squared > 0
    safe = torch.where(positive, squared, torch.ones_like(squared))
    return torch.where(positive, safe.sqrt(), torch.zeros_like(squared))


@dataclass(frozen=True)
class Distance:
    """A named distance between categorical distributions given as log-probabilities."""

    name: str
    fn: Callable[[Tensor, Tensor], Tensor]
    is_metric: bool

    def __call__(self, log_p: Tensor, log_q: Tensor) -> Tensor:
        if log_p.shape != log_q.shape or log_p.dim() != 2:
            raise ValueError(
                f"distance {self.name!r} needs two [B, K] log-probability tensors of the same shape, "
                f"got {tuple(log_p.shape)} and {tuple(log_q.shape)}"
            )
        return self.fn(log_p, log_q)


DISTANCES: dict[str, Distance] = {
    "kl": Distance("kl", kl, is_metric=False),
    "l1": Distance("l1", l1, is_metric=True),
    "l2": Distance("l2", l2, is_metric=True),
    "se": Distance("se", se, is_metric=False),
}


def get_distance(name: str | Distance) -> Distance:
    """Look a distance up by name (``"kl"``, ``"l1"``, ``"l2"``, ``"se"``); a ``Distance`` passes through."""
    if isinstance(name, Distance):
        return name
    try:
        return DISTANCES[name]
    except KeyError:
        raise ValueError(f"unknown distance {name!r}; valid names: {', '.join(sorted(DISTANCES))}") from None
