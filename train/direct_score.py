"""Direct SCORE training: max and min of D(p_d(.|x') || p_theta(.|x')) with p_d(.|x') from a score network.

    python train/direct_score.py --config recipes/digits-direct-score.json
    accelerate launch train/direct_score.py --scorenet runs/scorenet-digits --out runs/direct-score-digits

Options: ``trainlib.adversarial.DirectScoreConfig`` (``--help``); the score net comes from train/train_scorenet.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from trainlib.adversarial import DirectScoreConfig, train
from trainlib.cli import run_cli
from trainlib.config import parse_config

if __name__ == "__main__":
    run_cli(lambda: train(parse_config(DirectScoreConfig, prog="train/direct_score.py")))
