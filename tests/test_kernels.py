"""KernelMixture (the exact smoothed posterior of a finite set) against brute force: a per-centre loop of
torch.distributions densities, autograd and central differences, a GaussianMixture with one centre per class,
1-D quadrature of the noise convolution, and Monte Carlo moments; plus the autograd route of attach_log_posterior
against the [B, K, D] data-gradient route on exact posteriors."""

import math

import pytest
import torch
from torch.distributions import Normal

from datagrad import (
    GaussianMixture,
    KernelMixture,
    attach_log_posterior,
    autograd_grad_log_posterior,
    self_consistent_distance,
)


@pytest.fixture
def kernel():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(23, 1, 2, 2, generator=generator, dtype=torch.float64)
    labels = torch.arange(23) % 3
    return KernelMixture(centres, labels, 3, bandwidth=0.7, chunk_size=4)  # several chunks per class


def brute_log_joint(kernel: KernelMixture, x: torch.Tensor) -> torch.Tensor:
    """log (1/N) Σ_{i: y_i = y} N(x; c_i, h²I), one centre at a time: [B, K] float64."""
    flat = x.reshape(x.shape[0], -1).double()
    columns = [[] for _ in range(kernel.num_classes)]
    for centre, label in zip(kernel.centres.double(), kernel.labels, strict=True):
        log_density = Normal(centre, kernel.bandwidth).log_prob(flat).sum(dim=1)
        columns[int(label)].append(log_density - math.log(kernel.num_centres))
    return torch.stack([torch.stack(c, dim=1).logsumexp(dim=1) for c in columns], dim=1)


def test_log_joint_and_posterior_match_a_per_centre_loop(kernel):
    x = 1.5 * torch.randn(9, 1, 2, 2, dtype=torch.float64)
    joint = brute_log_joint(kernel, x)
    torch.testing.assert_close(kernel.log_joint(x), joint)
    torch.testing.assert_close(kernel.log_posterior(x), joint.log_softmax(dim=1))
    torch.testing.assert_close(kernel.log_marginal(x), joint.logsumexp(dim=1))


def test_per_example_bandwidths_match_a_per_centre_loop_at_each_bandwidth(kernel):
    """Example b's posterior with kernel std h_b equals the per-centre loop of a mixture built with bandwidth h_b."""
    x = 1.5 * torch.randn(4, 1, 2, 2, dtype=torch.float64)
    bandwidths = torch.tensor([0.05, 0.3, 1.0, 4.0], dtype=torch.float64)
    expected = torch.cat([brute_log_joint(KernelMixture(kernel.centres, kernel.labels, 3, float(h)), x[b:b + 1])
                          for b, h in enumerate(bandwidths)]).log_softmax(dim=1)
    torch.testing.assert_close(kernel.log_posterior_per_example(x, bandwidths), expected)
    for bad in (bandwidths[:3], torch.tensor([0.1, 0.0, 1.0, 1.0], dtype=torch.float64)):
        with pytest.raises(ValueError, match="bandwidths must be"):
            kernel.log_posterior_per_example(x, bad)


def test_chunk_size_does_not_change_the_result(kernel):
    x = torch.randn(5, 1, 2, 2, dtype=torch.float64)
    whole = KernelMixture(kernel.centres.reshape(-1, 1, 2, 2), kernel.labels, 3, 0.7, chunk_size=10_000)
    torch.testing.assert_close(kernel.log_posterior(x), whole.log_posterior(x))
    torch.testing.assert_close(kernel.grad_log_posterior(x), whole.grad_log_posterior(x))


def test_closed_form_gradients_match_autograd_and_finite_differences(kernel):
    x = torch.randn(6, 1, 2, 2, dtype=torch.float64)
    closed = kernel.grad_log_posterior(x)
    torch.testing.assert_close(closed, autograd_grad_log_posterior(kernel.log_posterior, x, 3))
    h = 1e-6
    for i in range(4):
        step = torch.zeros(6, 4, dtype=torch.float64)
        step[:, i] = h
        step = step.reshape(x.shape)
        central = (kernel.log_posterior(x + step) - kernel.log_posterior(x - step)) / (2 * h)
        torch.testing.assert_close(closed.flatten(2)[:, :, i], central, atol=1e-7, rtol=1e-6)
    for y in (None, torch.tensor([0, 1, 2, 0, 1, 2])):
        target = kernel.log_marginal if y is None else (lambda z, y=y: kernel.log_joint(z)[torch.arange(6), y])
        z = x.clone().requires_grad_(True)
        (expected,) = torch.autograd.grad(target(z).sum(), z)
        torch.testing.assert_close(kernel.score(x, y), expected)


def test_one_centre_per_class_is_a_gaussian_mixture():
    centres = torch.tensor([[0.0, 1.0], [2.0, -1.0], [-1.0, 0.5]], dtype=torch.float64)
    kernel = KernelMixture(centres, torch.tensor([2, 0, 1]), 3, bandwidth=0.6)
    mixture = GaussianMixture(centres[[1, 2, 0]], [0.6] * 3, [1 / 3] * 3)
    x = torch.randn(7, 2, dtype=torch.float64)
    torch.testing.assert_close(kernel.log_joint(x), mixture.log_joint(x))
    torch.testing.assert_close(kernel.grad_log_posterior(x), mixture.grad_log_posterior(x))
    torch.testing.assert_close(kernel.at(0.5).log_posterior(x), mixture.log_posterior(x, noise_std=0.5))


def test_noisy_mixture_is_the_quadrature_convolution():
    """1-D: p(x + σn | y) by numerical convolution of the class density with N(0, σ²) equals ``at(σ)``'s."""
    centres = torch.tensor([[-1.0], [0.3], [1.2], [2.0]], dtype=torch.float64)
    kernel = KernelMixture(centres, torch.tensor([0, 1, 0, 1]), 2, bandwidth=0.4)
    sigma, grid = 0.3, torch.linspace(-8, 8, 16001, dtype=torch.float64)
    density = kernel.log_joint(grid.unsqueeze(1)).exp()  # [G, K] = p(x0, y)
    x = torch.tensor([-0.5, 0.4, 1.7], dtype=torch.float64)
    noise = Normal(0.0, sigma).log_prob(x[:, None] - grid[None]).exp()  # [3, G]
    convolved = (noise @ density) * (grid[1] - grid[0])  # [3, K] = p_σ(x, y)
    torch.testing.assert_close(kernel.at(sigma).log_joint(x.unsqueeze(1)), convolved.log(), rtol=1e-6, atol=1e-8)


def test_sample_moments():
    centres = torch.tensor([[0.0, 0.0], [3.0, 1.0], [-2.0, 4.0]], dtype=torch.float64)
    kernel = KernelMixture(centres, torch.tensor([0, 1, 1]), 2, bandwidth=0.5)
    x, y = kernel.sample(60_000, torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(x.mean(dim=0), centres.mean(dim=0), atol=0.04, rtol=0)
    expected_cov = torch.cov(centres.T, correction=0) + 0.25 * torch.eye(2, dtype=torch.float64)
    torch.testing.assert_close(torch.cov(x.T), expected_cov, atol=0.08, rtol=0)
    assert abs(float((y == 1).double().mean()) - 2 / 3) < 0.01


def test_bad_input_raises():
    centres = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="at least one centre"):
        KernelMixture(centres, torch.tensor([0, 0, 1, 1]), 3, 0.1)
    with pytest.raises(ValueError, match="bandwidth"):
        KernelMixture(centres, torch.tensor([0, 0, 1, 1]), 2, 0.0)
    with pytest.raises(ValueError, match="labels must lie"):
        KernelMixture(centres, torch.tensor([0, 0, 1, 2]), 2, 0.1)
    kernel = KernelMixture(centres, torch.tensor([0, 0, 1, 1]), 2, 0.1)
    with pytest.raises(ValueError, match="flattens to d = 2"):
        kernel.log_posterior(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="noise_std"):
        kernel.at(-0.1)


@pytest.mark.parametrize("distance", ["kl", "l1", "se"])
@pytest.mark.parametrize("which", ["mixture", "kernel"])
def test_autograd_route_equals_the_data_gradient_route(distance, which, float64):
    """Same loss and same input gradient whether ∇ log p_d comes from autograd through log_posterior (one backward)
    or from the [B, K, D] closed form through attach_log_posterior's centred linearisation."""
    generator = torch.Generator().manual_seed(0)
    if which == "mixture":
        mixture = GaussianMixture(torch.randn(3, 4, generator=generator), [0.8, 1.0, 1.3], [0.2, 0.3, 0.5])
        autograd_route, data_gradient_route = mixture.at(0.4), mixture.at(0.4, differentiable=False)
    else:
        autograd_route = KernelMixture(torch.randn(12, 4, generator=generator), torch.arange(12) % 3, 3, 0.9)
        data_gradient_route = _NonDifferentiable(autograd_route)
    model = torch.nn.Linear(4, 3)
    x = torch.randn(8, 4, generator=generator)
    results = []
    for posterior in (autograd_route, data_gradient_route):
        z = x.clone().requires_grad_(True)
        loss = self_consistent_distance(model, z, posterior, distance)
        (grad,) = torch.autograd.grad(loss.sum(), z)
        results.append((loss.detach(), grad))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
    assert attach_log_posterior(autograd_route, x).shape == (8, 3)


class _NonDifferentiable:
    """The same posterior, declared not differentiable: attach_log_posterior takes the [B, K, D] route."""

    def __init__(self, posterior):
        self.posterior, self.num_classes = posterior, posterior.num_classes

    def log_posterior(self, x):
        return self.posterior.log_posterior(x)

    def grad_log_posterior(self, x):
        return self.posterior.grad_log_posterior(x)
