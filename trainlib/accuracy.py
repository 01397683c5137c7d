"""Clean and PGD accuracy of a classifier, per example and as fractions.

Conventions. ``model`` is the UNWRAPPED classifier (never the DDP wrapper): images in [0, 1] → logits [B, K].
Every function evaluates it in eval mode with parameters frozen (``attack_mode``; both restored afterwards), so no BN
statistic moves and no parameter ``.grad`` is touched. An example counts as robust at ε when the model classifies it
correctly at x AND at every point the attack found in B(x) = {x' ∈ [0, 1]^D : ||x' − x||_p ≤ ε}; accuracies are
fractions in [0, 1]. ``norm`` is "linf" or "l2".

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

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from datagrad import PGD
from datagrad.seeding import seeded_generator

from .attack_mode import attack_mode  # eval mode, parameters frozen; the one training attacks use too

THREAT_MODELS = {"linf": "Linf", "l2": "L2"}  # our norm name -> RobustBench / AutoAttack name


# -- attack losses ---------------------------------------------------------------------------------------------------
def cross_entropy_loss(logits: Tensor, y: Tensor) -> Tensor:
    """−log softmax(z)_y per example: logits [B, K], y [B] → [B]."""
    return F.cross_entropy(logits, y, reduction="none")


def margin_loss(logits: Tensor, y: Tensor) -> Tensor:
    """CW margin max_{j≠y} z_j − z_y per example: logits [B, K], y [B] → [B]."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), -math.inf).amax(dim=1)
    return other - true


ATTACK_LOSSES = {"ce": cross_entropy_loss, "cw": margin_loss}


def default_step_size(eps: float, steps: int) -> float:
    """2.5·ε/steps (module docstring); 0 for 0 steps."""
    return 2.5 * eps / steps if steps > 0 else 0.0


# -- input checks and model handling ---------------------------------------------------------------------------------
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


def check_norm(norm: str) -> None:
    if norm not in THREAT_MODELS:
        raise ValueError(f"unknown norm {norm!r}; valid norms: {', '.join(THREAT_MODELS)}")


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without parameters)."""
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
def predict(model: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    """argmax_k z_k(x) for x [N, ...] → [N] int64 on the CPU (the model already in attack mode)."""
    device = model_device(model)
    return torch.cat([model(x[s].to(device)).argmax(dim=1).cpu() for s in _slices(len(x), batch_size)])


# -- clean and PGD accuracy ------------------------------------------------------------------------------------------
def clean_correct(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 256) -> Tensor:
    """Per-example correctness at x: [N] bool on the CPU."""
    check_inputs(x, y)
    with attack_mode(model):
        return predict(model, x, batch_size) == y.cpu()


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
    check_norm(norm)
    if loss not in ATTACK_LOSSES:
        raise ValueError(f"unknown attack loss {loss!r}; valid losses: {', '.join(ATTACK_LOSSES)}")
    if restarts < 1 or int(restarts) != restarts:
        raise ValueError(f"restarts must be a positive integer, got {restarts}")
    step_size = default_step_size(eps, steps) if step_size is None else step_size
    attack = PGD(eps=eps, step_size=step_size, steps=steps, norm=norm, random_start=True, keep_best=True)
    loss_fn, device = ATTACK_LOSSES[loss], model_device(model)
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
    device = model_device(model)
    return [
        pgd_accuracy(model, x, y, eps, norm, generator=seeded_generator(seed, i, device=device), **pgd_options)
        for i, eps in enumerate(eps_values)
    ]
