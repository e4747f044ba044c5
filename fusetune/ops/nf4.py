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

import copy
import functools
from collections.abc import Sequence
from typing import NamedTuple

import torch

from fusetune.ops._direct_launch import direct_launch
from fusetune.ops._launch import SUPPORTED_DTYPES, cdiv, public_eager_op, triton, use_triton

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


def _check_out(out: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    if (
        tuple(out.shape) != shape
        or out.dtype != dtype
        or out.device != device
        or not out.is_contiguous()
    ):
        raise ValueError(
            f"fusetune.dequantize_nf4: out must be a contiguous {dtype} tensor of shape "
            f"{shape} on {device}; got {out.dtype} {tuple(out.shape)} on "
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

    @direct_launch
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
        window_blocks,
        row_blocks,
        first_block,
        HALF: tl.constexpr,
        BLOCKS: tl.constexpr,
        NESTED: tl.constexpr,
        BLOCKSIZE2: tl.constexpr,
    ):
        # A tile of BLOCKS output blocks x HALF packed bytes (blocksize = 2 * HALF). Output block b
        # is source block first_block + (b // window_blocks) * row_blocks + b % window_blocks: the
        # window's rows are window_blocks wide, the weight's row_blocks (the whole weight: equal).
        block = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
        in_range = block < n_blocks
        source = first_block + (block // window_blocks) * row_blocks + block % window_blocks
        if NESTED:
            q = tl.load(absmax_ptr + source, mask=in_range, other=0).to(tl.int32)
            scale = tl.load(code2_ptr + q) * tl.load(
                absmax2_ptr + source // BLOCKSIZE2, mask=in_range, other=0.0
            )
            scale = scale + tl.load(offset_ptr)
        else:
            scale = tl.load(absmax_ptr + source, mask=in_range, other=0.0).to(tl.float32)

        byte = source[:, None] * HALF + tl.arange(0, HALF)[None, :]
        packed = tl.load(packed_ptr + byte, mask=in_range[:, None] & (byte < n_bytes), other=0).to(tl.int32)
        high = tl.load(table_ptr + (packed >> 4)) * scale[:, None]
        low = tl.load(table_ptr + (packed & 0xF)) * scale[:, None]
        values = tl.interleave(high, low)  # (BLOCKS, 2 * HALF): element 2j from high nibble j

        index = block[:, None] * (2 * HALF) + tl.arange(0, 2 * HALF)[None, :]
        tl.store(out_ptr + index, values.to(out_ptr.dtype.element_ty), mask=index < n_out)


class _Window(NamedTuple):
    """Which blocks one launch decodes: the whole weight, or a rectangle of whole blocks of a 2-D
    weight (the kernel's ``window_blocks``, ``row_blocks`` and ``first_block``)."""

    shape: tuple[int, ...]
    grid: tuple[int]
    n_out: int
    n_blocks: int
    window_blocks: int
    row_blocks: int
    first_block: int


class _LaunchPlan(NamedTuple):
    """Everything one weight's kernel launch needs apart from ``out``, worked out once per weight."""

    source: tuple[int, int]  # the packed data's (address, bytes) when planned: reused only for those
    scales: tuple  # absmax, then (code2, absmax2, offset) with double quantisation (else unread)
    table: torch.Tensor
    n_bytes: int
    whole: _Window
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
    n_blocks = cdiv(n, quant_state.blocksize)
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
    # The whole weight is one row of n_blocks blocks (the last one may be short).
    whole = _Window(
        tuple(quant_state.shape), (cdiv(n_blocks, blocks),), n, n_blocks,
        max(n_blocks, 1), max(n_blocks, 1), 0,
    )
    plan = _LaunchPlan(
        source,
        scales,
        _nf4_table(data.device),
        data.numel(),
        whole,
        {"HALF": half, "BLOCKS": blocks, "NESTED": bool(quant_state.nested), "BLOCKSIZE2": blocksize2},
    )
    setattr(quant_state, _PLAN_ATTRIBUTE, plan)
    return plan


def _is_whole(rows: slice, cols: slice) -> bool:
    return rows == slice(None) and cols == slice(None)


def _window_bounds(quant_state, rows: slice, cols: slice) -> tuple[range, range]:
    """The rows and columns of a window, checked: a 2-D weight whose rows are whole blocks, and
    columns that start and stop on block boundaries (what :func:`dense_slices` proposes)."""
    shape, blocksize = tuple(quant_state.shape), quant_state.blocksize
    if len(shape) != 2 or shape[1] % blocksize:
        raise ValueError(
            f"fusetune.dequantize_nf4: a window needs a 2-D weight whose rows are whole blocks of "
            f"{blocksize}; this one is {shape}. Dequantise it whole (rows and cols left out)."
        )
    row_range, col_range = range(*rows.indices(shape[0])), range(*cols.indices(shape[1]))
    unit_steps = row_range.step == 1 and col_range.step == 1
    if not unit_steps or col_range.start % blocksize or len(col_range) % blocksize:
        raise ValueError(
            f"fusetune.dequantize_nf4: window rows {rows}, cols {cols} of a {shape} weight must be "
            f"unit-step slices whose columns start and end on multiples of the blocksize "
            f"({blocksize}); take them from fusetune.ops.nf4.dense_slices."
        )
    return row_range, col_range


def _window(plan: _LaunchPlan, quant_state, rows: slice, cols: slice) -> _Window:
    if _is_whole(rows, cols):
        return plan.whole
    row_range, col_range = _window_bounds(quant_state, rows, cols)
    blocksize = quant_state.blocksize
    window_blocks, row_blocks = len(col_range) // blocksize, quant_state.shape[1] // blocksize
    n_blocks = len(row_range) * window_blocks
    return _Window(
        (len(row_range), len(col_range)),
        (cdiv(n_blocks, plan.constants["BLOCKS"]),),
        n_blocks * blocksize,
        n_blocks,
        max(window_blocks, 1),
        row_blocks,
        row_range.start * row_blocks + col_range.start // blocksize,
    )


def _dequantize_nf4_triton(
    packed: torch.Tensor, plan: _LaunchPlan, window: _Window, out: torch.Tensor
) -> torch.Tensor:
    if window.n_out == 0:
        return out
    data = packed if packed.is_contiguous() else packed.contiguous()
    data = data if data.dtype == torch.uint8 else data.view(torch.uint8)  # the kernel reads bytes
    _dequantize_nf4_kernel[window.grid](
        data,
        *plan.scales,
        plan.table,
        out,
        plan.n_bytes,
        window.n_out,
        window.n_blocks,
        window.window_blocks,
        window.row_blocks,
        window.first_block,
        **plan.constants,
        num_warps=_NUM_WARPS,
        enable_fp_fusion=False,
    )
    return out


@public_eager_op
def dequantize_nf4(
    packed: torch.Tensor,
    quant_state,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
    *,
    rows: slice = slice(None),
    cols: slice = slice(None),
) -> torch.Tensor:
    """The NF4 weight stored as ``packed`` + ``quant_state`` as a dense tensor of ``dtype``.

    packed: a bitsandbytes Params4bit's data (any storage dtype, read as bytes); quant_state: its
    ``quant_state`` (nf4, nested or not); dtype: float32, bfloat16 or float16. ``rows``, ``cols``:
    a window ``weight[rows, cols]`` of a 2-D weight to decode instead of all of it (unit-step
    slices, the columns on block boundaries: see :func:`dense_slices`), so a caller can bound the
    dense memory a large weight needs. ``out``: an optional contiguous buffer of the result's shape
    and ``dtype`` to write into (and return). One Triton launch on CUDA (or under the interpreter),
    the reference otherwise; both equal bitsandbytes' dequantize_4bit bit for bit.
    """
    if not isinstance(rows, slice) or not isinstance(cols, slice):
        raise TypeError(
            f"fusetune.dequantize_nf4: rows and cols are slices of the weight (weight[rows, cols]), got "
            f"{type(rows).__name__} and {type(cols).__name__}; for row i alone pass rows=slice(i, i + 1)."
        )
    if not use_triton(packed):
        result = dequantize_nf4_reference(packed, quant_state, dtype)
        if not _is_whole(rows, cols):
            _window_bounds(quant_state, rows, cols)
            result = result[rows, cols].contiguous()
        if out is not None:
            _check_out(out, tuple(result.shape), dtype, packed.device)
        return result if out is None else out.copy_(result)
    _check_dtype(dtype)
    plan = _launch_plan(packed, quant_state)
    window = _window(plan, quant_state, rows, cols)
    if out is None:
        out = torch.empty(window.shape, dtype=dtype, device=packed.device)
    else:
        _check_out(out, window.shape, dtype, packed.device)
    return _dequantize_nf4_triton(packed, plan, window, out)


# --------------------------------------------------------------------------------------------
# What the fused paths call
# --------------------------------------------------------------------------------------------
# The most bytes a fused path dequantises a large 4-bit weight into at once: it takes the weight
# in slices of rows or columns (dense_slices) rather than as one dense copy. At 64 MiB a Llama-3
# 8B MLP weight (112 MiB in bf16) takes two slices. bench/nf4.py measures the trade on the H200:
# a fused LoRA MLP's forward + backward (4,096 tokens) took 4.87 ms and 403 MiB with 64 MiB
# slices, 5.09 ms and 459 MiB whole, 6.52 ms and 354 MiB with 32 MiB slices.
DENSE_SLICE_BYTES = 64 * 2**20


def _dequantize_bnb(
    weight: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None, rows: slice, cols: slice
) -> torch.Tensor:
    """bitsandbytes' own dequantize_4bit (FP4 weights, or BACKEND == "bnb"), straight into
    ``dtype`` as its matmul decodes (it writes ``quant_state.dtype``: a shallow copy of the state
    names ``dtype`` instead). It takes ``out`` on CUDA only (its CPU backend has no out= variant).
    It has no windows: a window is cut from the whole weight, so only fusetune's NF4 kernel saves
    the memory."""
    import bitsandbytes.functional as bnb_functional

    state = weight.quant_state
    if state.dtype != dtype:
        state = copy.copy(state)
        state.dtype = dtype
    whole = _is_whole(rows, cols)
    if whole and out is not None and out.is_cuda:
        return bnb_functional.dequantize_4bit(weight.data, state, out=out)
    result = bnb_functional.dequantize_4bit(weight.data, state)
    if not whole:
        result = result[rows, cols].contiguous()
    return result if out is None else out.copy_(result)


def decoded_by_fusetune(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is a 4-bit weight that fusetune's NF4 kernel decodes (an NF4 one while
    ``BACKEND`` is ``"triton"``); other 4-bit weights go to bitsandbytes' dequantize_4bit."""
    return is_4bit(weight) and weight.quant_state.quant_type == "nf4" and BACKEND == "triton"


def decode_dtype(via: torch.dtype | None, dtype: torch.dtype) -> torch.dtype:
    """The dtype to decode a 4-bit weight into for values rounded to ``via`` and then cast to
    ``dtype``: ``dtype`` itself unless ``via`` is a 16-bit dtype other than it (decoding is float32
    maths rounded once, so rounding to float32 on the way changes nothing)."""
    return dtype if via in (None, torch.float32, dtype) else via


def dense_weight(
    weight: torch.Tensor,
    dtype: torch.dtype,
    *,
    backward: bool = False,
    out: torch.Tensor | None = None,
    rows: slice = slice(None),
    cols: slice = slice(None),
) -> torch.Tensor:
    """``weight[rows, cols]`` as a dense matrix of ``dtype``; a 4-bit weight is dequantised.

    A plain tensor is sliced and cast (a view, without a copy, when it already has ``dtype``;
    ``out`` is used only when a cast is needed). A bitsandbytes NF4 weight goes through
    :func:`dequantize_nf4`, which decodes just the window (or bitsandbytes' dequantize_4bit when
    ``BACKEND == "bnb"``); other 4-bit types (FP4) always go to bitsandbytes' dequantize_4bit.
    ``rows``/``cols``: the whole weight by default; windows of a 4-bit weight come from
    :func:`dense_slices`. ``out``: an optional buffer of the result's shape and ``dtype``.

    ``backward``: the 4-bit weight as bitsandbytes' backward multiplies by it. Its forward decodes
    straight into the matmul's dtype, but ``MatMul4Bit.backward`` decodes into the dtype the weight
    was quantised from (``quant_state.dtype``) and casts that, so where that is a 16-bit dtype other
    than ``dtype`` (a bfloat16 model with a float32 compute dtype) its values are rounded to it
    first (:func:`decode_dtype`).
    """
    if not is_4bit(weight):
        window = weight if _is_whole(rows, cols) else weight[rows, cols]
        if out is None or window.dtype == dtype:
            return window.to(dtype)
        return out.copy_(window)
    if BACKEND not in _BACKENDS:
        raise ValueError(f"fusetune.ops.nf4.BACKEND is {BACKEND!r}; set it to 'triton' or 'bnb'.")
    state = weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        raise ValueError(
            "fusetune: this 4-bit weight was repacked by bitsandbytes for its CPU inference kernel "
            "(a Linear4bit's first forward in eval mode without gradients does it, for good): load or "
            "quantise the model again, and run it in train mode or with gradients enabled before "
            "fusetune's fused paths read it."
        )
    decode = decode_dtype(state.dtype if backward else None, dtype)
    target = out if decode == dtype else None
    if decoded_by_fusetune(weight):
        decoded = dequantize_nf4(weight.data, state, decode, out=target, rows=rows, cols=cols)
    else:
        decoded = _dequantize_bnb(weight, decode, target, rows, cols)
    if decode == dtype:
        return decoded
    return decoded.to(dtype) if out is None else out.copy_(decoded)


def dense_slices(weights: Sequence[torch.Tensor], dim: int, dtype: torch.dtype) -> list[slice]:
    """Slices along ``dim`` (0: rows, 1: columns) of weights that share that dim, such that
    ``dense_weight(w, dtype, rows=s)`` (or ``cols=s``) is at most ``DENSE_SLICE_BYTES`` for each.

    Only 4-bit NF4 weights decoded by fusetune's kernel are sliced: a plain weight is a view
    anyway and bitsandbytes has no windows, so otherwise (and for weights that fit, or whose rows
    are not whole quantisation blocks) the answer is ``[slice(None)]``, one piece. Slices start on
    multiples of the largest blocksize: column slices must be whole blocks, and row slices, which
    become column slices of a matmul's output, stay aligned for cuBLAS.
    """
    sliced = [w for w in weights if is_4bit(w)]
    if not sliced or BACKEND != "triton" or any(w.quant_state.quant_type != "nf4" for w in sliced):
        return [slice(None)]
    shapes = [tuple(w.quant_state.shape) for w in sliced]
    blocksize = max(w.quant_state.blocksize for w in sliced)
    if any(len(s) != 2 or s[1] % blocksize for s in shapes):
        return [slice(None)]
    length = shapes[0][dim]
    unit = blocksize  # column slices must be whole blocks; row slices so keep outputs aligned
    widest = max(s[1 - dim] for s in shapes) * dtype.itemsize
    most = max(DENSE_SLICE_BYTES // widest // unit, 1) * unit
    if most >= length:
        return [slice(None)]
    pieces = -(-length // most)
    step = -(-length // (pieces * unit)) * unit  # as even as the units allow, never above most
    return [slice(start, min(start + step, length)) for start in range(0, length, step)]
