"""Gated linear units of the MLP block: ``swiglu(gate, up) = silu(gate) * up`` and
``geglu(gate, up, approximate) = gelu(gate, approximate) * up``.

One elementwise kernel pair serves both; the activation is a constexpr (``ACTIVATIONS``: silu,
gelu_tanh, gelu). Work is split into flat 1-D blocks with int64 offsets. Inputs whose rows are
strided (e.g. ``gate, up = gate_up.chunk(2, dim=-1)``) are read in place: the kernel maps a flat
index to (row, col) and uses each input's row stride. The forward saves only gate and up; the
backward recomputes the activation and its derivative from gate. All maths is float32, each
output is rounded once to the input dtype. ``glu_forward_into`` / ``glu_backward_into`` launch
the same kernels into caller-owned buffers (the fused LoRA MLP recomputes its activations with
them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from fusetune.ops._direct_launch import direct_launch
from fusetune.ops._graph_ops import graph_op
from fusetune.ops._launch import as_rows, cdiv, check_float, check_same_device, public_op, triton, use_triton

if triton is not None:
    import triton.language as tl

# Activation name (the keys of fusetune.nn.glu.GLU_OPS) -> the kernels' ACTIVATION constexpr.
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1, "gelu": 2}
# geglu's ``approximate`` argument -> activation name.
_GELU_APPROXIMATIONS = {"tanh": "gelu_tanh", "none": "gelu"}

# Elements a program takes and its warps, by activation. bench/tune_rows.py --glu on an H200
# (rows-tuning-h200-glu.jsonl, kernel time, blocks of 1,024-8,192 x 4/8/16 warps): SiLU was fastest
# at 1,024 x 4, 0.6-0.8% faster than 4,096 x 8 at all three shapes; the tanh GELU at 4,096 x 8,
# and 2.4-2.7% slower at 1,024 x 4. (The exact GELU, not swept, takes the tanh one's.)
_LAUNCH = {"silu": (1024, 4), "gelu_tanh": (4096, 8), "gelu": (4096, 8)}


def _check(gate: torch.Tensor, up: torch.Tensor, op: str) -> None:
    check_same_device("gate", gate, up=up)
    if gate.shape != up.shape:
        raise ValueError(
            f"fusetune.{op}: gate and up must have the same shape, got {tuple(gate.shape)} and "
            f"{tuple(up.shape)}."
        )
    if gate.dtype != up.dtype:
        raise TypeError(
            f"fusetune.{op}: gate and up must have the same dtype, got {gate.dtype} and {up.dtype}."
        )


def _gelu_activation(approximate: str) -> str:
    if approximate not in _GELU_APPROXIMATIONS:
        raise ValueError(
            f"fusetune.geglu: approximate must be 'tanh' or 'none', got {approximate!r}."
        )
    return _GELU_APPROXIMATIONS[approximate]


# --------------------------------------------------------------------------------------------
# PyTorch references
# --------------------------------------------------------------------------------------------
def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in float32, returned in the input dtype."""
    _check(gate, up, "swiglu")
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


def geglu_reference(gate: torch.Tensor, up: torch.Tensor,
                    approximate: str = "tanh") -> torch.Tensor:
    """gelu(gate, approximate) * up in float32, returned in the input dtype."""
    _check(gate, up, "geglu")
    _gelu_activation(approximate)
    return (F.gelu(gate.float(), approximate=approximate) * up.float()).to(gate.dtype)


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _tanh(y):
        # exp-based, overflow-free for any y (tl.math.tanh differs across Triton versions).
        e = tl.exp(-2.0 * tl.abs(y))
        t = (1.0 - e) / (1.0 + e)
        return tl.where(y >= 0, t, -t)

    @triton.jit
    def _activation(x, ACTIVATION: tl.constexpr):
        """act(x) for float32 x."""
        if ACTIVATION == 0:  # SiLU
            a = x * tl.sigmoid(x)
        elif ACTIVATION == 1:  # GELU, tanh approximation
            inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
            a = 0.5 * x * (1.0 + _tanh(inner))
        else:  # GELU, exact
            a = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
        return a

    @triton.jit
    def _activation_and_grad(x, ACTIVATION: tl.constexpr):
        """(act(x), act'(x)) for float32 x."""
        if ACTIVATION == 0:  # SiLU: s = sigmoid(x); d = s * (1 + x * (1 - s))
            sig = tl.sigmoid(x)
            a = x * sig
            d = sig * (1.0 + x * (1.0 - sig))
        elif ACTIVATION == 1:  # GELU tanh: 0.5x(1+t), t = tanh(c(x + 0.044715x^3))
            x2 = x * x
            t = _tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x2))
            a = 0.5 * x * (1.0 + t)
            d = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * (
                0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x2)
            )
        else:  # GELU exact: Phi(x) + x * phi(x)
            cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
            a = x * cdf
            d = cdf + x * (0.3989422804014327 * tl.exp(-0.5 * x * x))
        return a, d

    @triton.jit
    def _offsets(offs, n_cols, row_stride, STRIDED: tl.constexpr):
        """Memory offsets of flat indices ``offs`` in a (rows, n_cols) tensor with a row stride."""
        if STRIDED:
            row = offs // n_cols
            result = row * row_stride + (offs - row * n_cols)
        else:
            result = offs
        return result

    @direct_launch
    @triton.jit
    def _glu_forward_kernel(gate_ptr, up_ptr, out_ptr, n_elements, n_cols, gate_rs, up_rs,
                            ACTIVATION: tl.constexpr, STRIDED: tl.constexpr,
                            BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < n_elements
        g_offs = _offsets(offs, n_cols, gate_rs, STRIDED)
        u_offs = _offsets(offs, n_cols, up_rs, STRIDED)
        gate = tl.load(gate_ptr + g_offs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(up_ptr + u_offs, mask=mask, other=0.0).to(tl.float32)
        out = _activation(gate, ACTIVATION) * up
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)

    @direct_launch
    @triton.jit
    def _glu_backward_kernel(grad_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr,
                             n_elements, n_cols, grad_rs, gate_rs, up_rs, dgate_rs, dup_rs,
                             ACTIVATION: tl.constexpr, STRIDED: tl.constexpr,
                             BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < n_elements
        grad = tl.load(grad_ptr + _offsets(offs, n_cols, grad_rs, STRIDED), mask=mask,
                       other=0.0).to(tl.float32)
        gate = tl.load(gate_ptr + _offsets(offs, n_cols, gate_rs, STRIDED), mask=mask,
                       other=0.0).to(tl.float32)
        up = tl.load(up_ptr + _offsets(offs, n_cols, up_rs, STRIDED), mask=mask,
                     other=0.0).to(tl.float32)
        act, dact = _activation_and_grad(gate, ACTIVATION)
        tl.store(dgate_ptr + _offsets(offs, n_cols, dgate_rs, STRIDED),
                 (grad * up * dact).to(dgate_ptr.dtype.element_ty), mask=mask)
        tl.store(dup_ptr + _offsets(offs, n_cols, dup_rs, STRIDED),
                 (grad * act).to(dup_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return as_rows(x.reshape(1) if x.dim() == 0 else x)


def _strided(*rows: torch.Tensor) -> bool:
    return not all(r.is_contiguous() for r in rows)


def glu_forward_into(out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str) -> None:
    """Launch the forward kernel: ``out = act(gate) * up``, written into the given buffer.

    gate, up: 2-D rows of one shape and dtype, unit column stride, any row stride (``as_rows``);
    out: contiguous with the same number of elements, any float dtype. activation: a key of
    ``ACTIVATIONS``. For callers that manage their own buffers (the fused LoRA MLP).
    """
    n = gate.numel()
    if n:
        block, warps = _LAUNCH[activation]
        _glu_forward_kernel[(cdiv(n, block),)](
            gate, up, out, n, gate.shape[1], gate.stride(0), up.stride(0),
            ACTIVATION=ACTIVATIONS[activation], STRIDED=_strided(gate, up),
            BLOCK=block, num_warps=warps,
        )


def glu_backward_into(
    dgate: torch.Tensor,
    dup: torch.Tensor,
    grad: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    activation: str,
) -> None:
    """Launch the backward kernel: ``dgate = grad * up * act'(gate)``, ``dup = grad * act(gate)``.

    grad, gate, up, dgate, dup: 2-D rows of one shape as in :func:`glu_forward_into` (unit column
    stride, any row stride). Each output may be one of the inputs (``grad``, ``gate`` or ``up``):
    each element is read before it is written, by the same program, so the gradients can
    overwrite the incoming gradient or the saved activations in place (the fused LoRA MLP writes
    them over column slices of its saved gate and up outputs).
    """
    n = gate.numel()
    if n:
        block, warps = _LAUNCH[activation]
        _glu_backward_kernel[(cdiv(n, block),)](
            grad, gate, up, dgate, dup, n, gate.shape[1],
            grad.stride(0), gate.stride(0), up.stride(0), dgate.stride(0), dup.stride(0),
            ACTIVATION=ACTIVATIONS[activation], STRIDED=_strided(grad, gate, up, dgate, dup),
            BLOCK=block, num_warps=warps,
        )


def _rows_like(gate: torch.Tensor) -> torch.Tensor:
    """A new contiguous tensor of ``gate``'s shape and dtype (the launches' outputs)."""
    return torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)


@graph_op("glu_forward", fake=lambda gate, up, activation: _rows_like(gate))
def _glu_forward(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """``act(gate) * up`` over 2-D rows (as :func:`glu_forward_into`), into a new contiguous tensor."""
    out = _rows_like(gate)
    glu_forward_into(out, gate, up, activation)
    return out


@graph_op("glu_backward", fake=lambda grad, gate, up, activation: [_rows_like(gate), _rows_like(gate)])
def _glu_backward(
    grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str
) -> list[torch.Tensor]:
    """``[dgate, dup]`` over 2-D rows (as :func:`glu_backward_into`), into new contiguous tensors."""
    dgate, dup = _rows_like(gate), _rows_like(gate)
    glu_backward_into(dgate, dup, grad, gate, up, activation)
    return [dgate, dup]


class _GLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, activation):
        gate_rows, up_rows = _rows(gate), _rows(up)
        ctx.save_for_backward(gate_rows, up_rows)
        ctx.activation = activation
        ctx.shape = gate.shape
        return _glu_forward(gate_rows, up_rows, activation).view(gate.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        gate_rows, up_rows = ctx.saved_tensors
        dgate, dup = _glu_backward(_rows(grad_out), gate_rows, up_rows, ctx.activation)
        return (
            dgate.view(ctx.shape) if ctx.needs_input_grad[0] else None,
            dup.view(ctx.shape) if ctx.needs_input_grad[1] else None,
            None,
        )


@public_op
def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (the Llama/Mistral/Qwen MLP), fused forward and backward.

    gate and up: the same shape and dtype (bf16/fp16/fp32), any strides. Returns the input dtype,
    computed in float32. Triton on CUDA (or under the interpreter), the reference otherwise.
    """
    _check(gate, up, "swiglu")
    check_float("gate", gate)
    if not use_triton(gate, up):
        return swiglu_reference(gate, up)
    return _GLU.apply(gate, up, "silu")


@public_op
def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """``gelu(gate, approximate) * up`` (the Gemma MLP), fused forward and backward.

    approximate: "tanh" (gelu_pytorch_tanh, Gemma's default) or "none" (exact erf GELU); anything
    else raises ValueError. Otherwise as :func:`swiglu`.
    """
    _check(gate, up, "geglu")
    activation = _gelu_activation(approximate)
    check_float("gate", gate)
    if not use_triton(gate, up):
        return geglu_reference(gate, up, approximate)
    return _GLU.apply(gate, up, activation)
