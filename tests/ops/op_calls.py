"""One call of every public op that has a gradient, wrapped in a little torch work, for the tests that
run all of them the same way: inside torch.compile'd code (``test_compiled.py``) and on a GPU that is
not the current one (``test_devices.py``).

Each case is a function of its leaves (tensors that require grad) and the leaves themselves; the
shapes are small and odd, and there is torch work on each side of the op, so that a compiled
function has a graph before and after it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import fusetune.ops as ops
from fusetune.ops.lora import LoraWeights

Case = tuple[Callable[..., torch.Tensor], tuple[torch.Tensor, ...]]


def op_cases(device: torch.device | str, dtype: torch.dtype) -> dict[str, Case]:
    """name -> (function of the leaves, leaves), every tensor on ``device`` in ``dtype``."""
    torch.manual_seed(0)

    def leaf(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, device=device, dtype=dtype) * scale).requires_grad_()

    def frozen(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=dtype) * 0.1

    x, residual, weight, bias = leaf(3, 5, 72), leaf(3, 5, 72), leaf(72), leaf(72)
    q, k = leaf(2, 4, 7, 16), leaf(2, 2, 7, 16)
    cos, sin = frozen(2, 7, 16), frozen(2, 7, 16)
    gate, up = leaf(3, 5, 90), leaf(3, 5, 90)
    logits, hidden, head = leaf(15, 301), leaf(15, 40), leaf(301, 40, scale=0.1)
    labels = torch.randint(0, 301, (15,), device=device)
    labels[:4] = -100
    base, a, b = frozen(24, 72), leaf(4, 72, scale=0.1), leaf(24, 4, scale=0.1)
    mlp_gate, mlp_up, mlp_down = frozen(90, 72), frozen(90, 72), frozen(72, 90)
    mlp_a, mlp_b = leaf(4, 72, scale=0.1), leaf(90, 4, scale=0.1)

    def mlp(x, a, b):
        return ops.lora_glu_mlp(x * 2, LoraWeights(mlp_gate, a, b, 2.0), LoraWeights(mlp_up, None, None, 1.0),
                                LoraWeights(mlp_down, None, None, 1.0), "silu") + 1

    cases = {
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
        "lora_glu_mlp": (mlp, (x, mlp_a, mlp_b)),
    }
    nf4_weight = _nf4_weight(frozen(24, 72))
    if nf4_weight is not None:
        cases["nf4_linear"] = (lambda x: ops.nf4_linear(x * 2, nf4_weight) + 1, (x,))
    return cases


def _nf4_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """``weight`` quantised to NF4 by bitsandbytes (its packed bytes carrying their quant_state), or
    None where bitsandbytes is not installed (the op takes only its weights)."""
    try:
        from bitsandbytes import functional as bnb_functional
    except ImportError:
        return None
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, compress_statistics=True,
                                                 quant_type="nf4")
    packed.quant_state = state
    return packed


def forward_backward(function: Callable[..., torch.Tensor],
                     leaves: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """The output and the leaves' gradients after one forward + backward of ``function``."""
    for leaf in leaves:
        leaf.grad = None
    out = function(*leaves)
    out.float().square().mean().backward()
    return [out.detach()] + [leaf.grad for leaf in leaves]
