"""Every fused op inside torch.compile'd code: the same outputs and gradients as the op called eagerly.

The ops run as they are between compiled graphs (``_launch.public_op``): traced, the CPU
interpreter's kernels failed to trace, and on an H200 add_rms_norm's weight gradient came out NaN
and linear_cross_entropy's kernels failed to compile. Each case (``op_calls``) compiles a function
that does some torch work around the op (so there is a graph on each side of it), runs forward and
backward, and compares outputs and input gradients with the same function called eagerly. On CPU the
compiled graphs use the ``aot_eager`` backend (no C++ toolchain needed); on a GPU
(``TRITON_INTERPRET=0``) Inductor's.
"""

from __future__ import annotations

import pytest
import torch

from tests.ops import checks, op_calls

BACKEND = "inductor" if checks.DEVICE == "cuda" else "aot_eager"
DTYPE = torch.bfloat16 if checks.DEVICE == "cuda" else torch.float32
CASES = op_calls.op_cases(checks.DEVICE, DTYPE)


@pytest.mark.parametrize("name", list(CASES))
def test_op_inside_compiled_code_matches_eager(name):
    function, leaves = CASES[name]
    expected = op_calls.forward_backward(function, leaves)
    torch._dynamo.reset()
    got = op_calls.forward_backward(torch.compile(function, backend=BACKEND), leaves)
    names = ["output"] + [f"gradient {i}" for i in range(len(leaves))]
    for what, out, ref in zip(names, got, expected, strict=True):
        checks.assert_matches_reference(out, ref, DTYPE, f"{name} {what}")


def test_fullgraph_names_the_op_it_cannot_trace():
    function, leaves = CASES["rms_norm"]
    torch._dynamo.reset()
    with pytest.raises(Exception, match="rms_norm"):
        torch.compile(function, backend=BACKEND, fullgraph=True)(*leaves)
