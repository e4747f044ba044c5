"""Every fused op inside torch.compile'd code: the same outputs and gradients as the op called eagerly.

The norms, RoPE, the GLUs, linear_cross_entropy and nf4_linear launch their kernels through custom ops
(``fusetune/ops/_graph_ops.py``), so torch.compile keeps them in its graph: they are compiled with
``fullgraph=True``, which fails on any graph break. cross_entropy and the LoRA ops run as they are
between compiled graphs (``_launch.public_eager_op``). Each case (``op_calls``) compiles a function
that does some torch work around the op, runs forward and backward, and compares outputs and input
gradients with the same function called eagerly. On CPU the compiled graphs use the ``aot_eager``
backend (no C++ toolchain needed); on a GPU (``TRITON_INTERPRET=0``) Inductor's."""

from __future__ import annotations

import pytest
import torch

import fusetune.ops as ops
from tests.ops import checks, op_calls

BACKEND = "inductor" if checks.DEVICE == "cuda" else "aot_eager"
DTYPE = torch.bfloat16 if checks.DEVICE == "cuda" else torch.float32
CASES = op_calls.op_cases(checks.DEVICE, DTYPE)
IN_GRAPH = {"rms_norm", "add_rms_norm", "layer_norm", "rope", "swiglu", "geglu", "linear_cross_entropy",
            "linear_cross_entropy_frozen", "nf4_linear"}


@pytest.mark.parametrize("name", list(CASES))
def test_op_inside_compiled_code_matches_eager(name):
    function, leaves = CASES[name]
    expected = op_calls.forward_backward(function, leaves)
    torch._dynamo.reset()
    compiled = torch.compile(function, backend=BACKEND, fullgraph=name in IN_GRAPH)
    got = op_calls.forward_backward(compiled, leaves)
    names = ["output"] + [f"gradient {i}" for i in range(len(leaves))]
    for what, out, ref in zip(names, got, expected, strict=True):
        checks.assert_matches_reference(out, ref, DTYPE, f"{name} {what}")


def test_fullgraph_names_the_op_it_cannot_trace():
    function, leaves = CASES["cross_entropy"]
    torch._dynamo.reset()
    with pytest.raises(Exception, match="cross_entropy"):
        torch.compile(function, backend=BACKEND, fullgraph=True)(*leaves)


def _compiled(function, **options):
    torch._dynamo.reset()
    return torch.compile(function, backend=BACKEND, fullgraph=True, **options)


@pytest.mark.parametrize("residual", [False, True], ids=["rms_norm", "add_rms_norm"])
def test_norms_of_permuted_views_stay_in_graph_as_shapes_change(residual):
    """Attention's (B, H, T, D) view of a (B, T, H, D) projection is normalised in memory order; with
    shapes that change between calls (symbolic strides) the order is still traced, no graph break."""

    def normed(projection, weight):
        view = projection.transpose(1, 2)
        out = ops.add_rms_norm(view, view * 0.5, weight) if residual else ops.rms_norm(view, weight)
        return out[0] + out[1] if residual else out

    weight = torch.randn(16, device=checks.DEVICE)
    compiled = _compiled(normed, dynamic=True)
    for shape in ((2, 5, 4, 16), (2, 7, 3, 16)):
        projection = torch.randn(shape, device=checks.DEVICE)
        checks.assert_matches_reference(compiled(projection, weight), normed(projection, weight),
                                        torch.float32, f"compiled at {shape}")


@pytest.mark.parametrize("dtype, loss_scale", [(torch.float16, 2.0**16), (torch.bfloat16, 1 / 3)], ids=str)
def test_compiled_linear_cross_entropy_scales_its_gradients_in_float32(dtype, loss_scale):
    """The in-graph op's backward scales the stored gradients by the loss's gradient in float32, as
    the eager op does: GradScaler's 2^16, inf in float16, gives finite gradients. (The in-graph op
    stores its gradients in the input's dtype before the scale, the eager op in float32: they
    agree to the dtype's rounding, not bit for bit.)"""
    torch.manual_seed(0)
    weight = (torch.randn(301, 40, device=checks.DEVICE) * 0.1).to(dtype)
    labels = torch.tensor([5, -100, 7, 9], device=checks.DEVICE)
    grads = []
    for run in (lambda h: ops.linear_cross_entropy(h, weight, labels), None):
        run = run or _compiled(lambda h: ops.linear_cross_entropy(h, weight, labels))
        hidden = torch.randn(4, 40, generator=torch.Generator().manual_seed(1)).to(checks.DEVICE, dtype)
        hidden.requires_grad_()
        (run(hidden) * loss_scale).backward()
        grads.append(hidden.grad)
    assert torch.isfinite(grads[1]).all()
    checks.assert_matches_reference(grads[1], grads[0], dtype, f"gradient at loss scale {loss_scale}")


def test_compiled_linear_cross_entropy_takes_a_fractional_item_count():
    hidden = torch.randn(6, 40, device=checks.DEVICE)
    weight = torch.randn(301, 40, device=checks.DEVICE) * 0.1
    labels = torch.randint(0, 301, (6,), device=checks.DEVICE)

    def loss(h):
        return ops.linear_cross_entropy(h, weight, labels, num_items_in_batch=2.5)

    checks.assert_matches_reference(_compiled(loss)(hidden), loss(hidden), torch.float32, "num_items 2.5")


def test_fullgraph_under_autocast_names_why_and_the_fix():
    hidden = torch.randn(6, 40, device=checks.DEVICE)
    weight = torch.randn(301, 40, device=checks.DEVICE) * 0.1
    labels = torch.randint(0, 301, (6,), device=checks.DEVICE)
    compiled = _compiled(lambda h: ops.linear_cross_entropy(h, weight, labels))
    with torch.autocast(checks.DEVICE, dtype=torch.bfloat16):
        with pytest.raises(Exception, match="outside autocast"):
            compiled(hidden)
