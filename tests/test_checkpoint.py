"""Checkpoints with a real Accelerator(cpu=True): round trip, corrupt fallback, temporaries, unsafe pickles."""

import json
import pathlib
import pickle
import random
import shutil

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from torch import nn

from trainlib.checkpoint import (
    CheckpointMeta,
    CheckpointWarning,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_weights,
    load_weights_metadata,
    resolve_resume,
    save_checkpoint,
    save_step_checkpoint,
    save_weights,
    verify_checkpoint,
    write_manifest,
)
from trainlib.ema import EMA
from trainlib.files import cleanup_temporaries, temporary_path


def make_training(seed):
    torch.manual_seed(seed)
    accelerator = Accelerator(cpu=True)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    ema = EMA(model, tau=0.9, warmup_steps=1)
    accelerator.register_for_checkpointing(ema)
    return accelerator, model, optimizer, scheduler, ema


def train_steps(training, steps):
    accelerator, model, optimizer, scheduler, ema = training
    for _ in range(steps):
        loss = model(torch.randn(6, 4)).pow(2).mean()
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        ema.update(model)


def save_step(training, run_dir, step, keep_last=None):
    meta = CheckpointMeta(step=step, epoch=step // 4, batch_in_epoch=step % 4, config_hash="abc")
    return save_step_checkpoint(training[0], run_dir / "checkpoints", meta, keep_last)


@pytest.fixture(scope="module")
def run_with_two_checkpoints(tmp_path_factory):
    """A run saved at steps 3 and 5, plus the states and random draws right after the step-5 save."""
    run_dir = tmp_path_factory.mktemp("run")
    training = make_training(0)
    train_steps(training, 3)
    save_step(training, run_dir, 3)
    train_steps(training, 2)
    save_step(training, run_dir, 5)
    _, model, optimizer, scheduler, ema = training
    expected = {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "ema": {k: v.clone() for k, v in ema.model.state_dict().items()},
        "momentum": [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()],
        "lr": scheduler.get_last_lr(),
        "draws": (torch.rand(3), np.random.rand(3), random.random()),
    }
    return run_dir, expected


def copy_run(run_dir, tmp_path):
    shutil.copytree(run_dir, tmp_path / "run")
    return tmp_path / "run"


def test_round_trip_restores_model_optimizer_scheduler_ema_and_rng(run_with_two_checkpoints):
    run_dir, expected = run_with_two_checkpoints
    path = latest_checkpoint(run_dir)
    assert path == run_dir / "checkpoints" / "step_000005"
    assert sorted(p.name for p in path.iterdir()) == [
        "custom_checkpoint_0.pkl", "manifest.json", "meta.json", "model.safetensors", "optimizer.bin",
        "random_states_0.pkl", "scheduler.bin",
    ]
    training = make_training(1)  # different initial weights
    torch.rand(5), np.random.rand(5), random.random()  # and different RNG positions
    meta = load_checkpoint(training[0], path)
    assert meta == CheckpointMeta(step=5, epoch=1, batch_in_epoch=1, config_hash="abc", world_size=1)
    _, model, optimizer, scheduler, ema = training
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected["model"][key])
    for key, value in ema.model.state_dict().items():
        assert torch.equal(value, expected["ema"][key])
    assert ema.num_updates == 5
    for p, momentum in zip(model.parameters(), expected["momentum"], strict=True):
        assert torch.equal(optimizer.state[p]["momentum_buffer"], momentum)
    assert scheduler.get_last_lr() == expected["lr"]
    draws = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(draws[0], expected["draws"][0]) and np.array_equal(draws[1], expected["draws"][1])
    assert draws[2] == expected["draws"][2]


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "drop_manifest", "extra_file"])
def test_corrupt_newest_checkpoint_falls_back_to_previous(run_with_two_checkpoints, tmp_path, damage):
    run_dir = copy_run(run_with_two_checkpoints[0], tmp_path)
    newest = run_dir / "checkpoints" / "step_000005"
    weights = newest / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "flip_byte":
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "drop_manifest":
        (newest / "manifest.json").unlink()
    else:
        (newest / "custom_checkpoint_1.pkl").write_bytes(b"planted")
    assert verify_checkpoint(newest) is not None
    with pytest.warns(CheckpointWarning, match="skipping checkpoint .*step_000005"):
        assert latest_checkpoint(run_dir) == run_dir / "checkpoints" / "step_000003"
    with pytest.raises(ValueError, match="cannot resume from"):
        resolve_resume(str(newest), run_dir)


def test_resume_latest_refuses_when_every_checkpoint_is_damaged(run_with_two_checkpoints, tmp_path):
    run_dir = copy_run(run_with_two_checkpoints[0], tmp_path)
    for step in ("step_000003", "step_000005"):
        (run_dir / "checkpoints" / step / "manifest.json").unlink()
    with pytest.warns(CheckpointWarning, match="skipping checkpoint"):
        assert latest_checkpoint(run_dir) is None
    with pytest.warns(CheckpointWarning), pytest.raises(ValueError, match=r"none of the 2 checkpoint\(s\) under"):
        resolve_resume("latest", run_dir)


def test_leftover_temporary_is_ignored_and_cleaned(run_with_two_checkpoints, tmp_path):
    run_dir = copy_run(run_with_two_checkpoints[0], tmp_path)
    leftover = temporary_path(run_dir / "checkpoints" / "step_000007", "save")
    shutil.copytree(run_dir / "checkpoints" / "step_000005", leftover)  # looks complete, but was never renamed
    assert [step for step, _ in list_checkpoints(run_dir / "checkpoints")] == [3, 5]
    assert latest_checkpoint(run_dir).name == "step_000005"
    assert cleanup_temporaries(run_dir / "checkpoints") == [leftover]
    assert not leftover.exists()


def test_resume_resolution(run_with_two_checkpoints, tmp_path):
    run_dir = run_with_two_checkpoints[0]
    assert resolve_resume("none", run_dir) is None
    assert resolve_resume("latest", run_dir).name == "step_000005"
    assert resolve_resume("latest", tmp_path / "fresh") is None
    assert resolve_resume(str(run_dir / "checkpoints" / "step_000003"), run_dir).name == "step_000003"
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_resume(str(tmp_path / "nope"), run_dir)


def test_planted_pickle_is_refused_without_running(run_with_two_checkpoints, tmp_path):
    run_dir = copy_run(run_with_two_checkpoints[0], tmp_path)
    path = run_dir / "checkpoints" / "step_000005"
    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return pathlib.Path.touch, (marker,)

    pickle.loads(pickle.dumps(Payload()))  # the payload is live: plain unpickling runs it
    assert marker.exists()
    marker.unlink()
    torch.save({"model": Payload()}, path / "custom_checkpoint_0.pkl")
    write_manifest(path)  # an attacker can rewrite the manifest too: checksums alone are not enough
    assert verify_checkpoint(path) is None
    with pytest.raises(ValueError, match=r"refusing to load .*custom_checkpoint_0\.pkl"):
        load_checkpoint(make_training(0)[0], path)
    assert not marker.exists()


def test_keep_last_prunes_oldest_and_saving_is_atomic(tmp_path):
    training = make_training(0)
    for step in (1, 2, 3, 4):
        save_step(training, tmp_path, step, keep_last=2)
    assert [step for step, _ in list_checkpoints(tmp_path / "checkpoints")] == [3, 4]
    save_step(training, tmp_path, 4)  # re-saving a step replaces it
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000003", "step_000004"]
    meta = json.loads((tmp_path / "checkpoints" / "step_000004" / "meta.json").read_text())
    assert meta["step"] == 4 and meta["world_size"] == 1


def test_automatic_checkpoint_naming_is_rejected(tmp_path):
    accelerator = Accelerator(cpu=True)
    accelerator.project_configuration.automatic_checkpoint_naming = True
    try:
        with pytest.raises(ValueError, match="automatic_checkpoint_naming"):
            save_checkpoint(accelerator, tmp_path / "x", CheckpointMeta(step=0))
    finally:
        accelerator.project_configuration.automatic_checkpoint_naming = False


def test_weights_snapshot_round_trip_and_errors(tmp_path):
    state = {"a.weight": torch.randn(3, 4), "a.bias": torch.arange(3), "bn.num_batches_tracked": torch.tensor(7)}
    save_weights(tmp_path / "ema.safetensors", state, metadata={"num_classes": "10"})
    loaded = load_weights(tmp_path / "ema.safetensors")
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    assert load_weights_metadata(tmp_path / "ema.safetensors") == {"num_classes": "10"}
    assert [p.name for p in tmp_path.iterdir()] == ["ema.safetensors"]
    with pytest.raises(ValueError, match="'step' is a int"):
        save_weights(tmp_path / "bad.safetensors", {"step": 3})
    assert not (tmp_path / "bad.safetensors").exists()
    with pytest.raises(FileNotFoundError):
        load_weights(tmp_path / "missing.safetensors")
    (tmp_path / "pickle.safetensors").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_weights(tmp_path / "pickle.safetensors")
    data = (tmp_path / "ema.safetensors").read_bytes()
    (tmp_path / "short.safetensors").write_bytes(data[:-8])
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_weights(tmp_path / "short.safetensors")


def _two_rank_worker(run_dir):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # forked from a process with a 1-process state
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(accelerator.process_index)
    accelerator.prepare(nn.Linear(3, 2))
    save_step_checkpoint(accelerator, run_dir / "checkpoints", CheckpointMeta(step=2))
    path = resolve_resume("latest", run_dir, accelerator)  # resolved on rank 0, broadcast
    expected = torch.rand(4)  # this rank's draws right after the save
    torch.manual_seed(123)
    meta = load_checkpoint(accelerator, path)
    assert torch.equal(torch.rand(4), expected), f"rank {accelerator.process_index}: RNG state not restored"
    assert meta.world_size == 2 and path.name == "step_000002"


def test_two_process_save_holds_every_rank_rng_state(tmp_path):
    from accelerate import debug_launcher

    debug_launcher(_two_rank_worker, args=(tmp_path,), num_processes=2)
    path = tmp_path / "checkpoints" / "step_000002"
    listed = json.loads((path / "manifest.json").read_text())["files"]
    assert {"random_states_0.pkl", "random_states_1.pkl", "model.safetensors", "meta.json"} <= set(listed)
    assert verify_checkpoint(path) is None
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000002"]
