"""datagrad.smoothing (Theorem 5): the three dR_G/dσ estimators against a closed form (a linear-logistic model on the
1-D seed mixture, R_G(σ) by Gauss–Hermite quadrature and its σ- and variance-derivatives by autograd through it), the
acceptance check (both sides within 2 % and within the Monte-Carlo interval on an exact 2-D mixture), the control
variate, and bad input."""

import numpy as np
import pytest
import torch

import datagrad as dg

THREE_CLASSES = dg.GaussianMixture([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]], [1.0, 0.8, 1.2], [0.5, 0.3, 0.2])
W, B = 0.8, -1.3  # p_θ(y=1|x) = sigmoid(W x + B)


def linear_logistic() -> torch.nn.Module:
    model = torch.nn.Linear(1, 2).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.0], [W]]))
        model.bias.copy_(torch.tensor([0.0, B]))
    return model


def quadrature_risk(noise_variance: torch.Tensor) -> torch.Tensor:
    """R_G = Σ_y π_y E_{x~N(μ_y, s_y² + v)} softplus(∓(Wx + B)) by 80-node Gauss–Hermite (probabilists')."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    nodes, weights = torch.tensor(nodes), torch.tensor(weights) / np.sqrt(2 * np.pi)
    mixture, total = dg.seed_toy(), 0.0
    for label, (mean, std, prior) in enumerate(zip(mixture.means[:, 0], mixture.stds, mixture.priors, strict=True)):
        z = W * (mean + torch.sqrt(std**2 + noise_variance) * nodes) + B
        total = total + prior * (weights * torch.nn.functional.softplus(-z if label == 1 else z)).sum()
    return total


def draw(mixture, n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x0, y = mixture.sample(n, generator, dtype=torch.float64)
    return x0, y, torch.randn(x0.shape, generator=generator, dtype=torch.float64)


def estimates(model, mixture, sigma, n, seed=0):
    x0, y, noise = draw(mixture, n, seed)
    score = lambda x, labels: mixture.score(x, labels, sigma)
    samples = dg.gaussian_risk_samples(model, x0, y, noise, sigma, score, 1e-3 * sigma)
    return samples, dg.smoothing_estimates(samples, sigma)


@pytest.mark.parametrize("sigma", [0.5, 1.0])
def test_estimators_match_the_closed_form(sigma):
    std = torch.tensor(sigma, dtype=torch.float64, requires_grad=True)
    risk = quadrature_risk(std**2)
    (d_std,) = torch.autograd.grad(risk, std)  # dR_G/dσ
    variance = torch.tensor(sigma**2, dtype=torch.float64, requires_grad=True)
    (d_var,) = torch.autograd.grad(quadrature_risk(variance), variance)  # dR_G/ds, s = σ²
    _, result = estimates(linear_logistic(), dg.seed_toy(), sigma, 200_000)

    def within(estimate: dict, truth: float, z: float = 4.0) -> bool:
        return abs(estimate["mean"] - truth) <= z * estimate["stderr"]

    assert within(result["risk"], risk.item())
    for name in ("finite_difference", "pathwise", "score"):
        assert within(result["d_risk_d_std"][name], d_std.item()), name
        assert within(result["d_risk_d_var"][name], d_var.item()), name
    assert d_var.item() == pytest.approx(d_std.item() / (2 * sigma))  # the conventions differ by 2σ, not by ½
    per_var, per_std = result["d_risk_d_var"]["score"]["mean"], result["d_risk_d_std"]["score"]["mean"]
    assert per_var == pytest.approx(per_std / (2 * sigma))


def tanh_mlp() -> torch.nn.Module:
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()
    with torch.no_grad():
        model[2].weight.mul_(3)  # a confident model: the derivative is large next to the sampling noise
    return model


@pytest.mark.parametrize("sigma", [0.1, 1.0])
def test_theorem5_sides_agree_within_two_percent_on_a_mixture(sigma):
    """Acceptance: exact class scores; finite difference of R_G vs σ·E[∇log p_θ·∇log p^σ(x|y)]."""
    _, result = estimates(tanh_mlp(), THREE_CLASSES, sigma, 300_000)
    assert result["relative_error"] < 0.02
    assert result["agree_within_interval"]
    paired = result["paired_d_risk_d_std"]["score_minus_finite_difference"]
    assert paired["stderr"] < 0.01 * abs(result["d_risk_d_std"]["score"]["mean"])  # resolves a 2 % discrepancy


def test_control_variate_keeps_the_mean_and_cuts_the_noise_at_small_sigma():
    samples, result = estimates(tanh_mlp(), THREE_CLASSES, 0.1, 100_000)
    raw = dg.MeanEstimate.of(samples["finite_difference"])
    adjusted = result["d_risk_d_std"]["finite_difference"]
    assert abs(raw.mean - adjusted["mean"]) <= 4 * raw.stderr
    assert adjusted["stderr"] < raw.stderr / 4
    assert abs(dg.MeanEstimate.of(samples["control"]).mean) <= 4 * dg.MeanEstimate.of(samples["control"]).stderr


def test_mean_estimate_interval():
    estimate = dg.MeanEstimate.of(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert estimate.mean == 2.5 and estimate.stderr == pytest.approx(np.std([1, 2, 3, 4], ddof=1) / 2)
    assert estimate.interval(2.0) == pytest.approx((2.5 - 2 * estimate.stderr, 2.5 + 2 * estimate.stderr))


def test_bad_input_is_a_clear_error():
    x0, y, noise = draw(dg.seed_toy(), 8)
    model = linear_logistic()
    with pytest.raises(ValueError, match="sigma must be > 0"):
        dg.gaussian_risk_samples(model, x0, y, noise, 0.0, None, 1e-3)
    with pytest.raises(ValueError, match="0 < h < sigma"):
        dg.gaussian_risk_samples(model, x0, y, noise, 0.1, None, 0.2)
    with pytest.raises(ValueError, match="noise must have the shape"):
        dg.gaussian_risk_samples(model, x0, y, noise[:4], 0.1, None, 1e-3)
