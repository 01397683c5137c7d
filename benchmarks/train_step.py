"""Seconds per training step of TRADES-SE, PGD-AT and direct SCORE on the same classifier, batch and attack steps;
score-network calls, host syncs and FLOPs per step; the optimizer and EMA updates on their own.

    python -m benchmarks.train_step                   # digits recipe shapes, then CIFAR shapes (~3-4 min on 2 cores)
    python -m benchmarks.train_step --no-cifar        # digits only (~1 min)

A step is what ``trainlib.adversarial.train`` runs per optimizer step, through the same pieces: an accelerator from
``create_accelerator`` (fp32 on the CPU), the model and ``build_optimizer``'s fused SGD prepared by it, the objective
from ``build_objective`` attacking the unwrapped model, ``accelerator.backward``, ``optimizer.step``,
``zero_grad(set_to_none=True)``, the one-cycle LR step and ``EMA.update`` (only the engine's metric accumulation and
checkpointing are left out). Score nets are randomly initialised (cost does not depend on the weights) and wired in
with ``trainlib.data_posterior.trajectory_provider``, the trainer's trajectory posterior.

* digits: the ``recipes/digits-direct-score.json`` shapes for all three objectives (cnn-small, batch 64, PGD-3,
  ε 0.2, 1 thread as the recipe sets), score net ``tiny8``.
* CIFAR: WRN-28-10 on 3×32×32 with the ``cifar32`` score net (DDPM's CIFAR UNet), batch 2, PGD-2, TRADES-SE against
  direct SCORE (the ratio the issue asks for; PGD-AT is added with ``--cifar-objectives``).

Score-net calls per direct-SCORE step are counted with ``ScoreNet.forward_calls`` and the input batch of each call.
The target is 1 + K calls for K attack steps: the anchor call at the clean batch (the trajectory's log p̂ starts
there and its scores open the first trapezoid segment), then exactly ONE call over B·K inputs (every class at once)
per attack step; log p_d at each iterate and at the final x' costs zero calls (trajectory mode). Host syncs are
counted with ``benchmarks.common.SyncCounter`` over one step (on a GPU each would stall the launch queue).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from scorenets import ScoreNet
from trainlib.adversarial import AdversarialConfig, build_classifier, build_optimizer
from trainlib.config import load_recipe, option, parse_config, run_cli
from trainlib.data import load_dataset
from trainlib.data_posterior import trajectory_provider
from trainlib.ema import EMA
from trainlib.engine import create_accelerator, one_cycle_cosine, rank_generator
from trainlib.objectives import build_objective

from .common import BenchConfig, Report, SyncCounter, alternate, count_flops, median, ratio, setup, spread

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "digits-direct-score.json"
OBJECTIVES = ("trades-se", "pgd-at", "direct-score")


@dataclass
class TrainStepConfig(BenchConfig):
    """Training-step cost of TRADES-SE, PGD-AT and direct SCORE (benchmarks.train_step)."""

    repeats: int = option("timed rounds at digits shapes", 5)
    objectives: tuple[str, ...] = option("objectives at digits shapes", OBJECTIVES)
    digits_recipe: str = option("recipe giving the digits model, batch, attack and threads", str(RECIPE))
    digits_preset: str = option("score-net preset at digits shapes", "tiny8")
    cifar: bool = option("also measure CIFAR shapes (WRN-28-10, cifar32 score net)", True)
    cifar_objectives: tuple[str, ...] = option("objectives at CIFAR shapes", ("trades-se", "direct-score"))
    cifar_model: str = option("classifier at CIFAR shapes", "wrn-28-10")
    cifar_preset: str = option("score-net preset at CIFAR shapes", "cifar32")
    cifar_batch: int = option("batch at CIFAR shapes", 2)
    cifar_steps: int = option("PGD steps at CIFAR shapes", 2)
    cifar_repeats: int = option("timed rounds at CIFAR shapes (the counting step is the warm-up)", 3)
    updates_repeats: int = option("timed rounds of the optimizer / EMA update comparison (CIFAR: a third)", 15)

    def validate(self) -> None:
        super().validate()
        for name in (*self.objectives, *self.cifar_objectives):
            if name not in OBJECTIVES:
                raise ValueError(f"unknown objective {name!r}; valid: {', '.join(OBJECTIVES)}")
        for name in ("cifar_batch", "cifar_steps", "cifar_repeats", "updates_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not Path(self.digits_recipe).is_file():
            raise FileNotFoundError(f"recipe file not found: {self.digits_recipe}")


# -- one training step, as the trainer runs it ------------------------------------------------------------------------
class TrainingStep:
    """One optimizer step of ``trainlib.adversarial.train`` for ``objective`` on a private copy of ``model``."""

    def __init__(self, cfg: AdversarialConfig, model: nn.Module, provider=None, total_steps: int = 1000,
                 channels_last: bool | None = None):  # fmt: skip
        self.accelerator = create_accelerator(mixed_precision=cfg.mixed_precision, seed=cfg.seed)
        self.device = self.accelerator.device
        self.channels_last = self.device.type == "cuda" if channels_last is None else channels_last
        model = copy.deepcopy(model)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(model, cfg)
        scheduler = one_cycle_cosine(optimizer, total_steps, cfg.warmup_fraction, cfg.cycle_momentum)
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        self.attack_model = self.accelerator.unwrap_model(self.model)
        self.ema = EMA(self.model, cfg.ema_tau, cfg.ema_warmup_fraction * total_steps)
        self.objective = build_objective(
            cfg.objective, cfg, beta=cfg.beta, clip=cfg.clip, clip_scope=cfg.clip_scope,
            label_smoothing=cfg.label_smoothing, attack_bn=cfg.attack_bn, distance=cfg.distance,
            clean_weight=cfg.clean_weight, clean_loss=cfg.clean_loss, posterior_provider=provider,
        )  # fmt: skip
        self.seed, self.step_count = cfg.seed, 0
        self.model.train()

    def __call__(self, x: torch.Tensor, y: torch.Tensor):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        generator = rank_generator(self.seed, 0, self.step_count, 0, 0, device=self.device)
        output = self.objective(self.model, self.attack_model, x, y, generator)
        self.accelerator.backward(output.loss)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.ema.update(self.model)
        self.step_count += 1
        return output


class CallRecorder:
    """Input batch size of every call of a ScoreNet (``forward_calls`` counts them)."""

    def __init__(self, scorenet: ScoreNet):
        self.sizes: list[int] = []
        scorenet.register_forward_pre_hook(lambda module, args: self.sizes.append(int(args[0].shape[0])))


# -- one setting: models, objectives, counts, times --------------------------------------------------------------------
@dataclass
class Setting:
    name: str
    cfg: AdversarialConfig  # model, batch, attack; objective set per run
    preset: str
    x: torch.Tensor
    y: torch.Tensor
    objectives: tuple[str, ...]
    repeats: int
    warmup: int


def measure(setting: Setting, report: Report, device: torch.device) -> dict:
    """Count (score-net calls, syncs, FLOPs) on one step of each objective, then time them alternately."""
    cfg, num_classes = setting.cfg, 10
    shape = tuple(setting.x.shape[1:])
    torch.manual_seed(cfg.seed)
    model = build_classifier(cfg.model, cfg.dataset, num_classes, shape)
    scorenet = ScoreNet.build(setting.preset, num_classes, shape).to(device).eval().requires_grad_(False)
    calls = CallRecorder(scorenet)
    steps = {}
    for name in setting.objectives:
        objective_cfg = replace(cfg, objective=name)
        provider = None
        if name == "direct-score":  # the trainer's trajectory posterior
            provider = trajectory_provider(scorenet, objective_cfg.noise_std,
                                           anchor_smoothing=objective_cfg.anchor_smoothing)
        steps[name] = TrainingStep(objective_cfg, model, provider)
    x, y = setting.x.to(device), setting.y.to(device)

    counted = {}
    for name, step in steps.items():  # the counting step doubles as a warm-up
        before, calls.sizes = scorenet.forward_calls, []
        with SyncCounter() as syncs:
            flops = count_flops(lambda step=step: step(x, y))
        counted[name] = dict(flops=flops, syncs=dict(syncs.counts), scorenet_calls=scorenet.forward_calls - before,
                             scorenet_inputs=list(calls.sizes))  # fmt: skip
    times = alternate({name: (lambda step=step: step(x, y)) for name, step in steps.items()}, setting.repeats,
                      setting.warmup, device)  # fmt: skip

    batch, attack_steps = x.shape[0], cfg.steps
    rows, medians = [], {name: median(t) for name, t in times.items()}
    reference = times[setting.objectives[0]]
    for name in setting.objectives:
        c = counted[name]
        sync_text = ", ".join(f"{k} ×{v}" for k, v in sorted(c["syncs"].items())) or "0"
        call_text = "—"
        if name == "direct-score":
            sizes = sorted(set(c["scorenet_inputs"]))
            call_text = f"{c['scorenet_calls']} (1 anchor + {c['scorenet_calls'] - 1}) × {'/'.join(map(str, sizes))}"
        rows.append([name, f"{medians[name]:.3f}", spread(times[name]), f"{ratio(times[name], reference):.2f}",
                     f"{c['flops'] / 1e9:.1f}", call_text, sync_text])  # fmt: skip
    report.table(
        f"{setting.name}: {cfg.model}, batch {batch}, PGD-{attack_steps} ({cfg.norm}, ε {cfg.eps:.4g}), score net "
        f"{setting.preset}, {torch.get_num_threads()} thread(s), {setting.repeats} rounds",
        ["objective", "s/step (median)", "min–max", f"÷ {setting.objectives[0]}", "GFLOP/step",
         "score-net calls × inputs", "host syncs/step"],
        rows,
    )  # fmt: skip
    expected_calls = 1 + attack_steps
    if "direct-score" in counted:
        c = counted["direct-score"]
        sizes = sorted(set(c["scorenet_inputs"]))
        ok = c["scorenet_calls"] == expected_calls and sizes == [batch * num_classes]
        report.note(f"{setting.name}: direct SCORE made {c['scorenet_calls']} score-net calls per step (target: 1 "
                    f"anchor + {attack_steps} attack steps = {expected_calls}), each over {'/'.join(map(str, sizes))} "
                    f"inputs (target B·K = {batch * num_classes}), 0 for log p_d: {'met' if ok else 'MISSED'}")
    return {"medians": medians, "times": times, "counts": counted, "batch": batch, "attack_steps": attack_steps,
            "model": cfg.model, "preset": setting.preset}  # fmt: skip


# -- optimizer and EMA updates on their own ----------------------------------------------------------------------------
def measure_updates(model: nn.Module, cfg: AdversarialConfig, repeats: int, report: Report, device) -> dict:
    """SGD as a per-parameter loop, foreach and fused (ours); EMA as a per-parameter loop and foreach (ours)."""
    model = copy.deepcopy(model).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    from trainlib.models import param_groups

    def sgd(**kind):
        return torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=True, **kind)  # fmt: skip

    optimizers = {"SGD loop": sgd(foreach=False), "SGD foreach": sgd(foreach=True),
                  "SGD fused (ours)": build_optimizer(model, cfg)}  # fmt: skip
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
            for name in runs]  # fmt: skip
    params = sum(p.numel() for p in model.parameters())
    report.table(f"updates per step: {cfg.model} ({params / 1e6:.1f}M parameters), {repeats} rounds",
                 ["update", "ms (median)", "speed-up over the loop"], rows)
    return medians


def digits_setting(cfg: TrainStepConfig) -> Setting:
    recipe = AdversarialConfig(**load_recipe(AdversarialConfig, cfg.digits_recipe))
    batch = load_dataset(recipe.dataset, "train", recipe.data_dir)
    x, y = batch.get(range(recipe.batch_size))
    return Setting("digits", recipe, cfg.digits_preset, x, y, cfg.objectives, cfg.repeats, cfg.warmup)


def cifar_setting(cfg: TrainStepConfig) -> Setting:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(cfg.cifar_batch, 3, 32, 32, generator=generator)
    y = torch.randint(0, 10, (cfg.cifar_batch,), generator=generator)
    train_cfg = AdversarialConfig(dataset="cifar10", model=cfg.cifar_model, eps=8 / 255, step_size=2 / 255,
                                  steps=cfg.cifar_steps, batch_size=cfg.cifar_batch, noise_std=8 / 255)  # fmt: skip
    return Setting("CIFAR", train_cfg, cfg.cifar_preset, x, y, cfg.cifar_objectives, cfg.cifar_repeats, 0)


def run(cfg: TrainStepConfig) -> dict:
    device = setup(cfg)
    report = Report("train_step", cfg, device)
    digits = digits_setting(cfg)
    torch.set_num_threads(digits.cfg.cpu_threads or cfg.threads)  # the recipe's threads (digits recipes: 1)
    results = {"digits": measure(digits, report, device)}
    model = build_classifier(digits.cfg.model, digits.cfg.dataset, 10, tuple(digits.x.shape[1:]))
    results["digits_updates"] = measure_updates(model, digits.cfg, cfg.updates_repeats, report, device)
    torch.set_num_threads(cfg.threads)
    ratios = []
    if "trades-se" in digits.objectives and "direct-score" in digits.objectives:
        ratios.append(("digits", results["digits"]["times"]))
    if cfg.cifar:
        cifar = cifar_setting(cfg)
        results["cifar"] = measure(cifar, report, device)
        big = build_classifier(cifar.cfg.model, cifar.cfg.dataset, 10, (3, 32, 32))
        results["cifar_updates"] = measure_updates(big, cifar.cfg, max(3, cfg.updates_repeats // 3), report, device)
        if "trades-se" in cifar.objectives and "direct-score" in cifar.objectives:
            ratios.append(("CIFAR", results["cifar"]["times"]))
    report.results = results
    calls = [f"{name} {results[key]['counts']['direct-score']['scorenet_calls']} calls/step"
             for name, key in (("digits", "digits"), ("CIFAR", "cifar")) if key in results
             and "direct-score" in results[key]["counts"]]  # fmt: skip
    ratio_text = ", ".join(f"{name} {ratio(t['direct-score'], t['trades-se']):.2f}" for name, t in ratios)
    report.finish(f"direct SCORE / TRADES-SE time per step: {ratio_text or 'n/a'}"
                  f"{'; score net ' + ', '.join(calls) if calls else ''}")  # fmt: skip
    return results


def main() -> None:
    run_cli(lambda: run(parse_config(TrainStepConfig, prog="python -m benchmarks.train_step")))


if __name__ == "__main__":
    main()
