"""Cross-entropy rows with the softmax's normalisation left to the caller: one read and one write.

``linear_cross_entropy`` turns each chunk of logits into a gradient that two matmuls then consume.
The plain row kernel (``cross_entropy_rows``) needs a row's log-sum-exp before it can write
``softmax - onehot``, so it reads the row twice and writes it once. This kernel reads it once:
it writes the softmax *numerators* ``exp(z - ref)`` as it goes, ``ref`` being the largest logit
seen in the row's first block, and hands back one float32 ``row_scale`` a row such that

    row_scale[r] * out[r, :] == grad_scale[r] * dloss/dlogits[r, :]

The caller folds ``row_scale`` into the (rows x hidden) side of its matmuls, which costs next to
nothing. Two details keep this exact and finite:

- The label's ``- 1`` is written into the label's own element at the end of the row, as minus
  the sum of the other numerators, so that ``row_scale * out`` there is ``p_label - 1`` to the
  output dtype's precision relative to its own size, however confident the row (no cancellation
  in float32, nor in the consuming matmul).
- The row's loop holds no reduction, so its loads and stores stream without the warps waiting
  on one another: ``ref`` is fixed from the first block, and each lane keeps its own running max.
  The row's max is reduced once, at the end. Where it exceeds ``ref`` by more than
  ``RESCALE_GAP`` (rare: a logit 30 nats above every logit of the first block), the numerators
  written are multiplied by ``exp(ref - max)``, one more pass over the row. Numerators are
  clamped at ``exp(CLAMP)``, below float32's and bfloat16's overflow; where the max exceeds
  ``ref`` by more than ``CLAMP`` a clamped numerator has lost its value, and the row's logits are
  recomputed from ``hidden`` and ``weight`` in the kernel (a product of the row with the whole
  weight, slow but never met by sane logits). So numerators end at most ``e**RESCALE_GAP``, and
  their sums over a vocabulary in the consuming matmul stay far below float32's overflow.

Why the callers choose this path only for bfloat16 and float32 logits, without label smoothing,
z-loss or a bias: float16 cannot hold ``e**30``; smoothing's uniform ``- eps / vocab`` and a
bias's column sums do not fold into a row scale; z-loss's factor ``1 + 2 z lse`` could be zero.
The soft-cap's derivative is per element and is simply multiplied into the numerators.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fusetune.ops._direct_launch import direct_launch
from fusetune.ops._launch import next_power_of_2, sm_count
from fusetune.ops.cross_entropy import _softcapped, _softcapped_in_row, _zero_columns

# Nats the row's max may exceed the reference before the numerators are rescaled, and the
# exponent at which numerators are clamped in the first pass (see above).
RESCALE_GAP = 30.0
CLAMP = 80.0

# The tile (vocab columns x hidden features) of the in-kernel recompute of a row's logits.
_RECOMPUTE_COLS = 128
_RECOMPUTE_FEATURES = 64

DEFERRED_DTYPES = (torch.bfloat16, torch.float32)


class DeferredLaunch(NamedTuple):
    """How the kernel is launched: ``block`` columns a loop step, ``warps``, and ``programs_per_sm``
    (0: a program a row; n: a persistent grid of n programs an SM walking the rows in order)."""

    block: int
    warps: int
    programs_per_sm: int = 0


# Swept on an H200 with bench/tune_cross_entropy.py --kernel deferred (36 settings at four chunk
# shapes, ce-tuning-h200-deferred-lanes.jsonl): the best, 0.67 of the two-pass kernel's time on the
# same chunks (0.301 against 0.452 ms at 1024 x 262144, 0.83 of copy bandwidth for its two
# passes); blocks of 2,048-4,096 columns with any warps and grid were within 3% of it.
_LAUNCH = DeferredLaunch(2048, 8)


@triton.jit
def _rescale_columns(row_ptr, end, factor, BLOCK: tl.constexpr):
    """Multiply the numerators already written in columns [0, end) by ``factor`` (the reference
    moved up): one more read and write of that stretch, taken only when a row needs it."""
    cols = tl.arange(0, BLOCK)
    for first in range(0, end, BLOCK):
        offs = first + cols
        mask = offs < end
        numerators = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(row_ptr + offs, (numerators * factor).to(row_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _softcap_slope(z, softcap):
    """d(softcapped)/dx at a soft-capped value ``z``: ``1 - (z / softcap)**2``."""
    capped = z / softcap
    return 1.0 - capped * capped


@triton.jit
def _store_numerators(row_ptr, offs, mask, numerators, z, softcap, HAS_SOFTCAP: tl.constexpr):
    """Write a block's numerators, times the soft-cap's slope where there is a cap."""
    if HAS_SOFTCAP:
        numerators = numerators * _softcap_slope(z, softcap)
    tl.store(row_ptr + offs, numerators.to(row_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _recompute_numerators(row_ptr, hidden_row, hidden_stride, weight_ptr, weight_row_stride,
                          weight_col_stride, n_cols, hidden_size, ref, label_col, softcap,
                          HAS_SOFTCAP: tl.constexpr, COLS: tl.constexpr, FEATURES: tl.constexpr):
    """Recompute a row's logits (``hidden_row @ weight.T``, float32 sums rounded to the logits'
    dtype, as the chunk's matmul makes them), write their numerators against ``ref`` and return
    their sum, the label's left out. For rows whose first pass clamped a numerator."""
    cols = tl.arange(0, COLS)
    features = tl.arange(0, FEATURES)
    others = tl.zeros([], dtype=tl.float32)
    for first in range(0, n_cols, COLS):
        offs = first + cols
        mask = offs < n_cols
        acc = tl.zeros([COLS], dtype=tl.float32)
        for k in range(0, hidden_size, FEATURES):
            ks = k + features
            h = tl.load(hidden_row + ks * hidden_stride, mask=ks < hidden_size, other=0.0).to(tl.float32)
            w = tl.load(weight_ptr + offs.to(tl.int64)[:, None] * weight_row_stride
                        + ks[None, :] * weight_col_stride,
                        mask=mask[:, None] & (ks < hidden_size)[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(w * h[None, :], axis=1)
        z = _softcapped(acc.to(row_ptr.dtype.element_ty).to(tl.float32), softcap, HAS_SOFTCAP)
        numerators = tl.where(mask, tl.exp(z - ref), 0.0)
        others += tl.sum(tl.where(offs == label_col, 0.0, numerators), axis=0)
        _store_numerators(row_ptr, offs, mask, numerators, z, softcap, HAS_SOFTCAP)
    return others


@triton.jit
def _row_loss(ref, others, z_label, total):
    """``logsumexp(z) - z_label`` of a row whose numerators against ``ref`` sum to ``total``, or
    ``others`` with the label's left out. Where the label is less than 40 nats below ``ref`` it is
    ``log1p(others * exp(ref - z_label))`` (log1p by Goldberg's ``log(u) * x / (u - 1)``), so that
    a confident row's small loss keeps float32's precision relative to itself, not to the size of
    its logits; below that, ``others * exp(...)`` could overflow and the loss is large anyway."""
    gap = ref - z_label
    x = others * tl.exp(tl.minimum(gap, 40.0))
    u = 1.0 + x
    log1p = tl.where(u == 1.0, x, tl.log(u) * x / (u - 1.0))
    return tl.where(gap < 40.0, log1p, ref + tl.log(total) - z_label)


@triton.jit
def _first_block(row_ptr, n_cols, softcap, HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr):
    """A row's first block of logits (raw: the numerator pass's first prefetch) and the largest
    (soft-capped) logit in it, 0 for a block of -inf (whose numerators are 0): the reference."""
    cols = tl.arange(0, BLOCK)
    z_first = tl.load(row_ptr + cols, mask=cols < n_cols, other=float("-inf"))
    ref = tl.max(_softcapped(z_first.to(tl.float32), softcap, HAS_SOFTCAP), axis=0)
    return z_first, tl.where(ref == float("-inf"), 0.0, ref)


@triton.jit
def _numerator_pass(row_ptr, z_first, n_cols, ref, label_col, softcap, clamp,
                    HAS_SOFTCAP: tl.constexpr, WRITE: tl.constexpr, SUM_LOGITS: tl.constexpr,
                    BLOCK: tl.constexpr):
    """Stream a row's logits once, from ``z_first`` (its first block, loaded), writing (with
    ``WRITE``) the numerators ``exp(z - ref)``, clamped at ``exp(clamp)``, in their place. Returns
    per lane the numerators' sums, the label's column left out, the largest logit seen, and (with
    ``SUM_LOGITS``, else zeros) the sums of the (soft-capped) logits, for label smoothing.

    The loop holds no reduction, so its loads and stores stream without the warps waiting on one
    another; the next block is loaded before this one is written."""
    cols = tl.arange(0, BLOCK)
    z_next = z_first
    sums = tl.zeros([BLOCK], dtype=tl.float32)
    tops = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    logit_sums = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        offs = start + cols
        mask = offs < n_cols
        z = _softcapped_in_row(z_next.to(tl.float32), mask, softcap, HAS_SOFTCAP)
        z_next = tl.load(row_ptr + offs + BLOCK, mask=offs + BLOCK < n_cols, other=float("-inf"))
        numerators = tl.exp(tl.minimum(z - ref, clamp))
        if WRITE:
            _store_numerators(row_ptr, offs, mask, numerators, z, softcap, HAS_SOFTCAP)
        tops = tl.maximum(tops, z)
        sums += tl.where(offs == label_col, 0.0, numerators)
        if SUM_LOGITS:
            logit_sums += tl.where(mask, z, 0.0)
    return sums, tops, logit_sums


@triton.jit
def _row_numerators(row_ptr, z_first, ref, label_col, n_cols, hidden_row, hidden_col_stride,
                    weight_ptr, weight_row_stride, weight_col_stride, hidden_size, softcap,
                    rescale_gap, clamp, HAS_SOFTCAP: tl.constexpr, WRITE: tl.constexpr,
                    SUM_LOGITS: tl.constexpr, BLOCK: tl.constexpr, COLS: tl.constexpr,
                    FEATURES: tl.constexpr):
    """A row's numerators against ``ref`` (``_numerator_pass``, written with ``WRITE``): returns
    their sum, the label's left out, the reference they end up against, and (with
    ``SUM_LOGITS``, else 0) the sum of the row's (soft-capped) logits. The reference moves
    up to the row's max where that exceeds it by more than ``rescale_gap`` (the numerators
    written are rescaled) or ``clamp`` (a numerator was clamped: the row's logits are recomputed
    from ``hidden_row`` and the weight)."""
    sums, tops, logit_sums = _numerator_pass(row_ptr, z_first, n_cols, ref, label_col, softcap,
                                             clamp, HAS_SOFTCAP, WRITE, SUM_LOGITS, BLOCK)
    top = tl.max(tops, axis=0)
    if top > ref + clamp:
        tl.debug_barrier()
        others = _recompute_numerators(row_ptr, hidden_row, hidden_col_stride, weight_ptr,
                                       weight_row_stride, weight_col_stride, n_cols, hidden_size,
                                       top, label_col, softcap, HAS_SOFTCAP, COLS, FEATURES)
        settled = top
    elif top > ref + rescale_gap:
        factor = tl.exp(ref - top)
        if WRITE:
            tl.debug_barrier()
            _rescale_columns(row_ptr, n_cols, factor, BLOCK)
        others = tl.sum(sums * factor, axis=0)
        settled = top
    else:
        others = tl.sum(sums, axis=0)
        settled = ref
    return others, settled, tl.sum(logit_sums, axis=0)


@direct_launch
@triton.jit
def _deferred_rows_kernel(
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
    loss_ptr,
    row_scale_ptr,
    grad_scale_ptr,
    grad_scale_stride,
    n_rows,
    n_cols,
    ignore_index,
    softcap,
    rescale_gap,
    clamp,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK: tl.constexpr,
    COLS: tl.constexpr,
    FEATURES: tl.constexpr,
):
    """Rows ``pid, pid + programs, ...``: each labelled row's loss, row scale and numerators (in
    place over its logits); an ignored row gets loss 0, row scale 0 and zeros."""
    for row in range(tl.program_id(0), n_rows, tl.num_programs(0)):
        row64 = tl.cast(row, tl.int64)
        label = tl.load(labels_ptr + row64).to(tl.int64)
        row_ptr = logits_ptr + row64 * row_stride
        if label == ignore_index:
            tl.store(loss_ptr + row64, 0.0)
            tl.store(row_scale_ptr + row64, 0.0)
            _zero_columns(row_ptr, 0, n_cols, BLOCK)
        else:
            # Clamped so that a bad label (reported by the host-side check) never reads outside
            # the row; read before the row is overwritten (the barrier orders it for every warp).
            safe_label = tl.minimum(tl.maximum(label, 0), n_cols - 1)
            z_label = _softcapped(tl.load(row_ptr + safe_label).to(tl.float32), softcap, HAS_SOFTCAP)
            label_col = safe_label.to(tl.int32)
            tl.debug_barrier()
            z_first, ref = _first_block(row_ptr, n_cols, softcap, HAS_SOFTCAP, BLOCK)
            others, ref, _ = _row_numerators(row_ptr, z_first, ref, label_col, n_cols,
                                             hidden_ptr + row64 * hidden_row_stride, hidden_col_stride,
                                             weight_ptr, weight_row_stride, weight_col_stride,
                                             hidden_size, softcap, rescale_gap, clamp, HAS_SOFTCAP,
                                             True, False, BLOCK, COLS, FEATURES)
            total = others + tl.exp(z_label - ref)
            tl.store(loss_ptr + row64, _row_loss(ref, others, z_label, total))
            grad_scale = tl.load(grad_scale_ptr + row64 * grad_scale_stride).to(tl.float32)
            tl.store(row_scale_ptr + row64, grad_scale / total)
            # row_scale * this == grad_scale * (p_label - 1) * slope: the label's "- 1", folded in,
            # as minus the other numerators' sum (p_label - 1 = -others / total, no cancellation).
            label_term = -others
            if HAS_SOFTCAP:
                label_term = label_term * _softcap_slope(z_label, softcap)
            tl.debug_barrier()
            tl.store(row_ptr + safe_label, label_term.to(row_ptr.dtype.element_ty))


def deferred_cross_entropy_rows(
    logits: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    grad_scale: torch.Tensor,
    *,
    ignore_index: int,
    softcap: float | None,
    launch: DeferredLaunch | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row float32 losses of 2-D ``logits`` (unit column stride, bfloat16 or float32), and
    float32 row scales; ``logits`` is overwritten with numerators such that
    ``row_scales[:, None] * logits == grad_scale * dloss/dlogits`` (see the module docstring).

    ``logits`` must be ``hidden @ weight.T`` (rows with unit column stride), which the kernel
    recomputes for a row whose logits span more than ``CLAMP`` nats above its first block.

    ``grad_scale``: a float32 tensor of 1 element or one per row. Labels must already be
    range-checked. ``launch`` overrides the tuned launch (for benchmarks and tests).
    """
    if logits.dtype not in DEFERRED_DTYPES:
        raise TypeError(
            f"fusetune: deferred normalisation takes {DEFERRED_DTYPES} logits, not {logits.dtype}."
        )
    n_rows, n_cols = logits.shape
    losses = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    row_scales = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    if n_rows == 0:
        return losses, row_scales
    if hidden.shape != (n_rows, weight.shape[1]) or weight.shape[0] != n_cols:
        raise ValueError(
            f"fusetune: logits {tuple(logits.shape)} are not hidden {tuple(hidden.shape)} @ weight.T "
            f"{tuple(weight.shape)}."
        )
    block, warps, programs_per_sm = launch or _LAUNCH
    programs = n_rows
    if programs_per_sm:
        programs = min(n_rows, programs_per_sm * sm_count(logits.device))
    _deferred_rows_kernel[(programs,)](
        logits,
        logits.stride(0),
        hidden,
        *hidden.stride(),
        weight,
        *weight.stride(),
        weight.shape[1],
        labels,
        losses,
        row_scales,
        grad_scale,
        1 if grad_scale.numel() > 1 else 0,
        n_rows,
        n_cols,
        ignore_index,
        float(softcap) if softcap is not None else 1.0,
        RESCALE_GAP,
        CLAMP,
        HAS_SOFTCAP=softcap is not None,
        BLOCK=min(block, next_power_of_2(n_cols)),
        COLS=_RECOMPUTE_COLS,
        FEATURES=_RECOMPUTE_FEATURES,
        num_warps=warps,
    )
    return losses, row_scales
