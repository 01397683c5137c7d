"""Non-finite steps, by injecting NaN/inf into the loss or a gradient of real training runs: mode "stop" names the
step and the quantity, exits 3 and writes nothing after the bad step (the newest checkpoint is the last good one and
resumes); mode "skip" leaves weights, optimizer, schedule and EMA untouched for that step and counts it."""

import json
from pathlib import Path

import pytest
import torch

import trainlib.adversarial as adversarial
import trainlib.scorenet_training as scorenet_training
from trainlib.adversarial import AdversarialConfig
from trainlib.checkpoint import list_checkpoints, load_weights, verify_checkpoint
from trainlib.cli import NONFINITE_EXIT_CODE, run_cli
from trainlib.config import parse_config
from trainlib.nonfinite import NonFiniteError, NonFiniteGuard
from trainlib.scorenet_training import ScoreNetConfig, load_scorenet

CLASSIFIER = ["--dataset", "digits", "--model", "mlp", "--objective", "trades-se", "--eps", "0.2", "--step-size", "0.1",
              "--pgd-steps", "1", "--batch-size", "32", "--epoch-size", "64", "--epochs", "4", "--n-val", "16",
              "--n-test", "16", "--cpu-threads", "1", "--checkpoint-every", "2", "--keep-last", "5", "--log-every", "3",
              "--eval-batch-size", "64"]  # 2 steps per epoch, 8 steps
SCORENET = ["--dataset", "gmm-4x4", "--preset", "tiny8", "--channels", "8", "16", "--batch-size", "8", "--train-steps",
            "6", "--warmup-steps", "1", "--checkpoint-every", "2", "--keep-last", "5", "--log-every", "3"]


def poison_step(call, bad_steps: set[int], what: str, model):
    """Make optimizer step k in ``bad_steps`` (1-based call count) non-finite: the loss (NaN) or one gradient (inf)."""
    if call not in bad_steps:
        return None
    if what == "loss":
        return float("nan")
    parameter = next(model.parameters())

    def hook(grad):
        handle.remove()  # one step only
        return torch.full_like(grad, float("inf"))

    handle = parameter.register_hook(hook)
    return None


def poison_objective(monkeypatch, bad_steps, what="loss"):
    real_build = adversarial.build_objective

    def build(*args, **kwargs):
        objective, calls = real_build(*args, **kwargs), [0]

        def poisoned(model, attack_model, x, y, generator=None):
            calls[0] += 1
            output = objective(model, attack_model, x, y, generator)
            factor = poison_step(calls[0], bad_steps, what, model)
            if factor is not None:
                output.loss = output.loss * factor
            return output

        return poisoned

    monkeypatch.setattr(adversarial, "build_objective", build)


def poison_dsm(monkeypatch, bad_steps, what):
    real, calls = scorenet_training.dsm_loss, [0]

    def poisoned(model, *args, **kwargs):
        calls[0] += 1
        loss = real(model, *args, **kwargs)
        factor = poison_step(calls[0], bad_steps, what, model)
        return loss if factor is None else loss * factor

    monkeypatch.setattr(scorenet_training, "dsm_loss", poisoned)


def run(config_class, argv, capsys) -> tuple[int, list[str]]:
    main = adversarial.train if config_class is AdversarialConfig else scorenet_training.train
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(parse_config(config_class, argv)))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return exit_info.value.code, lines


def all_finite(tensors) -> bool:
    return all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())


def steps_in_metrics(out) -> list[int]:
    return [json.loads(line)["step"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


class _Accelerator:
    device, num_processes, is_main_process = torch.device("cpu"), 1, True


def test_stop_mode_records_the_first_bad_step_on_the_device_without_a_host_sync(monkeypatch):
    guard = NonFiniteGuard(_Accelerator(), "stop")
    good, nan, inf = torch.tensor(1.0), torch.tensor(float("nan")), torch.tensor(float("inf"))

    def no_sync(*_):
        raise AssertionError("host sync inside the step")

    with monkeypatch.context() as patch:
        for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
            patch.setattr(torch.Tensor, name, no_sync)
        for step, (loss, norm) in enumerate([(good, good), (good, inf), (nan, nan), (nan, good)], 1):
            assert guard.observe(step, loss, norm) is True
    with pytest.raises(NonFiniteError, match=r"non-finite gradient norm at step 2; .*no checkpoint was saved"):
        guard.check()
    clean = NonFiniteGuard(_Accelerator(), "stop")
    clean.observe(1, good, None)
    clean.check()  # nothing to report
    with pytest.raises(ValueError, match="unknown non-finite mode 'ignore'"):
        NonFiniteGuard(_Accelerator(), "ignore")


@pytest.mark.parametrize(("boundary", "flags", "saved"), [
    ("log", ["--log-every", "3", "--checkpoint-every", "2"], [2, 4]),  # first check after step 5: the log at step 6
    ("validation", ["--log-every", "100", "--checkpoint-every", "4"], [4]),  # ... the EMA validation of epoch 3
])
def test_classifier_stops_at_a_nan_loss_keeps_the_last_good_checkpoint_and_resumes(
    tmp_path, capsys, monkeypatch, boundary, flags, saved
):
    out = tmp_path / "run"
    argv = [*CLASSIFIER, *flags, "--out", str(out)]
    poison_objective(monkeypatch, {5})
    code, lines = run(AdversarialConfig, argv, capsys)
    errors = [line for line in lines if "error" in line]
    assert code == NONFINITE_EXIT_CODE and errors == [lines[-1]] and "Traceback" not in lines, lines
    assert errors[0].startswith("error: non-finite loss and gradient norm at step 5;")  # NaN loss → NaN gradients
    assert "newest checkpoint (step_000004)" in errors[0]
    assert [step for step, _ in list_checkpoints(out / "checkpoints")] == saved  # nothing saved after step 4
    for _, path in list_checkpoints(out / "checkpoints"):
        assert verify_checkpoint(path) is None and all_finite(load_weights(path / "model.safetensors"))
    assert max(steps_in_metrics(out)) == 4  # no record of steps 5-6 (NaN means, NaN validation)
    assert all_finite(load_weights(out / "best" / "ema.safetensors"))
    assert json.loads((out / "best" / "metrics.json").read_text())["step"] <= 4
    assert not (out / "results.json").exists() and not (out / "ema.safetensors").exists()

    monkeypatch.undo()  # the last good checkpoint resumes (e.g. with a lower --lr)
    results = adversarial.train(parse_config(AdversarialConfig, [*argv, "--resume", "latest", "--lr", "0.1"]))
    assert results["steps"] == 8 and all_finite(load_weights(out / "ema.safetensors"))


def test_classifier_skip_mode_leaves_the_bad_step_without_an_update(tmp_path, monkeypatch):
    out = tmp_path / "run"
    poison_objective(monkeypatch, {3, 4}, what="gradient")
    cfg = parse_config(AdversarialConfig, [*CLASSIFIER, "--nonfinite", "skip", "--checkpoint-every", "1",
                                           "--keep-last", "10", "--out", str(out)])
    results = adversarial.train(cfg)
    assert results["steps"] == 8 and all_finite(load_weights(out / "ema.safetensors"))
    states = {step: torch.load(path / "custom_checkpoint_0.pkl", weights_only=True)  # the registered EMA
              for step, path in list_checkpoints(out / "checkpoints")}
    weights = {step: load_weights(path / "model.safetensors") for step, path in list_checkpoints(out / "checkpoints")}
    schedule = {step: torch.load(path / "scheduler.bin", weights_only=True)["last_epoch"]
                for step, path in list_checkpoints(out / "checkpoints")}
    for unchanged in (3, 4):
        assert all(torch.equal(weights[unchanged][k], weights[2][k]) for k in weights[2])
        assert states[unchanged]["num_updates"] == 2 and schedule[unchanged] == 2
    assert not all(torch.equal(weights[5][k], weights[4][k]) for k in weights[4]) and schedule[5] == 3
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/skipped_steps"] for r in records if "train/skipped_steps" in r][-1] == 2
    meta = json.loads((out / "checkpoints" / "step_000008" / "meta.json").read_text())
    assert meta["extra"]["nonfinite_skipped"] == 2  # survives a resume


def test_scorenet_stops_at_an_infinite_gradient_and_its_saved_net_is_the_last_good_one(tmp_path, monkeypatch):
    out = tmp_path / "sn"
    poison_dsm(monkeypatch, {3}, "gradient")
    with pytest.raises(NonFiniteError, match=r"gradient norm at step 3; .*newest checkpoint \(step_000002\)"):
        scorenet_training.train(parse_config(ScoreNetConfig, [*SCORENET, "--out", str(out)]))
    assert [step for step, _ in list_checkpoints(out / "checkpoints")] == [2]
    assert verify_checkpoint(out / "checkpoints" / "step_000002") is None
    with pytest.warns(UserWarning, match="unfinished training run"):  # stopped: its net is the last checkpoint's
        assert all_finite(load_scorenet(out).state_dict())
    assert not (out / "metrics.jsonl").exists()  # the first log (step 3, NaN means) was never written
    assert not (out / "results.json").exists()


def test_scorenet_skip_mode_finishes_with_finite_weights(tmp_path, monkeypatch):
    out = tmp_path / "sn"
    poison_dsm(monkeypatch, {2, 5}, "loss")
    summary = scorenet_training.train(parse_config(ScoreNetConfig, [*SCORENET, "--nonfinite", "skip", "--out",
                                                                    str(out)]))
    assert summary["steps"] == 6 and all_finite(load_scorenet(out).state_dict())
    assert all_finite(load_weights(out / "checkpoints" / "step_000006" / "model.safetensors"))
    assert "skipped step 5: non-finite loss and gradient norm (2 skipped so far)" in (out / "log.txt").read_text()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["train/skipped_steps"] == 2
    assert [r["step"] for r in records] == [3, 6] and all(r["train/loss"] is not None for r in records)  # applied steps
