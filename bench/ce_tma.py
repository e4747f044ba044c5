"""Experiment: cross-entropy's row kernel with TMA loads, few rows in flight so a row's second read
comes from L2.

The shipped row kernel (``fusetune.ops.cross_entropy``) runs a program a row: about a thousand rows
are in flight, far more than L2 holds, so its gradient pass re-reads each row from HBM and the
logits cross HBM three times. Persistent grids of one or two programs an SM, which would keep a
row in L2, were slower (``bench/RESULTS.md``): a program's plain loads, its reductions in between,
left HBM idle. Here the loads are TMA copies of (``CHUNKS`` x 256)-column blocks into shared memory,
``STAGES`` of them in flight while the program reduces the block before, over a 3-D view of the
logits (rows, columns / 256, 256) (the vocabulary a multiple of 256). Timed by ``do_bench`` (kernel
only, L2 flushed) against the shipped kernel at the ops benchmark's three vocabularies; losses and
gradients checked against it.

    python bench/ce_tma.py --out bench/results/ce-tma-h200.jsonl
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import common
import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # fusetune from this checkout

from fusetune.ops._launch import sm_count  # noqa: E402
from fusetune.ops.cross_entropy import cross_entropy_rows  # noqa: E402

WIDTH = 256  # columns a TMA box row holds (the hardware's largest box dimension)
IGNORE = -100
SHAPES = ((8192, 128256), (8192, 262144))
QUICK_SHAPES = ((5, 1024), (6, 1280))
SETTINGS = {  # (CHUNKS, STAGES, warps, programs an SM, TMA stores)
    "full": list(itertools.product((32, 64), (3, 4, 6), (8, 16), (1, 2, 3), (True, False))),
    "quick": [(2, 2, 4, 1, True), (2, 2, 4, 1, False)],
}


@triton.jit
def _tma_row_kernel(in_desc, out_desc, logits_ptr, grad_ptr, row_stride, labels_ptr, loss_ptr, n_rows,
                    n_chunks, ignore_index, CHUNKS: tl.constexpr, STAGES: tl.constexpr, WIDTH: tl.constexpr,
                    TMA_STORE: tl.constexpr):
    cols = tl.arange(0, CHUNKS)[:, None] * WIDTH + tl.arange(0, WIDTH)[None, :]
    n_cols = n_chunks * WIDTH
    last = (n_chunks - 1) // CHUNKS * CHUNKS
    for row in range(tl.program_id(0), n_rows, tl.num_programs(0)):
        label = tl.load(labels_ptr + row).to(tl.int32)
        if label == ignore_index:
            zeros = tl.zeros([1, CHUNKS, WIDTH], dtype=out_desc.dtype)
            for chunk in tl.range(0, n_chunks, CHUNKS):
                out_desc.store([row, chunk, 0], zeros)
            tl.store(loss_ptr + row, 0.0)
        else:
            top = tl.full([], float("-inf"), dtype=tl.float32)
            total = tl.zeros([], dtype=tl.float32)
            for chunk in tl.range(0, n_chunks, CHUNKS, num_stages=STAGES):
                z = in_desc.load([row, chunk, 0]).reshape(CHUNKS, WIDTH).to(tl.float32)
                z = tl.where(chunk * WIDTH + cols < n_cols, z, float("-inf"))
                new_top = tl.maximum(top, tl.max(tl.max(z, axis=1), axis=0))
                total = total * tl.exp(top - new_top) + tl.sum(tl.sum(tl.exp(z - new_top), axis=1), axis=0)
                top = new_top
            lse = top + tl.log(total)
            z_label = tl.load(logits_ptr + tl.cast(row, tl.int64) * row_stride + label).to(tl.float32)
            tl.store(loss_ptr + row, lse - z_label)
            for step in tl.range(0, n_chunks, CHUNKS, num_stages=STAGES):
                chunk = last - step  # backwards: the blocks read last first
                z = in_desc.load([row, chunk, 0]).reshape(CHUNKS, WIDTH).to(tl.float32)
                grad = tl.exp(z - lse)
                grad = tl.where(chunk * WIDTH + cols == label, grad - 1.0, grad)
                if TMA_STORE:
                    out_desc.store([row, chunk, 0], grad.to(out_desc.dtype).reshape(1, CHUNKS, WIDTH))
                else:
                    offs = chunk * WIDTH + cols
                    tl.store(grad_ptr + tl.cast(row, tl.int64) * row_stride + offs,
                             grad.to(grad_ptr.dtype.element_ty), mask=offs < n_cols)


def tma_rows(logits: torch.Tensor, labels: torch.Tensor, chunks: int, stages: int, warps: int,
             programs_per_sm: int, tma_store: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row losses and the gradient (grad_output 1) of 2-D contiguous ``logits``."""
    n_rows, n_cols = logits.shape
    if n_cols % WIDTH:
        raise ValueError(f"the vocabulary ({n_cols}) must be a multiple of {WIDTH}")
    grad = torch.empty_like(logits)
    losses = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    view = (n_rows, n_cols // WIDTH, WIDTH)
    strides = (n_cols, WIDTH, 1)
    block = [1, chunks, WIDTH]
    in_desc = TensorDescriptor(logits, view, strides, block)
    out_desc = TensorDescriptor(grad, view, strides, block)
    programs = min(n_rows, programs_per_sm * sm_count(logits.device)) if logits.is_cuda else n_rows
    _tma_row_kernel[(programs,)](in_desc, out_desc, logits, grad, n_cols, labels, losses, n_rows,
                                 n_cols // WIDTH, IGNORE, CHUNKS=chunks, STAGES=stages, WIDTH=WIDTH,
                                 TMA_STORE=tma_store, num_warps=warps)
    return losses, grad


def shipped_rows(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ones = torch.ones(1, dtype=torch.float32, device=logits.device)
    return cross_entropy_rows(logits, labels, ignore_index=IGNORE, label_smoothing=0.0, z_loss=0.0,
                              softcap=None, grad_scale=ones)


def kernel_ms(fn) -> float:
    if not torch.cuda.is_available():
        return float("nan")
    return triton.testing.do_bench(fn, warmup=25, rep=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="tiny shapes under the interpreter (plumbing)")
    args = parser.parse_args()
    common.open_results(args.out)
    device = common.device()
    for n_rows, n_cols in QUICK_SHAPES if args.quick else SHAPES:
        torch.manual_seed(0)
        logits = (torch.randn(n_rows, n_cols, device=device) * 2).to(torch.bfloat16)
        labels = torch.randint(0, n_cols, (n_rows,), device=device)
        labels[::7] = IGNORE
        config = {"op": "cross_entropy_rows", "tokens": n_rows, "vocab": n_cols}
        reference = shipped_rows(logits, labels)
        ms = kernel_ms(lambda logits=logits, labels=labels: shipped_rows(logits, labels))
        common.record("fusetune", config, "kernel_ms", ms)
        print(f"{n_rows}x{n_cols} shipped: {ms:.3f} ms", flush=True)
        for chunks, stages, warps, per_sm, tma_store in SETTINGS["quick" if args.quick else "full"]:
            setting = {"chunks": chunks, "stages": stages, "warps": warps, "programs_per_sm": per_sm,
                       "tma_store": tma_store}
            try:
                losses, grad = tma_rows(logits, labels, chunks, stages, warps, per_sm, tma_store)
                loss_error = (losses - reference[0]).abs().max().item()
                grad_error = (grad.float() - reference[1].float()).abs().max().item()
                launch = (chunks, stages, warps, per_sm, tma_store)
                ms = kernel_ms(lambda logits=logits, labels=labels, launch=launch:
                               tma_rows(logits, labels, *launch))
            except Exception as exc:
                common.record("tma", {**config, **setting}, "kernel_ms", None, common.describe(exc))
                print(f"  {setting}: {common.describe(exc)[:300]}", flush=True)
                continue
            common.record("tma", {**config, **setting}, "kernel_ms", ms, loss_error=loss_error,
                          grad_error=grad_error)
            print(f"  {setting}: {ms:.3f} ms (loss error {loss_error:.2e}, grad error {grad_error:.2e})",
                  flush=True)
        del logits, labels, reference
        common.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
