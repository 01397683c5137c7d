"""The pieces every training loop shares, written once: accelerator, run directory, resume, checkpoints, logging.

A training module keeps its loop visible (nanoGPT style) and calls these pieces::

    accelerator = create_accelerator(mixed_precision="bf16", gradient_accumulation_steps=1, seed=cfg.seed,
                                     num_processes=cfg.num_processes)
    ...                                              # load data, build model/optimizer: bad input fails here,
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)   # before any file is written
    ema = EMA(model, tau, warmup)                    # from the prepared (device-placed) model
    session = TrainingSession(accelerator, cfg.out, cfg, resume=cfg.resume, total_steps=total,
                              checkpoint_every=cfg.checkpoint_every, keep_last=cfg.keep_last)
    start = session.start(ema)                       # registers ema for checkpointing, THEN loads the checkpoint
    for epoch in range(start.epoch, epochs):
        for batch, (x, y) in enumerate(loader.epoch(epoch, start.batch_for(epoch)), start.batch_for(epoch)):
            with accelerator.accumulate(model):
                loss = ...; accelerator.backward(loss)
                update = True
                if accelerator.sync_gradients:                # the loss and gradient norm of the optimizer step
                    update = session.guard.observe(step + 1, loss, gradient_norm(model))
                if update:
                    optimizer.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                step += 1
                if update:
                    scheduler.step(); ema.update(model)
                session.log_train(step, stats, lr=scheduler.get_last_lr()[0])
                session.maybe_checkpoint(step, epoch, batch + 1)
    session.flush(step)                              # metrics accumulated since the last write
    session.maybe_checkpoint(step, epoch, batch + 1, final=True)
    session.close()

What each piece guarantees:

* ``create_accelerator``: an ``accelerate.Accelerator`` with step-named checkpoints (automatic naming off;
  docs/conventions.md §7), mixed precision "no" | "bf16" | "fp16" on accelerators and plain fp32 on the CPU (a
  requested bf16/fp16 is dropped there with a warning), gradient accumulation,
  ``step_scheduler_with_optimizer=False`` (so a prepared scheduler steps once per call, not once per process: call
  it only when ``accelerator.sync_gradients``), and the seed ``seed + rank`` for Python, NumPy and torch. It refuses
  to start (ValueError on every rank) when the world size it got differs from the ``num_processes`` asked for, or
  from the launcher's ``WORLD_SIZE`` (``accelerate launch --multi_gpu`` without a GPU and without
  ``ACCELERATE_USE_CPU=1`` silently starts independent processes).
* ``TrainingSession``: resolves ``--resume none|latest|PATH`` on the main process and broadcasts it (every rank
  resumes from the same verified checkpoint or raises the same error), refuses a fresh start into a directory that
  already holds a run (before writing anything), creates the ``RunDir`` (main process only), removes temporaries
  left in ``checkpoints/`` by a crash before the first barrier, and hands out the start position. Positions are
  ``(step, epoch, batch_in_epoch)`` of the NEXT batch: with a data path that is a pure function of (seed, epoch,
  batch) (``trainlib.data.BatchLoader``), resuming mid-epoch is starting at ``batch_in_epoch``.
* ``maybe_checkpoint``: on EVERY rank (``save_state`` writes per-rank RNG files and barriers), every
  ``checkpoint_every`` optimizer steps and at the end, named ``checkpoints/step_NNNNNN``, keeping ``keep_last``.
* ``log_train``: accumulates detached metric tensors on the device every step (no host sync), and every ``log_every``
  steps averages them over steps and processes (one collective, on every rank), moves them to the host once and
  writes ``train/<name>`` records to metrics.jsonl and TensorBoard on the main process. ``log`` writes other
  metrics (main process only, no collective). The tqdm progress bar lives on the main process only.
* ``session.guard`` (``NonFiniteGuard``): watches the loss and gradient norm of every optimizer step. Mode "stop"
  (default) keeps the first non-finite step in a device tensor (no host sync in the step); the session checks it,
  on every rank, before it writes metrics or a checkpoint (and ``check_finite()`` before any other write), and
  raises ``NonFiniteError`` naming the step and the quantity (exit status 3 through ``run_cli``). Nothing is
  written after a bad step, so the newest checkpoint is the last good state. Mode "skip" decides on the host every
  step (one device-to-host sync per step, plus one all-reduce of a flag with several processes) and the loop skips
  the optimizer, scheduler and EMA updates of a bad step; skipped steps are counted, logged and checkpointed.

Nothing here knows about classifiers, score networks or losses.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .checkpoint import CheckpointMeta, load_checkpoint, read_meta, resolve_resume, save_step_checkpoint
from .config import NONFINITE_EXIT_CODE, RunFault, config_hash
from .files import cleanup_temporaries
from .rundir import RunDir

MIXED_PRECISION = ("no", "bf16", "fp16")
NONFINITE_MODES = ("stop", "skip")
DEFAULT_COLLECTIVE_TIMEOUT = 1800.0  # seconds; torch's own default for gloo (NCCL: 600)


# -- accelerator ------------------------------------------------------------------------------------------------
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


def check_collective_timeout(seconds: float) -> None:
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"collective_timeout must be a positive number of seconds, got {seconds}")


def process_group_kwargs(collective_timeout: float):
    """accelerate's ``InitProcessGroupKwargs`` with the collective timeout (gloo and NCCL honour it)."""
    from accelerate.utils import InitProcessGroupKwargs

    return InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=collective_timeout))


def rank_generator(seed: int, *stream: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator that is a pure function of (seed, *stream), e.g. (seed, step, rank): resumes exactly."""
    import numpy as np

    state = np.random.SeedSequence([seed, *stream]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state) & ((1 << 63) - 1))


def one_cycle_cosine(optimizer, total_steps: int, warmup_fraction: float = 0.025, cycle_momentum: bool = True):
    """PyTorch's ``OneCycleLR`` stepped once per optimizer step, with its defaults (as the public SCORE code).

    lr rises from lr_max/25 to lr_max over the first ``warmup_fraction`` of steps (cosine), then falls (cosine) to
    lr_max/(25·10⁴); with ``cycle_momentum`` the SGD momentum goes 0.95 → 0.85 → 0.95 in antiphase. lr_max is each
    parameter group's ``lr``.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 < warmup_fraction < 1:
        raise ValueError(f"warmup_fraction must be in (0, 1), got {warmup_fraction}")
    max_lr = [group["lr"] for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=max_lr, total_steps=total_steps, pct_start=warmup_fraction, anneal_strategy="cos",
        cycle_momentum=cycle_momentum,
    )  # fmt: skip


# -- non-finite steps -------------------------------------------------------------------------------------------
class NonFiniteError(RunFault):
    """Training met a NaN/inf loss or gradient norm (``run_cli``: one line, exit status 3)."""

    exit_code = NONFINITE_EXIT_CODE


_NONE = torch.iinfo(torch.int64).max  # "no bad step yet"
_SKIPPED_KEY = "nonfinite_skipped"  # CheckpointMeta.extra: steps skipped so far (mode "skip")
_METRICS_SIZE_KEY = "metrics_bytes"  # CheckpointMeta.extra: size of metrics.jsonl when the checkpoint was saved
_WHAT = {1: "loss", 2: "gradient norm", 3: "loss and gradient norm"}


def check_nonfinite_mode(mode: str) -> None:
    if mode not in NONFINITE_MODES:
        raise ValueError(f"unknown non-finite mode {mode!r}; valid: {', '.join(NONFINITE_MODES)}")


def gradient_norm(model: torch.nn.Module) -> Tensor:
    """The global ℓ2 norm of the parameter gradients, as a device tensor (foreach kernels, no host sync)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())


class NonFiniteGuard:
    """Watches each optimizer step's loss and gradient norm for NaN/inf (module docstring: modes "stop" and "skip").

    The state of mode "stop" is one int64 device tensor, 4·step + kind of the first bad step (kind 1: loss,
    2: gradient norm, 3: both), updated by a few scalar kernels per step; ``check`` moves it to the host.
    """

    def __init__(self, accelerator, mode: str = "stop", log=None):
        check_nonfinite_mode(mode)
        self.accelerator, self.mode, self.log = accelerator, mode, log or print
        self.first_bad = torch.full((), _NONE, dtype=torch.int64, device=accelerator.device)
        self.skipped = 0  # steps skipped so far (mode "skip"; checkpointed)

    def _kind(self, loss: Tensor, grad_norm: Tensor | None) -> Tensor:
        kind = (~torch.isfinite(loss.detach()).all()).long()
        if grad_norm is not None:
            kind = kind + 2 * (~torch.isfinite(grad_norm.detach())).long()
        return kind

    def observe(self, step: int, loss: Tensor, grad_norm: Tensor | None = None) -> bool:
        """Record optimizer step ``step`` (1-based); returns whether to apply its update (always True for "stop").

        ``grad_norm``: the global gradient norm, or None where a grad scaler owns overflow (fp16) or none is taken.
        """
        kind = self._kind(loss, grad_norm)
        if self.mode == "stop":
            code = torch.where(kind > 0, 4 * step + kind, _NONE)
            torch.minimum(self.first_bad, code, out=self.first_bad)
            return True
        if self.accelerator.num_processes > 1:
            kind = self.accelerator.reduce(kind, reduction="max")  # every rank skips the same steps
        bad = int(kind.item())  # the one host sync per step of mode "skip"
        if bad:
            self.skipped += 1
            if self.accelerator.is_main_process:
                self.log(f"skipped step {step}: non-finite {_WHAT.get(bad, 'loss or gradient norm')} "
                         f"({self.skipped} skipped so far)")  # fmt: skip
        return not bad

    def check(self, last_checkpoint: Path | None = None) -> None:
        """Raise ``NonFiniteError`` (on every rank: a collective) if a step of mode "stop" was non-finite."""
        if self.mode != "stop":
            return
        code = self.first_bad
        if self.accelerator.num_processes > 1:
            code = -self.accelerator.reduce(-code, reduction="max")  # the earliest bad step over the ranks
        code = int(code.item())
        if code == _NONE:
            return
        step, kind = divmod(code, 4)
        kept = f"the newest checkpoint ({last_checkpoint.name})" if last_checkpoint else "no checkpoint was saved; it"
        raise NonFiniteError(
            f"non-finite {_WHAT[kind]} at step {step}; stopped before writing anything after it: {kept} is the last "
            "good state; resume it with --resume latest (e.g. with a lower --lr) or skip such steps with "
            "--nonfinite skip"
        )


# -- the session ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StartPosition:
    """Where training (re)starts: ``step`` optimizer steps done; the next batch is ``batch_in_epoch`` of ``epoch``."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    checkpoint: Path | None = None  # the checkpoint it was restored from (None: fresh start)
    extra: dict = dataclasses.field(default_factory=dict)  # the caller's CheckpointMeta.extra of that checkpoint

    def batch_for(self, epoch: int) -> int:
        """The first batch to run in ``epoch``: ``batch_in_epoch`` in the resumed epoch, 0 in later ones."""
        return self.batch_in_epoch if epoch == self.epoch else 0


class TrainingSession:
    """Run directory, resume, checkpoints and logging for one training run (module docstring).

    accelerator: from ``create_accelerator``. out_dir: the run directory. config: the run's config dataclass (saved
    in config.json; its hash is stored in every checkpoint). resume: "none", "latest" (newest verified checkpoint of
    ``out_dir``, or a fresh start if there is none) or a checkpoint folder. total_steps: optimizer steps of the whole
    run (progress bar). checkpoint_every: save every N optimizer steps (0: only the final one). keep_last: keep the
    newest N step checkpoints (None: all). log_every: average and write training metrics every N steps.
    """

    def __init__(
        self,
        accelerator,
        out_dir: str | os.PathLike,
        config: Any,
        *,
        resume: str = "none",
        total_steps: int,
        checkpoint_every: int = 0,
        keep_last: int | None = None,
        log_every: int = 50,
        description: str = "train",
        nonfinite: str = "stop",
    ):
        if checkpoint_every < 0 or log_every < 1 or (keep_last is not None and keep_last < 1):
            raise ValueError(
                f"need checkpoint_every >= 0, log_every >= 1 and keep_last >= 1 or None; got {checkpoint_every}, "
                f"{log_every}, {keep_last}"
            )
        check_nonfinite_mode(nonfinite)
        self.accelerator = accelerator
        self.config = config
        self.total_steps, self.checkpoint_every, self.keep_last = int(total_steps), checkpoint_every, keep_last
        self.log_every = log_every
        out_dir = Path(out_dir)
        if resume == "none" and (out_dir / "config.json").exists():  # checked on every rank: all raise together
            raise ValueError(
                f"run directory {out_dir} already holds a run; resume it (--resume latest) or choose another "
                "output directory"
            )
        self._checkpoint = resolve_resume(resume, out_dir, accelerator)
        self.run = RunDir(
            out_dir, config, is_main_process=accelerator.is_main_process, world_size=accelerator.num_processes,
            resume=resume != "none",
        )  # fmt: skip
        if accelerator.is_main_process:
            for path in cleanup_temporaries(self.run.checkpoints_dir):
                self.run.log(f"removed temporary {path.name} left by an interrupted save")
            if resume != "none":
                self._rewind_metrics()
        accelerator.wait_for_everyone()
        self.guard = NonFiniteGuard(accelerator, nonfinite, log=self.run.log)
        self._sums: dict[str, Tensor] = {}
        self._count = 0
        self._last_saved = -1
        self._last_checkpoint: Path | None = None
        self._progress = None
        self._description = description
        self._tick = time.perf_counter()

    # -- start / resume -------------------------------------------------------------------------------------
    def _rewind_metrics(self) -> None:
        """Cut metrics.jsonl back to the resumed checkpoint: the resumed run writes the rest again."""
        if self._checkpoint is None:
            size, step = 0, 0  # nothing to resume: every record is rewritten from step 0
        else:
            meta = read_meta(self._checkpoint)
            if _METRICS_SIZE_KEY not in meta.extra:
                return  # a checkpoint from before this was recorded: keep every record
            size, step = int(meta.extra[_METRICS_SIZE_KEY]), meta.step
        try:
            dropped = self.run.rewind_metrics(size)
        except ValueError as error:  # metrics.jsonl was edited by hand: keep it, the resumed run appends
            self.run.log(f"note: kept metrics.jsonl as it is ({error})")
            return
        if dropped:
            self.run.log(f"removed {dropped} metrics record(s) written after step {step}; the resumed run writes them "
                         "again")  # fmt: skip

    def start(self, *stateful: Any) -> StartPosition:
        """Register extra state (e.g. the EMA) for checkpointing, then restore the resolved checkpoint, if any.

        Everything passed to ``accelerator.prepare`` (model, optimizer, scheduler) is saved and restored already;
        ``stateful`` objects need ``state_dict``/``load_state_dict``. Call once, on every rank, after ``prepare``.
        """
        for obj in stateful:
            self.accelerator.register_for_checkpointing(obj)
        position = StartPosition()
        if self._checkpoint is not None:
            meta = load_checkpoint(self.accelerator, self._checkpoint)
            if meta.config_hash and meta.config_hash != config_hash(self.config):
                self.run.log(f"note: {self._checkpoint.name} was written with different options (see config.json)")
            extra = {key: value for key, value in meta.extra.items() if key not in (_SKIPPED_KEY, _METRICS_SIZE_KEY)}
            position = StartPosition(meta.step, meta.epoch, meta.batch_in_epoch, self._checkpoint, extra)
            self._last_saved, self._last_checkpoint = meta.step, self._checkpoint
            self.guard.skipped = int(meta.extra.get(_SKIPPED_KEY, 0))
            self.run.log(f"resumed from {self._checkpoint} at step {meta.step} (epoch {meta.epoch}, "
                         f"batch {meta.batch_in_epoch})")  # fmt: skip
        if self.accelerator.is_main_process:
            from tqdm.auto import tqdm

            self._progress = tqdm(total=self.total_steps, initial=position.step, desc=self._description,
                                  dynamic_ncols=True)  # fmt: skip
        return position

    # -- checkpoints ----------------------------------------------------------------------------------------
    def maybe_checkpoint(
        self, step: int, epoch: int, batch_in_epoch: int, *, final: bool = False, extra: Mapping | None = None
    ) -> Path | None:
        """Save ``checkpoints/step_<step>`` if ``step`` is a multiple of ``checkpoint_every`` or ``final`` (every rank).

        (epoch, batch_in_epoch) is the position of the NEXT batch. A step already saved is not saved again. Raises
        ``NonFiniteError`` instead of saving when a step since the last check was non-finite.
        """
        due = final or (self.checkpoint_every > 0 and step % self.checkpoint_every == 0)
        if not due:
            return None
        self.check_finite()
        if step == self._last_saved:
            return None
        extra = dict(extra or {}) | ({_SKIPPED_KEY: self.guard.skipped} if self.guard.mode == "skip" else {})
        extra[_METRICS_SIZE_KEY] = self.run.metrics_size()  # what a resume from here rewinds metrics.jsonl to
        meta = CheckpointMeta(step, epoch, batch_in_epoch, config_hash(self.config), extra=extra)
        path = save_step_checkpoint(self.accelerator, self.run.checkpoints_dir, meta, self.keep_last)
        self._last_saved, self._last_checkpoint = step, path
        self.run.log(f"saved checkpoint {path.name}")
        return path

    # -- logging --------------------------------------------------------------------------------------------
    def log_train(
        self, step: int, stats: Mapping[str, Tensor], *, force: bool = False, skipped: bool = False, **scalars: float
    ) -> None:
        """Accumulate per-step metric tensors; every ``log_every`` steps (or ``force``) write their mean (every rank).

        ``stats``: detached scalar tensors (same names every step); ``scalars``: host floats such as the learning
        rate, logged as they are at the writing step. Also advances the progress bar by one step. ``skipped``: a step
        skipped by ``--nonfinite skip``, left out of the means (its values are not finite).
        """
        if not skipped:
            for name, value in stats.items():
                value = value.detach().float()
                self._sums[name] = self._sums[name] + value if name in self._sums else value.clone()
            self._count += 1
        if self._progress is not None:
            self._progress.update(1)
        if self._count and (force or step % self.log_every == 0):
            self._flush(step, scalars)

    def check_finite(self) -> None:
        """Raise ``NonFiniteError`` if a step so far was non-finite (mode "stop"; every rank: call before writing)."""
        self.guard.check(self._last_checkpoint)

    def _flush(self, step: int, scalars: Mapping[str, float]) -> None:
        self.check_finite()
        names = sorted(self._sums)
        means = torch.stack([self._sums[name] for name in names]) / self._count if names else None
        if means is not None and self.accelerator.num_processes > 1:
            means = self.accelerator.reduce(means, reduction="mean")  # collective: every rank gets here
        values = dict(zip(names, means.tolist(), strict=True)) if means is not None else {}
        now = time.perf_counter()
        record = {f"train/{name}": value for name, value in values.items()}
        record |= {f"train/{name}": value for name, value in scalars.items()}
        record["train/steps_per_second"] = self._count / max(now - self._tick, 1e-9)
        if self.guard.mode == "skip":
            record["train/skipped_steps"] = self.guard.skipped
        self.run.log_metrics(record, step)
        if self._progress is not None:
            shown = {name: f"{value:.4g}" for name, value in list(values.items())[:4] if math.isfinite(value)}
            self._progress.set_postfix(shown, refresh=False)
        self._sums, self._count, self._tick = {}, 0, now

    def flush(self, step: int, **scalars: float) -> None:
        """Write the metrics accumulated since the last write, if any (every rank; call at the end of training)."""
        if self._count:
            self._flush(step, scalars)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Write metrics (e.g. validation results) as they are (main process only; no collective)."""
        self.run.log_metrics(metrics, step)

    def print(self, message: str) -> None:
        """A line on the console (tqdm-safe) and in log.txt, from the main process only."""
        self.run.log(message)

    # -- end ------------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the progress bar and TensorBoard writer; wait for every rank."""
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        self.run.close()
        self.accelerator.wait_for_everyone()

    def __enter__(self) -> TrainingSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
