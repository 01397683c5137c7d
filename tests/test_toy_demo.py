"""The toy demo end to end (quick setting), its data sampler, determinism and the figure helpers (its CLI errors are
rows of tests/test_bad_input.py)."""

import dataclasses
import json
import math
import os
from pathlib import Path

import pytest
import torch

from analysis import toy_demo
from analysis.plotting import plt, save_figure
from datagrad import seed_toy

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
QUICK_RECIPE = REPO / "recipes" / "toy-demo-quick.json"
QUICK = json.loads(QUICK_RECIPE.read_text())


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy_demo")
    # One thread: as fast on an idle 2-core machine and ~10x faster when other processes share the cores.
    threads = torch.get_num_threads()
    record = toy_demo.main(["--config", str(QUICK_RECIPE), "--out", str(out), "--threads", "1"])
    assert torch.get_num_threads() == threads, "the demo must restore the thread count"
    saved = json.loads((out / "toy_demo.json").read_text())
    assert saved["config"] == json.loads(json.dumps(record["config"]))
    return out, saved


def _all_numbers(obj):
    if isinstance(obj, dict):
        for value in obj.values():
            yield from _all_numbers(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _all_numbers(value)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield obj


@pytest.mark.slow
def test_json_structure_and_values(quick_run):
    _, record = quick_run
    assert set(record["results"]) == set(toy_demo.FORMS)
    assert all(set(methods) == set(toy_demo.METHODS) for methods in record["results"].values())
    assert all(math.isfinite(v) for v in _all_numbers(record))
    assert record["config"]["iterations"] == QUICK["iterations"]
    assert record["environment"]["torch"] == torch.__version__
    assert record["environment"]["threads"] == 1 == record["config"]["threads"]
    assert record["wall_seconds"] > 0

    # True curve against the closed-form log-odds of docs/conventions.md §2, computed independently of datagrad.
    x = torch.tensor(record["grid"]["x"], dtype=torch.float64)
    low, high, points = QUICK["grid"]
    assert len(x) == points and x[0] == low and x[-1] == high
    log_odds = -0.375 * x**2 + 1.25 * x + 0.5 * math.log(4) - math.log(5) - 0.375
    true = torch.tensor(record["grid"]["true_posterior"], dtype=torch.float64)
    torch.testing.assert_close(true, torch.sigmoid(log_odds), atol=1e-6, rtol=0)

    # p_d(x) from the two normal densities, normalised over the grid.
    weights = 5 / 6 * torch.exp(-((x + 1) ** 2) / 8) / 2 + 1 / 6 * torch.exp(-((x - 1) ** 2) / 2)
    weights = weights / weights.sum()
    for methods in record["results"].values():
        for run in methods.values():
            curve = torch.tensor(run["curve"], dtype=torch.float64)
            assert curve.shape == true.shape and bool(((curve >= 0) & (curve <= 1)).all())
            deviation = (curve - true).abs()
            assert run["max_deviation"] == pytest.approx(deviation.max().item(), abs=1e-6)
            assert run["argmax_deviation_x"] == pytest.approx(x[deviation.argmax()].item(), abs=1e-6)
            assert len(run["train_loss"]) >= 1 and run["final_train_loss"] >= 0
            assert run["covered_max_deviation"] <= run["max_deviation"]
            assert run["density_weighted_deviation"] == pytest.approx((weights * deviation).sum().item(), rel=1e-4)

    finite = record["training_points"]["finite_sample"]
    assert sorted(finite["y"]) == [0, 0, 0, 0, 0, 1]


@pytest.mark.slow
def test_theorem_records_hold(quick_run):
    _, record = quick_run
    for methods in record["results"].values():
        for run in methods.values():
            for distance in ("l1", "l2"):
                t = run["theorem1"][distance]
                assert t["distance"] == distance and t["holds"] is True
                assert t["lower_bound"] == pytest.approx(abs(t["madry"] - t["intrinsic"]))
                assert t["upper_bound"] == pytest.approx(t["madry"] + t["intrinsic"])
                assert t["lower_bound"] <= t["score"] + 1e-6 and t["score"] <= t["upper_bound"] + 1e-6
            c = run["corollary1"]
            assert c["holds"] is True and c["lhs"] <= c["rhs"] + 1e-6
            assert c["lhs"] == pytest.approx(abs(c["score_l1"] - c["intrinsic_l1"]))
            assert c["rhs"] == pytest.approx(math.sqrt(2 * c["madry_kl"]))
            # The same Madry KL risk, estimated twice with the same exact maximizer.
            assert c["madry_kl"] == pytest.approx(run["kl_risks"]["madry"], rel=1e-5)
            # C^l1 does not depend on the model.
            assert c["intrinsic_l1"] == pytest.approx(run["theorem1"]["l1"]["intrinsic"], rel=1e-6)


@pytest.mark.slow
def test_score_beats_madry_in_expectation_form(quick_run):
    _, record = quick_run
    expectation = record["results"]["expectation"]
    assert expectation["score"]["max_deviation"] < 0.5 * expectation["madry"]["max_deviation"]
    # Each method is best on the risk it minimizes.
    risks = {m: expectation[m]["kl_risks"] for m in toy_demo.METHODS}
    assert risks["score"]["score"] < risks["madry"]["score"]
    assert risks["madry"]["madry"] < risks["score"]["madry"]


@pytest.mark.slow
def test_figures_written(quick_run):
    out, record = quick_run
    assert set(record["figures"]) == set(toy_demo.FORMS)
    for name in record["figures"].values():
        data = (out / name).read_bytes()
        assert len(data) > 10_000 and data.startswith(PNG_SIGNATURE)
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_sample_pairs_exact_counts_and_class_moments():
    mixture = seed_toy()
    x, y = toy_demo.sample_pairs(mixture, (50_000, 10_000), torch.Generator().manual_seed(0))
    assert x.shape == (60_000, 1) and x.dtype == torch.float32
    assert (y == 0).sum() == 50_000 and (y == 1).sum() == 10_000
    for cls, (mean, std) in enumerate([(-1.0, 2.0), (1.0, 1.0)]):  # docs/conventions.md §2
        xs = x[y == cls, 0].double()
        n = len(xs)
        assert abs(xs.mean().item() - mean) < 5 * std / math.sqrt(n)
        assert abs(xs.std().item() - std) < 5 * std / math.sqrt(2 * n)


def test_within_balls_matches_brute_force():
    generator = torch.Generator().manual_seed(0)
    x = 3 * torch.randn(7, 1, generator=generator)
    grid = torch.linspace(-6, 6, 301).unsqueeze(1)
    brute = ((grid - x.T).abs() <= 0.5).any(dim=1)  # [G, N] -> [G]
    assert torch.equal(toy_demo.within_balls(grid, x, 0.5), brute)
    assert 0 < brute.sum() < len(grid)


def test_tiny_run_is_deterministic(tmp_path):
    cfg = toy_demo.ToyDemoConfig(
        expectation_counts=(40, 8), iterations=4, batch_size=16, hidden=8, grid=(-6.0, 6.0, 13),
        eval_points=10, check_points=5,
    )
    first = toy_demo.run_demo(dataclasses.replace(cfg, out=str(tmp_path / "a")))
    second = toy_demo.run_demo(dataclasses.replace(cfg, out=str(tmp_path / "b")))
    for form in toy_demo.FORMS:
        for method in toy_demo.METHODS:
            assert first["results"][form][method]["curve"] == second["results"][form][method]["curve"]
            assert first["results"][form][method]["train_loss"] == second["results"][form][method]["train_loss"]
    other = toy_demo.run_demo(dataclasses.replace(cfg, seed=1, out=str(tmp_path / "c")))
    assert other["results"]["expectation"]["score"]["curve"] != first["results"]["expectation"]["score"]["curve"]


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="eval_points"):
        toy_demo.ToyDemoConfig(expectation_counts=(5, 1), eval_points=7)
    with pytest.raises(ValueError, match="pgd_step_size"):
        toy_demo.ToyDemoConfig(pgd_step_size=-0.1)
    with pytest.raises(ValueError, match="unknown method"):
        toy_demo.objective("trades", None, torch.zeros(1, 1), seed_toy(), None, None)


def test_save_figure_is_atomic(tmp_path):
    target = tmp_path / "sub" / "figure.png"
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])

    def crash_midway(path, **kwargs):
        Path(path).write_bytes(b"partial png")
        raise RuntimeError("crash while writing")

    fig.savefig = crash_midway
    with pytest.raises(RuntimeError, match="crash while writing"):
        save_figure(fig, target)
    assert not target.exists() and list(target.parent.iterdir()) == []
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    assert save_figure(fig, target) == target
    assert target.read_bytes()[:8] == PNG_SIGNATURE and list(target.parent.iterdir()) == [target]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # ordinary permissions, not mkstemp's 0600


def test_save_figure_png_only(tmp_path):
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    with pytest.raises(ValueError, match="PNG"):
        save_figure(fig, tmp_path / "figure.pdf")
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    path = save_figure(fig, tmp_path / "figure.png")
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    assert not plt.fignum_exists(fig.number)
