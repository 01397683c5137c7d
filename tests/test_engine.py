"""The engine (trainlib.accelerator, trainlib.session, the one-cycle schedule, datagrad.seeding): world-size guard,
run-directory safety, metric averaging, step checkpoints, exact resume."""

import dataclasses
import json
import math

import pytest
import torch

from datagrad.seeding import derived_seed, seeded_generator
from trainlib.accelerator import create_accelerator
from trainlib.classifier_step import one_cycle_cosine
from trainlib.ema import EMA
from trainlib.session import TrainingSession


@dataclasses.dataclass
class TinyConfig:
    width: int = 3


@pytest.fixture
def accelerator():
    return create_accelerator(seed=0)


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_world_size_guard(monkeypatch):
    with pytest.raises(ValueError, match="asked for 2 process"):
        create_accelerator(num_processes=2)
    monkeypatch.setenv("WORLD_SIZE", "2")  # a launcher started 2 processes that never joined one group
    with pytest.raises(ValueError, match="did not join one process group"):
        create_accelerator()


def test_mixed_precision_is_fp32_on_cpu_and_bad_options_fail():
    with pytest.warns(UserWarning, match="not used on the CPU"):
        accelerator = create_accelerator(mixed_precision="bf16")
    assert accelerator.mixed_precision == "no"
    with pytest.raises(ValueError, match="unknown mixed precision"):
        create_accelerator(mixed_precision="fp64")
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        create_accelerator(gradient_accumulation_steps=0)


def test_seeded_generator_is_a_pure_function_of_its_key():
    draw = lambda *key: torch.rand(4, generator=seeded_generator(0, *key))
    assert torch.equal(draw(5, 1), draw(5, 1))
    assert not torch.equal(draw(5, 1), draw(5, 0))
    assert not torch.equal(draw(5, 1), draw(6, 1))
    # the first word of SeedSequence's state, masked: the 32-bit seed is the low half of the 63-bit one
    import numpy as np

    state = int(np.random.SeedSequence([7, 1, 2]).generate_state(1, dtype=np.uint64)[0])
    assert derived_seed(7, 1, 2) == state & (2**63 - 1) and derived_seed(7, 1, 2, bits=32) == state & (2**32 - 1)


def test_one_cycle_cosine_endpoints():
    """lr_max/25 at the start, lr_max at the end of the warm-up, lr_max/(25·10⁴) at the end; momentum in antiphase."""
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.2, momentum=0.9, nesterov=True)
    total, warmup = 200, 0.025
    scheduler = one_cycle_cosine(optimizer, total, warmup)
    lrs, momenta = [], []
    for _ in range(total):
        lrs.append(optimizer.param_groups[0]["lr"])
        momenta.append(optimizer.param_groups[0]["momentum"])
        optimizer.step()
        scheduler.step()
    peak = round(warmup * total) - 1
    assert lrs[0] == pytest.approx(0.2 / 25)
    assert lrs[peak] == pytest.approx(0.2) and max(lrs) == pytest.approx(0.2)
    assert lrs[-1] == pytest.approx(0.2 / 25 / 1e4)
    # half way through the decay the cosine is at its midpoint
    middle = peak + (total - 1 - peak) // 2
    low = 0.2 / 25 / 1e4
    expected = low + (0.2 - low) * (1 + math.cos(math.pi * (middle - peak) / (total - 1 - peak))) / 2
    assert lrs[middle] == pytest.approx(expected, rel=1e-6)
    assert momenta[0] == pytest.approx(0.95) and momenta[peak] == pytest.approx(0.85)


def test_refuses_fresh_start_into_existing_run_before_writing(accelerator, tmp_path):
    session = TrainingSession(accelerator, tmp_path / "run", TinyConfig(), total_steps=1)
    session.close()
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").iterdir()}
    log_before = (tmp_path / "run" / "log.txt").read_text()
    with pytest.raises(ValueError, match="already holds a run"):
        TrainingSession(accelerator, tmp_path / "run", TinyConfig(), total_steps=1)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").iterdir()} == before
    assert (tmp_path / "run" / "log.txt").read_text() == log_before
    with pytest.raises(FileNotFoundError, match="not found"):
        TrainingSession(accelerator, tmp_path / "other", TinyConfig(), total_steps=1, resume=str(tmp_path / "nope"))
    assert not (tmp_path / "other").exists()


def test_metrics_are_window_means_and_checkpoints_are_step_named(accelerator, tmp_path):
    session = TrainingSession(accelerator, tmp_path / "run", TinyConfig(), total_steps=7, log_every=3,
                              checkpoint_every=2, keep_last=2)
    assert session.start().step == 0
    for step in range(1, 8):
        session.log_train(step, {"value": torch.tensor(float(step)), "square": torch.tensor(float(step**2))}, lr=0.5)
        session.maybe_checkpoint(step, 0, step)
    session.flush(7, lr=0.5)
    session.maybe_checkpoint(7, 0, 7, final=True)
    session.close()
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [3, 6, 7]
    assert [r["train/value"] for r in records] == [2.0, 5.0, 7.0]  # means over the windows {1,2,3}, {4,5,6}, {7}
    assert [r["train/square"] for r in records] == pytest.approx([14 / 3, 77 / 3, 49.0], rel=1e-6)
    assert all(r["train/lr"] == 0.5 for r in records)
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert saved == ["step_000006", "step_000007"]  # every 2 steps + the final one, keeping the newest 2


def _train_linear(run_dir, stop_at, total=6, resume="none"):
    """A few SGD steps on data that depend only on the step; returns the session's start position and the state."""
    accelerator = create_accelerator(seed=0)  # one per run: an accelerator saves every model it ever prepared
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    scheduler = one_cycle_cosine(optimizer, total, 0.25)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    ema = EMA(model, tau=0.5, warmup_steps=1)
    session = TrainingSession(accelerator, run_dir, TinyConfig(), total_steps=total, resume=resume,
                              checkpoint_every=100)
    start = session.start(ema)
    step = start.step
    while step < stop_at:
        data = torch.randn(8, 3, generator=torch.Generator().manual_seed(step))
        loss = model(data).pow(2).mean()
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        ema.update(model)
        step += 1
        session.log_train(step, {"loss": loss.detach()})
    session.maybe_checkpoint(step, 1, step, final=True, extra={"note": step})
    session.close()
    state = [t.clone() for t in (*model.parameters(), *ema.model.parameters())]
    return start, state, scheduler.get_last_lr()[0]


def test_resume_continues_exactly(tmp_path):
    _, straight, lr_straight = _train_linear(tmp_path / "a", stop_at=6)
    _train_linear(tmp_path / "b", stop_at=3)
    start, resumed, lr_resumed = _train_linear(tmp_path / "b", stop_at=6, resume="latest")
    assert (start.step, start.epoch, start.batch_in_epoch, start.extra) == (3, 1, 3, {"note": 3})
    assert start.checkpoint.name == "step_000003"
    assert start.batch_for(1) == 3 and start.batch_for(2) == 0
    assert lr_resumed == lr_straight
    for a, b in zip(straight, resumed, strict=True):
        assert torch.equal(a, b)
    log = (tmp_path / "b" / "log.txt").read_text()
    assert "resumed from" in log and "step 3" in log
