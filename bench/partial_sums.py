"""The norms' last backward step alone: adding up the per-program fp32 partial sums of the parameter
gradients (``fusetune.ops.partial_sums``), for torch's ``partial.sum(0).to(dtype)`` a gradient and
for the Triton reduction over its launch settings (columns a program, tile elements, warps).

The buffers have the shapes the backwards leave on this GPU for ``bench/ops.py``'s norm shapes
(programs from the ops' own grid functions): one gradient for RMSNorm, two (weight, bias) for
LayerNorm. Times are kernel time (torch.profiler: reduction and cast kernels, no host), so that a
few microseconds of device work are not hidden under the launch's host time. A buffer shape that
two norm shapes share (rows wider than 2,048 all leave a few programs per SM) is timed once.
``default`` rows are the shipped settings.
Run: ``python bench/partial_sums.py --out DIR [--quick]`` (writes DIR/partial-sums-<tag>.jsonl).
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import sys
from pathlib import Path

import common
import ops
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # fusetune from this checkout
from fusetune.ops._launch import cdiv  # noqa: E402

partial_sums, layer_norm, rms_norm = (importlib.import_module(f"fusetune.ops.{name}")
                                      for name in ("partial_sums", "layer_norm", "rms_norm"))

COLUMNS = (8, 16, 32, 64)
TILES = (2048, 4096, 8192)
WARPS = (2, 4)


def programs_of(name: str, shape: dict, device: torch.device) -> int:
    """Programs the op's backward launches for ``shape`` (rows x hidden) on ``device``."""
    rows, block = shape["tokens"], rms_norm.block_for(shape["hidden"])
    if name == "layer_norm":
        at_once = layer_norm._rows_at_once(block)
        return layer_norm._backward_programs(cdiv(rows, at_once), device, block)
    at_once = rms_norm.backward_rows(shape["hidden"], block, residual=False)
    return rms_norm.persistent_programs(cdiv(rows, at_once), device, block)


def cases(quick: bool) -> list[tuple[str, dict]]:
    if quick:
        return [("rms_norm", ops.QUICK_NORM[0]), ("layer_norm", ops.QUICK_NORM[0])]
    return ([("rms_norm", s) for s in ops.HEAD_NORM + ops.VISION_RMS_NORM + ops.NORM]
            + [("layer_norm", s) for s in ops.VISION_NORM + ops.NORM])


@contextlib.contextmanager
def settings(columns: int, tile: int, warps: int):
    saved = partial_sums._COLUMNS, partial_sums._TILE, partial_sums._WARPS
    partial_sums._COLUMNS, partial_sums._TILE, partial_sums._WARPS = columns, tile, warps
    try:
        yield
    finally:
        partial_sums._COLUMNS, partial_sums._TILE, partial_sums._WARPS = saved


def torch_sums(partial: torch.Tensor, dtypes) -> list[torch.Tensor]:
    """What the norms did before the Triton reduction: a sum and a cast a gradient."""
    return [partial[:, index].sum(0).to(dtype) for index, dtype in enumerate(dtypes)]


def measure(name: str, shape: dict, system: str, setting: dict, fn, timing: dict) -> None:
    config = {"op": f"{name}_partial_sums", **shape, **(setting or {"default": True})}
    try:
        both = common.time_fwd_bwd(fn, **timing)
        kernels = common.kernel_ms(fn) if torch.cuda.is_available() else None
    except Exception as exc:  # a setting the compiler rejects is recorded, not fatal
        common.record(system, config, common.TIME, None, common.describe(exc))
        return
    common.record(system, config, common.TIME, both)
    if kernels is not None:
        common.record(system, config, common.KERNEL_TIME, kernels)
    kernel_text = "" if kernels is None else f", kernels {kernels * 1000:.2f} us"
    print(f"{name} {common.shape_text(shape)} {system} {setting or 'default'}: {both * 1000:.2f} us"
          f"{kernel_text}", flush=True)


def main() -> None:
    args, timing = common.sweep_arguments(__doc__.split("\n\n")[0], "partial-sums",
                                          {"warmup": 5, "rep": 20})
    device = common.device()
    grid = [{}] + [{"columns": c, "tile": t, "warps": w}
                   for c, t, w in itertools.product(COLUMNS, TILES, WARPS)]
    timed = set()
    for name, shape in cases(args.quick):
        dtypes = (torch.bfloat16,) * (2 if name == "layer_norm" else 1)
        programs = programs_of(name, shape, device)
        if (name, programs, shape["hidden"]) in timed:
            continue
        timed.add((name, programs, shape["hidden"]))
        partial = partial_sums.partial_buffer(programs, len(dtypes), shape["hidden"], device)
        partial.normal_()
        shape = {**shape, "programs": programs}
        expected = torch_sums(partial, dtypes)
        measure(name, shape, "torch", {}, lambda p=partial, d=dtypes: torch_sums(p, d), timing)
        for setting in grid[:3] if args.quick else grid:
            with settings(**setting) if setting else contextlib.nullcontext():
                sums = partial_sums.sum_partials(partial, *dtypes)
                for got, want in zip(sums, expected, strict=True):
                    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
                measure(name, shape, "fusetune", setting,
                        lambda p=partial, d=dtypes: partial_sums.sum_partials(p, *d), timing)
        common.release()


if __name__ == "__main__":
    main()
