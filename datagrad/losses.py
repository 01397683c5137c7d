"""Self-consistent losses D(p_d(·|x) || p_θ(·|x)) with the full input gradient.

For KL (docs/conventions.md §1), the input gradient is

    ∇_x KL(p_d(·|x) || p_θ(·|x)) = Σ_y p_d(y|x) [ −∇_x log p_θ(y|x) + log(p_d(y|x)/p_θ(y|x)) · ∇_x log p_d(y|x) ]
                                     └ model gradient ┘                              └ data gradient ┘

and the parameter gradient is that of the soft-label cross-entropy −Σ_y p_d(y|x) log p_θ(y|x), since
p_d does not depend on θ. Both come from autograd: log p_d enters through
:func:`datagrad.posteriors.attach_log_posterior`, whose input gradient is the posterior's data gradient.
The same holds for every distance in :mod:`datagrad.distances` (chain rule through p_d and p_θ).

``log_odds_margin`` is the margin log p(y|x) − max_{k≠y} log p(k|x) of any log-posterior; ``data_margin`` is its
negative for p_d, the loss of an attack that moves p_d(·|x') off a label (its input gradient is the data gradient
alone).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .distances import Distance, get_distance
from .posteriors import DataPosterior, attach_log_posterior, check_num_classes, is_differentiable
from .precision import at_least_float32

Model = Callable[[Tensor], Tensor]  # x [B, ...] -> logits [B, K]


def self_consistent_distance(
    model: Model, x: Tensor, posterior: DataPosterior, distance: str | Distance = "kl", data_gradient: bool = True
) -> Tensor:
    """Per-example D(p_d(·|x) || p_θ(·|x)): [B], differentiable in x (full gradient) and in θ.

    ``data_gradient=False`` holds p_d(·|x) at its value (stop-gradient): the input gradient keeps only the model
    term, Σ_y p_d(y|x)·(−∇_x log p_θ(y|x)) for KL. A differentiable posterior (a network) is then evaluated on the
    detached x, recording no graph through it; any other is called as with the full gradient (a path-integral
    posterior needs its scores at x). Values are unchanged either way.
    """
    distance = get_distance(distance)
    logits = at_least_float32(model(x))
    check_num_classes(logits, posterior)
    if data_gradient:
        log_p_data = attach_log_posterior(posterior, x)
    elif is_differentiable(posterior):
        log_p_data = attach_log_posterior(posterior, x.detach())
    else:
        log_p_data = attach_log_posterior(posterior, x).detach()
    log_p_data = log_p_data.to(logits.dtype)
    return distance(log_p_data, logits.log_softmax(dim=1))


def self_consistent_kl(model: Model, x: Tensor, posterior: DataPosterior) -> Tensor:
    """Per-example KL(p_d(·|x) || p_θ(·|x)): [B]; see the module docstring for both gradients."""
    return self_consistent_distance(model, x, posterior, "kl")


def madry_distance(
    model: Model, x_adv: Tensor, log_p_clean: Tensor, distance: str | Distance = "kl"
) -> Tensor:
    """Per-example D(p_d(·|x) || p_θ(·|x')) with the clean posterior fixed: [B] (Madry's robust error)."""
    distance = get_distance(distance)
    logits = at_least_float32(model(x_adv))
    if logits.shape != log_p_clean.shape:
        raise ValueError(
            f"class-count mismatch: model returns logits {tuple(logits.shape)}, "
            f"clean posterior has shape {tuple(log_p_clean.shape)}"
        )
    return distance(log_p_clean.detach().to(logits.dtype), logits.log_softmax(dim=1))


def log_odds_margin(log_p: Tensor, label: Tensor) -> Tensor:
    """log p(label|x) − max_{k ≠ label} log p(k|x) from log-probabilities [B, K]: [B]."""
    rows = torch.arange(len(label), device=label.device)
    own = log_p[rows, label]
    others = log_p.clone()
    others[rows, label] = -torch.inf
    return own - others.amax(dim=1)


def data_margin(x: Tensor, posterior: DataPosterior, label: Tensor) -> Tensor:
    """Per-example −[log p_d(y|x) − max_{k≠y} log p_d(k|x)]: [B], differentiable in x through the data gradient
    (``attach_log_posterior``). PGD on it moves x towards where p_d names another class than y."""
    return -log_odds_margin(at_least_float32(attach_log_posterior(posterior, x)), label)
