"""Fused LoRA projections with hand-written backward passes.

A PEFT LoRA layer is ``y = x @ W.T + scale * (x @ A.T) @ B.T``: a frozen base weight W (out, in),
plain or bitsandbytes 4-bit, and trainable A (r, in), B (out, r). Run by PEFT it is a handful of
small kernels per layer and autograd saves every intermediate. Here one autograd node covers

- ``lora_linear(x, *projections)``: one or more projections of the same input (q, k, v as one
  node). The A's are stacked so x is read once for all LoRA-A products (one (T, sum r) matmul).
  Each output starts as the small LoRA term (``scale_i * xA_i @ B_i.T``, the scale applied by
  cuBLAS) and the base matmul adds onto it in place (``y.addmm_(x, W_i.T)``): a beta=1 epilogue
  costs nothing in a compute-bound matmul, so the LoRA term adds no pass over y. Backward likewise
  starts ``dX = [scale_i dY_i @ B_i] @ [A_i]`` and adds each ``dY_i @ W_i`` with ``addmm_``, and
  gets every dA from one ``[scale_i dY_i @ B_i].T @ X`` matmul.
- ``lora_glu_mlp(x, gate, up, down, activation)``: ``down(act(gate(x)) * up(x))``. Forward saves x,
  the gate and up outputs e and g and the (T, r) LoRA-A products, never h = act(e) * g, which
  lives only until the down projection has read it (one row tile at a time when forward records
  a graph: e and g are then kept, and h would be a third buffer of their size). Backward goes
  over row tiles of about 48 MiB: per tile it recomputes h only when down's A needs its gradient,
  makes the tile's dh, and the glu backward kernel writes de and dg over e and g in place. So
  the only (T, intermediate) buffers of a training step are e and g, plus one (tile,
  intermediate) slice at a time; no float32 copies of activations. Because backward overwrites
  what forward saved, it runs once per graph: a second backward (``retain_graph=True``) raises.

Base weights are read through ``fusetune.ops.nf4.dense_weight`` in forward and again in backward
and each dense copy is dropped as soon as its matmul (or its loop over row tiles) is done: ctx
keeps only the weight objects, so a 4-bit model never holds more than one dequantised matrix.
A large 4-bit weight (an MLP's, 112 MiB in bf16 at Llama-3 8B's size) is not even made whole:
it is dequantised in slices of at most ``nf4.DENSE_SLICE_BYTES`` (``nf4.dense_slices``), slices
of its rows in forward (each gives columns of the output) and of its columns in backward (each
gives columns of dX, or of down's dh, de and dg), so every output element is still one matmul
over the full inner dimension. The base weight must be frozen.

Matmuls run in the compute dtype (autocast's when autocast is on for x's device, else x's dtype);
A and B are cast to it, their gradients are returned in their own dtype (float32 adapters under
bf16 autocast, the usual training set-up), x's gradient in x's dtype; outputs are in the compute
dtype. ``lora_linear`` is plain matmuls and runs this path on any device; ``lora_glu_mlp`` needs
the glu kernels, so plain CPU tensors without the Triton interpreter take its reference.

A base weight with a ``compute_dtype`` of its own (bitsandbytes' ``Linear4bit.compute_dtype``, set
by ``bnb_4bit_compute_dtype``) has its product run as ``Linear4bit`` runs it: outside autocast in
that dtype (x, the dequantised weight and the bias cast to it, the product cast back to the
compute dtype before the LoRA term is added), and dX's base part likewise (dY cast to it, the
product cast back). Under autocast bitsandbytes' matmul runs in autocast's dtype, as everything
else here; a compute dtype that is neither float32 nor autocast's would have bitsandbytes round
the inputs twice, and is refused (:func:`autocast_conflict`; ``fusetune.nn.lora`` then runs PEFT's
forward). Where a base product's dtype is the call's, its matmul adds onto the LoRA term in place
as above; otherwise it is a product of its own, cast and added. In backward a 4-bit weight is
decoded as bitsandbytes' backward decodes it (``dense_weight(..., backward=True)``).
"""

from __future__ import annotations

import contextlib
import numbers
import threading
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from fusetune import kept
from fusetune.ops._launch import (
    SUPPORTED_DTYPES,
    as_rows,
    cdiv,
    check_float,
    check_same_device,
    matmul_dtype,
    public_eager_op,
    use_triton,
)
from fusetune.ops.glu import (
    ACTIVATIONS,
    geglu_reference,
    glu_backward_into,
    glu_forward_into,
    swiglu_reference,
)
from fusetune.ops.nf4 import decoded_by_fusetune, dense_slices, dense_weight, is_4bit
from fusetune.ops.nf4_linear import nf4_linear


class LoraWeights(NamedTuple):
    """One projection: frozen base ``weight`` (out, in), plain or 4-bit, its optional LoRA
    adapter ``a`` (r, in), ``b`` (out, r) with ``scale`` (PEFT's ``scaling``), an optional
    frozen ``bias`` (out,) of the base layer (Qwen2's q, k, v), and the ``compute_dtype`` its base
    product runs in outside autocast (a bitsandbytes ``Linear4bit``'s; None: the call's compute
    dtype; see the module docstring)."""

    weight: torch.Tensor
    a: torch.Tensor | None
    b: torch.Tensor | None
    scale: float
    bias: torch.Tensor | None = None
    compute_dtype: torch.dtype | None = None


# --------------------------------------------------------------------------------------------
# Checks and dtypes
# --------------------------------------------------------------------------------------------
def autocast_conflict(compute_dtype: torch.dtype | None, device_type: str) -> str | None:
    """Why a base product with this ``compute_dtype`` cannot be fused now, or None.

    Under autocast bitsandbytes' ``Linear4bit`` casts its input to its compute dtype and its matmul
    then casts that to autocast's dtype: inputs, weight and bias are rounded to both in turn. The
    fused ops round once, to autocast's dtype, which gives the same values only when the compute
    dtype is float32 or autocast's own (float16 under bfloat16 autocast, or the reverse, differs).
    """
    if compute_dtype in (None, torch.float32) or not torch.is_autocast_enabled(device_type):
        return None
    autocast = torch.get_autocast_dtype(device_type)
    if compute_dtype == autocast:
        return None
    return (f"its compute dtype (bnb_4bit_compute_dtype) is {compute_dtype} under {autocast} autocast: "
            "bitsandbytes rounds the base product's inputs to both, the fused path only to the second")


def _base_dtypes(x: torch.Tensor, projections: Sequence[LoraWeights]) -> tuple[torch.dtype, ...]:
    """The dtype each projection's base product runs in for input ``x``: its ``compute_dtype``
    outside autocast (bitsandbytes casts the input to it), else the call's compute dtype (under
    autocast bitsandbytes' matmul runs in autocast's dtype, as the fused ops do)."""
    dtype = matmul_dtype(x)
    if torch.is_autocast_enabled(x.device.type):
        return (dtype,) * len(projections)
    return tuple(p.compute_dtype or dtype for p in projections)


def _weight_shape(weight: torch.Tensor) -> tuple[int, ...]:
    """(out, in) of a base weight; a 4-bit weight's packed data has another shape."""
    return tuple(weight.quant_state.shape) if is_4bit(weight) else tuple(weight.shape)


def _check_projection(op: str, name: str, x: torch.Tensor, in_features: int, p: object) -> None:
    if not isinstance(p, LoraWeights):
        raise TypeError(
            f"fusetune.{op}: {name} must be a fusetune.ops.lora.LoraWeights(weight, a, b, scale), "
            f"got {type(p).__name__}."
        )
    check_same_device("x", x, **{f"{name}.{part}": getattr(p, part) for part in ("weight", "a", "b", "bias")})
    if isinstance(p.scale, bool) or not isinstance(p.scale, numbers.Real):
        raise TypeError(
            f"fusetune.{op}: the scale of {name} is {type(p.scale).__name__}; pass a number (PEFT's "
            "scaling, lora_alpha / r: a fixed float, not a tensor)."
        )
    if p.weight.requires_grad:
        raise ValueError(
            f"fusetune.{op}: the base weight of {name} requires grad; fused LoRA needs a frozen "
            "base weight (call weight.requires_grad_(False), or leave this layer unfused to train it)."
        )
    shape = _weight_shape(p.weight)
    if len(shape) != 2 or shape[1] != in_features:
        raise ValueError(
            f"fusetune.{op}: the base weight of {name} has shape {shape}; expected "
            f"(out, {in_features}) to match the input's last dim."
        )
    if not is_4bit(p.weight):
        check_float(f"{name}.weight", p.weight)
    if p.compute_dtype is not None and p.compute_dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"fusetune.{op}: the compute_dtype of {name} is {p.compute_dtype!r}; use torch.float32, "
            "torch.bfloat16, torch.float16 or None."
        )
    conflict = autocast_conflict(p.compute_dtype, x.device.type)
    if conflict is not None:
        raise ValueError(f"fusetune.{op}: {name}: {conflict}. Leave this layer to bitsandbytes (unfused).")
    if p.bias is not None:
        if p.bias.requires_grad:
            raise ValueError(
                f"fusetune.{op}: the bias of {name} requires grad; fused LoRA needs a frozen bias "
                "(call bias.requires_grad_(False), or leave this layer unfused to train it)."
            )
        if p.bias.shape != (shape[0],):
            raise ValueError(f"fusetune.{op}: the bias of {name} has shape {tuple(p.bias.shape)}; "
                             f"expected ({shape[0]},).")
    if (p.a is None) != (p.b is None):
        raise ValueError(
            f"fusetune.{op}: {name} has only one of a and b; pass both LoRA matrices or neither."
        )
    if p.a is None:
        return
    check_float(f"{name}.a", p.a)
    check_float(f"{name}.b", p.b)
    rank = p.a.shape[0] if p.a.dim() == 2 else -1
    if p.a.shape != (rank, in_features) or p.b.shape != (shape[0], rank):
        raise ValueError(
            f"fusetune.{op}: {name} has a {tuple(p.a.shape)} and b {tuple(p.b.shape)}; expected "
            f"a (r, {in_features}) and b ({shape[0]}, r) for its base weight {shape}."
        )


def _check(op: str, x: torch.Tensor, projections: Sequence[LoraWeights], names: Sequence[str]) -> None:
    check_float("x", x)
    if x.dim() == 0:
        raise ValueError(f"fusetune.{op}: x must have at least one dimension (..., in_features).")
    if not projections:
        raise ValueError(f"fusetune.{op}: pass at least one LoraWeights projection.")
    for name, p in zip(names, projections, strict=True):
        _check_projection(op, name, x, x.shape[-1], p)


def _check_mlp(
    op: str, x: torch.Tensor, gate: LoraWeights, up: LoraWeights, down: LoraWeights, activation: str
) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"fusetune.{op}: activation={activation!r}; use one of {sorted(ACTIVATIONS)}.")
    _check(op, x, (gate, up), ("gate", "up"))
    intermediate = _weight_shape(gate.weight)[0]
    if _weight_shape(up.weight)[0] != intermediate:
        raise ValueError(
            f"fusetune.{op}: gate and up have {intermediate} and {_weight_shape(up.weight)[0]} "
            "outputs; a gated MLP needs the same intermediate size for both."
        )
    _check_projection(op, "down", x, intermediate, down)


def _projection_names(n: int) -> list[str]:
    return [f"projections[{i}]" for i in range(n)]


# --------------------------------------------------------------------------------------------
# PyTorch references
# --------------------------------------------------------------------------------------------
_GLU_REFERENCES = {
    "silu": swiglu_reference,
    "gelu_tanh": partial(geglu_reference, approximate="tanh"),
    "gelu": partial(geglu_reference, approximate="none"),
}


def _reference_projection(
    x: torch.Tensor, p: LoraWeights, dtype: torch.dtype, base: torch.dtype
) -> torch.Tensor:
    """One projection of ``x`` (in ``dtype``), its base product run in ``base`` and cast back.

    A 4-bit weight's product decodes it as bitsandbytes' ``matmul_4bit`` does, forward and backward
    (``nf4.dense_weight``'s ``backward``): an NF4 weight through ``nf4_linear``, one that
    bitsandbytes decodes (FP4, or ``nf4.BACKEND == "bnb"``) through ``matmul_4bit`` itself.
    """
    rows = x.to(base)
    bias = None if p.bias is None else p.bias.to(base)
    if decoded_by_fusetune(p.weight):  # dequantised inside the op, never saved; stays in compiled graphs
        y = nf4_linear(rows, p.weight, bias)
    elif is_4bit(p.weight):
        import bitsandbytes

        # The transposed weight is what Linear4bit passes in bitsandbytes 0.45 (0.50 takes either).
        y = bitsandbytes.matmul_4bit(rows, p.weight.t(), quant_state=p.weight.quant_state, bias=bias)
    else:
        y = F.linear(rows, dense_weight(p.weight, base), bias)
    y = y.to(dtype)
    if p.a is None:
        return y
    return y + p.scale * F.linear(F.linear(x, p.a.to(dtype)), p.b.to(dtype))


def lora_linear_reference(x: torch.Tensor, *projections: LoraWeights) -> tuple[torch.Tensor, ...]:
    """``x @ W_i.T + scale_i * (x @ a_i.T) @ b_i.T`` per projection in plain PyTorch (autograd
    does the backward), with the dtype rules of :func:`lora_linear`."""
    _check("lora_linear_reference", x, projections, _projection_names(len(projections)))
    dtype, bases = matmul_dtype(x), _base_dtypes(x, projections)
    with torch.autocast(x.device.type, enabled=False):
        rows = x.to(dtype)
        pairs = zip(projections, bases, strict=True)
        return tuple(_reference_projection(rows, p, dtype, base) for p, base in pairs)


def lora_glu_mlp_reference(
    x: torch.Tensor, gate: LoraWeights, up: LoraWeights, down: LoraWeights, activation: str
) -> torch.Tensor:
    """``down(act(gate(x)) * up(x))`` in plain PyTorch, with the dtype rules of :func:`lora_glu_mlp`."""
    _check_mlp("lora_glu_mlp_reference", x, gate, up, down, activation)
    e, g = lora_linear_reference(x, gate, up)
    return lora_linear_reference(_GLU_REFERENCES[activation](e, g), down)[0]


# --------------------------------------------------------------------------------------------
# Outputs whose values nobody reads (a checkpoint's recompute)
# --------------------------------------------------------------------------------------------
class _UnreadOutputs(threading.local):
    """The autograd nodes of fused MLP outputs left uncomputed in this thread, or None when the
    caller has not promised that their values go unread (see :func:`outputs_unread`)."""

    nodes: list | None = None


_UNREAD = _UnreadOutputs()


@contextlib.contextmanager
def outputs_unread() -> Iterator[list]:
    """Within this context ``lora_glu_mlp`` builds its autograd node but does not compute its
    output's values: the down projection (the MLP's last and largest matmul) and h = act(e) * g
    are skipped (backward makes h's tiles anyway) and the output is uninitialised memory; with
    row tiles the whole forward is skipped, since backward recomputes every tile from x anyway.
    Gradients are unaffected, because the MLP's backward reads only what it saved, never its output.

    A checkpoint's recompute needs a layer's graph, not its output: its outputs' values are only
    thrown away. But an op between the MLP and the layer's output that saves its input for
    backward (a norm after the MLP, a gate multiplying it) would read the garbage, so the caller
    must check that no such op exists. Yields the list of the skipped outputs' autograd nodes
    (``grad_fn``) for that check (``fusetune.checkpointing`` walks the graph from the layer's
    outputs to these nodes and recomputes normally when anything on the way reads values).
    """
    previous = _UNREAD.nodes
    _UNREAD.nodes = nodes = []
    try:
        yield nodes
    finally:
        _UNREAD.nodes = previous


# --------------------------------------------------------------------------------------------
# The fused passes, shared by both autograd Functions
# --------------------------------------------------------------------------------------------
class _Group(NamedTuple):
    """Projections of one input, with their LoRA matrices in the compute dtype.

    A is stacked along the rank, (sum r, in), so one matmul gives every LoRA-A product; ``slices``
    are each projection's columns of it (None without LoRA). Made once per forward and kept for
    backward, so the adapters are cast once per pass, and backward uses the values forward did.
    ``projections`` are as given: the gradients are returned in the adapters' own dtypes.
    ``bases``: the dtype each base product runs in (``_base_dtypes``).
    """

    projections: tuple[LoraWeights, ...]
    dtype: torch.dtype
    stacked_a: torch.Tensor | None
    b: tuple[torch.Tensor | None, ...]
    slices: tuple[slice | None, ...]
    bases: tuple[torch.dtype, ...]


def _group(projections: Sequence[LoraWeights], dtype: torch.dtype, bases: Sequence[torch.dtype]) -> _Group:
    slices, start = [], 0
    for p in projections:
        if p.a is None:
            slices.append(None)
        else:
            slices.append(slice(start, start + p.a.shape[0]))
            start += p.a.shape[0]
    a = [p.a for p in projections if p.a is not None]
    stacked = None if not a else (a[0] if len(a) == 1 else torch.cat(a)).to(dtype)
    b = tuple(None if p.b is None else p.b.to(dtype) for p in projections)
    return _Group(tuple(projections), dtype, stacked, b, tuple(slices), tuple(bases))


def _scaled_mm(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * a @ b`` with the scale applied by cuBLAS (one rounding)."""
    out = torch.empty(a.shape[0], b.shape[1], dtype=a.dtype, device=a.device)
    return out.addmm_(a, b, beta=0, alpha=scale)


def _lora_product(rows: torch.Tensor, group: _Group) -> torch.Tensor | None:
    """The stacked LoRA-A product ``rows @ [A_i].T``, (T, sum r); None without LoRA."""
    return None if group.stacked_a is None else torch.mm(rows, group.stacked_a.t())


def _project(
    rows: torch.Tensor, group: _Group, given: Sequence[torch.Tensor] | None = None
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Every projection's output (T, out_i) and the stacked LoRA-A product.

    ``given``: the outputs, already at hand (a recompute's kept ones, ``fusetune.kept``): only the
    LoRA-A product is computed. A base product in another dtype than the group's (``bases``) is
    made from ``rows`` cast to it, without its LoRA term, cast back, and the LoRA term added.
    """
    dtype = group.dtype
    xa = _lora_product(rows, group)
    if given is not None:
        return list(given), xa
    inputs = {dtype: rows}  # rows in each base dtype, cast once for all projections
    outs = []
    for p, lora_b, cols, base in zip(group.projections, group.b, group.slices, group.bases, strict=True):
        if base == dtype:
            outs.append(_projection(rows, xa, p, lora_b, cols, dtype))
            continue
        if base not in inputs:
            inputs[base] = rows.to(base)
        y = _projection(inputs[base], None, p, None, None, base).to(dtype)
        outs.append(y if cols is None else y.add_(_scaled_mm(xa[:, cols], lora_b.t(), p.scale)))
    return outs, xa


def _projection(
    rows: torch.Tensor, xa: torch.Tensor | None, p: LoraWeights, lora_b: torch.Tensor | None,
    cols: slice | None, dtype: torch.dtype,
) -> torch.Tensor:
    """``rows @ W.T`` plus the bias and the LoRA term (``cols`` of ``xa``; None: base only), in
    ``dtype``, the base matmul adding onto the LoRA term. A large 4-bit base weight is dequantised a
    slice of its rows at a time (``dense_slices``), each slice's matmul writing its columns of the
    output; any other weight is one piece."""
    bias = None if p.bias is None else p.bias.to(dtype)
    out_slices = dense_slices([p.weight], 0, dtype)
    y = _output_start(rows, xa, p, lora_b, cols, bias, whole=len(out_slices) == 1)
    adds = cols is not None or bias is not None  # else the slices of y start empty
    for out_rows in out_slices:
        weight = dense_weight(p.weight, dtype, rows=out_rows)
        if y is None:  # one piece without LoRA: the matmul makes y, the bias in its epilogue
            y = torch.mm(rows, weight.t()) if bias is None else torch.addmm(bias, rows, weight.t())
        else:  # onto the LoRA term, in the matmul's epilogue (a beta=1 add costs nothing)
            y[:, out_rows].addmm_(rows, weight.t(), beta=1 if adds else 0)
        del weight  # a dequantised copy goes before the next one is made
    return y


def _output_start(
    rows: torch.Tensor, xa: torch.Tensor | None, p: LoraWeights, lora_b: torch.Tensor | None,
    cols: slice | None, bias: torch.Tensor | None, whole: bool,
) -> torch.Tensor | None:
    """What a projection's base matmul adds onto: the small LoRA term (plus bias). Without LoRA:
    None for a weight in one piece (its matmul makes the output), else the bias or an empty
    buffer that the slices fill."""
    if cols is not None:
        if bias is None:
            return _scaled_mm(xa[:, cols], lora_b.t(), p.scale)
        return torch.addmm(bias, xa[:, cols], lora_b.t(), alpha=p.scale)
    if whole:
        return None
    shape = (rows.shape[0], _weight_shape(p.weight)[0])
    # A copy of the bias in every row (of one row too, whose expanded view already counts as
    # contiguous: the slices' matmuls would add onto the bias itself).
    if bias is None:
        return rows.new_empty(shape)
    return bias.expand(shape).clone(memory_format=torch.contiguous_format)


def _project_backward(
    grads: list[torch.Tensor],
    rows: Callable[[], torch.Tensor],
    xa: torch.Tensor | None,
    group: _Group,
    want_x: bool,
    want_a: Sequence[bool],
    want_b: Sequence[bool],
) -> tuple[torch.Tensor | None, list[torch.Tensor | None], list[torch.Tensor | None]]:
    """Gradients of :func:`_project`: (dX, [dA_i], [dB_i]); dA/dB in the adapters' dtypes.

    ``grads`` (the dY_i, (T, out_i) in the compute dtype) is consumed: each entry is dropped once
    its last matmul is done. ``rows`` returns the projections' input; it is called only when an A
    needs its gradient, and the result is dropped after that one matmul (the MLP recomputes h
    there).
    """
    projections, slices, dtype = group.projections, group.slices, group.dtype
    n_rows = grads[0].shape[0]
    lora = [i for i, cols in enumerate(slices) if cols is not None]
    # [scale_i * dY_i @ B_i], (T, sum r): the gradient of the stacked LoRA-A product.
    dxa = None
    if lora and (want_x or any(want_a)):
        dxa = torch.empty(n_rows, slices[lora[-1]].stop, dtype=dtype, device=grads[0].device)
    da, db = [None] * len(projections), [None] * len(projections)
    for i in lora:
        p, cols = projections[i], slices[i]
        if dxa is not None:
            dxa[:, cols].addmm_(grads[i], group.b[i], beta=0, alpha=p.scale)
        if want_b[i]:
            db[i] = _scaled_mm(grads[i].t(), xa[:, cols], p.scale).to(p.b.dtype)
    if any(want_a):
        stacked_da = torch.mm(dxa.t(), rows())
        a_dtypes = {projections[i].a.dtype for i in lora if want_a[i]}
        if len(a_dtypes) == 1:  # one cast for every dA, each a block of rows of it
            stacked_da = stacked_da.to(a_dtypes.pop())
        for i in lora:
            if want_a[i]:
                da[i] = stacked_da[slices[i]].to(projections[i].a.dtype)
        del stacked_da
    dx = None
    if want_x:
        # dX = [scale_i dY_i @ B_i] @ [A_i] + sum_i dY_i @ W_i, the W_i in slices of their input
        # columns when they are large 4-bit weights (each column of dX then sums the same terms),
        # each dY_i @ W_i in its base dtype.
        fresh = dxa is None  # dX starts empty: each slice's first matmul writes rather than adds
        if fresh:
            dx = grads[0].new_empty(n_rows, _weight_shape(projections[0].weight)[1])
        else:
            dx = torch.mm(dxa, group.stacked_a)
        grads[:] = [g.to(base) for g, base in zip(grads, group.bases, strict=True)]
        widest = max(group.bases, key=lambda base: base.itemsize)
        in_slices = dense_slices([p.weight for p in projections], 1, widest)
        for k, in_cols in enumerate(in_slices):
            for i, p in enumerate(projections):
                weight = dense_weight(p.weight, group.bases[i], backward=True, cols=in_cols)
                _add_product(dx[:, in_cols], grads[i], weight, overwrite=fresh and i == 0)
                del weight
                if k == len(in_slices) - 1:
                    grads[i] = None
    grads.clear()
    return dx, da, db


def _add_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, overwrite: bool) -> None:
    """``out += a @ b`` (``overwrite``: ``out = a @ b``), in the matmul's epilogue when ``a`` has
    out's dtype; a base product in another dtype is made in it and cast to out's before the add,
    as bitsandbytes returns it."""
    if a.dtype == out.dtype:
        out.addmm_(a, b, beta=0 if overwrite else 1)
    elif overwrite:
        out.copy_(torch.mm(a, b))
    else:
        out.add_(torch.mm(a, b).to(out.dtype))


def _adapter_args(projections: Sequence[LoraWeights]) -> list[torch.Tensor | None]:
    """(a_0, b_0, a_1, b_1, ...): passed to ``Function.apply`` so autograd tracks them."""
    return [t for p in projections for t in (p.a, p.b)]


def _adapter_grads(da: list, db: list) -> list:
    return [t for pair in zip(da, db, strict=True) for t in pair]


# Index of a_0 in the Function's inputs (x, spec, a_0, b_0, ...).
_FIRST_ADAPTER = 2


KEPT_PROJECTIONS = "projections"  # what lora_linear offers a checkpoint's recompute (fusetune.kept)


def _kept_outputs(rows: torch.Tensor, group: _Group) -> list[torch.Tensor] | None:
    """In a recompute, the outputs this call's forward kept (its matmuls are then skipped), else None.

    A forward call that made more outputs than this one is a q-k-v group's first call in a
    cross-attention (``fusetune.patch.lora.ProjectionGroup``): it computed all three on the
    queries' input before the group noticed the keys' input differs and split. Its recompute
    counterpart is the query alone; it computes again.
    """
    reused = kept.take(KEPT_PROJECTIONS)
    if reused is None:
        return None
    outs, _ = reused
    if len(outs) != len(group.projections):
        return None
    expected = [(rows.shape[0], _weight_shape(p.weight)[0]) for p in group.projections]
    if [tuple(y.shape) for y in outs] != expected or any(y.dtype != group.dtype for y in outs):
        raise RuntimeError(
            f"fusetune.lora_linear: the recompute's outputs are {group.dtype} {expected}, the ones its "
            f"forward kept {[(y.dtype, tuple(y.shape)) for y in outs]}; turn keeping off with "
            "enable_checkpointing(model, keep_projections=False) and report this."
        )
    return list(outs)


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, spec, *adapters):
        projections, dtype, bases = spec
        want = ctx.needs_input_grad
        want_a, want_b = want[_FIRST_ADAPTER::2], want[_FIRST_ADAPTER + 1 :: 2]
        with torch.autocast(x.device.type, enabled=False):
            rows = as_rows(x).to(dtype)
            group = _group(projections, dtype, bases)
            given = _kept_outputs(rows, group)
            outs, xa = _project(rows, group, given)
            if given is None:  # a checkpointed layer's forward may keep them for its recompute
                kept.offer(KEPT_PROJECTIONS, tuple(outs))
        ctx.save_for_backward(rows if any(want_a) else None, xa if any(want_b) else None)
        ctx.group, ctx.x_meta, ctx.wants = group, (x.shape, x.dtype), (want[0], want_a, want_b)
        return tuple(y.view(*x.shape[:-1], y.shape[1]) for y in outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_outputs):
        rows, xa = ctx.saved_tensors
        (x_shape, x_dtype), (want_x, want_a, want_b) = ctx.x_meta, ctx.wants
        with torch.autocast(grad_outputs[0].device.type, enabled=False):
            grads = [as_rows(g).to(ctx.group.dtype) for g in grad_outputs]
            dx, da, db = _project_backward(grads, lambda: rows, xa, ctx.group, want_x, want_a, want_b)
        dx = None if dx is None else dx.view(x_shape).to(x_dtype)
        return dx, None, *_adapter_grads(da, db)


# Bytes of one tile of h = act(e) * g or of its gradient dh, made by a forward that records a graph
# and by backward: with e and g saved, a whole (T, intermediate) h or dh would be a third buffer of
# that size. A tile is live at the step's memory peak (the MLP backward of the last layers, with
# most adapter gradients made), so it counts against the memory target; each tile also costs a
# handful of kernel launches, which matter where the host limits an eager step. 48 MiB: three tiles
# of up to 1,408 rows at Llama-3 8B's 4,096 tokens.
_HIDDEN_TILE_BYTES = 48 * 2**20
# Tiles longer than this are whole multiples of it (full blocks for the matmuls over the tiles).
_TILE_ROW_MULTIPLE = 64


def _row_tiles(rows: torch.Tensor) -> list[slice]:
    """Row slices of equal size (the last may be shorter) covering ``rows`` (e or g, (T, width)),
    each of about ``_HIDDEN_TILE_BYTES``; at least one, so no rows take another path."""
    n_rows = rows.shape[0]
    per_tile = max(1, _HIDDEN_TILE_BYTES // max(rows.shape[1] * rows.element_size(), 1))
    count = max(1, cdiv(n_rows, per_tile))
    size = max(1, cdiv(n_rows, count))
    if size > _TILE_ROW_MULTIPLE:
        size = cdiv(size, _TILE_ROW_MULTIPLE) * _TILE_ROW_MULTIPLE
    return [slice(start, start + size) for start in range(0, max(n_rows, 1), size)]


def _hidden_tile(e: torch.Tensor, g: torch.Tensor, rows: slice, activation: str) -> torch.Tensor:
    """``act(e) * g`` for a slice of rows, in a buffer of its own."""
    h = torch.empty_like(e[rows])
    glu_forward_into(h, e[rows], g[rows], activation)
    return h


def _down_forward(
    e: torch.Tensor, g: torch.Tensor, down: _Group, activation: str, tiled: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``down(act(e) * g)`` and the (T, r) LoRA-A product of its input. ``tiled``: h is made one
    row tile at a time, for a forward that records a graph (training without checkpoints), where
    e and g stay saved and gradients may be around; a forward without a graph makes h in one
    piece."""
    outs, products = [], []
    for rows in _row_tiles(e) if tiled else [slice(None)]:
        h = _hidden_tile(e, g, rows, activation)
        (y,), xa = _project(h, down)
        outs.append(y)
        products.append(xa)
        del h
    return _cat_rows(outs), _cat_rows(products)


def _cat_rows(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    return None if parts[0] is None else parts[0] if len(parts) == 1 else torch.cat(parts)


def _down_backward(
    grad: torch.Tensor, e: torch.Tensor, g: torch.Tensor, xa_down: torch.Tensor | None,
    down: _Group, activation: str, want_dh: bool, want_a: bool, want_b: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Down's dA and dB and, when ``want_dh``, the GLU's backward: e and g are overwritten in
    place with de and dg. h (for dA, and for dB when forward did not save its LoRA-A product
    ``xa_down``: a recompute that skipped down) and dh are made one row tile at a time, h before
    dh (it reads e and g); dA and such a dB are summed over the tiles by cuBLAS in the compute
    dtype (float32 arithmetic, one rounding per tile). A large 4-bit down weight is dequantised a
    slice of its input columns at a time, each giving those columns of dh, de and dg."""
    (p,) = down.projections
    dxa = None  # scale * dY @ B, (T, r)
    if p.a is not None and (want_dh or want_a):
        dxa = _scaled_mm(grad, down.b[0], p.scale)
    db = _scaled_mm(grad.t(), xa_down, p.scale) if want_b and xa_down is not None else None
    tiled_db = want_b and xa_down is None
    da = None
    if want_a or tiled_db:
        for rows in _row_tiles(e):
            h = _hidden_tile(e, g, rows, activation)
            if want_a:
                da = torch.mm(dxa[rows].t(), h) if da is None else da.addmm_(dxa[rows].t(), h)
            if tiled_db:
                xa = _lora_product(h, down)
                db = (_scaled_mm(grad[rows].t(), xa, p.scale) if db is None
                      else db.addmm_(grad[rows].t(), xa, alpha=p.scale))
            del h
    if want_dh:
        (base,) = down.bases
        base_grad = grad.to(base)  # dY @ W runs in the base dtype (no copy when it is the group's)
        for cols in dense_slices([p.weight], 1, base):
            weight = dense_weight(p.weight, base, backward=True, cols=cols)  # one copy for every tile
            for rows in _row_tiles(e):
                if dxa is None:
                    dh = torch.mm(base_grad[rows], weight).to(down.dtype)
                else:
                    dh = torch.mm(dxa[rows], down.stacked_a[:, cols])
                    _add_product(dh, base_grad[rows], weight, overwrite=False)
                e_tile, g_tile = e[rows, cols], g[rows, cols]
                glu_backward_into(e_tile, g_tile, dh, e_tile, g_tile, activation)
                del dh
            del weight
    return (None if da is None else da.to(p.a.dtype)), (None if db is None else db.to(p.b.dtype))


class _LoraGluMLP(torch.autograd.Function):
    """Saves x, e and g; backward overwrites e and g with their gradients, so it can run once
    per graph (a second backward with ``retain_graph=True`` is refused)."""

    @staticmethod
    def forward(ctx, x, spec, *adapters):
        (gate, up, down), activation, (dtype, bases), unread, records = spec
        want = ctx.needs_input_grad
        want_a, want_b = want[_FIRST_ADAPTER::2], want[_FIRST_ADAPTER + 1 :: 2]
        with torch.autocast(x.device.type, enabled=False):
            rows = as_rows(x).to(dtype)
            gate_up, down = _group((gate, up), dtype, bases[:2]), _group((down,), dtype, bases[2:])
            (e, g), xa_gate_up = _project(rows, gate_up)
            y = xa_down = None
            if not unread:  # values nobody reads (outputs_unread): down is skipped, and its
                # LoRA-A product, for dB, is made in backward from the h tiles it makes anyway
                y, xa_down = _down_forward(e, g, down, activation, tiled=records)
            if y is None:
                y = rows.new_empty(rows.shape[0], _weight_shape(down.projections[0].weight)[0])
        ctx.save_for_backward(
            rows if any(want_a[:2]) else None,
            e,
            g,
            xa_gate_up if any(want_b[:2]) else None,
            xa_down if want_b[2] else None,
        )
        ctx.groups, ctx.activation = (gate_up, down), activation
        ctx.x_meta, ctx.wants = (x.shape, x.dtype), (want[0], want_a, want_b)
        ctx.overwritten = False
        return y.view(*x.shape[:-1], y.shape[1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        if ctx.overwritten:
            raise RuntimeError(
                "fusetune.lora_glu_mlp: backward ran a second time over the same graph "
                "(retain_graph=True); the fused MLP's first backward overwrote the activations it "
                "saved. Run forward again before each backward, or leave the MLP unfused "
                "(fusetune.apply(model, lora=False))."
            )
        rows, e, g, xa_gate_up, xa_down = ctx.saved_tensors
        gate_up, down = ctx.groups
        (x_shape, x_dtype), (want_x, want_a, want_b) = ctx.x_meta, ctx.wants
        want_dh = want_x or any(want_a[:2]) or any(want_b[:2])
        dx, da_gate_up, db_gate_up = None, [None, None], [None, None]
        with torch.autocast(grad_output.device.type, enabled=False):
            ctx.overwritten = want_dh
            da_down, db_down = _down_backward(
                as_rows(grad_output).to(down.dtype), e, g, xa_down, down, ctx.activation,
                want_dh, want_a[2], want_b[2],
            )
            if want_dh:  # e and g now hold de and dg
                grads = [e, g]
                del e, g
                dx, da_gate_up, db_gate_up = _project_backward(
                    grads, lambda: rows, xa_gate_up, gate_up, want_x, want_a[:2], want_b[:2]
                )
        dx = None if dx is None else dx.view(x_shape).to(x_dtype)
        return dx, None, *_adapter_grads(da_gate_up + [da_down], db_gate_up + [db_down])


class _TiledLoraGluMLP(torch.autograd.Function):
    """``_LoraGluMLP`` over row tiles, for long sequences: only x is saved; backward recomputes each
    tile's gate and up outputs, so no (T, intermediate) tensor ever exists, only (tile, intermediate)
    ones. The price is one more gate/up matmul pair per tile in backward."""

    @staticmethod
    def forward(ctx, x, spec, *adapters):
        (gate, up, down), activation, (dtype, bases), tile, unread = spec
        with torch.autocast(x.device.type, enabled=False):
            rows = as_rows(x).to(dtype)
            groups = _group((gate, up), dtype, bases[:2]), _group((down,), dtype, bases[2:])
            computed = rows.shape[0] and not unread  # unread: backward recomputes every tile anyway
            y = torch.cat([_mlp_tile(rows[i:i + tile], *groups, activation)
                           for i in range(0, rows.shape[0], tile)]) if computed else None
        if y is None:
            y = rows.new_empty(rows.shape[0], _weight_shape(down.weight)[0])
        ctx.save_for_backward(rows)
        ctx.groups, ctx.activation, ctx.tile = groups, activation, tile
        ctx.x_meta, ctx.wants = (x.shape, x.dtype), ctx.needs_input_grad
        return y.view(*x.shape[:-1], y.shape[1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        (rows,) = ctx.saved_tensors
        (gate_up, down), activation, tile = ctx.groups, ctx.activation, ctx.tile
        (x_shape, x_dtype), want = ctx.x_meta, ctx.wants
        want_a, want_b = want[_FIRST_ADAPTER::2], want[_FIRST_ADAPTER + 1 :: 2]
        dx = torch.empty_like(rows) if want[0] else None
        da, db = [None] * 3, [None] * 3
        with torch.autocast(grad_output.device.type, enabled=False):
            grad_rows = as_rows(grad_output).to(down.dtype)
            for start in range(0, rows.shape[0], tile):
                x_tile = rows[start:start + tile]
                (e, g), xa_gate_up = _project(x_tile, gate_up)
                h = _hidden_tile(e, g, slice(None), activation)
                xa_down = _lora_product(h, down)
                dh, da_down, db_down = _project_backward(
                    [grad_rows[start:start + tile]], lambda h=h: h, xa_down, down,
                    True, want_a[2:], want_b[2:],
                )
                del h
                glu_backward_into(e, dh, dh, e, g, activation)  # de over e, dg over dh
                dx_tile, da_gate_up, db_gate_up = _project_backward(
                    [e, dh], lambda x_tile=x_tile: x_tile, xa_gate_up, gate_up,
                    want[0], want_a[:2], want_b[:2],
                )
                del e, g, dh
                if dx is not None:
                    dx[start:start + tile] = dx_tile
                da = [_accumulate(t, new) for t, new in zip(da, da_gate_up + da_down, strict=True)]
                db = [_accumulate(t, new) for t, new in zip(db, db_gate_up + db_down, strict=True)]
        dx = None if dx is None else dx.view(x_shape).to(x_dtype)
        return dx, None, *_adapter_grads(da, db)


def _mlp_tile(rows: torch.Tensor, gate_up: _Group, down: _Group, activation: str) -> torch.Tensor:
    """``down(act(gate(rows)) * up(rows))`` for one tile, nothing kept."""
    (e, g), _ = _project(rows, gate_up)
    glu_forward_into(e, e, g, activation)
    del g
    return _project(e, down)[0][0]


def _accumulate(total: torch.Tensor | None, part: torch.Tensor | None) -> torch.Tensor | None:
    if part is None:
        return total
    return part if total is None else total.add_(part)


# --------------------------------------------------------------------------------------------
# Public ops
# --------------------------------------------------------------------------------------------
@public_eager_op
def lora_linear(x: torch.Tensor, *projections: LoraWeights) -> tuple[torch.Tensor, ...]:
    """``y_i = x @ W_i.T + scale_i * (x @ a_i.T) @ b_i.T`` for each projection, one autograd node.

    x: (..., in), any layout, float32/bf16/fp16. projections: ``LoraWeights`` with frozen base
    weights (plain or bitsandbytes 4-bit) of shape (out_i, in); a projection without LoRA has
    ``a = b = None``. Returns one (..., out_i) tensor per projection, in the compute dtype (see the
    module docstring). Gradients flow to x and to every a and b that requires grad. Runs the fused
    matmul path on any device.
    """
    _check("lora_linear", x, projections, _projection_names(len(projections)))
    spec = (tuple(projections), matmul_dtype(x), _base_dtypes(x, projections))
    return _LoraLinear.apply(x, spec, *_adapter_args(projections))


@public_eager_op
def lora_glu_mlp(
    x: torch.Tensor,
    gate: LoraWeights,
    up: LoraWeights,
    down: LoraWeights,
    activation: str,
    *,
    tile_rows: int | None = None,
) -> torch.Tensor:
    """``down(act(gate(x)) * up(x))``, the gated MLP with LoRA on any of its projections.

    activation: "silu" (SwiGLU), "gelu_tanh" or "gelu" (GeGLU, Gemma). gate and up: (I, H)
    projections of x (..., H); down: (H_out, I). Returns (..., H_out) in the compute dtype. Triton
    glu kernels on CUDA (or under the interpreter); plain CPU tensors take
    :func:`lora_glu_mlp_reference`.

    tile_rows: with more rows than this, run the MLP tile by tile and save only x, recomputing each
    tile's gate and up outputs in backward (long contexts: the (rows, intermediate) activations
    never exist in full; costs a second gate/up matmul pair). None: one pass, e and g saved.
    """
    _check_mlp("lora_glu_mlp", x, gate, up, down, activation)
    if tile_rows is not None and (type(tile_rows) is not int or tile_rows < 1):
        raise ValueError(f"fusetune.lora_glu_mlp: tile_rows={tile_rows!r}; use a positive int or None.")
    if not use_triton(x):
        return lora_glu_mlp_reference(x, gate, up, down, activation)
    projections, adapters = (gate, up, down), _adapter_args((gate, up, down))
    dtypes = matmul_dtype(x), _base_dtypes(x, projections)
    records = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *adapters))
    # Skipped only where a graph is built: a node for the caller's check, and values nobody reads.
    unread = _UNREAD.nodes is not None and records
    if tile_rows is not None and x.shape[:-1].numel() > tile_rows:
        out = _TiledLoraGluMLP.apply(x, (projections, activation, dtypes, tile_rows, unread), *adapters)
    else:
        out = _LoraGluMLP.apply(x, (projections, activation, dtypes, unread, records), *adapters)
    if unread:
        _UNREAD.nodes.append(out.grad_fn)
    return out
