"""The seed's 1-D toy demo: SCORE recovers p_d(y|x), Madry's robust error does not (docs/conventions.md §1–2).

    python -m analysis.toy_demo --out runs/toy_demo                                  # full setting
    python -m analysis.toy_demo --config recipes/toy-demo-quick.json --out /tmp/toy  # reduced setting of the tests
    python -m analysis.toy_demo --out runs/toy_demo --threads 1                      # on a CPU shared with other jobs

Options are the fields of ``ToyDemoConfig`` (``--help`` lists them; ``trainlib.config``: defaults < ``--config``
recipe < flags); the resolved config is recorded in ``toy_demo.json``.

Data: ``datagrad.seed_toy()``, p(y=0) = 5/6, p(y=1) = 1/6, x|y=0 ~ N(−1, 2²), x|y=1 ~ N(1, 1²) (stds).
  expectation form    60,000 pairs: exactly 50,000 of class 0 and 10,000 of class 1
  finite-sample form  6 pairs: 5 of class 0, 1 of class 1
Model: MLP 1-100-100-2 with tanh, Adam (lr 1e-3); within a form the three methods start from the same weights.
Objectives (risks of docs/conventions.md §1 with the true posterior as target, so labels only colour the plots):
  standard  KL(p_d(·|x)  || p_θ(·|x))                  at the training x (soft-label cross-entropy gradient)
  madry     max_{x'∈B(x)} KL(p_d(·|x)  || p_θ(·|x'))   inner max by PGD on ``datagrad.madry_distance``
  score     max_{x'∈B(x)} KL(p_d(·|x') || p_θ(·|x'))   inner max by PGD on ``datagrad.self_consistent_kl`` (full
            gradient: model + data gradient of the analytic posterior); the outer step minimises the same KL at x'
  B(x) = [x − ε, x + ε], ε = 1; PGD: 10 steps of 0.1 from a uniform start in the ball, no clamp, best iterate kept.

Iterations and batches — the one departure from the public setting (500 full-batch iterations), and why:
with 500 iterations expectation-form SCORE stops at a max deviation |p_θ(y=1|x) − p_d(y=1|x)| of about 0.04 on
[−6, 6] (measured, seed 0). All of it sits in the right tail, x ≈ 5, where p_d(x) is tiny (about 0.1 % of the
pairs lie beyond x = 5, so that region weighs ~1e-4 in the loss): the fit there is still converging, not biased,
and the deviation keeps falling with more iterations at the same lr (about 0.02 at 800, 0.012 at 1,200 and
0.007 at 2,000). We therefore run 2,000 iterations with the lr unchanged. To keep their cost down, each iteration
draws an i.i.d. minibatch of 6,000 of the 60,000 pairs (a tenth of a full batch's PGD cost), and per iteration the
minibatch trajectory matches the full-batch one (deviation 0.055 vs 0.054 after 400 iterations). The finite-sample
form always uses its 6 pairs as the full batch.

Threads: torch's intra-op threads spin against any other process that shares the cores, which slows the run
several-fold; ``--threads 1`` avoids that (timings: benchmarks/README.md, "Other timings").

Checks: Theorem 1 (ℓ1, ℓ2) and Corollary 1 on every trained model, with the exact 1-D ``GridSearch`` maximizer
(401 candidates per ball, spacing 0.005) on 2,000 points drawn from the expectation-form data. The risks are
expectations over p_d(x), so finite-sample models are checked on the same points. All three risks are maximized
over the same candidates, so on the grid both inequalities hold exactly, example by example (triangle inequality
at the maximizer); ``holds`` = false would be a bug. KL standard/Madry/SCORE risks are recorded alongside.

Readouts of |p_θ(y=1|x) − p_d(y=1|x)| on the grid over [−6, 6]: its max (the headline number), its max within ε
of a training x (``covered_max_deviation``) and its p_d(x)-weighted mean. In the finite-sample form the max over
[−6, 6] mostly measures extrapolation far from the six points, where no method is constrained; inside the
ε-balls (shaded in the figure) SCORE sees p_d(·|x') at every x', standard training only at the six points, and
Madry only the clean posterior, so that is where the forms' claim is visible.

Outputs in ``--out`` (written atomically): ``expectation.png`` and ``finite_sample.png`` (learned p_θ(y=1|x) of
the three methods against p_d(y=1|x), and their absolute deviation), and ``toy_demo.json`` (config, environment,
timing, the grid, true curve and ball coverage, and per form and method: the deviations, learned curve,
training loss, theorem checks).
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm, trange

from datagrad import (
    PGD,
    GaussianMixture,
    GridSearch,
    check_corollary1,
    check_theorem1,
    madry_distance,
    madry_risk,
    score_risk,
    seed_toy,
    self_consistent_kl,
    standard_risk,
)
from trainlib.cli import run_cli
from trainlib.config import option, parse_config
from trainlib.files import atomic_write_text

from .plotting import plt, save_figure, style

FORMS = ("expectation", "finite_sample")
METHODS = ("standard", "madry", "score")
FORM_TITLES = {"expectation": "expectation form (60,000 pairs)", "finite_sample": "finite-sample form (6 pairs)"}
METHOD_LABELS = {"standard": "standard (KL)", "madry": "Madry (KL)", "score": "SCORE (KL)"}
ACCEPTANCE_DEVIATION = 0.02  # expectation-form SCORE must stay below this on the grid


@dataclass(frozen=True)
class ToyDemoConfig:
    """The 1-D toy demo: six (form, method) runs, the Theorem 1 / Corollary 1 checks and the figures."""

    out: str = option("output folder (created if missing)", "runs/toy_demo")
    seed: int = option("seeds the data, the shared initialisation and every run's minibatch/PGD generator", 0)
    expectation_counts: tuple[int, int] = option("expectation form: pairs of class 0 and class 1", (50_000, 10_000))
    finite_counts: tuple[int, int] = option("finite-sample form: pairs of class 0 and class 1", (5, 1))
    hidden: int = option("width of both hidden layers of the MLP", 100)
    iterations: int = option("Adam steps per run (see the module docstring)", 2000)
    batch_size: int = option("i.i.d. minibatch size; forms with fewer pairs use them all", 6000)
    lr: float = option("Adam learning rate", 1e-3)
    eps: float = option("radius ε of the l-inf ball B(x) = [x − ε, x + ε]", 1.0)
    pgd_steps: int = option("PGD steps of the inner maximisation", 10)
    pgd_step_size: float = option("PGD step size", 0.1)
    grid: tuple[float, float, int] = option("(low, high, points) where the curves are compared", (-6.0, 6.0, 1201))
    eval_points: int = option("expectation-form points on which the theorems are checked", 2000)
    check_points: int = option("GridSearch candidates per ball", 401)
    device: str = option("torch device, e.g. cpu or cuda", "cpu")
    threads: int | None = option("CPU intra-op threads (none: torch's); 1 is robust on a busy machine", None)

    def __post_init__(self):
        for name in ("iterations", "batch_size", "hidden", "eval_points"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        for name in ("expectation_counts", "finite_counts"):
            if len(getattr(self, name)) != 2 or min(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be two positive class counts, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not (math.isfinite(self.eps) and self.eps >= 0):
            raise ValueError(f"eps must be >= 0, got {self.eps}")
        if self.pgd_steps < 0:
            raise ValueError(f"pgd_steps must be >= 0, got {self.pgd_steps}")
        if not (math.isfinite(self.pgd_step_size) and self.pgd_step_size >= 0):
            raise ValueError(f"pgd_step_size must be >= 0, got {self.pgd_step_size}")
        low, high, points = self.grid
        if not (low < high and points >= 2):
            raise ValueError(f"grid must be (low, high, points) with low < high and points >= 2, got {self.grid}")
        if self.eval_points > sum(self.expectation_counts):
            raise ValueError(
                f"eval_points ({self.eval_points}) exceeds the expectation-form size ({sum(self.expectation_counts)})"
            )
        if self.check_points < 2:
            raise ValueError(f"check_points must be >= 2, got {self.check_points}")
        try:
            device_type = torch.device(self.device).type
        except RuntimeError:
            raise ValueError(f"unknown device {self.device!r}; use e.g. cpu or cuda") from None
        if device_type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} requested but CUDA is not available")


# -- data, model, objectives -------------------------------------------------------------------------------
def sample_pairs(mixture: GaussianMixture, counts: Sequence[int], generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(x [N, d] float32, y [N]) with exactly ``counts[k]`` pairs of class k, x | y=k ~ N(μ_k, s_k² I)."""
    y = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))  # [N]
    noise = torch.randn(len(y), mixture.dim, generator=generator, dtype=torch.float64)
    x = mixture.means[y] + mixture.stds[y, None] * noise
    return x.float(), y


def make_mlp(hidden: int) -> nn.Module:
    """MLP 1-hidden-hidden-2 with tanh: x [B, 1] -> logits [B, 2]."""
    return nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 2))


def objective(
    method: str, model: nn.Module, x: Tensor, posterior: GaussianMixture, attack: PGD, generator: torch.Generator
) -> Tensor:
    """Per-example training loss [B] of ``method`` on a batch x [B, 1] (see the module docstring)."""
    if method == "standard":
        return self_consistent_kl(model, x, posterior)
    if method == "madry":
        log_p_clean = posterior.log_posterior(x)  # [B, 2]
        loss_fn = lambda z: madry_distance(model, z, log_p_clean, "kl")
    elif method == "score":
        loss_fn = lambda z: self_consistent_kl(model, z, posterior)
    else:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    return loss_fn(attack.maximize(loss_fn, x, generator))


def train(
    model: nn.Module,
    x: Tensor,
    posterior: GaussianMixture,
    method: str,
    cfg: ToyDemoConfig,
    generator: torch.Generator,
    desc: str,
) -> list[float]:
    """Adam on the mean objective over minibatches of x [N, 1]; returns the loss of every iteration."""
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    attack = PGD(cfg.eps, cfg.pgd_step_size, cfg.pgd_steps, norm="linf", random_start=True, clamp=None)
    batch = min(cfg.batch_size, len(x))
    losses = []
    for _ in trange(cfg.iterations, desc=desc, leave=False):
        xb = x if batch == len(x) else x[torch.randint(len(x), (batch,), generator=generator, device=x.device)]
        loss = objective(method, model, xb, posterior, attack, generator).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


# -- readouts ------------------------------------------------------------------------------------------------
@torch.no_grad()
def positive_posterior(model: nn.Module, x: Tensor) -> Tensor:
    """p_θ(y=1|x): [B]."""
    return model(x).softmax(dim=1)[:, 1]


def within_balls(grid: Tensor, x: Tensor, eps: float) -> Tensor:
    """Mask [G] of grid points x_g [G, 1] within ε of some training point x [N, 1]: the union of the balls B(x_i)."""
    xs = x.flatten().sort().values  # [N]
    g = grid.flatten()  # [G]
    right = torch.searchsorted(xs, g).clamp(max=len(xs) - 1)
    left = (right - 1).clamp(min=0)
    nearest = torch.minimum((g - xs[left]).abs(), (g - xs[right]).abs())
    return nearest <= eps


def check_theorems(model: nn.Module, x: Tensor, posterior: GaussianMixture, cfg: ToyDemoConfig) -> dict:
    """Theorem 1 (ℓ1, ℓ2), Corollary 1 and the KL risks of ``model`` on x [B, 1], maximized exactly on a grid."""
    grid = GridSearch(cfg.eps, cfg.check_points)
    return {
        "theorem1": {d: check_theorem1(model, x, posterior, grid, d).to_dict() for d in ("l1", "l2")},
        "corollary1": check_corollary1(model, x, posterior, grid).to_dict(),
        "kl_risks": {
            "standard": standard_risk(model, x, posterior, "kl").item(),
            "madry": madry_risk(model, x, posterior, grid, "kl").item(),
            "score": score_risk(model, x, posterior, grid, "kl").item(),
        },
    }


def plot_form(
    path: Path,
    form: str,
    grid: Tensor,
    true_curve: Tensor,
    runs: dict[str, dict],
    points: tuple[Tensor, Tensor, Tensor] | None,
    covered: Tensor | None,
) -> None:
    """p_θ(y=1|x) of each method against p_d(y=1|x) (top) and |p_θ − p_d| on a log scale (bottom).

    ``points`` = (x [N], y [N], p_d(y=1|x) [N]) marks the training pairs on the true curve; ``covered`` [G]
    shades the grid points inside some ε-ball around a training x (where Madry and SCORE place their x').
    """
    x = grid.squeeze(1).cpu()
    with style():
        fig, (top, bottom) = plt.subplots(
            2, 1, sharex=True, figsize=(7.5, 6.0), gridspec_kw={"height_ratios": [2.2, 1]}
        )
        if covered is not None:
            for ax, label in ((top, "within ε of a training $x$"), (bottom, None)):
                ax.fill_between(x, 0, 1, where=covered.cpu(), transform=ax.get_xaxis_transform(), color="grey",
                                alpha=0.12, linewidth=0, label=label)
        top.plot(x, true_curve.cpu(), color="black", linestyle="--", label="true $p_d(y=1|x)$")
        for method, run in runs.items():
            curve = torch.tensor(run["curve"])
            label = f"{METHOD_LABELS[method]}, max dev {run['max_deviation']:.3f}"
            (line,) = top.plot(x, curve, label=label)
            bottom.semilogy(x, (curve - true_curve.cpu()).abs().clamp_min(1e-6), color=line.get_color())
        if points is not None:
            px, py, pd = points
            for cls, marker in ((0, "o"), (1, "^")):
                chosen = py == cls
                top.scatter(
                    px[chosen], pd[chosen], marker=marker, s=60, zorder=5, facecolor="white", edgecolor="black",
                    label=f"training pairs, y = {cls}",
                )
        if form == "expectation":
            bottom.axhline(ACCEPTANCE_DEVIATION, color="grey", linestyle=":", linewidth=1.2)
            bottom.annotate(f"{ACCEPTANCE_DEVIATION} (acceptance level)", (x[0], ACCEPTANCE_DEVIATION),
                            xytext=(2, 2), textcoords="offset points", color="grey", fontsize=8)
        top.set_ylabel("$p(y=1|x)$")
        top.set_ylim(-0.02, 1.0)
        top.set_title(f"Seed toy, {FORM_TITLES[form]}: learned $p_\\theta(y=1|x)$ vs true posterior")
        top.legend(loc="upper left")
        bottom.set_ylabel("$|p_\\theta(y=1|x) - p_d(y=1|x)|$")
        bottom.set_xlabel("$x$")
        bottom.set_ylim(1e-6, 1.0)
        save_figure(fig, path)


# -- the whole demo ------------------------------------------------------------------------------------------
def run_demo(cfg: ToyDemoConfig) -> dict:
    """Train the six (form, method) models, check the theorems, write figures and ``toy_demo.json`` to ``cfg.out``."""
    previous_threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _run_demo(cfg, Path(cfg.out))
    finally:
        torch.set_num_threads(previous_threads)


def _run_demo(cfg: ToyDemoConfig, out_dir: Path) -> dict:
    started = time.perf_counter()
    device = torch.device(cfg.device)
    posterior = seed_toy()

    data_generator = torch.Generator().manual_seed(cfg.seed)
    data = {
        "expectation": sample_pairs(posterior, cfg.expectation_counts, data_generator),
        "finite_sample": sample_pairs(posterior, cfg.finite_counts, data_generator),
    }
    eval_index = torch.randperm(sum(cfg.expectation_counts), generator=data_generator)[: cfg.eval_points]
    x_eval = data["expectation"][0][eval_index].to(device)  # [E, 1]
    grid = torch.linspace(*cfg.grid, device=device).unsqueeze(1)  # [G, 1]
    true_curve = posterior.log_posterior(grid).exp()[:, 1]  # [G]
    density = posterior.log_marginal(grid).exp()
    density = density / density.sum()  # p_d(x) normalised over the grid: [G]
    covered = {form: within_balls(grid, x.to(device), cfg.eps) for form, (x, _) in data.items()}  # [G] each

    results: dict[str, dict[str, dict]] = {form: {} for form in FORMS}
    for form, method in tqdm(list(product(FORMS, METHODS)), desc="toy demo runs"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = make_mlp(cfg.hidden)
        model.to(device)
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
        x_train = data[form][0].to(device)

        tic = time.perf_counter()
        losses = train(model, x_train, posterior, method, cfg, generator, desc=f"{form}/{method}")
        train_seconds = time.perf_counter() - tic

        curve = positive_posterior(model, grid)
        deviation = (curve - true_curve).abs()
        tic = time.perf_counter()
        checks = check_theorems(model, x_eval, posterior, cfg)
        results[form][method] = {
            "max_deviation": deviation.max().item(),
            "argmax_deviation_x": grid[deviation.argmax(), 0].item(),
            "covered_max_deviation": deviation[covered[form]].max().item(),
            "density_weighted_deviation": (density * deviation).sum().item(),
            **checks,
            "final_train_loss": losses[-1],
            "train_loss": losses[:: max(1, len(losses) // 100)],
            "train_seconds": train_seconds,
            "check_seconds": time.perf_counter() - tic,
            "curve": [round(v, 7) for v in curve.tolist()],
        }

    x_fin, y_fin = data["finite_sample"]
    p_fin = posterior.log_posterior(x_fin).exp()[:, 1]
    figures = {}
    for form in FORMS:
        points = (x_fin.squeeze(1), y_fin, p_fin) if form == "finite_sample" else None
        figures[form] = f"{form}.png"
        shade = covered[form] if form == "finite_sample" else None
        plot_form(out_dir / figures[form], form, grid, true_curve, results[form], points, shade)

    record = {
        "description": "Seed toy demo: p_theta(y=1|x) of standard, Madry (KL) and SCORE (KL) training vs p_d(y=1|x)",
        "config": dataclasses.asdict(cfg),
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "device": str(device),
            "threads": torch.get_num_threads(),
        },
        "evaluation": {
            "max_deviation": "max over the grid of |p_theta(y=1|x) - p_d(y=1|x)|",
            "covered_max_deviation": "the same max over grid points within eps of a training x (grid.covered)",
            "density_weighted_deviation": "sum over the grid of |p_theta - p_d| * p_d(x) / sum p_d(x) (about E|.|)",
            "theorem_points": f"{cfg.eval_points} points of the expectation-form data, shared by all models",
            "maximizer": f"GridSearch(eps={cfg.eps}, points={cfg.check_points})",
        },
        "grid": {
            "x": grid.squeeze(1).tolist(),
            "true_posterior": [round(v, 7) for v in true_curve.tolist()],
            "covered": {form: mask.tolist() for form, mask in covered.items()},
        },
        "training_points": {"finite_sample": {"x": x_fin.squeeze(1).tolist(), "y": y_fin.tolist()}},
        "figures": figures,
        "results": results,
        "wall_seconds": time.perf_counter() - started,
    }
    atomic_write_text(out_dir / "toy_demo.json", json.dumps(record, indent=1, allow_nan=False))
    return record


def format_summary(record: dict) -> str:
    """A plain-text table: form × method -> deviations |p_θ − p_d| (max on the grid, max within the ε-balls of the
    training x, p_d(x)-weighted mean), Theorem 1 (lower ≤ SCORE ≤ upper) and Corollary 1."""
    header = (
        f"{'form':<14}{'method':<10}{'max|dp|':>9}{'in balls':>9}{'E|dp|':>8}  {'Thm1 l1: lower <= score <= upper':<34}"
        f"{'Thm1 l2: lower <= score <= upper':<34}{'Cor1: lhs <= rhs':<20}"
    )
    lines = [header, "-" * len(header)]
    for form, methods in record["results"].items():
        for method, run in methods.items():
            cells = []
            for d in ("l1", "l2"):
                t = run["theorem1"][d]
                ok = "ok" if t["holds"] else "FAIL"
                cells.append(f"{t['lower_bound']:.4f} <= {t['score']:.4f} <= {t['upper_bound']:.4f} {ok}".ljust(34))
            c = run["corollary1"]
            cells.append(f"{c['lhs']:.4f} <= {c['rhs']:.4f} {'ok' if c['holds'] else 'FAIL'}")
            deviations = (
                f"{run['max_deviation']:>9.4f}{run['covered_max_deviation']:>9.4f}{run['density_weighted_deviation']:>8.4f}"
            )
            lines.append(f"{form:<14}{method:<10}{deviations}  " + "".join(cells))
    lines.append(f"wall time {record['wall_seconds']:.1f} s, torch {record['environment']['torch']}")
    return "\n".join(lines)


# -- command line --------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> dict:
    cfg = parse_config(ToyDemoConfig, None if argv is None else list(argv), prog="python -m analysis.toy_demo")
    record = run_demo(cfg)
    out = Path(cfg.out)
    print(format_summary(record))
    print(f"wrote {out / 'toy_demo.json'} and {', '.join(str(out / f) for f in record['figures'].values())}")
    return record


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
