"""Theorem 4 on trained classifiers: gradient alignment with the data and the first-order expansion of R_SCORE^ℓ1.

    python -m analysis.alignment runs/digits-standard runs/digits-trades-se --scorenet runs/scorenet-digits
    python -m analysis.alignment runs/gmm-run                                 # a gmm-* toy: the exact posterior

For each run (final EMA weights, or ``--which best``) on the first ``--n-points`` test points, with the data
posterior of ``analysis.sources`` (exact for gmm-* toys, else the score net as direct SCORE training uses it) and
the run's threat model (ℓ∞ → dual norm q = 1, ℓ2 → q = 2; ``datagrad.alignment``):

terms      A = E||∇_x p_d(Y|x) − ∇_x p_θ(Y|x)||_q (Theorem 4's alignment term, Y = argmax_y p_d(y|x)), the general
           first-order coefficient E||Σ_k sign(f_k)∇f_k||_q (f = p_d − p_θ), the fraction of points meeting the sign
           condition under which both agree (A's factor 2 is exact), the mean cosine between ∇_x log p_θ(Y|x) and
           ∇_x log p_d(Y|x), the gradient norms, and R_Std^ℓ1.
expansion  for ε in ``--eps-scales`` × the run's ε: R_SCORE^ℓ1(ε) by PGD on the full-gradient ℓ1 SCORE loss
           (``--pgd-steps`` steps of ε/4 from x, no random start, best iterate kept), the predictions R_Std^ℓ1 + 2εA and
           R_Std^ℓ1 + ε·(general coefficient), their gaps, gap/ε and the fitted log-log slope (≈ 2 when the maximizer
           is exact: the remainder is O(ε²)). The ball is NOT intersected with [0, 1] unless ``--clamp``: the
           expansion is about the ε-ball (on digits many pixels sit at 0 and 1, where the box would cut it).

With the score-net posterior the anchor is confident, so ∇_x p_d(Y|x) at the clean point is tiny and A is mostly
||∇_x p_θ(Y|x)||_q; the cosine measures the direction. PGD under-solves the inner max, which shows as a gap that
stops shrinking at small ε (shortfall ≫ ε²); on the exact mixtures of the tests the slope is 2.

Writes ``<run>/analysis/theorem4.json`` (cached: re-running with the same settings reads it) and
``<out>/theorem4.png`` (gap and gap/ε against ε, every run) and prints a table.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from datagrad import PGD, alignment_terms, dual_exponent, expansion_check
from trainlib.cli import run_cli
from trainlib.config import config_to_dict, option, parse_config

from . import sources
from .markdown import markdown_table

RESULT_NAME = "theorem4"


@dataclass
class AlignmentConfig(sources.PosteriorOptions):
    """Theorem 4 (gradient alignment and the first-order expansion of R_SCORE^l1) on trained classifiers."""

    which: Literal["final", "best"] = option("the run's final EMA weights or best/ (by validation)", "final")
    n_points: int = option("first n test points", 100)
    eps_scales: tuple[float, ...] = option("radii of the expansion check, as multiples of the run's eps",
                                           (1.0, 0.5, 0.25, 0.125))
    pgd_steps: int = option("PGD steps (step eps/4, from x, best iterate; deterministic) of the R_SCORE^l1 attack", 10)
    clamp: bool = option("intersect the ball with [0, 1] (off: the expansion is about the ball itself)", False)
    float64: bool = option("compute in float64 (the classifier is cast; the score net runs in its own dtype)", True)
    out: str = option("directory of the combined figure", "runs/analysis")

    def validate(self) -> None:
        super().validate()
        if self.n_points < 1 or self.pgd_steps < 1:
            raise ValueError("n_points and pgd_steps must be >= 1")
        if not self.eps_scales or any(not s > 0 for s in self.eps_scales):
            raise ValueError(f"eps_scales must be positive, got {list(self.eps_scales)}")

    def settings(self, classifier: sources.Classifier, data: sources.DataSource) -> dict:
        keep = ("which", "n_points", "eps_scales", "pgd_steps", "clamp", "float64")
        return {**{k: v for k, v in config_to_dict(self).items() if k in keep}, "posterior": data.description,
                "norm": classifier.settings["norm"], "eps": classifier.settings["eps"]}


def analyse(classifier: sources.Classifier, data: sources.DataSource, cfg: AlignmentConfig) -> dict:
    """Theorem 4's terms and expansion check for one classifier (module docstring)."""
    data.check(classifier)
    dtype = torch.float64 if cfg.float64 else torch.float32
    x, y = sources.test_points(classifier.test, cfg.n_points, dtype)
    norm, eps = classifier.settings["norm"], float(classifier.settings["eps"])
    model = classifier.model
    terms = alignment_terms(model, x, data.posterior(x, y), norm)
    clamp = (0.0, 1.0) if cfg.clamp else None
    maximizer = lambda radius: PGD(radius, radius / 4, cfg.pgd_steps, norm, random_start=False, clamp=clamp)
    eps_values = [eps * scale for scale in cfg.eps_scales]
    expansion = expansion_check(model, x, lambda: data.posterior(x, y), maximizer, eps_values, norm)
    return {
        "run": str(classifier.source),
        "objective": classifier.settings.get("objective"),
        "n_points": len(y),
        "dual_norm_q": dual_exponent(norm),
        "label_agreement": float((terms.label == y).double().mean()),  # Y_d(x) = y for the anchored score net
        "terms": terms.summary(),
        "expansion": expansion,
    }


def run_analysis(cfg: AlignmentConfig, recompute: bool = False) -> list[dict]:
    """Analyse every run (cached per run); returns the records."""
    opened = sources.open_all(cfg, cfg.which, torch.float64 if cfg.float64 else torch.float32)
    records = []
    for classifier, data in tqdm(opened, desc="Theorem 4", disable=len(opened) < 2):
        settings = cfg.settings(classifier, data)
        records.append(sources.cached(classifier.source, RESULT_NAME, settings, analyse, classifier, data, cfg,
                                      recompute=recompute))
    return records


def format_table(records: list[dict]) -> str:
    """Markdown: per run the alignment terms and the expansion slope."""
    header = ["run", "objective", "A = E‖∇p_d − ∇p_θ‖_q", "general coeff.", "sign cond.", "cos(∇log p_θ, ∇log p_d)",
              "E‖∇p_θ‖_q", "E‖∇p_d‖_q", "R_Std^ℓ1", "gap slope (2εA)", "gap slope (general)"]
    rows = []
    for r in records:
        t, e = r["terms"], r["expansion"]
        rows.append([Path(r["run"]).name, r["objective"], f"{t['alignment']:.4f}", f"{t['general']:.4f}",
                     f"{t['sign_condition']:.2f}", f"{t['cosine']:.3f}", f"{t['model_grad_norm']:.4f}",
                     f"{t['data_grad_norm']:.2e}", f"{t['standard_l1']:.4f}", f"{e['slope']:.2f}",
                     f"{e['slope_general']:.2f}"])
    return markdown_table(header, rows) + "\n"


def plot_expansion(path: Path, records: list[dict]) -> Path:
    """Left: gap(ε) = |R_SCORE^ℓ1 − R_Std^ℓ1 − 2εA| (solid) and the gap with the general coefficient (dashed) against
    ε, log-log, one colour per run, with slope-1 and slope-2 guides. Right: gap/ε, which → 0 when the gap is o(ε)."""
    from .plotting import PALETTE, plt, save_figure, style

    with style():
        figure, (gaps, ratios) = plt.subplots(1, 2, figsize=(11, 4.5), layout="constrained")
        eps_all, top = [], 0.0
        for index, r in enumerate(records):
            color, points = PALETTE[index % len(PALETTE)], r["expansion"]["points"]
            eps = [p["eps"] for p in points]
            eps_all += eps
            top = max(top, *(p["gap"] for p in points))
            gaps.plot(eps, [max(p["gap"], 1e-12) for p in points], "o-", color=color,
                      label=f"{Path(r['run']).name} (slope {r['expansion']['slope']:.2f})")
            gaps.plot(eps, [max(p["gap_general"], 1e-12) for p in points], "x--", color=color, lw=1)
            ratios.plot(eps, [p["gap_over_eps"] for p in points], "o-", color=color, label=Path(r["run"]).name)
        low, high = min(eps_all), max(eps_all)
        for power, line in ((1, ":"), (2, "-.")):
            gaps.plot([low, high], [top * (low / high) ** power, top], color="gray", ls=line, lw=1,
                      label=f"slope {power}")
        ticks = sorted(set(eps_all))
        for axes in (gaps, ratios):
            axes.set_xscale("log")
            axes.set_xticks(ticks, labels=[f"{t:.3g}" for t in ticks])
            axes.minorticks_off()
            axes.set_xlabel("ε (threat radius, [0, 1] pixel units)")
        gaps.set(yscale="log", ylabel="gap |R_SCORE^ℓ1(ε) − R_Std^ℓ1 − 2εA| (ℓ1, unitless)",
                 title="Theorem 4: expansion gap (dashed: general coefficient)")
        ratios.set(ylabel="gap / ε (ℓ1 per unit ε)", title="gap/ε → 0 when the gap is o(ε)")
        gaps.legend(fontsize=8)
        ratios.legend(fontsize=8)
        return save_figure(figure, path)


def main(argv: list[str] | None = None) -> list[dict]:
    cfg = parse_config(AlignmentConfig, argv, prog="python -m analysis.alignment")
    records = run_analysis(cfg)
    out = Path(cfg.out)
    figure = plot_expansion(out / f"{RESULT_NAME}.png", records)
    print(format_table(records))
    for r in records:
        print(f"{Path(r['run']).name}: " + ", ".join(
            f"eps {p['eps']:.4g}: R_SCORE^l1 {p['score_l1']:.4f} vs {p['predicted']:.4f} "
            f"(gap/eps {p['gap_over_eps']:.4f})"
            for p in r["expansion"]["points"]))
    print(f"wrote {figure} and <run>/analysis/{RESULT_NAME}.json")
    return records


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
