"""Generate class-conditional pseudo-data with a trained score net: SCORE/DeepMind-format .npz shards + a grid.

    python train/generate.py --scorenet runs/scorenet-digits --num-images 1000 --out runs/generated-digits
    accelerate launch --num_processes 8 train/generate.py --scorenet runs/sn-c10 --num-images 1000000 \\
        --sampler dpmsolver++ --steps 20 --shard-size 50000 --out runs/generated-c10
    python -m trainlib.quality --generated runs/generated-digits --dataset digits     # the quality report

Re-running the same command resumes (finished shards are kept). Options: ``trainlib.generation.GenerateConfig``
(``--help``); file format, seeding and filtering rules: ``trainlib.generation``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from trainlib.cli import run_cli
from trainlib.config import parse_config
from trainlib.generation import GenerateConfig, generate

if __name__ == "__main__":
    run_cli(lambda: generate(parse_config(GenerateConfig, prog="train/generate.py")))
