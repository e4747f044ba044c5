"""QLoRA base layers whose bitsandbytes ``compute_dtype`` differs from their activations' dtype.

bitsandbytes' ``Linear4bit`` casts its input to its compute dtype (``bnb_4bit_compute_dtype``),
decodes the weight into it, multiplies in it and casts the product back; its backward decodes the
weight into the dtype it was quantised from. The fused paths must give what PEFT's own bitsandbytes
layers give, the reference here: one LoRA projection (odd sizes: 15 tokens, 37 outputs), a model's
attention and MLP modules on the same input, and whole models. Adapters are kept in the
activations' dtype, where PEFT and the fused ops run LoRA alike, so only the base products differ.

Under the Triton interpreter fusetune's NF4 kernel truncates to bfloat16 where bitsandbytes rounds
(``tests/ops/test_nf4.py``), a difference of its own as large as the one under test: cases that
decode into bfloat16 there use bitsandbytes' dequantisation (``nf4.BACKEND = "bnb"``). Input widths
are multiples of the block size, for bitsandbytes' CPU dequantisation (``test_lora_patch.py``).
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn

import fusetune
import fusetune.nn.lora as nn_lora
import fusetune.patch.lora as patch_lora
from fusetune.nn.lora import FusedLoraMLP, projection_weights
from fusetune.ops import nf4
from fusetune.ops._launch import interpreting
from fusetune.ops.lora import LoraWeights, lora_glu_mlp, lora_linear, lora_linear_reference
from tests.ops import checks
from tests.patch.checks import loss_and_backward, relative_error
from tests.patch.models import batch, tiny_model

bnb = pytest.importorskip("bitsandbytes")

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16

# (activations' dtype, compute dtype): bitsandbytes' float32 default under a 16-bit model, and the
# 16-bit compute dtypes of QLoRA recipes under float32 or other 16-bit activations.
MISMATCHED = [(BF16, F32), (F16, F32), (F32, BF16), (F32, F16), (F16, BF16), (BF16, F16)]

# Relative error allowed against PEFT, by the dtype of the compared tensor. One projection matches
# bit for bit on the CPU; a model's modules sum their projections' gradients in another order (float32
# noise). Ignoring the compute dtype puts one projection 2e-4 (float16 products of float32
# activations) to 4e-3 away, a model's attention 8e-5 and more.
TOLERANCE = {F32: 1e-5, BF16: 1e-3, F16: 1e-4}
# On CUDA bitsandbytes 0.50 runs its forward product as its own fused 4-bit GEMM (``gemm_4bit``),
# which is no product of the compute dtype rounded once: measured on an H200 (one projection, 15 x
# 192 -> 37), bfloat16 products 3.6e-3 from float64 maths of its rounded inputs, float16 4.4e-4,
# where fusetune's (one rounding) are 1.75e-3 and 2.1e-4 (``test_cuda_products_are_no_further_from_float64``).
# So there outputs, and whatever a forward product reaches, are compared at that dtype's rounding;
# its backward (dequantise, cuBLAS) matches fusetune's bit for bit as on the CPU.
CUDA_FORWARD_TOLERANCE = {F32: 1e-5, BF16: 8e-3, F16: 1e-3}


def _ids(cases) -> list[str]:
    return [f"x_{str(x).removeprefix('torch.')}-compute_{str(c).removeprefix('torch.')}" for x, c in cases]


def _decode_exactly(monkeypatch, *dtypes: torch.dtype) -> None:
    """bitsandbytes' dequantisation where a weight is decoded into bfloat16 under the interpreter."""
    if interpreting() and BF16 in dtypes:
        monkeypatch.setattr(nf4, "BACKEND", "bnb")


def _tolerance(dtype: torch.dtype, compute_dtype: torch.dtype) -> float:
    """The relative error allowed against PEFT for a ``dtype`` tensor that a ``compute_dtype``
    forward product reaches (see ``CUDA_FORWARD_TOLERANCE``)."""
    if checks.DEVICE == "cuda":  # the compute dtype's divergence, then the tensor's own rounding of it
        return max(TOLERANCE[dtype], CUDA_FORWARD_TOLERANCE[compute_dtype], CUDA_FORWARD_TOLERANCE[dtype])
    return TOLERANCE[dtype]


def _assert_close(value: torch.Tensor, reference: torch.Tensor, what: str, compute_dtype=F32) -> None:
    assert value.dtype == reference.dtype, f"{what}: {value.dtype} != {reference.dtype}"
    error = relative_error(value, reference)
    allowed = _tolerance(reference.dtype, compute_dtype)
    assert error <= allowed, f"{what}: relative error {error:.2e} vs PEFT"


def _lora_layer(
    compute_dtype: torch.dtype, dtype: torch.dtype, weight_dtype: torch.dtype = F32, bias: bool = True,
    out: int = 37,
) -> nn.Module:
    """PEFT's LoRA over a bitsandbytes NF4 ``Linear4bit`` (out x 192) with ``compute_dtype``,
    quantised from a ``weight_dtype`` weight, adapters in ``dtype``."""
    gen = torch.Generator().manual_seed(0)
    base = bnb.nn.Linear4bit(192, out, bias=bias, compute_dtype=compute_dtype, quant_type="nf4")
    weight = (torch.randn(out, 192, generator=gen) * 0.05).to(weight_dtype)
    base.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", module=base)
    if bias:
        base.bias = nn.Parameter(torch.randn(out, generator=gen) * 0.1)
    net = nn.Module()
    net.proj = base.to(checks.DEVICE)
    net.is_loaded_in_4bit = True  # PEFT's bitsandbytes LoRA layer, as for a model loaded in 4 bits
    torch.manual_seed(1)
    model = peft.get_peft_model(net, peft.LoraConfig(r=4, target_modules=["proj"], init_lora_weights=False))
    layer = model.base_model.model.proj
    for name, param in layer.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(dtype)
    return layer


def _run(forward, layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> list[torch.Tensor]:
    """``forward(x)``, then x's and the adapters' gradients."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    out = forward(x)
    out.backward(grad)
    return [out.detach(), x.grad, *(p.grad for n, p in layer.named_parameters() if "lora_" in n)]


@pytest.mark.parametrize("dtype, compute_dtype", MISMATCHED, ids=_ids(MISMATCHED))
def test_lora_projection_computes_its_base_in_the_compute_dtype(dtype, compute_dtype, monkeypatch):
    """``lora_linear`` and its reference (compiled code's path) against PEFT's layer: output, dX,
    dA and dB, with a frozen bias."""
    _decode_exactly(monkeypatch, compute_dtype)
    layer = _lora_layer(compute_dtype, dtype)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 192, generator=gen).to(checks.DEVICE, dtype)
    grad = torch.randn(3, 5, 37, generator=gen).to(checks.DEVICE, dtype)
    expected = _run(layer, layer, x, grad)
    weights = projection_weights(layer)
    assert isinstance(weights, LoraWeights) and weights.compute_dtype == compute_dtype
    for op in (lora_linear, lora_linear_reference):
        got = _run(lambda x, op=op: op(x, weights)[0], layer, x, grad)
        for name, value, reference in zip(("out", "dx", "dA", "dB"), got, expected, strict=True):
            _assert_close(value, reference, f"{op.__name__} {name}", compute_dtype if name == "out" else F32)


@pytest.mark.parametrize("base_only", [False, True], ids=["lora", "base_only"])
def test_sliced_4bit_weight_in_another_compute_dtype(base_only, monkeypatch):
    """A large 4-bit weight dequantised in slices (rows in forward, columns in backward), its product
    in the compute dtype: with LoRA and bias, and base only (its slices then start empty)."""
    monkeypatch.setattr(nf4, "DENSE_SLICE_BYTES", 64 * 192 * 2)  # (150, 192) in float16: 3 slices of each
    layer = _lora_layer(F16, F32, bias=not base_only, out=150)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(15, 192, generator=gen).to(checks.DEVICE)
    grad = torch.randn(15, 150, generator=gen).to(checks.DEVICE)
    weights = projection_weights(layer)
    assert [len(nf4.dense_slices([weights.weight], dim, F16)) for dim in (0, 1)] == [3, 3]
    if base_only:
        layer.enable_adapters(False)  # PEFT's base layer alone; the fused path takes the base weight
        weights = projection_weights(layer)
        assert weights.a is None
    expected = _run(layer, layer, x, grad)[:2]
    got = _run(lambda x: lora_linear(x, weights)[0], layer, x, grad)[:2]
    for name, value, reference in zip(("out", "dx"), got, expected, strict=True):
        _assert_close(value, reference, name, F16 if name == "out" else F32)


WEIGHT_DTYPES = [(F32, BF16), (BF16, F16)]  # (compute dtype, dtype the weight was quantised from)


@pytest.mark.parametrize("compute_dtype, weight_dtype", WEIGHT_DTYPES, ids=["compute_f32-from_bf16",
                                                                            "compute_bf16-from_f16"])
def test_backward_decodes_the_weight_as_bitsandbytes_does(compute_dtype, weight_dtype, monkeypatch):
    """bitsandbytes' backward rounds the weight to the dtype it was quantised from, its forward does
    not: dX follows it (float32 activations, where that rounding is not lost in the output's)."""
    _decode_exactly(monkeypatch, compute_dtype, weight_dtype)
    layer = _lora_layer(compute_dtype, F32, weight_dtype=weight_dtype, bias=False)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(15, 192, generator=gen).to(checks.DEVICE)
    grad = torch.randn(15, 37, generator=gen).to(checks.DEVICE)
    expected = _run(layer, layer, x, grad)
    weights = projection_weights(layer)
    for op in (lora_linear, lora_linear_reference):
        got = _run(lambda x, op=op: op(x, weights)[0], layer, x, grad)
        for name, value, reference in zip(("out", "dx", "dA", "dB"), got, expected, strict=True):
            _assert_close(value, reference, f"{op.__name__} {name}", compute_dtype if name == "out" else F32)


def _qlora_pair(dtype: torch.dtype, compute_dtype: torch.dtype, **apply_options):
    """A patched PEFT QLoRA llama (activations in ``dtype``, adapters too) and its unpatched copy."""
    model = tiny_model("llama", intermediate_size=128).to(checks.DEVICE, dtype)
    fusetune.quantize_4bit(model, compute_dtype=compute_dtype)
    reference = copy.deepcopy(model)
    config = peft.LoraConfig(r=4, target_modules=ALL_LINEAR, init_lora_weights=False)
    pair = []
    for base in (model, reference):
        torch.manual_seed(1)
        lora = peft.get_peft_model(base, copy.deepcopy(config))
        for name, param in lora.named_parameters():
            if "lora_" in name:
                param.data = param.data.to(dtype)
        pair.append(lora)
    report = fusetune.apply(pair[0], **apply_options)
    return pair, report


@pytest.mark.parametrize("tile_rows", [None, 4], ids=["one_pass", "row_tiles"])
@pytest.mark.parametrize("compute_dtype", [BF16, F16], ids=str)
def test_patched_attention_and_mlp_follow_the_compute_dtype(compute_dtype, tile_rows, monkeypatch):
    """A patched float32 model's fused q/k/v group, o_proj and MLP against the unpatched model's
    modules on the same input: outputs, dX and every adapter gradient. (With 16-bit activations the
    modules' sums of several projections' dX round differently, by an ulp; their single products
    are compared above.)"""
    _decode_exactly(monkeypatch, compute_dtype)
    (lora, reference), report = _qlora_pair(F32, compute_dtype, mlp_tile_rows=tile_rows)
    assert len(report.patched["lora"]) == 4 and not report.left_alone["lora"]
    ours, theirs = lora.get_base_model().model.layers[0], reference.get_base_model().model.layers[0]
    assert isinstance(ours.mlp, FusedLoraMLP)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 7, 64, generator=gen).to(checks.DEVICE)

    def attention(layer):  # the q/k/v group (one input object) and o_proj, side by side
        return lambda x: torch.cat([getattr(layer.self_attn, p)(x) for p in ALL_LINEAR[:4]], dim=-1)

    for name, forward, width in (("attention", attention, 192), ("mlp", lambda layer: layer.mlp, 64)):
        grad = torch.randn(2, 7, width, generator=gen).to(checks.DEVICE)
        got, expected = _run(forward(ours), ours, x, grad), _run(forward(theirs), theirs, x, grad)
        for i, (value, want) in enumerate(zip(got, expected, strict=True)):
            if value is not None or want is not None:
                _assert_close(value, want, f"{name} tensor {i}", compute_dtype)  # all follow a forward


@pytest.mark.parametrize("compute_dtype", [F16, BF16], ids=str)
def test_patched_float32_qlora_model_matches_peft(compute_dtype, monkeypatch):
    """A whole float32 model with a 16-bit compute dtype, only its LoRA layers patched: the loss and
    every layer's hidden states. Gradients are left to the tests above: across layers 16-bit
    roundings amplify float32 noise (changes of 1e-7 to the embeddings move PEFT's own adapter
    gradients by 4e-4)."""
    _decode_exactly(monkeypatch, compute_dtype)
    (lora, reference), _ = _qlora_pair(F32, compute_dtype, rms_norm=False, rope=False, glu=False, loss=None)
    inputs = {key: value.to(checks.DEVICE) for key, value in batch().items()}
    with torch.no_grad():
        ours, theirs = (model(**inputs, output_hidden_states=True) for model in (lora, reference))
    errors = [relative_error(*pair) for pair in zip(ours.hidden_states, theirs.hidden_states, strict=True)]
    # The first layer reads the same embeddings; the later ones inputs that already differ by float32
    # noise, which 16-bit roundings amplify (1e-5 after two layers, against 8e-4 with the products in
    # float32).
    if checks.DEVICE == "cuda":  # bitsandbytes' fused GEMM there, in each of the two layers
        assert max(errors) <= 2 * CUDA_FORWARD_TOLERANCE[compute_dtype]
        assert relative_error(ours.loss, theirs.loss) <= 2 * CUDA_FORWARD_TOLERANCE[compute_dtype]
        return
    assert errors[1] <= 1e-6 and max(errors) <= 1e-4
    assert relative_error(ours.loss, theirs.loss) <= 1e-6


@pytest.mark.parametrize("compute_dtype, fused", [(F32, True), (BF16, True), (F16, False)], ids=str)
def test_compute_dtype_under_autocast(compute_dtype, fused, monkeypatch):
    """Under bfloat16 autocast bitsandbytes multiplies in bfloat16, as the fused ops do, after casting
    to its compute dtype: float32 and bfloat16 round nothing more, so those layers stay fused;
    float16 would round twice, so at that call they run PEFT's forward (the patch, made without
    autocast, stands), and ``lora_linear`` refuses them naming why."""
    _decode_exactly(monkeypatch, BF16)
    (lora, reference), report = _qlora_pair(F32, compute_dtype)
    assert len(report.patched["lora"]) == 4
    calls = []
    monkeypatch.setattr(patch_lora, "lora_linear", lambda *a: calls.append("attention") or lora_linear(*a))
    monkeypatch.setattr(nn_lora, "lora_glu_mlp", lambda *a, **k: calls.append("mlp") or lora_glu_mlp(*a, **k))
    inputs = {key: value.to(checks.DEVICE) for key, value in batch().items()}
    with torch.autocast(checks.DEVICE, dtype=BF16):
        loss = loss_and_backward(lora, **inputs)
        expected = loss_and_backward(reference, **inputs)
        q_proj = lora.get_base_model().model.layers[0].self_attn.q_proj
        weights = projection_weights(q_proj)
    assert sorted(set(calls)) == (["attention", "mlp"] if fused else [])
    assert relative_error(loss, expected) <= 1e-2  # bfloat16 autocast
    if fused:
        assert isinstance(weights, LoraWeights)
        return
    assert "compute dtype" in weights and "torch.float16 under torch.bfloat16 autocast" in weights
    base = LoraWeights(q_proj.base_layer.weight, None, None, 0.0, compute_dtype=F16)
    with torch.autocast(checks.DEVICE, dtype=BF16), pytest.raises(ValueError, match="bnb_4bit_compute_dtype"):
        lora_linear(torch.randn(3, 64, device=checks.DEVICE), base)


def test_compute_dtype_is_checked():
    """A compute dtype the fused ops do not run in is refused, named."""
    layer = _lora_layer(F32, F32)
    weights = projection_weights(layer)._replace(compute_dtype=torch.float64)
    with pytest.raises(TypeError, match="compute_dtype"):
        lora_linear(torch.randn(3, 192, device=checks.DEVICE), weights)


@pytest.mark.parametrize("dtype, compute_dtype", MISMATCHED, ids=_ids(MISMATCHED))
def test_cuda_products_are_no_further_from_float64(dtype, compute_dtype):
    """Where bitsandbytes runs its fused GEMM (CUDA): the fused path's output against float64 maths
    of what ``Linear4bit`` computes (input and weight in the compute dtype, their exact product plus
    the bias), no further than bitsandbytes' own output, and at one rounding of the compute dtype."""
    if checks.DEVICE != "cuda":
        pytest.skip("bitsandbytes' fused 4-bit GEMM runs on CUDA; on the CPU the tests above match it")
    layer = _lora_layer(compute_dtype, dtype)
    layer.enable_adapters(False)
    base = layer.base_layer
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(15, 192, generator=gen).to(checks.DEVICE, dtype)
    with torch.no_grad():
        theirs = base(x)  # first: Linear4bit rounds its bias to x's dtype in place
        ours = lora_linear(x, projection_weights(layer))[0]
    dense = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).to(compute_dtype)
    exact = x.to(compute_dtype).double() @ dense.double().t() + base.bias.to(compute_dtype).double()
    rounding = {F32: 1e-6, BF16: 2.5e-3, F16: 3e-4}[compute_dtype] + {F32: 0, BF16: 2.5e-3, F16: 3e-4}[dtype]
    assert relative_error(ours, exact) <= min(rounding, relative_error(theirs, exact) * 1.05)
