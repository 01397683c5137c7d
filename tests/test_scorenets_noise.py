"""Noise conventions: σ ↔ t against diffusers' schedule, and ε → score against a known (Gaussian-mixture) score."""

import math

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn

from datagrad import GaussianMixture
from scorenets import NoiseSchedule, ScoreNet, model_input, noise_to_score, score_to_noise, sigma_from_alpha_bar

SIGMAS = [0.01, 0.05, 0.2, 1.0]


def make_mixture() -> GaussianMixture:
    gen = torch.Generator().manual_seed(0)
    means = 0.5 + 0.1 * torch.randn(3, 16, generator=gen, dtype=torch.float64)
    return GaussianMixture(means, stds=[0.1, 0.15, 0.08], priors=[0.5, 0.3, 0.2], event_shape=(1, 4, 4))


def optimal_noise_pred(mixture: GaussianMixture, u_t: torch.Tensor, alpha_bar: torch.Tensor, labels: torch.Tensor):
    """E[ε | u_t, y] for u = 2x − 1, u_t = sqrt(ᾱ)u + sqrt(1−ᾱ)ε, derived by Gaussian conditioning in u_t units.

    Per class k: u_t | k ~ N(sqrt(ᾱ)(2μ_k − 1), v_k I) with v_k = 4ᾱ s_k² + 1 − ᾱ, and Cov(ε, u_t) = sqrt(1−ᾱ) I,
    so E[ε | u_t, k] = sqrt(1−ᾱ)(u_t − sqrt(ᾱ)(2μ_k − 1))/v_k. The null label K mixes the classes with p(k | u_t).
    alpha_bar: [B]; labels: [B] in [0, K].
    """
    flat = u_t.flatten(1)  # [B, d]
    ab = alpha_bar.view(-1, 1, 1)  # [B, 1, 1]
    centres = ab.sqrt() * (2 * mixture.means - 1)  # [B, K, d]
    variances = 4 * ab * mixture.stds.view(1, -1, 1) ** 2 + 1 - ab  # [B, K, 1]
    per_class = (1 - ab).sqrt() * (flat.unsqueeze(1) - centres) / variances  # [B, K, d]
    log_joint = mixture.priors.log() - 0.5 * (
        mixture.dim * torch.log(2 * math.pi * variances[..., 0]) + (flat.unsqueeze(1) - centres).pow(2).sum(-1)
        / variances[..., 0]
    )
    weights = torch.eye(mixture.num_classes + 1, mixture.num_classes, dtype=flat.dtype)  # one-hot rows; null row 0
    weights = torch.where(labels.view(-1, 1) == mixture.num_classes, log_joint.softmax(1), weights[labels])
    return torch.einsum("bk,bkd->bd", weights, per_class).reshape(u_t.shape)


class AnalyticEps(nn.Module):
    """A stand-in UNet returning the optimal ε-predictor of a mixture at (u_t, float t, labels)."""

    def __init__(self, mixture: GaussianMixture, schedule: NoiseSchedule):
        super().__init__()
        self.mixture, self.schedule = mixture, schedule

    def forward(self, u_t, t, class_labels):
        alpha_bar = self.schedule.alpha_bar_at(t.double())
        return UNet2DOutput(sample=optimal_noise_pred(self.mixture, u_t, alpha_bar, class_labels))


def test_schedule_matches_diffusers_at_integer_steps():
    schedule = NoiseSchedule()
    reference = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02).alphas_cumprod.double()
    steps = torch.arange(1000, dtype=torch.float64)
    torch.testing.assert_close(schedule.alpha_bar_at(steps), reference, rtol=1e-12, atol=0)
    torch.testing.assert_close(schedule.sigma_at(steps), sigma_from_alpha_bar(reference), rtol=1e-10, atol=0)
    for t in [0, 1, 17, 500, 998, 999]:
        assert schedule.sigma_to_t(float(sigma_from_alpha_bar(reference[t]))) == pytest.approx(t, abs=1e-9)


def test_sigma_t_map_is_a_monotone_bijection_with_interpolated_log_snr():
    schedule = NoiseSchedule()
    t = torch.linspace(0, 999, 4001, dtype=torch.float64)
    sigma = schedule.sigma_at(t)
    assert bool((sigma.diff() > 0).all())
    back = torch.tensor([schedule.sigma_to_t(float(s)) for s in sigma[::40]], dtype=torch.float64)
    torch.testing.assert_close(back, t[::40], rtol=0, atol=1e-8)
    # between steps 10 and 11 the log-SNR −2 log(2σ) is linear in t
    lam = -2 * torch.log(2 * schedule.sigma_at(torch.tensor([10.0, 10.25, 11.0], dtype=torch.float64)))
    assert float(lam[1]) == pytest.approx(0.75 * float(lam[0]) + 0.25 * float(lam[2]), rel=1e-12)
    assert schedule.sigma_min == pytest.approx(0.005, rel=1e-2) and schedule.sigma_max > 50


@pytest.mark.parametrize("sigma", [0.0, -0.1, float("nan"), 1e-4, 1e4])
def test_bad_sigma_raises(sigma):
    with pytest.raises(ValueError, match="noise_std"):
        NoiseSchedule().sigma_to_t(sigma)


def test_non_positive_sigma_raises_in_conversions():
    with pytest.raises(ValueError, match="positive"):
        noise_to_score(torch.zeros(1), 0.0)
    with pytest.raises(ValueError, match="positive"):
        model_input(torch.zeros(1), -1.0)


@pytest.mark.parametrize("sigma", SIGMAS)
def test_optimal_noise_pred_converts_to_the_mixture_score(sigma):
    """Plug the analytic ε* into the conversions: −ε*/σ at u_t(x̃) must equal ∇_x̃ log p_σ(x̃|y) in [0,1] units."""
    mixture = make_mixture()
    x_noisy, labels = mixture.sample(64, torch.Generator().manual_seed(1), noise_std=sigma, dtype=torch.float64)
    alpha_bar = torch.full((64,), 1 / (1 + 4 * sigma**2), dtype=torch.float64)
    noise_pred = optimal_noise_pred(mixture, model_input(x_noisy, sigma), alpha_bar, labels)
    torch.testing.assert_close(noise_to_score(noise_pred, sigma), mixture.score(x_noisy, labels, noise_std=sigma))
    torch.testing.assert_close(score_to_noise(noise_to_score(noise_pred, sigma), sigma), noise_pred)
    unconditional = optimal_noise_pred(mixture, model_input(x_noisy, sigma), alpha_bar, torch.full_like(labels, 3))
    torch.testing.assert_close(noise_to_score(unconditional, sigma), mixture.score(x_noisy, None, noise_std=sigma))


@pytest.mark.parametrize("sigma", SIGMAS)
def test_scorenet_class_scores_of_the_optimal_noise_pred_are_the_exact_scores(sigma):
    """End to end through ScoreNet: σ → fractional t → ᾱ(t) → ε* → scores, all K classes plus the null class."""
    mixture, schedule = make_mixture(), NoiseSchedule()
    net = ScoreNet(AnalyticEps(mixture, schedule), 3, (1, 4, 4), schedule=schedule)
    x, _ = mixture.sample(8, torch.Generator().manual_seed(2), noise_std=sigma, dtype=torch.float64)
    scores = net.class_scores(x, sigma, include_null=True)  # [B, K+1, 1, 4, 4]
    assert scores.shape == (8, 4, 1, 4, 4) and net.forward_calls == 1
    for k in range(3):
        expected = mixture.score(x, torch.full((8,), k), noise_std=sigma)
        torch.testing.assert_close(scores[:, k], expected, rtol=1e-5, atol=1e-6 / sigma)
    torch.testing.assert_close(scores[:, 3], mixture.score(x, None, noise_std=sigma), rtol=1e-5, atol=1e-6 / sigma)
