"""Tiny but legal budgets run to the end through every training entry point: one optimizer step, one epoch, a warm-up
that rounds to zero steps or to exactly one (torch's OneCycleLR divides by zero there), a batch larger than the data,
evaluation and validation on one point, one sampler step, one generated image."""

import json
from pathlib import Path

import pytest

from scorenets import ScoreNet
from trainlib.adversarial import AdversarialConfig, DirectScoreConfig
from trainlib.adversarial import train as train_classifier
from trainlib.classifier_step import one_cycle_cosine
from trainlib.config import parse_config
from trainlib.evaluate_command import EvaluateConfig, evaluate_checkpoint
from trainlib.generation import GenerateConfig, generate
from trainlib.posterior_training import PosteriorNetConfig
from trainlib.posterior_training import train as train_posterior
from trainlib.scorenet_training import ScoreNetConfig
from trainlib.scorenet_training import train as train_scorenet

CLASSIFIER = ["--model", "mlp", "--pgd-steps", "1", "--n-val", "1", "--n-test", "1", "--cpu-threads", "1",
              "--checkpoint-every", "0", "--eval-batch-size", "8"]


@pytest.mark.parametrize("budget", [
    ["--epochs", "1", "--epoch-size", "16", "--batch-size", "16"],  # one optimizer step
    ["--epochs", "4"],  # 40 steps of 128: a warm-up of 2.5 % is exactly one step
    ["--epochs", "2", "--warmup-fraction", "0.01", "--batch-size", "256"],  # 10 steps: a warm-up of 0.1 steps
    ["--epochs", "1", "--batch-size", "2048"],  # a batch larger than the 1,257 training digits
    ["--epochs", "2", "--grad-accumulation", "2", "--batch-size", "1024", "--max-steps", "1"],  # stopped after one
], ids=["one-step", "warmup-one-step", "warmup-zero-steps", "batch-beyond-data", "max-steps-one"])
def test_classifier_training(tmp_path, budget):
    cfg = parse_config(AdversarialConfig, [*CLASSIFIER, "--objective", "pgd-at", *budget, "--out", str(tmp_path)])
    results = train_classifier(cfg)
    if "--max-steps" in budget:
        assert results is None and (tmp_path / "checkpoints" / "step_000001").is_dir()
        return
    assert results["test"]["n_examples"] == 1 and (tmp_path / "ema.safetensors").is_file()
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    validation = [r["val/clean_acc"] for r in metrics if "val/clean_acc" in r]
    assert validation and all(v in (0.0, 1.0) for v in validation)  # one validation point


@pytest.mark.parametrize("total, warmup", [(1, 0.025), (40, 0.025), (80, 0.0125), (3, 0.5)])
def test_one_cycle_schedule_runs_every_step_and_ends_low(total, warmup):
    import torch

    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.2, momentum=0.9)
    scheduler = one_cycle_cosine(optimizer, total, warmup)
    lrs = []
    for _ in range(total):
        optimizer.step()
        lrs.append(scheduler.get_last_lr()[0])
        scheduler.step()
    assert len(lrs) == total and max(lrs) <= 0.2 + 1e-12 and lrs[-1] < 0.2 / 25 + 1e-12  # the rates steps used


def test_direct_score_one_step(tmp_path):
    cfg = parse_config(DirectScoreConfig, [*CLASSIFIER, "--dataset", "gmm-4x4", "--posterior", "analytic", "--epochs",
                                           "1", "--epoch-size", "8", "--batch-size", "8", "--out", str(tmp_path)])
    assert train_classifier(cfg)["steps"] == 1


@pytest.mark.parametrize("budget", [
    pytest.param(["--train-steps", "1", "--warmup-steps", "0"], id="one-step-no-warmup"),
    pytest.param(["--train-steps", "2", "--warmup-steps", "5", "--batch-size", "2048"], marks=pytest.mark.slow,
                 id="warmup-beyond-training-batch-beyond-data"),  # a batch of the whole data: trains for seconds
])
def test_scorenet_and_posterior_net_training(tmp_path, budget):
    net = ["--channels", "8", "16", "--checkpoint-every", "0"]
    scorenet = parse_config(ScoreNetConfig, [*budget, *net, "--out", str(tmp_path / "sn")])
    assert train_scorenet(scorenet)["steps"] == scorenet.train_steps
    posterior = parse_config(PosteriorNetConfig, [*budget, "--scorenet", str(tmp_path / "sn"), "--other-classes",
                                                  "1", "--checkpoint-every", "0", "--out", str(tmp_path / "pn")])
    assert train_posterior(posterior)["steps"] == posterior.train_steps
    assert (tmp_path / "pn" / "posterior_net" / "diffusion_pytorch_model.safetensors").is_file()


def test_evaluation_of_one_point_and_generation_of_one_image(tmp_path):
    run = tmp_path / "run"
    train_classifier(parse_config(AdversarialConfig, [*CLASSIFIER, "--objective", "standard", "--epochs", "1",
                                                      "--epoch-size", "16", "--batch-size", "16", "--out", str(run)]))
    record = evaluate_checkpoint(EvaluateConfig(checkpoint=str(run), n_examples=1, autoattack=False, eps_curve=(0.0,)))
    assert record["n_examples"] == 1
    scorenet = ScoreNet.build("tiny8", 10, (1, 8, 8), block_out_channels=(8, 16), norm_num_groups=4)
    scorenet.save_pretrained(tmp_path / "sn")
    manifest = generate(GenerateConfig(scorenet=str(tmp_path / "sn"), out=str(tmp_path / "gen"), num_images=1,
                                       sampler_steps=1, shard_size=1, grid_columns=1))
    assert manifest["num_images"] == 1 and Path(tmp_path / "gen" / "shard_00000.npz").is_file()
