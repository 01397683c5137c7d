"""SCORE measured as SCORE: exact (or declared) truth, an ensemble of attacks, bootstrap intervals.

    python -m analysis.score_risk runs/gmm-8x8-direct-score runs/gmm-8x8-trades-se          # gmm: the closed form
    python -m analysis.score_risk runs/digits-trades-se --truth empirical --autoattack         # digits: an estimate

For each run (its final EMA weights, or ``--which best``) on the first ``--n-points`` test points (clamped to [0, 1],
as every evaluation of the threat model; the run's ε and norm), with p_d the truth:

    auto           the dataset's closed form at σ = 0 (``gmm-*``: the Gaussian mixture; ``digits-mixture``: its kernel
                   mixture): exact
    empirical      the exact smoothed posterior of the training split at σ = ``--noise-std`` (an estimate of p_d:
                   p_σ of the training set, which memorises it)
    posterior-net  p_φ(·|x, σ) of ``--posterior-net`` (an estimate)

it reports R_SCORE^ℓ1 and R_SCORE^KL as per-example maxima over ``datagrad.worst_case``'s ensemble (PGD-``--pgd-steps``
on ℓ1, KL, the log-odds of p_d and of p_θ, and Madry's KL; ``--restarts`` random starts each; every iterate counts),
with bootstrap 95 % intervals, next to R_Std (ℓ1, KL), R_Madry^KL, the argmax agreement of p_θ with p_d at the
ℓ1-worst point, and the label accuracies of ``trainlib.evaluation.evaluate`` (clean, PGD-40 CE / CW, AutoAttack with
``--autoattack``). Results are cached per run in ``<run>/analysis/score_risk.json`` with their settings; a table
(``<out>/score_risk.md``) is printed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from datagrad import ATTACKS, KernelMixture, bootstrap_mean, worst_case
from scorenets import PosteriorNetPosterior, check_noise_std
from trainlib import evaluation
from trainlib.cli import checking_input, run_cli
from trainlib.config import config_to_dict, option, parse_config
from trainlib.data_posterior import DEFAULT_NOISE_STD, DEFAULT_POSTERIOR_NET
from trainlib.datasets import ImageDataset, load_dataset
from trainlib.evaluation import evaluation_points
from trainlib.files import atomic_write_text

from . import sources
from .markdown import markdown_table

RESULT_NAME = "score_risk"
RECORD_VERSION = 2  # part of the cache settings: 2 keeps the per-point risks (paired comparisons); older caches miss
TRUTHS = ("auto", "empirical", "posterior-net")


@dataclass
class ScoreRiskConfig(sources.ReadoutOptions):
    """R_SCORE (l1, KL) as the per-example max over an ensemble of attacks, against exact or declared truth."""

    truth: Literal["auto", "empirical", "posterior-net"] = option(
        "p_d: auto (the closed form, gmm-* / digits-mixture) | empirical (smoothed training set) | posterior-net",
        "auto")
    posterior_net: str | None = option("truth=posterior-net: the posterior net", DEFAULT_POSTERIOR_NET)
    noise_std: float = option("truth=empirical / posterior-net: sigma ([0, 1] data units, std)",
                              DEFAULT_NOISE_STD)
    which: Literal["final", "best"] = option("the run's final EMA weights or best/ (by validation)", "final")
    n_points: int = option("first n test points", 1000)
    pgd_steps: int = option("PGD steps of every attack of the ensemble (step 2.5 eps / steps)", 40)
    restarts: int = option("random starts per attack", 1)
    attacks: tuple[str, ...] = option(f"the ensemble: {' | '.join(ATTACKS)}", ATTACKS)
    autoattack: bool = option("also AutoAttack standard label accuracy", False)
    seed: int = option("seed of the attacks' random starts and of the bootstrap", 0)
    out: str = option("directory of the combined table", "runs/analysis")

    def validate(self) -> None:
        super().validate()
        check_noise_std(self.noise_std)
        for name in ("n_points", "pgd_steps", "restarts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        unknown = [a for a in self.attacks if a not in ATTACKS]
        if unknown or not self.attacks:
            raise ValueError(f"attacks must be among {', '.join(ATTACKS)}, got {list(self.attacks)}")

    def settings(self, truth_description: dict) -> dict:
        keys = ("which", "n_points", "pgd_steps", "restarts", "attacks", "autoattack", "seed")
        return {key: getattr(self, key) for key in keys} | {"truth": truth_description, "record": RECORD_VERSION}


def truth_posterior(test: ImageDataset, dataset: str, cfg: ScoreRiskConfig, device) -> tuple[object, dict]:
    """(p_d as a differentiable DataPosterior, its description); module docstring."""
    if cfg.truth == "auto":
        if test.mixture is None:
            raise ValueError(f"{dataset} has no closed-form posterior: choose --truth empirical or posterior-net")
        mixture = test.mixture
        return (mixture if isinstance(mixture, KernelMixture) else mixture.at(0.0)), {"kind": "exact", "dataset":
                                                                                      dataset}
    if cfg.truth == "empirical":
        x, y = load_dataset(dataset, "train", cfg.data_dir).tensors(device)
        return KernelMixture(x, y, test.num_classes, cfg.noise_std), {"kind": "empirical", "dataset": dataset,
                                                                     "noise_std": cfg.noise_std}
    from trainlib.posterior_training import load_posterior_net

    net = load_posterior_net(cfg.posterior_net, expected_num_classes=test.num_classes, device=device)
    return PosteriorNetPosterior(net, cfg.noise_std), {"kind": "posterior-net", "posterior_net": cfg.posterior_net,
                                                       "noise_std": cfg.noise_std}


class BayesClassifier(nn.Module):
    """p_θ = p_d: logits log p_d(·|x) of a differentiable data posterior (the Bayes row: R_SCORE = 0)."""

    def __init__(self, posterior):
        super().__init__()
        self.posterior = posterior

    def forward(self, x: Tensor) -> Tensor:
        return self.posterior.log_posterior(x)


def risk_record(model: nn.Module, x: Tensor, y: Tensor, truth, eps: float, norm: str, cfg: ScoreRiskConfig,
                label_accuracy: bool = True) -> dict:
    """The module docstring's numbers for one classifier on points (x, y) (label accuracies unless told not to)."""
    worst = worst_case(model, x, truth, eps=eps, norm=norm, steps=cfg.pgd_steps, restarts=cfg.restarts,
                       attacks=cfg.attacks, seed=cfg.seed)
    interval = lambda values: bootstrap_mean(values, seed=cfg.seed)
    label = dict.fromkeys(("clean_acc", "pgd_ce_acc", "pgd_cw_acc", "autoattack_acc"))
    if label_accuracy:
        label = evaluation.evaluate(model, x, y, eps, norm, autoattack=cfg.autoattack, seed=cfg.seed,
                                    batch_size=len(y)).record()
    return {
        "score_l1": interval(worst.score_l1), "score_kl": interval(worst.score_kl),
        "madry_kl": interval(worst.madry_kl), "standard_l1": interval(worst.standard_l1),
        "standard_kl": interval(worst.standard_kl), "agreement": float(worst.agreement.double().mean()),
        "per_attack_score_l1": {a: float(v["score_l1"].mean()) for a, v in worst.per_attack.items()},
        "score_l1_points": worst.score_l1.tolist(), "score_kl_points": worst.score_kl.tolist(),  # paired comparisons
        "label": {key: label[key] for key in ("clean_acc", "pgd_ce_acc", "pgd_cw_acc", "autoattack_acc")},
        "n_points": len(y), "eps": eps, "norm": norm,
    }


def analyse(classifier: sources.Classifier, cfg: ScoreRiskConfig) -> dict:
    device = sources.compute_device()
    settings = classifier.settings
    truth, description = truth_posterior(classifier.test, settings["dataset"], cfg, device)
    x, y = evaluation_points(classifier.test, range(min(cfg.n_points, len(classifier.test))), device)
    x = x.to(next(classifier.model.parameters()).dtype)
    record = risk_record(classifier.model, x, y, truth, settings["eps"], settings.get("norm", "linf"), cfg)
    return record | {"run": str(classifier.source), "objective": settings.get("objective"), "truth": description}


def run_analysis(cfg: ScoreRiskConfig, recompute: bool = False) -> list[dict]:
    with checking_input():
        cfg.validate()
        classifiers = [sources.open_classifier(run, cfg.which, torch.float32, cfg.data_dir) for run in cfg.runs]
        for classifier in classifiers:  # the truth of every run, before anything is computed or written
            truth_posterior(classifier.test, classifier.settings["dataset"], cfg, sources.compute_device())
    records = []
    for classifier in tqdm(classifiers, desc="SCORE risk", disable=len(classifiers) < 2):
        description = {"truth": cfg.truth} | ({} if cfg.truth == "auto" else {"noise_std": cfg.noise_std})
        if cfg.truth == "posterior-net":
            description["posterior_net"] = cfg.posterior_net
        settings = cfg.settings(description)
        records.append(sources.cached(classifier.source, RESULT_NAME, settings, analyse, classifier, cfg,
                                      recompute=recompute))
    return records


def interval_text(value: dict, sign: str = "") -> str:
    """"mean [low, high]" to 3 decimals (``sign="+"``: signed, for differences)."""
    return f"{value['mean']:{sign}.3f} [{value['low']:{sign}.3f}, {value['high']:{sign}.3f}]"


def format_table(records: list[dict], names: list[str] | None = None) -> str:
    """Markdown: per run the SCORE risks with 95 % intervals, R_Std, Madry, agreement and label accuracies (%)."""
    header = ["run", "objective", "R_SCORE^ℓ1", "R_SCORE^KL", "R_Std^ℓ1", "R_Madry^KL", "argmax agrees at x'",
              "clean", "PGD-40 CW", "AutoAttack"]
    rows = []
    for index, r in enumerate(records):
        name = names[index] if names else Path(r["run"]).name
        label = r["label"]
        rows.append([name, str(r.get("objective")), interval_text(r["score_l1"]), interval_text(r["score_kl"]),
                     f"{r['standard_l1']['mean']:.3f}", f"{r['madry_kl']['mean']:.3f}", f"{r['agreement']:.3f}",
                     str(label["clean_acc"]), str(label["pgd_cw_acc"]), str(label["autoattack_acc"] or "—")])
    return markdown_table(header, rows) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    cfg = parse_config(ScoreRiskConfig, argv, prog="python -m analysis.score_risk")
    records = run_analysis(cfg)
    table = format_table(records)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{RESULT_NAME}.md", "# SCORE risks\n\n" + table)
    print(table)
    print(f"settings: {config_to_dict(cfg)}")
    return records


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
