"""``x @ W.T`` over a 4-bit NF4 weight as one custom op, so that torch.compile keeps it in its graph.

A QLoRA model's traced code (``fusetune/patch/lora.py``, ``FusedLoraMLP._traced_forward``) runs its
projections as plain torch ops. A 4-bit base weight there would be dequantised by
``nf4.dequantize_nf4``, an eager op, one graph break at every projection; and a dense weight that
feeds a traced matmul is what autograd saves for the backward, every layer's base weights kept in
the compute dtype at once (13 GiB of bf16 at Llama-3 8B's size), the memory QLoRA exists to save.

``nf4_linear(x, weight)`` is instead the custom op ``fusetune::nf4_linear``: its forward dequantises
the weight, multiplies and drops the dense copy; its backward, the custom op
``fusetune::nf4_linear_grad_input``, dequantises it again for ``dY @ W`` (the weight is frozen: no
weight gradient). So the graph keeps only the packed bytes and the scales, as the fused LoRA paths
and bitsandbytes' own ``matmul_4bit`` do. The custom ops take the quantisation state as tensors and
ints (a custom op takes no Python objects); the dequantisation is ``nf4.dequantize_nf4`` (the Triton
kernel on a GPU, the reference on a plain CPU), bit for bit bitsandbytes'.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fusetune.ops._graph_ops import NAMESPACE
from fusetune.ops._launch import check_float, check_same_device, matmul_dtype, on_input_device, public_op
from fusetune.ops.nf4 import dequantize_nf4, is_4bit


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


def _weight_op(name: str, product: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], out_dim: int):
    """The custom op ``fusetune::<name>(t, <the weight's state>) -> product(t, W)``, W the dense
    weight in ``t``'s dtype, made inside the op and dropped with it; its fake output is ``t`` with
    its last dim made ``shape[out_dim]``."""

    def run(
        t: torch.Tensor,
        packed: torch.Tensor,
        absmax: torch.Tensor,
        code2: torch.Tensor | None,
        absmax2: torch.Tensor | None,
        offset: torch.Tensor | None,
        shape: list[int],
        blocksize: int,
        blocksize2: int,
    ) -> torch.Tensor:
        state2 = None if code2 is None else _Codes(code2, absmax2, blocksize2)
        state = _State(tuple(shape), blocksize, absmax, state2 is not None, state2, offset)
        with torch.autocast(t.device.type, enabled=False):  # t's dtype, as the fake output says
            return product(t, dequantize_nf4(packed, state, t.dtype))

    op = torch.library.custom_op(f"{NAMESPACE}::{name}", on_input_device(run), mutates_args=())
    op.register_fake(lambda t, *state: t.new_empty((*t.shape[:-1], state[5][out_dim])))
    return op


_nf4_linear = _weight_op("nf4_linear", F.linear, out_dim=0)
_nf4_grad_input = _weight_op("nf4_linear_grad_input", torch.matmul, out_dim=1)


def _setup_context(ctx, inputs, output) -> None:
    _, *state = inputs
    ctx.state = state[5:]  # shape, blocksize, blocksize2
    ctx.save_for_backward(*state[:5])


def _backward(ctx, grad):
    grad_input = _nf4_grad_input(grad.contiguous(), *ctx.saved_tensors, *ctx.state)
    return grad_input, None, None, None, None, None, None, None, None


_nf4_linear.register_autograd(_backward, setup_context=_setup_context)


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if not is_4bit(weight) or weight.quant_state.quant_type != "nf4":
        raise TypeError(
            "fusetune.nf4_linear: weight is not a bitsandbytes NF4 weight (a Params4bit, or its packed "
            "bytes carrying its quant_state); for a plain weight use torch.nn.functional.linear."
        )
    check_float("x", x)
    check_same_device("x", x, weight=weight)
    in_features = int(weight.quant_state.shape[-1])
    if x.shape[-1] != in_features:
        raise ValueError(
            f"fusetune.nf4_linear: x's last dim is {x.shape[-1]} but the weight "
            f"{tuple(weight.quant_state.shape)} takes {in_features} input features."
        )


@public_op
def nf4_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` in ``x``'s dtype, or in autocast's where autocast is on for x's device (as
    ``F.linear`` and bitsandbytes' ``matmul_4bit`` would), W a bitsandbytes NF4 weight (a
    ``Params4bit``, or a tensor of its packed bytes carrying its ``quant_state``), frozen; ``x``'s
    gradient only. The dense weight exists only inside the op's forward and backward (see the
    module docstring)."""
    _check(x, weight)
    x = x.to(matmul_dtype(x))
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
