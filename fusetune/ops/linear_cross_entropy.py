"""The language-model loss straight from hidden states: ``cross_entropy(hidden @ weight.T + bias)``.

The (tokens x vocab) logits are never materialised, in forward or backward: rows are processed in
chunks. For each chunk, cuBLAS computes the chunk's logits into one reused buffer, a row kernel
turns them into the gradient in place, and two more matmuls turn that into the chunk's hidden
gradient and its contribution to the weight gradient. So the work is the three matmuls the maths
needs (two when the weight is frozen, as under LoRA) plus one read and one write of each chunk's
logits, and the peak extra memory is one chunk of logits plus the gradients themselves.

The row kernel is the one-pass ``deferred_softmax`` kernel where it applies (bfloat16 or float32;
no bias, label smoothing or z-loss: ``defers_normalisation``): it writes the softmax's numerators
and a scale per row, which the matmuls apply to their (rows x hidden) side. Elsewhere it is the
cross-entropy op's kernel, which writes ``scale * dloss/dlogits`` itself but reads each row twice.
When the weight gets no gradient (LoRA), a chunk of bfloat16 or float32 rows without a bias is
also cut along the vocabulary (``vocab_slices``, with the same one-pass kernel's helpers): its
buffer of logits is then a few tens of MiB, not a (rows x vocab) block.

Rows whose label is ``ignore_index`` are dropped before any matmul (in a VLM most rows are image or
prompt tokens), so they cost nothing (``row_chunks``, which also says when the host reads their
count, and why not while a CUDA graph is captured). When the weight does not require grad no vocab
x hidden buffer is allocated. With ``reduction`` "mean"/"sum" the gradients are computed during forward
(backward only rescales them when ``grad_output`` is not 1); with "none" the per-row scales come
with ``grad_output``, so the chunk loop runs again in backward.

Matmuls run in the autocast dtype when autocast is on (as ``F.linear`` would), else in the inputs'
dtype; the weight gradient of a multi-chunk bf16 run is accumulated by cuBLAS in bf16 storage
(fp32 arithmetic, one rounding per chunk).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from fusetune.ops._graph_ops import graph_op
from fusetune.ops._launch import (
    as_rows,
    check_float,
    check_same_device,
    outside_compiled_graphs,
    public_op,
    use_triton,
)
from fusetune.ops.cross_entropy import (
    check_options,
    cross_entropy_reference,
    cross_entropy_rows,
    hand_out_once,
    reduce_losses,
    scale_by_grad_output,
)
from fusetune.ops.deferred_softmax import DEFERRED_DTYPES, deferred_cross_entropy_rows
from fusetune.ops.labels import flatten_labels, summarise_labels
from fusetune.ops.row_chunks import RowChunks
from fusetune.ops.vocab_slices import sliced_frozen_loss

# Rows per chunk, measured on an H200 (bench/tune_lce.py, bench/results/lce-tuning-h200.jsonl):
# with a trainable weight every chunk adds its share into the (vocab x hidden) gradient, a
# read-modify-write of the whole gradient, so chunks must be long; with a frozen weight shorter
# chunks cost little and keep the chunk's logits small.
_CHUNK_ROWS_TRAINABLE = 2048
_CHUNK_ROWS_FROZEN = 1024


def default_chunk_rows(n_rows: int, weight_trainable: bool) -> int:
    """Rows per whole-vocabulary chunk: 2048 when the weight gets a gradient, 1024 when it is
    frozen (at most n_rows). Chunks cut along the vocabulary too take ``vocab_slices``' rule."""
    rows = _CHUNK_ROWS_TRAINABLE if weight_trainable else _CHUNK_ROWS_FROZEN
    return max(1, min(n_rows, rows))


def defers_normalisation(dtype: torch.dtype, bias: torch.Tensor | None, options: dict) -> bool:
    """Whether the chunks' gradients come from the one-pass row kernel (``deferred_softmax``),
    which leaves the softmax's per-row normalisation to the matmuls: bfloat16 or float32 logits,
    no bias, no label smoothing and no z-loss (the module says why). Otherwise the two-pass row
    kernel writes the gradient itself."""
    return (
        dtype in DEFERRED_DTYPES
        and bias is None
        and options["label_smoothing"] == 0
        and options["z_loss"] == 0
    )


def slices_vocabulary(dtype: torch.dtype, bias: torch.Tensor | None, options: dict,
                      weight_trainable: bool) -> bool:
    """Whether chunks are also cut along the vocabulary (``vocab_slices``): where the weight gets
    no gradient (a slice's share of it would need the softmax's normalisation, known only after
    the last slice), for bfloat16 or float32 without a bias, and not label smoothing with a
    soft-cap (the module says why)."""
    return (
        dtype in DEFERRED_DTYPES
        and bias is None
        and not weight_trainable
        and not (options["label_smoothing"] and options["softcap"] is not None)
    )


@dataclass
class _Gradients:
    hidden: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None


def _chunked_loss(
    chunks: RowChunks,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    options: dict,
    grad_scale: torch.Tensor | None,
    wants: tuple[bool, bool, bool],
    chunk_rows: int | None,
) -> tuple[torch.Tensor, _Gradients]:
    """Per-row losses of the rows ``chunks`` computes, and with ``grad_scale`` their gradients, in
    its compact order (``chunks.count()`` rows). A row labelled ``ignore_index`` gives loss 0 and
    gradient 0.

    ``grad_scale`` is a float32 tensor of one element or one per compact row; ``wants`` says which
    of (hidden, weight, bias) need a gradient; ``chunk_rows`` None takes the path's default.
    """
    vocab = weight.shape[0]
    want_hidden, want_weight, want_bias = wants if grad_scale is not None else (False, False, False)
    if slices_vocabulary(chunks.dtype, bias, options, want_weight):
        losses, grad_hidden = sliced_frozen_loss(
            chunks, weight, grad_scale if want_hidden else None, **options, chunk_rows=chunk_rows,
        )
        return losses, _Gradients(hidden=grad_hidden, weight=None, bias=None)
    # The count is read before any product: a whole-vocabulary product is too long to waste on
    # rows that may be ignored (``row_chunks``).
    losses, grad_hidden = chunks.outputs(want_hidden)
    n_rows = chunks.count()
    chunk_rows = chunk_rows or default_chunk_rows(n_rows, wants[1])
    grads = _Gradients(
        hidden=grad_hidden,
        weight=None,
        bias=torch.zeros(vocab, dtype=torch.float32, device=chunks.device) if want_bias else None,
    )
    logits_buffer = torch.empty(
        max(1, min(chunk_rows, n_rows)), vocab, dtype=chunks.dtype, device=chunks.device
    )
    deferred = defers_normalisation(chunks.dtype, bias, options)
    for chunk in chunks.split(chunk_rows):
        start, end, rows, labels = chunk.start, chunk.end, chunk.rows, chunk.labels
        logits = logits_buffer[: end - start]
        if bias is None:
            torch.mm(rows, weight.t(), out=logits)
        else:
            torch.addmm(bias, rows, weight.t(), out=logits)
        if grad_scale is None:
            losses[start:end], _ = cross_entropy_rows(logits, labels, **options)
            continue
        scale = grad_scale if grad_scale.numel() == 1 else grad_scale[start:end]
        row_scales = None
        if deferred:
            losses[start:end], row_scales = deferred_cross_entropy_rows(
                logits, rows, weight, labels, scale,
                ignore_index=options["ignore_index"], softcap=options["softcap"],
            )
        else:
            losses[start:end], _ = cross_entropy_rows(
                logits, labels, grad_scale=scale, grad_out=logits, **options
            )
        # ``logits`` now holds the chunk's gradient, or its numerators when row_scales is not None.
        if want_weight:
            weighted_rows = rows if row_scales is None else rows * row_scales[:, None].to(rows.dtype)
            if grads.weight is None:
                grads.weight = torch.mm(logits.t(), weighted_rows)
            else:
                grads.weight.addmm_(logits.t(), weighted_rows)
        if want_bias:
            grads.bias += logits.sum(0, dtype=torch.float32)
        if want_hidden:
            torch.mm(logits, weight, out=grads.hidden[start:end])
            if row_scales is not None:
                grads.hidden[start:end].mul_(row_scales[:, None])
    if want_weight and grads.weight is None:  # no labelled rows: the gradient is exactly zero
        grads.weight = torch.zeros_like(weight)
    return losses, grads


def _expand(compact: torch.Tensor, positions: torch.Tensor | None, n_rows: int) -> torch.Tensor:
    """Rows in ``RowChunks``' compact order put back at their ``positions`` among ``n_rows`` rows,
    zeros elsewhere; ``compact`` itself when every row was computed (positions None)."""
    if positions is None:
        return compact
    return compact.new_zeros(n_rows, *compact.shape[1:]).index_copy_(0, positions, compact)


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The matmul dtype: autocast's when it is on (as F.linear would use), else the inputs'."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    if hidden.dtype != weight.dtype:
        raise TypeError(
            f"fusetune: hidden is {hidden.dtype} but weight is {weight.dtype}; cast one to the "
            "other, or run under torch.autocast as F.linear would need."
        )
    return hidden.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden, weight, bias, labels, options, reduction, num_items_in_batch, wants, chunk_rows
    ):
        compute_dtype = _compute_dtype(hidden, weight)
        with torch.autocast(hidden.device.type, enabled=False):
            rows = as_rows(hidden)
            n_rows, vocab = rows.shape[0], weight.shape[0]
            flat_labels = flatten_labels(labels, hidden.shape[:-1])
            summary = summarise_labels(
                flat_labels, vocab, options["ignore_index"], reduction, num_items_in_batch
            )
            chunks = RowChunks.labelled(
                rows, flat_labels, compute_dtype, summary, vocab, options["ignore_index"]
            )
            matmul_weight = weight.to(compute_dtype)
            matmul_bias = bias.to(compute_dtype) if bias is not None else None
            eager_grad = any(wants) and reduction != "none"
            grad_scale = summary.grad_scale if eager_grad else None
            kept_losses, grads = _chunked_loss(
                chunks, matmul_weight, matmul_bias, options, grad_scale, wants, chunk_rows
            )
            labelled = chunks.positions()
            row_losses = _expand(kept_losses, labelled, n_rows)

        ctx.shapes = (
            hidden.shape,
            hidden.dtype,
            weight.dtype,
            bias.dtype if bias is not None else None,
            n_rows,
        )
        ctx.eager_grad = eager_grad
        if eager_grad:
            ctx.save_for_backward(labelled, grads.hidden, grads.weight, grads.bias)
        elif any(wants):
            ctx.recompute = (options, wants, chunk_rows, compute_dtype)
            ctx.save_for_backward(labelled, rows, flat_labels, matmul_weight, matmul_bias)
        return reduce_losses(row_losses, reduction, summary.denominator, labels.shape)

    @staticmethod
    def backward(ctx, grad_output):
        hidden_shape, hidden_dtype, weight_dtype, bias_dtype, n_rows = ctx.shapes
        if ctx.eager_grad:
            hand_out_once(ctx, "linear_cross_entropy")
            labelled, grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
            grads = [
                scale_by_grad_output(g, grad_output) if g is not None else None
                for g in (grad_hidden, grad_weight, grad_bias)
            ]
        else:
            labelled, rows, flat_labels, weight, bias = ctx.saved_tensors
            options, wants, chunk, compute_dtype = ctx.recompute
            per_row = grad_output.reshape(-1).to(torch.float32)
            per_row = per_row if labelled is None else per_row.index_select(0, labelled)
            with torch.autocast(rows.device.type, enabled=False):
                _, found = _chunked_loss(
                    RowChunks(rows, flat_labels, compute_dtype, order=labelled),
                    weight,
                    bias,
                    options,
                    per_row.contiguous(),
                    wants,
                    chunk,
                )
            grads = [found.hidden, found.weight, found.bias]
        grad_hidden, grad_weight, grad_bias = grads
        if grad_hidden is not None:
            grad_hidden = _expand(grad_hidden, labelled, n_rows).view(hidden_shape).to(hidden_dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight_dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None


def _loss_and_gradients_outputs(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
    ignore_index: int, reduction: str, label_smoothing: float, softcap: float | None, z_loss: float,
    items: torch.Tensor | None, item_count: float | None, wants: list[bool], chunk_rows: int | None,
) -> list[torch.Tensor]:
    """New outputs of :func:`_loss_and_gradients`: the scalar float32 loss, then a gradient like each
    wanted input (contiguous, in its dtype)."""
    wanted = [t for t, want in zip((hidden, weight, bias), wants, strict=True) if want]
    loss = torch.empty((), dtype=torch.float32, device=hidden.device)
    return [loss, *(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in wanted)]


@graph_op("linear_cross_entropy", fake=_loss_and_gradients_outputs)
def _loss_and_gradients(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
    ignore_index: int, reduction: str, label_smoothing: float, softcap: float | None, z_loss: float,
    items: torch.Tensor | None, item_count: float | None, wants: list[bool], chunk_rows: int | None,
) -> list[torch.Tensor]:
    """The reduced loss ("mean" or "sum") and, for a loss gradient of 1, the gradients of the inputs
    that ``wants`` (hidden, weight, bias) names: what the eager op's forward computes, which its
    backward only scales. ``items`` or ``item_count`` is ``num_items_in_batch``."""
    inputs = [None if t is None else t.detach().requires_grad_(want)
              for t, want in zip((hidden, weight, bias), wants, strict=True)]
    row_options = dict(
        ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap
    )
    items = items if items is not None else item_count
    with torch.enable_grad():
        loss = _LinearCrossEntropy.apply(
            *inputs, labels, row_options, reduction, items, tuple(wants), chunk_rows
        )
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    gradients = torch.autograd.grad(loss, wanted) if wanted else ()
    return [loss.detach(), *(g.contiguous() for g in gradients)]


class _InGraphLinearCrossEntropy(torch.autograd.Function):
    """The loss inside a compiled graph: one custom op computes it and its gradients (for a loss
    gradient of 1) in forward; backward scales them by the loss's gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, options, items, wants, chunk_rows):
        item_tensor = items if isinstance(items, torch.Tensor) else None
        item_count = None if isinstance(items, torch.Tensor) or items is None else float(items)
        loss, *gradients = _loss_and_gradients(
            hidden, weight, bias, labels, options["ignore_index"], options["reduction"],
            options["label_smoothing"], options["softcap"], options["z_loss"], item_tensor, item_count,
            list(wants), chunk_rows,
        )
        ctx.save_for_backward(*gradients)
        ctx.wants = wants
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        gradients = iter(ctx.saved_tensors)
        scaled = []
        for want in ctx.wants:
            gradient = next(gradients) if want else None
            # In float32, as the eager op scales: a loss scale of 2^16 is inf in float16, and 1/3
            # rounded to bfloat16 is 0.2% off.
            scaled.append(None if gradient is None else
                          (gradient.float() * grad_output.float()).to(gradient.dtype))
        return (*scaled, None, None, None, None, None)


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    z_loss: float = 0.0,
    num_items_in_batch=None,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """The same loss with the full logits materialised (``F.linear`` then the CE reference)."""
    del chunk_rows  # a tuning knob of the fused path only
    logits = torch.nn.functional.linear(hidden, weight, bias)
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


@public_op
def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    z_loss: float = 0.0,
    num_items_in_batch=None,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` against ``labels``, logits never materialised.

    ``hidden`` (..., H), ``weight`` (vocab, H) (an ``lm_head`` weight, tied or not), ``labels``
    (...) with one label per row (shift them before calling for a causal LM). The options are
    ``cross_entropy``'s, with the same semantics, including loss 0 and zero gradients when every
    label is ignored. ``chunk_rows`` overrides the rows per chunk, a memory/speed knob: with a
    trainable weight the peak extra memory is one chunk of logits (``chunk_rows x vocab``, 2048
    rows by default) plus the gradients. With a frozen weight in bfloat16 or float32 (no bias;
    not label smoothing with a soft-cap) a chunk is also cut along the vocabulary
    (``vocab_slices``): a 32 MiB block of logits and a float32 (chunk_rows x hidden) buffer of at
    most 18 MiB (by default; 1,024 or 2,048 rows at common hidden sizes); otherwise a frozen
    weight takes (1024 x vocab) chunks. Returns a float32 loss.
    """
    check_options(reduction, label_smoothing, softcap, z_loss, num_items_in_batch)
    for name, tensor in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if tensor is not None:
            check_float(name, tensor)
    check_same_device("hidden", hidden, weight=weight, bias=bias, labels=labels)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"fusetune: weight {tuple(weight.shape)} does not match hidden size {hidden.shape[-1]}; "
            "pass the lm_head weight of shape (vocab, hidden)."
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(
            f"fusetune: bias {tuple(bias.shape)} must have shape ({weight.shape[0]},)."
        )
    if chunk_rows is not None and (not isinstance(chunk_rows, numbers.Integral) or chunk_rows < 1):
        raise ValueError(f"fusetune: chunk_rows={chunk_rows!r} must be a positive int (rows a chunk).")
    options = dict(
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        softcap=softcap,
        z_loss=z_loss,
        num_items_in_batch=num_items_in_batch,
    )
    if not use_triton(hidden, weight):
        return linear_cross_entropy_reference(hidden, weight, labels, bias=bias, **options)
    grad_on = torch.is_grad_enabled()
    wants = tuple(
        bool(grad_on and t is not None and t.requires_grad) for t in (hidden, weight, bias)
    )
    row_options = dict(
        ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap
    )
    if _in_graph(hidden, reduction):
        return _InGraphLinearCrossEntropy.apply(
            hidden, weight, bias, labels, {**row_options, "reduction": reduction}, num_items_in_batch, wants,
            chunk_rows,
        )
    return _between_graphs(
        hidden, weight, bias, labels, row_options, reduction, num_items_in_batch, wants, chunk_rows
    )


def _in_graph(hidden: torch.Tensor, reduction: str) -> bool:
    """Whether torch.compile is tracing a call the custom op takes: a reduced loss outside autocast
    (under autocast the op would have to carry autocast's dtype into the compiled code's call)."""
    return (torch.compiler.is_compiling() and reduction != "none"
            and not torch.is_autocast_enabled(hidden.device.type))


@outside_compiled_graphs(reason=(
    "fusetune.linear_cross_entropy stays inside a compiled graph only for a reduced loss (reduction "
    "'mean' or 'sum') outside autocast; under autocast or with reduction='none' it runs eagerly "
    "between graphs, so fullgraph=True cannot hold: cast hidden and weight to one dtype yourself and "
    "call it outside autocast, or drop fullgraph=True"))
def _between_graphs(*args) -> torch.Tensor:
    """The eager op, run as it is: eagerly, and between torch.compile's graphs where the custom op
    does not take the call (``_in_graph``)."""
    return _LinearCrossEntropy.apply(*args)
