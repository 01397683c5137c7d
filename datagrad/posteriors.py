"""The data-posterior interface and the differentiable view of log p_d(y|x) built from it.

A data posterior is any object with

* ``num_classes: int`` (K),
* ``log_posterior(x) -> [B, K]``: log p_d(y|x) for every class,
* ``grad_log_posterior(x) -> [B, K, *x.shape[1:]]``: ∇_x log p_d(y|x) for every class.

Closed forms (``datagrad.toys.GaussianMixture``, ``datagrad.kernels.KernelMixture``) and score networks
(``scorenets.ScoreNetPosterior``) implement it. A posterior that is not differentiable by autograd (a score-net
line integral) goes through :func:`attach_log_posterior`, which turns the two outputs into a tensor whose value is
log p_d(·|x) and whose input gradient is the supplied data gradient [B, K, D]; every loss built from it then gets
the full input gradient of the self-consistent KL (``datagrad.losses``).

A posterior whose ``log_posterior`` IS differentiable in x by autograd (a closed form written in torch, a
noise-conditional posterior network) says so with a true attribute ``differentiable``. For it,
:func:`attach_log_posterior` returns ``log_posterior(x)`` itself: the data gradient then comes from one backward
pass through the posterior, whatever K is, and no [B, K, D] tensor is ever formed. Both routes give the same loss
and the same input gradient (tested on an exact mixture); ``grad_log_posterior`` is still required, for readouts.
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


def is_differentiable(posterior: DataPosterior) -> bool:
    """Whether ``posterior.log_posterior`` is differentiable in x by autograd (module docstring)."""
    return bool(getattr(posterior, "differentiable", False))


def attach_log_posterior(posterior: DataPosterior, x: Tensor) -> Tensor:
    """log p_d(·|x) as a tensor [B, K] whose gradient w.r.t. x is ∇_x log p_d(·|x).

    Differentiable posteriors (``is_differentiable``): ``log_posterior(x)`` through autograd; it is centred by
    construction (Σ_y p_d(y|x) ∇ log p_d(y|x) = ∇ Σ_y p_d(y|x) = 0 for any normalised log-probabilities).
    Otherwise:

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
    if is_differentiable(posterior):
        log_p = posterior.log_posterior(x)
        _check_log_posterior_shape(log_p, x, posterior)
        return log_p
    with torch.no_grad():
        if x.requires_grad:
            grad = posterior.grad_log_posterior(x.detach())  # [B, K, *x.shape[1:]]
            expected = (x.shape[0], posterior.num_classes, *x.shape[1:])
            if tuple(grad.shape) != expected:
                raise ValueError(f"grad_log_posterior returned shape {tuple(grad.shape)}, expected {expected}")
        log_p = posterior.log_posterior(x.detach())  # [B, K]
    _check_log_posterior_shape(log_p, x, posterior)
    if not x.requires_grad:
        return log_p
    with torch.no_grad():
        grad = grad.flatten(2)  # [B, K, D]
        grad = grad - torch.einsum("bk,bkd->bd", log_p.exp(), grad).unsqueeze(1)
    displacement = (x - x.detach()).flatten(1)  # zero in value, identity in gradient; [B, D]
    return log_p + torch.einsum("bkd,bd->bk", grad, displacement)


def _check_log_posterior_shape(log_p: Tensor, x: Tensor, posterior: DataPosterior) -> None:
    if log_p.dim() != 2 or log_p.shape[0] != x.shape[0] or log_p.shape[1] != posterior.num_classes:
        raise ValueError(
            f"log_posterior returned shape {tuple(log_p.shape)}, expected [{x.shape[0]}, {posterior.num_classes}]"
        )


def autograd_grad_log_posterior(log_posterior, x: Tensor, num_classes: int) -> Tensor:
    """∇_x log p(y|x) for every class by autograd: [B, K, *x.shape[1:]] from K backward passes.

    ``log_posterior``: x [B, ...] → [B, K], differentiable in x and acting row-wise (example b depends on x_b only).
    For readouts of differentiable posteriors; training never forms this tensor.
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        log_p = log_posterior(x)
        rows = [torch.autograd.grad(log_p[:, k].sum(), x, retain_graph=k + 1 < num_classes)[0]
                for k in range(num_classes)]
    return torch.stack(rows, dim=1)
