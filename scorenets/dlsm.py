"""Training loss of the posterior network: cross-entropy plus denoising likelihood score matching (DLSM).

For images x ∈ [0, 1] with labels y, σ drawn log-uniformly in [σ_min, σ_max] per example and n ~ N(0, I):

    x̃      = x + σ·n                                                  (data units; not clamped)
    CE      = −log p_φ(y | x̃, σ)                                       optimum: p_φ = p_σ(y|x̃)
    ε̂_y     = ε_θ(x̃, σ, ∅) − σ·∇_x̃ log p_φ(y | x̃, σ)
    DLSM    = mean_{c,h,w} (ε̂_y − n)²
    loss    = mean_b [ w_CE·CE + w_DLSM·DLSM ]                       (with m = 0 other classes, below)

DLSM (Chao et al., ICLR 2022) matches the class-conditional score that the classifier implies,
∇ log p_σ(x̃|y) = ∇ log p_σ(y|x̃) + ∇ log p_σ(x̃), to the denoising target ∇_x̃ log N(x̃; x, σ²I) = −n/σ, with the
unconditional score s(x̃, σ) = −ε_θ(x̃, σ, ∅)/σ from the frozen score net (its null class). Written in ε units (scores
times −σ, the σ²-weighting of denoising score matching) it is the ε-prediction loss of the classifier-guided score
net. Given exact s its minimiser is ∇ log p_φ = ∇ log p_σ(y|x̃), so it trains the network's INPUT GRADIENT toward the
data gradient, where cross-entropy only constrains its values. It needs the input gradient inside the loss (a
double backward through the posterior net) and one score-net call over B inputs.

Other classes. DLSM on the label trains the gradient of log p_φ(y|x̃) only where y is likely, yet a data posterior
must also get ∇ log p_σ(k|x̃) right where class k is unlikely: the centred [K, D] gradient matrix, and so the
self-consistent loss's data-gradient term, contains every class. With ``other_classes = m`` each example also draws m
classes k ≠ y uniformly and matches the classifier-guided ε of class k to the frozen score net's own class-conditional
ε, the estimate of E[n | x̃, k]:

    OTHER   = mean_{c,h,w} (ε_θ(x̃, σ, ∅) − σ·∇_x̃ log p_φ(k | x̃, σ) − ε_θ(x̃, σ, k))²

(σ(∇ log p_φ(k|x̃) + s_∅) matched to σ·s_k: score distillation, whose minimiser is again ∇ log p_σ(k|x̃) for an exact
score net). loss = mean_b [ w_CE·CE + w_DLSM·(DLSM + Σ_m OTHER)/(1 + m) ]. Cost: the posterior net runs on (1 + m)·B
inputs (one double backward) and the score net makes one call over (1 + m)·B inputs.

Adversarial points. Noisy samples rarely lie along the few directions in which the posterior changes fastest, yet an
attack on a classifier that copies p_φ goes exactly there; p_φ is then off where it matters most (measured: README,
posterior network). With ``adversarial_radius`` ρ > 0, the score matching of the m other classes and of the label
(ADVERSARIAL: the label's class ε from the score net as target, since n is the denoising target at x̃ only) happens
at x̃ + δ, ‖δ‖_∞ ≤ ρ, found by PGD on KL(p_φ(·|x̃, σ) ‖ p_φ(·|x̃ + δ, σ)): where the network's own posterior moves
fastest. Cost: ``adversarial_steps`` extra forward/backward passes of the network and 2·(1 + m)·B more score-net
inputs.

Exact targets at adversarial points. Cross-entropy at x̃ only reaches the network where noisy samples fall. With a
``teacher`` log q(y|x, σ) (the exact smoothed posterior of the training set, ``datagrad.KernelMixture`` with the
training images as centres and kernel std σ: the cross-entropy's own optimum) and ``teacher_weight`` w_T > 0, each
example adds the cross-entropy of that exact target at x̃ + δ, ‖δ‖_∞ ≤ ρ_T (``teacher_radius``), δ found by PGD
(``adversarial_steps``) on the network's own KL as above (``teacher_attack = "network"``) or on its error,
KL(q(·|x̃ + δ, σ) ‖ p_φ(·|x̃ + δ, σ)), through the teacher too (``"error"``: the worst case of the estimate itself):

    TEACHER = −Σ_k q(k | x̃ + δ, σ) log p_φ(k | x̃ + δ, σ)          loss += w_T · mean_b TEACHER

Its minimiser is again q, so it does not change what the network estimates, only where it is trained: the points
where the network's posterior moves fastest, which an attack on a classifier that copies p_φ finds (README, posterior
network). Cost: ``adversarial_steps`` forward/backward passes to find δ (for "error" each through the teacher's kernel
sum over the training set as well), one more forward/backward over B inputs and one more kernel sum.

The score net's input for x̃ is its diffusion state u_t = (2x̃ − 1)·sqrt(ᾱ(t)) at t = t(σ) (``scorenets.noise``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from datagrad import pgd

from .noise import NoisePredictor, NoiseSchedule, to_model_range


def log_uniform(low: float, high: float, n: int, generator: torch.Generator | None = None, device=None) -> Tensor:
    """n values drawn log-uniformly in [low, high]: [n] float32."""
    u = torch.rand(n, generator=generator, device=device)
    return torch.exp(math.log(low) + u * (math.log(high) - math.log(low)))


def dlsm_loss(
    posterior_net: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    labels: Tensor,
    sigma_range: tuple[float, float],
    *,
    scorenet: NoisePredictor | None = None,
    schedule: NoiseSchedule | None = None,
    null_class: int | None = None,
    dlsm_weight: float = 1.0,
    ce_weight: float = 1.0,
    other_classes: int = 0,
    adversarial_radius: float = 0.0,
    adversarial_steps: int = 2,
    teacher: Callable[[Tensor, Tensor], Tensor] | None = None,
    teacher_weight: float = 0.0,
    teacher_radius: float = 0.0,
    teacher_attack: str = "network",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss of the module docstring on a batch x [B, C, H, W] in [0, 1] with labels [B]; (loss, detached stats).

    ``posterior_net(x̃, σ [B]) -> logits [B, K]`` (a ``PosteriorNet`` or its DDP wrapper). With ``dlsm_weight > 0``,
    ``scorenet(u_t, t, labels)`` is the frozen ε-model (a ``ScoreNet``), ``schedule`` its noise schedule and
    ``null_class`` its unconditional label K; ``other_classes`` m adds the OTHER term for m random classes k ≠ y;
    ``adversarial_radius`` ρ > 0 moves the score matching of those classes, and of the label, to x̃ + δ (ADVERSARIAL,
    module docstring). ``teacher(x, σ [B]) -> log q [B, K]`` with ``teacher_weight`` w_T > 0 adds TEACHER at
    x̃ + δ, ‖δ‖_∞ ≤ ``teacher_radius``, δ by PGD on the network's own KL or on KL(q ‖ p_φ) (``teacher_attack``
    "network" | "error"; module docstring). ``generator`` (on x's device) draws σ, n, the other classes
    and the attacks' starts.
    """
    if dlsm_weight > 0 and (scorenet is None or schedule is None or null_class is None):
        raise ValueError("DLSM (dlsm_weight > 0) needs the frozen score net, its schedule and its null class")
    if teacher_weight > 0 and teacher is None:
        raise ValueError("the teacher term (teacher_weight > 0) needs the teacher's log posterior")
    if teacher_attack not in ("network", "error"):
        raise ValueError(f"teacher_attack must be 'network' or 'error', got {teacher_attack!r}")
    batch = x.shape[0]
    sigma = log_uniform(*sigma_range, batch, generator, x.device).to(x.dtype)  # [B]
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    x_noisy = x + sigma.view(-1, 1, 1, 1) * noise
    adversarial = dlsm_weight > 0 and adversarial_radius > 0
    matched = other_classes + int(adversarial) if dlsm_weight > 0 else 0  # copies matched to the score net
    classes, points = labels, x_noisy
    if matched:  # m other classes per example: y + 1 + U{0, …, K − 2} (mod K) never hits y; the label at x̃ + δ
        shift = torch.randint(0, null_class - 1, (other_classes, batch), generator=generator, device=x.device)
        others = ((labels + 1 + shift) % null_class).flatten()
        classes = torch.cat([labels, labels, others] if adversarial else [labels, others])  # [(1 + M)·B]
        moved = _away_from(posterior_net, x_noisy, sigma, adversarial_radius, adversarial_steps, generator) \
            if adversarial else x_noisy
        points = torch.cat([x_noisy, moved.repeat(matched, 1, 1, 1)])
    copies = 1 + matched
    sigma_all = sigma.repeat(copies)
    points = points.detach().requires_grad_(dlsm_weight > 0)
    log_p = posterior_net(points, sigma_all).log_softmax(dim=1, dtype=torch.float32)  # [(1 + M)·B, K]
    log_p_class = log_p.gather(1, classes.view(-1, 1)).squeeze(1)  # [(1 + M)·B]
    ce = -log_p_class[:batch]
    loss = ce_weight * ce.mean()
    stats = {"ce": ce.detach().mean(), "acc": (log_p[:batch].detach().argmax(dim=1) == labels).float().mean()}
    if dlsm_weight > 0:
        (grad,) = torch.autograd.grad(log_p_class.sum(), points, create_graph=True)  # ∇ log p_φ(k|·, σ)
        with torch.no_grad():  # the score net: ε_∅ at x̃ (and at x̃ + δ), ε_k at every matched copy
            inputs, sigmas = points.detach(), sigma_all
            if adversarial:
                inputs, sigmas = torch.cat([inputs[:batch], inputs[batch:2 * batch], inputs[batch:]]), sigma.repeat(
                    2 + matched)
            t = schedule.t_at_sigma(sigmas.double()).float()
            u_t = to_model_range(inputs) * schedule.alpha_bar_at(t).sqrt().to(x.dtype).view(-1, 1, 1, 1)
            nulls = torch.full((batch * (2 if adversarial else 1),), null_class, device=x.device, dtype=labels.dtype)
            noise_pred = scorenet(u_t, t, torch.cat([nulls, classes[batch:]])).to(x.dtype)
        first = len(nulls)  # noise_pred[:first]: the null class; noise_pred[first:]: the matched copies' classes
        noise_pred_null = noise_pred[:batch].repeat(copies, 1, 1, 1) if not adversarial else torch.cat(
            [noise_pred[:batch], noise_pred[batch:2 * batch].repeat(matched, 1, 1, 1)])
        target = torch.cat([noise, noise_pred[first:]])  # DLSM: the noise; matched copies: the score net's ε_k
        noise_pred_guided = noise_pred_null - sigma_all.view(-1, 1, 1, 1) * grad
        per_example = (noise_pred_guided - target).pow(2).flatten(1).mean(dim=1)  # [(1 + M)·B]
        loss = loss + dlsm_weight * per_example.view(copies, batch).mean(dim=0).mean()
        stats["dlsm"] = per_example[:batch].detach().mean()
        if matched:
            stats["other"] = per_example[batch:].detach().mean()
    if teacher_weight > 0:
        moved = _away_from(posterior_net, x_noisy, sigma, teacher_radius, adversarial_steps, generator,
                           teacher if teacher_attack == "error" else None) if teacher_radius > 0 else x_noisy.detach()
        with torch.no_grad():
            log_q = teacher(moved, sigma).float()
        log_p_moved = posterior_net(moved, sigma).log_softmax(dim=1, dtype=torch.float32)
        teacher_ce = -(log_q.exp() * log_p_moved).sum(dim=1)  # [B]
        loss = loss + teacher_weight * teacher_ce.mean()
        stats["teacher_kl"] = (log_q.exp() * (log_q - log_p_moved.detach())).sum(dim=1).mean()
    stats["loss"] = loss.detach()
    return loss, stats


def _away_from(posterior_net, x_noisy: Tensor, sigma: Tensor, radius: float, steps: int, generator,
               teacher: Callable[[Tensor, Tensor], Tensor] | None = None) -> Tensor:
    """x̃ + δ, ‖δ‖_∞ ≤ ρ, δ by ``steps`` PGD steps of ρ/2 from a uniform start maximizing KL(p_φ(·|x̃) ‖ p_φ(·|x̃ + δ))
    (where the network's posterior moves fastest) or, with a ``teacher`` log q, KL(q(·|x̃ + δ) ‖ p_φ(·|x̃ + δ)) (where
    it is furthest from the teacher); the unwrapped network, no gradient to its parameters."""
    network = getattr(posterior_net, "module", posterior_net)
    if teacher is None:
        with torch.no_grad():
            reference = network(x_noisy, sigma).log_softmax(dim=1, dtype=torch.float32)

    def moved(z: Tensor) -> Tensor:
        log_q = network(z, sigma).log_softmax(dim=1, dtype=torch.float32)
        if teacher is not None:
            log_t = teacher(z, sigma).float()
            return (log_t.exp() * (log_t - log_q)).sum(dim=1)
        return (reference.exp() * (reference - log_q)).sum(dim=1)

    return pgd(moved, x_noisy.detach(), radius, radius / 2, steps, "linf", random_start=True, clamp=None,
               generator=generator).detach()
