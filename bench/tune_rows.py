"""Launch settings of the row kernels (add + RMSNorm, LayerNorm, RoPE) and the GLU activations on the
large shapes where they fall short of 80% of copy bandwidth or of their rivals, so that their defaults
are measured, not guessed.

The norms take num_warps from the row width (``_launch.row_warps``), the backward's persistent
grid from ``_launch._PROGRAMS_PER_SM`` (``_NARROW_PROGRAMS_PER_SM`` for narrow rows), the rows
each RMSNorm backward program loads at once from ``rms_norm.backward_rows``, LayerNorm's backward
software-pipelining stages from ``layer_norm._backward_stages`` (``--stages-only`` sweeps just
those); RoPE its tile, heads and warps a program from ``rope._MAX_TILE``, ``rope._MAX_HEADS`` and
``rope._WARPS`` (a swept heads setting replaces ``rope._HEADS_BY_HALF`` too); swiglu and geglu
(``--glu``) their flat block and warps from ``glu._LAUNCH`` (a swept setting sets every
activation's). ``--narrow`` sweeps the norms on narrow rows (per-head norms, a vision tower's
LayerNorm) over the elements a program takes (``_launch.ROW_TILE``, which sets how many rows that
is) and the backward's programs per SM; ``--odd`` the norms on rows that part-fill their block
(hidden sizes that are not a power of two, vision towers' 1,152 and 1,280) over warps, programs
per SM and RMSNorm's rows a backward step (the twenty-fourth session's first such sweep,
``rows-tuning-h200-odd.jsonl``, took the wide RMSNorm grid instead). For each configuration this
sweep sets those module values, times forward + backward (and forward alone) on bench/ops.py's
inputs, takes the step's kernel time alone (torch.profiler: the timed step can wait on the host)
and records both as fractions of the copy bandwidth measured
in the same run (bench/ops.py's byte counts); ``default`` rows are the shipped settings.
Run: ``python bench/tune_rows.py --out DIR [--quick] [--ops add_rms_norm ...]`` (writes
DIR/rows-tuning-<tag>.jsonl).
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
# The op modules (``fusetune.ops`` exports functions under the same names).
_launch, glu, layer_norm, rms_norm, rope = (importlib.import_module(f"fusetune.ops.{name}")
                                            for name in ("_launch", "glu", "layer_norm", "rms_norm", "rope"))

NORM_CASES = (("add_rms_norm", {"tokens": 32768, "hidden": 8192}),
              ("add_rms_norm", {"tokens": 32768, "hidden": 4096}),
              ("rms_norm", {"tokens": 32768, "hidden": 4096}),
              ("layer_norm", {"tokens": 32768, "hidden": 8192}),
              ("layer_norm", {"tokens": 32768, "hidden": 4096}))
ROPE_CASES = tuple(("rope", shape) for shape in ops.ROPE)
# LayerNorm's pipelining stages are also checked on bench/ops.py's smaller shapes, so that a gain at
# 32,768 rows is not a loss at 8,192.
STAGE_CASES = tuple(("layer_norm", {"tokens": tokens, "hidden": hidden})
                    for tokens in (8192, 32768) for hidden in (4096, 8192))
# Narrow rows (``_launch.rows_per_program``, ``_launch.NARROW_BLOCK``): bench/ops.py's per-head and
# vision-tower shapes.
NARROW_CASES = tuple(("rms_norm", shape) for shape in ops.HEAD_NORM + ops.VISION_RMS_NORM) + tuple(
    ("layer_norm", shape) for shape in ops.VISION_NORM) + tuple(  # and the 2,048-wide hidden sizes
    (name, shape) for name in ("rms_norm", "add_rms_norm", "layer_norm") for shape in ops.NORM
    if shape["hidden"] == 2048)
# Rows that part-fill their power-of-two block: hidden sizes that are not a power of two
# (``ops.ODD_NORM``), 56-66% of the block at 2,304, 5,120 and 5,376 (and 88% at 3,584, for
# comparison), and the vision towers' 1,280 (RMSNorm) and 1,152 (LayerNorm) in 2,048-wide blocks.
ODD_CASES = tuple((name, shape) for name in ("rms_norm", "add_rms_norm", "layer_norm")
                  for shape in ops.ODD_NORM if shape["hidden"] in (2304, 3584, 5120, 5376)) + tuple(
    ("rms_norm", shape) for shape in ops.VISION_RMS_NORM) + tuple(
    ("layer_norm", shape) for shape in ops.VISION_NORM if shape["hidden"] == 1152)
# Their warps reach below the wide rows' (a part-filled block's threads hold fewer of its elements).
ODD_WARPS = (2, 4, 8, 16)
ODD_PROGRAMS = (2, 4, 8)
ROW_TILES = (1024, 2048, 4096, 8192, 16384)
NARROW_PROGRAMS = (2, 4, 8)
QUICK_CASES = (("add_rms_norm", ops.QUICK_NORM[0]), ("layer_norm", ops.QUICK_NORM[0]),
               ("rope", ops.QUICK_ROPE[0]))
NORM_WARPS = (8, 16, 32)
PROGRAMS_PER_SM = (1, 2, 4)
# add_rms_norm and rms_norm: rows each backward program loads at once, with the warps and programs
# per SM that register pressure leaves sensible for them. (LayerNorm's backward took two rows at
# once too, once: 0.60 of copy against 0.77 with one, so it keeps one.)
BACKWARD_ROWS = (1, 2, 4)
ROWS_WARPS = (4, 8, 16)
ROWS_PROGRAMS = (2, 4)
# Software-pipelining stages of LayerNorm's backward row loop, with the shipped warps. The sweeps
# that chose 3 (rows-tuning-h200-stages*.jsonl) were read from step times; the nineteenth session's
# source variants by kernel time (bench/kernel_variants.py) set both norms' stages since.
STAGES = (1, 3)
GLU_CASES = tuple((name, shape) for name in ("swiglu", "geglu") for shape in ops.GLU)
GLU_BLOCKS = (1024, 2048, 4096, 8192)
GLU_WARPS = (4, 8, 16)
ROPE_TILES = (2048, 4096, 8192)
ROPE_HEADS = (2, 4, 8)
ROPE_WARPS = (4, 8)


@contextlib.contextmanager
def launch_settings(warps: int | None = None, programs_per_sm: int | None = None,
                    rope_tile: int | None = None, rope_heads: int | None = None,
                    backward_rows: int | None = None, stages: int | None = None,
                    row_tile: int | None = None, glu_block: int | None = None,
                    glu_warps: int | None = None):
    """Within the block the ops launch with these settings (None keeps the shipped one)."""
    saved = [(module, name, getattr(module, name)) for module, name in
             ((rms_norm, "row_warps"), (layer_norm, "row_warps"), (rope, "_WARPS"),
              (rms_norm, "backward_rows"), (_launch, "_PROGRAMS_PER_SM"), (rope, "_MAX_TILE"),
              (rope, "_MAX_HEADS"), (layer_norm, "_backward_stages"), (_launch, "ROW_TILE"),
              (_launch, "_NARROW_PROGRAMS_PER_SM"), (glu, "_LAUNCH"),
              (rope, "_HEADS_BY_HALF"))]
    try:
        if glu_block is not None or glu_warps is not None:
            glu._LAUNCH = {name: (glu_block or block, glu_warps or warps)
                           for name, (block, warps) in glu._LAUNCH.items()}
        if row_tile is not None:
            _launch.ROW_TILE = row_tile
        if warps is not None:
            for module in (rms_norm, layer_norm):
                module.row_warps = lambda n_cols, block, rows, warps=warps: warps
            rope._WARPS = warps
        if backward_rows is not None:
            rms_norm.backward_rows = lambda n_cols, block, residual, rows=backward_rows: rows
        if programs_per_sm is not None:
            _launch._PROGRAMS_PER_SM = _launch._NARROW_PROGRAMS_PER_SM = programs_per_sm
        if rope_tile is not None:
            rope._MAX_TILE = rope_tile
        if rope_heads is not None:
            rope._MAX_HEADS = rope_heads
            rope._HEADS_BY_HALF = {}
        if stages is not None:
            layer_norm._backward_stages = lambda block, stages=stages: stages
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def grid(name: str, quick: bool, stages_only: bool = False, narrow: bool = False,
         odd: bool = False) -> list[dict]:
    """The settings swept for one op, the shipped default first (``stages_only``: the default and
    the pipelining stages alone; ``narrow``: the row tile and the backward's programs per SM;
    ``odd``: part-filled rows, over warps, programs per SM and, for RMSNorm, rows a backward step)."""
    if name in ("swiglu", "geglu"):
        settings = [{"glu_block": b, "glu_warps": w}
                    for b, w in itertools.product(GLU_BLOCKS, GLU_WARPS)]
        return [{}] + (settings[:2] if quick else settings) + [{}]  # the default again: the noise
    if narrow:
        settings = [{"row_tile": t, "programs_per_sm": p}
                    for t, p in itertools.product(ROW_TILES, NARROW_PROGRAMS)]
        return [{}] + (settings[:2] if quick else settings)
    if odd:
        rows = BACKWARD_ROWS[:2] if name in ("add_rms_norm", "rms_norm") else (None,)
        settings = [{k: v for k, v in (("backward_rows", r), ("warps", w), ("programs_per_sm", p))
                     if v is not None}
                    for r, w, p in itertools.product(rows, ODD_WARPS, ODD_PROGRAMS)]
        return [{}] + (settings[:2] if quick else settings)
    if stages_only:
        settings = [{"stages": s} for s in STAGES[: 1 if quick else None]]
        return ([{}] + settings) * 2  # everything twice: the run's noise shows
    if name == "rope":
        settings = [{"rope_tile": t, "rope_heads": h, "warps": w}
                    for t, h, w in itertools.product(ROPE_TILES, ROPE_HEADS, ROPE_WARPS)]
    elif name in ("add_rms_norm", "rms_norm"):
        settings = [{"backward_rows": r, "warps": w, "programs_per_sm": p} for r, w, p in
                    itertools.product(BACKWARD_ROWS, ROWS_WARPS, ROWS_PROGRAMS)]
    else:
        settings = [{"warps": w, "programs_per_sm": p}
                    for w, p in itertools.product(NORM_WARPS, PROGRAMS_PER_SM)]
    return [{}] + (settings[:2] if quick else settings)


def measure(name: str, shape: dict, setting: dict, timing: dict, copy_rate: float) -> None:
    """Time one op on one shape with one setting (``copy_rate``: the copy bandwidth, bytes/s)."""
    op = ops.OPS_BY_NAME[name]
    config = {"op": name, **shape, **(setting or {"default": True})}
    inputs, grad_outputs = op.make(shape, "default")
    leaves = [t for t in inputs.values() if t.requires_grad]
    forward = op.fusetune()
    def step():
        for leaf in leaves:
            leaf.grad = None
        ops.forward_backward(forward, inputs, grad_outputs)

    with launch_settings(**setting):
        try:
            both = common.time_fwd_bwd(step, grad_to_none=leaves, **timing)
            kernels = common.kernel_ms(step) if torch.cuda.is_available() else None
            with torch.no_grad():
                alone = common.time_fwd_bwd(lambda: forward(**inputs), **timing)
        except Exception as exc:  # a setting the compiler rejects is recorded, not fatal
            common.record("fusetune", config, common.TIME, None, common.describe(exc))
            return
    _, n_bytes = op.cost(shape, "default")
    common.record("fusetune", config, common.TIME, both)
    common.record("fusetune", {**config, "pass": "forward"}, common.TIME, alone)
    fraction = n_bytes / (both / 1000) / copy_rate
    common.record("fusetune", config, common.ROOFLINE, fraction)
    kernel_text = ""
    if kernels is not None:
        common.record("fusetune", config, common.KERNEL_TIME, kernels)
        kernel_fraction = n_bytes / (kernels / 1000) / copy_rate
        common.record("fusetune", config, common.KERNEL_ROOFLINE, kernel_fraction)
        kernel_text = f", kernels {kernels:.3f} ms ({kernel_fraction:.2f})"
    print(f"{name} {common.shape_text(shape)} {setting or 'default'}: {both:.3f} ms "
          f"(forward {alone:.3f}), {fraction:.2f} of copy{kernel_text}", flush=True)


def main() -> None:
    def choose_ops(parser):
        parser.add_argument("--ops", nargs="+",
                            choices=[name for name, _ in NORM_CASES + ROPE_CASES + GLU_CASES],
                            help="sweep only these ops (default: all)")
        parser.add_argument("--stages-only", action="store_true",
                            help="only LayerNorm's backward pipelining stages against the default")
        parser.add_argument("--narrow", action="store_true",
                            help="only the norms on narrow rows, over row tiles and programs per SM")
        parser.add_argument("--odd", action="store_true",
                            help="only the norms on rows that part-fill their block")
        parser.add_argument("--hidden", nargs="+", type=int,
                            help="sweep only the shapes of these hidden sizes (default: all)")
        parser.add_argument("--glu", action="store_true",
                            help="only swiglu and geglu, over their block and warps")

    args, timing = common.sweep_arguments(__doc__.split("\n\n")[0], "rows-tuning",
                                          {"warmup": 25, "rep": 100}, choose_ops)
    copy_bytes = 2**20 if args.quick else 2**30
    copy_rate = common.copy_bandwidth(copy_bytes, **timing)
    common.record("device", {"op": "copy", "bytes": copy_bytes}, common.COPY, copy_rate / 1e9)
    cases = (STAGE_CASES if args.stages_only else NARROW_CASES if args.narrow else GLU_CASES if args.glu
             else ODD_CASES if args.odd else NORM_CASES + ROPE_CASES)
    quick_cases = (("swiglu", ops.QUICK_GLU[0]),) if args.glu else QUICK_CASES
    for name, shape in quick_cases if args.quick else cases:
        if args.ops and name not in args.ops:
            continue
        if args.hidden and shape.get("hidden") not in args.hidden:
            continue
        if (args.stages_only or args.narrow) and name == "rope":
            continue
        if args.stages_only and name != "layer_norm":
            continue
        for setting in grid(name, args.quick, args.stages_only, args.narrow, args.odd):
            measure(name, shape, setting, timing, copy_rate)
            common.release()


if __name__ == "__main__":
    main()
