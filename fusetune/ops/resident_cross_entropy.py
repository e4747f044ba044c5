"""Cross-entropy rows held in registers by the programs that share them: one read, one write.

``cross_entropy_rows`` reads each row twice (once for its log-sum-exp, once to write
``softmax - onehot``) because no program can hold a vocabulary-wide row. Here a row is cut into
``n_segments`` stretches of ``BLOCK`` columns and a group of ``n_segments`` programs takes it, each
holding its own stretch in registers. Each program publishes its stretch's max, sum of
exponentials and logit sum, counts itself in on the row's arrival counter, waits for its siblings'
statistics, and writes its stretch's gradient from the registers it kept: the logits cross HBM
once in and the gradient once out.

Why it is pipelined: a row's wait is a chain of round trips (publish, counter, polls, statistics)
that one program a row cannot hide; an earlier kernel of this shape that did nothing while it
waited was 1.3-1.5x slower than the two-pass kernel (``bench/tune_cross_entropy.py``). The grid
here is persistent: group ``g`` takes rows ``g, g + groups, ...``, and each program issues the load
of its next row's stretch before it waits on the current row, so the next row's bytes are on the
way while the siblings arrive.

Why it never hangs: a program waits at most ``max_polls`` polls of the counter. If some sibling
has not arrived by then (a sibling not resident on the device, or the Triton interpreter, which
runs programs one after another), the program reads the whole row itself and computes the
statistics from it: slower, and the same result. The logits are never written (the gradient goes
to a separate tensor), so such a read is always safe.

Only the out-of-place case uses this kernel; ``linear_cross_entropy``'s in-place chunks keep
their own kernels.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fusetune.ops._launch import cdiv, interpreting, next_power_of_2, sm_count
from fusetune.ops.cross_entropy import _segment_stats, _softcapped

# Polls of a row's arrival counter before a program computes the row's statistics itself. On a
# GPU a poll is a round trip to L2 (about a microsecond); under the interpreter siblings that have
# not arrived never will before this program ends, so it stops at once.
_GPU_MAX_POLLS = 4096

# An SM's register file (every NVIDIA GPU since Maxwell), allocated to warps in units of 256.
_REGISTERS_PER_SM = 65536
_REGISTER_GRANULE = 256


class ResidentLaunch(NamedTuple):
    """``block``: the columns a program holds (a power of two; a row takes ``ceil(vocab / block)``
    programs); ``warps``; ``programs_per_sm``: the persistent grid's size, in programs an SM
    (rounded down to whole groups of a row's programs, at least one group)."""

    block: int
    warps: int
    programs_per_sm: int


_LAUNCH = ResidentLaunch(8192, 8, 4)


@triton.jit
def _load_stretch(logits_ptr, logits_row_stride, row, n_rows, cols, n_cols):
    """Columns ``cols`` of logits row ``row`` (-inf past the row's end, and everywhere for a row
    past the last)."""
    row_end = tl.where(row < n_rows, n_cols, 0)
    return tl.load(logits_ptr + tl.cast(row, tl.int64) * logits_row_stride + cols, mask=cols < row_end,
                   other=float("-inf"))


@triton.jit
def _stretch_stats(z, mask, SMOOTHING: tl.constexpr):
    """Max, sum of ``exp(z - max)`` and (with ``SMOOTHING``, else 0) sum of the stretch ``z`` held
    in registers (masked-off columns are -inf); the exponentials are returned for the gradient."""
    top = tl.max(z, axis=0)
    safe_top = tl.where(top == float("-inf"), 0.0, top)
    numerators = tl.exp(z - safe_top)
    logit_sum = 0.0
    if SMOOTHING:
        logit_sum = tl.sum(tl.where(mask, z, 0.0), axis=0)
    return top, tl.sum(numerators, axis=0), logit_sum, numerators, safe_top


@triton.jit
def _row_log_sum_exp(stats_row, arrivals, logits_row, n_cols, n_segments, max_polls, softcap,
                     HAS_SOFTCAP: tl.constexpr, SMOOTHING: tl.constexpr, SEGMENTS: tl.constexpr,
                     BLOCK: tl.constexpr):
    """The row's log-sum-exp and logit sum once every sibling has published its statistics, or,
    after ``max_polls`` polls without them, from the row itself (see the module docstring)."""
    count = tl.atomic_add(arrivals, 0, sem="acquire", scope="gpu")
    polls = 0
    while (count < n_segments) & (polls < max_polls):
        count = tl.atomic_add(arrivals, 0, sem="acquire", scope="gpu")
        polls += 1
    if count >= n_segments:
        segments = tl.arange(0, SEGMENTS)
        mine = segments < n_segments
        tops = tl.load(stats_row + segments * 3, mask=mine, other=float("-inf"), cache_modifier=".cg")
        totals = tl.load(stats_row + segments * 3 + 1, mask=mine, other=0.0, cache_modifier=".cg")
        logit_sums = tl.load(stats_row + segments * 3 + 2, mask=mine, other=0.0, cache_modifier=".cg")
        top = tl.max(tops, axis=0)
        safe_top = tl.where(top == float("-inf"), 0.0, top)
        lse = top + tl.log(tl.sum(totals * tl.exp(tops - safe_top), axis=0))
        logit_sum = tl.sum(logit_sums, axis=0)
    else:
        top, total, logit_sum = _segment_stats(logits_row, 0, n_cols, softcap, HAS_SOFTCAP, SMOOTHING,
                                               BLOCK, None)
        lse = top + tl.log(total)
    return lse, logit_sum


@triton.jit
def _resident_rows_kernel(
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
    n_rows,
    n_cols,
    n_segments,
    max_polls,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    SMOOTHING: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    SEGMENTS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Program ``pid`` holds stretch ``pid % n_segments`` of the rows ``pid // n_segments + k *
    groups``; segment 0 writes each row's loss. ``SEGMENTS`` is a power of two >= ``n_segments``."""
    segment = tl.program_id(0) % n_segments
    group = tl.program_id(0) // n_segments
    groups = tl.num_programs(0) // n_segments
    cols = segment * BLOCK + tl.arange(0, BLOCK)
    in_row = cols < n_cols
    smooth = label_smoothing / n_cols
    row = group
    x = _load_stretch(logits_ptr, logits_row_stride, row, n_rows, cols, n_cols)
    while row < n_rows:
        row64 = tl.cast(row, tl.int64)
        logits_row = logits_ptr + row64 * logits_row_stride
        grad_row = grad_ptr + row64 * grad_row_stride
        label = tl.load(labels_ptr + row64).to(tl.int64)
        z = _softcapped(x.to(tl.float32), softcap, HAS_SOFTCAP)
        top, total, logit_sum, numerators, safe_top = _stretch_stats(z, in_row, SMOOTHING)
        stats_row = stats_ptr + row64 * n_segments * 3
        labelled = label != ignore_index
        if labelled:
            tl.store(stats_row + segment * 3, top)
            tl.store(stats_row + segment * 3 + 1, total)
            tl.store(stats_row + segment * 3 + 2, logit_sum)
            tl.debug_barrier()  # every thread's statistics stored before the release below
            tl.atomic_add(arrivals_ptr + row64, 1, sem="release", scope="gpu")
        # The next row's stretch is on its way while this row's siblings arrive.
        next_row = row + groups
        x = _load_stretch(logits_ptr, logits_row_stride, next_row, n_rows, cols, n_cols)
        if not labelled:
            if segment == 0:
                tl.store(loss_ptr + row64, 0.0)
            if COMPUTE_GRAD:
                tl.store(grad_row + cols, tl.zeros([BLOCK], dtype=grad_ptr.dtype.element_ty), mask=in_row)
        else:
            lse, row_logit_sum = _row_log_sum_exp(stats_row, arrivals_ptr + row64, logits_row, n_cols, n_segments,
                                                  max_polls, softcap, HAS_SOFTCAP, SMOOTHING, SEGMENTS, BLOCK)
            if segment == 0:
                # One scalar load, the index clamped into the row (bad labels are reported by the host).
                safe_label = tl.minimum(tl.maximum(label, 0), n_cols - 1)
                z_label = _softcapped(tl.load(logits_row + safe_label).to(tl.float32), softcap, HAS_SOFTCAP)
                loss = lse - (1.0 - label_smoothing) * z_label - smooth * row_logit_sum + z_loss * lse * lse
                tl.store(loss_ptr + row64, loss)
            if COMPUTE_GRAD:
                scale = tl.load(scale_ptr + row64 * scale_stride).to(tl.float32)
                softmax = numerators * tl.exp(safe_top - lse)
                grad = softmax * (1.0 + 2.0 * z_loss * lse) - smooth
                grad = tl.where(cols == label, grad - (1.0 - label_smoothing), grad)
                if HAS_SOFTCAP:
                    capped = z / softcap
                    grad = grad * (1.0 - capped * capped)
                tl.store(grad_row + cols, (grad * scale).to(grad_ptr.dtype.element_ty), mask=in_row)
        row = next_row


def resident_cross_entropy_rows(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    grad_scale: torch.Tensor | None = None,
    grad_out: torch.Tensor | None = None,
    launch: ResidentLaunch | None = None,
    max_polls: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``cross_entropy_rows``'s contract (per-row float32 losses of 2-D ``logits``; with
    ``grad_scale`` the scaled gradient too, written to ``grad_out`` or a new tensor), computed
    with one read of the logits. ``grad_out`` may not be ``logits``: a program that computes a
    row's statistics itself (see the module docstring) reads stretches its siblings may be writing.
    ``max_polls`` overrides the wait's bound (tests use it to take both paths)."""
    if grad_out is not None and grad_out.data_ptr() == logits.data_ptr():
        raise ValueError("fusetune: the resident cross-entropy kernel cannot write over its logits; "
                         "pass a separate grad_out (or use cross_entropy_rows).")
    n_rows, n_cols = logits.shape
    losses = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    compute_grad = grad_scale is not None
    if compute_grad and grad_out is None:
        grad_out = torch.empty_like(logits)
    if n_rows == 0:
        return losses, grad_out
    block, warps, programs_per_sm = launch or _LAUNCH
    block = min(block, next_power_of_2(n_cols))
    n_segments = cdiv(n_cols, block)
    if max_polls is None:
        max_polls = 0 if interpreting() else _GPU_MAX_POLLS
    stats = torch.empty(n_rows * n_segments * 3, dtype=torch.float32, device=logits.device)
    arrivals = torch.zeros(n_rows, dtype=torch.int32, device=logits.device)
    args = (
        logits,
        logits.stride(0),
        labels,
        losses,
        grad_out if compute_grad else losses,
        grad_out.stride(0) if compute_grad else 0,
        grad_scale if compute_grad else losses,
        (1 if grad_scale.numel() > 1 else 0) if compute_grad else 0,
        stats,
        arrivals,
        n_rows,
        n_cols,
        n_segments,
        max_polls,
        ignore_index,
        float(label_smoothing),
        float(z_loss),
        float(softcap) if softcap is not None else 1.0,
    )
    constants = dict(
        HAS_SOFTCAP=softcap is not None,
        SMOOTHING=label_smoothing > 0,
        COMPUTE_GRAD=compute_grad,
        SEGMENTS=next_power_of_2(n_segments),
        BLOCK=block,
        num_warps=warps,
    )
    per_sm = min(programs_per_sm, _resident_per_sm(args, constants, warps, logits.device))
    groups = min(n_rows, max(1, per_sm * sm_count(logits.device) // n_segments))
    _resident_rows_kernel[(groups * n_segments,)](*args, **constants)
    return losses, grad_out


def _resident_per_sm(args: tuple, constants: dict, warps: int, device: torch.device) -> int:
    """How many of the kernel's programs one SM can hold at once, from the compiled kernel's
    registers and shared memory (the persistent grid is sized so that every program is resident,
    or its groups would wait out their polls). Unbounded under the interpreter."""
    if device.type != "cuda":
        return 1 << 30
    compiled = _resident_rows_kernel.warmup(*args, grid=(1,), **constants)
    compiled._init_handles()
    properties = torch.cuda.get_device_properties(device)
    registers_per_warp = cdiv(compiled.n_regs * 32, _REGISTER_GRANULE) * _REGISTER_GRANULE
    by_registers = _REGISTERS_PER_SM // (registers_per_warp * warps)
    by_threads = properties.max_threads_per_multi_processor // (32 * warps)
    shared = compiled.metadata.shared
    by_shared = properties.shared_memory_per_multiprocessor // shared if shared else by_threads
    return max(1, min(by_registers, by_threads, by_shared))
