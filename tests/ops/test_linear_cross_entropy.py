"""linear_cross_entropy: the chunked fused path against the materialised reference and float64."""

import importlib

import pytest
import torch

from fusetune.ops.linear_cross_entropy import (
    default_chunk_rows,
    linear_cross_entropy,
    linear_cross_entropy_reference,
)
from tests.ops.checks import (
    DEVICE,
    DTYPES,
    assert_close_to_float64,
    assert_matches_reference,
    transposed_layout,
)
from tests.ops.test_cross_entropy import float64_loss

ROWS, HIDDEN, VOCAB = 13, 37, 4133


def make_inputs(
    dtype, rows=ROWS, hidden=HIDDEN, vocab=VOCAB, ignore_every=3, with_bias=False, seed=0
):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=gen).to(dtype).to(DEVICE)
    w = (torch.randn(vocab, hidden, generator=gen) / hidden**0.5).to(dtype).to(DEVICE)
    b = (torch.randn(vocab, generator=gen) * 0.1).to(dtype).to(DEVICE) if with_bias else None
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    if ignore_every:
        labels[::ignore_every] = -100
    return h, w, b, labels.to(DEVICE)


def run(fn, h, w, b, labels, train_weight, upstream, **options):
    """Loss and gradients of ``fn`` on fresh leaves (weight/bias trainable when asked)."""
    hh = h.detach().clone().requires_grad_()
    ww = w.detach().clone().requires_grad_(train_weight)
    bb = b.detach().clone().requires_grad_(train_weight) if b is not None else None
    loss = fn(hh, ww, labels, bias=bb, **options)
    loss.backward(upstream)
    return loss, hh.grad, ww.grad, (bb.grad if bb is not None else None)


def float64_fn(h, w, labels, *, bias=None, chunk_rows=None, **options):
    logits = h.double() @ w.double().t()
    if bias is not None:
        logits = logits + bias.double()
    return float64_loss(logits, labels, **options)


def check_all(dtype, h, w, b, labels, train_weight=True, **options):
    probe = linear_cross_entropy_reference(h, w, labels, bias=b, **options)
    upstream = torch.randn_like(probe) if probe.dim() else torch.tensor(0.8, device=probe.device)
    fused = run(linear_cross_entropy, h, w, b, labels, train_weight, upstream, **options)
    ref = run(linear_cross_entropy_reference, h, w, b, labels, train_weight, upstream, **options)
    exact = run(
        float64_fn,
        h.double(),
        w.double(),
        b.double() if b is not None else None,
        labels,
        train_weight,
        upstream.double(),
        **options,
    )
    names = ("loss", "grad hidden", "grad weight", "grad bias")
    for name, out, r, r64 in zip(names, fused, ref, exact, strict=True):
        if r is None:
            assert out is None, f"{name} should be None"
            continue
        # The loss is float32 whatever the input; gradients take the input dtype.
        tol_dtype = dtype if name != "loss" or dtype == torch.float32 else torch.float16
        assert_matches_reference(out, r, tol_dtype, name)
        assert_close_to_float64(out, r64, tol_dtype, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("train_weight", [True, False], ids=["trainable", "frozen"])
def test_matches_reference(dtype, train_weight):
    check_all(dtype, *make_inputs(dtype), train_weight=train_weight, chunk_rows=4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("train_weight", [True, False], ids=["trainable", "frozen"])
def test_capture_path_computes_every_row(monkeypatch, dtype, reduction, train_weight):
    """While a CUDA graph is captured, ignored rows are not dropped (their count is a shape): the
    same loss and gradients with every row through the chunks."""
    monkeypatch.setattr(importlib.import_module("fusetune.ops.row_chunks"), "capturing", lambda: True)
    h, w, b, labels = make_inputs(dtype)
    check_all(dtype, h, w, b, labels, train_weight=train_weight, reduction=reduction, chunk_rows=4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("train_weight", [True, False], ids=["trainable", "frozen"])
def test_first_chunk_longer_than_the_labelled_rows(dtype, reduction, train_weight):
    """Three labelled rows in chunks of eight: the first chunk is handed out with eight rows
    before their count is read (``row_chunks``); the ignored ones it holds must change nothing."""
    h, w, b, labels = make_inputs(dtype, ignore_every=0)
    labels[torch.tensor([0, 1, 2, 4, 5, 7, 8, 9, 11, 12])] = -100
    check_all(dtype, h, w, b, labels, train_weight=train_weight, reduction=reduction, chunk_rows=8)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_with_bias(reduction):
    check_all(
        torch.float32,
        *make_inputs(torch.float32, with_bias=True),
        reduction=reduction,
        chunk_rows=3,
    )


@pytest.mark.parametrize(
    "options",
    [
        dict(label_smoothing=0.1),
        dict(softcap=30.0),
        dict(z_loss=1e-3),
        dict(num_items_in_batch=21),
        dict(softcap=10.0, label_smoothing=0.05, z_loss=1e-2, reduction="none"),
    ],
    ids=["smoothing", "softcap", "z_loss", "num_items", "combined_none"],
)
def test_options(options):
    check_all(torch.bfloat16, *make_inputs(torch.bfloat16), chunk_rows=5, **options)


@pytest.mark.parametrize("train_weight", [True, False], ids=["trainable", "frozen"])
def test_a_small_softcap(train_weight):
    """A cap of 2 bends most logits: the lanes past a row's last column (vocab 4,133 fills no
    block) must add nothing to its sum, where a cap would have made them -2 (in float32, whose
    tolerance shows an error of one part in 10^5)."""
    h, w, b, labels = make_inputs(torch.float32)
    check_all(torch.float32, h, w, b, labels, train_weight=train_weight, chunk_rows=5, softcap=2.0)


def test_row_kernel_in_place_on_split_rows(monkeypatch):
    """The row kernel writing the gradient over a chunk's logits with each row cut into five
    segments of 1,024 columns (the tuned launch gives these small rows one segment), its gradient
    pass walking each row backwards as the tuned launch's does, without L2 hints."""
    cross_entropy_module = importlib.import_module("fusetune.ops.cross_entropy")
    split = cross_entropy_module.RowLaunch(1024, 256, 4, reverse=True)
    monkeypatch.setattr(cross_entropy_module, "tuned_launch", lambda n_rows: split)
    check_all(torch.bfloat16, *make_inputs(torch.bfloat16), chunk_rows=5, label_smoothing=0.1)


def test_default_chunking_and_three_dim_strided_hidden():
    h, w, b, labels = make_inputs(torch.float32, rows=12)
    h3 = transposed_layout(h.reshape(3, 4, HIDDEN))
    check_all(torch.float32, h3, w, b, labels.reshape(3, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("train_weight", [True, False], ids=["trainable", "frozen"])
def test_weight_in_a_transposed_layout(dtype, train_weight):
    """A (vocab, hidden) weight whose storage is (hidden, vocab), as a tied or transposed head may
    be: every path reads it through its strides."""
    h, w, b, labels = make_inputs(dtype)
    check_all(dtype, h, w.t().contiguous().t(), b, labels, train_weight=train_weight, chunk_rows=4)


def test_no_row_ignored_and_one_row():
    check_all(torch.float32, *make_inputs(torch.float32, ignore_every=0), chunk_rows=4)
    check_all(torch.float32, *make_inputs(torch.float32, rows=1, ignore_every=0))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_all_ignored_gives_zero_loss_and_gradients(reduction):
    h, w, _, labels = make_inputs(torch.float32)
    labels = torch.full_like(labels, -100)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = linear_cross_entropy(hh, ww, labels, reduction=reduction)
    loss.sum().backward()
    assert torch.all(loss == 0) and torch.all(hh.grad == 0) and torch.all(ww.grad == 0)


def test_frozen_weight_gets_no_gradient():
    h, w, _, labels = make_inputs(torch.bfloat16)
    hh = h.clone().requires_grad_()
    linear_cross_entropy(hh, w, labels, chunk_rows=4).backward()
    assert w.grad is None and hh.grad is not None


def test_autocast_matches_reference_under_autocast():
    h, w, _, labels = make_inputs(torch.float32)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        fused = run(linear_cross_entropy, h, w, None, labels, True, torch.tensor(1.0), chunk_rows=4)
        ref = run(linear_cross_entropy_reference, h, w, None, labels, True, torch.tensor(1.0))
    for name, out, r in zip(("loss", "grad hidden", "grad weight"), fused[:3], ref[:3], strict=True):
        assert out.dtype == r.dtype, name
        assert_matches_reference(out, r, torch.bfloat16, name)


def test_grad_accumulation_equals_one_batch():
    h, w, _, labels = make_inputs(torch.float32, rows=12)
    total = int((labels != -100).sum())
    whole = linear_cross_entropy(h, w, labels)
    parts = sum(
        linear_cross_entropy(h[s], w, labels[s], num_items_in_batch=total)
        for s in (slice(0, 5), slice(5, 12))
    )
    assert_matches_reference(parts, whole, torch.float32, "accumulated loss")


def test_default_chunk_rows_is_bounded_by_the_rows():
    assert default_chunk_rows(3, weight_trainable=True) == 3
    assert default_chunk_rows(0, weight_trainable=False) == 1


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(weight_shape=(VOCAB, HIDDEN + 1)), ValueError, "hidden size"),
        (dict(chunk_rows=0), ValueError, "chunk_rows"),
        (dict(chunk_rows=2.5), ValueError, "chunk_rows=2.5 must be a positive int"),
        (dict(weight_dtype=torch.bfloat16), TypeError, "autocast"),
        (dict(label=VOCAB), ValueError, "outside the vocabulary"),
        (dict(labels_device="meta"), ValueError, "labels is on meta but hidden is on"),
        (dict(weight_device="meta"), ValueError, "weight is on meta but hidden is on"),
    ],
)
def test_bad_input_is_a_clear_error(kwargs, error, message):
    h, w, _, labels = make_inputs(torch.float32)
    if "weight_shape" in kwargs:
        w = torch.randn(*kwargs["weight_shape"], device=DEVICE)
    if "weight_dtype" in kwargs:
        w = w.to(kwargs["weight_dtype"])
    if "label" in kwargs:
        labels[1] = kwargs["label"]
    labels = labels.to(kwargs.get("labels_device", labels.device))
    w = w.to(kwargs.get("weight_device", w.device))
    with pytest.raises(error, match=message):
        linear_cross_entropy(h, w, labels, chunk_rows=kwargs.get("chunk_rows"))


@pytest.mark.parametrize("train_weight", [True, False], ids=["trainable", "frozen"])
def test_a_second_backward_over_one_graph_is_refused(train_weight):
    """As cross_entropy's: the gradients made in forward are scaled in place and handed out by the
    first backward, so a second backward over the same graph is refused, not scaled twice."""
    h, w, _, labels = make_inputs(torch.float32)
    h.requires_grad_(True)
    w.requires_grad_(train_weight)
    leaves = (h, w) if train_weight else (h,)
    loss = linear_cross_entropy(h, w, labels)
    first = torch.autograd.grad(loss * 3, leaves, retain_graph=True)
    leaves64 = [leaf.detach().double().requires_grad_() for leaf in leaves]
    exact = float64_fn(leaves64[0], leaves64[1] if train_weight else w.double(), labels)
    for got, expected in zip(first, torch.autograd.grad(exact * 3, leaves64), strict=True):
        assert_close_to_float64(got, expected, torch.float32, "first backward")
    with pytest.raises(RuntimeError, match="linear_cross_entropy: backward ran a second time"):
        torch.autograd.grad(loss * 2, leaves)


def test_labels_of_another_shape_than_the_rows_are_refused():
    h, w, _, labels = make_inputs(torch.float32, rows=12)
    grid = h.view(3, 4, -1)
    expected = linear_cross_entropy_reference(grid, w, labels.view(3, 4), reduction="none")
    torch.testing.assert_close(linear_cross_entropy(grid, w, labels.view(3, 4), reduction="none"), expected)
    with pytest.raises(ValueError, match=r"labels of shape \(4, 3\) for rows of shape \(3, 4\)"):
        linear_cross_entropy(grid, w, labels.view(4, 3))
