"""RMSNorm, alone or fused with the residual add before it, as Triton forward and backward kernels.

``rms_norm`` matches transformers' ``LlamaRMSNorm`` (``cast="llama"``) and ``Gemma3RMSNorm``
(``cast="gemma"``, with ``offset=1.0``); ``add_rms_norm`` also does the ``residual + hidden``
add that precedes every such norm in a decoder layer, in the same pass over memory.

Both share one forward kernel (one program per row, or per several rows where rows are narrow, as
the per-head norms of Qwen3 and Gemma 3 are, or a persistent grid walking rows up to 2,048 wide:
``forward_grid``; ``HAS_RESIDUAL`` switching the add on) and one backward kernel (a bounded,
persistent grid: each program walks many rows, ``backward_rows`` of them at a time, software-
pipelined where that is one row: ``backward_stages``, and keeps its own fp32 partial sum of the
weight gradient; ``partial_sums.sum_partials`` adds those up). The backward recomputes the
normalised row from the saved input and one fp32 ``rstd`` per row instead of storing the output.
"""

from __future__ import annotations

import torch

from fusetune.ops._direct_launch import direct_launch
from fusetune.ops._graph_ops import graph_op
from fusetune.ops._launch import (
    NARROW_BLOCK,
    ROW_TILE,
    as_rows,
    block_for,
    cdiv,
    check_float,
    check_row_width,
    check_same_device,
    inverse_order,
    memory_order,
    partly_filled,
    persistent_programs,
    public_op,
    row_warps,
    rows_per_program,
    sm_count,
    triton,
    unit_stride,
    use_triton,
)
from fusetune.ops.partial_sums import partial_buffer, sum_partials

if triton is not None:
    import triton.language as tl

    from fusetune.ops._launch import row_tile

CASTS = ("llama", "gemma")

# Rows an RMSNorm backward program has in flight at once, by (block width, fused residual) (others:
# one). bench/tune_rows.py measures the choice on the H200: add_rms_norm went from 0.71 to 0.77 of
# copy bandwidth at 32768 x 8192 and 32768 x 4096 with two rows (four spilled registers;
# rows-tuning-h200-kernels.jsonl, kernel time), and one software-pipelined row a step is no faster
# there (ops-h200-stages-*.jsonl). The plain norm, which has no residual gradient to load, takes one
# pipelined row at every width (below). (LayerNorm's backward, tried the same way, was slower with
# two rows, so it takes one.)
_BACKWARD_ROWS: dict[tuple[int, bool], int] = {(4096, True): 2, (8192, True): 2}


# Wide rows that part-fill their block (``_launch.partly_filled``) take one pipelined row a backward
# step with the fused residual too: on an H200 (bench/tune_rows.py --odd, rows-tuning-h200-odd.jsonl,
# kernel time) that, with half the warps, was the best of the wide rows' settings at 16,384 x 2,304,
# 5,120 and 5,376, add_rms_norm 5-7% faster than with two plain rows (0.461 -> 0.432 ms at 5,376).
def backward_rows(n_cols: int, block: int, residual: bool) -> int:
    """Rows each program of the RMSNorm backward loads at once, for rows of ``n_cols`` in ``block``,
    with or without the fused residual add (narrow rows: as many as ``rows_per_program`` gives)."""
    if partly_filled(n_cols, block):
        return 1
    return _BACKWARD_ROWS.get((block, residual), rows_per_program(block))


# Software-pipelining stages of the backward's row loop (``tl.range``'s ``num_stages``) where it
# takes one row a step. Measured on an H200 by kernel time (bench/kernel_variants.py, two calls,
# ops-h200-narrow-*.jsonl and ops-h200-stages-*.jsonl): 3 stages took rms_norm's backward + forward
# from 0.103 to 0.094 ms at 8192 x 4096, 0.368 to 0.336 at 32768 x 4096 and 0.156 to 0.145 at
# 32768 x 1280; at 8,192-wide rows, one pipelined row a step instead of two plain ones took it from
# 0.196 to 0.181 ms (8192 x 8192) and 0.719 to 0.663 (32768 x 8192), where pipelining two rows a step
# was 1.45-1.55x slower (registers). On narrow rows (several a step) stages changed nothing, so
# those keep a plain loop.
_PIPELINE_STAGES = 3


def backward_stages(rows_at_once: int) -> int:
    """Stages of the RMSNorm backward's row loop when each step loads ``rows_at_once`` rows."""
    return _PIPELINE_STAGES if rows_at_once == 1 else 1


# The forward on rows of one tile each up to NARROW_BLOCK wide (1,280-wide rows of a vision tower,
# in 2,048-wide blocks): a persistent grid of _ROW_FORWARD_PROGRAMS_PER_SM programs an SM, each
# walking its tiles in a software-pipelined loop, where other rows run a program a tile. On an H200
# (bench/kernel_variants.py, kernel time) it took 32768 x 1280 from 0.142 to 0.133 ms with 16
# programs an SM (8: 0.134, 32: 0.132; ops-h200-fwd-*.jsonl) and 0.141 to 0.132 in a second call
# (ops-h200-fwd2-*.jsonl); on rows of 128 and 256, several to a tile, it was no faster. (LayerNorm's
# forward written as the same loop was 5-13% slower on wide rows, even with one tile a program:
# ops-h200-fwd3-*.jsonl; it keeps a program a tile.)
_ROW_FORWARD_PROGRAMS_PER_SM = 16
_ROW_FORWARD_STAGES = 3


def forward_grid(n_tiles: int, block: int, device: torch.device) -> tuple[int, int]:
    """Programs and loop stages of the forward over ``n_tiles`` tiles of rows of ``block``."""
    if not ROW_TILE < block <= NARROW_BLOCK:
        return n_tiles, 1
    return min(n_tiles, _ROW_FORWARD_PROGRAMS_PER_SM * sm_count(device)), _ROW_FORWARD_STAGES


if triton is not None:

    @direct_launch
    @triton.jit
    def _rms_norm_forward_kernel(
        X, R, S, Y, W, RSTD,
        stride_x, stride_r, n_rows, n_cols, eps, offset,
        HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, GEMMA: tl.constexpr,
        BLOCK: tl.constexpr, ROWS: tl.constexpr, STAGES: tl.constexpr,
    ):
        # Program p takes the (ROWS, BLOCK) tiles p, p + P, ... (one each where the grid has a
        # program per tile). S (the rounded sum x + r) and Y are contiguous, n_cols wide.
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)[None, :]
        for first in tl.range(tl.program_id(0) * ROWS, n_rows, tl.num_programs(0) * ROWS, num_stages=STAGES):
            rows, rows64, in_rows, tile = row_tile(first, n_rows, mask, ROWS)
            x = tl.load(X + rows64 * stride_x + cols[None, :], mask=tile, other=0.0)
            if HAS_RESIDUAL:
                r = tl.load(R + rows64 * stride_r + cols[None, :], mask=tile, other=0.0)
                x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
                tl.store(S + rows64 * n_cols + cols[None, :], x, mask=tile)
            h = x.to(tl.float32)
            rstd = tl.math.rsqrt(tl.sum(h * h, axis=1) / n_cols + eps)
            tl.store(RSTD + rows, rstd, mask=in_rows)
            normed = h * rstd[:, None]
            if HAS_WEIGHT:
                if GEMMA:  # (offset + weight) in fp32 times the fp32 normalised row
                    y = normed * (offset + w)
                else:  # (offset + weight) in weight dtype times the row rounded to x dtype
                    scale = (offset + w).to(W.dtype.element_ty).to(tl.float32)
                    y = scale * normed.to(X.dtype.element_ty).to(tl.float32)
            else:
                y = normed
            tl.store(Y + rows64 * n_cols + cols[None, :], y.to(Y.dtype.element_ty), mask=tile)

    @direct_launch
    @triton.jit
    def _rms_norm_backward_kernel(
        DY, H, W, RSTD, DS, DX, DW_PARTIAL,
        stride_dy, stride_h, stride_ds, n_rows, n_cols, offset,
        HAS_WEIGHT: tl.constexpr, HAS_DSUM: tl.constexpr, GEMMA: tl.constexpr,
        COMPUTE_DW: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, STAGES: tl.constexpr,
    ):
        # Persistent: program p handles the groups of ROWS rows p, p + P, p + 2P, ... (ROWS rows in
        # flight at once) and writes one row of DW_PARTIAL (fp32, P x n_cols, ``partial_buffer``). DX
        # is contiguous, n_cols wide.
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            if GEMMA:
                scale = offset + w
            else:
                scale = (offset + w).to(W.dtype.element_ty).to(tl.float32)
        if COMPUTE_DW:
            dw = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
        for group in tl.range(pid, tl.cdiv(n_rows, ROWS), tl.num_programs(0), num_stages=STAGES):
            rows, rows64, in_rows, tile = row_tile(group * ROWS, n_rows, mask, ROWS)
            dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=tile, other=0.0).to(tl.float32)
            h = tl.load(H + rows64 * stride_h + cols[None, :], mask=tile, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + rows, mask=in_rows, other=0.0)[:, None]
            normed = h * rstd
            if HAS_WEIGHT:
                dnormed = dy * scale[None, :]
            else:
                dnormed = dy
            if COMPUTE_DW:
                if GEMMA:
                    dw += dy * normed
                else:
                    dw += dy * normed.to(H.dtype.element_ty).to(tl.float32)
            dx = rstd * (dnormed - normed * (tl.sum(dnormed * normed, axis=1) / n_cols)[:, None])
            if HAS_DSUM:
                dx += tl.load(DS + rows64 * stride_ds + cols[None, :], mask=tile, other=0.0).to(tl.float32)
            tl.store(DX + rows64 * n_cols + cols[None, :], dx.to(DX.dtype.element_ty), mask=tile)
        if COMPUTE_DW:
            tl.store(DW_PARTIAL + tl.cast(pid, tl.int64) * n_cols + cols, tl.sum(dw, axis=0), mask=mask)


def _in_order(t: torch.Tensor | None, order: list[int] | None) -> torch.Tensor | None:
    """``t``, computed in memory order (``memory_order``), as a view in the caller's dim order."""
    return t if t is None or order is None else t.permute(inverse_order(order))


def _rms_output_dtype(x: torch.Tensor, weight: torch.Tensor | None, gemma: bool) -> torch.dtype:
    return x.dtype if weight is None or gemma else torch.result_type(weight, x)


def _forward_outputs(
    rows: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None, eps: float,
    offset: float, gemma: bool,
) -> list[torch.Tensor]:
    """New ``[y, rstd]`` (or ``[y, summed, rstd]`` with a residual) for :func:`_forward`'s rows."""
    n_rows = rows.shape[0]
    y = torch.empty(rows.shape, dtype=_rms_output_dtype(rows, weight, gemma), device=rows.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=rows.device)
    if residual is None:
        return [y, rstd]
    return [y, torch.empty(rows.shape, dtype=rows.dtype, device=rows.device), rstd]


@graph_op("rms_norm_forward", fake=_forward_outputs)
def _forward(
    rows: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None, eps: float,
    offset: float, gemma: bool,
) -> list[torch.Tensor]:
    """The forward launch over 2-D ``rows`` (and ``residual`` rows, added first):
    ``[y, rstd]`` or ``[y, summed, rstd]`` (``_forward_outputs``)."""
    outputs = _forward_outputs(rows, residual, weight, eps, offset, gemma)
    y, summed, rstd = outputs[0], outputs[1] if residual is not None else None, outputs[-1]
    n_rows, n_cols = rows.shape
    block = block_for(n_cols)
    rows_at_once = rows_per_program(block)
    programs, stages = forward_grid(cdiv(n_rows, rows_at_once), block, rows.device)
    _rms_norm_forward_kernel[(programs,)](
        rows, residual, summed, y, weight, rstd,
        rows.stride(0), 0 if residual is None else residual.stride(0), n_rows, n_cols, eps, offset,
        HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None, GEMMA=gemma,
        BLOCK=block, ROWS=rows_at_once, STAGES=stages, num_warps=row_warps(n_cols, block, rows_at_once),
    )
    return outputs


def _backward_outputs(
    dy: torch.Tensor, dsum: torch.Tensor | None, h: torch.Tensor, weight: torch.Tensor | None,
    rstd: torch.Tensor, offset: float, gemma: bool, residual: bool, need_dw: bool,
) -> list[torch.Tensor]:
    """New ``[dx]`` (or ``[dx, dw]`` where ``need_dw``) for :func:`_backward`."""
    dx = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    return [dx, torch.empty(weight.shape, dtype=weight.dtype, device=h.device)] if need_dw else [dx]


@graph_op("rms_norm_backward", fake=_backward_outputs)
def _backward(
    dy: torch.Tensor, dsum: torch.Tensor | None, h: torch.Tensor, weight: torch.Tensor | None,
    rstd: torch.Tensor, offset: float, gemma: bool, residual: bool, need_dw: bool,
) -> list[torch.Tensor]:
    """The backward launch over 2-D rows: ``dy`` (and ``dsum``, the summed output's gradient, added
    to dx), the normalised rows ``h`` and their ``rstd``; ``residual`` says whether forward added
    one (it picks the launch). Returns ``[dx]`` or ``[dx, dw]``."""
    n_rows, n_cols = h.shape
    block = block_for(n_cols)
    dx = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    rows_at_once = backward_rows(n_cols, block, residual)
    programs = persistent_programs(cdiv(n_rows, rows_at_once), h.device, block)
    dw_partial = partial_buffer(programs, int(need_dw), n_cols, h.device)
    _rms_norm_backward_kernel[(programs,)](
        dy, h, weight, rstd, dsum, dx, dw_partial,
        dy.stride(0), h.stride(0), 0 if dsum is None else dsum.stride(0),
        n_rows, n_cols, offset,
        HAS_WEIGHT=weight is not None, HAS_DSUM=dsum is not None, GEMMA=gemma,
        COMPUTE_DW=need_dw, BLOCK=block, ROWS=rows_at_once, STAGES=backward_stages(rows_at_once),
        num_warps=row_warps(n_cols, block, rows_per_program(block)),
    )
    return [dx, sum_partials(dw_partial, weight.dtype)[0]] if need_dw else [dx]


class _RMSNorm(torch.autograd.Function):
    """Triton RMSNorm with an optional fused residual add (``residual`` None: plain norm)."""

    @staticmethod
    def forward(ctx, x, residual, weight, eps, offset, gemma):
        # A permuted view (mllama's q and k norms run on (B, H, T, D) views) is normalised in memory
        # order, not copied; the outputs get x's layout, as eager elementwise maths would give them.
        ctx.order = memory_order(x)
        if ctx.order is not None:
            x = x.permute(ctx.order)
            residual = None if residual is None else residual.permute(ctx.order)
        rows, weight = as_rows(x), unit_stride(weight)
        outputs = _forward(rows, None if residual is None else as_rows(residual), weight, eps, offset, gemma)
        # Recompute in backward from what was normalised (x, or the rounded sum) and rstd.
        normalised = rows if residual is None else outputs[1]
        ctx.save_for_backward(normalised, weight, outputs[-1])
        ctx.shape, ctx.offset, ctx.gemma = x.shape, offset, gemma
        ctx.has_residual = residual is not None
        y = _in_order(outputs[0].view(x.shape), ctx.order)
        if residual is None:
            return y
        return y, _in_order(outputs[1].view(x.shape), ctx.order)

    @staticmethod
    def backward(ctx, dy, dsum=None):
        h, weight, rstd = ctx.saved_tensors
        if ctx.order is not None:  # the rows in forward's order
            dy = dy.permute(ctx.order)
            dsum = None if dsum is None else dsum.permute(ctx.order)
        need_dw = weight is not None and ctx.needs_input_grad[2]
        gradients = _backward(
            as_rows(dy), None if dsum is None else as_rows(dsum), h, weight, rstd, ctx.offset, ctx.gemma,
            ctx.has_residual, need_dw,
        )
        dx = _in_order(gradients[0].view(ctx.shape), ctx.order)
        dw = gradients[1] if need_dw else None
        # x and residual enter the normalised sum alike, so they get the same gradient.
        dres = dx if ctx.has_residual else None
        return dx, dres, dw, None, None, None


def _is_gemma(cast: str) -> bool:
    if cast not in CASTS:
        raise ValueError(
            f"fusetune: cast={cast!r} is not known; use cast='llama' (LlamaRMSNorm: round the "
            f"normalised row to x's dtype, then scale) or cast='gemma' (Gemma3RMSNorm: scale in "
            f"float32, then cast to x's dtype)."
        )
    return cast == "gemma"


def _check_inputs(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    offset: float,
    cast: str,
) -> bool:
    """Validate the arguments of rms_norm / add_rms_norm; return whether cast is 'gemma'."""
    gemma = _is_gemma(cast)
    check_float("x", x)
    check_same_device("x", x, residual=residual, weight=weight)
    if x.dim() == 0:
        raise ValueError("fusetune: rms_norm needs x with at least one dimension, got a scalar.")
    check_row_width(x.shape[-1])
    if residual is not None:
        check_float("residual", residual)
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(
                f"fusetune: residual is {tuple(residual.shape)} {residual.dtype} but x is "
                f"{tuple(x.shape)} {x.dtype}; pass a residual of the same shape and dtype as x."
            )
    if weight is None:
        if offset != 0.0:
            raise ValueError(
                f"fusetune: offset={offset} scales by (offset + weight), but weight is None; "
                f"pass the weight or leave offset at 0."
            )
    else:
        check_float("weight", weight)
        if weight.shape != (x.shape[-1],):
            raise ValueError(
                f"fusetune: weight has shape {tuple(weight.shape)}, expected ({x.shape[-1]},) "
                f"to match the last dim of x {tuple(x.shape)}."
            )
    return gemma


def rms_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float = 1e-6,
    offset: float = 0.0,
    cast: str = "llama",
) -> torch.Tensor:
    """Plain PyTorch RMSNorm, written as transformers writes it (see ``rms_norm``).

    Computes in float32 like transformers, except that float64 inputs stay float64 (so the tests
    can run it as exact maths).
    """
    gemma = _is_gemma(cast)
    h = x.to(torch.promote_types(x.dtype, torch.float32))  # x.float(); float64 stays float64
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if weight is None:
        return h.to(x.dtype)
    if gemma:  # Gemma3RMSNorm
        return (h * (offset + weight.to(h.dtype))).to(x.dtype)
    return (offset + weight) * h.to(x.dtype)  # LlamaRMSNorm


def add_rms_norm_reference(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float = 1e-6,
    offset: float = 0.0,
    cast: str = "llama",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch residual add then RMSNorm (see ``add_rms_norm``)."""
    summed = x + residual
    return rms_norm_reference(summed, weight, eps, offset, cast), summed


@public_op
def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float = 1e-6,
    offset: float = 0.0,
    cast: str = "llama",
) -> torch.Tensor:
    """RMSNorm over the last dim of ``x``, fused into one Triton kernel (and one for backward).

    ``cast="llama"`` is ``transformers.models.llama.modeling_llama.LlamaRMSNorm`` exactly: the
    normalised row is computed in float32, rounded to ``x.dtype``, then multiplied by
    ``offset + weight`` (in weight's dtype); the result has ``torch.result_type(weight, x)``, so
    bf16 ``x`` with a float32 weight gives float32. ``cast="gemma"`` is
    ``transformers.models.gemma3.modeling_gemma3.Gemma3RMSNorm`` (use ``offset=1.0``): the row is
    scaled by ``offset + weight.float()`` in float32 and the result cast to ``x.dtype``.
    ``weight=None`` normalises without scaling (output in ``x.dtype``).

    Why: the eager module makes several passes over the activations and autograd keeps the
    float32 intermediates; here one pass reads ``x`` and writes the output, and backward keeps
    only ``x`` and one float32 ``rstd`` per row. Gradients flow to ``x`` and, when it requires
    grad, to ``weight``. CUDA tensors (or any, under ``TRITON_INTERPRET=1``) run the kernels;
    plain CPU tensors run ``rms_norm_reference``.
    """
    gemma = _check_inputs(x, None, weight, offset, cast)
    if use_triton(x, weight):
        return _RMSNorm.apply(x, None, weight, eps, offset, gemma)
    return rms_norm_reference(x, weight, eps, offset, cast)


@public_op
def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float = 1e-6,
    offset: float = 0.0,
    cast: str = "llama",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add then RMSNorm in one pass: returns ``(rms_norm(x + residual), x + residual)``.

    Matches the decoder-layer pattern in transformers (e.g. ``LlamaDecoderLayer``:
    ``hidden_states = residual + hidden_states`` followed by ``post_attention_layernorm``), with
    the norm as in ``rms_norm`` (same ``eps``, ``offset`` and ``cast``). The sum is rounded to
    ``x.dtype`` as torch rounds it, and that rounded sum is what is normalised and returned.

    Why: the add and the norm each read and write the whole activation; fused, the kernel reads
    ``x`` and ``residual`` once and writes both outputs. Gradients of both outputs flow into
    ``x`` and ``residual`` (the same values for both) and into ``weight`` when it requires grad.
    ``residual`` must have ``x``'s shape and dtype.
    """
    gemma = _check_inputs(x, residual, weight, offset, cast)
    if use_triton(x, residual, weight):
        return _RMSNorm.apply(x, residual, weight, eps, offset, gemma)
    return add_rms_norm_reference(x, residual, weight, eps, offset, cast)
