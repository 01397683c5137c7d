"""What every benchmark shares: the alternating timer, medians, tables, the machine/load record, FLOP and host-sync
counters, memory readings, GPU peak throughputs and the report that prints its headline last.

Timing. ``alternate({"A": a, "B": b}, repeats)`` interleaves the runs (after ``warmup`` untimed rounds), each round
starting one run later (A B, B A, A B, …) so that none is always first, and returns every duration. Benchmarks
report medians, and ratios as the median of per-round ratios (``ratio``): the runs of one round are adjacent in
time, so a colleague's job starting halfway through slows both sides of a ratio alike. On CUDA each run is
bracketed by ``torch.cuda.synchronize()``.

Host syncs. :class:`SyncCounter` counts, on any device (the CPU included), the operations that block the host until
an accelerator has finished: reading a value (``item``/``bool``/``float``/``int``, ``tolist``, ``numpy``, ``cpu``),
``torch.equal``, and ops whose output size depends on data (``nonzero``, boolean-mask indexing, ``unique``,
``masked_select``, ``repeat_interleave`` without ``output_size``). On the CPU these cost nothing, so the counter, not
a clock, is how a CPU machine checks that a training step is sync-free.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from trainlib.config import config_to_dict, option
from trainlib.files import atomic_write_json


@dataclass
class BenchConfig:
    """Options every benchmark has (each benchmark's config adds its own and may change these defaults)."""

    repeats: int = option("timed rounds of the alternation A B A B ... (medians are reported)", 5)
    warmup: int = option("untimed rounds before the timed ones", 1)
    threads: int = option("torch intra-op threads on the CPU (1: on a shared machine, OpenMP threads waiting for a "
                          "busy core made WRN-28-10 5x slower with 2 than with 1)", 1)
    device: str = option("auto | cpu | cuda", "auto")
    json: str | None = option("also write the results as JSON to this file", None)

    def validate(self) -> None:
        for name in ("repeats", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but no CUDA device is available")


def setup(cfg: BenchConfig) -> torch.device:
    """Set the thread count and pick the device (auto: CUDA when available)."""
    torch.set_num_threads(cfg.threads)
    name = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else cfg.device
    return torch.device("cpu" if name == "auto" else name)


# -- timing ---------------------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CPU = torch.device("cpu")


def timed(fn: Callable[[], Any], device: torch.device = CPU) -> float:
    """Wall seconds of one call of ``fn`` (device work included)."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def alternate(
    runs: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 1, device: torch.device = CPU,
    progress: bool = True,
) -> dict[str, list[float]]:
    """Seconds of each run in each timed round, the runs interleaved A B A B … (``warmup`` untimed rounds first).

    Round r starts at run r mod n (A B C, B C A, C A B, …), so no run always goes first or last in its round.
    """
    from tqdm.auto import tqdm

    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for round_ in tqdm(range(warmup + repeats), desc="rounds", leave=False, disable=not progress):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            seconds = timed(runs[name], device)
            if round_ >= warmup:
                times[name].append(seconds)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median over rounds of the per-round ratio a_i / b_i: the two runs of a round are adjacent in time, so a load
    change between rounds cancels (the figure every "÷" column and headline reports)."""
    return median([a / b for a, b in zip(numerator, denominator, strict=True)])


def spread(values: Sequence[float]) -> str:
    """min–max of the timed rounds, for the tables."""
    return f"{min(values):.3g}–{max(values):.3g}"


# -- counting -------------------------------------------------------------------------------------------------------
class FlopCounter(TorchDispatchMode):
    """FLOPs (2 per multiply-add) of the matmuls, convolutions and attention ops run inside the block, forward and
    backward, by the formulas of ``torch.utils.flop_counter`` (elementwise ops are not counted). Unlike
    ``FlopCounterMode`` it tracks no modules, so it works with ``torch.autograd.grad`` on inputs (attacks)."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += int(formula(*args, **kwargs, out_val=out))
        return out


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` (see :class:`FlopCounter`)."""
    with FlopCounter() as counter:
        fn()
    return counter.total


_SYNC_OPS = {
    "aten._local_scalar_dense",  # item(), bool(), float(), int()
    "aten.is_nonzero",
    "aten.equal",
    "aten.nonzero",
    "aten.masked_select",
    "aten._unique",
    "aten._unique2",
    "aten.unique_dim",
    "aten.unique_consecutive",
}


def _overload_name(func) -> str:
    return f"{func.namespace}.{func._opname}"


class SyncCounter(TorchDispatchMode):
    """Counts host-device synchronisations (module docstring) inside a ``with`` block; ``counts`` names them.

    Ops are seen at the dispatcher; ``tolist``, ``numpy`` and ``cpu``, which bypass it on CPU tensors, are counted by
    wrapping the Tensor methods while the block runs.
    """

    _METHODS = ("tolist", "numpy", "cpu")

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()
        self._saved: dict[str, Any] = {}

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _overload_name(func)
        if name in _SYNC_OPS:
            self.counts[name] += 1
        elif name in ("aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ()):
                self.counts[f"{name} (boolean mask)"] += 1
        elif name == "aten.repeat_interleave" and kwargs.get("output_size") is None and len(args) < 3:
            self.counts[name] += 1
        return func(*args, **kwargs)

    def __enter__(self):
        for method in self._METHODS:
            original = getattr(torch.Tensor, method)
            self._saved[method] = original

            def counted(tensor, *args, _original=original, _method=method, **kwargs):
                self.counts[f"Tensor.{_method}"] += 1
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, method, counted)
        return super().__enter__()

    def __exit__(self, *exc_info):
        for method, original in self._saved.items():
            setattr(torch.Tensor, method, original)
        self._saved.clear()
        return super().__exit__(*exc_info)


# -- memory ---------------------------------------------------------------------------------------------------------
MEMORY_FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem")


def memory_status() -> dict[str, int]:
    """Resident memory of this process in bytes from /proc/self/status (Linux): VmHWM (peak resident set), VmRSS,
    and its parts RssAnon (the process's own memory), RssFile (file-backed pages: memory maps, reclaimable page
    cache shared with the OS) and RssShmem. Empty where /proc is not available."""
    try:
        with open("/proc/self/status") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    values = {}
    for line in lines:
        key, _, rest = line.partition(":")
        if key in MEMORY_FIELDS:
            values[key] = int(rest.split()[0]) * 1024
    return values


def reset_peak_memory() -> bool:
    """Reset VmHWM to the current resident set (Linux: write 5 to /proc/self/clear_refs); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# -- machine and GPU peaks --------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict:
    """The machine a figure came from: CPU model, cores, torch version, threads, GPU name (if used), load."""
    info = {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# Dense (no sparsity) vendor-datasheet peaks in TFLOP/s: (bf16 tensor core, tf32 tensor core, plain fp32).
# Matched by substring of torch.cuda.get_device_name(), first match wins; --peak-tflops overrides.
GPU_PEAK_TFLOPS: tuple[tuple[str, tuple[float, float, float]], ...] = (
    ("H100 PCIe", (756.0, 378.0, 51.0)),
    ("H100 NVL", (835.0, 418.0, 60.0)),
    ("H100", (989.0, 495.0, 67.0)),
    ("H200", (989.0, 495.0, 67.0)),
    ("B200", (2250.0, 1100.0, 80.0)),
    ("A100", (312.0, 156.0, 19.5)),
    ("L40S", (362.0, 183.0, 91.6)),
    ("L4", (121.0, 60.0, 30.3)),
    ("RTX 4090", (165.0, 82.6, 82.6)),
    ("V100", (125.0, 15.7, 15.7)),  # no bf16: fp16 tensor-core peak
)


def gpu_peak_tflops(device_name: str, dtype: str = "bf16") -> float | None:
    """The datasheet peak for a GPU name and ``dtype`` ("bf16", "tf32", "fp32"); None when the name is unknown."""
    column = {"bf16": 0, "tf32": 1, "fp32": 2}[dtype]
    for key, peaks in GPU_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return peaks[column]
    return None


def projected_hours(flops: float, peak_tflops: float, utilisation: float) -> float:
    """Hours to execute ``flops`` at ``utilisation`` × ``peak_tflops`` (a projection, not a measurement)."""
    return flops / (utilisation * peak_tflops * 1e12) / 3600


# -- reporting ------------------------------------------------------------------------------------------------------
def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (cells are str()-ed)."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


class Report:
    """Collects a benchmark's tables and notes, prints them as they come, and ends with the machine, the load and
    the headline (always the last line printed); ``finish`` also writes everything as JSON when asked."""

    def __init__(self, name: str, cfg: Any, device: torch.device):
        self.name, self.cfg, self.device = name, cfg, device
        self.load_start = load_average()
        self.started = time.perf_counter()
        self.tables: list[dict] = []
        self.notes: list[str] = []
        self.results: dict[str, Any] = {}

    def table(self, title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.tables.append({"title": title, "header": list(header), "rows": [list(map(str, r)) for r in rows]})
        print(f"\n{title}\n\n{format_table(header, rows)}\n", flush=True)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(text, flush=True)

    def finish(self, headline: str) -> dict:
        wall = time.perf_counter() - self.started
        record = {
            "benchmark": self.name,
            "command": "python -m " + " ".join([f"benchmarks.{self.name}", *sys.argv[1:]]),
            "config": config_to_dict(self.cfg),
            "machine": machine(self.device),
            "load_average_start": self.load_start,
            "load_average_end": load_average(),
            "wall_seconds": round(wall, 1),
            "tables": self.tables,
            "notes": self.notes,
            "results": self.results,
            "headline": headline,
        }
        info = record["machine"]
        gpu = f", GPU {info['gpu']}" if "gpu" in info else ""
        print(f"machine: {info['cpu']}, {info['logical_cores']} logical cores, torch {info['torch']}, "
              f"{info['threads']} thread(s), device {info['device']}{gpu}; load average (1/5/15 min) "
              f"{'/'.join(map(str, self.load_start))} at start, {'/'.join(map(str, record['load_average_end']))} at "
              f"end; {wall:.0f} s")
        if self.cfg.json:
            atomic_write_json(self.cfg.json, record)
        print(f"headline: {headline}", flush=True)
        return record
