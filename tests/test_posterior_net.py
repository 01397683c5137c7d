"""The posterior network and its DLSM loss: the σ conditioning, save/load, the differentiable data posterior against
finite differences, the loss's conventions against an EXACT Gaussian mixture (the classifier-guided ε of the exact
posterior is the exact class-conditional ε, and the exact posterior minimises the expected loss), training through
the command line (resume included), and a trained network against the closed form."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from datagrad import autograd_grad_log_posterior, toy_mixture
from scorenets import NoiseSchedule, PosteriorNetPosterior, build_posterior_net, dlsm_loss
from scorenets.noise import to_data_range
from trainlib.checkpoint import load_weights
from trainlib.datasets import load_dataset
from trainlib.posterior_training import PosteriorNetConfig, load_posterior_net, train

ROOT = Path(__file__).resolve().parent.parent


def tiny_net(num_classes=3, shape=(1, 4, 4)):
    return build_posterior_net("tiny8", num_classes, shape, 0.05, 1.0, block_out_channels=(8, 16), norm_num_groups=4)


# -- exact stand-ins on a Gaussian mixture with per-example σ ---------------------------------------------------------
class ExactMixture:
    """p_σ(y|x̃) and class scores of ``toy_mixture(name)`` at a per-example noise std σ [B]."""

    def __init__(self, name="gmm-4x4"):
        self.mixture = toy_mixture(name)
        self.num_classes = self.mixture.num_classes

    def _terms(self, x, sigma):
        flat = x.flatten(1).double()
        means = self.mixture.means.to(flat)  # [K, d]
        variances = self.mixture.stds.to(flat) ** 2 + sigma.double().view(-1, 1) ** 2  # [B, K]
        sq = (flat.unsqueeze(1) - means).pow(2).sum(-1)  # [B, K]
        log_joint = self.mixture.priors.log().to(flat) - 0.5 * flat.shape[1] * torch.log(2 * math.pi * variances) \
            - sq / (2 * variances)
        class_scores = -(flat.unsqueeze(1) - means) / variances.unsqueeze(-1)  # [B, K, d]
        return log_joint, class_scores

    def logits(self, x, sigma):
        return self._terms(x, sigma)[0]

    def predict_noise(self, u_t, t, labels, schedule):
        """The exact ε = −σ·∇ log p_σ(x̃|y) (y = K: the marginal) at the diffusion state u_t."""
        alpha_bar = schedule.alpha_bar_at(t).double().view(-1, 1, 1, 1)
        sigma = schedule.sigma_at(t.double())
        x_noisy = to_data_range(u_t.double() / alpha_bar.sqrt())
        log_joint, class_scores = self._terms(x_noisy, sigma)
        marginal = torch.einsum("bk,bkd->bd", log_joint.softmax(1), class_scores)
        rows = torch.arange(len(labels))
        score = torch.where((labels == self.num_classes).view(-1, 1), marginal,
                            class_scores[rows, labels.clamp(max=self.num_classes - 1)])
        return (-sigma.view(-1, 1) * score).reshape(u_t.shape).to(u_t.dtype)


class TemperedExact(nn.Module):
    """logits = τ · log p_σ(·|x̃): the exact posterior at τ = 1."""

    def __init__(self, exact, tau):
        super().__init__()
        self.exact, self.tau = exact, tau

    def forward(self, x, sigma):
        return self.tau * self.exact.logits(x, sigma)


# -- the network -------------------------------------------------------------------------------------------------------
def test_t_at_sigma_inverts_sigma_at_and_matches_sigma_to_t():
    schedule = NoiseSchedule()
    sigma = torch.tensor([0.0051, 0.02, 0.08, 0.2, 1.0, 30.0], dtype=torch.float64)
    t = schedule.t_at_sigma(sigma)
    torch.testing.assert_close(schedule.sigma_at(t), sigma, rtol=1e-9, atol=0)
    assert t.tolist() == pytest.approx([schedule.sigma_to_t(float(s)) for s in sigma], rel=1e-9)


def test_forward_takes_a_scalar_or_a_per_example_sigma_and_sigma_matters():
    net = tiny_net().eval()
    x = torch.rand(5, 1, 4, 4)
    torch.testing.assert_close(net(x, 0.2), net(x, torch.full((5,), 0.2)))
    mixed = net(x, torch.tensor([0.2, 0.5, 0.2, 0.5, 0.2]))
    torch.testing.assert_close(mixed[[0, 2, 4]], net(x[[0, 2, 4]], 0.2))
    assert not torch.allclose(net(x, 0.2), net(x, 0.5))
    with pytest.raises(ValueError, match="outside the posterior net's trained range"):
        PosteriorNetPosterior(net, 2.0)
    with pytest.raises(ValueError, match="training mode"):
        PosteriorNetPosterior(net.train(), 0.2)


def test_an_ensemble_is_the_mean_of_its_members_probabilities():
    nets = [tiny_net().eval() for _ in range(3)]
    x = torch.rand(5, 1, 4, 4)
    mean = sum(torch.softmax(net(x, 0.3), dim=1) for net in nets) / 3  # by hand, in probability space
    ensemble = PosteriorNetPosterior(nets, 0.3)
    torch.testing.assert_close(ensemble.log_posterior(x).exp(), mean)
    torch.testing.assert_close(PosteriorNetPosterior(nets[:1], 0.3).log_posterior(x),
                               torch.log_softmax(nets[0](x, 0.3), dim=1))
    with pytest.raises(ValueError, match="disagree on the number of classes"):
        PosteriorNetPosterior([nets[0], tiny_net(num_classes=4).eval()], 0.3)
    with pytest.raises(ValueError, match="training mode"):
        PosteriorNetPosterior([nets[0], tiny_net()], 0.3)


def test_data_posterior_gradient_matches_finite_differences(float64):
    net = tiny_net().double().eval()
    posterior = PosteriorNetPosterior(net, 0.3)
    x = torch.rand(4, 1, 4, 4, dtype=torch.float64)
    grad = posterior.grad_log_posterior(x)  # [B, K, 1, 4, 4]
    assert posterior.differentiable and grad.shape == (4, 3, 1, 4, 4)
    h = 1e-6
    for i in (0, 7, 15):
        step = torch.zeros(4, 16, dtype=torch.float64)
        step[:, i] = h
        step = step.view_as(x)
        central = (posterior.log_posterior(x + step) - posterior.log_posterior(x - step)) / (2 * h)
        torch.testing.assert_close(grad.flatten(2)[:, :, i], central, rtol=1e-5, atol=1e-8)
    centred = torch.einsum("bk,bkd->bd", posterior.log_posterior(x).exp(), grad.flatten(2))  # Σ_y p_y ∇ log p_y
    torch.testing.assert_close(centred, torch.zeros_like(centred), atol=1e-10, rtol=0)


def test_save_and_load_round_trip_with_clear_errors(tmp_path):
    net = tiny_net().eval()
    net.save_pretrained(tmp_path / "pn", safe_serialization=True)
    loaded = load_posterior_net(tmp_path / "pn", expected_num_classes=3)
    x = torch.rand(2, 1, 4, 4)
    torch.testing.assert_close(loaded(x, 0.3), net(x, 0.3), rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    with pytest.raises(ValueError, match="for 3 classes, expected 10"):
        load_posterior_net(tmp_path / "pn", expected_num_classes=10)
    with pytest.raises(FileNotFoundError, match="posterior net not found"):
        load_posterior_net(tmp_path / "missing")
    (tmp_path / "pn" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x80\x04K\x01.")  # a pickle
    with pytest.raises(ValueError, match="could not load the posterior net"):
        load_posterior_net(tmp_path / "pn")


# -- the loss against exact truth --------------------------------------------------------------------------------------
def _exact_loss(tau, other_classes, n=4096, seed=0):
    exact, schedule = ExactMixture(), NoiseSchedule()
    x, y = load_dataset("gmm-4x4", "train").get(range(n))
    return dlsm_loss(TemperedExact(exact, tau), x.double(), y, (0.05, 0.5),
                     scorenet=lambda u, t, labels: exact.predict_noise(u, t, labels, schedule), schedule=schedule,
                     null_class=3, other_classes=other_classes, generator=torch.Generator().manual_seed(seed))


def test_exact_posterior_guides_to_the_exact_class_noise_prediction():
    """With exact scores, ε_∅ − σ·∇ log p_σ(k|x̃) is the exact class-conditional ε for every k: the OTHER term of the
    exact posterior is 0. A wrong σ factor or sign anywhere in the loss makes it large."""
    _, stats = _exact_loss(1.0, other_classes=2, n=512)
    assert stats["other"] < 1e-12
    _, tempered = _exact_loss(1.3, other_classes=2, n=512)
    assert tempered["other"] > 1e-3


def test_exact_posterior_minimises_the_expected_loss():
    """Common random numbers over τ: CE and DLSM (+ OTHER) are lowest at the exact posterior (τ = 1)."""
    losses = {tau: _exact_loss(tau, other_classes=1)[1] for tau in (0.8, 1.0, 1.25)}
    for key in ("ce", "dlsm", "other"):
        assert losses[1.0][key] < losses[0.8][key] and losses[1.0][key] < losses[1.25][key], key
    assert losses[1.0]["dlsm"] < 1.0  # the exact denoiser explains part of n's unit variance


def noisy_draws(x, sigma_range, seed):
    """(σ [B], x̃ = x + σn) drawn by hand as ``dlsm_loss`` draws them from a generator seeded with ``seed``: σ
    log-uniform in ``sigma_range``, then n, both in x's dtype."""
    generator = torch.Generator().manual_seed(seed)
    low, high = sigma_range
    sigma = torch.exp(math.log(low) + torch.rand(len(x), generator=generator) * (math.log(high) - math.log(low)))
    sigma = sigma.to(x.dtype)
    return sigma, x + sigma.view(-1, 1, 1, 1) * torch.randn(x.shape, generator=generator, dtype=x.dtype)


def test_loss_without_dlsm_needs_no_score_net_and_is_cross_entropy():
    net = tiny_net()
    x, y = torch.rand(6, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    loss, stats = dlsm_loss(net, x, y, (0.1, 0.2), dlsm_weight=0.0, generator=torch.Generator().manual_seed(3))
    sigma, x_noisy = noisy_draws(x, (0.1, 0.2), 3)
    expected = nn.functional.cross_entropy(net(x_noisy, sigma), y)
    torch.testing.assert_close(loss, expected)
    assert set(stats) == {"ce", "acc", "loss"}
    with pytest.raises(ValueError, match="needs the frozen score net"):
        dlsm_loss(net, x, y, (0.1, 0.2))


def test_teacher_term_is_the_soft_cross_entropy_of_the_teacher_at_the_noisy_points():
    """ρ_T = 0: loss = CE + w_T · (−Σ_k q(k|x̃, σ) log p_φ(k|x̃, σ)) with q the exact mixture posterior, by hand from
    the same draws of σ and n; the logged teacher_kl is KL(q ‖ p_φ) there."""
    exact, net = ExactMixture(), tiny_net().double()
    x, y = load_dataset("gmm-4x4", "train").get(range(8))
    x = x.double()
    teacher = lambda z, sigma: exact.logits(z, sigma).log_softmax(dim=1)
    loss, stats = dlsm_loss(net, x, y, (0.1, 0.4), dlsm_weight=0.0, teacher=teacher, teacher_weight=0.5,
                            generator=torch.Generator().manual_seed(4))
    sigma, x_noisy = noisy_draws(x, (0.1, 0.4), 4)
    log_p = net(x_noisy, sigma).log_softmax(dim=1)
    q = exact.logits(x_noisy, sigma).softmax(dim=1)
    soft_ce = -(q * log_p).sum(dim=1)
    torch.testing.assert_close(loss, nn.functional.cross_entropy(log_p, y).float() + 0.5 * soft_ce.mean().float())
    torch.testing.assert_close(stats["teacher_kl"], (q * (q.log() - log_p)).sum(dim=1).mean().float())
    with pytest.raises(ValueError, match="needs the teacher's log posterior"):
        dlsm_loss(net, x, y, (0.1, 0.4), dlsm_weight=0.0, teacher_weight=0.5)


def test_teacher_term_at_adversarial_points_is_minimised_by_the_teacher():
    """ρ_T > 0 (the points x̃ + δ where the network's own KL moves most): with the exact posterior as teacher, the
    tempered exact posterior's teacher KL is 0 at τ = 1 and grows away from it (common random numbers)."""
    exact = ExactMixture()
    x, y = load_dataset("gmm-4x4", "train").get(range(256))
    teacher = lambda z, sigma: exact.logits(z, sigma).log_softmax(dim=1)
    kl = {tau: float(dlsm_loss(TemperedExact(exact, tau), x.double(), y, (0.05, 0.5), dlsm_weight=0.0,
                               teacher=teacher, teacher_weight=1.0, teacher_radius=0.3,
                               generator=torch.Generator().manual_seed(5))[1]["teacher_kl"]) for tau in (0.7, 1.0, 1.4)}
    assert kl[1.0] < 1e-6 and kl[0.7] > 1e-3 and kl[1.4] > 1e-3, kl


def test_teacher_points_lie_in_the_ball_where_the_network_moves_most():
    """The teacher is asked at x̃ + δ with ‖δ‖_∞ ≤ ρ_T, where the network's KL(p_φ(·|x̃) ‖ p_φ(·|x̃ + δ)) exceeds
    its value at uniform random δ in the same ball (x̃ recomputed by hand from the same draws)."""
    net, asked = tiny_net().double().eval(), []
    x, y = torch.rand(64, 1, 4, 4, dtype=torch.float64), torch.arange(64) % 3

    def teacher(z, sigma):
        asked.append((z.clone(), sigma.clone()))
        return torch.full((len(z), 3), -math.log(3), dtype=z.dtype)

    dlsm_loss(net, x, y, (0.1, 0.4), dlsm_weight=0.0, teacher=teacher, teacher_weight=1.0, teacher_radius=0.2,
              adversarial_steps=3, generator=torch.Generator().manual_seed(6))
    sigma, x_noisy = noisy_draws(x, (0.1, 0.4), 6)
    (points, asked_sigma), = asked
    torch.testing.assert_close(asked_sigma, sigma)
    delta = (points - x_noisy).abs().flatten(1).amax(dim=1)
    assert bool((delta <= 0.2 + 1e-9).all()) and float(delta.min()) > 0.05

    def moved_kl(z):
        with torch.no_grad():
            log_p, log_q = net(x_noisy, sigma).log_softmax(1), net(z, sigma).log_softmax(1)
        return (log_p.exp() * (log_p - log_q)).sum(1).mean()

    random_points = x_noisy + 0.2 * (2 * torch.rand(x.shape, dtype=torch.float64) - 1)
    assert moved_kl(points) > moved_kl(random_points)


def test_teacher_error_attack_finds_points_where_the_network_is_furthest_from_the_teacher():
    """teacher_attack = "error": the teacher's last points lie in the ball and KL(q ‖ p_φ) there exceeds its value at
    the network-attack points and at uniform random points of the same ball (same draws of σ and n)."""
    exact, net = ExactMixture(), tiny_net().double().eval()
    x, y = load_dataset("gmm-4x4", "train").get(range(128))
    x = x.double()
    asked = []

    def teacher(z, sigma):
        asked.append(z.detach().clone())
        return exact.logits(z, sigma).log_softmax(dim=1)

    def error_at(points, sigma):
        with torch.no_grad():
            log_q, log_p = exact.logits(points, sigma).log_softmax(1), net(points, sigma).log_softmax(1)
        return float((log_q.exp() * (log_q - log_p)).sum(1).mean())

    found = {}
    for attack in ("error", "network"):
        asked.clear()
        dlsm_loss(net, x, y, (0.1, 0.4), dlsm_weight=0.0, teacher=teacher, teacher_weight=1.0, teacher_radius=0.3,
                  teacher_attack=attack, adversarial_steps=4, generator=torch.Generator().manual_seed(7))
        found[attack] = asked[-1]
    assert len(asked) == 1  # the network attack never calls the teacher inside PGD
    sigma, x_noisy = noisy_draws(x, (0.1, 0.4), 7)
    assert float((found["error"] - x_noisy).abs().amax()) <= 0.3 + 1e-9
    random_points = x_noisy + 0.3 * (2 * torch.rand(x.shape, dtype=torch.float64) - 1)
    error = error_at(found["error"], sigma)
    assert error > error_at(found["network"], sigma) and error > error_at(random_points, sigma)
    with pytest.raises(ValueError, match="teacher_attack must be"):
        dlsm_loss(net, x, y, (0.1, 0.4), dlsm_weight=0.0, teacher=teacher, teacher_weight=1.0, teacher_attack="x")


# -- training ----------------------------------------------------------------------------------------------------------
def _tiny_config(tmp_path, name, **overrides):
    options = dict(dataset="gmm-4x4", scorenet=None, dlsm_weight=0.0, other_classes=0, train_steps=6, batch_size=16,
                   checkpoint_every=3, log_every=2, out=str(tmp_path / name), sigma_min=0.05, sigma_max=0.5)
    options.update(overrides)
    return PosteriorNetConfig(**options)


def _weights(run: Path) -> dict:
    return load_weights(run / "posterior_net" / "diffusion_pytorch_model.safetensors")


def test_training_writes_a_loadable_net_and_resume_latest_gives_the_same_weights(tmp_path):
    straight = train(_tiny_config(tmp_path, "straight"))
    assert straight["steps"] == 6 and straight["sigma_range"] == [0.05, 0.5]
    net = load_posterior_net(tmp_path / "straight", expected_num_classes=3)
    assert net.config.sigma_min == 0.05 and net.image_shape == (1, 4, 4)
    results = (tmp_path / "straight" / "results.json").read_bytes()
    (tmp_path / "straight" / "results.json").unlink()  # as while the run still trains: an intermediate EMA net
    with pytest.warns(UserWarning, match="unfinished training run .* last checkpoint"):
        load_posterior_net(tmp_path / "straight")
    (tmp_path / "straight" / "results.json").write_bytes(results)
    train(_tiny_config(tmp_path, "cut"))
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step_000006")  # as if killed after the step-3 checkpoint
    train(_tiny_config(tmp_path, "cut", resume="latest"))  # recomputes steps 4-6
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical to the uninterrupted run


def test_training_with_the_teacher_logs_its_kl_against_the_train_split_posterior(tmp_path):
    train(_tiny_config(tmp_path, "teacher", teacher_weight=1.0, teacher_radius=0.1))
    rows = [json.loads(line) for line in (tmp_path / "teacher" / "metrics.jsonl").read_text().splitlines()]
    logged = [row["train/teacher_kl"] for row in rows if "train/teacher_kl" in row]
    assert logged and all(math.isfinite(v) and v >= 0 for v in logged)
    with pytest.raises(ValueError, match="only without --generated"):
        _tiny_config(tmp_path, "mixed", teacher_weight=1.0, generated=str(tmp_path / "shards")).validate()


@pytest.mark.slow  # subprocesses
def test_script_dry_run_and_help():
    result = subprocess.run([sys.executable, str(ROOT / "train" / "train_posterior.py"), "--dry-run", "--train-steps",
                             "5"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["train_steps"] == 5


@pytest.mark.slow
def test_trained_posterior_net_matches_the_closed_form(tmp_path):
    """CE + DLSM (+ 2 other classes) with EXACT ε on gmm-4x4: after 600 steps the network's posterior is within TV
    0.05 of p_σ(y|x) and its centred gradient matrix has cosine > 0.9, at test points and σ = 0.2."""
    exact, schedule = ExactMixture(), NoiseSchedule()
    net = build_posterior_net("tiny8", 3, (1, 4, 4), 0.05, 0.5)
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    x_all, y_all = load_dataset("gmm-4x4", "train").tensors()
    generator = torch.Generator().manual_seed(0)
    for _ in range(600):
        rows = torch.randint(0, len(y_all), (64,), generator=generator)
        loss, _ = dlsm_loss(net, x_all[rows], y_all[rows], (0.05, 0.5),
                            scorenet=lambda u, t, labels: exact.predict_noise(u, t, labels, schedule),
                            schedule=schedule, null_class=3, other_classes=2, generator=generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    posterior = PosteriorNetPosterior(net.eval(), 0.2)
    x, _ = load_dataset("gmm-4x4", "test").get(range(200))
    truth = exact.mixture.at(0.2)
    tv = 0.5 * (posterior.log_posterior(x).detach().exp() - truth.log_posterior(x).exp()).abs().sum(1)
    estimate = autograd_grad_log_posterior(posterior.log_posterior, x, 3).flatten(1).double()
    expected = truth.grad_log_posterior(x.double()).flatten(1)
    cosine = (estimate * expected).sum(1) / (estimate.norm(dim=1) * expected.norm(dim=1))
    assert float(tv.median()) < 0.05 and float(cosine.median()) > 0.9, (float(tv.median()), float(cosine.median()))
