"""NF4 dequantisation: the kernel and the reference vs bitsandbytes' dequantize_4bit, and dense_weight.

float32 and float16 results must equal bitsandbytes' bit for bit. bfloat16 too when compiled; under
the interpreter Triton casts float32 to bfloat16 by truncation instead of rounding to nearest, so
there the kernel may sit one bfloat16 ulp below the correctly rounded value.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from fusetune.ops import nf4
from fusetune.ops._launch import interpreting
from fusetune.ops.nf4 import dense_weight, dequantize_nf4, dequantize_nf4_reference
from tests.ops import checks

bnb = pytest.importorskip("bitsandbytes")
bnb_functional = pytest.importorskip("bitsandbytes.functional")

SHAPES = ((37, 70), (5, 64), (1, 1000))  # none a multiple of 128 values; 1000 not of 64 either


def quantized(shape, blocksize=64, nested=True, seed=0, storage=torch.uint8):
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(*shape, generator=gen) * 0.05).to(checks.DEVICE)
    return bnb_functional.quantize_4bit(
        weight, blocksize=blocksize, compress_statistics=nested, quant_type="nf4", quant_storage=storage
    )


def bnb_dequantize(packed, state, dtype):
    """bitsandbytes' own dequantisation of the same bytes into ``dtype``.

    On CPU the bytes are decoded as one row: bitsandbytes 0.50's CPU kernel (used when the last dim
    is even) assigns blocks row by row and misplaces them when a row is shorter than a block (5 x 64
    with blocksize 128), unlike its quantiser, its CUDA kernel and its portable PyTorch code, which
    all count blocks over the flattened weight as the format defines.
    """
    shape = state.shape
    state = copy.copy(state)
    state.dtype = dtype
    if packed.device.type == "cpu":
        state.shape = torch.Size((1, shape.numel()))
    return bnb_functional.dequantize_4bit(packed, state).reshape(shape)


def assert_kernel_matches(out, expected, dtype):
    """Bitwise equality, except bfloat16 under the interpreter (truncating cast): within one ulp."""
    assert out.dtype == dtype and out.shape == expected.shape
    if dtype == torch.bfloat16 and interpreting():
        ulp = torch.finfo(torch.bfloat16).eps * expected.float().abs()
        assert ((out.float() - expected.float()).abs() <= ulp).all()
        assert (out.float().abs() <= expected.float().abs()).all()  # truncation, toward zero
    else:
        assert torch.equal(out, expected)


@pytest.mark.parametrize("dtype", checks.DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", (64, 128))
@pytest.mark.parametrize("nested", (False, True), ids=("fp32_absmax", "double_quant"))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_bitsandbytes(shape, nested, blocksize, dtype):
    packed, state = quantized(shape, blocksize, nested)
    expected = bnb_dequantize(packed, state, dtype)

    assert torch.equal(dequantize_nf4_reference(packed, state, dtype), expected)
    assert_kernel_matches(dequantize_nf4(packed, state, dtype), expected, dtype)


@pytest.mark.parametrize("blocksize", (32, 256, 4096))
def test_other_blocksizes(blocksize):
    packed, state = quantized((3, 333), blocksize, nested=True)
    expected = bnb_dequantize(packed, state, torch.float32)
    assert torch.equal(dequantize_nf4(packed, state, torch.float32), expected)


@pytest.mark.parametrize("storage", (torch.bfloat16, torch.float16, torch.float32), ids=str)
def test_storage_dtype_is_read_as_bytes(storage):
    """Bytes stored as a float dtype (bnb_4bit_quant_storage, how FSDP2 shards 4-bit weights) are
    the uint8 storage's bytes and dequantise to the same weight."""
    as_bytes, bytes_state = quantized((6, 72))  # 216 bytes: whole float32 elements
    packed, state = quantized((6, 72), storage=storage)
    assert packed.dtype == storage
    assert torch.equal(packed.view(torch.uint8).reshape(-1), as_bytes.reshape(-1))
    expected = bnb_dequantize(as_bytes, bytes_state, torch.float32)  # the uint8 storage's weight
    assert torch.equal(dequantize_nf4(packed, state, torch.float32), expected)
    assert torch.equal(dequantize_nf4_reference(packed, state, torch.float32), expected)


def test_cast_storage_is_named():
    """Float-stored bytes cast to another dtype (FSDP2 mixed precision with another param_dtype)."""
    packed, state = quantized((6, 72), storage=torch.float32)
    with pytest.raises(ValueError, match="quant_storage"):
        dequantize_nf4(packed.to(torch.bfloat16), state, torch.float32)


def test_format_by_hand():
    """Three values from bytes written by hand: high nibble first, flat blocks, nested scales."""
    packed = torch.tensor([[0x0F], [0x7A]], dtype=torch.uint8, device=checks.DEVICE)
    # Blocks of 2 values are below bitsandbytes' range; blocksize 32 with a 3-value weight is one
    # short block, so the nested absmax decodes one code: code2[2] * absmax2[0] + offset.
    state = SimpleNamespace(
        quant_type="nf4",
        blocksize=32,
        shape=torch.Size((1, 3)),
        nested=True,
        absmax=torch.tensor([2], dtype=torch.uint8, device=checks.DEVICE),
        offset=torch.tensor(0.25, device=checks.DEVICE),
        state2=SimpleNamespace(
            blocksize=256,
            code=torch.tensor([0.0, 0.5, -0.75], device=checks.DEVICE),
            absmax=torch.tensor([2.0], device=checks.DEVICE),
        ),
    )
    scale = -0.75 * 2.0 + 0.25
    table = torch.tensor(nf4.NF4_VALUES, dtype=torch.float64)
    expected = torch.stack((table[0x0], table[0xF], table[0x7])) * scale  # 0xA is padding
    for fn in (dequantize_nf4, dequantize_nf4_reference):
        out = fn(packed, state, torch.float32)
        assert torch.equal(out.double().cpu(), expected.reshape(1, 3))


def test_out_buffer():
    packed, state = quantized((37, 70))
    out = torch.full((37, 70), float("nan"), dtype=torch.float16, device=checks.DEVICE)
    result = dequantize_nf4(packed, state, torch.float16, out=out)
    assert result is out
    assert torch.equal(out, bnb_dequantize(packed, state, torch.float16).reshape(37, 70))


def test_launch_plan_is_reused_only_for_the_same_storage():
    """The checked launch arguments are kept on the quant_state and reused for the same packed bytes;
    a copy of the bytes elsewhere (a moved weight) gets a new plan and the same values."""
    packed, state = quantized((37, 70))
    first = dequantize_nf4(packed, state, torch.bfloat16)
    plan = getattr(state, nf4._PLAN_ATTRIBUTE, None)
    assert torch.equal(dequantize_nf4(packed, state, torch.bfloat16), first)
    assert getattr(state, nf4._PLAN_ATTRIBUTE, None) is plan
    assert torch.equal(dequantize_nf4(packed.clone(), state, torch.bfloat16), first)
    if plan is not None:  # the kernel ran (interpreter or CUDA): the clone was planned anew
        assert getattr(state, nf4._PLAN_ATTRIBUTE) is not plan


def test_bad_input_is_named():
    packed, state = quantized((5, 64))
    with pytest.raises(ValueError, match="out must be a contiguous"):
        dequantize_nf4(packed, state, torch.float32, out=torch.empty(64, 5, device=checks.DEVICE))
    with pytest.raises(ValueError, match="packed bytes"):
        dequantize_nf4(packed[:-1], state, torch.float32)
    with pytest.raises(TypeError, match="output dtype"):
        dequantize_nf4(packed, state, torch.float64)
    fp4_packed, fp4_state = bnb_functional.quantize_4bit(torch.randn(4, 64), quant_type="fp4")
    with pytest.raises(ValueError, match="dense_weight"):
        dequantize_nf4(fp4_packed, fp4_state, torch.float32)


# Windows of a 9 x 2048 weight (blocksize 64: 32 blocks a row, 288 in all, so double quantisation
# has two nested groups of 256 blocks, the second from row 8): rows alone, columns alone, both
# (across the nested groups), a single block, and an empty one.
WINDOWS = (
    (slice(2, 7), slice(None)),
    (slice(None), slice(64, 1024)),
    (slice(1, 9), slice(1920, 2048)),
    (slice(8, 9), slice(0, 64)),
    (slice(3, 3), slice(64, 128)),
)


@pytest.mark.parametrize("dtype", checks.DTYPES, ids=str)
@pytest.mark.parametrize("nested", (False, True), ids=("fp32_absmax", "double_quant"))
@pytest.mark.parametrize("window", WINDOWS, ids=str)
def test_window_matches_the_slice_of_the_whole(window, nested, dtype):
    """A window decodes exactly the values of the same slice of bitsandbytes' whole weight."""
    rows, cols = window
    packed, state = quantized((9, 2048), 64, nested)
    expected = bnb_dequantize(packed, state, dtype)[rows, cols]
    assert torch.equal(dequantize_nf4_reference(packed, state, dtype)[rows, cols], expected)
    out = dequantize_nf4(packed, state, dtype, rows=rows, cols=cols)
    assert out.is_contiguous()
    assert_kernel_matches(out, expected, dtype)


def test_window_out_buffer_and_bad_windows():
    packed, state = quantized((9, 320))
    out = torch.empty(4, 128, dtype=torch.float32, device=checks.DEVICE)
    assert dequantize_nf4(packed, state, torch.float32, out, rows=slice(1, 5), cols=slice(64, 192)) is out
    assert torch.equal(out, bnb_dequantize(packed, state, torch.float32)[1:5, 64:192])
    misaligned = ((slice(None), slice(32, 128)), (slice(None), slice(0, 100)), (slice(0, 9, 2), slice(None)))
    for rows, cols in misaligned:
        with pytest.raises(ValueError, match="multiples of the blocksize"):
            dequantize_nf4(packed, state, torch.float32, rows=rows, cols=cols)
    with pytest.raises(TypeError, match=r"rows=slice\(i, i \+ 1\)"):
        dequantize_nf4(packed, state, torch.float32, rows=3)
    packed, state = quantized((37, 70))  # rows are not whole blocks
    with pytest.raises(ValueError, match="rows are whole blocks"):
        dequantize_nf4(packed, state, torch.float32, rows=slice(0, 3))



# --------------------------------------------------------------------------------------------
# dense_weight
# --------------------------------------------------------------------------------------------
def linear4bit(quant_type="nf4", shape=(37, 70)):
    gen = torch.Generator().manual_seed(3)
    layer = bnb.nn.Linear4bit(
        shape[1], shape[0], bias=False, compute_dtype=torch.bfloat16, quant_type=quant_type
    )
    layer.weight = bnb.nn.Params4bit(
        torch.randn(*shape, generator=gen), requires_grad=False, quant_type=quant_type, module=layer
    )
    return layer.to(checks.DEVICE)


@pytest.mark.parametrize("backend", ("triton", "bnb"))
def test_dense_weight_decodes_as_bitsandbytes_forward_and_backward(backend, monkeypatch):
    """A weight quantised from float16, wanted in float32: bitsandbytes' matmul decodes it straight
    into float32, its backward into float16 and casts that (``backward=True``), windows alike."""
    monkeypatch.setattr(nf4, "BACKEND", backend)
    gen = torch.Generator().manual_seed(4)
    source = (torch.randn(37, 128, generator=gen) * 0.05).to(checks.DEVICE, torch.float16)
    weight, state = bnb_functional.quantize_4bit(source, quant_type="nf4")
    weight.quant_state = state  # packed bytes carrying their state, as the fused paths read them
    straight = bnb_dequantize(weight, state, torch.float32)
    rounded = bnb_dequantize(weight, state, torch.float16).float()
    assert state.dtype == torch.float16 and not torch.equal(straight, rounded)
    assert torch.equal(dense_weight(weight, torch.float32), straight)
    assert torch.equal(dense_weight(weight, torch.float32, backward=True), rounded)
    window = dense_weight(weight, torch.float32, backward=True, cols=slice(64, 128))
    assert torch.equal(window, rounded[:, 64:])
    out = torch.empty(37, 128, device=checks.DEVICE)
    assert dense_weight(weight, torch.float32, backward=True, out=out) is out
    assert torch.equal(out, rounded)


def test_dense_weight_plain_tensor():
    weight = torch.randn(5, 7, dtype=torch.bfloat16)
    assert dense_weight(weight, torch.bfloat16) is weight
    assert torch.equal(dense_weight(weight, torch.float32), weight.float())
    out = torch.empty(5, 7)
    assert dense_weight(weight, torch.float32, out=out) is out
    assert torch.equal(out, weight.float())


@pytest.mark.parametrize("backend", ("triton", "bnb"))
def test_dense_weight_nf4(backend, monkeypatch):
    monkeypatch.setattr(nf4, "BACKEND", backend)
    weight = linear4bit().weight
    assert nf4.is_4bit(weight)
    expected = bnb_dequantize(weight.data, weight.quant_state, torch.float32)
    assert torch.equal(dense_weight(weight, torch.float32), expected)
    out = torch.empty(37, 70, device=checks.DEVICE)
    assert dense_weight(weight, torch.float32, out=out) is out
    assert torch.equal(out, expected)
    half = bnb_dequantize(weight.data, weight.quant_state, torch.float16)
    assert_kernel_matches(dense_weight(weight, torch.float16), half, torch.float16)


def test_dense_weight_fp4_goes_to_bitsandbytes():
    weight = linear4bit("fp4", shape=(6, 64)).weight
    expected = bnb_functional.dequantize_4bit(weight.data, weight.quant_state).to(torch.bfloat16)
    assert torch.equal(dense_weight(weight, torch.bfloat16), expected)


def test_a_weight_bitsandbytes_repacked_for_its_cpu_kernel_is_refused_naming_the_fix():
    """bitsandbytes repacks a CPU 4-bit weight at its first eval-mode forward without gradients, for
    good: fusetune cannot read that layout, and the error says to load the model again (it advised a
    train-mode forward, which does not undo it)."""
    weight = linear4bit().weight
    weight.quant_state.packing_format_for_cpu = True
    with pytest.raises(ValueError, match="repacked by bitsandbytes .* load or quantise the model again"):
        dense_weight(weight, torch.float32)


def test_dense_weight_rejects_bad_backend(monkeypatch):
    monkeypatch.setattr(nf4, "BACKEND", "cuda")
    with pytest.raises(ValueError, match="'triton' or 'bnb'"):
        dense_weight(linear4bit().weight, torch.float32)


def test_dense_slices(monkeypatch):
    """Slices that keep every dense piece within DENSE_SLICE_BYTES, as even as they can be: column
    slices on block boundaries, shared by weights of the same input width; one piece for what need
    not be cut."""
    monkeypatch.setattr(nf4, "DENSE_SLICE_BYTES", 150 * 256 * 2)  # 150 bf16 rows of 256
    big, small = linear4bit(shape=(300, 256)).weight, linear4bit(shape=(8, 256)).weight
    # rows: 150 fit, 128 in whole blocks of 64, so three slices, as even as blocks allow
    assert nf4.dense_slices([big], 0, torch.bfloat16) == [slice(0, 128), slice(128, 256), slice(256, 300)]
    # columns: 300 rows x 2 bytes -> 128 columns fit, two blocks of 64
    assert nf4.dense_slices([big, small], 1, torch.bfloat16) == [slice(0, 128), slice(128, 256)]
    assert nf4.dense_slices([small], 0, torch.bfloat16) == [slice(None)]  # fits
    assert nf4.dense_slices([torch.zeros(300, 256)], 0, torch.bfloat16) == [slice(None)]  # plain
    assert nf4.dense_slices([linear4bit(shape=(300, 70)).weight], 0, torch.bfloat16) == [slice(None)]
    monkeypatch.setattr(nf4, "BACKEND", "bnb")
    assert nf4.dense_slices([big], 0, torch.bfloat16) == [slice(None)]
    monkeypatch.setattr(nf4, "BACKEND", "triton")
    pieces = [dense_weight(big, torch.float32, cols=c) for c in nf4.dense_slices([big], 1, torch.float32)]
    assert torch.equal(torch.cat(pieces, dim=1), dense_weight(big, torch.float32))
