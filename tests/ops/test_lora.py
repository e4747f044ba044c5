"""lora_linear / lora_glu_mlp: outputs and every gradient vs float64 maths and the references.

Settings mirror training: float32 throughout; bf16 base weights and input with float32 adapters
under bf16 autocast; fp16 base weights and input with float32 adapters and no autocast. Base
weights are plain or bitsandbytes 4-bit (compared with maths on the dequantised matrix).
"""

from __future__ import annotations

import contextlib
import os
import traceback
import weakref
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from fusetune.ops import lora as lora_module
from fusetune.ops import nf4 as nf4_module
from fusetune.ops._launch import use_triton
from fusetune.ops.lora import (
    LoraWeights,
    lora_glu_mlp,
    lora_glu_mlp_reference,
    lora_linear,
    lora_linear_reference,
)
from fusetune.ops.nf4 import dense_weight
from tests.ops import checks

# name -> (dtype of x and the base weights, autocast dtype or None); the adapters are float32.
SETTINGS = {
    "fp32": (torch.float32, None),
    "bf16_autocast": (torch.bfloat16, torch.bfloat16),
    "fp16": (torch.float16, None),
}

ACTIVATIONS64 = {
    "silu": F.silu,
    "gelu_tanh": partial(F.gelu, approximate="tanh"),
    "gelu": F.gelu,
}

HIDDEN, INTER = 48, 70


def compute_dtype(setting: str) -> torch.dtype:
    dtype, autocast = SETTINGS[setting]
    return autocast or dtype


def autocast_for(setting: str):
    autocast = SETTINGS[setting][1]
    if autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(checks.DEVICE, dtype=autocast)


def projection(gen, out, inp, rank, dtype, scale=0.5, adapter_dtype=torch.float32):
    """A frozen base (out, inp) in ``dtype`` and, when ``rank`` is set, trainable a and b."""

    def randn(*shape, std):
        return (torch.randn(*shape, generator=gen) * std).to(checks.DEVICE)

    weight = randn(out, inp, std=inp**-0.5).to(dtype)
    if rank is None:
        return LoraWeights(weight, None, None, scale)
    a = randn(rank, inp, std=inp**-0.5).to(adapter_dtype).requires_grad_()
    b = randn(out, rank, std=rank**-0.5).to(adapter_dtype).requires_grad_()
    return LoraWeights(weight, a, b, scale)


def quantized(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` as a bitsandbytes NF4 Params4bit."""
    bnb = pytest.importorskip("bitsandbytes")
    packed, state = bnb.functional.quantize_4bit(weight.float(), quant_type="nf4", blocksize=64)
    return bnb.nn.Params4bit(
        packed, requires_grad=False, quant_state=state, bnb_quantized=True, quant_type="nf4"
    )


def leaves(x, projections):
    """The tensors that get gradients: x (if it requires grad), then every a and b."""
    return [t for t in (x, *(m for p in projections for m in (p.a, p.b))) if t is not None]


def run(fn, x, projections, grad_outs, autocast=contextlib.nullcontext):
    """fn's outputs and the gradients of sum(out_i * grad_i) for ``leaves``, on fresh leaves."""
    x = x.detach().requires_grad_(x.requires_grad)
    projections = [
        p._replace(a=p.a.detach().requires_grad_(p.a.requires_grad),
                   b=p.b.detach().requires_grad_(p.b.requires_grad)) if p.a is not None else p
        for p in projections
    ]
    with autocast():
        outs = fn(x, projections)
    sum((o.double() * g.double()).sum() for o, g in zip(outs, grad_outs, strict=True)).backward()
    grads = [t.grad for t in leaves(x, projections) if t.requires_grad]
    return [o.detach() for o in outs], grads


def out_features(p: LoraWeights) -> int:
    return dense_weight(p.weight, torch.float32).shape[0]


def grads_for(shapes, setting, seed):
    """Upstream gradients, rounded to the compute dtype so every run sees the same values."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=gen).to(checks.DEVICE, compute_dtype(setting)) for s in shapes]


def as_float64(x, projections):
    """x and the projections in float64 (4-bit weights dequantised), for the exact maths."""
    x64 = x.detach().double().requires_grad_(x.requires_grad)
    out = []
    for p in projections:
        w64 = dense_weight(p.weight, torch.float32).double()
        bias64 = None if p.bias is None else p.bias.double()
        if p.a is None:
            out.append(LoraWeights(w64, None, None, p.scale, bias64))
        else:
            a64 = p.a.detach().double().requires_grad_(p.a.requires_grad)
            b64 = p.b.detach().double().requires_grad_(p.b.requires_grad)
            out.append(LoraWeights(w64, a64, b64, p.scale, bias64))
    return x64, out


def linear64(x, p):
    y = x @ p.weight.t()
    if p.bias is not None:
        y = y + p.bias
    if p.a is not None:
        y = y + p.scale * (x @ p.a.t()) @ p.b.t()
    return y


def mlp64(x, projections, activation):
    gate, up, down = projections
    return [linear64(ACTIVATIONS64[activation](linear64(x, gate)) * linear64(x, up), down)]


def compare(fused, reference, exact, dtype, what):
    """Outputs then gradients, each against the reference (same dtype) and float64 maths."""
    (outs, grads), (ref_outs, ref_grads), (outs64, grads64) = fused, reference, exact
    assert len(grads) == len(ref_grads) == len(grads64)
    names = [f"out{i}" for i in range(len(outs))] + [f"grad{i}" for i in range(len(grads))]
    for name, o, r, e in zip(names, outs + grads, ref_outs + ref_grads, outs64 + grads64,
                             strict=True):
        checks.assert_matches_reference(o, r, dtype, f"{what} {name}")
        checks.assert_close_to_float64(o, e, dtype, f"{what} {name}")


def check_linear(x, projections, setting, what):
    grad_outs = grads_for([(*x.shape[:-1], out_features(p)) for p in projections], setting, 7)
    cast = partial(autocast_for, setting)
    fused = run(lambda x, ps: lora_linear(x, *ps), x, projections, grad_outs, cast)
    reference = run(lambda x, ps: lora_linear_reference(x, *ps), x, projections, grad_outs, cast)
    x64, p64 = as_float64(x, projections)
    exact = run(lambda x, ps: [linear64(x, p) for p in ps], x64, p64, grad_outs)
    dtype = compute_dtype(setting)
    assert all(o.dtype == dtype for o in fused[0])
    compare(fused, reference, exact, dtype, what)
    return fused


def check_mlp(x, projections, activation, setting, what, tile_rows=None):
    grad_outs = grads_for([(*x.shape[:-1], out_features(projections[2]))], setting, 8)
    cast = partial(autocast_for, setting)
    fused = run(lambda x, ps: [lora_glu_mlp(x, *ps, activation, tile_rows=tile_rows)], x, projections,
                grad_outs, cast)
    reference = run(lambda x, ps: [lora_glu_mlp_reference(x, *ps, activation)], x, projections,
                    grad_outs, cast)
    x64, p64 = as_float64(x, projections)
    exact = run(lambda x, ps: mlp64(x, ps, activation), x64, p64, grad_outs)
    dtype = compute_dtype(setting)
    assert fused[0][0].dtype == dtype
    compare(fused, reference, exact, dtype, what)
    return fused


# (out, rank or None) per projection: one projection; q, k, v with different out sizes and ranks
# and a v without LoRA; a single projection without LoRA.
LINEAR_CASES = {
    "single": [(40, 4)],
    "qkv": [(40, 8), (24, 4), (24, None)],
    "base_only": [(24, None)],
}


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("case", list(LINEAR_CASES))
def test_lora_linear(case, setting):
    dtype = SETTINGS[setting][0]
    gen = torch.Generator().manual_seed(len(case))
    projections = [projection(gen, out, HIDDEN, rank, dtype, scale=0.5 + i)
                   for i, (out, rank) in enumerate(LINEAR_CASES[case])]
    x = torch.randn(2, 19, HIDDEN, generator=gen).to(checks.DEVICE, dtype).requires_grad_()
    fused = check_linear(x, projections, setting, f"{case} {setting}")
    x_grad, adapter_grads = fused[1][0], fused[1][1:]
    assert x_grad.dtype == dtype and x_grad.shape == x.shape
    assert all(g.dtype == torch.float32 for g in adapter_grads)


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_lora_linear_with_frozen_bias(setting):
    """Qwen2's q, k, v: a frozen base bias on a LoRA projection and on one without LoRA."""
    dtype = SETTINGS[setting][0]
    gen = torch.Generator().manual_seed(5)
    projections = [
        projection(gen, out, HIDDEN, rank, dtype)._replace(
            bias=torch.randn(out, generator=gen).to(checks.DEVICE, dtype))
        for out, rank in ((40, 8), (24, None))
    ]
    x = torch.randn(3, 11, HIDDEN, generator=gen).to(checks.DEVICE, dtype).requires_grad_()
    check_linear(x, projections, setting, f"bias {setting}")


@pytest.fixture(params=[None, 8], ids=["one_tile", "small_tiles"])
def hidden_tile_rows(request, monkeypatch):
    """The fused MLP's row tiles for h and dh: the default (one tile here) or tiles of 8 rows of
    bf16 (4 of float32), so that 37 rows make full tiles and a short one."""
    if request.param is not None:
        monkeypatch.setattr(lora_module, "_HIDDEN_TILE_BYTES", request.param * INTER * 2)
    return request.param


@pytest.mark.parametrize("rows, width, dtype", [(4096, 14336, torch.bfloat16), (4096, 18944, torch.bfloat16),
                                                (16384, 14336, torch.bfloat16), (4096, 14336, torch.float32),
                                                (37, 96, torch.float32), (1, 14336, torch.bfloat16),
                                                (0, 64, torch.bfloat16)])
def test_row_tiles_cover_every_row_once_within_the_byte_budget(rows, width, dtype):
    e = torch.empty(rows, width, dtype=dtype, device="meta")
    tiles = lora_module._row_tiles(e)
    covered = [i for tile in tiles for i in range(rows)[tile]]
    assert covered == list(range(rows))
    sizes = [len(range(rows)[tile]) for tile in tiles]
    assert len(set(sizes[:-1])) <= 1 and sizes[-1] <= sizes[0]  # equal tiles, the last may be short
    row_bytes = width * e.element_size()
    budget_rows = max(1, lora_module._HIDDEN_TILE_BYTES // row_bytes)
    # Within the budget, but for rounding up to whole 64-row blocks; no more tiles than needed.
    assert sizes[0] <= max(budget_rows, 1) + lora_module._TILE_ROW_MULTIPLE - 1
    fewest = -(-rows // (budget_rows + lora_module._TILE_ROW_MULTIPLE))
    assert fewest <= len(tiles) <= max(1, -(-rows // budget_rows))
    if sizes[0] > lora_module._TILE_ROW_MULTIPLE:
        assert sizes[0] % lora_module._TILE_ROW_MULTIPLE == 0
    if (rows, width, dtype) == (4096, 14336, torch.bfloat16):  # Llama-3 8B at 4,096 tokens
        assert sizes == [1408, 1408, 1280]


def mlp_case(setting: str) -> tuple[torch.Tensor, list[LoraWeights]]:
    """37 rows of x and gate, up, down projections with LoRA of different ranks and scales."""
    dtype = SETTINGS[setting][0]
    gen = torch.Generator().manual_seed(3)
    projections = [
        projection(gen, INTER, HIDDEN, 4, dtype, scale=2.0),
        projection(gen, INTER, HIDDEN, 8, dtype, scale=0.5),
        projection(gen, 40, INTER, 4, dtype, scale=1.5),
    ]
    x = torch.randn(37, HIDDEN, generator=gen).to(checks.DEVICE, dtype).requires_grad_()
    return x, projections


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("activation", list(ACTIVATIONS64))
def test_lora_glu_mlp(activation, setting, hidden_tile_rows):
    x, projections = mlp_case(setting)
    fused = check_mlp(x, projections, activation, setting, f"{activation} {setting}")
    assert len(fused[1]) == 7 and fused[1][0].dtype == SETTINGS[setting][0]


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_unread_output_keeps_every_gradient(setting, hidden_tile_rows):
    """Under ``outputs_unread`` (a checkpoint's recompute) down and h are skipped and down's LoRA-A
    product is made in backward from its h tiles: every gradient still matches the reference and
    float64 maths (the output is left uncomputed, so it is not compared)."""
    x, projections = mlp_case(setting)
    grad_outs = grads_for([(37, 40)], setting, 8)
    cast = partial(autocast_for, setting)

    def unread(x, ps):
        with lora_module.outputs_unread() as skipped:
            out = lora_glu_mlp(x, *ps, "silu")
        assert skipped == [out.grad_fn]
        return [out]

    _, grads = run(unread, x, projections, grad_outs, cast)
    _, ref_grads = run(lambda x, ps: [lora_glu_mlp_reference(x, *ps, "silu")], x, projections, grad_outs,
                       cast)
    x64, p64 = as_float64(x, projections)
    _, grads64 = run(lambda x, ps: mlp64(x, ps, "silu"), x64, p64, grad_outs)
    dtype = compute_dtype(setting)
    assert len(grads) == len(ref_grads) == 7
    for i, (grad, ref, exact) in enumerate(zip(grads, ref_grads, grads64, strict=True)):
        checks.assert_matches_reference(grad, ref, dtype, f"unread {setting} grad{i}")
        checks.assert_close_to_float64(grad, exact, dtype, f"unread {setting} grad{i}")


def test_non_contiguous_input_and_partial_grads(hidden_tile_rows):
    """x strided and not requiring grad; one b frozen; MLP with LoRA only on up."""
    gen = torch.Generator().manual_seed(4)
    x = checks.non_contiguous(torch.randn(3, 13, HIDDEN, generator=gen).to(checks.DEVICE))
    qkv = [projection(gen, 40, HIDDEN, 8, torch.float32), projection(gen, 24, HIDDEN, 4, torch.float32)]
    qkv[1].b.requires_grad_(False)
    _, grads = check_linear(x, qkv, "fp32", "partial")
    assert len(grads) == 3  # a0, b0, a1
    mlp = [
        projection(gen, INTER, HIDDEN, None, torch.float32),
        projection(gen, INTER, HIDDEN, 8, torch.float32),
        projection(gen, HIDDEN, INTER, None, torch.float32),
    ]
    _, grads = check_mlp(x, mlp, "silu", "fp32", "partial mlp")
    assert len(grads) == 2


def test_adapters_of_mixed_dtypes():
    """One stacked group with float32 and bf16 adapters: each gradient in its adapter's dtype."""
    gen = torch.Generator().manual_seed(16)
    projections = [projection(gen, 40, HIDDEN, 4, torch.bfloat16),
                   projection(gen, 24, HIDDEN, 8, torch.bfloat16, adapter_dtype=torch.bfloat16)]
    x = torch.randn(2, 7, HIDDEN, generator=gen).to(checks.DEVICE, torch.bfloat16).requires_grad_()
    _, grads = check_linear(x, projections, "bf16_autocast", "mixed adapters")
    assert [g.dtype for g in grads[1:]] == [torch.float32] * 2 + [torch.bfloat16] * 2


def test_float32_input_under_autocast():
    """x in float32 under bf16 autocast: matmuls in bf16, output bf16, x's gradient float32."""
    gen = torch.Generator().manual_seed(5)
    projections = [projection(gen, 40, HIDDEN, 4, torch.bfloat16)]
    x = torch.randn(37, HIDDEN, generator=gen).to(checks.DEVICE).requires_grad_()
    _, grads = check_linear(x, projections, "bf16_autocast", "fp32 x")
    assert grads[0].dtype == torch.float32


def test_4bit_base(hidden_tile_rows):
    gen = torch.Generator().manual_seed(6)

    def nf4(p):
        return p._replace(weight=quantized(p.weight))

    qkv = [nf4(projection(gen, out, HIDDEN, rank, torch.bfloat16)) for out, rank in ((40, 8), (24, None))]
    mlp = [nf4(projection(gen, out, inp, 4, torch.bfloat16))
           for out, inp in ((INTER, HIDDEN), (INTER, HIDDEN), (HIDDEN, INTER))]
    x = torch.randn(2, 11, HIDDEN, generator=gen).to(checks.DEVICE, torch.bfloat16).requires_grad_()
    check_linear(x, qkv, "bf16_autocast", "nf4 qkv")
    check_mlp(x, mlp, "gelu_tanh", "bf16_autocast", "nf4 mlp")


def test_4bit_base_in_slices(hidden_tile_rows, monkeypatch):
    """Large 4-bit weights are dequantised in slices (DENSE_SLICE_BYTES is made small here so that
    every weight below takes two or three): forward over slices of a weight's rows, dX and down's
    dh over slices of its columns, the GLU gradients written over column slices of e and g. The
    results match the reference and float64 maths, and no dense copy is larger than a slice."""
    budget = 192 * 64 * 2  # a bf16 slice of 64 columns of the (192, 128) weights
    monkeypatch.setattr(nf4_module, "DENSE_SLICE_BYTES", budget)
    hidden, inter = 128, 192
    gen = torch.Generator().manual_seed(16)

    def nf4(p, bias=False):
        out = _weight_out(p)
        frozen_bias = torch.randn(out, generator=gen).to(checks.DEVICE, torch.bfloat16) if bias else None
        return p._replace(weight=quantized(p.weight), bias=frozen_bias)

    qkv = [nf4(projection(gen, inter, hidden, 8, torch.bfloat16), bias=True),  # LoRA and bias
           nf4(projection(gen, hidden, hidden, None, torch.bfloat16)),  # base only
           nf4(projection(gen, hidden, hidden, None, torch.bfloat16), bias=True)]  # base and bias
    mlp = [nf4(projection(gen, out, inp, 4, torch.bfloat16))
           for out, inp in ((inter, hidden), (inter, hidden), (hidden, inter))]
    x = torch.randn(2, 19, hidden, generator=gen).to(checks.DEVICE, torch.bfloat16).requires_grad_()
    check_linear(x, qkv, "bf16_autocast", "sliced nf4 qkv")
    check_mlp(x, mlp, "silu", "bf16_autocast", "sliced nf4 mlp")

    sizes = []

    def recorded_dense_weight(weight, dtype, **window):
        dense = dense_weight(weight, dtype, **window)
        sizes.append(dense.numel() * dense.element_size())
        return dense

    monkeypatch.setattr(lora_module, "dense_weight", recorded_dense_weight)
    with torch.autocast(checks.DEVICE, dtype=torch.bfloat16):
        outs = [*lora_linear(x, *qkv), lora_glu_mlp(x, *mlp, "silu")]
    sum(o.float().sum() for o in outs).backward()
    whole = inter * hidden * 2
    assert len(sizes) >= 2 * 9 and max(sizes) <= budget < whole  # 9 weight reads, each in pieces


@pytest.mark.parametrize("rows", [1, 3])
def test_4bit_base_in_slices_leaves_its_bias_alone(rows, monkeypatch):
    """A base-only 4-bit projection in slices with a bias already in the compute dtype: its output
    starts as a copy of the bias in every row, one row too (a (1, out) view of the bias counts as
    contiguous), so the slices' matmuls never add onto the bias itself: a second call gives the
    same output, equal to the reference's."""
    monkeypatch.setattr(nf4_module, "DENSE_SLICE_BYTES", 64 * 128 * 2)  # (192, 128) weight: 3 slices
    gen = torch.Generator().manual_seed(17)
    base = projection(gen, 192, 128, None, torch.bfloat16)
    bias = torch.randn(192, generator=gen).to(checks.DEVICE, torch.bfloat16)
    p = base._replace(weight=quantized(base.weight), bias=bias)
    kept = bias.clone()
    x = torch.randn(rows, 128, generator=gen).to(checks.DEVICE, torch.bfloat16)
    first, second = (lora_linear(x, p)[0] for _ in range(2))
    assert torch.equal(bias, kept)
    assert torch.equal(first, second)
    checks.assert_matches_reference(first, lora_linear_reference(x, p)[0], torch.bfloat16, "sliced with bias")


def _weight_out(p: LoraWeights) -> int:
    return p.weight.shape[0]


def test_empty_rows():
    gen = torch.Generator().manual_seed(9)
    p = projection(gen, 40, HIDDEN, 4, torch.float32)
    gate, up = (projection(gen, INTER, HIDDEN, rank, torch.float32) for rank in (None, 8))
    down = projection(gen, 40, INTER, 4, torch.float32)
    x = torch.randn(2, 0, HIDDEN, device=checks.DEVICE, requires_grad=True)
    (y,) = lora_linear(x, p)
    out = lora_glu_mlp(x, gate, up, down, "silu")
    assert y.shape == out.shape == (2, 0, 40)
    (y.sum() + out.sum()).backward()
    assert x.grad.shape == x.shape
    for t in (p.a, p.b, up.a, up.b, down.a, down.b):
        assert torch.equal(t.grad, torch.zeros_like(t))


def _tensors_in(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors_in(item)


@pytest.mark.parametrize("four_bit", [False, True], ids=["plain", "nf4"])
def test_dense_weights_not_kept(four_bit, monkeypatch):
    """Backward keeps no dense base matrix, and at most one dequantised copy is alive at a time.

    The base weights are float32 under bf16 autocast (or 4-bit), so every dense bf16 matrix is a
    copy made by dense_weight; each copy is tracked until it is freed.
    """
    gen = torch.Generator().manual_seed(10)
    shapes = ((INTER, HIDDEN), (INTER, HIDDEN), (HIDDEN, INTER))
    projections = [projection(gen, out, inp, 4, torch.float32) for out, inp in shapes]
    if four_bit:
        projections = [p._replace(weight=quantized(p.weight)) for p in projections]
    live, peak, calls = set(), [0], [0]

    def tracked_dense_weight(weight, dtype, **window):
        dense = dense_weight(weight, dtype, **window)
        if dense is weight:  # a copy made earlier, reused over row tiles
            return dense
        calls[0] += 1
        live.add(id(dense))
        peak[0] = max(peak[0], len(live))
        weakref.finalize(dense, live.discard, id(dense))
        return dense

    monkeypatch.setattr(lora_module, "dense_weight", tracked_dense_weight)
    saved = []
    x = torch.randn(2, 19, HIDDEN, generator=gen).to(checks.DEVICE).requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast(checks.DEVICE, dtype=torch.bfloat16):
            q, k = lora_linear(x, *projections[:2])
            y = lora_glu_mlp(x, *projections, "silu")
    assert calls[0] == 5 and not live
    kept = saved + [t for out in (q, y) for t in _tensors_in(vars(out.grad_fn))]
    dense_shapes = {s for shape in shapes for s in (shape, shape[::-1])}
    base_ids = {id(p.weight) for p in projections}
    assert not [t.shape for t in kept if tuple(t.shape) in dense_shapes and id(t) not in base_ids]
    (q.float().sum() + k.float().sum() + y.float().sum()).backward()
    assert calls[0] == 10 and peak[0] == 1 and not live


class _BigAllocations(TorchDispatchMode):
    """Records the storages of at least ``nbytes`` that the ops run under it create, each with
    the fusetune line that made it."""

    def __init__(self, nbytes: int, known: set[int]):
        super().__init__()
        self.nbytes, self.known, self.new = nbytes, known, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in _tensors_in(out):
            storage = t.untyped_storage()
            if storage.nbytes() >= self.nbytes and storage.data_ptr() not in self.known:
                self.known.add(storage.data_ptr())
                stack = reversed(traceback.extract_stack())
                site = next((f"{Path(f.filename).name}:{f.lineno}" for f in stack
                             if f"fusetune{os.sep}" in f.filename), "?")
                self.new.append((func.__name__, tuple(t.shape), site))
        return out


@pytest.mark.parametrize("unread", [False, True], ids=["forward", "recompute"])
def test_mlp_backward_makes_no_full_size_buffer(monkeypatch, unread):
    """Only e and g span every row: forward makes h (the down projection's input) one row tile at
    a time when it records a graph, whether it computes the output or a checkpoint's recompute
    leaves it unread; backward makes h and dh by tiles and writes de and dg over e and g. Without
    a graph, forward makes h in one piece."""
    monkeypatch.setattr(lora_module, "_HIDDEN_TILE_BYTES", 8 * INTER * 4)  # 8 float32 rows
    gen = torch.Generator().manual_seed(14)
    projections = [projection(gen, INTER, HIDDEN, 4, torch.float32) for _ in range(2)]
    projections.append(projection(gen, HIDDEN, INTER, 4, torch.float32))
    x = torch.randn(37, HIDDEN, generator=gen).to(checks.DEVICE).requires_grad_()
    full_size = 37 * INTER * 4
    inputs = {t.untyped_storage().data_ptr() for t in (x, *(p.weight for p in projections))}
    with _BigAllocations(full_size, set(inputs)) as forward:  # a copy: inputs is reused below
        with lora_module.outputs_unread() if unread else contextlib.nullcontext():
            y = lora_glu_mlp(x, *projections, "silu")
    assert len(forward.new) == 2, forward.new  # e and g
    with _BigAllocations(full_size, set(forward.known)) as backward:
        y.sum().backward()
    assert not backward.new, backward.new
    assert all(t.grad is not None for t in leaves(x, projections))
    with _BigAllocations(full_size, set(inputs)) as no_graph, torch.no_grad():
        lora_glu_mlp(x, *projections, "silu")
    assert len(no_graph.new) == 3, no_graph.new  # e, g and h


def test_second_backward_over_one_graph(monkeypatch):
    """The first backward overwrites e and g, so a second one over the same graph is refused; when
    nothing above down needs a gradient they stay intact and a second backward adds the same."""
    gen = torch.Generator().manual_seed(15)
    gate, up = (projection(gen, INTER, HIDDEN, None, torch.float32) for _ in range(2))
    down = projection(gen, HIDDEN, INTER, 4, torch.float32)
    x = torch.randn(9, HIDDEN, generator=gen).to(checks.DEVICE)
    y = lora_glu_mlp(x.requires_grad_(), gate, up, down, "silu")
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second time over the same graph"):
        y.sum().backward()
    y = lora_glu_mlp(x.detach(), gate, up, down, "silu")
    down.a.grad = down.b.grad = None
    y.sum().backward(retain_graph=True)
    first = down.a.grad.clone(), down.b.grad.clone()
    y.sum().backward()
    torch.testing.assert_close(down.a.grad, 2 * first[0])
    torch.testing.assert_close(down.b.grad, 2 * first[1])


def test_dispatch(monkeypatch):
    gen = torch.Generator().manual_seed(11)
    p = projection(gen, INTER, HIDDEN, 4, torch.float32)
    down = projection(gen, HIDDEN, INTER, 4, torch.float32)
    x = torch.randn(5, HIDDEN, device=checks.DEVICE)
    assert type(lora_linear(x, p)[0].grad_fn).__name__ == "_LoraLinearBackward"
    if use_triton(x):
        assert type(lora_glu_mlp(x, p, p, down, "gelu").grad_fn).__name__ == "_LoraGluMLPBackward"
    if checks.DEVICE == "cpu":  # plain CPU tensors: the MLP takes its reference
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        out = lora_glu_mlp(x, p, p, down, "gelu")
        assert type(out.grad_fn).__name__ != "_LoraGluMLPBackward"
        torch.testing.assert_close(out, lora_glu_mlp_reference(x, p, p, down, "gelu"))


def _error_cases():
    gen = torch.Generator().manual_seed(12)
    p = projection(gen, 40, HIDDEN, 4, torch.float32)
    x = torch.randn(3, HIDDEN, device=checks.DEVICE)
    trainable = p._replace(weight=p.weight.clone().requires_grad_())
    return x, p, {
        "trainable base": ((trainable,), ValueError, "frozen base weight"),
        "in features": ((p._replace(weight=p.weight[:, :-1]),), ValueError, r"\(out, 48\)"),
        "a without b": ((p._replace(b=None),), ValueError, "both LoRA matrices"),
        "a shape": ((p._replace(a=p.a[:, :-1]),), ValueError, "expected a"),
        "b shape": ((p._replace(b=p.b[:-1]),), ValueError, "expected a"),
        "not LoraWeights": ((tuple(p),), TypeError, "LoraWeights"),
        "scale None": ((p._replace(scale=None),), TypeError, "scale of projections\\[0\\] is NoneType"),
        "scale tensor": ((p._replace(scale=torch.tensor(2.0, requires_grad=True)),), TypeError,
                         "pass a number"),
        "no projection": ((), ValueError, "at least one"),
    }


@pytest.mark.parametrize("name", list(_error_cases()[2]))
def test_lora_linear_errors(name):
    x, _, cases = _error_cases()
    projections, error, match = cases[name]
    for fn in (lora_linear, lora_linear_reference):
        with pytest.raises(error, match=match):
            fn(x, *projections)


def test_lora_glu_mlp_errors():
    x, p, _ = _error_cases()
    gen = torch.Generator().manual_seed(13)
    down = projection(gen, HIDDEN, 40, 4, torch.float32)
    other = projection(gen, 24, HIDDEN, 4, torch.float32)
    for fn in (lora_glu_mlp, lora_glu_mlp_reference):
        with pytest.raises(ValueError, match="activation"):
            fn(x, p, p, down, "relu")
        with pytest.raises(ValueError, match="same intermediate size"):
            fn(x, p, other, down, "silu")
        with pytest.raises(ValueError, match=r"\(out, 40\)"):
            fn(x, p, p, projection(gen, HIDDEN, 24, 4, torch.float32), "silu")
        with pytest.raises(TypeError, match="dtype"):
            fn(x.double(), p, p, down, "silu")


def test_trainable_or_misshapen_bias_is_rejected():
    gen = torch.Generator().manual_seed(0)
    p = projection(gen, 24, HIDDEN, 4, torch.float32)
    x = torch.randn(5, HIDDEN, device=checks.DEVICE)
    with pytest.raises(ValueError, match="bias of projections\\[0\\] requires grad"):
        lora_linear(x, p._replace(bias=torch.zeros(24, device=checks.DEVICE, requires_grad=True)))
    with pytest.raises(ValueError, match="expected \\(24,\\)"):
        lora_linear(x, p._replace(bias=torch.zeros(23, device=checks.DEVICE)))


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_tiled_lora_glu_mlp(setting, monkeypatch):
    """Row tiles (37 rows in tiles of 8, the last one short) give the one-pass results, with only x
    saved; LoRA on gate and down only, so up's missing adapter is covered too."""
    dtype = SETTINGS[setting][0]
    gen = torch.Generator().manual_seed(11)
    projections = [projection(gen, INTER, HIDDEN, 4, dtype), projection(gen, INTER, HIDDEN, None, dtype),
                   projection(gen, HIDDEN, INTER, 8, dtype)]
    x = torch.randn(37, HIDDEN, generator=gen).to(checks.DEVICE, dtype).requires_grad_()
    tiled_calls = []
    original = lora_module._TiledLoraGluMLP.apply
    monkeypatch.setattr(lora_module._TiledLoraGluMLP, "apply",
                        lambda *args: tiled_calls.append(1) or original(*args))
    check_mlp(x, projections, "silu", setting, f"tiled {setting}", tile_rows=8)
    assert tiled_calls
    with torch.autocast(checks.DEVICE, dtype=torch.bfloat16, enabled=setting == "bf16_autocast"):
        out = lora_glu_mlp(x, *projections, "silu", tile_rows=8)
    (saved,) = out.grad_fn.saved_tensors
    assert saved.shape == (37, HIDDEN)
    tiled_calls.clear()
    lora_glu_mlp(x, *projections, "silu", tile_rows=37)  # no more rows than a tile: one pass
    assert not tiled_calls


def test_tile_rows_must_be_positive():
    gen = torch.Generator().manual_seed(0)
    projections = [projection(gen, INTER, HIDDEN, 4, torch.float32) for _ in range(2)]
    projections.append(projection(gen, HIDDEN, INTER, 4, torch.float32))
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match=f"tile_rows={bad!r}"):
            lora_glu_mlp(torch.randn(5, HIDDEN, device=checks.DEVICE), *projections, "silu", tile_rows=bad)


def test_tiles_of_rows_without_features():
    """x with no input features (an empty hidden size) is tiled by its rows: zero outputs, not a
    division by zero."""
    def base(out, inp):
        return LoraWeights(torch.zeros(out, inp, device=checks.DEVICE), None, None, 1.0)

    x = torch.randn(5, 0, device=checks.DEVICE)
    out = lora_glu_mlp(x, base(INTER, 0), base(INTER, 0), base(0, INTER), "silu", tile_rows=2)
    assert out.shape == (5, 0)
