"""Attack mode: how a classifier is run inside an inner maximization (training attacks and every evaluation).

Parameters are frozen (autograd records no parameter side, the attack's backward computes input gradients only and
no ``.grad`` is touched) and, by default, every module is in eval mode (BN running statistics, as in TRADES);
``bn_mode="batch"`` instead uses BN batch statistics without updating the running ones, as the SCORE code for Table 4
does. Both modes and the ``requires_grad`` flags are restored on exit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

BN_MODES = ("eval", "batch")


@contextmanager
def attack_mode(model: nn.Module, bn_mode: str = "eval") -> Iterator[nn.Module]:
    """Freeze parameters and set the BN mode for an inner maximization; restore everything on exit.

    Training attacks and every evaluation (``trainlib.accuracy``, ``trainlib.autoattack``) run inside it. Frozen
    parameters keep autograd from recording the parameter side of the graph: the attack's backward computes input
    gradients only.

    ``"eval"``: all modules in eval mode (BN uses running statistics). ``"batch"``: all modules in train mode
    with BN ``track_running_stats`` off, so BN normalises with batch statistics and leaves running ones untouched.
    """
    if bn_mode not in BN_MODES:
        raise ValueError(f"unknown attack BN mode {bn_mode!r}; valid: {', '.join(BN_MODES)}")
    training = {module: module.training for module in model.modules()}
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    batch_norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    tracking = [m.track_running_stats for m in batch_norms]
    try:
        for p in requires_grad:
            p.requires_grad_(False)
        model.train(bn_mode == "batch")
        if bn_mode == "batch":
            for m in batch_norms:
                m.track_running_stats = False
        yield model
    finally:
        for module, mode in training.items():
            module.training = mode
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)
        for m, flag in zip(batch_norms, tracking, strict=True):
            m.track_running_stats = flag
