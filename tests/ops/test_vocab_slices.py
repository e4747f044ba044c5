"""linear_cross_entropy's frozen-weight path, a vocabulary slice at a time: losses and hidden
gradients against float64, over several slices (the last a narrow one), with rows whose max lies
far above their first slice, confident rows, a weight whose rows share a large common part,
ignored rows and a soft-cap."""

import importlib

import pytest
import torch

from fusetune.ops.labels import summarise_labels
from fusetune.ops.row_chunks import RowChunks
from fusetune.ops.vocab_slices import slice_chunk_rows, slice_width, sliced_frozen_loss
from tests.ops.checks import DEVICE, assert_close_to_float64

VOCAB = 4133  # four slices of 1,024 columns and one of 37
SLICE_COLUMNS = 1024
CHUNK_ROWS = 4  # rows 13: three chunks of 4 and one of 1


@pytest.fixture
def narrow_slices(monkeypatch):
    """Slices of ``SLICE_COLUMNS`` columns at ``CHUNK_ROWS`` rows, whatever the dtype (the real
    budget would put these small vocabularies in one slice)."""
    module = importlib.import_module("fusetune.ops.vocab_slices")

    def set_for(dtype):
        itemsize = torch.empty((), dtype=dtype).element_size()
        monkeypatch.setattr(module, "SLICE_BYTES", CHUNK_ROWS * itemsize * SLICE_COLUMNS)
        assert slice_width(CHUNK_ROWS, VOCAB, itemsize) == SLICE_COLUMNS

    return set_for


def logits_of(hidden, weight):
    """``hidden @ weight.T`` as the slice's matmul makes it: float32 sums rounded to the dtype."""
    return (hidden.float() @ weight.float().t()).to(hidden.dtype)


def float64_loss_and_grad(hidden, weight, labels, scale, softcap=None, ignore_index=-100,
                          label_smoothing=0.0, z_loss=0.0):
    """Per-row losses and ``scale * dloss/dhidden`` in float64 from the dtype-rounded logits
    (ignored rows: 0 and 0), by autograd through the textbook formula."""
    z = logits_of(hidden, weight).double().requires_grad_()
    capped = softcap * torch.tanh(z / softcap) if softcap is not None else z
    keep = labels != ignore_index
    safe = labels.clamp_min(0)
    lse = torch.logsumexp(capped, dim=1)
    nll = lse - capped.gather(1, safe[:, None]).squeeze(1)
    smoothed = (1 - label_smoothing) * nll + label_smoothing * (lse - capped.mean(dim=1))
    losses = (smoothed + z_loss * lse.square()) * keep
    (dlogits,) = torch.autograd.grad((losses * scale.double()).sum(), z)
    return losses.detach(), dlogits @ weight.double()


def random_rows(dtype, rows=13, features=37, seed=0, spread=0.6):
    """Hidden rows, a weight (logits of about 3 nats of spread) and labels, every fifth row
    from the third on ignored."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, features, generator=gen).to(dtype).to(DEVICE)
    weight = (torch.randn(VOCAB, features, generator=gen) * spread / features**0.5 * 6).to(dtype)
    labels = torch.randint(0, VOCAB, (rows,), generator=gen)
    labels[2::5] = -100
    return hidden, weight.to(DEVICE), labels.to(DEVICE)


def check(hidden, weight, labels, scale, softcap=None, want_grad=True, **options):
    losses, grad = sliced_frozen_loss(
        RowChunks(hidden, labels, hidden.dtype), weight, scale if want_grad else None,
        ignore_index=-100, softcap=softcap, chunk_rows=CHUNK_ROWS, **options,
    )
    want_losses, want_grad_hidden = float64_loss_and_grad(
        hidden, weight, labels, scale, softcap, **options
    )
    assert_close_to_float64(losses, want_losses, torch.float32, "losses")
    if want_grad:
        assert grad.dtype == hidden.dtype
        assert_close_to_float64(grad, want_grad_hidden, hidden.dtype, "hidden gradient")
        ignored = labels == -100
        assert torch.all(grad[ignored] == 0), "an ignored row's gradient is zero"
    else:
        assert grad is None
    assert torch.all(losses[labels == -100] == 0), "an ignored row's loss is zero"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 15.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("per_row_scale", [False, True], ids=["one_scale", "row_scales"])
def test_matches_float64_over_several_slices(narrow_slices, dtype, softcap, per_row_scale):
    narrow_slices(dtype)
    hidden, weight, labels = random_rows(dtype)
    labels[0], labels[1] = VOCAB - 1, 5  # labels in the narrow last slice and in the first
    scale = (
        torch.linspace(0.5, 2.0, len(labels), device=DEVICE)
        if per_row_scale
        else torch.full((1,), 1 / 11, device=DEVICE)
    )
    check(hidden, weight, labels, scale, softcap)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "options",
    [
        dict(label_smoothing=0.1),
        dict(z_loss=1e-3),
        dict(label_smoothing=0.2, z_loss=1e-3),
        dict(z_loss=1e-3, softcap=15.0),
    ],
    ids=["smoothing", "z_loss", "both", "z_loss_softcap"],
)
def test_smoothing_and_z_loss(narrow_slices, dtype, options):
    """Label smoothing's uniform term (the weight's column sums) and z-loss's factor on the
    softmax, against autograd through the textbook loss; per-row scales, and losses alone."""
    narrow_slices(dtype)
    hidden, weight, labels = random_rows(dtype)
    labels[0], labels[1] = VOCAB - 1, 5
    scale = torch.linspace(0.5, 2.0, len(labels), device=DEVICE)
    check(hidden, weight, labels, scale, **options)
    check(hidden, weight, labels, scale, want_grad=False, **options)


def test_smoothing_with_a_softcap_is_refused():
    hidden, weight, labels = random_rows(torch.float32, rows=3)
    with pytest.raises(ValueError, match="not both"):
        sliced_frozen_loss(RowChunks(hidden, labels, hidden.dtype), weight, None, ignore_index=-100,
                           softcap=30.0, label_smoothing=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_losses_alone(narrow_slices, dtype):
    """Without a gradient (evaluation, or the forward of reduction="none") no numerator is
    written, and the losses are the same."""
    narrow_slices(dtype)
    hidden, weight, labels = random_rows(dtype)
    check(hidden, weight, labels, torch.ones(1, device=DEVICE), want_grad=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_far_above_their_first_slice(narrow_slices, dtype):
    """Rows whose max lies in a later slice far above the first slice's first block: by about 45
    nats (past the rescale gap: the reference moves, and what earlier slices summed, the float32
    accumulator's row included, is rescaled), by about 105 (past the clamp: the slice's logits
    are recomputed) and a first block 60 nats below the rest, in the first slice."""
    narrow_slices(dtype)
    hidden, weight, labels = random_rows(dtype, rows=6)
    hidden[:, :2] = 0.0
    weight[:, :2] = 0.0
    hidden[0, 0], weight[2100, 0] = 6.0, 7.5  # ~45 nats, in the third slice
    hidden[1, 0], weight[4130, 0] = 10.0, 10.5  # ~105 nats, in the last slice
    hidden[3, 1], weight[:SLICE_COLUMNS, 1] = 6.0, -10.0  # the first slice 60 nats below
    hidden[4, 0] = 6.0  # ~45 nats, and the label (in the first slice) far below the max
    labels[0], labels[1], labels[3], labels[4] = 2100, 5, 3000, 7
    check(hidden, weight, labels, torch.full((1,), 0.25, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_confident_rows_over_a_weight_with_a_common_part(narrow_slices, dtype):
    """p_label near 1, and weight rows that share a common vector 4 times their own spread: the
    hidden gradient ``sum_v p_v w_v - w_label`` is a small difference of large terms. It is made
    in float32 from float32 products, so only the numerators' rounding to the dtype is left (as
    in PyTorch's own bfloat16 gradient, whose error here is about the same)."""
    narrow_slices(dtype)
    hidden, weight, labels = random_rows(dtype, rows=5)
    weight = weight.float()
    common = torch.randn(weight.shape[1], generator=torch.Generator().manual_seed(9)).to(DEVICE)
    weight += 4 * weight.std() * common / common.norm() * weight.shape[1] ** 0.5
    labels = torch.tensor([11, 1500, 4132, 3000, 64], device=DEVICE)
    logits = hidden.float() @ weight.t()
    for row, margin in enumerate((8.0, 12.0, 16.0, 9.0, 10.0)):
        # Lift the label's logit above the row's max by moving its weight row along the row.
        h = hidden[row].float()
        gap = logits[row].max() + margin - logits[row, labels[row]]
        weight[labels[row]] += gap * h / h.dot(h)
    weight = weight.to(dtype)
    want_losses, _ = float64_loss_and_grad(hidden, weight, labels, torch.ones(1, device=DEVICE))
    assert want_losses.max() < 1e-2, "the rows are confident (p_label above 0.99)"
    check(hidden, weight, labels, torch.ones(1, device=DEVICE))


def test_every_row_ignored_gives_zeros(narrow_slices):
    narrow_slices(torch.bfloat16)
    hidden, weight, labels = random_rows(torch.bfloat16, rows=5)
    labels[:] = -100
    losses, grad = sliced_frozen_loss(
        RowChunks(hidden, labels, hidden.dtype), weight, torch.ones(1, device=DEVICE),
        ignore_index=-100, softcap=None, chunk_rows=CHUNK_ROWS,
    )
    assert torch.all(losses == 0) and torch.all(grad == 0)


@pytest.mark.parametrize("labelled", [(5,), (1, 6), (0, 2, 3, 7, 8, 12), tuple(range(13))],
                         ids=["one", "two", "six", "all"])
def test_count_read_after_the_first_slice(narrow_slices, labelled):
    """With ``RowChunks.labelled`` the host reads the count only after the first slice, which
    runs over the first ``CHUNK_ROWS`` rows as they are and, where some rows are ignored, is
    redone over the labelled ones. The compact losses and gradients are the labelled rows', in
    order."""
    narrow_slices(torch.bfloat16)
    hidden, weight, labels = random_rows(torch.bfloat16)
    keep = torch.zeros(len(labels), dtype=torch.bool, device=DEVICE)
    keep[list(labelled)] = True
    labels = torch.where(keep, labels.clamp_min(0), -100)
    summary = summarise_labels(labels, VOCAB, -100, "sum", None)
    chunks = RowChunks.labelled(hidden, labels, hidden.dtype, summary, VOCAB, -100)
    scale = torch.full((1,), 0.5, device=DEVICE)
    losses, grad = sliced_frozen_loss(chunks, weight, scale, ignore_index=-100, softcap=None,
                                      chunk_rows=CHUNK_ROWS)
    want_losses, want_grad = float64_loss_and_grad(hidden[keep], weight, labels[keep], scale)
    assert_close_to_float64(losses, want_losses, torch.float32, "losses")
    assert_close_to_float64(grad, want_grad, torch.bfloat16, "hidden gradient")


@pytest.mark.parametrize(
    "chunk_rows, vocab, itemsize, width",
    [
        (1024, 262144, 2, 16384),  # the budget: 32 MiB of bfloat16 logits
        (1024, 262144, 4, 8192),  # float32 logits take twice the bytes a column
        (2048, 10000, 2, 8192),
        (1024, 5000, 2, 5000),  # never wider than the vocabulary
        (10**6, 262144, 2, 128),  # never narrower than 128 columns
        (3, 262144, 2, 262144),
    ],
)
def test_slice_width(monkeypatch, chunk_rows, vocab, itemsize, width):
    monkeypatch.setattr(importlib.import_module("fusetune.ops.vocab_slices"), "SLICE_BYTES", 32 * 2**20)
    assert slice_width(chunk_rows, vocab, itemsize) == width


@pytest.mark.parametrize(
    "hidden_size, rows",
    [(2304, 2048), (3584, 1024), (4096, 1024), (8192, 512), (10**6, 128), (64, 2048)],
)
def test_slice_chunk_rows_keep_the_accumulator_within_its_budget(monkeypatch, hidden_size, rows):
    """The most rows (a power of two, 128 to 2,048) whose float32 accumulator fits 18 MiB."""
    monkeypatch.setattr(importlib.import_module("fusetune.ops.vocab_slices"), "ACCUMULATOR_BYTES", 18 * 2**20)
    assert slice_chunk_rows(hidden_size) == rows
