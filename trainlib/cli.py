"""Running an entry point: what stops a run becomes one ``error:`` line on stderr and an exit status.

``run_cli(main)`` wraps an entry point and maps what stops a run to one ``error:`` line on stderr and an exit
status a job scheduler can act on (set TRAINLIB_DEBUG=1 to see tracebacks always):

    2  bad input: an ``InputError``, raised only while an entry point validates its options and loads its inputs,
       before it writes anything (``checking_input()`` turns the ValueError / FileNotFoundError of that phase into
       one); argparse's own usage errors and invalid recipes too
    3  a non-finite loss or gradient stopped training (``RunFault`` from ``trainlib.nonfinite``); the newest
       checkpoint is the last good state: resume it (e.g. with a lower learning rate) or use ``--nonfinite skip``
    4  lost contact with another process: a collective (barrier, all-reduce, DDP's gradient sync) failed because a
       peer died, or timed out after the run's ``--collective-timeout`` because a peer hung; ``--resume latest``
       continues from the last checkpoint

Every other exception keeps its traceback and its own exit status: a ValueError raised in the middle of a run (after
files were written) is a failure, not bad input.

A process of a multi-process run (``WORLD_SIZE`` > 1) that finishes or stops with one of these codes ends without
interpreter finalization (stdio flushed, then ``os._exit``): finalizing with gloo's threads alive aborts now and then
("terminate called without an active exception", SIGABRT), even after the process group is destroyed, and that
would replace the status. Every file a run writes is flushed and closed by then.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import NoReturn, TypeVar

T = TypeVar("T")

INPUT_ERROR_EXIT_CODE = 2
NONFINITE_EXIT_CODE = 3
LOST_PROCESS_EXIT_CODE = 4


def fail(message: str) -> NoReturn:
    """Print ``error: <message>`` on stderr and exit with status 2 (bad input)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(INPUT_ERROR_EXIT_CODE)


class InputError(ValueError):
    """Bad input (an invalid option, a missing or unusable file, data that do not fit), found before anything was
    written: ``run_cli`` prints its message as one line and exits with status 2."""


@contextlib.contextmanager
def checking_input() -> Iterator[None]:
    """The input-checking phase of an entry point (validate options, load data and models, everything before the
    first write): a ValueError or FileNotFoundError raised inside is bad input and leaves as an ``InputError``
    (the original chained). Keep writes out of this block."""
    try:
        yield
    except InputError:
        raise
    except (ValueError, FileNotFoundError) as error:
        raise InputError(str(error)) from error


class RunFault(RuntimeError):
    """A fault a run detected and stopped on, not bad input: ``run_cli`` prints one line and exits ``exit_code``."""

    exit_code = NONFINITE_EXIT_CODE


def _collective_failure(error: BaseException) -> bool:
    """Whether ``error`` is a failed or timed-out collective of an initialised process group: torch's
    ``DistError`` family, or a RuntimeError from the gloo / NCCL transport (a lost connection, a timeout). Usage
    errors raised by DDP itself (e.g. unused parameters) are bugs and keep their traceback."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return False
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    return isinstance(error, RuntimeError) and any(word in str(error) for word in ("gloo", "NCCL"))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _close_progress_bars() -> None:
    """End open tqdm bars with their newline, so an error printed next starts a line of its own."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


def _end_distributed() -> None:
    """Destroy the default process group after a finished run (accelerate's ``PartialState.destroy_process_group``).

    Left alive, gloo's threads can outlive the interpreter: ~1 in 6 two-process CPU runs aborted at exit with
    "terminate called without an active exception" after writing every result. Destroying it made that rare, not
    impossible, so such a process then also ends without finalization (module docstring). A no-op in one process.
    """
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from accelerate.state import PartialState

        PartialState().destroy_process_group()


def _multi_process() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _end_process(code: int) -> NoReturn:
    """Exit with ``code``; in a multi-process run without interpreter finalization (module docstring)."""
    if not _multi_process():
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _exit_with(message: str, code: int) -> NoReturn:
    _close_progress_bars()
    prefix = f"[rank {os.environ.get('RANK', '0')}] " if _multi_process() else ""
    print(f"{prefix}error: {message}", file=sys.stderr, flush=True)
    _end_process(code)


def run_cli(main: Callable[[], T]) -> T:
    """Run an entry point; what stops it becomes one ``error:`` line and the exit status of the module docstring.

    Bad input is an ``InputError`` (``checking_input``); every other exception propagates with its traceback. In a
    single process it returns what ``main`` returns; a process of a multi-process run exits 0 instead.
    """
    debug = bool(os.environ.get("TRAINLIB_DEBUG"))
    try:
        result = main()
        _end_distributed()
        if _multi_process():
            _end_process(0)
        return result
    except InputError as e:
        if debug:
            raise
        _exit_with(str(e), INPUT_ERROR_EXIT_CODE)
    except RunFault as e:
        if debug:
            raise
        _exit_with(str(e), e.exit_code)
    except RuntimeError as e:
        if debug or not _collective_failure(e):
            raise
        _exit_with(f"lost contact with another process: a collective operation failed ({_first_line(e)}); a process "
                   "died or hung (the wait is bounded by --collective-timeout); continue with --resume latest",
                   LOST_PROCESS_EXIT_CODE)
