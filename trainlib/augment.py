"""Random crop (zero padding) + horizontal flip of a whole batch, on its device, in its dtype and layout."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .datasets import to_device


def crop_flip(x: Tensor, top: Tensor, left: Tensor, flip: Tensor, padding: int = 4) -> Tensor:
    """Crop each image of x [B, C, H, W] from its zero-padded version at (top, left) ∈ [0, 2p]², then mirror
    it horizontally where ``flip`` [B] is true: out[b, :, i, j] = pad(x)[b, :, top_b + i, left_b + j'] with
    j' = W − 1 − j if flip_b else j. Two gathers for the whole batch (rows, then columns), on x's device, in x's
    dtype and memory layout (pure data movement: on uint8 pixels it commutes exactly with the float conversion)."""
    batch, channels, height, width = x.shape
    device = x.device
    top, left, flip = (to_device(t, device) if t.device != device else t for t in (top, left, flip))
    padded = F.pad(x, (padding, padding, padding, padding))  # [B, C, H + 2p, W + 2p]
    rows = top[:, None] + torch.arange(height, device=device)  # [B, H]
    columns = torch.arange(width, device=device).expand(batch, width)
    columns = torch.where(flip[:, None], width - 1 - columns, columns) + left[:, None]  # [B, W]
    cropped = padded.gather(2, rows[:, None, :, None].expand(batch, channels, height, padded.shape[3]))
    return cropped.gather(3, columns[:, None, None, :].expand(batch, channels, height, width))


def random_crop_flip_params(batch: int, padding: int = 4, generator: torch.Generator | None = None):
    """(top, left, flip) for ``crop_flip``: offsets uniform in [0, 2p], flip with probability 1/2."""
    device = generator.device if generator is not None else torch.device("cpu")
    top = torch.randint(0, 2 * padding + 1, (batch,), generator=generator, device=device)
    left = torch.randint(0, 2 * padding + 1, (batch,), generator=generator, device=device)
    flip = torch.rand(batch, generator=generator, device=device) < 0.5
    return top, left, flip


def random_crop_flip(x: Tensor, padding: int = 4, generator: torch.Generator | None = None) -> Tensor:
    """Random crop with ``padding`` zero pixels + random horizontal flip of a whole batch x [B, C, H, W]."""
    return crop_flip(x, *random_crop_flip_params(x.shape[0], padding, generator), padding=padding)


