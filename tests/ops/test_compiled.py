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
