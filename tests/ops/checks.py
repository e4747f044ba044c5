"""What every op test shares: the device and dtypes under test, tolerances, and the comparisons.

Tolerances live here and only here. An op's output is compared twice: with the op's PyTorch
reference run in the same dtype (``assert_matches_reference``) and with the same maths in float64
(``assert_close_to_float64``), by the relative error ``|out - ref| / |ref|`` over the whole tensor.
"""

from __future__ import annotations

import os

import torch

DEVICE = (
    "cuda"
    if os.environ.get("TRITON_INTERPRET", "0") != "1" and torch.cuda.is_available()
    else "cpu"
)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Relative (norm-wise) error allowed against float64 maths, per input dtype. float32 kernels land
# near 1e-6; bf16/fp16 carry one rounding of the output (and of stored intermediates) each. Under
# TRITON_INTERPRET=1 (triton 3.9) a kernel's float32 -> bfloat16 cast truncates, where CUDA rounds
# to nearest (even with fp_downcast_rounding="rtne"): on the CPU a bf16 kernel output is about twice
# as far from float64 as torch's rounding of it (0.0028 against 0.0014 on randn * 3), within these.
FLOAT64_TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}

# Relative error allowed against the reference run in the same low precision: both round the same
# quantities, so the gap is about one ulp of the output dtype.
REFERENCE_TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (absolute error when ref is all zeros)."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out64.shape == ref64.shape, f"shape {tuple(out64.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out64).all(), "output holds NaN or inf"
    denom = ref64.norm().item()
    diff = (out64 - ref64).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close_to_float64(
    out: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype, what: str
) -> None:
    err = relative_error(out, ref64)
    assert err <= FLOAT64_TOLERANCE[dtype], f"{what}: relative error {err:.3e} vs float64 ({dtype})"


def assert_matches_reference(
    out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str
) -> None:
    err = relative_error(out, ref)
    assert err <= REFERENCE_TOLERANCE[dtype], (
        f"{what}: relative error {err:.3e} vs reference ({dtype})"
    )


def non_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The same values as ``x`` in a layout with a row stride wider than the row (a slice)."""
    wide = torch.empty(*x.shape[:-1], x.shape[-1] + 3, dtype=x.dtype, device=x.device)
    wide[..., : x.shape[-1]] = x
    view = wide[..., : x.shape[-1]]
    assert not view.is_contiguous()
    return view


def transposed_layout(x: torch.Tensor) -> torch.Tensor:
    """The same values as ``x`` (at least 2-D) stored with the first two dims swapped in memory."""
    stored = x.transpose(0, 1).contiguous()
    view = stored.transpose(0, 1)
    assert not view.is_contiguous()
    return view


def strided_vector(v: torch.Tensor) -> torch.Tensor:
    """The same values as the 1-D ``v`` (and its requires_grad), every other element of a wider
    buffer: the layout of a slice ``w[::2]``."""
    wide = torch.zeros(2 * v.numel(), dtype=v.dtype, device=v.device)
    view = wide[::2]
    view.copy_(v.detach())
    assert view.stride() == (2,)
    return view.requires_grad_(v.requires_grad)


def expanded_vector(v: torch.Tensor) -> torch.Tensor:
    """A 1-D view of ``v``'s first value repeated over ``v``'s length (stride 0, ``expand``), with
    ``v``'s requires_grad."""
    view = v.detach()[:1].clone().expand(v.numel())
    assert view.stride() == (0,)
    return view.requires_grad_(v.requires_grad)
