"""The evaluate command (``train/evaluate.py``): clean, PGD CE / CW and AutoAttack accuracy of a trained classifier.

The classifier comes from ``trainlib.classifiers.load_classifier`` (a run directory, a step checkpoint folder or a
weights file); the threat model is the training one unless ``--norm`` / ``--eps`` say otherwise. Writes
``robustbench.json`` (RobustBench-style record), ``evaluation.json`` (the record, the accuracy-vs-ε curve, the
checkpoint) and ``accuracy_vs_eps.png`` into ``--out`` (default: ``<run>/eval`` or next to the weights).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from . import evaluation
from .accuracy import THREAT_MODELS, pgd_accuracy_curve
from .classifiers import load_classifier
from .cli import checking_input
from .config import Options, option
from .datasets import load_dataset
from .files import atomic_path, atomic_write_json


@dataclass
class EvaluateConfig(Options):
    """Evaluate a trained classifier: clean, PGD CE/CW and AutoAttack on the first n test points, RobustBench JSON."""

    checkpoint: str = option("run directory, step checkpoint folder or .safetensors weights", "runs/classifier-digits")
    weights: Literal["ema", "model"] = option("which weights of a run / checkpoint: EMA or raw", "ema")
    which: Literal["final", "best"] = option("in a run directory: final weights or best/ (by validation)", "final")
    model: str | None = option("model name (none: from the run config or the weights' metadata)", None)
    dataset: str | None = option("dataset (none: from the run config or the weights' metadata)", None)
    data_dir: str = option("where CIFAR is downloaded to / read from", "data")
    norm: Literal["linf", "l2"] | None = option("threat norm (none: the training one)", None)
    eps: float | None = option("threat radius (none: the training one)", None, gt=0)
    n_examples: int | None = option("first n test points (none: all)", None, ge=1)
    autoattack: bool = option("run AutoAttack", True)
    autoattack_version: Literal["standard", "plus", "rand", "apgd-ce"] = option("AutoAttack version", "standard")
    pgd_steps: int = option("PGD steps", 40, ge=1)
    pgd_restarts: int = option("PGD random restarts", 1, ge=1)
    eps_curve: tuple[float, ...] = option(
        "eps multipliers of the PGD-CW accuracy-vs-eps figure (empty: none)", (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0))
    batch_size: int = option("evaluation batch size", 256, ge=1)
    seed: int = option("seed of PGD starts and AutoAttack", 0)
    cpu_threads: int | None = option("torch threads on the CPU (none: torch's default)", None, ge=1)
    out: str | None = option("output directory (none: <run>/eval or next to the weights)", None)

    def validate(self) -> None:
        super().validate()
        if any(m < 0 for m in self.eps_curve):
            raise ValueError(f"eps_curve multipliers must be >= 0, got {list(self.eps_curve)}")


def evaluate_checkpoint(cfg: EvaluateConfig) -> dict:
    """Evaluate (module docstring); returns the RobustBench-style record."""
    with checking_input():
        cfg.validate()
        loaded = load_classifier(cfg.checkpoint, which=cfg.which, weights=cfg.weights, model=cfg.model,
                                 dataset=cfg.dataset, data_dir=cfg.data_dir)
        settings = loaded.settings
        model_name, dataset = settings["model"], settings["dataset"]
        norm = cfg.norm or settings.get("norm", "linf")
        eps = cfg.eps if cfg.eps is not None else settings.get("eps")
        if eps is None:
            raise ValueError("cannot tell the threat radius from the checkpoint; pass --eps")
        test = load_dataset(dataset, "test", cfg.data_dir, settings["num_classes"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.cpu_threads is not None and device.type == "cpu":
        torch.set_num_threads(cfg.cpu_threads)
    model = loaded.model.to(device).eval()
    n = min(cfg.n_examples or len(test), len(test))
    x, y = evaluation.evaluation_points(test, range(n), device)
    result = evaluation.evaluate(
        model, x, y, eps, norm, autoattack=cfg.autoattack, autoattack_version=cfg.autoattack_version,
        pgd_steps=cfg.pgd_steps, pgd_restarts=cfg.pgd_restarts, seed=cfg.seed, batch_size=cfg.batch_size,
        progress=True,
    )
    out = Path(cfg.out) if cfg.out else loaded.default_out
    out.mkdir(parents=True, exist_ok=True)
    record = result.record(name=Path(cfg.checkpoint).name, dataset=dataset, architecture=model_name,
                           weights=cfg.weights)
    atomic_write_json(out / "robustbench.json", record)
    curve = {}
    if cfg.eps_curve:
        eps_values = [m * eps for m in cfg.eps_curve]
        accuracies = pgd_accuracy_curve(model, x, y, eps_values, norm, seed=cfg.seed, steps=cfg.pgd_steps,
                                        batch_size=cfg.batch_size)
        curve = {"eps": eps_values, "pgd_cw_acc": accuracies}
        plot_accuracy_vs_eps(out / "accuracy_vs_eps.png", eps_values, {f"PGD-{cfg.pgd_steps} CW": accuracies}, norm,
                             title=f"{model_name} on {dataset}")
    atomic_write_json(out / "evaluation.json", {"record": record, "accuracy_vs_eps": curve,
                                                "checkpoint": str(cfg.checkpoint)})
    aa = "" if record["autoattack_acc"] is None else f", AutoAttack {record['autoattack_acc']}"
    print(f"{model_name} on {dataset} ({n} test points, eps {record['eps']} {record['threat_model']}): clean "
          f"{record['clean_acc']}, PGD CE {record['pgd_ce_acc']}, PGD CW {record['pgd_cw_acc']}{aa} (%); "
          f"sanity checks passed: {record['sanity_passed']}; wrote {out}")
    return record


def plot_accuracy_vs_eps(
    path: str | Path, eps_values: Sequence[float], curves: Mapping[str, Sequence[float]], norm: str = "linf",
    title: str | None = None,
) -> None:
    """Save accuracy (%) against ε·255 for each labelled curve as a PNG, atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.5, 3.2), dpi=150)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    scaled = [255 * eps for eps in eps_values]
    for label, accuracies in curves.items():
        axes.plot(scaled, [100 * acc for acc in accuracies], marker="o", label=label)
    axes.set(xlabel=f"ε × 255 ({THREAT_MODELS[norm]})", ylabel="accuracy (%)", ylim=(0, 100), title=title or "")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
