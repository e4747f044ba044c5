"""The one-pass row kernel of linear_cross_entropy: ``row_scale * numerators`` against float64
gradients, with rows whose max lies far above their first block (rescaled, or recomputed from
hidden and weight), and with confident rows."""

import importlib
import math

import pytest
import torch

from fusetune.ops.deferred_softmax import (
    RESCALE_GAP,
    DeferredLaunch,
    deferred_cross_entropy_rows,
)
from tests.ops.checks import DEVICE, assert_close_to_float64

VOCAB = 3001  # not a multiple of the block
SMALL_BLOCKS = DeferredLaunch(block=256, warps=4)  # several blocks a row, as at real vocab sizes
PERSISTENT = DeferredLaunch(block=512, warps=4, programs_per_sm=1)
# linear_cross_entropy's one-pass paths, by the function each calls.
ONE_PASS, SLICED = "deferred_cross_entropy_rows", "sliced_frozen_loss"


def float64_rows(logits, labels, scale, softcap=None, ignore_index=-100):
    """Per-row losses and ``scale * dloss/dlogits`` in float64 (ignored rows: 0 and 0)."""
    z = logits.double()
    capped = softcap * torch.tanh(z / softcap) if softcap is not None else z
    keep = labels != ignore_index
    safe = labels.clamp_min(0)
    lse = torch.logsumexp(capped, dim=1)
    losses = (lse - capped.gather(1, safe[:, None]).squeeze(1)) * keep
    grad = torch.softmax(capped, dim=1)
    grad[torch.arange(len(labels)), safe] -= 1.0
    if softcap is not None:
        grad = grad * (1.0 - torch.tanh(z / softcap) ** 2)
    grad = grad * scale.double().reshape(-1, 1) * keep[:, None]
    return losses, grad


def run_kernel(logits, hidden, weight, labels, scale, launch, softcap=None):
    """The kernel's losses and the gradient it stands for, ``row_scales * numerators``."""
    out = logits.clone()
    losses, row_scales = deferred_cross_entropy_rows(
        out, hidden, weight, labels, scale, ignore_index=-100, softcap=softcap, launch=launch
    )
    assert torch.isfinite(out).all() and torch.isfinite(row_scales).all()
    return losses, row_scales.double()[:, None] * out.double(), out


def logits_of(hidden, weight):
    """``hidden @ weight.T`` as the chunk's matmul makes it: float32 sums rounded to the dtype."""
    return (hidden.float() @ weight.float().t()).to(hidden.dtype)


def random_rows(dtype, rows=7, features=24, seed=0):
    """Hidden rows, a weight and their logits (about 3 nats of spread), and labels (row 2 ignored)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, features, generator=gen).to(dtype).to(DEVICE)
    weight = (torch.randn(VOCAB, features, generator=gen) * 0.6).to(dtype).to(DEVICE)
    labels = torch.randint(0, VOCAB, (rows,), generator=gen)
    labels[2] = -100
    return hidden, weight, labels.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 15.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("launch", [SMALL_BLOCKS, PERSISTENT], ids=["row_programs", "persistent"])
@pytest.mark.parametrize("per_row_scale", [False, True], ids=["one_scale", "row_scales"])
def test_matches_float64(dtype, softcap, launch, per_row_scale):
    hidden, weight, labels = random_rows(dtype)
    logits = logits_of(hidden, weight)
    scale = (
        torch.linspace(0.5, 2.0, len(labels), device=DEVICE)
        if per_row_scale
        else torch.full((1,), 1 / 6, device=DEVICE)
    )
    losses, grad, _ = run_kernel(logits, hidden, weight, labels, scale, launch, softcap)
    want_losses, want_grad = float64_rows(logits, labels, scale, softcap)
    assert_close_to_float64(losses, want_losses, torch.float32, "losses")
    assert_close_to_float64(grad, want_grad, dtype, "gradient")
    assert torch.all(grad[2] == 0) and losses[2] == 0, "an ignored row gives loss 0 and gradient 0"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("launch", [SMALL_BLOCKS, PERSISTENT], ids=["row_programs", "persistent"])
def test_rows_far_above_their_first_block(dtype, launch):
    """Rows whose max lies far above their first block's: by about 45 and 60 nats (past the
    rescale gap: the numerators are rescaled) and by about 105 (past the clamp: the row's logits
    are recomputed from hidden and weight). Each matches float64, numerators end below e^gap."""
    hidden, weight, labels = random_rows(dtype, rows=5)
    hidden[:, :2] = 0.0
    weight[:, :2] = 0.0
    hidden[0, 0], weight[700, 0] = 6.0, 7.5  # one logit of ~45 in a later block
    hidden[1, 0], weight[2900, 0] = 10.0, 10.5  # one of ~105, in the last block
    hidden[3, 1], weight[:256, 1] = 6.0, -10.0  # a first block 60 nats below the rest
    labels[0], labels[1], labels[4] = 700, 5, 2900  # row 0 confident, row 1 surely wrong
    logits = logits_of(hidden, weight)
    scale = torch.full((1,), 0.25, device=DEVICE)
    losses, grad, out = run_kernel(logits, hidden, weight, labels, scale, launch)
    want_losses, want_grad = float64_rows(logits, labels, scale)
    assert_close_to_float64(losses, want_losses, torch.float32, "losses")
    assert_close_to_float64(grad, want_grad, dtype, "gradient")
    unlabelled = torch.ones_like(out, dtype=torch.bool)
    unlabelled[torch.arange(5), labels.clamp_min(0)] = False
    assert out.float()[unlabelled].max() <= math.exp(RESCALE_GAP) * 1.01, "numerators stay below e^gap"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_confident_rows_keep_the_label_gradient_precise(dtype):
    """p_label near 1: the label's gradient ``p - 1`` is small against the numerators' sum, and
    must still come out to the dtype's precision relative to itself (the "- 1" is folded into
    the label's element as minus the other numerators' sum, not left to cancel); so must the
    small loss (``_row_loss``'s log1p)."""
    hidden, weight, labels = random_rows(dtype, rows=5)
    labels[2] = 11
    logits = logits_of(hidden, weight)
    for row, margin in enumerate((8.0, 12.0, 16.0, 9.0, 10.0)):
        logits[row, labels[row]] = logits[row].float().max() + margin
    scale = torch.ones(1, device=DEVICE)
    losses, grad, _ = run_kernel(logits, hidden, weight, labels, scale, SMALL_BLOCKS)
    want_losses, want_grad = float64_rows(logits, labels, scale)
    # Their small losses too keep float32's precision relative to themselves.
    assert_close_to_float64(losses, want_losses, torch.float32, "losses")
    rows = torch.arange(5)
    label_grad, want_label_grad = grad[rows, labels], want_grad[rows, labels]
    assert (want_label_grad < 0).all() and (want_label_grad > -1e-2).all()
    assert_close_to_float64(label_grad, want_label_grad, dtype, "label gradients")


def test_shapes_that_do_not_make_the_logits_are_refused():
    hidden, weight, labels = random_rows(torch.float32)
    logits = logits_of(hidden, weight)
    with pytest.raises(ValueError, match="are not hidden"):
        deferred_cross_entropy_rows(
            logits, hidden[:, 1:], weight, labels, torch.ones(1, device=DEVICE), ignore_index=-100,
            softcap=None,
        )


def test_float16_is_refused():
    hidden, weight, labels = random_rows(torch.float16)
    with pytest.raises(TypeError, match="deferred normalisation"):
        deferred_cross_entropy_rows(
            logits_of(hidden, weight), hidden, weight, labels, torch.ones(1, device=DEVICE),
            ignore_index=-100, softcap=None,
        )


@pytest.mark.parametrize(
    "dtype, options, trainable, paths",
    [
        (torch.bfloat16, {}, True, {ONE_PASS}),
        (torch.bfloat16, {}, False, {SLICED}),
        # reduction="none": a forward of losses alone (sliced), the gradients in backward
        (torch.float32, dict(softcap=30.0, reduction="none"), True, {SLICED, ONE_PASS}),
        (torch.float32, dict(softcap=30.0, reduction="none"), False, {SLICED}),
        (torch.float16, {}, True, set()),
        (torch.float16, {}, False, set()),
        (torch.bfloat16, dict(label_smoothing=0.1), True, set()),
        (torch.bfloat16, dict(label_smoothing=0.1), False, {SLICED}),
        (torch.bfloat16, dict(z_loss=1e-4), True, set()),
        (torch.bfloat16, dict(z_loss=1e-4, softcap=30.0), False, {SLICED}),
        (torch.float32, dict(label_smoothing=0.1, softcap=30.0), False, set()),
    ],
)
def test_linear_cross_entropy_takes_the_one_pass_kernel_where_it_folds(
    monkeypatch, dtype, options, trainable, paths
):
    """bf16 and fp32 without smoothing or z-loss run the one-pass kernel (the speed path); where
    no weight gradient is made, a vocabulary slice at a time, smoothing or z-loss too (but not
    smoothing with a soft-cap); the other cases run the two-pass kernel (neither path); the
    result matches the reference either way."""
    lce = importlib.import_module("fusetune.ops.linear_cross_entropy")
    calls = []
    for name in (ONE_PASS, SLICED):
        real = getattr(lce, name)
        monkeypatch.setattr(lce, name, lambda *a, _n=name, _f=real, **k: calls.append(_n) or _f(*a, **k))
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(9, 24, generator=gen).to(dtype).to(DEVICE).requires_grad_()
    weight = (torch.randn(VOCAB, 24, generator=gen) / 5).to(dtype).to(DEVICE).requires_grad_(trainable)
    labels = torch.randint(0, VOCAB, (9,), generator=gen).to(DEVICE)
    loss = lce.linear_cross_entropy(hidden, weight, labels, chunk_rows=4, **options)
    (grad,) = torch.autograd.grad(loss.sum(), hidden)
    assert set(calls) == paths
    ref_hidden = hidden.detach().double().requires_grad_()
    ref_loss = lce.linear_cross_entropy_reference(ref_hidden, weight.detach().double(), labels, **options)
    (ref_grad,) = torch.autograd.grad(ref_loss.sum(), ref_hidden)
    # The loss is float32 whatever the inputs: tolerances as in test_linear_cross_entropy.
    loss_dtype = torch.float32 if dtype == torch.float32 else torch.float16
    assert_close_to_float64(loss, ref_loss, loss_dtype, "loss")
    assert_close_to_float64(grad, ref_grad, dtype, "grad hidden")
