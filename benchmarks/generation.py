"""Generation: images/s and network calls per image of DDPM (1000 steps), DDIM (100) and DPM-Solver++ (20), and the
projected GPU hours to generate 1M CIFAR images.

    python -m benchmarks.generation                      # tiny8 digits net, batch 16, then cifar32 per-call cost
    python -m benchmarks.generation --peak-tflops 989 --utilisation 0.4

Samplers are ``scorenets.sample`` (the generator's code: one CPU generator per image, diffusers schedulers) on a
randomly initialised class-conditional UNet (cost does not depend on the weights): the ``tiny8`` preset on digits'
1×8×8 shape, alternated DDPM / DDIM / DPM-Solver++ on the same labels and seeds. Network calls per image are counted
from the inputs the UNet receives (a forward pre-hook), so classifier-free guidance (``--guidance-scale`` ≠ 1), which
batches conditional and unconditional inputs together, shows as 2 per step.

The CIFAR figures are a PROJECTION: the ``cifar32`` preset (DDPM's CIFAR-10 UNet, 3×32×32) is timed on this machine
for a couple of DDIM steps to get its cost per network call, its FLOPs per input are measured with
``benchmarks.common.FlopCounter``, and hours(1M images) = 10⁶ × calls/image × FLOPs/input ÷ (utilisation × peak),
with the peak of this GPU (or ``--peak-tflops``; otherwise the H100 and A100 bf16 datasheet peaks) and an assumed
utilisation (``--utilisation``, default 0.4). Nothing in it was measured on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scorenets import DEFAULT_STEPS, SAMPLERS, ScoreNet, sample
from trainlib.cli import run_cli
from trainlib.config import option, parse_config

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

REFERENCE_GPUS = {"H100 SXM (bf16, dense)": 989.0, "A100 (bf16, dense)": 312.0}


@dataclass
class GenerationConfig(BenchConfig):
    """Sampler throughput and the projected cost of 1M CIFAR images (benchmarks.generation)."""

    repeats: int = option("timed rounds (each holds one full DDPM-1000 run)", 2)
    warmup: int = option("untimed rounds", 0)
    preset: str = option("UNet preset timed for every sampler (digits shape 1x8x8)", "tiny8")
    batch_size: int = option("images per sampler call", 16)
    ddpm_steps: int = option("DDPM steps", DEFAULT_STEPS["ddpm"])
    ddim_steps: int = option("DDIM steps", DEFAULT_STEPS["ddim"])
    dpm_steps: int = option("DPM-Solver++ steps", DEFAULT_STEPS["dpmsolver++"])
    guidance_scale: float = option("classifier-free guidance w (1: none; otherwise 2 inputs per image and step)", 1.0)
    cifar_preset: str = option("UNet of the CIFAR projection (none: skip it)", "cifar32")
    cifar_batch: int = option("images per call when timing the CIFAR UNet on this machine", 4)
    cifar_steps: int = option("DDIM steps when timing the CIFAR UNet", 2)
    peak_tflops: float | None = option("GPU peak for the projection (none: this GPU's datasheet bf16 peak, or "
                                       "H100 and A100 when there is no GPU)", None)
    utilisation: float = option("assumed fraction of the peak the UNet sustains on a GPU (projection)", 0.4)

    def validate(self) -> None:
        super().validate()
        for name in ("batch_size", "ddpm_steps", "ddim_steps", "dpm_steps", "cifar_batch", "cifar_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.utilisation <= 1:
            raise ValueError(f"utilisation must be in (0, 1], got {self.utilisation}")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ValueError(f"peak_tflops must be > 0, got {self.peak_tflops}")


class InputCounter:
    """UNet inputs received (a forward pre-hook on the ScoreNet): network calls per image = inputs / images."""

    def __init__(self, net: ScoreNet):
        self.inputs = 0
        net.register_forward_pre_hook(lambda module, args: setattr(self, "inputs", self.inputs + args[0].shape[0]))


def sampler_runs(net: ScoreNet, steps: dict[str, int], batch: int, guidance: float, counter: InputCounter, calls):
    labels = torch.arange(batch) % net.num_classes
    seeds = list(range(batch))

    def run(sampler):
        before = counter.inputs
        sample(net, labels, seeds, sampler=sampler, num_steps=steps[sampler], guidance_scale=guidance)
        calls[sampler] = (counter.inputs - before) / batch

    return {sampler: (lambda sampler=sampler: run(sampler)) for sampler in SAMPLERS}


def run(cfg: GenerationConfig) -> dict:
    device = setup(cfg)
    report = Report("generation", cfg, device)
    torch.manual_seed(0)
    net = ScoreNet.build(cfg.preset, 10, (1, 8, 8)).to(device).eval().requires_grad_(False)
    counter, calls = InputCounter(net), {}
    steps = {"ddpm": cfg.ddpm_steps, "ddim": cfg.ddim_steps, "dpmsolver++": cfg.dpm_steps}
    times = alternate(sampler_runs(net, steps, cfg.batch_size, cfg.guidance_scale, counter, calls), cfg.repeats,
                      cfg.warmup, device)
    rate = {name: cfg.batch_size / median(t) for name, t in times.items()}
    rows = [[name, steps[name], f"{calls[name]:g}", f"{rate[name]:.2f}",
             spread([cfg.batch_size / t for t in times[name]]), f"{ratio(times['ddpm'], times[name]):.1f}"]
            for name in SAMPLERS]
    report.table(f"{cfg.preset} UNet (1×8×8, {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters), batch "
                 f"{cfg.batch_size}, guidance {cfg.guidance_scale:g}, {torch.get_num_threads()} thread(s), "
                 f"{cfg.repeats} rounds", ["sampler", "steps", "network calls / image", "images/s (median)", "min–max",
                                           "speed-up over DDPM"], rows)
    results = {"images_per_second": rate, "calls_per_image": calls, "times": times}

    if cfg.cifar_preset != "none":
        cifar = ScoreNet.build(cfg.cifar_preset, 10, (3, 32, 32)).to(device).eval().requires_grad_(False)
        u = torch.randn(1, 3, 32, 32, device=device)
        flops_per_input = count_flops(lambda: cifar(u, torch.full((1,), 500.0, device=device), torch.zeros(1).long()))
        cifar_counter, cifar_calls = InputCounter(cifar), {}
        ddim = sampler_runs(cifar, {"ddim": cfg.cifar_steps}, cfg.cifar_batch, 1.0, cifar_counter, cifar_calls)["ddim"]
        cifar_times = alternate({"ddim": ddim}, cfg.repeats, 1, device)["ddim"]
        per_input = median(cifar_times) / (cfg.cifar_steps * cfg.cifar_batch)
        report.note(f"{cfg.cifar_preset} UNet (3×32×32, {sum(p.numel() for p in cifar.parameters()) / 1e6:.1f}M "
                    f"parameters): {flops_per_input / 1e9:.2f} GFLOP per input (measured), {per_input:.3f} s per input "
                    f"here = {flops_per_input / per_input / 1e9:.0f} GFLOP/s on this machine")
        peaks = ({"given": cfg.peak_tflops} if cfg.peak_tflops else
                 {torch.cuda.get_device_name(device): gpu_peak_tflops(torch.cuda.get_device_name(device))}
                 if device.type == "cuda" and gpu_peak_tflops(torch.cuda.get_device_name(device)) else REFERENCE_GPUS)
        guided = 2 if cfg.guidance_scale != 1 else 1
        rows, projection = [], {}
        for name in SAMPLERS:
            flops = 1e6 * steps[name] * guided * flops_per_input
            hours = {gpu: projected_hours(flops, peak, cfg.utilisation) for gpu, peak in peaks.items()}
            projection[name] = hours
            here = 1e6 * steps[name] * guided * per_input / 3600
            rows.append([name, steps[name] * guided, f"{flops:.2e}", *(f"{h:.2f}" for h in hours.values()),
                         f"{here:,.0f}"])
        report.table(f"PROJECTION: hours to generate 1M 32×32 CIFAR images with {cfg.cifar_preset} (measured FLOPs, "
                     f"assumed {cfg.utilisation:.0%} of peak)", ["sampler", "calls / image", "FLOP",
                     *(f"h on {gpu} ({peak:g} TFLOP/s)" for gpu, peak in peaks.items()), "h on this CPU"], rows)
        results |= {"cifar_flops_per_input": flops_per_input, "cifar_seconds_per_input_here": per_input,
                    "cifar_projection_hours": projection, "peaks_tflops": peaks}
    report.results = results
    first_gpu = next(iter(results.get("peaks_tflops", {})), None)
    projected = (f"; projected 1M CIFAR images with DPM-Solver++ {cfg.dpm_steps}: "
                 f"{results['cifar_projection_hours']['dpmsolver++'][first_gpu]:.2f} h on one {first_gpu} at "
                 f"{cfg.utilisation:.0%} (DDPM-{cfg.ddpm_steps}: "
                 f"{results['cifar_projection_hours']['ddpm'][first_gpu]:.1f} h)" if first_gpu else "")
    report.finish(f"images/s DDPM-{cfg.ddpm_steps} {rate['ddpm']:.2f}, DDIM-{cfg.ddim_steps} {rate['ddim']:.1f}, "
                  f"DPM-Solver++-{cfg.dpm_steps} {rate['dpmsolver++']:.1f} ({calls['ddpm']:g} / {calls['ddim']:g} / "
                  f"{calls['dpmsolver++']:g} calls per image){projected}")
    return results


def main() -> None:
    run_cli(lambda: run(parse_config(GenerationConfig, prog="python -m benchmarks.generation")))


if __name__ == "__main__":
    main()
