"""The accelerator every training run uses: devices, precision, process groups, seeds, world-size checks.

``create_accelerator`` returns an ``accelerate.Accelerator`` with step-named checkpoints (automatic naming off, as
resume requires: docs/conventions.md §7), mixed precision "no" | "bf16" | "fp16" on accelerators and plain fp32 on
the CPU (a requested bf16/fp16 is dropped there with a warning), gradient accumulation,
``step_scheduler_with_optimizer=False`` (so a prepared scheduler steps once per call, not once per process: call it
only when ``accelerator.sync_gradients``), a collective timeout, and the seed ``seed + rank`` for Python, NumPy and
torch. It refuses to start (ValueError on every rank) when the world size it got differs from the ``num_processes``
asked for, or from the launcher's ``WORLD_SIZE`` (``accelerate launch --multi_gpu`` without a GPU and without
``ACCELERATE_USE_CPU=1`` silently starts independent processes).
"""

from __future__ import annotations

import datetime
import math
import os
import warnings

import torch

MIXED_PRECISION = ("no", "bf16", "fp16")
DEFAULT_COLLECTIVE_TIMEOUT = 1800.0  # seconds; torch's own default for gloo (NCCL: 600)


def _on_cpu(cpu: bool) -> bool:
    from accelerate.utils import parse_flag_from_env

    return cpu or parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()


def check_world_size(accelerator, num_processes: int | None = None) -> None:
    """Raise ValueError unless the accelerator's world size is what was asked for and what the launcher set up."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    got = accelerator.num_processes
    if launched != got:
        raise ValueError(
            f"the launcher started {launched} processes (WORLD_SIZE) but they did not join one process group "
            f"(world size {got}); on a CPU-only machine launch with ACCELERATE_USE_CPU=1 accelerate launch "
            "--multi_gpu --num_processes N --main_process_port 0 ..."
        )
    if num_processes is not None and got != num_processes:
        raise ValueError(
            f"asked for {num_processes} process(es) (--num-processes) but the run has world size {got}; launch with "
            f"`accelerate launch --num_processes {num_processes} ...` or change --num-processes"
        )


def create_accelerator(
    *,
    mixed_precision: str = "no",
    gradient_accumulation_steps: int = 1,
    seed: int = 0,
    num_processes: int | None = None,
    cpu: bool = False,
    cpu_threads: int | None = None,
    collective_timeout: float = DEFAULT_COLLECTIVE_TIMEOUT,
):
    """An ``Accelerator`` set up as described in the module docstring (guards the world size, seeds seed + rank).

    ``cpu_threads``: torch intra-op threads per process when running on the CPU (None: torch's default). Small
    models gain little from threads, and threads oversubscribing the cores (several processes, a busy machine)
    can make them many times slower. ``collective_timeout``: seconds a process waits in a collective for the others
    before the run fails (exit status 4 through ``run_cli``), so a hung peer cannot stall the rest forever, with or
    without a launcher agent watching (a peer that dies is noticed at once by the broken connection). It must
    cover the longest single-process phase a barrier waits for (dataset download, hashing a checkpoint).
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"unknown mixed precision {mixed_precision!r}; valid: {', '.join(MIXED_PRECISION)}")
    if gradient_accumulation_steps < 1:
        raise ValueError(f"gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps}")
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if cpu_threads is not None and cpu_threads < 1:
        raise ValueError(f"cpu_threads must be >= 1, got {cpu_threads}")
    check_collective_timeout(collective_timeout)
    if mixed_precision != "no" and _on_cpu(cpu):
        warnings.warn(f"mixed precision {mixed_precision!r} is not used on the CPU; training in fp32", stacklevel=2)
        mixed_precision = "no"
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        step_scheduler_with_optimizer=False,
        project_config=ProjectConfiguration(automatic_checkpoint_naming=False),
        kwargs_handlers=[process_group_kwargs(collective_timeout)],
    )
    check_world_size(accelerator, num_processes)
    if cpu_threads is not None and accelerator.device.type == "cpu":
        torch.set_num_threads(cpu_threads)
    set_seed(seed, device_specific=True)  # seed + process index
    return accelerator


def cores_per_process() -> int:
    """The CPU cores this process may use, shared evenly among the launcher's processes on this machine
    (``LOCAL_WORLD_SIZE``, 1 without a launcher): a thread count for work started inside a launched process, where
    torch's default is what the launcher pinned (``accelerate launch`` on a CPU sets OMP_NUM_THREADS=1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def check_collective_timeout(seconds: float) -> None:
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"collective_timeout must be a positive number of seconds, got {seconds}")


def process_group_kwargs(collective_timeout: float):
    """accelerate's ``InitProcessGroupKwargs`` with the collective timeout (gloo and NCCL honour it)."""
    from accelerate.utils import InitProcessGroupKwargs

    return InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=collective_timeout))
