"""Score-net training: a few-step run saves a loadable score net and step checkpoints; resume is exact; bad input."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from scorenets import ScoreNet
from trainlib.adam_loop import learning_rate_factor
from trainlib.config import parse_config, run_cli
from trainlib.scorenet_training import ScoreNetConfig, load_scorenet, resolve_preset, train

ROOT = Path(__file__).resolve().parent.parent


def tiny_config(out, **overrides) -> ScoreNetConfig:
    """gmm-4x4 (3 classes, 1×4×4) with the tiny8 UNet: a training step takes a few milliseconds."""
    options = dict(dataset="gmm-4x4", preset="tiny8", batch_size=8, steps=5, warmup_steps=2, checkpoint_every=3,
                   log_every=2, out=str(out))
    return ScoreNetConfig(**(options | overrides))


def unet_state(path) -> dict:
    return load_scorenet(path).state_dict()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One 5-step run with checkpoints at steps 3 and 5."""
    out = tmp_path_factory.mktemp("run") / "sn"
    summary = train(tiny_config(out))
    return out, summary


def test_run_saves_a_loadable_scorenet_and_step_checkpoints(finished_run):
    out, summary = finished_run
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


def test_saved_scorenet_is_the_ema_not_the_raw_weights(finished_run):
    """The EMA lags the raw weights, so the saved net differs from the model in the final checkpoint."""
    out, _ = finished_run
    from safetensors.torch import load_file

    raw = load_file(out / "checkpoints" / "step_000005" / "model.safetensors")
    saved = load_scorenet(out).state_dict()
    differences = [float((saved[name] - value).abs().max()) for name, value in raw.items() if name in saved]
    assert len(differences) == len(saved) and max(differences) > 0


def test_resume_latest_continues_the_step_count_and_equals_an_uninterrupted_run(finished_run, tmp_path):
    out, _ = finished_run
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
    out, _ = finished_run
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


BAD_NPZ = {
    "missing": (None, "npz file not found"),
    "corrupt": (b"not a zip", "not a valid .npz file"),
    "wrong-keys": ({"images": np.zeros((2, 8, 8, 1), np.uint8), "label": [0, 1]}, "missing key(s) ['image']"),
    "wrong-dtype": ({"image": np.zeros((2, 8, 8, 1), np.int32), "label": [0, 1]}, "must be uint8"),
    "negative-label": ({"image": np.zeros((2, 8, 8, 1), np.uint8), "label": [0, -1]}, "negative label"),
}


@pytest.mark.parametrize("kind", BAD_NPZ)
def test_bad_data_gives_one_error_line_and_no_run_directory(tmp_path, capsys, kind):
    content, message = BAD_NPZ[kind]
    path = tmp_path / "data.npz"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        np.savez(path, **content)
    out = tmp_path / "run"
    code, err = cli(["--dataset", f"npz:{path}", "--out", str(out), "--steps", "1"], capsys)
    assert code == 2 and err.startswith("error:") and message in err and len(err.splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize(
    "flags, message",
    [(["--label-dropout", "1.5"], "label_dropout"), (["--preset", "huge"], "unknown UNet preset"),
     (["--batch-size", "10", "--grad-accumulation", "3"], "divisible"), (["--dataset", "mnist"], "unknown dataset")],
)
def test_bad_options_are_refused(tmp_path, capsys, flags, message):
    code, err = cli([*flags, "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_resuming_with_data_of_another_class_count_is_refused(finished_run, tmp_path, capsys):
    out, _ = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    before = sorted(p.relative_to(copy) for p in copy.rglob("*"))
    code, err = cli(["--dataset", "gmm-8x8", "--preset", "tiny8", "--out", str(copy), "--resume", "latest"], capsys)
    assert code == 2 and "(classes, image shape, preset, channels) = (3, (1, 4, 4), 'tiny8', (32, 64))" in err
    assert sorted(p.relative_to(copy) for p in copy.rglob("*")) == before


def test_fresh_start_into_an_existing_run_is_refused(finished_run, capsys):
    out, _ = finished_run
    code, err = cli(["--dataset", "gmm-4x4", "--preset", "tiny8", "--out", str(out)], capsys)
    assert code == 2 and "already holds a run" in err


def test_script_entry_point_dry_run():
    result = subprocess.run([sys.executable, str(ROOT / "train" / "train_scorenet.py"), "--dry-run", "--steps", "7"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["steps"] == 7 and json.loads(result.stdout)["dataset"] == "digits"
