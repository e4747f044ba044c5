"""cross_entropy: the Triton kernel against the reference and float64 maths, every option."""

import importlib

import pytest
import torch

from fusetune.ops.cross_entropy import (
    cross_entropy,
    cross_entropy_reference,
    scale_by_grad_output,
)
from tests.ops.checks import (
    DEVICE,
    DTYPES,
    assert_close_to_float64,
    assert_matches_reference,
    non_contiguous,
)

# The module, not the function of the same name that fusetune.ops exports.
cross_entropy_module = importlib.import_module("fusetune.ops.cross_entropy")

ROWS, VOCAB = 11, 5003  # vocab spans two 4096-wide blocks, neither a multiple of one

# Launches of the row kernel every test here runs under: the tuned default (one segment a row at
# these vocabularies), and five segments of 1,024 columns (the last one short) read in 256-wide
# blocks by a persistent grid (programs walk several items each) with pipelined column loops, so
# that the last arrival's combine of the others' statistics and the item loop are exercised; that
# launch also walks the gradient pass forwards (the tuned one backwards) and keeps only each
# segment's last block in L2 (the tuned one, at these widths, all of it), so both hints' loads run.
ROW_KERNEL_LAUNCHES = {
    "tuned": None,
    "split-5-persistent": cross_entropy_module.RowLaunch(1024, 256, 4, programs_per_sm=1, stages=2,
                                                         l2_hints=True, l2_keep_cols=256),
}


@pytest.fixture(autouse=True, params=list(ROW_KERNEL_LAUNCHES), ids=list(ROW_KERNEL_LAUNCHES))
def row_kernel_launch(request, monkeypatch):
    launch = ROW_KERNEL_LAUNCHES[request.param]
    if launch is not None:
        monkeypatch.setattr(cross_entropy_module, "tuned_launch", lambda n_rows: launch)


def float64_loss(
    logits,
    labels,
    *,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    softcap=None,
    z_loss=0.0,
    num_items_in_batch=None,
):
    """Independent float64 maths: log-softmax written out, no shared code with the op."""
    z = logits.double().reshape(-1, logits.shape[-1])
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    flat = labels.reshape(-1)
    keep = flat != ignore_index
    lse = torch.logsumexp(z, dim=-1)
    log_probs = z - lse[:, None]
    picked = log_probs.gather(1, flat.clamp_min(0)[:, None]).squeeze(1)
    # Without smoothing the mean over the row is left out: 0 * -inf would be NaN on masked rows.
    smoothing = label_smoothing * log_probs.mean(-1) if label_smoothing else 0.0
    per_row = -(1 - label_smoothing) * picked - smoothing + z_loss * lse**2
    per_row = per_row * keep
    if reduction == "none":
        return per_row.reshape(labels.shape)
    if reduction == "sum":
        return per_row.sum()
    denominator = num_items_in_batch if num_items_in_batch is not None else max(int(keep.sum()), 1)
    return per_row.sum() / denominator


def make_inputs(dtype, rows=ROWS, vocab=VOCAB, ignore_every=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=gen) * 3).to(dtype).to(DEVICE)
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    labels[::ignore_every] = -100
    return logits, labels.to(DEVICE)


def check_all(dtype, logits, labels, scalar_upstream=1.7, **options):
    """Loss and gradient vs the reference (same dtype) and vs float64 maths, with a random upstream
    gradient (``scalar_upstream`` for a reduced loss)."""
    x = logits.detach().clone().requires_grad_()
    loss = cross_entropy(x, labels, **options)
    if loss.dim():
        upstream = torch.randn_like(loss)
    else:
        upstream = torch.tensor(scalar_upstream, device=loss.device)
    loss.backward(upstream)

    x_ref = logits.detach().clone().requires_grad_()
    ref = cross_entropy_reference(x_ref, labels, **options)
    ref.backward(upstream)
    x64 = logits.detach().double().requires_grad_()
    ref64 = float64_loss(x64, labels, **options)
    ref64.backward(upstream.double())

    assert loss.dtype == torch.float32
    assert_matches_reference(loss, ref, dtype, "loss")
    assert_close_to_float64(
        loss, ref64, torch.float32 if dtype == torch.float32 else torch.float16, "loss"
    )
    assert x.grad.dtype == dtype
    assert_matches_reference(x.grad, x_ref.grad, dtype, "grad")
    assert_close_to_float64(x.grad, x64.grad, dtype, "grad")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_plain(dtype, reduction):
    check_all(dtype, *make_inputs(dtype), reduction=reduction)


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_logits(dtype):
    """-inf logits (a masked vocabulary): a whole stretch of a row (under split-5, whole segments),
    scattered columns elsewhere; every labelled logit stays finite. Their probability and gradient
    are exactly 0, the rest as torch computes them."""
    logits, labels = make_inputs(dtype)
    masked = torch.zeros_like(logits, dtype=torch.bool)
    masked[1, 1000:4500] = True
    masked[2:, ::7] = True
    masked[torch.arange(ROWS, device=labels.device), labels.clamp_min(0)] = False
    logits = logits.masked_fill(masked, float("-inf"))
    check_all(dtype, logits, labels)
    x = logits.detach().clone().requires_grad_()
    cross_entropy(x, labels).backward()
    assert torch.isfinite(x.grad).all() and not x.grad[masked].any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_far_above_their_first_block(dtype):
    """The statistics' reference is a stretch's first block's max: rows whose max lies about 36 and
    60 nats above it (the sums are rescaled) and about 90 above (past the clamp: summed again)."""
    logits, labels = make_inputs(dtype)
    logits[0, 4500] = 45.0
    logits[1, 5000] = 100.0
    logits[3, :256] -= 60.0
    logits[5, :1100] -= 60.0  # under split-5, a whole segment and the next one's first block
    labels[0], labels[1], labels[3] = 4500, 7, 300
    check_all(dtype, logits, labels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_upstream_gradient_of_one(dtype):
    """``loss.backward()``'s grad_output of 1 leaves the stored gradient as forward wrote it."""
    check_all(dtype, *make_inputs(dtype), scalar_upstream=1.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [1.0, 0.37, -2.5])
def test_scale_by_grad_output_in_place(dtype, scale):
    """The device-side scaling: every element (a size that is no multiple of the block, with more
    blocks than programs) times the scale; a scale of 1 leaves every bit as it was; a strided
    gradient is scaled by torch."""
    grad = (torch.randn(3, 4099) * 5).to(dtype).to(DEVICE)
    scaled = scale_by_grad_output(grad.clone(), torch.tensor(scale, device=DEVICE))
    if scale == 1.0:
        assert torch.equal(scaled, grad)
    assert_close_to_float64(scaled, grad.double() * scale, dtype, "scaled")
    strided = grad.clone()[:, ::2]
    result = scale_by_grad_output(strided, torch.tensor(scale, device=DEVICE))
    assert result.data_ptr() == strided.data_ptr()
    assert_matches_reference(result, grad[:, ::2] * scale, dtype, "strided")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "options",
    [
        dict(label_smoothing=0.1),
        dict(softcap=30.0),
        dict(z_loss=1e-3),
        dict(num_items_in_batch=23),
        dict(label_smoothing=0.2, softcap=15.0, z_loss=1e-2, reduction="none"),
        dict(ignore_index=7),
        dict(softcap=2.0),
    ],
    ids=["smoothing", "softcap", "z_loss", "num_items", "all_none", "ignore_index_7", "small_softcap"],
)
def test_options(dtype, options):
    logits, labels = make_inputs(dtype)
    if options.get("ignore_index") == 7:
        labels = torch.where(labels == -100, torch.full_like(labels, 7), labels)
    check_all(dtype, logits, labels, **options)


def test_num_items_in_batch_as_tensor_and_accumulation():
    """Two micro-batches with num_items_in_batch sum to the one-batch mean (transformers' rule)."""
    logits, labels = make_inputs(torch.float32, rows=12)
    total = int((labels != -100).sum())
    whole = cross_entropy(logits, labels)
    halves = [
        cross_entropy(logits[s], labels[s], num_items_in_batch=torch.tensor(total))
        for s in (slice(0, 6), slice(6, 12))
    ]
    assert_matches_reference(halves[0] + halves[1], whole, torch.float32, "accumulated loss")


def test_three_dim_and_non_contiguous():
    logits, labels = make_inputs(torch.bfloat16, rows=15)
    logits3 = non_contiguous(logits.reshape(3, 5, VOCAB))
    check_all(torch.bfloat16, logits3, labels.reshape(3, 5))


@pytest.mark.parametrize(
    "options",
    [dict(reduction="mean"), dict(reduction="sum"), dict(reduction="none"),
     dict(num_items_in_batch=0), dict(num_items_in_batch=torch.tensor(0, device=DEVICE))],
    ids=["mean", "sum", "none", "num_items_0", "num_items_0_tensor"],
)
def test_all_ignored_gives_zero_not_nan(options):
    logits, labels = make_inputs(torch.float32, rows=4)
    labels = torch.full_like(labels, -100)
    x = logits.clone().requires_grad_()
    loss = cross_entropy(x, labels, **options)
    loss.sum().backward()
    assert torch.all(loss == 0)
    assert torch.all(x.grad == 0)


def test_one_row_and_tiny_vocab():
    logits, labels = make_inputs(torch.float32, rows=1, vocab=3, ignore_every=5)
    check_all(torch.float32, logits, labels)


def test_no_grad_when_logits_are_frozen():
    logits, labels = make_inputs(torch.float32)
    loss = cross_entropy(logits, labels)
    assert not loss.requires_grad
    assert_matches_reference(loss, cross_entropy_reference(logits, labels), torch.float32, "loss")


@pytest.mark.parametrize("bad", [VOCAB, -1, -7])
def test_label_out_of_range_is_a_clear_error(bad):
    """Without gradients the forward raises; in training the error comes at backward, before any
    gradient exists (the check rides on backward's host sync)."""
    logits, labels = make_inputs(torch.float32)
    labels[2] = bad
    with pytest.raises(ValueError, match="outside the vocabulary"):
        cross_entropy(logits, labels)
    trainable = logits.clone().requires_grad_()
    loss = cross_entropy(trainable, labels)
    with pytest.raises(ValueError, match=f"label {bad} is outside the vocabulary"):
        loss.backward()
    assert trainable.grad is None


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(reduction="avg"), "reduction"),
        (dict(label_smoothing=1.5), "label_smoothing"),
        (dict(softcap=0.0), "softcap"),
        (dict(z_loss=-1.0), "z_loss"),
        (dict(reduction="sum", num_items_in_batch=4), "num_items_in_batch"),
        (dict(num_items_in_batch=-3), "num_items_in_batch=-3.0 must be >= 0"),
        (dict(num_items_in_batch=torch.tensor(-2)), "num_items_in_batch=-2.0 must be >= 0"),
        (dict(num_items_in_batch=float("nan")), "num_items_in_batch=nan must be >= 0"),
        (dict(num_items_in_batch=float("inf")), "num_items_in_batch=inf must be >= 0 and finite"),
        (dict(num_items_in_batch=torch.tensor([3, 4])), r"tensor of shape \(2,\); give one number"),
        (dict(z_loss=float("nan")), "z_loss=nan must be >= 0 and finite"),
        (dict(z_loss=float("inf")), "z_loss=inf"),
        (dict(softcap=float("inf")), "softcap=inf must be positive and finite"),
        (dict(softcap=float("nan")), "softcap=nan"),
    ],
)
def test_bad_options_are_clear_errors(options, message):
    logits, labels = make_inputs(torch.float32)
    with pytest.raises(ValueError, match=message):
        cross_entropy(logits, labels, **options)


def test_bad_label_dtype_and_count():
    logits, labels = make_inputs(torch.float32)
    with pytest.raises(TypeError, match="integer"):
        cross_entropy(logits, labels.float())
    with pytest.raises(ValueError, match=r"labels of shape \(\d+,\) for rows of shape"):
        cross_entropy(logits, labels[:-1])


def test_labels_take_the_rows_shape_or_a_flat_one():
    """Labels of the logits' leading shape, or flat: the same losses; another shape of the same count
    (which would pair labels with rows in flat order) is refused, as torch refuses it."""
    logits, labels = make_inputs(torch.float32, rows=12)
    grid = logits.view(3, 4, -1)
    expected = cross_entropy_reference(grid, labels.view(3, 4), reduction="none")
    torch.testing.assert_close(cross_entropy(grid, labels.view(3, 4), reduction="none"), expected)
    torch.testing.assert_close(cross_entropy(grid, labels, reduction="none"), expected.reshape(-1))
    for op in (cross_entropy, cross_entropy_reference):
        with pytest.raises(ValueError, match=r"labels of shape \(4, 3\) for rows of shape \(3, 4\)"):
            op(grid, labels.view(4, 3))


@pytest.mark.parametrize("twice", ["backward", "autograd.grad"])
def test_a_second_backward_over_one_graph_is_refused(twice):
    """The gradient made in forward is scaled in place and handed out by the first backward: a
    second one over the same graph would scale it again (and change what the first returned), so
    it is refused. reduction='none' computes its gradient in backward, and may run again."""
    logits, labels = make_inputs(torch.float32)
    logits.requires_grad_(True)
    loss = cross_entropy(logits, labels)
    (first,) = torch.autograd.grad(loss * 3, logits, retain_graph=True)
    x64 = logits.detach().double().requires_grad_()
    (reference,) = torch.autograd.grad(float64_loss(x64, labels) * 3, x64)
    assert_close_to_float64(first, reference, torch.float32, "first backward")
    with pytest.raises(RuntimeError, match="backward ran a second time .* Compute the loss again"):
        if twice == "backward":
            loss.backward()
        else:
            torch.autograd.grad(loss * 2, logits)
    per_row = cross_entropy(logits, labels, reduction="none")
    grads = [torch.autograd.grad(per_row.sum() * k, logits, retain_graph=True)[0] for k in (2.0, 3.0)]
    torch.testing.assert_close(grads[1], grads[0] * 1.5)


def test_labels_on_another_device_are_a_clear_error():
    logits, labels = make_inputs(torch.float32)
    with pytest.raises(ValueError, match=r"labels is on meta but logits is on .*\.to\(logits\.device\)"):
        cross_entropy(logits, labels.to("meta"))
