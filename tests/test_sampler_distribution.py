"""Every sampler, driven by the exact ε of a Gaussian mixture, draws the mixture: per-class means and variances
within Monte-Carlo bounds of the closed form, class proportions of null-class draws within binomial bounds of the
priors; an ε-predictor whose noise schedule or score is off by a constant factor fails the same checks.
Classifier-free guidance against an analytic ε-predictor that applies the guidance formula itself.

The target. Each diffusers sampler stops at its last timestep t_N and returns the denoised estimate E[x0 | x_{t_N}]
(DDPM/DDIM: the predicted x0 at t_N; DPM-Solver++: its first-order final step to σ = 0). For a Gaussian class
N(μ, s²I) observed with noise σ_N = σ(t_N) that is μ + s²/(s² + σ_N²)·(x̃ − μ), x̃ ~ N(μ, (s² + σ_N²)I), so an exact
solver draws N(μ, s⁴/(s² + σ_N²)·I): the class variance shrunk by s²/(s² + σ_N²). That factor matters: DPM-Solver++
with 20 steps ends at t = 50 (σ_N ≈ 0.088), which keeps only 32% of a std-0.06 class's variance.

ALLOWANCE is the samplers' own discretization error on top of that. By the exact linear-Gaussian recursion of their
update rules (computed once, outside the tests) DDPM's fixed reverse variance β̃ keeps 94.6–96.6% of the target
variance of these classes at 1000 steps, DDIM's Euler steps 96.3–97.6% at 500 steps (only 88–91% at its default 100,
hence 500 here); DPM-Solver++ at 50 steps measured within 2%.
"""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn

from datagrad import GaussianMixture
from scorenets import SAMPLERS, NoiseSchedule, ScoreNet, make_scheduler, sample

SHAPE = (1, 4, 4)
LOW, HIGH = [0.35] * 8, [0.65] * 8
MIXTURE = GaussianMixture(
    means=[LOW + HIGH, HIGH + LOW, [0.35, 0.65] * 8],  # any two classes differ by 0.3 in 8 pixels: > 8 stds apart
    stds=[0.06, 0.08, 0.1],  # means ± 3.5 stds stay in [0, 1]: the samplers' clamping is negligible
    priors=[0.5, 0.3, 0.2],
    event_shape=SHAPE,
)
K = MIXTURE.num_classes
STEPS = {"ddpm": 1000, "ddim": 500, "dpmsolver++": 50}
N_PER_LABEL = 400  # conditional draws per class, and as many null-class (unconditional) draws
Z = 4.5  # two-sided bound of every check, in standard errors
ALLOWANCE = 0.06  # relative discretization error allowed on variances (module docstring)


class MixtureNoisePredictor(nn.Module):
    """The exact ε-prediction of ``MIXTURE`` at diffusion state u_t, float timestep t and label y (K: unconditional).

    With σ = σ(t) (data units) and ᾱ = 1/(1 + 4σ²): x̃ = (u_t/sqrt(ᾱ) + 1)/2 and ε = −σ·∇ log p_σ(x̃ | y).
    ``sigma_scale`` ≠ 1 plays a schedule that is off by a constant factor (σ' = c·σ for both conversions),
    ``noise_scale`` ≠ 1 a score off by a constant factor.
    ``guidance`` = w makes label y return ε_u + w·(ε_y − ε_u) itself. ``null_value`` replaces the null class's ε.
    """

    def __init__(
        self,
        sigma_scale: float = 1.0,
        noise_scale: float = 1.0,
        guidance: float | None = None,
        null_value: float | None = None,
    ):
        super().__init__()
        self.schedule = NoiseSchedule()
        self.sigma_scale, self.noise_scale = sigma_scale, noise_scale
        self.guidance, self.null_value = guidance, null_value
        self.anchor = nn.Parameter(torch.zeros((), dtype=torch.float64), requires_grad=False)  # sets device, dtype
        self.labels_seen: list[Tensor] = []

    def forward(self, u_t: Tensor, t: Tensor, class_labels: Tensor) -> SimpleNamespace:
        self.labels_seen.append(class_labels.detach().clone())
        t = t.to(torch.float64)
        sigma = self.schedule.sigma_at(t) * self.sigma_scale  # [B]
        alpha_bar = 1.0 / (1.0 + 4.0 * sigma**2)
        x = (u_t.to(torch.float64) / alpha_bar.sqrt().view(-1, 1, 1, 1) + 1.0) / 2.0
        noise_pred = torch.empty_like(x)
        for value in sigma.unique():  # σ is shared within a sampler batch; loop in case it is not
            rows = sigma == value
            noise_pred[rows] = self._noise_pred(x[rows], class_labels[rows], float(value))
        return SimpleNamespace(sample=(self.noise_scale * noise_pred).to(u_t.dtype))

    def _noise_pred(self, x: Tensor, labels: Tensor, sigma: float) -> Tensor:
        conditional = -sigma * MIXTURE.score(x, labels.clamp(max=K - 1), sigma)
        unconditional = -sigma * MIXTURE.score(x, None, sigma)
        if self.guidance is not None:
            conditional = unconditional + self.guidance * (conditional - unconditional)
        if self.null_value is not None:
            unconditional = torch.full_like(unconditional, self.null_value)
        return torch.where((labels == K).view(-1, 1, 1, 1), unconditional, conditional)


def scorenet(**kwargs) -> ScoreNet:
    return ScoreNet(MixtureNoisePredictor(**kwargs), K, SHAPE).eval()


def last_sigma(sampler: str, steps: int) -> float:
    """σ(t_N) (data units) at the sampler's last timestep t_N."""
    t_last = make_scheduler(sampler, NoiseSchedule(), steps).timesteps[-1]
    return float(NoiseSchedule().sigma_at(t_last.to(torch.float64).view(1)))


def chi2_mean_bounds(dof: int, z: float) -> tuple[float, float]:
    """Bounds on χ²_dof/dof at ±z standard normal quantiles (Wilson–Hilferty: (χ²/dof)^(1/3) ~ N(1 − c, c),
    c = 2/(9·dof); accurate to ~1e-3 here)."""
    c = 2.0 / (9.0 * dof)
    return (1 - c - z * math.sqrt(c)) ** 3, (1 - c + z * math.sqrt(c)) ** 3


def moment_violations(x: Tensor, classes: Tensor, sigma_last: float, allowance: float = ALLOWANCE) -> list[str]:
    """The checks every class k of samples x [N, *SHAPE] (class of each row: ``classes``) fails, as messages:

    * per-pixel mean within Z standard errors of μ_k (target sd s_k² / sqrt(s_k² + σ_N²), module docstring), and
      the sum of the d squared errors (in standard errors) below the upper ±Z bound of χ²_d;
    * per-pixel variance / target within the χ²_{n−1}/(n−1) bounds at ±Z, widened by ``allowance``;
    * variance / target averaged over the d pixels (independent: χ²_{d(n−1)}/(d(n−1))) within the same bounds.
    """
    problems = []
    flat = x.flatten(1).to(torch.float64)
    for k in range(K):
        rows = flat[classes == k]
        n, d = rows.shape
        if n < 30:
            problems.append(f"class {k}: only {n} samples")
            continue
        std = float(MIXTURE.stds[k])
        target = std**4 / (std**2 + sigma_last**2)
        mean_z = (rows.mean(0) - MIXTURE.means[k]) / math.sqrt(target / n)
        if mean_z.abs().max() > Z:
            problems.append(f"class {k}: a pixel mean is {mean_z.abs().max():.1f} standard errors off")
        if mean_z.pow(2).sum() > d * chi2_mean_bounds(d, Z)[1]:
            problems.append(f"class {k}: pooled mean error {mean_z.pow(2).sum():.1f} (χ²_{d}) too large")
        ratio = rows.var(0) / target
        for name, value, dof in (("pixel", ratio, n - 1), ("pooled", ratio.mean(), d * (n - 1))):
            low, high = chi2_mean_bounds(dof, Z)
            low, high = (1 - allowance) * low, (1 + allowance) * high
            if not (low <= float(value.min()) and float(value.max()) <= high):
                problems.append(f"class {k}: {name} variance/target {value.min():.3f}..{value.max():.3f} outside "
                                f"[{low:.3f}, {high:.3f}]")
    return problems


def proportion_violations(classes: Tensor) -> list[str]:
    """Class counts of unconditional draws against Binomial(n, π_k), within Z standard deviations."""
    n = classes.numel()
    counts = torch.bincount(classes, minlength=K).to(torch.float64)
    expected = n * MIXTURE.priors
    z = (counts - expected) / (expected * (1 - MIXTURE.priors)).sqrt()
    return [f"class {k}: {int(counts[k])} of {n} draws, {z[k]:.1f} sd from {expected[k]:.0f}"
            for k in range(K) if abs(z[k]) > Z]


def draw(net: ScoreNet, sampler: str, per_label: int, labels: range, **kwargs) -> tuple[Tensor, Tensor]:
    """``per_label`` draws for each label in ``labels``, seeds 0, 1, ..."""
    y = torch.tensor(list(labels)).repeat_interleave(per_label)
    x = sample(net, y, list(range(len(y))), sampler=sampler, num_steps=STEPS[sampler], **kwargs)
    return x, y


@pytest.mark.slow
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampler_draws_the_mixture_from_exact_scores(sampler):
    """Conditional draws: each class's moments; null-class draws: the priors (classes by posterior argmax, which is
    the component here: classes lie > 8 stds apart) and each recovered class's moments."""
    x, y = draw(scorenet(), sampler, N_PER_LABEL, range(K + 1))
    assert float(((x == 0) | (x == 1)).double().mean()) < 1e-3  # clamped to [0, 1]: under 1 pixel in 1000
    sigma_last = last_sigma(sampler, STEPS[sampler])
    conditional = y < K
    assert moment_violations(x[conditional], y[conditional], sigma_last) == []
    recovered = MIXTURE.log_posterior(x[~conditional].to(torch.float64)).argmax(1)
    assert proportion_violations(recovered) == []
    assert moment_violations(x[~conditional], recovered, sigma_last) == []


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sampler", "sigma_scale", "noise_scale", "per_class"),
    [
        ("ddpm", 2.0, 1.0, 300),
        ("ddim", 1.3, 1.0, 150),
        ("dpmsolver++", 1.3, 1.0, 150),
        ("ddpm", 1.0, 1.3, 150),
        ("ddim", 1.0, 1.3, 150),
        ("dpmsolver++", 1.0, 1.3, 150),
    ],
)
def test_a_schedule_or_score_off_by_a_constant_factor_fails_the_moment_checks(
    sampler, sigma_scale, noise_scale, per_class
):
    """The same checks reject every class when the ε-predictor's σ(t) or its score is off by a constant factor.

    DDPM's ancestral steps largely correct a wrong σ: by the exact Gaussian recursion, σ·1.3 changes its output
    variance by under 4% and its means by under 0.005 (DDIM's variance: by 40–75%), which these sample sizes cannot
    see, so DDPM's schedule error here is σ·2 (variance +13–40%, means 0.010–0.015 off)."""
    x, y = draw(scorenet(sigma_scale=sigma_scale, noise_scale=noise_scale), sampler, per_class, range(K))
    problems = moment_violations(x, y, last_sigma(sampler, STEPS[sampler]))
    assert all(any(p.startswith(f"class {k}:") for p in problems) for k in range(K)), problems


def test_guidance_scale_one_is_the_conditional_model():
    """w = 1: the samples equal those of a model whose null class is NaN (so no null-class ε enters), and those of
    the guided path (one batched call over conditional and null labels) at w = 1 + 1e-9."""
    labels, seeds = [0, 1, 2, 0], [7, 8, 9, 10]
    no_null = sample(scorenet(null_value=float("nan")), labels, seeds, sampler="ddim", num_steps=20)
    assert bool(no_null.isfinite().all())
    net = scorenet()
    plain = sample(net, labels, seeds, sampler="ddim", num_steps=20, guidance_scale=1.0)
    assert all(bool((seen < K).all()) for seen in net.unet.labels_seen)  # the null class was never evaluated
    torch.testing.assert_close(plain, no_null, rtol=0, atol=0)
    net = scorenet()
    nearly = sample(net, labels, seeds, sampler="ddim", num_steps=20, guidance_scale=1.0 + 1e-9)
    assert all(bool((seen == K).sum() == len(labels)) for seen in net.unet.labels_seen)  # the guided path ran
    torch.testing.assert_close(nearly, no_null, rtol=0, atol=1e-7)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_guided_samples_follow_noise_pred_uncond_plus_w_times_the_difference(sampler):
    """w = 3 through ``sample`` equals w = 1 sampling of a model that returns ε_u + 3·(ε_y − ε_u) for label y;
    w = 0 equals sampling the unconditional model (the null class)."""
    labels, seeds = [0, 1, 2, 1], [3, 4, 5, 6]
    steps = 10
    guided = sample(scorenet(), labels, seeds, sampler=sampler, num_steps=steps, guidance_scale=3.0)
    by_hand = sample(scorenet(guidance=3.0), labels, seeds, sampler=sampler, num_steps=steps)
    torch.testing.assert_close(guided, by_hand, rtol=0, atol=1e-9)
    assert (guided - sample(scorenet(), labels, seeds, sampler=sampler, num_steps=steps)).abs().max() > 1e-3
    unconditional = sample(scorenet(), [K] * len(labels), seeds, sampler=sampler, num_steps=steps)
    zero = sample(scorenet(), labels, seeds, sampler=sampler, num_steps=steps, guidance_scale=0.0)
    torch.testing.assert_close(zero, unconditional, rtol=0, atol=1e-9)
