r"""The score-net data posterior p_σ(y|x) and its input gradient, from class-conditional scores.

Conventions
-----------
Images x are [B, C, H, W] in [0, 1]; σ (``noise_std``) is the std of Gaussian noise in those units. The target is
the posterior of the data convolved with N(0, σ²I),

    p_σ(y|x) ∝ π_y p_σ(x|y),   p_σ(x|y) = ∫ p_d(x₀|y) N(x; x₀, σ²I) dx₀,

a smoothed p_d(y|x) that approaches it as σ → 0 (while the score estimate gets harder). The backing model is
anything with ``num_classes`` (K), a call counter ``forward_calls`` and
``class_scores(x, noise_std, include_null=False, max_batch=None) -> [B, K(+1), C, H, W]`` returning the
class-conditional scores s_y(x) = ∇_x log p_σ(x|y) (and the unconditional one at index K) from ONE batched network
call, e.g. :class:`scorenets.ScoreNet` or an exact stand-in built on ``datagrad.GaussianMixture.score``.

Gradient
--------
Bayes' rule gives, for every class y,

    ∇_x log p_σ(y|x) = s_y(x) − ∇_x log p_σ(x),      ∇_x log p_σ(x) = Σ_k p_σ(k|x) s_k(x).

Any y-independent estimate c(x) of the marginal score may stand in for ∇ log p_σ(x) in a SCORE loss, because
``datagrad.attach_log_posterior`` centres the gradient under the returned posterior p:
(s_y − c) − Σ_k p_k (s_k − c) = s_y − Σ_k p_k s_k whatever c is. We therefore use

* with a label distribution at x (anchored and trajectory modes): c = Σ_k p̂(k|x) s_k, the mixture estimate. It is
  centred by construction (Σ_y p̂_y G_y = 0), consistent with the returned log p̂, and needs only the K conditional
  inputs per point (no null class, so its error never enters);
* without one (``ScoreNetPosterior.grad_log_posterior``): c = s_∅, the null-class (unconditional) score, one call
  over K + 1 inputs per point. Its error shows in the raw output but cancels in every centred use.

Log-posterior by a line integral
--------------------------------
Along any path from an anchor x (whose label distribution is known) to x′, e.g. x_τ = x + τΔ, Δ = x′ − x,

    log p_σ(y|x′) = log p_σ(y|x) + ∫₀¹ Δ·∇ log p_σ(y|x_τ) dτ
                  = log p_σ(y|x) + ∫₀¹ Δ·s_y(x_τ) dτ − ∫₀¹ Δ·∇ log p_σ(x_τ) dτ.

The last term does not depend on y, and the left side is normalised over y, so

    log p̂(·|x′) = log_softmax( log p(·|x) + I ),     I_y = Σ_q w_q Δ·s_y(x + τ_q Δ)

is exact for exact scores and an exact rule; the marginal score is never needed. The same argument bounds the
quadrature error by that on the POSTERIOR integrand f_y(τ) = Δ·∇ log p_σ(y|x_τ): the rule is linear and shared by
all classes, so with E_y its error on f_y, log p̂_y − log p_σ(y|x′) = E_y − log Σ_k p_σ(k|x′) e^{E_k}, which lies in
[E_y − max_k E_k, E_y − min_k E_k]: only class-to-class differences of the error count, a common part cancels (so
class scores linear in x, as for Gaussian classes, are integrated exactly by any rule, however curved the
posterior). With estimated scores the normalisation is exact by construction and
the renormalisation projects quadrature and network errors back onto the simplex; an estimated score field need not
be conservative, so the estimate then depends (slightly) on the path.

Quadrature (n points, nodes τ_q and weights w_q on [0, 1]; all points go through ONE batched call):

* ``"gauss-legendre"``: exact for polynomials of degree ≤ 2n − 1; error (n!)⁴/((2n+1)((2n)!)³)·f^(2n)(ξ), which
  decays geometrically in n for analytic f (Gaussian mixtures; smooth networks).
* ``"trapezoid"`` (n ≥ 2, h = 1/(n − 1)): error −h²/12·(f′(1) − f′(0)) + O(h⁴), i.e. O(n⁻²).

Anchors and label smoothing
---------------------------
The anchor supplies log p(·|x): a classifier's output, a closed form, or the label of a training image. An exact
one-hot label is degenerate: log 0 = −∞ plus any finite integral stays −∞, so p̂(·|x′) is the same one-hot vector at
every x′ and the data gradient vanishes (SCORE's target p_d(·|x′) collapses to Madry's p_d(·|x)). Use
:func:`anchor_log_probs` with smoothing α ∈ (0, 1): p = (1 − α)·onehot(y) + α/K, i.e. anchor log-odds
log((1 − α + α/K)/(α/K)) between the labelled class and each other class. The score integral moves these log-odds;
α sets how confident the clean point is assumed to be.

Trajectory mode (PGD)
---------------------
For a path x_0 = anchor, x_1, x_2, … (PGD iterates, the random start included), ``grad_log_posterior(x_t)`` makes
ONE batched call for s(x_t), caches it, and extends the integral with the trapezoid rule on the segment,

    log p̂(·|x_t) = log_softmax( log p̂(·|x_{t−1}) + ½ (s(x_{t−1}) + s(x_t))·(x_t − x_{t−1}) ),

whose error per segment is −f″(ξ)/12 with f the posterior integrand on that segment: third order in the step
length, so the path error is O(Σ_t ‖x_t − x_{t−1}‖³) (second order in the PGD step size for a fixed number of
steps). The first segment, anchor → PGD's random start, is usually the longest (ℓ∞ ball: ‖δ‖₂ ≈ ε·sqrt(D/3), against
α·sqrt(D) for a sign step) and so dominates the error; ``start_quadrature_points = n`` integrates it with n-point
Gauss–Legendre instead, inside the same single call (over (n + 1)·B·K inputs).

``log_posterior`` costs ZERO calls. At a point of the path it returns the stored value (per example, so PGD's
``keep_best`` selection of earlier iterates is exact). At a new point x (e.g. the final PGD iterate, which nobody
scores) it uses the left-point rule log_softmax(log p̂(·|x_t) + s(x_t)·(x − x_t)), error f′(ξ)/2 = O(‖x − x_t‖²),
without changing the state. This relies on ``datagrad.attach_log_posterior`` calling ``grad_log_posterior(x)``
before ``log_posterior(x)``; repeated calls on the same point never double-count. The object keeps the scores of
the last point ([B, K, D]) and every scored point with its log p̂ ([T, B, D] and [T, B, K]).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from einops import rearrange
from torch import Tensor

from .noise import check_noise_std

QUADRATURE_RULES = ("gauss-legendre", "trapezoid")


class ClassScoreModel(Protocol):
    """What a score-net posterior needs from its model (see the module docstring)."""

    num_classes: int
    forward_calls: int

    def class_scores(
        self, x: Tensor, noise_std: float, include_null: bool = False, max_batch: int | None = None
    ) -> Tensor:  # [B, K(+1), *x.shape[1:]]
        ...


def quadrature(rule: str, points: int) -> tuple[Tensor, Tensor]:
    """Nodes τ_q and weights w_q on [0, 1] (float64 [n] each) for Σ_q w_q f(τ_q) ≈ ∫₀¹ f(τ) dτ."""
    if rule not in QUADRATURE_RULES:
        raise ValueError(f"unknown quadrature rule {rule!r}; valid rules: {', '.join(QUADRATURE_RULES)}")
    minimum = 2 if rule == "trapezoid" else 1
    if int(points) != points or points < minimum:
        raise ValueError(f"{rule} quadrature needs an integer number of points >= {minimum}, got {points}")
    if rule == "gauss-legendre":
        nodes, weights = np.polynomial.legendre.leggauss(int(points))
        return torch.from_numpy((nodes + 1) / 2), torch.from_numpy(weights / 2)
    nodes = torch.linspace(0, 1, int(points), dtype=torch.float64)
    weights = torch.full_like(nodes, 1.0 / (points - 1))
    weights[[0, -1]] /= 2
    return nodes, weights


def anchor_log_probs(labels: Tensor, num_classes: int, smoothing: float = 0.1) -> Tensor:
    """log p for smoothed one-hot labels: p = (1 − α)·onehot(y) + α/K, α = ``smoothing`` ∈ (0, 1). [B, K] float64."""
    if not 0.0 < smoothing < 1.0:
        raise ValueError(
            f"smoothing must lie in (0, 1), got {smoothing}: an exact one-hot anchor (smoothing 0) is degenerate, "
            "since log 0 = −inf stays −inf along any path"
        )
    labels = torch.as_tensor(labels).long()
    message = f"labels must be a [B] tensor with values in [0, {num_classes})"
    if labels.dim() != 1:
        raise ValueError(f"{message}, got shape {tuple(labels.shape)}")
    require(((labels >= 0) & (labels < num_classes)).all(), message)
    rows = torch.arange(labels.numel(), device=labels.device)
    probs = torch.full((labels.numel(), num_classes), smoothing / num_classes, dtype=torch.float64, device=rows.device)
    probs[rows, labels] += 1.0 - smoothing
    return probs.log()


def require(condition: Tensor, message: str) -> None:
    """Raise ValueError(message) unless the boolean tensor ``condition`` is true, without a host-device sync:
    a CPU tensor is checked at once; on an accelerator the check is a device-side assertion that fails the next
    synchronising call (so validating a training batch never stalls the step)."""
    try:
        torch._assert_async(condition, message)
    except RuntimeError:
        raise ValueError(message) from None


def _centred(scores: Tensor, log_p: Tensor) -> Tensor:
    """G_y = s_y − Σ_k p_k s_k: scores [B, K, D], log_p [B, K] → [B, K, D]."""
    marginal = torch.einsum("bk,bkd->bd", log_p.exp().to(scores.dtype), scores)
    return scores - marginal.unsqueeze(1)


def _dot(scores: Tensor, displacement: Tensor) -> Tensor:
    """Δ·s_y for every class in float64: scores [B, K, D], displacement [B, D] → [B, K]."""
    return torch.einsum("bkd,bd->bk", scores.double(), displacement.double())


def _quadrature_sum(weights: Tensor, scores: Tensor, displacement: Tensor) -> Tensor:
    """Σ_q w_q Δ·s_y(x_q) in float64: weights [n], scores [n, B, K, D], displacement [B, D] → [B, K]."""
    weights = weights.to(device=scores.device, dtype=torch.float64)
    return torch.einsum("n,nbkd,bd->bk", weights, scores.double(), displacement.double())


class ScoreNetPosterior:
    """p_σ(y|x) tools on top of a class-conditional score model (see the module docstring).

    ``grad_log_posterior(x)`` works on its own (null-class marginal); ``log_posterior`` needs an anchor: use
    :meth:`anchored` or :meth:`trajectory`, which return full ``datagrad.DataPosterior`` objects. ``max_batch`` caps
    the UNet inputs per network call (a batched evaluation then takes several calls); None = one call.
    """

    def __init__(self, scorenet: ClassScoreModel, noise_std: float, max_batch: int | None = None):
        self.noise_std = check_noise_std(noise_std)
        if getattr(scorenet, "training", False):
            raise ValueError("scorenet is in training mode (dropout active); call scorenet.eval() first")
        schedule = getattr(scorenet, "schedule", None)
        if schedule is not None:
            schedule.sigma_to_t(self.noise_std)  # raises when σ is outside the trained range
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be a positive integer or None, got {max_batch}")
        self.scorenet = scorenet
        self.num_classes = int(scorenet.num_classes)
        self.max_batch = max_batch

    def scores(self, x: Tensor, include_null: bool = False) -> Tensor:
        """Flattened class-conditional scores s_y(x) (null class last if asked): [B, K(+1), D], one batched call."""
        with torch.no_grad():
            out = self.scorenet.class_scores(x, self.noise_std, include_null=include_null, max_batch=self.max_batch)
        return out.flatten(2)

    def grad_log_posterior(self, x: Tensor) -> Tensor:
        """∇_x log p_σ(y|x) ≈ s_y(x) − s_∅(x) (null-class marginal): [B, K, *x.shape[1:]], one call."""
        scores = self.scores(x, include_null=True)  # [B, K+1, D]
        grad = scores[:, : self.num_classes] - scores[:, self.num_classes :]
        return grad.reshape(x.shape[0], self.num_classes, *x.shape[1:]).to(x.dtype)

    def log_posterior(self, x: Tensor) -> Tensor:
        """Not available without an anchor: raises (see :meth:`anchored` and :meth:`trajectory`)."""
        raise ValueError(
            "log p_σ(y|x) from scores needs an anchor with a known label distribution: use "
            "ScoreNetPosterior.anchored(x_anchor, log_p_anchor) or .trajectory(x_anchor, log_p_anchor)"
        )

    def path_scores(self, x_from: Tensor, x_to: Tensor, taus: Tensor) -> Tensor:
        """s(x_from + τ(x_to − x_from)) at every τ in ``taus`` [n]: [n, B, K, D] from ONE batched call."""
        taus = taus.to(device=x_from.device, dtype=x_from.dtype).view(-1, 1, *([1] * (x_from.dim() - 1)))
        points = x_from.unsqueeze(0) + taus * (x_to - x_from).unsqueeze(0)  # [n, B, ...]
        scores = self.scores(rearrange(points, "n b ... -> (n b) ..."))
        return rearrange(scores, "(n b) k d -> n b k d", n=taus.shape[0])

    def line_integral(
        self, x_from: Tensor, x_to: Tensor, quadrature_points: int = 8, rule: str = "gauss-legendre"
    ) -> Tensor:
        """I_y = Σ_q w_q Δ·s_y(x_from + τ_q Δ) ≈ log p_σ(x_to|y) − log p_σ(x_from|y): [B, K] float64, one call."""
        _check_same_shape(x_from, x_to)
        nodes, weights = quadrature(rule, quadrature_points)
        scores = self.path_scores(x_from, x_to, nodes)  # [n, B, K, D]
        return _quadrature_sum(weights, scores, (x_to - x_from).flatten(1))

    def anchored(
        self, x_anchor: Tensor, log_p_anchor: Tensor, quadrature_points: int = 8, rule: str = "gauss-legendre"
    ) -> AnchoredPosterior:
        """A DataPosterior whose log p̂(·|x) is the straight-line integral from the anchor (one call per x)."""
        return AnchoredPosterior(self, x_anchor, log_p_anchor, quadrature_points, rule)

    def trajectory(
        self, x_anchor: Tensor, log_p_anchor: Tensor, start_quadrature_points: int = 0
    ) -> TrajectoryPosterior:
        """A stateful DataPosterior for a path starting at the anchor (makes one call now, at the anchor)."""
        return TrajectoryPosterior(self, x_anchor, log_p_anchor, start_quadrature_points)


def _check_same_shape(reference: Tensor, x: Tensor) -> None:
    if x.shape != reference.shape:
        raise ValueError(f"points must have the anchor's shape {tuple(reference.shape)}, got {tuple(x.shape)}")


def _check_anchor(source: ScoreNetPosterior, x_anchor: Tensor, log_p_anchor: Tensor) -> Tensor:
    """Validate the anchor; return its normalised log-probabilities [B, K] in float64."""
    expected = (x_anchor.shape[0], source.num_classes)
    if tuple(log_p_anchor.shape) != expected:
        raise ValueError(f"log_p_anchor must have shape {expected}, got {tuple(log_p_anchor.shape)}")
    require(
        torch.isfinite(log_p_anchor).all(),
        "log_p_anchor must be finite: a zero-probability class (e.g. an exact one-hot label) stays at zero along any "
        "path; use anchor_log_probs(labels, num_classes, smoothing) with smoothing > 0",
    )
    return log_p_anchor.double().to(x_anchor.device).log_softmax(dim=1)


class AnchoredPosterior:
    """DataPosterior: log p̂(·|x) = log_softmax(log p(·|x_a) + I(x_a → x)); gradient s_y − Σ_k p̂_k s_k.

    ``log_posterior(x)``: one call over n·B·K inputs. ``grad_log_posterior(x)``: one call over (n+1)·B·K inputs (the
    quadrature nodes plus x itself; n·B·K when the rule already has the node τ = 1); it also stores log p̂(·|x),
    so the ``log_posterior(x)`` that ``attach_log_posterior`` makes next on the same x costs nothing.
    """

    def __init__(
        self, source: ScoreNetPosterior, x_anchor: Tensor, log_p_anchor: Tensor, quadrature_points: int, rule: str
    ):
        self.source = source
        self.num_classes = source.num_classes
        self.log_p_anchor = _check_anchor(source, x_anchor, log_p_anchor)  # [B, K] float64
        self.x_anchor = x_anchor.detach().clone()
        self.nodes, self.weights = quadrature(rule, quadrature_points)
        self._last: tuple[Tensor, Tensor] | None = None  # (x, log p̂(·|x)) from the last gradient call

    def log_posterior(self, x: Tensor) -> Tensor:
        """log p̂(y|x): [B, K] in x's dtype."""
        _check_same_shape(self.x_anchor, x)
        if self._last is not None and torch.equal(self._last[0], x):
            return self._last[1].to(x.dtype)
        scores = self.source.path_scores(self.x_anchor, x, self.nodes)
        return self._integrate(x, scores).to(x.dtype)

    def grad_log_posterior(self, x: Tensor) -> Tensor:
        """∇_x log p̂(y|x) = s_y(x) − Σ_k p̂(k|x) s_k(x): [B, K, *x.shape[1:]]."""
        _check_same_shape(self.x_anchor, x)
        has_endpoint = bool(self.nodes[-1] == 1)
        taus = self.nodes if has_endpoint else torch.cat([self.nodes, self.nodes.new_ones(1)])
        scores = self.source.path_scores(self.x_anchor, x, taus)  # [n(+1), B, K, D]
        log_p = self._integrate(x, scores[: len(self.nodes)])
        self._last = (x.detach().clone(), log_p)
        return _centred(scores[-1], log_p).reshape(x.shape[0], self.num_classes, *x.shape[1:]).to(x.dtype)

    def _integrate(self, x: Tensor, scores: Tensor) -> Tensor:
        integral = _quadrature_sum(self.weights, scores, (x - self.x_anchor).flatten(1))
        return (self.log_p_anchor + integral).log_softmax(dim=1)  # [B, K] float64


class TrajectoryPosterior:
    """Stateful DataPosterior along a path from the anchor (trapezoid rule on each segment; module docstring).

    Calls: one at construction (the anchor), one per ``grad_log_posterior`` on a new point, none for
    ``log_posterior``. With ``start_quadrature_points = n > 0`` the first segment (anchor → x_0, PGD's random start,
    usually the longest) uses n-point Gauss–Legendre instead, still in ONE call, over (n + 1)·B·K inputs.

    Host syncs: one per ``grad_log_posterior`` (``torch.equal``: is x the last point? then no call is made); nothing
    else reads a value back, so a direct-SCORE step with PGD-K makes K syncs, each next to a UNet call over B·K
    inputs. Dropping it would cost a UNet call on every repeated point.
    """

    def __init__(
        self, source: ScoreNetPosterior, x_anchor: Tensor, log_p_anchor: Tensor, start_quadrature_points: int = 0
    ):
        self.source = source
        self.num_classes = source.num_classes
        log_p = _check_anchor(source, x_anchor, log_p_anchor)
        self._start_rule = quadrature("gauss-legendre", start_quadrature_points) if start_quadrature_points else None
        self._x = x_anchor.detach().clone()  # last scored point
        self._scores = source.scores(self._x)  # [B, K, D] at self._x
        self._log_p = log_p  # [B, K] float64 at self._x
        self._points = [self._x.flatten(1)]  # scored points, [B, D] each
        self._log_ps = [log_p]  # their log p̂, [B, K] each

    def grad_log_posterior(self, x: Tensor) -> Tensor:
        """Extend the path to x (one call unless x is the last point): [B, K, *x.shape[1:]]."""
        _check_same_shape(self._x, x)
        if not torch.equal(x, self._x):
            displacement = (x - self._x).flatten(1)
            if self._start_rule is not None and len(self._points) == 1:
                nodes, weights = self._start_rule
                path = self.source.path_scores(self._x, x, torch.cat([nodes, nodes.new_ones(1)]))  # [n+1, B, K, D]
                increment = _quadrature_sum(weights, path[:-1], displacement)
                scores = path[-1]
            else:
                scores = self.source.scores(x)  # [B, K, D]
                increment = _dot(self._scores + scores, displacement) / 2
            self._log_p = (self._log_p + increment).log_softmax(dim=1)
            self._x, self._scores = x.detach().clone(), scores
            self._points.append(self._x.flatten(1))
            self._log_ps.append(self._log_p)
        return _centred(self._scores, self._log_p).reshape(x.shape[0], self.num_classes, *x.shape[1:]).to(x.dtype)

    def log_posterior(self, x: Tensor) -> Tensor:
        """log p̂(y|x) with zero calls: stored value at path points (per example), else the left-point rule."""
        _check_same_shape(self._x, x)
        flat = x.flatten(1)
        log_p = (self._log_p + _dot(self._scores, flat - self._x.flatten(1))).log_softmax(dim=1)  # [B, K]
        matches = (torch.stack(self._points) == flat.unsqueeze(0)).all(dim=2)  # [T, B]
        steps = torch.arange(len(self._points), device=x.device).unsqueeze(1)
        latest = torch.where(matches, steps, -1).amax(dim=0)  # [B], −1 where x_b is not on the path
        stored = torch.stack(self._log_ps)[latest.clamp(min=0), torch.arange(x.shape[0], device=x.device)]
        return torch.where((latest >= 0).unsqueeze(1), stored, log_p).to(x.dtype)  # no branch: no host sync
