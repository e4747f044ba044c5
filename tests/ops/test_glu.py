"""swiglu / geglu: forward and gate/up gradients vs the reference (same dtype) and float64 torch."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from fusetune.nn.glu import GLU_OPS
from fusetune.ops import glu as glu_module
from fusetune.ops._launch import use_triton
from fusetune.ops.glu import (
    ACTIVATIONS,
    geglu,
    geglu_reference,
    glu_backward_into,
    glu_forward_into,
    swiglu,
    swiglu_reference,
)
from tests.ops import checks

# name -> (fused op, reference, float64 maths from torch.nn.functional)
OPS = {
    "swiglu": (swiglu, swiglu_reference, lambda g, u: F.silu(g) * u),
    "geglu_tanh": (
        lambda g, u: geglu(g, u, "tanh"),
        lambda g, u: geglu_reference(g, u, "tanh"),
        lambda g, u: F.gelu(g, approximate="tanh") * u,
    ),
    "geglu_none": (
        lambda g, u: geglu(g, u, approximate="none"),
        lambda g, u: geglu_reference(g, u, approximate="none"),
        lambda g, u: F.gelu(g) * u,
    ),
}

# shape, layout: odd sizes, one larger than a kernel block (several programs, masked tail),
# row-strided halves of a fused gate_up projection, and a transposed layout.
SHAPES = {
    "odd_3d": ((2, 7, 13), "contiguous"),
    "multi_block": ((3, 1531), "contiguous"),
    "gate_up_chunk": ((2, 5, 37), "chunk"),
    "transposed": ((11, 6, 3), "transposed"),
    "one_dim": ((1000,), "contiguous"),
}


def make_inputs(shape, layout, dtype, seed):
    gen = torch.Generator().manual_seed(seed)

    def randn(*s, scale=1.0):
        return (torch.randn(*s, generator=gen) * scale).to(checks.DEVICE, dtype)

    if layout == "chunk":  # gate, up = gate_up_proj(x).chunk(2, dim=-1)
        gate_up = torch.cat((randn(*shape, scale=3.0), randn(*shape)), dim=-1)
        gate, up = gate_up.chunk(2, dim=-1)
    else:
        gate, up = randn(*shape, scale=3.0), randn(*shape)
        if layout == "transposed":
            gate, up = checks.transposed_layout(gate), checks.transposed_layout(up)
    if layout != "contiguous":
        assert not gate.is_contiguous() and not up.is_contiguous()
    grad = randn(*shape)
    if layout == "transposed":
        grad = checks.non_contiguous(grad)
    return gate, up, grad


def run(fn, gate, up, grad, cast=None):
    cast = cast or (lambda t: t)
    gate = cast(gate.detach()).requires_grad_()
    up = cast(up.detach()).requires_grad_()
    out = fn(gate, up)
    (out * cast(grad)).sum().backward()
    return out.detach(), gate.grad, up.grad


@pytest.mark.parametrize("dtype", checks.DTYPES, ids=str)
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("op_name", list(OPS))
def test_forward_and_grads(op_name, shape_name, dtype):
    fused, reference, maths = OPS[op_name]
    shape, layout = SHAPES[shape_name]
    seed = 100 * list(OPS).index(op_name) + list(SHAPES).index(shape_name)
    gate, up, grad = make_inputs(shape, layout, dtype, seed)

    out = run(fused, gate, up, grad)
    assert out[0].shape == gate.shape
    assert all(t.dtype == dtype for t in out)
    ref = run(reference, gate, up, grad)
    exact = run(maths, gate, up, grad, cast=torch.Tensor.double)
    for name, o, r, e in zip(("out", "dgate", "dup"), out, ref, exact, strict=True):
        checks.assert_matches_reference(o, r, dtype, f"{op_name} {name}")
        checks.assert_close_to_float64(o, e, dtype, f"{op_name} {name}")


@pytest.mark.parametrize("op_name", list(OPS))
def test_large_magnitudes(op_name):
    """Saturated activations (|gate| up to 60) stay finite and exact in both directions."""
    fused, _, maths = OPS[op_name]
    gen = torch.Generator().manual_seed(1)
    gate = (torch.linspace(-60, 60, 241) + 0.1 * torch.rand(241, generator=gen)).to(checks.DEVICE)
    up = torch.randn(241, generator=gen).to(checks.DEVICE)
    grad = torch.randn(241, generator=gen).to(checks.DEVICE)
    out = run(fused, gate, up, grad)
    exact = run(maths, gate, up, grad, cast=torch.Tensor.double)
    for name, o, e in zip(("out", "dgate", "dup"), out, exact, strict=True):
        checks.assert_close_to_float64(o, e, torch.float32, f"{op_name} {name}")


def test_grad_of_gate_only():
    gen = torch.Generator().manual_seed(2)
    gate = torch.randn(4, 9, generator=gen).to(checks.DEVICE).requires_grad_()
    up = torch.randn(4, 9, generator=gen).to(checks.DEVICE)
    swiglu(gate, up).sum().backward()
    g64 = gate.detach().double().requires_grad_()
    (F.silu(g64) * up.double()).sum().backward()
    assert up.grad is None
    checks.assert_close_to_float64(gate.grad, g64.grad, torch.float32, "dgate")


def test_dispatch():
    gate = torch.randn(3, 5, device=checks.DEVICE, requires_grad=True)
    up = torch.randn(3, 5, device=checks.DEVICE)
    if not use_triton(up):
        pytest.skip("plain CPU tensors without the interpreter use the reference")
    assert type(swiglu(gate, up).grad_fn).__name__ == "_GLUBackward"
    assert type(geglu(gate, up).grad_fn).__name__ == "_GLUBackward"


def test_empty():
    gate = torch.randn(0, 8, device=checks.DEVICE)
    assert swiglu(gate, gate.clone()).shape == (0, 8)


def test_activation_names_match_the_module():
    assert set(ACTIVATIONS) == set(GLU_OPS)


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_launchers_into_buffers(activation):
    """glu_forward_into / glu_backward_into on row-strided halves of a gate_up output, with dup
    written over the incoming gradient in place, vs float64 maths."""
    if not use_triton(torch.empty(0, device=checks.DEVICE)):
        pytest.skip("the launchers run the Triton kernels")
    maths = {"silu": F.silu, "gelu_tanh": partial(F.gelu, approximate="tanh"), "gelu": F.gelu}
    gen = torch.Generator().manual_seed(3)
    gate, up = (torch.randn(7, 186, generator=gen) * 3).to(checks.DEVICE).chunk(2, dim=-1)
    grad = torch.randn(7, 93, generator=gen).to(checks.DEVICE)
    exact = run(lambda g, u: maths[activation](g) * u, gate, up, grad, cast=torch.Tensor.double)

    out = torch.empty(7, 93, device=checks.DEVICE)
    glu_forward_into(out, gate, up, activation)
    dgate, dup = torch.empty_like(out), grad.clone()
    glu_backward_into(dgate, dup, dup, gate, up, activation)
    for name, o, e in zip(("out", "dgate", "dup"), (out, dgate, dup), exact, strict=True):
        checks.assert_close_to_float64(o, e, torch.float32, f"{activation} {name}")


def test_backward_into_column_slices_in_place():
    """The fused LoRA MLP writes dgate and dup over a column slice of its saved gate and up: the
    slice gets the gradients (vs float64 maths), everything outside it stays as it was."""
    if not use_triton(torch.empty(0, device=checks.DEVICE)):
        pytest.skip("the launchers run the Triton kernels")
    gen = torch.Generator().manual_seed(4)
    gate, up = ((torch.randn(9, 150, generator=gen) * 3).to(checks.DEVICE) for _ in range(2))
    rows, cols = slice(2, 7), slice(64, 128)
    grad = torch.randn(5, 64, generator=gen).to(checks.DEVICE)
    exact = run(lambda g, u: F.silu(g) * u, gate[rows, cols], up[rows, cols], grad,
                cast=torch.Tensor.double)
    before_gate, before_up = gate.clone(), up.clone()
    glu_backward_into(gate[rows, cols], up[rows, cols], grad, gate[rows, cols], up[rows, cols], "silu")
    for name, o, e in zip(("dgate", "dup"), (gate[rows, cols], up[rows, cols]), exact[1:], strict=True):
        checks.assert_close_to_float64(o, e, torch.float32, name)
    for new, old in ((gate, before_gate), (up, before_up)):
        new[rows, cols], old[rows, cols] = 0, 0
        assert torch.equal(new, old)


def test_every_activation_has_a_launch_that_multi_block_spans():
    """Each activation has its flat block (a power of two) and warps, and the ``multi_block`` shape
    spans several of its blocks, so the tests above cover programs past the first and a masked tail."""
    assert set(glu_module._LAUNCH) == set(ACTIVATIONS)
    elements = math.prod(SHAPES["multi_block"][0])
    for block, _ in glu_module._LAUNCH.values():
        assert block & (block - 1) == 0 and elements > block


def _pair(shape_gate=(4, 6), shape_up=(4, 6), dtype_gate=torch.float32, dtype_up=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return (
        torch.randn(*shape_gate, generator=gen).to(checks.DEVICE, dtype_gate),
        torch.randn(*shape_up, generator=gen).to(checks.DEVICE, dtype_up),
    )


@pytest.mark.parametrize("op", [swiglu, geglu], ids=["swiglu", "geglu"])
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(shape_up=(4, 7)), ValueError, "same shape"),
        (dict(dtype_up=torch.bfloat16), TypeError, "same dtype"),
        (dict(dtype_gate=torch.float64, dtype_up=torch.float64), TypeError, "dtype"),
    ],
)
def test_errors(op, kwargs, error, match):
    gate, up = _pair(**kwargs)
    with pytest.raises(error, match=match):
        op(gate, up)


@pytest.mark.parametrize("approximate", ["erf", "sigmoid", None, ""])
def test_geglu_rejects_unknown_approximation(approximate):
    gate, up = _pair()
    with pytest.raises(ValueError, match="approximate"):
        geglu(gate, up, approximate=approximate)
    with pytest.raises(ValueError, match="approximate"):
        geglu_reference(gate, up, approximate=approximate)
