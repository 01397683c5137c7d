"""A 2-process CPU run (gloo) in which one process dies (SIGKILL) or hangs (SIGSTOP) mid-training: the other exits
with one clear error line and exit status 4 within a bounded time instead of waiting forever.

The ranks are started directly (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT, as a cluster scheduler does), without
torch's elastic agent: under ``accelerate launch`` the agent also tears the group down when a process dies, but
nothing but the collective timeout helps when a peer hangs. What happens: a killed peer closes its sockets, so gloo
fails the next collective at once ("Connection reset/closed by peer"); a hung peer keeps them open, so the survivor
waits until ``--collective-timeout`` (the process-group timeout) expires."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainlib.cli import LOST_PROCESS_EXIT_CODE

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 10  # --collective-timeout of the test runs, seconds
OPTIONS = ["--model", "mlp", "--objective", "standard", "--batch-size", "32", "--epoch-size", "32000", "--epochs", "1",
           "--n-val", "32", "--n-test", "32", "--cpu-threads", "1", "--checkpoint-every", "2", "--log-every", "2",
           "--num-processes", "2", "--collective-timeout", str(TIMEOUT)]  # 1,000 steps: far from done


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(out: Path, workdir: Path) -> list[subprocess.Popen]:
    port, ranks = free_port(), []
    for rank in range(2):
        env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "TRAINLIB_DEBUG": "", "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        with open(workdir / f"rank{rank}.stderr", "w") as stderr:  # the child keeps its own copy
            ranks.append(subprocess.Popen(
                [sys.executable, str(ROOT / "train" / "train_classifier.py"), *OPTIONS, "--out", str(out)],
                cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
            ))
    return ranks


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "bound"), [(signal.SIGKILL, 60), (signal.SIGSTOP, TIMEOUT + 50)],
                         ids=["dies", "hang"])
def test_when_one_process_dies_or_hangs_the_other_exits_with_a_clear_error(tmp_path, sig, bound):
    out = tmp_path / "run"
    ranks = start_ranks(out, tmp_path)
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoints" / "step_000002").is_dir():  # both ranks are training
            assert all(rank.poll() is None for rank in ranks), (tmp_path / "rank0.stderr").read_text()[-3000:]
            assert time.monotonic() < deadline, "the run never reached its second step"
            time.sleep(0.02)
        ranks[1].send_signal(sig)
        code = ranks[0].wait(timeout=bound)  # TimeoutExpired: the survivor hangs
    finally:
        for rank in ranks:
            if rank.poll() is None:
                os.killpg(rank.pid, signal.SIGKILL)  # also a stopped one; nothing outlives the test
            rank.wait()
    stderr = (tmp_path / "rank0.stderr").read_text()
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert code == LOST_PROCESS_EXIT_CODE and "Traceback" not in stderr, stderr[-3000:]
    assert len(errors) == 1 and errors[0].startswith("[rank 0] error: lost contact with another process"), errors
    assert not (out / "results.json").exists() and (out / "checkpoints" / "step_000002" / "manifest.json").is_file()


def test_only_transport_failures_of_a_process_group_count_as_lost_contact(monkeypatch, capsys):
    """gloo/NCCL transport errors and torch's DistError family → exit 4, one line; DDP usage errors stay bugs."""
    import torch.distributed as dist

    from trainlib.cli import run_cli

    def fail_with(error):
        def main():
            raise error

        return main

    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error: Connection reset by peer")
    usage = RuntimeError("Expected to have finished reduction in the prior iteration before starting a new one")
    with pytest.raises(RuntimeError, match="Connection reset"):  # no process group: not a collective
        run_cli(fail_with(gloo))
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    for error in (gloo, dist.DistBackendError("NCCL communicator was aborted")):
        with pytest.raises(SystemExit) as exit_info:
            run_cli(fail_with(error))
        err = capsys.readouterr().err
        assert exit_info.value.code == LOST_PROCESS_EXIT_CODE and err.count("\n") == 1
        assert err.startswith("error: lost contact with another process") and "--resume latest" in err
    with pytest.raises(RuntimeError, match="Expected to have finished reduction"):
        run_cli(fail_with(usage))


def test_a_finished_run_destroys_its_process_group(monkeypatch):
    """run_cli ends a run that returned by destroying the default process group (gloo threads alive at interpreter
    exit aborted ~1 in 6 two-process CPU runs after every result was written); an error leaves it to the caller."""
    import torch.distributed as dist
    from accelerate.state import AcceleratorState, PartialState

    from trainlib.cli import run_cli

    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(name, value)

    def main():
        PartialState(cpu=True)  # what Accelerator() does in a launched process: a gloo group
        assert dist.is_initialized()
        return "done"

    AcceleratorState._reset_state(reset_partial_state=True)  # earlier tests may have built a single-process state
    try:
        assert run_cli(main) == "done"
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        AcceleratorState._reset_state(reset_partial_state=True)  # later tests build their own single-process state


@pytest.mark.parametrize("world_size", ["1", "2"])
def test_a_process_of_a_multi_process_run_ends_without_interpreter_finalization(world_size):
    """With WORLD_SIZE > 1, run_cli ends the process by os._exit after flushing stdio, whether the run finished (0)
    or stopped with one of its codes (here 2): finalizing with gloo's threads alive sometimes aborted with SIGABRT
    after the results were written. An atexit handler shows whether finalization ran; in one process it does."""
    code = ("import atexit, sys\nfrom trainlib.cli import checking_input, run_cli\n"
            "atexit.register(print, 'finalized')\n"
            "def finished():\n    print('results written')\n    return 1\n"
            "def bad_input():\n    with checking_input():\n        raise ValueError('eps must be > 0')\n"
            "run_cli(finished if sys.argv[1] == 'finished' else bad_input)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WORLD_SIZE": world_size, "RANK": "1"}
    finalized = world_size == "1"
    result = subprocess.run([sys.executable, "-c", code, "finished"], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and result.stdout.startswith("results written\n")
    assert ("finalized" in result.stdout) == finalized
    result = subprocess.run([sys.executable, "-c", code, "bad_input"], capture_output=True, text=True, env=env)
    prefix = "" if finalized else "[rank 1] "
    assert result.returncode == 2 and result.stderr == f"{prefix}error: eps must be > 0\n"
    assert ("finalized" in result.stdout) == finalized
