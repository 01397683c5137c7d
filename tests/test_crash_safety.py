"""Fault injection: the real entry points (score-net training, classifier training, generation) are started as
subprocesses, killed with SIGKILL at a seeded random point after their k-th checkpoint or shard, then resumed with
``--resume latest`` (generation: the same command again) and compared with one uninterrupted run each: training ends
with bit-identical weights, generation with byte-identical shards. Each scenario also leaves a stray temporary
(ignored, then removed) and the score-net one truncates the newest checkpoint (skipped with a warning, the previous
good one is used). The kill point comes from ``random.Random(TRAINLIB_CRASH_SEED)`` (default 0): set the variable to
explore other points. CPU, one thread, tiny models; the references and resumes run in this process."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from scorenets import ScoreNet
from trainlib.adversarial import AdversarialConfig
from trainlib.adversarial import train as train_classifier
from trainlib.checkpoint import CheckpointWarning, list_checkpoints, load_weights
from trainlib.cli import run_cli
from trainlib.config import parse_config
from trainlib.files import is_temporary, temporary_path
from trainlib.generation import GenerateConfig, generate
from trainlib.scorenet_training import ScoreNetConfig
from trainlib.scorenet_training import train as train_scorenet

ROOT = Path(__file__).resolve().parent.parent
SEED = int(os.environ.get("TRAINLIB_CRASH_SEED", "0"))

SCORENET = ["--dataset", "gmm-4x4", "--preset", "tiny8", "--channels", "8", "16", "--batch-size", "8", "--train-steps",
            "12", "--warmup-steps", "2", "--checkpoint-every", "1", "--keep-last", "3", "--log-every", "4"]
CLASSIFIER = ["--dataset", "digits", "--model", "mlp-bn", "--objective", "trades-se", "--eps", "0.2", "--step-size",
              "0.1", "--pgd-steps", "2", "--batch-size", "32", "--epoch-size", "128", "--epochs", "3", "--n-val", "16",
              "--n-test", "16", "--cpu-threads", "1", "--checkpoint-every", "1", "--keep-last", "2", "--log-every",
              "4", "--eval-batch-size", "64"]  # 4 steps per epoch, 12 steps, validation every epoch
NO_STEP_CHECKPOINTS = ["--checkpoint-every", "0"]  # references: saving never changes the weights, only costs time
GENERATE = ["--num-images", "24", "--shard-size", "2", "--batch-size", "2", "--sampler-steps", "4", "--grid-columns",
            "2"]


def kill_point(salt: int, low: int, high: int) -> tuple[int, float]:
    """(k, delay): kill ``delay`` seconds (0-50 ms) after the k-th checkpoint / shard appears, k in [low, high]."""
    rng = random.Random(SEED * 1000 + salt)
    return rng.randint(low, high), rng.uniform(0.0, 0.05)


def start(script: str, argv: list[str], workdir: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRAINLIB_DEBUG": ""}
    with open(workdir / f"{Path(script).stem}.stderr", "w") as log:  # the child keeps its own copy
        return subprocess.Popen([sys.executable, str(ROOT / "train" / script), *argv], cwd=workdir, env=env,
                                stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)


def kill_when(process: subprocess.Popen, ready, delay: float, timeout: float = 300.0) -> None:
    """SIGKILL ``process`` ``delay`` seconds after ``ready()`` first holds; fail if it ended on its own before."""
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert process.poll() is None, f"the run ended (exit {process.returncode}) before the kill point"
            assert time.monotonic() < deadline, "the kill point was never reached"
            time.sleep(0.005)
        time.sleep(delay)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL, f"the run finished (exit {process.returncode}) before the kill"


def newest_step(run_dir: Path) -> int:
    return max((step for step, _ in list_checkpoints(run_dir / "checkpoints")), default=0)


def temporaries(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if is_temporary(p)]


def plant_temporary(directory: Path, name: str) -> Path:
    """A temporary as a crashed writer leaves it: a complete-looking file under a .tmp- name."""
    leftover = temporary_path(directory / name, 4242)
    leftover.write_bytes(b"half-written")
    return leftover


def assert_same_weights(a: Path, b: Path) -> None:
    first, second = load_weights(a), load_weights(b)
    assert first.keys() == second.keys() and first
    for key in first:
        assert torch.equal(first[key], second[key]), f"{a.name}: {key} differs"


def assert_same_metric_records(run_dir: Path, reference: Path) -> None:
    """metrics.jsonl stays JSON lines across the crash and holds the uninterrupted run's records, each step once:
    the resume cut what was written after its checkpoint. (Values: a mean over a logging window cut by the crash
    covers only the resumed steps, so only steps and names are compared.)"""

    def records(run: Path) -> list[tuple[int, list[str]]]:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [(record["step"], sorted(record)) for record in map(json.loads, lines)]

    assert records(run_dir) == records(reference)


def cli(config_class, main, argv):
    return run_cli(lambda: main(parse_config(config_class, argv)))


# -- score-net training ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scorenet_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "scorenet"
    cli(ScoreNetConfig, train_scorenet, [*SCORENET, "--out", str(out), *NO_STEP_CHECKPOINTS])
    return out


@pytest.mark.slow
def test_killed_scorenet_run_resumes_past_a_corrupt_checkpoint_to_identical_weights(scorenet_reference, tmp_path):
    out = tmp_path / "scorenet"
    k, delay = kill_point(1, 3, 6)
    kill_when(start("train_scorenet.py", [*SCORENET, "--out", str(out)], tmp_path),
              lambda: newest_step(out) >= k, delay)
    assert not (out / "results.json").exists()  # the kill landed mid-run
    checkpoints = list_checkpoints(out / "checkpoints")
    assert len(checkpoints) >= 2 and checkpoints[-1][0] < 12
    (previous, _), (newest, newest_path) = checkpoints[-2], checkpoints[-1]
    weights = newest_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])  # a truncated newest checkpoint (e.g. a disk that filled up)
    leftover = plant_temporary(out / "checkpoints", f"step_{newest + 1:06d}")

    with pytest.warns(CheckpointWarning, match=f"skipping checkpoint .*step_{newest:06d}.*truncated"):
        cli(ScoreNetConfig, train_scorenet, [*SCORENET, "--out", str(out), "--resume", "latest"])
    assert f"resumed from {out / 'checkpoints' / f'step_{previous:06d}'}" in (out / "log.txt").read_text()
    assert not leftover.exists() and temporaries(out) == []
    assert_same_metric_records(out, scorenet_reference)
    assert_same_weights(out / "scorenet" / "unet" / "diffusion_pytorch_model.safetensors",
                        scorenet_reference / "scorenet" / "unet" / "diffusion_pytorch_model.safetensors")  # the EMA
    assert_same_weights(out / "checkpoints" / "step_000012" / "model.safetensors",
                        scorenet_reference / "checkpoints" / "step_000012" / "model.safetensors")


# -- classifier training -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def classifier_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "classifier"
    return out, cli(AdversarialConfig, train_classifier, [*CLASSIFIER, "--out", str(out), *NO_STEP_CHECKPOINTS])


@pytest.mark.slow
def test_killed_classifier_run_resumes_to_identical_weights_and_results(classifier_reference, tmp_path):
    reference, reference_results = classifier_reference
    out = tmp_path / "classifier"
    k, delay = kill_point(2, 2, 6)
    kill_when(start("train_classifier.py", [*CLASSIFIER, "--out", str(out)], tmp_path),
              lambda: newest_step(out) >= k, delay)
    assert not (out / "results.json").exists() and not (out / "ema.safetensors").exists()
    assert newest_step(out) < 12
    leftover = plant_temporary(out, "results.json")

    results = cli(AdversarialConfig, train_classifier, [*CLASSIFIER, "--out", str(out), "--resume", "latest"])
    assert not leftover.exists() and temporaries(out) == []
    assert_same_metric_records(out, reference)
    for name in ("ema.safetensors", "model.safetensors", "best/ema.safetensors"):
        assert_same_weights(out / name, reference / name)
    assert results["best_val"] == reference_results["best_val"] and results["steps"] == 12
    accuracies = ("clean_acc", "pgd_ce_acc", "pgd_cw_acc", "worst_case_acc", "sanity_passed")
    assert {key: results["test"][key] for key in accuracies} == {key: reference_results["test"][key] for key in
                                                                 accuracies}


# -- generation ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def generation_reference(tmp_path_factory):
    torch.manual_seed(0)
    scorenet = ScoreNet.build("tiny8", 3, (1, 4, 4), block_out_channels=(8, 16), norm_num_groups=8)
    scorenet_dir = scorenet.save_pretrained(tmp_path_factory.mktemp("scorenet") / "scorenet")
    out = tmp_path_factory.mktemp("reference") / "generated"
    generate(parse_config(GenerateConfig, [*GENERATE, "--scorenet", str(scorenet_dir), "--out", str(out)]))
    return scorenet_dir, out


@pytest.mark.slow
def test_killed_generation_rerun_writes_byte_identical_shards(generation_reference, tmp_path):
    scorenet_dir, reference = generation_reference
    out = tmp_path / "generated"
    argv = [*GENERATE, "--scorenet", str(scorenet_dir), "--out", str(out)]
    k, delay = kill_point(3, 2, 5)
    kill_when(start("generate.py", argv, tmp_path), lambda: len(list(out.glob("shard_*.npz"))) >= k, delay)
    written = sorted(p.name for p in out.glob("shard_*.npz"))
    assert 2 <= len(written) < 12 and '"complete": false' in (out / "generation.json").read_text()
    leftover = plant_temporary(out, f"shard_{len(written):05d}.npz")

    manifest = cli(GenerateConfig, generate, argv)  # the same command again
    assert manifest["complete"] and not leftover.exists() and temporaries(out) == []
    shards = sorted(p.name for p in reference.glob("shard_*.npz"))
    assert sorted(p.name for p in out.glob("shard_*.npz")) == shards and len(shards) == 12
    for name in shards:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
