"""Linear cross-entropy with a frozen weight, a slice of the vocabulary at a time.

With a frozen weight (LoRA, or a frozen ``lm_head``) the loss needs two products: the logits
``rows @ weight.T`` and the hidden gradient ``dloss/dlogits @ weight``. The second is a sum over
the vocabulary, so both can be taken one slice of the vocabulary at a time, and the buffer of
logits need hold only a (rows x slice) block: a few tens of MiB whatever the vocabulary, where a
(rows x vocab) chunk takes 0.25-1 GiB.

The catch is the softmax's normalisation, known only once the last slice is seen. So, per chunk
of rows and slice:

1. cuBLAS writes the slice's logits into the buffer;
2. ``_slice_rows_kernel`` reads them once and writes in their place the numerators
   ``exp(z - ref)`` against a reference ``ref`` a row carries from slice to slice, with the sum
   of the numerators so far and the label's logit (the label's own numerator is written as 0);
3. cuBLAS adds ``numerators @ weight_slice`` into a float32 (rows x hidden) accumulator.

``_finish_rows_kernel`` then makes each row's loss and its hidden gradient
``grad_scale / total * (accumulator - others * weight[label])``, ``others`` being the numerators'
sum without the label's and ``total`` with it, which is ``grad_scale * (softmax - onehot) @
weight``. The subtraction is made in float32 on float32 products, so the label's ``- 1`` costs
no precision. Label smoothing's uniform ``- eps / vocab`` adds ``eps / vocab`` times the weight's
column sums (taken once a call), and z-loss's factor ``1 + 2 z lse`` scales the accumulator and
the label's term, both in the same kernel.

The reference is the first slice's first block's max, moved up (and what was summed before
rescaled, the accumulator's row included) only where a later logit exceeds it by more than
``RESCALE_GAP`` nats, as in ``deferred_softmax``, whose row helpers this kernel shares.

The numbers: a 32 MiB slice of logits is still in L2 when the row kernel reads it and when the
next product reads the numerators back, so at 7-9B models' heads the two matmuls and the row
kernel took no longer than with whole-vocabulary chunks of 5-10x the memory; at small models'
heads (hidden 896-1,536) 2-5% longer, about 0.1 ms (``bench/results/lce-slices-h200*.jsonl``).

Only for a frozen weight: a slice's share of the *weight* gradient needs its rows' normalised
softmax, known only after the last slice, so a trainable weight takes whole-vocabulary chunks
(``linear_cross_entropy``). Only bfloat16 and float32 (float16 cannot hold the numerators) and
without a bias (whose gradient is the softmax's column sums); not label smoothing with a
soft-cap, whose uniform term would then be weighted per element by the cap's slope.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusetune.ops._direct_launch import direct_launch
from fusetune.ops._launch import next_power_of_2
from fusetune.ops.cross_entropy import _softcapped, _zero_columns
from fusetune.ops.deferred_softmax import (
    _LAUNCH,
    _RECOMPUTE_COLS,
    _RECOMPUTE_FEATURES,
    CLAMP,
    RESCALE_GAP,
    DeferredLaunch,
    _first_block,
    _row_loss,
    _row_numerators,
    _softcap_slope,
)
from fusetune.ops.row_chunks import RowChunks

# Bytes of one (rows x slice) block of logits, and of the float32 (rows x hidden) accumulator,
# which sets the rows per chunk (at most MAX_CHUNK_ROWS). Swept on an H200 (bench/tune_lce.py
# --slices, lce-slices-h200.jsonl, 16-64 MiB slices at 1,024 and 2,048 rows): the faster rows were
# 2,048 at hidden 2,304 and 1,024 at hidden 3,584 and 4,096, which this budget gives; slices past
# 32 MiB gained at most 2%, for up to twice the memory.
SLICE_BYTES = 32 * 2**20
ACCUMULATOR_BYTES = 18 * 2**20
MAX_CHUNK_ROWS = 2048

# How the slice kernel is launched (a program a row; its grid is the chunk's rows): the one-pass
# kernel's setting. Swept again on the slices, read from L2 (bench/tune_lce.py --slice-launch,
# lce-slices-h200-launch.jsonl: 1,024-8,192 columns a step x 4-16 warps): none was faster by more
# than the noise, 1%.
_SLICE_LAUNCH = DeferredLaunch(_LAUNCH.block, _LAUNCH.warps)

# Columns a loop step of the finishing kernel takes along the hidden size.
_FINISH_BLOCK = 1024


def slice_chunk_rows(hidden_size: int) -> int:
    """Rows per chunk: the most, a power of two from 128 to ``MAX_CHUNK_ROWS``, whose float32
    accumulator (rows x hidden) fits ``ACCUMULATOR_BYTES`` (128 if none does)."""
    rows = MAX_CHUNK_ROWS
    while rows > 128 and rows * hidden_size * 4 > ACCUMULATOR_BYTES:
        rows //= 2
    return rows


def slice_width(chunk_rows: int, vocab: int, itemsize: int) -> int:
    """Vocabulary columns per slice: ``SLICE_BYTES`` of logits over ``chunk_rows`` rows, a
    multiple of 128 (at least 128), at most the whole vocabulary."""
    columns = SLICE_BYTES // (max(1, chunk_rows) * itemsize)
    return min(vocab, max(128, columns // 128 * 128))


@triton.jit
def _scale_row(row_ptr, n_cols, factor, BLOCK: tl.constexpr):
    """Multiply a float32 row of ``n_cols`` elements by ``factor`` in place."""
    cols = tl.arange(0, BLOCK)
    for first in range(0, n_cols, BLOCK):
        offs = first + cols
        mask = offs < n_cols
        tl.store(row_ptr + offs, tl.load(row_ptr + offs, mask=mask) * factor, mask=mask)


@direct_launch
@triton.jit
def _slice_rows_kernel(
    logits_ptr,
    row_stride,
    hidden_ptr,
    hidden_row_stride,
    hidden_col_stride,
    weight_ptr,
    weight_row_stride,
    weight_col_stride,
    hidden_size,
    labels_ptr,
    first_col,
    n_cols,
    ref_ptr,
    others_ptr,
    z_label_ptr,
    logit_sums_ptr,
    acc_ptr,
    acc_row_stride,
    ignore_index,
    softcap,
    rescale_gap,
    clamp,
    HAS_SOFTCAP: tl.constexpr,
    SMOOTHING: tl.constexpr,
    FIRST: tl.constexpr,
    WRITE: tl.constexpr,
    BLOCK: tl.constexpr,
    COLS: tl.constexpr,
    FEATURES: tl.constexpr,
):
    """One row of one slice (vocabulary columns [first_col, first_col + n_cols)): numerators in
    place over the logits (with ``WRITE``; the label's written as 0, an ignored row's all 0), and
    the row's carried reference, numerator sum, label logit and (with ``SMOOTHING``) logit sum
    updated. ``FIRST``: the slice that starts the row (its reference comes from its first block,
    its sums from 0)."""
    row64 = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row64).to(tl.int64)
    row_ptr = logits_ptr + row64 * row_stride
    if label == ignore_index:
        if WRITE:
            _zero_columns(row_ptr, 0, n_cols, BLOCK)
    else:
        local = label - first_col
        in_slice = (local >= 0) & (local < n_cols)
        label_col = tl.where(in_slice, local, -1).to(tl.int32)  # -1 matches no column
        if in_slice:
            z_label = _softcapped(tl.load(row_ptr + local).to(tl.float32), softcap, HAS_SOFTCAP)
            tl.store(z_label_ptr + row64, z_label)
        if FIRST:
            z_first, ref = _first_block(row_ptr, n_cols, softcap, HAS_SOFTCAP, BLOCK)
            carried = tl.zeros([], dtype=tl.float32)
            carried_logits = tl.zeros([], dtype=tl.float32)
        else:
            z_first, _ = _first_block(row_ptr, n_cols, softcap, HAS_SOFTCAP, BLOCK)
            ref = tl.load(ref_ptr + row64)
            carried = tl.load(others_ptr + row64)
            carried_logits = tl.load(logit_sums_ptr + row64) if SMOOTHING else 0.0
        tl.debug_barrier()  # the label's logit is read before any warp overwrites it
        others, settled, logit_sum = _row_numerators(
            row_ptr, z_first, ref, label_col, n_cols, hidden_ptr + row64 * hidden_row_stride,
            hidden_col_stride, weight_ptr, weight_row_stride, weight_col_stride, hidden_size, softcap,
            rescale_gap, clamp, HAS_SOFTCAP, WRITE, SMOOTHING, BLOCK, COLS, FEATURES)
        if SMOOTHING:
            tl.store(logit_sums_ptr + row64, carried_logits + logit_sum)
        if settled != ref:  # the reference moved up: rescale what earlier slices summed
            factor = tl.exp(ref - settled)
            carried = carried * factor
            if WRITE and not FIRST:
                _scale_row(acc_ptr + row64 * acc_row_stride, hidden_size, factor, BLOCK)
        tl.store(ref_ptr + row64, settled)
        tl.store(others_ptr + row64, carried + others)
        if WRITE and in_slice:
            tl.debug_barrier()
            tl.store(row_ptr + local, tl.zeros([], dtype=tl.float32).to(row_ptr.dtype.element_ty))


@direct_launch
@triton.jit
def _finish_rows_kernel(
    labels_ptr,
    ref_ptr,
    others_ptr,
    z_label_ptr,
    logit_sums_ptr,
    column_sums_ptr,
    loss_ptr,
    grad_scale_ptr,
    grad_scale_stride,
    acc_ptr,
    acc_row_stride,
    weight_ptr,
    weight_row_stride,
    weight_col_stride,
    grad_ptr,
    grad_row_stride,
    hidden_size,
    n_classes,
    ignore_index,
    softcap,
    label_smoothing,
    z_loss,
    HAS_SOFTCAP: tl.constexpr,
    SMOOTHING: tl.constexpr,
    WANT_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One row's loss and (with ``WANT_GRAD``) hidden gradient from its carried sums and its
    float32 accumulator; an ignored row gets loss 0 and a zero gradient.

    With smoothing ``eps`` and z-loss ``z``, ``dloss/dlogit_v = slope_v * (c * p_v - (1 - eps) *
    [v = label] - eps / vocab)``, ``c = 1 + 2 z lse``; so the gradient is ``grad_scale / total *
    (c * acc - label_term * weight[label]) - grad_scale * eps / vocab * column_sums``, where
    ``label_term = slope_label * ((1 - eps) * others - (2 z lse + eps) * n_label)`` is
    ``slope_label * ((1 - eps) * total - c * n_label)`` without its cancellation."""
    row64 = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row64).to(tl.int64)
    grad_row = grad_ptr + row64 * grad_row_stride
    if label == ignore_index:
        tl.store(loss_ptr + row64, 0.0)
        if WANT_GRAD:
            _zero_columns(grad_row, 0, hidden_size, BLOCK)
    else:
        ref = tl.load(ref_ptr + row64)
        others = tl.load(others_ptr + row64)
        z_label = tl.load(z_label_ptr + row64)
        n_label = tl.exp(z_label - ref)
        total = others + n_label
        lse = ref + tl.log(total)
        loss = _row_loss(ref, others, z_label, total)
        if SMOOTHING:
            mean_logit = tl.load(logit_sums_ptr + row64) / n_classes
            loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - mean_logit)
        tl.store(loss_ptr + row64, loss + z_loss * lse * lse)
        if WANT_GRAD:
            grad_scale = tl.load(grad_scale_ptr + row64 * grad_scale_stride).to(tl.float32)
            row_scale = grad_scale / total
            softmax_factor = 1.0 + 2.0 * z_loss * lse
            # Without smoothing or z-loss: others, (1 - p_label) * total, the label's "- 1".
            label_term = (1.0 - label_smoothing) * others - (2.0 * z_loss * lse + label_smoothing) * n_label
            if HAS_SOFTCAP:
                label_term = label_term * _softcap_slope(z_label, softcap)
            acc_row = acc_ptr + row64 * acc_row_stride
            # Clamped so that a bad label (reported by the host-side check) never reads outside
            # the weight.
            label_row = weight_ptr + tl.minimum(tl.maximum(label, 0), n_classes - 1) * weight_row_stride
            cols = tl.arange(0, BLOCK)
            for first in range(0, hidden_size, BLOCK):
                offs = first + cols
                mask = offs < hidden_size
                acc = tl.load(acc_row + offs, mask=mask, other=0.0)
                w = tl.load(label_row + offs * weight_col_stride, mask=mask, other=0.0).to(tl.float32)
                grad = row_scale * (softmax_factor * acc - label_term * w)
                if SMOOTHING:
                    column_sums = tl.load(column_sums_ptr + offs, mask=mask, other=0.0)
                    grad -= grad_scale * label_smoothing / n_classes * column_sums
                tl.store(grad_row + offs, grad.to(grad_ptr.dtype.element_ty), mask=mask)


def _add_product(acc: torch.Tensor, numerators: torch.Tensor, weight_slice: torch.Tensor,
                 first: bool) -> None:
    """``acc (+)= numerators @ weight_slice`` into float32 ``acc`` (``first``: overwrite it).
    bfloat16 inputs take cuBLAS's float32-output product on CUDA; the CPU (the interpreter's
    tests) has none, so there they are widened first."""
    beta = 0 if first else 1
    if numerators.dtype == torch.float32:
        torch.addmm(acc, numerators, weight_slice, beta=beta, out=acc)
    elif numerators.is_cuda:
        torch.addmm(acc, numerators, weight_slice, out_dtype=torch.float32, beta=beta, out=acc)
    else:
        torch.addmm(acc, numerators.float(), weight_slice.float(), beta=beta, out=acc)


def sliced_frozen_loss(
    chunks: RowChunks,
    weight: torch.Tensor,
    grad_scale: torch.Tensor | None,
    *,
    ignore_index: int,
    softcap: float | None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row float32 losses of the rows ``chunks`` computes (bfloat16 or float32) times
    ``weight.T`` (labels range-checked; the options as in ``cross_entropy``, but not label
    smoothing with a soft-cap) and, with ``grad_scale`` (float32, one element or one per row),
    the rows' gradient ``grad_scale * dloss/drows`` in their dtype; an ignored row gives 0 and 0.
    Both in the chunks' compact order.

    ``chunk_rows`` rows at a time (default ``slice_chunk_rows``), a vocabulary slice of
    ``slice_width`` columns at a time: the peak extra memory is one (chunk x slice) block of
    logits, a float32 (chunk x hidden) accumulator and the gradient itself. The first chunk's
    first slice is queued before the host reads how many rows there are (``row_chunks``).
    """
    if label_smoothing and softcap is not None:
        raise ValueError("fusetune: vocabulary slices take label smoothing or a soft-cap, not both.")
    hidden_size, vocab, device = chunks.hidden_size, weight.shape[0], chunks.device
    want_grad = grad_scale is not None
    rows_per_chunk = max(1, min(chunk_rows or slice_chunk_rows(hidden_size), chunks.capacity))
    width = slice_width(rows_per_chunk, vocab, chunks.dtype.itemsize)
    logits_buffer = torch.empty(rows_per_chunk, width, dtype=chunks.dtype, device=device)
    # The float32 products' sums; without a gradient none is made (the buffer stands in, unused).
    acc_buffer = (
        torch.empty(rows_per_chunk, hidden_size, dtype=torch.float32, device=device)
        if want_grad
        else logits_buffer
    )
    ref, others, z_label, logit_sums = torch.empty(4, rows_per_chunk, dtype=torch.float32, device=device)
    smoothing = bool(label_smoothing)
    # Label smoothing's uniform term: the weight's column sums, in float32 (else a placeholder).
    column_sums = weight.sum(0, dtype=torch.float32) if smoothing and want_grad else ref
    capped = dict(softcap=float(softcap) if softcap is not None else 1.0, HAS_SOFTCAP=softcap is not None)
    block, warps, _ = _SLICE_LAUNCH
    losses = grad = None
    for chunk in chunks.split(rows_per_chunk):
        first_col = 0
        while first_col < vocab and chunk.size:
            last_col = min(first_col + width, vocab)
            weight_slice = weight[first_col:last_col]
            logits = logits_buffer[: chunk.size, : last_col - first_col]
            acc = acc_buffer[: chunk.size]
            torch.mm(chunk.rows, weight_slice.t(), out=logits)
            _slice_rows_kernel[(chunk.size,)](
                logits, logits.stride(0), chunk.rows, *chunk.rows.stride(),
                weight_slice, *weight_slice.stride(), hidden_size, chunk.labels,
                first_col, last_col - first_col, ref, others, z_label, logit_sums, acc, acc.stride(0),
                ignore_index, rescale_gap=RESCALE_GAP, clamp=CLAMP, **capped, SMOOTHING=smoothing,
                FIRST=first_col == 0, WRITE=want_grad,
                BLOCK=min(block, next_power_of_2(last_col - first_col)),
                COLS=_RECOMPUTE_COLS, FEATURES=_RECOMPUTE_FEATURES, num_warps=warps,
            )
            if want_grad:
                _add_product(acc, logits, weight_slice, first=first_col == 0)
            # The first chunk is provisional: the host reads the count while the device works on
            # this slice, which is redone over the labelled rows if some are ignored.
            first_col = 0 if chunk.settle() else last_col
        if chunk.size == 0:  # every label ignored
            break
        if losses is None:
            losses, grad = chunks.outputs(want_grad)
        start, end = chunk.start, chunk.end
        scale = grad_scale if want_grad else losses  # a placeholder pointer when no gradient is made
        scale_rows = scale if scale.numel() == 1 else scale[start:end]
        grad_rows = grad[start:end] if want_grad else acc
        _finish_rows_kernel[(chunk.size,)](
            chunk.labels, ref, others, z_label, logit_sums, column_sums, losses[start:end],
            scale_rows, 1 if scale_rows.numel() > 1 else 0, acc, acc.stride(0), weight,
            *weight.stride(), grad_rows, grad_rows.stride(0), hidden_size, vocab, ignore_index,
            label_smoothing=float(label_smoothing), z_loss=float(z_loss), **capped,
            SMOOTHING=smoothing, WANT_GRAD=want_grad,
            BLOCK=min(_FINISH_BLOCK, next_power_of_2(hidden_size)), num_warps=4,
        )
    if losses is None:  # no rows, or no labelled ones
        losses, grad = chunks.outputs(want_grad)
    return losses, grad
