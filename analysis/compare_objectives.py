"""Train a set of recipes and tabulate clean / PGD / AutoAttack accuracy: the objectives compared by one command.

    python -m analysis.compare_objectives --out runs/compare-digits

For every recipe (default: the five digits recipes — standard, PGD-AT, TRADES-KL, TRADES-SE, direct SCORE) it
trains into ``<out>/<recipe name>`` (a finished run, i.e. one with ``results.json``, is reused; an interrupted one
is resumed from its latest checkpoint), then evaluates the final EMA weights with ``train/evaluate.py``'s library
function (clean, PGD-40 CE and CW, AutoAttack ``standard``, sanity checks) on the first ``--n-test`` test points.
Direct-SCORE recipes use the score net at ``--scorenet``; if none is there, one is trained first with the default
``train/train_scorenet.py`` settings. Writes ``comparison.json`` and ``comparison.md`` into ``--out`` and prints the
table. Accuracies are percentages.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from trainlib import adversarial, scorenet_training
from trainlib.config import load_recipe, parse_config, run_cli
from trainlib.files import atomic_write_json, atomic_write_text

from .markdown import markdown_table

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
DIGITS_RECIPES = tuple(
    str(RECIPES_DIR / f"digits-{name}.json")
    for name in ("standard", "pgd-at", "trades-kl", "trades-se", "direct-score")
)
COLUMNS = (("clean_acc", "clean"), ("pgd_ce_acc", "PGD-40 CE"), ("pgd_cw_acc", "PGD-40 CW"),
           ("autoattack_acc", "AutoAttack"))  # fmt: skip


@dataclass
class CompareConfig:
    """Train each recipe, evaluate it the same way, and write one comparison table."""

    recipes: tuple[str, ...] = field(default=DIGITS_RECIPES, metadata={"help": "recipe files to train and compare"})
    scorenet: str = field(default="runs/scorenet-digits",
                          metadata={"help": "score net of direct-SCORE recipes (trained here if missing)"})  # fmt: skip
    out: str = field(default="runs/compare-digits", metadata={"help": "output directory (one run per recipe)"})
    n_test: int | None = field(default=None, metadata={"help": "first n test points to evaluate (none: all)"})
    autoattack: bool = field(default=True, metadata={"help": "run AutoAttack standard in the evaluation"})
    epochs: int | None = field(default=None, metadata={"help": "override every recipe's epochs (none: the recipe's)"})
    scorenet_steps: int | None = field(default=None, metadata={"help": "steps of a score net trained here"})
    seed: int = field(default=0, metadata={"help": "seed of every run and of the evaluation"})

    def validate(self) -> None:
        if not self.recipes:
            raise ValueError("no recipes given")
        for path in self.recipes:
            if not Path(path).is_file():
                raise FileNotFoundError(f"recipe file not found: {path}")
        if self.n_test is not None and self.n_test < 1:
            raise ValueError(f"n_test must be >= 1, got {self.n_test}")


def _training_config(recipe: Path, cfg: CompareConfig) -> adversarial.AdversarialConfig:
    """The recipe's config with the run directory, seed and score net of this comparison."""
    values = load_recipe(adversarial.AdversarialConfig, recipe)  # clear errors; DirectScoreConfig has the same keys
    objective = values.get("objective", adversarial.AdversarialConfig.objective)
    cls = adversarial.DirectScoreConfig if objective == "direct-score" else adversarial.AdversarialConfig
    values.update(out=str(Path(cfg.out) / recipe.stem), seed=cfg.seed, autoattack=False)
    if objective == "direct-score":
        values["scorenet"] = cfg.scorenet
    if cfg.epochs is not None:
        values["epochs"] = cfg.epochs
    training = cls(**values)
    training.validate()
    return training


def _ensure_scorenet(cfg: CompareConfig) -> None:
    if (Path(cfg.scorenet) / "scorenet").is_dir() or (Path(cfg.scorenet) / "scorenet_config.json").is_file():
        return
    print(f"no score net at {cfg.scorenet}: training one with the default train/train_scorenet.py settings")
    overrides = {"out": cfg.scorenet, "seed": cfg.seed}
    if cfg.scorenet_steps is not None:
        overrides["steps"] = cfg.scorenet_steps
    scorenet_training.train(scorenet_training.ScoreNetConfig(**overrides))


def _train(training: adversarial.AdversarialConfig) -> None:
    run = Path(training.out)
    if (run / "results.json").is_file():
        print(f"{run}: finished run found, not retrained")
        return
    if (run / "config.json").is_file():
        training = dataclasses.replace(training, resume="latest")
    adversarial.train(training)


def _evaluate(training: adversarial.AdversarialConfig, cfg: CompareConfig) -> dict:
    run = Path(training.out)
    evaluation = adversarial.EvaluateConfig(
        checkpoint=str(run), n_examples=cfg.n_test, autoattack=cfg.autoattack, seed=cfg.seed, eps_curve=(),
        out=str(run / "eval"),
    )  # fmt: skip
    return adversarial.evaluate_checkpoint(evaluation)


def format_table(rows: list[dict]) -> str:
    """A Markdown table: one row per recipe, accuracies in percent, and whether the sanity checks passed."""
    header = ["recipe", "objective", *(title for _, title in COLUMNS), "sanity checks"]
    cells = []
    for row in rows:
        record = row["record"]
        failed = [c["name"] for c in record.get("sanity_checks", []) if not c["passed"]]
        cells.append([row["recipe"], row["objective"], *(str(record.get(key) or "—") for key, _ in COLUMNS),
                      "passed" if not failed else "failed: " + ", ".join(failed)])
    return markdown_table(header, cells) + "\n"


def compare(cfg: CompareConfig) -> list[dict]:
    cfg.validate()
    trainings = [(Path(recipe), _training_config(Path(recipe), cfg)) for recipe in cfg.recipes]  # bad input first
    if any(training.objective == "direct-score" and training.posterior == "scorenet" for _, training in trainings):
        _ensure_scorenet(cfg)
    rows = []
    for recipe, training in trainings:
        _train(training)
        record = _evaluate(training, cfg)
        rows.append({"recipe": recipe.stem, "objective": training.objective, "run": training.out, "record": record})
    out = Path(cfg.out)
    eps = rows[0]["record"]["eps"]
    table = format_table(rows)
    caption = (f"Accuracy (%) on the first {rows[0]['record']['n_examples']} test points, "
               f"{rows[0]['record']['threat_model']} eps = {eps}; final EMA weights of each run.\n\n")  # fmt: skip
    atomic_write_json(out / "comparison.json", {"config": dataclasses.asdict(cfg), "rows": rows})
    atomic_write_text(out / "comparison.md", "# Objectives compared\n\n" + caption + table)
    print("\n" + caption + table)
    return rows


def main() -> None:
    run_cli(lambda: compare(parse_config(CompareConfig, prog="python -m analysis.compare_objectives")))


if __name__ == "__main__":
    main()
