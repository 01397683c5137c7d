"""Inner maximizers: projected gradient ascent (PGD) in ℓ∞/ℓ2 balls and an exhaustive 1-D grid.

Both maximize a per-example loss ``loss_fn(x') -> [B]`` over x' ∈ B(x) = {x' : ||x' − x||_p ≤ ε}
(intersected with the data range when ``clamp`` is given). Only input gradients are taken
(``torch.autograd.grad`` w.r.t. x'), so no parameter ``.grad`` is touched during an attack.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

LossFn = Callable[[Tensor], Tensor]  # x' [B, ...] -> per-example loss [B]
NORMS = ("linf", "l2")


def _check_ball(eps: float, norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; valid norms: {', '.join(NORMS)}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")


def _check_pgd(eps: float, step_size: float, steps: int, norm: str, clamp: tuple[float, float] | None) -> None:
    _check_ball(eps, norm)
    if steps < 0 or int(steps) != steps:
        raise ValueError(f"steps must be a non-negative integer, got {steps}")
    if not step_size >= 0:
        raise ValueError(f"step_size must be >= 0, got {step_size}")
    if clamp is not None and not clamp[0] < clamp[1]:
        raise ValueError(f"clamp must be (low, high) with low < high, got {clamp}")


def _per_example_norm(v: Tensor) -> Tensor:
    """ℓ2 norm of each example, shaped to broadcast against v: [B, 1, ..., 1]."""
    return v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))


def project(delta: Tensor, eps: float, norm: str) -> Tensor:
    """Project perturbations onto the ball ||δ||_p ≤ ε, per example."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    return delta * (eps / _per_example_norm(delta).clamp_min(1e-12)).clamp(max=1.0)


def uniform_in_ball(x: Tensor, eps: float, norm: str, generator: torch.Generator | None = None) -> Tensor:
    """A perturbation drawn uniformly from the ball (ℓ∞: a cube; ℓ2: the solid ball)."""
    if norm == "linf":
        return (2 * torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) - 1) * eps
    direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    direction = direction / _per_example_norm(direction).clamp_min(1e-12)
    dim = x[0].numel()
    radius = torch.rand(x.shape[0], generator=generator, device=x.device, dtype=x.dtype) ** (1.0 / dim)
    return direction * (eps * radius).view(-1, *([1] * (x.dim() - 1)))


def _ascent_direction(grad: Tensor, norm: str) -> Tensor:
    if norm == "linf":
        return grad.sign()
    return grad / _per_example_norm(grad).clamp_min(1e-12)


def pgd(
    loss_fn: LossFn,
    x: Tensor,
    eps: float,
    step_size: float,
    steps: int,
    norm: str = "linf",
    random_start: bool = True,
    clamp: tuple[float, float] | None = (0.0, 1.0),
    generator: torch.Generator | None = None,
    keep_best: bool = False,
) -> Tensor:
    """Projected gradient ascent on a per-example loss; returns x' (detached, same shape as x).

    x'_{t+1} = Π_{B(x) ∩ range}( x'_t + α · d_t ),  d_t = sign(∇ℓ) for ℓ∞, ∇ℓ/||∇ℓ||₂ for ℓ2.
    Starts at x + U(B(x)) when ``random_start`` else at x. With ``keep_best`` each example returns its
    highest-loss iterate (one extra forward pass for the final iterate) instead of the last one.
    """
    _check_pgd(eps, step_size, steps, norm, clamp)

    x = x.detach()

    def to_feasible(candidate: Tensor) -> Tensor:
        candidate = x + project(candidate - x, eps, norm)
        return candidate.clamp(*clamp) if clamp is not None else candidate

    x_adv = to_feasible(x + uniform_in_ball(x, eps, norm, generator) if random_start and eps > 0 else x)
    best, best_loss = x_adv, None
    for _ in range(int(steps)):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            loss = loss_fn(x_adv)
            (grad,) = torch.autograd.grad(loss.sum(), x_adv)
        x_adv = x_adv.detach()
        if keep_best:
            best, best_loss = update_best(best, best_loss, x_adv, loss.detach())
        x_adv = to_feasible(x_adv + step_size * _ascent_direction(grad, norm))
    if keep_best:
        with torch.no_grad():
            best, _ = update_best(best, best_loss, x_adv, loss_fn(x_adv))
        return best
    return x_adv


def update_best(best: Tensor | None, best_loss: Tensor | None, candidate: Tensor,
                loss: Tensor) -> tuple[Tensor, Tensor]:
    """Per example i: (candidate_i, loss_i) where loss_i > best_loss_i, else (best_i, best_loss_i).

    The one selection rule of every maximizer here (PGD's best iterate and best start, the grid, direct SCORE's best
    attack): strictly larger wins, so on a tie the earlier candidate stays. ``best_loss`` None takes the candidate.
    """
    if best_loss is None:
        return candidate, loss
    better = loss > best_loss
    mask = better.view(-1, *([1] * (candidate.dim() - 1)))
    return torch.where(mask, candidate, best), torch.where(better, loss, best_loss)


@dataclass(frozen=True)
class PGD:
    """A PGD configuration usable wherever an inner maximizer is expected.

    ``starts`` > 1 (random starts only): that many PGD runs from consecutive uniform starts of one generator; per
    example the result with the largest ``loss_fn`` (evaluated once more at each result, without gradient; the
    earlier start on a tie) is returned. ``starts`` times the attack cost, plus one forward pass per start.
    """

    eps: float
    step_size: float
    steps: int
    norm: str = "linf"
    random_start: bool = True
    clamp: tuple[float, float] | None = (0.0, 1.0)
    keep_best: bool = True
    starts: int = 1

    def __post_init__(self):
        _check_pgd(self.eps, self.step_size, self.steps, self.norm, self.clamp)
        if self.starts < 1 or int(self.starts) != self.starts:
            raise ValueError(f"starts must be a positive integer, got {self.starts}")
        if self.starts > 1 and not self.random_start:
            raise ValueError(f"{self.starts} starts need random_start=True (every start would be x itself)")

    def maximize(self, loss_fn: LossFn, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        best, best_loss = None, None
        for _ in range(int(self.starts)):
            found = pgd(
                loss_fn, x, self.eps, self.step_size, self.steps, self.norm, self.random_start, self.clamp,
                generator, self.keep_best,
            )
            if self.starts == 1:
                return found
            with torch.no_grad():
                best, best_loss = update_best(best, best_loss, found, loss_fn(found))
        return best


@dataclass(frozen=True)
class GridSearch:
    """Exhaustive maximizer for 1-D inputs: evaluates the loss on ``points`` evenly spaced x' in [x−ε, x+ε].

    Exact up to the grid spacing 2ε/(points−1); used to check PGD and to evaluate risks on 1-D toys.
    """

    eps: float
    points: int = 2001
    clamp: tuple[float, float] | None = None

    def __post_init__(self):
        _check_ball(self.eps, "linf")
        if self.points < 2:
            raise ValueError(f"grid needs at least 2 points, got {self.points}")

    @torch.no_grad()
    def maximize(self, loss_fn: LossFn, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if x[0].numel() != 1:
            raise ValueError(f"GridSearch works on 1-D inputs only, got example shape {tuple(x.shape[1:])}")
        offsets = torch.linspace(-self.eps, self.eps, self.points, dtype=torch.float64)
        offsets = ((offsets - offsets.flip(0)) / 2).to(x)  # exactly symmetric: holds 0 when points is odd
        candidates = x.unsqueeze(0) + offsets.view(-1, *([1] * x.dim()))  # [P, B, ...]
        if self.clamp is not None:
            candidates = candidates.clamp(*self.clamp)
        best, best_loss = None, None
        for candidate in candidates:
            best, best_loss = update_best(best, best_loss, candidate, loss_fn(candidate))
        return best
