"""datagrad.alignment (Theorem 4): first-order terms against finite differences of p_d and p_θ computed here, the
K = 2 identity, and the acceptance check: the expansion gap falls at least linearly in ε on exact mixtures."""

import itertools
import math

import pytest
import torch

import datagrad as dg

THREE_CLASSES = dg.GaussianMixture([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]], [1.0, 0.8, 1.2], [0.5, 0.3, 0.2])


def tanh_mlp(d: int, k: int, width: int = 16) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(d, width), torch.nn.Tanh(), torch.nn.Linear(width, k)).double()


def jacobian_fd(fn, x: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    """Central differences of fn: [B, d] → [B, K] as [B, K, d]."""
    columns = []
    for j in range(x.shape[1]):
        step = torch.zeros_like(x)
        step[:, j] = h
        columns.append((fn(x + step) - fn(x - step)) / (2 * h))
    return torch.stack(columns, dim=2)


@pytest.mark.parametrize("norm, q", [("linf", 1), ("l2", 2)])
def test_terms_match_finite_differences(norm, q):
    x, _ = THREE_CLASSES.sample(64, torch.Generator().manual_seed(0), dtype=torch.float64)
    model = tanh_mlp(2, 3)
    terms = dg.alignment_terms(model, x, THREE_CLASSES, norm)

    with torch.no_grad():
        p_data, p_model = THREE_CLASSES.log_posterior(x).exp(), model(x).softmax(1)
        jac_data = jacobian_fd(lambda z: THREE_CLASSES.log_posterior(z).exp(), x)  # [B, K, d]
        jac_model = jacobian_fd(lambda z: model(z).softmax(1), x)
    f, jac_f = p_data - p_model, jac_data - jac_model
    rows, label = torch.arange(len(x)), p_data.argmax(1)
    expected_alignment = jac_f[rows, label].norm(p=q, dim=1)
    expected_general = torch.einsum("bk,bkd->bd", f.sign(), jac_f).norm(p=q, dim=1)
    g_model, g_data = jac_model[rows, label], jac_data[rows, label]
    expected_cosine = torch.nn.functional.cosine_similarity(g_model, g_data, dim=1)
    expected_condition = torch.tensor([
        all(math.copysign(1, f[b, k]) == -math.copysign(1, f[b, label[b]]) for k in range(3) if k != label[b])
        for b in range(len(x))
    ])

    assert torch.equal(terms.label, label)
    torch.testing.assert_close(terms.standard_l1, f.abs().sum(1))
    torch.testing.assert_close(terms.alignment, expected_alignment, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(terms.general, expected_general, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(terms.cosine, expected_cosine, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(terms.model_grad_norm, g_model.norm(p=q, dim=1), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(terms.data_grad_norm, g_data.norm(p=q, dim=1), rtol=1e-6, atol=1e-9)
    assert torch.equal(terms.sign_condition, expected_condition)
    assert 0 < expected_condition.float().mean() < 1  # both cases occur in this batch
    # where the condition holds the general coefficient is twice the theorem's term
    held = expected_condition
    torch.testing.assert_close(terms.general[held], 2 * terms.alignment[held])


def test_two_classes_always_meet_the_sign_condition():
    mixture = dg.seed_toy()
    x, _ = mixture.sample(256, torch.Generator().manual_seed(1), dtype=torch.float64)
    terms = dg.alignment_terms(tanh_mlp(1, 2), x, mixture, "linf")
    assert bool(terms.sign_condition.all())
    torch.testing.assert_close(terms.general, 2 * terms.alignment)


def test_class_count_mismatch_and_unknown_norm_are_clear_errors():
    x = torch.zeros(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="class-count mismatch: model returns 2 logits but the data posterior has 3"):
        dg.alignment_terms(tanh_mlp(2, 2), x, THREE_CLASSES)
    with pytest.raises(ValueError, match="unknown norm 'l1'"):
        dg.alignment_terms(tanh_mlp(2, 3), x, THREE_CLASSES, "l1")
    with pytest.raises(ValueError, match="positive radii"):
        dg.expansion_check(tanh_mlp(2, 3), x, lambda: THREE_CLASSES, dg.GridSearch, [0.1, 0.0])


EPS = [0.2 / 2**k for k in range(5)]


def test_theorem4_gap_falls_at_least_linearly_on_the_seed_toy():
    """Acceptance: K = 2, exact posterior, unclamped, exact 1-D grid maximizer: gap = O(ε²)."""
    mixture = dg.seed_toy()
    x, _ = mixture.sample(500, torch.Generator().manual_seed(0), dtype=torch.float64)
    result = dg.expansion_check(tanh_mlp(1, 2), x, lambda: mixture, lambda e: dg.GridSearch(e, points=101), EPS)
    ratios = [p["gap_over_eps"] for p in result["points"]]
    assert result["slope"] >= 1.0 and result["slope"] == pytest.approx(2.0, abs=0.1)  # curvature: second order
    assert all(a > b for a, b in itertools.pairwise(ratios)) and ratios[-1] < ratios[0] / 8  # gap/ε → 0
    assert result["terms"]["sign_condition"] == 1.0


def test_three_classes_need_the_general_coefficient_where_the_sign_condition_fails():
    """K = 3, ℓ∞ PGD from x: the general coefficient's gap is O(ε²); the theorem's 2ε·A keeps an O(ε) gap from the
    points where the sign condition fails (its 'mild condition')."""
    x, _ = THREE_CLASSES.sample(500, torch.Generator().manual_seed(1), dtype=torch.float64)
    attack = lambda e: dg.PGD(e, e / 4, 20, "linf", random_start=False, clamp=None)
    result = dg.expansion_check(tanh_mlp(2, 3), x, lambda: THREE_CLASSES, attack, EPS)
    general = [p["gap_general_over_eps"] for p in result["points"]]
    theorem = [p["gap_over_eps"] for p in result["points"]]
    assert result["slope_general"] >= 1.5 and all(a > b for a, b in itertools.pairwise(general))
    assert result["terms"]["sign_condition"] < 1.0
    assert result["slope"] >= 1.0 and theorem[-1] > 0.5 * theorem[0]  # linear, not vanishing


def test_loglog_slope_of_a_power_law():
    eps = [1.0, 0.5, 0.25]
    assert dg.loglog_slope(eps, [3 * e**2 for e in eps]) == pytest.approx(2.0)
    assert math.isnan(dg.loglog_slope([1.0], [1.0]))
