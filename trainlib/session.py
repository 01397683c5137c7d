"""The training session: run directory, resume, checkpoints, logging and the non-finite guard of one run.

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

* ``TrainingSession``: resolves ``--resume none|latest|PATH`` on the main process and broadcasts it (every rank
  resumes from the same verified checkpoint or raises the same error), refuses a fresh start into a directory that
  already holds a run (before writing anything), creates the ``RunDir`` (main process only), removes temporaries
  left in ``checkpoints/`` by a crash before the first barrier, and hands out the start position. Positions are
  ``(step, epoch, batch_in_epoch)`` of the NEXT batch: with a data path that is a pure function of (seed, epoch,
  batch) (``trainlib.sampling.BatchLoader``), resuming mid-epoch is starting at ``batch_in_epoch``.
* ``maybe_checkpoint``: on EVERY rank (``save_state`` writes per-rank RNG files and barriers), every
  ``checkpoint_every`` optimizer steps and at the end, named ``checkpoints/step_NNNNNN``, keeping ``keep_last``.
* ``log_train``: accumulates detached metric tensors on the device every step (no host sync), and every ``log_every``
  steps averages them over steps and processes (one collective, on every rank), moves them to the host once and
  writes ``train/<name>`` records to metrics.jsonl and TensorBoard on the main process. ``log`` writes other
  metrics (main process only, no collective). The tqdm progress bar lives on the main process only.
* ``session.guard``: a ``trainlib.nonfinite.NonFiniteGuard`` watching every optimizer step (its module docstring).

Nothing here knows about classifiers, score networks or losses; ``trainlib.accelerator`` makes the accelerator.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from .accelerator import DEFAULT_COLLECTIVE_TIMEOUT, check_collective_timeout, create_accelerator
from .checkpoint import CheckpointMeta, load_checkpoint, read_meta, resolve_resume, save_step_checkpoint
from .config import Options, config_hash, option
from .files import cleanup_temporaries
from .nonfinite import NonFiniteGuard, check_nonfinite_mode
from .rundir import RunDir, check_fresh_start


@dataclasses.dataclass
class EngineOptions(Options):
    """The options every training run has: accelerator and processes, run directory, checkpoints, logging."""

    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = option(
        "autocast dtype on GPUs (auto: bf16 where supported; always fp32 on the CPU)", "auto")
    grad_accumulation: int = option("micro-batches per optimizer step", 1, ge=1)
    num_processes: int | None = option("refuse to start unless the world size is this", None, ge=1)
    cpu_threads: int | None = option("torch threads per process on the CPU (none: torch's default)", None, ge=1)
    collective_timeout: float = option("seconds a process waits for the others in a collective before failing",
                                       DEFAULT_COLLECTIVE_TIMEOUT, gt=0)
    nonfinite: Literal["stop", "skip"] = option(
        "NaN/inf loss or gradient: stop (exit 3, newest checkpoint = last good) or skip the update (syncs each step)",
        "stop")
    seed: int = option("seed of initialisation, data order, noise and attacks", 0)
    out: str = option("run directory", "runs/run")
    resume: str = option("none | latest | PATH of a checkpoint folder", "none")
    checkpoint_every: int = option("save a checkpoint every N optimizer steps (0: at the end only)", 500, ge=0)
    keep_last: int = option("step checkpoints to keep", 2, ge=1)
    log_every: int = option("average and log training metrics every N steps", 50, ge=1)

    def validate(self) -> None:
        super().validate()
        check_collective_timeout(self.collective_timeout)

    def micro_batch(self, batch_size: int, world_size: int = 1) -> int:
        """The per-process micro-batch of a global ``batch_size``; ValueError when it does not divide evenly."""
        if batch_size % self.grad_accumulation:
            raise ValueError(f"batch_size {batch_size} must be divisible by grad_accumulation {self.grad_accumulation}")
        micro = batch_size // self.grad_accumulation
        if micro % world_size:
            raise ValueError(f"batch_size / grad_accumulation = {micro} must be divisible by {world_size} processes")
        return micro

    def accelerator(self):
        """The run's ``Accelerator`` (``trainlib.accelerator.create_accelerator`` with these options)."""
        return create_accelerator(
            mixed_precision=resolve_mixed_precision(self.mixed_precision),
            gradient_accumulation_steps=self.grad_accumulation, seed=self.seed, num_processes=self.num_processes,
            cpu_threads=self.cpu_threads, collective_timeout=self.collective_timeout)

    def session(self, accelerator, total_steps: int, description: str) -> TrainingSession:
        """The run's ``TrainingSession`` (resume, checkpoints, logging as these options say)."""
        return TrainingSession(accelerator, self.out, self, resume=self.resume, total_steps=total_steps,
                               checkpoint_every=self.checkpoint_every, keep_last=self.keep_last,
                               log_every=self.log_every, description=description, nonfinite=self.nonfinite)


def resolve_mixed_precision(mixed_precision: str) -> str:
    """Mixed precision "auto" → "bf16" on a CUDA GPU that supports it, else "no" (fp32); other values pass through."""
    if mixed_precision != "auto":
        return mixed_precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


_SKIPPED_KEY = "nonfinite_skipped"  # CheckpointMeta.extra: steps skipped so far (mode "skip")
_METRICS_SIZE_KEY = "metrics_bytes"  # CheckpointMeta.extra: size of metrics.jsonl when the checkpoint was saved


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
        check_fresh_start(out_dir, resume != "none")  # on every rank: all raise together, before anything is written
        self._checkpoint = resolve_resume(resume, out_dir, accelerator)
        self.run = RunDir(
            out_dir, config, is_main_process=accelerator.is_main_process, world_size=accelerator.num_processes,
            resume=resume != "none",
        )
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
                         "again")

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
                         f"batch {meta.batch_in_epoch})")
        if self.accelerator.is_main_process:
            from tqdm.auto import tqdm

            self._progress = tqdm(total=self.total_steps, initial=position.step, desc=self._description,
                                  dynamic_ncols=True)
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
