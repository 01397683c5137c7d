"""The project's one precision rule: probabilities, distances and losses are evaluated in float32 or wider.

A model may run under bf16 / fp16 autocast; its logits are promoted before any log-softmax, distance or loss, so the
losses never run in a low-precision dtype. float64 inputs stay float64.
"""

from __future__ import annotations

import torch
from torch import Tensor


def at_least_float32(tensor: Tensor) -> Tensor:
    """``tensor`` in ``promote_types(tensor.dtype, float32)``: bf16 / fp16 → float32, float32 / float64 unchanged (the
    same tensor, no copy)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))
