"""The label summary kernel (``summarise_labels``) against the same counts made by torch."""

from __future__ import annotations

import pytest
import torch

from fusetune.ops.labels import LabelCheck, summarise_labels
from tests.ops.checks import DEVICE

VOCAB = 1000
# Longer than two of the kernel's 8,192-label steps, not a multiple of one.
N_LABELS = 2 * 8192 + 37


def make_labels(n=N_LABELS, ignored=0.4, seed=0):
    """Labels in [0, VOCAB) with about ``ignored`` of them set to -100."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, VOCAB, (n,), generator=generator)
    labels[torch.rand(n, generator=generator) < ignored] = -100
    return labels.to(DEVICE)


def summary_values(labels, reduction="mean", num_items_in_batch=None):
    summary = summarise_labels(labels, VOCAB, -100, reduction, num_items_in_batch)
    count, bad = summary.counts.tolist()
    return count, bad, summary.denominator.item(), summary.grad_scale.item()


def test_count_and_mean_denominator():
    labels = make_labels()
    count, bad, denominator, scale = summary_values(labels)
    expected = int((labels != -100).sum())
    assert (count, bad) == (expected, 0)
    assert denominator == float(expected)
    assert scale == pytest.approx(1.0 / expected, rel=1e-6)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_sum_and_none_divide_by_one(reduction):
    count, _, denominator, scale = summary_values(make_labels(), reduction)
    assert count > 0 and denominator == 1.0 and scale == 1.0


@pytest.mark.parametrize("as_tensor", [False, True], ids=["number", "tensor"])
def test_num_items_in_batch_replaces_the_count(as_tensor):
    items = torch.tensor(12345, device=DEVICE) if as_tensor else 12345
    _, _, denominator, scale = summary_values(make_labels(), num_items_in_batch=items)
    assert denominator == 12345.0
    assert scale == pytest.approx(1 / 12345, rel=1e-6)


@pytest.mark.parametrize("items", [None, 0, "tensor"])
def test_every_label_ignored_counts_zero_and_divides_by_one(items):
    """The count, or a num_items_in_batch of 0, floors at 1: the loss is 0, not NaN."""
    labels = torch.full((301,), -100, device=DEVICE)
    items = torch.tensor(0, device=DEVICE) if items == "tensor" else items
    assert summary_values(labels, num_items_in_batch=items) == (0, 0, 1.0, 1.0)


def test_no_labels():
    assert summary_values(torch.empty(0, dtype=torch.int64, device=DEVICE)) == (0, 0, 1.0, 1.0)


@pytest.mark.parametrize("bad_label", [-1, VOCAB, 10**12])
def test_out_of_range_label_in_the_last_step_is_flagged(bad_label):
    labels = make_labels()
    labels[-3] = bad_label
    count, bad, _, _ = summary_values(labels)
    assert bad == 1
    assert count == int((labels != -100).sum())
    flag = summarise_labels(labels, VOCAB, -100, "mean", None).counts[1]
    with pytest.raises(ValueError, match=f"label {bad_label} is outside the vocabulary"):
        LabelCheck(labels, VOCAB, -100, bad=flag).raise_if_bad()


def test_another_ignore_index_is_not_out_of_range():
    labels = make_labels()
    labels[labels == -100] = -1
    summary = summarise_labels(labels, VOCAB, -1, "mean", None)
    assert summary.counts.tolist() == [int((labels != -1).sum()), 0]
    LabelCheck(labels, VOCAB, -1, bad=summary.counts[1]).raise_if_bad()
