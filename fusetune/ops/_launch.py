"""Helpers shared by every op: where an op runs, how its rows are laid out, and block sizes.

Dispatch rule (one place, so every op agrees): CUDA tensors, or any tensor while the Triton
interpreter is on (``TRITON_INTERPRET=1``, how the CPU test suite runs the real kernels), go to
the Triton kernels; plain CPU tensors go to the op's PyTorch reference.
"""

from __future__ import annotations

import functools
import os

import torch

try:  # Triton is a Linux dependency; without it every op uses its reference.
    import triton
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# The widest row a single-pass row kernel keeps in registers; wider rows loop over blocks.
MAX_FUSED_ROW = 65536


def interpreting() -> bool:
    """True while Triton's CPU interpreter is switched on."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def capturing() -> bool:
    """True while the current CUDA stream is being captured into a CUDA graph.

    Captured work may not read values on the host (no ``.item()``, no ``nonzero``, no waiting on
    an event), so the ops switch their host checks and data-dependent shapes off then (see
    ``fusetune.graphs``, which checks labels before each replay instead).
    """
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


_BETWEEN_GRAPHS = (
    "fusetune runs this op eagerly between compiled graphs (one graph break a call), so "
    "fullgraph=True cannot hold around it; see fusetune.ops._launch.outside_compiled_graphs"
)


def outside_compiled_graphs(op=None, *, reason: str = _BETWEEN_GRAPHS):
    """``op`` as torch.compile sees it: a call it runs as it is, between compiled graphs, instead
    of one it traces into. Each call is one graph break, so ``fullgraph=True`` is refused, with
    ``reason`` in torch.compile's error; the results are eager's. As a decorator, with or without
    ``reason``.

    For the calls that do not launch through custom ops (``_graph_ops``): ``cross_entropy``, whose
    host side (label counts read back, label checks raised in backward, CUDA-graph checks) does not
    fit a traced graph, ``linear_cross_entropy`` where its custom op does not take the call, and the
    LoRA paths, which hold outputs between calls and read their weights as eager code. Traced into,
    the losses' kernels became Inductor's user-defined Triton kernels and failed to compile on an
    H200 (torch 2.11).
    """
    if op is None:
        return lambda function: torch.compiler.disable(function, reason=reason)
    return torch.compiler.disable(op, reason=reason)


def on_input_device(op):
    """``op`` run with its first tensor argument's CUDA device as the current device.

    Triton launches on the current device and its stream, not on the device of the pointers it is
    given; torch does not switch devices for it. In a model split over GPUs (``device_map="auto"``)
    a layer on ``cuda:1`` is called while ``cuda:0`` is current, so without this its kernels would
    run on ``cuda:0`` reading ``cuda:1``'s memory, out of order with ``cuda:1``'s stream (a wrong
    result or an illegal address). Backward needs no guard: autograd runs each node's backward
    with its device current. Costs a device query a call; switches only where the devices differ.
    While torch.compile traces, the call goes through as it is: the custom ops it records switch
    devices when they run (``_graph_ops.graph_op``).
    """

    @functools.wraps(op)
    def call(*args, **kwargs):
        if torch.compiler.is_compiling():
            return op(*args, **kwargs)
        device = cuda_device_of((*args, *kwargs.values()))
        if device is None or device.index == torch.cuda.current_device():
            return op(*args, **kwargs)
        with torch.cuda.device(device):
            return op(*args, **kwargs)

    return call


def cuda_device_of(args: tuple) -> torch.device | None:
    """The device of the first tensor in ``args`` (a call's positional arguments, then its keyword
    arguments' values) when that is a CUDA device with an index, else None (CPU tensors, the
    interpreter's, and no tensor at all need no device switch)."""
    for arg in args:
        if isinstance(arg, torch.Tensor):
            return arg.device if arg.is_cuda and arg.device.index is not None else None
    return None


def public_op(op):
    """The wrapping of a public op whose launches are custom ops (``_graph_ops``): run on its input's
    device (:func:`on_input_device`); torch.compile traces it into its graph."""
    return on_input_device(op)


def public_eager_op(op):
    """The wrapping of a public op that torch.compile cannot trace: run on its input's device
    (:func:`on_input_device`) and as it is between torch.compile's graphs
    (:func:`outside_compiled_graphs`)."""
    return outside_compiled_graphs(on_input_device(op))


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """Whether the Triton kernels should run for these inputs (see the module docstring)."""
    if triton is None:
        return False
    present = [t for t in tensors if t is not None]
    return interpreting() or any(t.is_cuda for t in present)


def check_float(name: str, tensor: torch.Tensor) -> None:
    """Reject dtypes the kernels do not claim, naming the fix."""
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"fusetune: {name} has dtype {tensor.dtype}; the fused ops take float32, bfloat16 "
            f"or float16 (cast it with .to(torch.bfloat16) or .float())."
        )


def check_same_device(name: str, reference: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Reject ``others`` (those not None) on another device than ``reference`` (called ``name``),
    naming the fix. The kernels would otherwise fail on a pointer they cannot read, or read another
    GPU's memory out of order with its stream; the loss ops' labels are the input most often left
    behind on the CPU."""
    for other_name, tensor in others.items():
        if tensor is not None and tensor.device != reference.device:
            raise ValueError(
                f"fusetune: {other_name} is on {tensor.device} but {name} is on {reference.device}; "
                f"move it there with .to({name}.device)."
            )


def memory_order(x: torch.Tensor) -> list[int] | None:
    """A permutation of ``x``'s dims, the last kept last, under which ``x`` is contiguous, when ``x``
    is not contiguous itself but is a permuted view of dense memory with a contiguous last dim
    (attention's (B, H, T, D) view of a (B, T, H, D) projection); None otherwise.

    A row-wise op can then read and write such a tensor's rows in place, in memory order, where
    :func:`as_rows` would copy it (and an op that saves its input for backward would keep the copy).
    """
    if x.dim() < 3 or x.stride(-1) != 1 or x.is_contiguous():
        return None
    # The leading dims by falling stride, ties in their own order: an insertion sort, which
    # torch.compile traces where strides are symbolic (it cannot trace ``sorted`` keyed by them).
    strides, order = x.stride(), []
    for dim in range(x.dim() - 1):
        place = 0
        while place < len(order) and strides[order[place]] >= strides[dim]:
            place += 1
        order.insert(place, dim)
    order.append(x.dim() - 1)
    return order if x.permute(order).is_contiguous() else None


def inverse_order(order: list[int]) -> list[int]:
    """The permutation that undoes ``order`` (``t.permute(order).permute(inverse_order(order))`` is t)."""
    return sorted(range(len(order)), key=order.__getitem__)


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """View ``x`` as (rows, last dim) with unit stride along the last dim.

    Leading dims are flattened; a copy is made only when the layout cannot be viewed that way
    (the kernels take a row stride, so a strided row layout such as a slice is kept as is).
    """
    if x.dim() == 0:
        raise ValueError("fusetune: expected a tensor with at least one dimension, got a scalar.")
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.dim() == 2:
        return x
    return x.reshape(-1, x.shape[-1])  # a view where the strides allow one (no exception to trace)


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul of ``x`` runs in: autocast's where autocast is on for x's device (as
    ``F.linear`` would), else x's."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def unit_stride(vector: torch.Tensor | None) -> torch.Tensor | None:
    """A per-feature vector (a norm's weight or bias) with unit stride, as the kernels index it:
    a copy only for a strided or expanded view (a slice ``w[::2]``, ``w.expand(n)``), None as is."""
    if vector is None or vector.stride(-1) == 1:
        return vector
    return vector.contiguous()


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for n <= 1). Plain Python: Triton 3.9's own is a
    ``constexpr_function`` costing microseconds a call, and launches compute several."""
    return 1 << (int(n) - 1).bit_length() if n > 1 else 1


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for non-negative ints (what ``triton.cdiv`` computes, without its wrapper)."""
    return -(-int(a) // int(b))


def block_for(n_cols: int, limit: int = MAX_FUSED_ROW) -> int:
    """Power-of-two block that holds a row of ``n_cols`` elements (capped at ``limit``)."""
    return min(limit, next_power_of_2(n_cols))


# Narrow rows (per-head norms of Qwen3 or Gemma 3: 128 or 256 wide, over tokens x heads; vision
# towers' norms: 1,024-1,280 wide) would launch a program for every few hundred bytes. Rows up to
# ROW_TILE / 2 wide are taken several to a program, ROW_TILE elements in all
# (``rows_per_program``), and a persistent backward over rows whose block is up to NARROW_BLOCK
# runs _NARROW_PROGRAMS_PER_SM programs an SM. Measured on an H200 with bench/tune_rows.py --narrow
# (rows-tuning-h200-narrow*.jsonl, kernel time over 5 tiles x 3 programs an SM): these settings
# were within 4% of the best at 262144 x 128 and 131072 x 256 (RMSNorm) and the best at
# 32768 x 1024 (LayerNorm, 0.113 ms against 0.145-0.181 with two programs an SM). With 2,048-wide
# blocks too (ops-h200-vision-norms*.jsonl, same call) Qwen2.5-VL's vision RMSNorm (32768 x 1280)
# went from 0.199 to 0.156 ms and SigLIP's LayerNorm (32768 x 1152) from 0.228 to 0.186 ms, the
# other shapes within 1%.
ROW_TILE = 1024
NARROW_BLOCK = 2048
_NARROW_PROGRAMS_PER_SM = 8


def rows_per_program(block: int) -> int:
    """Rows a row kernel's program takes at once when each row fits a ``block``: one for rows
    wider than ``ROW_TILE`` / 2, else as many as fill ``ROW_TILE`` elements."""
    return max(1, ROW_TILE // block)


if triton is not None:
    import triton.language as tl

    @triton.jit
    def row_tile(first_row, n_rows, col_mask, ROWS: tl.constexpr):
        """Rows ``first_row`` .. ``first_row + ROWS - 1`` of a (rows x block) tile: their indices,
        the same as int64 column vectors (for offsets past 2^31), which of them exist, and the
        tile's mask (rows that exist by columns in ``col_mask``)."""
        rows = first_row + tl.arange(0, ROWS)
        in_rows = rows < n_rows
        return rows, tl.cast(rows, tl.int64)[:, None], in_rows, in_rows[:, None] & col_mask[None, :]


def warps_for(block: int) -> int:
    """num_warps for a row kernel whose block holds ``block`` elements.

    Tiles of up to 1,024 elements (``ROW_TILE``: narrow rows, several to a tile) take two warps: on an
    H200 RMSNorm at 131072 x 256 and 262144 x 128 went from 0.101 / 0.097 ms with four to
    0.096 / 0.094 (kernel time, bench/kernel_variants.py, ops-h200-narrow-*.jsonl, one call)."""
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 2


# Rows that fill at most three quarters of a block wider than ROW_TILE (one row a tile, or two for
# LayerNorm's 2,048-wide blocks: hidden 2,304, 2,560, 3,072, 5,120, 5,376 of Gemma 2 and 3,
# Llama-3.2-3B and Qwen2.5-14B; the vision towers' 1,152 and 1,280) run half the warps ``warps_for``
# gives the block, so that a thread still holds 18-21 of the row's elements. On an H200
# (bench/tune_rows.py --odd, kernel time) that was the best warps setting for RMSNorm at 16,384 x
# 2,304, 5,120 and 5,376 (5-7% faster, rows-tuning-h200-odd.jsonl) and 32,768 x 1,280 (8% with 4
# programs an SM, 6% with the shipped 8), and LayerNorm at 32,768 x 1,152 (0.150 -> 0.125 ms,
# rows-tuning-h200-odd-vision.jsonl); rows filling 88% of their block (3,584) gained nothing past 2%.
def partly_filled(n_cols: int, block: int) -> bool:
    """Whether rows of ``n_cols`` in ``block`` take the part-filled rows' launch (above)."""
    return block > ROW_TILE and 4 * n_cols <= 3 * block


def row_warps(n_cols: int, block: int, rows: int) -> int:
    """num_warps of a norm program over ``rows`` rows of ``n_cols`` held in ``block``-wide tiles."""
    warps = warps_for(block * rows)
    return warps // 2 if partly_filled(n_cols, block) else warps


# Programs per SM in a persistent backward grid; under the interpreter a few programs suffice
# (and still make each program loop over several rows).
_PROGRAMS_PER_SM = 2
_INTERPRETER_PROGRAMS = 4


@functools.cache
def _cuda_sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device; under the interpreter a small stand-in, so that
    persistent kernels still make each program loop over several rows in the CPU tests."""
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return _INTERPRETER_PROGRAMS


def persistent_programs(n_rows: int, device: torch.device, block: int | None = None) -> int:
    """How many programs a persistent row-loop backward grid launches (at most one per row, or per
    group of rows when rows are taken several at a time) over rows that fit ``block``.

    Bounded by a small multiple of the SM count so the fp32 partial-sum buffer for parameter
    gradients (``partial_sums``) stays ``programs x hidden``, whatever the number of rows; rows
    whose block is up to ``NARROW_BLOCK`` get more programs an SM (see above).
    """
    per_sm = 1
    if device.type == "cuda":
        narrow = block is not None and block <= NARROW_BLOCK
        per_sm = _NARROW_PROGRAMS_PER_SM if narrow else _PROGRAMS_PER_SM
    return min(n_rows, per_sm * sm_count(device))


def check_row_width(n_cols: int) -> None:
    """Reject rows wider than the single-block row kernels hold."""
    if n_cols > MAX_FUSED_ROW:
        raise ValueError(
            f"fusetune: the last dim is {n_cols} wide; the fused norm kernels hold a whole row "
            f"in one block, up to {MAX_FUSED_ROW}. Use the op's *_reference function for wider "
            f"rows."
        )
