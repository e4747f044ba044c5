"""bf16 outputs on CUDA round as torch rounds: a kernel's error against float64 maths is no larger
than its PyTorch reference's, run in bf16 with torch's round-to-nearest casts.

Only on CUDA: the CPU interpreter truncates float32 -> bfloat16 casts (tests/ops/checks.py), so
there a bf16 kernel output is about twice as far from float64 as torch's; this is the check that it
is not so on the GPU, where training runs.
"""

from __future__ import annotations

import pytest
import torch

from fusetune.ops.glu import swiglu, swiglu_reference
from fusetune.ops.layer_norm import layer_norm, layer_norm_reference
from fusetune.ops.rms_norm import rms_norm, rms_norm_reference
from tests.ops.checks import DEVICE, relative_error

pytestmark = pytest.mark.skipif(
    DEVICE != "cuda", reason="CUDA only: the CPU interpreter truncates float32 -> bfloat16 casts"
)

ROWS, HIDDEN = 1031, 4097


def _inputs(count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    values = [torch.randn(ROWS, HIDDEN, generator=generator) * 3 for _ in range(count)]
    return [value.to(torch.bfloat16).to(DEVICE) for value in values]


CASES = {
    "rms_norm llama": (lambda x, y: rms_norm(x, y[0]), lambda x, y: rms_norm_reference(x, y[0])),
    "rms_norm gemma": (
        lambda x, y: rms_norm(x, y[0], offset=1.0, cast="gemma"),
        lambda x, y: rms_norm_reference(x, y[0], offset=1.0, cast="gemma"),
    ),
    "layer_norm": (
        lambda x, y: layer_norm(x, y[0], y[1]),
        lambda x, y: layer_norm_reference(x, y[0], y[1]),
    ),
    "swiglu": (swiglu, swiglu_reference),
}


@pytest.mark.parametrize("case", CASES)
def test_bf16_outputs_are_no_further_from_float64_than_torchs(case):
    kernel, reference = CASES[case]
    x, y = _inputs(2)
    exact = reference(x.double(), y.double())
    kernel_error = relative_error(kernel(x, y), exact)
    torch_error = relative_error(reference(x, y), exact)
    assert kernel_error <= 1.02 * torch_error, (kernel_error, torch_error)
