"""Robustness evaluation: clean, PGD (CE and CW margin) and AutoAttack accuracy, sanity checks, RobustBench records.

Conventions. ``model`` is the UNWRAPPED classifier (never the DDP wrapper): images in [0, 1] → logits [B, K].
Every function evaluates it in eval mode with parameters frozen (both restored afterwards), so no BN statistic
moves and no parameter ``.grad`` is touched. An example counts as robust at ε when the model classifies it
correctly at x AND at every point the attacks found in B(x) = {x' ∈ [0, 1]^D : ||x' − x||_p ≤ ε}; accuracies
are fractions in [0, 1] in Python and 2-decimal percent strings in JSON records. ``norm`` is "linf" or "l2".

PGD is ``datagrad.pgd`` (uniform random start, keep the highest-loss iterate) on a per-example loss:
    CE:        ℓ(x') = −log softmax(z(x'))_y
    CW margin: ℓ(x') = max_{j≠y} z_j(x') − z_y(x')       (> 0 exactly when x' is misclassified)
The default step size is 2.5·ε/steps (Madry et al. 2018): the path length 2.5·ε crosses the ball (diameter 2ε)
from any random start, and more steps means a finer search of the same ball, so PGD-200 against PGD-40 in the
gradient-masking check compares like with like. With several restarts, later restarts attack only the examples
still correct. Training validation is ``pgd_accuracy``'s default: PGD-40 on the CW margin, one restart
(docs/conventions.md §3).
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

import torch
import torch.nn.functional as F
from pyautoattack import AutoAttack
from torch import Tensor, nn
from tqdm.auto import tqdm

from datagrad import PGD
from datagrad.seeding import seeded_generator

from .attack_mode import attack_mode  # eval mode, parameters frozen; the one training attacks use too
from .files import atomic_path

logger = logging.getLogger(__name__)

THREAT_MODELS = {"linf": "Linf", "l2": "L2"}  # our norm name -> RobustBench / AutoAttack name
AUTOATTACK_ATTACKS = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
AUTOATTACK_VERSIONS = ("standard", "plus", "rand", "custom", "apgd-ce")  # "apgd-ce": APGD-CE, 1 restart (cheap)


# -- losses and formatting ---------------------------------------------------------------------------------------
def cross_entropy_loss(logits: Tensor, y: Tensor) -> Tensor:
    """−log softmax(z)_y per example: logits [B, K], y [B] → [B]."""
    return F.cross_entropy(logits, y, reduction="none")


def margin_loss(logits: Tensor, y: Tensor) -> Tensor:
    """CW margin max_{j≠y} z_j − z_y per example: logits [B, K], y [B] → [B]."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), -math.inf).amax(dim=1)
    return other - true


ATTACK_LOSSES = {"ce": cross_entropy_loss, "cw": margin_loss}


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


def default_step_size(eps: float, steps: int) -> float:
    return 2.5 * eps / steps if steps > 0 else 0.0


# -- input checks and model handling -----------------------------------------------------------------------------
def check_inputs(x: Tensor, y: Tensor) -> None:
    """Raise ValueError unless x [N, ...] is floating point in [0, 1] and y [N] holds integer labels."""
    if not torch.is_floating_point(x):
        raise ValueError(f"inputs must be floating point images in [0, 1], got dtype {x.dtype}")
    if y.dim() != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"labels must be a 1-D integer tensor, got dtype {y.dtype} and shape {tuple(y.shape)}")
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"need as many labels as inputs (and at least one), got {x.shape[0]} inputs, {len(y)} labels")
    low, high = x.min().item(), x.max().item()
    if not (low >= 0.0 and high <= 1.0):
        raise ValueError(f"inputs must lie in [0, 1] (normalization belongs inside the model), got [{low}, {high}]")


def _check_norm(norm: str) -> None:
    if norm not in THREAT_MODELS:
        raise ValueError(f"unknown norm {norm!r}; valid norms: {', '.join(THREAT_MODELS)}")


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _slices(n: int, batch_size: int, progress: bool = False, desc: str = "") -> Iterable[slice]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    starts = range(0, n, batch_size)
    if progress:
        starts = tqdm(starts, desc=desc, leave=False)
    return (slice(start, min(start + batch_size, n)) for start in starts)


@torch.no_grad()
def _predict(model: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    """argmax_k z_k(x) for x [N, ...] → [N] int64 on the CPU (model already in attack mode)."""
    device = _model_device(model)
    return torch.cat([model(x[s].to(device)).argmax(dim=1).cpu() for s in _slices(len(x), batch_size)])


def evaluation_points(dataset, indices, device) -> tuple[Tensor, Tensor]:
    """(x, y) of the given points of an ``ImageDataset`` for attacks in [0, 1]: toy mixtures' samples (not clipped)
    are clamped here."""
    x, y = dataset.get(indices, device)
    return (x.clamp_(0.0, 1.0) if dataset.mixture is not None else x), y


# -- clean and PGD accuracy --------------------------------------------------------------------------------------
def clean_correct(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 256) -> Tensor:
    """Per-example correctness at x: [N] bool on the CPU."""
    check_inputs(x, y)
    with attack_mode(model):
        return _predict(model, x, batch_size) == y.cpu()


def clean_accuracy(
    model: nn.Module, data: tuple[Tensor, Tensor] | Iterable[tuple[Tensor, Tensor]], batch_size: int = 256
) -> float:
    """Fraction classified correctly, from tensors ``(x, y)`` or an iterable of ``(x, y)`` batches."""
    if isinstance(data, tuple | list) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        data = [data]
    correct = [clean_correct(model, x, y, batch_size) for x, y in data]
    if not correct:
        raise ValueError("no batches to evaluate")
    return torch.cat(correct).float().mean().item()


def pgd_correct(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    norm: str = "linf",
    steps: int = 40,
    step_size: float | None = None,
    loss: str = "cw",
    restarts: int = 1,
    generator: torch.Generator | None = None,
    batch_size: int = 256,
    progress: bool = False,
) -> Tensor:
    """Per-example PGD robustness: correct at x and after each of ``restarts`` PGD runs → [N] bool on the CPU.

    ``generator`` (on the model's device; None: torch's global RNG) draws the random starts batch by batch, so
    the starts, and the result, depend on ``batch_size``.
    """
    check_inputs(x, y)
    _check_norm(norm)
    if loss not in ATTACK_LOSSES:
        raise ValueError(f"unknown attack loss {loss!r}; valid losses: {', '.join(ATTACK_LOSSES)}")
    if restarts < 1 or int(restarts) != restarts:
        raise ValueError(f"restarts must be a positive integer, got {restarts}")
    step_size = default_step_size(eps, steps) if step_size is None else step_size
    attack = PGD(eps=eps, step_size=step_size, steps=steps, norm=norm, random_start=True, keep_best=True)
    loss_fn, device = ATTACK_LOSSES[loss], _model_device(model)
    flags = []
    with attack_mode(model):
        for s in _slices(len(x), batch_size, progress, f"PGD-{steps} {loss}"):
            xb, yb = x[s].to(device), y[s].to(device)
            with torch.no_grad():
                correct = model(xb).argmax(dim=1) == yb
            for _ in range(int(restarts)):
                alive = correct.nonzero().squeeze(1)
                if alive.numel() == 0:
                    break
                x_alive, y_alive = xb[alive], yb[alive]
                x_adv = attack.maximize(lambda z, y_alive=y_alive: loss_fn(model(z), y_alive), x_alive, generator)
                with torch.no_grad():
                    correct[alive] = model(x_adv).argmax(dim=1) == y_alive
            flags.append(correct.cpu())
    return torch.cat(flags)


def pgd_accuracy(model: nn.Module, x: Tensor, y: Tensor, eps: float, norm: str = "linf", **pgd_options) -> float:
    """Robust accuracy under PGD (``pgd_correct``'s options; default PGD-40, CW margin, 1 restart)."""
    return pgd_correct(model, x, y, eps, norm, **pgd_options).float().mean().item()


def pgd_accuracy_curve(
    model: nn.Module, x: Tensor, y: Tensor, eps_values: Sequence[float], norm: str = "linf", seed: int = 0,
    **pgd_options,
) -> list[float]:
    """PGD accuracy at each ε (one independent random-start stream per ε)."""
    device = _model_device(model)
    return [
        pgd_accuracy(model, x, y, eps, norm, generator=seeded_generator(seed, i, device=device), **pgd_options)
        for i, eps in enumerate(eps_values)
    ]


# -- AutoAttack --------------------------------------------------------------------------------------------------
@dataclass
class AutoAttackRun:
    correct: Tensor  # [N] bool on the CPU, our own forward pass on AutoAttack's x_adv
    max_perturbation: float  # max_i ||x_adv_i − x_i||_p
    in_range: bool  # all x_adv in [0, 1]
    warnings: list[str]  # messages pyautoattack's own checks logged at WARNING or above


@contextlib.contextmanager
def _relay_autoattack_log() -> Iterator[list[str]]:
    """Send the 'auto-attack' logger's records to this module's logger at DEBUG; collect its warnings."""
    source, warnings = logging.getLogger("auto-attack"), []

    class Relay(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                warnings.append(record.getMessage())
            logger.debug("auto-attack: %s", record.getMessage())

    handler, saved = Relay(), (source.level, source.propagate)
    source.addHandler(handler)
    source.setLevel(logging.DEBUG)
    source.propagate = False
    trace = sys.gettrace()  # its dynamic-defense check calls sys.settrace(None), which would end a coverage tracer
    try:
        yield warnings
    finally:
        sys.settrace(trace)
        source.removeHandler(handler)
        source.setLevel(saved[0])
        source.propagate = saved[1]


def run_autoattack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    norm: str = "linf",
    version: str = "standard",
    attacks: Sequence[str] | None = None,
    seed: int = 0,
    batch_size: int = 256,
) -> AutoAttackRun:
    """pyautoattack 0.2.0 on (x, y), seeded; torch's global RNG state is restored afterwards.

    ``version``: "standard" (APGD-CE, APGD-T, FAB-T, Square; the RobustBench number), "plus", "rand",
    "custom" with ``attacks`` (names from ``AUTOATTACK_ATTACKS``), or "apgd-ce" (APGD-CE, 100 iterations,
    one restart: a cheap check, not a benchmark).
    """
    check_inputs(x, y)
    _check_norm(norm)
    if version not in AUTOATTACK_VERSIONS:
        raise ValueError(f"unknown AutoAttack version {version!r}; valid versions: {', '.join(AUTOATTACK_VERSIONS)}")
    if (version == "custom") != (attacks is not None):
        raise ValueError("AutoAttack attacks are given with version='custom' and only then")
    if attacks is not None and (not attacks or set(attacks) - set(AUTOATTACK_ATTACKS)):
        raise ValueError(f"AutoAttack attacks must be among {', '.join(AUTOATTACK_ATTACKS)}, got {list(attacks)}")
    if version == "apgd-ce":
        version, attacks = "custom", ["apgd-ce"]
    if x.dim() != 4 and (version in ("standard", "plus") or "square" in (attacks or ())):
        raise ValueError(f"AutoAttack's Square attack needs images [N, C, H, W], got inputs of shape {tuple(x.shape)}")
    device = _model_device(model)
    x, y = x.to(device), y.to(device)
    rng_devices = [device] if device.type == "cuda" else []
    with attack_mode(model), _relay_autoattack_log() as warnings, torch.random.fork_rng(devices=rng_devices):
        autoattack = AutoAttack(
            model, norm=THREAT_MODELS[norm], eps=float(eps), version=version,
            attacks=None if attacks is None else list(attacks), device=device, seed=seed,
        )
        if attacks == ["apgd-ce"]:
            autoattack.apgd.n_restarts = 1
        x_adv, _ = autoattack.run_standard_evaluation(x, y, batch_size=batch_size)
        correct = _predict(model, x_adv, batch_size) == y.cpu()
    delta = (x_adv - x).flatten(1)
    perturbation = delta.abs().amax(dim=1) if norm == "linf" else delta.norm(dim=1)
    in_range = bool(x_adv.min() >= 0 and x_adv.max() <= 1)
    return AutoAttackRun(correct, perturbation.max().item(), in_range, warnings)


def autoattack_accuracy(model: nn.Module, x: Tensor, y: Tensor, eps: float, norm: str = "linf", **options) -> float:
    """Robust accuracy under AutoAttack (``run_autoattack``'s options)."""
    return run_autoattack(model, x, y, eps, norm, **options).correct.float().mean().item()


# -- full evaluation with sanity checks --------------------------------------------------------------------------
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


def _eval_mode_checks(model: nn.Module, x: Tensor) -> tuple[list[SanityCheck], Tensor]:
    """Inside ``attack_mode``: a forward pass must leave every buffer unchanged and two passes must agree.

    Returns the checks and the first pass's logits [B, K]."""
    device = _model_device(model)
    before = {name: buffer.clone() for name, buffer in model.named_buffers()}
    with torch.no_grad():
        first, second = model(x.to(device)), model(x.to(device))
    changed = [name for name, buffer in model.named_buffers() if not torch.equal(buffer, before[name])]
    training = [name or "<root>" for name, module in model.named_modules() if module.training]
    scale = first.abs().max().item()
    difference = (first - second).abs().max().item()
    same_labels = torch.equal(first.argmax(1), second.argmax(1))
    checks = [
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
    return checks, first


def _order_check(clean: float, pgd: Mapping[str, float], autoattack: float | None, tolerance: float) -> SanityCheck:
    """AutoAttack ≤ every PGD (up to ``tolerance``) ≤ clean accuracy."""
    pgd_text = ", ".join(f"PGD-{loss.upper()} {format_accuracy(acc)}" for loss, acc in pgd.items())
    passed = all(acc <= clean for acc in pgd.values())
    detail = f"clean {format_accuracy(clean)} >= {pgd_text}"
    if autoattack is not None:
        passed = passed and autoattack <= min(pgd.values()) + tolerance
        detail += f" >= AutoAttack {format_accuracy(autoattack)} (tolerance {format_accuracy(tolerance)} points)"
    return SanityCheck("accuracy_order", passed, detail)


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
    _check_norm(norm)
    n_examples = len(x) if n_examples is None else n_examples
    if not 0 < n_examples <= len(x):
        raise ValueError(f"n_examples must be in [1, {len(x)}], got {n_examples}")
    x, y = x[:n_examples], y[:n_examples]
    check_inputs(x, y)
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    device, start, seconds = _model_device(model), time.perf_counter(), {}
    pgd_options = dict(steps=pgd_steps, restarts=pgd_restarts, step_size=pgd_step_size, batch_size=batch_size)
    checks = [SanityCheck("inputs_in_range", True, f"inputs in [{x.min().item():.3g}, {x.max().item():.3g}]")]

    def timed(name, fn, *args, **kwargs):
        tick = time.perf_counter()
        result = fn(*args, **kwargs)
        seconds[name] = time.perf_counter() - tick
        logger.info("%s done in %.1f s", name, seconds[name])
        return result

    with attack_mode(model):
        mode_checks, logits = _eval_mode_checks(model, x[: min(check_examples, batch_size)])
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"the model must return logits [B, K] with K >= 2, got shape {tuple(logits.shape)}")
    if y.min() < 0 or y.max() >= logits.shape[1]:
        raise ValueError(f"labels must lie in [0, {logits.shape[1]}) for a {logits.shape[1]}-class model, "
                         f"got [{y.min().item()}, {y.max().item()}]")
    checks += mode_checks
    clean = timed("clean", clean_correct, model, x, y, batch_size)
    pgd = {
        loss: timed(f"pgd_{loss}", pgd_correct, model, x, y, eps, norm, loss=loss, progress=progress,
                    generator=seeded_generator(seed, stream, device=device), **pgd_options)
        for stream, loss in enumerate(ATTACK_LOSSES)
    }
    robust = clean & pgd["ce"] & pgd["cw"]
    autoattack_acc = None
    if autoattack:
        run = timed("autoattack", run_autoattack, model, x, y, eps, norm, autoattack_version, autoattack_attacks,
                    seed, batch_size)
        autoattack_acc, robust = run.correct.float().mean().item(), robust & run.correct
        valid = run.in_range and run.max_perturbation <= eps + 1e-5 and not run.warnings
        checks.append(SanityCheck(
            "autoattack_valid", valid,
            f"max perturbation {run.max_perturbation:.6g} (eps {eps:.6g}), in [0, 1]: {run.in_range}; "
            f"AutoAttack warnings: {run.warnings or 'none'}",
        ))

    m = min(check_examples, n_examples)
    xs, ys = x[:m], y[:m]
    tick = time.perf_counter()
    eps_zero = pgd_correct(model, xs, ys, 0.0, norm, steps=5, generator=seeded_generator(seed, 2, device=device))
    checks.append(SanityCheck(
        "eps_zero", torch.equal(eps_zero, clean[:m]),
        f"PGD at eps 0 {format_accuracy(eps_zero.float().mean().item())} vs clean "
        f"{format_accuracy(clean[:m].float().mean().item())} on {m} examples",
    ))
    large_eps = (1.0 if norm == "linf" else math.sqrt(x[0].numel())) if large_eps is None else large_eps
    large = pgd_accuracy(model, xs, ys, large_eps, norm, steps=pgd_steps, batch_size=batch_size,
                         generator=seeded_generator(seed, 3, device=device))
    checks.append(SanityCheck(
        "large_eps", large <= large_eps_max_acc,
        f"PGD-{pgd_steps} CW at eps {large_eps:.4g}: {format_accuracy(large)} on {m} examples "
        f"(must be <= {format_accuracy(large_eps_max_acc)})",
    ))
    weak = pgd["cw"][:m]
    alive = weak.nonzero().squeeze(1)
    strong = weak.clone()
    if alive.numel():
        strong[alive] = pgd_correct(model, xs[alive], ys[alive], eps, norm, steps=masking_steps, loss="cw",
                                    restarts=masking_restarts, batch_size=batch_size,
                                    generator=seeded_generator(seed, 4, device=device))
    drop = (weak.float().mean() - strong.float().mean()).item()
    checks.append(SanityCheck(
        "gradient_masking", drop <= masking_threshold,
        f"PGD-{pgd_steps}x{pgd_restarts} CW {format_accuracy(weak.float().mean().item())} vs "
        f"PGD-{masking_steps}x{masking_restarts} CW {format_accuracy(strong.float().mean().item())} on {m} examples: "
        f"drop {format_accuracy(drop)} points (threshold {format_accuracy(masking_threshold)})",
    ))
    seconds["checks"] = time.perf_counter() - tick

    accuracies = {loss: flags.float().mean().item() for loss, flags in pgd.items()}
    clean_acc = clean.float().mean().item()
    checks.append(_order_check(clean_acc, accuracies, autoattack_acc, order_tolerance))
    for check in checks:
        if not check.passed:
            logger.warning("sanity check %s failed: %s", check.name, check.detail)
    seconds["total"] = time.perf_counter() - start
    settings = dict(
        pgd_steps=pgd_steps, pgd_restarts=pgd_restarts,
        pgd_step_size=default_step_size(eps, pgd_steps) if pgd_step_size is None else pgd_step_size,
        autoattack_version=autoattack_version if autoattack else None,
        autoattack_attacks=None if autoattack_attacks is None else list(autoattack_attacks),
        check_examples=m, masking_steps=masking_steps, masking_restarts=masking_restarts,
        masking_threshold=masking_threshold, large_eps=large_eps, large_eps_max_acc=large_eps_max_acc,
        order_tolerance=order_tolerance, batch_size=batch_size, eps_value=float(eps),
    )
    return Evaluation(
        float(eps), norm, n_examples, seed, clean_acc, accuracies, autoattack_acc,
        robust.float().mean().item(), settings, checks, seconds,
    )


# -- figures -----------------------------------------------------------------------------------------------------
def plot_accuracy_vs_eps(
    path: str | Path, eps_values: Sequence[float], curves: Mapping[str, Sequence[float]], norm: str = "linf",
    title: str | None = None,
) -> None:
    """Save accuracy (%) against ε·255 for each labelled curve as a PNG, atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.5, 3.2), dpi=150)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    scaled = [255 * eps for eps in eps_values]
    for label, accuracies in curves.items():
        axes.plot(scaled, [100 * acc for acc in accuracies], marker="o", label=label)
    axes.set(xlabel=f"ε × 255 ({THREAT_MODELS[norm]})", ylabel="accuracy (%)", ylim=(0, 100), title=title or "")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
