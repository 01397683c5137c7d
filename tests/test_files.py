"""Atomic writes leave either the old file or the complete new one, and recognisable temporaries."""

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from trainlib.files import (
    atomic_directory,
    atomic_open,
    atomic_save_npz,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    cleanup_temporaries,
    is_temporary,
    temporary_path,
)
from trainlib.rundir import RunDir


def test_atomic_writes_round_trip_without_leftovers(tmp_path):
    atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01")
    atomic_write_text(tmp_path / "b.txt", "héllo")
    atomic_write_json(tmp_path / "c.json", {"x": [1, 2]})
    atomic_save_npz(tmp_path / "d.npz", image=np.arange(6, dtype=np.uint8).reshape(1, 1, 2, 3))
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "héllo"
    assert json.loads((tmp_path / "c.json").read_text()) == {"x": [1, 2]}
    with np.load(tmp_path / "d.npz") as f:
        np.testing.assert_array_equal(f["image"], np.arange(6).reshape(1, 1, 2, 3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.txt", "c.json", "d.npz"]


def test_writer_raising_midway_leaves_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "results.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError, match="disk on fire"), atomic_open(target) as f:
        f.write(b"partial new content")
        raise RuntimeError("disk on fire")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]

    class Unconvertible:
        def __array__(self, *args, **kwargs):
            raise RuntimeError("cannot convert")

    shard = tmp_path / "shard.npz"
    with pytest.raises(RuntimeError, match="cannot convert"):
        atomic_save_npz(shard, image=np.zeros((2, 2, 2, 3), np.uint8), label=Unconvertible())
    assert not shard.exists()
    assert list(tmp_path.iterdir()) == [target]


def test_atomic_directory_replaces_on_success_and_vanishes_on_error(tmp_path):
    target = tmp_path / "best"
    with atomic_directory(target) as tmp:
        assert is_temporary(tmp) and tmp.parent == tmp_path
        (tmp / "weights").write_text("v1")
    assert (target / "weights").read_text() == "v1"
    with atomic_directory(target) as tmp:
        (tmp / "weights").write_text("v2")
    assert (target / "weights").read_text() == "v2"
    with pytest.raises(KeyboardInterrupt), atomic_directory(target) as tmp:
        (tmp / "weights").write_text("v3-partial")
        raise KeyboardInterrupt
    assert (target / "weights").read_text() == "v2"
    assert [p.name for p in tmp_path.iterdir()] == ["best"]


def test_temporary_names_are_recognisable_and_cleaned(tmp_path):
    tmp = temporary_path(tmp_path / "shard_00001.npz")
    assert tmp.name.startswith("shard_00001.npz.tmp-") and not tmp.name.endswith(".npz")
    assert is_temporary(tmp) and not is_temporary(tmp_path / "shard_00001.npz")
    with pytest.raises(ValueError, match="tag"):
        temporary_path(tmp_path / "x", "a/b")

    real = ["shard_00001.npz", "step_000010", "notes.tmp", "a.tmp-"]
    for name in real:
        (tmp_path / name).mkdir() if name.startswith("step") else (tmp_path / name).write_text("keep")
    leftovers = [tmp, temporary_path(tmp_path / "step_000020", "save")]
    tmp.write_bytes(b"half a shard")
    leftovers[1].mkdir()
    (leftovers[1] / "model.safetensors").write_bytes(b"half")
    removed = cleanup_temporaries(tmp_path)
    assert sorted(removed) == sorted(leftovers)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(real)
    assert cleanup_temporaries(tmp_path / "missing") == []


# -- run directories --------------------------------------------------------------------------------------------
@dataclass
class Cfg:
    lr: float = 0.1
    epochs: int = 10
    widths: tuple[int, ...] = (1, 2)


def test_run_dir_writes_config_log_metrics_tensorboard_and_results(tmp_path):
    with RunDir(tmp_path / "run", Cfg(), world_size=2) as run:
        run.log("hello")
        run.log_metrics({"loss": torch.tensor(0.5), "acc": 1, "bad": float("nan"), "phase": "train"}, step=3)
        run.write_results({"clean_acc": "90.00"})
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["config"] == {"lr": 0.1, "epochs": 10, "widths": [1, 2]}
    assert record["run"]["world_size"] == 2 and record["run"]["resumed"] is False
    assert isinstance(record["run"]["git_revision"], str) and "torch" in record["run"]["versions"]
    assert "diffusers" in record["run"]["versions"]
    assert "] hello" in (tmp_path / "run" / "log.txt").read_text()
    (metrics,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {k: metrics[k] for k in ("step", "loss", "acc", "bad", "phase")} == {
        "step": 3, "loss": 0.5, "acc": 1, "bad": None, "phase": "train",
    }
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "run" / "tb").iterdir())
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == {"clean_acc": "90.00"}


def test_run_dir_is_never_deleted_and_resume_appends(tmp_path):
    first = RunDir(tmp_path / "run", Cfg())
    first.log_metrics({"loss": 1.0}, step=1)
    with pytest.raises(ValueError, match="already holds a run; resume it"):
        RunDir(tmp_path / "run", Cfg())
    resumed = RunDir(tmp_path / "run", Cfg(epochs=20), resume=True)
    resumed.log_metrics({"loss": 0.5}, step=2)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "started run" in log and "resumed run" in log and "option changed on resume: epochs: 10 -> 20" in log
    assert json.loads((tmp_path / "run" / "config.json").read_text())["run"]["resumed"] is True


@pytest.mark.parametrize(("tail", "steps"), [
    ('{"step": 3, "loss"', [1, 2]),  # a crash in the middle of an append
    ('{"step": 3, "loss": 0.1}\n' + "x" * 70000, [1, 3, 2]),  # a partial line longer than one read chunk
])
def test_resume_cuts_a_partial_last_metrics_line(tmp_path, tail, steps):
    RunDir(tmp_path / "run", Cfg()).log_metrics({"loss": 1.0}, step=1)
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write(tail)
    RunDir(tmp_path / "run", Cfg(), resume=True).log_metrics({"loss": 0.5}, step=2)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == steps
    assert "partial last line of metrics.jsonl" in (tmp_path / "run" / "log.txt").read_text()


def test_rewind_metrics_cuts_back_to_a_saved_size(tmp_path):
    run = RunDir(tmp_path / "run", Cfg())
    for step in (1, 2):
        run.log_metrics({"loss": 1.0 / step}, step=step)
    saved = run.metrics_size()  # as a checkpoint at step 2 records it
    for step in (3, 4):
        run.log_metrics({"loss": 1.0 / step}, step=step)
    run.close()
    resumed = RunDir(tmp_path / "run", Cfg(), resume=True)
    with pytest.raises(ValueError, match="not the end of a record"):
        resumed.rewind_metrics(saved - 1)
    assert resumed.rewind_metrics(saved) == 2
    assert resumed.rewind_metrics(saved) == 0  # nothing more to cut
    for step in (3, 4):
        resumed.log_metrics({"loss": 0.5 / step}, step=step)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 0.5), (3, 0.5 / 3), (4, 0.125)]


def test_run_dir_on_other_ranks_writes_nothing(tmp_path):
    run = RunDir(tmp_path / "run", None, is_main_process=False)
    run.log("x")
    run.log_metrics({"loss": 1.0}, step=0)
    run.write_results({"a": 1})
    assert not (tmp_path / "run").exists()
