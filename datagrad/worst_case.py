"""SCORE risks worth quoting: the per-example maximum over an ensemble of attacks, with bootstrap intervals.

R_SCORE^D = E_x max_{x'∈B(x)} D(p_d(·|x') ‖ p_θ(·|x')) is a maximum over x', and one PGD on D underestimates it: PGD
on ℓ1 stalls once a posterior saturates (its gradient vanishes where p_d or p_θ is one-hot), while an attack that moves
p_d itself (its label's log-odds) reaches points where D is large. ``worst_case`` therefore runs several attacks, each
with ``restarts`` random starts, and for every reported quantity keeps, per example, the largest value over EVERY
iterate of every attack (the random start and the clean point included). So it never reports less than any attack it
contains. Attacks (losses PGD maximizes over x' ∈ B(x) ∩ [0, 1]):

    l1            ‖p_d(·|x') − p_θ(·|x')‖₁                       the distance itself (full data gradient)
    kl            KL(p_d(·|x') ‖ p_θ(·|x'))                        the direct-SCORE training loss
    data-margin   −[log p_d(Y_d|x') − max_{k≠Y_d} log p_d(k|x')]    moves p_d off Y_d(x) = argmax p_d(·|x)
    model-margin  −[log p_θ(Y_θ|x') − max_{k≠Y_θ} log p_θ(k|x')]    moves p_θ off Y_θ(x) = argmax p_θ(·|x) (CW)
    madry-kl      KL(p_d(·|x) ‖ p_θ(·|x'))                         Madry's robust error, p_d held at x

Reported per example (``WorstCase``): ``score_l1``, ``score_kl`` (SCORE with ℓ1 and KL), ``madry_kl`` (Madry's KL
error, p_d(·|x) fixed), the clean values ``standard_l1``/``standard_kl`` (R_Std), and whether argmax p_θ = argmax p_d
at the ℓ1-worst point (``agreement``). ``bootstrap_mean`` gives a mean with a percentile 95 % interval.

The data posterior is any ``datagrad.DataPosterior`` (differentiable ones through autograd, others through their
[B, K, D] gradient, as in ``attach_log_posterior``); a stateful posterior that depends on the path (a score-net
trajectory) is not a fixed target and is not accepted here. PGD runs in ``attacks.pgd`` (ℓ∞ or ℓ2, uniform start,
clamped to ``clamp``); the model is used as given (put it in eval mode).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from .attacks import pgd, update_best
from .distances import get_distance
from .losses import Model, log_odds_margin
from .posteriors import DataPosterior, attach_log_posterior, check_num_classes
from .precision import at_least_float32
from .seeding import derived_seed

ATTACKS = ("l1", "kl", "data-margin", "model-margin", "madry-kl")
REPORTED = ("score_l1", "score_kl", "madry_kl")
L1, KL = get_distance("l1"), get_distance("kl")


@dataclass
class WorstCase:
    """Per-example results of ``worst_case`` (all [B], float64, on the CPU)."""

    score_l1: Tensor
    score_kl: Tensor
    madry_kl: Tensor
    standard_l1: Tensor
    standard_kl: Tensor
    agreement: Tensor  # argmax p_θ = argmax p_d at the ℓ1-worst point (bool)
    per_attack: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # attack -> reported -> [B]
    worst_l1_points: Tensor | None = None  # [B, ...]


def _log_probs(model: Model, x: Tensor) -> Tensor:
    return at_least_float32(model(x)).log_softmax(dim=1)


def worst_case(
    model: Model,
    x: Tensor,
    posterior: DataPosterior,
    *,
    eps: float,
    norm: str = "linf",
    steps: int = 40,
    step_size: float | None = None,
    restarts: int = 1,
    attacks: tuple[str, ...] = ATTACKS,
    clamp: tuple[float, float] | None = (0.0, 1.0),
    seed: int = 0,
) -> WorstCase:
    """The ensemble of the module docstring on a batch x [B, ...]; step size default 2.5·ε/steps.

    Restart r of attack a draws its random start from a generator seeded by (seed, ATTACKS.index(a), r) on x's device,
    so an attack makes the same iterates alone as inside any ensemble.
    """
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown or not attacks:
        raise ValueError(f"attacks must be among {', '.join(ATTACKS)}, got {list(attacks)}")
    if restarts < 1 or steps < 0:
        raise ValueError(f"need restarts >= 1 and steps >= 0, got {restarts} and {steps}")
    step_size = 2.5 * eps / max(steps, 1) if step_size is None else step_size
    x = x.detach()
    with torch.no_grad():
        log_p_clean = posterior.log_posterior(x).double()  # [B, K]
        log_q_clean = _log_probs(model, x).double()
    check_num_classes(log_q_clean, posterior)
    data_label, model_label = log_p_clean.argmax(dim=1), log_q_clean.argmax(dim=1)
    standard_l1, standard_kl = L1(log_p_clean, log_q_clean), KL(log_p_clean, log_q_clean)

    best = {"score_l1": standard_l1.clone(), "score_kl": standard_kl.clone(), "madry_kl": standard_kl.clone()}
    worst_points = x.clone()
    worst_agree = log_p_clean.argmax(1) == log_q_clean.argmax(1)
    per_attack: dict[str, dict[str, Tensor]] = {}

    def record(z: Tensor, log_p: Tensor, log_q: Tensor, mine: dict[str, Tensor]) -> None:
        nonlocal worst_points, worst_agree
        values = {"score_l1": L1(log_p, log_q), "score_kl": KL(log_p, log_q), "madry_kl": KL(log_p_clean, log_q)}
        for name, value in values.items():
            mine[name] = torch.maximum(mine[name], value)
            if name == "score_l1":  # the ℓ1-worst point and its agreement, by the maximizers' selection rule
                worst_points, _ = update_best(worst_points, best[name], z, value)
                worst_agree, _ = update_best(worst_agree, best[name], log_p.argmax(1) == log_q.argmax(1), value)
            best[name] = torch.maximum(best[name], value)

    for attack in attacks:
        mine = {name: torch.full_like(standard_l1, -torch.inf) for name in REPORTED}

        def loss(z: Tensor, attack=attack, mine=mine) -> Tensor:
            log_q = _log_probs(model, z)
            needs_data = attack in ("l1", "kl", "data-margin")
            log_p = attach_log_posterior(posterior, z) if needs_data else None
            with torch.no_grad():
                seen_p = (log_p if log_p is not None else posterior.log_posterior(z.detach())).detach().double()
                record(z.detach(), seen_p, log_q.detach().double(), mine)
            if attack == "l1":
                return L1(log_p.to(log_q.dtype), log_q)
            if attack == "kl":
                return KL(log_p.to(log_q.dtype), log_q)
            if attack == "data-margin":
                return -log_odds_margin(log_p, data_label)
            if attack == "model-margin":
                return -log_odds_margin(log_q, model_label)
            return KL(log_p_clean.to(log_q.dtype), log_q)  # madry-kl

        for restart in range(restarts):
            generator = torch.Generator(device=x.device).manual_seed(
                derived_seed(seed, ATTACKS.index(attack), restart, bits=32))
            last = pgd(loss, x, eps, step_size, steps, norm, random_start=True, clamp=clamp, generator=generator)
            with torch.no_grad():
                record(last, posterior.log_posterior(last).double(), _log_probs(model, last).double(), mine)
        per_attack[attack] = {name: value.cpu() for name, value in mine.items()}
    return WorstCase(best["score_l1"].cpu(), best["score_kl"].cpu(), best["madry_kl"].cpu(), standard_l1.cpu(),
                     standard_kl.cpu(), worst_agree.cpu(), per_attack, worst_points)


def bootstrap_mean(values: Tensor, resamples: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """The mean of ``values`` [n] with a percentile bootstrap interval: {"mean", "low", "high", "n"}."""
    data = np.asarray(values, dtype=np.float64).reshape(-1)
    if data.size == 0:
        raise ValueError("bootstrap_mean needs at least one value")
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, (resamples, data.size))].mean(axis=1)
    tail = 100 * (1 - level) / 2
    return {"mean": float(data.mean()), "low": float(np.percentile(means, tail)),
            "high": float(np.percentile(means, 100 - tail)), "n": int(data.size)}
