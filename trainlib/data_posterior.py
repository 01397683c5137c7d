"""The data posterior p_d(·|x') that direct SCORE trains against (``--posterior``), built once per run.

    posterior-net  p_φ(·|x', σ) of a trained ``scorenets.PosteriorNet`` (``train/train_posterior.py``): differentiable
                   in x', so the full-gradient loss D(p_d(·|x') ‖ p_θ(·|x')) is plain autograd through both networks,
                   one backward per attack step whatever K is; no anchor, no path state. The default.
                   ``--posterior-ensemble DIR...`` adds further nets: p_d is the mean of their probabilities
                   (a deep ensemble; M passes per call), wherever the posterior net is used (target or anchor).
    scorenet       the score-net trajectory posterior (``scorenets.ScoreNetPosterior.trajectory``): log p_σ(·|x')
                   integrated from an anchor at the clean x along the attack path, one UNet call over B·K inputs per
                   step. ``--anchor posterior-net`` (default) anchors at p_φ(·|x, σ), an estimate of p_σ(·|x);
                   ``--anchor label`` at the smoothed label (1 − α)·onehot(y) + α/K, an ablation: the target is then
                   softmax(log a(y) + log p_σ(x'|·) − log p_σ(x|·)), a function of (x, y, x') and not of x' alone.
    empirical      the exact smoothed posterior of the training split at σ (``datagrad.KernelMixture``, bandwidth σ):
                   exact and anchor-free, one [B, N] matrix product per call (small training sets).
    analytic       the exact p_d (σ = 0) of a dataset with a closed form (``gmm-*``, ``digits-mixture``).

σ is ``--noise-std`` ([0, 1] data units, std). ``posterior_provider`` returns ``(x, y) -> DataPosterior`` for the
objective (``trainlib.objectives.DirectScore``); the analyses call the same function, so they read p_d exactly as
training used it. ``ensure_default_nets`` trains the default digits score net and posterior net when the run asks
for them and they are missing (the mission's one-command job).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch

from .datasets import ImageDataset
from .objectives import PosteriorProvider, fixed_posterior
from .rundir import is_unfinished_run

POSTERIORS = ("posterior-net", "scorenet", "empirical", "analytic")
ANCHORS = ("posterior-net", "label")
DEFAULT_SCORENET = "runs/scorenet-digits"
DEFAULT_POSTERIOR_NET = "runs/posterior-digits"
DEFAULT_NOISE_STD = 0.2  # σ of the digits recipe ([0, 1] data units): about its ε
DEFAULT_ANCHOR_SMOOTHING = 1e-4  # the label anchor's α: anchor log-odds ln((1 − α + α/K)/(α/K)) = ln(99991) for K = 10


@dataclass(frozen=True)
class PosteriorSpec:
    """What ``posterior_provider`` needs; ``of(cfg)`` reads it from any config with these fields (a training config,
    an analysis's options)."""

    posterior: str
    noise_std: float
    posterior_net: str | None = None
    posterior_ensemble: tuple[str, ...] = ()
    scorenet: str | None = None
    anchor: str = "posterior-net"
    anchor_smoothing: float = 1e-4
    start_quadrature_points: int = 0

    @classmethod
    def of(cls, cfg) -> PosteriorSpec:
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls) if hasattr(cfg, f.name)})

    def describe(self) -> dict:
        """The settings that determine p_d (for caches and records)."""
        keys = ["posterior", "noise_std"]
        keys += ["posterior_net"] if needs_posterior_net(self.posterior, self.anchor) else []
        keys += ["posterior_ensemble"] if self.posterior_ensemble and "posterior_net" in keys else []
        keys += ["scorenet", "anchor"] if self.posterior == "scorenet" else []
        keys += ["anchor_smoothing"] if self.posterior == "scorenet" and self.anchor == "label" else []
        return {key: getattr(self, key) for key in keys}


def needs_posterior_net(posterior: str, anchor: str) -> bool:
    return posterior == "posterior-net" or (posterior == "scorenet" and anchor == "posterior-net")


def check_posterior_options(posterior: str, anchor: str, scorenet: str | None, posterior_net: str | None,
                            dataset: str, has_closed_form: bool, posterior_ensemble: tuple[str, ...] = ()) -> None:
    """One-line errors for an inconsistent choice (no files read)."""
    if posterior not in POSTERIORS:
        raise ValueError(f"unknown posterior {posterior!r}; valid: {', '.join(POSTERIORS)}")
    if anchor not in ANCHORS:
        raise ValueError(f"unknown anchor {anchor!r}; valid: {', '.join(ANCHORS)}")
    if posterior == "scorenet" and not scorenet:
        raise ValueError("posterior=scorenet needs --scorenet DIR (a saved ScoreNet)")
    if needs_posterior_net(posterior, anchor) and not posterior_net:
        raise ValueError(f"posterior={posterior} (anchor {anchor}) needs --posterior-net DIR (a saved PosteriorNet)")
    if posterior_ensemble and not needs_posterior_net(posterior, anchor):
        raise ValueError(f"--posterior-ensemble adds posterior nets, but posterior={posterior} (anchor {anchor}) uses "
                         "none")
    if posterior == "analytic" and not has_closed_form:
        raise ValueError(f"posterior=analytic needs a dataset with a closed-form posterior (gmm-*, digits-mixture), "
                         f"got {dataset!r}")


def posterior_provider(cfg, train_set: ImageDataset, device: torch.device, max_batch: int | None = None
                       ) -> PosteriorProvider:
    """(x, y) → p_d for a batch, as ``cfg`` asks (``PosteriorSpec``'s fields; module docstring). ``train_set``: the
    training split (empirical) or any split of the dataset (analytic). Loads the networks here (clear errors, no files
    written); ``max_batch`` caps the UNet inputs per score-net call."""
    from scorenets import PosteriorNetPosterior

    cfg = PosteriorSpec.of(cfg)
    num_classes, shape = train_set.num_classes, tuple(train_set.image_shape)
    if cfg.posterior == "analytic":
        if train_set.mixture is None:
            raise ValueError(f"{train_set.name} has no closed-form posterior (posterior=analytic)")
        return fixed_posterior(train_set.mixture)
    if cfg.posterior == "empirical":
        from datagrad import KernelMixture

        x, y = train_set.tensors(device)
        return fixed_posterior(KernelMixture(x, y, num_classes, bandwidth=cfg.noise_std))
    uses_net = needs_posterior_net(cfg.posterior, cfg.anchor)
    nets = load_posterior_nets(cfg, num_classes, shape, device) if uses_net else None
    if cfg.posterior == "posterior-net":
        return fixed_posterior(PosteriorNetPosterior(nets, cfg.noise_std))
    from .scorenet_training import load_scorenet

    scorenet = load_scorenet(cfg.scorenet, num_classes, device, expected_image_shape=shape)  # frozen, eval
    return trajectory_provider(scorenet, cfg.noise_std, anchor_net=nets, anchor_smoothing=cfg.anchor_smoothing,
                               start_quadrature_points=cfg.start_quadrature_points, max_batch=max_batch)


def trajectory_provider(scorenet, noise_std: float, *, anchor_net=None, anchor_smoothing: float = 1e-4,
                        start_quadrature_points: int = 0, max_batch: int | None = None) -> PosteriorProvider:
    """(x, y) → ``ScoreNetPosterior(scorenet, σ).trajectory`` anchored at the clean x: at p_φ(·|x, σ) of
    ``anchor_net`` (a ``PosteriorNet`` or a list of them, an ensemble), or, without one, at the smoothed label
    (1 − α)·onehot(y) + α/K. One score-net call at the anchor, then one per new point of the path (``max_batch`` caps
    the inputs per call)."""
    from scorenets import PosteriorNetPosterior, ScoreNetPosterior, anchor_log_probs

    source = ScoreNetPosterior(scorenet, noise_std, max_batch)
    if anchor_net is None:
        return lambda x, y: source.trajectory(
            x, anchor_log_probs(y, source.num_classes, anchor_smoothing), start_quadrature_points)
    anchor = PosteriorNetPosterior(anchor_net, noise_std)

    def provider(x, y):
        with torch.no_grad():
            return source.trajectory(x, anchor.log_posterior(x), start_quadrature_points)

    return provider


def load_posterior_nets(cfg: PosteriorSpec, num_classes: int, shape: tuple, device) -> list:
    """The posterior net and the ensemble's further nets, loaded and checked (classes, image shape, σ range)."""
    from .posterior_training import load_posterior_net

    nets = [load_posterior_net(path, num_classes, device, expected_image_shape=shape)
            for path in (cfg.posterior_net, *cfg.posterior_ensemble)]
    for net in nets:
        net.check_noise_std(cfg.noise_std)
    return nets


def ensure_default_nets(cfg, announce=print) -> None:
    """Train the default digits score net / posterior net first when ``cfg`` uses a default path that holds none.

    Only the defaults are trained (``DEFAULT_SCORENET``, ``DEFAULT_POSTERIOR_NET``, digits): any other missing path
    stays an error naming the command that makes it. Each is announced in one line and reused by later runs.
    """
    if cfg.objective != "direct-score" or cfg.dataset != "digits":
        return
    from . import posterior_training, scorenet_training
    from .accelerator import cores_per_process

    threads = cores_per_process()  # not the launcher's OMP_NUM_THREADS=1: both nets gain from every core
    uses_default = needs_posterior_net(cfg.posterior, cfg.anchor) and cfg.posterior_net == DEFAULT_POSTERIOR_NET
    posterior_net_missing = uses_default and not _saved(DEFAULT_POSTERIOR_NET, posterior_training.POSTERIOR_SUBDIR)
    wants_scorenet = cfg.scorenet == DEFAULT_SCORENET and (cfg.posterior == "scorenet" or posterior_net_missing)
    if wants_scorenet and not _saved(DEFAULT_SCORENET, scorenet_training.SCORENET_SUBDIR):
        announce(f"no score net at {DEFAULT_SCORENET}: training the default one first (train/train_scorenet.py)")
        scorenet_training.train(scorenet_training.ScoreNetConfig(
            out=DEFAULT_SCORENET, resume=_resume(DEFAULT_SCORENET), cpu_threads=threads))
    if posterior_net_missing:
        announce(f"no posterior net at {DEFAULT_POSTERIOR_NET}: training the default one first "
                 "(train/train_posterior.py)")
        posterior_training.train(posterior_training.PosteriorNetConfig(
            out=DEFAULT_POSTERIOR_NET, scorenet=DEFAULT_SCORENET, resume=_resume(DEFAULT_POSTERIOR_NET),
            cpu_threads=threads))


def _saved(run: str, subdir: str) -> bool:
    """Whether a finished network is saved in ``run``: its training run wrote results.json or, where ``run`` holds no
    training run (a folder put there by hand), ``subdir`` holds a saved network. A run interrupted after a checkpoint
    holds an intermediate EMA network and no results.json: it is resumed, not reused."""
    if (Path(run) / "config.json").is_file():
        return not is_unfinished_run(run)
    return any((Path(run) / subdir).glob("*config.json"))


def _resume(run: str) -> str:
    """Continue an interrupted default run rather than refuse its directory."""
    return "latest" if (Path(run) / "config.json").is_file() else "none"
