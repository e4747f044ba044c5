"""What every benchmark shares: the environment record, result records, timers and device ceilings.

A result is one JSON line per measurement (see :func:`record`), appended as soon as it is taken so
that a run cut short keeps what it measured. Timing uses Triton's ``do_bench`` (median of CUDA-event
timed runs, L2 flushed before each); without CUDA a wall-clock timer stands in so that the
scripts' plumbing can be exercised on a CPU machine with ``--quick``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import importlib.metadata
import json
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

MIB = 2**20

# Where record() appends; set by open_results().
_RESULTS: dict[str, Path | None] = {"path": None}

# Metric names shared by the benchmarks and the report.
TIME = "time_ms"  # forward + backward
MEMORY = "peak_mib"
ROOFLINE = "roofline_fraction"
# The same step's device-kernel time alone (torch.profiler), and the roofline fraction of that: where
# the host needs longer for a step than the device, TIME is the host's and these are the kernels'.
KERNEL_TIME = "kernel_ms"
KERNEL_ROOFLINE = "kernel_roofline_fraction"
ERROR = "max_rel_error"
COPY = "copy_GBps"
MATMUL = "bf16_matmul_TFLOPS"


def _version(distribution: str) -> str | None:
    """Installed version of a distribution, or None when it is absent."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def environment() -> dict:
    """The machine and library versions every record carries, taken once per run."""
    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "liger": _version("liger-kernel"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def open_results(path: Path) -> Path:
    """Start a fresh results file at ``path``; later records are appended to it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("")
    _RESULTS["path"] = path
    return path


def sweep_arguments(
    description: str, stem: str, timing: dict,
    more: Callable[[argparse.ArgumentParser], None] | None = None,
) -> tuple[argparse.Namespace, dict]:
    """The command line of a launch-setting sweep (``--out DIR``, ``--quick``, ``--tag``, and what
    ``more`` adds): parses it, starts ``DIR/<stem>-<tag>.jsonl`` and returns the arguments with
    the do_bench timing to use (``timing``, or a few short runs with --quick, which checks the
    plumbing on a CPU)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, required=True, help="directory for the JSON lines")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few runs (plumbing)")
    parser.add_argument("--tag", default="h200", help=f"results file is {stem}-<tag>.jsonl")
    if more is not None:
        more(parser)
    args = parser.parse_args()
    open_results(args.out / f"{stem}-{args.tag}.jsonl")
    return args, ({"warmup": 1, "rep": 5} if args.quick else timing)


def record(system: str, config: dict, metric: str, value: float | None,
           error: str | None = None, **extra) -> dict:
    """Build one result, append it to the results file as a JSON line and return it.

    ``config`` holds the op, its shape fields and ``variant``. A failed measurement has value
    None and says why in ``error``; ``extra`` adds keys a benchmark wants to keep (e.g. a version).
    """
    env = environment()
    row = {"system": system, "config": config, "metric": metric, "value": value,
           **{key: env[key] for key in ("gpu", "torch", "triton", "transformers", "date")}}
    if value is None:
        row["error"] = error or "no value"
    row.update(extra)
    if _RESULTS["path"] is not None:
        with _RESULTS["path"].open("a") as out:
            out.write(json.dumps(row) + "\n")
    return row


def describe(exc: BaseException, limit: int = 300) -> str:
    """A one-line error string for a record: the exception type and the start of its message."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:limit]}"


def rotation(items: list | tuple, index: int) -> list:
    """``items`` in the order of round ``index`` of an interleaved comparison: each round starts one
    further along, so that no item always runs first (or right after the same other)."""
    shift = index % len(items)
    return [*items[shift:], *items[:shift]]


@contextlib.contextmanager
def launches_through_triton(through_triton: bool = True):
    """Meanwhile (where ``through_triton``), every fusetune kernel launched through Triton's
    ``kernel[grid](...)`` each time, as before the direct launch path (``DirectLaunch.enabled``)."""
    from fusetune.ops._direct_launch import DirectLaunch

    DirectLaunch.enabled = not through_triton
    try:
        yield
    finally:
        DirectLaunch.enabled = True


def synchronize() -> None:
    """Wait for queued CUDA work (no-op on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _clear(tensors: Iterable[torch.Tensor]) -> None:
    for tensor in tensors:
        tensor.grad = None


def _wall_clock_ms(fn: Callable[[], object], grad_to_none, rep: float) -> float:
    """CPU stand-in for do_bench: one untimed run, then the median wall time of runs filling
    about ``rep`` ms (1 to 100)."""
    fn()
    times: list[float] = []
    deadline = time.perf_counter() + rep / 1000
    while not times or (time.perf_counter() < deadline and len(times) < 100):
        _clear(grad_to_none or ())
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def time_fwd_bwd(fn: Callable[[], object], grad_to_none: list[torch.Tensor] | None = None,
                 warmup: float = 25, rep: float = 100) -> float:
    """Median milliseconds of ``fn`` (a forward+backward step).

    ``warmup`` and ``rep`` are durations in ms, as in ``triton.testing.do_bench`` (same keywords in
    Triton 3.6 and 3.9); ``grad_to_none`` tensors get ``.grad = None`` before every run so that
    gradients are allocated afresh, as in training, rather than accumulated.
    """
    if not torch.cuda.is_available():
        return _wall_clock_ms(fn, grad_to_none, rep)
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none,
                          return_mode="median"))


def kernel_ms(fn: Callable[[], object], steps: int = 5) -> float:
    """Mean summed device time (kernels, copies, memsets) of one call of ``fn``, from torch.profiler.

    Unlike ``time_fwd_bwd`` it leaves out the gaps in which the device waits for the host.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("kernel time is read from CUDA's profiler; no CUDA here")
    from torch.profiler import ProfilerActivity, profile

    synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        synchronize()
    return sum(event.self_device_time_total for event in prof.key_averages()) / steps / 1000


def peak_memory_mib(fn: Callable[[], object]) -> float:
    """MiB that one run of ``fn`` adds at its peak over what was allocated before it."""
    if not torch.cuda.is_available():
        raise RuntimeError("peak memory is measured with the CUDA caching allocator; no CUDA here")
    synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    synchronize()
    return (torch.cuda.max_memory_allocated() - before) / MIB


def release() -> None:
    """Return freed blocks to the device between runs so one system's cache cannot starve the next."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def device() -> torch.device:
    """The device the benchmarks run on: CUDA when present, else CPU (plumbing checks only)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def copy_bandwidth(n_bytes: int, warmup: float, rep: float) -> float:
    """Device-to-device copy rate in bytes/s, counting the bytes read plus the bytes written."""
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device())
    dst = torch.empty_like(src)
    ms = time_fwd_bwd(lambda: dst.copy_(src), warmup=warmup, rep=rep)
    return 2 * n_bytes / (ms / 1000)


def matmul_rate(n: int, warmup: float, rep: float) -> float:
    """bf16 (n x n) @ (n x n) rate in FLOP/s on random data (2 n^3 FLOPs a product)."""
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device())
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device())
    ms = time_fwd_bwd(lambda: torch.mm(a, b), warmup=warmup, rep=rep)
    return 2 * n**3 / (ms / 1000)


def measure_ceilings(copy_bytes: int, matmul_n: int, warmup: float, rep: float) -> dict:
    """Measure the two roofline ceilings once, record them, and return them in bytes/s and FLOP/s."""
    bandwidth = copy_bandwidth(copy_bytes, warmup, rep)
    rate = matmul_rate(matmul_n, warmup, rep)
    record("device", {"op": "copy", "bytes": copy_bytes, "variant": "read+write"}, COPY,
           bandwidth / 1e9)
    record("device", {"op": "matmul", "m": matmul_n, "n": matmul_n, "k": matmul_n,
                      "variant": "bf16"}, MATMUL, rate / 1e12)
    return {"bytes": bandwidth, "flops": rate}


def shape_text(config: dict) -> str:
    """The shape fields of a config joined with 'x' (e.g. 8192x4096), in the config's order."""
    return "x".join(str(v) for k, v in config.items() if k not in ("op", "variant"))


def shape_legend(config: dict) -> str:
    """Names of the shape fields in the order shape_text() joins them (e.g. tokens x hidden)."""
    return " x ".join(k for k in config if k not in ("op", "variant"))


def index(records: Iterable[dict]) -> dict:
    """Group records as {(op, shape, variant): {system: {metric: record}}}, the last one winning.

    Cases keep the order in which they first appear.
    """
    cases: dict = {}
    for row in records:
        config = row["config"]
        key = (config["op"], shape_text(config), config.get("variant", ""))
        cases.setdefault(key, {}).setdefault(row["system"], {})[row["metric"]] = row
    return cases


def value(systems: dict, system: str, metric: str) -> float | None:
    """The value of ``metric`` for ``system`` in one case of index(), or None when absent/failed."""
    row = systems.get(system, {}).get(metric)
    return None if row is None else row["value"]


def speed_ratio(systems: dict, system: str, others: Iterable[str]) -> float | None:
    """How many times faster ``system`` is than the fastest of ``others`` (>1: faster)."""
    own = value(systems, system, TIME)
    times = [t for t in (value(systems, other, TIME) for other in others) if t is not None]
    if own is None or not times:
        return None
    return min(times) / own
