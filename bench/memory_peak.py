"""What is allocated at the peak of a step: torch's CUDA memory history replayed to its highest point.

``bench/e2e.py --memory DIR`` runs the first step and one more step of each worker with
``torch.cuda.memory._record_memory_history`` on and writes a report of each from its snapshot:
the step's peak (bytes allocated during the step above what was live when it began) and the
allocations live at that moment, grouped by the innermost Python frame in the code that asked for
them (fusetune, transformers, peft, the anchors, the benchmark) and largest first. That says what a
system keeps at its peak (saved activations, gradients, a loss chunk, a dequantised weight), the
question behind the issue's memory target, from a measurement rather than a guess.

The replay (``peak_allocations``) takes the snapshot's trace events alone, so it runs on any
machine; recording needs CUDA.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

# Frames from these places name an allocation; the first (innermost) one that matches wins.
_OWN_CODE = ("fusetune", "transformers", "peft", "unsloth", "liger_kernel", "bench")
_MIB = 2**20


def _site(frames: list[dict]) -> str:
    """``file:line function`` of the innermost frame in code that explains the allocation."""
    for frame in frames:
        name = frame.get("filename", "")
        if any(part in name for part in _OWN_CODE):
            short = name.split("site-packages/")[-1].split(".clean/")[-1]
            return f"{short}:{frame.get('line')} {frame.get('name')}"
    return "(no Python frame in fusetune, transformers, peft, the anchors or bench)"


def peak_allocations(events: list[dict]) -> tuple[int, list[tuple[str, int, int]]]:
    """The highest live total of the allocations the trace ``events`` make, and what was live then:
    (peak bytes, [(site, bytes, count)] largest first). Blocks allocated before recording began are
    not in the trace and count as a constant base, so the peak is relative to the step's start."""
    live: dict[int, dict] = {}
    total = peak = 0
    peak_index = -1
    for index, event in enumerate(events):
        action, address = event.get("action"), event.get("addr")
        if action == "alloc":
            live[address] = event
            total += event["size"]
        elif action in ("free_requested", "free_completed") and address in live:
            total -= live.pop(address)["size"]
        if total > peak:
            peak, peak_index = total, index
    live.clear()
    for event in events[: peak_index + 1]:
        action, address = event.get("action"), event.get("addr")
        if action == "alloc":
            live[address] = event
        elif action in ("free_requested", "free_completed"):
            live.pop(address, None)
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for event in live.values():
        group = groups[_site(event.get("frames", []))]
        group[0] += event["size"]
        group[1] += 1
    ranked = sorted(groups.items(), key=lambda item: -item[1][0])
    return peak, [(site, size, count) for site, (size, count) in ranked]


def render(title: str, peak: int, groups: list[tuple[str, int, int]], top: int = 30) -> str:
    lines = [f"{title}: step peak {peak / _MIB:,.1f} MiB above the step's start; live then, by site:",
             "      MiB  count  site"]
    lines += [f"  {size / _MIB:8.1f} {count:6d}  {site}" for site, size, count in groups[:top]]
    return "\n".join(lines)


def record_step(step, out: Path, title: str):
    """Run ``step`` once with CUDA memory history on; write its peak report to ``out``. Returns what
    ``step`` returns."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")
    try:
        result = step()
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    events = [event for trace in snapshot["device_traces"] for event in trace]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(title, *peak_allocations(events)) + "\n")
    print(f"memory: peak report {out}", flush=True)
    return result
