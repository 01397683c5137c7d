"""What the theorem and dynamics analyses read: classifiers, the data posterior, fixed test points, cached results.

Classifiers come from training run directories (``trainlib.adversarial``: ``ema.safetensors`` or ``best/``) or from
single weights files such as the per-epoch snapshots ``<run>/snapshots/epoch_NNNN.safetensors``, through
``trainlib.classifiers.load_classifier``; a directory that holds no run is a clear error.

The data posterior p_d(·|x) (``DataSource``):

* Gaussian-mixture toys (``gmm-*``): the exact mixture (``datagrad.GaussianMixture``), p_d itself (σ = 0); Theorem 5's
  class score ∇_x log p^σ(x|y) is its closed form at σ.
* images: the estimate direct SCORE training uses, built by the same function
  (``trainlib.data_posterior.posterior_provider``): by default the posterior net p_φ(·|x, σ) at noise std σ
  (``--noise-std``, data units, default 0.2), differentiable in x; or, with ``--posterior scorenet``, the score-net
  trajectory posterior anchored at the clean point (at p_φ(·|x, σ), or at smoothed labels with ``--anchor label``),
  extended along every attack path; or the exact smoothed posterior of the training split (``--posterior
  empirical``). How close each is to the truth is measured by ``analysis.validate_posterior`` along the recipe's own
  attack path (README). Theorem 5's class score is ``ScoreNet.label_scores`` (the label's class only: one network
  call over B inputs instead of B·K).

Test points: the first n of the test split, in order and unclamped (a mixture's samples are not clipped; digits and
CIFAR are in [0, 1] already), so every epoch and every run sees the same points.

Cached results: ``<run>/analysis/<name>.json`` with the settings they were computed with; a cache with other settings
is recomputed, so the report never mixes settings.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from datagrad import DataPosterior, GaussianMixture
from scorenets import check_noise_std
from trainlib.classifiers import load_classifier
from trainlib.cli import checking_input
from trainlib.config import option, positional
from trainlib.data_posterior import (
    ANCHORS,
    DEFAULT_ANCHOR_SMOOTHING,
    DEFAULT_NOISE_STD,
    DEFAULT_POSTERIOR_NET,
    DEFAULT_SCORENET,
    POSTERIORS,
    PosteriorSpec,
    check_posterior_options,
    posterior_provider,
)
from trainlib.datasets import ImageDataset, load_dataset
from trainlib.files import atomic_write_json, sha256_file, sha256_json

ANALYSIS_DIR = "analysis"
SCORENET_BATCH = 2048  # UNet inputs per score-net call (B·K inputs per posterior step: CIFAR-100 has K = 100)


@dataclass
class ReadoutOptions:
    """The options every readout command shares (its config dataclass adds its own after these)."""

    runs: tuple[str, ...] = positional("training run directories (or weights files)", ())
    scorenet: str | None = option("score net for image data (run directory or scorenet/ folder)", DEFAULT_SCORENET)
    data_dir: str = option("where CIFAR is read from", "data")

    def validate(self) -> None:
        if not self.runs:
            raise ValueError("give at least one run directory")


@dataclass
class PosteriorOptions(ReadoutOptions):
    """``ReadoutOptions`` plus the data posterior's settings (``DataSource``; the direct-SCORE training options)."""

    posterior: str = option(f"p_d on image data: {' | '.join(POSTERIORS[:3])} (as in direct SCORE training)",
                            "posterior-net")
    posterior_net: str | None = option("posterior net (run directory or posterior_net/ folder)",
                                       DEFAULT_POSTERIOR_NET)
    posterior_ensemble: tuple[str, ...] = option(
        "further posterior nets: p_d is the mean of their probabilities and --posterior-net's (a deep ensemble)", ())
    noise_std: float = option("sigma of p_sigma(y|x) ([0, 1] data units, std)", DEFAULT_NOISE_STD)
    anchor: str = option(f"posterior=scorenet: the anchor, {' | '.join(ANCHORS)}", "posterior-net")
    anchor_smoothing: float = option("anchor=label: its smoothing", DEFAULT_ANCHOR_SMOOTHING)

    def validate(self) -> None:
        super().validate()
        check_noise_std(self.noise_std)
        if self.posterior == "analytic":
            raise ValueError("posterior=analytic is implied on gmm-* data; on image data choose "
                             f"{', '.join(POSTERIORS[:3])}")
        check_posterior_options(self.posterior, self.anchor, self.scorenet, self.posterior_net, "", True,
                                self.posterior_ensemble)
        if not 0 < self.anchor_smoothing < 1:
            raise ValueError(f"anchor_smoothing must be in (0, 1), got {self.anchor_smoothing}")


def compute_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class Classifier:
    """A trained classifier in eval mode, its settings (model, dataset, norm, eps, objective, ...), its test split."""

    source: Path
    model: nn.Module
    settings: dict
    test: ImageDataset

    @property
    def num_classes(self) -> int:
        return self.test.num_classes

    @property
    def name(self) -> str:
        return self.source.stem if self.source.is_file() else self.source.name


def check_run_dir(run: str | Path) -> Path:
    """The run directory, or a clear error when it is missing, empty or not a training run."""
    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"run directory not found: {run}")
    if not any(run.iterdir()):
        raise ValueError(f"run directory {run} is empty (expected a training run: config.json, ema.safetensors, ...)")
    if not (run / "config.json").is_file():
        raise ValueError(f"{run} is not a training run directory: config.json is missing")
    return run


def open_classifier(source: str | Path, which: str = "final", dtype=torch.float64, data_dir="data") -> Classifier:
    """Load a run directory's final (or ``which="best"``) EMA classifier, or a weights file, onto the compute device."""
    source = Path(source)
    if source.is_dir():
        check_run_dir(source)
    loaded = load_classifier(source, which=which, data_dir=data_dir)
    settings = loaded.settings | {"norm": loaded.settings.get("norm", "linf")}
    test = load_dataset(settings["dataset"], "test", data_dir, settings["num_classes"])
    model = loaded.model.to(device=compute_device(), dtype=dtype).eval().requires_grad_(False)
    return Classifier(source, model, settings, test)


def open_all(cfg: ReadoutOptions, which: str = "final", dtype=torch.float64, check=None) -> list[tuple]:
    """Every run of ``cfg.runs`` opened with its data source (one per dataset), or bad input (``InputError``)
    before anything is written: options, run directories, weights, networks and ``check(classifier, data)``."""
    with checking_input():
        cfg.validate()
        opened, by_dataset = [], {}
        for run in cfg.runs:
            classifier = open_classifier(run, which, dtype, cfg.data_dir)
            data = by_dataset.get(classifier.test.name) or DataSource(classifier, cfg)
            by_dataset[classifier.test.name] = data
            data.check(classifier)
            if check is not None:
                check(classifier, data)
            opened.append((classifier, data))
    return opened


def test_points(test: ImageDataset, n: int, dtype=torch.float64) -> tuple[Tensor, Tensor]:
    """The first n test points (x [n, C, H, W] unclamped, y [n]) on the compute device."""
    x, y = test.get(range(min(n, len(test))), compute_device())
    return x.to(dtype), y


class DataSource:
    """p_d(·|x) for attacks and alignment, and ∇_x log p^σ(x|y) for Theorem 5 (module docstring).

    ``options``: a ``PosteriorOptions`` (the data posterior is built) or a ``ReadoutOptions`` (class scores only).
    """

    def __init__(self, classifier: Classifier, options: ReadoutOptions):
        test = classifier.test
        self.num_classes = test.num_classes
        self.mixture: GaussianMixture | None = test.mixture
        self.scorenet = None
        self._provider = None
        if self.mixture is not None:
            self.description = {"kind": "exact mixture", "dataset": test.name}
            return
        if options.scorenet is not None and Path(options.scorenet).exists():
            from trainlib.scorenet_training import load_scorenet

            net = load_scorenet(options.scorenet, test.num_classes, compute_device(), test.image_shape)
            self.scorenet = net
        spec = PosteriorSpec.of(options) if isinstance(options, PosteriorOptions) else None
        if spec is not None:
            split = load_dataset(classifier.settings["dataset"], "train", options.data_dir) if (
                spec.posterior == "empirical") else test
            self._provider = posterior_provider(spec, split, compute_device(), max_batch=SCORENET_BATCH)
        elif self.scorenet is None:
            raise ValueError(f"{test.name} has no closed-form posterior: give a score net (--scorenet DIR)")
        self.description = {"kind": "estimate, as in direct SCORE training", **(spec.describe() if spec else {}),
                            "scorenet": options.scorenet}

    def check(self, classifier: Classifier) -> None:
        """A clear error when the classifier and the posterior disagree on the class count."""
        if classifier.num_classes != self.num_classes:
            raise ValueError(f"class-count mismatch: checkpoint {classifier.source} has {classifier.num_classes} "
                             f"classes but the data posterior has {self.num_classes}")

    def posterior(self, x: Tensor, y: Tensor) -> DataPosterior:
        """The data posterior for the batch (x, y); fresh for every attack (a trajectory posterior is stateful)."""
        if self.mixture is not None:
            return self.mixture
        if self._provider is None:
            raise ValueError("this analysis was not given a data posterior (PosteriorOptions)")
        return self._provider(x, y)

    def class_score(self, sigma: float) -> Callable[[Tensor, Tensor], Tensor]:
        """(x, y) → ∇_x log p^σ(x|y) at noise std σ (exact for a mixture, else the score net's label score)."""
        if self.mixture is not None:
            return lambda x, y: self.mixture.score(x, y, sigma)
        net = self.scorenet
        if net is None:
            raise ValueError("Theorem 5's class score on image data needs a score net (--scorenet DIR)")
        return lambda x, y: net.label_scores(x, y, sigma, max_batch=SCORENET_BATCH)


def settings_key(settings: dict) -> str:
    return sha256_json(settings)


def cache_path(source: str | Path, name: str) -> Path:
    """``<run>/analysis/<name>.json`` for a run directory, ``<dir>/analysis/<stem>.<name>.json`` for a weights file."""
    source = Path(source)
    if source.is_file():
        return source.parent / ANALYSIS_DIR / f"{source.stem}.{name}.json"
    return source / ANALYSIS_DIR / f"{name}.json"


def read_cache(path: Path, settings: dict) -> dict | None:
    """The cached result at ``path`` if it was computed with these settings, else None."""
    if not path.is_file():
        return None
    try:
        cached = json.loads(path.read_text())
    except ValueError:
        return None
    return cached if cached.get("settings_key") == settings_key(settings) else None


def cached(
    source: str | Path, name: str, settings: dict, compute: Callable[..., dict], *args, recompute: bool = False
) -> dict:
    """The result cached for ``source`` under ``name`` with these settings, else ``compute(*args)``, written to the
    cache first."""
    path = cache_path(source, name)
    found = None if recompute else read_cache(path, settings)
    return found or write_cache(path, settings, compute(*args))


def write_cache(path: Path, settings: dict, result: dict) -> dict:
    record = {"settings": settings, "settings_key": settings_key(settings), **result}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, record)
    return record


def file_digest(path: Path) -> str:
    return sha256_file(path)[:16]
