"""scorenets: class-conditional diffusers score networks and the score-net data posterior.

Conventions shared by every module (details in :mod:`scorenets.noise`):

* images are float tensors [B, C, H, W] in [0, 1]; the diffusion model works in u = 2x − 1 ∈ [−1, 1];
* a noise std σ is always quoted in [0, 1] data units (x̃ = x + σ·n); in [−1, 1] units it is s = 2σ;
* noise prediction ε̂ = ε_θ → score: ∇_x̃ log p_σ(x̃|y) = −ε_θ(u_t, t(σ), y)/σ with u_t = (2x̃ − 1)/sqrt(1 + 4σ²);
* label K (= num_classes) is the null class: the unconditional model, used for classifier-free guidance.

Modules: ``noise`` (schedule and conversions), ``unet`` (UNet presets and ``ScoreNet``), ``dsm`` (training loss),
``sampling`` (DDPM / DDIM / DPM-Solver++ with guidance and per-sample seeds), ``posterior`` (``ScoreNetPosterior``:
p_σ(y|x) and ∇_x log p_σ(y|x) for ``datagrad`` from scores and an anchor), ``posterior_net`` (``PosteriorNet``: the
noise-conditional classifier p_φ(y|x̃, σ), a differentiable data posterior with no anchor) and ``dlsm`` (its loss).
"""

from .dlsm import dlsm_loss
from .dsm import dsm_loss
from .noise import (
    NoiseSchedule,
    alpha_bar_from_sigma,
    check_noise_std,
    model_input,
    noise_to_score,
    score_to_noise,
    sigma_from_alpha_bar,
    to_data_range,
    to_model_range,
)
from .posterior import (
    QUADRATURE_RULES,
    AnchoredPosterior,
    ClassScoreModel,
    ScoreNetPosterior,
    TrajectoryPosterior,
    anchor_log_probs,
    quadrature,
)
from .posterior_net import POSTERIOR_PRESETS, PosteriorNet, PosteriorNetPosterior, build_posterior_net
from .sampling import DEFAULT_STEPS, SAMPLERS, make_scheduler, sample, to_uint8_nhwc
from .unet import PRESETS, ScoreNet, build_unet

__all__ = [
    "DEFAULT_STEPS",
    "POSTERIOR_PRESETS",
    "PRESETS",
    "QUADRATURE_RULES",
    "SAMPLERS",
    "AnchoredPosterior",
    "ClassScoreModel",
    "NoiseSchedule",
    "PosteriorNet",
    "PosteriorNetPosterior",
    "ScoreNet",
    "ScoreNetPosterior",
    "TrajectoryPosterior",
    "alpha_bar_from_sigma",
    "anchor_log_probs",
    "build_posterior_net",
    "build_unet",
    "check_noise_std",
    "dlsm_loss",
    "dsm_loss",
    "make_scheduler",
    "model_input",
    "noise_to_score",
    "quadrature",
    "sample",
    "score_to_noise",
    "sigma_from_alpha_bar",
    "to_data_range",
    "to_model_range",
    "to_uint8_nhwc",
]
