"""Class-conditional diffusers UNets and ``ScoreNet``: noise prediction in, class-conditional scores out.

The UNet is a diffusers ``UNet2DModel`` with ``num_class_embeds = K + 1``: labels 0 … K−1 are the data classes and
label K is the NULL class (trained with label dropout), which gives the unconditional noise prediction for
classifier-free guidance. The class embedding is added to the time embedding.

Conventions (see :mod:`scorenets.noise`): images [B, C, H, W] in [0, 1]; the UNet sees u_t in [−1, 1]-based
diffusion units at float timesteps t; noise std σ is quoted in [0, 1] data units, and

    ∇_x log p_σ(x | y) = −ε_θ(u_t(x), t(σ), y)/σ,   u_t(x) = (2x − 1)/sqrt(1 + 4σ²).

Attention uses diffusers' classic ``AttnProcessor`` instead of the default SDPA processor: SDPA has no double
backward, and a gradient through the scores (e.g. a Hessian-vector product of log p_σ, or training a
model through score-based terms) would fail with it. At the preset resolutions (≤ 16×16 tokens) the cost is small.
The choice is a runtime setting, not part of the weights: plain ``UNet2DModel.from_pretrained(dir / "unet")``
loads the same network with its default processor.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention, AttnProcessor
from einops import rearrange, repeat
from torch import Tensor, nn

from .noise import NoiseSchedule, model_input, noise_to_score

CONFIG_NAME = "scorenet_config.json"
UNET_SUBFOLDER = "unet"
FORMAT_VERSION = 1

# UNet2DModel keyword arguments per preset (sample_size and channels come from the image shape).
PRESETS: dict[str, dict] = {
    # DDPM's CIFAR-10 network (Ho et al. 2020): 4 levels 32→16→8→4, attention at 16×16, dropout 0.1, ~36M params.
    "cifar32": dict(
        block_out_channels=(128, 256, 256, 256),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None,  # one head over all channels, as in DDPM
        norm_num_groups=32,
        dropout=0.1,
    ),
    # 16×16 data: 3 levels 16→8→4, attention at 8×8 and in the middle block, ~1.1M params.
    "small16": dict(
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None,
        norm_num_groups=8,
        dropout=0.1,
    ),
    # 8×8 data (digits, Gaussian-mixture images): 2 levels 8→4, attention at 4×4 and in the middle block, ~1.0M
    # params.
    "tiny8": dict(
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None,
        norm_num_groups=8,
        dropout=0.0,
    ),
}


def use_classic_attention(module: nn.Module) -> None:
    """Give every diffusers ``Attention`` inside ``module`` the classic ``AttnProcessor``: SDPA has no double
    backward, and gradients through scores or input gradients (Hessian-vector products, DLSM) need one."""
    for submodule in module.modules():
        if isinstance(submodule, Attention):
            submodule.set_processor(AttnProcessor())


def _check_image_shape(image_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(v) for v in image_shape)
    if len(shape) != 3 or min(shape) < 1 or shape[1] != shape[2]:
        raise ValueError(f"image_shape must be (C, H, W) with H == W, got {tuple(image_shape)}")
    return shape


def build_unet(preset: str, num_classes: int, image_shape: Sequence[int], **overrides) -> UNet2DModel:
    """A fresh ``UNet2DModel`` for the preset, K + 1 class embeddings (index K = null), C in/out channels.

    ``overrides`` replace preset keys (e.g. ``block_out_channels=(16, 32)`` for a test-sized net).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown UNet preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    channels, size, _ = _check_image_shape(image_shape)
    kwargs = {**PRESETS[preset], **overrides}
    levels = len(kwargs["block_out_channels"])
    if size % 2 ** (levels - 1):
        raise ValueError(f"preset {preset!r} downsamples {levels - 1} times; image size {size} is not divisible")
    return UNet2DModel(
        sample_size=size, in_channels=channels, out_channels=channels, num_class_embeds=int(num_classes) + 1, **kwargs
    )


class ScoreNet(nn.Module):
    """A class-conditional noise-prediction UNet plus the settings needed to turn it into scores.

    ``forward(u_t, t, labels)`` / ``predict_noise(...)`` return ε̂ [B, C, H, W]; each call adds one to ``forward_calls``.
    ``class_scores(x, noise_std)`` returns ∇_x log p_σ(x | y) for all classes from one batched call.
    ``unet`` is a ``UNet2DModel`` with K + 1 class embeddings (:func:`build_unet`), or any module called as
    ``unet(u_t, t, class_labels=labels).sample`` (e.g. an analytic noise predictor in tests).

    Saved form (``save_pretrained`` / ``from_pretrained``), and the diffusers conventions it follows::

        <dir>/unet/config.json, diffusion_pytorch_model.safetensors   the UNet, by diffusers' own save_pretrained
        <dir>/scorenet_config.json   format_version, num_classes K, image_shape, preset, schedule (the scheduler config)

    * ``save_pretrained(dir)`` / ``from_pretrained(dir)`` take a folder, as diffusers models do; the UNet folder is a
      plain diffusers model folder, the way a pipeline keeps its components in subfolders: ``UNet2DModel.
      from_pretrained(dir / "unet")`` loads it without this package.
    * Loading is safe: ``use_safetensors=True`` (a ``.bin`` pickle is never read) and the settings are JSON.
    * ``schedule`` holds the keyword arguments of any diffusers scheduler (``DDPMScheduler(**schedule)``), as a
      pipeline's ``scheduler_config.json`` does.

    Why not ``ModelMixin`` / ``ConfigMixin`` for the whole net: the weights are the UNet's alone, and as a
    ``ModelMixin`` the net would write one ``config.json`` and one state dict with ``unet.``-prefixed keys at the top
    of ``<dir>``, a different layout: the saved runs (``runs/*/scorenet``) would no longer load without a converter,
    and plain diffusers could no longer read the UNet on its own. The small wrapper config keeps what the UNet's
    config does not say: K (the UNet has K + 1 class embeddings, the last one the null class), the image shape, the
    preset and the noise schedule; ``from_pretrained`` checks the UNet against it.
    """

    def __init__(
        self,
        unet: nn.Module,
        num_classes: int,
        image_shape: Sequence[int],
        preset: str | None = None,
        schedule: NoiseSchedule | None = None,
    ):
        super().__init__()
        self.unet = unet
        self.num_classes = int(num_classes)
        self.image_shape = _check_image_shape(image_shape)
        self.preset = preset
        self.schedule = schedule or NoiseSchedule()
        self.forward_calls = 0
        use_classic_attention(unet)

    @classmethod
    def build(cls, preset: str, num_classes: int, image_shape: Sequence[int], **overrides) -> ScoreNet:
        """A fresh, randomly initialised score net (see :func:`build_unet`)."""
        return cls(build_unet(preset, num_classes, image_shape, **overrides), num_classes, image_shape, preset)

    @property
    def null_class(self) -> int:
        """The label of the unconditional (null) class: K."""
        return self.num_classes

    def forward(self, u_t: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        """ε̂ = ε_θ(u_t, t, y): u_t [B, C, H, W] diffusion state, t [B] float timesteps, labels [B] in [0, K]."""
        self.forward_calls += 1
        return self.unet(u_t, t, class_labels=labels).sample

    def predict_noise(self, u_t: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        """Alias of ``self(u_t, t, labels)`` (goes through ``nn.Module.__call__`` hooks)."""
        return self(u_t, t, labels)

    def _param_dtype(self, default: torch.dtype) -> torch.dtype:
        param = next(self.parameters(), None)
        return param.dtype if param is not None else default

    def class_scores(
        self, x: Tensor, noise_std: float, include_null: bool = False, max_batch: int | None = None
    ) -> Tensor:
        """∇_x log p_σ(x | y) for y = 0 … K−1 (and the null class K last when ``include_null``).

        x: [B, C, H, W] in [0, 1] units (the noisy point x̃); σ = ``noise_std`` in data units.
        Returns [B, K(+1), C, H, W] in x's dtype. All B·K(+1) inputs go through the UNet in ONE call, or in
        ceil(B·K/max_batch) calls when ``max_batch`` is given.
        """
        self._check_images(x)
        num_labels = self.num_classes + int(include_null)
        inputs = repeat(x, "b c h w -> (b k) c h w", k=num_labels)
        labels = repeat(torch.arange(num_labels, device=x.device), "k -> (b k)", b=x.shape[0])
        scores = self._scores(inputs, labels, noise_std, max_batch)  # [B·K', C, H, W]
        return rearrange(scores, "(b k) c h w -> b k c h w", k=num_labels)

    def label_scores(self, x: Tensor, labels: Tensor, noise_std: float, max_batch: int | None = None) -> Tensor:
        """∇_x log p_σ(x | y_b) for each example's own label y_b (K = the null class: the unconditional score).

        x: [B, C, H, W] in [0, 1] units, labels [B] in [0, K]. Returns [B, C, H, W] in x's dtype from ONE call over
        B inputs: K times cheaper than ``class_scores`` when only the label's class is needed.
        """
        self._check_images(x)
        labels = torch.as_tensor(labels, device=x.device).long()
        if labels.shape != (x.shape[0],) or bool((labels < 0).any()) or bool((labels > self.num_classes).any()):
            raise ValueError(f"labels must be a [B] tensor in [0, {self.num_classes}], got shape {tuple(labels.shape)}")
        return self._scores(x, labels, noise_std, max_batch)

    def _check_images(self, x: Tensor) -> None:
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"expected images [B, {', '.join(map(str, self.image_shape))}], got {tuple(x.shape)}")

    def _scores(self, x: Tensor, labels: Tensor, noise_std: float, max_batch: int | None) -> Tensor:
        """−ε_θ(u_t(x), t(σ), labels)/σ for images x [N, C, H, W] and labels [N], in chunks of ``max_batch``."""
        t = self.schedule.sigma_to_t(noise_std)  # also validates σ
        inputs = model_input(x, noise_std).to(self._param_dtype(x.dtype))
        timesteps = torch.full((inputs.shape[0],), t, device=x.device, dtype=torch.float32)
        chunk = max_batch or inputs.shape[0]
        chunks = zip(inputs.split(chunk), timesteps.split(chunk), labels.split(chunk), strict=True)
        noise_pred = torch.cat([self(u, s, y) for u, s, y in chunks])
        return noise_to_score(noise_pred.to(x.dtype), noise_std)

    # -- persistence ----------------------------------------------------------------------------------------
    def settings(self) -> dict:
        """Our settings as JSON-able data (written next to the diffusers UNet)."""
        return {
            "format_version": FORMAT_VERSION,
            "num_classes": self.num_classes,
            "image_shape": list(self.image_shape),
            "preset": self.preset,
            "schedule": self.schedule.scheduler_config(),
        }

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``directory/unet`` (diffusers, safetensors) and ``directory/scorenet_config.json`` atomically.

        Everything is written into a temporary sibling directory which then replaces ``directory``, so a reader
        never sees a half-written model. Plain diffusers loads ``UNet2DModel.from_pretrained(directory/"unet")``.
        """
        if not isinstance(self.unet, UNet2DModel):
            raise TypeError(f"only a diffusers UNet2DModel can be saved, got {type(self.unet).__name__}")
        target = Path(directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            self.unet.save_pretrained(tmp / UNET_SUBFOLDER, safe_serialization=True)
            (tmp / CONFIG_NAME).write_text(json.dumps(self.settings(), indent=2) + "\n")
            if target.exists():
                # ".tmp-" names: trainlib.files.cleanup_temporaries removes what a crash leaves here
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-old", dir=target.parent))
                os.replace(target, old / target.name)
                os.replace(tmp, target)
                shutil.rmtree(old)
            else:
                os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        expected_num_classes: int | None = None,
        device: torch.device | str | None = None,
    ) -> ScoreNet:
        """Load a directory written by :meth:`save_pretrained`; returns the net in eval mode.

        Raises ValueError when the directory or its files are missing or corrupt, when the UNet disagrees with
        the settings, or when ``expected_num_classes`` is given and differs from the saved K.
        """
        source = Path(directory)
        config_path = source / CONFIG_NAME
        if not config_path.is_file():
            raise ValueError(f"{source} is not a saved ScoreNet: {CONFIG_NAME} is missing")
        try:
            settings = json.loads(config_path.read_text())
            num_classes, image_shape = int(settings["num_classes"]), settings["image_shape"]
            schedule = NoiseSchedule(**settings["schedule"])
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"corrupt {config_path}: {err}") from err
        if expected_num_classes is not None and num_classes != int(expected_num_classes):
            raise ValueError(
                f"{source} holds a score net for {num_classes} classes, expected {expected_num_classes}"
            )
        unet_dir = source / UNET_SUBFOLDER
        if not (unet_dir / "config.json").is_file():  # checked here so diffusers never looks for it on the Hub
            raise ValueError(f"{source} is not a saved ScoreNet: {UNET_SUBFOLDER}/config.json is missing")
        try:
            unet = UNet2DModel.from_pretrained(unet_dir, use_safetensors=True)  # never unpickles a .bin
        except (OSError, ValueError, RuntimeError) as err:
            raise ValueError(f"could not load the UNet from {unet_dir}: {err}") from err
        shape = _check_image_shape(image_shape)
        found = (unet.config.num_class_embeds, unet.config.in_channels, unet.config.sample_size)
        if found != (num_classes + 1, shape[0], shape[1]):
            raise ValueError(
                f"{source}: UNet (class embeddings, channels, size) = {found} does not match the settings "
                f"(K + 1 = {num_classes + 1}, image_shape {shape})"
            )
        net = cls(unet, num_classes, shape, settings.get("preset"), schedule)
        return net.to(device).eval() if device is not None else net.eval()
