"""Validate ``scorenets.ScoreNetPosterior`` against the closed form on a Gaussian mixture rendered as images.

    python -m analysis.validate_posterior --out runs/validate-posterior                # trains the score net first
    python -m analysis.validate_posterior --out runs/validate-posterior --scorenet runs/sn-gmm   # reuse one

Data: ``gmm-8x8`` (default) or ``gmm-4x4`` from ``trainlib.data``; ``toy_mixture(name)`` is the exact mixture, so
p_σ(y|x) and ∇_x log p_σ(y|x) are known in closed form (``GaussianMixture(..., noise_std=σ)``). Without
``--scorenet`` a score net is trained on the train split THROUGH THE TRAINING LIBRARY (``trainlib.scorenet_training
.train``, the function behind ``train/train_scorenet.py``) into ``<out>/scorenet-run`` (re-running resumes it).

For every σ (``--sigmas``; the library default ``--default-sigma`` is always included), on the first ``--n-points``
test points x (clamped to [0, 1], as images are), with K classes and the estimate built from the score net's
class-conditional scores s_y:

gradients     Ĝ_y = s_y − Σ_k p̂_k s_k, the centred data gradient every SCORE loss uses (``attach_log_posterior``),
              against G_y = ∇_x log p_σ(y|x): cosine and relative error ||Ĝ_y − G_y||/||G_y|| over all (point, class)
              pairs and for the top class argmax_y p_σ(y|x), at the clean x (p̂ = the exact anchor) and at the
              perturbed x' (p̂ from the trajectory). Also the raw null-class estimate s_y − s_∅
              (``ScoreNetPosterior.grad_log_posterior``) at x, which is not centred: its top-class direction is
              dominated by the error of the unconditional score.
posterior     the TV error ½ Σ_y |p̂(y|x') − p_σ(y|x')| at x' = the last iterate of ℓ∞ PGD (``datagrad.pgd``: radius
              ``--eps``, ``--pgd-steps`` steps of ``--step-size``, uniform start, clamp to [0, 1]) maximizing the direct
              SCORE inner loss KL(p_σ(·|x') || p_θ(·|x')) (``datagrad.self_consistent_distance``) with the EXACT
              posterior, p_θ the Bayes classifier of the clean mixture: the points do not depend on the estimate
              under test (a poor estimate could otherwise steer PGD to where the posterior hardly changes). At every
              iterate the estimate, a trajectory posterior anchored at x with the EXACT p_σ(·|x), is extended through
              ``datagrad.attach_log_posterior`` exactly as in direct SCORE training (``trainlib.objectives``), and
              p̂(·|x') is its zero-call value at the last iterate, as training uses it. Also: the straight-line anchored
              estimate (Gauss–Legendre, ``--quadrature-points``) with the exact anchor and with the label-smoothed
              anchor p = (1 − α)·onehot(y) + α/K (α = ``--anchor-smoothing``; the anchor's own TV error at x is
              reported next to it), and the true movement ½ Σ_y |p_σ(y|x') − p_σ(y|x)| (how far PGD moved the
              posterior: an estimate that ignored the path would have this TV error).

Outputs in ``--out`` (written atomically): ``validate_posterior.json`` (config, timings, per-σ metrics, per-class
medians, the acceptance check), ``error_vs_sigma.png``, and a printed table. Acceptance (issue 3) at the default σ:
median gradient cosine (all classes, clean points) ≥ 0.9 and median trajectory TV error at x' ≤ 0.05.

The default σ is ``trainlib.adversarial.AdversarialConfig.noise_std`` (read at import, so this command always checks
the σ that direct SCORE training uses; [0, 1] data units). Why a σ of that size: p_σ(y|x) is the posterior of the
data blurred by N(0, σ²I). Smaller σ follows p_d(y|x) more closely, but the network must then resolve the class
differences of the score, (μ_y − μ_k)/(s² + σ²), inside a total score that grows like sqrt(d/(s² + σ²)), and only a
small share of DSM training (uniform timesteps) falls at such low noise; larger σ is easier to estimate but blurs the
classes together. Measured with the default command (4,000 steps of 64, 7.8 minutes on one core of the shared
2-core machine): median gradient cosine ≥ 0.996 at every σ, median trajectory TV error 0.048 / 0.023 / 0.031 / 0.028
at σ = 0.05 / 0.1 / 0.2 / 0.3. The remaining error is mostly a magnitude error: the network's class differences are
~7 % too small (relative gradient error ≈ 0.08 at cosine 0.998), and it shrinks with longer training.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from datagrad import GaussianMixture, attach_log_posterior, get_distance, pgd, self_consistent_distance
from scorenets import ClassScoreModel, ScoreNetPosterior, anchor_log_probs, check_noise_std
from trainlib.adversarial import AdversarialConfig
from trainlib.config import config_to_dict, option, parse_config, run_cli
from trainlib.data import TOY_MIXTURES, load_dataset, toy_mixture
from trainlib.files import atomic_write_json
from trainlib.rundir import git_revision, package_versions
from trainlib.scorenet_training import ScoreNetConfig, load_scorenet
from trainlib.scorenet_training import train as train_scorenet

DEFAULT_SIGMA = AdversarialConfig.noise_std  # the σ direct SCORE training uses unless told otherwise
RESULTS_FILE = "validate_posterior.json"
FIGURE_FILE = "error_vs_sigma.png"
TRAIN_SUBDIR = "scorenet-run"
TOP_CLASS_MIN_DOUBT = 1e-3  # top-class gradient metrics only where 1 − max_y p_σ(y|x) ≥ this (gradient_metrics)


@dataclass
class ValidateConfig:
    """Compare ScoreNetPosterior with the closed-form Gaussian-mixture posterior (analysis.validate_posterior)."""

    out: str = option("output directory (results, figure, and the trained score net in scorenet-run/)",
                     "runs/validate-posterior")  # fmt: skip
    scorenet: str | None = option("a trained score net (run directory or scorenet/ folder); none: train one", None)
    dataset: str = option("Gaussian-mixture image toy: gmm-8x8 | gmm-4x4", "gmm-8x8")
    sigmas: tuple[float, ...] = option("noise stds σ to evaluate ([0, 1] data units)", (0.05, 0.1, 0.2, 0.3))
    default_sigma: float = option("the library's default σ (always evaluated; the acceptance is checked there)",
                                 DEFAULT_SIGMA)  # fmt: skip
    n_points: int = option("test points evaluated per σ", 200)
    eps: float = option("l-inf radius of the PGD perturbation", 0.1)
    pgd_steps: int = option("PGD steps", 10)
    step_size: float = option("PGD step size", 0.025)
    quadrature_points: int = option("Gauss-Legendre points of the straight-line (anchored) estimate", 8)
    anchor_smoothing: float = option("label smoothing alpha of the smoothed-anchor variant", 0.1)
    seed: int = option("seed of the PGD random starts", 0)
    # training (only without --scorenet): passed to trainlib.scorenet_training.ScoreNetConfig
    train_steps: int = option("score-net training steps", 4000)
    train_batch_size: int = option("score-net training batch size", 64)
    train_lr: float = option("score-net peak learning rate", 1e-3)
    train_preset: str | None = option("score-net UNet preset (none: by image size)", None)

    def validate(self) -> None:
        if self.dataset not in TOY_MIXTURES:
            raise ValueError(f"dataset must be a Gaussian-mixture toy ({', '.join(TOY_MIXTURES)}), "
                             f"got {self.dataset!r}")
        if not self.sigmas:
            raise ValueError("give at least one σ (--sigmas)")
        for sigma in (*self.sigmas, self.default_sigma):
            check_noise_std(sigma)
        for name in ("n_points", "pgd_steps", "quadrature_points", "train_steps", "train_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eps", "step_size", "train_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.anchor_smoothing < 1:
            raise ValueError(f"anchor_smoothing must be in (0, 1), got {self.anchor_smoothing}")

    @property
    def all_sigmas(self) -> list[float]:
        return sorted({*self.sigmas, self.default_sigma})


class ExactPosterior:
    """p_σ(y|x) of a ``GaussianMixture`` at a fixed σ as a ``datagrad.DataPosterior``."""

    def __init__(self, mixture: GaussianMixture, sigma: float):
        self.mixture, self.sigma, self.num_classes = mixture, sigma, mixture.num_classes

    def log_posterior(self, x: Tensor) -> Tensor:
        return self.mixture.log_posterior(x, self.sigma)

    def grad_log_posterior(self, x: Tensor) -> Tensor:
        return self.mixture.grad_log_posterior(x, self.sigma)


class MixtureScores:
    """An EXACT stand-in for a score net: class scores ∇ log p_σ(x|y) of a ``GaussianMixture`` (ClassScoreModel)."""

    training = False

    def __init__(self, mixture: GaussianMixture):
        self.mixture = mixture
        self.num_classes = mixture.num_classes
        self.forward_calls = 0

    def class_scores(
        self, x: Tensor, noise_std: float, include_null: bool = False, max_batch: int | None = None
    ) -> Tensor:  # [B, K(+1), *x.shape[1:]]
        self.forward_calls += 1
        labels = [torch.full((x.shape[0],), k, device=x.device) for k in range(self.num_classes)]
        scores = [self.mixture.score(x, y, noise_std) for y in labels]
        if include_null:
            scores.append(self.mixture.score(x, None, noise_std))
        return torch.stack(scores, dim=1)


# -- metrics ------------------------------------------------------------------------------------------------------
def cosine(estimate: Tensor, truth: Tensor) -> Tensor:
    """Cosine similarity over the trailing dimensions: [B, K, ...] → [B, K] (float64)."""
    a, b = estimate.flatten(2).double(), truth.flatten(2).double()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-300)


def relative_error(estimate: Tensor, truth: Tensor) -> Tensor:
    """||estimate − truth|| / ||truth|| over the trailing dimensions: [B, K] (float64)."""
    a, b = estimate.flatten(2).double(), truth.flatten(2).double()
    return (a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-300)


def total_variation(log_p: Tensor, log_q: Tensor) -> Tensor:
    """½ Σ_y |p_y − q_y| per row: [B, K] log-probabilities → [B] (float64)."""
    return 0.5 * (log_p.double().exp() - log_q.double().exp()).abs().sum(dim=1)


def _summary(values: Tensor) -> dict:
    values = values.flatten().double().cpu().numpy()
    return {"median": float(np.median(values)), "p10": float(np.percentile(values, 10)),
            "p90": float(np.percentile(values, 90)), "mean": float(values.mean())}  # fmt: skip


def gradient_metrics(estimate: Tensor, truth: Tensor, exact_log_p: Tensor) -> dict:
    """Cosine and relative error over all (point, class) pairs, per class (medians) and for the top class.

    The top-class gradient G_top = Σ_{k≠top} p_k (s_top − s_k) vanishes with 1 − p_top: below
    ``TOP_CLASS_MIN_DOUBT`` it is smaller than the float32 rounding of the scores it is computed from (even exact
    scores then give an arbitrary direction), so top-class metrics use only points with 1 − p_top ≥ that.
    """
    cos, rel = cosine(estimate, truth), relative_error(estimate, truth)  # [B, K]
    probs = exact_log_p.exp()
    top = probs.argmax(dim=1)
    rows = torch.nonzero(1 - probs.amax(dim=1) >= TOP_CLASS_MIN_DOUBT).flatten()
    informative = len(rows) > 0
    return {
        "cosine": _summary(cos),
        "relative_error": _summary(rel),
        "top_class_points": len(rows),
        "top_class_cosine": _summary(cos[rows, top[rows]]) if informative else None,
        "top_class_relative_error": _summary(rel[rows, top[rows]]) if informative else None,
        "per_class_median_cosine": cos.median(dim=0).values.tolist(),
    }


def evaluate_sigma(
    model: ClassScoreModel, mixture: GaussianMixture, x: Tensor, y: Tensor, sigma: float, cfg: ValidateConfig
) -> dict:
    """All metrics at one σ for points x [B, C, H, W] in [0, 1] with labels y [B] (module docstring)."""
    calls = model.forward_calls
    start = time.perf_counter()
    source = ScoreNetPosterior(model, sigma)
    exact = mixture.log_posterior(x.double(), sigma)  # [B, K] float64, as every closed-form value below
    true_grad = mixture.grad_log_posterior(x.double(), sigma)  # [B, K, C, H, W]
    trajectory = source.trajectory(x, exact)  # one call: the scores at the anchor
    clean = gradient_metrics(trajectory.grad_log_posterior(x), true_grad, exact)
    raw = gradient_metrics(source.grad_log_posterior(x), true_grad, exact)

    bayes = lambda z: mixture.log_posterior(z)  # the clean Bayes classifier's log-probabilities as logits
    truth, kl = ExactPosterior(mixture, sigma), get_distance("kl")

    def attack_loss(z: Tensor) -> Tensor:
        attach_log_posterior(trajectory, z)  # extends the estimate's path to z, as in training (no gradient)
        return self_consistent_distance(bayes, z, truth, kl)

    generator = torch.Generator(device=x.device).manual_seed(cfg.seed)
    x_adv = pgd(attack_loss, x, cfg.eps, cfg.step_size, cfg.pgd_steps, "linf", random_start=True, clamp=(0.0, 1.0),
                generator=generator)  # fmt: skip
    exact_adv = mixture.log_posterior(x_adv.double(), sigma)
    log_p_trajectory = trajectory.log_posterior(x_adv)  # zero calls, as direct SCORE training uses it
    adversarial = gradient_metrics(trajectory.grad_log_posterior(x_adv),
                                   mixture.grad_log_posterior(x_adv.double(), sigma), exact_adv)
    smoothed = anchor_log_probs(y, mixture.num_classes, cfg.anchor_smoothing).to(x.device)
    line_exact = source.anchored(x, exact, cfg.quadrature_points).log_posterior(x_adv)  # one call each
    line_smoothed = source.anchored(x, smoothed, cfg.quadrature_points).log_posterior(x_adv)
    tv = {
        "trajectory": _summary(total_variation(log_p_trajectory, exact_adv)),
        "anchored_exact": _summary(total_variation(line_exact, exact_adv)),
        "anchored_smoothed": _summary(total_variation(line_smoothed, exact_adv)),
        "smoothed_anchor_at_x": _summary(total_variation(smoothed, exact)),
        "true_movement": _summary(total_variation(exact_adv, exact)),
    }
    return {
        "sigma": sigma,
        "gradient_clean": clean,
        "gradient_clean_null_marginal": raw,
        "gradient_perturbed": adversarial,
        "tv_perturbed": tv,
        "linf_perturbation": float((x_adv - x).abs().amax()),
        "network_calls": model.forward_calls - calls,
        "seconds": time.perf_counter() - start,
    }


def run_validation(model: ClassScoreModel, mixture: GaussianMixture, x: Tensor, y: Tensor, cfg: ValidateConfig):
    """Metrics for every σ of ``cfg.all_sigmas`` plus the acceptance check at the default σ."""
    per_sigma = [evaluate_sigma(model, mixture, x, y, sigma, cfg) for sigma in cfg.all_sigmas]
    at_default = next(r for r in per_sigma if r["sigma"] == cfg.default_sigma)
    cos = at_default["gradient_clean"]["cosine"]["median"]
    tv = at_default["tv_perturbed"]["trajectory"]["median"]
    acceptance = {"sigma": cfg.default_sigma, "median_cosine": cos, "median_tv": tv,
                  "passed": bool(cos >= 0.9 and tv <= 0.05)}  # fmt: skip
    return per_sigma, acceptance


# -- output ---------------------------------------------------------------------------------------------------------
def _top(metrics: dict, key: str) -> str:
    summary = metrics["top_class_cosine"]
    return "n/a" if summary is None else f"{summary[key]:.4f}"[: 6 if key == "p10" else 7]


def format_table(per_sigma: list[dict], acceptance: dict) -> str:
    """One row per σ: gradient cosine (median / p10, all classes and top class), relative error, TV errors."""
    header = (f"{'sigma':>6} | {'cos all':>7} {'p10':>6} | {'cos top':>7} {'p10':>6} | {'rel err':>7} | "
              f"{'cos x_adv':>9} | {'TV traj':>7} {'p90':>6} | {'TV line':>7} | {'TV smooth':>9} {'(at x)':>6} | "
              f"{'moved':>6}")  # fmt: skip
    lines = [header, "-" * len(header)]
    for r in per_sigma:
        g, a, tv = r["gradient_clean"], r["gradient_perturbed"], r["tv_perturbed"]
        lines.append(
            f"{r['sigma']:>6.3g} | {g['cosine']['median']:>7.4f} {g['cosine']['p10']:>6.3f} | "
            f"{_top(g, 'median'):>7} {_top(g, 'p10'):>6} | "
            f"{g['relative_error']['median']:>7.4f} | {a['cosine']['median']:>9.4f} | "
            f"{tv['trajectory']['median']:>7.4f} {tv['trajectory']['p90']:>6.3f} | "
            f"{tv['anchored_exact']['median']:>7.4f} | "
            f"{tv['anchored_smoothed']['median']:>9.4f} {tv['smoothed_anchor_at_x']['median']:>6.3f} | "
            f"{tv['true_movement']['median']:>6.3f}"
        )
    verdict = "PASSED" if acceptance["passed"] else "FAILED"
    lines.append(f"acceptance at sigma = {acceptance['sigma']}: median cosine {acceptance['median_cosine']:.4f} "
                 f"(>= 0.9), median TV {acceptance['median_tv']:.4f} (<= 0.05): {verdict}")  # fmt: skip
    return "\n".join(lines)


def plot_errors(path: Path, per_sigma: list[dict], default_sigma: float) -> None:
    """1 − median cosine (clean, all classes / top class) and median TV errors against σ (log-log)."""
    from analysis.plotting import plt, save_figure, style

    sigmas = [r["sigma"] for r in per_sigma]
    with style():
        figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        left.plot(sigmas, [max(1 - r["gradient_clean"]["cosine"]["median"], 1e-6) for r in per_sigma], "o-",
                  label="all classes")  # fmt: skip
        top = [(r["sigma"], r["gradient_clean"]["top_class_cosine"]) for r in per_sigma]
        left.plot([s for s, t in top if t], [max(1 - t["median"], 1e-6) for _, t in top if t], "o-",
                  label=f"top class (1 − p_top ≥ {TOP_CLASS_MIN_DOUBT:g})")  # fmt: skip
        left.plot(sigmas, [max(1 - r["gradient_perturbed"]["cosine"]["median"], 1e-6) for r in per_sigma], "s--",
                  label="all classes, at x'")  # fmt: skip
        left.axhline(0.1, color="gray", lw=1, ls=":", label="acceptance (cos 0.9)")
        left.set(xscale="log", yscale="log", xlabel="σ (noise std, [0,1] units)", ylabel="1 − median cosine",
                 title="data-gradient direction error")  # fmt: skip
        for key, label in (("trajectory", "trajectory (PGD path)"), ("anchored_exact", "straight line, exact anchor"),
                           ("anchored_smoothed", "straight line, smoothed anchor"),
                           ("true_movement", "true movement p(x) → p(x')")):  # fmt: skip
            right.plot(sigmas, [max(r["tv_perturbed"][key]["median"], 1e-6) for r in per_sigma], "o-", label=label)
        right.axhline(0.05, color="gray", lw=1, ls=":", label="acceptance (TV 0.05)")
        right.set(xscale="log", yscale="log", xlabel="σ (noise std, [0,1] units)", ylabel="median TV at x'",
                  title="posterior error at PGD points")  # fmt: skip
        for axes in (left, right):
            axes.axvline(default_sigma, color="gray", lw=1)
            axes.legend()
        save_figure(figure, path)


# -- the command ---------------------------------------------------------------------------------------------------
def obtain_scorenet(cfg: ValidateConfig, num_classes: int):
    """The score net to validate: ``cfg.scorenet``, or one trained now through the training library."""
    if cfg.scorenet is not None:
        return load_scorenet(cfg.scorenet, expected_num_classes=num_classes), None
    train_cfg = ScoreNetConfig(
        dataset=cfg.dataset, preset=cfg.train_preset, steps=cfg.train_steps, batch_size=cfg.train_batch_size,
        lr=cfg.train_lr, out=str(Path(cfg.out) / TRAIN_SUBDIR), resume="latest", checkpoint_every=1000,
    )  # fmt: skip
    start = time.perf_counter()
    train_scorenet(train_cfg)
    seconds = time.perf_counter() - start
    return load_scorenet(train_cfg.out, expected_num_classes=num_classes), seconds


def validate_posterior(cfg: ValidateConfig) -> dict:
    """Run the validation (module docstring); returns and writes the results."""
    cfg.validate()
    test = load_dataset(cfg.dataset, "test")
    mixture = toy_mixture(cfg.dataset)
    scorenet, train_seconds = obtain_scorenet(cfg, mixture.num_classes)
    if tuple(scorenet.image_shape) != test.image_shape:
        raise ValueError(f"score net images {tuple(scorenet.image_shape)} differ from {cfg.dataset}'s "
                         f"{test.image_shape} (C, H, W)")  # fmt: skip
    for sigma in cfg.all_sigmas:
        scorenet.schedule.sigma_to_t(sigma)  # σ outside the trained range: a clear error before any work
    x, y = test.get(np.arange(min(cfg.n_points, len(test))))
    x = x.clamp(0.0, 1.0)
    start = time.perf_counter()
    with torch.no_grad():
        per_sigma, acceptance = run_validation(scorenet, mixture, x, y, cfg)
    record = {
        "config": config_to_dict(cfg),
        "scorenet": cfg.scorenet or str(Path(cfg.out) / TRAIN_SUBDIR),
        "train_seconds": train_seconds,
        "validation_seconds": time.perf_counter() - start,
        "n_points": len(y),
        "results": per_sigma,
        "acceptance": acceptance,
        "git_revision": git_revision(),
        "versions": package_versions(),
        "threads": torch.get_num_threads(),
    }
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / RESULTS_FILE, record)
    plot_errors(out / FIGURE_FILE, per_sigma, cfg.default_sigma)
    print(format_table(per_sigma, acceptance))
    timing = f"score-net training {train_seconds:.0f} s, " if train_seconds is not None else ""
    print(f"{timing}validation {record['validation_seconds']:.0f} s; wrote {out / RESULTS_FILE}, {out / FIGURE_FILE}")
    return record


def main(argv: list[str] | None = None) -> dict:
    return validate_posterior(parse_config(ValidateConfig, argv, prog="python -m analysis.validate_posterior"))


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
