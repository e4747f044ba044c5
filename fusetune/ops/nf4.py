"""4-bit NF4 base weights (bitsandbytes' storage format): dequantisation for the fused LoRA paths.

``dense_weight(weight, dtype)`` is what every fused path calls to get a base weight as a dense
matrix: a plain tensor is cast, a bitsandbytes ``Params4bit`` is dequantised.

The format, as ``bitsandbytes.functional.quantize_4bit(..., quant_type="nf4")`` writes it: the
weight (``quant_state.shape``) is flattened and cut into blocks of ``quant_state.blocksize``
values (a power of two, 32-4096; the last block may be short); each value is stored as a 4-bit
index into the 16-entry NF4 table, two a byte, the even (first) element in the high nibble, so
``ceil(numel / 2)`` bytes in all (the parameter's storage may be another dtype, read as bytes).
Value ``i`` is ``NF4[code_i] * absmax[i // blocksize]``. ``absmax`` is float32, or with double
quantisation (``quant_state.nested``) one uint8 a block, itself decoded as
``state2.code[q] * state2.absmax[block // state2.blocksize] + quant_state.offset``.

The kernel does all of that in one launch: each program decodes several whole blocks (a 2-D tile
of blocks x bytes, so a block's scale is loaded once and broadcast), reads the packed bytes as
contiguous vectors, and writes both nibbles' values interleaved. All arithmetic is float32 with
the same operations and rounding as bitsandbytes (multiply-add contraction is switched off so the
nested scale rounds twice, as bitsandbytes' separate kernels do), and the output is rounded once
to the requested dtype: results equal ``bitsandbytes.functional.dequantize_4bit``'s bit for bit.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from fusetune.ops._launch import SUPPORTED_DTYPES, triton, use_triton

if triton is not None:
    import triton.language as tl

# Which implementation dense_weight uses for NF4 weights: "triton" (dequantize_nf4: the kernel on
# CUDA, the reference on CPU) or "bnb" (bitsandbytes' own dequantize_4bit); the benchmark flips it.
BACKEND = "triton"
_BACKENDS = ("triton", "bnb")

# The NF4 code book (QLoRA, Dettmers et al. 2023): quantiles of N(0, 1) scaled into [-1, 1].
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip

_BLOCKSIZES = tuple(2**k for k in range(5, 13))  # 32 ... 4096, what bitsandbytes writes

# Packed bytes each program decodes (blocksize 64: 64 blocks, 4096 output values).
_BYTES_PER_PROGRAM = 2048
_NUM_WARPS = 4


def is_4bit(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is a bitsandbytes 4-bit parameter (packed uint8 data plus a quant_state)."""
    return getattr(weight, "quant_state", None) is not None


@functools.cache
def _nf4_table(device: torch.device) -> torch.Tensor:
    return torch.tensor(NF4_VALUES, dtype=torch.float32, device=device)


# --------------------------------------------------------------------------------------------
# Checks shared by the kernel and the reference
# --------------------------------------------------------------------------------------------
def _numel(quant_state) -> int:
    n = 1
    for size in quant_state.shape:
        n *= int(size)
    return n


def _check(packed: torch.Tensor, quant_state, dtype: torch.dtype) -> torch.Tensor:
    """Validate the inputs; return the packed data as a flat uint8 tensor."""
    _check_dtype(dtype)
    return _packed_bytes(packed, quant_state)


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"fusetune.dequantize_nf4: output dtype {dtype} is not supported; ask for float32, "
            f"bfloat16 or float16."
        )


def _packed_bytes(packed: torch.Tensor, quant_state) -> torch.Tensor:
    """Validate the format; return the packed data as a flat uint8 tensor."""
    if quant_state.quant_type != "nf4":
        raise ValueError(
            f"fusetune.dequantize_nf4: quant_type is {quant_state.quant_type!r}, not 'nf4'; use "
            f"fusetune.ops.nf4.dense_weight (it hands other 4-bit types to bitsandbytes)."
        )
    if quant_state.blocksize not in _BLOCKSIZES:
        raise ValueError(
            f"fusetune.dequantize_nf4: blocksize {quant_state.blocksize} is not one bitsandbytes "
            f"writes (a power of two from 32 to 4096)."
        )
    data = packed.detach().contiguous()
    data = (data if data.dtype == torch.uint8 else data.view(torch.uint8)).reshape(-1)
    expected = (_numel(quant_state) + 1) // 2
    if data.numel() != expected:
        cast = (
            f" The bytes are stored as {packed.dtype}: if a sharding engine's mixed precision cast "
            f"them to another dtype, store them in the one it gathers in (quant_storage / "
            f"bnb_4bit_quant_storage = FSDP2's param_dtype)."
            if packed.dtype.is_floating_point
            else ""
        )
        raise ValueError(
            f"fusetune.dequantize_nf4: {data.numel()} packed bytes for shape "
            f"{tuple(quant_state.shape)}, which needs {expected}; pass the Params4bit's own data "
            f"with its quant_state.{cast}"
        )
    return data


def _check_out(out: torch.Tensor, quant_state, dtype: torch.dtype, device: torch.device) -> None:
    if (
        tuple(out.shape) != tuple(quant_state.shape)
        or out.dtype != dtype
        or out.device != device
        or not out.is_contiguous()
    ):
        raise ValueError(
            f"fusetune.dequantize_nf4: out must be a contiguous {dtype} tensor of shape "
            f"{tuple(quant_state.shape)} on {device}; got {out.dtype} {tuple(out.shape)} on "
            f"{out.device} (contiguous={out.is_contiguous()}). Allocate it with torch.empty."
        )


# --------------------------------------------------------------------------------------------
# PyTorch reference
# --------------------------------------------------------------------------------------------
def _block_scales(quant_state) -> torch.Tensor:
    """float32 absmax of every block, decoding the double quantisation when there is one."""
    if not quant_state.nested:
        return quant_state.absmax.float()
    state2 = quant_state.state2
    codes = quant_state.absmax.long()
    group = torch.arange(codes.numel(), device=codes.device) // state2.blocksize
    scaled = state2.code.float()[codes] * state2.absmax.float()[group]
    return scaled + quant_state.offset.float()


def dequantize_nf4_reference(packed: torch.Tensor, quant_state, dtype: torch.dtype) -> torch.Tensor:
    """The NF4 weight as a dense ``quant_state.shape`` tensor of ``dtype``, in plain PyTorch.

    Written from the storage format (see the module docstring), float32 maths, one rounding.
    """
    data = _check(packed, quant_state, dtype)
    n = _numel(quant_state)
    codes = torch.stack((data >> 4, data & 0xF), dim=-1).reshape(-1)[:n].long()
    values = _nf4_table(data.device)[codes]
    block = torch.arange(n, device=data.device) // quant_state.blocksize
    return (values * _block_scales(quant_state)[block]).to(dtype).reshape(quant_state.shape)


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _dequantize_nf4_kernel(
        packed_ptr,
        absmax_ptr,
        code2_ptr,
        absmax2_ptr,
        offset_ptr,
        table_ptr,
        out_ptr,
        n_bytes,
        n_out,
        n_blocks,
        HALF: tl.constexpr,
        BLOCKS: tl.constexpr,
        NESTED: tl.constexpr,
        BLOCKSIZE2: tl.constexpr,
    ):
        # A tile of BLOCKS quantisation blocks x HALF packed bytes (blocksize = 2 * HALF).
        block = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
        in_range = block < n_blocks
        if NESTED:
            q = tl.load(absmax_ptr + block, mask=in_range, other=0).to(tl.int32)
            scale = tl.load(code2_ptr + q) * tl.load(
                absmax2_ptr + block // BLOCKSIZE2, mask=in_range, other=0.0
            )
            scale = scale + tl.load(offset_ptr)
        else:
            scale = tl.load(absmax_ptr + block, mask=in_range, other=0.0).to(tl.float32)

        byte = block[:, None] * HALF + tl.arange(0, HALF)[None, :]
        packed = tl.load(packed_ptr + byte, mask=byte < n_bytes, other=0).to(tl.int32)
        high = tl.load(table_ptr + (packed >> 4)) * scale[:, None]
        low = tl.load(table_ptr + (packed & 0xF)) * scale[:, None]
        values = tl.interleave(high, low)  # (BLOCKS, 2 * HALF): element 2j from high nibble j

        index = block[:, None] * (2 * HALF) + tl.arange(0, 2 * HALF)[None, :]
        tl.store(out_ptr + index, values.to(out_ptr.dtype.element_ty), mask=index < n_out)


class _LaunchPlan(NamedTuple):
    """Everything one weight's kernel launch needs apart from ``out``, worked out once per weight."""

    source: tuple[int, int]  # the packed data's (address, bytes) when planned: reused only for those
    scales: tuple  # absmax, then (code2, absmax2, offset) with double quantisation (else unread)
    table: torch.Tensor
    grid: tuple[int]
    n_bytes: int
    n_out: int
    n_blocks: int
    constants: dict


# A weight's plan lives on its quant_state under this attribute (QuantState is unhashable, so no
# dictionary can key on it): dequantising a weight is a few microseconds of GPU work, and checking
# and preparing its arguments on every call would cost the host more than that (4-bit training
# dequantises each weight three times a step). A plan holds no reference to the packed data, so a
# weight moved or freed is not kept alive by it.
_PLAN_ATTRIBUTE = "_fusetune_launch_plan"


def _launch_plan(packed: torch.Tensor, quant_state) -> _LaunchPlan:
    """The checked launch arguments of ``packed`` + ``quant_state`` (cached per quant_state)."""
    plan = getattr(quant_state, _PLAN_ATTRIBUTE, None)
    source = (packed.data_ptr(), packed.numel() * packed.element_size())
    if plan is not None and plan.source == source:
        return plan
    data = _packed_bytes(packed, quant_state)
    n = _numel(quant_state)
    half = quant_state.blocksize // 2
    blocks = max(1, _BYTES_PER_PROGRAM // half)
    n_blocks = triton.cdiv(n, quant_state.blocksize)
    if quant_state.nested:
        state2 = quant_state.state2
        scales = (
            quant_state.absmax,
            state2.code.float(),
            state2.absmax.float(),
            quant_state.offset.float().reshape(1),
        )
        blocksize2 = int(state2.blocksize)
    else:
        scales = (quant_state.absmax,) * 4  # only the first is read
        blocksize2 = 1
    plan = _LaunchPlan(
        source,
        scales,
        _nf4_table(data.device),
        (triton.cdiv(n_blocks, blocks),),
        data.numel(),
        n,
        n_blocks,
        {"HALF": half, "BLOCKS": blocks, "NESTED": bool(quant_state.nested), "BLOCKSIZE2": blocksize2},
    )
    setattr(quant_state, _PLAN_ATTRIBUTE, plan)
    return plan


def _dequantize_nf4_triton(packed: torch.Tensor, plan: _LaunchPlan, out: torch.Tensor) -> torch.Tensor:
    if plan.n_out == 0:
        return out
    data = packed if packed.is_contiguous() else packed.contiguous()
    data = data if data.dtype == torch.uint8 else data.view(torch.uint8)  # the kernel reads bytes
    _dequantize_nf4_kernel[plan.grid](
        data,
        *plan.scales,
        plan.table,
        out,
        plan.n_bytes,
        plan.n_out,
        plan.n_blocks,
        **plan.constants,
        num_warps=_NUM_WARPS,
        enable_fp_fusion=False,
    )
    return out


def dequantize_nf4(
    packed: torch.Tensor, quant_state, dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The NF4 weight stored as ``packed`` + ``quant_state`` as a dense tensor of ``dtype``.

    packed: a bitsandbytes Params4bit's data (any storage dtype, read as bytes); quant_state: its
    ``quant_state`` (nf4, nested or not); dtype: float32, bfloat16 or float16. ``out``: an optional
    contiguous buffer of ``quant_state.shape`` and ``dtype`` to write into (and return), so a caller
    can reuse one per layer. One Triton launch on CUDA (or under the interpreter), the reference
    otherwise; both equal bitsandbytes' dequantize_4bit bit for bit.
    """
    if not use_triton(packed):
        result = dequantize_nf4_reference(packed, quant_state, dtype)
        if out is not None:
            _check_out(out, quant_state, dtype, packed.device)
        return result if out is None else out.copy_(result)
    _check_dtype(dtype)
    plan = _launch_plan(packed, quant_state)
    if out is None:
        out = torch.empty(tuple(quant_state.shape), dtype=dtype, device=packed.device)
    else:
        _check_out(out, quant_state, dtype, packed.device)
    return _dequantize_nf4_triton(packed, plan, out)


# --------------------------------------------------------------------------------------------
# What the fused paths call
# --------------------------------------------------------------------------------------------
def _dequantize_bnb(weight: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
    """bitsandbytes' own dequantize_4bit (FP4 weights, or BACKEND == "bnb"). It writes the
    quantised weight's original dtype (another ``dtype`` costs a cast) and takes ``out`` on CUDA
    only (its CPU backend has no out= variant)."""
    import bitsandbytes.functional as bnb_functional

    state = weight.quant_state
    if out is not None and dtype == state.dtype and out.is_cuda:
        return bnb_functional.dequantize_4bit(weight.data, state, out=out)
    result = bnb_functional.dequantize_4bit(weight.data, state).to(dtype)
    return result if out is None else out.copy_(result)


def dense_weight(
    weight: torch.Tensor, dtype: torch.dtype, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``weight`` as a dense (out, in) matrix of ``dtype``; a 4-bit weight is dequantised.

    A plain tensor is cast (returned as is, without a copy, when it already has ``dtype``; ``out``
    is used only when a cast is needed). A bitsandbytes NF4 weight goes through
    :func:`dequantize_nf4` (or bitsandbytes' dequantize_4bit when ``BACKEND == "bnb"``); other
    4-bit types (FP4) always go to bitsandbytes' dequantize_4bit. ``out``: an optional buffer of
    the weight's shape and ``dtype`` that receives the result.
    """
    if not is_4bit(weight):
        if out is None or weight.dtype == dtype:
            return weight.to(dtype)
        return out.copy_(weight)
    if BACKEND not in _BACKENDS:
        raise ValueError(f"fusetune.ops.nf4.BACKEND is {BACKEND!r}; set it to 'triton' or 'bnb'.")
    state = weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        raise ValueError(
            "fusetune: this 4-bit weight was repacked by bitsandbytes for its CPU inference kernel "
            "(Linear4bit.forward in eval mode without gradients); run the layer in train mode or "
            "with gradients enabled before using fusetune's fused paths on it."
        )
    if state.quant_type == "nf4" and BACKEND == "triton":
        return dequantize_nf4(weight.data, state, dtype, out=out)
    return _dequantize_bnb(weight, dtype, out)
