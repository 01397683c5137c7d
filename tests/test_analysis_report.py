"""The analysis commands end to end on tiny runs: Theorem 4 / 5 CLIs, dynamics from snapshots, saliency, the report
(HTML + Markdown, escaping, caching), the headless-Chromium check, the score-net code path, and bad input."""

import html
import json
import os
import re
from pathlib import Path

import pytest
import torch

from analysis import alignment, dynamics, report, smoothing, sources
from datagrad import PGD, intrinsic_risk, toy_mixture
from scorenets import ScoreNet, build_posterior_net
from trainlib.adversarial import AdversarialConfig, train
from trainlib.checkpoint import save_weights
from trainlib.classifiers import build_classifier
from trainlib.datasets import load_dataset

REQUIRE_BROWSER = os.environ.get("SCORE_DATAGRAD_REQUIRE_BROWSER") == "1"  # set by .ci/run


def tiny_run(directory: Path, objective: str) -> Path:
    """A gmm-4x4 run (exact mixture posterior) of two epochs with per-epoch snapshots, in seconds."""
    cfg = AdversarialConfig(
        dataset="gmm-4x4", model="mlp", objective=objective, eps=0.1, step_size=0.05, pgd_steps=2, batch_size=64,
        epoch_size=128, epochs=2, n_val=32, n_test=32, cpu_threads=1, checkpoint_every=0, snapshot_every=1,
        log_every=1, eval_batch_size=64, out=str(directory),
    )
    train(cfg)
    return directory


def intrinsic_l1_upper_bound(x: torch.Tensor, mixture, eps: float) -> torch.Tensor:
    """Per point x [B, ...] in [0, 1], an upper bound on max ℓ1(p(·|x), p(·|x')) over x' in the ℓ∞ ball of radius ε
    inside [0, 1]^d, for a 3-class mixture with one std s (closed form, not datagrad's risks).

    The logits l_k(x') = log π_k − ||x' − μ_k||²/(2s²) differ by affine functions of x', whose extremes over the box
    are exact; so q_k(x') = 1/(1 + Σ_j exp(l_j − l_k)) lies in [1/(1 + Σ_j exp(max(l_j − l_k))),
    1/(1 + Σ_j exp(−max(l_k − l_j)))]. With 3 classes every subset S ∉ {∅, all} is a class or a class's complement,
    and ℓ1(p, q) = 2·max_S (q(S) − p(S)) ≤ 2·max_k max(max q_k − p_k, p_k − min q_k)."""
    assert mixture.num_classes == 3 and bool((mixture.stds == mixture.stds[0]).all())
    flat = x.flatten(1).double()
    low, high = (flat - eps).clamp(0, 1), (flat + eps).clamp(0, 1)
    means, variance = mixture.means.double(), float(mixture.stds[0]) ** 2
    offset = mixture.priors.double().log() - means.pow(2).sum(1) / (2 * variance)  # l_k = μ_k·x'/s² + offset_k

    def max_difference(k: int, j: int) -> torch.Tensor:  # max over the box of l_k − l_j
        w = (means[k] - means[j]) / variance
        return torch.where(w > 0, high * w, low * w).sum(1) + offset[k] - offset[j]

    p = mixture.log_posterior(flat.view_as(x)).exp()
    bound = torch.zeros(len(flat), dtype=torch.float64)
    for k in range(3):
        others = [j for j in range(3) if j != k]
        q_max = 1 / (1 + sum(torch.exp(-max_difference(k, j)) for j in others))
        q_min = 1 / (1 + sum(torch.exp(max_difference(j, k)) for j in others))
        bound = torch.maximum(bound, torch.maximum(q_max - p[:, k], p[:, k] - q_min))
    return 2 * bound


@pytest.fixture(scope="module")
def built_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    runs = [tiny_run(root / "standard<b>", "standard"), tiny_run(root / "trades-se", "trades-se")]
    names = [str(r) for r in runs]
    out = root / "out"
    alignment.main([*names, "--n-points", "48", "--eps-scales", "1", "0.5", "0.25", "--pgd-steps", "5",
                    "--out", str(out)])
    # the library calls behind the other two commands (their figures are drawn by the report below)
    smoothing.run_analysis(smoothing.SmoothingConfig(runs=tuple(names), sigmas=(0.1, 0.3), n_points=200, n_noise=4))
    dynamics.run_analysis(dynamics.DynamicsConfig(runs=tuple(names), n_points=48, pgd_steps=3))
    record = report.main([*names, "--out", str(out), "--n-images", "3"])
    return runs, out, record


@pytest.mark.slow
def test_analyses_are_cached_per_run_and_read_back(built_report, monkeypatch):
    runs, _, _ = built_report
    for name in ("theorem4", "theorem5", "dynamics"):
        assert sources.cache_path(runs[0], name).is_file(), name
    monkeypatch.setattr(alignment, "analyse", lambda *a: pytest.fail("recomputed a cached analysis"))
    again = alignment.run_analysis(alignment.AlignmentConfig(runs=tuple(map(str, runs)), n_points=48,
                                                             eps_scales=(1.0, 0.5, 0.25), pgd_steps=5))
    assert [r["objective"] for r in again] == ["standard", "trades-se"]
    theorem4 = again[1]
    assert theorem4["dual_norm_q"] == 1.0 and len(theorem4["expansion"]["points"]) == 3
    assert theorem4["settings"]["posterior"]["kind"] == "exact mixture"
    assert 0 <= theorem4["terms"]["sign_condition"] <= 1 and -1 <= theorem4["terms"]["cosine"] <= 1
    theorem5 = json.loads(sources.cache_path(runs[0], "theorem5").read_text())
    per_sigma = theorem5["results"][1]
    assert per_sigma["sigma"] == 0.3 and per_sigma["variance"] == pytest.approx(0.09)
    assert per_sigma["d_risk_d_var"]["score"]["mean"] == pytest.approx(per_sigma["d_risk_d_std"]["score"]["mean"] / 0.6)
    dyn = json.loads(sources.cache_path(runs[1], "dynamics").read_text())
    assert [e["epoch"] for e in dyn["epochs"]] == [1, 2] and sorted(dyn["validation"]) == ["1", "2"]
    # C^ℓ1 on the first 48 gmm-4x4 test points (ε = 0.1, clamped to [0, 1]): the PGD estimate is a lower estimate of
    # the true max, which the closed form bounds; recomputed outside the pipeline, C and the floor C²/2 agree
    x = load_dataset("gmm-4x4", "test").get(range(48), torch.device("cpu"))[0].double().clamp(0, 1)
    mixture = toy_mixture("gmm-4x4")
    bound = float(intrinsic_l1_upper_bound(x, mixture, 0.1).mean())
    assert 0 < dyn["intrinsic_l1"] <= bound and dyn["madry_kl_floor"] <= bound**2 / 2
    attack = PGD(0.1, 0.025, 3, "linf", random_start=True, clamp=(0.0, 1.0))
    recomputed = intrinsic_risk(x, mixture, attack, "l1", generator=torch.Generator().manual_seed(0)).item()
    assert dyn["intrinsic_l1"] == pytest.approx(recomputed, rel=1e-9)
    assert dyn["madry_kl_floor"] == pytest.approx(recomputed**2 / 2, rel=1e-9)
    assert all(e["corollary1_holds"] for e in dyn["epochs"])  # with the exact posterior it must hold


@pytest.mark.slow
def test_report_files_escape_text_and_link_every_figure(built_report):
    _, out, record = built_report
    page = (out / "report.html").read_text()
    markdown = (out / "report.md").read_text()
    sources_ = [html.unescape(src) for src in re.findall(r'<img src="([^"]+)"', page)]
    assert len(sources_) == len(record["figures"]) >= 6  # theorem 4, 5, two dynamics, alignment vs robustness, saliency
    for src in sources_:
        assert not src.startswith(("http:", "https:", "/")) and (out / src).stat().st_size > 1000, src
        assert f"]({src})" in markdown
    assert "standard&lt;b&gt;" in page and "standard<b>" not in page  # run names are escaped
    assert "<script src" not in page and "http" not in page.split("<script>")[0]  # nothing fetched
    for heading in ("Accuracy", "Theorem 4: gradient alignment", "Theorem 5", "Training dynamics"):
        assert heading in page and heading in markdown
    assert page.count("<figcaption>") == len(sources_)


@pytest.mark.slow
def test_report_renders_in_headless_chromium_with_every_image(built_report):
    _, out, record = built_report
    if report.find_browser() is None:
        if REQUIRE_BROWSER:
            pytest.fail("SCORE_DATAGRAD_REQUIRE_BROWSER=1 but no Chromium found (apt-get install chromium)")
        pytest.skip("no Chromium on this machine (apt-get install chromium); CI installs it and requires this test")
    status = report.check_in_browser(out / "report.html")
    assert status["ok"], status
    assert status["images"] == status["loaded"] == len(record["figures"])
    broken = out / "broken.html"
    broken.write_text((out / "report.html").read_text().replace('src="figures/saliency.png"', 'src="figures/none.png"'))
    status = report.check_in_browser(broken)  # the check sees a missing image
    assert not status["ok"] and status["loaded"] == status["images"] - 1


def weights_file(path: Path, dataset: str, num_classes: int, image_shape) -> Path:
    model = build_classifier("mlp", dataset, num_classes, image_shape)
    info = dict(model="mlp", dataset=dataset, num_classes=num_classes, image_shape=list(image_shape), norm="linf",
                eps=0.2, objective="standard")
    save_weights(path, model.state_dict(), {"trainlib": json.dumps(info)})
    return path


def tiny_scorenet(directory: Path, num_classes: int) -> Path:
    torch.manual_seed(0)
    ScoreNet.build("tiny8", num_classes, (1, 8, 8), block_out_channels=(16, 32), norm_num_groups=8).save_pretrained(
        directory)
    return directory


def test_score_net_path_runs_both_theorems(tmp_path):
    weights = weights_file(tmp_path / "digits.safetensors", "digits", 10, (1, 8, 8))
    net = tiny_scorenet(tmp_path / "sn", 10)
    options = ["--n-points", "4", "--eps-scales", "1", "--pgd-steps", "1", "--out", str(tmp_path / "out")]
    records = alignment.main([str(weights), "--scorenet", str(net), "--posterior", "scorenet", "--anchor", "label",
                              *options])
    assert records[0]["settings"]["posterior"]["anchor_smoothing"] == 1e-4
    assert records[0]["label_agreement"] == 1.0  # Y_d(x) is the label under the confident anchor
    posterior_net = tmp_path / "posterior"
    build_posterior_net("tiny8", 10, (1, 8, 8), 0.05, 0.5, block_out_channels=(8, 16), norm_num_groups=4
                        ).save_pretrained(posterior_net, safe_serialization=True)
    records = alignment.main([str(weights), "--posterior-net", str(posterior_net), *options])
    assert records[0]["settings"]["posterior"] == {
        "kind": "estimate, as in direct SCORE training", "posterior": "posterior-net", "noise_std": 0.2,
        "posterior_net": str(posterior_net), "scorenet": "runs/scorenet-digits"}
    member = tmp_path / "member"  # --posterior-ensemble: a deep ensemble as the data posterior, as in training
    build_posterior_net("tiny8", 10, (1, 8, 8), 0.05, 0.5, block_out_channels=(8, 16), norm_num_groups=4
                        ).save_pretrained(member, safe_serialization=True)
    ensemble = alignment.main([str(weights), "--posterior-net", str(posterior_net), "--posterior-ensemble",
                               str(member), *options, "--out", str(tmp_path / "ensemble")])
    assert list(ensemble[0]["settings"]["posterior"]["posterior_ensemble"]) == [str(member)]
    assert ensemble[0]["terms"] != records[0]["terms"]  # another p_d: other data gradients
    records = smoothing.main([str(weights), "--scorenet", str(net), "--sigmas", "0.2", "--n-points", "4",
                              "--n-noise", "2", "--out", str(tmp_path / "out")])
    assert records[0]["n_samples"] == 8 and records[0]["settings"]["class_score"] == str(net)
    batched = smoothing.run_analysis(smoothing.SmoothingConfig(runs=(str(weights),), scorenet=str(net), sigmas=(0.2,),
                                                               n_points=4, n_noise=2, batch_size=3), recompute=True)
    for one, many in zip(batched[0]["results"], records[0]["results"], strict=True):  # batching changes no value
        for name in ("finite_difference", "score", "pathwise"):
            assert one["d_risk_d_std"][name]["mean"] == pytest.approx(many["d_risk_d_std"][name]["mean"], rel=1e-9)
    assert sources.cache_path(weights, "theorem5").name == "digits.theorem5.json"


def test_saliency_figure_handles_colour_images(tmp_path):
    """CIFAR-shaped input (3 channels): images shown in RGB, gradient maps summed over channels."""
    from analysis.saliency import plot_saliency

    rng = torch.Generator().manual_seed(0)
    maps = lambda: torch.randn(2, 32, 32, generator=rng).numpy()
    result = {"images": torch.rand(2, 32, 32, 3, generator=rng).numpy(), "labels": [3, 7], "data": maps(),
              "models": {"a": {"grad": maps(), "cosine": [0.1, -0.2]}, "b": {"grad": maps(), "cosine": [0.3, 0.4]}}}
    assert plot_saliency(tmp_path / "s.png", result).stat().st_size > 1000
