"""Evaluation: PGD / AutoAttack accuracy against the closed-form robust accuracy of linear classifiers, losses
against brute force, restarts, RobustBench formatting, the sanity checks (passing on an adversarially trained MLP,
firing on gradient-masked, stochastic and BN-in-training models), [0, 1] input validation and figures."""

import json
import logging
import re

import pytest
import torch
from torch import nn

from datagrad import pgd
from trainlib.accuracy import (
    clean_accuracy,
    clean_correct,
    cross_entropy_loss,
    margin_loss,
    pgd_accuracy,
    pgd_accuracy_curve,
    pgd_correct,
)
from trainlib.attack_mode import attack_mode
from trainlib.autoattack import autoattack_accuracy, run_autoattack
from trainlib.evaluate_command import plot_accuracy_vs_eps
from trainlib.evaluation import _order_check, evaluate, format_accuracy, format_eps, parse_eps

SHAPE = (1, 4, 4)  # images [N, 1, 4, 4] in [0, 1]
D = 16


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- a linear two-class problem with known robust accuracy ----------------------------------------------------------
class Linear2(nn.Module):
    """z = (−(w·x + c)/2, (w·x + c)/2), so the class-1 margin is z_1 − z_0 = w·x + c. ``quantize`` rounds the logits
    to 1e-3: the same decisions with zero input gradient everywhere (a gradient-masked model)."""

    def __init__(self, w: torch.Tensor, c: float, quantize: bool = False):
        super().__init__()
        self.linear = nn.Linear(D, 2)
        with torch.no_grad():
            self.linear.weight.copy_(torch.stack([-w / 2, w / 2]))
            self.linear.bias.copy_(torch.tensor([-c / 2, c / 2]))
        self.quantize = quantize

    def forward(self, x):
        z = self.linear(x.flatten(1))
        return torch.round(z * 1000) / 1000 if self.quantize else z


def linear_problem(n: int = 256, seed: int = 0, low: float = 0.0, high: float = 1.0):
    g = generator(seed)
    w = torch.randn(D, generator=g)
    x = low + (high - low) * torch.rand(n, D, generator=g)
    c = -(x @ w).median().item()
    y = ((x @ w + c + 0.3 * torch.randn(n, generator=g)) > 0).long()  # a few clean errors too
    return w, c, x.view(n, *SHAPE), y


def exact_linf(w, c, x, y, eps):
    """Worst case over the box [x − ε, x + ε] ∩ [0, 1]^D of the signed margin s·(w·x' + c), s = ±1 for y = 1/0:
    each coordinate goes to the box end that lowers s·w_i·x'_i. Returns (robust [N], worst margin [N])."""
    x, w = x.flatten(1).double(), w.double()
    s = (2 * y - 1).double()
    low, high = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    worst = torch.where(s[:, None] * w > 0, low, high)
    margin = s * (worst @ w + c)
    return margin > 0, margin


@pytest.mark.parametrize("loss", ["ce", "cw"])
@pytest.mark.parametrize("eps", [0.02, 0.1])
def test_pgd_equals_closed_form_robust_accuracy_linf(loss, eps):
    w, c, x, y = linear_problem()
    robust, margin = exact_linf(w, c, x, y, eps)
    clear = margin.abs() > 1e-3  # drop float ties at the decision boundary
    found = pgd_correct(Linear2(w, c), x[clear], y[clear], eps, "linf", loss=loss, generator=generator())
    assert torch.equal(found, robust[clear])
    clean = exact_linf(w, c, x, y, 0.0)[0][clear].float().mean()
    assert 0.1 < robust[clear].float().mean() < clean - 0.05  # the attack matters: the comparison has teeth


@pytest.mark.parametrize("loss", ["ce", "cw"])
def test_pgd_equals_closed_form_robust_accuracy_l2(loss):
    """Inside the box the ℓ2 worst case is the margin minus ε·||w||₂ (no clamping: x ∈ [0.3, 0.7], ε = 0.05)."""
    eps = 0.05
    w, c, x, y = linear_problem(low=0.3, high=0.7)
    s = (2 * y - 1).double()
    distance = s * (x.flatten(1).double() @ w.double() + c) / w.double().norm()
    clear = (distance - eps).abs() > 0.02 * eps
    found = pgd_correct(Linear2(w, c), x[clear], y[clear], eps, "l2", steps=100, step_size=eps / 4, loss=loss,
                        generator=generator())
    assert torch.equal(found, (distance > eps)[clear])
    assert 0.1 < (distance > eps)[clear].float().mean() < (distance > 0)[clear].float().mean() - 0.05


def test_autoattack_apgd_ce_reaches_closed_form_and_logs_through_our_logger(caplog):
    """No attack can go below the exact robust accuracy; APGD-CE reaches it. Its messages arrive at DEBUG under
    ``trainlib.autoattack`` only, and torch's global RNG is left as it was."""
    eps = 0.1
    w, c, x, y = linear_problem(n=64)
    robust, margin = exact_linf(w, c, x, y, eps)
    clear, model = margin.abs() > 1e-3, Linear2(w, c)
    rng_before = torch.get_rng_state()
    with caplog.at_level(logging.DEBUG):
        run = run_autoattack(model, x[clear], y[clear], eps, "linf", version="apgd-ce")
    assert torch.equal(run.correct, robust[clear])
    assert run.max_perturbation <= eps + 1e-6 and run.in_range and not run.warnings
    assert torch.equal(torch.get_rng_state(), rng_before)
    relayed = [r for r in caplog.records if r.getMessage().startswith("auto-attack:")]
    assert relayed and all(r.name == "trainlib.autoattack" and r.levelno == logging.DEBUG for r in relayed)
    assert not [r for r in caplog.records if r.name == "auto-attack"]
    assert logging.getLogger("auto-attack").propagate


def test_accuracy_curve_is_closed_form_at_each_eps_and_plot_is_written(tmp_path):
    w, c, x, y = linear_problem()
    eps_values = [0.0, 0.02, 0.05, 0.1, 0.3]
    exact = [exact_linf(w, c, x, y, eps) for eps in eps_values]
    clear = torch.stack([margin.abs() > 1e-3 for _, margin in exact]).all(0)
    curve = pgd_accuracy_curve(Linear2(w, c), x[clear], y[clear], eps_values, "linf")
    expected = [robust[clear].float().mean().item() for robust, _ in exact]
    assert curve == pytest.approx(expected, abs=1e-7)
    assert curve == sorted(curve, reverse=True) and curve[0] > curve[-1]
    path = tmp_path / "pgd_vs_eps.png"
    plot_accuracy_vs_eps(path, eps_values, {"PGD-40 CW": curve, "exact": expected}, "linf", title="linear")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["pgd_vs_eps.png"]  # no temporary left behind


# -- losses and accuracies against brute force --------------------------------------------------------------------
def test_losses_match_brute_force():
    logits = torch.randn(50, 7, dtype=torch.float64)
    y = torch.randint(0, 7, (50,))
    pairs = list(zip(logits, y.tolist(), strict=True))
    margin = torch.tensor([max(z[j] for j in range(7) if j != t) - z[t] for z, t in pairs])
    torch.testing.assert_close(margin_loss(logits, y), margin.double())
    ce = torch.tensor([torch.logsumexp(z, 0) - z[t] for z, t in pairs])
    torch.testing.assert_close(cross_entropy_loss(logits, y), ce.double())
    assert torch.equal(margin_loss(logits, y) > 0, logits.argmax(1) != y)


def test_clean_accuracy_from_tensors_and_batches_and_first_n_in_order():
    w, c, x, y = linear_problem()
    clear = exact_linf(w, c, x, y, 0.0)[1].abs() > 1e-3  # no float ties: any batch size gives the same labels
    model, x, y = Linear2(w, c), x[clear], y[clear]
    manual = (model(x).argmax(1) == y).float().mean().item()
    batches = [(x[i : i + 50], y[i : i + 50]) for i in range(0, len(x), 50)]
    assert clean_accuracy(model, (x, y), batch_size=7) == pytest.approx(manual)
    assert clean_accuracy(model, batches) == pytest.approx(manual)
    order = torch.argsort(clean_correct(model, x, y).long(), descending=True, stable=True)
    k = int(clean_correct(model, x, y).sum())  # the first k points are correct, the rest wrong
    result = evaluate(model, x[order], y[order], 0.05, n_examples=k, autoattack=False, masking_steps=5)
    assert result.clean_acc == 1.0 and result.n_examples == k


# -- an adversarially trained MLP: a "normal" model ----------------------------------------------------------------
@pytest.fixture(scope="module")
def robust_mlp():
    """10 Gaussian clusters in [0, 1]^64 (images 1×8×8); MLP 64-64-10 (ReLU) after 150 steps of PGD-AT at ε = 0.1.
    The first 256 points are never trained on and are returned for evaluation."""
    g = generator(1)
    means = 0.2 + 0.6 * torch.rand(10, 64, generator=g)
    y = torch.arange(2256) % 10
    x = (means[y] + 0.1 * torch.randn(len(y), 64, generator=g)).clamp(0, 1).view(-1, 1, 8, 8)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(150):
        i = torch.randint(256, len(y), (128,), generator=g)
        ce = lambda z, i=i: nn.functional.cross_entropy(model(z), y[i], reduction="none")
        loss = nn.functional.cross_entropy(model(pgd(ce, x[i], 0.1, 0.025, 5, generator=g)), y[i])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model, x[:256], y[:256]


def test_restarts_never_increase_accuracy(robust_mlp):
    """Same generator: the first restart repeats the single run, later ones can only break more examples."""
    model, x, y = robust_mlp
    single = pgd_correct(model, x, y, 0.15, generator=generator(3))
    restarted = pgd_correct(model, x, y, 0.15, restarts=4, generator=generator(3))
    assert not (restarted & ~single).any()
    assert restarted.sum() < single.sum()  # here restarts do find more (the test is not vacuous)


def test_sanity_checks_pass_on_a_normal_model_and_record_is_robustbench_style(robust_mlp):
    model, x, y = robust_mlp
    model.train()  # evaluation must switch to eval mode itself and restore the mode afterwards
    result = evaluate(model, x, y, 0.1, "linf", autoattack_version="custom", autoattack_attacks=["apgd-ce", "apgd-t"],
                      check_examples=256)
    assert model.training
    assert [check.name for check in result.checks] == [
        "inputs_in_range", "eval_mode", "deterministic", "autoattack_valid", "eps_zero", "large_eps",
        "gradient_masking", "accuracy_order",
    ]
    assert result.passed, [check for check in result.checks if not check.passed]
    assert result.autoattack_acc <= min(result.pgd_acc.values()) <= max(result.pgd_acc.values()) <= result.clean_acc
    assert 0.5 < result.autoattack_acc < result.clean_acc  # a meaningful robust accuracy
    assert result.worst_case_acc <= result.autoattack_acc
    record = json.loads(json.dumps(result.record(name="mlp", dataset="clusters")))
    assert list(record)[:6] == ["name", "dataset", "clean_acc", "autoattack_acc", "eps", "n_examples"]
    for key in ("clean_acc", "autoattack_acc", "pgd_ce_acc", "pgd_cw_acc"):
        assert re.fullmatch(r"\d{1,3}\.\d\d", record[key])
    accuracies = {"clean_acc": result.clean_acc, "autoattack_acc": result.autoattack_acc,
                  "pgd_ce_acc": result.pgd_acc["ce"], "pgd_cw_acc": result.pgd_acc["cw"],
                  "worst_case_acc": result.worst_case_acc}
    for key, value in accuracies.items():  # each a count of the 256 examples, written as a percent to 2 decimals
        correct = round(value * 256)
        assert value * 256 == pytest.approx(correct, abs=1e-6), key
        assert abs(float(record[key]) - 100 * correct / 256) <= 0.005 + 1e-9, (key, record[key], correct)
    assert (record["eps"], record["n_examples"], record["threat_model"]) == ("0.1", 256, "Linf")
    assert record["sanity_passed"] and {"name", "passed", "detail"} == set(record["sanity_checks"][0])


def test_autoattack_standard_is_at_most_pgd(robust_mlp):
    model, x, y = robust_mlp
    x, y = x[:32], y[:32]
    standard = autoattack_accuracy(model, x, y, 0.15, "linf", version="standard", seed=0)
    apgd_only = autoattack_accuracy(model, x, y, 0.15, "linf", version="apgd-ce", seed=0)
    pgd_cw = pgd_accuracy(model, x, y, 0.15, "linf", generator=generator())
    assert standard <= apgd_only and standard <= pgd_cw
    assert standard < clean_accuracy(model, (x, y))


def test_gradient_masking_check_fires_on_a_quantized_model(caplog):
    """Rounded logits: zero gradient, so PGD only samples random starts and 5 restarts break many more points."""
    eps = 0.1
    w, c, x, y = linear_problem(low=0.3, high=0.7)
    with caplog.at_level(logging.WARNING, logger="trainlib.evaluation"):
        result = evaluate(Linear2(w, c, quantize=True), x, y, eps, autoattack=False, masking_steps=10)
    checks = {check.name: check for check in result.checks}
    assert not checks["gradient_masking"].passed and not result.passed
    assert checks["eps_zero"].passed and checks["eval_mode"].passed and checks["deterministic"].passed
    assert any("gradient_masking" in r.getMessage() for r in caplog.records)
    record = json.loads(json.dumps(result.record(name="quantized")))  # what results.json / robustbench.json hold
    saved = {check["name"]: check for check in record["sanity_checks"]}
    assert record["sanity_passed"] is False and saved["gradient_masking"]["passed"] is False
    assert re.search(r"drop \d+\.\d\d points", saved["gradient_masking"]["detail"])
    unmasked = evaluate(Linear2(w, c), x, y, eps, autoattack=False, masking_steps=10)
    assert unmasked.passed  # the same decisions with honest gradients pass every check


class AlwaysDropout(nn.Module):
    def forward(self, x):
        return nn.functional.dropout(x, 0.5, training=True)


class AlwaysBatchStats(nn.BatchNorm1d):
    def forward(self, x):
        return nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, True)


@pytest.mark.parametrize(("layer", "failing"), [(AlwaysDropout(), "deterministic"), (AlwaysBatchStats(D), "eval_mode")])
def test_eval_mode_and_determinism_checks_fire(layer, failing):
    w, c, x, y = linear_problem(n=64)
    model = nn.Sequential(nn.Flatten(), layer, nn.Unflatten(1, SHAPE), Linear2(w, c))
    result = evaluate(model, x, y, 0.05, autoattack=False, masking_steps=5, pgd_steps=5)
    assert not {check.name: check for check in result.checks}[failing].passed


def test_accuracy_order_check():
    assert _order_check(0.9, {"ce": 0.6, "cw": 0.55}, 0.5, 0.001).passed
    assert not _order_check(0.9, {"ce": 0.6, "cw": 0.55}, 0.56, 0.001).passed  # AutoAttack above PGD
    assert not _order_check(0.5, {"ce": 0.6, "cw": 0.45}, None, 0.001).passed  # PGD above clean


def test_attack_mode_restores_modes_and_touches_no_parameter_gradient(robust_mlp):
    model, x, y = robust_mlp
    model.train()
    model.zero_grad(set_to_none=True)
    model[1].weight.requires_grad_(False)
    pgd_accuracy(model, x[:16], y[:16], 0.1, loss="ce")
    with attack_mode(model):
        assert not any(m.training for m in model.modules()) and not any(p.requires_grad for p in model.parameters())
    assert model.training and [p.requires_grad for p in model.parameters()] == [False, True, True, True]
    assert all(p.grad is None for p in model.parameters())
    model[1].weight.requires_grad_(True)


# -- input validation and formatting ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "call",
    [
        lambda m, x, y: clean_accuracy(m, (x, y)),
        lambda m, x, y: pgd_accuracy(m, x, y, 0.1),
        lambda m, x, y: autoattack_accuracy(m, x, y, 0.1, version="apgd-ce"),
        lambda m, x, y: evaluate(m, x, y, 0.1, autoattack=False),
    ],
)
@pytest.mark.parametrize("transform", [lambda x: x - 0.5, lambda x: 2 * x])
def test_inputs_outside_unit_interval_raise(call, transform):
    w, c, x, y = linear_problem(n=8)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        call(Linear2(w, c), transform(x), y)


def test_bad_arguments_raise():
    w, c, x, y = linear_problem(n=8)
    model = Linear2(w, c)
    with pytest.raises(ValueError, match="attack loss"):
        pgd_accuracy(model, x, y, 0.1, loss="dlr")
    with pytest.raises(ValueError, match="norm"):
        pgd_accuracy(model, x, y, 0.1, "l1")
    with pytest.raises(ValueError, match="restarts"):
        pgd_accuracy(model, x, y, 0.1, restarts=0)
    with pytest.raises(ValueError, match="version"):
        autoattack_accuracy(model, x, y, 0.1, version="fast")
    with pytest.raises(ValueError, match="custom"):
        autoattack_accuracy(model, x, y, 0.1, version="standard", attacks=["apgd-ce"])
    with pytest.raises(ValueError, match="among"):
        autoattack_accuracy(model, x, y, 0.1, version="custom", attacks=["pgd"])
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        autoattack_accuracy(model, x.flatten(1), y, 0.1, version="standard")
    with pytest.raises(ValueError, match="n_examples"):
        evaluate(model, x, y, 0.1, n_examples=9)
    with pytest.raises(ValueError, match="eps"):
        evaluate(model, x, y, 0.0)
    with pytest.raises(ValueError, match="labels"):
        clean_accuracy(model, (x, y.float()))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        evaluate(model, x, y + 1, 0.1)


@pytest.mark.parametrize(
    ("eps", "text"),
    [(8 / 255, "8/255"), (torch.tensor(8 / 255).item(), "8/255"), (128 / 255, "128/255"), (0.5, "0.5"),
     (0.1, "0.1"), (0.3, "0.3"), (0.0, "0"), (1.0, "1")],
)
def test_format_eps(eps, text):
    assert format_eps(eps) == text
    assert parse_eps(text) == pytest.approx(eps, abs=1e-7)


def test_format_accuracy_and_parse_eps_errors():
    accuracies = (0.61044, 0.98056, 1.0, 0.99999, 0.0, 0.123456, 201 / 256)
    assert [format_accuracy(a) for a in accuracies] == ["61.04", "98.06", "100.00", "100.00", "0.00", "12.35", "78.52"]
    with pytest.raises(ValueError, match="fraction"):
        parse_eps("8/0")
    with pytest.raises(ValueError, match="fraction"):
        parse_eps("eight")
