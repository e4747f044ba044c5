"""Source variants of a fusetune kernel, timed side by side by ``bench/ops.py`` in one call.

A launch setting can be swept from outside (``bench/tune_rows.py``); a change to a kernel's body
cannot. This copies the checkout's ``fusetune`` package once per variant into a scratch folder,
applies the variant's text replacements to it (each must match exactly once, so a variant that no
longer fits the source fails loudly), and runs ``bench/ops.py`` on that copy for the variant's ops,
fusetune alone, in a subprocess, correctness checks included. Each variant's records go to
``DIR/ops-<tag>-<variant>.jsonl``, kernel time and its fraction of copy bandwidth included;
``shipped`` is the source as it is.

The variants are of the RMSNorm backward (``fusetune/ops/rms_norm.py``), where add_rms_norm stays
at 0.77 of copy: ``dw_vector`` keeps the weight-gradient partial sum as one row (the rows of a
step summed at once) instead of a (rows x block) tile, which holds fewer registers a thread;
``evict_first`` marks the streamed loads (dy, the saved input, the residual gradient) as the
first to leave L2; ``ds_before_reduction`` (eighteenth session) loads the residual gradient with dy
and the input, before the row's reduction, instead of after it: 5-8% slower by kernel time
(``ops-h200-rms-ds-*.jsonl``: 0.703 against 0.651 ms at 32768 x 4096), so not taken.
Nineteenth session, for rms_norm on per-head rows (131072 x 256, 0.94x torch.compile), three
variants of the then source, one call (``ops-h200-narrow-*.jsonl``, kernel time): software-pipelining
the backward's row loop (three stages) was 10% faster where a step takes one row (4,096- and
2,048-wide rows), 1.45-1.55x slower where it takes two (8,192-wide), no different on narrow rows;
tiles of up to 1,024 elements with two warps instead of four were 2-5% faster on narrow rows;
4,096-element forward tiles on rows up to 512 wide changed nothing beyond 2%. The first two were
taken (``rms_norm.backward_stages``, ``_launch.warps_for``). In a second call
(``ops-h200-stages-*.jsonl``) ``plain_loop`` and ``four_warps`` reverted them (each slower where it
applies, as before), ``wide_one_row_pipelined`` took one pipelined row a step for the plain norm's
8,192-wide rows instead of two plain ones (8% faster: taken, and the variant dropped) and
``residual_one_row_pipelined`` did so for add_rms_norm (no faster: not taken). In a third call
(``ops-h200-narrow2-*.jsonl``, ``ops-h200-ln-stages-*.jsonl``) the narrow backward's grid with 16
or 32 programs an SM instead of 8, and one warp instead of two, were each slower on narrow rows
(not taken; ``narrow_programs_16``, ``narrow_programs_32``, ``narrow_one_warp``); LayerNorm's
backward pipelined on every row of 2,048 or more, whatever its loop's length, was 11-15% faster at
8192 x 4096, 8192 x 8192 and 32768 x 4096 (taken: ``layer_norm._backward_stages``;
``ln_plain_loop`` reverts it). In a fourth call (``ops-h200-fwd-*.jsonl``) RMSNorm's forward as a
persistent, pipelined grid of 8, 16 or 32 programs an SM on narrow rows was 7% faster on
1,280-wide rows (one to a tile) and no faster on rows of 128 or 256: taken for rows of one tile
(``rms_norm.forward_grid``); ``forward_per_tile`` reverts it. LayerNorm's forward written as the
same loop was 5-13% slower on wide rows, where it ran one tile a program as before, in two calls
(``ops-h200-fwd2-*.jsonl``, ``ops-h200-fwd3-*.jsonl``, the latter beside that loop replaced by a
single tile, which restored the earlier times): it keeps a program a tile.
Twenty-fifth session, for swiglu and geglu, which tie with torch.compile at the copy rate
(``ops-h200-glu-variants-*.jsonl``, ``ops-h200-glu-hints-rivals.jsonl`` beside them in the same
call): L2 hints on the GLU kernels' streamed loads (``glu_evict_loads``), and on their stores too
(``glu_evict_all``), made them 4-7% slower at all six shapes, and at four of them with the stores
(swiglu 8192 x 14336 0.434 -> 0.453 ms): not taken.
Run on the GPU: ``python bench/kernel_variants.py --out DIR`` (``--quick`` under the interpreter).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RMS_NORM = "fusetune/ops/rms_norm.py"
LAUNCH = "fusetune/ops/_launch.py"
LAYER_NORM = "fusetune/ops/layer_norm.py"
GLU = "fusetune/ops/glu.py"
_DW_TILE = "dw = tl.zeros((ROWS, BLOCK), dtype=tl.float32)"
_LOAD_DY = "tl.load(DY + rows64 * stride_dy + cols[None, :], mask=tile, other=0.0)"
_LOAD_H = "tl.load(H + rows64 * stride_h + cols[None, :], mask=tile, other=0.0)"
_LOAD_DS = "tl.load(DS + rows64 * stride_ds + cols[None, :], mask=tile, other=0.0)"
_RSTD_LOAD = "            rstd = tl.load(RSTD + rows, mask=in_rows, other=0.0)[:, None]\n"
_EARLY_DS = "            if HAS_DSUM:\n                ds = " + _LOAD_DS + ".to(tl.float32)\n"
_PER_TILE = (RMS_NORM, "    if not ROW_TILE < block <= NARROW_BLOCK:\n",
             "    if True:  # a program a tile everywhere\n")


def _evicting(load: str) -> str:
    return load[:-1] + ', eviction_policy="evict_first")'


# The GLU kernels' loads (each input is read once) and stores (each output written once).
_GLU_LOADS = ("tl.load(gate_ptr + g_offs, mask=mask, other=0.0)",
              "tl.load(up_ptr + u_offs, mask=mask, other=0.0)",
              *(f"{name}_rs, STRIDED), mask=mask,\n{' ' * indent}other=0.0)"
                for name, indent in (("grad", 23), ("gate", 23), ("up", 21))))
_GLU_STORES = ("out.to(out_ptr.dtype.element_ty), mask=mask)",
               "(grad * up * dact).to(dgate_ptr.dtype.element_ty), mask=mask)",
               "(grad * act).to(dup_ptr.dtype.element_ty), mask=mask)")


VARIANTS: dict[str, list[tuple[str, str, str]]] = {
    "shipped": [],
    "dw_vector": [
        (RMS_NORM, _DW_TILE, "dw = tl.zeros((BLOCK,), dtype=tl.float32)"),
        (RMS_NORM, "dw += dy * normed\n", "dw += tl.sum(dy * normed, axis=0)\n"),
        (RMS_NORM, "dw += dy * normed.to(H.dtype.element_ty).to(tl.float32)",
         "dw += tl.sum(dy * normed.to(H.dtype.element_ty).to(tl.float32), axis=0)"),
        (RMS_NORM, "cols, tl.sum(dw, axis=0), mask=mask)", "cols, dw, mask=mask)"),
    ],
    "evict_first": [(RMS_NORM, load, _evicting(load)) for load in (_LOAD_DY, _LOAD_H, _LOAD_DS)],
    "ds_before_reduction": [
        (RMS_NORM, _RSTD_LOAD, _RSTD_LOAD + _EARLY_DS),
        (RMS_NORM, "                dx += " + _LOAD_DS + ".to(tl.float32)\n", "                dx += ds\n"),
    ],
    # Nineteenth session: each reverts or extends one of that session's RMSNorm launch changes.
    "plain_loop": [(RMS_NORM, "    return _PIPELINE_STAGES if rows_at_once == 1 else 1\n", "    return 1\n")],
    "four_warps": [(LAUNCH, "    return 2\n", "    return 4\n")],
    "residual_one_row_pipelined": [
        (RMS_NORM, "{(4096, True): 2, (8192, True): 2}", "{}"),
    ],
    "narrow_programs_16": [(LAUNCH, "_NARROW_PROGRAMS_PER_SM = 8\n", "_NARROW_PROGRAMS_PER_SM = 16\n")],
    "narrow_programs_32": [(LAUNCH, "_NARROW_PROGRAMS_PER_SM = 8\n", "_NARROW_PROGRAMS_PER_SM = 32\n")],
    "narrow_one_warp": [(LAUNCH, "    return 2\n", "    return 1\n")],
    "ln_plain_loop": [(LAYER_NORM, "_PIPELINED_BLOCK = 2048\n", "_PIPELINED_BLOCK = 1 << 30\n")],
    "forward_per_tile": [_PER_TILE],
    # Twenty-fifth session, for swiglu and geglu (a tie with torch.compile at the copy rate): the
    # streamed loads marked the first to leave L2, and the stores too (``.cs``: cache streaming).
    "glu_evict_loads": [(GLU, load, _evicting(load)) for load in _GLU_LOADS],
    "glu_evict_all": [(GLU, load, _evicting(load)) for load in _GLU_LOADS]
    + [(GLU, store, store[:-1] + ', cache_modifier=".cs")') for store in _GLU_STORES],
}


def patched_copy(variant: str, scratch: Path) -> Path:
    """A copy of the checkout's ``fusetune`` and ``bench`` with ``variant``'s replacements applied."""
    root = scratch / variant
    for folder in ("fusetune", "bench"):
        shutil.copytree(ROOT / folder, root / folder, ignore=shutil.ignore_patterns("results", "__pycache__"))
    for relative, old, new in VARIANTS[variant]:
        path = root / relative
        text = path.read_text()
        if text.count(old) != 1:
            raise SystemExit(f"variant {variant}: {old!r} occurs {text.count(old)} times in {relative}")
        path.write_text(text.replace(old, new))
    return root


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the JSON lines")
    parser.add_argument("--tag", default="h200-rms-variants")
    parser.add_argument("--ops", default="add_rms_norm,rms_norm")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--quick", action="store_true", help="tiny shapes (plumbing)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    failed = 0
    with tempfile.TemporaryDirectory() as scratch:
        for variant in args.variants.split(","):
            root = patched_copy(variant, Path(scratch))
            command = [sys.executable, str(root / "bench" / "ops.py"), "--out", str(args.out.resolve()),
                       "--tag", f"{args.tag}-{variant}", "--ops", args.ops, "--systems", "fusetune",
                       ] + (["--quick"] if args.quick else [])
            print(f"== {variant}", flush=True)
            failed += subprocess.run(command, cwd=root / "bench").returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
