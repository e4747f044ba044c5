"""The rows a linear cross-entropy computes, a chunk at a time: those whose label is not ignored.

Leaving the ignored rows out makes them cost nothing (in a VLM most rows are image or prompt
tokens). But how many rows remain is a number the host needs, because it sets the chunks'
shapes, and the host can read a device value only once the device has got that far. If the
count is read before any chunk is queued, the device sits idle while the host launches the first
chunk's kernels. On an H200's host that was 0.46 ms a step at 8192 x 2304 x 262144 with a frozen
weight, one gap a step (``bench/profile_ops.py --trace``).

So ``RowChunks.labelled`` reads nothing up front. It queues a copy of the label count into pinned
memory, behind an event (``DeviceReading``), and hands out the first chunk provisionally: the
first ``chunk_rows`` rows as they are, a view. The loop queues the chunk's first work that needs
no count, and then calls ``Chunk.settle``, which reads the count while the device works:

- every row labelled (the common case): the provisional chunk was the right one, and the work
  queued on it stands;
- some rows ignored: the rows are ordered labelled first (a stable sort on the device), the
  chunk becomes the first labelled rows (a gather), and the loop redoes the work it queued.

How much work to risk is the loop's choice. Vocabulary slices (``vocab_slices``) settle after
the first slice, a 32 MiB block of logits. Whole-vocabulary chunks, whose product is milliseconds
long, read the count before any product (``RowChunks.outputs``).

While a CUDA graph is captured nothing is read, and every row is computed: the count is a
host-side shape that a replay could not change. An ignored row's loss and gradient are zero.
``fusetune.graphs.CapturedStep`` checks each batch's labels before its replay.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from fusetune.ops._launch import capturing
from fusetune.ops.labels import DeviceReading, LabelSummary, raise_out_of_range


class Chunk:
    """Rows ``[start, start + size)`` of the computed order: their hidden states (contiguous, in
    the matmul dtype) and labels. The first chunk of ``RowChunks.labelled`` is provisional until
    ``settle``: the first rows, whatever their labels."""

    def __init__(self, start: int, rows: torch.Tensor, labels: torch.Tensor,
                 owner: RowChunks | None):
        self.start, self.rows, self.labels = start, rows, labels
        self._owner = owner  # set while provisional

    @property
    def size(self) -> int:
        return self.rows.shape[0]

    @property
    def end(self) -> int:
        return self.start + self.size

    def settle(self) -> bool:
        """Make the chunk final (the first time, the host reads the count: queue work that does
        not need it first). True when its rows changed, so that work queued on the provisional
        rows must be redone; the chunk may then be empty (every label ignored)."""
        if self._owner is None:
            return False
        owner, self._owner = self._owner, None
        if owner.positions() is None:  # every row is computed: the provisional rows stand
            return False
        self.rows, self.labels = owner._take(self.start, min(self.end, owner.count()))
        return True


class RowChunks:
    """Rows (n, H) and their labels, handed out in chunks of consecutive positions of an order.

    A loop over the chunks writes its outputs in that order, "compact" rows (``outputs``), and
    ``positions`` maps them back to the rows.
    """

    def __init__(self, rows: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype,
                 order: torch.Tensor | None = None, pending: DeviceReading | None = None,
                 check: tuple[int, int] | None = None):
        """``rows`` (n, H) with unit column stride; ``labels`` (n,) int64; ``dtype`` the chunks'.
        ``order``: the positions of the rows to compute (None: every row, in order). Or, with
        ``pending`` (a reading of ``LabelSummary.counts``) and ``check`` (n_classes,
        ignore_index): the rows whose label is not ``ignore_index``, found when it is read."""
        self.rows, self.labels, self.dtype = rows, labels, dtype
        self._order, self._pending, self._check = order, pending, check
        self._count = None if pending is not None else len(labels) if order is None else len(order)

    @classmethod
    def labelled(cls, rows: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype,
                 summary: LabelSummary, n_classes: int, ignore_index: int) -> RowChunks:
        """The rows whose label is not ``ignore_index``, their count read only when the first
        chunk settles (every row while a CUDA graph is captured: the module says why)."""
        if capturing():
            return cls(rows, labels, dtype)
        return cls(rows, labels, dtype, pending=DeviceReading(summary.counts),
                   check=(n_classes, ignore_index))

    @property
    def hidden_size(self) -> int:
        return self.rows.shape[1]

    @property
    def device(self) -> torch.device:
        return self.rows.device

    @property
    def capacity(self) -> int:
        """The most rows a chunk can hold: all of them until the count is read."""
        return len(self.labels) if self._count is None else self._count

    def count(self) -> int:
        """How many rows are computed. The first call reads the label count on the host, and
        raises the clear error if any label lies outside the vocabulary."""
        if self._count is None:
            count, any_bad = self._pending.read().tolist()
            self._pending = None
            n_classes, ignore_index = self._check
            if any_bad:
                raise_out_of_range(self.labels, n_classes, ignore_index)
            if count < len(self.labels):  # labelled rows first, in order
                ignored = (self.labels == ignore_index).to(torch.uint8)
                self._order = torch.argsort(ignored, stable=True)[:count]
            self._count = count
        return self._count

    def outputs(self, with_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Empty buffers for the computed rows' float32 losses and (``with_grad``) their gradient
        in the chunks' dtype, in the compact order. Reads the count if no chunk has."""
        n_rows = self.count()
        losses = torch.empty(n_rows, dtype=torch.float32, device=self.device)
        grad = (
            torch.empty(n_rows, self.hidden_size, dtype=self.dtype, device=self.device)
            if with_grad
            else None
        )
        return losses, grad

    def positions(self) -> torch.Tensor | None:
        """The computed rows' positions among the rows, in the compact order (None: every row, in
        order). Reads the count if no chunk has."""
        self.count()
        return self._order

    def split(self, chunk_rows: int) -> Iterator[Chunk]:
        """The computed rows, ``chunk_rows`` at a time; the first chunk may be provisional
        (``Chunk.settle``), and is settled before the second is made."""
        start = 0
        while start < self.capacity:
            provisional = self._count is None
            chunk = Chunk(start, *self._take(start, min(start + chunk_rows, self.capacity)),
                          owner=self if provisional else None)
            yield chunk
            chunk.settle()
            start = chunk.end

    def _take(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows and labels at compact positions [start, end): views where the order is the rows'."""
        if self._order is None:
            rows, labels = self.rows[start:end], self.labels[start:end]
        else:
            index = self._order[start:end]
            rows, labels = self.rows.index_select(0, index), self.labels.index_select(0, index)
        return rows.to(self.dtype).contiguous(), labels
