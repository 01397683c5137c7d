"""Theorem 4: the first-order expansion of the ℓ1 SCORE risk in ε and its gradient-alignment term.

With f_k(x) = p_d(k|x) − p_θ(k|x), the per-point ℓ1 SCORE loss at x' is Σ_k |f_k(x')|. Linearising f around x
(a ball ||δ||_p ≤ ε inside the domain, no f_k vanishing at x), Hölder's max_{||δ||_p≤ε} g·δ = ε||g||_q gives

    max_{||δ||_p≤ε} Σ_k |f_k(x) + ∇f_k(x)·δ| = Σ_k |f_k(x)| + ε·||Σ_k sign(f_k(x)) ∇f_k(x)||_q,   1/p + 1/q = 1

(ℓ∞ ball → q = 1, ℓ2 ball → q = 2). Since Σ_k f_k = 0 also Σ_k ∇f_k = 0, so when sign(f_k) = −sign(f_Y) for every
k ≠ Y (always so for K = 2; this sign pattern is the theorem's "mild condition") the coefficient is 2||∇f_Y||_q:

    R_SCORE^ℓ1(ε) = R_Std^ℓ1 + 2ε·E_x ||∇_x p_d(Y|x) − ∇_x p_θ(Y|x)||_q + o(ε),   Y = Y_d(x) = argmax_y p_d(y|x).

``alignment_terms`` computes, per point, the theorem's alignment term A = ||∇f_Y||_q, the general first-order
coefficient ||Σ_k sign(f_k)∇f_k||_q, whether the sign condition holds, and the cosine between the model gradient
∇_x log p_θ(Y|x) and the data gradient ∇_x log p_d(Y|x) (∇p = p·∇log p with p > 0, so it is also the cosine between
∇p_θ(Y|x) and ∇p_d(Y|x)). The data gradient enters through ``attach_log_posterior``, i.e. centred,
G̃_y = G_y − Σ_k p_d(k|x) G_k, so Σ_y ∇p_d(y|x) = 0 holds exactly also for an estimated posterior.

``expansion_check`` measures R_SCORE^ℓ1(ε) by attack over a range of ε and the gaps to both first-order
predictions; the remainder is O(ε²) for smooth f, so gap/ε → 0 and the log-log slope of the gap is about 2.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from .attacks import NORMS
from .losses import Model
from .posteriors import DataPosterior, attach_log_posterior, check_num_classes
from .precision import at_least_float32
from .risks import Maximizer, score_risk

DUAL_EXPONENT = {"linf": 1.0, "l2": 2.0}  # threat-ball norm p → exponent q of the dual norm


def dual_exponent(norm: str) -> float:
    """q with 1/p + 1/q = 1 for the threat norm (``"linf"`` → 1, ``"l2"`` → 2)."""
    if norm not in DUAL_EXPONENT:
        raise ValueError(f"unknown norm {norm!r}; valid norms: {', '.join(NORMS)}")
    return DUAL_EXPONENT[norm]


def _norm(v: Tensor, q: float) -> Tensor:
    """||v_b||_q of each example: [B, ...] → [B]."""
    return v.flatten(1).norm(p=q, dim=1)


@dataclass
class AlignmentTerms:
    """Per-example first-order quantities of Theorem 4 (every field [B]; see the module docstring)."""

    label: Tensor  # Y_d(x) = argmax_y p_d(y|x)
    standard_l1: Tensor  # Σ_k |f_k(x)| = ℓ1(p_d(·|x), p_θ(·|x))
    alignment: Tensor  # ||∇p_d(Y|x) − ∇p_θ(Y|x)||_q (the theorem's term)
    general: Tensor  # ||Σ_k sign(f_k(x)) ∇f_k(x)||_q (the first-order coefficient without the sign condition)
    sign_condition: Tensor  # bool: sign(f_k) = −sign(f_Y) ≠ 0 for every k ≠ Y
    cosine: Tensor  # cos(∇ log p_θ(Y|x), ∇ log p_d(Y|x))
    model_grad_norm: Tensor  # ||∇p_θ(Y|x)||_q
    data_grad_norm: Tensor  # ||∇p_d(Y|x)||_q

    def summary(self) -> dict:
        """Batch means (the sign condition as a fraction) as plain floats."""
        return {name: float(value.double().mean()) for name, value in asdict(self).items() if name != "label"}


def alignment_terms(model: Model, x: Tensor, posterior: DataPosterior, norm: str = "linf") -> AlignmentTerms:
    """Theorem 4's first-order terms at the points x (module docstring), for an ``norm`` threat ball.

    ``model`` must treat examples independently (eval mode). Three input gradients through one graph.
    """
    q = dual_exponent(norm)
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = at_least_float32(model(x))
        check_num_classes(logits, posterior)
        p_model = logits.softmax(dim=1)  # [B, K]
        p_data = attach_log_posterior(posterior, x).to(logits.dtype).exp()  # [B, K], input gradient = ∇p_d
        f = p_data - p_model
        label = p_data.detach().argmax(dim=1)
        rows = torch.arange(x.shape[0], device=x.device)
        signs = f.detach().sign()
        (grad_model,) = torch.autograd.grad(p_model[rows, label].sum(), x, retain_graph=True)  # ∇p_θ(Y|x)
        (grad_data,) = torch.autograd.grad(p_data[rows, label].sum(), x, retain_graph=True)  # ∇p_d(Y|x)
        (grad_general,) = torch.autograd.grad((signs * f).sum(), x)  # Σ_k sign(f_k) ∇f_k
    others = signs.clone()
    others[rows, label] = -signs[rows, label]  # the condition: every entry equals −sign(f_Y) ≠ 0
    sign_condition = (others == -signs[rows, label].unsqueeze(1)).all(dim=1) & (signs[rows, label] != 0)
    a, b = grad_model.flatten(1).double(), grad_data.flatten(1).double()
    cosine = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-300)
    return AlignmentTerms(
        label=label,
        standard_l1=f.detach().abs().sum(dim=1),
        alignment=_norm(grad_data - grad_model, q),
        general=_norm(grad_general, q),
        sign_condition=sign_condition,
        cosine=cosine,
        model_grad_norm=_norm(grad_model, q),
        data_grad_norm=_norm(grad_data, q),
    )


@dataclass
class ExpansionPoint:
    """R_SCORE^ℓ1 at one ε against the two first-order predictions (batch means)."""

    eps: float
    score_l1: float  # R_SCORE^ℓ1(ε) by attack
    predicted: float  # R_Std^ℓ1 + 2ε·A (Theorem 4)
    predicted_general: float  # R_Std^ℓ1 + ε·E||Σ_k sign(f_k)∇f_k||_q
    gap: float  # |R_SCORE^ℓ1 − predicted|
    gap_general: float
    gap_over_eps: float
    gap_general_over_eps: float


def loglog_slope(eps: Sequence[float], values: Sequence[float]) -> float:
    """Least-squares slope of log(value) against log(ε) (values ≤ 0 are left out; nan with fewer than two)."""
    points = [(math.log(e), math.log(v)) for e, v in zip(eps, values, strict=True) if v > 0 and e > 0]
    if len(points) < 2:
        return math.nan
    mean_x = sum(p[0] for p in points) / len(points)
    mean_y = sum(p[1] for p in points) / len(points)
    sxx = sum((p[0] - mean_x) ** 2 for p in points)
    return sum((p[0] - mean_x) * (p[1] - mean_y) for p in points) / sxx if sxx > 0 else math.nan


def expansion_check(
    model: Model,
    x: Tensor,
    make_posterior: Callable[[], DataPosterior],
    maximizer_for: Callable[[float], Maximizer],
    eps_values: Sequence[float],
    norm: str = "linf",
    generator: torch.Generator | None = None,
) -> dict:
    """R_SCORE^ℓ1(ε) by attack for every ε against R_Std^ℓ1 + 2ε·A and R_Std^ℓ1 + ε·(general coefficient).

    ``make_posterior()`` returns the data posterior for the batch x, fresh for every attack (a score-net trajectory
    posterior is stateful; a closed form can return itself). ``maximizer_for(ε)`` is the inner maximizer over the
    ε-ball (``GridSearch(ε)`` in 1-D is exact; PGD must be strong enough that its shortfall is far below the gap).
    Returns the first-order terms (batch means), one ``ExpansionPoint`` per ε (as dicts, in the given order) and the
    fitted log-log slopes of both gaps against ε.
    """
    if not eps_values or any(not e > 0 for e in eps_values):
        raise ValueError(f"eps_values must be a non-empty list of positive radii, got {list(eps_values)}")
    terms = alignment_terms(model, x, make_posterior(), norm).summary()
    standard, alignment, general = terms["standard_l1"], terms["alignment"], terms["general"]
    points = []
    for eps in eps_values:
        score = score_risk(model, x, make_posterior(), maximizer_for(eps), "l1", generator=generator).item()
        predicted, predicted_general = standard + 2 * eps * alignment, standard + eps * general
        gap, gap_general = abs(score - predicted), abs(score - predicted_general)
        points.append(ExpansionPoint(eps, score, predicted, predicted_general, gap, gap_general, gap / eps,
                                     gap_general / eps))
    eps_list = [p.eps for p in points]
    return {
        "terms": terms,
        "points": [asdict(p) for p in points],
        "slope": loglog_slope(eps_list, [p.gap for p in points]),
        "slope_general": loglog_slope(eps_list, [p.gap_general for p in points]),
    }
