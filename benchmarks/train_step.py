"""Seconds, FLOPs, network calls and host syncs per training step of TRADES-SE / TRADES-KL / PGD-AT and of direct
SCORE with each data posterior, on the same classifier, batch and attack steps; the optimizer and EMA updates alone.

    python -m benchmarks.train_step                   # digits recipe shapes, then CIFAR shapes for K = 10 and K = 100
    python -m benchmarks.train_step --no-cifar        # digits only

A step is ``trainlib.classifier_step.Trainer.step``, the function the trainer runs per optimizer step (attack, loss,
backward, gradient norm and non-finite guard, fused SGD, one-cycle LR step, EMA update), built by the trainer's own
``build_trainer`` (only the session's metric accumulation and checkpointing are left out). Networks are randomly
initialised (cost does not depend on the weights). Direct SCORE variants, built as the trainer builds them
(``trainlib.data_posterior``):

* ``direct-score/posterior-net``: p_φ(·|x', σ) of a ``PosteriorNet`` (the preset for the image size): one backward
  per attack step through the classifier and the posterior net, whatever K is;
* ``direct-score/trajectory``: the score-net trajectory anchored at the posterior net (1 + PGD-steps UNet calls over
  B·K inputs each: the cost that grows with K);
* ``direct-score/empirical``: the exact smoothed training-set posterior (``datagrad.KernelMixture``; digits: the 1,257
  training digits, CIFAR: ``--cifar-train-size`` random images), one [B, N] matrix product per call.

Settings: digits = the ``recipes/digits-direct-score.json`` shapes (cnn-small, batch 64, PGD-3, 1 thread as the recipe
sets), posterior net and score net ``tiny8``; CIFAR = WRN-28-10 on 3×32×32 with the ``cifar32`` posterior net and
score net, batch 2, PGD-2, for each class count of ``--cifar-classes``. Calls are counted per network and input batch
(forward pre-hooks); a variant whose counted step took longer than ``--max-alternated-seconds`` is timed by that step
alone (marked "1 run") instead of in the alternation. Host syncs are counted with ``benchmarks.common.SyncCounter``
over one step (on a GPU each would stall the launch queue).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from datagrad import KernelMixture
from scorenets import PosteriorNetPosterior, ScoreNet, build_posterior_net
from trainlib.adversarial import AdversarialConfig, make_objective
from trainlib.classifier_step import build_optimizer, build_trainer
from trainlib.classifiers import build_classifier
from trainlib.cli import run_cli
from trainlib.config import load_recipe, option, parse_config
from trainlib.data_posterior import trajectory_provider
from trainlib.datasets import load_dataset
from trainlib.ema import EMA
from trainlib.nonfinite import NonFiniteGuard
from trainlib.objectives import fixed_posterior

from .common import BenchConfig, Report, SyncCounter, alternate, count_flops, median, ratio, setup, spread

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "digits-direct-score.json"
VARIANTS = ("trades-se", "trades-kl", "pgd-at", "direct-score/posterior-net", "direct-score/trajectory",
            "direct-score/empirical")


@dataclass
class TrainStepConfig(BenchConfig):
    """Training-step cost of the baselines and of direct SCORE with each data posterior (benchmarks.train_step)."""

    repeats: int = option("timed rounds at digits shapes", 5)
    variants: tuple[str, ...] = option(f"variants at digits shapes: {' | '.join(VARIANTS)}", VARIANTS)
    digits_recipe: str = option("recipe giving the digits model, batch, attack and threads", str(RECIPE))
    digits_preset: str = option("score-net and posterior-net preset at digits shapes", "tiny8")
    cifar: bool = option("also measure CIFAR shapes (WRN-28-10, cifar32 networks)", True)
    cifar_variants: tuple[str, ...] = option("variants at CIFAR shapes", ("trades-kl", "direct-score/posterior-net",
                                                                         "direct-score/trajectory",
                                                                         "direct-score/empirical"))
    cifar_classes: tuple[int, ...] = option("class counts K at CIFAR shapes", (10, 100))
    cifar_model: str = option("classifier at CIFAR shapes", "wrn-28-10")
    cifar_preset: str = option("score-net and posterior-net preset at CIFAR shapes", "cifar32")
    cifar_batch: int = option("batch at CIFAR shapes", 2)
    cifar_steps: int = option("PGD steps at CIFAR shapes", 2)
    cifar_repeats: int = option("timed rounds at CIFAR shapes (the counting step is the warm-up)", 3)
    cifar_train_size: int = option("random training images of the empirical posterior at CIFAR shapes", 50000)
    max_alternated_seconds: float = option("a variant whose counted step is slower is timed by that step alone", 20.0)
    updates_repeats: int = option("timed rounds of the optimizer / EMA update comparison (CIFAR: a third)", 15)

    def validate(self) -> None:
        super().validate()
        for name in (*self.variants, *self.cifar_variants):
            if name not in VARIANTS:
                raise ValueError(f"unknown variant {name!r}; valid: {', '.join(VARIANTS)}")
        for name in ("cifar_batch", "cifar_steps", "cifar_repeats", "updates_repeats", "cifar_train_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if any(k < 2 for k in self.cifar_classes):
            raise ValueError(f"cifar_classes must be >= 2, got {list(self.cifar_classes)}")
        if not Path(self.digits_recipe).is_file():
            raise FileNotFoundError(f"recipe file not found: {self.digits_recipe}")


# -- one training step, as the trainer runs it ------------------------------------------------------------------------
class TrainingStep:
    """One optimizer step of ``trainlib.adversarial.train``, through the same code: the trainer's accelerator, its
    ``build_trainer`` (model, fused SGD, one-cycle schedule, EMA, unwrapped attack model) and ``Trainer.step`` with a
    non-finite guard in mode "stop". The model's initial weights come from the accelerator's seed (``cfg.seed``), so
    every TrainingStep of one config starts from the same weights."""

    def __init__(self, cfg: AdversarialConfig, num_classes: int, image_shape, provider=None, total_steps: int = 1000):
        accelerator = cfg.accelerator()
        self.device = accelerator.device
        self.trainer = build_trainer(cfg, accelerator, num_classes, tuple(image_shape), make_objective(cfg, provider),
                                     total_steps)
        self.guard = NonFiniteGuard(accelerator)
        self.step_count = 0
        self.trainer.model.train()

    @property
    def attack_model(self) -> nn.Module:
        return self.trainer.attack_model

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        stats, _ = self.trainer.step(x, y, self.step_count, 0, self.guard)
        self.step_count += 1
        return stats


class CallRecorder:
    """Input batch size of every call of a network."""

    def __init__(self, network: nn.Module):
        self.sizes: list[int] = []
        network.register_forward_pre_hook(lambda module, args: self.sizes.append(int(args[0].shape[0])))


# -- one setting: models, objectives, counts, times --------------------------------------------------------------------
@dataclass
class Setting:
    name: str
    cfg: AdversarialConfig  # model, batch, attack; objective set per variant
    preset: str
    num_classes: int
    x: torch.Tensor
    y: torch.Tensor
    train_images: torch.Tensor  # the empirical posterior's training set [N, C, H, W]
    train_labels: torch.Tensor
    variants: tuple[str, ...]
    repeats: int
    warmup: int


def build_variant(name: str, setting: Setting, scorenet, posterior_net, device):
    """(objective config, posterior provider) of a variant, built as ``trainlib.data_posterior`` builds them."""
    objective, _, posterior = name.partition("/")
    cfg = replace(setting.cfg, objective=objective)
    if posterior == "posterior-net":
        return cfg, fixed_posterior(PosteriorNetPosterior(posterior_net, cfg.noise_std))
    if posterior == "trajectory":
        return cfg, trajectory_provider(scorenet, cfg.noise_std, anchor_net=posterior_net)
    if posterior == "empirical":
        train = setting.train_images.to(device)
        return cfg, fixed_posterior(KernelMixture(train, setting.train_labels.to(device), setting.num_classes,
                                                  cfg.noise_std))
    return cfg, None


def measure(setting: Setting, report: Report, device: torch.device, max_alternated: float) -> dict:
    """Count (network calls, syncs, FLOPs) on one step of each variant, then time them alternately."""
    cfg, num_classes = setting.cfg, setting.num_classes
    shape = tuple(setting.x.shape[1:])
    torch.manual_seed(cfg.seed)
    scorenet = ScoreNet.build(setting.preset, num_classes, shape).to(device).eval().requires_grad_(False)
    posterior_net = build_posterior_net(setting.preset, num_classes, shape, 0.01, 1.0).to(device).eval()
    posterior_net.requires_grad_(False)
    calls = {"score net": CallRecorder(scorenet), "posterior net": CallRecorder(posterior_net)}
    steps = {}
    for name in setting.variants:
        variant_cfg, provider = build_variant(name, setting, scorenet, posterior_net, device)
        steps[name] = TrainingStep(variant_cfg, num_classes, shape, provider)
    x, y = setting.x.to(device), setting.y.to(device)

    counted, single = {}, {}
    for name, step in steps.items():  # the counting step doubles as a warm-up
        for recorder in calls.values():
            recorder.sizes = []
        with SyncCounter() as syncs:
            start = time.perf_counter()
            flops = count_flops(lambda step=step: step(x, y))
            seconds = time.perf_counter() - start
        counted[name] = dict(flops=flops, syncs=dict(syncs.counts),
                             calls={k: list(r.sizes) for k, r in calls.items() if r.sizes})
        if seconds > max_alternated:
            single[name] = seconds
    alternated = {name: (lambda step=step: step(x, y)) for name, step in steps.items() if name not in single}
    times = alternate(alternated, setting.repeats, setting.warmup, device) if alternated else {}
    times |= {name: [seconds] * max(setting.repeats, 1) for name, seconds in single.items()}

    batch, attack_steps = x.shape[0], cfg.pgd_steps
    reference = "trades-kl" if "trades-kl" in times else setting.variants[0]
    rows = []
    for name in setting.variants:
        c = counted[name]
        sync_text = ", ".join(f"{k} ×{v}" for k, v in sorted(c["syncs"].items())) or "0"
        call_text = "; ".join(f"{k} {len(v)} × {'/'.join(map(str, sorted(set(v))))}" for k, v in c["calls"].items())
        timing = f"{median(times[name]):.3f}" + (" (1 run)" if name in single else "")
        rows.append([name, timing, spread(times[name]), f"{ratio(times[name], times[reference]):.2f}",
                     f"{c['flops'] / 1e9:.1f}", f"{c['flops'] / counted[reference]['flops']:.2f}", call_text or "—",
                     sync_text])
    report.table(
        f"{setting.name}: {cfg.model}, K = {num_classes}, batch {batch}, PGD-{attack_steps} ({cfg.norm}, ε "
        f"{cfg.eps:.4g}), networks {setting.preset}, {torch.get_num_threads()} thread(s), {setting.repeats} rounds",
        ["variant", "s/step (median)", "min–max", f"time ÷ {reference}", "GFLOP/step", f"FLOPs ÷ {reference}",
         "network calls × inputs", "host syncs/step"],
        rows,
    )
    if "direct-score/trajectory" in counted:
        sizes = counted["direct-score/trajectory"]["calls"].get("score net", [])
        expected = [batch * num_classes] * (1 + attack_steps)
        report.note(f"{setting.name}: the trajectory made {len(sizes)} score-net calls per step (target: 1 anchor + "
                    f"{attack_steps} attack steps), each over {'/'.join(map(str, sorted(set(sizes))))} inputs (target "
                    f"B·K = {batch * num_classes}): {'met' if sizes == expected else 'MISSED'}")
    if "direct-score/posterior-net" in counted:
        sizes = counted["direct-score/posterior-net"]["calls"].get("posterior net", [])
        report.note(f"{setting.name}: direct SCORE with the posterior net made {len(sizes)} posterior-net calls per "
                    f"step, each over {'/'.join(map(str, sorted(set(sizes))))} inputs (target: {attack_steps} attack "
                    f"steps + 1 target, B = {batch} inputs, independent of K) and no score-net call")
    return {"medians": {n: median(t) for n, t in times.items()}, "times": times, "counts": counted,
            "single_run": sorted(single), "batch": batch, "attack_steps": attack_steps, "model": cfg.model,
            "preset": setting.preset, "num_classes": num_classes, "reference": reference}


# -- optimizer and EMA updates on their own ----------------------------------------------------------------------------
def measure_updates(model: nn.Module, cfg: AdversarialConfig, repeats: int, report: Report, device) -> dict:
    """SGD as a per-parameter loop, foreach and fused (ours); EMA as a per-parameter loop and foreach (ours)."""
    model = copy.deepcopy(model).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    from trainlib.models import param_groups

    def sgd(**kind):
        return torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=True, **kind)

    optimizers = {"SGD loop": sgd(foreach=False), "SGD foreach": sgd(foreach=True),
                  "SGD fused (ours)": build_optimizer(model, cfg)}
    ema = EMA(model, cfg.ema_tau, 0)
    ema.num_updates = 10**6  # past the warm-up: every update averages

    def ema_loop():  # EMA.update's work, one tensor at a time
        with torch.no_grad():
            for averaged, live in zip(ema.model.parameters(), model.parameters(), strict=True):
                averaged.lerp_(live, 1 - cfg.ema_tau)
            for averaged, live in zip(ema.model.buffers(), model.buffers(), strict=True):
                averaged.copy_(live)

    runs = {name: optimizer.step for name, optimizer in optimizers.items()}
    runs |= {"EMA loop": ema_loop, "EMA foreach (ours)": lambda: ema.update(model)}
    times = alternate(runs, repeats, 2, device, progress=False)
    medians = {name: median(t) for name, t in times.items()}
    rows = [[name, f"{medians[name] * 1e3:.2f}", f"{ratio(times[name.split()[0] + ' loop'], times[name]):.2f}"]
            for name in runs]
    params = sum(p.numel() for p in model.parameters())
    report.table(f"updates per step: {cfg.model} ({params / 1e6:.1f}M parameters), {repeats} rounds",
                 ["update", "ms (median)", "speed-up over the loop"], rows)
    return medians


def digits_setting(cfg: TrainStepConfig) -> Setting:
    recipe = AdversarialConfig(**load_recipe(AdversarialConfig, cfg.digits_recipe))
    train = load_dataset(recipe.dataset, "train", recipe.data_dir)
    x, y = train.get(range(recipe.batch_size))
    images, labels = train.tensors()
    return Setting("digits", recipe, cfg.digits_preset, train.num_classes, x, y, images, labels, cfg.variants,
                   cfg.repeats, cfg.warmup)


def cifar_setting(cfg: TrainStepConfig, num_classes: int) -> Setting:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(cfg.cifar_batch, 3, 32, 32, generator=generator)
    y = torch.randint(0, num_classes, (cfg.cifar_batch,), generator=generator)
    images = torch.rand(cfg.cifar_train_size, 3, 32, 32, generator=generator)
    labels = torch.arange(cfg.cifar_train_size) % num_classes
    train_cfg = AdversarialConfig(dataset="cifar10" if num_classes == 10 else "cifar100", model=cfg.cifar_model,
                                  eps=8 / 255, step_size=2 / 255, pgd_steps=cfg.cifar_steps,
                                  batch_size=cfg.cifar_batch, noise_std=8 / 255)
    return Setting(f"CIFAR-{num_classes}", train_cfg, cfg.cifar_preset, num_classes, x, y, images, labels,
                   cfg.cifar_variants, cfg.cifar_repeats, 0)


def run(cfg: TrainStepConfig) -> dict:
    device = setup(cfg)
    report = Report("train_step", cfg, device)
    digits = digits_setting(cfg)
    torch.set_num_threads(digits.cfg.cpu_threads or cfg.threads)  # the recipe's threads (digits recipes: 1)
    results = {"digits": measure(digits, report, device, cfg.max_alternated_seconds)}
    model = build_classifier(digits.cfg.model, digits.cfg.dataset, 10, tuple(digits.x.shape[1:]))
    results["digits_updates"] = measure_updates(model, digits.cfg, cfg.updates_repeats, report, device)
    torch.set_num_threads(cfg.threads)
    if cfg.cifar:
        for num_classes in cfg.cifar_classes:
            setting = cifar_setting(cfg, num_classes)
            results[f"cifar{num_classes}"] = measure(setting, report, device, cfg.max_alternated_seconds)
        big = build_classifier(cfg.cifar_model, "cifar10", 10, (3, 32, 32))
        results["cifar_updates"] = measure_updates(big, setting.cfg, max(3, cfg.updates_repeats // 3), report, device)
    report.results = results
    parts = []
    for key, result in results.items():
        if "times" not in result or "direct-score/posterior-net" not in result["times"]:
            continue
        reference, times = result["reference"], result["times"]
        text = f"{key} {ratio(times['direct-score/posterior-net'], times[reference]):.2f}"
        if "direct-score/trajectory" in times:
            text += f" (trajectory {ratio(times['direct-score/trajectory'], times[reference]):.2f})"
        parts.append(text)
    report.finish("direct SCORE with the posterior net ÷ TRADES-KL time per step: " + (", ".join(parts) or "n/a"))
    return results


def main() -> None:
    run_cli(lambda: run(parse_config(TrainStepConfig, prog="python -m benchmarks.train_step")))


if __name__ == "__main__":
    main()
