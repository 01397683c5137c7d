"""Evaluate a trained classifier: clean, PGD (CE and CW margin) and AutoAttack accuracy on the first n test points.

    python train/evaluate.py --checkpoint runs/classifier-digits --n-examples 360
    python train/evaluate.py --checkpoint runs/cifar10-linf-wrn-28-10-se-beta4 --which best   # full test set

Writes robustbench.json (clean_acc, autoattack_acc, eps, n_examples, ...), evaluation.json and accuracy_vs_eps.png
into --out (default: <run>/eval). Options: ``trainlib.evaluate_command.EvaluateConfig`` (``--help``).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from trainlib.cli import run_cli
from trainlib.config import parse_config
from trainlib.evaluate_command import EvaluateConfig, evaluate_checkpoint

if __name__ == "__main__":
    run_cli(lambda: evaluate_checkpoint(parse_config(EvaluateConfig, prog="train/evaluate.py")))
