"""The toy demo end to end (quick setting), its data sampler, determinism and the figure helpers (its CLI errors are
rows of tests/test_bad_input.py)."""

import copy
import dataclasses
import json
import math
import os
from itertools import product
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
    """The quick demo; also keeps a copy of each trained model and its theorem-check points, taken where the demo
    hands them to ``check_theorems``: {(form, method): (model, x_eval [E, 1])}."""
    out = tmp_path_factory.mktemp("toy_demo")
    trained = []
    check_theorems = toy_demo.check_theorems

    def keep_model(model, x, posterior, cfg):
        trained.append((copy.deepcopy(model), x.clone()))
        return check_theorems(model, x, posterior, cfg)

    # One thread: as fast on an idle 2-core machine and ~10x faster when other processes share the cores.
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(toy_demo, "check_theorems", keep_model)
        record = toy_demo.main(["--config", str(QUICK_RECIPE), "--out", str(out), "--threads", "1"])
    assert torch.get_num_threads() == threads, "the demo must restore the thread count"
    saved = json.loads((out / "toy_demo.json").read_text())
    assert saved["config"] == json.loads(json.dumps(record["config"]))
    return out, saved, dict(zip(product(toy_demo.FORMS, toy_demo.METHODS), trained, strict=True))


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
    _, record, _ = quick_run
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


def true_log_posterior(x: torch.Tensor) -> torch.Tensor:
    """log p_d(y|x), [..., 2], from the closed-form log-odds of docs/conventions.md §2 (not datagrad)."""
    log_odds = -0.375 * x**2 + 1.25 * x + 0.5 * math.log(4) - math.log(5) - 0.375
    return torch.stack([torch.nn.functional.logsigmoid(-log_odds), torch.nn.functional.logsigmoid(log_odds)], -1)


def brute_force_risks(model, x: torch.Tensor, eps: float, points: int) -> dict[str, float]:
    """The demo's risks by brute force in float64 over ``points`` evenly spaced x' in [x − ε, x + ε] (the candidates
    of its GridSearch): madry_D = E max_x' D(p_d(·|x) || p_θ(·|x')), score_D = E max_x' D(p_d(·|x') || p_θ(·|x')),
    intrinsic_D = E max_x' D(p_d(·|x) || p_d(·|x')), standard_kl = E KL(p_d(·|x) || p_θ(·|x)), D = kl, l1, l2."""
    x = x.flatten().double()  # [B]
    candidates = x + torch.linspace(-eps, eps, points, dtype=torch.float64).unsqueeze(1)  # [P, B]
    with torch.no_grad():
        log_q = model(candidates.reshape(-1, 1).float()).double().log_softmax(-1).reshape(points, len(x), 2)
        log_q_clean = model(x.unsqueeze(1).float()).double().log_softmax(-1)  # [B, 2]
    log_p_clean, log_p = true_log_posterior(x), true_log_posterior(candidates)  # [B, 2], [P, B, 2]
    distances = {
        "kl": lambda a, b: (a.exp() * (a - b)).sum(-1),
        "l1": lambda a, b: (a.exp() - b.exp()).abs().sum(-1),
        "l2": lambda a, b: (a.exp() - b.exp()).pow(2).sum(-1).sqrt(),
    }
    risks = {"standard_kl": distances["kl"](log_p_clean, log_q_clean).mean().item()}
    for name, distance in distances.items():
        risks[f"madry_{name}"] = distance(log_p_clean, log_q).max(0).values.mean().item()
        risks[f"score_{name}"] = distance(log_p, log_q).max(0).values.mean().item()
        risks[f"intrinsic_{name}"] = distance(log_p_clean, log_p).max(0).values.mean().item()
    return risks


def approx(value: float):
    """The recorded risks are float32 computations; the brute force is float64."""
    return pytest.approx(value, rel=1e-4, abs=1e-6)


@pytest.mark.slow
def test_theorem_records_hold(quick_run):
    """Every recorded risk and bound equals a brute-force recomputation from the trained model and the closed-form
    posterior, and the theorems hold for the recomputed values."""
    _, record, trained = quick_run
    grid = torch.tensor(record["grid"]["x"], dtype=torch.float64).unsqueeze(1)
    for (form, method), (model, x_eval) in trained.items():
        run = record["results"][form][method]
        with torch.no_grad():  # the kept model is the one the record describes
            curve = model(grid.float()).double().softmax(-1)[:, 1]
        torch.testing.assert_close(curve, torch.tensor(run["curve"], dtype=torch.float64), rtol=0, atol=1e-6)
        risks = brute_force_risks(model, x_eval, record["config"]["eps"], record["config"]["check_points"])
        for distance in ("l1", "l2"):
            t = run["theorem1"][distance]
            madry, score, intrinsic = (risks[f"{name}_{distance}"] for name in ("madry", "score", "intrinsic"))
            assert t["distance"] == distance and t["holds"] is True
            assert (t["madry"], t["score"], t["intrinsic"]) == (approx(madry), approx(score), approx(intrinsic))
            assert (t["lower_bound"], t["upper_bound"]) == (approx(abs(madry - intrinsic)), approx(madry + intrinsic))
            assert abs(madry - intrinsic) <= score + 1e-9 and score <= madry + intrinsic + 1e-9
        c = run["corollary1"]
        score_l1, intrinsic_l1, madry_kl = risks["score_l1"], risks["intrinsic_l1"], risks["madry_kl"]
        assert c["holds"] is True
        assert (c["score_l1"], c["intrinsic_l1"], c["madry_kl"]) == (approx(score_l1), approx(intrinsic_l1),
                                                                     approx(madry_kl))
        assert (c["lhs"], c["rhs"]) == (approx(abs(score_l1 - intrinsic_l1)), approx(math.sqrt(2 * madry_kl)))
        assert abs(score_l1 - intrinsic_l1) <= math.sqrt(2 * madry_kl) + 1e-9
        for name in ("standard", "madry", "score"):
            assert run["kl_risks"][name] == approx(risks[f"{name}_kl"]), name


@pytest.mark.slow
def test_score_beats_madry_in_expectation_form(quick_run):
    _, record, _ = quick_run
    expectation = record["results"]["expectation"]
    assert expectation["score"]["max_deviation"] < 0.5 * expectation["madry"]["max_deviation"]
    # Each method is best on the risk it minimizes.
    risks = {m: expectation[m]["kl_risks"] for m in toy_demo.METHODS}
    assert risks["score"]["score"] < risks["madry"]["score"]
    assert risks["madry"]["madry"] < risks["score"]["madry"]


@pytest.mark.slow
def test_figures_written(quick_run):
    out, record, _ = quick_run
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
