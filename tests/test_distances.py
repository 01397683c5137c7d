"""Distances between categorical distributions against hand-written numpy formulas (float64)."""

import numpy as np
import pytest
import torch

from datagrad import DISTANCES, get_distance

NUMPY_FORMULAS = {
    "kl": lambda p, q: np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0) / q), 0.0), axis=1),
    "l1": lambda p, q: np.sum(np.abs(p - q), axis=1),
    "l2": lambda p, q: np.sqrt(np.sum((p - q) ** 2, axis=1)),
    "se": lambda p, q: np.sum((p - q) ** 2, axis=1),
}


def random_simplex(batch: int, classes: int, rng: np.random.Generator) -> np.ndarray:
    return rng.dirichlet(np.full(classes, 0.7), size=batch)  # [B, K]


@pytest.mark.parametrize("name", sorted(NUMPY_FORMULAS))
@pytest.mark.parametrize("classes", [2, 10])
def test_distance_matches_numpy(name, classes):
    rng = np.random.default_rng(classes)
    p, q = random_simplex(32, classes, rng), random_simplex(32, classes, rng)
    got = get_distance(name)(torch.from_numpy(np.log(p)), torch.from_numpy(np.log(q)))
    assert got.shape == (32,)
    np.testing.assert_allclose(got.numpy(), NUMPY_FORMULAS[name](p, q), rtol=1e-12, atol=1e-14)


def test_registry_holds_exactly_the_four_distances():
    assert set(DISTANCES) == {"kl", "l1", "l2", "se"}
    assert {name for name, d in DISTANCES.items() if d.is_metric} == {"l1", "l2"}
    assert get_distance(DISTANCES["l1"]) is DISTANCES["l1"]


def test_kl_is_finite_with_zeros_in_p():
    p = torch.tensor([[0.0, 0.3, 0.7], [1.0, 0.0, 0.0]], dtype=torch.float64)
    q = torch.tensor([[0.2, 0.2, 0.6], [0.5, 0.25, 0.25]], dtype=torch.float64)
    log_p = p.log().requires_grad_(True)  # contains -inf
    log_q = q.log().requires_grad_(True)
    value = get_distance("kl")(log_p, log_q)
    expected = NUMPY_FORMULAS["kl"](p.numpy(), q.numpy())
    np.testing.assert_allclose(value.detach().numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(expected[1], np.log(2.0), rtol=1e-12)
    value.sum().backward()
    assert torch.isfinite(log_p.grad).all() and torch.isfinite(log_q.grad).all()
    # ∂KL/∂log q_k = −p_k and ∂KL/∂log p_k = p_k (log p_k − log q_k + 1), both 0 where p_k = 0.
    torch.testing.assert_close(log_q.grad, -p)
    safe_log_p = torch.where(p > 0, p.log(), 0.0)
    torch.testing.assert_close(log_p.grad, p * (safe_log_p - q.log() + 1))


def test_l2_gradient_at_equal_distributions_is_finite():
    log_p = torch.tensor([[0.2, 0.8], [0.1, 0.9]], dtype=torch.float64).log().requires_grad_(True)
    log_q = log_p.detach().clone().requires_grad_(True)
    value = get_distance("l2")(log_p, log_q)
    value.sum().backward()
    assert torch.equal(value.detach(), torch.zeros(2, dtype=torch.float64))
    assert torch.isfinite(log_p.grad).all() and torch.isfinite(log_q.grad).all()


def test_l2_gradient_matches_numpy_away_from_equality():
    rng = np.random.default_rng(0)
    p, q = random_simplex(8, 4, rng), random_simplex(8, 4, rng)
    log_p = torch.from_numpy(np.log(p)).requires_grad_(True)
    get_distance("l2")(log_p, torch.from_numpy(np.log(q))).sum().backward()
    # d||p − q|| / d log p_k = p_k (p_k − q_k) / ||p − q||
    expected = p * (p - q) / np.linalg.norm(p - q, axis=1, keepdims=True)
    np.testing.assert_allclose(log_p.grad.numpy(), expected, rtol=1e-10)


def test_unknown_distance_lists_valid_names():
    with pytest.raises(ValueError, match="xyz") as info:
        get_distance("xyz")
    for name in ("kl", "l1", "l2", "se"):
        assert name in str(info.value)


@pytest.mark.parametrize("name", sorted(NUMPY_FORMULAS))
@pytest.mark.parametrize(
    "shape_p, shape_q", [((4, 3), (4, 2)), ((4, 3), (5, 3)), ((3,), (3,)), ((2, 4, 3), (2, 4, 3))]
)
def test_shape_mismatch_raises(name, shape_p, shape_q):
    log_p = torch.full(shape_p, 1.0 / shape_p[-1]).log()
    log_q = torch.full(shape_q, 1.0 / shape_q[-1]).log()
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        get_distance(name)(log_p, log_q)
