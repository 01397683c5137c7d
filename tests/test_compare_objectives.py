"""analysis.compare_objectives and analysis.score_risk end to end on gmm-4x4 (exact truth): tiny runs over two seeds,
the Bayes row at R_SCORE = 0, the posterior net's own row, reuse of finished runs and cached risks, the σ sweep, and
the score_risk command, and the paired differences against one row."""

import json

import numpy as np
import pytest

from analysis import compare_objectives, score_risk
from scorenets import build_posterior_net
from trainlib.adversarial import AdversarialConfig
from trainlib.config import parse_config


def recipe(path, **values):
    base = dict(dataset="gmm-4x4", model="mlp", eps=0.1, step_size=0.05, pgd_steps=2, batch_size=64, epoch_size=256,
                epochs=1, n_val=32, n_test=32, cpu_threads=1, checkpoint_every=0, log_every=2, val_every=0,
                eval_batch_size=64)
    path.write_text(json.dumps({**base, **values}))
    return str(path)


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    recipes = [recipe(root / "gmm-4x4-standard.json", objective="standard"),
               recipe(root / "gmm-4x4-direct-score.json", objective="direct-score", posterior="analytic",
                      noise_std=0.1)]
    argv = ["--recipes", *recipes, "--seeds", "0", "1", "--out", str(root / "out"), "--n-test", "24", "--pgd-steps",
            "3", "--no-autoattack", "--paired-with", "gmm-4x4-standard"]
    rows = compare_objectives.compare(parse_config(compare_objectives.CompareConfig, argv))
    return root, argv, rows


def test_rows_seeds_bayes_and_outputs(compared):
    root, _, rows = compared
    names = [r["name"] for r in rows]
    assert names == ["Bayes (p_θ = p_d)", "gmm-4x4-standard", "gmm-4x4-direct-score"]
    bayes = rows[0]["summary"]["auto"]
    assert bayes["score_l1"]["mean"] < 1e-6 and bayes["score_kl"]["mean"] < 1e-6  # p_θ = p_d
    for row in rows[1:]:
        assert row["seeds"] == [0, 1] and len(row["runs"]["auto"]) == 2
        assert (root / "out" / row["name"] / "seed-1" / "ema.safetensors").is_file()
        s = row["summary"]["auto"]["score_l1"]
        assert s["mean"] > 0 and len(s["values"]) == 2 and s["half_width"] > 0
        record = row["runs"]["auto"][0]
        assert record["score_l1"]["low"] <= record["score_l1"]["mean"] <= record["score_l1"]["high"]
        assert record["score_l1"]["mean"] >= max(record["per_attack_score_l1"].values()) - 1e-12
        assert record["truth"]["kind"] == "exact" and record["label"]["clean_acc"] is not None
        assert len(row["train_seconds"]) == 2 and all(t > 0 for t in row["train_seconds"])
    table = (root / "out" / "comparison.md").read_text()
    assert "Bayes" in table and "R_SCORE^ℓ1 (auto)" in table and "gmm-4x4-direct-score" in table
    assert (root / "out" / "comparison.png").stat().st_size > 0
    saved = json.loads((root / "out" / "comparison.json").read_text())
    assert [r["name"] for r in saved["rows"]] == names
    budgets = [r["budget"] for r in saved["rows"] if "budget" in r]  # the recipes' own: mlp, 1 × 256, batch 64, PGD-2
    assert budgets == [{"model": "mlp", "epochs": 1, "epoch_size": 256, "batch_size": 64, "pgd_steps": 2,
                        "step_size": 0.05, "eps": 0.1, "attack_runs": runs} for runs in (0, 1)]


def test_paired_difference_is_the_per_point_difference_over_common_seeds(compared):
    root, _, rows = compared
    standard, direct = rows[1], rows[2]
    assert "paired" not in standard and "paired" not in rows[0]  # the reference itself; Bayes shares no seed
    for metric in ("score_l1", "score_kl"):
        for r in (standard, direct):
            for record in r["runs"]["auto"]:  # the per-point values are what the reported mean is the mean of
                assert len(record[f"{metric}_points"]) == 24
                assert np.mean(record[f"{metric}_points"]) == pytest.approx(record[metric]["mean"], abs=1e-9)
        expected = np.mean([np.subtract(d[f"{metric}_points"], s[f"{metric}_points"])
                            for d, s in zip(direct["runs"]["auto"], standard["runs"]["auto"], strict=True)], axis=0)
        paired = direct["paired"]["auto"][metric]
        assert paired["seeds"] == [0, 1] and paired["n"] == 24
        assert paired["mean"] == pytest.approx(expected.mean(), abs=1e-9)
        assert paired["low"] <= paired["mean"] <= paired["high"]
        assert expected.min() <= paired["low"] and paired["high"] <= expected.max()
    assert "Δ R_SCORE^ℓ1 vs gmm-4x4-standard (auto, paired)" in (root / "out" / "comparison.md").read_text()


def test_paired_difference_uses_only_the_seeds_both_rows_have():
    def row(seeds, values):
        return {"seeds": seeds, "runs": {"auto": [{"score_l1_points": v} for v in values]}}

    reference = row([0, 1], [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    other = row([1, 2], [[0.5, 0.5, 2.0], [9.0, 9.0, 9.0]])
    paired = compare_objectives.paired_difference(other, reference, "auto", "score_l1")
    assert paired["seeds"] == [1] and paired["mean"] == pytest.approx(1.0)  # seed 1 only: (0.5 + 0.5 + 2) / 3
    assert compare_objectives.paired_difference(row([3], [[1.0]]), reference, "auto", "score_l1") is None


def test_second_call_reuses_runs_and_cached_risks(compared, capsys):
    _, argv, rows = compared
    again = compare_objectives.compare(parse_config(compare_objectives.CompareConfig, argv))
    assert "finished run found, not retrained" in capsys.readouterr().out
    for first, second in zip(rows[1:], again[1:], strict=True):
        assert first["runs"]["auto"][0]["score_l1"] == second["runs"]["auto"][0]["score_l1"]


def test_sigma_sweep_adds_direct_score_rows(compared):
    root, _, _ = compared
    argv = ["--recipes", str(root / "gmm-4x4-direct-score.json"), "--sigmas", "0.2", "--out", str(root / "sweep"),
            "--epochs", "1", "--seeds", "0", "1", "--one-seed", "gmm-4x4-direct-score.json"]
    plan = compare_objectives.entries(parse_config(compare_objectives.CompareConfig, argv))
    assert [(e.name, e.config.noise_std, e.seeds) for e in plan] == [("gmm-4x4-direct-score", 0.1, (0,)),
                                                                     ("gmm-4x4-direct-score-sigma0.2", 0.2, (0,))]


def test_score_risk_command_on_a_run(compared, capsys):
    root, _, _ = compared
    run = root / "out" / "gmm-4x4-standard" / "seed-0"
    records = score_risk.main([str(run), "--n-points", "16", "--pgd-steps", "2", "--out", str(root / "risk")])
    assert records[0]["n_points"] == 16 and records[0]["truth"]["kind"] == "exact"
    assert "R_SCORE^ℓ1" in (root / "risk" / "score_risk.md").read_text()
    assert (run / "analysis" / "score_risk.json").is_file()


def test_budget_gives_every_row_the_same_model_epochs_batch_and_attack(compared):
    root, _, _ = compared
    budget = recipe(root / "budget.json", objective="trades-se", model="cnn-8", epochs=3, batch_size=32, pgd_steps=5,
                    step_size=0.03)
    argv = ["--recipes", str(root / "gmm-4x4-standard.json"), str(root / "gmm-4x4-direct-score.json"), "--budget",
            budget, "--out", str(root / "budget")]
    plan = compare_objectives.entries(parse_config(compare_objectives.CompareConfig, argv))
    for entry in plan:
        c = entry.config
        budget_values = (c.model, c.epochs, c.batch_size, c.pgd_steps, c.step_size, c.epoch_size)
        assert budget_values == ("cnn-8", 3, 32, 5, 0.03, 256)
    assert [e.config.objective for e in plan] == ["standard", "direct-score"]  # the objectives stay the recipes'


@pytest.mark.parametrize("objective, options, runs", [
    ("standard", {}, 0), ("pgd-at", {}, 1), ("trades-kl", {"attack_starts": 3}, 3),
    ("direct-score", {"attack_losses": ("distance", "data-margin")}, 2),
    ("direct-score", {"attack_losses": ("distance", "label-ce"), "attack_starts": 2}, 4)])
def test_attack_runs_count_starts_times_attacks(objective, options, runs):
    """The caption's attack cost per example: PGD runs = starts × attacks (direct SCORE's attack_losses)."""
    config = AdversarialConfig(dataset="gmm-4x4", objective=objective, **options)
    assert compare_objectives.attack_runs(config) == runs


def test_posterior_net_row_is_the_net_itself_at_the_recipes_sigma(tmp_path):
    """One row per (posterior net, σ) of the direct-SCORE rows, after the Bayes row: against the same net at the same σ
    as truth its risk is 0 (p_θ = p_d); at another σ, or against the closed form, it is not."""
    net = tmp_path / "posterior_net"
    build_posterior_net("tiny8", 3, (1, 4, 4), 0.05, 0.5, block_out_channels=(8, 16), norm_num_groups=4
                        ).save_pretrained(net, safe_serialization=True)
    direct = dict(objective="direct-score", posterior="posterior-net", posterior_net=str(net))
    recipes = [recipe(tmp_path / "a.json", **direct, noise_std=0.1),
               recipe(tmp_path / "b.json", **direct, noise_std=0.1, attack_gradient="model"),
               recipe(tmp_path / "c.json", **direct, noise_std=0.3)]
    argv = ["--recipes", *recipes, "--truth", "auto", "posterior-net", "--posterior-net", str(net), "--noise-std",
            "0.1", "--out", str(tmp_path / "out"), "--n-test", "16", "--pgd-steps", "2", "--no-autoattack"]
    rows = compare_objectives.compare(parse_config(compare_objectives.CompareConfig, argv))
    names = [r["name"] for r in rows]
    assert names[:3] == ["Bayes (p_θ = p_d)", "posterior net itself (p_θ = p_φ, σ 0.1)",
                         "posterior net itself (p_θ = p_φ, σ 0.3)"] and names[3:] == ["a", "b", "c"]
    same, other = rows[1]["summary"], rows[2]["summary"]
    assert same["posterior-net"]["score_l1"]["mean"] < 1e-6 and same["posterior-net"]["score_kl"]["mean"] < 1e-6
    assert other["posterior-net"]["score_l1"]["mean"] > 1e-3
    assert same["auto"]["score_l1"]["mean"] > 1e-3 and same["label"]["clean_acc"]["mean"] >= 0
    assert "posterior net itself" in (tmp_path / "out" / "comparison.md").read_text()
