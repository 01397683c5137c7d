"""Attack efficiency: our PGD against torchattacks' PGD / PGDL2 on the same model and data, and against the ideal.

    python -m benchmarks.attacks                       # digits, cnn-small, ℓ∞ and ℓ2, PGD-10
    python -m benchmarks.attacks --model wrn-16-4 --threads 2

Model: ``--model`` briefly adversarially trained on the digits train split (PGD-AT through the trainer's step, see
``benchmarks.train_step.TrainingStep``), so that robust accuracy on the 360 test points is neither 0 nor 100 % and
the 1-point agreement between the attacks means something. Every attack runs in eval mode on the same batch:

* ours: ``datagrad.pgd`` on the per-example cross-entropy inside ``trainlib.attack_mode`` (eval mode,
  parameters frozen), uniform random start, clamp to [0, 1], last iterate — what training runs; the row "ours,
  keep_best" is ``trainlib.accuracy``'s setting (the highest-loss iterate, one more forward pass);
* torchattacks 3.5.1 ``PGD`` / ``PGDL2`` as shipped: eval mode, but parameters still require gradients, so autograd
  records the parameter side of every forward (it computes input gradients only either way); the row "torchattacks,
  frozen" runs it inside our ``attack_mode`` to isolate what freezing is worth;
* ideal: K × (one forward + input-gradient backward) at a fixed point, parameters frozen — no projection, no random
  start, no loss bookkeeping.

Differences that do not change the work per step: torchattacks maximizes the batch-MEAN cross-entropy (ours the
sum; the same sign and direction), adds 1e-10 to the ℓ2 gradient norm (ours clamps it at 1e-12), and draws its ℓ2
start as r·u with r ~ U(0, 1) and u uniform on the sphere (ours: uniform in the ball, r ~ U(0, 1)^(1/D)); both draw
the ℓ∞ start uniformly in the cube. Robust accuracy = accuracy at the returned points, averaged over the timed rounds.
Without random starts both attacks are deterministic and run the same iterations, so their accuracies must agree
(printed as a check); with random starts the ℓ2 start distributions differ (ours: ‖δ‖ = ε·U^(1/D), i.e. near the
sphere for D = 64; theirs: ‖δ‖ = ε·U), and so may the accuracies of a 10-step attack, by about a point.
Targets: ours ≤ 1.0× torchattacks; ours ≤ 1.1× the ideal; robust accuracies within 1 point.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from datagrad import pgd
from trainlib.adversarial import AdversarialConfig
from trainlib.attack_mode import attack_mode
from trainlib.cli import run_cli
from trainlib.config import option, parse_config
from trainlib.datasets import load_dataset
from trainlib.sampling import BatchLoader

from .common import BenchConfig, Report, alternate, median, ratio, setup, spread
from .train_step import TrainingStep


@dataclass
class AttackConfig(BenchConfig):
    """Our PGD against torchattacks and the ideal (benchmarks.attacks)."""

    repeats: int = option("timed rounds of the alternation (a multiple of the 5 runs: each leads equally often)", 10)
    model: str = option("classifier, adversarially trained here on digits for --train-epochs", "cnn-small")
    train_epochs: int = option("epochs of PGD-AT before the benchmark", 10, ge=1)
    pgd_steps: int = option("attack steps K", 10, ge=1, renamed_from="steps")
    linf_eps: float = option("l-inf radius (digits recipes: 0.2)", 0.2, gt=0)
    l2_eps: float = option("l2 radius", 1.0, gt=0)
    n_points: int = option("test points attacked (one batch)", 360, ge=1)
    seed: int = option("seed of training and random starts", 0)

    def validate(self) -> None:
        super().validate()
        try:
            import torchattacks  # noqa: F401
        except ImportError:
            raise ValueError("torchattacks is not installed (benchmark-only extra): pip install -e '.[bench]', or "
                             "pip install --no-deps torchattacks into an environment that has torch") from None


def adversarially_trained(cfg: AttackConfig, device: torch.device) -> nn.Module:
    """``cfg.model`` after ``train_epochs`` epochs of PGD-AT (ℓ∞, ε = linf_eps, PGD-5 with step ε/4, batch 64) on
    digits: cnn-small reaches about 98 % clean and 69 % ℓ∞ PGD-10 accuracy (ε 0.2) on the test points."""
    train_cfg = AdversarialConfig(model=cfg.model, objective="pgd-at", eps=cfg.linf_eps, step_size=cfg.linf_eps / 4,
                                  pgd_steps=5, batch_size=64, seed=cfg.seed)
    data = load_dataset("digits", "train")
    loader = BatchLoader(data, train_cfg.batch_size, seed=cfg.seed, device=device)
    step = TrainingStep(train_cfg, data.num_classes, data.image_shape, total_steps=cfg.train_epochs * len(loader))
    for epoch in range(cfg.train_epochs):
        for x, y in loader.epoch(epoch):
            step(x, y)
    return step.attack_model.eval()


def torchattacks_pgd(model: nn.Module, norm: str, eps: float, steps: int, random_start: bool = True):
    import torchattacks

    attack = torchattacks.PGD if norm == "linf" else torchattacks.PGDL2
    return attack(model, eps=eps, alpha=2.5 * eps / steps, steps=steps, random_start=random_start)


def our_pgd(model: nn.Module, x, y, norm: str, eps: float, steps: int, random_start: bool = True, generator=None,
            keep_best: bool = False):
    """datagrad.pgd on the per-example cross-entropy, in attack mode, with torchattacks' step 2.5·ε/K."""
    loss = lambda z: F.cross_entropy(model(z), y, reduction="none")
    with attack_mode(model):
        return pgd(loss, x, eps, 2.5 * eps / steps, steps, norm, random_start, (0.0, 1.0), generator, keep_best)


def attack_runs(model: nn.Module, x, y, norm: str, eps: float, steps: int, seed: int, found: dict) -> dict:
    """The compared attacks as zero-argument callables; each appends its x' to ``found[name]``."""
    theirs = torchattacks_pgd(model, norm, eps, steps)
    generator = torch.Generator(device=x.device).manual_seed(seed)

    def ours(keep_best: bool = False):
        return our_pgd(model, x, y, norm, eps, steps, generator=generator, keep_best=keep_best)

    def theirs_frozen():
        with attack_mode(model):
            return theirs(x, y)

    def ideal():
        with attack_mode(model):
            z = x.detach().requires_grad_(True)
            for _ in range(steps):
                torch.autograd.grad(F.cross_entropy(model(z), y, reduction="sum"), z)

    def recorded(name, fn):
        return lambda: found.setdefault(name, []).append(fn())

    return {
        "ours": recorded("ours", ours),
        "torchattacks": recorded("torchattacks", lambda: theirs(x, y)),
        "torchattacks, frozen": recorded("torchattacks, frozen", theirs_frozen),
        "ours, keep_best": recorded("ours, keep_best", lambda: ours(keep_best=True)),
        "ideal": ideal,
    }


@torch.no_grad()
def robust_accuracy(model: nn.Module, points: list, y) -> float:
    """Mean over rounds of the accuracy (%) at the returned points."""
    with attack_mode(model):
        return statistics.mean(100 * (model(p).argmax(1) == y).float().mean().item() for p in points)


def run(cfg: AttackConfig) -> dict:
    device = setup(cfg)
    report = Report("attacks", cfg, device)
    model = adversarially_trained(cfg, device)
    x, y = load_dataset("digits", "test").get(range(cfg.n_points), device)
    with torch.no_grad(), attack_mode(model):
        clean = 100 * (model(x).argmax(1) == y).float().mean().item()
    results = {"clean_accuracy": clean}
    for norm, eps in (("linf", cfg.linf_eps), ("l2", cfg.l2_eps)):
        found: dict[str, list] = {}
        times = alternate(attack_runs(model, x, y, norm, eps, cfg.pgd_steps, cfg.seed, found), cfg.repeats, cfg.warmup,
                          device)
        medians = {name: median(t) for name, t in times.items()}
        accuracy = {name: robust_accuracy(model, points[cfg.warmup:], y) for name, points in found.items()}
        rows = [[name, f"{medians[name] * 1e3:.1f}", spread([t * 1e3 for t in times[name]]),
                 f"{ratio(times[name], times['torchattacks']):.3f}", f"{ratio(times[name], times['ideal']):.3f}",
                 f"{accuracy[name]:.2f}" if name in accuracy else "—"] for name in times]
        report.table(
            f"{norm} PGD-{cfg.pgd_steps}, ε {eps:g}, step {2.5 * eps / cfg.pgd_steps:g}, {cfg.model} on {cfg.n_points} "
            f"digits test points (clean accuracy {clean:.2f} %), {torch.get_num_threads()} thread(s), "
            f"{cfg.repeats} rounds",
            ["attack", "ms (median)", "min–max", "÷ torchattacks", "÷ ideal", "robust acc. (%)"], rows,
        )
        theirs = torchattacks_pgd(model, norm, eps, cfg.pgd_steps, False)(x, y)
        deterministic = {"ours": robust_accuracy(model, [our_pgd(model, x, y, norm, eps, cfg.pgd_steps, False)], y),
                         "torchattacks": robust_accuracy(model, [theirs], y)}
        report.note(f"{norm} without random starts (deterministic, the same iterations): robust accuracy ours "
                    f"{deterministic['ours']:.2f} %, torchattacks {deterministic['torchattacks']:.2f} %")
        results[norm] = {"medians": medians, "times": times, "robust_accuracy": accuracy,
                         "deterministic_accuracy": deterministic,
                         "ours_vs_torchattacks": ratio(times["ours"], times["torchattacks"]),
                         "ours_vs_ideal": ratio(times["ours"], times["ideal"]),
                         "accuracy_gap": abs(accuracy["ours"] - accuracy["torchattacks"]),
                         "deterministic_gap": abs(deterministic["ours"] - deterministic["torchattacks"])}
    report.results = results
    parts = [f"{norm} ours/torchattacks {r['ours_vs_torchattacks']:.2f}, ours/ideal {r['ours_vs_ideal']:.2f}, "
             f"robust-acc. gap {r['accuracy_gap']:.2f} pt ({r['deterministic_gap']:.2f} without random starts)"
             for norm, r in ((n, results[n]) for n in ("linf", "l2"))]
    report.finish("; ".join(parts) + " (targets ≤ 1.0, ≤ 1.1, ≤ 1 pt)")
    return results


def main() -> None:
    run_cli(lambda: run(parse_config(AttackConfig, prog="python -m benchmarks.attacks")))


if __name__ == "__main__":
    main()
