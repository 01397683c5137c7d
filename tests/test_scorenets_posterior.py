"""ScoreNetPosterior with EXACT scores plugged in: line integrals, anchored and trajectory posteriors vs closed forms.

Two exact score models back the posterior (both built on ``datagrad.GaussianMixture.score``):

* ``PlainScores``: a 3-class isotropic Gaussian mixture. Its class scores are linear in x, so every quadrature
  rule is exact for the class-conditional integrals and the estimate must match the closed form to rounding.
* ``GroupedScores``: 3 classes, each a 2-component Gaussian mixture. Class scores are non-linear, so quadrature
  errors show and their order can be measured. The closed-form log p_σ(y|x) groups the components.
"""

import itertools
import math

import pytest
import torch
from torch import nn

from datagrad import DataPosterior, GaussianMixture, attach_log_posterior, pgd, self_consistent_distance
from scorenets import ScoreNet, ScoreNetPosterior, anchor_log_probs, quadrature

SIGMA = 0.1
SHAPE = (1, 4, 4)


class PlainScores:
    """Exact class scores ∇ log p_σ(x|y) of a GaussianMixture; counts calls like ScoreNet.forward_calls."""

    training = False

    def __init__(self, seed=0):
        gen = torch.Generator().manual_seed(seed)
        means = 0.5 + 0.06 * torch.randn(3, 16, generator=gen, dtype=torch.float64)
        self.mixture = GaussianMixture(means, [0.1, 0.12, 0.08], [0.5, 0.3, 0.2], event_shape=SHAPE)
        self.num_classes, self.forward_calls, self.inputs = 3, 0, []

    def class_scores(self, x, noise_std, include_null=False, max_batch=None):
        self.forward_calls += 1
        self.inputs.append(x.shape[0] * (self.num_classes + include_null))
        labels = range(self.num_classes)
        scores = [self.mixture.score(x, torch.full((x.shape[0],), k), noise_std) for k in labels]
        if include_null:
            scores.append(self.mixture.score(x, None, noise_std))
        return torch.stack(scores, dim=1)

    def log_posterior(self, x, noise_std):
        return self.mixture.log_posterior(x, noise_std)

    def sample(self, n, seed):
        return self.mixture.sample(n, torch.Generator().manual_seed(seed), dtype=torch.float64)[0]


class GroupedScores(PlainScores):
    """Class y = components {2y, 2y+1} of a 6-component mixture: s_y = Σ_{j∈y} p(j|x, y) s_j."""

    def __init__(self, seed=0):
        gen = torch.Generator().manual_seed(seed)
        means = 0.5 + 0.08 * torch.randn(6, 16, generator=gen, dtype=torch.float64)
        self.mixture = GaussianMixture(means, [0.06, 0.1, 0.08, 0.07, 0.09, 0.05], [1 / 6] * 6, event_shape=SHAPE)
        self.num_classes, self.forward_calls, self.inputs = 3, 0, []

    def class_scores(self, x, noise_std, include_null=False, max_batch=None):
        self.forward_calls += 1
        self.inputs.append(x.shape[0] * (self.num_classes + include_null))
        within = self.mixture.log_joint(x, noise_std).view(-1, 3, 2).softmax(dim=2)  # p(j | x, y): [B, 3, 2]
        components = torch.stack(
            [self.mixture.score(x, torch.full((x.shape[0],), j), noise_std) for j in range(6)], dim=1
        ).view(x.shape[0], 3, 2, *x.shape[1:])
        scores = torch.einsum("byj,byj...->by...", within, components)
        if include_null:
            scores = torch.cat([scores, self.mixture.score(x, None, noise_std).unsqueeze(1)], dim=1)
        return scores

    def log_posterior(self, x, noise_std):
        return self.mixture.log_joint(x, noise_std).view(-1, 3, 2).logsumexp(dim=2).log_softmax(dim=1)


def closed_form_grad(model, x, noise_std):
    """∇_x log p_σ(y|x) for every class by autograd through the closed form: [B, K, *x.shape[1:]]."""
    x = x.detach().requires_grad_(True)
    log_p = model.log_posterior(x, noise_std)
    rows = [torch.autograd.grad(log_p[:, k].sum(), x, retain_graph=True)[0] for k in range(model.num_classes)]
    return torch.stack(rows, dim=1)


def segment(model, seed=1, radius=0.1):
    x = model.sample(16, seed)
    delta = radius * (2 * torch.rand(x.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=x.dtype) - 1)
    return x, x + delta


# -- quadrature and anchors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_gauss_legendre_is_exact_to_degree_2n_minus_1(n):
    nodes, weights = quadrature("gauss-legendre", n)
    for degree in range(2 * n):
        assert float((weights * nodes**degree).sum()) == pytest.approx(1 / (degree + 1), abs=1e-14)
    assert abs(float((weights * nodes ** (2 * n)).sum()) - 1 / (2 * n + 1)) > 1e-6


def test_trapezoid_error_on_a_quadratic():
    for n in [2, 3, 9]:
        nodes, weights = quadrature("trapezoid", n)
        h = 1 / (n - 1)
        assert float((weights * nodes).sum()) == pytest.approx(0.5, abs=1e-14)
        assert float((weights * nodes**2).sum()) - 1 / 3 == pytest.approx(h**2 / 6, abs=1e-14)
    with pytest.raises(ValueError, match="points >= 2"):
        quadrature("trapezoid", 1)
    with pytest.raises(ValueError, match="unknown quadrature"):
        quadrature("simpson", 5)


def test_anchor_log_probs():
    log_p = anchor_log_probs(torch.tensor([2, 0]), 4, smoothing=0.2)
    torch.testing.assert_close(log_p.exp().sum(1), torch.ones(2, dtype=torch.float64))
    assert float(log_p[0, 2].exp()) == pytest.approx(0.8 + 0.05) and float(log_p[0, 1].exp()) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="degenerate"):
        anchor_log_probs(torch.tensor([0]), 4, smoothing=0.0)
    with pytest.raises(ValueError, match="labels"):
        anchor_log_probs(torch.tensor([4]), 4)


def test_bad_anchors_and_sigma_raise():
    model = PlainScores()
    x = model.sample(2, 0)
    with pytest.raises(ValueError, match="noise_std"):
        ScoreNetPosterior(model, 0.0)
    posterior = ScoreNetPosterior(model, SIGMA)
    with pytest.raises(ValueError, match="finite"):
        posterior.anchored(x, torch.log(torch.tensor([[1.0, 0.0, 0.0]] * 2)))
    with pytest.raises(ValueError, match="shape"):
        posterior.trajectory(x, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="anchor"):
        posterior.log_posterior(x)


# -- line integrals on straight segments ------------------------------------------------------------------------
def test_line_integral_is_the_class_log_likelihood_difference():
    model = PlainScores()
    x, x_new = segment(model)
    integral = ScoreNetPosterior(model, SIGMA).line_integral(x, x_new, quadrature_points=1)
    expected = model.mixture.log_likelihood(x_new, SIGMA) - model.mixture.log_likelihood(x, SIGMA)
    torch.testing.assert_close(integral, expected, rtol=1e-12, atol=1e-10)


def test_gaussian_classes_are_integrated_exactly_by_any_rule():
    """Linear class scores: even the 1-point rule gives the exact posterior (the marginal score cancels)."""
    model = PlainScores()
    x, x_new = segment(model)
    for rule, n in [("gauss-legendre", 1), ("trapezoid", 2)]:
        anchored = ScoreNetPosterior(model, SIGMA).anchored(x, model.log_posterior(x, SIGMA), n, rule)
        torch.testing.assert_close(anchored.log_posterior(x_new), model.log_posterior(x_new, SIGMA),
                                   rtol=0, atol=1e-10)


def quadrature_errors(rule, counts):
    model = GroupedScores()
    x, x_new = segment(model)
    posterior = ScoreNetPosterior(model, SIGMA)
    truth = model.log_posterior(x_new, SIGMA)
    assert float((truth - model.log_posterior(x, SIGMA)).abs().max()) > 1.0  # the posterior really moves
    return [
        float((posterior.anchored(x, model.log_posterior(x, SIGMA), n, rule).log_posterior(x_new) - truth).abs().max())
        for n in counts
    ]


def test_trapezoid_line_integral_converges_at_second_order():
    counts = [5, 9, 17, 33]  # h = 1/4 … 1/32
    errors = quadrature_errors("trapezoid", counts)
    orders = [math.log2(a / b) for a, b in itertools.pairwise(errors)]
    assert all(1.9 < order < 2.1 for order in orders), (errors, orders)


def test_gauss_legendre_line_integral_converges_geometrically():
    errors = quadrature_errors("gauss-legendre", [1, 2, 3, 4, 6, 10])
    assert all(b < a / 5 for a, b in itertools.pairwise(errors[:5])), errors  # each extra node gains ≥ 5×
    assert errors[-1] < 1e-3 * errors[-2] and errors[-1] < 1e-9, errors  # 4 more nodes gain ≥ 1000×


# -- anchored posterior -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scores", [PlainScores, GroupedScores])
def test_anchored_posterior_matches_the_closed_form(scores):
    model = scores()
    x, x_new = segment(model)
    anchored = ScoreNetPosterior(model, SIGMA).anchored(x, model.log_posterior(x, SIGMA), quadrature_points=12)
    assert isinstance(anchored, DataPosterior) and anchored.num_classes == 3

    grad = anchored.grad_log_posterior(x_new)  # one call over (n + 1)·B·K inputs
    assert model.forward_calls == 1 and model.inputs == [13 * 16 * 3]
    torch.testing.assert_close(grad, closed_form_grad(model, x_new, SIGMA), rtol=1e-7, atol=1e-7)
    if scores is PlainScores:
        torch.testing.assert_close(grad, model.mixture.grad_log_posterior(x_new, SIGMA), rtol=1e-9, atol=1e-9)

    log_p = anchored.log_posterior(x_new)  # reuses the value computed with the gradient
    assert model.forward_calls == 1
    torch.testing.assert_close(log_p, model.log_posterior(x_new, SIGMA), rtol=0, atol=1e-9)
    torch.testing.assert_close(anchored.log_posterior(x_new.clone() + 0.0), log_p, rtol=0, atol=0)

    anchored.log_posterior(x)  # a different point: one call over n·B·K inputs
    assert model.forward_calls == 2 and model.inputs[-1] == 12 * 16 * 3
    trapezoid = ScoreNetPosterior(model, SIGMA).anchored(x, model.log_posterior(x, SIGMA), 9, "trapezoid")
    trapezoid.grad_log_posterior(x_new)  # τ = 1 is already a node: no extra point
    assert model.inputs[-1] == 9 * 16 * 3


def test_null_class_gradient_is_exact_for_exact_scores():
    model = GroupedScores()
    x = model.sample(8, 3)
    grad = ScoreNetPosterior(model, SIGMA).grad_log_posterior(x)
    assert model.forward_calls == 1 and model.inputs == [8 * 4]
    torch.testing.assert_close(grad, closed_form_grad(model, x, SIGMA), rtol=1e-8, atol=1e-8)


def test_attach_log_posterior_gives_the_centred_closed_form_gradient():
    model = GroupedScores()
    x, x_new = segment(model)
    anchored = ScoreNetPosterior(model, SIGMA).anchored(x, model.log_posterior(x, SIGMA), quadrature_points=12)
    x_new.requires_grad_(True)
    weights = torch.rand(16, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (grad,) = torch.autograd.grad((attach_log_posterior(anchored, x_new) * weights).sum(), x_new)
    assert model.forward_calls == 1  # gradient then value on the same x: one call in all
    exact = torch.einsum("bk,bk...->b...", weights, closed_form_grad(model, x_new, SIGMA))
    torch.testing.assert_close(grad, exact, rtol=1e-7, atol=1e-7)


# -- trajectory mode along a PGD path -----------------------------------------------------------------------------
def trapezoid_bound(model, start, end, left_point=False):
    """Bound on the error a segment adds to every log p̂_y (oscillation over classes of the quadrature error).

    With f_y(τ) = d/dτ log p_σ(y | start + τ(end − start)), the trapezoid error is −f_y″(ξ)/12 and the left-point
    error f_y′(ξ)/2; log_softmax turns per-class errors E_y into errors within [min E, max E] of each other, so each
    segment adds at most 2·max_y |E_y|. Derivatives of log p_σ(y|·) come from finite differences of the closed form.
    """
    steps = 400
    taus = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    points = start.unsqueeze(0) + taus.view(-1, 1, 1, 1, 1) * (end - start).unsqueeze(0)  # [M+1, B, ...]
    log_p = model.log_posterior(points.flatten(0, 1), SIGMA).view(steps + 1, start.shape[0], -1)
    order = 2 if left_point else 3
    derivative = log_p.diff(n=order, dim=0) * steps**order  # f′ (left point) or f″ (trapezoid): [M+1−k, B, K]
    factor = 1 / 2 if left_point else 1 / 12
    return 2 * factor * derivative.abs().amax(dim=(0, 2))  # [B]


def linear_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).double()


def run_pgd(model, start_quadrature_points=0):
    """ℓ∞ PGD (ε = 8/255, α = 2/255, 8 steps, random start, keep_best) on a SCORE KL loss backed by a trajectory."""
    classifier, x = linear_model(), model.sample(16, 7)
    trajectory = ScoreNetPosterior(model, SIGMA).trajectory(x, model.log_posterior(x, SIGMA), start_quadrature_points)
    assert model.forward_calls == 1 and isinstance(trajectory, DataPosterior)  # one call: the anchor
    visited = []  # (point, requires_grad, calls made by this loss evaluation)

    def loss_fn(x_adv):
        calls = model.forward_calls
        loss = self_consistent_distance(classifier, x_adv, trajectory, "kl")
        visited.append((x_adv.detach().clone(), x_adv.requires_grad, model.forward_calls - calls))
        return loss

    best = pgd(loss_fn, x, eps=8 / 255, step_size=2 / 255, steps=8, norm="linf", random_start=True,
               generator=torch.Generator().manual_seed(8), keep_best=True)
    assert [(requires_grad, calls) for _, requires_grad, calls in visited] == [(True, 1)] * 8 + [(False, 0)]
    assert model.forward_calls == 9
    return trajectory, [x] + [point for point, _, _ in visited], best


def test_trajectory_is_exact_for_gaussian_classes():
    model = PlainScores()
    trajectory, points, _ = run_pgd(model)
    for point in points[1:-1]:  # linear class scores: the trapezoid rule is exact on every segment
        torch.testing.assert_close(trajectory.log_posterior(point), model.log_posterior(point, SIGMA),
                                   rtol=0, atol=1e-10)
        torch.testing.assert_close(trajectory.grad_log_posterior(point), model.mixture.grad_log_posterior(point, SIGMA),
                                   rtol=0, atol=1e-8)


def test_trajectory_along_pgd_stays_within_the_trapezoid_error_bound():
    model = GroupedScores()
    trajectory, points, best = run_pgd(model)
    calls = model.forward_calls

    # error budget: trapezoid on every scored segment, plus the left-point rule for the unscored final iterate
    budget = torch.cumsum(torch.stack([trapezoid_bound(model, a, b) for a, b in itertools.pairwise(points[:-1])]), 0)
    budget = torch.cat([budget, (budget[-1] + trapezoid_bound(model, points[-2], points[-1], left_point=True))[None]])
    for point, bound in zip(points[1:], budget, strict=True):
        error = (trajectory.log_posterior(point) - model.log_posterior(point, SIGMA)).abs().amax(dim=1)  # [B]
        assert bool((error <= bound).all()), (error, bound)
    # the test has teeth: the bound is small, and far below the error of a frozen (Madry-like) anchor posterior
    frozen_error = (model.log_posterior(points[-1], SIGMA) - model.log_posterior(points[0], SIGMA)).abs().amax()
    assert float(budget[-1].max()) < 0.05 and float(frozen_error) > 20 * float(budget[-1].max())

    # PGD's keep_best mixes iterates per example: each example gets the value stored for its own iterate
    expected = torch.stack([trajectory.log_posterior(point) for point in points[1:]])  # [T, B, K]
    pick = torch.arange(16) % len(expected)  # an iterate per example, the unscored final one included
    mixed = torch.stack([points[1 + int(t)][b] for b, t in enumerate(pick)])
    torch.testing.assert_close(trajectory.log_posterior(mixed), expected[pick, torch.arange(16)], rtol=0, atol=0)
    chosen = torch.stack([(point == best).flatten(1).all(1) for point in points[1:]])  # [T, B]
    latest = torch.where(chosen, torch.arange(len(expected)).unsqueeze(1), -1).amax(0)
    assert bool((latest >= 0).all())
    torch.testing.assert_close(trajectory.log_posterior(best), expected[latest, torch.arange(16)], rtol=0, atol=0)

    # repeated calls on the last scored point neither call the model nor double-count
    last = points[-2]
    before = trajectory.log_posterior(last)
    torch.testing.assert_close(trajectory.grad_log_posterior(last), closed_form_grad(model, last, SIGMA),
                               rtol=0, atol=0.05)
    torch.testing.assert_close(trajectory.log_posterior(last), before, rtol=0, atol=0)
    assert model.forward_calls == calls


def test_gauss_legendre_start_segment_removes_the_dominant_error():
    model = GroupedScores()
    trajectory, points, _ = run_pgd(model, start_quadrature_points=4)
    assert model.inputs[:3] == [16 * 3, 5 * 16 * 3, 16 * 3]  # anchor; start: 4 nodes + endpoint; then 1 point
    start_error = (trajectory.log_posterior(points[1]) - model.log_posterior(points[1], SIGMA)).abs().max()
    trapezoid_start = trapezoid_bound(model, points[0], points[1]).max()
    assert float(start_error) < 1e-3 * float(trapezoid_start), (start_error, trapezoid_start)


# -- a real (tiny, untrained) ScoreNet behind the posterior -------------------------------------------------------
def test_scorenet_backs_the_posterior_with_one_batched_call_per_gradient():
    torch.manual_seed(0)
    net = ScoreNet.build("tiny8", 3, (1, 8, 8), block_out_channels=(8, 16), norm_num_groups=8)
    with pytest.raises(ValueError, match="eval"):
        ScoreNetPosterior(net, SIGMA)
    net.eval()
    with pytest.raises(ValueError, match="outside the schedule"):
        ScoreNetPosterior(net, 1e-4)
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    posterior = ScoreNetPosterior(net, SIGMA)
    trajectory = posterior.trajectory(x, anchor_log_probs(torch.tensor([0, 1, 2, 0]), 3, smoothing=0.1))
    assert net.forward_calls == 1
    x_next = (x + 0.01).clamp(0, 1)
    grad = trajectory.grad_log_posterior(x_next)
    log_p = trajectory.log_posterior(x_next)
    assert grad.shape == (4, 3, 1, 8, 8) and log_p.shape == (4, 3) and net.forward_calls == 2
    assert log_p.dtype == x.dtype and bool(torch.isfinite(log_p).all())
    torch.testing.assert_close(log_p.exp().sum(1), torch.ones(4))
    centred = torch.einsum("bk,bk...->b...", log_p.exp(), grad)  # Σ_y p̂_y G_y = 0 by construction
    assert float(centred.abs().max()) < 1e-4 * float(grad.abs().max())
    assert posterior.grad_log_posterior(x).shape == (4, 3, 1, 8, 8) and net.forward_calls == 3
