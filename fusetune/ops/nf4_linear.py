"""``x @ W.T`` over a 4-bit NF4 weight as one custom op, so that torch.compile keeps it in its graph.

A QLoRA model's traced code (``fusetune/patch/lora.py``, ``FusedLoraMLP._traced_forward``) runs its
projections as plain torch ops. A 4-bit base weight there would be dequantised by
``nf4.dequantize_nf4``, an eager op, one graph break at every projection; and a dense weight that
feeds a traced matmul is what autograd saves for the backward, every layer's base weights kept in
the compute dtype at once (16 GiB of bf16 at Llama-3 8B's size), the memory QLoRA exists to save.

``nf4_linear(x, weight)`` is instead the custom op ``fusetune::nf4_linear``: its forward dequantises
the weight, multiplies and drops the dense copy; its backward, the custom op
``fusetune::nf4_linear_grad_input``, dequantises it again for ``dY @ W`` (the weight is frozen: no
weight gradient). So the graph keeps only the packed bytes and the scales, as the fused LoRA paths
and bitsandbytes' own ``matmul_4bit`` do. The custom ops take the quantisation state as tensors and
ints (a custom op takes no Python objects); the dequantisation is ``nf4.dequantize_nf4`` (the Triton
kernel on a GPU, the reference on a plain CPU), bit for bit bitsandbytes'.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fusetune.ops._graph_ops import NAMESPACE
from fusetune.ops._launch import on_input_device
from fusetune.ops.nf4 import dequantize_nf4


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


def _dense(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code2: torch.Tensor | None,
    absmax2: torch.Tensor | None,
    offset: torch.Tensor | None,
    shape: list[int],
    blocksize: int,
    blocksize2: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The weight as a dense (out, in) matrix of ``dtype``."""
    nested = code2 is not None
    state2 = _Codes(code2, absmax2, blocksize2) if nested else None
    return dequantize_nf4(packed, _State(tuple(shape), blocksize, absmax, nested, state2, offset), dtype)


def _forward(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code2: torch.Tensor | None,
    absmax2: torch.Tensor | None,
    offset: torch.Tensor | None,
    shape: list[int],
    blocksize: int,
    blocksize2: int,
) -> torch.Tensor:
    return F.linear(x, _dense(packed, absmax, code2, absmax2, offset, shape, blocksize, blocksize2, x.dtype))


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
) -> torch.Tensor:
    weight = _dense(packed, absmax, code2, absmax2, offset, shape, blocksize, blocksize2, grad.dtype)
    return grad @ weight


_nf4_linear = torch.library.custom_op(f"{NAMESPACE}::nf4_linear", on_input_device(_forward), mutates_args=())
_nf4_grad_input = torch.library.custom_op(
    f"{NAMESPACE}::nf4_linear_grad_input", on_input_device(_grad_input), mutates_args=()
)


@_nf4_linear.register_fake
def _(x, packed, absmax, code2, absmax2, offset, shape, blocksize, blocksize2):
    return x.new_empty((*x.shape[:-1], shape[0]))


@_nf4_grad_input.register_fake
def _(grad, packed, absmax, code2, absmax2, offset, shape, blocksize, blocksize2):
    return grad.new_empty((*grad.shape[:-1], shape[1]))


def _setup_context(ctx, inputs, output) -> None:
    _, *state = inputs
    ctx.state = state[5:]  # shape, blocksize, blocksize2
    ctx.save_for_backward(*state[:5])


def _backward(ctx, grad):
    grad_input = _nf4_grad_input(grad.contiguous(), *ctx.saved_tensors, *ctx.state)
    return grad_input, None, None, None, None, None, None, None, None


_nf4_linear.register_autograd(_backward, setup_context=_setup_context)


def nf4_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` in ``x``'s dtype, W a bitsandbytes NF4 weight (a ``Params4bit``, or a tensor of its
    packed bytes carrying its ``quant_state``), frozen; ``x``'s gradient only. The dense weight
    exists only inside the op's forward and backward (see the module docstring)."""
    state = weight.quant_state
    nested = bool(state.nested)
    return _nf4_linear(
        x,
        weight,
        state.absmax,
        state.state2.code if nested else None,
        state.state2.absmax if nested else None,
        state.offset if nested else None,
        [int(size) for size in state.shape],
        int(state.blocksize),
        int(state.state2.blocksize) if nested else 0,
    )
