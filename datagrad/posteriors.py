"""The data-posterior interface and the differentiable view of log p_d(y|x) built from it.

A data posterior is any object with

* ``num_classes: int`` (K),
* ``log_posterior(x) -> [B, K]``: log p_d(y|x) for every class,
* ``grad_log_posterior(x) -> [B, K, *x.shape[1:]]``: ∇_x log p_d(y|x) for every class.

Closed forms (``datagrad.toys.GaussianMixture``) and score networks (``scorenets.ScoreNetPosterior``)
implement it. Neither needs to be differentiable by autograd: :func:`attach_log_posterior` turns the
two outputs into a tensor whose value is log p_d(·|x) and whose input gradient is the supplied
data gradient, so every loss built from it gets the full gradient of FACTS §1.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class DataPosterior(Protocol):
    """p_d(y|x) and its input gradient for K classes (see the module docstring)."""

    num_classes: int

    def log_posterior(self, x: Tensor) -> Tensor:  # [B, K]
        ...

    def grad_log_posterior(self, x: Tensor) -> Tensor:  # [B, K, *x.shape[1:]]
        ...


def check_num_classes(logits: Tensor, posterior: DataPosterior) -> None:
    """Raise a clear error when a model's class count differs from the posterior's."""
    if logits.dim() != 2:
        raise ValueError(f"model must return logits of shape [B, K], got {tuple(logits.shape)}")
    if logits.shape[1] != posterior.num_classes:
        raise ValueError(
            f"class-count mismatch: model returns {logits.shape[1]} logits but the data posterior "
            f"has {posterior.num_classes} classes"
        )


def attach_log_posterior(posterior: DataPosterior, x: Tensor) -> Tensor:
    """log p_d(·|x) as a tensor [B, K] whose gradient w.r.t. x is ∇_x log p_d(·|x).

    value:     log p_d(y|x)                       (from ``posterior.log_posterior``)
    gradient:  ∂/∂x = G̃_y = G_y − Σ_k p_d(k|x) G_k,  G_y = ∇_x log p_d(y|x)

    The centring makes Σ_y ∇_x p_d(y|x) = Σ_y p_d(y|x) G̃_y = 0 hold exactly, as it does for the true
    posterior (probabilities sum to one). For an exact posterior it changes nothing; for an estimated
    one (a score network) it keeps the estimate on the simplex, so the KL gradient is exactly
    Σ_y p_d [−∇ log p_θ + log(p_d/p_θ) ∇ log p_d] with no stray "+1" term. If x does not require a
    gradient, the plain value is returned and ``grad_log_posterior`` is not called.

    Call order (a contract stateful posteriors may rely on, e.g. a path integral that reuses the
    gradient just computed): ``grad_log_posterior(x)`` is called before ``log_posterior(x)`` on the same x.
    """
    with torch.no_grad():
        if x.requires_grad:
            grad = posterior.grad_log_posterior(x.detach())  # [B, K, *x.shape[1:]]
            expected = (x.shape[0], posterior.num_classes, *x.shape[1:])
            if tuple(grad.shape) != expected:
                raise ValueError(f"grad_log_posterior returned shape {tuple(grad.shape)}, expected {expected}")
        log_p = posterior.log_posterior(x.detach())  # [B, K]
    if log_p.dim() != 2 or log_p.shape[0] != x.shape[0] or log_p.shape[1] != posterior.num_classes:
        raise ValueError(
            f"log_posterior returned shape {tuple(log_p.shape)}, expected "
            f"[{x.shape[0]}, {posterior.num_classes}]"
        )
    if not x.requires_grad:
        return log_p
    with torch.no_grad():
        grad = grad.flatten(2)  # [B, K, D]
        grad = grad - torch.einsum("bk,bkd->bd", log_p.exp(), grad).unsqueeze(1)
    displacement = (x - x.detach()).flatten(1)  # zero in value, identity in gradient; [B, D]
    return log_p + torch.einsum("bkd,bd->bk", grad, displacement)
