"""``x @ W.T`` over a 4-bit NF4 weight as one custom op, so that torch.compile keeps it in its graph.

A QLoRA model's traced code (``fusetune/patch/lora.py``, ``FusedLoraMLP._traced_forward``) runs its
projections as plain torch ops. A 4-bit base weight there would be dequantised by
``nf4.dequantize_nf4``, an eager op, one graph break at every projection; and a dense weight that
feeds a traced matmul is what autograd saves for the backward, every layer's base weights kept in
the compute dtype at once (13 GiB of bf16 at Llama-3 8B's size), the memory QLoRA exists to save.

``nf4_linear(x, weight, bias)`` is instead the custom op ``fusetune::nf4_linear``: its forward dequantises
the weight, multiplies and drops the dense copy; its backward, the custom op
``fusetune::nf4_linear_grad_input``, dequantises it again for ``dY @ W`` (the weight is frozen: no
weight gradient). So the graph keeps only the packed bytes and the scales, as the fused LoRA paths
and bitsandbytes' own ``matmul_4bit`` do. The custom ops take the quantisation state as tensors,
ints and the dtype the weight was quantised from (a custom op takes no Python objects); the
dequantisation is ``nf4.dequantize_nf4`` (the Triton kernel on a GPU, the reference on a plain
CPU), bit for bit bitsandbytes'. As in ``matmul_4bit``, forward decodes straight into x's dtype and
backward into the quantised weight's dtype, cast to the gradient's (``nf4.dense_weight``'s
``backward``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fusetune.ops._graph_ops import NAMESPACE
from fusetune.ops._launch import check_float, check_same_device, matmul_dtype, on_input_device, public_op
from fusetune.ops.nf4 import decode_dtype, dequantize_nf4, is_4bit


@dataclass
class _Codes:
    """The second level of a double-quantised state (``quant_state.state2``): the absmax codes'
    code book, their scales and their blocksize."""

    code: torch.Tensor
    absmax: torch.Tensor
    blocksize: int


@dataclass
class _State:
    """The fields of a bitsandbytes NF4 ``QuantState`` that ``dequantize_nf4`` reads, rebuilt from
    the custom ops' arguments."""

    shape: tuple[int, ...]
    blocksize: int
    absmax: torch.Tensor
    nested: bool
    state2: _Codes | None
    offset: torch.Tensor | None
    quant_type: str = "nf4"


def _dense(state: tuple, dtype: torch.dtype, via: torch.dtype | None = None) -> torch.Tensor:
    """The weight that the custom ops' state arguments describe (packed, absmax, code2, absmax2,
    offset, shape, blocksize, blocksize2), dense in ``dtype``, its values rounded to ``via`` on the
    way (``nf4.decode_dtype``)."""
    packed, absmax, code2, absmax2, offset, shape, blocksize, blocksize2 = state
    state2 = None if code2 is None else _Codes(code2, absmax2, blocksize2)
    quant_state = _State(tuple(shape), blocksize, absmax, state2 is not None, state2, offset)
    return dequantize_nf4(packed, quant_state, decode_dtype(via, dtype)).to(dtype)


def _linear(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code2: torch.Tensor | None,
    absmax2: torch.Tensor | None,
    offset: torch.Tensor | None,
    shape: list[int],
    blocksize: int,
    blocksize2: int,
    weight_dtype: torch.dtype,
) -> torch.Tensor:
    """``fusetune::nf4_linear``: ``x @ W.T + bias`` in x's dtype (one rounding, the bias in the
    matmul), W decoded straight into it as bitsandbytes' forward decodes it; ``weight_dtype``, the
    dtype W was quantised from, is for the backward."""
    state = (packed, absmax, code2, absmax2, offset, shape, blocksize, blocksize2)
    with torch.autocast(x.device.type, enabled=False):  # x's dtype, as the fake output says
        return F.linear(x, _dense(state, x.dtype), bias)


def _grad_input(
    grad: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code2: torch.Tensor | None,
    absmax2: torch.Tensor | None,
    offset: torch.Tensor | None,
    shape: list[int],
    blocksize: int,
    blocksize2: int,
    weight_dtype: torch.dtype,
) -> torch.Tensor:
    """``fusetune::nf4_linear_grad_input``: ``grad @ W`` in grad's dtype, W's values rounded to
    ``weight_dtype`` on the way, as bitsandbytes' backward decodes them."""
    state = (packed, absmax, code2, absmax2, offset, shape, blocksize, blocksize2)
    with torch.autocast(grad.device.type, enabled=False):
        return torch.matmul(grad, _dense(state, grad.dtype, weight_dtype))


# The dense weight is made inside each op and dropped with it; the fake outputs are the input with
# its last dim made shape[0] (forward) or shape[1] (backward).
_nf4_linear = torch.library.custom_op(f"{NAMESPACE}::nf4_linear", on_input_device(_linear), mutates_args=())
_nf4_linear.register_fake(lambda x, bias, *state: x.new_empty((*x.shape[:-1], state[5][0])))
_nf4_grad_input = torch.library.custom_op(
    f"{NAMESPACE}::nf4_linear_grad_input", on_input_device(_grad_input), mutates_args=()
)
_nf4_grad_input.register_fake(lambda grad, *state: grad.new_empty((*grad.shape[:-1], state[5][1])))


def _setup_context(ctx, inputs, output) -> None:
    _, _, *state = inputs
    ctx.state = state[5:]  # shape, blocksize, blocksize2, weight_dtype
    ctx.save_for_backward(*state[:5])


def _backward(ctx, grad):
    grad_input = _nf4_grad_input(grad.contiguous(), *ctx.saved_tensors, *ctx.state)
    return grad_input, None, None, None, None, None, None, None, None, None, None


_nf4_linear.register_autograd(_backward, setup_context=_setup_context)


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if not is_4bit(weight) or weight.quant_state.quant_type != "nf4":
        raise TypeError(
            "fusetune.nf4_linear: weight is not a bitsandbytes NF4 weight (a Params4bit, or its packed "
            "bytes carrying its quant_state); for a plain weight use torch.nn.functional.linear."
        )
    check_float("x", x)
    check_same_device("x", x, weight=weight, bias=bias)
    out_features, in_features = (int(size) for size in weight.quant_state.shape)
    if x.shape[-1] != in_features:
        raise ValueError(
            f"fusetune.nf4_linear: x's last dim is {x.shape[-1]} but the weight "
            f"{tuple(weight.quant_state.shape)} takes {in_features} input features."
        )
    if bias is None:
        return
    check_float("bias", bias)
    if bias.shape != (out_features,) or bias.requires_grad:
        raise ValueError(
            f"fusetune.nf4_linear: the bias must be a frozen ({out_features},) tensor for the weight "
            f"{tuple(weight.quant_state.shape)}; got {tuple(bias.shape)}, requires_grad={bias.requires_grad}."
        )


@public_op
def nf4_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` in ``x``'s dtype, or in autocast's where autocast is on for x's device
    (as ``F.linear`` and bitsandbytes' ``matmul_4bit`` would), W a bitsandbytes NF4 weight (a
    ``Params4bit``, or a tensor of its packed bytes carrying its ``quant_state``), frozen, and the
    optional ``bias`` (out,) frozen too, added in the matmul as ``matmul_4bit`` adds it; ``x``'s
    gradient only, with W decoded as ``matmul_4bit``'s backward decodes it. The dense weight exists
    only inside the op's forward and backward (see the module docstring)."""
    _check(x, weight, bias)
    dtype = matmul_dtype(x)
    state = weight.quant_state
    nested = bool(state.nested)
    return _nf4_linear(
        x.to(dtype),
        None if bias is None else bias.to(dtype),
        weight,
        state.absmax,
        state.state2.code if nested else None,
        state.state2.absmax if nested else None,
        state.offset if nested else None,
        [int(size) for size in state.shape],
        int(state.blocksize),
        int(state.state2.blocksize) if nested else 0,
        state.dtype,
    )
