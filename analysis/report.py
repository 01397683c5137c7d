"""One report from run directories: accuracy comparison, Theorem 4 and 5 tables, training dynamics, saliency.

    python -m analysis.report runs/digits-standard runs/digits-pgd-at runs/digits-trades-kl runs/digits-trades-se \\
        runs/digits-direct-score --scorenet runs/scorenet-digits --out runs/report [--check-browser]

Nothing is retrained. Per run the report reads ``results.json`` (the final test evaluation) and, when present,
``eval/robustbench.json`` (``train/evaluate.py``: AutoAttack), and the cached analyses ``<run>/analysis/theorem4.json``
(``analysis.alignment``), ``theorem5.json`` (``analysis.smoothing``) and ``dynamics.json`` (``analysis.dynamics``,
runs with snapshots only). A missing analysis is computed here from the saved weights with that command's default
settings (progress bars; ``--no-compute`` leaves it out instead); an existing one is used as it is, with the settings
it records. The saliency figure is computed from the final weights (one data-gradient evaluation).

Outputs in ``--out``: ``report.html`` and ``report.md`` (the same tables, figures and captions), ``figures/*.png``
(relative links: the page opens offline, no scripts or styles are fetched) and ``report.json`` (every number shown).
All text is HTML-escaped. The page's one inline script records, after loading, how many images loaded
(``data-images`` / ``data-images-loaded`` on <body>) and shows a warning if any failed; ``--check-browser`` renders
the page in headless Chromium (Debian's ``chromium``) and fails unless it rendered and every image loaded.
"""

from __future__ import annotations

import datetime
import html
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from trainlib.cli import checking_input, run_cli
from trainlib.config import option, parse_config, positional
from trainlib.files import atomic_write_json, atomic_write_text
from trainlib.rundir import git_revision

from . import alignment, dynamics, saliency, smoothing, sources
from .markdown import markdown_table

FIGURES_DIR = "figures"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
ROBUST_OBJECTIVES = ("pgd-at", "trades-kl", "trades-se", "pgd-at-se", "direct-score")
SAME_RELATIVE, SAME_COSINE = 0.05, 0.02  # findings call alignment terms within 5 % / cosines within 0.02 "about equal"


@dataclass
class ReportConfig(sources.ReadoutOptions):
    """Build report.html / report.md from run directories (no retraining)."""

    runs: tuple[str, ...] = positional("training run directories", ())
    out: str = option("output directory (report.html, report.md, figures/)", "runs/report")
    compute: bool = option("compute missing analyses from the saved weights (default settings)", True)
    n_images: int = option("saliency: first n test images", 6)
    check_browser: bool = option("render report.html in headless Chromium and check that every image loads", False)

    def validate(self) -> None:
        super().validate()
        if self.n_images < 1:
            raise ValueError(f"n_images must be >= 1, got {self.n_images}")


# -- gathering ---------------------------------------------------------------------------------------------------------
def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def run_info(run: Path) -> dict:
    """Config, final test record and (if evaluated) the eval/ record of one run."""
    config = json.loads((run / "config.json").read_text())
    results = read_json(run / "results.json")
    if results is None:
        raise ValueError(f"{run} has no results.json: the run has not finished (resume it with --resume latest)")
    evaluation = read_json(run / "eval" / "robustbench.json")
    return {"run": str(run), "name": run.name, "config": config["config"], "git_revision": config["run"].get(
        "git_revision"), "test": results["test"], "eval": evaluation, "best_val": results.get("best_val")}


def gather(cfg: ReportConfig, runs: list[Path]) -> dict[str, list[dict]]:
    """The cached analyses of every run; missing ones computed (``cfg.compute``) with each command's defaults."""
    common = dict(scorenet=cfg.scorenet, data_dir=cfg.data_dir)
    with_snapshots = [r for r in runs if dynamics.list_snapshots(r)]
    jobs = (
        (alignment.RESULT_NAME, runs, lambda rs: alignment.run_analysis(alignment.AlignmentConfig(runs=rs, **common))),
        (smoothing.RESULT_NAME, runs, lambda rs: smoothing.run_analysis(smoothing.SmoothingConfig(runs=rs, **common))),
        (dynamics.RESULT_NAME, with_snapshots,
         lambda rs: dynamics.run_analysis(dynamics.DynamicsConfig(runs=rs, **common))),
    )
    found = {}
    for name, candidates, compute in jobs:
        missing = tuple(str(r) for r in candidates if not sources.cache_path(r, name).is_file())
        if missing and cfg.compute:
            print(f"computing {name} for {', '.join(Path(r).name for r in missing)}")
            compute(missing)
        found[name] = [read_json(sources.cache_path(r, name)) for r in candidates]
        found[name] = [record for record in found[name] if record is not None]
    return found


# -- findings -------------------------------------------------------------------------------------------------------
def _percent(record: dict | None, key: str) -> float | None:
    value = None if record is None else record.get(key)
    return None if value is None else float(value)


def accuracy_row(info: dict) -> dict:
    """Clean / PGD-40 CE / PGD-40 CW / AutoAttack (%): the eval/ record where it exists, else the final test record."""
    record = info["eval"] or info["test"]
    return {"clean": _percent(record, "clean_acc"), "pgd_ce": _percent(record, "pgd_ce_acc"),
            "pgd_cw": _percent(record, "pgd_cw_acc"), "autoattack": _percent(record, "autoattack_acc"),
            "n": record.get("n_examples"), "eps": record.get("eps"), "threat": record.get("threat_model"),
            "source": "eval/robustbench.json" if info["eval"] else "results.json",
            "sanity": record.get("sanity_passed")}


def findings(infos: list[dict], analyses: dict[str, list[dict]]) -> list[str]:
    """Plain statements computed from the numbers: alignment of robust objectives vs standard training, and direct
    SCORE vs the SE upper bound (TRADES-SE), whichever way they come out."""
    by_objective = {info["config"].get("objective"): info for info in infos}
    theorem4 = {r.get("objective"): r for r in analyses.get(alignment.RESULT_NAME, [])}
    lines = []
    standard = theorem4.get("standard")
    if standard is not None:
        base_a, base_cos = standard["terms"]["alignment"], standard["terms"]["cosine"]
        for objective in ROBUST_OBJECTIVES:
            if objective not in theorem4:
                continue
            a, cos = theorem4[objective]["terms"]["alignment"], theorem4[objective]["terms"]["cosine"]
            verdict_a = ("about equal" if abs(a - base_a) < SAME_RELATIVE * base_a
                         else "smaller (better aligned)" if a < base_a else "larger (worse aligned)")
            verdict_cos = ("about equal" if abs(cos - base_cos) < SAME_COSINE
                           else "higher (better aligned)" if cos > base_cos else "lower (worse aligned)")
            lines.append(f"{objective} vs standard: A = {a:.4g} vs {base_a:.4g}, {verdict_a}; cosine {cos:.3f} vs "
                         f"{base_cos:.3f}, {verdict_cos}.")
    if "direct-score" in by_objective and "trades-se" in by_objective:
        direct, se = accuracy_row(by_objective["direct-score"]), accuracy_row(by_objective["trades-se"])
        metric = "autoattack" if direct["autoattack"] is not None and se["autoattack"] is not None else "pgd_cw"
        label = "AutoAttack" if metric == "autoattack" else "PGD-40 CW"
        comparison = (f"direct SCORE vs TRADES-SE (the SE upper bound): clean {direct['clean']:.2f} vs "
                      f"{se['clean']:.2f} %, {label} {direct[metric]:.2f} vs {se[metric]:.2f} %")
        if "direct-score" in theorem4 and "trades-se" in theorem4:
            d, s = theorem4["direct-score"]["terms"], theorem4["trades-se"]["terms"]
            comparison += (f"; A {d['alignment']:.4g} vs {s['alignment']:.4g}, cosine {d['cosine']:.3f} vs "
                           f"{s['cosine']:.3f}")
        dyn = {r.get("objective"): r for r in analyses.get(dynamics.RESULT_NAME, [])}
        if "direct-score" in dyn and "trades-se" in dyn:
            d, s = dyn["direct-score"]["epochs"][-1], dyn["trades-se"]["epochs"][-1]
            comparison += (f"; estimated R_SCORE^ℓ1 at the last epoch {d['score_l1']:.4f} vs {s['score_l1']:.4f} "
                           "(lower is better)")
        better = "more" if direct[metric] > se[metric] else "less"
        lines.append(comparison + f". Direct SCORE is {better} robust than the upper-bound method here.")
    return lines


# -- figures -------------------------------------------------------------------------------------------------------
@dataclass
class Figure:
    file: str  # relative to the report directory
    title: str
    caption: str


CAPTIONS = {
    "theorem4": (
        "Left: the gap between R_SCORE^ℓ1(ε), measured by PGD on the first test points, and the first-order "
        "prediction R_Std^ℓ1 + 2ε·A (solid; dashed: with the general coefficient E‖Σ_k sign(f_k)∇f_k‖_q instead of "
        "2A), against the threat radius ε (log-log; ε in [0, 1] pixel units, the gap in ℓ1 units between probability "
        "vectors), with guides of slopes 1 and 2. Right: gap/ε. The theorem predicts gap = o(ε): a slope above 1 and "
        "gap/ε falling to 0 (slope 2 for smooth models and an exact maximizer). A flat tail at small ε would be the "
        "attack's shortfall or the sign condition failing (see the table)."
    ),
    "theorem5": (
        "Left: dR_G/dσ of the Gaussian-augmented risk R_G(θ; σ) = E[−log p_θ(y|x0 + σn)] (nats per unit of σ, the "
        "noise standard deviation in [0, 1] pixel units) against σ, per run: the finite difference of R_G with common"
        " random numbers (circles) and the score side σ·E[∇log p_θ(y|x)·∇log p^σ(x|y)] (squares, line), with 95 % "
        "intervals. Right: their paired difference relative to the finite difference (%), with its 95 % interval; "
        "grey band ±2 %. In the variance convention s = σ², dR_G/ds = (dR_G/dσ)/(2σ) = ½·E[…] (the table)."
    ),
    "dynamics": (
        "{name} ({objective}) over epochs, from the per-epoch EMA snapshots. Top left: validation clean and PGD-40 CW "
        "accuracy (%, every epoch) and clean accuracy on the analysed test points. Top right: estimated R_SCORE (PGD, "
        "data posterior as in direct SCORE) and R_Std^ℓ1 with the model-free C^ℓ1 (ℓ1 in [0, 2], KL in nats). Bottom "
        "left: Madry's KL error (nats, log scale) against Corollary 1's floor (C^ℓ1)²/2: a model that reaches "
        "R_SCORE^ℓ1 = 0 cannot go below it, so driving Madry's KL error below the floor signals overfitting (the "
        "early-stopping explanation). Bottom right: the alignment term A (left axis) and the cosine between model and "
        "data gradients (right axis)."
    ),
    "alignment_vs_robustness": (
        "Validation PGD-40 CW accuracy (%) against the alignment term A (left; probability per pixel unit, q-norm dual "
        "to the threat) and against cos(∇log p_θ, ∇log p_d) (right), one trajectory per objective over the analysed "
        "epochs; the star marks the last epoch."
    ),
    "saliency": (
        "For the first test images: the image, the data gradient ∇_x log p_d(y|x) ({kind}) and each model's input "
        "gradient ∇_x log p_θ(y|x), summed over colour channels and each scaled to its own max |value| (diverging "
        "colormap symmetric around 0; red raises log p(y|x)). Panel titles: cosine with the data gradient."
    ),
}


def make_figures(out: Path, cfg: ReportConfig, runs: list[Path], analyses: dict[str, list[dict]]) -> list[Figure]:
    """Every figure into ``out/figures`` from the gathered analyses (saliency from the final weights)."""
    directory, figures = out / FIGURES_DIR, []

    def add(file: str, title: str, caption: str) -> None:
        figures.append(Figure(f"{FIGURES_DIR}/{file}", title, caption))

    if analyses.get(alignment.RESULT_NAME):
        alignment.plot_expansion(directory / "theorem4_expansion.png", analyses[alignment.RESULT_NAME])
        add("theorem4_expansion.png", "Theorem 4: expansion gap", CAPTIONS["theorem4"])
    if analyses.get(smoothing.RESULT_NAME):
        smoothing.plot_derivatives(directory / "theorem5_derivative.png", analyses[smoothing.RESULT_NAME])
        add("theorem5_derivative.png", "Theorem 5: noise derivative of R_G", CAPTIONS["theorem5"])
    for index, record in enumerate(analyses.get(dynamics.RESULT_NAME, [])):
        name = Path(record["run"]).name
        file = f"dynamics_{index}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.png"  # a plain file name for any run name
        dynamics.plot_run(directory / file, record)
        add(file, f"Training dynamics: {name}", CAPTIONS["dynamics"].format(name=name, objective=record["objective"]))
    if analyses.get(dynamics.RESULT_NAME):
        dynamics.plot_alignment_vs_robustness(directory / "alignment_vs_robustness.png", analyses[dynamics.RESULT_NAME])
        add("alignment_vs_robustness.png", "Alignment against robustness", CAPTIONS["alignment_vs_robustness"])
    result = saliency.compute(saliency.SaliencyConfig(runs=tuple(str(r) for r in runs), scorenet=cfg.scorenet,
                                                      n_images=cfg.n_images, data_dir=cfg.data_dir))
    saliency.plot_saliency(directory / "saliency.png", result)
    add("saliency.png", "Saliency: model and data gradients",
        CAPTIONS["saliency"].format(kind=result["data_description"]["kind"]))
    return figures


# -- tables ------------------------------------------------------------------------------------------------------------
TABLE_CAPTIONS = {
    "accuracy": (
        "Accuracy (%) of the final EMA weights on the first n test points; AutoAttack where train/evaluate.py was run "
        "(eval/robustbench.json), else the training run's final evaluation."
    ),
    "theorem4": (
        "Means over the first test points at the clean x. A = E‖∇_x p_d(Y|x) − ∇_x p_θ(Y|x)‖_q (q dual to the threat "
        "norm: 1 for ℓ∞), the general first-order coefficient E‖Σ_k sign(f_k)∇f_k‖_q (f = p_d − p_θ), the fraction of "
        "points meeting the sign condition under which it equals 2A, the cosine between ∇log p_θ(Y|x) and "
        "∇log p_d(Y|x), both gradient norms, R_Std^ℓ1, gap/ε at ε = {eps} and the log-log slopes of the gap with 2εA "
        "and with the general coefficient. Smaller A and larger cosine mean better alignment. With the score-net "
        "posterior the clean anchor is confident, so ‖∇p_d(Y|x)‖ is small there and A mostly measures ‖∇p_θ(Y|x)‖ "
        "when the model is less confident than the anchor."
    ),
    "theorem5": (
        "σ is the noise standard deviation in [0, 1] pixel units (variance s = σ²); noisy points are not clamped. "
        "dR_G/dσ (nats per unit σ) by the finite difference of R_G with common random numbers, by the score side "
        "σ·E[∇log p_θ(y|x)·∇log p^σ(x|y)] (class score exact for mixtures, from the score net for images) and by the "
        "pathwise derivative −E[∇log p_θ(y|x)·n] (equal in expectation; its difference from the score side is the "
        "score error), each ± a 95 % interval; relative error |score − FD|/|FD|; whether 0 lies in the 95 % interval "
        "of the paired difference; and dR_G/ds = ½·E[…] (the paper's variance form)."
    ),
    "dynamics": (
        "Per run at the last analysed snapshot: C^ℓ1 (model-free), the Corollary 1 floor (C^ℓ1)²/2, Madry's KL error "
        "(nats) and in how many analysed epochs it was below the floor, estimated R_SCORE^ℓ1 and R_Std^ℓ1, the "
        "alignment term A and the cosine, and whether |R_SCORE^ℓ1 − C^ℓ1| ≤ sqrt(2·R_Madry^KL) held at every analysed "
        "epoch (attack estimates; all maxima are lower bounds)."
    ),
}


def _fmt(value, spec: str = ".2f") -> str:
    return "—" if value is None else format(value, spec)


def tables(infos: list[dict], analyses: dict[str, list[dict]]) -> list[tuple[str, str, list[str], list[list[str]]]]:
    """(title, caption, header, rows) of every table."""
    out, rows = [], []
    for info in infos:
        a = accuracy_row(info)
        rows.append([info["name"], str(info["config"].get("objective")), str(info["config"].get("model")),
                     f"{a['threat']} {a['eps']}", _fmt(a["clean"]), _fmt(a["pgd_ce"]), _fmt(a["pgd_cw"]),
                     _fmt(a["autoattack"]), str(a["n"]), a["source"], str(a["sanity"])])
    out.append(("Accuracy", TABLE_CAPTIONS["accuracy"], ["run", "objective", "model", "threat", "clean", "PGD-40 CE",
                                                         "PGD-40 CW", "AutoAttack", "n", "source", "sanity checks"],
                rows))
    if analyses.get(alignment.RESULT_NAME):
        rows = []
        for r in analyses[alignment.RESULT_NAME]:
            t, e = r["terms"], r["expansion"]
            rows.append([Path(r["run"]).name, str(r["objective"]), f"{r['dual_norm_q']:g}", f"{t['alignment']:.4g}",
                         f"{t['general']:.4g}", f"{t['sign_condition']:.2f}", f"{t['cosine']:.3f}",
                         f"{t['model_grad_norm']:.3g}", f"{t['data_grad_norm']:.3g}", f"{t['standard_l1']:.4f}",
                         " / ".join(f"{p['gap_over_eps']:.3g}" for p in e["points"]), f"{e['slope']:.2f}",
                         f"{e['slope_general']:.2f}"])
        eps_list = ", ".join(f"{p['eps']:.4g}" for p in analyses[alignment.RESULT_NAME][0]["expansion"]["points"])
        out.append(("Theorem 4: gradient alignment", TABLE_CAPTIONS["theorem4"].format(eps=eps_list),
                    ["run", "objective", "q", "A", "general coeff.", "sign cond.", "cosine", "E‖∇p_θ‖_q", "E‖∇p_d‖_q",
                     "R_Std^ℓ1", "gap/ε", "slope (2εA)", "slope (general)"], rows))
    if analyses.get(smoothing.RESULT_NAME):
        rows = []
        for r in analyses[smoothing.RESULT_NAME]:
            for e in r["results"]:
                d, v = e["d_risk_d_std"], e["d_risk_d_var"]
                cell = lambda est: f"{est['mean']:.4g} ± {1.96 * est['stderr']:.2g}"
                rows.append([Path(r["run"]).name, f"{e['sigma']:g}", f"{e['risk']['mean']:.4f}",
                             cell(d["finite_difference"]), cell(d["score"]), cell(d["pathwise"]),
                             f"{e['relative_error']:.3f}", "yes" if e["agree_within_interval"] else "no",
                             cell(v["score"])])
        out.append(("Theorem 5: noise derivative of the Gaussian-augmented risk", TABLE_CAPTIONS["theorem5"],
                    ["run", "σ", "R_G", "dR/dσ finite diff.", "dR/dσ score side", "dR/dσ pathwise", "rel. error",
                     "0 in CI", "dR/ds score side"], rows))
    if analyses.get(dynamics.RESULT_NAME):
        rows = []
        for r in analyses[dynamics.RESULT_NAME]:
            last = r["epochs"][-1]
            below = sum(e["madry_kl"] < r["madry_kl_floor"] for e in r["epochs"])
            rows.append([Path(r["run"]).name, str(r["objective"]), str(last["epoch"]), f"{r['intrinsic_l1']:.4f}",
                         f"{r['madry_kl_floor']:.4f}", f"{last['madry_kl']:.4f}", f"{below}/{len(r['epochs'])}",
                         f"{last['score_l1']:.4f}", f"{last['standard_l1']:.4f}",
                         f"{last['alignment/alignment']:.4g}", f"{last['alignment/cosine']:.3f}",
                         "yes" if all(e["corollary1_holds"] for e in r["epochs"]) else "no"])
        out.append(("Training dynamics: last analysed epoch", TABLE_CAPTIONS["dynamics"],
                    ["run", "objective", "epoch", "C^ℓ1", "floor (C^ℓ1)²/2", "R_Madry^KL", "epochs below floor",
                     "R_SCORE^ℓ1", "R_Std^ℓ1", "A", "cosine", "Corollary 1 held"], rows))
    return out


# -- writing ----------------------------------------------------------------------------------------------------------
STYLE = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:0.85em}th,td{border:1px solid #ccc;padding:3px 6px;
text-align:right}th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}figure{margin:1.5em 0}
img{max-width:100%}figcaption,.caption{font-size:0.9em;color:#444;max-width:1000px}#image-warning{background:#fdd;
padding:0.5em;display:none}"""
IMAGE_CHECK = """window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var loaded = images.filter(function (im) { return im.complete && im.naturalWidth > 0; }).length;
  document.body.setAttribute("data-images", String(images.length));
  document.body.setAttribute("data-images-loaded", String(loaded));
  if (loaded < images.length) {
    var warning = document.getElementById("image-warning");
    warning.textContent = (images.length - loaded) + " image(s) failed to load";
    warning.style.display = "block";
  }
});"""


def render_html(title: str, meta: list[str], notes: list[str], table_list, figures: list[Figure]) -> str:
    e = html.escape
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{e(title)}</title>",
             f"<style>{STYLE}</style></head><body>", '<p id="image-warning"></p>', f"<h1>{e(title)}</h1>"]
    parts += ["<ul>"] + [f"<li>{e(line)}</li>" for line in meta] + ["</ul>"]
    if notes:
        parts += ["<h2>Findings</h2>", "<ul>"] + [f"<li>{e(line)}</li>" for line in notes] + ["</ul>"]
    for heading, caption, header, rows in table_list:
        parts += [f"<h2>{e(heading)}</h2>", f'<p class="caption">{e(caption)}</p>', "<table>",
                  "<tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"]
        parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows] + ["</table>"]
    parts.append("<h2>Figures</h2>")
    for index, figure in enumerate(figures, start=1):
        parts += [f"<figure><img src=\"{e(figure.file)}\" alt=\"{e(figure.title)}\">",
                  f"<figcaption><b>Figure {index}. {e(figure.title)}.</b> {e(figure.caption)}</figcaption></figure>"]
    parts += [f"<script>{IMAGE_CHECK}</script>", "</body></html>\n"]
    return "\n".join(parts)


def render_markdown(title: str, meta: list[str], notes: list[str], table_list, figures: list[Figure]) -> str:
    lines = [f"# {title}", ""] + [f"- {line}" for line in meta] + [""]
    if notes:
        lines += ["## Findings", ""] + [f"- {line}" for line in notes] + [""]
    for heading, caption, header, rows in table_list:
        lines += [f"## {heading}", "", caption, "", markdown_table(header, rows), ""]
    lines += ["## Figures", ""]
    for index, figure in enumerate(figures, start=1):
        lines += [f"![{figure.title}]({figure.file})", "", f"**Figure {index}. {figure.title}.** {figure.caption}", ""]
    return "\n".join(lines)


def build_report(cfg: ReportConfig) -> dict:
    with checking_input():  # bad input fails here, before anything is written
        cfg.validate()
        runs = [sources.check_run_dir(run) for run in cfg.runs]
        if len({r.resolve() for r in runs}) != len(runs):
            raise ValueError("a run directory is given twice")
        infos = [run_info(run) for run in runs]
    analyses = gather(cfg, runs)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    figures = make_figures(out, cfg, runs, analyses)
    table_list = tables(infos, analyses)
    notes = findings(infos, analyses)
    posterior = next((r["settings"]["posterior"] for r in analyses.get(alignment.RESULT_NAME, [])), None)
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    names = ", ".join(info["name"] for info in infos)
    meta = [f"generated {now} from {len(runs)} run(s): {names} (code revision {git_revision()})",
            "conventions: images in [0, 1]; σ is always a noise standard deviation in [0, 1] pixel units "
            "(variance σ²); accuracies in %; ℓ1 risks between probability vectors lie in [0, 2]; KL in nats"]
    if posterior is not None:
        meta.append("data posterior: " + ", ".join(f"{k} {v}" for k, v in posterior.items()))
    title = "SCORE analysis report"
    atomic_write_text(out / "report.html", render_html(title, meta, notes, table_list, figures))
    atomic_write_text(out / "report.md", render_markdown(title, meta, notes, table_list, figures))
    record = {"runs": infos, "analyses": analyses, "findings": notes, "figures": [f.file for f in figures]}
    atomic_write_json(out / "report.json", record)
    print(f"wrote {out / 'report.html'}, {out / 'report.md'} and {len(figures)} figures")
    for line in notes:
        print(line)
    if cfg.check_browser:
        status = check_in_browser(out / "report.html")
        if not status["ok"]:
            raise ValueError(f"report did not render cleanly in {status['browser']}: {status}")
        print(f"headless {Path(status['browser']).name}: rendered, {status['loaded']}/{status['images']} images loaded")
    return record


# -- headless browser check -------------------------------------------------------------------------------------------
def find_browser() -> str | None:
    """A Chromium-family executable: $CHROMIUM, else the first of ``BROWSERS`` on PATH."""
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def check_in_browser(page: str | os.PathLike, browser: str | None = None, timeout: float = 60) -> dict:
    """Render ``page`` in headless Chromium (--dump-dom after the load event) and read the image counts the page's
    script wrote on <body>. ``ok``: the DOM came back, it has images, and every one loaded (naturalWidth > 0)."""
    browser = browser or find_browser()
    if browser is None:
        raise FileNotFoundError("no Chromium found (apt-get install chromium, or set CHROMIUM=/path/to/chrome)")
    page = Path(page).resolve()
    with tempfile.TemporaryDirectory(prefix="report-chromium-") as profile:
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom"]
        completed = subprocess.run([browser, *flags, page.as_uri()], capture_output=True, text=True, timeout=timeout)
    dom = completed.stdout
    body = re.search(r"<body[^>]*>", dom)
    attributes = dict(re.findall(r'(data-images(?:-loaded)?)="(\d+)"', body.group(0))) if body else {}
    images, loaded = int(attributes.get("data-images", -1)), int(attributes.get("data-images-loaded", -1))
    return {"browser": browser, "returncode": completed.returncode, "rendered": body is not None and "<h1>" in dom,
            "images": images, "loaded": loaded, "ok": completed.returncode == 0 and body is not None and images > 0
            and loaded == images, "stderr_tail": completed.stderr[-500:]}


def main(argv: list[str] | None = None) -> dict:
    return build_report(parse_config(ReportConfig, argv, prog="python -m analysis.report"))


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
