"""LayerNorm over the last dim as Triton forward and backward kernels.

The forward runs one program per row (per several rows where rows are narrow, and two where they
fill a 2,048-wide block: ``_rows_at_once``) and saves the row's fp32 mean and rstd; the backward
recomputes the normalised row from the saved input, as many rows at a time, on a bounded
persistent grid whose programs each keep fp32 partial sums of the weight and bias gradients
(finished together, in one launch, by ``partial_sums.sum_partials``, as ``rms_norm``'s are). The
backward's row loop is software-pipelined where rows are 2,048 wide or more (``_backward_stages``):
the next rows' loads are issued while the current row is computed.
"""

from __future__ import annotations

import torch

from fusetune.ops._direct_launch import direct_launch
from fusetune.ops._graph_ops import graph_op
from fusetune.ops._launch import (
    as_rows,
    block_for,
    cdiv,
    check_float,
    check_row_width,
    check_same_device,
    persistent_programs,
    public_op,
    row_warps,
    rows_per_program,
    triton,
    unit_stride,
    use_triton,
)
from fusetune.ops.partial_sums import partial_buffer, sum_partials

# Stages of the backward's row loop (``tl.range``'s ``num_stages``), measured on the H200 by kernel
# time (bench/kernel_variants.py, ops-h200-ln-stages-*.jsonl, one call): 3 stages on rows of 2,048
# or more took the op from 0.117 to 0.104 ms at 8192 x 4096, 0.240 to 0.205 at 8192 x 8192, 0.396
# to 0.348 at 32768 x 4096 and 0.188 to 0.185 at SigLIP's 32768 x 1152, and left 32768 x 8192 as it
# was. (An earlier sweep by step time, noisy where the host is slower than the kernels, had kept
# 4,096-wide rows and short loops plain: rows-tuning-h200-stages*.jsonl.) 2 stages were slower, 4
# the same as 3, there.
_PIPELINED_BLOCK = 2048
_PIPELINE_STAGES = 3


def _backward_stages(block: int) -> int:
    """Stages of the backward's row loop over rows of ``block``."""
    return _PIPELINE_STAGES if block >= _PIPELINED_BLOCK else 1


# Rows in 2,048-wide blocks (Llama-3.2-1B's and Qwen2.5-3B's 2,048, SigLIP's 1,152) go two to a
# program, forward and backward, on the backward grid of wide rows rather than narrow ones:
# 10-12% faster by kernel time on the H200 (bench/tune_rows.py --narrow,
# rows-tuning-h200-narrow-2048.jsonl: 32768 x 2048 0.205 -> 0.186 ms, 8192 x 2048 0.072 -> 0.063,
# 32768 x 1152 0.183 -> 0.164); rows of 1,024 were 8% slower with it, so they keep the narrow launch.
_PAIRED_BLOCK = 2048


def _rows_at_once(block: int) -> int:
    """Rows a program takes at once, forward and backward, over rows of ``block``."""
    return 2 if block == _PAIRED_BLOCK else rows_per_program(block)


def _backward_programs(n_groups: int, device: torch.device, block: int) -> int:
    """Programs of the persistent backward over ``n_groups`` groups of rows of ``block``."""
    return persistent_programs(n_groups, device, None if block == _PAIRED_BLOCK else block)


if triton is not None:
    import triton.language as tl

    from fusetune.ops._launch import row_tile

    @direct_launch
    @triton.jit
    def _layer_norm_forward_kernel(
        X, W, B, Y, MEAN, RSTD,
        stride_x, n_rows, n_cols, eps,
        HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
    ):
        # One program per ROWS rows, a (ROWS, BLOCK) tile; Y is contiguous, n_cols wide.
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        rows, rows64, in_rows, tile = row_tile(tl.program_id(0) * ROWS, n_rows, mask, ROWS)
        h = tl.load(X + rows64 * stride_x + cols[None, :], mask=tile, other=0.0).to(tl.float32)
        mean = tl.sum(h, axis=1) / n_cols
        centred = tl.where(tile, h - mean[:, None], 0.0)
        rstd = tl.math.rsqrt(tl.sum(centred * centred, axis=1) / n_cols + eps)
        tl.store(MEAN + rows, mean, mask=in_rows)
        tl.store(RSTD + rows, rstd, mask=in_rows)
        y = centred * rstd[:, None]
        if HAS_WEIGHT:
            y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + rows64 * n_cols + cols[None, :], y.to(Y.dtype.element_ty), mask=tile)

    @direct_launch
    @triton.jit
    def _layer_norm_backward_kernel(
        DY, X, W, MEAN, RSTD, DX, DW_PARTIAL, DB_PARTIAL,
        stride_dy, stride_x, stride_partial, n_rows, n_cols,
        HAS_WEIGHT: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
        BLOCK: tl.constexpr, ROWS: tl.constexpr, STAGES: tl.constexpr,
    ):
        # Persistent: program p handles the groups of ROWS rows p, p + P, ... and writes row p of
        # each fp32 partial sum (P x n_cols, rows stride_partial apart). DX is contiguous, n_cols wide.
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)[None, :]
        if COMPUTE_DW:
            dw = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
        if COMPUTE_DB:
            db = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
        for group in tl.range(pid, tl.cdiv(n_rows, ROWS), tl.num_programs(0), num_stages=STAGES):
            rows, rows64, in_rows, tile = row_tile(group * ROWS, n_rows, mask, ROWS)
            dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=tile, other=0.0).to(tl.float32)
            h = tl.load(X + rows64 * stride_x + cols[None, :], mask=tile, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + rows, mask=in_rows, other=0.0)[:, None]
            mean = tl.load(MEAN + rows, mask=in_rows, other=0.0)[:, None]
            normed = tl.where(tile, (h - mean) * rstd, 0.0)
            if HAS_WEIGHT:
                dnormed = dy * w
            else:
                dnormed = dy
            if COMPUTE_DW:
                dw += dy * normed
            if COMPUTE_DB:
                db += dy
            mean_dn = (tl.sum(dnormed, axis=1) / n_cols)[:, None]
            mean_dn_n = (tl.sum(dnormed * normed, axis=1) / n_cols)[:, None]
            dx = rstd * (dnormed - mean_dn - normed * mean_dn_n)
            tl.store(DX + rows64 * n_cols + cols[None, :], dx.to(DX.dtype.element_ty), mask=tile)
        own_row = tl.cast(pid, tl.int64) * stride_partial + cols
        if COMPUTE_DW:
            tl.store(DW_PARTIAL + own_row, tl.sum(dw, axis=0), mask=mask)
        if COMPUTE_DB:
            tl.store(DB_PARTIAL + own_row, tl.sum(db, axis=0), mask=mask)


def _forward_outputs(
    rows: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> list[torch.Tensor]:
    """New ``[y, mean, rstd]`` for :func:`_forward`'s rows."""
    n_rows = rows.shape[0]
    y = torch.empty(rows.shape, dtype=rows.dtype, device=rows.device)
    mean = torch.empty(n_rows, dtype=torch.float32, device=rows.device)
    return [y, mean, torch.empty_like(mean)]


@graph_op("layer_norm_forward", fake=_forward_outputs)
def _forward(
    rows: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> list[torch.Tensor]:
    """The forward launch over 2-D ``rows``: ``[y, mean, rstd]``."""
    y, mean, rstd = outputs = _forward_outputs(rows, weight, bias, eps)
    n_rows, n_cols = rows.shape
    block = block_for(n_cols)
    rows_at_once = _rows_at_once(block)
    _layer_norm_forward_kernel[(cdiv(n_rows, rows_at_once),)](
        rows, weight, bias, y, mean, rstd,
        rows.stride(0), n_rows, n_cols, eps,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        BLOCK=block, ROWS=rows_at_once, num_warps=row_warps(n_cols, block, rows_at_once),
    )
    return outputs


def _backward_outputs(
    dy: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor,
    rstd: torch.Tensor, dw_dtype: torch.dtype | None, db_dtype: torch.dtype | None,
) -> list[torch.Tensor]:
    """New ``[dx]``, then dw and db where their dtypes are given, for :func:`_backward`."""
    dtypes = [dtype for dtype in (dw_dtype, db_dtype) if dtype is not None]
    params = [torch.empty(rows.shape[1], dtype=dtype, device=rows.device) for dtype in dtypes]
    return [torch.empty(rows.shape, dtype=rows.dtype, device=rows.device), *params]


@graph_op("layer_norm_backward", fake=_backward_outputs)
def _backward(
    dy: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor,
    rstd: torch.Tensor, dw_dtype: torch.dtype | None, db_dtype: torch.dtype | None,
) -> list[torch.Tensor]:
    """The backward launch over 2-D rows: ``[dx]``, then the weight's gradient (in ``dw_dtype``)
    and the bias's (in ``db_dtype``) where those are given (None: not wanted)."""
    n_rows, n_cols = rows.shape
    block = block_for(n_cols)
    dx = torch.empty(rows.shape, dtype=rows.dtype, device=rows.device)
    rows_at_once = _rows_at_once(block)
    programs = _backward_programs(cdiv(n_rows, rows_at_once), rows.device, block)
    need_dw, need_db = dw_dtype is not None, db_dtype is not None
    # The weight gradient's partial sums first, then the bias's, in one buffer.
    dtypes = [dtype for dtype in (dw_dtype, db_dtype) if dtype is not None]
    partial = partial_buffer(programs, len(dtypes), n_cols, rows.device)
    _layer_norm_backward_kernel[(programs,)](
        dy, rows, weight, mean, rstd, dx,
        partial[:, 0] if need_dw else None, partial[:, -1] if need_db else None,
        dy.stride(0), rows.stride(0), 0 if partial is None else partial.stride(0), n_rows, n_cols,
        HAS_WEIGHT=weight is not None, COMPUTE_DW=need_dw, COMPUTE_DB=need_db,
        BLOCK=block, ROWS=rows_at_once, STAGES=_backward_stages(block),
        num_warps=row_warps(n_cols, block, rows_at_once),
    )
    return [dx, *(sum_partials(partial, *dtypes) if dtypes else ())]


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        rows, weight, bias = as_rows(x), unit_stride(weight), unit_stride(bias)
        y, mean, rstd = _forward(rows, weight, bias, eps)
        ctx.save_for_backward(rows, weight, mean, rstd)
        ctx.shape = x.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        rows, weight, mean, rstd = ctx.saved_tensors
        need_dw = weight is not None and ctx.needs_input_grad[1]
        need_db = ctx.bias_dtype is not None and ctx.needs_input_grad[2]
        dx, *params = _backward(
            as_rows(dy), rows, weight, mean, rstd, weight.dtype if need_dw else None,
            ctx.bias_dtype if need_db else None,
        )
        dw = params[0] if need_dw else None
        db = params[-1] if need_db else None
        return dx.view(ctx.shape), dw, db, None


def _check_inputs(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> None:
    check_float("x", x)
    check_same_device("x", x, weight=weight, bias=bias)
    if x.dim() == 0:
        raise ValueError("fusetune: layer_norm needs x with at least one dimension, got a scalar.")
    check_row_width(x.shape[-1])
    for name, param in (("weight", weight), ("bias", bias)):
        if param is None:
            continue
        check_float(name, param)
        if param.shape != (x.shape[-1],):
            raise ValueError(
                f"fusetune: {name} has shape {tuple(param.shape)}, expected ({x.shape[-1]},) "
                f"to match the last dim of x {tuple(x.shape)}."
            )


def layer_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Plain PyTorch LayerNorm over the last dim, in float32 (or wider), returned in x's dtype.

    The result is contiguous whatever x's layout, as ``F.layer_norm``'s is (callers ``.view`` it).
    """
    h = x.to(torch.promote_types(x.dtype, torch.float32))  # x.float(); float64 stays float64
    centred = h - h.mean(-1, keepdim=True)
    y = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(h.dtype)
    if bias is not None:
        y = y + bias.to(h.dtype)
    return y.to(x.dtype).contiguous()


@public_op
def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """LayerNorm over the last dim of ``x``, fused into one Triton kernel (and one for backward).

    Same result as ``torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps)``, the
    maths of ``torch.nn.LayerNorm`` as transformers uses it (e.g. the ``layer_norm1`` /
    ``layer_norm2`` of ``transformers.models.siglip.modeling_siglip.SiglipEncoderLayer``): the
    statistics, the scale and the shift are computed in float32 and the result rounded once to
    ``x.dtype``. The output is always ``x.dtype``, also when ``weight``/``bias`` have another
    dtype (where F.layer_norm would want them to match). ``weight`` and/or ``bias`` may be None.

    Why: one pass reads ``x`` and writes the output; backward keeps ``x`` and a float32 mean and
    rstd per row, recomputes the normalised row, and reduces the parameter gradients in float32.
    Gradients flow to ``x`` and to ``weight``/``bias`` when they require grad (returned in
    their own dtypes). CUDA tensors (or any, under ``TRITON_INTERPRET=1``) run the kernels; plain
    CPU tensors run ``layer_norm_reference``.
    """
    _check_inputs(x, weight, bias)
    if use_triton(x, weight, bias):
        return _LayerNorm.apply(x, weight, bias, eps)
    return layer_norm_reference(x, weight, bias, eps)
