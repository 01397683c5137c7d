"""Score-net training: a few-step run saves a loadable score net and step checkpoints; resume is exact; bad input."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from scorenets import ScoreNet
from trainlib.adam_loop import learning_rate_factor
from trainlib.cli import run_cli
from trainlib.config import parse_config
from trainlib.scorenet_training import ScoreNetConfig, load_scorenet, resolve_preset, train

ROOT = Path(__file__).resolve().parent.parent


def tiny_config(out, **overrides) -> ScoreNetConfig:
    """gmm-4x4 (3 classes, 1×4×4) with the tiny8 UNet: a training step takes a few milliseconds."""
    options = dict(dataset="gmm-4x4", preset="tiny8", batch_size=8, train_steps=5, warmup_steps=2, checkpoint_every=3,
                   log_every=2, out=str(out))
    return ScoreNetConfig(**(options | overrides))


def unet_state(path) -> dict:
    return load_scorenet(path).state_dict()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One 5-step run with checkpoints at steps 3 and 5.

    Also records the raw parameters the EMA sees: θ_0 before the first Adam step and θ_t after each step t (torch's
    global optimizer-step hooks, removed after the run): [θ_0, ..., θ_5], each a list in ``parameters()`` order."""
    out = tmp_path_factory.mktemp("run") / "sn"
    raw_weights = []

    def record(optimizer, args, kwargs):
        if isinstance(optimizer, torch.optim.Adam):  # not the accelerate wrapper around it
            raw_weights.append([p.detach().clone() for group in optimizer.param_groups for p in group["params"]])

    first = register_optimizer_step_pre_hook(lambda *args: None if raw_weights else record(*args))
    after = register_optimizer_step_post_hook(record)
    try:
        summary = train(tiny_config(out))
    finally:
        first.remove()
        after.remove()
    return out, summary, raw_weights


def test_run_saves_a_loadable_scorenet_and_step_checkpoints(finished_run):
    out, summary, _ = finished_run
    assert summary["steps"] == 5 and summary["num_classes"] == 3 and summary["image_shape"] == [1, 4, 4]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000003", "step_000005"]
    net = ScoreNet.from_pretrained(out / "scorenet")  # the folder itself ...
    also = load_scorenet(out)  # ... or the run directory
    assert net.num_classes == 3 and net.image_shape == (1, 4, 4) and net.preset == "tiny8" and not net.training
    for name, value in net.state_dict().items():
        torch.testing.assert_close(also.state_dict()[name], value, rtol=0, atol=0)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 5] and all(r["train/loss"] > 0 for r in records)
    assert any((out / "tb").iterdir())
    assert json.loads((out / "results.json").read_text())["steps"] == 5


def hand_ema(weights: list[list[torch.Tensor]], tau: float, shift: int = 0) -> list[torch.Tensor]:
    """The EMA of trainlib/ema.py's docstring in float64 from [θ_0, ..., θ_T]: θ_ema = θ_0, then for t = 1 … T
    θ_ema ← d_t·θ_ema + (1 − d_t)·θ_t with d_t = min(τ, (1 + t)/(10 + t)) (no warm-up: ``fit`` passes none);
    ``shift`` moves the ramp by whole steps (a wrong reading, to show the comparison can fail)."""
    average = [p.double() for p in weights[0]]
    for t, params in enumerate(weights[1:], start=1):
        decay = min(tau, (1 + t + shift) / (10 + t + shift))
        average = [decay * a + (1 - decay) * p.double() for a, p in zip(average, params, strict=True)]
    return average


def test_saved_scorenet_is_the_ema_of_the_raw_weights(finished_run):
    """The saved score net equals the EMA computed by hand from the recorded raw weights θ_0 … θ_5 (float32 rounding
    apart), not an EMA whose ramp is one step off, nor the raw weights of the final checkpoint (which the recording
    reproduces exactly)."""
    out, _, raw_weights = finished_run
    from safetensors.torch import load_file

    assert len(raw_weights) == 6  # θ_0 and one per optimizer step
    saved = load_scorenet(out)
    names = [name for name, _ in saved.named_parameters()]  # same architecture: same order as the trained model
    checkpoint = load_file(out / "checkpoints" / "step_000005" / "model.safetensors")
    for name, value in zip(names, raw_weights[-1], strict=True):
        torch.testing.assert_close(checkpoint[name], value, rtol=0, atol=0)
    tau = tiny_config(out).ema_tau
    expected = hand_ema(raw_weights, tau)
    for (name, value), average in zip(saved.named_parameters(), expected, strict=True):
        torch.testing.assert_close(value.double(), average, rtol=1e-6, atol=1e-6, msg=name)  # measured ≤ 1.5e-7
    for other in (hand_ema(raw_weights, tau, shift=-1), raw_weights[-1]):  # measured 6e-5 and 3e-4 away
        assert max(float((value.double() - o.double()).abs().max())
                   for value, o in zip(saved.parameters(), other, strict=True)) > 1e-5


def test_resume_latest_continues_the_step_count_and_equals_an_uninterrupted_run(finished_run, tmp_path):
    out, _, _ = finished_run
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_000005")  # as if the run had stopped after step 3
    shutil.rmtree(resumed / "scorenet")
    summary = train(tiny_config(resumed, resume="latest"))
    assert summary["steps"] == 5
    assert "resumed from" in (resumed / "log.txt").read_text()
    reference, continued = unet_state(out), unet_state(resumed)
    for name, value in reference.items():
        torch.testing.assert_close(continued[name], value, rtol=0, atol=0)


def test_resume_of_a_finished_run_changes_nothing(finished_run, tmp_path):
    out, _, _ = finished_run
    again = tmp_path / "again"
    shutil.copytree(out, again)
    assert train(tiny_config(again, resume="latest"))["steps"] == 5
    reference, after = unet_state(out), unet_state(again)
    for name, value in reference.items():
        torch.testing.assert_close(after[name], value, rtol=0, atol=0)


def test_learning_rate_warmup_and_cosine():
    assert learning_rate_factor(0, 4, 12, "cosine") == pytest.approx(0.25)
    assert learning_rate_factor(3, 4, 12, "cosine") == pytest.approx(1.0)
    assert learning_rate_factor(8, 4, 12, "cosine") == pytest.approx(0.5)  # half-way through the decay
    assert learning_rate_factor(12, 4, 12, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert learning_rate_factor(11, 4, 12, "constant") == 1.0


@pytest.mark.parametrize(("warmup", "total"), [(4, 12), (100, 2000), (0, 7)])
def test_learning_rate_factor_is_the_closed_form_and_diffusers_cosine_after_the_warm_up(warmup, total):
    """Linear warm-up (step + 1)/w, then ½(1 + cos(π·progress)); diffusers' schedule (warm-up step/w) has the same
    cosine, and its warm-up runs one step behind (adam_loop.learning_rate_factor says why we keep ours)."""
    from diffusers.optimization import get_cosine_schedule_with_warmup

    diffusers_factor = get_cosine_schedule_with_warmup(torch.optim.SGD([torch.zeros(1)], lr=1.0), warmup,
                                                       total).lr_lambdas[0]
    for step in range(total + 1):
        ours = learning_rate_factor(step, warmup, total, "cosine")
        if step < warmup:
            assert ours == (step + 1) / warmup == diffusers_factor(step + 1)
        else:
            progress = (step - warmup) / (total - warmup)
            assert ours == 0.5 * (1 + math.cos(math.pi * progress)) == diffusers_factor(step)


def test_default_presets_by_image_size():
    assert [resolve_preset(None, (c, s, s)) for c, s in [(1, 8), (3, 16), (3, 32)]] == ["tiny8", "small16", "cifar32"]
    assert resolve_preset("small16", (1, 8, 8)) == "small16"
    with pytest.raises(ValueError, match="no default UNet preset for 28×28"):
        resolve_preset(None, (1, 28, 28))


# -- bad input: one line on stderr, exit status 2, nothing written ---------------------------------------------
def cli(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: train(parse_config(ScoreNetConfig, argv)))
    return exit_info.value.code, capsys.readouterr().err.strip()


def test_resuming_with_data_of_another_class_count_is_refused(finished_run, tmp_path, capsys):
    out, _, _ = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    before = sorted(p.relative_to(copy) for p in copy.rglob("*"))
    code, err = cli(["--dataset", "gmm-8x8", "--preset", "tiny8", "--out", str(copy), "--resume", "latest"], capsys)
    assert code == 2 and "(classes, image shape, preset, channels) = (3, (1, 4, 4), 'tiny8', (32, 64))" in err
    assert sorted(p.relative_to(copy) for p in copy.rglob("*")) == before


def test_fresh_start_into_an_existing_run_is_refused(finished_run, capsys):
    out, _, _ = finished_run
    code, err = cli(["--dataset", "gmm-4x4", "--preset", "tiny8", "--out", str(out)], capsys)
    assert code == 2 and "already holds a run" in err


@pytest.mark.slow  # subprocesses
def test_script_entry_point_dry_run():
    script = str(ROOT / "train" / "train_scorenet.py")
    result = subprocess.run([sys.executable, script, "--dry-run", "--train-steps", "7"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["train_steps"] == 7 and json.loads(result.stdout)["dataset"] == "digits"
