"""Training objectives, selectable by name, all with one interface.

    objective(model, attack_model, x, y, generator=None) -> ObjectiveOutput(loss, stats, logits_*, x_adv)

* ``model`` makes the differentiable forward passes of the loss (possibly the DDP wrapper), in its current mode;
* ``attack_model`` is the unwrapped module used for the inner maximization (docs/conventions.md §7: the DDP wrapper
  would re-broadcast BN buffers at every attack step). It is attacked inside :func:`attack_mode`: parameters frozen
  (no parameter graph, ``.grad`` untouched) and, by default, every module in eval mode (BN running statistics, as
  in TRADES); ``attack_bn="batch"`` instead uses BN batch statistics without updating the running ones, as the
  SCORE code for Table 4 does. Both modes and ``requires_grad`` flags are restored afterwards.
* x: images [B, C, H, W] in [0, 1]; y: labels [B] (int). p_θ = softmax(model(·)); every parameter stays in the
  graph of ``loss`` (docs/conventions.md §7), ``stats`` holds detached scalar tensors (no host sync).
  Log-probabilities and losses are computed in float32 or wider, also under bf16/fp16 autocast.

Losses (batch means; D(p || q) from :mod:`datagrad.distances`, on log-probabilities; ỹ = smoothed one-hot, mass
1 − s on y and s/(K−1) on every other class, as in the SCORE code):

    standard      CE(p_θ(x), ỹ)
    pgd-at        CE(p_θ(x'), ỹ),                      x' = PGD max CE(p_θ(x'), y)
    trades-kl     CE(p_θ(x), ỹ) + β·KL(p_θ(x) || p_θ(x')),  x' = PGD max KL(sg p_θ(x) || p_θ(x'))
    trades-se     Σ_k (p_θ(x)_k − ỹ_k)² + β·Σ_k (p_θ(x')_k − p_θ(x)_k)²,  x' = PGD max Σ_k (p_θ(x')_k − sg p_θ(x)_k)²
    pgd-at-se     Σ_k (p_θ(x')_k − ỹ_k)²,              x' = PGD max Σ_k (p_θ(x')_k − y_k)²  (one-hot y)
    direct-score  D(sg p_d(·|x') || p_θ(·|x')) [+ w·clean],  x' = PGD max D(p_d(·|x') || p_θ(·|x')) (full gradient;
                  ``attack_gradient="model"``: p_d held at its value in each step's gradient, an ablation);
                  ``attack_losses`` ("distance", "data-margin", "label-ce"): one PGD per entry, each from its own
                  random start, "data-margin" on −[log p_d(y|x') − max_{k≠y} log p_d(k|x')], "label-ce" on
                  −log p_θ(y|x') (PGD-AT's attack); per example x' is the last iterate with the largest
                  D(p_d(·|x') || p_θ(·|x')) (a better inner max where p_d, or p_θ alone, changes class in the ball)

(sg = stop-gradient; p_θ(x) in an attack is computed once, in attack mode.) In the TRADES losses gradients flow
through both p_θ(x) and p_θ(x') (docs/conventions.md §3). Every attack starts uniformly in the ε-ball (the SCORE
code does this for TRADES-KL too; original TRADES starts at x + 0.001·N(0, I)), clamps to [0, 1] and returns its last
iterate. ``attack_starts`` = S > 1, for every objective with an attack: each attack runs S times from consecutive
uniform starts of the batch's generator and keeps, per example, the last iterate with the largest attack loss
(``datagrad.PGD.starts``): S times the attack steps, the same for every objective when comparing at equal budgets.

Clipping (the SCORE code without generated data, ``--clip_loss c``): τ(c) = c²·K/(K−1), the SE between the
prediction (1 − c on y, c/(K−1) elsewhere) and one-hot y. Per example, before the batch mean:
pgd-at-se: relu(SE(p_θ(x'), ỹ) − τ); trades-se with ``clip_scope="total"`` (their default):
relu(SE_clean + β·SE_robust − τ); with ``clip_scope="robust"`` (their ``--not_clip_clean``):
SE_clean + β·relu(SE_robust − τ). c = 0.4 for PGD-AT-SE and 0.3 for TRADES-SE there; c = 0 (no clip) in Table 4.

Direct SCORE: ``posterior_provider(x, y)`` returns this batch's data posterior (a ``GaussianMixture`` itself, or a
score-net trajectory anchored at (x, y)). Calls on it, in order: ``log_posterior(x)`` once if the clean term is
``"score"``; per PGD step ``grad_log_posterior(x_t)`` then ``log_posterior(x_t)`` (through
``datagrad.attach_log_posterior``); finally ``log_posterior(x')`` at the last iterate, without gradient. No
``keep_best``: a trajectory posterior integrates along the path actually taken. For KL the outer loss has the
θ-gradient of the soft-label cross-entropy −Σ_k p_d(k|x') log p_θ(k|x') (they differ by the constant entropy).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from datagrad import (
    PGD,
    DataPosterior,
    Distance,
    at_least_float32,
    check_num_classes,
    data_margin,
    get_distance,
    self_consistent_distance,
    update_best,
)

from .attack_mode import BN_MODES, attack_mode

PosteriorProvider = Callable[[Tensor, Tensor], DataPosterior]  # (x [B, ...], y [B]) -> p_d for this batch
DEFAULT_BETA = {"trades-kl": 6.0, "trades-se": 4.0}
CLIP_SCOPES = ("total", "robust")
CLEAN_LOSSES = ("ce", "score")
ATTACK_GRADIENTS = ("full", "model")  # direct SCORE's attack: through p_d and p_θ, or through p_θ only
ATTACK_LOSSES = ("distance", "data-margin", "label-ce")  # direct SCORE's attacks: on D, moving p_d or p_θ off y

KL = get_distance("kl")
SE = get_distance("se")


@dataclass
class ObjectiveOutput:
    loss: Tensor  # scalar, differentiable in every parameter
    stats: dict[str, Tensor]  # detached scalars
    logits_clean: Tensor | None = None  # [B, K]
    logits_adv: Tensor | None = None  # [B, K]
    x_adv: Tensor | None = None  # [B, C, H, W], detached


# -- small pieces shared by the objectives -----------------------------------------------------------------
def smoothed_targets(y: Tensor, num_classes: int, smoothing: float = 0.0, dtype=torch.float32) -> Tensor:
    """ỹ [B, K]: 1 − s on the label, s/(K−1) on every other class (s = 0 gives one-hot)."""
    targets = torch.full((y.shape[0], num_classes), smoothing / (num_classes - 1), device=y.device, dtype=dtype)
    return targets.scatter_(1, y[:, None], 1.0 - smoothing)


def log_probs(logits: Tensor) -> Tensor:
    """log softmax(logits) over classes, [B, K], in float32 or wider (``datagrad.at_least_float32``)."""
    return at_least_float32(logits).log_softmax(dim=1)


def _targets_for(logits: Tensor, y: Tensor, smoothing: float = 0.0) -> Tensor:
    """ỹ in the loss dtype (float32 or wider)."""
    return smoothed_targets(y, logits.shape[1], smoothing, at_least_float32(logits).dtype)


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-example −Σ_k t_k log softmax(logits)_k: [B]."""
    return -(targets * log_probs(logits)).sum(dim=1)


def squared_error_to(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-example Σ_k (softmax(logits)_k − t_k)²: [B]."""
    return SE(targets.log(), log_probs(logits))


def se_clip_threshold(c: float, num_classes: int) -> float:
    """τ(c) = c²·K/(K−1): the SE between (1 − c on y, c/(K−1) elsewhere) and one-hot y."""
    return c * c * num_classes / (num_classes - 1)


def accuracy(logits: Tensor, y: Tensor) -> Tensor:
    return (logits.detach().argmax(dim=1) == y).float().mean()


def label_cross_entropy(model: nn.Module, y: Tensor) -> Callable[[Tensor], Tensor]:
    """PGD-AT's attack loss z ↦ −log p_θ(y|z): [B]."""
    return lambda z: nn.functional.cross_entropy(model(z), y, reduction="none")


def fixed_posterior(posterior: DataPosterior) -> PosteriorProvider:
    """A provider that returns the same (analytic) posterior for every batch, e.g. a ``GaussianMixture``."""
    return lambda x, y: posterior


def _check_batch(x: Tensor, y: Tensor) -> None:
    if x.dim() < 2 or y.dim() != 1 or y.shape[0] != x.shape[0] or y.dtype.is_floating_point:
        raise ValueError(
            f"objectives need inputs [B, ...] and integer labels [B], got x {tuple(x.shape)} and y "
            f"{tuple(y.shape)} ({y.dtype})"
        )


# -- the objectives ----------------------------------------------------------------------------------------
class Objective:
    """Base class: validates the batch, then ``compute`` (see the module docstring for the interface)."""

    name: ClassVar[str]

    def __call__(
        self, model: nn.Module, attack_model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None = None
    ) -> ObjectiveOutput:
        _check_batch(x, y)
        return self.compute(model, attack_model, x, y, generator)

    def compute(self, model, attack_model, x, y, generator) -> ObjectiveOutput:
        raise NotImplementedError


@dataclass(frozen=True)
class Standard(Objective):
    name: ClassVar[str] = "standard"
    label_smoothing: float = 0.0

    def compute(self, model, attack_model, x, y, generator):
        logits = model(x)
        loss = soft_cross_entropy(logits, _targets_for(logits, y, self.label_smoothing)).mean()
        return ObjectiveOutput(loss, {"loss": loss.detach(), "acc_clean": accuracy(logits, y)}, logits_clean=logits)


@dataclass(frozen=True)
class PGDAT(Objective):
    name: ClassVar[str] = "pgd-at"
    attack: PGD
    label_smoothing: float = 0.0
    attack_bn: str = "eval"

    def compute(self, model, attack_model, x, y, generator):
        with attack_mode(attack_model, self.attack_bn):
            x_adv = self.attack.maximize(label_cross_entropy(attack_model, y), x, generator)
        logits_adv = model(x_adv)
        loss = soft_cross_entropy(logits_adv, _targets_for(logits_adv, y, self.label_smoothing)).mean()
        stats = {"loss": loss.detach(), "acc_adv": accuracy(logits_adv, y)}
        return ObjectiveOutput(loss, stats, logits_adv=logits_adv, x_adv=x_adv)


def _attack_from_clean(attack_model, attack: PGD, distance: Distance, x, generator, bn_mode) -> Tensor:
    """x' maximizing D(sg p_θ(x) || p_θ(x')) with p_θ(x) computed once in attack mode (the TRADES attacks)."""
    with attack_mode(attack_model, bn_mode):
        with torch.no_grad():
            log_p_clean = log_probs(attack_model(x))  # [B, K]
        return attack.maximize(lambda z: distance(log_p_clean, log_probs(attack_model(z))), x, generator)


@dataclass(frozen=True)
class TradesKL(Objective):
    name: ClassVar[str] = "trades-kl"
    attack: PGD
    beta: float = DEFAULT_BETA["trades-kl"]
    label_smoothing: float = 0.0
    attack_bn: str = "eval"

    def compute(self, model, attack_model, x, y, generator):
        x_adv = _attack_from_clean(attack_model, self.attack, KL, x, generator, self.attack_bn)
        logits_clean, logits_adv = model(x), model(x_adv)
        clean = soft_cross_entropy(logits_clean, _targets_for(logits_clean, y, self.label_smoothing))
        robust = KL(log_probs(logits_clean), log_probs(logits_adv))  # [B]
        loss = clean.mean() + self.beta * robust.mean()
        return _trades_output(loss, clean, robust, logits_clean, logits_adv, x_adv, y)


def _trades_output(loss, clean, robust, logits_clean, logits_adv, x_adv, y) -> ObjectiveOutput:
    stats = {
        "loss": loss.detach(),
        "loss_clean": clean.detach().mean(),
        "loss_robust": robust.detach().mean(),
        "acc_clean": accuracy(logits_clean, y),
        "acc_adv": accuracy(logits_adv, y),
    }
    return ObjectiveOutput(loss, stats, logits_clean=logits_clean, logits_adv=logits_adv, x_adv=x_adv)


@dataclass(frozen=True)
class TradesSE(Objective):
    name: ClassVar[str] = "trades-se"
    attack: PGD
    beta: float = DEFAULT_BETA["trades-se"]
    clip: float = 0.0
    clip_scope: str = "total"
    label_smoothing: float = 0.0
    attack_bn: str = "eval"

    def compute(self, model, attack_model, x, y, generator):
        x_adv = _attack_from_clean(attack_model, self.attack, SE, x, generator, self.attack_bn)
        logits_clean, logits_adv = model(x), model(x_adv)
        num_classes = logits_clean.shape[1]
        clean = squared_error_to(logits_clean, _targets_for(logits_clean, y, self.label_smoothing))  # [B]
        robust = SE(log_probs(logits_clean), log_probs(logits_adv))  # [B], through both
        if self.clip > 0 and self.clip_scope == "robust":
            per_example = clean + self.beta * torch.relu(robust - se_clip_threshold(self.clip, num_classes))
        else:
            per_example = clean + self.beta * robust
            if self.clip > 0:
                per_example = torch.relu(per_example - se_clip_threshold(self.clip, num_classes))
        return _trades_output(per_example.mean(), clean, robust, logits_clean, logits_adv, x_adv, y)


@dataclass(frozen=True)
class PGDATSE(Objective):
    name: ClassVar[str] = "pgd-at-se"
    attack: PGD
    clip: float = 0.0
    label_smoothing: float = 0.0
    attack_bn: str = "eval"

    def compute(self, model, attack_model, x, y, generator):
        def attack_loss(z: Tensor) -> Tensor:
            logits = attack_model(z)
            return squared_error_to(logits, _targets_for(logits, y))  # one-hot y

        with attack_mode(attack_model, self.attack_bn):
            x_adv = self.attack.maximize(attack_loss, x, generator)
        logits_adv = model(x_adv)
        num_classes = logits_adv.shape[1]
        per_example = squared_error_to(logits_adv, _targets_for(logits_adv, y, self.label_smoothing))
        if self.clip > 0:
            per_example = torch.relu(per_example - se_clip_threshold(self.clip, num_classes))
        loss = per_example.mean()
        stats = {"loss": loss.detach(), "acc_adv": accuracy(logits_adv, y)}
        return ObjectiveOutput(loss, stats, logits_adv=logits_adv, x_adv=x_adv)


@dataclass(frozen=True)
class DirectScore(Objective):
    name: ClassVar[str] = "direct-score"
    attack: PGD
    posterior_provider: PosteriorProvider = field(repr=False)
    distance: str = "kl"
    clean_weight: float = 0.0
    clean_loss: str = "ce"
    label_smoothing: float = 0.0
    attack_bn: str = "eval"
    attack_gradient: str = "full"
    attack_losses: tuple[str, ...] = ("distance",)

    def __post_init__(self):
        if self.attack.keep_best:
            raise ValueError("direct-score needs the last PGD iterate (keep_best=False): a trajectory posterior "
                             "integrates log p_d along the path actually taken")
        check_attack_losses(self.attack_losses)

    def inner_max(self, attack_model: nn.Module, x: Tensor, y: Tensor, posterior: DataPosterior,
                  generator: torch.Generator | None, watch: Callable[[Tensor], None] | None = None) -> Tensor:
        """x' ≈ argmax_{x'∈B(x)} D(p_d(·|x') ‖ p_θ(·|x')) as training takes it: one PGD per ``attack_losses`` entry
        (each from its own random start(s), in ``attack_mode``); with several, per example the last iterate with the
        largest D. ``watch(z)`` is called at every point an attack evaluates, after its loss (validation; with
        several starts also at each start's last iterate, where the best start is picked). Several attacks or
        starts need a path-independent posterior (not a score-net trajectory)."""
        distance = get_distance(self.distance)

        def attack_loss(name: str) -> Callable[[Tensor], Tensor]:
            def loss(z: Tensor) -> Tensor:
                if name == "distance":
                    value = self_consistent_distance(attack_model, z, posterior, distance,
                                                     data_gradient=self.attack_gradient == "full")
                elif name == "data-margin":
                    value = data_margin(z, posterior, y)
                else:
                    value = label_cross_entropy(attack_model, y)(z)
                if watch is not None:
                    watch(z.detach())
                return value
            return loss

        with attack_mode(attack_model, self.attack_bn):
            if len(self.attack_losses) == 1:
                return self.attack.maximize(attack_loss(self.attack_losses[0]), x, generator)
            best, best_value = None, None
            for name in self.attack_losses:
                candidate = self.attack.maximize(attack_loss(name), x, generator)
                with torch.no_grad():
                    value = self_consistent_distance(attack_model, candidate, posterior, distance)
                best, best_value = update_best(best, best_value, candidate, value)
        return best

    def compute(self, model, attack_model, x, y, generator):
        distance = get_distance(self.distance)
        posterior = self.posterior_provider(x, y)
        use_clean = self.clean_weight > 0
        log_p_data_clean = None
        if use_clean and self.clean_loss == "score":
            with torch.no_grad():
                log_p_data_clean = posterior.log_posterior(x)  # [B, K]; before the attack (trajectory anchor)
        x_adv = self.inner_max(attack_model, x, y, posterior, generator)
        with torch.no_grad():
            log_p_data_adv = posterior.log_posterior(x_adv)  # [B, K] at the final iterate
        logits_clean = model(x) if use_clean else None
        logits_adv = model(x_adv)
        check_num_classes(logits_adv, posterior)
        log_q_adv = log_probs(logits_adv)
        robust = distance(log_p_data_adv.to(log_q_adv.dtype), log_q_adv)  # [B]
        loss = robust.mean()
        stats = {
            "loss_robust": robust.detach().mean(),
            "acc_adv": accuracy(logits_adv, y),
            "acc_adv_data": accuracy(log_p_data_adv, y),  # does p_d(·|x') still pick the label?
        }
        if use_clean:
            if self.clean_loss == "ce":
                targets = _targets_for(logits_clean, y, self.label_smoothing)
                clean = soft_cross_entropy(logits_clean, targets)
            else:
                log_q_clean = log_probs(logits_clean)
                clean = distance(log_p_data_clean.to(log_q_clean.dtype), log_q_clean)
            loss = loss + self.clean_weight * clean.mean()
            stats |= {"loss_clean": clean.detach().mean(), "acc_clean": accuracy(logits_clean, y)}
        stats["loss"] = loss.detach()
        return ObjectiveOutput(loss, stats, logits_clean=logits_clean, logits_adv=logits_adv, x_adv=x_adv)


# -- registry --------------------------------------------------------------------------------------------------
def _check_in(value: str, valid: tuple[str, ...], what: str) -> None:
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")


def check_attack_losses(attack_losses) -> None:
    if not attack_losses:
        raise ValueError(f"attack_losses needs at least one of {', '.join(ATTACK_LOSSES)}")
    if len(set(attack_losses)) != len(attack_losses):
        raise ValueError(f"attack_losses {list(attack_losses)} repeat an attack; several starts of one attack are "
                         "attack_starts")
    for name in attack_losses:
        _check_in(name, ATTACK_LOSSES, "attack loss")


def attack_from_threat(threat, starts: int = 1) -> PGD:
    """PGD for training from any object with ``norm`` ("linf"/"l2"), ``eps``, ``step_size`` and ``pgd_steps``:
    uniform random start (``starts`` of them, the best kept per example), clamp to [0, 1], last iterate (no
    keep_best)."""
    missing = [a for a in ("norm", "eps", "step_size", "pgd_steps") if not hasattr(threat, a)]
    if missing:
        raise ValueError(f"threat model needs attributes norm, eps, step_size, pgd_steps; missing {', '.join(missing)}")
    if not threat.eps > 0 or not threat.step_size > 0:
        raise ValueError(f"threat eps and step_size must be > 0, got eps={threat.eps}, step_size={threat.step_size}")
    if int(threat.pgd_steps) != threat.pgd_steps or threat.pgd_steps < 1:
        raise ValueError(f"threat pgd_steps must be an integer >= 1, got {threat.pgd_steps}")
    return PGD(eps=float(threat.eps), step_size=float(threat.step_size), steps=int(threat.pgd_steps),
               norm=threat.norm, random_start=True, clamp=(0.0, 1.0), keep_best=False, starts=starts)


def build_objective(
    name: str,
    threat=None,
    *,
    beta: float | None = None,
    clip: float = 0.0,
    clip_scope: str = "total",
    label_smoothing: float = 0.0,
    attack_bn: str = "eval",
    distance: str = "kl",
    clean_weight: float = 0.0,
    clean_loss: str = "ce",
    attack_gradient: str = "full",
    attack_losses: tuple[str, ...] = ("distance",),
    attack_starts: int = 1,
    posterior_provider: PosteriorProvider | None = None,
) -> Objective:
    """Build an objective by name (``OBJECTIVES``); see the module docstring for the losses.

    threat: ``norm``/``eps``/``step_size``/``pgd_steps`` (ignored by "standard"); beta: TRADES weight (None: the
    objective's default, ``DEFAULT_BETA``); clip: c of the SE clip τ = c²K/(K−1) (SE objectives only);
    label_smoothing: s in [0, 1); attack_bn: "eval" or "batch"; distance, clean_weight, clean_loss ("ce"/"score"),
    attack_gradient ("full"/"model"), attack_losses (``ATTACK_LOSSES``), posterior_provider: direct SCORE only;
    attack_starts: random starts of every attack (objectives with one). Options an objective has no field for are
    ignored, except a non-zero clip or clean weight, a non-full attack gradient, attack losses other than
    ("distance",) and several attack starts, which raise.
    """
    _check_in(name, tuple(OBJECTIVES), "objective")
    _check_in(attack_bn, BN_MODES, "attack BN mode")
    _check_in(clip_scope, CLIP_SCOPES, "clip scope")
    _check_in(clean_loss, CLEAN_LOSSES, "clean loss")
    _check_in(attack_gradient, ATTACK_GRADIENTS, "attack gradient")
    check_attack_losses(attack_losses)
    get_distance(distance)
    if not 0 <= label_smoothing < 1:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if not 0 <= clip < 1:
        raise ValueError(f"clip must be in [0, 1), got {clip}")
    if beta is not None and beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    cls = OBJECTIVES[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    if clip > 0 and "clip" not in fields:
        raise ValueError(f"clip applies only to trades-se and pgd-at-se, not {name!r}")
    if clean_weight < 0 or (clean_weight > 0 and "clean_weight" not in fields):
        raise ValueError(f"clean_weight must be >= 0 and is used by direct-score only; got {clean_weight} for {name!r}")
    if attack_gradient != "full" and "attack_gradient" not in fields:
        raise ValueError(f"attack_gradient {attack_gradient!r} is used by direct-score only, not {name!r}")
    if tuple(attack_losses) != ("distance",) and "attack_losses" not in fields:
        raise ValueError(f"attack_losses {list(attack_losses)} are used by direct-score only, not {name!r}")
    if int(attack_starts) != attack_starts or attack_starts < 1 or (attack_starts > 1 and "attack" not in fields):
        raise ValueError(f"attack_starts must be an integer >= 1 and is used by objectives with an attack only; got "
                         f"{attack_starts} for {name!r}")
    options = dict(beta=beta, clip=clip, clip_scope=clip_scope, label_smoothing=label_smoothing, attack_bn=attack_bn,
                   distance=distance, clean_weight=clean_weight, clean_loss=clean_loss, attack_gradient=attack_gradient,
                   attack_losses=tuple(attack_losses), posterior_provider=posterior_provider)
    kwargs = {key: value for key, value in options.items() if key in fields and value is not None}
    if "attack" in fields:
        if threat is None:
            raise ValueError(f"objective {name!r} needs a threat model (norm, eps, step_size, pgd_steps)")
        kwargs["attack"] = attack_from_threat(threat, int(attack_starts))
    if "posterior_provider" in fields and posterior_provider is None:
        raise ValueError("objective 'direct-score' needs a posterior provider (a score-net checkpoint or an analytic "
                         "posterior for toy data)")
    return cls(**kwargs)


OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (Standard, PGDAT, TradesKL, TradesSE, PGDATSE,
                                                                    DirectScore)}
