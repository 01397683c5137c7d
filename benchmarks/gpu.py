"""GPU figures: WRN-28-10 TRADES-SE and direct-SCORE training steps at batch 512 in bf16 with channels-last, achieved
TFLOP/s against the GPU's peak, and the projected wall time of a Table 4 row. Without a GPU it says so and prints
only the FLOP-based projection.

    python -m benchmarks.gpu                              # CUDA: measures; CPU: no GPU figures, projection only
    python -m benchmarks.gpu --peak-tflops 989            # peak for a GPU the lookup table does not know

On CUDA each step is ``benchmarks.train_step.TrainingStep`` (the trainer's accelerator with ``mixed_precision="bf16"``
autocast, channels-last model and inputs, fused SGD, EMA) on random 3×32×32 data: TRADES-SE (β 4) and direct SCORE
(``cifar32`` score net, trajectory posterior), ℓ∞ ε 8/255, PGD-10 with step 2/255. FLOPs per step are counted on
the GPU by ``benchmarks.common.FlopCounter``; host syncs per step by ``torch.cuda.set_sync_debug_mode``; achieved
TFLOP/s = FLOPs ÷ median step time, against the bf16 datasheet peak (``benchmarks.common.GPU_PEAK_TFLOPS`` or
``--peak-tflops``). A Table 4 row is 400 epochs × ceil(50,000 / 512) = 98 steps = 39,200 steps; its projected wall
time is 39,200 × the measured step time (training steps only; the per-epoch PGD-40 validation on 1,024 points and the
final AutoAttack come on top).

On the CPU the same FLOPs are measured at batch 1 for K = 1 and 2 attack steps (a step's FLOPs are linear in the
batch and affine in K, so these two give every (B, K) exactly), and the row's hours are PROJECTED at an assumed
utilisation of H100 / A100 bf16 peaks. No GPU figures exist until this runs on a GPU.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace

import torch

from scorenets import ScoreNet
from trainlib.adversarial import AdversarialConfig
from trainlib.cli import run_cli
from trainlib.config import option, parse_config
from trainlib.data_posterior import trajectory_provider

from .common import (
    BenchConfig,
    Report,
    alternate,
    count_flops,
    gpu_peak_tflops,
    median,
    projected_hours,
    ratio,
    setup,
    spread,
)
from .generation import REFERENCE_GPUS
from .train_step import TrainingStep

OBJECTIVES = ("trades-se", "direct-score")
TABLE4_STEPS = 400 * math.ceil(50_000 / 512)


@dataclass
class GPUConfig(BenchConfig):
    """WRN-28-10 steps at batch 512 in bf16 + channels-last on a GPU (benchmarks.gpu)."""

    repeats: int = option("timed rounds", 3)
    model: str = option("classifier", "wrn-28-10")
    preset: str = option("score-net preset of direct SCORE", "cifar32")
    batch_size: int = option("batch per step (Table 4: 512)", 512, ge=1)
    pgd_steps: int = option("PGD steps (Table 4: 10)", 10, ge=1, renamed_from="steps")
    mixed_precision: str = option("autocast dtype on the GPU: bf16 | no", "bf16")
    peak_tflops: float | None = option("the GPU's peak for the achieved fraction (none: datasheet lookup)", None)
    utilisation: float = option("assumed fraction of peak for the CPU-side projection", 0.4)

    def validate(self) -> None:
        super().validate()
        if self.mixed_precision not in ("bf16", "no"):
            raise ValueError(f"mixed_precision must be bf16 or no, got {self.mixed_precision!r}")
        if not 0 < self.utilisation <= 1:
            raise ValueError(f"utilisation must be in (0, 1], got {self.utilisation}")


def training_steps(cfg: GPUConfig, batch: int, attack_steps: int, device: torch.device, mixed_precision: str):
    """TrainingStep per objective on one shared model and score net, and a fixed random batch."""
    train_cfg = AdversarialConfig(dataset="cifar10", model=cfg.model, eps=8 / 255, step_size=2 / 255,
                                  pgd_steps=attack_steps, batch_size=batch, noise_std=8 / 255,
                                  mixed_precision=mixed_precision)
    torch.manual_seed(0)
    scorenet = ScoreNet.build(cfg.preset, 10, (3, 32, 32)).to(device).eval().requires_grad_(False)
    steps = {}
    for name in OBJECTIVES:
        objective_cfg = replace(train_cfg, objective=name)
        provider = None
        if name == "direct-score":  # the trainer's trajectory posterior
            provider = trajectory_provider(scorenet, objective_cfg.noise_std,
                                           anchor_smoothing=objective_cfg.anchor_smoothing)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # create_accelerator: "bf16 is not used on the CPU"
            steps[name] = TrainingStep(objective_cfg, 10, (3, 32, 32), provider)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, 32, 32, generator=generator).to(device)
    y = torch.randint(0, 10, (batch,), generator=generator).to(device)
    return steps, x, y


def cuda_syncs(step, x, y) -> int:
    """Host syncs in one step, as torch.cuda.set_sync_debug_mode("warn") reports them."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step(x, y)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def measure_on_gpu(cfg: GPUConfig, report: Report, device: torch.device) -> dict:
    steps, x, y = training_steps(cfg, cfg.batch_size, cfg.pgd_steps, device, cfg.mixed_precision)
    name = torch.cuda.get_device_name(device)
    peak = cfg.peak_tflops or gpu_peak_tflops(name, "bf16" if cfg.mixed_precision == "bf16" else "tf32")
    flops, syncs = {}, {}
    for objective, step in steps.items():
        flops[objective] = count_flops(lambda step=step: step(x, y))
        syncs[objective] = cuda_syncs(step, x, y)
    times = alternate({k: (lambda step=step: step(x, y)) for k, step in steps.items()}, cfg.repeats, cfg.warmup,
                      device)
    rows, results = [], {}
    for objective in OBJECTIVES:
        seconds = median(times[objective])
        achieved = flops[objective] / seconds / 1e12
        results[objective] = dict(seconds=seconds, flops=flops[objective], tflops=achieved, syncs=syncs[objective],
                                  table4_hours=TABLE4_STEPS * seconds / 3600)
        rows.append([objective, f"{seconds:.3f}", spread(times[objective]), f"{flops[objective] / 1e12:.1f}",
                     f"{achieved:.0f}", f"{achieved / peak:.0%}" if peak else "peak unknown", syncs[objective],
                     f"{TABLE4_STEPS * seconds / 3600:.1f}"])
    report.table(f"{name}: {cfg.model}, batch {cfg.batch_size}, PGD-{cfg.pgd_steps}, {cfg.mixed_precision} autocast, "
                 f"channels-last, score net {cfg.preset}; peak {peak or '?'} TFLOP/s; {cfg.repeats} rounds",
                 ["objective", "s/step (median)", "min–max", "TFLOP/step", "TFLOP/s", "of peak", "host syncs/step",
                  f"h for a Table 4 row ({TABLE4_STEPS} steps)"], rows)
    results["direct_over_trades"] = ratio(times["direct-score"], times["trades-se"])
    return results


def project_from_cpu(cfg: GPUConfig, report: Report, device: torch.device) -> dict:
    """FLOPs per image at K = 1 and 2 (batch 1, CPU), extrapolated exactly to (batch, steps); projected hours."""
    per_image = {}
    for attack_steps in (1, 2):
        steps, x, y = training_steps(cfg, 1, attack_steps, device, "no")
        for objective, step in steps.items():
            per_image[(objective, attack_steps)] = count_flops(lambda step=step, x=x, y=y: step(x, y))
    rows, results = [], {}
    for objective in OBJECTIVES:
        slope = per_image[(objective, 2)] - per_image[(objective, 1)]  # FLOPs per image and attack step
        step_flops = cfg.batch_size * (per_image[(objective, 1)] + (cfg.pgd_steps - 1) * slope)
        hours = {gpu: projected_hours(TABLE4_STEPS * step_flops, peak, cfg.utilisation)
                 for gpu, peak in REFERENCE_GPUS.items()}
        results[objective] = {"flops_per_step": step_flops, "projected_hours": hours}
        rows.append([objective, f"{step_flops / 1e12:.1f}", f"{TABLE4_STEPS * step_flops:.2e}",
                     *(f"{h:.1f}" for h in hours.values())])
    report.table(f"PROJECTION (no GPU): a Table 4 row = {TABLE4_STEPS} steps of {cfg.model}, batch {cfg.batch_size}, "
                 f"PGD-{cfg.pgd_steps}; FLOPs measured on this CPU, assumed {cfg.utilisation:.0%} of the bf16 peak",
                 ["objective", "TFLOP/step", "FLOP per row", *(f"h on {gpu}" for gpu in REFERENCE_GPUS)], rows)
    return results


def run(cfg: GPUConfig) -> dict:
    device = setup(cfg)
    report = Report("gpu", cfg, device)
    if device.type == "cuda":
        results = measure_on_gpu(cfg, report, device)
        headline = (f"{torch.cuda.get_device_name(device)}: TRADES-SE {results['trades-se']['seconds']:.2f} s/step "
                    f"({results['trades-se']['tflops']:.0f} TFLOP/s), direct SCORE "
                    f"{results['direct-score']['seconds']:.2f} s/step, ratio {results['direct_over_trades']:.1f}; "
                    f"Table 4 row {results['trades-se']['table4_hours']:.1f} h (TRADES-SE, training steps)")
    else:
        report.note("no GPU available: NO GPU FIGURES EXIST YET. What follows is a FLOP-based projection only.")
        results = project_from_cpu(cfg, report, device)
        gpu = next(iter(REFERENCE_GPUS))
        headline = (f"no GPU figures (no GPU here); projected Table 4 row on one {gpu} at {cfg.utilisation:.0%}: "
                    f"TRADES-SE {results['trades-se']['projected_hours'][gpu]:.1f} h, direct SCORE "
                    f"{results['direct-score']['projected_hours'][gpu]:.1f} h")
    report.results = results
    report.finish(headline)
    return results


def main() -> None:
    run_cli(lambda: run(parse_config(GPUConfig, prog="python -m benchmarks.gpu")))


if __name__ == "__main__":
    main()
