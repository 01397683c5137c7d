"""Theorem 5 on trained classifiers: the noise-derivative of the Gaussian-augmented risk against gradient alignment.

    python -m analysis.smoothing runs/digits-standard runs/digits-trades-se --scorenet runs/scorenet-digits
    python -m analysis.smoothing runs/gmm-run --sigmas 0.1 0.2            # a gmm-* toy: exact class scores

σ is the noise STANDARD DEVIATION in [0, 1] data units (x = x0 + σn); s = σ² is the variance. For each σ in
``--sigmas`` and each run, on all test points x0 (``--n-points`` first ones) with ``--n-noise`` noise draws each
(the same draws for every run and, scaled, for every σ), ``datagrad.smoothing`` estimates

    R_G(θ; σ) = E[−log p_θ(y | x0 + σn)]
    dR_G/dσ  by the central finite difference with common random numbers (h = ``--fd-step`` × σ),
             by the score side σ·E[∇_x log p_θ(y|x)ᵀ ∇_x log p^σ(x|y)] (Theorem 5 in the std convention), and
             by the pathwise derivative −E[∇_x log p_θ(y|x)·n] (no score; equal in expectation by Tweedie),
    dR_G/ds = dR_G/dσ / (2σ) = ½·E[∇_x log p_θ(y|x)ᵀ ∇_x log p^σ(x|y)]  (Theorem 5 as printed, s = variance),

each as mean ± standard error with a 95 % interval, plus the paired score − finite-difference difference and the
relative error. The class score ∇_x log p^σ(x|y) is exact for gmm-* toys and the score net's label score for images
(trained by denoising score matching on unclamped x0 + σn, the same convolution); the noisy points are NOT clamped
to [0, 1]. On a mixture the three estimates agree (tests: within 2 %); on images the score − pathwise gap measures
the score net's error at σ (Tweedie), while finite difference vs pathwise only differ by Monte-Carlo noise.

Writes ``<run>/analysis/theorem5.json`` (cached per settings) and ``<out>/theorem5.png`` (both sides against σ with
95 % intervals, and their paired relative difference, per run) and prints a table.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from datagrad import gaussian_risk_samples, smoothing_estimates
from datagrad.seeding import seeded_generator
from scorenets import check_noise_std
from trainlib.cli import run_cli
from trainlib.config import config_to_dict, option, parse_config

from . import sources
from .markdown import markdown_table

RESULT_NAME = "theorem5"


@dataclass
class SmoothingConfig(sources.ReadoutOptions):
    """Theorem 5 (derivative of the Gaussian-augmented risk vs gradient alignment) on trained classifiers."""

    which: Literal["final", "best"] = option("the run's final EMA weights or best/ (by validation)", "final")
    sigmas: tuple[float, ...] = option("noise stds sigma ([0, 1] data units; variance = sigma^2)",
                                       (0.05, 0.1, 0.2, 0.3, 0.5))
    n_points: int | None = option("first n test points x0 (none: all)", 1000)
    n_noise: int = option("noise draws per test point", 8)
    fd_step: float = option("finite-difference step h as a fraction of sigma", 0.01)
    seed: int = option("seed of the noise draws", 0)
    batch_size: int = option("classifier batch size (per-sample values: the batching does not change them)", 1024)
    float64: bool = option("compute in float64 (the classifier is cast; the score net runs in its own dtype)", True)
    out: str = option("directory of the combined figure", "runs/analysis")

    def validate(self) -> None:
        super().validate()
        if not self.sigmas:
            raise ValueError("give at least one noise std (--sigmas)")
        for sigma in self.sigmas:
            check_noise_std(sigma)
        if (self.n_points is not None and self.n_points < 1) or self.n_noise < 1 or self.batch_size < 1:
            raise ValueError("n_points, n_noise and batch_size must be >= 1")
        if not 0 < self.fd_step < 1:
            raise ValueError(f"fd_step must be in (0, 1) (a fraction of sigma), got {self.fd_step}")


class NoisyPoints:
    """x0, y and standard-normal noise for a dataset, drawn once; the class scores at x0 + σn cached per σ (they do
    not depend on the classifier, so every run reuses them)."""

    def __init__(self, classifier: sources.Classifier, data: sources.DataSource, cfg: SmoothingConfig, dtype):
        n = len(classifier.test) if cfg.n_points is None else cfg.n_points
        x0, y = sources.test_points(classifier.test, n, dtype)
        self.x0, self.y = x0.repeat_interleave(cfg.n_noise, 0), y.repeat_interleave(cfg.n_noise, 0)
        generator = seeded_generator(cfg.seed, device=x0.device)
        self.noise = torch.randn(self.x0.shape, generator=generator, device=x0.device, dtype=dtype)
        self.data, self._scores = data, {}

    def class_scores(self, sigma: float) -> torch.Tensor:
        """∇_x log p^σ(x|y) at x = x0 + σn for every sample (computed once per σ)."""
        if sigma not in self._scores:
            with torch.no_grad():
                self._scores[sigma] = self.data.class_score(sigma)(self.x0 + sigma * self.noise, self.y)
        return self._scores[sigma]


def analyse(classifier: sources.Classifier, points: NoisyPoints, cfg: SmoothingConfig) -> dict:
    per_sigma = []
    for sigma in cfg.sigmas:
        scores, chunks = points.class_scores(sigma), []
        for rows in torch.arange(len(points.y)).split(cfg.batch_size):  # per-sample values: batches are independent
            chunks.append(gaussian_risk_samples(classifier.model, points.x0[rows], points.y[rows], points.noise[rows],
                                                sigma, lambda x, y, r=rows, s=scores: s[r], cfg.fd_step * sigma))
        samples = {name: torch.cat([chunk[name] for chunk in chunks]) for name in chunks[0]}
        per_sigma.append(smoothing_estimates(samples, sigma))
    return {
        "run": str(classifier.source),
        "objective": classifier.settings.get("objective"),
        "n_samples": len(points.y),
        "conventions": "sigma = noise standard deviation in [0,1] data units, variance = sigma^2; d_risk_d_std = "
                       "dR_G/dsigma = sigma*E[grad log p_theta . grad log p^sigma(x|y)]; d_risk_d_var = "
                       "dR_G/d(sigma^2) = 0.5*E[...] (the paper's form); noisy points not clamped",
        "results": per_sigma,
    }


def run_analysis(cfg: SmoothingConfig, recompute: bool = False) -> list[dict]:
    dtype = torch.float64 if cfg.float64 else torch.float32

    def check(classifier, data):
        if data.scorenet is not None:
            for sigma in cfg.sigmas:
                data.scorenet.schedule.sigma_to_t(sigma)  # outside the trained range: a clear error now

    records, points = [], {}
    for classifier, data in tqdm(sources.open_all(cfg, cfg.which, dtype, check), desc="Theorem 5",
                                 disable=len(cfg.runs) < 2):
        if id(data) not in points:  # one set of noisy points per dataset
            points[id(data)] = NoisyPoints(classifier, data, cfg, dtype)
        run_points = points[id(data)]
        keep = ("which", "sigmas", "n_points", "n_noise", "fd_step", "seed", "float64")
        settings = {k: v for k, v in config_to_dict(cfg).items() if k in keep}
        settings["class_score"] = "exact mixture" if data.mixture is not None else str(cfg.scorenet)
        records.append(sources.cached(classifier.source, RESULT_NAME, settings, analyse, classifier, run_points, cfg,
                                      recompute=recompute))
    return records


def format_table(records: list[dict]) -> str:
    """Markdown: per run and σ, dR_G/dσ by the three estimators (± standard error) and dR_G/ds from the score side."""
    header = ["run", "σ (std)", "R_G", "dR_G/dσ finite diff.", "dR_G/dσ score side", "dR_G/dσ pathwise", "rel. error",
              "0 in 95 % CI of score − FD", "dR_G/ds score side (s = σ²)"]
    rows = []
    for r in records:
        for e in r["results"]:
            cell = lambda name, d=e["d_risk_d_std"]: f"{d[name]['mean']:.4g} ± {d[name]['stderr']:.2g}"
            rows.append([Path(r["run"]).name, f"{e['sigma']:g}", f"{e['risk']['mean']:.4f}", cell("finite_difference"),
                         cell("score"), cell("pathwise"), f"{e['relative_error']:.3f}",
                         "yes" if e["agree_within_interval"] else "no", f"{e['d_risk_d_var']['score']['mean']:.4g}"])
    return markdown_table(header, rows) + "\n"


def plot_derivatives(path: Path, records: list[dict]) -> Path:
    """Left: dR_G/dσ against σ per run (score side: line and squares, finite difference: circles, 95 % intervals).
    Right: the paired relative difference (score side − finite difference)/|finite difference| with its interval."""
    from matplotlib.lines import Line2D

    from .plotting import PALETTE, plt, save_figure, style

    with style():
        figure, (values, relative) = plt.subplots(1, 2, figsize=(11, 4.5), layout="constrained")
        spread = 0.03 * (len(records) - 1)
        for index, r in enumerate(records):
            color, name = PALETTE[index % len(PALETTE)], Path(r["run"]).name
            shift = 1 + (index * 0.03 - spread / 2 if len(records) > 1 else 0.0)  # side by side on the log axis
            sigmas = [e["sigma"] * shift for e in r["results"]]
            for estimator, marker, line in (("finite_difference", "o", "none"), ("score", "s", "-")):
                values.errorbar(sigmas, [e["d_risk_d_std"][estimator]["mean"] for e in r["results"]],
                                yerr=[1.96 * e["d_risk_d_std"][estimator]["stderr"] for e in r["results"]],
                                color=color, marker=marker, ls=line, capsize=2, ms=4,
                                label=name if estimator == "score" else None)
            paired = [e["paired_d_risk_d_std"]["score_minus_finite_difference"] for e in r["results"]]
            scale = [max(abs(e["d_risk_d_std"]["finite_difference"]["mean"]), 1e-300) for e in r["results"]]
            relative.errorbar(sigmas, [100 * p["mean"] / s for p, s in zip(paired, scale, strict=True)],
                              yerr=[100 * 1.96 * p["stderr"] / s for p, s in zip(paired, scale, strict=True)],
                              color=color, marker="s", ls="-", capsize=2, ms=4, label=name)
        ticks = sorted({e["sigma"] for r in records for e in r["results"]})
        for axes in (values, relative):
            axes.set_xscale("log")
            axes.set_xticks(ticks, labels=[f"{t:g}" for t in ticks])
            axes.minorticks_off()
            axes.set_xlabel("σ (noise standard deviation, [0, 1] pixel units)")
        values.set(ylabel="dR_G/dσ (nats per unit σ)", title="Theorem 5: both sides against σ")
        handles = values.get_legend_handles_labels()[0] + [
            Line2D([], [], color="gray", marker="o", ls="none", label="finite difference of R_G"),
            Line2D([], [], color="gray", marker="s", ls="-", label="score side σ·E[∇log p_θ·∇log p^σ(x|y)]")]
        values.legend(handles=handles, fontsize=8)
        relative.axhspan(-2, 2, color="gray", alpha=0.15, label="±2 %")
        relative.axhline(0, color="gray", lw=0.8)
        relative.set(ylabel="(score side − finite difference) / |finite difference| (%)",
                     title="paired difference with 95 % interval")
        relative.legend(fontsize=8)
        return save_figure(figure, path)


def main(argv: list[str] | None = None) -> list[dict]:
    cfg = parse_config(SmoothingConfig, argv, prog="python -m analysis.smoothing")
    records = run_analysis(cfg)
    figure = plot_derivatives(Path(cfg.out) / f"{RESULT_NAME}.png", records)
    print(format_table(records))
    print(f"wrote {figure} and <run>/analysis/{RESULT_NAME}.json")
    return records


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
