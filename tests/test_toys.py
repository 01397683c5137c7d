"""GaussianMixture against brute force: torch.distributions densities, autograd, finite differences,
numerical convolution by quadrature, and Monte Carlo moments of its samples."""

import math

import numpy as np
import pytest
import torch
from torch.distributions import MultivariateNormal

from datagrad import DataPosterior, GaussianMixture, seed_toy

MEANS = [[0.0, 1.0], [1.5, -0.5], [-1.0, -1.0]]
STDS = [0.5, 1.0, 1.5]
PRIORS = [0.2, 0.3, 0.5]


@pytest.fixture
def mixture() -> GaussianMixture:
    return GaussianMixture(MEANS, STDS, PRIORS)


def brute_log_joint(x: torch.Tensor, noise_std: float) -> torch.Tensor:
    """log π_y + log N(x; μ_y, (s_y² + σ²) I) from torch.distributions, float64: [B, K]."""
    columns = []
    for mean, std, prior in zip(MEANS, STDS, PRIORS, strict=True):
        cov = (std**2 + noise_std**2) * torch.eye(len(mean), dtype=torch.float64)
        normal = MultivariateNormal(torch.tensor(mean, dtype=torch.float64), covariance_matrix=cov)
        columns.append(math.log(prior) + normal.log_prob(x))
    return torch.stack(columns, dim=1)


def central_difference(fn, x: torch.Tensor, h: float = 1e-5) -> torch.Tensor:
    """∂fn/∂x by central differences for fn: [B, d] -> [B, K]; returns [B, K, d]."""
    columns = []
    for i in range(x.shape[1]):
        step = torch.zeros_like(x)
        step[:, i] = h
        columns.append((fn(x + step) - fn(x - step)) / (2 * h))
    return torch.stack(columns, dim=-1)


def autograd_jacobian(fn, x: torch.Tensor) -> torch.Tensor:
    """∂fn_k/∂x for fn: [B, d] -> [B, K] acting row-wise; returns [B, K, d]."""
    x = x.detach().requires_grad_(True)
    out = fn(x)
    rows = [torch.autograd.grad(out[:, k].sum(), x, retain_graph=True)[0] for k in range(out.shape[1])]
    return torch.stack(rows, dim=1)


def test_is_a_data_posterior(mixture):
    assert isinstance(mixture, DataPosterior)
    assert mixture.num_classes == 3 and mixture.dim == 2 and mixture.event_shape == (2,)


@pytest.mark.parametrize("noise_std", [0.0, 0.7])
def test_log_likelihood_and_posterior_match_torch_distributions(mixture, noise_std):
    x = 2 * torch.randn(40, 2, dtype=torch.float64)  # > 25 rows exercises cdist's matrix-product path
    joint = brute_log_joint(x, noise_std)
    log_priors = torch.tensor(PRIORS, dtype=torch.float64).log()
    torch.testing.assert_close(mixture.log_likelihood(x, noise_std), joint - log_priors, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mixture.log_joint(x, noise_std), joint, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mixture.log_marginal(x, noise_std), joint.logsumexp(1), rtol=1e-10, atol=1e-10)
    posterior = joint.exp() / joint.exp().sum(1, keepdim=True)
    torch.testing.assert_close(mixture.log_posterior(x, noise_std).exp(), posterior, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("noise_std", [0.0, 0.7])
def test_scores_match_autograd_and_finite_differences(mixture, noise_std):
    x = 2 * torch.randn(6, 2, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 2, 1, 0])
    rows = torch.arange(6)

    class_scores = autograd_jacobian(lambda z: mixture.log_joint(z, noise_std), x)  # [B, K, d]
    marginal_score = autograd_jacobian(lambda z: mixture.log_marginal(z, noise_std)[:, None], x)[:, 0]
    posterior_grad = autograd_jacobian(lambda z: mixture.log_posterior(z, noise_std), x)
    torch.testing.assert_close(mixture.score(x, labels, noise_std), class_scores[rows, labels])
    torch.testing.assert_close(mixture.score(x, noise_std=noise_std), marginal_score)
    torch.testing.assert_close(mixture.grad_log_posterior(x, noise_std), posterior_grad)

    joint = lambda z: brute_log_joint(z, noise_std)
    fd_class = central_difference(joint, x)
    fd_marginal = central_difference(lambda z: joint(z).logsumexp(1, keepdim=True), x)[:, 0]
    fd_posterior = central_difference(lambda z: joint(z).log_softmax(1), x)
    tol = dict(rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(mixture.score(x, labels, noise_std), fd_class[rows, labels], **tol)
    torch.testing.assert_close(mixture.score(x, noise_std=noise_std), fd_marginal, **tol)
    torch.testing.assert_close(mixture.grad_log_posterior(x, noise_std), fd_posterior, **tol)


def test_noisy_posterior_is_the_posterior_of_the_widened_mixture(mixture):
    noise_std = 0.8
    widened = GaussianMixture(MEANS, [math.sqrt(s**2 + noise_std**2) for s in STDS], PRIORS)
    x = 2 * torch.randn(10, 2, dtype=torch.float64)
    torch.testing.assert_close(mixture.log_posterior(x, noise_std), widened.log_posterior(x))
    torch.testing.assert_close(mixture.grad_log_posterior(x, noise_std), widened.grad_log_posterior(x))
    torch.testing.assert_close(mixture.score(x, noise_std=noise_std), widened.score(x))
    # Noise changes the answer: the test would notice a noise_std that is ignored.
    assert not torch.allclose(mixture.log_posterior(x, noise_std), mixture.log_posterior(x))


def normal_pdf(x: np.ndarray, mean: float, std: float) -> np.ndarray:
    return np.exp(-0.5 * ((x - mean) / std) ** 2) / (std * np.sqrt(2 * np.pi))


def test_noise_std_is_the_std_of_a_convolution_by_quadrature():
    """p_σ(x|y) = ∫ p(u|y) N(x − u; 0, σ²) du on a fine grid (trapezoid rule) for the seed toy."""
    toy, noise_std = seed_toy(), 0.6
    u = np.linspace(-25.0, 25.0, 200_001)  # spacing 2.5e-4
    x = np.array([-4.0, -1.3, 0.0, 0.4, 2.5, 5.0])
    densities = np.empty((len(x), 2))
    for y, (mean, std) in enumerate(zip((-1.0, 1.0), (2.0, 1.0), strict=True)):
        clean = normal_pdf(u, mean, std)
        densities[:, y] = [np.trapezoid(clean * normal_pdf(xi - u, 0.0, noise_std), u) for xi in x]
    x_t = torch.from_numpy(x)[:, None]
    np.testing.assert_allclose(toy.log_likelihood(x_t, noise_std).exp().numpy(), densities, rtol=1e-9)
    joint = densities * np.array([5 / 6, 1 / 6])
    np.testing.assert_allclose(
        toy.log_posterior(x_t, noise_std).exp().numpy(), joint / joint.sum(1, keepdims=True), rtol=1e-9
    )
    # The std convention matters: treating σ as a variance gives a different density.
    assert not np.allclose(toy.log_likelihood(x_t, noise_std**2).exp().numpy(), densities, rtol=1e-3)


def test_sample_matches_priors_means_and_stds():
    toy, n = seed_toy(), 200_000
    x, y = toy.sample(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert x.shape == (n, 1) and y.shape == (n,) and x.dtype == torch.float64
    freq1 = y.double().mean().item()
    assert abs(freq1 - 1 / 6) < 5 * math.sqrt((1 / 6) * (5 / 6) / n)
    for label, mean, std in [(0, -1.0, 2.0), (1, 1.0, 1.0)]:
        values = x[y == label, 0]
        m = values.numel()
        assert abs(values.mean().item() - mean) < 5 * std / math.sqrt(m)
        assert abs(values.std().item() - std) < 5 * std / math.sqrt(2 * m)


def test_noisy_sample_has_widened_stds_and_image_shape():
    means = torch.linspace(-1, 1, 2 * 64).reshape(2, 64)
    mixture = GaussianMixture(means, [0.3, 0.6], [0.5, 0.5], event_shape=(1, 8, 8))
    n, noise_std = 20_000, 0.4
    x, y = mixture.sample(n, generator=torch.Generator().manual_seed(2), noise_std=noise_std)
    assert x.shape == (n, 1, 8, 8) and x.dtype == torch.float32
    for label, std in [(0, 0.3), (1, 0.6)]:
        values = x[y == label].reshape(-1, 64).double()
        m = values.shape[0]
        total_std = math.sqrt(std**2 + noise_std**2)
        mean_error = (values.mean(0) - means[label].double()).abs().max().item()
        assert mean_error < 5 * total_std / math.sqrt(m)
        # all 64 coordinates pooled: one std estimate from 64·m centred values
        pooled_std = (values - means[label].double()).pow(2).mean().sqrt().item()
        assert abs(pooled_std - total_std) < 5 * total_std / math.sqrt(2 * 64 * m)


def test_sample_is_reproducible_with_a_generator():
    toy = seed_toy()
    first = toy.sample(100, generator=torch.Generator().manual_seed(3))
    second = toy.sample(100, generator=torch.Generator().manual_seed(3))
    third = toy.sample(100, generator=torch.Generator().manual_seed(4))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], third[0])


def test_image_shaped_inputs_match_the_flat_mixture():
    means = torch.randn(3, 64, dtype=torch.float64)
    stds, priors = [0.5, 1.0, 2.0], [0.2, 0.3, 0.5]
    image = GaussianMixture(means, stds, priors, event_shape=(1, 8, 8))
    flat = GaussianMixture(means, stds, priors)
    x = means[[0, 1, 2, 0]] + torch.randn(4, 64, dtype=torch.float64)
    x_img = x.reshape(4, 1, 8, 8)
    torch.testing.assert_close(image.log_posterior(x_img, 0.3), flat.log_posterior(x, 0.3))
    grad = image.grad_log_posterior(x_img, 0.3)
    assert grad.shape == (4, 3, 1, 8, 8)
    torch.testing.assert_close(grad.reshape(4, 3, 64), flat.grad_log_posterior(x, 0.3))
    labels = torch.tensor([2, 1, 0, 0])
    assert image.score(x_img, labels).shape == x_img.shape
    torch.testing.assert_close(image.score(x_img, labels).reshape(4, 64), flat.score(x, labels))
    torch.testing.assert_close(image.score(x_img).reshape(4, 64), flat.score(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_seed_toy_log_odds(dtype):
    toy = seed_toy()
    assert toy.num_classes == 2 and toy.priors.tolist() == pytest.approx([5 / 6, 1 / 6])
    x = torch.linspace(-6, 6, 1201, dtype=dtype)
    log_p = toy.log_posterior(x[:, None]).double()
    x = x.double()
    expected = -0.375 * x**2 + 1.25 * x - 1.2913
    assert (log_p[:, 1] - log_p[:, 0] - expected).abs().max().item() < 5e-5


@pytest.mark.parametrize(
    "means, stds, priors, event_shape, match",
    [
        ([0.0, 1.0], [1.0, 1.0], [0.5, 0.5], None, "means"),
        ([[0.0], [1.0]], [1.0], [0.5, 0.5], None, "stds and priors"),
        ([[0.0], [1.0]], [1.0, 1.0], [1.0], None, "stds and priors"),
        ([[0.0], [1.0]], [1.0, -1.0], [0.5, 0.5], None, "stds must be positive"),
        ([[0.0], [1.0]], [1.0, 0.0], [0.5, 0.5], None, "stds must be positive"),
        ([[0.0], [1.0]], [1.0, 1.0], [0.5, 0.6], None, "sum to 1"),
        ([[0.0], [1.0]], [1.0, 1.0], [1.2, -0.2], None, "priors must be positive"),
        ([[0.0, 0.0], [1.0, 1.0]], [1.0, 1.0], [0.5, 0.5], (3,), "event_shape"),
    ],
)
def test_bad_construction_raises(means, stds, priors, event_shape, match):
    with pytest.raises(ValueError, match=match):
        GaussianMixture(means, stds, priors, event_shape=event_shape)


def test_bad_calls_raise(mixture):
    x = torch.zeros(4, 2, dtype=torch.float64)
    for wrong in (torch.zeros(4, 3), torch.zeros(2), torch.zeros(4, 1, 3)):
        for method in (mixture.log_posterior, mixture.grad_log_posterior, mixture.score, mixture.log_likelihood):
            with pytest.raises(ValueError, match="flattens to d = 2"):
                method(wrong)
    for labels in (torch.tensor([0, 1, 3, 0]), torch.tensor([0, -1, 2, 0]), torch.tensor([0, 1])):
        with pytest.raises(ValueError, match="labels"):
            mixture.score(x, labels)
    for method in (mixture.log_posterior, mixture.grad_log_posterior, mixture.score, mixture.log_likelihood):
        with pytest.raises(ValueError, match="noise_std"):
            method(x, noise_std=-0.1)
    with pytest.raises(ValueError, match="noise_std"):
        mixture.sample(3, noise_std=-0.1)
    for n in (-1, 0):
        with pytest.raises(ValueError, match="number of samples"):
            mixture.sample(n)
