"""Self-consistent losses: input and parameter gradients against autograd through a closed-form
posterior written here with torch ops, central finite differences, and the explicit docs/conventions.md §1 formula."""

import math

import pytest
import torch
from torch import nn

from datagrad import GaussianMixture, madry_distance, self_consistent_distance, self_consistent_kl

NUM_CLASSES, DIM = 3, 2


def closed_form_log_posterior(x: torch.Tensor, mixture: GaussianMixture) -> torch.Tensor:
    """log p_d(y|x) = log_softmax_y[log π_y − d/2 log(2π s_y²) − ||x − μ_y||²/(2 s_y²)], differentiable: [B, K]."""
    flat = x.flatten(1)
    variances = mixture.stds**2
    sq_dist = (flat[:, None, :] - mixture.means).pow(2).sum(-1)
    log_likelihood = -0.5 * flat.shape[1] * torch.log(2 * math.pi * variances) - sq_dist / (2 * variances)
    return (mixture.priors.log() + log_likelihood).log_softmax(dim=1)


CLOSED_FORM_DISTANCES = {
    "kl": lambda log_p, log_q: (log_p.exp() * (log_p - log_q)).sum(1),
    "l1": lambda log_p, log_q: (log_p.exp() - log_q.exp()).abs().sum(1),
    "l2": lambda log_p, log_q: (log_p.exp() - log_q.exp()).pow(2).sum(1).sqrt(),
    "se": lambda log_p, log_q: (log_p.exp() - log_q.exp()).pow(2).sum(1),
}


@pytest.fixture
def mixture() -> GaussianMixture:
    return GaussianMixture([[0.0, 1.0], [1.5, -0.5], [-1.0, -1.0]], [0.6, 1.0, 1.4], [0.2, 0.3, 0.5])


@pytest.fixture
def model() -> nn.Module:
    return nn.Sequential(nn.Linear(DIM, 16), nn.Tanh(), nn.Linear(16, NUM_CLASSES)).double()


@pytest.fixture
def x() -> torch.Tensor:
    return 1.5 * torch.randn(6, DIM, dtype=torch.float64)


def closed_form_loss(model: nn.Module, mixture: GaussianMixture, name: str, detach_data: bool = False):
    """x -> D(p_d(·|x) || p_θ(·|x)) through the closed-form posterior (p_d held fixed if ``detach_data``)."""

    def loss(z: torch.Tensor) -> torch.Tensor:
        log_p_data = closed_form_log_posterior(z, mixture)
        return CLOSED_FORM_DISTANCES[name](log_p_data.detach() if detach_data else log_p_data, model(z).log_softmax(1))

    return loss


def input_gradient(fn, x: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(fn(x).sum(), x)
    return grad


def parameter_gradients(loss: torch.Tensor, model: nn.Module) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss.sum(), list(model.parameters())))


def per_class_jacobian(fn, x: torch.Tensor) -> torch.Tensor:
    """∇_x fn(x)_y for fn: [B, D] -> [B, K] acting row-wise: [B, K, D]."""
    x = x.detach().requires_grad_(True)
    out = fn(x)
    rows = [torch.autograd.grad(out[:, k].sum(), x, retain_graph=True)[0] for k in range(out.shape[1])]
    return torch.stack(rows, dim=1)


def facts_kl_gradient(log_p_data: torch.Tensor, log_p_model: torch.Tensor, grad_data, grad_model) -> torch.Tensor:
    """docs/conventions.md §1: Σ_y p_d [−∇ log p_θ(y) + log(p_d/p_θ)(y) ∇ log p_d(y)]; logs [B, K], gradients
    [B, K, D] -> [B, D]."""
    p_data = log_p_data.exp()
    log_ratio = log_p_data - log_p_model
    return torch.einsum("bk,bkd->bd", p_data, -grad_model + log_ratio[..., None] * grad_data)


def test_kl_value_matches_closed_form(model, mixture, x):
    torch.testing.assert_close(self_consistent_kl(model, x, mixture), closed_form_loss(model, mixture, "kl")(x))


def test_kl_input_gradient_matches_autograd_through_closed_form(model, mixture, x):
    got = input_gradient(lambda z: self_consistent_kl(model, z, mixture), x)
    expected = input_gradient(closed_form_loss(model, mixture, "kl"), x)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    # The data-gradient term is not negligible here: dropping it changes the answer.
    model_term_only = input_gradient(closed_form_loss(model, mixture, "kl", detach_data=True), x)
    assert (got - model_term_only).abs().max() > 1e-2


class AutogradPosterior:
    """The closed form as a differentiable posterior (as a posterior network is); records each input it is given."""

    differentiable = True

    def __init__(self, mixture):
        self.mixture, self.num_classes, self.inputs = mixture, mixture.num_classes, []

    def log_posterior(self, z):
        self.inputs.append(z)
        return closed_form_log_posterior(z, self.mixture)


@pytest.mark.parametrize("differentiable", [False, True])
@pytest.mark.parametrize("name", ["kl", "l1", "l2", "se"])
def test_stopped_data_gradient_keeps_the_value_and_only_the_model_term(model, mixture, x, name, differentiable):
    """data_gradient=False: same value, input gradient of D(sg p_d || p_θ) by autograd through the closed form; a
    differentiable posterior is given the detached input (no graph through it)."""
    posterior = AutogradPosterior(mixture) if differentiable else mixture
    stopped = lambda z: self_consistent_distance(model, z, posterior, name, data_gradient=False)
    torch.testing.assert_close(stopped(x.requires_grad_(True)), self_consistent_distance(model, x, mixture, name))
    if differentiable:
        assert not posterior.inputs[-1].requires_grad
    expected = input_gradient(closed_form_loss(model, mixture, name, detach_data=True), x)
    torch.testing.assert_close(input_gradient(stopped, x), expected, rtol=1e-10, atol=1e-12)


def test_kl_input_gradient_matches_central_differences(model, mixture, x):
    loss_fn = lambda z: self_consistent_kl(model, z, mixture)
    got = input_gradient(loss_fn, x)
    h = 1e-6
    finite = torch.zeros_like(x)
    with torch.no_grad():
        for i in range(DIM):
            step = torch.zeros_like(x)
            step[:, i] = h
            finite[:, i] = (loss_fn(x + step) - loss_fn(x - step)) / (2 * h)
    torch.testing.assert_close(got, finite, rtol=1e-6, atol=1e-8)


def test_kl_input_gradient_matches_the_facts_formula(model, mixture, x):
    got = input_gradient(lambda z: self_consistent_kl(model, z, mixture), x)
    log_p_data = closed_form_log_posterior(x, mixture)
    log_p_model = model(x).log_softmax(1).detach()
    grad_data = per_class_jacobian(lambda z: closed_form_log_posterior(z, mixture), x)
    grad_model = per_class_jacobian(lambda z: model(z).log_softmax(1), x)
    torch.testing.assert_close(got, facts_kl_gradient(log_p_data, log_p_model, grad_data, grad_model))


@pytest.mark.parametrize("name", ["kl", "l1", "l2", "se"])
def test_parameter_gradient_ignores_the_data_posterior(model, mixture, x, name):
    """θ enters only through p_θ: for KL the gradient is that of −Σ_y p_d log p_θ (soft-label cross-entropy)."""
    got = parameter_gradients(self_consistent_distance(model, x.requires_grad_(True), mixture, name), model)
    log_p_data = closed_form_log_posterior(x, mixture).detach()
    if name == "kl":
        reference = -(log_p_data.exp() * model(x).log_softmax(1)).sum(1)
    else:
        reference = CLOSED_FORM_DISTANCES[name](log_p_data, model(x).log_softmax(1))
    for g, e in zip(got, parameter_gradients(reference, model), strict=True):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("name", ["l1", "l2", "se"])
def test_other_distances_input_gradient_matches_closed_form(model, mixture, x, name):
    got = input_gradient(lambda z: self_consistent_distance(model, z, mixture, name), x)
    expected = input_gradient(closed_form_loss(model, mixture, name), x)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


class OffsetGradientPosterior:
    """A posterior whose data gradient is off by fixed per-class offsets c_y (rows no longer sum to zero
    under p_d, as for an imperfect score network). Records the order of calls."""

    def __init__(self, base: GaussianMixture, offsets: torch.Tensor):
        self.base, self.offsets, self.num_classes = base, offsets, base.num_classes
        self.calls: list[str] = []

    def log_posterior(self, x):
        self.calls.append("log_posterior")
        return self.base.log_posterior(x)

    def grad_log_posterior(self, x):
        self.calls.append("grad_log_posterior")
        return self.base.grad_log_posterior(x) + self.offsets


def test_inconsistent_data_gradient_is_centred(model, mixture, x):
    offsets = torch.randn(x.shape[0], NUM_CLASSES, DIM, dtype=torch.float64)
    posterior = OffsetGradientPosterior(mixture, offsets)
    got = input_gradient(lambda z: self_consistent_kl(model, z, posterior), x)
    assert posterior.calls == ["grad_log_posterior", "log_posterior"]

    log_p_data = closed_form_log_posterior(x, mixture).detach()
    raw = per_class_jacobian(lambda z: closed_form_log_posterior(z, mixture), x) + offsets  # [B, K, D]
    assert torch.einsum("bk,bkd->bd", log_p_data.exp(), raw).abs().max() > 1e-2  # inconsistent indeed
    centred = raw - torch.einsum("bk,bkd->bd", log_p_data.exp(), raw)[:, None]
    grad_model = per_class_jacobian(lambda z: model(z).log_softmax(1), x)
    log_p_model = model(x).log_softmax(1).detach()
    torch.testing.assert_close(got, facts_kl_gradient(log_p_data, log_p_model, centred, grad_model))
    assert not torch.allclose(got, facts_kl_gradient(log_p_data, log_p_model, raw, grad_model), atol=1e-4)


def test_posterior_gradient_is_skipped_when_x_needs_no_gradient(model, mixture, x):
    posterior = OffsetGradientPosterior(mixture, torch.zeros(x.shape[0], NUM_CLASSES, DIM, dtype=torch.float64))
    self_consistent_kl(model, x, posterior)
    assert posterior.calls == ["log_posterior"]


def test_image_shaped_inputs_with_a_conv_model():
    means = 0.5 * torch.randn(NUM_CLASSES, 64, dtype=torch.float64)
    mixture = GaussianMixture(means, [0.8, 1.0, 1.2], [0.3, 0.3, 0.4], event_shape=(1, 8, 8))
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 64, NUM_CLASSES)
    ).double()
    x = mixture.sample(4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)[0]
    assert x.shape == (4, 1, 8, 8)
    for name in ("kl", "se"):
        loss_fn = lambda z, name=name: self_consistent_distance(model, z, mixture, name)
        got = input_gradient(loss_fn, x)
        assert got.shape == x.shape
        expected = input_gradient(closed_form_loss(model, mixture, name), x)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
        h = 1e-6
        for _ in range(2):  # directional central differences
            direction = torch.randn_like(x)
            with torch.no_grad():
                finite = (loss_fn(x + h * direction) - loss_fn(x - h * direction)) / (2 * h)
            torch.testing.assert_close((got * direction).flatten(1).sum(1), finite, rtol=1e-6, atol=1e-8)


def test_madry_distance_holds_the_clean_posterior_fixed(model, mixture, x):
    x_adv = x + 0.3 * torch.randn_like(x)
    log_p_clean = mixture.log_posterior(x)
    got = input_gradient(lambda z: madry_distance(model, z, log_p_clean, "kl"), x_adv)
    reference = lambda z: CLOSED_FORM_DISTANCES["kl"](closed_form_log_posterior(x, mixture), model(z).log_softmax(1))
    torch.testing.assert_close(madry_distance(model, x_adv, log_p_clean, "kl"), reference(x_adv))
    torch.testing.assert_close(got, input_gradient(reference, x_adv))


def test_class_count_mismatch_raises(mixture, x):
    two_class_model = nn.Linear(DIM, 2).double()
    with pytest.raises(ValueError, match=r"class-count mismatch: model returns 2 logits .* 3 classes"):
        self_consistent_kl(two_class_model, x, mixture)
    with pytest.raises(ValueError, match="class-count mismatch"):
        madry_distance(two_class_model, x, mixture.log_posterior(x))
    with pytest.raises(ValueError, match=r"logits of shape \[B, K\]"):
        self_consistent_kl(lambda z: torch.zeros(z.shape[0], 3, 1, dtype=z.dtype), x, mixture)
    with pytest.raises(ValueError, match="unknown distance"):
        self_consistent_distance(nn.Linear(DIM, 3).double(), x, mixture, "kld")
