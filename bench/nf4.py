"""NF4 dequantisation benchmark: fusetune's kernel against bitsandbytes' dequantize_4bit.

    python bench/nf4.py --out bench/results/nf4-h200.jsonl [--quick]

For the Llama-3-8B linear shapes (out x in), each weight is quantised as QLoRA stores it (NF4,
blocksize 64, double-quantised absmax) and dequantised to bf16 by both systems, which must agree
bit for bit. Records: ``time_ms`` (median, L2 flushed) and ``achieved_GBps`` (bytes that must move:
packed codes + absmax codes + bf16 output, over the time). ``--quick`` runs tiny shapes with a
wall-clock timer, so that the plumbing can be checked on a CPU machine (where fusetune runs its
PyTorch reference).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import common
import torch

from fusetune.ops.nf4 import dequantize_nf4

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON-lines file to write")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few reps (plumbing, CPU)")
    args = parser.parse_args()
    common.open_results(args.out)
    shapes, warmup, rep = (QUICK_SHAPES, 1, 5) if args.quick else (SHAPES, 25, 100)
    mismatched = [shape for shape in shapes if not bench_shape(*shape, warmup, rep)]
    if mismatched:
        print(f"outputs differ from bitsandbytes' for {mismatched}", file=sys.stderr)
    return 1 if mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
