"""Train a class-conditional score network (diffusers UNet, DSM, EMA) on digits, CIFAR, toys or npz data.

    python train/train_scorenet.py                                   # digits, tiny8
    python train/train_scorenet.py --resume latest                   # continue the run in --out
    accelerate launch --num_processes 8 train/train_scorenet.py --dataset cifar10 --train-steps 400000 --out runs/sn-c10

The EMA score net is saved to <out>/scorenet/ (``ScoreNet.from_pretrained``). Options:
``trainlib.scorenet_training.ScoreNetConfig`` (``--help``); run directory layout: ``trainlib.rundir``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from trainlib.cli import run_cli
from trainlib.config import parse_config
from trainlib.scorenet_training import ScoreNetConfig, train

if __name__ == "__main__":
    run_cli(lambda: train(parse_config(ScoreNetConfig, prog="train/train_scorenet.py")))
