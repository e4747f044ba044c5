"""The labels of a cross-entropy loss: their checks, their count, and the loss's denominator.

A label outside [0, vocab) must become a clear error, never an out-of-bounds read (the row kernels
clamp the index they load, so they are safe either way) and never a wait that drains the device:
``LabelCheck`` reads the flag later, through pinned memory behind an event (``DeviceReading``).

``summarise_labels`` finds everything a loss needs from its labels in one pass of one small
kernel: how many rows are labelled, the denominator of the reduction (and its reciprocal, the
gradient's scale), and the out-of-range flag. The same answers from torch's elementwise ops and
reductions took 11 (cross_entropy) to 15 (linear_cross_entropy) kernel launches a step.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fusetune.ops._direct_launch import direct_launch
from fusetune.ops._launch import capturing

# Labels a step of the summary kernel reads (eight warps, 32 a thread).
_SUMMARY_BLOCK = 8192
# How the summary kernel finds the denominator.
_COUNT, _FROM_TENSOR, _FIXED = 0, 1, 2


def flatten_labels(labels: torch.Tensor, rows_shape: torch.Size) -> torch.Tensor:
    """``labels`` as flat contiguous int64, after checking their type and shape: the input's leading
    shape ``rows_shape`` (one label per row), or already flat with one label per row. Other shapes of
    the same count would pair labels with rows in an order nobody meant."""
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(
            f"fusetune: labels must be an integer tensor (got {labels.dtype}); use .long()."
        )
    n_rows = math.prod(rows_shape)
    if labels.shape != rows_shape and (labels.dim() != 1 or labels.numel() != n_rows):
        raise ValueError(
            f"fusetune: labels of shape {tuple(labels.shape)} for rows of shape {tuple(rows_shape)} "
            f"(the input's shape but its last dim); pass one label per row, of shape "
            f"{tuple(rows_shape)} or ({n_rows},) (for a causal LM, shift labels before calling, or use "
            "the patched model's loss)."
        )
    return labels.reshape(-1).to(torch.int64).contiguous()


def out_of_range(flat: torch.Tensor, n_classes: int, ignore_index: int) -> torch.Tensor:
    """A 0-dim bool tensor, on the labels' device (no host sync): is any label outside [0, n_classes)?"""
    return ((flat != ignore_index) & ((flat < 0) | (flat >= n_classes))).any()


def raise_out_of_range(flat: torch.Tensor, n_classes: int, ignore_index: int) -> None:
    """Raise the error for labels that ``out_of_range`` flagged, naming the first bad one."""
    bad = (flat != ignore_index) & ((flat < 0) | (flat >= n_classes))
    raise ValueError(
        f"fusetune: label {flat[bad][0].item()} is outside the vocabulary [0, {n_classes}); labels "
        f"must be class indices or ignore_index={ignore_index}. Check the tokenizer's vocab size "
        "against the model's, and that padding uses ignore_index."
    )


class DeviceReading:
    """A small device tensor that the host reads later without draining the device's queue.

    On CUDA it is copied into pinned host memory behind an event (queue it before the work that
    follows), so reading it waits only for the copy, never for the rest of the queue; on a CPU it
    is the tensor itself.
    """

    def __init__(self, value: torch.Tensor):
        self._ready = None
        if value.is_cuda:
            host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            # The copy is queued on the tensor's device's current stream; the event goes on that
            # stream too, whichever device is current.
            host.copy_(value, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record(torch.cuda.current_stream(value.device))
            value = host
        self._value = value

    def read(self) -> torch.Tensor:
        """The value, on the host once the copy is done (on a CPU, the tensor itself)."""
        if self._ready is not None:
            self._ready.synchronize()
            self._ready = None
        return self._value


class LabelCheck:
    """Whether any label lies outside [0, n_classes), found on the device and read later without
    draining it (a ``DeviceReading``: queue the check before the kernels that follow).

    While a CUDA graph is captured nothing is checked: the host cannot read a captured value, and
    a replay would not run the host's side anyway. The caller checks instead:
    ``fusetune.graphs.CapturedStep`` checks every batch's labels before its replay.
    """

    def __init__(
        self, flat: torch.Tensor, n_classes: int, ignore_index: int, bad: torch.Tensor | None = None
    ):
        """``bad``: the flag, nonzero where a label is out of range, when it was found already
        (``summarise_labels``); None finds it here."""
        self._labels = (flat, n_classes, ignore_index)
        self._bad = None
        if capturing():
            return
        if bad is None:
            bad = out_of_range(flat, n_classes, ignore_index)
        self._bad = DeviceReading(bad)

    def raise_if_bad(self) -> None:
        """Raise the clear error naming the first bad label, if there is one."""
        if self._bad is not None and bool(self._bad.read()):
            raise_out_of_range(*self._labels)


def check_labels(
    labels: torch.Tensor, rows_shape: torch.Size, n_classes: int, ignore_index: int
) -> torch.Tensor:
    """Flatten ``labels`` (see ``flatten_labels``) to int64 and fail clearly on any label outside
    [0, n_classes).

    Costs one small reduction and one host sync. (The kernels never read outside a row whatever
    the labels: they clamp the index they load; this check is what turns a bad label into an
    error.) Not while a CUDA graph is captured (see ``LabelCheck``).
    """
    flat = flatten_labels(labels, rows_shape)
    LabelCheck(flat, n_classes, ignore_index).raise_if_bad()
    return flat


def loss_denominator(
    labels: torch.Tensor, reduction: str, ignore_index: int, num_items_in_batch
) -> torch.Tensor:
    """The float32 tensor the summed loss is divided by (stays on the device: no host sync).

    "mean": the number of labelled rows, or ``num_items_in_batch`` when given (transformers'
    gradient-accumulation rule), either floored at 1: every label ignored gives loss 0, not NaN,
    also when ``num_items_in_batch`` counted none in any micro-batch. "sum"/"none": 1.
    """
    if reduction != "mean":
        return torch.ones((), dtype=torch.float32, device=labels.device)
    if num_items_in_batch is not None:
        return torch.as_tensor(
            num_items_in_batch, dtype=torch.float32, device=labels.device
        ).reshape(()).clamp_min(1)
    return (labels != ignore_index).sum().clamp_min(1).to(torch.float32)


class LabelSummary(NamedTuple):
    """What a loss needs from its labels, on the labels' device (``summarise_labels``).

    ``counts``: int64 [labelled rows, out-of-range flag]; ``scales``: float32 [denominator,
    1 / denominator]. A caller that reads the flag later passes ``counts[1]`` to ``LabelCheck``;
    one that reads the counts at once (``linear_cross_entropy``) needs no check of its own.
    """

    counts: torch.Tensor
    scales: torch.Tensor

    @property
    def denominator(self) -> torch.Tensor:
        """The 0-dim float32 tensor the summed loss is divided by (``loss_denominator``'s rule)."""
        return self.scales[0]

    @property
    def grad_scale(self) -> torch.Tensor:
        """``1 / denominator`` as a 1-element float32 tensor (the row kernels' gradient scale)."""
        return self.scales[1:]


@direct_launch
@triton.jit
def _label_summary_kernel(labels_ptr, n_rows, n_classes, ignore_index, items_ptr, fixed_denominator,
                          counts_ptr, scales_ptr, DENOMINATOR: tl.constexpr, BLOCK: tl.constexpr):
    """One program walks every label and writes ``LabelSummary.counts`` and ``.scales``. ``DENOMINATOR`` is
    _COUNT = 0 (labelled rows), _FROM_TENSOR = 1 (the number at ``items_ptr``) or _FIXED = 2
    (``fixed_denominator``); the first two floored at 1, as ``loss_denominator`` does."""
    count = tl.zeros([BLOCK], dtype=tl.int32)
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, n_rows, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        label = tl.load(labels_ptr + offs, mask=offs < n_rows, other=ignore_index)
        labelled = label != ignore_index
        count += labelled.to(tl.int32)
        bad = tl.maximum(bad, (labelled & ((label < 0) | (label >= n_classes))).to(tl.int32))
    total = tl.sum(count.to(tl.int64), axis=0)
    if DENOMINATOR == 0:
        denominator = tl.maximum(total, 1).to(tl.float32)
    elif DENOMINATOR == 1:
        denominator = tl.maximum(tl.load(items_ptr).to(tl.float32), 1.0)
    else:
        denominator = fixed_denominator
    tl.store(counts_ptr, total)
    tl.store(counts_ptr + 1, tl.max(bad, axis=0).to(tl.int64))
    tl.store(scales_ptr, denominator)
    tl.store(scales_ptr + 1, 1.0 / denominator)


def summarise_labels(
    flat: torch.Tensor, n_classes: int, ignore_index: int, reduction: str, num_items_in_batch
) -> LabelSummary:
    """Count, denominator and out-of-range flag of flat int64 labels, in one kernel (Triton inputs
    only: the CPU references use ``loss_denominator`` and ``check_labels``). Nothing is read on
    the host."""
    counts = torch.empty(2, dtype=torch.int64, device=flat.device)
    scales = torch.empty(2, dtype=torch.float32, device=flat.device)
    items, mode, fixed = scales, _FIXED, 1.0  # "sum" and "none" divide by 1
    items_here = torch.is_tensor(num_items_in_batch) and num_items_in_batch.device == flat.device
    if reduction == "mean" and num_items_in_batch is None:
        mode = _COUNT
    elif reduction == "mean" and items_here:
        items, mode = num_items_in_batch.reshape(1), _FROM_TENSOR
    elif reduction == "mean":  # a number, or a tensor elsewhere (read once on the host)
        fixed = max(float(num_items_in_batch), 1.0)
    _label_summary_kernel[(1,)](
        flat, flat.numel(), n_classes, ignore_index, items, fixed, counts, scales,
        DENOMINATOR=mode, BLOCK=_SUMMARY_BLOCK, num_warps=8,
    )
    return LabelSummary(counts, scales)
