"""The full robustness evaluation: clean, PGD (CE and CW margin) and AutoAttack accuracy, sanity checks, records.

``evaluate(model, x, y, eps)`` runs, in order, on the FIRST ``n_examples`` points: the checks of the model itself
(eval mode, determinism, logits shape, labels), clean accuracy, PGD-CE and PGD-CW (``trainlib.accuracy``),
AutoAttack (``trainlib.autoattack``), then the checks of the attacks (ε = 0, a ball that covers every image, a
stronger PGD) and of the accuracies' order. Conventions are ``trainlib.accuracy``'s (unwrapped model, images in
[0, 1], eval mode with parameters frozen, accuracies as fractions); records (``Evaluation.record``) are RobustBench
style, with accuracies as 2-decimal percent strings and ε spelled as RobustBench does ("8/255").
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction

import torch
from torch import Tensor, nn

from datagrad.seeding import seeded_generator

from .accuracy import (
    ATTACK_LOSSES,
    THREAT_MODELS,
    check_inputs,
    check_norm,
    clean_correct,
    default_step_size,
    model_device,
    pgd_accuracy,
    pgd_correct,
)
from .attack_mode import attack_mode
from .autoattack import AutoAttackRun, run_autoattack

logger = logging.getLogger(__name__)

# the random-start streams of one evaluation, keyed by (seed, stream): PGD-CE, PGD-CW, then the checks'
_STREAM_EPS_ZERO, _STREAM_LARGE_EPS, _STREAM_MASKING = 2, 3, 4


# -- formatting ------------------------------------------------------------------------------------------------------
def format_eps(eps: float) -> str:
    """RobustBench spelling of ε: "8/255" when ε is a multiple of 1/255, "0" / "1" for integers, else a decimal."""
    eps = float(eps)
    if eps == int(eps):
        return str(int(eps))
    steps = round(eps * 255)
    if abs(eps * 255 - steps) < 1e-4:
        return f"{steps}/255"
    return repr(eps)


def parse_eps(text: str | float) -> float:
    """Inverse of ``format_eps``: "8/255" → 0.0313..., "0.5" → 0.5."""
    try:
        return float(Fraction(str(text).strip()))
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"eps must be a number or a fraction like 8/255, got {text!r}") from None


def format_accuracy(accuracy: float) -> str:
    """A fraction in [0, 1] as a 2-decimal percent string: 0.61044 → "61.04"."""
    return f"{100 * accuracy:.2f}"


def evaluation_points(dataset, indices, device) -> tuple[Tensor, Tensor]:
    """(x, y) of the given points of an ``ImageDataset`` for attacks in [0, 1]: toy mixtures' samples (not clipped)
    are clamped here."""
    x, y = dataset.get(indices, device)
    return (x.clamp_(0.0, 1.0) if dataset.mixture is not None else x), y


# -- results ---------------------------------------------------------------------------------------------------------
@dataclass
class SanityCheck:
    name: str
    passed: bool
    detail: str


@dataclass
class Evaluation:
    """Accuracies (fractions) on the first ``n_examples`` points, the sanity checks and the settings used."""

    eps: float
    norm: str
    n_examples: int
    seed: int
    clean_acc: float
    pgd_acc: dict[str, float]  # attack loss ("ce", "cw") -> accuracy
    autoattack_acc: float | None  # None when AutoAttack was not run
    worst_case_acc: float  # robust under every attack run, per example
    settings: dict
    checks: list[SanityCheck] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    def record(self, **metadata) -> dict:
        """RobustBench-style JSON record (``metadata`` such as name, dataset, architecture goes first)."""
        return {
            **metadata,
            "clean_acc": format_accuracy(self.clean_acc),
            "autoattack_acc": None if self.autoattack_acc is None else format_accuracy(self.autoattack_acc),
            "eps": format_eps(self.eps),
            "n_examples": self.n_examples,
            "threat_model": THREAT_MODELS[self.norm],
            **{f"pgd_{loss}_acc": format_accuracy(acc) for loss, acc in self.pgd_acc.items()},
            "worst_case_acc": format_accuracy(self.worst_case_acc),
            "seed": self.seed,
            "settings": self.settings,
            "sanity_passed": self.passed,
            "sanity_checks": [asdict(check) for check in self.checks],
            "seconds": {name: round(value, 3) for name, value in self.seconds.items()},
        }


# -- the sanity checks -----------------------------------------------------------------------------------------------
def _model_checks(model: nn.Module, x: Tensor, y: Tensor) -> list[SanityCheck]:
    """On the batch x: a forward pass in attack mode must leave every buffer unchanged and two passes must agree.
    ValueError unless the model returns logits [B, K ≥ 2] and the labels y lie in [0, K)."""
    with attack_mode(model):
        device = model_device(model)
        before = {name: buffer.clone() for name, buffer in model.named_buffers()}
        with torch.no_grad():
            first, second = model(x.to(device)), model(x.to(device))
        changed = [name for name, buffer in model.named_buffers() if not torch.equal(buffer, before[name])]
        training = [name or "<root>" for name, module in model.named_modules() if module.training]
    if first.dim() != 2 or first.shape[1] < 2:
        raise ValueError(f"the model must return logits [B, K] with K >= 2, got shape {tuple(first.shape)}")
    if y.min() < 0 or y.max() >= first.shape[1]:
        raise ValueError(f"labels must lie in [0, {first.shape[1]}) for a {first.shape[1]}-class model, "
                         f"got [{y.min().item()}, {y.max().item()}]")
    scale = first.abs().max().item()
    difference = (first - second).abs().max().item()
    same_labels = torch.equal(first.argmax(1), second.argmax(1))
    return [
        SanityCheck(
            "eval_mode", not changed and not training,
            f"modules in training mode: {training or 'none'}; buffers changed by a forward pass: {changed or 'none'}",
        ),
        SanityCheck(
            "deterministic", same_labels and difference <= 1e-5 + 1e-4 * scale,
            f"two forward passes on {len(x)} inputs: max |logit difference| {difference:.3g} "
            f"(max |logit| {scale:.3g}), same predictions: {same_labels}",
        ),
    ]


def _autoattack_check(run: AutoAttackRun, eps: float) -> SanityCheck:
    """AutoAttack's points lie in the ε-ball and in [0, 1] (tolerance 1e-5), and its own checks stayed silent."""
    valid = run.in_range and run.max_perturbation <= eps + 1e-5 and not run.warnings
    return SanityCheck(
        "autoattack_valid", valid,
        f"max perturbation {run.max_perturbation:.6g} (eps {eps:.6g}), in [0, 1]: {run.in_range}; "
        f"AutoAttack warnings: {run.warnings or 'none'}",
    )


def _eps_zero_check(model, x: Tensor, y: Tensor, clean: Tensor, norm: str, generator) -> SanityCheck:
    """PGD at ε = 0 gives exactly the clean per-example correctness ``clean``."""
    at_zero = pgd_correct(model, x, y, 0.0, norm, steps=5, generator=generator)
    return SanityCheck(
        "eps_zero", torch.equal(at_zero, clean),
        f"PGD at eps 0 {format_accuracy(at_zero.float().mean().item())} vs clean "
        f"{format_accuracy(clean.float().mean().item())} on {len(x)} examples",
    )


def _large_eps_check(model, x: Tensor, y: Tensor, large_eps: float, max_acc: float, norm: str, steps: int,
                     batch_size: int, generator) -> SanityCheck:
    """PGD-CW at ``large_eps`` (a ball that reaches any image) leaves accuracy ≤ ``max_acc``."""
    large = pgd_accuracy(model, x, y, large_eps, norm, steps=steps, batch_size=batch_size, generator=generator)
    return SanityCheck(
        "large_eps", large <= max_acc,
        f"PGD-{steps} CW at eps {large_eps:.4g}: {format_accuracy(large)} on {len(x)} examples "
        f"(must be <= {format_accuracy(max_acc)})",
    )


def _gradient_masking_check(model, x: Tensor, y: Tensor, weak: Tensor, eps: float, norm: str, weak_name: str,
                            steps: int, restarts: int, threshold: float, batch_size: int, generator) -> SanityCheck:
    """A stronger PGD-CW (``steps`` × ``restarts``) on the examples the main PGD-CW (``weak``: its per-example
    robustness) left robust breaks at most ``threshold`` (fraction) more of them."""
    alive = weak.nonzero().squeeze(1)
    strong = weak.clone()
    if alive.numel():
        strong[alive] = pgd_correct(model, x[alive], y[alive], eps, norm, steps=steps, loss="cw", restarts=restarts,
                                    batch_size=batch_size, generator=generator)
    drop = (weak.float().mean() - strong.float().mean()).item()
    return SanityCheck(
        "gradient_masking", drop <= threshold,
        f"{weak_name} CW {format_accuracy(weak.float().mean().item())} vs "
        f"PGD-{steps}x{restarts} CW {format_accuracy(strong.float().mean().item())} on {len(x)} examples: "
        f"drop {format_accuracy(drop)} points (threshold {format_accuracy(threshold)})",
    )


def _order_check(clean: float, pgd: Mapping[str, float], autoattack: float | None, tolerance: float) -> SanityCheck:
    """AutoAttack ≤ every PGD (up to ``tolerance``) ≤ clean accuracy."""
    pgd_text = ", ".join(f"PGD-{loss.upper()} {format_accuracy(acc)}" for loss, acc in pgd.items())
    passed = all(acc <= clean for acc in pgd.values())
    detail = f"clean {format_accuracy(clean)} >= {pgd_text}"
    if autoattack is not None:
        passed = passed and autoattack <= min(pgd.values()) + tolerance
        detail += f" >= AutoAttack {format_accuracy(autoattack)} (tolerance {format_accuracy(tolerance)} points)"
    return SanityCheck("accuracy_order", passed, detail)


class _Stopwatch:
    """Seconds per named part of an evaluation (``with clock.part(name):``), logged as each part ends."""

    def __init__(self):
        self.start, self.seconds = time.perf_counter(), {}

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        tick = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - tick
        logger.info("%s done in %.1f s", name, self.seconds[name])


# -- the evaluation --------------------------------------------------------------------------------------------------
def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    norm: str = "linf",
    n_examples: int | None = None,
    *,
    autoattack: bool = True,
    autoattack_version: str = "standard",
    autoattack_attacks: Sequence[str] | None = None,
    pgd_steps: int = 40,
    pgd_restarts: int = 1,
    pgd_step_size: float | None = None,
    check_examples: int = 512,
    masking_steps: int = 200,
    masking_restarts: int = 5,
    masking_threshold: float = 0.02,
    large_eps: float | None = None,
    large_eps_max_acc: float = 0.05,
    order_tolerance: float = 0.001,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = False,
) -> Evaluation:
    """Clean, PGD-CE, PGD-CW (and AutoAttack) accuracy on the FIRST ``n_examples`` points, in order, plus checks.

    Sanity checks (recorded; a failed one is logged as a warning, never raised), on the first ``check_examples``:
      inputs_in_range   x ⊂ [0, 1] (otherwise ValueError before anything runs)
      eval_mode         no module in training mode, no buffer changed by a forward pass
      deterministic     two forward passes agree (logits within 1e-5 + 1e-4·max|z|, same predictions)
      eps_zero          PGD at ε = 0 gives exactly the clean per-example correctness
      large_eps         PGD-CW at ``large_eps`` (ℓ∞: 1, ℓ2: √D, enough to reach any image) leaves
                        accuracy ≤ ``large_eps_max_acc``
      gradient_masking  PGD-``masking_steps`` CW with ``masking_restarts`` random restarts breaks at most
                        ``masking_threshold`` (fraction) more examples than the main PGD-CW. Sound models lose
                        a few tenths of a point (0.4 for the adversarially trained MLP of the tests); toys whose
                        examples all sit at similar margins can lose a few points to local maxima (the warning
                        then still means PGD-40 overestimates robustness); a gradient-masked model, broken only
                        by lucky random starts, loses tens of points (25 for the quantized linear model).
      autoattack_valid  AutoAttack's points lie in the ε-ball and in [0, 1] (tolerance 1e-5), and its own
                        checks (randomized / dynamic defense, probabilities as outputs, Square) stayed silent
      accuracy_order    AutoAttack ≤ min PGD + ``order_tolerance`` and PGD ≤ clean
    """
    check_norm(norm)
    n_examples = len(x) if n_examples is None else n_examples
    if not 0 < n_examples <= len(x):
        raise ValueError(f"n_examples must be in [1, {len(x)}], got {n_examples}")
    x, y = x[:n_examples], y[:n_examples]
    check_inputs(x, y)
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    device, clock = model_device(model), _Stopwatch()
    streams = {stream: seeded_generator(seed, stream, device=device) for stream in range(5)}
    checks = [SanityCheck("inputs_in_range", True, f"inputs in [{x.min().item():.3g}, {x.max().item():.3g}]")]
    checks += _model_checks(model, x[: min(check_examples, batch_size)], y)

    # the accuracies: clean, PGD-CE and PGD-CW (streams 0, 1), AutoAttack; robust = robust under every attack
    with clock.part("clean"):
        clean = clean_correct(model, x, y, batch_size)
    pgd = {}
    for stream, loss in enumerate(ATTACK_LOSSES):
        with clock.part(f"pgd_{loss}"):
            pgd[loss] = pgd_correct(model, x, y, eps, norm, steps=pgd_steps, step_size=pgd_step_size, loss=loss,
                                    restarts=pgd_restarts, generator=streams[stream], batch_size=batch_size,
                                    progress=progress)
    robust, autoattack_acc = clean & pgd["ce"] & pgd["cw"], None
    if autoattack:
        with clock.part("autoattack"):
            run = run_autoattack(model, x, y, eps, norm, autoattack_version, autoattack_attacks, seed, batch_size)
        autoattack_acc, robust = run.correct.float().mean().item(), robust & run.correct
        checks.append(_autoattack_check(run, eps))

    # the checks of the attacks, on the first m points
    m = min(check_examples, n_examples)
    large_eps = (1.0 if norm == "linf" else math.sqrt(x[0].numel())) if large_eps is None else large_eps
    with clock.part("checks"):
        checks.append(_eps_zero_check(model, x[:m], y[:m], clean[:m], norm, streams[_STREAM_EPS_ZERO]))
        checks.append(_large_eps_check(model, x[:m], y[:m], large_eps, large_eps_max_acc, norm, pgd_steps,
                                       batch_size, streams[_STREAM_LARGE_EPS]))
        checks.append(_gradient_masking_check(model, x[:m], y[:m], pgd["cw"][:m], eps, norm,
                                              f"PGD-{pgd_steps}x{pgd_restarts}", masking_steps, masking_restarts,
                                              masking_threshold, batch_size, streams[_STREAM_MASKING]))
    accuracies = {loss: flags.float().mean().item() for loss, flags in pgd.items()}
    clean_acc = clean.float().mean().item()
    checks.append(_order_check(clean_acc, accuracies, autoattack_acc, order_tolerance))
    for check in checks:
        if not check.passed:
            logger.warning("sanity check %s failed: %s", check.name, check.detail)
    clock.seconds["total"] = time.perf_counter() - clock.start
    settings = dict(
        pgd_steps=pgd_steps, pgd_restarts=pgd_restarts,
        pgd_step_size=default_step_size(eps, pgd_steps) if pgd_step_size is None else pgd_step_size,
        autoattack_version=autoattack_version if autoattack else None,
        autoattack_attacks=None if autoattack_attacks is None else list(autoattack_attacks),
        check_examples=m, masking_steps=masking_steps, masking_restarts=masking_restarts,
        masking_threshold=masking_threshold, large_eps=large_eps, large_eps_max_acc=large_eps_max_acc,
        order_tolerance=order_tolerance, batch_size=batch_size, eps_value=float(eps),
    )
    return Evaluation(float(eps), norm, n_examples, seed, clean_acc, accuracies, autoattack_acc,
                      robust.float().mean().item(), settings, checks, clock.seconds)
