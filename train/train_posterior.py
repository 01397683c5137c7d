"""Train the posterior network p_phi(y | x, sigma): a noise-conditional classifier (cross-entropy + DLSM).

    python train/train_posterior.py                                   # digits: needs runs/scorenet-digits
    python train/train_posterior.py --config recipes/posterior-gmm-8x8.json
    accelerate launch --num_processes 8 train/train_posterior.py --dataset cifar10 --scorenet runs/sn-c10 \\
        --out runs/posterior-c10

The EMA network is saved to <out>/posterior_net/ (``trainlib.posterior_training.load_posterior_net``); direct SCORE
uses it with ``--posterior posterior-net --posterior-net <out>``. Options: ``trainlib.posterior_training.
PosteriorNetConfig`` (``--help``).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from trainlib.cli import run_cli
from trainlib.config import parse_config
from trainlib.posterior_training import PosteriorNetConfig, train

if __name__ == "__main__":
    run_cli(lambda: train(parse_config(PosteriorNetConfig, prog="train/train_posterior.py")))
