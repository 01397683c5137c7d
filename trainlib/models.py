"""Image classifiers on [0, 1] inputs that normalise inside and return logits, and their registry.

Every model maps images ``x [B, C, H, W]`` in [0, 1] to logits ``[B, K]`` and starts with

    x ↦ (x − mean) / std        (per channel; ``mean``/``std`` are persistent buffers, saved with the weights)

so attacks, AutoAttack and RobustBench-style evaluation all work in [0, 1] pixel space.

* ``WideResNet``: pre-activation WRN as in DeepMind's adversarial-robustness code (Gowal et al. 2020,
  Rebuffi et al. 2021; the SCORE paper's models): widths [16, 16w, 32w, 64w], depth = 6n + 4 (n blocks per
  group), SiLU (Swish) activations, BN + SiLU before every convolution, a 1×1 shortcut convolution applied to the
  pre-activated input when the shape changes, TF-"SAME" padding for stride 2 (pad right/bottom only), final
  BN + SiLU, global average pooling and a linear layer. Module names follow DeepMind's PyTorch release
  (``init_conv``, ``layer.G.block.I.batchnorm_0``, ``conv_0``, ``batchnorm_1``, ``conv_1``, ``shortcut``,
  ``batchnorm``, ``logits``), BN momentum 0.01 as in the SCORE/DM-Improves-AT code, PyTorch's default init.
* ``PreActResNet``: PreAct ResNet-18 (He et al. 2016) as in Rice et al. 2020 / SCORE's code, with the final BN.
* ``SmallCNN`` and ``MLP``: a few ten-thousand parameters for CPU runs on 8×8 digits and image-shaped toys,
  batch norm optional (without it a multi-process run equals a one-process run on the combined batch).

``build_model(name, ...)`` picks one by name; ``param_groups(model, weight_decay)`` splits parameters for the
optimizer. All models are channels-last friendly (no ``.view`` on possibly non-contiguous tensors).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
DATASET_STATS = {"cifar10": (CIFAR10_MEAN, CIFAR10_STD), "cifar100": (CIFAR100_MEAN, CIFAR100_STD)}

ACTIVATIONS = {"silu": nn.SiLU, "relu": nn.ReLU}
NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


def default_stats(in_channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """CIFAR-10 statistics for 3 channels; otherwise mean 0.5 and std 0.5 per channel ([0, 1] → [−1, 1])."""
    if in_channels == 3:
        return CIFAR10_MEAN, CIFAR10_STD
    return (0.5,) * in_channels, (0.5,) * in_channels


def _activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; valid: {', '.join(sorted(ACTIVATIONS))}") from None


class NormalizedClassifier(nn.Module):
    """Base class: stores per-channel ``mean``/``std`` buffers [1, C, 1, 1] and normalises before ``classify``."""

    def __init__(self, in_channels: int, mean: Sequence[float] | None, std: Sequence[float] | None):
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        default_mean, default_std = default_stats(in_channels)
        mean = tuple(default_mean if mean is None else mean)
        std = tuple(default_std if std is None else std)
        if len(mean) != in_channels or len(std) != in_channels:
            raise ValueError(
                f"mean and std need one value per input channel ({in_channels}), got {len(mean)} and {len(std)}"
            )
        if min(std) <= 0:
            raise ValueError(f"std must be positive, got {std}")
        self.in_channels = in_channels
        self.register_buffer("mean", torch.tensor(mean).reshape(1, in_channels, 1, 1))
        self.register_buffer("std", torch.tensor(std).reshape(1, in_channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:  # x [B, C, H, W] in [0, 1] -> logits [B, K]
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected images [B, {self.in_channels}, H, W] in [0, 1], got shape {tuple(x.shape)}")
        return self.classify((x - self.mean) / self.std)

    def classify(self, x: Tensor) -> Tensor:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------------------
# DeepMind-style pre-activation WideResNet


class WRNBlock(nn.Module):
    """Pre-activation basic block: a = σ(BN₀(x)); out = conv₁(σ(BN₁(conv₀(a)))) + (shortcut(a) or x)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, activation: str, bn_momentum: float):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"WRN blocks support stride 1 or 2, got {stride}")
        self.batchnorm_0 = nn.BatchNorm2d(in_planes, momentum=bn_momentum)
        self.relu_0 = _activation(activation)
        # Stride 2 pads right/bottom only (TensorFlow "SAME"); stride 1 pads symmetrically inside the conv.
        self.conv_0 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1 if stride == 1 else 0, bias=False)
        self.batchnorm_1 = nn.BatchNorm2d(out_planes, momentum=bn_momentum)
        self.relu_1 = _activation(activation)
        self.conv_1 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.has_shortcut = in_planes != out_planes or stride != 1
        self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False) if self.has_shortcut else None
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        activated = self.relu_0(self.batchnorm_0(x))
        padded = activated if self.stride == 1 else F.pad(activated, (0, 1, 0, 1))
        out = self.conv_1(self.relu_1(self.batchnorm_1(self.conv_0(padded))))
        return out + (self.shortcut(activated) if self.has_shortcut else x)


class WRNBlockGroup(nn.Module):
    def __init__(
        self, num_blocks: int, in_planes: int, out_planes: int, stride: int, activation: str, bn_momentum: float
    ):
        super().__init__()
        self.block = nn.Sequential(
            *(
                WRNBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, activation,
                         bn_momentum)
                for i in range(num_blocks)
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


class WideResNet(NormalizedClassifier):
    """WRN-depth-width with widths [16, 16w, 32w, 64w] and depth = 6n + 4 (see the module docstring)."""

    def __init__(
        self,
        depth: int = 28,
        width: int = 10,
        num_classes: int = 10,
        in_channels: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        activation: str = "silu",
        bn_momentum: float = 0.01,
    ):
        super().__init__(in_channels, mean, std)
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, ...), got {depth}")
        if width < 1:
            raise ValueError(f"WideResNet width must be >= 1, got {width}")
        num_blocks = (depth - 4) // 6
        channels = [16, 16 * width, 32 * width, 64 * width]
        self.init_conv = nn.Conv2d(in_channels, channels[0], 3, stride=1, padding=1, bias=False)
        self.layer = nn.Sequential(
            WRNBlockGroup(num_blocks, channels[0], channels[1], 1, activation, bn_momentum),
            WRNBlockGroup(num_blocks, channels[1], channels[2], 2, activation, bn_momentum),
            WRNBlockGroup(num_blocks, channels[2], channels[3], 2, activation, bn_momentum),
        )
        self.batchnorm = nn.BatchNorm2d(channels[3], momentum=bn_momentum)
        self.relu = _activation(activation)
        self.logits = nn.Linear(channels[3], num_classes)

    def classify(self, x: Tensor) -> Tensor:
        out = self.relu(self.batchnorm(self.layer(self.init_conv(x))))  # [B, 64w, H/4, W/4]
        return self.logits(out.mean(dim=(2, 3)))


# ----------------------------------------------------------------------------------------------------------
# PreAct ResNet-18


class PreActBlock(nn.Module):
    """a = σ(BN₁(x)); out = conv₂(σ(BN₂(conv₁(a)))) + (shortcut(a) or x)."""

    def __init__(self, in_planes: int, planes: int, stride: int, activation: str):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.relu = _activation(activation)
        needs_shortcut = stride != 1 or in_planes != planes
        self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)) if needs_shortcut \
            else None

    def forward(self, x: Tensor) -> Tensor:
        activated = self.relu(self.bn1(x))
        out = self.conv2(self.relu(self.bn2(self.conv1(activated))))
        return out + (self.shortcut(activated) if self.shortcut is not None else x)


class PreActResNet(NormalizedClassifier):
    """Pre-activation ResNet with basic blocks (``num_blocks=(2, 2, 2, 2)`` is PreAct ResNet-18)."""

    def __init__(
        self,
        num_blocks: Sequence[int] = (2, 2, 2, 2),
        num_classes: int = 10,
        in_channels: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        activation: str = "relu",
    ):
        super().__init__(in_channels, mean, std)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        layers, in_planes = [], 64
        for planes, blocks, stride in zip((64, 128, 256, 512), num_blocks, (1, 2, 2, 2), strict=True):
            layers.append(
                nn.Sequential(
                    *(PreActBlock(in_planes if i == 0 else planes, planes, stride if i == 0 else 1, activation)
                      for i in range(blocks))
                )
            )
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.bn = nn.BatchNorm2d(512)
        self.relu = _activation(activation)
        self.linear = nn.Linear(512, num_classes)

    def classify(self, x: Tensor) -> Tensor:
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        out = self.relu(self.bn(out))  # [B, 512, H/8, W/8]
        return self.linear(out.mean(dim=(2, 3)))


# ----------------------------------------------------------------------------------------------------------
# Small models for CPU runs and tests


def _conv_unit(in_channels: int, out_channels: int, stride: int, batch_norm: bool) -> list[nn.Module]:
    conv = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=not batch_norm)
    return [conv, nn.BatchNorm2d(out_channels), nn.SiLU()] if batch_norm else [conv, nn.SiLU()]


class SmallCNN(NormalizedClassifier):
    """conv(C→c)–conv(c→c) at full resolution, conv stride 2 (c→2c)–conv(2c→2c), flatten, linear; SiLU.

    For 1×8×8 digits with c = 32 and K = 10: 75,242 parameters (without batch norm).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int | Sequence[int] = 8,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        channels: int = 32,
        batch_norm: bool = False,
    ):
        super().__init__(in_channels, mean, std)
        height, width = _image_hw(image_size)
        self.features = nn.Sequential(
            *_conv_unit(in_channels, channels, 1, batch_norm),
            *_conv_unit(channels, channels, 1, batch_norm),
            *_conv_unit(channels, 2 * channels, 2, batch_norm),
            *_conv_unit(2 * channels, 2 * channels, 1, batch_norm),
        )
        self.head = nn.Linear(2 * channels * ((height + 1) // 2) * ((width + 1) // 2), num_classes)

    def classify(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1))  # flatten copies a channels-last tensor as needed


class MLP(NormalizedClassifier):
    """Flatten, then ``depth`` hidden layers of ``hidden`` units with SiLU (optional batch norm), then linear.

    For 1×8×8 inputs with two hidden layers of 256 and K = 10: 85,002 parameters (without batch norm).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int | Sequence[int] = 8,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        hidden: int = 256,
        depth: int = 2,
        batch_norm: bool = False,
    ):
        super().__init__(in_channels, mean, std)
        height, width = _image_hw(image_size)
        layers, features = [], in_channels * height * width
        for _ in range(depth):
            layers += [nn.Linear(features, hidden, bias=not batch_norm)]
            layers += [nn.BatchNorm1d(hidden), nn.SiLU()] if batch_norm else [nn.SiLU()]
            features = hidden
        self.hidden = nn.Sequential(*layers)
        self.head = nn.Linear(features, num_classes)

    def classify(self, x: Tensor) -> Tensor:
        return self.head(self.hidden(x.flatten(1)))


def _image_hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"image_size must be a positive int or (height, width), got {image_size}")
    return size


# ----------------------------------------------------------------------------------------------------------
# Registry and optimizer parameter groups

MODEL_NAMES = ("wrn-28-10", "wrn-70-16", "wrn-<depth>-<width>", "preact-resnet18", "cnn-small", "cnn-small-bn",
               "cnn-<channels>", "cnn-<channels>-bn", "mlp", "mlp-bn")
_WRN_NAME = re.compile(r"wrn-(\d+)-(\d+)")
_CNN_NAME = re.compile(r"cnn-(small|\d+)(-bn)?")


def build_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    image_size: int | Sequence[int] = 32,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> NormalizedClassifier:
    """Build a classifier by name (see ``MODEL_NAMES``; "wrn-D-W" is any WRN with depth D = 6n + 4, width W;
    "cnn-c" is ``SmallCNN`` with c channels at full resolution, so "cnn-small" is "cnn-32").

    Inputs are [B, in_channels, H, W] in [0, 1]; ``mean``/``std`` default to ``default_stats(in_channels)``.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    height, width = _image_hw(image_size)
    common = dict(num_classes=num_classes, in_channels=in_channels, mean=mean, std=std)
    wrn = _WRN_NAME.fullmatch(name)
    if wrn or name == "preact-resnet18":
        min_size = 4 if wrn else 8
        if min(height, width) < min_size:
            raise ValueError(f"model {name!r} needs images of at least {min_size}×{min_size}, got {height}×{width}")
        if wrn:
            return WideResNet(depth=int(wrn.group(1)), width=int(wrn.group(2)), **common)
        return PreActResNet(**common)
    cnn = _CNN_NAME.fullmatch(name)
    if cnn:
        channels = 32 if cnn.group(1) == "small" else int(cnn.group(1))
        if channels < 1:
            raise ValueError(f"model {name!r} needs at least one channel")
        return SmallCNN(image_size=(height, width), channels=channels, batch_norm=bool(cnn.group(2)), **common)
    if name in ("mlp", "mlp-bn"):
        return MLP(image_size=(height, width), batch_norm=name.endswith("-bn"), **common)
    raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Optimizer groups: ``decay`` (weight decay ``weight_decay``) and ``no_decay`` (0).

    Parameters of normalisation layers (BatchNorm/GroupNorm/LayerNorm/InstanceNorm scale and shift) get no weight
    decay (docs/conventions.md §3); every other parameter, including the biases of linear and convolution layers, is
    decayed, as in the SCORE / DeepMind recipe, which exempts only batch-norm parameters.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    no_decay_ids = {
        id(p) for module in model.modules() if isinstance(module, NORM_LAYERS) for p in module.parameters(recurse=False)
    }
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() yields each shared tensor once
        (no_decay if id(p) in no_decay_ids else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
