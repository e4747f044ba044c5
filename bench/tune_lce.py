"""How linear_cross_entropy's rows per chunk trade time for memory, on the real LCE shapes.

Times fusetune's ``linear_cross_entropy`` forward+backward and its peak memory for several
``chunk_rows`` values (and the default) with a trainable and a frozen weight, so the default chunk
rule in ``fusetune/ops/linear_cross_entropy.py`` is chosen from measurements, not guesses.
Run on the GPU: ``python bench/tune_lce.py --out DIR [--chunks 128,256]`` writes
DIR/lce-tuning-<tag>.jsonl.

With ``--slices`` it sweeps the frozen-weight path that also cuts the vocabulary
(``fusetune/ops/vocab_slices.py``) instead: rows per chunk times bytes of a slice of logits,
beside the whole-vocabulary chunks that path replaced (variant ``whole_vocab``), into
DIR/lce-slices-<tag>.jsonl. With ``--slice-launch`` it sweeps instead the slice kernel's launch
(columns a loop step x warps) at the default rows and slices, into the same file.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import common
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # fusetune from this checkout
from fusetune.ops.linear_cross_entropy import linear_cross_entropy  # noqa: E402

# The modules themselves (``fusetune.ops`` re-exports a function under the first one's name).
lce_module = importlib.import_module("fusetune.ops.linear_cross_entropy")
slices_module = importlib.import_module("fusetune.ops.vocab_slices")

SHAPES = ({"tokens": 8192, "hidden": 4096, "vocab": 128256},
          {"tokens": 16384, "hidden": 3584, "vocab": 152064},
          {"tokens": 8192, "hidden": 2304, "vocab": 262144})
QUICK_SHAPES = ({"tokens": 64, "hidden": 32, "vocab": 500},)
# Small models' heads (Qwen2.5-0.5B and -1.5B), where the sliced path's launches a slice weigh
# most against its matmuls (``--small``).
SMALL_SHAPES = ({"tokens": 2048, "hidden": 896, "vocab": 151936},
                {"tokens": 4096, "hidden": 1536, "vocab": 151936})
CHUNKS = (128, 256, 512, 768, 1024, 1280, 1536, 2048, 4096)
QUICK_CHUNKS = (16, 32)
SLICE_CHUNKS = (1024, 2048)
SLICE_MIB = (16, 32, 48, 64)
QUICK_SLICE_MIB = (1 / 64,)
SLICE_LAUNCHES = tuple(slices_module.DeferredLaunch(block, warps)
                       for block in (1024, 2048, 4096, 8192) for warps in (4, 8, 16))
QUICK_SLICE_LAUNCHES = (slices_module.DeferredLaunch(64, 1), slices_module.DeferredLaunch(128, 2))


def measure(shape: dict, trainable: bool, chunk_rows: int | None, timing: dict,
            variant: str = "") -> list[dict]:
    """Time and peak memory of one configuration, recorded under system ``fusetune``
    (``variant`` added to the config's variant)."""
    n, h, v = shape["tokens"], shape["hidden"], shape["vocab"]
    dev = common.device()
    hidden = torch.randn(n, h, device=dev, dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(v, h, device=dev, dtype=torch.bfloat16) * h**-0.5).requires_grad_(trainable)
    labels = torch.randint(0, v, (n,), device=dev)
    config = {"op": "linear_cross_entropy", **shape, "chunk_rows": chunk_rows or "default",
              "variant": ("trainable_weight" if trainable else "frozen_weight")
              + ("_default_chunk" if chunk_rows is None else "") + variant}
    leaves = [hidden, weight] if trainable else [hidden]

    def step():
        linear_cross_entropy(hidden, weight, labels, chunk_rows=chunk_rows).backward()

    rows = []
    try:
        ms = common.time_fwd_bwd(step, grad_to_none=leaves, **timing)
        rows.append(common.record("fusetune", config, common.TIME, ms))
        if torch.cuda.is_available():  # the device's time alone: the step can wait on the host
            rows.append(common.record("fusetune", config, common.KERNEL_TIME, common.kernel_ms(step)))
        for leaf in leaves:
            leaf.grad = None
        if torch.cuda.is_available():
            rows.append(common.record("fusetune", config, common.MEMORY, common.peak_memory_mib(step)))
    except Exception as exc:  # an OOM at one chunk size must not end the sweep
        rows.append(common.record("fusetune", config, common.TIME, None, common.describe(exc)))
    print(f"  {common.shape_text(shape)} {config['variant']} chunk={config['chunk_rows']}: "
          + ", ".join(f"{r['metric']}={r['value'] if r['value'] is None else round(r['value'], 2)}"
                      for r in rows), flush=True)
    return rows


def sweep_slices(shapes: tuple[dict, ...], chunks: tuple[int, ...], slice_mib: tuple[float, ...],
                 timing: dict) -> None:
    """The frozen-weight sliced path at each rows-per-chunk and slice size, and the
    whole-vocabulary chunks at the default rows (slicing switched off)."""
    budget = slices_module.SLICE_BYTES
    for shape in shapes:
        for chunk in chunks:
            for mib in slice_mib:
                slices_module.SLICE_BYTES = int(mib * 2**20)
                measure(shape, False, chunk, timing, variant=f"_slice_{mib:g}MiB")
                common.release()
        slices_module.SLICE_BYTES = budget
        sliced = lce_module.slices_vocabulary
        lce_module.slices_vocabulary = lambda *args: False
        measure(shape, False, None, timing, variant="_whole_vocab")
        lce_module.slices_vocabulary = sliced
        common.release()


def sweep_slice_launches(shapes: tuple[dict, ...], launches: tuple, timing: dict) -> None:
    """The frozen-weight sliced path at its default rows and slices, for each launch of its slice
    kernel (the shipped one first)."""
    shipped = slices_module._SLICE_LAUNCH
    for shape in shapes:
        measure(shape, False, None, timing, variant="_slice_launch_shipped")
        for launch in launches:
            slices_module._SLICE_LAUNCH = launch
            measure(shape, False, None, timing, variant=f"_slice_launch_{launch.block}x{launch.warps}")
            common.release()
        slices_module._SLICE_LAUNCH = shipped


def main() -> None:
    def more(parser):
        parser.add_argument("--chunks", help=f"rows per chunk, comma list (default {CHUNKS})")
        parser.add_argument("--slices", action="store_true",
                            help=f"sweep the sliced frozen path: rows (--chunks, default {SLICE_CHUNKS}) "
                                 f"x MiB a slice (--slice-mib, default {SLICE_MIB})")
        parser.add_argument("--slice-mib", help="MiB of logits a slice, comma list (with --slices)")
        parser.add_argument("--small", action="store_true", help="small models' shapes instead")
        parser.add_argument("--slice-launch", action="store_true",
                            help="sweep the slice kernel's launch (columns a step x warps) instead")

    slices = "--slices" in sys.argv or "--slice-launch" in sys.argv
    # The slices' sweep compares settings a few percent apart: several steps a median, not one.
    args, timing = common.sweep_arguments(
        __doc__.split("\n\n")[0], "lce-slices" if slices else "lce-tuning",
        {"warmup": 25, "rep": 250} if slices else {"warmup": 10, "rep": 50}, more)
    chosen_chunks = tuple(int(rows) for rows in args.chunks.split(",")) if args.chunks else None
    if args.slice_launch:
        sweep_slice_launches(QUICK_SHAPES if args.quick else SMALL_SHAPES if args.small else SHAPES,
                             QUICK_SLICE_LAUNCHES if args.quick else SLICE_LAUNCHES, timing)
        return
    if args.slices:
        mib = tuple(float(size) for size in args.slice_mib.split(",")) if args.slice_mib else None
        sweep_slices(QUICK_SHAPES if args.quick else SMALL_SHAPES if args.small else SHAPES,
                     chosen_chunks or (QUICK_CHUNKS if args.quick else SLICE_CHUNKS),
                     mib or (QUICK_SLICE_MIB if args.quick else SLICE_MIB), timing)
        return
    chunks = chosen_chunks or (QUICK_CHUNKS if args.quick else CHUNKS)
    for shape in QUICK_SHAPES if args.quick else SHAPES:
        for trainable in (True, False):
            for chunk in (None, *chunks):
                measure(shape, trainable, chunk, timing)
                common.release()


if __name__ == "__main__":
    main()
