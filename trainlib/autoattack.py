"""AutoAttack (pyautoattack 0.2.0) on a classifier: seeded, in attack mode, its log relayed, its points checked.

The model is evaluated as in ``trainlib.accuracy`` (unwrapped, images in [0, 1], eval mode with parameters frozen).
Torch's global RNG state is restored afterwards; pyautoattack's own messages go to this module's logger at DEBUG,
and its warnings (randomized / dynamic defense, probabilities as outputs, Square) are collected in the result.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from pyautoattack import AutoAttack
from torch import Tensor, nn

from .accuracy import THREAT_MODELS, check_inputs, check_norm, model_device, predict
from .attack_mode import attack_mode

logger = logging.getLogger(__name__)

AUTOATTACK_ATTACKS = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
AUTOATTACK_VERSIONS = ("standard", "plus", "rand", "custom", "apgd-ce")  # "apgd-ce": APGD-CE, 1 restart (cheap)


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


def _check_version(version: str, attacks: Sequence[str] | None, x: Tensor) -> None:
    if version not in AUTOATTACK_VERSIONS:
        raise ValueError(f"unknown AutoAttack version {version!r}; valid versions: {', '.join(AUTOATTACK_VERSIONS)}")
    if (version == "custom") != (attacks is not None):
        raise ValueError("AutoAttack attacks are given with version='custom' and only then")
    if attacks is not None and (not attacks or set(attacks) - set(AUTOATTACK_ATTACKS)):
        raise ValueError(f"AutoAttack attacks must be among {', '.join(AUTOATTACK_ATTACKS)}, got {list(attacks)}")
    if x.dim() != 4 and (version in ("standard", "plus") or "square" in (attacks or ())):
        raise ValueError(f"AutoAttack's Square attack needs images [N, C, H, W], got inputs of shape {tuple(x.shape)}")


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
    check_norm(norm)
    _check_version(version, attacks, x)
    if version == "apgd-ce":
        version, attacks = "custom", ["apgd-ce"]
    device = model_device(model)
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
        correct = predict(model, x_adv, batch_size) == y.cpu()
    delta = (x_adv - x).flatten(1)
    perturbation = delta.abs().amax(dim=1) if norm == "linf" else delta.norm(dim=1)
    in_range = bool(x_adv.min() >= 0 and x_adv.max() <= 1)
    return AutoAttackRun(correct, perturbation.max().item(), in_range, warnings)


def autoattack_accuracy(model: nn.Module, x: Tensor, y: Tensor, eps: float, norm: str = "linf", **options) -> float:
    """Robust accuracy under AutoAttack (``run_autoattack``'s options)."""
    return run_autoattack(model, x, y, eps, norm, **options).correct.float().mean().item()
