"""Training dynamics from per-epoch snapshots: accuracy, estimated SCORE, Madry's KL error against Corollary 1's floor,
and gradient alignment, epoch by epoch and across objectives.

    python -m analysis.dynamics runs/digits-standard runs/digits-pgd-at runs/digits-trades-kl runs/digits-trades-se \\
        runs/digits-direct-score --scorenet runs/scorenet-digits --out runs/analysis

Runs must have been trained with ``--snapshot-every N`` (the digits recipes use 1): ``<run>/snapshots/
epoch_NNNN.safetensors`` holds the EMA weights after each N-th epoch. For at most ``--max-snapshots`` of them per run
(evenly spaced, first and last included; 0: all) and the first ``--n-points`` test points (the same points and attack
seeds for every epoch and run), with the run's threat model and the data posterior of ``analysis.sources``:

    val accuracy      val/clean_acc and val/pgd40_cw_acc from metrics.jsonl (every epoch; the last record per epoch)
    R_Std^D           E D(p_d(·|x) || p_θ(·|x)), D = KL and ℓ1, at the clean points
    R_SCORE^D         E max_{x'∈B(x)} D(p_d(·|x') || p_θ(·|x')) by PGD on the full-gradient loss (``--pgd-steps``
                      steps of ε/4, uniform start, clamped to [0, 1], best iterate; D in ``--score-distances``)
    R_Madry^KL        E max_{x'∈B(x)} KL(p_d(·|x) || p_θ(·|x')) by the same PGD
    C^ℓ1              E max_{x'∈B(x)} ℓ1(p_d(·|x), p_d(·|x')): model-free, computed once per run
    Corollary 1       |R_SCORE^ℓ1 − C^ℓ1| ≤ sqrt(2 R_Madry^KL), and the floor R_Madry^KL ≥ (C^ℓ1)²/2 that a model with
                      R_SCORE^ℓ1 = 0 must respect: Madry's KL error far below it signals overfitting (the paper's
                      explanation of early stopping)
    alignment         Theorem 4's A = E||∇p_d(Y|x) − ∇p_θ(Y|x)||_q, the general coefficient, the sign-condition fraction
                      and cos(∇ log p_θ, ∇ log p_d) at the clean points (``datagrad.alignment_terms``)

Attacks under-solve the maxima, so every max-based risk is a lower estimate. Results are cached in
``<run>/analysis/dynamics.json`` (per epoch, with the snapshot's digest; an interrupted analysis continues), figures
``<out>/dynamics_<run>.png`` (four panels per run) and ``<out>/alignment_vs_robustness.png`` (all runs).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from datagrad import PGD, alignment_terms, intrinsic_risk, madry_risk, score_risk, standard_risk
from trainlib.classifiers import list_snapshots
from trainlib.cli import checking_input, run_cli
from trainlib.config import config_to_dict, option, parse_config, positional

from . import sources

RESULT_NAME = "dynamics"
VAL_METRICS = ("val/clean_acc", "val/pgd40_cw_acc")


@dataclass
class DynamicsConfig(sources.PosteriorOptions):
    """Per-epoch accuracy, SCORE, Madry KL vs the Corollary 1 floor, and alignment, from each run's snapshots."""

    runs: tuple[str, ...] = positional("training run directories with snapshots/", ())
    n_points: int = option("first n test points (the same for every epoch and run)", 100)
    max_snapshots: int = option("snapshots analysed per run, evenly spaced incl. first and last (0: all)", 10)
    pgd_steps: int = option("PGD steps (step eps/4, uniform start, clamp [0, 1], best iterate) of every attack", 10)
    score_distances: tuple[str, ...] = option("distances of the estimated SCORE (l1 is needed for Corollary 1)",
                                              ("l1",))
    seed: int = option("seed of the attacks' random starts (the same for every epoch)", 0)
    float64: bool = option("compute in float64 (the classifier is cast; the score net runs in its own dtype)", True)
    out: str = option("directory of the figures", "runs/analysis")

    def validate(self) -> None:
        super().validate()
        if self.n_points < 1 or self.pgd_steps < 1 or self.max_snapshots < 0:
            raise ValueError("n_points and pgd_steps must be >= 1 and max_snapshots >= 0")
        if "l1" not in self.score_distances or not set(self.score_distances) <= {"kl", "l1", "l2"}:
            raise ValueError(f"score_distances must include l1 and be among kl, l1, l2; got {self.score_distances}")

    def settings(self, data: sources.DataSource) -> dict:
        keep = ("n_points", "pgd_steps", "score_distances", "seed", "float64")
        return {**{k: v for k, v in config_to_dict(self).items() if k in keep}, "posterior": data.description}


def validation_metrics(run: Path) -> dict[int, dict]:
    """epoch → {val/clean_acc, val/pgd40_cw_acc} from metrics.jsonl (a resumed epoch may log twice: the last wins)."""
    path = run / "metrics.jsonl"
    per_epoch = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if "epoch" in record and all(k in record for k in VAL_METRICS):
                per_epoch[int(record["epoch"])] = {k: record[k] for k in VAL_METRICS}
    return per_epoch


def select_snapshots(snapshots: list[tuple[int, Path]], limit: int) -> list[tuple[int, Path]]:
    """At most ``limit`` snapshots, evenly spaced, first and last included (0: all)."""
    if limit == 0 or len(snapshots) <= limit:
        return snapshots
    indices = sorted({round(i) for i in np.linspace(0, len(snapshots) - 1, limit)})
    return [snapshots[i] for i in indices]


class Evaluator:
    """The per-epoch quantities for one dataset: fixed points, attacks with fixed seeds, the data posterior."""

    def __init__(self, classifier: sources.Classifier, data: sources.DataSource, cfg: DynamicsConfig):
        self.cfg, self.data = cfg, data
        self.dtype = torch.float64 if cfg.float64 else torch.float32
        self.x, self.y = sources.test_points(classifier.test, cfg.n_points, self.dtype)
        self.norm, self.eps = classifier.settings["norm"], float(classifier.settings["eps"])
        self.x = self.x.clamp(0.0, 1.0)  # attacks are clamped to [0, 1]: start inside (a no-op for images)
        self.attack = PGD(self.eps, self.eps / 4, cfg.pgd_steps, self.norm, random_start=True, clamp=(0.0, 1.0))
        # queried at the clean points only (anchor), so one object serves every epoch without changing state
        self.clean_posterior = data.posterior(self.x, self.y)
        self._intrinsic = None

    def generator(self) -> torch.Generator:
        return torch.Generator(device=self.x.device).manual_seed(self.cfg.seed)

    def intrinsic_l1(self) -> float:
        """C^ℓ1 (model-free; computed once)."""
        if self._intrinsic is None:
            posterior = self.data.posterior(self.x, self.y)
            self._intrinsic = intrinsic_risk(self.x, posterior, self.attack, "l1", generator=self.generator()).item()
        return self._intrinsic

    def epoch(self, classifier: sources.Classifier) -> dict:
        self.data.check(classifier)
        model, x, y = classifier.model, self.x, self.y
        with torch.no_grad():
            clean_acc = float((model(x).argmax(1) == y).double().mean())
        record = {"clean_acc_subset": clean_acc}
        for distance in ("kl", "l1"):
            record[f"standard_{distance}"] = standard_risk(model, x, self.clean_posterior, distance).item()
        for distance in self.cfg.score_distances:
            posterior = self.data.posterior(x, y)  # fresh: the trajectory follows this attack's path
            record[f"score_{distance}"] = score_risk(model, x, posterior, self.attack, distance,
                                                     generator=self.generator()).item()
        record["madry_kl"] = madry_risk(model, x, self.clean_posterior, self.attack, "kl",
                                        generator=self.generator()).item()
        terms = alignment_terms(model, x, self.clean_posterior, self.norm).summary()
        record |= {f"alignment/{name}": value for name, value in terms.items()}
        intrinsic = self.intrinsic_l1()
        lhs, rhs = abs(record["score_l1"] - intrinsic), math.sqrt(2 * max(record["madry_kl"], 0.0))
        record |= {"corollary1_lhs": lhs, "corollary1_rhs": rhs, "corollary1_holds": lhs <= rhs + 1e-9}
        return record


def analyse_run(run: Path, evaluator: Evaluator, cfg: DynamicsConfig, settings: dict) -> dict:
    """Per-epoch records of one run, reusing the cached ones (same settings and snapshot digest)."""
    path = sources.cache_path(run, RESULT_NAME)
    cached = sources.read_cache(path, settings) or {}
    done = {e["epoch"]: e for e in cached.get("epochs", [])}
    intrinsic = evaluator.intrinsic_l1()
    result = {"run": str(run), "objective": json.loads((run / "config.json").read_text())["config"].get("objective"),
              "intrinsic_l1": intrinsic, "madry_kl_floor": intrinsic**2 / 2, "validation": validation_metrics(run),
              "epochs": []}
    for epoch, snapshot in tqdm(select_snapshots(list_snapshots(run), cfg.max_snapshots), desc=run.name):
        digest = sources.file_digest(snapshot)
        if epoch in done and done[epoch]["snapshot_digest"] == digest:
            result["epochs"].append(done[epoch])
            continue
        classifier = sources.open_classifier(snapshot, dtype=evaluator.dtype, data_dir=cfg.data_dir)
        result["epochs"].append({"epoch": epoch, "snapshot": snapshot.name, "snapshot_digest": digest,
                                 **evaluator.epoch(classifier)})
        sources.write_cache(path, settings, result)  # after every epoch: an interruption loses one at most
    return sources.write_cache(path, settings, result)


def run_analysis(cfg: DynamicsConfig) -> list[dict]:
    with checking_input():  # every run and its first snapshot, before anything is computed or written
        cfg.validate()
        plan, evaluators = [], {}
        for run in cfg.runs:
            run = sources.check_run_dir(run)
            snapshots = list_snapshots(run)
            if not snapshots:
                raise ValueError(f"{run} has no per-epoch snapshots (snapshots/epoch_NNNN.safetensors): train it "
                                 "with --snapshot-every 1")
            first = sources.open_classifier(snapshots[0][1], dtype=torch.float64 if cfg.float64 else torch.float32,
                                            data_dir=cfg.data_dir)
            key = (first.test.name, first.settings["norm"], first.settings["eps"])
            if key not in evaluators:
                evaluators[key] = Evaluator(first, sources.DataSource(first, cfg), cfg)
            plan.append((run, evaluators[key]))
    return [analyse_run(run, evaluator, cfg, cfg.settings(evaluator.data)) for run, evaluator in plan]


# -- figures ----------------------------------------------------------------------------------------------------------
def plot_run(path: Path, record: dict) -> Path:
    """Four panels against epoch: accuracy; SCORE and standard risks with C^ℓ1; Madry KL with its floor; alignment."""
    from matplotlib.ticker import ScalarFormatter

    from .plotting import PALETTE, plt, save_figure, style

    epochs = [e["epoch"] for e in record["epochs"]]
    validation = {int(k): v for k, v in record["validation"].items()}
    with style():
        figure, ((acc, risk), (madry, align)) = plt.subplots(2, 2, figsize=(11, 7.5), layout="constrained")
        val_epochs = sorted(validation)
        acc.plot(val_epochs, [100 * validation[e]["val/clean_acc"] for e in val_epochs], label="val clean")
        acc.plot(val_epochs, [100 * validation[e]["val/pgd40_cw_acc"] for e in val_epochs], label="val PGD-40 CW")
        acc.plot(epochs, [100 * e["clean_acc_subset"] for e in record["epochs"]], "o", ms=3,
                 label=f"clean, {record['settings']['n_points']} test points")
        acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
        for distance, color, shown in (("l1", PALETTE[0], "ℓ1"), ("kl", PALETTE[3], "KL"), ("l2", PALETTE[4], "ℓ2")):
            if f"score_{distance}" in record["epochs"][0]:
                risk.plot(epochs, [e[f"score_{distance}"] for e in record["epochs"]], "o-", color=color,
                          label=f"R_SCORE^{shown} (PGD)")
        risk.plot(epochs, [e["standard_l1"] for e in record["epochs"]], "s--", color=PALETTE[1], label="R_Std^ℓ1")
        risk.axhline(record["intrinsic_l1"], color="gray", ls=":", label=f"C^ℓ1 = {record['intrinsic_l1']:.3f}")
        risk.set(xlabel="epoch", ylabel="risk (ℓ1: unitless in [0, 2]; KL: nats)", title="estimated SCORE")
        madry.plot(epochs, [e["madry_kl"] for e in record["epochs"]], "o-", label="R_Madry^KL (PGD)")
        madry.axhline(record["madry_kl_floor"], color=PALETTE[1], ls="--",
                      label=f"Corollary 1 floor (C^ℓ1)²/2 = {record['madry_kl_floor']:.3f}")
        madry.set(xlabel="epoch", ylabel="KL (nats)", yscale="log", title="Madry KL error vs Corollary 1")
        madry.yaxis.set_major_formatter(ScalarFormatter())
        madry.yaxis.set_minor_formatter(ScalarFormatter())
        align.plot(epochs, [e["alignment/alignment"] for e in record["epochs"]], "o-",
                   label="A = E‖∇p_d(Y|x) − ∇p_θ(Y|x)‖_q")
        align.set(xlabel="epoch", ylabel="A (probability per pixel unit)", title="gradient alignment (Theorem 4)")
        cosine = align.twinx()
        cosine.plot(epochs, [e["alignment/cosine"] for e in record["epochs"]], "s--", color=PALETTE[2],
                    label="cos(∇log p_θ, ∇log p_d)")
        cosine.set_ylabel("cosine (unitless)")
        cosine.spines["right"].set_visible(True)
        lines = align.get_legend_handles_labels()[0] + cosine.get_legend_handles_labels()[0]
        align.legend(lines, [line.get_label() for line in lines], loc="lower right")
        acc.legend()
        top = max(record["intrinsic_l1"], *(v for e in record["epochs"] for k, v in e.items()
                                            if k.startswith(("score_", "standard_l1"))))
        risk.set_ylim(0, 1.35 * top)  # room for the legend above the curves
        risk.legend(loc="upper right", ncol=3, fontsize=8)
        madry.legend()
        figure.suptitle(f"{Path(record['run']).name} ({record['objective']})")
        return save_figure(figure, path)


def plot_alignment_vs_robustness(path: Path, records: list[dict]) -> Path:
    """Robust (val PGD-40 CW) accuracy against A and against the cosine, one trajectory per run, last epoch marked."""
    from .plotting import PALETTE, plt, save_figure, style

    with style():
        figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True, layout="constrained")
        for index, record in enumerate(records):
            validation = {int(k): v for k, v in record["validation"].items()}
            rows = [e for e in record["epochs"] if e["epoch"] in validation]
            if not rows:
                continue
            robust = [100 * validation[e["epoch"]]["val/pgd40_cw_acc"] for e in rows]
            color, name = PALETTE[index % len(PALETTE)], f"{Path(record['run']).name}"
            for axes, key in ((left, "alignment/alignment"), (right, "alignment/cosine")):
                values = [e[key] for e in rows]
                axes.plot(values, robust, "o-", color=color, ms=3, lw=1, alpha=0.6)
                axes.plot(values[-1:], robust[-1:], "*", color=color, ms=12, label=f"{name} (last epoch ★)")
        left.set(xlabel="A = E‖∇p_d(Y|x) − ∇p_θ(Y|x)‖_q (probability per pixel unit)",
                 ylabel="val PGD-40 CW accuracy (%)", title="alignment term vs robustness")
        right.set(xlabel="cos(∇_x log p_θ(Y|x), ∇_x log p_d(Y|x)) (unitless)", title="gradient direction vs robustness")
        right.legend(fontsize=8)
        return save_figure(figure, path)


def main(argv: list[str] | None = None) -> list[dict]:
    cfg = parse_config(DynamicsConfig, argv, prog="python -m analysis.dynamics")
    records = run_analysis(cfg)
    out = Path(cfg.out)
    figures = [plot_run(out / f"dynamics_{Path(r['run']).name}.png", r) for r in records]
    figures.append(plot_alignment_vs_robustness(out / "alignment_vs_robustness.png", records))
    for r in records:
        last = r["epochs"][-1]
        print(f"{Path(r['run']).name}: C^l1 {r['intrinsic_l1']:.4f}, floor {r['madry_kl_floor']:.4f}; epoch "
              f"{last['epoch']}: R_SCORE^l1 {last['score_l1']:.4f}, R_Madry^KL {last['madry_kl']:.4f}, "
              f"A {last['alignment/alignment']:.4f}, cos {last['alignment/cosine']:.3f}")
    print("wrote " + ", ".join(str(f) for f in figures))
    return records


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
