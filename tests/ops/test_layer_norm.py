"""layer_norm: forward and every gradient against the reference, float64 maths and F.layer_norm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fusetune.ops._launch import MAX_FUSED_ROW, block_for, persistent_programs
from fusetune.ops.layer_norm import _backward_stages, layer_norm, layer_norm_reference
from tests.ops import checks
from tests.ops.test_rms_norm import check_op, randn


def inputs(gen, shape, dtype, param_dtype=None, weight=True, bias=True, param_grad=True):
    # A non-zero mean per row, so the centring is exercised.
    x = (randn(gen, shape, dtype) + randn(gen, (*shape[:-1], 1), dtype)).requires_grad_()
    params = [
        randn(gen, shape[-1], param_dtype or dtype, scale=0.5).requires_grad_(param_grad)
        if present
        else None
        for present in (weight, bias)
    ]
    return x, *params


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(4321)


@pytest.mark.parametrize("dtype", checks.DTYPES)
def test_layer_norm_matches_references(gen, dtype):
    args = inputs(gen, (3, 5, 37), dtype)
    out = check_op(layer_norm, layer_norm_reference, args, dtype, gen)[0]
    assert out.shape == (3, 5, 37)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize(
    "weight, bias", [(True, False), (False, True), (False, False)], ids=["w", "b", "none"]
)
def test_layer_norm_optional_params(gen, dtype, weight, bias):
    args = inputs(gen, (7, 37), dtype, weight=weight, bias=bias)
    check_op(layer_norm, layer_norm_reference, args, dtype, gen)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16))
@pytest.mark.parametrize("shape", [(7, 129), (1, 37), (37,), (2, 3, 4, 16), (5, 300), (3, 1500)])
def test_layer_norm_shapes(gen, dtype, shape):
    """Narrow rows go several to a program (129 wide: four, the last program's tile part-filled;
    300 wide: two, the last program with one), rows of 1,500 one to a program."""
    check_op(layer_norm, layer_norm_reference, inputs(gen, shape, dtype), dtype, gen)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_layer_norm_pipelined_backward(gen, dtype):
    """Rows of 2,048 or more (here a 2,048 block) take the software-pipelined backward loop, with
    more rows than its grid has programs, so every program walks several: the same numbers as the
    references. (Compiled on a GPU this is the pipelined code; the interpreter runs the loop
    plainly.)"""
    cols = 1500
    programs = persistent_programs(2**30, torch.device(checks.DEVICE), block_for(cols))
    rows = 3 * programs + 1
    assert _backward_stages(block_for(cols)) > 1  # the test takes the pipelined path
    check_op(layer_norm, layer_norm_reference, inputs(gen, (rows, cols), dtype), dtype, gen)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("layout", [checks.non_contiguous, checks.transposed_layout])
def test_layer_norm_non_contiguous(gen, dtype, layout):
    x, weight, bias = inputs(gen, (3, 5, 37), dtype)
    x = layout(x.detach()).requires_grad_()
    check_op(layer_norm, layer_norm_reference, (x, weight, bias), dtype, gen, layout=layout)


@pytest.mark.parametrize("layout", [checks.strided_vector, checks.expanded_vector])
def test_layer_norm_param_views_with_other_strides(gen, layout):
    """A weight and bias that are slices or expanded views (not unit-stride) are read as their
    values are, and their gradients reach them."""
    x, weight, bias = inputs(gen, (3, 5, 37), torch.float32)
    check_op(layer_norm, layer_norm_reference, (x, layout(weight), layout(bias)), torch.float32, gen)


def test_layer_norm_mixed_dtypes(gen):
    """bf16 activations with fp32 weight and bias: fp32 maths, bf16 output, fp32 grads."""
    args = inputs(gen, (3, 5, 37), torch.bfloat16, param_dtype=torch.float32)
    out = check_op(layer_norm, layer_norm_reference, args, torch.bfloat16, gen)[0]
    assert out.dtype == torch.bfloat16


def test_layer_norm_frozen_params(gen):
    x, weight, bias = inputs(gen, (7, 37), torch.float32, param_grad=False)
    check_op(layer_norm, layer_norm_reference, (x, weight, bias), torch.float32, gen)
    layer_norm(x, weight, bias).sum().backward()
    assert weight.grad is None and bias.grad is None and x.grad is not None


@pytest.mark.parametrize("frozen", ["weight", "bias"])
def test_layer_norm_one_param_frozen(gen, frozen):
    """Weight and bias both present, one of them frozen: the other's gradient alone is summed
    (first and only in the partial-sum buffer), in its own dtype (a bf16 bias, an fp32 weight)."""
    x, weight, bias = inputs(gen, (300, 37), torch.bfloat16, param_dtype=torch.float32)
    bias = bias.detach().to(torch.bfloat16).requires_grad_()
    (weight if frozen == "weight" else bias).requires_grad_(False)
    check_op(layer_norm, layer_norm_reference, (x, weight, bias), torch.bfloat16, gen)
    layer_norm(x, weight, bias).sum().backward()
    assert (weight if frozen == "weight" else bias).grad is None


def test_layer_norm_mixed_param_dtypes(gen):
    """An fp32 weight beside a bf16 bias: both gradients from one partial-sum buffer, each in its
    parameter's dtype (``check_op`` compares the dtypes with the reference's)."""
    x, weight, bias = inputs(gen, (300, 37), torch.bfloat16, param_dtype=torch.float32)
    bias = bias.detach().to(torch.bfloat16).requires_grad_()
    check_op(layer_norm, layer_norm_reference, (x, weight, bias), torch.bfloat16, gen)


def test_layer_norm_param_grads_only(gen):
    x, weight, bias = inputs(gen, (7, 37), torch.bfloat16)
    x.requires_grad_(False)
    check_op(layer_norm, layer_norm_reference, (x, weight, bias), torch.bfloat16, gen)


@pytest.mark.parametrize("dtype", checks.DTYPES)
def test_layer_norm_matches_torch(gen, dtype):
    """Same values and gradients as F.layer_norm with parameters in x's dtype."""
    x, weight, bias = inputs(gen, (7, 37), dtype)
    out = layer_norm(x, weight, bias, eps=1e-5)
    copies = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    ref = F.layer_norm(copies[0], (37,), copies[1], copies[2], eps=1e-5)
    assert out.dtype == ref.dtype
    checks.assert_matches_reference(out, ref, dtype, "output")
    dy = randn(gen, out.shape, dtype)
    grads = torch.autograd.grad(out, (x, weight, bias), dy)
    ref_grads = torch.autograd.grad(ref, copies, dy)
    for i, (g, r) in enumerate(zip(grads, ref_grads, strict=True)):
        checks.assert_matches_reference(g, r, dtype, f"grad {i}")


def test_cpu_tensors_use_reference_without_interpreter(gen, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn((3, 37), generator=gen)
    weight, bias = torch.randn(37, generator=gen), torch.randn(37, generator=gen)
    assert torch.equal(layer_norm(x, weight, bias), layer_norm_reference(x, weight, bias))


def _device(*shape, dtype=torch.float32):
    return torch.ones(shape, dtype=dtype, device=checks.DEVICE)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: layer_norm(_device(3, 8), _device(7), None), ValueError, r"weight .* \(8,\)"),
        (lambda: layer_norm(_device(3, 8), None, _device(2, 8)), ValueError, r"bias .* \(8,\)"),
        (lambda: layer_norm(_device(3, 8, dtype=torch.int64), None, None), TypeError, "float32"),
        (lambda: layer_norm(_device(3, 8), _device(8, dtype=torch.int8), None), TypeError,
         "weight"),
        (lambda: layer_norm(_device(1, MAX_FUSED_ROW + 1), None, None), ValueError, "reference"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()
