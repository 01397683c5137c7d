"""Training class-conditional score networks by denoising score matching (``train/train_scorenet.py``).

``ScoreNetConfig``'s fields, with their help strings, are the documentation of the recipe. ``train(cfg)`` prepares
the data and the UNet and runs the fixed-step Adam loop ``trainlib.adam_loop.fit`` (shared with the posterior net)
on the engine (``trainlib.accelerator``, ``trainlib.session``: run directory, resume, checkpoints, logging):

    data     the real train split of ``dataset`` (images in [0, 1]); batches are a pure function of (seed, epoch,
             batch), so resuming mid-epoch is exact; horizontal flips (CIFAR only by default; never crops, which
             would teach the generator black borders)
    step     noise-prediction DSM loss ``scorenets.dsm_loss`` with label dropout to the null class K (noise, timesteps
             and dropout drawn from a generator seeded by (seed, step, micro-batch, rank)); backward through
             accelerate (gradient accumulation, bf16/fp16 autocast on GPUs, fp32 on the CPU); gradient-norm clip;
             Adam step; linear warm-up then cosine (or constant) learning rate; EMA update
    save     every ``checkpoint_every`` steps and at the end: the full training state in ``checkpoints/step_N/``
             (model, EMA, optimizer, scheduler, RNG) and the EMA score net in ``<out>/scorenet/``
             (``ScoreNet.save_pretrained``: diffusers UNet + our settings, replaced atomically)

Everything that reads a trained score net (``scorenets.ScoreNetPosterior``, generation, validation, direct SCORE)
loads it with ``load_scorenet(path)``, which accepts the run directory or its ``scorenet/`` folder.

Default recipe (digits, tiny8 preset): batch 64, Adam lr 1e-3 with 100 warm-up steps and cosine decay to 0,
gradient norm clipped at 1, EMA τ = 0.999, 2,000 steps (its cost and sample quality: README).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from scorenets import PRESETS, ScoreNet, dsm_loss
from scorenets.unet import CONFIG_NAME

from .adam_loop import AdamLoopOptions, batch_loader, fit, open_training_data
from .cli import checking_input
from .config import option
from .rundir import saved_network_dir

SCORENET_SUBDIR = "scorenet"  # <run>/scorenet: the EMA score net, readable with ScoreNet.from_pretrained
PRESET_BY_IMAGE_SIZE = {8: "tiny8", 16: "small16", 32: "cifar32"}


@dataclass
class ScoreNetConfig(AdamLoopOptions):
    """Train a class-conditional score network (trainlib.scorenet_training); flags override --config recipes."""

    # model
    preset: str | None = option("UNet preset tiny8 | small16 | cifar32 (none: by image size 8 / 16 / 32)", None)
    channels: tuple[int, ...] = option("UNet block widths per level, multiples of its norm groups (empty: preset)", ())
    label_dropout: float = option("probability of replacing a label by the null class K (classifier-free)", 0.1, ge=0,
                                  lt=1)
    seed: int = option("seed of initialisation, data order, noise and label dropout", 0)
    out: str = option("run directory (the EMA score net goes to <out>/scorenet)", "runs/scorenet-digits")

    def validate(self) -> None:
        """Check values that need no files (``--dry-run`` runs this too)."""
        super().validate()
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"unknown UNet preset {self.preset!r}; valid presets: {', '.join(PRESETS)}")
        if any(width < 1 for width in self.channels):
            raise ValueError(f"channels must be positive widths, got {list(self.channels)}")


# -- loading a trained score net -----------------------------------------------------------------------------------
def find_scorenet_dir(path: str | os.PathLike) -> Path:
    """The saved score net at ``path``: a ``save_pretrained`` folder, or a run directory holding ``scorenet/``."""
    if not Path(path).exists():
        raise FileNotFoundError(f"score net not found: {path} (train one with train/train_scorenet.py)")
    return saved_network_dir(path, SCORENET_SUBDIR, CONFIG_NAME)


def load_scorenet(
    path: str | os.PathLike, expected_num_classes: int | None = None, device: torch.device | str | None = None,
    expected_image_shape: tuple[int, int, int] | None = None,
) -> ScoreNet:
    """``ScoreNet.from_pretrained`` on a run directory or a score-net folder; eval mode, no parameter gradients.
    ValueError when the class count or the image shape (C, H, W) differs from the expected one."""
    scorenet = ScoreNet.from_pretrained(find_scorenet_dir(path), expected_num_classes, device)
    check_image_shape("score net", path, scorenet.image_shape, expected_image_shape)
    return scorenet.requires_grad_(False).eval()


def check_image_shape(what: str, path, found, expected) -> None:
    """ValueError when a network saved at ``path`` was trained on images of another shape (C, H, W) than ``expected``
    (None: anything goes)."""
    if expected is not None and tuple(found) != tuple(expected):
        raise ValueError(f"{what} {path} was trained on images {tuple(found)}, the data are {tuple(expected)} "
                         "(C, H, W)")


# -- building blocks -------------------------------------------------------------------------------------------------
def resolve_preset(preset: str | None, image_shape: tuple[int, int, int]) -> str:
    """The UNet preset: the one asked for, else the one for the image size (8 → tiny8, 16 → small16, 32 → cifar32)."""
    if preset is not None:
        return preset
    size = image_shape[1]
    if size not in PRESET_BY_IMAGE_SIZE:
        raise ValueError(f"no default UNet preset for {size}×{size} images; choose one with --preset "
                         f"({', '.join(PRESETS)})")
    return PRESET_BY_IMAGE_SIZE[size]


def resolve_channels(preset: str, channels: tuple[int, ...]) -> tuple[int, ...]:
    """The UNet block widths: ``channels`` if given (one per level, multiples of the preset's norm groups)."""
    levels, groups = PRESETS[preset]["block_out_channels"], PRESETS[preset]["norm_num_groups"]
    if not channels:
        return tuple(levels)
    if len(channels) != len(levels) or any(width % groups for width in channels):
        raise ValueError(f"preset {preset!r} needs {len(levels)} block widths, each a multiple of its {groups} norm "
                         f"groups; got channels {list(channels)}")
    return tuple(channels)


def _check_resumed_scorenet(out: Path, num_classes: int, image_shape: tuple[int, int, int], preset: str,
                            channels: tuple[int, ...]) -> None:
    """Refuse to resume a run whose saved score net is for other data (a clear error instead of a size mismatch)."""
    settings_file = out / SCORENET_SUBDIR / CONFIG_NAME
    if not settings_file.is_file():
        return
    settings = json.loads(settings_file.read_text())
    unet_file = out / SCORENET_SUBDIR / "unet" / "config.json"
    widths = tuple(json.loads(unet_file.read_text()).get("block_out_channels", ())) if unet_file.is_file() else ()
    found = (settings.get("num_classes"), tuple(settings.get("image_shape", ())), settings.get("preset"), widths)
    wanted = (num_classes, tuple(image_shape), preset, channels)
    if found != wanted:
        raise ValueError(f"{out} holds a score net for (classes, image shape, preset, channels) = {found}, this run "
                         f"trains {wanted}; choose another --out")


def _save_scorenet(ema_model: ScoreNet, out: Path) -> None:
    """The EMA score net → <out>/scorenet (``save_pretrained`` replaces the folder atomically)."""
    ema_model.save_pretrained(out / SCORENET_SUBDIR)


# -- training --------------------------------------------------------------------------------------------------------
def train(cfg: ScoreNetConfig) -> dict | None:
    """Train as configured (module docstring); returns a summary on the main process, None elsewhere."""
    with checking_input():  # bad input fails here, before the run directory is written
        accelerator, train_set, micro_batch = open_training_data(cfg)
        num_classes, image_shape = train_set.num_classes, train_set.image_shape
        preset = resolve_preset(cfg.preset, image_shape)
        channels = resolve_channels(preset, cfg.channels)
        out = Path(cfg.out)
        if cfg.resume != "none":
            _check_resumed_scorenet(out, num_classes, image_shape, preset, channels)
    loader = batch_loader(cfg, accelerator, train_set, micro_batch)

    model = ScoreNet.build(preset, num_classes, image_shape, block_out_channels=channels)
    schedule = model.schedule

    def loss_fn(net, x, y, generator):
        loss = dsm_loss(net, x, y, num_classes, schedule, cfg.label_dropout, generator)
        return loss, {"loss": loss.detach()}

    parameters = sum(p.numel() for p in model.parameters())
    summary = (f"DSM on {train_set.name} ({len(train_set)} images {image_shape}, {num_classes} classes), "
               f"{preset} UNet ({parameters / 1e6:.2f}M parameters), {cfg.train_steps} steps of {cfg.batch_size} on "
               f"{accelerator.num_processes} process(es), {accelerator.device}")
    results = {"scorenet": str(out / SCORENET_SUBDIR), "preset": preset, "parameters": parameters,
               "dataset": cfg.dataset, "num_classes": num_classes, "image_shape": list(image_shape)}
    return fit(cfg, accelerator, loader, model, loss_fn, _save_scorenet, description="score net", summary=summary,
               results=results, saved_message=f"saved the EMA score net to {out / SCORENET_SUBDIR} (load it with "
               "ScoreNet.from_pretrained)")
