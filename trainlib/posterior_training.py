"""Training the posterior network p_φ(y | x̃, σ) (``train/train_posterior.py``): cross-entropy plus DLSM.

``PosteriorNetConfig``'s fields, with their help strings, are the documentation of the recipe. ``train(cfg)`` loads
the data (real train split, optionally mixed with generated shards as in classifier training), the frozen score net
whose unconditional score the DLSM term needs, builds ``scorenets.PosteriorNet`` and runs the fixed-step Adam loop
``trainlib.adam_loop.fit`` (shared with the score net) with ``scorenets.dlsm_loss``: σ log-uniform in
[``sigma_min``, ``sigma_max``] per example, x̃ = x + σn, loss = CE + w·DLSM (+ w_T·TEACHER: the exact smoothed
posterior of the train split as a soft label at adversarial points near x̃, ``teacher_weight``). The EMA network goes to
``<out>/posterior_net/`` (diffusers ``save_pretrained``: posterior_net_config.json + safetensors, replaced
atomically);
``load_posterior_net(path)`` reads it back from the run directory or that folder, in one call.

What it estimates: p_σ(y|x) of the TRAINING distribution at noise std σ, and its input gradient. Trained on a finite
set, the optimum of the cross-entropy is the exact smoothed posterior of that set (``datagrad.KernelMixture`` with
bandwidth σ), which ``analysis.validate_posterior`` uses as the truth on real data.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import torch

from scorenets import POSTERIOR_PRESETS, PosteriorNet, build_posterior_net, dlsm_loss

from .adam_loop import AdamLoopOptions, batch_loader, fit, open_training_data
from .cli import checking_input
from .config import option
from .files import atomic_directory
from .npz import load_generated, shard_paths
from .rundir import saved_network_dir

POSTERIOR_SUBDIR = "posterior_net"  # <run>/posterior_net: the EMA posterior net, PosteriorNet.from_pretrained
PRESET_BY_IMAGE_SIZE = {4: "tiny8", 8: "tiny8", 16: "small16", 32: "cifar32"}


@dataclass
class PosteriorNetConfig(AdamLoopOptions):
    """Train a noise-conditional posterior network p_phi(y | x, sigma) by cross-entropy + DLSM."""

    preset: str | None = option("posterior-net preset tiny8 | small16 | cifar32 (none: by image size)", None)
    scorenet: str | None = option("frozen score net whose unconditional score the DLSM term uses (none: no DLSM)",
                                  "runs/scorenet-digits")
    sigma_min: float = option("smallest noise std sigma trained on ([0, 1] data units)", 0.02, gt=0)
    sigma_max: float = option("largest noise std sigma trained on (sigma is log-uniform in between)", 1.0, gt=0)
    ce_weight: float = option("weight of the cross-entropy term", 1.0, gt=0)
    dlsm_weight: float = option("weight of the DLSM term and of the other classes' score matching (0: cross-entropy "
                                "only)", 10.0, ge=0)
    other_classes: int = option("random non-label classes per example whose gradient is matched to the score net's "
                                "class score (scorenets.dlsm)", 2, ge=0)
    adversarial_radius: float = option("l-inf radius of the points x + delta where the label's and the other classes' "
                                       "gradients are matched instead (0: at the noisy points; scorenets.dlsm)", 0.0,
                                       ge=0)
    adversarial_steps: int = option("PGD steps finding those points and the teacher's", 2, ge=1)
    teacher_weight: float = option("weight of the cross-entropy against the exact smoothed posterior of the train "
                                   "split (datagrad.KernelMixture, kernel std sigma) at adversarial points x + delta "
                                   "(--teacher-radius, --teacher-attack; 0: off; scorenets.dlsm)", 0.0, ge=0)
    teacher_radius: float = option("l-inf radius of those points (0: at the noisy points themselves)", 0.0, ge=0)
    teacher_attack: Literal["network", "error"] = option(
        "what the PGD finding those points maximizes: network = the network's own KL(p_phi(x) || p_phi(x + delta)); "
        "error = its KL from the teacher at x + delta, through the kernel sum too", "network")
    generated: str | None = option("generated pseudo-data mixed into each batch: an .npz, a directory or a glob", None)
    unsup_fraction: float = option("fraction of each batch drawn (with replacement) from --generated", 0.7, ge=0, lt=1)
    batch_size: int = option("global batch size (all processes, after accumulation)", 64)
    out: str = option("run directory (the EMA posterior net goes to <out>/posterior_net)", "runs/posterior-digits")

    def validate(self) -> None:
        super().validate()
        if self.preset is not None and self.preset not in POSTERIOR_PRESETS:
            raise ValueError(f"unknown posterior-net preset {self.preset!r}; valid: {', '.join(POSTERIOR_PRESETS)}")
        if not (math.isfinite(self.sigma_max) and self.sigma_min < self.sigma_max):
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {self.sigma_min} and {self.sigma_max}")
        if self.teacher_weight > 0 and self.generated is not None and self.unsup_fraction > 0:
            raise ValueError("the teacher term is the smoothed posterior of the real train split, which is the "
                             "cross-entropy's optimum only without --generated data; use one or the other")
        if self.dlsm_weight > 0 and not self.scorenet:
            raise ValueError("the DLSM term needs a score net (--scorenet DIR); use --dlsm-weight 0 to train without")


def find_posterior_dir(path: str | os.PathLike) -> Path:
    """The saved posterior net at ``path``: a ``save_pretrained`` folder, or a run directory holding posterior_net/."""
    if not Path(path).exists():
        raise FileNotFoundError(f"posterior net not found: {path} (train one with train/train_posterior.py)")
    return saved_network_dir(path, POSTERIOR_SUBDIR, PosteriorNet.config_name)


def load_posterior_net(
    path: str | os.PathLike, expected_num_classes: int | None = None, device: torch.device | str | None = None,
    expected_image_shape: tuple[int, int, int] | None = None,
) -> PosteriorNet:
    """The posterior net saved at ``path`` (run directory or folder), frozen and in eval mode; clear errors (also
    when the class count or the image shape differs from the expected one)."""
    from .scorenet_training import check_image_shape

    directory = find_posterior_dir(path)
    if not (directory / PosteriorNet.config_name).is_file():
        raise ValueError(f"{directory} is not a saved posterior net: {PosteriorNet.config_name} is missing")
    try:
        net = PosteriorNet.from_pretrained(directory, use_safetensors=True)  # never unpickles a .bin
    except (OSError, ValueError, TypeError, RuntimeError, KeyError) as err:
        raise ValueError(f"could not load the posterior net from {directory}: {str(err).splitlines()[0]}") from None
    if expected_num_classes is not None and net.num_classes != int(expected_num_classes):
        raise ValueError(f"{directory} holds a posterior net for {net.num_classes} classes, expected "
                         f"{expected_num_classes}")
    check_image_shape("posterior net", path, net.image_shape, expected_image_shape)
    net = net.requires_grad_(False).eval()
    return net.to(device) if device is not None else net


def _save_posterior_net(ema_model: PosteriorNet, out: Path) -> None:
    with atomic_directory(out / POSTERIOR_SUBDIR) as tmp:
        ema_model.save_pretrained(tmp, safe_serialization=True)


def train(cfg: PosteriorNetConfig) -> dict | None:
    """Train as configured (module docstring); returns a summary on the main process, None elsewhere."""
    from .scorenet_training import load_scorenet

    with checking_input():  # bad input fails here, before the run directory is written
        accelerator, train_set, micro_batch = open_training_data(cfg)
        device, world = accelerator.device, accelerator.num_processes
        num_classes, image_shape = train_set.num_classes, train_set.image_shape
        generated = None
        if cfg.generated is not None and cfg.unsup_fraction > 0:
            shard_paths(cfg.generated)
            generated = load_generated(cfg.generated, num_classes)
        scorenet = None
        if cfg.dlsm_weight > 0:
            scorenet = load_scorenet(cfg.scorenet, num_classes, device, expected_image_shape=image_shape)
            for sigma in (cfg.sigma_min, cfg.sigma_max):
                scorenet.schedule.sigma_to_t(sigma)  # a clear error outside the score net's range
        size = image_shape[1]
        preset = cfg.preset or PRESET_BY_IMAGE_SIZE.get(size)
        if preset is None:
            raise ValueError(f"no default posterior-net preset for {size}x{size} images; choose one with --preset")
        schedule = scorenet.schedule.scheduler_config() if scorenet is not None else None
        model = build_posterior_net(preset, num_classes, image_shape, cfg.sigma_min, cfg.sigma_max, schedule=schedule)
        out = Path(cfg.out)
        if cfg.resume != "none":
            _check_resumed(out, model)
    loader = batch_loader(cfg, accelerator, train_set, micro_batch, generated, cfg.unsup_fraction)
    if num_classes - 1 < cfg.other_classes:
        raise ValueError(f"other_classes {cfg.other_classes} exceeds the {num_classes - 1} classes besides the label")
    teacher = None
    if cfg.teacher_weight > 0:  # the cross-entropy's own optimum, exact: the smoothed posterior of the train split
        from datagrad import KernelMixture

        x_train, y_train = train_set.tensors(device)
        smoothed = KernelMixture(x_train, y_train, num_classes, bandwidth=cfg.sigma_min)  # p_σ of the train split
        teacher = smoothed.log_posterior_per_example  # read at each example's own σ_b, not at sigma_min
    loss_fn = partial(_loss, sigma_range=(cfg.sigma_min, cfg.sigma_max), scorenet=scorenet,
                      dlsm_weight=cfg.dlsm_weight, ce_weight=cfg.ce_weight, other_classes=cfg.other_classes,
                      adversarial_radius=cfg.adversarial_radius, adversarial_steps=cfg.adversarial_steps,
                      teacher=teacher, teacher_weight=cfg.teacher_weight, teacher_radius=cfg.teacher_radius,
                      teacher_attack=cfg.teacher_attack)
    parameters = sum(p.numel() for p in model.parameters())
    terms = (f"CE + {cfg.dlsm_weight:g}·DLSM with {cfg.other_classes} other class(es) (score net {cfg.scorenet})"
             if scorenet is not None else "CE")
    if teacher is not None:
        terms += (f" + {cfg.teacher_weight:g}·TEACHER (the smoothed train-split posterior at l-inf "
                  f"{cfg.teacher_radius:g} from x, attack on the {cfg.teacher_attack})")
    summary = (f"posterior net on {train_set.name} ({len(train_set)} images {image_shape}"
               f"{f' + {len(generated)} generated' if generated else ''}, {num_classes} classes), {preset} "
               f"({parameters / 1e6:.2f}M parameters), {terms}, sigma in [{cfg.sigma_min:g}, {cfg.sigma_max:g}], "
               f"{cfg.train_steps} steps of {cfg.batch_size} on {world} process(es), {device}")
    results = {"posterior_net": str(out / POSTERIOR_SUBDIR), "preset": preset, "parameters": parameters,
               "dataset": cfg.dataset, "num_classes": num_classes, "image_shape": list(image_shape),
               "sigma_range": [cfg.sigma_min, cfg.sigma_max]}
    return fit(cfg, accelerator, loader, model, loss_fn, _save_posterior_net, description="posterior net",
               summary=summary, results=results, saved_message=f"saved the EMA posterior net to "
               f"{out / POSTERIOR_SUBDIR} (load it with trainlib.posterior_training.load_posterior_net)")


def _loss(net, x, y, generator, *, scorenet, **options):
    """``scorenets.dlsm_loss`` with the frozen score net's schedule and null class."""
    schedule, null_class = (scorenet.schedule, scorenet.null_class) if scorenet is not None else (None, None)
    return dlsm_loss(net, x, y, scorenet=scorenet, schedule=schedule, null_class=null_class, generator=generator,
                     **options)


def _check_resumed(out: Path, model: PosteriorNet) -> None:
    """Refuse to resume a run whose saved posterior net has another configuration (a clear error, not a size one)."""
    saved = out / POSTERIOR_SUBDIR / PosteriorNet.config_name
    if not saved.is_file():
        return
    found = PosteriorNet.load_config(saved.parent)
    keys = ("num_classes", "image_shape", "block_out_channels", "down_block_types", "sigma_min", "sigma_max")
    mismatch = [k for k in keys if list(_as_list(found.get(k))) != list(_as_list(model.config[k]))]
    if mismatch:
        raise ValueError(f"{out} holds a posterior net with other settings ({', '.join(mismatch)}); choose another "
                         "--out")


def _as_list(value):
    return value if isinstance(value, list | tuple) else [value]
