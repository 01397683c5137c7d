"""Direct SCORE training: max and min of D(p_d(.|x') || p_theta(.|x')) with the full data gradient of p_d.

    accelerate launch train/direct_score.py                                   # the default digits job
    python train/direct_score.py --config recipes/gmm-8x8-direct-score.json    # any recipe; flags override it

Options: ``trainlib.adversarial.DirectScoreConfig`` (``--help``). p_d(.|x') comes from ``--posterior``
(``trainlib.data_posterior``: the posterior net by default, the score-net trajectory, the exact smoothed training set,
or a closed form). With no flags the default digits score net and posterior net are trained first when missing.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from trainlib.adversarial import DirectScoreConfig, train
from trainlib.cli import run_cli
from trainlib.config import parse_config

if __name__ == "__main__":
    run_cli(lambda: train(parse_config(DirectScoreConfig, prog="train/direct_score.py")))
