"""Launch configurations of the cross-entropy row kernels, timed on real vocabulary sizes.

Both kernels compute each row's loss and its gradient in two passes over the row; whether the
second pass finds the row in L2 decides whether the logits cross HBM two or three times. The
persistent kernel walks whole rows (programs per SM, vocab block and warps set how many rows are
in flight); the split kernel gives each segment of a row its own program and lets the last one
to finish make the gradient (segment columns, block and warps). This sweeps both on the H200 so
the default in ``fusetune/ops/cross_entropy.py`` is measured. The 2,048-row shape is one chunk of
``linear_cross_entropy``, which runs the kernel in place.
Run: ``python bench/tune_cross_entropy.py --out DIR`` (writes DIR/ce-tuning-<tag>.jsonl).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import common
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # fusetune from this checkout
from fusetune.ops.cross_entropy import cross_entropy_rows  # noqa: E402

SHAPES = (
    {"tokens": 8192, "vocab": 128256},
    {"tokens": 8192, "vocab": 262144},
    {"tokens": 2048, "vocab": 152064, "in_place": True},
)
QUICK_SHAPES = ({"tokens": 16, "vocab": 3000}, {"tokens": 8, "vocab": 3000, "in_place": True})
# The persistent kernel's best setting of the first sweep (ce-tuning-h200.jsonl), then the split
# grid around the best of the second (ce-tuning-h200-split.jsonl: 32,768-column segments, 4,096
# blocks, 16 warps), with and without L2 eviction hints (keep the row on the statistics pass,
# drop it on the gradient pass).
PERSISTENT = (("persistent", 4, 8192, 32),)
SPLIT = tuple(("split", segment, block, warps, hints) for segment in (32768, 65536)
              for block in (2048, 4096) for warps in (16, 32) for hints in (False, True))
QUICK_LAUNCHES = (("persistent", 1, 1024, 4), ("split", 1024, 512, 4, True))


def main() -> None:
    args, timing = common.sweep_arguments(__doc__.split("\n\n")[0], "ce-tuning", {"warmup": 10, "rep": 40})
    grid = QUICK_LAUNCHES if args.quick else PERSISTENT + SPLIT
    for shape in QUICK_SHAPES if args.quick else SHAPES:
        n, v = shape["tokens"], shape["vocab"]
        logits = torch.randn(n, v, device=common.device(), dtype=torch.bfloat16) * 2
        labels = torch.randint(0, v, (n,), device=logits.device)
        # In place, every timed run overwrites the logits with a gradient that the next one reads
        # as logits: the same bytes move, the values only stay finite.
        grad = logits if shape.get("in_place") else torch.empty_like(logits)
        scale = torch.full((1,), 1.0 / n, device=logits.device)
        options = dict(ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None)
        best = None
        for launch in grid:
            size_name = "segment_cols" if launch[0] == "split" else "programs_per_sm"
            config = {"op": "cross_entropy_rows", **shape, "kernel": launch[0], size_name: launch[1],
                      "block": launch[2], "warps": launch[3], "l2_hints": bool(launch[4:] and launch[4]),
                      "variant": "loss_and_grad"}
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
