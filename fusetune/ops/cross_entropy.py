"""Cross-entropy over the vocabulary with transformers' options, gradient computed in the same pass.

``cross_entropy(logits, labels, ...)`` has ``torch.nn.functional.cross_entropy``'s semantics plus
what LLM training adds: Gemma's final-logit soft-capping, a z-loss, and transformers' gradient
accumulation rule (``num_items_in_batch``).

Why the gradient is computed in the forward pass: the loss needs one pass over each row to find
its log-sum-exp and a second to turn every logit into ``softmax - target``; doing both in one kernel
saves backward a third pass over the logits, and the second pass can find the row in L2. Backward
then only multiplies the stored gradient by ``grad_output`` when that is not 1, a test made on the
device (``scale_by_grad_output``).

The row kernel can split a row among programs that run side by side; the last to finish makes the
row's loss and gradient (see ``_cross_entropy_split_kernel``). Its statistics pass takes one
exponential an element (a scalar running max and sum); with that, the H200 is fastest with one
segment a row up to Gemma's vocabulary, the program reading its row a second time partly from L2
(bench/tune_cross_entropy.py); longer rows are split. The second pass walks the row backwards, so
that it starts on the blocks the first pass read last, the likeliest still in L2; the first pass
asks L2 to keep only those last blocks, and the second to drop what it has used.
With ``reduction="none"`` the per-row scale is only known in backward, so there the kernel runs
again in backward instead.

The op never drains the device: the label range check is read through pinned memory behind an
event (``LabelCheck``), so a training step keeps the GPU busy while the host queues the next work.
The labels' count, the loss's denominator and that check come from one small kernel
(``fusetune.ops.labels.summarise_labels``).

The row kernel is shared with ``linear_cross_entropy``, which runs it in place on chunks of logits.

Edge case, by design: when every label is ``ignore_index`` the "mean" loss is 0 with zero
gradients (torch returns NaN there); one bad batch then cannot poison a run. And the gradient made
in forward is handed out, scaled in place, by the one backward: a second backward over the same
graph is refused (``hand_out_once``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fusetune.ops._direct_launch import direct_launch
from fusetune.ops._launch import (
    as_rows,
    cdiv,
    check_float,
    check_same_device,
    next_power_of_2,
    public_eager_op,
    sm_count,
    use_triton,
)
from fusetune.ops.labels import (
    LabelCheck,
    check_labels,
    flatten_labels,
    loss_denominator,
    summarise_labels,
)

_REDUCTIONS = ("mean", "sum", "none")


class RowLaunch(NamedTuple):
    """How the row kernel is launched.

    ``segment_cols``: columns a work item covers (a row is cut into ``ceil(vocab / segment_cols)``
    items, the last of which to finish makes the row's gradient); ``block``: columns a loop step
    loads; ``warps``; ``programs_per_sm``: 0 launches one program per item, n > 0 a persistent grid
    of n programs an SM that walk the items in order, so that fewer rows are in flight and a row's
    second read is likelier to find it in L2; ``stages``: software-pipelining depth of the column
    loops (None: the compiler's default for a plain loop); ``reverse``: the gradient pass walks the
    row from its last block to its first, so that it first re-reads the bytes read last (the likeliest
    still in L2); ``l2_hints``: the statistics pass asks L2 to keep what it reads, the gradient pass
    to drop what it reads and writes; ``l2_keep_cols``: with hints, only the last this many columns
    of a segment are kept (the rest read to be dropped), 0 keeping all.
    """

    segment_cols: int
    block: int
    warps: int
    programs_per_sm: int = 0
    stages: int | None = None
    reverse: bool = False
    l2_hints: bool = False
    l2_keep_cols: int = 0


# The row kernel's launches, chosen on an H200 with bench/tune_cross_entropy.py (kernel time): one
# segment a row up to Gemma's vocabulary, 8,192-wide blocks and 8 warps. 4,096-wide blocks were as
# fast in one call (ce-tuning-h200-scalar.jsonl) and 6% slower in another
# (ce-tuning-h200-persistent.jsonl), where 8,192 was within 2% of the best at every shape both
# times. Up to _FEW_ROWS rows (the chunks linear_cross_entropy runs the kernel on) a persistent
# grid of four programs an SM was 5-6% faster than a program a row at 1,024 rows of vocab 152,064
# and 262,144; at 8,192 rows it was 5% slower. Both walk the gradient pass backwards with L2 hints
# (twentieth session, ce-tuning-h200-order*.jsonl): the best setting at every swept shape, 1-2%
# faster than forwards at 8,192 rows (1.572 -> 1.536 ms at vocab 128,256) and 3-4% at 1,024-2,048
# (0.268 -> 0.258 ms at 1024 x 152064), where fewer rows in flight leave more of a row in L2.
# Keeping only a row's last 65,536 columns in L2 (the ones the gradient pass re-reads first; the
# rest are read to be dropped, so they do not push other rows' tails out) was the best or within
# 1% of it in two calls (ce-tuning-h200-keep*.jsonl, 0 / 16,384-98,304 columns): 1.561 -> 1.506 ms
# at 8192 x 128256, 1.853 -> 1.780 at 152,064, 3.194 -> 3.142 at 262,144, 1-3% at 1,024-2,048 rows.
_LAUNCH = RowLaunch(262144, 8192, 8, reverse=True, l2_hints=True, l2_keep_cols=65536)
_FEW_ROWS_LAUNCH = _LAUNCH._replace(programs_per_sm=4)
_FEW_ROWS = 2048


def tuned_launch(n_rows: int) -> RowLaunch:
    """The row kernel's launch for ``n_rows`` rows (measured on an H200, see above)."""
    return _FEW_ROWS_LAUNCH if n_rows <= _FEW_ROWS else _LAUNCH


# Elements per step, and programs per SM, of the in-place scaling kernel.
_SCALE_BLOCK = 4096
_SCALE_PROGRAMS_PER_SM = 4


@triton.jit
def _softcapped(x, softcap, HAS_SOFTCAP: tl.constexpr):
    """``softcap * tanh(x / softcap)`` (tanh through a sigmoid: stable and in every Triton)."""
    if HAS_SOFTCAP:
        x = softcap * (2.0 * tl.sigmoid(2.0 * x / softcap) - 1.0)
    return x


@triton.jit
def _softcapped_in_row(x, mask, softcap, HAS_SOFTCAP: tl.constexpr):
    """``_softcapped`` over a block loaded with ``-inf`` past the row's end (``mask`` false): those
    lanes stay ``-inf`` (the cap would make them ``-softcap``, whose exponentials would join the
    row's sum), while a real ``-inf`` logit is capped to ``-softcap`` as torch caps it."""
    if HAS_SOFTCAP:
        x = tl.where(mask, _softcapped(x, softcap, HAS_SOFTCAP), float("-inf"))
    return x


@triton.jit
def _segment_stats(logits_row, start, end, softcap, keep_cols, HAS_SOFTCAP: tl.constexpr,
                   SMOOTHING: tl.constexpr, BLOCK: tl.constexpr, STAGES: tl.constexpr,
                   L2_HINTS: tl.constexpr):
    """Max, sum of ``exp(z - max)`` and (with ``SMOOTHING``, else 0) plain sum of the (soft-capped)
    logits in columns [start, end), streamed with an online max. An all ``-inf`` stretch gives a
    max of -inf and a sum of 0.

    The running max and sum are scalars: each block is reduced to its max first, so every element
    costs one exponential (a per-lane running max would rescale each lane's sum every step, two
    exponentials an element, and the special-function units would bound the pass).
    """
    cols = tl.arange(0, BLOCK)
    top = tl.full([], float("-inf"), dtype=tl.float32)
    total = tl.zeros([], dtype=tl.float32)
    logit_sum = tl.zeros([], dtype=tl.float32)
    for first in tl.range(start, end, BLOCK, num_stages=STAGES):
        offs = first + cols
        mask = offs < end
        if L2_HINTS:
            if first + keep_cols >= end:  # among the last keep_cols columns: re-read soon
                z = tl.load(logits_row + offs, mask=mask, other=float("-inf"), eviction_policy="evict_last")
            else:
                z = tl.load(logits_row + offs, mask=mask, other=float("-inf"), eviction_policy="evict_first")
        else:
            z = tl.load(logits_row + offs, mask=mask, other=float("-inf"))
        z = _softcapped_in_row(z.to(tl.float32), mask, softcap, HAS_SOFTCAP)
        new_top = tl.maximum(top, tl.max(z, axis=0))
        # While only -inf has been seen the sum stays zero (avoid inf - inf).
        safe_top = tl.where(new_top == float("-inf"), 0.0, new_top)
        total = total * tl.exp(top - safe_top) + tl.sum(tl.exp(z - safe_top), axis=0)
        top = new_top
        if SMOOTHING:
            logit_sum += tl.sum(tl.where(mask, z, 0.0), axis=0)
    return top, total, logit_sum


@triton.jit
def _zero_columns(grad_row, start, end, BLOCK: tl.constexpr):
    """The gradient of an ignored row is zero: write zeros over columns [start, end)."""
    cols = tl.arange(0, BLOCK)
    zeros = tl.zeros([BLOCK], dtype=tl.float32).to(grad_row.dtype.element_ty)
    for first in range(start, end, BLOCK):
        offs = first + cols
        tl.store(grad_row + offs, zeros, mask=offs < end)


@triton.jit
def _finish_row(
    logits_row,
    label,
    loss_ptr,
    grad_row,
    scale,
    lse,
    logit_sum,
    n_cols,
    label_smoothing,
    z_loss,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
    STAGES: tl.constexpr,
    REVERSE: tl.constexpr,
    L2_HINTS: tl.constexpr,
):
    """A labelled row's loss from its log-sum-exp, and optionally ``scale * dloss/dlogits``.

    The gradient pass re-reads the row and may overwrite the logits in place
    (``grad_row == logits_row``): each element is read before it is written, by this program.
    """
    # The labelled logit: one scalar load, its index clamped into the row so that a bad label
    # (reported by the host-side check) can never make the kernel read outside it.
    safe_label = tl.minimum(tl.maximum(label, 0), n_cols - 1)
    z_label = _softcapped(tl.load(logits_row + safe_label).to(tl.float32), softcap, HAS_SOFTCAP)
    smooth = label_smoothing / n_cols
    loss = lse - (1.0 - label_smoothing) * z_label - smooth * logit_sum
    loss += z_loss * lse * lse
    tl.store(loss_ptr, loss)

    if COMPUTE_GRAD:
        cols = tl.arange(0, BLOCK)
        softmax_factor = 1.0 + 2.0 * z_loss * lse
        last_start = (n_cols - 1) // BLOCK * BLOCK
        for step in tl.range(0, n_cols, BLOCK, num_stages=STAGES):
            start = step
            if REVERSE:
                start = last_start - step
            offs = start + cols
            mask = offs < n_cols
            if L2_HINTS:
                x = tl.load(logits_row + offs, mask=mask, other=0.0, eviction_policy="evict_first")
            else:
                x = tl.load(logits_row + offs, mask=mask, other=0.0)
            z = _softcapped(x.to(tl.float32), softcap, HAS_SOFTCAP)
            grad = tl.exp(z - lse) * softmax_factor - smooth
            grad = tl.where(offs == label, grad - (1.0 - label_smoothing), grad)
            if HAS_SOFTCAP:
                capped = z / softcap
                grad = grad * (1.0 - capped * capped)
            grad = (grad * scale).to(grad_row.dtype.element_ty)
            if L2_HINTS:
                tl.store(grad_row + offs, grad, mask=mask, eviction_policy="evict_first")
            else:
                tl.store(grad_row + offs, grad, mask=mask)


@direct_launch
@triton.jit
def _cross_entropy_split_kernel(
    logits_ptr,
    logits_row_stride,
    labels_ptr,
    loss_ptr,
    grad_ptr,
    grad_row_stride,
    scale_ptr,
    scale_stride,
    stats_ptr,
    arrivals_ptr,
    n_items,
    n_cols,
    segment_cols,
    n_segments,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    keep_cols,
    HAS_SOFTCAP: tl.constexpr,
    SMOOTHING: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    SEGMENTS: tl.constexpr,
    BLOCK: tl.constexpr,
    STAGES: tl.constexpr,
    REVERSE: tl.constexpr,
    L2_HINTS: tl.constexpr,
):
    """Each row is cut into ``n_segments`` stretches of ``segment_cols`` columns, one work item
    each: item ``i`` is segment ``i % n_segments`` of row ``i // n_segments`` (so a row's items
    are neighbours). Program ``pid`` takes the items ``pid, pid + programs, ...`` (one each with a
    program per item). An item writes its stretch's statistics and counts itself in on the row's
    arrival counter; the item that arrives last combines them into the log-sum-exp and makes the
    loss and the whole row's gradient, re-reading the row soon after its siblings read it, so that
    much of it may still be in L2. No item ever waits for another (so the interpreter, which runs
    programs one after another, runs it too). ``SEGMENTS`` is a power of two >= ``n_segments``."""
    for item in range(tl.program_id(0), n_items, tl.num_programs(0)):
        row = item // n_segments
        segment = item % n_segments
        row64 = tl.cast(row, tl.int64)
        label = tl.load(labels_ptr + row64).to(tl.int64)
        logits_row = logits_ptr + row64 * logits_row_stride
        grad_row = grad_ptr + row64 * grad_row_stride
        start = segment * segment_cols
        end = tl.minimum(start + segment_cols, n_cols)
        if label == ignore_index:
            if segment == 0:
                tl.store(loss_ptr + row64, 0.0)
            if COMPUTE_GRAD:
                _zero_columns(grad_row, start, end, BLOCK)
        else:
            top, total, logit_sum = _segment_stats(logits_row, start, end, softcap, keep_cols, HAS_SOFTCAP,
                                                   SMOOTHING, BLOCK, STAGES, L2_HINTS)
            # A row of one segment is finished by its only item: no statistics go through memory.
            finishes_row = True
            if SEGMENTS > 1:
                stats = stats_ptr + (row64 * n_segments + segment) * 3
                tl.store(stats, top)
                tl.store(stats + 1, total)
                tl.store(stats + 2, logit_sum)
                # Release: the stores above are visible to whoever sees this count; acquire: the
                # last arrival sees every sibling's.
                arrived = tl.atomic_add(arrivals_ptr + row64, 1, sem="acq_rel", scope="gpu")
                finishes_row = arrived == n_segments - 1
                if finishes_row:
                    segments = tl.arange(0, SEGMENTS)
                    mine = segments < n_segments
                    row_stats = stats_ptr + (row64 * n_segments + segments) * 3
                    tops = tl.load(row_stats, mask=mine, other=float("-inf"), cache_modifier=".cg")
                    totals = tl.load(row_stats + 1, mask=mine, other=0.0, cache_modifier=".cg")
                    logit_sums = tl.load(row_stats + 2, mask=mine, other=0.0, cache_modifier=".cg")
                    top = tl.max(tops, axis=0)
                    safe_top = tl.where(top == float("-inf"), 0.0, top)
                    total = tl.sum(totals * tl.exp(tops - safe_top), axis=0)
                    logit_sum = tl.sum(logit_sums, axis=0)
            if finishes_row:
                scale = 1.0
                if COMPUTE_GRAD:
                    scale = tl.load(scale_ptr + row64 * scale_stride).to(tl.float32)
                _finish_row(logits_row, label, loss_ptr + row64, grad_row, scale, top + tl.log(total),
                            logit_sum, n_cols, label_smoothing, z_loss, softcap,
                            HAS_SOFTCAP, COMPUTE_GRAD, BLOCK, STAGES, REVERSE, L2_HINTS)


def cross_entropy_rows(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    grad_scale: torch.Tensor | None = None,
    grad_out: torch.Tensor | None = None,
    launch: RowLaunch | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row float32 losses of 2-D ``logits`` (rows with unit column stride), via the kernel.

    With ``grad_scale`` (a float32 tensor of 1 element, or one per row) the gradient times that
    scale is also written, to ``grad_out`` (a new tensor when None; pass ``logits`` to work in
    place), and returned as the second value (None without ``grad_scale``). Labels must already
    be range-checked (``check_labels`` or ``LabelCheck``). ``launch`` (a ``RowLaunch``) overrides
    the tuned launch configuration (for benchmarks and tests).
    """
    n_rows, n_cols = logits.shape
    losses = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    compute_grad = grad_scale is not None
    if compute_grad and grad_out is None:
        grad_out = torch.empty_like(logits)
    if n_rows == 0:
        return losses, grad_out
    segment_cols, block, warps, programs_per_sm, stages, reverse, l2_hints, keep_cols = (
        launch or tuned_launch(n_rows))
    block = min(block, next_power_of_2(n_cols))
    segment_cols = max(block, segment_cols // block * block)
    n_segments = cdiv(n_cols, segment_cols)
    n_items = n_rows * n_segments
    programs = n_items
    if programs_per_sm:
        programs = min(n_items, programs_per_sm * sm_count(logits.device))
    if n_segments > 1:  # the statistics that a row's items combine, and its arrival counter
        stats = torch.empty(n_items * 3, dtype=torch.float32, device=logits.device)
        arrivals = torch.zeros(n_rows, dtype=torch.int32, device=logits.device)
    else:  # unused
        stats, arrivals = losses, labels
    _cross_entropy_split_kernel[(programs,)](
        logits,
        logits.stride(0),
        labels,
        losses,
        grad_out if compute_grad else logits,
        grad_out.stride(0) if compute_grad else 0,
        grad_scale if compute_grad else losses,
        (1 if grad_scale.numel() > 1 else 0) if compute_grad else 0,
        stats,
        arrivals,
        n_items,
        n_cols,
        segment_cols,
        n_segments,
        ignore_index,
        float(label_smoothing),
        float(z_loss),
        float(softcap) if softcap is not None else 1.0,
        keep_cols or n_cols,
        HAS_SOFTCAP=softcap is not None,
        SMOOTHING=label_smoothing > 0,
        COMPUTE_GRAD=compute_grad,
        SEGMENTS=next_power_of_2(n_segments),
        BLOCK=block,
        STAGES=stages,
        REVERSE=reverse,
        L2_HINTS=l2_hints,
        num_warps=warps,
    )
    return losses, grad_out


def check_options(
    reduction: str, label_smoothing: float, softcap: float | None, z_loss: float, num_items_in_batch
) -> None:
    """Reject option values that have no meaning, naming the fix."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"fusetune: reduction={reduction!r}; use one of {_REDUCTIONS}.")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"fusetune: label_smoothing={label_smoothing} must lie in [0, 1].")
    if softcap is not None and not 0 < softcap < math.inf:
        raise ValueError(f"fusetune: softcap={softcap} must be positive and finite (or None for no capping).")
    if not 0 <= z_loss < math.inf:
        raise ValueError(f"fusetune: z_loss={z_loss} must be >= 0 and finite.")
    if num_items_in_batch is not None and reduction != "mean":
        raise ValueError(
            "fusetune: num_items_in_batch replaces the 'mean' denominator; it cannot be combined "
            f"with reduction={reduction!r}. Use reduction='mean'."
        )
    if torch.is_tensor(num_items_in_batch) and num_items_in_batch.numel() != 1:
        raise ValueError(
            f"fusetune: num_items_in_batch is a tensor of shape {tuple(num_items_in_batch.shape)}; give "
            "one number (a Python number or a one-element tensor): the labelled tokens of the whole "
            "accumulated batch."
        )
    items = _host_number(num_items_in_batch)
    if items is not None and not 0 <= items < math.inf:
        raise ValueError(
            f"fusetune: num_items_in_batch={items} must be >= 0 and finite: it counts the labelled "
            "tokens of the whole accumulated batch."
        )


def _host_number(value) -> float | None:
    """``value`` as a float where reading it costs no device sync (a number or a one-element CPU
    tensor) and breaks no compiled graph; None otherwise (a GPU tensor is left to the device, where a
    count below 1 counts as 1)."""
    if value is None or (torch.is_tensor(value) and (value.device.type != "cpu" or value.numel() != 1
                                                     or torch.compiler.is_compiling())):
        return None
    return float(value)


def reduce_losses(
    row_losses: torch.Tensor, reduction: str, denominator: torch.Tensor, labels_shape: torch.Size
) -> torch.Tensor:
    """Per-row losses to the requested reduction (``none`` keeps the labels' shape)."""
    if reduction == "none":
        return row_losses.reshape(labels_shape)
    return row_losses.sum() / denominator


@direct_launch
@triton.jit
def _scale_unless_one_kernel(x_ptr, scale_ptr, n_elements, BLOCK: tl.constexpr):
    """``x *= scale`` in place over a flat tensor, skipped entirely when the scale is 1 (a
    persistent grid: every program reads the scale, then walks blocks ``pid, pid + programs, ...``)."""
    scale = tl.load(scale_ptr).to(tl.float32)
    if scale != 1.0:
        first = tl.program_id(0).to(tl.int64) * BLOCK
        step = tl.num_programs(0).to(tl.int64) * BLOCK
        for start in range(first, n_elements, step):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < n_elements
            x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
            tl.store(x_ptr + offs, (x * scale).to(x_ptr.dtype.element_ty), mask=mask)


def hand_out_once(ctx, op: str) -> None:
    """Refuse a second backward over one graph of an op whose gradient was made in its forward.

    The first backward scales that gradient in place by ``grad_output`` and hands it out (so no
    second tokens x vocab buffer is ever made); a second one (``retain_graph=True``) would scale
    it again, and change what the first returned: silently wrong gradients.
    """
    if getattr(ctx, "handed_out", False):
        raise RuntimeError(
            f"fusetune.{op}: backward ran a second time over the same graph (retain_graph=True); "
            "its gradient is made in forward and handed out by the first backward. Compute the loss "
            "again before each backward, or use reduction='none' (its backward computes the "
            "gradient from the saved input, and can run again)."
        )
    ctx.handed_out = True


def scale_by_grad_output(grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """Multiply a stored gradient by ``grad_output`` in place; returns ``grad``.

    A loss's ``grad_output`` is nearly always the scalar 1, and then nothing is written. The test
    is made by the kernel on the device, so backward neither passes over the gradient nor waits
    for the device to find out. The stored gradient belongs to the op (made in forward, consumed
    once), so in-place is safe. A non-scalar ``grad_output`` or a non-contiguous gradient is
    multiplied by torch.
    """
    if grad_output.numel() != 1 or not grad.is_contiguous() or not use_triton(grad):
        return grad.copy_(grad.float() * grad_output.float())  # float32 maths, as the kernel's
    if grad.numel() == 0:
        return grad
    programs = min(
        cdiv(grad.numel(), _SCALE_BLOCK), _SCALE_PROGRAMS_PER_SM * sm_count(grad.device)
    )
    _scale_unless_one_kernel[(programs,)](
        grad, grad_output.reshape(1), grad.numel(), BLOCK=_SCALE_BLOCK, num_warps=8
    )
    return grad


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        logits,
        labels,
        ignore_index,
        reduction,
        label_smoothing,
        softcap,
        z_loss,
        num_items_in_batch,
        needs_grad,
    ):
        rows = as_rows(logits)
        flat_labels = flatten_labels(labels, logits.shape[:-1])
        # The range check is queued before the row kernel, so that reading it in backward waits
        # for nothing after it. The kernel clamps bad labels, so running it before the error is
        # raised is safe.
        summary = summarise_labels(flat_labels, rows.shape[1], ignore_index, reduction, num_items_in_batch)
        labels_check = LabelCheck(flat_labels, rows.shape[1], ignore_index, bad=summary.counts[1])
        if not needs_grad:
            labels_check.raise_if_bad()
        options = dict(
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            softcap=softcap,
        )
        eager_grad = needs_grad and reduction != "none"
        grad_scale = summary.grad_scale if eager_grad else None
        row_losses, grad = cross_entropy_rows(rows, flat_labels, grad_scale=grad_scale, **options)
        ctx.logits_shape = logits.shape
        ctx.labels_check = labels_check
        ctx.stored_grad = eager_grad
        ctx.options = options
        if eager_grad:
            ctx.save_for_backward(grad)
        elif needs_grad:
            ctx.save_for_backward(flat_labels, rows)
        return reduce_losses(row_losses, reduction, summary.denominator, labels.shape)

    @staticmethod
    def backward(ctx, grad_output):
        ctx.labels_check.raise_if_bad()
        if ctx.stored_grad:
            hand_out_once(ctx, "cross_entropy")
            (stored,) = ctx.saved_tensors
            grad = scale_by_grad_output(stored, grad_output)
        else:
            flat_labels, rows = ctx.saved_tensors
            per_row = grad_output.reshape(-1).to(torch.float32).contiguous()
            grad = torch.empty_like(rows)
            cross_entropy_rows(rows, flat_labels, grad_scale=per_row, grad_out=grad, **ctx.options)
        return grad.view(ctx.logits_shape), None, None, None, None, None, None, None, None


def cross_entropy_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    z_loss: float = 0.0,
    num_items_in_batch=None,
) -> torch.Tensor:
    """The same loss in plain PyTorch (float32 maths via ``F.cross_entropy``), used on CPU and in tests."""
    check_options(reduction, label_smoothing, softcap, z_loss, num_items_in_batch)
    z = logits.reshape(-1, logits.shape[-1]).float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    flat = check_labels(labels, logits.shape[:-1], z.shape[1], ignore_index)
    per_row = torch.nn.functional.cross_entropy(
        z, flat, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing
    )
    if z_loss:
        lse = torch.logsumexp(z, dim=-1)
        per_row = per_row + z_loss * lse.square() * (flat != ignore_index)
    denominator = loss_denominator(flat, reduction, ignore_index, num_items_in_batch)
    return reduce_losses(per_row, reduction, denominator, labels.shape)


@public_eager_op
def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    z_loss: float = 0.0,
    num_items_in_batch=None,
) -> torch.Tensor:
    """Cross-entropy of ``logits`` (..., vocab) against integer ``labels`` (...), float32 result.

    Options: ``ignore_index`` rows cost no loss; ``reduction`` "mean" | "sum" | "none";
    ``label_smoothing`` as in torch; ``softcap`` applies ``softcap * tanh(logits / softcap)`` first
    (Gemma 2/3); ``z_loss`` adds ``z_loss * logsumexp**2`` per labelled row; ``num_items_in_batch``
    (int or tensor) divides the summed loss instead of the labelled-row count (transformers'
    gradient-accumulation rule). All labels ignored gives 0 and zero gradients, not NaN (also with
    ``num_items_in_batch`` 0: a denominator below 1 counts as 1; a negative number is an error).
    """
    check_options(reduction, label_smoothing, softcap, z_loss, num_items_in_batch)
    check_float("logits", logits)
    check_same_device("logits", logits, labels=labels)
    if not use_triton(logits):
        return cross_entropy_reference(
            logits,
            labels,
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=label_smoothing,
            softcap=softcap,
            z_loss=z_loss,
            num_items_in_batch=num_items_in_batch,
        )
    needs_grad = logits.requires_grad and torch.is_grad_enabled()
    return _CrossEntropy.apply(
        logits,
        labels,
        ignore_index,
        reduction,
        label_smoothing,
        softcap,
        z_loss,
        num_items_in_batch,
        needs_grad,
    )
