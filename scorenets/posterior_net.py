"""The posterior network p_φ(y | x̃, σ): a noise-conditional classifier, the data posterior without an anchor.

Trained by ``scorenets.dlsm`` on x̃ = x + σn: cross-entropy, whose optimum is p_σ(y|x̃) (the posterior of the data
convolved with N(0, σ²I)), plus denoising likelihood score matching, which makes its input gradient, not only its
value, an estimate of ∇_x̃ log p_σ(y|x̃). At a fixed σ it is a ``datagrad`` data posterior that autograd
differentiates (``PosteriorNetPosterior``): direct SCORE then needs one backward pass per attack step through the
classifier and this network, whatever the number of classes, and no anchor or path state.

Architecture: the encoder half of a diffusers UNet, as guided-diffusion's noisy classifiers: ``conv_in``, the UNet's
down blocks (``ResnetBlock2D`` with the σ embedding, FiLM by default; attention where the preset says), its middle
block, then GroupNorm, SiLU, global average pooling and a linear layer to K logits; with ``input_skip`` (default) a
linear read-out of the input with a σ-dependent gain is added to the logits, g(σ)·W u. GroupNorm makes the conv path
blind to the input's scale, while posterior log-odds keep growing with the distance between classes (for Gaussian
classes they are exactly linear in x̃, with slope ∝ 1/(s² + σ²)): the skip carries that part, which the
gradients of unlikely classes consist of (measured: README "posterior network"). σ enters as the score net's
timestep t(σ) (``NoiseSchedule.t_at_sigma``: the same σ ↔ t map as the score net, embedded by diffusers'
``Timesteps`` + ``TimestepEmbedding``), and the image as the score net's input u = (2x̃ − 1)/sqrt(1 + 4σ²)
(``scorenets.noise.model_input``), whose scale does not grow with σ. Attention uses the classic ``AttnProcessor``:
DLSM backpropagates through an input gradient (double backward), which SDPA does not support.

Conventions: x̃ [B, C, H, W] in [0, 1] data units (noisy, not clamped); σ (``noise_std``) a std in the same units,
valid in [``sigma_min``, ``sigma_max``] (the range it was trained on); logits [B, K] out. A ``diffusers`` model:
``save_pretrained(dir)`` writes ``posterior_net_config.json`` and safetensors weights, ``from_pretrained(dir)`` loads
them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D, get_down_block
from torch import Tensor, nn

from datagrad import at_least_float32, autograd_grad_log_posterior

from .noise import NoiseSchedule, check_noise_std, to_model_range
from .unet import use_classic_attention

# Keyword arguments of PosteriorNet per preset (sizes by measurement: README "posterior network").
POSTERIOR_PRESETS: dict[str, dict] = {
    # 8×8 data (digits, Gaussian-mixture images): 8→4, ~0.2M parameters.
    "tiny8": dict(block_out_channels=(32, 64), layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                  mid_block_attention=False, norm_num_groups=8),
    # 16×16 data: 16→8→4.
    "small16": dict(block_out_channels=(32, 64, 64), layers_per_block=1,
                    down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D"), mid_block_attention=False,
                    norm_num_groups=8),
    # 32×32 (CIFAR): 32→16→8→4 with attention at 8×8 and in the middle block, about the cost of a WRN-16-8.
    "cifar32": dict(block_out_channels=(64, 128, 256, 256), layers_per_block=2,
                    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                    mid_block_attention=True, norm_num_groups=32),
}


class PosteriorNet(ModelMixin, ConfigMixin):
    """p_φ(y | x̃, σ) (module docstring): ``forward(x_noisy, noise_std) -> logits [B, K]``."""

    config_name = "posterior_net_config.json"

    @register_to_config
    def __init__(
        self,
        num_classes: int,
        image_shape: tuple[int, int, int] = (1, 8, 8),
        block_out_channels: tuple[int, ...] = (32, 64),
        layers_per_block: int = 1,
        down_block_types: tuple[str, ...] = ("DownBlock2D", "DownBlock2D"),
        mid_block_attention: bool = False,
        norm_num_groups: int = 8,
        time_scale_shift: str = "scale_shift",
        dropout: float = 0.0,
        input_skip: bool = True,
        sigma_min: float = 0.01,
        sigma_max: float = 1.0,
        schedule: dict | None = None,
    ):
        super().__init__()
        channels, size, _ = image_shape
        if len(block_out_channels) != len(down_block_types):
            raise ValueError(f"one down block type per level: {len(block_out_channels)} widths, "
                             f"{len(down_block_types)} block types")
        if size % 2 ** (len(block_out_channels) - 1):
            raise ValueError(f"{len(block_out_channels) - 1} downsamplings do not divide the image size {size}")
        if any(width % norm_num_groups for width in block_out_channels):
            raise ValueError(f"block widths {list(block_out_channels)} must be multiples of {norm_num_groups} groups")
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.schedule = NoiseSchedule(**(schedule or {}))
        for sigma in (sigma_min, sigma_max):
            self.schedule.sigma_to_t(sigma)  # raises outside the schedule's range
        embed_dim = block_out_channels[0] * 4
        self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(block_out_channels[0], embed_dim)
        self.conv_in = nn.Conv2d(channels, block_out_channels[0], kernel_size=3, padding=1)
        blocks, previous = [], block_out_channels[0]
        for level, (block_type, width) in enumerate(zip(down_block_types, block_out_channels, strict=True)):
            blocks.append(get_down_block(
                block_type, num_layers=layers_per_block, in_channels=previous, out_channels=width,
                temb_channels=embed_dim, add_downsample=level < len(block_out_channels) - 1, resnet_eps=1e-5,
                resnet_act_fn="silu", resnet_groups=norm_num_groups, attention_head_dim=width, downsample_padding=1,
                resnet_time_scale_shift=time_scale_shift, dropout=dropout,
            ))
            previous = width
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = UNetMidBlock2D(
            in_channels=previous, temb_channels=embed_dim, dropout=dropout, resnet_eps=1e-5, resnet_act_fn="silu",
            resnet_time_scale_shift=time_scale_shift, resnet_groups=norm_num_groups, attention_head_dim=previous,
            add_attention=mid_block_attention,
        )
        self.norm_out = nn.GroupNorm(norm_num_groups, previous, eps=1e-5)
        self.classifier = nn.Linear(previous, num_classes)
        if input_skip:  # logits += g(σ)·(W u): a linear read-out of the input with a σ-dependent gain
            self.skip = nn.Linear(channels * size * size, num_classes, bias=False)
            self.skip_gain = nn.Linear(embed_dim, 1)
            nn.init.zeros_(self.skip_gain.weight)
            nn.init.ones_(self.skip_gain.bias)
        use_classic_attention(self)  # double backward (module docstring)

    @property
    def num_classes(self) -> int:
        return int(self.config.num_classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.config.image_shape)

    def forward(self, x_noisy: Tensor, noise_std: float | Tensor) -> Tensor:
        """Logits of p_φ(·|x̃, σ): x_noisy [B, C, H, W] in [0, 1] units, σ a float or [B] → [B, K]."""
        if tuple(x_noisy.shape[1:]) != self.image_shape:
            shape = ", ".join(map(str, self.image_shape))
            raise ValueError(f"expected images [B, {shape}], got {tuple(x_noisy.shape)}")
        sigma = torch.as_tensor(noise_std, device=x_noisy.device, dtype=torch.float32).expand(x_noisy.shape[0])
        timesteps = self.schedule.t_at_sigma(sigma.double()).float()
        emb = self.time_embedding(self.time_proj(timesteps).to(self.dtype))
        scale = (1.0 + 4.0 * sigma.to(x_noisy.dtype) ** 2).rsqrt().view(-1, 1, 1, 1)
        u = (to_model_range(x_noisy) * scale).to(self.dtype)
        hidden = self.conv_in(u)
        for block in self.down_blocks:
            hidden, _ = block(hidden_states=hidden, temb=emb)
        hidden = self.mid_block(hidden, emb)
        hidden = nn.functional.silu(self.norm_out(hidden)).mean(dim=(2, 3))
        logits = self.classifier(hidden)
        if self.config.input_skip:
            logits = logits + self.skip_gain(emb) * self.skip(u.flatten(1))
        return logits

    def check_noise_std(self, noise_std: float) -> float:
        """σ as a float, or a clear error when it lies outside the range the network was trained on."""
        sigma = check_noise_std(noise_std)
        low, high = self.config.sigma_min, self.config.sigma_max
        if not low * (1 - 1e-9) <= sigma <= high * (1 + 1e-9):
            raise ValueError(f"noise_std σ = {sigma} is outside the posterior net's trained range [{low:g}, {high:g}] "
                             "(data units)")
        return sigma


def build_posterior_net(preset: str, num_classes: int, image_shape, sigma_min: float, sigma_max: float,
                        **overrides) -> PosteriorNet:
    """A fresh posterior net for the preset (``POSTERIOR_PRESETS``; ``overrides`` replace its keys)."""
    if preset not in POSTERIOR_PRESETS:
        raise ValueError(f"unknown posterior-net preset {preset!r}; valid presets: {', '.join(POSTERIOR_PRESETS)}")
    shape = tuple(int(v) for v in image_shape)
    if len(shape) != 3 or shape[1] != shape[2]:
        raise ValueError(f"image_shape must be (C, H, W) with H == W, got {shape}")
    kwargs = {**POSTERIOR_PRESETS[preset], **overrides}
    return PosteriorNet(num_classes=int(num_classes), image_shape=shape, sigma_min=float(sigma_min),
                        sigma_max=float(sigma_max), **kwargs)


class PosteriorNetPosterior:
    """p_φ(·|x, σ) at a fixed σ as a ``datagrad`` data posterior, differentiable by autograd.

    ``log_posterior(x)``: log_softmax of the logits in float32 or wider, [B, K]; its input gradient is the network's,
    so ``datagrad.attach_log_posterior`` uses it directly. ``grad_log_posterior`` (readouts only): K backward passes.
    Several nets (a deep ensemble) give the mean of their probabilities, p(·|x) = (1/M) Σ_m p_φm(·|x, σ), as
    log_posterior = logsumexp_m log p_φm − log M. Every net must be in eval mode (no dropout); none is trained here.
    """

    differentiable = True

    def __init__(self, net: PosteriorNet | Sequence[PosteriorNet], noise_std: float):
        self.nets = [net] if isinstance(net, PosteriorNet) else list(net)
        if not self.nets:
            raise ValueError("give at least one posterior net")
        if any(member.training for member in self.nets):
            raise ValueError("posterior net is in training mode (dropout active); call net.eval() first")
        for member in self.nets:
            member.check_noise_std(noise_std)  # within each net's trained range
        self.noise_std = check_noise_std(noise_std)
        classes = {member.num_classes for member in self.nets}
        if len(classes) > 1:
            raise ValueError(f"the posterior nets of an ensemble disagree on the number of classes: {sorted(classes)}")
        self.num_classes = classes.pop()

    def log_posterior(self, x: Tensor) -> Tensor:
        log_p = [at_least_float32(member(x, self.noise_std)).log_softmax(dim=1) for member in self.nets]
        if len(log_p) == 1:
            return log_p[0]
        return torch.stack(log_p).logsumexp(dim=0) - math.log(len(log_p))

    def grad_log_posterior(self, x: Tensor) -> Tensor:
        return autograd_grad_log_posterior(self.log_posterior, x, self.num_classes).to(x.dtype)
