"""Where an op's time goes: a CUDA kernel profile and the host time of one call, per case.

The ops benchmark says how long an op takes; this says why. For each case it prints the
profiler's table of device kernels (time per kernel over a few steps) and the wall time of a step
with and without a device sync, so host overhead (Python, launches, syncs) shows apart from the
kernels. Run on the GPU: ``python bench/profile_ops.py [--cases a,b] [--trace DIR]``; output goes
to stdout, and with ``--trace`` each case's Chrome trace to DIR/<case>.json (``bench/trace_summary.py``
reads it: where the device sat idle between the kernels, and what the host did meanwhile).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # fusetune from this checkout
from fusetune.ops import add_rms_norm, cross_entropy, layer_norm, linear_cross_entropy, rms_norm  # noqa: E402

BF16 = torch.bfloat16


def _leaf(*shape, scale=1.0, grad=True):
    return (torch.randn(*shape, device="cuda", dtype=BF16) * scale).requires_grad_(grad)


def case_cross_entropy():
    logits, labels = _leaf(8192, 128256, scale=2.0), torch.randint(0, 128256, (8192,), device="cuda")
    return lambda: cross_entropy(logits, labels).backward(), [logits]


def case_lce_trainable():
    h, w = _leaf(16384, 3584), _leaf(152064, 3584, scale=3584**-0.5)
    labels = torch.randint(0, 152064, (16384,), device="cuda")
    return lambda: linear_cross_entropy(h, w, labels).backward(), [h, w]


def case_lce_trainable_small_chunks():
    """Llama 3's shape at Liger's chunk (256 rows, its logits as large as the hidden states): where
    the time goes when the chunk's logits are kept that small."""
    h, w = _leaf(8192, 4096), _leaf(128256, 4096, scale=4096**-0.5)
    labels = torch.randint(0, 128256, (8192,), device="cuda")
    return lambda: linear_cross_entropy(h, w, labels, chunk_rows=256).backward(), [h, w]


def case_lce_frozen():
    h, w = _leaf(8192, 2304), _leaf(262144, 2304, scale=2304**-0.5, grad=False)
    labels = torch.randint(0, 262144, (8192,), device="cuda")
    return lambda: linear_cross_entropy(h, w, labels).backward(), [h]


def case_rms_norm():
    x, w = _leaf(32768, 4096), _leaf(4096)
    return lambda: rms_norm(x, w).backward(torch.ones_like(x)), [x, w]


def case_rms_norm_per_head():
    """Qwen3-style q/k norm rows: 8,192 tokens x 16 heads of 256 (Gemma 3's head size)."""
    x, w = _leaf(131072, 256), _leaf(256)
    return lambda: rms_norm(x, w).backward(torch.ones_like(x)), [x, w]


def case_add_rms_norm():
    x, r, w = _leaf(32768, 4096), _leaf(32768, 4096), _leaf(4096)

    def step():
        normed, summed = add_rms_norm(x, r, w)
        torch.autograd.backward((normed, summed), (torch.ones_like(x), torch.ones_like(x)))

    return step, [x, r, w]


def case_layer_norm():
    x, w, b = _leaf(8192, 4096), _leaf(4096), _leaf(4096)
    return lambda: layer_norm(x, w, b).backward(torch.ones_like(x)), [x, w, b]


CASES = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}


def profile(name: str, steps: int = 5, trace_dir: Path | None = None) -> None:
    step, leaves = CASES[name]()

    def run():
        for leaf in leaves:
            leaf.grad = None
        step()

    for _ in range(3):
        run()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        run()
    host_ms = (time.perf_counter() - start) * 1000 / steps  # includes waits at syncs inside the op
    torch.cuda.synchronize()
    synced_ms = (time.perf_counter() - start) * 1000 / steps
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                            torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            run()
        torch.cuda.synchronize()
    if trace_dir is not None:
        trace_dir.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace_dir / f"{name}.json"))
    print(f"\n=== {name}: host {host_ms:.3f} ms/step before the final sync, {synced_ms:.3f} ms/step "
          "with it", flush=True)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60),
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--trace", type=Path, help="write each case's Chrome trace to this folder")
    args = parser.parse_args()
    for name in args.cases.split(","):
        profile(name, trace_dir=args.trace)


if __name__ == "__main__":
    main()
