"""Adversarially train a classifier (default: TRADES-SE, the paper's upper bound of SCORE) on digits or CIFAR.

    python train/train_classifier.py --config recipes/digits-trades-se.json
    accelerate launch --num_processes 8 train/train_classifier.py --config recipes/cifar10-linf-wrn-28-10-se-beta4.json

Options: ``trainlib.adversarial.AdversarialConfig`` (``--help``); the run directory layout: ``trainlib.rundir``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from trainlib.adversarial import AdversarialConfig, train
from trainlib.cli import run_cli
from trainlib.config import parse_config

if __name__ == "__main__":
    run_cli(lambda: train(parse_config(AdversarialConfig, prog="train/train_classifier.py")))
