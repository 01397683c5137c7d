"""analysis.validate_posterior: the metrics against hand computations; the whole command along a recipe's attack
path with EXACT stand-ins for the posterior net and the score net (TV 0 and cosine 1, while the label-anchored
trajectory is measurably wrong: its target is not a function of x'), a deliberately wrong stand-in (bad numbers),
the exact smoothed training-set posterior as the truth on real digits, and bad input."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from analysis import validate_posterior as vp
from datagrad import GaussianMixture, toy_mixture
from datagrad.seeding import seeded_generator
from trainlib.adversarial import AdversarialConfig
from trainlib.checkpoint import save_weights
from trainlib.classifiers import WEIGHTS_METADATA_KEY, build_classifier
from trainlib.datasets import load_dataset
from trainlib.objectives import build_objective, fixed_posterior

ROOT = Path(__file__).resolve().parent.parent


class ExactScores:
    """A score net with the mixture's exact class scores (and the marginal as the null class)."""

    training = False

    def __init__(self, mixture):
        self.mixture, self.num_classes, self.forward_calls = mixture, mixture.num_classes, 0
        self.image_shape = (1, 8, 8)

    def class_scores(self, x, noise_std, include_null=False, max_batch=None):
        self.forward_calls += 1
        scores = [self.mixture.score(x, torch.full((len(x),), k), noise_std) for k in range(self.num_classes)]
        if include_null:
            scores.append(self.mixture.score(x, None, noise_std))
        return torch.stack(scores, dim=1)


class ExactPosteriorNet(nn.Module):
    """A posterior net returning the mixture's exact log p_σ(·|x) as logits."""

    def __init__(self, mixture):
        super().__init__()
        self.mixture, self.num_classes, self.image_shape = mixture, mixture.num_classes, (1, 8, 8)

    def forward(self, x, noise_std):
        return self.mixture.log_posterior(x, float(noise_std))

    def check_noise_std(self, noise_std):
        return float(noise_std)


def test_metrics_against_hand_computations():
    p, q = torch.tensor([[0.7, 0.2, 0.1]]).log(), torch.tensor([[0.4, 0.4, 0.2]]).log()
    torch.testing.assert_close(vp.total_variation(p, q), torch.tensor([0.3], dtype=torch.float64))
    a = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    torch.testing.assert_close(vp.matrix_cosine(a, 3 * a), torch.tensor([1.0], dtype=torch.float64))
    torch.testing.assert_close(vp.matrix_cosine(a, -a), torch.tensor([-1.0], dtype=torch.float64))
    grad = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # G_0 = e_0, G_1 = e_1, p = (0.25, 0.75)
    centred = vp.centred(grad, torch.tensor([[0.25, 0.75]]).log())
    torch.testing.assert_close(centred, torch.tensor([[[0.75, -0.75], [-0.25, 0.25]]], dtype=torch.float64))


def test_leaves_label_counts_where_the_estimate_and_the_truth_name_another_class():
    """Four points, label 0: the estimate leaves it at points 1 and 3, the truth at 2 and 3 (a linear 2-class truth
    whose class is the sign of the first coordinate)."""
    truth = GaussianMixture([[1.0, 0.0], [-1.0, 0.0]], [1.0, 1.0], [0.5, 0.5])
    x = torch.tensor([[2.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [-2.0, 0.0]])
    estimate = torch.tensor([[0.9, 0.1], [0.3, 0.7], [0.8, 0.2], [0.1, 0.9]]).log()
    metrics = vp.point_metrics(estimate, torch.zeros(4, 2, 2), truth, x, torch.zeros(4, dtype=torch.long))
    assert metrics["leaves_label"] == {"estimate": 0.5, "truth": 0.5, "both": 0.25}


def trained_mlp():
    """An mlp fitted to gmm-8x8 by 300 steps of clean cross-entropy: the attack then has a real p_θ to pull against."""
    model = build_classifier("mlp", "gmm-8x8", 10, (1, 8, 8))
    x, y = load_dataset("gmm-8x8", "train").tensors()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        rows = torch.randint(0, len(y), (128,), generator=generator)
        loss = nn.functional.cross_entropy(model(x[rows]), y[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def gmm_recipe(tmp_path):
    weights = tmp_path / "classifier.safetensors"
    model = trained_mlp()
    info = {"model": "mlp", "dataset": "gmm-8x8", "num_classes": 10, "image_shape": [1, 8, 8], "eps": 0.08}
    save_weights(weights, model.state_dict(), {WEIGHTS_METADATA_KEY: json.dumps(info)})
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({
        "dataset": "gmm-8x8", "model": "mlp", "objective": "direct-score", "posterior": "posterior-net",
        "posterior_net": "stand-in", "scorenet": "stand-in", "noise_std": 0.08, "eps": 0.08, "step_size": 0.04,
        "pgd_steps": 3, "anchor_smoothing": 0.1}))
    return recipe, weights


@pytest.fixture
def stand_ins(monkeypatch):
    def install(mixture):
        monkeypatch.setattr("trainlib.scorenet_training.load_scorenet", lambda *a, **k: ExactScores(mixture))
        monkeypatch.setattr("trainlib.posterior_training.load_posterior_net",
                            lambda *a, **k: ExactPosteriorNet(mixture).eval())
    return install


def run(tmp_path, recipe, weights, **options):
    cfg = vp.ValidateConfig(recipe=str(recipe), classifier=str(weights), splits=("test",), n_points=40,
                            worst_case_steps=5, out=str(tmp_path / "out"), **options)
    return vp.validate_posterior(cfg)


def test_exact_stand_ins_are_exact_along_the_path_and_the_label_anchor_is_not(tmp_path, stand_ins):
    stand_ins(toy_mixture("gmm-8x8"))
    recipe, weights = gmm_recipe(tmp_path)
    record = run(tmp_path, recipe, weights)
    by = {r["estimator"]: r for r in record["results"]}
    assert set(by) == set(vp.ESTIMATORS) and all(len(r["path"]) == 4 for r in by.values())  # start + 3 iterates
    for name in ("posterior-net", "trajectory", "exact"):
        for point in by[name]["path"]:
            assert point["tv"]["p90"] < 1e-5 and point["cosine"]["p10"] > 1 - 1e-6 and point["agreement"] == 1.0
    assert by["posterior-net"]["worst_case_tv"]["mean"] < 1e-6
    label = by["trajectory-label"]["path"][-1]
    assert label["tv"]["median"] > 0.05  # anchored at (1 − α)·onehot(y) + α/K, α = 0.1, instead of p_σ(·|x)
    verdicts = {a["estimator"]: a["passed"] for a in record["acceptance"]}
    assert verdicts["posterior-net"] and verdicts["trajectory"]
    out = tmp_path / "out"
    assert (out / "error_along_path.png").stat().st_size > 0
    table = (out / "validate_posterior.md").read_text()
    assert "closed form of gmm-8x8" in table and "trajectory-label" in table
    assert json.loads((out / "validate_posterior.json").read_text())["acceptance"] == record["acceptance"]


def test_a_wrong_stand_in_gives_bad_numbers(tmp_path, stand_ins):
    mixture = toy_mixture("gmm-8x8")
    wrong = GaussianMixture(mixture.means[torch.arange(1, 11) % 10], mixture.stds, mixture.priors, (1, 8, 8))
    stand_ins(wrong)  # classes permuted
    recipe, weights = gmm_recipe(tmp_path)
    record = run(tmp_path, recipe, weights, estimators=("posterior-net",))
    last = record["results"][0]["path"][-1]
    assert last["tv"]["median"] > 0.5 and last["agreement"] < 0.2 and last["cosine"]["median"] < 0.6
    assert not record["acceptance"][0]["passed"]


def test_real_digits_truth_is_the_exact_smoothed_training_posterior(tmp_path):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"dataset": "digits", "objective": "direct-score", "posterior": "posterior-net",
                                  "posterior_net": "unused", "noise_std": 0.2, "pgd_steps": 2}))
    weights = tmp_path / "classifier.safetensors"
    info = {"model": "mlp", "dataset": "digits", "num_classes": 10, "image_shape": [1, 8, 8], "eps": 0.2}
    save_weights(weights, build_classifier("mlp", "digits", 10, (1, 8, 8)).state_dict(),
                 {WEIGHTS_METADATA_KEY: json.dumps(info)})
    cfg = vp.ValidateConfig(recipe=str(recipe), classifier=str(weights), estimators=("exact", "empirical"),
                            n_points=16, out=str(tmp_path / "out"))
    record = vp.validate_posterior(cfg)
    assert record["truth"].startswith("exact smoothed posterior of the 1257 training images of digits")
    train_start = record["results"][0]["path"][0]
    assert train_start["label_truth"]["median"] > 0.5  # near a training digit, the kernel sum keeps its label
    for result in record["results"]:  # the empirical estimator is that truth, built by training's provider
        if result["estimator"] == "empirical":
            for point in result["path"]:
                assert point["tv"]["p90"] < 1e-5 and point["agreement"] == 1.0 and point["cosine"]["p10"] > 1 - 1e-6
                assert point["leaves_label"]["estimate"] == point["leaves_label"]["truth"]


@pytest.mark.parametrize("attack_gradient, attack_losses, attack_starts", [
    ("full", ("distance",), 1), ("model", ("distance",), 1), ("full", ("distance", "data-margin"), 1),
    ("full", ("distance",), 2)])
def test_the_path_ends_where_the_training_objective_attacks(attack_gradient, attack_losses, attack_starts):
    """read_path's last point is DirectScore's x' (same generator, attack gradient, attacks and starts): its metrics
    match."""
    mixture = toy_mixture("gmm-8x8")
    training = AdversarialConfig(dataset="gmm-8x8", model="mlp", objective="direct-score", eps=0.08, step_size=0.04,
                                 pgd_steps=3, attack_gradient=attack_gradient, attack_losses=attack_losses,
                                 attack_starts=attack_starts)
    model = trained_mlp().double()
    x, y = load_dataset("gmm-8x8", "test").tensors()
    x, y = x[:32].double(), y[:32]
    truth = mixture.at(0.08)
    path = vp.read_path(lambda *_: mixture, truth, model, training, x, y, seed=3)
    objective = build_objective("direct-score", training, attack_gradient=attack_gradient, attack_losses=attack_losses,
                                attack_starts=attack_starts, posterior_provider=fixed_posterior(mixture))
    x_adv = objective(model, model, x, y, seeded_generator(3, 0, 0, 0, 0)).x_adv
    expected = vp.point_metrics(mixture.log_posterior(x_adv), mixture.grad_log_posterior(x_adv), truth, x_adv, y)
    assert path[-1] == expected
    # the points each attack steps from (with several starts also each start's last iterate, read to pick the
    # best), then x'
    per_start = training.pgd_steps + (attack_starts > 1)
    assert len(path) == len(attack_losses) * attack_starts * per_start + 1
    other = dataclasses.replace(training, attack_gradient="full" if attack_gradient == "model" else "model")
    assert vp.read_path(lambda *_: mixture, truth, model, other, x, y, seed=3)[-1] != expected
