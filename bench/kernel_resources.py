"""Registers, spills and shared memory of fusetune's compiled Triton kernels, and the occupancy they allow.

A memory-bound kernel needs enough loads in flight on each SM; how many programs an SM can hold is
bounded by the registers and shared memory each program takes. This runs a forward + backward of
the ops at the shapes where they fall short of their targets (add_rms_norm and rms_norm at
32768 x 4096 and 32768 x 8192, cross_entropy at 8192 x 128256, linear_cross_entropy with a frozen
weight), then prints, for every compiled variant of every fusetune kernel, its warps, registers a
thread, spilled registers, shared memory, and programs an SM by registers (65,536 a SM on Hopper).
Run on the GPU: ``python bench/kernel_resources.py`` (output to stdout).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # fusetune from this checkout
from fusetune.ops import add_rms_norm, cross_entropy, linear_cross_entropy, rms_norm  # noqa: E402

REGISTERS_PER_SM = 65536
MODULES = ("rms_norm", "layer_norm", "cross_entropy", "glu", "rope")


def run_ops() -> None:
    """One forward + backward of each op at its large shapes, so that their kernels compile."""
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    for hidden in (4096, 8192):
        x, r = torch.randn(32768, hidden, **bf16, requires_grad=True), torch.randn(32768, hidden, **bf16)
        w = torch.randn(hidden, **bf16, requires_grad=True)
        normed, summed = add_rms_norm(x, r, w)
        torch.autograd.backward((normed, summed), (torch.ones_like(normed), torch.ones_like(summed)))
        rms_norm(x, w).backward(torch.ones_like(x))
    logits = torch.randn(8192, 128256, **bf16, requires_grad=True)
    labels = torch.randint(0, 128256, (8192,), device="cuda")
    cross_entropy(logits, labels).backward()
    hidden = torch.randn(8192, 4096, **bf16, requires_grad=True)
    linear_cross_entropy(hidden, torch.randn(128256, 4096, **bf16) * 0.02, labels).backward()
    torch.cuda.synchronize()


def compiled_variants(kernel) -> list:
    """The compiled kernels a ``triton.jit`` function holds (its per-device caches; the cache dict
    is the first entry in Triton 3.6 and 3.9)."""
    found = []
    for entry in getattr(kernel, "device_caches", {}).values():
        cache = entry[0] if isinstance(entry, tuple) else entry
        found.extend(cache.values())
    return found


def main() -> None:
    run_ops()
    columns = ("warps", 5), ("regs", 5), ("spills", 6), ("shared", 7), ("programs/SM (regs)", 19)
    print(f"{'kernel':42s} " + " ".join(f"{name:>{width}s}" for name, width in columns))
    for name in MODULES:
        module = importlib.import_module(f"fusetune.ops.{name}")
        for attr, value in sorted(vars(module).items()):
            for compiled in compiled_variants(value) if hasattr(value, "device_caches") else ():
                warps = compiled.metadata.num_warps
                regs = compiled.n_regs
                by_regs = REGISTERS_PER_SM // max(1, regs * 32 * warps)
                print(f"{name + '.' + attr:42s} {warps:5d} {regs:5d} {compiled.n_spills:6d} "
                      f"{compiled.metadata.shared:7d} {by_regs:19d}")


if __name__ == "__main__":
    main()
