"""Non-finite steps: the guard that watches every optimizer step's loss and gradient norm for NaN/inf.

Mode "stop" (default) keeps the first non-finite step in a device tensor (no host sync in the step); the training
session checks it, on every rank, before it writes metrics or a checkpoint (and ``check_finite()`` before any other
write), and raises ``NonFiniteError`` naming the step and the quantity (exit status 3 through ``run_cli``). Nothing is
written after a bad step, so the newest checkpoint is the last good state. Mode "skip" decides on the host every step
(one device-to-host sync per step, plus one all-reduce of a flag with several processes) and the loop skips the
optimizer, scheduler and EMA updates of a bad step; skipped steps are counted, logged and checkpointed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .cli import NONFINITE_EXIT_CODE, RunFault

NONFINITE_MODES = ("stop", "skip")


class NonFiniteError(RunFault):
    """Training met a NaN/inf loss or gradient norm (``run_cli``: one line, exit status 3)."""

    exit_code = NONFINITE_EXIT_CODE


_NONE = torch.iinfo(torch.int64).max  # "no bad step yet"
_WHAT = {1: "loss", 2: "gradient norm", 3: "loss and gradient norm"}


def check_nonfinite_mode(mode: str) -> None:
    if mode not in NONFINITE_MODES:
        raise ValueError(f"unknown non-finite mode {mode!r}; valid: {', '.join(NONFINITE_MODES)}")


def gradient_norm(model: torch.nn.Module) -> Tensor:
    """The global ℓ2 norm of the parameter gradients, as a device tensor (foreach kernels, no host sync)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())


class NonFiniteGuard:
    """Watches each optimizer step's loss and gradient norm for NaN/inf (module docstring: modes "stop" and "skip").

    The state of mode "stop" is one int64 device tensor, 4·step + kind of the first bad step (kind 1: loss,
    2: gradient norm, 3: both), updated by a few scalar kernels per step; ``check`` moves it to the host.
    """

    def __init__(self, accelerator, mode: str = "stop", log=None):
        check_nonfinite_mode(mode)
        self.accelerator, self.mode, self.log = accelerator, mode, log or print
        self.first_bad = torch.full((), _NONE, dtype=torch.int64, device=accelerator.device)
        self.skipped = 0  # steps skipped so far (mode "skip"; checkpointed)

    def _kind(self, loss: Tensor, grad_norm: Tensor | None) -> Tensor:
        kind = (~torch.isfinite(loss.detach()).all()).long()
        if grad_norm is not None:
            kind = kind + 2 * (~torch.isfinite(grad_norm.detach())).long()
        return kind

    def observe(self, step: int, loss: Tensor, grad_norm: Tensor | None = None) -> bool:
        """Record optimizer step ``step`` (1-based); returns whether to apply its update (always True for "stop").

        ``grad_norm``: the global gradient norm, or None where a grad scaler owns overflow (fp16) or none is taken.
        """
        kind = self._kind(loss, grad_norm)
        if self.mode == "stop":
            code = torch.where(kind > 0, 4 * step + kind, _NONE)
            torch.minimum(self.first_bad, code, out=self.first_bad)
            return True
        if self.accelerator.num_processes > 1:
            kind = self.accelerator.reduce(kind, reduction="max")  # every rank skips the same steps
        bad = int(kind.item())  # the one host sync per step of mode "skip"
        if bad:
            self.skipped += 1
            if self.accelerator.is_main_process:
                self.log(f"skipped step {step}: non-finite {_WHAT.get(bad, 'loss or gradient norm')} "
                         f"({self.skipped} skipped so far)")
        return not bad

    def check(self, last_checkpoint: Path | None = None) -> None:
        """Raise ``NonFiniteError`` (on every rank: a collective) if a step of mode "stop" was non-finite."""
        if self.mode != "stop":
            return
        code = self.first_bad
        if self.accelerator.num_processes > 1:
            code = -self.accelerator.reduce(-code, reduction="max")  # the earliest bad step over the ranks
        code = int(code.item())
        if code == _NONE:
            return
        step, kind = divmod(code, 4)
        kept = f"the newest checkpoint ({last_checkpoint.name})" if last_checkpoint else "no checkpoint was saved; it"
        raise NonFiniteError(
            f"non-finite {_WHAT[kind]} at step {step}; stopped before writing anything after it: {kept} is the last "
            "good state; resume it with --resume latest (e.g. with a lower --lr) or skip such steps with "
            "--nonfinite skip"
        )
