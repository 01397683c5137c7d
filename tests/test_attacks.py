"""PGD and the exhaustive 1-D grid: PGD reaches the grid's maximum where it should, iterates stay feasible,
closed-form optima of linear losses, random starts, reproducibility, and input validation."""

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from datagrad import PGD, GridSearch, pgd, seed_toy, self_consistent_distance, uniform_in_ball, update_best


def concave_bumps(centres: torch.Tensor):
    """ℓ_i(z) = −(z − c_i)² + 0.05 sin(5z): strictly concave (ℓ'' ≤ −0.75), so PGD cannot get stuck."""
    return lambda z: -(z[:, 0] - centres).pow(2) + 0.05 * torch.sin(5 * z[:, 0])


def tanh_mlp(dims: list[int]) -> nn.Sequential:
    layers = []
    for fan_in, fan_out in itertools.pairwise(dims):
        layers += [nn.Linear(fan_in, fan_out), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).double()


def test_pgd_reaches_the_grid_maximum_of_a_concave_loss():
    x = torch.linspace(-2, 2, 9, dtype=torch.float64)[:, None]
    centres = torch.tensor([-4.0, -2.3, -0.5, -0.2, 0.3, 0.0, 1.1, 2.6, 5.0], dtype=torch.float64)
    loss_fn = concave_bumps(centres)  # some maxima inside the ball, some beyond its edge
    eps, step = 1.0, 0.01
    grid = GridSearch(eps, points=2001).maximize(loss_fn, x)
    found = pgd(loss_fn, x, eps, step, steps=250, random_start=True, clamp=None,
                generator=torch.Generator().manual_seed(0), keep_best=True)
    assert ((found - x).abs() <= eps).all()
    # keep_best leaves PGD within step/2 of the argmax: loss deficit ≤ max|ℓ''|/2 · (step/2)² < 1e-4.
    torch.testing.assert_close(loss_fn(found), loss_fn(grid), rtol=0, atol=1e-4)
    torch.testing.assert_close(found, grid, rtol=0, atol=step)


def nearly_constant_model() -> nn.Sequential:
    """A random MLP whose p_θ(y=1|x) ≈ 0.02 varies little, so the SCORE loss is shaped by p_d(y|x)."""
    model = tanh_mlp([1, 32, 32, 2])
    with torch.no_grad():
        model[-1].weight.mul_(0.2)
        model[-1].bias.copy_(torch.tensor([2.0, -2.0]))
    return model


@pytest.mark.parametrize("distance", ["kl", "l1"])
def test_pgd_with_restarts_matches_the_grid_on_seed_toy_score_loss(distance):
    """SCORE loss D(p_d(·|x') || p_θ(·|x')) on the seed toy, whose p_d(y=1|x) peaks at x = 5/3: PGD needs the data
    gradient to climb to the peak, and with a few random restarts finds the maximum the grid finds."""
    toy, model = seed_toy(), nearly_constant_model()
    x = torch.linspace(-1, 4, 11, dtype=torch.float64)[:, None]
    loss_fn = lambda z: self_consistent_distance(model, z, toy, distance)
    eps, step = 1.0, 0.02
    grid_loss = loss_fn(GridSearch(eps, points=2001).maximize(loss_fn, x))
    best = torch.full_like(grid_loss, -math.inf)
    for seed in range(3):
        found = PGD(eps, step, steps=120, clamp=None).maximize(loss_fn, x, torch.Generator().manual_seed(seed))
        assert ((found - x).abs() <= eps + 1e-12).all()
        with torch.no_grad():
            best = torch.maximum(best, loss_fn(found))
    assert (best <= grid_loss + 1e-6).all()  # the grid is (near) exact
    torch.testing.assert_close(best, grid_loss, rtol=0, atol=1e-4)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("clamp", [(0.0, 1.0), None])
def test_iterates_stay_in_the_ball_and_range_for_any_shape(norm, clamp):
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 10), nn.Tanh(), nn.Linear(10, 4))
    x = torch.rand(6, 3, 4, 4)
    labels = torch.arange(6) % 4
    loss_fn = lambda z: nn.functional.cross_entropy(model(z), labels, reduction="none")
    eps = 8 / 255 if norm == "linf" else 0.5
    x_adv = pgd(loss_fn, x, eps, eps / 4, steps=10, norm=norm, clamp=clamp, generator=torch.Generator().manual_seed(0))
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-6).all()  # float32 rounding of x_adv − x
    if clamp is not None:
        assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    with torch.no_grad():
        assert (loss_fn(x_adv) > loss_fn(x)).all()


def test_linear_loss_reaches_the_closed_form_optimum():
    """For ℓ(z) = <w, z> the maximizer is x + ε sign(w) (ℓ∞, then clamped per coordinate) or x + ε w/||w||₂ (ℓ2)."""
    x = torch.rand(5, 3, 4, 4, dtype=torch.float64)
    w = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    loss_fn = lambda z: (w * z).flatten(1).sum(1)
    eps = 0.1
    linf = pgd(loss_fn, x, eps, eps / 4, steps=12, norm="linf", clamp=(0.0, 1.0),
               generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(linf, (x + eps * w.sign()).clamp(0, 1))
    l2 = pgd(loss_fn, x, eps, eps / 4, steps=6, norm="l2", random_start=False, clamp=None)
    w_norm = w.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    torch.testing.assert_close(l2, x + eps * w / w_norm)


def test_keep_best_returns_the_best_iterate():
    """With a step too large to settle, the last iterate is not the best one; keep_best returns the best."""
    x = torch.zeros(4, 1, dtype=torch.float64)
    loss_fn = concave_bumps(torch.tensor([0.31, -0.52, 0.77, 0.05], dtype=torch.float64))
    eps, step, steps = 1.0, 0.45, 7
    iterates = [pgd(loss_fn, x, eps, step, t, random_start=False, clamp=None) for t in range(steps + 1)]
    losses = torch.stack([loss_fn(it) for it in iterates])  # [steps + 1, B]
    best = pgd(loss_fn, x, eps, step, steps, random_start=False, clamp=None, keep_best=True)
    torch.testing.assert_close(loss_fn(best), losses.max(0).values)
    assert (losses.max(0).values > losses[-1] + 1e-3).any()  # the case is not trivial


def test_attack_leaves_parameter_gradients_untouched():
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.rand(4, 8)
    loss_fn = lambda z: model(z).logsumexp(1)
    for norm in ("linf", "l2"):
        pgd(loss_fn, x, 0.1, 0.02, steps=3, norm=norm, keep_best=True)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_zero_eps_returns_x(norm):
    x = torch.rand(3, 2, 5)
    x_adv = pgd(lambda z: z.pow(2).flatten(1).sum(1), x, 0.0, 0.1, steps=4, norm=norm, random_start=True)
    assert torch.equal(x_adv, x)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_random_start_is_reproducible_with_a_generator(norm):
    x = torch.rand(4, 3, 4, 4)
    loss_fn = lambda z: torch.sin(10 * z).flatten(1).sum(1)
    run = lambda seed: pgd(loss_fn, x, 0.1, 0.01, 3, norm=norm, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


def test_l2_random_start_is_uniform_in_the_ball():
    """Uniform in the d-ball: ||δ|| ≤ ε, (||δ||/ε)^d ~ U(0, 1), and δ has mean zero."""
    n, shape, eps = 4000, (3, 4, 4), 0.5
    x = torch.zeros(n, *shape, dtype=torch.float64)
    start = pgd(lambda z: z.flatten(1).sum(1), x, eps, 0.1, steps=0, norm="l2", clamp=None,
                generator=torch.Generator().manual_seed(0))
    radius = start.flatten(1).norm(dim=1)
    assert (radius <= eps * (1 + 1e-12)).all()
    u = (radius / eps) ** 48
    assert abs(u.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert abs(u.var().item() - 1 / 12) < 5 * math.sqrt(1 / 180 / n)  # Var[(U − ½)²] = 1/180
    coordinate_std = eps / math.sqrt(48 + 2)  # E||δ||² = ε² d/(d+2), spread over d coordinates
    assert start.mean(0).abs().max().item() < 5 * coordinate_std / math.sqrt(n)


def test_linf_random_start_is_uniform_in_the_cube():
    n, eps = 20_000, 0.3
    delta = uniform_in_ball(torch.zeros(n, 2, dtype=torch.float64), eps, "linf", torch.Generator().manual_seed(0))
    assert (delta.abs() <= eps).all()
    assert delta.mean(0).abs().max().item() < 5 * eps / math.sqrt(3 * n)
    assert (delta.var(0) - eps**2 / 3).abs().max().item() < 5 * eps**2 * math.sqrt(4 / 45 / n)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(eps=-0.1), "eps must be >= 0"),
        (dict(eps=float("nan")), "eps must be >= 0"),
        (dict(norm="l1"), "unknown norm 'l1'; valid norms: linf, l2"),
        (dict(steps=-1), "steps must be a non-negative integer"),
        (dict(steps=2.5), "steps must be a non-negative integer"),
        (dict(step_size=-0.01), "step_size must be >= 0"),
        (dict(clamp=(1.0, 0.0)), "clamp must be"),
    ],
)
def test_pgd_bad_input_raises(kwargs, match):
    arguments = dict(eps=0.1, step_size=0.01, steps=3, norm="linf", clamp=(0.0, 1.0)) | kwargs
    with pytest.raises(ValueError, match=match):
        pgd(lambda z: z.sum(1), torch.rand(2, 3), **arguments)


@pytest.mark.parametrize("keep_best", [False, True])
def test_pgd_starts_keep_the_best_of_independent_runs(keep_best):
    """starts = 3: three ``pgd`` runs from consecutive starts of one generator; per example the run whose result has
    the largest loss, recomputed here in numpy. A loss with two bumps per example makes the starts disagree."""
    x = torch.linspace(-1, 1, 64, dtype=torch.float64)[:, None]
    loss_fn = lambda z: torch.cos(6 * z[:, 0]) + 0.3 * torch.sin(17 * z[:, 0])
    eps, step, steps = 0.5, 0.02, 10
    found = PGD(eps, step, steps, clamp=None, keep_best=keep_best, starts=3).maximize(
        loss_fn, x, torch.Generator().manual_seed(2))
    generator = torch.Generator().manual_seed(2)
    runs = [pgd(loss_fn, x, eps, step, steps, clamp=None, generator=generator, keep_best=keep_best)
            for _ in range(3)]
    values = np.stack([np.cos(6 * r[:, 0].numpy()) + 0.3 * np.sin(17 * r[:, 0].numpy()) for r in runs])
    assert len(set(values.argmax(axis=0).tolist())) == 3  # every start wins somewhere: the selection is exercised
    expected = np.take_along_axis(np.stack([r[:, 0].numpy() for r in runs]), values.argmax(axis=0)[None], 0)[0]
    np.testing.assert_array_equal(found[:, 0].numpy(), expected)
    assert (loss_fn(found) >= loss_fn(runs[0])).all()  # never below a single start


def test_pgd_starts_validate():
    with pytest.raises(ValueError, match="starts must be a positive integer, got 0"):
        PGD(eps=0.1, step_size=0.01, steps=1, starts=0)
    with pytest.raises(ValueError, match="2 starts need random_start=True"):
        PGD(eps=0.1, step_size=0.01, steps=1, random_start=False, starts=2)


def test_maximizer_configs_validate_their_ball():
    with pytest.raises(ValueError, match="eps must be >= 0"):
        PGD(eps=-1.0, step_size=0.1, steps=1)
    with pytest.raises(ValueError, match="unknown norm"):
        PGD(eps=1.0, step_size=0.1, steps=1, norm="l3")
    with pytest.raises(ValueError, match="eps must be >= 0"):
        GridSearch(eps=-1.0)
    with pytest.raises(ValueError, match="at least 2 points"):
        GridSearch(eps=1.0, points=1)


def test_grid_search_rejects_inputs_that_are_not_1d():
    with pytest.raises(ValueError, match="1-D inputs only"):
        GridSearch(0.5, points=5).maximize(lambda z: z.sum(1), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="1-D inputs only"):
        GridSearch(0.5, points=5).maximize(lambda z: z.flatten(1).sum(1), torch.zeros(3, 1, 2, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("points", [3, 101, 2001])
def test_grid_search_is_exact_on_its_grid(dtype, points):
    """The grid holds x itself (odd ``points``) and both edges x ± ε exactly, and returns the best grid point."""
    x = torch.tensor([[0.0], [0.3], [-1.7]], dtype=dtype)
    grid = GridSearch(0.7, points=points)
    assert torch.equal(grid.maximize(lambda z: -(z - x).abs()[:, 0], x), x)
    assert torch.equal(grid.maximize(lambda z: z[:, 0], x), x + torch.tensor(0.7, dtype=dtype))
    assert torch.equal(grid.maximize(lambda z: -z[:, 0], x), x - torch.tensor(0.7, dtype=dtype))
    target = x + 0.2345
    found = grid.maximize(lambda z: -(z - target).pow(2)[:, 0], x)
    assert ((found - target).abs() <= 0.7 / (points - 1) + 1e-6).all()


def test_grid_search_respects_clamp():
    x = torch.tensor([[0.05], [0.5], [0.95]], dtype=torch.float64)
    found = GridSearch(0.2, points=41, clamp=(0.0, 1.0)).maximize(lambda z: z[:, 0], x)
    torch.testing.assert_close(found, torch.tensor([[0.25], [0.7], [1.0]], dtype=torch.float64))


def test_update_best_takes_strictly_larger_losses_per_example():
    """The shared selection rule, checked against numpy's first-maximum argmax over three candidates."""
    losses = np.array([[0.1, 0.5, 0.5, 2.0], [0.3, 0.5, 0.1, 2.0], [0.2, 0.9, 0.5, 1.0]])  # [candidate, example]
    candidates = [torch.full((4, 2, 3), float(a)) for a in range(3)]
    best, best_loss = None, None
    for candidate, loss in zip(candidates, losses, strict=True):
        best, best_loss = update_best(best, best_loss, candidate, torch.tensor(loss))
    expected = losses.argmax(axis=0)  # numpy keeps the first maximum: [1, 2, 0, 0]
    assert expected.tolist() == [1, 2, 0, 0]
    assert torch.equal(best[:, 0, 0], torch.tensor(expected, dtype=best.dtype))
    assert torch.equal(best_loss, torch.tensor(losses.max(axis=0)))
