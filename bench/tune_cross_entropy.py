"""Launch configurations of the cross-entropy row kernel, timed on real vocabulary sizes.

The kernel computes each row's loss and its gradient in two passes over the row; how many rows are
in flight (programs per SM), the vocab block and the warps decide whether pass 2 finds the row in
L2. This sweeps them on the H200 so the default in ``fusetune/ops/cross_entropy.py`` is measured.
Run: ``python bench/tune_cross_entropy.py --out DIR`` (writes DIR/ce-tuning-<tag>.jsonl).
"""

from __future__ import annotations

import functools
import itertools
import sys
from pathlib import Path

import common
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # fusetune from this checkout
from fusetune.ops.cross_entropy import cross_entropy_rows  # noqa: E402

SHAPES = ({"tokens": 8192, "vocab": 128256}, {"tokens": 8192, "vocab": 262144})
QUICK_SHAPES = ({"tokens": 16, "vocab": 3000},)
PROGRAMS_PER_SM = (1, 2, 4, 1024)  # 1024: in effect one program per row
BLOCKS = (4096, 8192, 16384, 32768)
WARPS = (8, 16, 32)


def main() -> None:
    args, timing = common.sweep_arguments(__doc__.split("\n\n")[0], "ce-tuning", {"warmup": 10, "rep": 40})
    grid = list(itertools.product(PROGRAMS_PER_SM[:2] if args.quick else PROGRAMS_PER_SM,
                                  BLOCKS[:1] if args.quick else BLOCKS,
                                  WARPS[:1] if args.quick else WARPS))
    for shape in QUICK_SHAPES if args.quick else SHAPES:
        n, v = shape["tokens"], shape["vocab"]
        logits = torch.randn(n, v, device=common.device(), dtype=torch.bfloat16) * 2
        labels = torch.randint(0, v, (n,), device=logits.device)
        grad = torch.empty_like(logits)
        scale = torch.full((1,), 1.0 / n, device=logits.device)
        options = dict(ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None)
        best = None
        for launch in grid:
            config = {"op": "cross_entropy_rows", **shape, "programs_per_sm": launch[0],
                      "block": launch[1], "warps": launch[2], "variant": "loss_and_grad"}
            try:
                ms = common.time_fwd_bwd(functools.partial(
                    cross_entropy_rows, logits, labels, grad_scale=scale, grad_out=grad,
                    launch=launch, **options), **timing)
            except Exception as exc:  # a configuration the compiler rejects is recorded, not fatal
                common.record("fusetune", config, common.TIME, None, common.describe(exc))
                continue
            common.record("fusetune", config, common.TIME, ms)
            gbps = 3 * n * v * 2 / (ms / 1000) / 1e9  # two reads and one write of bf16 logits
            print(f"  {n}x{v} launch={launch}: {ms:.3f} ms ({gbps:.0f} GB/s if 3 passes)", flush=True)
            best = min(best or (ms, launch), (ms, launch))
        print(f"best {n}x{v}: {best}", flush=True)
        common.release()


if __name__ == "__main__":
    main()
