"""Train a set of recipes over seeds and rank the objectives on SCORE itself (and on label robustness).

    python -m analysis.compare_objectives --out runs/compare-digits                         # the five digits recipes
    python -m analysis.compare_objectives --recipes recipes/gmm-8x8-*.json --seeds 0 1 2 --out runs/compare-gmm

For every recipe and seed it trains ``<out>/<recipe>/seed-<s>`` (a finished run, i.e. one with ``results.json``, is
reused; an interrupted one is resumed), then evaluates the final EMA weights on the first ``--n-test`` test points
(clamped to [0, 1]) with ``analysis.score_risk``: R_SCORE^ℓ1 and R_SCORE^KL as per-example maxima over an ensemble of
attacks (``datagrad.worst_case``) against each ``--truth`` (``auto``: the dataset's closed form at σ = 0, exact on
``gmm-*`` and ``digits-mixture``; on real data ``empirical`` and ``posterior-net``, both estimates), R_Std, R_Madry^KL,
the argmax agreement of p_θ with p_d at the worst point, and the label accuracies (clean, PGD-40 CE / CW, AutoAttack
with ``--autoattack``). With an exact truth a **Bayes** row (p_θ = p_d, R_SCORE = 0) is added, and for every
posterior net a direct-SCORE row trains against, a row for that net itself (p_θ = p_φ at the recipe's σ, no training):
its own SCORE risk, which a classifier that fits the target exactly inherits. ``--sigmas`` also
trains every direct-SCORE recipe that sets ``noise_std`` at those σ (``<recipe>-sigma<σ>``, first seed): how the
smoothing of the target trades against its estimate's error. Recipes named in ``--one-seed`` (costly ablations) run on
the first seed only; the table says how many seeds each row has. ``--budget RECIPE`` gives every row that recipe's
budget (model, epochs, epoch size, batch, PGD steps and step size): equal budgets by construction.
``--paired-with RECIPE`` adds, per trained row, its R_SCORE^ℓ1 and R_SCORE^KL minus that recipe's row, paired over
the same test points: the test split and the attacks' random starts do not depend on the training seed, so per test
point x_i the difference d_i = mean over the seeds both rows have of (R_s(x_i) − R_ref,s(x_i)) removes the spread
over test points that the per-run intervals carry; reported as mean with a bootstrap 95 % interval over i.

Rows report the mean over seeds ± their standard deviation, and the mean half-width of the per-run bootstrap 95 %
intervals over test points; every run's budget (model, epochs, batch, PGD steps, attack runs per example: starts ×
attacks) and training wall time are in the JSON and the caption. Writes ``comparison.json``, ``comparison.md`` (a report
section) and ``comparison.png`` into ``--out``.
Direct-SCORE recipes on digits train the default score net / posterior net first when they are missing.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from datagrad import bootstrap_mean
from trainlib import adversarial
from trainlib.cli import checking_input, run_cli
from trainlib.config import config_to_dict, load_recipe, option, parse_config
from trainlib.data_posterior import DEFAULT_NOISE_STD, DEFAULT_POSTERIOR_NET, PosteriorSpec, load_posterior_nets
from trainlib.datasets import load_dataset
from trainlib.evaluation import evaluation_points
from trainlib.files import atomic_write_json, atomic_write_text

from . import score_risk, sources
from .markdown import markdown_table

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
DIGITS_RECIPES = tuple(str(RECIPES_DIR / f"digits-{name}.json")
                       for name in ("standard", "pgd-at", "trades-kl", "trades-se", "direct-score"))
METRICS = ("score_l1", "score_kl", "standard_l1", "madry_kl")
BUDGET = ("model", "epochs", "epoch_size", "batch_size", "pgd_steps", "step_size")
LABELS = ("clean_acc", "pgd_cw_acc", "autoattack_acc")


@dataclass
class CompareConfig:
    """Train each recipe over seeds, measure SCORE against exact (or declared) truth, and write one comparison."""

    recipes: tuple[str, ...] = option("recipe files to train and compare", DIGITS_RECIPES)
    seeds: tuple[int, ...] = option("seeds of every recipe (rows: mean ± sd over them)", (0,))
    one_seed: tuple[str, ...] = option("recipes (file names) trained with the first seed only: costly ablations", ())
    truth: tuple[str, ...] = option("p_d for R_SCORE: auto (closed form) | empirical | posterior-net (estimates)",
                                    ("auto",))
    noise_std: float = option("sigma of the empirical / posterior-net truth", DEFAULT_NOISE_STD)
    posterior_net: str = option("posterior net of the posterior-net truth", DEFAULT_POSTERIOR_NET)
    sigmas: tuple[float, ...] = option("sigma sweep: also train each direct-SCORE recipe at these noise stds", ())
    out: str = option("output directory (one run per recipe and seed)", "runs/compare-digits")
    n_test: int | None = option("first n test points of every evaluation (none: all)", None)
    pgd_steps: int = option("PGD steps of each attack of the SCORE ensemble", 40)
    restarts: int = option("random starts per attack of the SCORE ensemble", 1)
    autoattack: bool = option("AutoAttack standard label accuracy", True)
    epochs: int | None = option("override every recipe's epochs (none: the recipe's)", None)
    budget: str | None = option("a recipe whose budget (model, epochs, epoch size, batch, PGD steps and step size) "
                                "every row gets: equal budgets (none: each recipe's own)", None)
    paired_with: str | None = option("a recipe (file name without .json) every other trained row is compared with, "
                                     "paired over the same test points and seeds (none: no paired column)", None)

    def validate(self) -> None:
        if self.budget is not None and not Path(self.budget).is_file():
            raise FileNotFoundError(f"budget recipe file not found: {self.budget}")
        if not self.recipes or not self.seeds or not self.truth:
            raise ValueError("give at least one recipe, seed and truth")
        for path in self.recipes:
            if not Path(path).is_file():
                raise FileNotFoundError(f"recipe file not found: {path}")
        unknown = [t for t in self.truth if t not in score_risk.TRUTHS]
        if unknown:
            raise ValueError(f"truth must be among {', '.join(score_risk.TRUTHS)}, got {unknown}")
        if self.n_test is not None and self.n_test < 1:
            raise ValueError(f"n_test must be >= 1, got {self.n_test}")

    def risk_options(self, truth: str, first: bool = True) -> score_risk.ScoreRiskConfig:
        """score_risk's options against ``truth``; AutoAttack (with ``--autoattack``) only for the first truth."""
        return score_risk.ScoreRiskConfig(runs=("-",), truth=truth, posterior_net=self.posterior_net,
                                          noise_std=self.noise_std, n_points=self.n_test or 10**9,
                                          pgd_steps=self.pgd_steps, restarts=self.restarts,
                                          autoattack=self.autoattack and first)


@dataclass
class Entry:
    name: str  # row name
    recipe: Path
    config: adversarial.AdversarialConfig  # seed 0's; the seeds differ in seed and out only
    seeds: tuple[int, ...]


def entries(cfg: CompareConfig) -> list[Entry]:
    """One entry per recipe, plus the σ sweep of the direct-SCORE recipes (bad input fails here, before training)."""
    result, budget = [], {}
    if cfg.budget is not None:
        source = load_recipe(adversarial.AdversarialConfig, cfg.budget)
        defaults = adversarial.AdversarialConfig()
        budget = {key: source.get(key, getattr(defaults, key)) for key in BUDGET}
    for path in map(Path, cfg.recipes):
        values = load_recipe(adversarial.AdversarialConfig, path)  # clear errors
        cls = adversarial.DirectScoreConfig if values.get("objective") == "direct-score" else \
            adversarial.AdversarialConfig
        values |= budget
        if cfg.epochs is not None:
            values["epochs"] = cfg.epochs
        training = cls(**{**values, "autoattack": False})
        training.validate()
        one_seed = any(Path(other).name == path.name for other in cfg.one_seed)
        seeds = cfg.seeds[:1] if one_seed else cfg.seeds
        result.append(Entry(path.stem, path, training, seeds))
        if training.objective == "direct-score" and "noise_std" in values:
            for sigma in cfg.sigmas:
                swept = dataclasses.replace(training, noise_std=sigma)
                result.append(Entry(f"{path.stem}-sigma{sigma:g}", path, swept, cfg.seeds[:1]))
    if cfg.paired_with is not None and cfg.paired_with not in [entry.name for entry in result]:
        raise ValueError(f"paired_with must name one of the compared recipes "
                         f"({', '.join(entry.name for entry in result)}), got {cfg.paired_with!r}")
    return result


def run_dir(cfg: CompareConfig, entry: Entry, seed: int) -> Path:
    return Path(cfg.out) / entry.name / f"seed-{seed}"


def train_run(entry: Entry, out: Path, seed: int) -> None:
    """Train (or resume) one run; a finished run is reused."""
    if (out / "results.json").is_file():
        print(f"{out}: finished run found, not retrained")
        return
    training = dataclasses.replace(entry.config, seed=seed, out=str(out),
                                   resume="latest" if (out / "config.json").is_file() else "none")
    adversarial.train(training)


def measure(classifier_source, truths: list[str], cfg: CompareConfig) -> dict:
    """{truth: score_risk record} of one trained run (cached in the run directory)."""
    classifier = sources.open_classifier(classifier_source, dtype=torch.float32)
    records = {}
    for index, truth in enumerate(truths):
        options = cfg.risk_options(truth, first=index == 0)
        settings = options.settings({"truth": truth, "noise_std": cfg.noise_std, "posterior_net": cfg.posterior_net}
                                    | {"label": index == 0})
        records[truth] = sources.cached(classifier_source, f"{score_risk.RESULT_NAME}-{truth}", settings,
                                        _analyse, classifier, options, index == 0)
    return records


def _analyse(classifier, options, label_accuracy: bool) -> dict:
    device = sources.compute_device()
    truth, description = score_risk.truth_posterior(classifier.test, classifier.settings["dataset"], options, device)
    x, y = evaluation_points(classifier.test, range(min(options.n_points, len(classifier.test))), device)
    settings = classifier.settings
    record = score_risk.risk_record(classifier.model, x, y, truth, settings["eps"], settings.get("norm", "linf"),
                                    options, label_accuracy)
    return record | {"truth": description}


def bayes_row(entry: Entry, cfg: CompareConfig) -> dict:
    """p_θ = p_d (the closed form): R_SCORE = 0; its label accuracies are the Bayes classifier's."""
    test = load_dataset(entry.config.dataset, "test", entry.config.data_dir)
    truth, _ = score_risk.truth_posterior(test, entry.config.dataset, cfg.risk_options("auto"),
                                          sources.compute_device())
    return reference_row("Bayes (p_θ = p_d)", "bayes", truth, test, entry, cfg, ["auto"])


def estimator_rows(plan: list[Entry], cfg: CompareConfig, truths: list[str]) -> list[dict]:
    """p_θ = p_φ for every posterior net or ensemble (and σ) a direct-SCORE row trains against: the estimator's own
    SCORE risk, which a classifier that fits its target exactly inherits (for ℓ1, R_SCORE(θ) ≤ R_SCORE(φ) +
    max_{x'} ℓ1(p_φ, p_θ) at every point, the triangle inequality)."""
    from scorenets import PosteriorNetPosterior

    rows, seen = [], set()
    for entry in plan:
        training = entry.config
        if training.objective != "direct-score" or training.posterior != "posterior-net":
            continue
        paths = (training.posterior_net, *training.posterior_ensemble)
        if (paths, training.noise_std) in seen:
            continue
        seen.add((paths, training.noise_std))
        test = load_dataset(training.dataset, "test", training.data_dir)
        nets = load_posterior_nets(PosteriorSpec.of(training), test.num_classes, tuple(test.image_shape),
                                   sources.compute_device())
        name = "posterior net" if len(nets) == 1 else f"ensemble of {len(nets)} posterior nets"
        rows.append(reference_row(f"{name} itself (p_θ = p_φ, σ {training.noise_std:g})", "posterior-net",
                                  PosteriorNetPosterior(nets, training.noise_std), test, entry, cfg, truths))
    return rows


def reference_row(name: str, objective: str, posterior, test, entry: Entry, cfg: CompareConfig,
                  truths: list[str]) -> dict:
    """A row for the classifier p_θ = ``posterior`` (no training, nothing cached) on ``entry``'s test split ``test``
    and threat model, measured as ``measure`` measures a trained run."""
    settings = {"dataset": entry.config.dataset, "eps": entry.config.eps, "norm": entry.config.norm}
    classifier = sources.Classifier(Path(name), score_risk.BayesClassifier(posterior).eval(), settings, test)
    runs = {truth: [_analyse(classifier, cfg.risk_options(truth, first=index == 0), index == 0)]
            for index, truth in enumerate(truths)}
    return {"name": name, "objective": objective, "seeds": [], "runs": runs, "train_seconds": []}


def aggregate(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def summarise(row: dict, truths: list[str]) -> dict:
    """Per truth and metric: mean ± sd over seeds and the mean bootstrap half-width; label accuracies likewise."""
    summary = {}
    for truth in truths:
        records = row["runs"].get(truth)
        if not records:
            continue
        block = {m: aggregate([r[m]["mean"] for r in records]) | {"half_width": statistics.fmean(
            (r[m]["high"] - r[m]["low"]) / 2 for r in records)} for m in METRICS}
        block["agreement"] = aggregate([r["agreement"] for r in records])
        summary[truth] = block
    first = row["runs"][truths[0]]
    summary["label"] = {key: aggregate([float(r["label"][key]) for r in first]) for key in LABELS
                        if all(r["label"].get(key) is not None for r in first)}
    return summary


def paired_difference(row: dict, reference: dict, truth: str, metric: str) -> dict | None:
    """``row`` minus ``reference`` on ``metric`` (score_l1 | score_kl) against ``truth``, paired (module docstring):
    the bootstrap mean of d_i over test points, with the common seeds; None when the rows share no seed."""
    common = [seed for seed in row["seeds"] if seed in reference["seeds"]]
    if not common:
        return None

    def points(r: dict, seed: int) -> torch.Tensor:
        return torch.tensor(r["runs"][truth][r["seeds"].index(seed)][f"{metric}_points"], dtype=torch.float64)

    differences = torch.stack([points(row, seed) - points(reference, seed) for seed in common]).mean(0)
    return bootstrap_mean(differences) | {"seeds": common}


def add_paired(rows: list[dict], reference_name: str, truths: list[str]) -> None:
    """``row["paired"][truth][metric]`` for every row that shares a seed with the reference row (not itself)."""
    reference = next(r for r in rows if r["name"] == reference_name)
    for row in rows:
        if row is reference:
            continue
        blocks = {truth: {m: paired_difference(row, reference, truth, m) for m in ("score_l1", "score_kl")}
                  for truth in truths if row["runs"].get(truth) and reference["runs"].get(truth)}
        if any(d is not None for block in blocks.values() for d in block.values()):
            row["paired"] = blocks


def cell(block: dict | None, digits: int = 3) -> str:
    if block is None:
        return "—"
    text = f"{block['mean']:.{digits}f}"
    if len(block["values"]) > 1:
        text += f" ± {block['sd']:.{digits}f}"
    if "half_width" in block:
        text += f" (CI ±{block['half_width']:.{digits}f})"
    return text


def interval_cell(block: dict | None) -> str:
    return "—" if block is None else score_risk.interval_text(block, sign="+")


def format_table(rows: list[dict], truths: list[str], paired_with: str | None = None) -> str:
    header = ["objective", "seeds"]
    for truth in truths:
        header += [f"R_SCORE^ℓ1 ({truth})", f"R_SCORE^KL ({truth})"]
    if paired_with is not None:
        header += [f"Δ R_SCORE^ℓ1 vs {paired_with} ({truths[0]}, paired)", f"Δ R_SCORE^KL ({truths[0]}, paired)"]
    header += ["R_Std^ℓ1", "R_Madry^KL", "agrees at x'", "clean %", "PGD-40 CW %", "AutoAttack %", "train s"]
    lines = []
    for row in rows:
        s, first = row["summary"], row["summary"].get(truths[0], {})
        cells = [row["name"], str(len(row["seeds"]) or "—")]
        for truth in truths:
            cells += [cell(s.get(truth, {}).get("score_l1")), cell(s.get(truth, {}).get("score_kl"))]
        if paired_with is not None:
            paired = row.get("paired", {}).get(truths[0], {})
            cells += [interval_cell(paired.get("score_l1")), interval_cell(paired.get("score_kl"))]
        label = s["label"]
        seconds = f"{statistics.fmean(row['train_seconds']):.0f}" if row["train_seconds"] else "—"
        cells += [cell(first.get("standard_l1")), cell(first.get("madry_kl")), cell(first.get("agreement")),
                  *(cell(label.get(key), 2) for key in LABELS), seconds]
        lines.append(cells)
    return markdown_table(header, lines) + "\n"


def plot(path: Path, rows: list[dict], truth: str, paired_with: str | None = None) -> None:
    """Left: R_SCORE^ℓ1 per objective (mean ± sd over seeds). With ``paired_with``, middle: each row's paired
    difference to that row with its bootstrap 95 % interval (the differences the bars are too coarse to show).
    Right: R_SCORE^ℓ1 against label robust accuracy."""
    from .plotting import PALETTE, plt, save_figure, style

    with style():
        panels = 3 if paired_with is not None else 2
        figure, axes = plt.subplots(1, panels, figsize=(6 * panels, 0.45 * len(rows) + 2))
        left, right = axes[0], axes[-1]
        names = [r["name"] for r in rows]
        means = [r["summary"].get(truth, {}).get("score_l1", {}).get("mean", float("nan")) for r in rows]
        sds = [r["summary"].get(truth, {}).get("score_l1", {}).get("sd", 0.0) for r in rows]
        colours = [PALETTE[1] if "direct-score" in r["objective"] else PALETTE[0] for r in rows]
        left.barh(range(len(rows)), means, xerr=sds, color=colours)
        left.set(yticks=range(len(rows)), yticklabels=names, xlabel=f"R_SCORE^ℓ1 against p_d ({truth})",
                 title="SCORE (lower is better; orange: direct SCORE)")
        left.invert_yaxis()
        if paired_with is not None:
            middle = axes[1]
            for i, (row, colour) in enumerate(zip(rows, colours, strict=True)):
                d = row.get("paired", {}).get(truth, {}).get("score_l1")
                if d is not None:
                    middle.errorbar(d["mean"], i, xerr=[[d["mean"] - d["low"]], [d["high"] - d["mean"]]], fmt="o",
                                    color=colour, capsize=3)
            middle.axvline(0.0, color="black", linewidth=0.8)
            middle.set(ylim=left.get_ylim(), yticks=range(len(rows)), yticklabels=[],
                       xlabel=f"Δ R_SCORE^ℓ1 vs {paired_with} (paired, 95 % interval)",
                       title="paired difference (left of 0: lower SCORE)")
        key = "autoattack_acc" if all("autoattack_acc" in r["summary"]["label"] for r in rows) else "pgd_cw_acc"
        for row, mean, colour in zip(rows, means, colours, strict=True):
            accuracy = row["summary"]["label"].get(key, {}).get("mean", float("nan"))
            right.scatter(accuracy, mean, color=colour)
            right.annotate(row["name"], (accuracy, mean), fontsize=7)
        right.set(xlabel=f"label robust accuracy ({key.replace('_acc', '')}, %)", ylabel="R_SCORE^ℓ1",
                  title="SCORE against label robustness")
        save_figure(figure, path)


def compare(cfg: CompareConfig) -> list[dict]:
    with checking_input():  # options and recipes: bad input fails before anything is trained or written
        cfg.validate()
        plan = entries(cfg)
    datasets = {entry.config.dataset for entry in plan}
    truths = list(cfg.truth)
    rows = []
    if truths[0] == "auto" and len(datasets) == 1 and load_dataset(plan[0].config.dataset, "test").mixture is not None:
        rows.append(bayes_row(plan[0], cfg))
    for entry in plan:
        row = {"name": entry.name, "objective": entry.config.objective, "seeds": list(entry.seeds), "runs": {},
               "train_seconds": [], "budget": {k: getattr(entry.config, k) for k in (*BUDGET, "eps")}
               | {"attack_runs": attack_runs(entry.config)}}
        for seed in entry.seeds:
            out = run_dir(cfg, entry, seed)
            train_run(entry, out, seed)
            row["train_seconds"] += _recorded_seconds(out)  # the same number whether trained now or reused
            for truth, record in measure(out, truths, cfg).items():
                row["runs"].setdefault(truth, []).append(record)
        rows.append(row)
    references = len(rows) - len(plan)  # the Bayes row, if any; the estimator rows follow it (nets exist by now)
    rows[references:references] = estimator_rows(plan, cfg, truths)
    for row in rows:
        row["summary"] = summarise(row, truths)
    if cfg.paired_with is not None:
        add_paired(rows, cfg.paired_with, truths)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(rows, truths, cfg.paired_with)
    first = rows[-1]["runs"][truths[0]][0]
    caption = (f"{first['n_points']} test points, {first['norm']} ε = {first['eps']:g}; R_SCORE: per-example max over "
               f"{cfg.pgd_steps}-step PGD on ℓ1, KL, the log-odds of p_d and of p_θ and Madry's KL ({cfg.restarts} "
               f"start(s) each); mean ± sd over seeds {list(cfg.seeds)} (CI: mean half-width of the per-run bootstrap "
               f"95 % intervals over test points). Budgets (model, epochs/batch/PGD steps × attack runs per example): "
               + "; ".join(f"{r['name']} {b['model']}, {b['epochs']}/{b['batch_size']}/{b['pgd_steps']}"
                           f"×{b['attack_runs']}" for r in rows if (b := r.get("budget"))) + "."
               + (f" Δ: the row minus {cfg.paired_with}, paired over test points and common seeds, with a bootstrap "
                  "95 % interval." if cfg.paired_with else "") + "\n\n")
    atomic_write_json(out / "comparison.json", {"config": config_to_dict(cfg), "rows": rows})
    atomic_write_text(out / "comparison.md", "# Objectives compared on SCORE\n\n" + caption + table)
    plot(out / "comparison.png", rows, truths[0], cfg.paired_with)
    print("\n" + caption + table)
    return rows


def attack_runs(config) -> int:
    """PGD runs per training example and step: ``attack_starts`` × the number of direct-SCORE ``attack_losses``
    (0 for "standard"); times ``pgd_steps``, the attack steps an objective spends."""
    if config.objective == "standard":
        return 0
    return config.attack_starts * (len(config.attack_losses) if config.objective == "direct-score" else 1)


def _recorded_seconds(run: Path) -> list[float]:
    """The training time a run recorded in results.json (its last invocation; none recorded: nothing)."""
    seconds = json.loads((run / "results.json").read_text()).get("train_seconds")
    return [seconds] if seconds is not None else []


def main() -> None:
    run_cli(lambda: compare(parse_config(CompareConfig, prog="python -m analysis.compare_objectives")))


if __name__ == "__main__":
    main()
