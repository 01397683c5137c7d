"""analysis.validate_posterior: the metric code against hand computations, an EXACT stand-in score model (cosine 1,
TV 0) and deliberately wrong ones (bad numbers), the full command with a trained tiny score net, and bad input."""

import json

import pytest
import torch

from analysis.validate_posterior import (
    DEFAULT_SIGMA,
    MixtureScores,
    ValidateConfig,
    cosine,
    main,
    relative_error,
    run_validation,
    total_variation,
    validate_posterior,
)
from datagrad import GaussianMixture
from scorenets import ScoreNet
from trainlib.config import run_cli
from trainlib.data import load_dataset, toy_mixture


@pytest.fixture(scope="module")
def points():
    x, y = load_dataset("gmm-8x8", "test").get(range(40))
    return x.clamp(0, 1), y


def test_metric_functions_against_hand_computations():
    a = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])  # [B=1, K=2, D=2]
    b = torch.tensor([[[2.0, 0.0], [-1.0, 1.0]]])
    torch.testing.assert_close(cosine(a, b), torch.tensor([[1.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(relative_error(a, b), torch.tensor([[0.5, 2 / 2**0.5]], dtype=torch.float64))
    p, q = torch.tensor([[0.7, 0.2, 0.1]]).log(), torch.tensor([[0.4, 0.4, 0.2]]).log()
    torch.testing.assert_close(total_variation(p, q), torch.tensor([0.3], dtype=torch.float64))


def test_exact_stand_in_gives_cosine_one_and_tv_zero(points):
    x, y = points
    mixture = toy_mixture("gmm-8x8")
    per_sigma, acceptance = run_validation(MixtureScores(mixture), mixture, x, y, ValidateConfig(sigmas=(0.05, 0.3)))
    assert [r["sigma"] for r in per_sigma] == sorted({0.05, 0.3, DEFAULT_SIGMA})  # the default σ is always included
    for r in per_sigma:
        for where in ("gradient_clean", "gradient_perturbed"):
            assert r[where]["cosine"]["p10"] > 1 - 1e-6 and r[where]["relative_error"]["p90"] < 1e-4
            assert r[where]["top_class_points"] == 0 or r[where]["top_class_cosine"]["p10"] > 1 - 1e-4
        for estimate in ("trajectory", "anchored_exact"):
            assert r["tv_perturbed"][estimate]["p90"] < 1e-5
        assert r["tv_perturbed"]["true_movement"]["median"] > 0.1  # PGD did move the posterior
        assert r["linf_perturbation"] <= 0.1 + 1e-6
    assert acceptance["passed"] and acceptance["sigma"] == DEFAULT_SIGMA


def test_smoothed_anchor_error_is_reported_not_hidden(points):
    """With exact scores the smoothed-anchor estimate at x equals the smoothed label: TV at x = its distance."""
    x, y = points
    mixture = toy_mixture("gmm-8x8")
    r = run_validation(MixtureScores(mixture), mixture, x, y, ValidateConfig(sigmas=(0.1,)))[0][0]
    assert r["tv_perturbed"]["smoothed_anchor_at_x"]["median"] == pytest.approx(0.09, abs=2e-3)  # α(1 − 1/K)


def wrong_stand_in(kind: str) -> MixtureScores:
    mixture = toy_mixture("gmm-8x8")
    if kind == "permuted-classes":
        means = mixture.means[torch.arange(1, 11) % 10]
        return MixtureScores(GaussianMixture(means, mixture.stds, mixture.priors, mixture.event_shape))
    # "blurred": scores of much wider classes (wrong σ inside the network), right directions only roughly
    return MixtureScores(GaussianMixture(0.5 + 0.5 * (mixture.means - 0.5), mixture.stds * 3, mixture.priors,
                                         mixture.event_shape))  # fmt: skip


@pytest.mark.parametrize("kind", ["permuted-classes", "blurred"])
def test_wrong_stand_in_gives_bad_numbers(points, kind):
    x, y = points
    mixture = toy_mixture("gmm-8x8")
    per_sigma, acceptance = run_validation(wrong_stand_in(kind), mixture, x, y, ValidateConfig(sigmas=(0.1,)))
    r = per_sigma[0]
    assert not acceptance["passed"]
    assert r["gradient_clean"]["relative_error"]["median"] > 0.3
    assert r["tv_perturbed"]["trajectory"]["median"] > 0.1
    if kind == "permuted-classes":
        assert r["gradient_clean"]["cosine"]["median"] < 0.2


def test_command_trains_through_the_library_and_writes_results(tmp_path):
    """A 3-step score net on gmm-4x4: bad numbers, but every output is there and re-running reuses the net."""
    cfg = ValidateConfig(out=str(tmp_path / "v"), dataset="gmm-4x4", sigmas=(0.3,), n_points=6, pgd_steps=2,
                         train_steps=3, train_batch_size=8, train_preset="tiny8")  # fmt: skip
    record = validate_posterior(cfg)
    out = tmp_path / "v"
    assert (out / "scorenet-run" / "scorenet" / "scorenet_config.json").is_file()
    assert (out / "error_vs_sigma.png").stat().st_size > 0
    saved = json.loads((out / "validate_posterior.json").read_text())
    assert saved["n_points"] == 6 and [r["sigma"] for r in saved["results"]] == sorted({DEFAULT_SIGMA, 0.3})
    assert saved["train_seconds"] > 0 and set(saved["acceptance"]) == {"sigma", "median_cosine", "median_tv", "passed"}
    assert record["results"][0]["network_calls"] >= cfg.pgd_steps + 2
    again = validate_posterior(cfg)  # resumes the finished training run: same net, same numbers
    assert again["results"][0]["tv_perturbed"] == record["results"][0]["tv_perturbed"]


# -- bad input ----------------------------------------------------------------------------------------------------
def cli(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv))
    return exit_info.value.code, capsys.readouterr().err.strip()


@pytest.mark.parametrize(
    "flags, message",
    [(["--sigmas", "0.1", "0"], "noise_std σ must be a positive"), (["--default-sigma", "-0.1"], "positive"),
     (["--sigmas", "100"], "outside the schedule's range"), (["--dataset", "digits"], "Gaussian-mixture toy"),
     (["--eps", "0"], "eps must be > 0")],
)  # fmt: skip
def test_bad_options_give_one_error_line_and_no_output(tmp_path, capsys, flags, message, scorenet_k3):
    out = tmp_path / "out"
    extra = ["--scorenet", str(scorenet_k3), "--dataset", "gmm-4x4"] if "100" in flags else []
    code, err = cli(["--out", str(out), *extra, *flags], capsys)
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert not out.exists()


@pytest.fixture(scope="module")
def scorenet_k3(tmp_path_factory):
    net = ScoreNet.build("tiny8", 3, (1, 4, 4), block_out_channels=(8, 16), norm_num_groups=8)
    return net.save_pretrained(tmp_path_factory.mktemp("k3") / "scorenet")


def test_scorenet_of_another_class_count_is_refused(tmp_path, capsys, scorenet_k3):
    out = tmp_path / "out"
    code, err = cli(["--out", str(out), "--scorenet", str(scorenet_k3)], capsys)  # gmm-8x8 has 10 classes
    assert code == 2 and "score net for 3 classes, expected 10" in err and not out.exists()
    code, err = cli(["--out", str(out), "--scorenet", str(tmp_path / "missing")], capsys)
    assert code == 2 and "score net not found" in err and not out.exists()
