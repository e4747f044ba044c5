"""RowChunks: the labelled rows a chunk at a time, their count read only once the first chunk
settles; checked against ``nonzero`` and plain indexing."""

import importlib

import pytest
import torch

from fusetune.ops.labels import summarise_labels
from fusetune.ops.row_chunks import RowChunks
from tests.ops.checks import DEVICE

VOCAB = 50


def labelled_chunks(rows, labels, dtype=torch.float32, ignore_index=-100):
    summary = summarise_labels(labels, VOCAB, ignore_index, "mean", None)
    return RowChunks.labelled(rows, labels, dtype, summary, VOCAB, ignore_index)


def random_batch(n_rows=23, hidden=5, ignored=(0, 3, 4, 9, 15, 16, 22)):
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(n_rows, hidden, generator=gen).to(DEVICE)
    labels = torch.randint(0, VOCAB, (n_rows,), generator=gen)
    labels[list(ignored)] = -100
    return rows, labels.to(DEVICE)


def test_chunks_are_the_labelled_rows_in_order():
    """Chunks of 4 walk the labelled rows in their order, cast to the chunks' dtype and
    contiguous; ``positions`` are ``nonzero``'s; ``outputs`` has a row per labelled row."""
    rows, labels = random_batch()
    chunks = labelled_chunks(rows, labels, dtype=torch.bfloat16)
    expected = (labels != -100).nonzero().squeeze(1)
    taken_rows, taken_labels, starts = [], [], []
    for chunk in chunks.split(4):
        chunk.settle()
        assert chunk.rows.dtype == torch.bfloat16 and chunk.rows.is_contiguous()
        starts.append(chunk.start)
        taken_rows.append(chunk.rows)
        taken_labels.append(chunk.labels)
    assert starts == list(range(0, len(expected), 4))
    assert torch.equal(torch.cat(taken_rows), rows[expected].to(torch.bfloat16))
    assert torch.equal(torch.cat(taken_labels), labels[expected])
    assert torch.equal(chunks.positions(), expected)
    losses, grad = chunks.outputs(with_grad=True)
    assert losses.shape == (len(expected),) and grad.shape == (len(expected), rows.shape[1])
    assert chunks.outputs(with_grad=False)[1] is None


def test_the_first_chunk_is_provisional_until_it_settles():
    """Before the count is read the first chunk is the first ``chunk_rows`` rows as they are;
    some being ignored, ``settle`` says so and makes it the labelled rows, and no second chunk
    follows."""
    rows, labels = random_batch(n_rows=10, ignored=(0, 1, 2, 4, 5, 6, 8))
    chunks = labelled_chunks(rows, labels)
    made = []
    for chunk in chunks.split(8):
        assert chunk.size == 8 and chunk.rows.data_ptr() == rows.data_ptr(), "provisional: a view"
        assert chunk.settle() is True, "its rows changed: work on them is redone"
        assert torch.equal(chunk.rows, rows[[3, 7, 9]])
        assert torch.equal(chunk.labels, labels[[3, 7, 9]])
        assert chunk.settle() is False, "settled once"
        made.append(chunk)
    assert len(made) == 1


def test_every_row_labelled_gives_views_and_no_positions():
    """The provisional chunk stands (``settle`` False), and every chunk is a view."""
    rows, labels = random_batch(ignored=())
    chunks = labelled_chunks(rows, labels)
    pieces = []
    for chunk in chunks.split(6):
        assert chunk.settle() is False
        pieces.append(chunk)
    assert [chunk.start for chunk in pieces] == [0, 6, 12, 18]
    assert chunks.positions() is None
    assert [chunk.rows.data_ptr() for chunk in pieces] == [rows[i].data_ptr() for i in (0, 6, 12, 18)]


def test_every_row_ignored_gives_no_rows():
    rows, labels = random_batch(n_rows=6, ignored=range(6))
    chunks = labelled_chunks(rows, labels)
    sizes = []
    for chunk in chunks.split(4):
        assert chunk.settle() is True
        sizes.append(chunk.size)
    assert sizes == [0]
    assert chunks.positions().numel() == 0 and chunks.outputs(with_grad=False)[0].numel() == 0


def test_no_rows():
    rows, labels = random_batch(n_rows=0, ignored=())
    chunks = labelled_chunks(rows, labels)
    assert list(chunks.split(4)) == [] and chunks.count() == 0


def test_a_label_out_of_range_is_named_when_the_count_is_read():
    rows, labels = random_batch()
    labels[7] = VOCAB
    chunks = labelled_chunks(rows, labels)
    with pytest.raises(ValueError, match=f"label {VOCAB} is outside the vocabulary"):
        for chunk in chunks.split(4):
            chunk.settle()


def test_known_order_takes_those_rows():
    """The backward's recompute: the positions found in forward, no count to read."""
    rows, labels = random_batch()
    order = torch.tensor([1, 2, 5, 6, 7], device=DEVICE)
    chunks = RowChunks(rows, labels, torch.float32, order=order)
    assert [chunk.start for chunk in chunks.split(2)] == [0, 2, 4]
    assert torch.equal(torch.cat([chunk.rows for chunk in chunks.split(2)]), rows[order])
    assert torch.equal(chunks.positions(), order)


def test_while_capturing_every_row_is_computed(monkeypatch):
    monkeypatch.setattr(importlib.import_module("fusetune.ops.row_chunks"), "capturing", lambda: True)
    rows, labels = random_batch()
    chunks = labelled_chunks(rows, labels)
    assert chunks.count() == rows.shape[0] and chunks.positions() is None
    assert torch.equal(torch.cat([chunk.labels for chunk in chunks.split(5)]), labels)
