"""Where a profiled training step's GPU time goes, from torch.profiler's Chrome trace.

    python bench/trace_summary.py TRACE.json[.gz] [...] [--top 20]

For each trace: the span from the first to the last GPU activity, the time the GPU was busy (the union
of kernel, copy and memset intervals over all streams) and so how long it sat idle, the busy time by
kind of work (matmuls, attention, NCCL, copies, the rest by kernel name), the idle gaps by length
(launch latency, or the host falling behind), what the host was doing during the long ones, and
the kernels that took the most time, and (for traces recorded with shapes) the matmuls grouped by
the shapes of their operator, with the rate each group ran at.
``bench/e2e.py --profile DIR`` writes such traces (with shapes); this tells whether a step is bound by
the GPU's work (and which work) or by the host leaving the GPU idle.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from collections import defaultdict
from pathlib import Path

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
# Busy-time kinds, first match wins; the rest is "other kernels".
KINDS = (
    ("matmul", re.compile(r"gemm|cutlass|nvjet|xmma|cublas|matmul", re.I)),
    ("attention", re.compile(r"flash|fmha|attention|sdpa|cudnn", re.I)),
    ("nccl", re.compile(r"nccl", re.I)),
    ("nf4 dequant", re.compile(r"dequant", re.I)),
    ("copy", re.compile(r"^Memcpy|^Memset|copy_kernel|CatArrayBatchedCopy", re.I)),
)


def load_events(path: Path) -> list[dict]:
    """The complete ('X') events of a Chrome trace file, gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as handle:
        trace = json.load(handle)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def kind_of(name: str) -> str:
    return next((kind for kind, pattern in KINDS if pattern.search(name)), "other kernels")


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by ``intervals`` (start, end), overlaps counted once."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


# Idle gaps by length: short ones are launch latency between queued kernels; long ones mean the
# host fell behind (Python, syncs) or the GPU waited on a copy.
GAP_BUCKETS = ((20.0, "under 20 us"), (200.0, "20-200 us"), (float("inf"), "200 us and over"))


def idle_gaps(intervals: list[tuple[float, float]]) -> dict[str, tuple[int, float]]:
    """The idle gaps between ``intervals`` (no stream busy), as (count, total us) per GAP_BUCKETS."""
    gaps = {label: (0, 0.0) for _, label in GAP_BUCKETS}
    end = None
    for start, stop in sorted(intervals):
        if end is not None and start > end:
            label = next(label for limit, label in GAP_BUCKETS if start - end < limit)
            count, total = gaps[label]
            gaps[label] = (count + 1, total + start - end)
        end = stop if end is None else max(end, stop)
    return gaps


# Host-side events: what the launching thread was doing while the GPU sat idle.
HOST_CATEGORIES = ("cpu_op", "user_annotation", "python_function", "cuda_runtime", "cuda_driver")
LAUNCH_CATEGORIES = ("cuda_runtime", "cuda_driver")
LONG_GAP_US = 200.0
BETWEEN_OPS = "(no op: Python between ops)"


def innermost_segments(events: list[dict]) -> list[tuple[float, float, str]]:
    """One thread's host events flattened into (start, end, innermost event's name) segments;
    time covered by no event is left out. Events are taken as nested (profiler ranges are)."""
    segments: list[tuple[float, float, str]] = []
    stack: list[tuple[float, str]] = []  # (end, name), innermost last
    cursor = float("-inf")

    def close_until(time: float) -> None:
        nonlocal cursor
        while stack and stack[-1][0] <= time:
            end, name = stack.pop()
            if end > cursor:
                segments.append((cursor, end, name))
                cursor = end

    for event in sorted(events, key=lambda e: (e["ts"], -e["dur"])):
        start = event["ts"]
        close_until(start)
        if stack and start > cursor:
            segments.append((cursor, start, stack[-1][1]))
        stack.append((start + event["dur"], event["name"]))
        cursor = start
    close_until(float("inf"))
    return [(a, b, name) for a, b, name in segments if b > a]


def host_during_long_gaps(events: list[dict], min_gap: float = LONG_GAP_US) -> dict[str, float]:
    """For every idle gap of at least ``min_gap`` us: what the thread that launched the kernel
    ending the gap was doing meanwhile (its innermost host event, or Python between ops), as total
    us per name. A long gap spent in a synchronising call is a wait; one spent in many small ops
    is the host falling behind."""
    gpu = sorted((e for e in events if e.get("cat") in GPU_CATEGORIES), key=lambda e: e["ts"])
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in LAUNCH_CATEGORIES and "correlation" in e.get("args", {})}
    threads: dict[tuple, list[dict]] = defaultdict(list)
    for event in events:
        if event.get("cat") in HOST_CATEGORIES:
            threads[(event.get("pid"), event.get("tid"))].append(event)
    segments = {key: innermost_segments(host) for key, host in threads.items()}
    totals: dict[str, float] = defaultdict(float)
    end = None
    for event in gpu:
        start = event["ts"]
        launch = launches.get(event.get("args", {}).get("correlation"))
        if end is not None and start - end >= min_gap and launch is not None:
            covered = 0.0
            for a, b, name in segments.get((launch.get("pid"), launch.get("tid")), []):
                overlap = min(b, start) - max(a, end)
                if overlap > 0:
                    totals[name] += overlap
                    covered += overlap
            totals[BETWEEN_OPS] += (start - end) - covered
        end = start + event["dur"] if end is None else max(end, start + event["dur"])
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


# The operands of a matmul operator: (first, second) input index; the FLOPs are 2 * M * K * N.
MATMUL_OPERANDS = {"aten::mm": (0, 1), "aten::addmm": (1, 2), "aten::addmm_": (1, 2)}


def matmul_shapes(events: list[dict]) -> list[dict]:
    """Matmul kernel time grouped by the operator that launched it and its operands' shapes
    (needs a trace recorded with ``record_shapes``: the operator's "Input Dims"), longest first:
    name, operand dims, calls, kernel us, TFLOP/s. A kernel is tied to its operator by the
    profiler's "External id"; kernels of operators outside ``MATMUL_OPERANDS`` (or without
    shapes) are one group "other"."""
    ops = {e["args"]["External id"]: e for e in events
           if e.get("cat") == "cpu_op" and "External id" in e.get("args", {})}
    groups: dict[tuple, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
    for event in events:
        if event.get("cat") != "kernel" or kind_of(event["name"]) != "matmul":
            continue
        op = ops.get(event.get("args", {}).get("External id"), {})
        dims, operands = op.get("args", {}).get("Input Dims"), MATMUL_OPERANDS.get(op.get("name"))
        key, flops = ("other", ()), 0.0
        if dims and operands:
            (m, k), (_, n) = dims[operands[0]], dims[operands[1]]
            key, flops = (op["name"], (tuple(dims[operands[0]]), tuple(dims[operands[1]]))), 2.0 * m * k * n
        group = groups[key]
        group[0] += 1
        group[1] += event["dur"]
        group[2] += flops
    rows = [{"op": name, "dims": dims, "calls": calls, "us": us,
             "tflops": flops / us / 1e6 if us and flops else None}
            for (name, dims), (calls, us, flops) in groups.items()]
    return sorted(rows, key=lambda row: -row["us"])


def summarise(events: list[dict], top: int) -> dict:
    """Span, busy and idle microseconds, busy time per kind, and the ``top`` kernels by total time."""
    gpu = [e for e in events if e.get("cat") in GPU_CATEGORIES]
    if not gpu:
        return {"span_us": 0.0, "busy_us": 0.0, "idle_fraction": None, "kinds": {}, "top": [], "gaps": {},
                "host_in_long_gaps": {}, "matmuls": []}
    intervals = [(e["ts"], e["ts"] + e["dur"]) for e in gpu]
    span = max(stop for _, stop in intervals) - min(start for start, _ in intervals)
    busy = union_length(intervals)
    kinds: dict[str, float] = defaultdict(float)
    kernels: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for event in gpu:
        kinds[kind_of(event["name"])] += event["dur"]
        kernels[event["name"]][0] += 1
        kernels[event["name"]][1] += event["dur"]
    ranked = sorted(kernels.items(), key=lambda item: -item[1][1])[:top]
    return {"span_us": span, "busy_us": busy, "idle_fraction": 1 - busy / span if span else None,
            "kinds": dict(sorted(kinds.items(), key=lambda item: -item[1])),
            "top": [(name, count, total) for name, (count, total) in ranked], "gaps": idle_gaps(intervals),
            "host_in_long_gaps": host_during_long_gaps(events), "matmuls": matmul_shapes(events)}


def render(path: Path, summary: dict) -> str:
    """The summary as text lines."""
    if not summary["span_us"]:
        return f"{path.name}: no GPU activity in the trace"
    busy = summary["busy_us"]
    lines = [f"{path.name}: GPU span {summary['span_us'] / 1e3:.1f} ms, busy {busy / 1e3:.1f} ms, "
             f"idle {summary['idle_fraction']:.1%}",
             "  busy time by kind (kernel time summed over streams):"]
    lines += [f"    {kind:14s} {total / 1e3:9.1f} ms" for kind, total in summary["kinds"].items()]
    lines.append("  idle gaps by length (no stream busy): count, total ms")
    lines += [f"    {label:16s} {count:6d} {total / 1e3:9.1f}"
              for label, (count, total) in summary["gaps"].items()]
    if summary["host_in_long_gaps"]:
        lines.append(f"  the launching thread during gaps of {LONG_GAP_US:.0f} us and over: "
                     f"ms, innermost host event")
        lines += [f"    {total / 1e3:9.2f}  {name[:110]}"
                  for name, total in list(summary["host_in_long_gaps"].items())[:15]]
    lines.append("  top kernels: calls, total ms, name")
    lines += [f"    {count:6d} {total / 1e3:9.2f}  {name[:110]}" for name, count, total in summary["top"]]
    if any(row["op"] != "other" for row in summary["matmuls"]):
        lines.append("  matmuls by operator and operand shapes: calls, kernel ms, TFLOP/s, operator, shapes")
        lines += [f"    {row['calls']:6d} {row['us'] / 1e3:9.2f} "
                  f"{'-' if row['tflops'] is None else format(row['tflops'], '6.0f'):>6}  {row['op']} "
                  f"{' x '.join(str(list(d)) for d in row['dims'])}" for row in summary["matmuls"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("traces", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=20, help="kernels to list")
    args = parser.parse_args(argv)
    for path in args.traces:
        print(render(path, summarise(load_events(path), args.top)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
