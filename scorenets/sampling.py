"""Class-conditional sampling with diffusers schedulers and classifier-free guidance.

Samplers (all built from the score net's :class:`~scorenets.noise.NoiseSchedule`):

* ``"ddpm"``        ancestral DDPM (``DDPMScheduler``; stochastic; default 1000 steps),
* ``"ddim"``        DDIM (``DDIMScheduler``; deterministic for eta = 0; default 100 steps),
* ``"dpmsolver++"`` DPM-Solver++ 2M (``DPMSolverMultistepScheduler``, algorithm_type="dpmsolver++"; deterministic;
  default 20 steps).

DDPM and DDIM use "trailing" timestep spacing, so a short schedule still starts at the noisiest step T−1; both
clip the predicted clean image to [−1, 1] (diffusers' default, as in DDPM). The UNet works in [−1, 1]; the
returned images are mapped back to [0, 1] and clamped.

Classifier-free guidance with scale w: ε = ε_uncond + w·(ε_cond − ε_uncond), ε_uncond from the null class K.
w = 1 is the plain conditional model (one UNet input per sample); otherwise the conditional and unconditional
inputs go through ONE batched UNet call per step.

Reproducibility: sample i uses its own CPU ``torch.Generator`` seeded with ``seeds[i]`` for its initial noise and for
every stochastic step, so an image depends only on (label, seed, sampler settings, weights), not on the batch it
was drawn in, nor on the process that drew it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor
from tqdm.auto import tqdm

from .noise import NoiseSchedule, to_data_range
from .unet import ScoreNet

SAMPLERS = ("ddpm", "ddim", "dpmsolver++")
DEFAULT_STEPS = {"ddpm": 1000, "ddim": 100, "dpmsolver++": 20}


def make_scheduler(sampler: str, schedule: NoiseSchedule, num_steps: int | None = None):
    """A fresh diffusers scheduler for ``sampler`` with ``num_steps`` inference steps (default: DEFAULT_STEPS)."""
    config = schedule.scheduler_config()
    if sampler == "ddpm":
        scheduler = DDPMScheduler(**config, timestep_spacing="trailing")
    elif sampler == "ddim":
        scheduler = DDIMScheduler(**config, timestep_spacing="trailing")
    elif sampler == "dpmsolver++":
        scheduler = DPMSolverMultistepScheduler(**config, algorithm_type="dpmsolver++", solver_order=2)
    else:
        raise ValueError(f"unknown sampler {sampler!r}; valid samplers: {', '.join(SAMPLERS)}")
    num_steps = DEFAULT_STEPS[sampler] if num_steps is None else int(num_steps)
    if not 1 <= num_steps <= schedule.num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {schedule.num_train_timesteps}], got {num_steps}")
    scheduler.set_timesteps(num_steps)
    return scheduler


@torch.no_grad()
def sample(
    scorenet: ScoreNet,
    labels: Tensor | Sequence[int],
    seeds: Sequence[int],
    sampler: str = "dpmsolver++",
    num_steps: int | None = None,
    guidance_scale: float = 1.0,
    eta: float = 0.0,
    progress: bool = False,
) -> Tensor:
    """Draw one image per (label, seed): returns [N, C, H, W] float in [0, 1] on the score net's device.

    labels: [N] in [0, K] (K = null class draws from the unconditional model); seeds: N integers.
    ``eta`` is DDIM's stochasticity (0 = deterministic) and must stay 0 for the other samplers.
    """
    labels = torch.as_tensor(labels).long().flatten()
    seeds = [int(s) for s in seeds]
    if labels.numel() == 0 or len(seeds) != labels.numel():
        raise ValueError(f"need N >= 1 labels and as many seeds, got {labels.numel()} labels and {len(seeds)} seeds")
    if bool((labels < 0).any()) or bool((labels > scorenet.null_class).any()):
        raise ValueError(f"labels must lie in [0, {scorenet.null_class}] (K = null class), got {labels.tolist()}")
    if eta != 0 and sampler != "ddim":
        raise ValueError(f"eta applies to the DDIM sampler only, got eta={eta} with sampler {sampler!r}")
    if scorenet.training:
        raise ValueError("scorenet is in training mode (dropout active); call scorenet.eval() before sampling")

    scheduler = make_scheduler(sampler, scorenet.schedule, num_steps)
    param = next(scorenet.parameters())
    device, dtype = param.device, param.dtype
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    step_kwargs = {"eta": eta} if sampler == "ddim" else {}
    guided = guidance_scale != 1.0
    labels = labels.to(device)
    if guided:
        labels = torch.cat([labels, torch.full_like(labels, scorenet.null_class)])

    u = randn_tensor((len(seeds), *scorenet.image_shape), generator=generators, device=device, dtype=dtype)
    u = u * scheduler.init_noise_sigma
    for t in tqdm(scheduler.timesteps, desc=f"{sampler} sampling", disable=not progress, leave=False):
        u_in = scheduler.scale_model_input(u, t)
        u_in = torch.cat([u_in, u_in]) if guided else u_in
        noise_pred = scorenet(u_in, t.to(device, torch.float32).expand(u_in.shape[0]), labels)
        if guided:
            noise_pred_cond, noise_pred_uncond = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_cond - noise_pred_uncond)
        u = scheduler.step(noise_pred, t, u, generator=generators, **step_kwargs).prev_sample
    return to_data_range(u).clamp(0, 1)


def to_uint8_nhwc(images: Tensor) -> np.ndarray:
    """[N, C, H, W] floats in [0, 1] → uint8 [N, H, W, C] (the DeepMind/SCORE ``.npz`` ``image`` layout)."""
    if images.dim() != 4:
        raise ValueError(f"expected images [N, C, H, W], got shape {tuple(images.shape)}")
    return (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
