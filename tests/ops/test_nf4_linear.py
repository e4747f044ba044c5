"""nf4_linear: ``x @ W.T`` over an NF4 weight, against bitsandbytes' dequantisation and float64 maths,
forward and x's gradient; what autograd keeps for backward; and that torch.compile keeps it in one
graph.
"""

from __future__ import annotations

import pytest
import torch

from fusetune.ops.nf4_linear import nf4_linear
from tests.ops import checks
from tests.ops.test_nf4 import bnb_dequantize, linear4bit

bnb = pytest.importorskip("bitsandbytes")

BACKEND = "inductor" if checks.DEVICE == "cuda" else "aot_eager"


def _inputs(weight, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, weight.quant_state.shape[1], generator=gen).to(checks.DEVICE, dtype)
    grad = torch.randn(3, 5, weight.quant_state.shape[0], generator=gen).to(checks.DEVICE, dtype)
    return x.requires_grad_(), grad


@pytest.mark.parametrize("dtype", checks.DTYPES, ids=str)
@pytest.mark.parametrize("shape", ((37, 70), (64, 129)), ids=str)
def test_matches_dequantised_weight(shape, dtype):
    weight = linear4bit(shape=shape).weight
    x, grad = _inputs(weight, dtype)
    out = nf4_linear(x, weight)
    out.backward(grad)

    dense = bnb_dequantize(weight.data, weight.quant_state, torch.float32).double()
    x64 = x.detach().double().requires_grad_()
    expected = x64 @ dense.T
    expected.backward(grad.double())
    assert out.dtype == dtype and out.shape == expected.shape
    checks.assert_close_to_float64(out, expected, dtype, "nf4_linear")
    checks.assert_close_to_float64(x.grad, x64.grad, dtype, "nf4_linear dx")

    x_ref = x.detach().clone().requires_grad_()
    ref = torch.nn.functional.linear(x_ref, bnb_dequantize(weight.data, weight.quant_state, dtype))
    ref.backward(grad)
    checks.assert_matches_reference(out, ref, dtype, "nf4_linear")
    checks.assert_matches_reference(x.grad, x_ref.grad, dtype, "nf4_linear dx")


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
def test_bias_and_backward_as_bitsandbytes_matmul_4bit(dtype):
    """Against bitsandbytes' own ``matmul_4bit``, bit for bit on the CPU: the bias added in the
    matmul (one rounding), and x's gradient with the weight rounded to the dtype it was quantised
    from (float16 here) before the cast to the gradient's, as its backward decodes it."""
    from bitsandbytes import functional as bnb_functional

    gen = torch.Generator().manual_seed(6)
    source = (torch.randn(37, 128, generator=gen) * 0.05).to(checks.DEVICE, torch.float16)
    weight, state = bnb_functional.quantize_4bit(source, quant_type="nf4")
    weight.quant_state = state
    bias = torch.randn(37, generator=gen).to(checks.DEVICE, dtype)
    x, grad = _inputs(weight, dtype, seed=7)
    out = nf4_linear(x, weight, bias)
    out.backward(grad)
    x_ref = x.detach().clone().requires_grad_()
    ref = bnb.matmul_4bit(x_ref, weight.t(), quant_state=state, bias=bias)
    ref.backward(grad)
    assert out.dtype == ref.dtype == dtype
    # On CUDA bitsandbytes 0.50's forward is its own fused 4-bit GEMM, which rounds a float16
    # product further from float64 than one rounding does (tests/patch/test_qlora_compute_dtype.py).
    forward = 1e-6 if dtype == torch.float32 or checks.DEVICE == "cpu" else 2e-3
    assert checks.relative_error(out, ref) <= forward
    assert checks.relative_error(x.grad, x_ref.grad) <= 1e-6


def test_keeps_no_dense_weight_for_backward():
    """Autograd keeps the packed bytes and the scales, never a (out, in) dense weight."""
    weight = linear4bit(shape=(64, 128)).weight
    x, grad = _inputs(weight, torch.float32)
    kept = []

    def keep(tensor):
        kept.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        out = nf4_linear(x, weight)
    assert kept and all(tuple(t.shape) != (64, 128) for t in kept)
    assert any(t.data_ptr() == weight.data_ptr() for t in kept)  # the packed bytes themselves
    out.backward(grad)
    assert x.grad is not None


def test_compiles_into_one_graph_with_the_same_results():
    from torch._dynamo.utils import counters

    weight = linear4bit(shape=(37, 70)).weight
    x, grad = _inputs(weight, torch.float32)

    def layer(x):
        return torch.relu(nf4_linear(x, weight)) * 2

    out = layer(x)
    out.backward(grad)
    eager_out, eager_grad = out.detach(), x.grad
    x.grad = None
    torch._dynamo.reset()
    counters.clear()
    out = torch.compile(layer, backend=BACKEND, fullgraph=True)(x)
    out.backward(grad)
    assert counters["stats"]["unique_graphs"] == 1
    assert checks.relative_error(out, eager_out) <= 1e-6
    assert checks.relative_error(x.grad, eager_grad) <= 1e-6


def test_autocast_sets_the_dtype_eager_and_compiled_alike():
    """Under autocast a float32 x is multiplied in autocast's dtype, as F.linear would, and compiled
    code agrees with eager code on the dtype and the values; x's gradient comes back in float32."""
    weight = linear4bit(shape=(37, 70)).weight
    x, grad = _inputs(weight, torch.float32)
    dense = bnb_dequantize(weight.data, weight.quant_state, torch.bfloat16)
    results = []
    for run in (nf4_linear, torch.compile(nf4_linear, backend=BACKEND, fullgraph=True)):
        x.grad = None
        with torch.autocast(checks.DEVICE, dtype=torch.bfloat16):
            out = run(x, weight)
        out.backward(grad.to(out.dtype))
        results.append((out.detach(), x.grad))
    expected = torch.nn.functional.linear(x.detach().bfloat16(), dense)
    for out, x_grad in results:
        assert out.dtype == torch.bfloat16 and x_grad.dtype == torch.float32
        checks.assert_matches_reference(out, expected, torch.bfloat16, "nf4_linear under autocast")
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("nested", (False, True), ids=("fp32_absmax", "double_quant"))
def test_custom_ops_pass_opcheck(nested):
    """Schema, fake outputs against the real ones, autograd registration, AOTAutograd."""
    from bitsandbytes import functional as bnb_functional

    gen = torch.Generator().manual_seed(5)
    weight = (torch.randn(37, 70, generator=gen) * 0.05).to(checks.DEVICE)
    packed, state = bnb_functional.quantize_4bit(
        weight, blocksize=64, compress_statistics=nested, quant_type="nf4"
    )
    second = (state.state2.code, state.state2.absmax, state.offset) if nested else (None, None, None)
    layout = ([37, 70], 64, int(state.state2.blocksize) if nested else 0, state.dtype)
    x = torch.randn(3, 5, 70, generator=gen).to(checks.DEVICE).requires_grad_()
    bias = torch.randn(37, generator=gen).to(checks.DEVICE)
    grad = torch.randn(3, 5, 37, generator=gen).to(checks.DEVICE)
    for b in (None, bias):
        torch.library.opcheck(
            torch.ops.fusetune.nf4_linear.default, (x, b, packed, state.absmax, *second, *layout)
        )
    torch.library.opcheck(
        torch.ops.fusetune.nf4_linear_grad_input.default, (grad, packed, state.absmax, *second, *layout)
    )


def test_bytes_stored_in_a_float_dtype():
    """FSDP2's QLoRA recipe stores the packed bytes as bf16; they are read as bytes all the same."""
    from tests.ops.test_nf4 import quantized

    as_bytes, bytes_state = quantized((6, 72))  # 216 bytes: whole bf16 elements
    packed, state = quantized((6, 72), storage=torch.bfloat16)
    assert packed.dtype == torch.bfloat16
    weight = packed.detach()
    weight.quant_state = state
    x, grad = _inputs(weight, torch.float32)
    out = nf4_linear(x, weight)
    out.backward(grad)
    dense = bnb_dequantize(as_bytes, bytes_state, torch.float32)  # the uint8 storage's weight
    checks.assert_matches_reference(out, x.detach() @ dense.T, torch.float32, "nf4_linear")
    checks.assert_matches_reference(x.grad, grad @ dense, torch.float32, "nf4_linear dx")


def test_bad_input_is_named():
    weight = linear4bit(shape=(37, 70)).weight
    x = torch.randn(4, 70, device=checks.DEVICE)
    with pytest.raises(TypeError, match="not a bitsandbytes NF4 weight.*functional.linear"):
        nf4_linear(x, torch.randn(37, 70, device=checks.DEVICE))
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        nf4_linear(x.to(torch.float64), weight)
    with pytest.raises(ValueError, match="last dim is 69 but the weight \\(37, 70\\) takes 70"):
        nf4_linear(x[:, :69], weight)
    elsewhere = torch.empty(weight.shape, dtype=weight.dtype, device="meta")
    elsewhere.quant_state = weight.quant_state
    with pytest.raises(ValueError, match="weight is on meta but x is on .* move it there"):
        nf4_linear(x, elsewhere)
