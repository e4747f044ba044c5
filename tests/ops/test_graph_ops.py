"""The custom ops the norms, RoPE, the GLUs and linear_cross_entropy launch through
(``fusetune/ops/_graph_ops.py``), checked
by ``torch.library.opcheck``: each op's schema, its fake implementation's outputs (shapes, dtypes
and strides) against the real launch's, and the op traced by AOTAutograd against the op run eagerly.

The inputs cover what changes an op's outputs: with and without the optional tensors, a gradient
wanted or not, strided rows (a slice of a wider tensor), and RoPE's transposed (B, H, T, D) views,
whose layout its outputs keep.
"""

from __future__ import annotations

import pytest
import torch

from fusetune.ops.glu import _glu_backward, _glu_forward
from fusetune.ops.layer_norm import _backward as layer_norm_backward
from fusetune.ops.layer_norm import _forward as layer_norm_forward
from fusetune.ops.linear_cross_entropy import _loss_and_gradients as linear_cross_entropy_gradients
from fusetune.ops.rms_norm import _backward as rms_norm_backward
from fusetune.ops.rms_norm import _forward as rms_norm_forward
from fusetune.ops.rope import _launch as rope_launch
from tests.ops import checks


def _randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, device=checks.DEVICE, dtype=dtype)


def _cases() -> dict[str, tuple]:
    torch.manual_seed(0)
    rows, residual, weight = _randn(7, 45), _randn(7, 45), _randn(45)
    strided = checks.non_contiguous(_randn(7, 45))
    rstd, mean = _randn(7).abs() + 0.5, _randn(7)
    q = _randn(2, 7, 4, 16).transpose(1, 2)  # (B, H, T, D) view of a (B, T, H, D) projection
    k = _randn(2, 7, 2, 16).transpose(1, 2)
    cos, sin = _randn(1, 7, 16), _randn(1, 7, 16)
    bf16 = torch.bfloat16
    hidden, head, head_bias = _randn(13, 24), _randn(37, 24) * 0.1, _randn(37)
    labels = torch.randint(0, 37, (13,), device=checks.DEVICE)
    labels[:3] = -100
    items = torch.tensor(7, device=checks.DEVICE)
    loss_options = (-100, "mean", 0.0, None, 0.0)
    return {
        "linear_cross_entropy, trainable with bias": (
            linear_cross_entropy_gradients,
            (hidden, head, head_bias, labels, *loss_options, None, None, [True, True, True], None)),
        "linear_cross_entropy, frozen, items tensor": (
            linear_cross_entropy_gradients,
            (hidden, head, None, labels, *loss_options, items, None, [True, False, False], 4)),
        "linear_cross_entropy, smoothing, softcap, z-loss, items count": (
            linear_cross_entropy_gradients,
            (hidden, head, None, labels, -100, "mean", 0.1, 3.0, 1e-4, None, 9, [True, True, False], None)),
        "rms_norm forward": (rms_norm_forward, (strided, None, weight, 1e-6, 0.0, False)),
        "rms_norm forward, residual, gemma": (rms_norm_forward, (rows, residual, weight, 1e-6, 1.0, True)),
        "rms_norm forward, no weight": (rms_norm_forward, (rows, None, None, 1e-6, 0.0, False)),
        "rms_norm backward": (
            rms_norm_backward, (rows, None, strided, weight, rstd, 0.0, False, False, True)),
        "rms_norm backward, dsum, no dw": (
            rms_norm_backward, (rows, residual, rows, weight, rstd, 0.0, False, True, False)),
        "layer_norm forward": (layer_norm_forward, (strided, weight, weight.to(bf16), 1e-5)),
        "layer_norm forward, no params": (layer_norm_forward, (rows, None, None, 1e-5)),
        "layer_norm backward": (
            layer_norm_backward, (rows, strided, weight, mean, rstd, torch.float32, bf16)),
        "layer_norm backward, bias only": (layer_norm_backward, (rows, rows, weight, mean, rstd, None, bf16)),
        "layer_norm backward, no params": (layer_norm_backward, (rows, rows, None, mean, rstd, None, None)),
        "glu forward": (_glu_forward, (strided, rows, "silu")),
        "glu backward": (_glu_backward, (rows, strided, residual, "gelu_tanh")),
        "rope": (rope_launch, (q, k, cos, sin, 1, False, torch.float32, bf16)),
        "rope backward, k only": (rope_launch, (None, k, cos, sin, 1, True, torch.float32, torch.float32)),
        "rope, contiguous heads second": (
            rope_launch, (q.contiguous(), k.contiguous(), cos, sin, 1, False, torch.float32, torch.float32)),
    }


CASES = _cases()


@pytest.mark.parametrize("name", list(CASES))
def test_custom_op_passes_opcheck(name):
    launch, args = CASES[name]
    torch.library.opcheck(launch.custom_op, args)


@pytest.mark.parametrize("name", ["rope", "rms_norm forward, residual, gemma"])
def test_custom_op_computes_what_the_launch_does(name):
    launch, args = CASES[name]
    for got, expected in zip(launch.custom_op(*args), launch(*args), strict=True):
        assert got.stride() == expected.stride()
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
