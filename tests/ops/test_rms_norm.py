"""rms_norm and add_rms_norm: forward and every gradient against the reference and float64 maths."""

from __future__ import annotations

import importlib

import pytest
import torch

from fusetune.ops._launch import (
    MAX_FUSED_ROW,
    block_for,
    inverse_order,
    memory_order,
    partly_filled,
    persistent_programs,
    rows_per_program,
)
from fusetune.ops.rms_norm import (
    add_rms_norm,
    add_rms_norm_reference,
    forward_grid,
    rms_norm,
    rms_norm_reference,
)
from tests.ops import checks

# The module (fusetune.ops exports the function under the same name).
rms_norm_module = importlib.import_module("fusetune.ops.rms_norm")


def randn(gen, shape, dtype, scale=1.0):
    return (torch.randn(shape, generator=gen) * scale).to(device=checks.DEVICE, dtype=dtype)


def leaf(t, dtype=None):
    """A fresh leaf copy of ``t`` (optionally cast) with ``t``'s requires_grad."""
    if t is None:
        return None
    return t.detach().to(dtype or t.dtype).clone().requires_grad_(t.requires_grad)


def run(fn, args, grad_for):
    """Outputs of ``fn(*args)`` and the gradients of the args that require grad.

    ``grad_for(i, out)`` gives the gradient fed to output ``i``.
    """
    outs = fn(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    wanted = [a for a in args if a is not None and a.requires_grad]
    grads = torch.autograd.grad(outs, wanted, [grad_for(i, o) for i, o in enumerate(outs)])
    return list(outs), list(grads)


def check_op(op, reference, args, dtype, gen, layout=None, **kwargs):
    """Compare op's outputs and gradients with the reference (same dtype) and float64 maths.

    ``dtype`` picks the tolerance (the activation dtype). ``layout`` (e.g. checks.non_contiguous)
    is applied to the op's grad outputs; the caller applies it to the inputs.
    """
    grad_values = []

    def fresh_grad(i, out):  # random, recorded for the references
        grad_values.append(randn(gen, out.shape, out.dtype))
        return layout(grad_values[i]) if layout is not None else grad_values[i]

    def recorded_grad(i, out):
        return grad_values[i].to(out.dtype)

    outs, grads = run(lambda *a: op(*a, **kwargs), args, fresh_grad)
    ref_args = [leaf(a) for a in args]
    ref_outs, ref_grads = run(lambda *a: reference(*a, **kwargs), ref_args, recorded_grad)
    f64_args = [leaf(a, torch.float64) for a in args]
    f64_outs, f64_grads = run(lambda *a: reference(*a, **kwargs), f64_args, recorded_grad)
    names = [f"output {i}" for i in range(len(outs))] + [f"grad {i}" for i in range(len(grads))]
    for name, out, ref, ref64 in zip(
        names, outs + grads, ref_outs + ref_grads, f64_outs + f64_grads, strict=True
    ):
        assert out.dtype == ref.dtype, f"{name}: dtype {out.dtype} != reference {ref.dtype}"
        checks.assert_matches_reference(out, ref, dtype, name)
        checks.assert_close_to_float64(out, ref64, dtype, name)
    return outs


def inputs(gen, shape, dtype, weight_dtype=None, weight_grad=True, residual=False):
    x = randn(gen, shape, dtype).requires_grad_()
    weight = randn(gen, shape[-1], weight_dtype or dtype, scale=0.5).requires_grad_(weight_grad)
    if residual:
        return x, randn(gen, shape, dtype).requires_grad_(), weight
    return x, weight


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


@pytest.mark.parametrize("dtype", checks.DTYPES)
@pytest.mark.parametrize("cast, offset", [("llama", 0.0), ("llama", 1.0), ("gemma", 0.0),
                                          ("gemma", 1.0)])
def test_rms_norm_matches_references(gen, dtype, cast, offset):
    args = inputs(gen, (3, 5, 37), dtype)
    out = check_op(rms_norm, rms_norm_reference, args, dtype, gen, offset=offset, cast=cast)[0]
    assert out.shape == (3, 5, 37)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("shape", [(7, 129), (1, 37), (37,), (2, 3, 4, 16), (5, 300), (3, 1500)])
def test_rms_norm_shapes(gen, dtype, shape):
    """Narrow rows go several to a program (129 wide: four, the last program's tile part-filled;
    300 wide: two, the last program with one), rows of 1,500 one to a program."""
    args = inputs(gen, shape, dtype)
    check_op(rms_norm, rms_norm_reference, args, dtype, gen, cast="llama")


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("layout", [checks.non_contiguous, checks.transposed_layout])
def test_rms_norm_non_contiguous(gen, dtype, layout):
    x, weight = inputs(gen, (3, 5, 37), dtype)
    x = layout(x.detach()).requires_grad_()
    check_op(rms_norm, rms_norm_reference, (x, weight), dtype, gen, layout=layout, cast="gemma",
             offset=1.0)


@pytest.mark.parametrize("residual", [False, True], ids=["rms_norm", "add_rms_norm"])
@pytest.mark.parametrize("layout", [checks.strided_vector, checks.expanded_vector])
def test_weight_views_with_other_strides(gen, layout, residual):
    """A weight that is a slice or an expanded view (not unit-stride) is read as its values are,
    and its gradient reaches it (an expanded weight's summed onto its one value)."""
    *activations, weight = inputs(gen, (3, 5, 37), torch.float32, residual=residual)
    op, reference = (add_rms_norm, add_rms_norm_reference) if residual else (rms_norm, rms_norm_reference)
    check_op(op, reference, (*activations, layout(weight)), torch.float32, gen, cast="llama", offset=1.0)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_attention_head_views_are_normalised_in_place_of_a_copy(gen, dtype):
    """mllama's q_norm gets q as a (B, H, T, D) view of the projection's (B, T, H, D) output: its rows
    are read where they lie (what backward saves is x's memory, not a copy) and the output has x's
    layout, as eager maths gives it; gradients arriving in another layout are still right."""
    projected = randn(gen, (2, 7, 3, 37), dtype)  # (B, T, H, D)
    x = projected.transpose(1, 2).detach().requires_grad_()  # (B, H, T, D), not contiguous
    weight = randn(gen, 37, dtype, scale=0.5).requires_grad_()
    outs = check_op(rms_norm, rms_norm_reference, (x, weight), dtype, gen, cast="llama")
    assert outs[0].stride() == x.stride()
    out = rms_norm(x, weight)
    saved_input = out.grad_fn.saved_tensors[0]
    assert saved_input.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()


def test_memory_order_finds_the_permutation_of_a_dense_view():
    base = torch.randn(2, 7, 3, 5)
    assert memory_order(base) is None  # contiguous already
    assert memory_order(base[:, :, :, :4]) is None  # rows with gaps: not dense
    assert memory_order(base.transpose(-1, -2)) is None  # the last dim is not the contiguous one
    for view in (base.transpose(1, 2), base.permute(2, 0, 1, 3), base.permute(1, 2, 0, 3)):
        order = memory_order(view)
        assert order[-1] == 3 and view.permute(order).is_contiguous()
        assert torch.equal(view.permute(order).permute(inverse_order(order)), view)


@pytest.mark.parametrize("cast", ["llama", "gemma"])
def test_rms_norm_without_weight(gen, cast):
    x = randn(gen, (7, 37), torch.bfloat16).requires_grad_()
    out = check_op(rms_norm, rms_norm_reference, (x, None), torch.bfloat16, gen, cast=cast)[0]
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("cast, out_dtype", [("llama", torch.float32), ("gemma", torch.bfloat16)])
def test_rms_norm_mixed_dtypes(gen, cast, out_dtype):
    """bf16 activations with an fp32 weight: llama promotes (fp32 out), gemma casts back (bf16)."""
    args = inputs(gen, (3, 5, 37), torch.bfloat16, weight_dtype=torch.float32)
    out = check_op(rms_norm, rms_norm_reference, args, torch.bfloat16, gen, cast=cast)[0]
    assert out.dtype == out_dtype


def test_rms_norm_frozen_weight(gen):
    x, weight = inputs(gen, (7, 37), torch.float32, weight_grad=False)
    check_op(rms_norm, rms_norm_reference, (x, weight), torch.float32, gen)
    rms_norm(x, weight).sum().backward()
    assert weight.grad is None and x.grad is not None


def test_rms_norm_weight_grad_only(gen):
    x, weight = inputs(gen, (7, 37), torch.float16)
    x.requires_grad_(False)
    check_op(rms_norm, rms_norm_reference, (x, weight), torch.float16, gen, cast="gemma")


@pytest.mark.parametrize("dtype", checks.DTYPES)
@pytest.mark.parametrize("cast, offset", [("llama", 0.0), ("gemma", 1.0)])
def test_add_rms_norm_matches_references(gen, dtype, cast, offset):
    x, residual, weight = inputs(gen, (3, 5, 37), dtype, residual=True)
    normed, summed = check_op(add_rms_norm, add_rms_norm_reference, (x, residual, weight), dtype,
                              gen, offset=offset, cast=cast)
    # The sum is rounded once to x.dtype, as torch rounds it. The interpreter truncates
    # float32 -> bfloat16 instead of rounding to nearest, so bf16 is only exact when compiled.
    if dtype != torch.bfloat16 or checks.DEVICE == "cuda":
        assert torch.equal(summed, x.detach() + residual.detach())


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("shape", [(5, 300), (3, 1500)])
def test_add_rms_norm_two_rows_and_one_row_a_program(gen, dtype, shape):
    args = inputs(gen, shape, dtype, residual=True)
    check_op(add_rms_norm, add_rms_norm_reference, args, dtype, gen, cast="llama")


@pytest.mark.parametrize("op, reference, residual", [(rms_norm, rms_norm_reference, False),
                                                      (add_rms_norm, add_rms_norm_reference, True)])
def test_rows_of_one_tile_walked_by_persistent_programs(gen, op, reference, residual):
    """Rows of one tile each (here 1,500 wide, a 2,048 block) go through the persistent forward and
    the pipelined backward, with more rows than either grid has programs, so every program walks
    several."""
    cols = 1500
    programs, _ = forward_grid(2**30, block_for(cols), torch.device(checks.DEVICE))
    rows = programs + 3
    assert rows_per_program(block_for(cols)) == 1 and programs < rows
    check_op(op, reference, inputs(gen, (rows, cols), torch.bfloat16, residual=residual), torch.bfloat16,
             gen, cast="llama")


@pytest.mark.parametrize("op, reference, residual", [(rms_norm, rms_norm_reference, False),
                                                      (add_rms_norm, add_rms_norm_reference, True)])
def test_wide_rows_partly_filling_their_block(gen, op, reference, residual):
    """Rows of 2,400 fill 59% of their 4,096 block and take that launch (half the warps, one
    pipelined row a backward step, where add_rms_norm's full 4,096 rows take two plain ones): the
    same numbers as the references, over more rows than the backward has programs."""
    cols = 2400
    assert partly_filled(cols, block_for(cols))
    assert rms_norm_module.backward_rows(cols, block_for(cols), residual) == 1
    rows = persistent_programs(2**30, torch.device(checks.DEVICE), block_for(cols)) + 3
    check_op(op, reference, inputs(gen, (rows, cols), torch.bfloat16, residual=residual), torch.bfloat16,
             gen, cast="gemma", offset=1.0)


@pytest.mark.parametrize("rows_at_once", (2, 4))
@pytest.mark.parametrize("cast", ["llama", "gemma"])
def test_backward_with_several_rows_at_once(gen, monkeypatch, rows_at_once, cast):
    """The backward's programs load ``backward_rows`` rows at a time: 15 rows over 4 programs
    leave a part-filled last group, and every program's weight-gradient partial still counts."""
    monkeypatch.setattr(rms_norm_module, "backward_rows", lambda n_cols, block, residual: rows_at_once)
    x, residual, weight = inputs(gen, (3, 5, 37), torch.float32, residual=True)
    check_op(add_rms_norm, add_rms_norm_reference, (x, residual, weight), torch.float32, gen,
             offset=1.0 if cast == "gemma" else 0.0, cast=cast)


def test_add_rms_norm_normed_output_only(gen):
    """Only the normed output feeds the loss (the sum's gradient is zero)."""
    x, residual, weight = inputs(gen, (7, 37), torch.float32, residual=True)
    normed, _ = add_rms_norm(x, residual, weight)
    ref_args = [leaf(a) for a in (x, residual, weight)]
    ref, _ = add_rms_norm_reference(*ref_args)
    dy = randn(gen, normed.shape, normed.dtype)
    grads = torch.autograd.grad(normed, (x, residual, weight), dy)
    ref_grads = torch.autograd.grad(ref, ref_args, dy)
    checks.assert_matches_reference(normed, ref, torch.float32, "normed")
    for i, (g, r) in enumerate(zip(grads, ref_grads, strict=True)):
        checks.assert_matches_reference(g, r, torch.float32, f"grad {i}")


def test_add_rms_norm_non_contiguous_no_weight(gen):
    x, residual, _ = inputs(gen, (3, 5, 37), torch.float16, residual=True)
    x = checks.transposed_layout(x.detach()).requires_grad_()
    residual = checks.non_contiguous(residual.detach()).requires_grad_()
    check_op(add_rms_norm, add_rms_norm_reference, (x, residual, None), torch.float16, gen)


def test_add_rms_norm_frozen_weight(gen):
    x, residual, weight = inputs(gen, (7, 37), torch.bfloat16, weight_grad=False, residual=True)
    normed, summed = add_rms_norm(x, residual, weight)
    (normed.float().sum() + summed.float().sum()).backward()
    assert weight.grad is None
    assert torch.equal(x.grad, residual.grad)


def test_cpu_tensors_use_reference_without_interpreter(gen, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn((3, 37), generator=gen, dtype=torch.float32)
    weight = torch.randn(37, generator=gen)
    assert torch.equal(rms_norm(x, weight, cast="gemma"), rms_norm_reference(x, weight,
                                                                             cast="gemma"))
    residual = torch.randn((3, 37), generator=gen)
    out, ref = add_rms_norm(x, residual, weight), add_rms_norm_reference(x, residual, weight)
    assert all(torch.equal(a, b) for a, b in zip(out, ref, strict=True))


def _device(*shape, dtype=torch.float32):
    return torch.ones(shape, dtype=dtype, device=checks.DEVICE)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: rms_norm(_device(3, 8), _device(7)), ValueError, r"expected \(8,\)"),
        (lambda: rms_norm(_device(3, 8), _device(8, 1)), ValueError, r"expected \(8,\)"),
        (lambda: rms_norm(_device(3, 8, dtype=torch.int32), None), TypeError, "float32"),
        (lambda: rms_norm(_device(3, 8), _device(8, dtype=torch.float64)), TypeError, "bfloat16"),
        (lambda: rms_norm(_device(3, 8), _device(8), cast="qwen"), ValueError, "'llama'.*'gemma'"),
        (lambda: rms_norm_reference(_device(3, 8), None, cast="x"), ValueError, "'llama'"),
        (lambda: rms_norm(_device(3, 8), None, offset=1.0), ValueError, "pass the weight"),
        (lambda: rms_norm(_device(1, MAX_FUSED_ROW + 1), None), ValueError, "reference"),
        (lambda: add_rms_norm(_device(3, 8), _device(2, 8), None), ValueError, "same shape"),
        (lambda: add_rms_norm(_device(3, 8), _device(3, 8, dtype=torch.float16), None),
         ValueError, "same shape and dtype"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()
