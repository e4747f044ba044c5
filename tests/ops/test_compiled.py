"""Every fused op inside torch.compile'd code: the same outputs and gradients as the op called eagerly.

The ops run as they are between compiled graphs (``_launch.outside_compiled_graphs``): traced, the
CPU interpreter's kernels failed to trace, and on an H200 add_rms_norm's weight gradient came out
NaN and linear_cross_entropy's kernels failed to compile. Each case compiles a function that does
some torch work around the op (so there is a graph on each side of it), runs forward and backward,
and compares outputs and input gradients with the same function called eagerly. On CPU the
compiled graphs use the ``aot_eager`` backend (no C++ toolchain needed); on a GPU
(``TRITON_INTERPRET=0``) Inductor's.
"""

from __future__ import annotations

import pytest
import torch

import fusetune.ops as ops
from fusetune.ops.lora import LoraWeights
from tests.ops import checks

BACKEND = "inductor" if checks.DEVICE == "cuda" else "aot_eager"
DTYPE = torch.bfloat16 if checks.DEVICE == "cuda" else torch.float32


def _leaf(*shape: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, device=checks.DEVICE, dtype=DTYPE) * scale).requires_grad_()


def _cases() -> dict:
    """name -> (function of the leaves, leaves): each function wraps one op in torch work."""
    torch.manual_seed(0)
    x, residual, weight, bias = _leaf(3, 5, 72), _leaf(3, 5, 72), _leaf(72), _leaf(72)
    q, k = _leaf(2, 4, 7, 16), _leaf(2, 2, 7, 16)
    cos, sin = torch.randn(2, 7, 16, device=checks.DEVICE, dtype=DTYPE), torch.randn(
        2, 7, 16, device=checks.DEVICE, dtype=DTYPE)
    gate, up = _leaf(3, 5, 90), _leaf(3, 5, 90)
    logits, hidden, head = _leaf(15, 301), _leaf(15, 40), _leaf(301, 40, scale=0.1)
    labels = torch.randint(0, 301, (15,), device=checks.DEVICE)
    labels[:4] = -100
    base = torch.randn(24, 72, device=checks.DEVICE, dtype=DTYPE)
    a, b = _leaf(4, 72, scale=0.1), _leaf(24, 4, scale=0.1)
    return {
        "rms_norm": (lambda x, w: ops.rms_norm(x * 2, w) + 1, (x, weight)),
        "add_rms_norm": (lambda x, r, w: sum(ops.add_rms_norm(x * 2, r, w)), (x, residual, weight)),
        "layer_norm": (lambda x, w, b: ops.layer_norm(x * 2, w, b) + 1, (x, weight, bias)),
        "rope": (lambda q, k: torch.cat([t.flatten() for t in ops.rope(q * 2, k, cos, sin)]), (q, k)),
        "swiglu": (lambda g, u: ops.swiglu(g * 2, u) + 1, (gate, up)),
        "geglu": (lambda g, u: ops.geglu(g * 2, u) + 1, (gate, up)),
        "cross_entropy": (lambda z: ops.cross_entropy(z * 2, labels) + 1, (logits,)),
        "linear_cross_entropy": (lambda h, w: ops.linear_cross_entropy(h * 2, w, labels) + 1, (hidden, head)),
        "linear_cross_entropy_frozen": (
            lambda h: ops.linear_cross_entropy(h * 2, head.detach(), labels) + 1, (hidden,)),
        "lora_linear": (lambda x, a, b: ops.lora_linear(x * 2, LoraWeights(base, a, b, 2.0))[0] + 1,
                        (x, a, b)),
    }


CASES = _cases()


def _run(function, leaves: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """Outputs and leaf gradients of one forward + backward of ``function``."""
    for leaf in leaves:
        leaf.grad = None
    out = function(*leaves)
    out.float().square().mean().backward()
    return [out.detach()] + [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("name", list(CASES))
def test_op_inside_compiled_code_matches_eager(name):
    function, leaves = CASES[name]
    expected = _run(function, leaves)
    torch._dynamo.reset()
    got = _run(torch.compile(function, backend=BACKEND), leaves)
    names = ["output"] + [f"gradient {i}" for i in range(len(leaves))]
    for what, out, ref in zip(names, got, expected, strict=True):
        checks.assert_matches_reference(out, ref, DTYPE, f"{name} {what}")


def test_fullgraph_names_the_op_it_cannot_trace():
    function, leaves = CASES["rms_norm"]
    torch._dynamo.reset()
    with pytest.raises(Exception, match="rms_norm"):
        torch.compile(function, backend=BACKEND, fullgraph=True)(*leaves)
