"""Validate every data-posterior estimator exactly as direct SCORE training uses it, against exact truth.

    python -m analysis.validate_posterior --recipe recipes/gmm-8x8-direct-score.json --out runs/v-gmm
    python -m analysis.validate_posterior --recipe recipes/digits-direct-score.json --out runs/v-digits

The recipe (a direct-SCORE training recipe) fixes everything the estimate depends on in training: the threat model and
attack (``norm``, ``eps``, ``pgd_steps`` PGD steps of ``step_size`` from a uniform random start, clamped to [0, 1], last
iterate), the noise std σ (``noise_std``, [0, 1] data units), the posterior net, the score net, the label anchor's
smoothing, the distance and the seed; the classifier p_θ whose loss the attack maximizes is the recipe's trained run
(``--classifier``, default the recipe's ``out``). For every estimator and split, on the first ``--n-points`` points,
the attack is the training attack (``trainlib.objectives.DirectScore.inner_max``: PGD on D(p̂(·|x') ‖ p_θ(·|x')) with
the estimate's full gradient, or through p_θ only where the recipe says ``attack_gradient: model``, and one more PGD
per further entry of ``attack_losses``, each ``attack_starts`` times), so each estimator is read along the path(s) it
would itself drive, with its own random start(s), and at the point training keeps. Estimators (``--estimators``):

    posterior-net        p_φ(·|x', σ) of the posterior net (autograd)
    trajectory           the score-net trajectory anchored at p_φ(·|x, σ) (the default for --posterior scorenet)
    trajectory-label     the score-net trajectory anchored at the smoothed label (1 − α)·onehot(y) + α/K (ablation)
    empirical            the exact smoothed posterior of the training split at σ, a kernel sum (no network; on real
                         data it is the truth itself)
    exact                the truth itself: its own path, where it keeps the label and how far it moves

Truth p_σ(y|x): the closed form at σ for datasets that have one (``gmm-*``: the Gaussian mixture; ``digits-mixture``:
its kernel mixture), and on real data the **exact smoothed posterior of the training split**,
p_σ(y|x) ∝ Σ_{i: y_i = y} N(x; x_i, σ²I) (``datagrad.KernelMixture``), which is what the score net's DSM and the
posterior net's cross-entropy converge to on that set.

At every point x_t of the path (t = 0: the random start, …, t = T: the last iterate, where training reads its target;
with several ``attack_losses`` or ``attack_starts`` their paths follow one another in t, with several starts each
ending at its last iterate, where the best start is picked; the last row is the point training keeps),
with p̂ the estimate as training sees it there (for the trajectory at x_T: its zero-call left-point value):

    TV         ½ Σ_y |p̂(y|x_t) − p_σ(y|x_t)|                        (median, p90, mean)
    agreement  argmax_y p̂(y|x_t) = argmax_y p_σ(y|x_t)                (fraction)
    label      p̂(y|x_t) and p_σ(y|x_t) of the clean point's label      (medians; does the target keep the label?)
    leaves y   argmax_k p̂(k|x_t) ≠ y, argmax_k p_σ(k|x_t) ≠ y, and both (fractions): where the target names another
               class than the clean label, and whether the truth does too (a target that never leaves y where p_σ
               does cannot teach the classifier p_σ's class changes inside the ball; one that leaves it where p_σ does
               not teaches wrong ones)
    cosine     cosine of the centred [K, D] gradient matrices Ĝ and G, G_y = ∇ log p_σ(y|x_t) − Σ_k p_σ(k|x_t) ∇ log
               p_σ(k|x_t) (median, p10); at x_T the trajectory is extended by one step to read Ĝ (training does not
               use a gradient there)

For the posterior net (differentiable) also its worst case inside the ball, max_{x'∈B(x)} TV(p̂(·|x'), p_σ(·|x')) over
an ensemble of PGD-``--worst-case-steps`` attacks (``datagrad.worst_case`` with p̂ in the model's role): a classifier
that fits p̂ inherits this error where an attack finds it.

Outputs in ``--out`` (atomic): ``validate_posterior.json``, ``validate_posterior.md`` (the tables), and
``error_along_path.png``; the table is printed. ``--max-tv`` / ``--min-cosine`` are the thresholds the acceptance block
reports at the last point (for every learned estimator: median TV and median cosine).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from datagrad import KernelMixture, worst_case
from datagrad.seeding import seeded_generator
from scorenets import check_noise_std
from trainlib.adversarial import AdversarialConfig, make_objective
from trainlib.cli import checking_input, run_cli
from trainlib.config import config_to_dict, load_recipe, option, parse_config
from trainlib.data_posterior import PosteriorSpec, posterior_provider
from trainlib.datasets import load_dataset
from trainlib.files import atomic_write_json, atomic_write_text
from trainlib.rundir import git_revision, package_versions

from .markdown import markdown_table
from .sources import compute_device, open_classifier

ESTIMATORS = ("posterior-net", "trajectory", "trajectory-label", "empirical", "exact")
RESULTS_FILE, TABLE_FILE, FIGURE_FILE = "validate_posterior.json", "validate_posterior.md", "error_along_path.png"
RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


@dataclass
class ValidateConfig:
    """Read each data-posterior estimator along the recipe's own attack path against the exact posterior."""

    recipe: str = option("the direct-SCORE recipe whose estimate is validated",
                         str(RECIPES_DIR / "digits-direct-score.json"))
    classifier: str | None = option("the classifier p_theta the attack maximizes (none: the recipe's out)", None)
    estimators: tuple[str, ...] = option(f"estimators to read: {' | '.join(ESTIMATORS)}", ESTIMATORS)
    splits: tuple[str, ...] = option("splits whose first points start the paths", ("train", "test"))
    n_points: int = option("points per split", 200)
    sigmas: tuple[float, ...] = option("noise stds sigma to validate (empty: the recipe's)", ())
    worst_case_steps: int = option("posterior net: PGD steps of the worst-case TV in the ball (0: skip)", 40)
    max_tv: float = option("acceptance: median TV at the last point at most this", 0.05)
    min_cosine: float = option("acceptance: median gradient cosine at the last point at least this", 0.95)
    out: str = option("output directory", "runs/validate-posterior")

    def validate(self) -> None:
        if not Path(self.recipe).is_file():
            raise FileNotFoundError(f"recipe file not found: {self.recipe}")
        unknown = [e for e in self.estimators if e not in ESTIMATORS]
        if unknown or not self.estimators:
            raise ValueError(f"estimators must be among {', '.join(ESTIMATORS)}, got {list(self.estimators)}")
        bad = [s for s in self.splits if s not in ("train", "val", "test")]
        if bad or not self.splits:
            raise ValueError(f"splits must be among train, val, test, got {list(self.splits)}")
        if self.n_points < 1:
            raise ValueError(f"n_points must be >= 1, got {self.n_points}")
        for sigma in self.sigmas:
            check_noise_std(sigma)

    def training_config(self) -> AdversarialConfig:
        """The recipe as a validated training config (direct SCORE)."""
        training = AdversarialConfig(**load_recipe(AdversarialConfig, self.recipe))
        if training.objective != "direct-score":
            raise ValueError(f"{self.recipe} is not a direct-SCORE recipe (objective {training.objective!r})")
        training.validate()
        return training


# -- metrics -----------------------------------------------------------------------------------------------------------
def total_variation(log_p: Tensor, log_q: Tensor) -> Tensor:
    """½ Σ_y |p_y − q_y| per row: [B, K] log-probabilities → [B] (float64)."""
    return 0.5 * (log_p.double().exp() - log_q.double().exp()).abs().sum(dim=1)


def centred(grad: Tensor, log_p: Tensor) -> Tensor:
    """G_y − Σ_k p_k G_k: gradients [B, K, ...] centred under p = exp(log_p) [B, K] → [B, K, D] float64."""
    grad = grad.flatten(2).double()
    return grad - torch.einsum("bk,bkd->bd", log_p.double().exp(), grad).unsqueeze(1)


def matrix_cosine(a: Tensor, b: Tensor) -> Tensor:
    """Cosine between the [K, D] matrices of each example: [B, K, D] × [B, K, D] → [B] (float64)."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-300)


def summary(values: Tensor) -> dict:
    values = values.flatten().double().cpu().numpy()
    return {"median": float(np.median(values)), "p10": float(np.percentile(values, 10)),
            "p90": float(np.percentile(values, 90)), "mean": float(values.mean())}


def _fraction(mask: Tensor) -> float:
    return float(mask.double().mean())


def point_metrics(log_p_hat: Tensor, grad_hat: Tensor, truth, x: Tensor, y: Tensor) -> dict:
    """The module docstring's metrics at points x [B, ...] with clean labels y [B]."""
    with torch.no_grad():
        log_p = truth.log_posterior(x.double())
    grad = truth.grad_log_posterior(x.double())
    rows = torch.arange(len(y), device=y.device)
    estimate_class, truth_class = log_p_hat.argmax(1), log_p.argmax(1)
    estimate_leaves, truth_leaves = estimate_class != y, truth_class != y
    return {
        "tv": summary(total_variation(log_p_hat, log_p)),
        "agreement": _fraction(estimate_class == truth_class),
        "label_estimate": summary(log_p_hat.double().exp()[rows, y]),
        "label_truth": summary(log_p.exp()[rows, y]),
        "leaves_label": {"estimate": _fraction(estimate_leaves), "truth": _fraction(truth_leaves),
                         "both": _fraction(estimate_leaves & truth_leaves)},
        "cosine": summary(matrix_cosine(centred(grad_hat, log_p_hat), centred(grad, log_p))),
    }


# -- the path ----------------------------------------------------------------------------------------------------------
def truth_posterior(training: AdversarialConfig, sigma: float, device):
    """p_σ(y|x): the dataset's closed form at σ, else the exact smoothed posterior of its training split."""
    train = load_dataset(training.dataset, "train", training.data_dir)
    if train.mixture is not None:
        return train.mixture.at(sigma)
    x, y = train.tensors(device)
    return KernelMixture(x.double(), y, train.num_classes, bandwidth=sigma)


def estimator_spec(training: AdversarialConfig, estimator: str, sigma: float) -> PosteriorSpec:
    spec = dataclasses.replace(PosteriorSpec.of(training), noise_std=sigma)
    kind = {"posterior-net": ("posterior-net", spec.anchor), "trajectory": ("scorenet", "posterior-net"),
            "trajectory-label": ("scorenet", "label"), "empirical": ("empirical", spec.anchor)}[estimator]
    return dataclasses.replace(spec, posterior=kind[0], anchor=kind[1])


def read_path(provider, truth, model, training: AdversarialConfig, x: Tensor, y: Tensor, seed: int) -> list[dict]:
    """Run the training attack (``DirectScore.inner_max`` of the recipe) with the estimate ``provider(x, y)``; the
    metrics at every point of its path(s) and at the point trained on."""
    posterior = provider(x, y)
    records = []

    def watch(z: Tensor) -> None:  # after the attack's loss at z (which extends a trajectory to z)
        with torch.no_grad():
            log_p_hat = posterior.log_posterior(z)
        records.append(point_metrics(log_p_hat, posterior.grad_log_posterior(z), truth, z, y))

    generator = seeded_generator(seed, 0, 0, 0, 0, device=x.device)  # the training attack's generator at step 0
    x_adv = make_objective(training, provider).inner_max(model, x, y, posterior, generator, watch)
    with torch.no_grad():
        log_p_hat = posterior.log_posterior(x_adv)  # the training target: before any extension to x_T
    records.append(point_metrics(log_p_hat, posterior.grad_log_posterior(x_adv), truth, x_adv, y))
    return records


def worst_case_error(estimate, truth, training: AdversarialConfig, x: Tensor, cfg: ValidateConfig) -> dict:
    """max_{x'∈B(x)} TV(p̂(·|x'), p_σ(·|x')) of a differentiable estimate: ``datagrad.worst_case`` with p̂ in the role of
    the model (its R_SCORE^ℓ1 against the truth, halved): how wrong the target can be made inside the ball."""
    found = worst_case(estimate.log_posterior, x, truth, eps=training.eps, norm=training.norm,
                       steps=cfg.worst_case_steps, attacks=("l1", "kl", "data-margin", "model-margin"))
    return summary(found.score_l1 / 2)


def validate(cfg: ValidateConfig) -> dict:
    """Every (σ, estimator, split): the metrics along the path (module docstring)."""
    with checking_input():  # options, recipe, classifier, networks: before anything is computed or written
        cfg.validate()
        training = cfg.training_config()
        device = compute_device()
        classifier = open_classifier(cfg.classifier or training.out, dtype=torch.float32, data_dir=training.data_dir)
        if classifier.settings.get("dataset") != training.dataset:
            found = classifier.settings.get("dataset")
            raise ValueError(f"classifier {classifier.source} was trained on {found!r}, the recipe is for "
                             f"{training.dataset!r}")
        train = load_dataset(training.dataset, "train", training.data_dir)
        for sigma in list(cfg.sigmas) or [training.noise_std]:
            for estimator in cfg.estimators:
                if estimator != "exact":
                    posterior_provider(estimator_spec(training, estimator, sigma), train, device)
    sigmas = list(cfg.sigmas) or [training.noise_std]
    results = []
    for sigma in sigmas:
        truth = truth_posterior(training, sigma, device)
        for estimator in cfg.estimators:
            for split in cfg.splits:
                data = load_dataset(training.dataset, split, training.data_dir)
                x, y = data.get(range(min(cfg.n_points, len(data))), device)
                if estimator == "exact":
                    provider = lambda x, y, truth=truth: truth
                else:
                    train = load_dataset(training.dataset, "train", training.data_dir)
                    spec = estimator_spec(training, estimator, sigma)
                    provider = posterior_provider(spec, train, device, max_batch=4096)
                start = time.perf_counter()
                path = read_path(provider, truth, classifier.model, training, x, y, training.seed)
                worst = worst_case_error(provider(x, y), truth, training, x, cfg) if (
                    estimator == "posterior-net" and cfg.worst_case_steps) else None
                results.append({"sigma": sigma, "estimator": estimator, "split": split, "n_points": len(y),
                                "path": path, "worst_case_tv": worst, "seconds": time.perf_counter() - start})
                last = path[-1]
                print(f"σ {sigma:g} {estimator:>16} {split:>5}: at x_T TV {last['tv']['median']:.4f}, cosine "
                      f"{last['cosine']['median']:.4f}, agreement {last['agreement']:.3f}, label p̂ "
                      f"{last['label_estimate']['median']:.3f} (truth {last['label_truth']['median']:.3f}), leaves y "
                      f"{last['leaves_label']['estimate']:.3f} (truth {last['leaves_label']['truth']:.3f}, both "
                      f"{last['leaves_label']['both']:.3f})")
    return {"results": results, "acceptance": acceptance(results, cfg), "recipe": config_to_dict(training),
            "classifier": str(classifier.source), "truth": _truth_name(training)}


def _truth_name(training: AdversarialConfig) -> str:
    train = load_dataset(training.dataset, "train", training.data_dir)
    if train.mixture is not None:
        return f"closed form of {training.dataset} at sigma"
    return f"exact smoothed posterior of the {len(train)} training images of {training.dataset} at sigma"


def acceptance(results: list[dict], cfg: ValidateConfig) -> list[dict]:
    """At the last point of every learned estimator's path: median TV ≤ max_tv and median cosine ≥ min_cosine."""
    rows = []
    for r in results:
        if r["estimator"] == "exact":
            continue
        last = r["path"][-1]
        tv, cos = last["tv"]["median"], last["cosine"]["median"]
        rows.append({"sigma": r["sigma"], "estimator": r["estimator"], "split": r["split"], "median_tv": tv,
                     "median_cosine": cos, "passed": bool(tv <= cfg.max_tv and cos >= cfg.min_cosine)})
    return rows


# -- output ------------------------------------------------------------------------------------------------------------
def format_tables(record: dict, cfg: ValidateConfig) -> str:
    """Markdown: the last point of every path, then every point of every path."""
    last_rows, path_rows = [], []
    for r in record["results"]:
        for t, m in enumerate(r["path"]):
            row = [f"{r['sigma']:g}", r["estimator"], r["split"], str(t), f"{m['tv']['median']:.4f}",
                   f"{m['tv']['p90']:.3f}", f"{m['agreement']:.3f}", f"{m['label_estimate']['median']:.3f}",
                   f"{m['label_truth']['median']:.3f}", "{estimate:.3f} / {truth:.3f} / {both:.3f}".format(
                       **m["leaves_label"]), f"{m['cosine']['median']:.4f}", f"{m['cosine']['p10']:.3f}"]
            path_rows.append(row)
            if t == len(r["path"]) - 1:
                worst = r.get("worst_case_tv")
                last_rows.append([row[0], row[1], row[2], *row[4:],
                                  f"{worst['median']:.4f} / {worst['mean']:.4f}" if worst else "—"])
    header = ["σ", "estimator", "split", "TV median", "TV p90", "argmax agrees", "p̂(y) median", "p(y) median",
              "leaves y: p̂ / p / both", "cosine median", "cosine p10"]
    last_header = [*header, "worst-case TV in the ball (median / mean)"]
    verdicts = [f"- σ {a['sigma']:g}, {a['estimator']}, {a['split']}: median TV {a['median_tv']:.4f} "
                f"(≤ {cfg.max_tv:g}), median cosine {a['median_cosine']:.4f} (≥ {cfg.min_cosine:g}): "
                f"{'met' if a['passed'] else 'NOT met'}" for a in record["acceptance"]]
    return ("## At the last PGD iterate (the training target)\n\n" + markdown_table(last_header, last_rows) + "\n\n"
            + "\n".join(verdicts) + "\n\n## Along the path (t = 0: random start)\n\n"
            + markdown_table([*header[:3], "t", *header[3:]], path_rows) + "\n")


def plot_paths(path: Path, record: dict) -> None:
    """Median TV and median gradient cosine against the PGD iterate, one line per estimator and split."""
    from .plotting import plt, save_figure, style

    with style():
        figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        for r in record["results"]:
            if r["estimator"] == "exact":
                continue
            steps = range(len(r["path"]))
            label = f"{r['estimator']}, {r['split']}, σ {r['sigma']:g}"
            style_ = "-" if r["split"] == "test" else "--"
            left.plot(steps, [max(m["tv"]["median"], 1e-6) for m in r["path"]], style_, marker="o", label=label)
            right.plot(steps, [m["cosine"]["median"] for m in r["path"]], style_, marker="o", label=label)
        left.set(yscale="log", xlabel="PGD iterate t (0: random start)", ylabel="median TV to p_σ(·|x_t)",
                 title="posterior error along the training attack")
        right.set(xlabel="PGD iterate t (0: random start)", ylabel="median cosine of centred [K, D] gradients",
                  title="data-gradient direction along the path")
        left.legend(fontsize=7)
        save_figure(figure, path)


def validate_posterior(cfg: ValidateConfig) -> dict:
    """Run the validation (module docstring); write and return the record."""
    start = time.perf_counter()
    record = validate(cfg)
    record |= {"config": config_to_dict(cfg), "seconds": time.perf_counter() - start, "git_revision": git_revision(),
               "versions": package_versions(), "threads": torch.get_num_threads()}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / RESULTS_FILE, record)
    tables = format_tables(record, cfg)
    title = "# Data-posterior estimators along the training attack"
    atomic_write_text(out / TABLE_FILE, f"{title}\n\nRecipe {cfg.recipe}; classifier {record['classifier']}; truth: "
                      f"{record['truth']}.\n\n{tables}")
    plot_paths(out / FIGURE_FILE, record)
    print(tables.split("## Along")[0])
    print(f"{record['seconds']:.0f} s; wrote {out / RESULTS_FILE}, {out / TABLE_FILE}, {out / FIGURE_FILE}")
    return record


def main(argv: list[str] | None = None) -> dict:
    return validate_posterior(parse_config(ValidateConfig, argv, prog="python -m analysis.validate_posterior"))


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
