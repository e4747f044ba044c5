"""quantize_4bit: the same layers and bytes as transformers' 4-bit loader, NF4-close outputs, PEFT on top.

The reference is transformers itself: the tiny model is saved and reloaded with
``BitsAndBytesConfig(load_in_4bit, nf4, double quant)``, and quantize_4bit on the in-memory copy
must convert the same modules into the same packed data and quantisation state.

Numeric checks use layer widths that are multiples of the blocksize: bitsandbytes 0.50's CPU
Linear4bit forward misplaces blocks when a row is shorter than a block or not a multiple of it
(its CUDA path and the stored format are right; see tests/ops/test_nf4.py).
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch import nn

from fusetune.ops.nf4 import dense_weight
from fusetune.quantize import quantize_4bit
from tests.ops import checks
from tests.patch.models import batch, tiny_model
from tests.patch.vlm_models import VLMS, tiny_vlm, vlm_batch

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

# Qwen2-VL whose linear layers (vision tower included) are all multiples of 64 wide.
_QWEN = dict(
    text_config=dict(VLMS["qwen2_vl"].config["text_config"], intermediate_size=128),
    vision_config=dict(depth=1, embed_dim=64, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14),
)

MODELS = {
    "llama": lambda: tiny_model("llama", intermediate_size=128),
    "llama_tied": lambda: tiny_model("llama", intermediate_size=128, tie_word_embeddings=True),
    "qwen2_vl": lambda: tiny_vlm("qwen2_vl", **_QWEN),
}
INPUTS = {"llama": lambda: batch(), "llama_tied": lambda: batch(), "qwen2_vl": lambda: vlm_batch("qwen2_vl")}

# Relative error of the logits of the NF4 model vs the bf16 one (NF4 keeps ~3 bits of each weight;
# measured ~0.1 on these models).
NF4_LOGITS_TOLERANCE = 0.2
# Relative error of one NF4 weight vs its full-precision original (~0.1 for Gaussian weights).
NF4_WEIGHT_TOLERANCE = 0.15


def linear4bit_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)]


def stored_bytes(weight: torch.Tensor) -> torch.Tensor:
    """A 4-bit weight's packed data as flat bytes, whatever dtype it is stored as."""
    return weight.data.view(torch.uint8).reshape(-1)


def transformers_4bit(model: nn.Module, tmp_path, config=None) -> nn.Module:
    """``model`` saved and loaded by transformers in 4-bit with ``config`` (by default QLoRA's NF4
    with double quantisation, computing in bfloat16)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, BitsAndBytesConfig

    model.save_pretrained(tmp_path)
    auto = AutoModelForImageTextToText if hasattr(model.config, "vision_config") else AutoModelForCausalLM
    config = config or BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    return auto.from_pretrained(tmp_path, quantization_config=config, device_map={"": "cpu"})


@pytest.mark.parametrize("arch", list(MODELS))
def test_matches_transformers_loader(arch, tmp_path):
    model = MODELS[arch]().to(torch.bfloat16)
    expected = transformers_4bit(model, tmp_path)

    converted = quantize_4bit(model)

    assert converted == linear4bit_names(expected)
    assert "lm_head" not in converted and type(model.lm_head) is nn.Linear
    assert model.is_loaded_in_4bit
    if arch == "qwen2_vl":  # transformers quantises the vision tower too
        assert any(name.startswith("model.visual.") for name in converted)
    for name in converted:
        ours, theirs = model.get_submodule(name), expected.get_submodule(name)
        assert ours.compute_dtype == theirs.compute_dtype == torch.bfloat16
        assert not ours.weight.requires_grad
        assert torch.equal(ours.weight.data, theirs.weight.data), name
        mine, ref = ours.weight.quant_state, theirs.weight.quant_state
        assert (mine.quant_type, mine.blocksize, mine.nested, mine.shape) == (
            ref.quant_type,
            ref.blocksize,
            ref.nested,
            ref.shape,
        )
        assert torch.equal(mine.absmax, ref.absmax) and torch.equal(mine.state2.absmax, ref.state2.absmax)
        assert torch.equal(mine.offset, ref.offset)


@pytest.mark.parametrize("strategy, storage", (("off", torch.uint8), ("fsdp2", torch.bfloat16)))
def test_quant_storage_matches_the_train_loader(strategy, storage, tmp_path):
    """The train path's 4-bit config stores the packed bytes in the compute dtype under FSDP2
    (uint8 otherwise); quantize_4bit with that quant_storage gives the loader's parameters, and the
    bytes are uint8 storage's. Each layer keeps the quantisation state that FSDP2's plain gathered
    tensor is read with."""
    from fusetune.train.model import quantization_config

    model = MODELS["llama"]().to(torch.bfloat16)
    loaded = transformers_4bit(model, tmp_path, quantization_config(torch.bfloat16, strategy))
    as_bytes = copy.deepcopy(model)
    quantize_4bit(as_bytes)

    converted = quantize_4bit(model, quant_storage=storage)

    assert converted == linear4bit_names(loaded)
    for name in converted:
        ours, theirs = model.get_submodule(name), loaded.get_submodule(name)
        assert ours.weight.dtype == theirs.weight.dtype == storage
        packed = stored_bytes(as_bytes.get_submodule(name).weight)  # compared as bytes: some are NaNs
        assert torch.equal(stored_bytes(ours.weight), packed), name
        assert torch.equal(stored_bytes(theirs.weight), packed), name
        assert ours.quant_state is ours.weight.quant_state


def test_skip_and_idempotence():
    model = MODELS["qwen2_vl"]()
    converted = quantize_4bit(model, skip=("lm_head", "visual"), double_quant=False)
    assert converted and not any("visual" in name for name in converted)
    vision = [
        m for n, m in model.named_modules() if n.startswith("model.visual.") and isinstance(m, nn.Linear)
    ]
    assert vision and all(type(m) is nn.Linear for m in vision)
    assert not model.get_submodule(converted[0]).weight.quant_state.nested
    assert quantize_4bit(model) == [
        name
        for name, m in model.named_modules()
        if name.startswith("model.visual.") and isinstance(m, bnb.nn.Linear4bit)
    ]
    assert quantize_4bit(model) == []


def test_logits_close_to_bf16():
    model = MODELS["llama"]().to(torch.bfloat16)
    inputs = batch()
    weights = {
        name: m.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, nn.Linear)
    }
    with torch.no_grad():
        reference = model(input_ids=inputs["input_ids"]).logits
        converted = quantize_4bit(model)
        quantised = model(input_ids=inputs["input_ids"]).logits
    error = checks.relative_error(quantised, reference)
    assert 0 < error < NF4_LOGITS_TOLERANCE
    for name in converted:
        dense = dense_weight(model.get_submodule(name).weight, torch.float32)
        assert checks.relative_error(dense, weights[name]) < NF4_WEIGHT_TOLERANCE, name


@pytest.mark.parametrize("arch", ("llama", "qwen2_vl"))
def test_peft_lora_on_top_trains(arch):
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    model = MODELS[arch]().to(torch.bfloat16)
    quantize_4bit(model)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM"
    )
    model = peft.get_peft_model(model, config)
    wrapped = [name for name, m in model.named_modules() if isinstance(m, LoraLinear4bit)]
    assert len(wrapped) == 3 * model.config.get_text_config().num_hidden_layers

    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in INPUTS[arch]().items()}
    loss = model(**inputs).loss
    assert torch.isfinite(loss)
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in name for name in grads)
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert all(g.abs().sum() > 0 for name, g in grads.items() if "lora_B" in name)


def test_a_weight_of_an_odd_size_is_quantised_as_transformers_loader_does():
    """101 x 63 codes pack into 3,182 bytes, the last one half-filled: uint8 storage takes them, as
    bitsandbytes' own quantisation does; the dequantised weight is the original to NF4's rounding."""
    bnb = pytest.importorskip("bitsandbytes")
    model = nn.Sequential(nn.Linear(63, 101), nn.Linear(101, 8))
    original = model[0].weight.detach().clone()
    assert quantize_4bit(model) == ["0"]
    layer = model[0]
    dense = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    packed, state = bnb.functional.quantize_4bit(original, blocksize=64, compress_statistics=True,
                                                 quant_type="nf4")
    assert torch.equal(layer.weight.data, packed)
    assert torch.equal(dense, bnb.functional.dequantize_4bit(packed, state).float())


def test_errors_name_the_fix(monkeypatch):
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    with pytest.raises(ValueError, match="meta device"):
        quantize_4bit(meta)
    with pytest.raises(TypeError, match="tuple of names"):
        quantize_4bit(nn.Sequential(nn.Linear(64, 64)), skip="lm_head")
    with pytest.raises(TypeError, match="quant_storage=torch.int32; use torch.uint8"):
        quantize_4bit(nn.Sequential(nn.Linear(64, 64)), quant_storage=torch.int32)
    with pytest.raises(ValueError, match="use quant_storage=torch.uint8, or skip this layer"):
        quantize_4bit(nn.Sequential(nn.Linear(7, 3), nn.Linear(3, 8)), quant_storage=torch.float32)
    peft = pytest.importorskip("peft")
    adapted = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="quantise the plain model, then call peft.get_peft_model"):
        quantize_4bit(adapted)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        quantize_4bit(nn.Sequential(nn.Linear(64, 64)))


def test_a_cast_after_quantising_is_refused():
    """4-bit bytes stored in a float dtype change their bits when cast: the model refuses a dtype cast as
    one loaded in 4 bits does, and a fused LoRA forward over bytes cast anyway (``.half()``) refuses
    them, naming the fix (both read the changed bits silently before: 2.15 relative change)."""
    import fusetune

    model = MODELS["llama"]().to(torch.bfloat16)
    quantize_4bit(model, quant_storage=torch.bfloat16)
    with pytest.raises(ValueError, match="cannot cast a bitsandbytes model"):
        model.to(torch.float16)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "gate_proj"]))
    report = fusetune.apply(lora)
    assert report.patched["lora"]
    lora.half()  # nn.Module.half, which transformers guards only for models loaded through it
    with pytest.raises(ValueError, match="stored as torch.bfloat16 but reached its forward as torch.float16"):
        lora(**INPUTS["llama"]())
