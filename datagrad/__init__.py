"""datagrad: the exact core of self-consistent robustness (SCORE).

Distances between categorical distributions, the data-posterior interface, closed-form toy
distributions and exact kernel (training-set) posteriors, self-consistent losses with the full data
gradient, PGD / grid inner maximizers, batch estimators of the standard, Madry and SCORE risks with
the bounds of Theorem 1, the gradient-alignment expansion of Theorem 4 (``alignment``) and the Gaussian-augmented risk
derivatives of Theorem 5 (``smoothing``), and SCORE risks as the per-example maximum over an ensemble of
attacks with bootstrap intervals (``worst_case``).
No I/O lives here; everything else in the project builds on it.
"""

from .alignment import AlignmentTerms, alignment_terms, dual_exponent, expansion_check, loglog_slope
from .attacks import PGD, GridSearch, pgd, project, uniform_in_ball, update_best
from .distances import DISTANCES, Distance, get_distance
from .kernels import KernelMixture
from .losses import data_margin, log_odds_margin, madry_distance, self_consistent_distance, self_consistent_kl
from .posteriors import (
    DataPosterior,
    attach_log_posterior,
    autograd_grad_log_posterior,
    check_num_classes,
    is_differentiable,
)
from .precision import at_least_float32
from .risks import (
    check_corollary1,
    check_theorem1,
    intrinsic_risk,
    madry_risk,
    score_risk,
    standard_risk,
)
from .smoothing import MeanEstimate, gaussian_risk_samples, noisy_loss, smoothing_estimates
from .toys import TOY_MIXTURES, GaussianMixture, MixturePosterior, seed_toy, toy_mixture
from .worst_case import ATTACKS, WorstCase, bootstrap_mean, worst_case

__all__ = [
    "ATTACKS",
    "DISTANCES",
    "PGD",
    "TOY_MIXTURES",
    "AlignmentTerms",
    "DataPosterior",
    "Distance",
    "GaussianMixture",
    "GridSearch",
    "KernelMixture",
    "MeanEstimate",
    "MixturePosterior",
    "WorstCase",
    "alignment_terms",
    "at_least_float32",
    "attach_log_posterior",
    "autograd_grad_log_posterior",
    "bootstrap_mean",
    "check_corollary1",
    "check_num_classes",
    "check_theorem1",
    "data_margin",
    "dual_exponent",
    "expansion_check",
    "gaussian_risk_samples",
    "get_distance",
    "intrinsic_risk",
    "is_differentiable",
    "log_odds_margin",
    "loglog_slope",
    "madry_distance",
    "madry_risk",
    "noisy_loss",
    "pgd",
    "project",
    "score_risk",
    "seed_toy",
    "self_consistent_distance",
    "self_consistent_kl",
    "smoothing_estimates",
    "standard_risk",
    "toy_mixture",
    "uniform_in_ball",
    "update_best",
    "worst_case",
]
