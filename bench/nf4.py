"""NF4 dequantisation benchmark: fusetune's kernel against bitsandbytes' dequantize_4bit, and the
price of dequantising a 4-bit MLP in slices.

    python bench/nf4.py --out bench/results/nf4-h200.jsonl [--quick] [--slices-only | --host]

For the Llama-3-8B linear shapes (out x in), each weight is quantised as QLoRA stores it (NF4,
blocksize 64, double-quantised absmax) and dequantised to bf16 by both systems, which must agree
bit for bit. Records: ``time_ms`` (median, L2 flushed) and ``achieved_GBps`` (bytes that must move:
packed codes + absmax codes + bf16 output, over the time). ``--quick`` runs tiny shapes with a
wall-clock timer, so that the plumbing can be checked on a CPU machine (where fusetune runs its
PyTorch reference).

The slice records time one fused LoRA MLP forward + backward (``lora_glu_mlp``, SwiGLU, rank 16,
4,096 tokens, Llama-3 8B's hidden 4,096 and intermediate 14,336, NF4 base weights) with
``nf4.DENSE_SLICE_BYTES`` at each of ``SLICE_BUDGETS`` (``whole``: no slicing), and the peak memory
the step adds (``peak_mib``), so the trade that the default makes is measured.

``--host`` records only ``host_us``: the host's time a call on a 2048 x 512 weight (kernels of a
few microseconds) through each layer of the call: the bare kernel launch, ``dequantize_nf4``,
``dense_weight`` (what the fused paths call) and ``nf4_linear`` (compiled code's custom op), beside
a tiny torch op and bitsandbytes' ``dequantize_4bit``; the bare launch also through Triton's
``kernel[grid](...)`` each time (``common.launches_through_triton``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import common
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # fusetune from this checkout
from fusetune.ops import nf4  # noqa: E402
from fusetune.ops.lora import LoraWeights, lora_glu_mlp  # noqa: E402
from fusetune.ops.nf4 import dequantize_nf4  # noqa: E402

SHAPES = ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336))
# Rows a multiple of the blocksize: bitsandbytes 0.50's CPU kernel places blocks row by row.
QUICK_SHAPES = ((64, 128), (40, 320))
BANDWIDTH = "achieved_GBps"


def moved_bytes(n: int, blocksize: int = 64) -> int:
    """Packed codes (n/2), one absmax code a block (n/blocksize) and the bf16 output (2n)."""
    return n // 2 + n // blocksize + 2 * n


def bench_shape(rows: int, cols: int, warmup: float, rep: float) -> bool:
    import bitsandbytes.functional as bnb_functional

    weight = torch.randn(rows, cols, dtype=torch.bfloat16, device=common.device()) * 0.02
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, compress_statistics=True,
                                                 quant_type="nf4")
    del weight
    systems = {
        "fusetune": lambda: dequantize_nf4(packed, state, torch.bfloat16),
        "bnb": lambda: bnb_functional.dequantize_4bit(packed, state),
    }
    same = torch.equal(systems["fusetune"](), systems["bnb"]())
    config = {"op": "nf4_dequantize", "rows": rows, "cols": cols, "variant": "bf16_double_quant"}
    for system, fn in systems.items():
        try:
            ms = common.time_fwd_bwd(fn, warmup=warmup, rep=rep)
        except Exception as exc:  # noqa: BLE001 - a failed system is recorded, the run goes on
            common.record(system, config, common.TIME, None, common.describe(exc))
            continue
        common.record(system, config, common.TIME, ms, equal_outputs=same)
        common.record(system, config, BANDWIDTH, moved_bytes(rows * cols) / (ms / 1000) / 1e9)
        print(f"{system:9s} {rows:6d} x {cols:6d}  {ms:8.4f} ms  "
              f"{moved_bytes(rows * cols) / (ms / 1000) / 1e9:8.1f} GB/s")
    common.release()
    return same


MLP_SHAPE = {"tokens": 4096, "hidden": 4096, "intermediate": 14336, "rank": 16}
QUICK_MLP_SHAPE = {"tokens": 40, "hidden": 128, "intermediate": 192, "rank": 4}
SLICE_BUDGETS = {"whole": 2**62, "64MiB": 64 * 2**20, "48MiB": 48 * 2**20, "32MiB": 32 * 2**20}
QUICK_SLICE_BUDGETS = {"whole": 2**62, "24KiB": 24 * 2**10}


def _nf4_projection(out: int, inp: int, rank: int) -> LoraWeights:
    """A frozen NF4 base weight as bitsandbytes' Params4bit (QLoRA's storage) with a LoRA adapter."""
    import bitsandbytes as bnb

    device = common.device()
    weight = torch.randn(out, inp, dtype=torch.bfloat16, device=device) * inp**-0.5
    packed, state = bnb.functional.quantize_4bit(weight, blocksize=64, compress_statistics=True,
                                                 quant_type="nf4")
    base = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, bnb_quantized=True,
                             quant_type="nf4")
    a = (torch.randn(rank, inp, device=device) * inp**-0.5).requires_grad_()
    b = (torch.randn(out, rank, device=device) * 0.01).requires_grad_()
    return LoraWeights(base, a, b, 2.0)


def bench_mlp_slices(shape: dict, budgets: dict, warmup: float, rep: float) -> None:
    hidden, inter, rank = shape["hidden"], shape["intermediate"], shape["rank"]
    projections = [_nf4_projection(inter, hidden, rank), _nf4_projection(inter, hidden, rank),
                   _nf4_projection(hidden, inter, rank)]
    x = torch.randn(shape["tokens"], hidden, dtype=torch.bfloat16, device=common.device(),
                    requires_grad=True)
    leaves = [x, *(t for p in projections for t in (p.a, p.b))]

    def step():
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            y = lora_glu_mlp(x, *projections, "silu")
        y.backward(torch.ones_like(y))

    saved = nf4.DENSE_SLICE_BYTES
    try:
        for name, budget in budgets.items():
            nf4.DENSE_SLICE_BYTES = budget
            config = {"op": "lora_glu_mlp_nf4", **shape, "slices": name}
            ms = common.time_fwd_bwd(step, grad_to_none=leaves, warmup=warmup, rep=rep)
            common.record("fusetune", config, common.TIME, ms)
            extra = common.peak_memory_mib(step) if torch.cuda.is_available() else None
            if extra is not None:
                common.record("fusetune", config, "peak_mib", extra)
            print(f"lora_glu_mlp nf4 {name:6s} {ms:8.3f} ms  peak +{extra or 0:8.1f} MiB", flush=True)
    finally:
        nf4.DENSE_SLICE_BYTES = saved
    common.release()


HOST_CALLS = 500


def host_us(fn, calls: int) -> float:
    """Microseconds of wall time a call of ``fn`` takes over ``calls`` calls in a row, the device
    synchronised only before and after: with kernels of a few microseconds, the host's time."""
    for _ in range(20):
        fn()
    common.synchronize()
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    common.synchronize()
    return (time.perf_counter() - started) / calls * 1e6


def bench_host(rows: int, cols: int, calls: int) -> None:
    """Host time of one dequantisation through each of the layers the fused paths and compiled code
    call it through, on a weight small enough that the device never holds the host back."""
    import bitsandbytes.functional as bnb_functional

    from fusetune.ops.nf4_linear import nf4_linear

    projection = _nf4_projection(rows, cols, rank=1)
    weight = projection.weight
    packed, state = weight.data, weight.quant_state
    plan = nf4._launch_plan(packed, state)
    window = nf4._window(plan, state, slice(None), slice(None))
    out = torch.empty(window.shape, dtype=torch.bfloat16, device=packed.device)
    x = torch.randn(16, cols, dtype=torch.bfloat16, device=packed.device)
    a, b = torch.randn(64, 64, device=packed.device), torch.randn(64, 64, device=packed.device)
    def launch():
        nf4._dequantize_nf4_triton(packed, plan, window, out)

    systems = {
        "torch_add (a tiny torch op)": lambda: torch.add(a, b),
        "kernel launch (plan made)": launch,
        "kernel launch through Triton (plan made)": launch,
        "dequantize_nf4": lambda: dequantize_nf4(packed, state, torch.bfloat16),
        "dense_weight (fused paths)": lambda: nf4.dense_weight(weight, torch.bfloat16),
        "nf4_linear (compiled code's op)": lambda: nf4_linear(x, weight),
        "F.linear over dense_weight": lambda: F.linear(x, nf4.dense_weight(weight, torch.bfloat16)),
        "bitsandbytes dequantize_4bit": lambda: bnb_functional.dequantize_4bit(packed, state),
    }
    config = {"op": "nf4_host", "rows": rows, "cols": cols, "calls": calls}
    with torch.no_grad():
        for name, fn in systems.items():
            with common.launches_through_triton("through Triton" in name):
                us = host_us(fn, calls)
            common.record(name, config, "host_us", us)
            print(f"{name:34s} {us:8.1f} us a call", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON-lines file to write")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few reps (plumbing, CPU)")
    parser.add_argument("--slices-only", action="store_true", help="only the MLP slice records")
    parser.add_argument("--host", action="store_true", help="only the host time a dequantisation costs")
    args = parser.parse_args()
    common.open_results(args.out)
    if args.host:
        bench_host(*((64, 128) if args.quick else (2048, 512)), 20 if args.quick else HOST_CALLS)
        return 0
    shapes, warmup, rep = (QUICK_SHAPES, 1, 5) if args.quick else (SHAPES, 25, 100)
    bench_mlp_slices(*((QUICK_MLP_SHAPE, QUICK_SLICE_BUDGETS) if args.quick else (MLP_SHAPE, SLICE_BUDGETS)),
                     warmup, rep)
    if args.slices_only:
        return 0
    mismatched = [shape for shape in shapes if not bench_shape(*shape, warmup, rep)]
    if mismatched:
        print(f"outputs differ from bitsandbytes' for {mismatched}", file=sys.stderr)
    return 1 if mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
