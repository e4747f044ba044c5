"""Finishing the parameter gradients of the norms' persistent backwards.

Each program of a persistent backward (RMSNorm, add + RMSNorm, LayerNorm) keeps fp32 partial sums of
the parameter gradients over its rows and writes them as one row of a ``(programs, gradients,
n_cols)`` buffer (``partial_buffer``; LayerNorm's weight and bias gradients share one). ``sum_partials``
adds the rows up and casts each gradient to its parameter's dtype in one Triton launch.

Why a kernel of our own: torch's ``partial.sum(0).to(dtype)`` is two launches a gradient (four for
LayerNorm), and its column reduction is latency-bound on the short, wide buffers the backwards leave
(1,056 x 128 fp32 for a per-head norm on an H200: 6.4 us of reduction and 1 us of cast against a
backward of 61 us, ``per-head-norm-profile-h200.txt``). Here every program owns a few columns of one
gradient and loads a tall tile of its rows at once, so the whole buffer is in flight together.
"""

from __future__ import annotations

import torch

from fusetune.ops._direct_launch import direct_launch
from fusetune.ops._launch import cdiv, next_power_of_2, triton

# Columns a program of the reduction owns, and the elements of the (programs x columns) tile it
# loads at a time (a program walks the partial rows in tiles of ``_TILE // _COLUMNS`` rows).
# bench/partial_sums.py on an H200 (partial-sums-h200.jsonl, kernel time, bf16 gradients), over
# 8-64 columns, tiles of 2,048-8,192 and 2 or 4 warps: these were the best on average, within
# 0.5 us of each shape's best but LayerNorm's at 8,192 wide (5.0 us against 3.8). The reduction
# and cast take 2.2-2.9 us for RMSNorm's one gradient (torch's sum and cast: 6.3-7.9 us) and
# 2.1-5.0 us for LayerNorm's two (torch's: 12.1-15.0 us).
_COLUMNS = 16
_TILE = 8192
_WARPS = 4

if triton is not None:
    import triton.language as tl

    @direct_launch
    @triton.jit
    def _sum_partials_kernel(
        PARTIAL, FIRST, SECOND, n_programs, n_cols, stride_program,
        BLOCK_PROGRAMS: tl.constexpr, BLOCK_COLS: tl.constexpr,
    ):
        # Program (c, g) adds column block c of gradient g over the rows of PARTIAL (fp32,
        # n_programs x gradients x n_cols) and writes it to FIRST (g = 0) or SECOND (g = 1) in that
        # output's dtype. With one gradient SECOND is FIRST and g is always 0.
        gradient = tl.program_id(1)
        cols = tl.program_id(0) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
        in_cols = cols < n_cols
        column_base = PARTIAL + gradient * n_cols + cols[None, :]
        total = tl.zeros((BLOCK_PROGRAMS, BLOCK_COLS), dtype=tl.float32)
        for first in tl.range(0, n_programs, BLOCK_PROGRAMS):
            programs = first + tl.arange(0, BLOCK_PROGRAMS)
            tile = (programs < n_programs)[:, None] & in_cols[None, :]
            total += tl.load(column_base + programs[:, None] * stride_program, mask=tile, other=0.0)
        summed = tl.sum(total, axis=0)
        if gradient == 1:
            tl.store(SECOND + cols, summed.to(SECOND.dtype.element_ty), mask=in_cols)
        else:
            tl.store(FIRST + cols, summed.to(FIRST.dtype.element_ty), mask=in_cols)


def partial_buffer(programs: int, gradients: int, n_cols: int, device: torch.device) -> torch.Tensor | None:
    """The fp32 (programs x gradients x n_cols) buffer a persistent backward fills with its programs'
    partial sums of ``gradients`` parameter gradients (None when there are none to compute)."""
    if gradients == 0:
        return None
    return torch.empty((programs, gradients, n_cols), dtype=torch.float32, device=device)


def sum_partials(partial: torch.Tensor, *dtypes: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Each gradient of ``partial`` (from ``partial_buffer``) summed over the programs and cast to
    its dtype in ``dtypes`` (one per gradient, at most two), in one launch."""
    n_programs, gradients, n_cols = partial.shape
    if gradients != len(dtypes) or gradients not in (1, 2):
        raise ValueError(f"fusetune: {gradients} partial gradients but dtypes {dtypes}; give one dtype "
                         f"for each of one or two gradients.")
    outputs = tuple(torch.empty(n_cols, dtype=dtype, device=partial.device) for dtype in dtypes)
    block_programs = min(next_power_of_2(n_programs), max(1, _TILE // _COLUMNS))
    _sum_partials_kernel[(cdiv(n_cols, _COLUMNS), gradients)](
        partial, outputs[0], outputs[-1], n_programs, n_cols, partial.stride(0),
        BLOCK_PROGRAMS=block_programs, BLOCK_COLS=_COLUMNS, num_warps=_WARPS,
    )
    return outputs
