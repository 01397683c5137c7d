"""Training objectives against hand-written formulas (numpy / explicit torch) and a hand-written PGD loop (float64)."""

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from datagrad import PGD, GaussianMixture, uniform_in_ball
from trainlib.models import build_model
from trainlib.objectives import (
    OBJECTIVES,
    DirectScore,
    attack_mode,
    build_objective,
    fixed_posterior,
    se_clip_threshold,
    squared_error_to,
)

K = 3
SHAPE = (1, 4, 4)
ADVERSARIAL = [name for name in OBJECTIVES if name != "standard"]


def threat(norm="linf", eps=0.15, step_size=0.05, pgd_steps=4):
    return SimpleNamespace(norm=norm, eps=eps, step_size=step_size, pgd_steps=pgd_steps)


def make_mixture() -> GaussianMixture:
    means = torch.rand(K, 16, generator=torch.Generator().manual_seed(1)) * 0.6 + 0.2
    return GaussianMixture(means, stds=[0.2, 0.25, 0.3], priors=[0.3, 0.3, 0.4], event_shape=SHAPE)


@pytest.fixture
def setup():
    mixture = make_mixture()
    x, y = mixture.sample(12, torch.Generator().manual_seed(2), dtype=torch.float64)
    model = build_model("mlp", K, in_channels=1, image_size=4).double()
    return mixture, x.clamp(0, 1), y, model


def build(name, mixture, **options):
    return build_objective(name, threat(**options.pop("threat", {})), posterior_provider=fixed_posterior(mixture),
                           **options)


def run(objective, model, x, y, seed=0, attack_model=None):
    return objective(model, model if attack_model is None else attack_model, x, y, torch.Generator().manual_seed(seed))


# -- independent formulas ------------------------------------------------------------------------------------


def np_softmax(logits: torch.Tensor) -> np.ndarray:
    z = logits.detach().numpy()
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def np_targets(y: torch.Tensor, smoothing: float) -> np.ndarray:
    t = np.full((len(y), K), smoothing / (K - 1))
    t[np.arange(len(y)), y.numpy()] = 1 - smoothing
    return t


def np_ce(p, t):
    return -(t * np.log(p)).sum(axis=1)


def np_kl(p, q):
    return (p * (np.log(p) - np.log(q))).sum(axis=1)


def np_se(p, q):
    return ((p - q) ** 2).sum(axis=1)


def reference_attack_loss(name, model, mixture, x, y, data_gradient=True):
    """The loss each attack should maximize, written with explicit torch ops: z [B, ...] -> [B]."""
    with torch.no_grad():
        p_clean = model(x).softmax(dim=1)
    one_hot = torch.eye(K, dtype=x.dtype)[y]

    def loss(z):
        log_q = model(z).log_softmax(dim=1)
        if name == "pgd-at":
            return -log_q[torch.arange(len(y)), y]
        if name == "trades-kl":
            return (p_clean * (p_clean.log() - log_q)).sum(dim=1)
        if name == "trades-se":
            return ((log_q.exp() - p_clean) ** 2).sum(dim=1)
        if name == "pgd-at-se":
            return ((log_q.exp() - one_hot) ** 2).sum(dim=1)
        log_p_data = mixture.log_posterior(z)  # autograd through the closed form: the full data gradient
        log_p_data = log_p_data if data_gradient else log_p_data.detach()
        return (log_p_data.exp() * (log_p_data - log_q)).sum(dim=1)

    return loss


def hand_written_pgd(loss_fn, x, eps, step_size, steps, norm, generator):
    """Projected ascent from a uniform start, ℓ∞ sign steps or ℓ2 normalised steps, clamped to [0, 1]."""

    def project(delta):
        if norm == "linf":
            return delta.clamp(-eps, eps)
        norms = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        return delta * torch.clamp(eps / norms, max=1.0)

    x_adv = (x + project(uniform_in_ball(x, eps, norm, generator))).clamp(0, 1)
    for _ in range(steps):
        z = x_adv.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_fn(z).sum(), z)
        direction = grad.sign() if norm == "linf" else grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        x_adv = (x + project(x_adv + step_size * direction - x)).clamp(0, 1)
    return x_adv


def reference_loss(name, model, mixture, x, x_adv, y, beta):
    """The training loss at the returned x', in numpy from the logits."""
    p, q = np_softmax(model(x)), np_softmax(model(x_adv))
    t = np_targets(y, 0.0)
    if name == "pgd-at":
        return np_ce(q, t).mean()
    if name == "trades-kl":
        return np_ce(p, t).mean() + beta * np_kl(p, q).mean()
    if name == "trades-se":
        return np_se(p, t).mean() + beta * np_se(q, p).mean()
    if name == "pgd-at-se":
        return np_se(q, t).mean()
    p_data = mixture.log_posterior(x_adv).exp().numpy()
    return np_kl(p_data, q).mean()


# -- tests -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_standard_is_cross_entropy_with_smoothed_labels(setup, smoothing):
    _, x, y, model = setup
    out = run(build_objective("standard", label_smoothing=smoothing), model, x, y)
    expected = np_ce(np_softmax(model(x)), np_targets(y, smoothing)).mean()
    np.testing.assert_allclose(out.loss.item(), expected, rtol=1e-12)
    if smoothing == 0:
        np.testing.assert_allclose(out.loss.item(), F.cross_entropy(model(x), y).item(), rtol=1e-12)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("name", ADVERSARIAL)
def test_attack_and_loss_match_hand_written_versions(setup, name, norm):
    mixture, x, y, model = setup
    eps, step_size = (0.15, 0.05) if norm == "linf" else (0.6, 0.2)
    beta = 3.0
    options = {"beta": beta} if name.startswith("trades") else {}
    out = run(build(name, mixture, threat={"norm": norm, "eps": eps, "step_size": step_size}, **options), model, x, y)

    expected_adv = hand_written_pgd(reference_attack_loss(name, model, mixture, x, y), x, eps, step_size, 4, norm,
                                    torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.x_adv, expected_adv, rtol=0, atol=1e-10)
    assert not torch.equal(out.x_adv, x)
    np.testing.assert_allclose(out.loss.item(), reference_loss(name, model, mixture, x, out.x_adv, y, beta),
                               rtol=1e-10)


def np_attack_loss(name, model, mixture, x, z, y):
    """Each attack's loss at z in numpy from the logits (p_d from the closed form): [B]."""
    with torch.no_grad():
        p, q, one_hot = np_softmax(model(x)), np_softmax(model(z)), np_targets(y, 0.0)
        p_data = mixture.log_posterior(z).exp().numpy()
    return {"pgd-at": np_ce(q, one_hot), "trades-kl": np_kl(p, q), "trades-se": np_se(q, p),
            "pgd-at-se": np_se(q, one_hot), "direct-score": np_kl(p_data, q)}[name]


@pytest.mark.parametrize("name", ADVERSARIAL)
def test_attack_starts_train_on_the_best_of_hand_written_attacks(setup, name):
    """attack_starts = 2: two hand-written PGDs from consecutive uniform starts of one generator; per example the
    last iterate with the larger attack loss (numpy); the training loss is read there."""
    mixture, x, y, model = setup
    out = run(build(name, mixture, attack_starts=2, **({"beta": 3.0} if name.startswith("trades") else {})),
              model, x, y, seed=4)
    generator = torch.Generator().manual_seed(4)
    first, second = (hand_written_pgd(reference_attack_loss(name, model, mixture, x, y), x, 0.15, 0.05, 4, "linf",
                                      generator) for _ in range(2))
    second_wins = torch.from_numpy(np_attack_loss(name, model, mixture, x, second, y)
                                   > np_attack_loss(name, model, mixture, x, first, y))
    assert 0 < second_wins.sum() < len(x)  # both starts are kept somewhere: the selection is exercised
    expected = torch.where(second_wins.view(-1, 1, 1, 1), second, first)
    torch.testing.assert_close(out.x_adv, expected, rtol=0, atol=1e-10)
    np.testing.assert_allclose(out.loss.item(), reference_loss(name, model, mixture, x, expected, y, 3.0), rtol=1e-10)


def test_se_loss_gradient_matches_closed_form(float64):
    logits = torch.randn(6, K, requires_grad=True)
    targets = torch.from_numpy(np_targets(torch.tensor([0, 1, 2, 2, 1, 0]), 0.1))
    loss = squared_error_to(logits, targets)
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    p, t = np_softmax(logits), targets.numpy()
    np.testing.assert_allclose(loss.detach().numpy(), np_se(p, t), rtol=1e-12)
    # ∂/∂z_j Σ_k (p_k − t_k)² = 2 p_j [(p_j − t_j) − Σ_k (p_k − t_k) p_k]
    expected = 2 * p * ((p - t) - ((p - t) * p).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(grad.numpy(), expected, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name", ["trades-se", "trades-kl"])
def test_trades_gradient_flows_through_clean_and_adversarial_predictions(setup, name):
    mixture, x, y, model = setup
    beta = 3.0
    out = run(build(name, mixture, beta=beta), model, x, y)
    params = list(model.parameters())
    full = torch.autograd.grad(out.loss, params)

    def robust(log_p, log_q):  # D(p || q) per example
        if name == "trades-se":
            return ((log_p.exp() - log_q.exp()) ** 2).sum(dim=1)
        return (log_p.exp() * (log_p - log_q)).sum(dim=1)

    log_p, log_q = model(x).log_softmax(dim=1), model(out.x_adv).log_softmax(dim=1)
    one_hot = torch.eye(K, dtype=x.dtype)[y]
    clean = ((log_p.exp() - one_hot) ** 2).sum(dim=1) if name == "trades-se" else -(one_hot * log_p).sum(dim=1)
    parts = {
        "clean": clean.mean(),
        "through_adv": beta * robust(log_p.detach(), log_q).mean(),
        "through_clean": beta * robust(log_p, log_q.detach()).mean(),
    }
    grads = {k: torch.autograd.grad(v, params, retain_graph=True) for k, v in parts.items()}
    flat = {k: torch.cat([g.flatten() for g in v]) for k, v in grads.items()}
    full_flat = torch.cat([g.flatten() for g in full])
    torch.testing.assert_close(full_flat, flat["clean"] + flat["through_adv"] + flat["through_clean"])
    for dropped in ("through_adv", "through_clean"):  # removing either path changes the gradient
        assert (full_flat - flat[dropped]).sub(full_flat).norm() > 1e-3 * full_flat.norm()


def test_clip_threshold_is_se_of_the_margin_prediction():
    for c, k in [(0.3, 10), (0.4, 10), (0.3, 100), (0.5, 2)]:
        margin = np.full(k, c / (k - 1))
        margin[0] = 1 - c
        np.testing.assert_allclose(se_clip_threshold(c, k), np_se(margin[None], np.eye(k)[:1])[0], rtol=1e-12)


@pytest.mark.parametrize("name,scope", [("pgd-at-se", "total"), ("trades-se", "total"), ("trades-se", "robust")])
def test_clipped_se_losses_match_numpy(setup, name, scope):
    mixture, x, y, model = setup
    beta = 2.0
    options = {"beta": beta, "clip_scope": scope} if name == "trades-se" else {}
    unclipped = run(build(name, mixture, **options), model, x, y)
    p, q, t = np_softmax(model(x)), np_softmax(model(unclipped.x_adv)), np_targets(y, 0.0)
    if name == "pgd-at-se":
        clippable, rest = np_se(q, t), 0.0
    elif scope == "total":
        clippable, rest = np_se(p, t) + beta * np_se(q, p), 0.0
    else:
        clippable, rest = beta * np_se(q, p), np_se(p, t)
    # choose c so that the clip is active for some examples and not for others
    tau_target = np.median(clippable / (beta if scope == "robust" else 1.0))
    c = float(np.sqrt(tau_target * (K - 1) / K))
    tau = se_clip_threshold(c, K)
    scale = beta if (name == "trades-se" and scope == "robust") else 1.0
    clipped_mask = clippable / scale < tau
    assert clipped_mask.any() and not clipped_mask.all()
    expected = (rest + scale * np.maximum(clippable / scale - tau, 0.0)).mean()

    out = run(build(name, mixture, clip=c, **options), model, x, y)
    torch.testing.assert_close(out.x_adv, unclipped.x_adv)  # the clip changes the outer loss only
    np.testing.assert_allclose(out.loss.item(), expected, rtol=1e-10)


def test_direct_score_outer_loss_is_soft_label_ce_plus_constant(setup):
    mixture, x, y, model = setup
    out = run(build("direct-score", mixture), model, x, y)
    p_data = mixture.log_posterior(out.x_adv).exp()  # [B, K], independent of the objective
    log_q = model(out.x_adv).log_softmax(dim=1)
    soft_ce = -(p_data * log_q).sum(dim=1).mean()
    entropy = -(p_data * p_data.log()).sum(dim=1).mean()
    np.testing.assert_allclose(out.loss.item(), (soft_ce - entropy).item(), rtol=1e-10)
    params = list(model.parameters())
    for g_loss, g_ce in zip(torch.autograd.grad(out.loss, params), torch.autograd.grad(soft_ce, params), strict=True):
        torch.testing.assert_close(g_loss, g_ce)


def test_direct_score_attack_through_the_model_only(setup):
    """attack_gradient="model": PGD on D(sg p_d(·|z) || p_θ(·|z)); a different path from the full gradient's."""
    mixture, x, y, model = setup
    threat = {"norm": "linf", "eps": 0.15, "step_size": 0.05}
    out = run(build("direct-score", mixture, threat=threat, attack_gradient="model"), model, x, y)
    expected_adv = hand_written_pgd(reference_attack_loss("direct-score", model, mixture, x, y, data_gradient=False),
                                    x, 0.15, 0.05, 4, "linf", torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.x_adv, expected_adv, rtol=0, atol=1e-10)
    full = run(build("direct-score", mixture, threat=threat), model, x, y)
    assert not torch.equal(out.x_adv, full.x_adv)
    np.testing.assert_allclose(out.loss.item(), reference_loss("direct-score", model, mixture, x, out.x_adv, y, 0.0),
                               rtol=1e-10)


def test_direct_score_attack_increases_score_kl(setup):
    mixture, x, y, model = setup
    out = run(build("direct-score", mixture, threat={"pgd_steps": 10}), model, x, y)

    def score_kl(z):  # KL(p_d(·|z) || p_θ(·|z)), independently
        with torch.no_grad():
            return np_kl(mixture.log_posterior(z).exp().numpy(), np_softmax(model(z)))

    clean, adv = score_kl(x), score_kl(out.x_adv)
    random_points = (x + uniform_in_ball(x, 0.15, "linf", torch.Generator().manual_seed(5))).clamp(0, 1)
    assert (adv > clean).all()
    assert adv.mean() > score_kl(random_points).mean() + 0.5 * (adv.mean() - clean.mean())


def reference_data_margin(mixture, y):
    """−[log p_d(y|z) − max_{k≠y} log p_d(k|z)] with explicit torch ops: z [B, ...] -> [B]."""
    def loss(z):
        log_p = mixture.log_posterior(z)
        own = log_p.gather(1, y[:, None])[:, 0]
        return log_p.masked_fill(F.one_hot(y, K).bool(), -torch.inf).amax(dim=1) - own
    return loss


@pytest.mark.parametrize("second", ["data-margin", "label-ce"])
def test_direct_score_with_a_second_attack_trains_on_the_point_of_larger_distance(setup, second):
    """attack_losses ("distance", second): two PGDs from consecutive random starts of one generator, the second on
    p_d's margin or on −log p_θ(y|x') (PGD-AT's attack); per example the last iterate with the larger
    KL(p_d(·|x') || p_θ(·|x')), computed here in numpy."""
    mixture, x, y, model = setup
    out = run(build("direct-score", mixture, attack_losses=("distance", second)), model, x, y, seed=4)
    generator = torch.Generator().manual_seed(4)
    on_distance = hand_written_pgd(reference_attack_loss("direct-score", model, mixture, x, y), x, 0.15, 0.05, 4,
                                   "linf", generator)
    second_loss = (reference_data_margin(mixture, y) if second == "data-margin"
                   else reference_attack_loss("pgd-at", model, mixture, x, y))
    on_margin = hand_written_pgd(second_loss, x, 0.15, 0.05, 4, "linf", generator)

    def score_kl(z):
        with torch.no_grad():
            return np_kl(mixture.log_posterior(z).exp().numpy(), np_softmax(model(z)))

    margin_wins = torch.from_numpy(score_kl(on_margin) > score_kl(on_distance))
    assert 0 < margin_wins.sum() < len(x)  # both attacks are kept somewhere: the selection is exercised
    expected = torch.where(margin_wins.view(-1, 1, 1, 1), on_margin, on_distance)
    torch.testing.assert_close(out.x_adv, expected, rtol=0, atol=1e-10)
    np.testing.assert_allclose(out.loss.item(), np.maximum(score_kl(on_margin), score_kl(on_distance)).mean(),
                               rtol=1e-10)


def test_data_margin_attack_reaches_the_closed_form_maximizer():
    """Two isotropic Gaussians with one std and equal priors: log p_d(y|x) − log p_d(k|x) = (μ_y − μ_k)·x / s² + c is
    linear, so over B_∞(x, ε) ∩ [0, 1] it is lowest at clamp(x − ε·sign(μ_y − μ_k)); PGD reaches it exactly."""
    means = torch.tensor([[0.3] * 8 + [0.7] * 8, [0.6] * 4 + [0.4] * 12], dtype=torch.float64)
    mixture = GaussianMixture(means, stds=[0.2, 0.2], priors=[0.5, 0.5], event_shape=SHAPE)
    x, y = mixture.sample(32, torch.Generator().manual_seed(6), dtype=torch.float64)
    x = x.clamp(0, 1)
    model = build_model("mlp", 2, in_channels=1, image_size=4).double()
    objective = build_objective("direct-score", threat(eps=0.1, step_size=0.05, pgd_steps=8),
                                attack_losses=("data-margin",), posterior_provider=fixed_posterior(mixture))
    x_adv = objective.inner_max(model, x, y, mixture, torch.Generator().manual_seed(0))
    direction = (means[y] - means[1 - y]).sign().view_as(x)
    torch.testing.assert_close(x_adv, (x - 0.1 * direction).clamp(0, 1), rtol=0, atol=1e-12)


class CountingPosterior:
    """Wraps a posterior and records the calls the direct-SCORE objective makes."""

    def __init__(self, posterior):
        self.posterior, self.num_classes, self.calls = posterior, posterior.num_classes, []

    def log_posterior(self, x):
        self.calls.append(("log", x.clone()))
        return self.posterior.log_posterior(x)

    def grad_log_posterior(self, x):
        self.calls.append(("grad", x.clone()))
        return self.posterior.grad_log_posterior(x)


@pytest.mark.parametrize("clean_loss", [None, "ce", "score"])
def test_direct_score_posterior_call_contract(setup, clean_loss):
    mixture, x, y, model = setup
    posteriors = []

    def provider(xb, yb):
        posteriors.append(CountingPosterior(mixture))
        return posteriors[-1]

    options = {} if clean_loss is None else {"clean_weight": 0.5, "clean_loss": clean_loss}
    objective = build_objective("direct-score", threat(pgd_steps=3), posterior_provider=provider, **options)
    out = run(objective, model, x, y)
    assert len(posteriors) == 1
    kinds = [kind for kind, _ in posteriors[0].calls]
    prefix = ["log"] if clean_loss == "score" else []
    assert kinds == [*prefix, "grad", "log", "grad", "log", "grad", "log", "log"]
    if clean_loss == "score":
        torch.testing.assert_close(posteriors[0].calls[0][1], x)  # the clean point, before the attack
    torch.testing.assert_close(posteriors[0].calls[-1][1], out.x_adv)  # the final iterate, no extra grad call
    if clean_loss is not None:
        log_p = model(x).log_softmax(dim=1)
        if clean_loss == "ce":
            clean = F.cross_entropy(model(x), y)
        else:
            p_data = mixture.log_posterior(x).exp()
            clean = (p_data * (p_data.log() - log_p)).sum(dim=1).mean()
        np.testing.assert_allclose(out.stats["loss_clean"].item(), clean.item(), rtol=1e-10)
        np.testing.assert_allclose(out.loss.item(), (out.stats["loss_robust"] + 0.5 * clean).item(), rtol=1e-10)


class CountingWrapper(torch.nn.Module):
    """Stands in for the DDP wrapper: counts the forward passes made through it."""

    def __init__(self, module):
        super().__init__()
        self.module, self.calls = module, 0

    def forward(self, x):
        self.calls += 1
        return self.module(x)


@pytest.mark.parametrize("name", OBJECTIVES)
def test_attacks_use_the_unwrapped_model_and_leave_state_alone(name):
    mixture = make_mixture()
    x, y = mixture.sample(16, torch.Generator().manual_seed(3))
    model = build_model("cnn-small-bn", K, in_channels=1, image_size=4).train()
    model.features[1].eval()  # a module in a different mode must get its own mode back
    frozen = model.head.bias
    frozen.requires_grad_(False)
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0) if p.requires_grad else None
    wrapper = CountingWrapper(model)

    out = run(build(name, mixture) if name != "standard" else build_objective(name), wrapper, x.clamp(0, 1), y,
              attack_model=model)

    expected_calls = {"standard": 1, "pgd-at": 1, "pgd-at-se": 1, "direct-score": 1}.get(name, 2)
    assert wrapper.calls == expected_calls  # the loss's forward passes go through the wrapper, the attack's do not
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters() if p.requires_grad)
    assert frozen.grad is None and not frozen.requires_grad
    assert all(p.requires_grad for p in model.parameters() if p is not frozen)
    assert model.training and not model.features[1].training
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert out.loss.dim() == 0 and out.loss.requires_grad
    assert all(v.dim() == 0 and not v.requires_grad for v in out.stats.values())


@pytest.mark.parametrize("name", OBJECTIVES)
def test_every_parameter_is_in_the_graph(name):
    mixture = make_mixture()
    x, y = mixture.sample(16, torch.Generator().manual_seed(4))
    model = build_model("cnn-small-bn", K, in_channels=1, image_size=4).train()
    options = {"clean_weight": 1.0} if name == "direct-score" else {}
    objective = build(name, mixture, **options) if name != "standard" else build_objective(name)
    run(objective, model, x.clamp(0, 1), y).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("bn_mode", ["eval", "batch"])
def test_attack_mode_bn_statistics(bn_mode):
    model = build_model("cnn-small-bn", K, in_channels=1, image_size=4).train()
    x = torch.rand(8, *SHAPE)
    model(x)  # move running statistics away from their initial values
    reference = copy.deepcopy(model)
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    with attack_mode(model, bn_mode):
        inside = model(x)
        assert not any(p.requires_grad for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, buffers[k]), f"{k} changed during the attack"
    expected = reference.train(bn_mode == "batch")(x)  # batch: batch statistics; eval: running statistics
    torch.testing.assert_close(inside, expected)
    other = reference.train(bn_mode != "batch")(x)
    assert not torch.allclose(inside, other)


def test_build_objective_rejects_bad_input():
    mixture = make_mixture()
    with pytest.raises(ValueError, match=r"unknown objective 'trades'.*trades-kl.*direct-score"):
        build_objective("trades", threat())
    with pytest.raises(ValueError, match="posterior provider"):
        build_objective("direct-score", threat())
    with pytest.raises(ValueError, match="needs a threat model"):
        build_objective("pgd-at")
    with pytest.raises(ValueError, match="eps and step_size must be > 0"):
        build_objective("pgd-at", threat(eps=0.0))
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        build_objective("trades-se", threat(pgd_steps=0))
    with pytest.raises(ValueError, match="unknown norm"):
        build_objective("trades-se", threat(norm="l1"))
    with pytest.raises(ValueError, match="missing step_size"):
        build_objective("pgd-at", SimpleNamespace(norm="linf", eps=0.1, pgd_steps=3))
    with pytest.raises(ValueError, match="clip applies only"):
        build_objective("trades-kl", threat(), clip=0.3)
    with pytest.raises(ValueError, match="unknown distance"):
        build_objective("direct-score", threat(), distance="js", posterior_provider=fixed_posterior(mixture))
    with pytest.raises(ValueError, match="label_smoothing"):
        build_objective("standard", label_smoothing=1.0)
    with pytest.raises(ValueError, match="attack BN mode"):
        build_objective("pgd-at", threat(), attack_bn="train")
    with pytest.raises(ValueError, match="unknown attack gradient 'data'"):
        build_objective("direct-score", threat(), attack_gradient="data", posterior_provider=fixed_posterior(mixture))
    with pytest.raises(ValueError, match="attack_gradient 'model' is used by direct-score only, not 'trades-se'"):
        build_objective("trades-se", threat(), attack_gradient="model")
    with pytest.raises(ValueError, match="unknown attack loss 'label-margin'"):
        build_objective("direct-score", threat(), attack_losses=("distance", "label-margin"),
                        posterior_provider=fixed_posterior(mixture))
    with pytest.raises(ValueError, match="attack_losses needs at least one"):
        build_objective("direct-score", threat(), attack_losses=(), posterior_provider=fixed_posterior(mixture))
    with pytest.raises(ValueError, match=r"attack_losses \['data-margin'\] are used by direct-score only"):
        build_objective("pgd-at", threat(), attack_losses=("data-margin",))
    with pytest.raises(ValueError, match="repeat an attack; several starts of one attack are attack_starts"):
        build_objective("direct-score", threat(), attack_losses=("distance", "distance"),
                        posterior_provider=fixed_posterior(mixture))
    with pytest.raises(ValueError, match=r"attack_starts must be an integer >= 1 .* got 2 for 'standard'"):
        build_objective("standard", attack_starts=2)
    with pytest.raises(ValueError, match=r"attack_starts must be an integer >= 1 .* got 0 for 'pgd-at'"):
        build_objective("pgd-at", threat(), attack_starts=0)
    model = build_model("mlp", K, in_channels=1, image_size=4)
    with pytest.raises(ValueError, match="integer labels"):
        build_objective("standard")(model, model, torch.rand(4, *SHAPE), torch.rand(4))
    with pytest.raises(ValueError, match="keep_best=False"):
        DirectScore(attack=PGD(0.1, 0.03, 3, keep_best=True), posterior_provider=fixed_posterior(mixture))
    wrong_k = GaussianMixture(torch.rand(2, 16), [0.3, 0.3], [0.5, 0.5], SHAPE)
    with pytest.raises(ValueError, match="class-count mismatch"):
        build(name="direct-score", mixture=wrong_k)(model, model, torch.rand(4, *SHAPE), torch.zeros(4).long())


@pytest.mark.parametrize("name", ["standard", "trades-se", "direct-score"])
def test_objectives_run_under_bf16_autocast_with_float32_losses(name):
    mixture = make_mixture()
    x, y = mixture.sample(8, torch.Generator().manual_seed(6))
    model = build_model("cnn-small-bn", K, in_channels=1, image_size=4).train()
    objective = build(name, mixture, label_smoothing=0.1) if name != "standard" else build_objective(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(objective, model, x.clamp(0, 1), y)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
