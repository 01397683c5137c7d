"""Risk estimators and Theorem 1 / Corollary 1 on the seed toy, against an independent numpy brute force
that uses the toy's closed-form log-odds and evaluates every risk on the same grid of perturbations."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from datagrad import (
    PGD,
    GridSearch,
    check_corollary1,
    check_theorem1,
    intrinsic_risk,
    madry_risk,
    score_risk,
    seed_toy,
    standard_risk,
)

EPS, POINTS = 1.0, 801
# log p(y=1|x)/p(y=0|x) = log(1/5) + log N(x; 1, 1) − log N(x; −1, 2²) = −0.375x² + 1.25x + log(2/5) − 0.375
LOG_ODDS = (-0.375, 1.25, math.log(2 / 5) - 0.375)


def p_data(x: np.ndarray) -> np.ndarray:
    """p_d(y=1|x) of the seed toy from its closed-form log-odds."""
    a, b, c = LOG_ODDS
    return 1 / (1 + np.exp(-(a * x**2 + b * x + c)))


def two_class_distance(name: str, p1: np.ndarray, q1: np.ndarray) -> np.ndarray:
    """D(p || q) for two-class distributions given by p(y=1) and q(y=1)."""
    if name == "l1":
        return 2 * np.abs(p1 - q1)
    if name == "l2":
        return math.sqrt(2) * np.abs(p1 - q1)
    if name == "se":
        return 2 * (p1 - q1) ** 2
    if name == "kl":
        return p1 * np.log(p1 / q1) + (1 - p1) * np.log((1 - p1) / (1 - q1))
    raise ValueError(name)


def brute_force_risks(model, x: torch.Tensor, name: str, eps: float = EPS, points: int = POINTS) -> dict:
    """Per-example standard, Madry, SCORE and intrinsic risks by exhaustive search over x + linspace(−ε, ε)."""
    x_np = x[:, 0].numpy()
    z = x_np[:, None] + np.linspace(-eps, eps, points)[None, :]  # [B, P]
    with torch.no_grad():
        q_grid = model(torch.from_numpy(z.reshape(-1, 1))).softmax(1)[:, 1].reshape(z.shape).numpy()
        q_clean = model(x).softmax(1)[:, 1].numpy()
    p_clean, p_grid = p_data(x_np), p_data(z)
    return {
        "standard": two_class_distance(name, p_clean, q_clean),
        "madry": two_class_distance(name, p_clean[:, None], q_grid).max(1),
        "score": two_class_distance(name, p_grid, q_grid).max(1),
        "intrinsic": two_class_distance(name, p_clean[:, None], p_grid).max(1),
    }


def random_mlp(seed: int, output_scale: float) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2)).double()
    with torch.no_grad():
        model[-1].weight.mul_(output_scale)
    return model


def constant_model(prob1: float):
    """A 'model' predicting p_θ(y=1|x) = prob1 everywhere."""
    logits = torch.tensor([math.log(1 - prob1), math.log(prob1)], dtype=torch.float64)
    return lambda z: logits.expand(z.shape[0], 2)


@pytest.fixture
def toy_batch() -> torch.Tensor:
    return seed_toy().sample(24, generator=torch.Generator().manual_seed(0), dtype=torch.float64)[0]


@pytest.mark.parametrize("name", ["kl", "l1", "l2", "se"])
def test_standard_risk_matches_closed_form(toy_batch, name):
    toy, model = seed_toy(), random_mlp(1, 2.0)
    with torch.no_grad():
        q1 = model(toy_batch).softmax(1)[:, 1].numpy()
    p1 = p_data(toy_batch[:, 0].numpy())
    expected = two_class_distance(name, p1, q1)
    per_example = standard_risk(model, toy_batch, toy, name, reduction="none")
    assert per_example.shape == (24,)
    np.testing.assert_allclose(per_example.numpy(), expected, rtol=1e-9)
    np.testing.assert_allclose(standard_risk(model, toy_batch, toy, name).item(), expected.mean(), rtol=1e-9)


@pytest.mark.parametrize("name", ["l1", "l2", "kl"])
def test_grid_risks_match_brute_force(toy_batch, name):
    toy, model = seed_toy(), random_mlp(2, 3.0)
    grid = GridSearch(EPS, points=POINTS)
    expected = brute_force_risks(model, toy_batch, name)
    got = {
        "madry": madry_risk(model, toy_batch, toy, grid, name, reduction="none"),
        "score": score_risk(model, toy_batch, toy, grid, name, reduction="none"),
        "intrinsic": intrinsic_risk(toy_batch, toy, grid, name, reduction="none"),
    }
    for key, value in got.items():
        assert value.shape == (24,)
        np.testing.assert_allclose(value.numpy(), expected[key], rtol=1e-9, atol=1e-12, err_msg=key)
    # The maxima are not attained at x itself: the test distinguishes the risks from the standard one.
    assert (expected["score"] > expected["standard"] + 1e-3).any()


@pytest.mark.parametrize("name", ["l1", "l2"])
@pytest.mark.parametrize("seed, output_scale", [(3, 0.3), (4, 1.0), (5, 4.0)])
def test_theorem1_on_random_models(toy_batch, name, seed, output_scale):
    toy, model = seed_toy(), random_mlp(seed, output_scale)
    result = check_theorem1(model, toy_batch, toy, GridSearch(EPS, points=POINTS), name)
    expected = {key: value.mean() for key, value in brute_force_risks(model, toy_batch, name).items()}
    assert result.distance == name
    assert result.madry == pytest.approx(expected["madry"], rel=1e-9)
    assert result.score == pytest.approx(expected["score"], rel=1e-9)
    assert result.intrinsic == pytest.approx(expected["intrinsic"], rel=1e-9)
    assert result.lower_bound == pytest.approx(abs(expected["madry"] - expected["intrinsic"]), rel=1e-9)
    assert result.upper_bound == pytest.approx(expected["madry"] + expected["intrinsic"], rel=1e-9)
    assert result.lower_bound <= result.score <= result.upper_bound
    assert result.holds
    assert set(result.to_dict()) == {"distance", "madry", "score", "intrinsic", "lower_bound", "upper_bound", "holds"}


@pytest.mark.parametrize("name", ["l1", "l2"])
def test_theorem1_is_tight_in_the_extreme_cases(name):
    """Constant p_θ = p_d(x0): R_Madry = 0 and R_SCORE = C, both bounds attained. Constant p_θ below every
    p_d in the ball: R_SCORE = R_Madry + C (upper bound attained). p_θ = p_d: R_SCORE = 0 = |R_Madry − C|."""
    toy, grid = seed_toy(), GridSearch(EPS, points=POINTS)
    x0 = torch.tensor([[0.0]], dtype=torch.float64)
    at_x0 = check_theorem1(constant_model(float(p_data(np.array(0.0)))), x0, toy, grid, name)
    assert at_x0.madry == pytest.approx(0.0, abs=1e-12)
    assert at_x0.score == pytest.approx(at_x0.intrinsic, rel=1e-12)
    assert at_x0.score == pytest.approx(at_x0.lower_bound, rel=1e-12)
    assert at_x0.score == pytest.approx(at_x0.upper_bound, rel=1e-12)
    assert at_x0.intrinsic > 0.1

    below = check_theorem1(constant_model(0.01), x0, toy, grid, name)
    assert below.score == pytest.approx(below.upper_bound, rel=1e-12)
    assert below.score > below.lower_bound + 0.1 and below.holds

    exact = check_theorem1(lambda z: toy.log_posterior(z), torch.linspace(-3, 3, 7)[:, None].double(), toy, grid, name)
    assert exact.score == pytest.approx(0.0, abs=1e-12)
    assert exact.madry == pytest.approx(exact.intrinsic, rel=1e-12)
    assert exact.lower_bound == pytest.approx(0.0, abs=1e-12) and exact.holds


@pytest.mark.parametrize("seed, output_scale", [(6, 0.5), (7, 3.0)])
def test_corollary1(toy_batch, seed, output_scale):
    toy, model = seed_toy(), random_mlp(seed, output_scale)
    result = check_corollary1(model, toy_batch, toy, GridSearch(EPS, points=POINTS))
    l1 = {key: value.mean() for key, value in brute_force_risks(model, toy_batch, "l1").items()}
    madry_kl = brute_force_risks(model, toy_batch, "kl")["madry"].mean()
    assert result.score_l1 == pytest.approx(l1["score"], rel=1e-9)
    assert result.intrinsic_l1 == pytest.approx(l1["intrinsic"], rel=1e-9)
    assert result.madry_kl == pytest.approx(madry_kl, rel=1e-9)
    assert result.lhs == pytest.approx(abs(l1["score"] - l1["intrinsic"]), rel=1e-9)
    assert result.rhs == pytest.approx(math.sqrt(2 * madry_kl), rel=1e-9)
    assert result.madry_kl_floor == pytest.approx(l1["intrinsic"] ** 2 / 2, rel=1e-9)
    assert result.lhs <= result.rhs and result.holds


@pytest.mark.parametrize("name", ["kl", "l1", "l2", "se"])
def test_max_risks_dominate_the_standard_risk(toy_batch, name):
    """An odd-sized grid holds the offset 0, so each inner max is at least the value at x' = x."""
    toy, model, grid = seed_toy(), random_mlp(8, 2.0), GridSearch(0.5, points=101)
    standard = standard_risk(model, toy_batch, toy, name, reduction="none")
    assert (madry_risk(model, toy_batch, toy, grid, name, reduction="none") >= standard).all()
    assert (score_risk(model, toy_batch, toy, grid, name, reduction="none") >= standard).all()
    assert (intrinsic_risk(toy_batch, toy, grid, name, reduction="none") >= 0).all()


@pytest.mark.parametrize("maximizer", [GridSearch(0.0, points=3), PGD(0.0, 0.1, steps=3, clamp=None)])
@pytest.mark.parametrize("name", ["kl", "l1"])
def test_zero_radius_collapses_every_risk(toy_batch, maximizer, name):
    toy, model = seed_toy(), random_mlp(9, 2.0)
    standard = standard_risk(model, toy_batch, toy, name, reduction="none")
    torch.testing.assert_close(madry_risk(model, toy_batch, toy, maximizer, name, reduction="none"), standard)
    torch.testing.assert_close(score_risk(model, toy_batch, toy, maximizer, name, reduction="none"), standard)
    assert torch.equal(intrinsic_risk(toy_batch, toy, maximizer, name, reduction="none"), torch.zeros(24).double())


def test_pgd_risks_with_restarts_reach_the_grid_risks(toy_batch):
    """PGD (keep_best; SCORE and C attacked through the data gradient) never exceeds the exact grid maximum, and the
    best of a few random restarts reaches it (one run may stop at a local maximum, e.g. the far side of the V-shaped
    |p_d(y|x') − p_d(y|x)|)."""
    toy, model = seed_toy(), random_mlp(10, 1.0)
    grid = GridSearch(EPS, points=POINTS)
    attack = PGD(EPS, step_size=0.02, steps=100, clamp=None)
    risks = {
        "madry": lambda maximizer, generator: madry_risk(model, toy_batch, toy, maximizer, "l1", "none", generator),
        "score": lambda maximizer, generator: score_risk(model, toy_batch, toy, maximizer, "l1", "none", generator),
        "intrinsic": lambda maximizer, generator: intrinsic_risk(toy_batch, toy, maximizer, "l1", "none", generator),
    }
    for name, risk in risks.items():
        exact = risk(grid, None)
        runs = torch.stack([risk(attack, torch.Generator().manual_seed(seed)) for seed in range(6)])  # [6, B]
        assert (runs <= exact + 1e-6).all(), name
        torch.testing.assert_close(runs.max(0).values, exact, rtol=0, atol=1e-4, msg=name)


def test_bad_arguments_raise(toy_batch):
    toy, model, grid = seed_toy(), random_mlp(11, 1.0), GridSearch(EPS, points=5)
    for name in ("kl", "se"):
        with pytest.raises(ValueError, match="Theorem 1 needs a metric"):
            check_theorem1(model, toy_batch, toy, grid, name)
    with pytest.raises(ValueError, match="unknown reduction 'sum'"):
        standard_risk(model, toy_batch, toy, "kl", reduction="sum")
    with pytest.raises(ValueError, match="unknown reduction"):
        score_risk(model, toy_batch, toy, grid, "kl", reduction="max")
    with pytest.raises(ValueError, match="unknown distance"):
        madry_risk(model, toy_batch, toy, grid, "linf")
    with pytest.raises(ValueError, match="class-count mismatch"):
        standard_risk(nn.Linear(1, 3).double(), toy_batch, toy)
