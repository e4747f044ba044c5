"""fusetune.apply on PEFT LoRA models: fused attention projections and MLPs, checked against PEFT.

Each test builds a PEFT model and an identical deep copy left to PEFT's own modules, and compares
the loss and every LoRA gradient (float32, the reference path of the fused ops on plain CPU tensors
and the Triton kernels under the interpreter alike).
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
from fusetune.nn.lora import FusedLoraMLP
from tests.patch.checks import assert_close, assert_same_gradients, loss_and_backward
from tests.patch.models import batch, tiny_model

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora_pair(arch: str, **lora_options):
    """A PEFT model of ``arch`` with random LoRA weights, and an identical unpatched copy."""
    model = tiny_model(arch)
    reference = copy.deepcopy(model)
    options = dict(r=4, lora_alpha=8, target_modules=ALL_LINEAR, lora_dropout=0.0, init_lora_weights=False)
    config = peft.LoraConfig(**{**options, **lora_options})
    torch.manual_seed(1)
    lora = peft.get_peft_model(model, config)
    torch.manual_seed(1)
    return lora, peft.get_peft_model(reference, copy.deepcopy(config))


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the fused LoRA op calls, by number of projections (1 or 3) and MLPs."""
    calls = {"linear": [], "mlp": 0}

    def counting_linear(x, *projections):
        calls["linear"].append(len(projections))
        return original_linear(x, *projections)

    def counting_mlp(*args, **kwargs):
        calls["mlp"] += 1
        return original_mlp(*args, **kwargs)

    original_linear, original_mlp = patch_lora.lora_linear, nn_lora.lora_glu_mlp
    monkeypatch.setattr(patch_lora, "lora_linear", counting_linear)
    monkeypatch.setattr(nn_lora, "lora_glu_mlp", counting_mlp)
    return calls


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "qwen3"])
def test_lora_attention_and_mlp_are_fused_and_match_peft(arch, fused_calls):
    lora, reference = _lora_pair(arch)
    report = fusetune.apply(lora)
    layers = lora.get_base_model().model.layers
    fused = {*(layer.self_attn for layer in layers), *(layer.mlp for layer in layers)}
    assert sorted(report.patched["lora"]) == sorted(n for n, m in lora.named_modules() if m in fused)
    assert all(isinstance(layer.mlp, FusedLoraMLP) for layer in layers)
    inputs = batch()
    assert_close(loss_and_backward(lora, **inputs), loss_and_backward(reference, **inputs), "loss")
    assert_same_gradients(lora, reference)
    # One q/k/v pass and one o_proj pass per layer, one fused MLP per layer.
    assert sorted(fused_calls["linear"]) == [1] * len(layers) + [3] * len(layers)
    assert fused_calls["mlp"] == len(layers)


def test_attention_with_frozen_bias_is_fused(fused_calls):
    lora, reference = _lora_pair("qwen2")
    report = fusetune.apply(lora)
    assert len(report.patched["lora"]) == 4 and not report.left_alone["lora"]
    assert lora.get_base_model().model.layers[0].self_attn.q_proj.base_layer.bias is not None
    inputs = batch()
    assert_close(loss_and_backward(lora, **inputs), loss_and_backward(reference, **inputs), "loss")
    assert_same_gradients(lora, reference)
    assert sorted(fused_calls["linear"]) == [1, 1, 3, 3]


def test_trainable_bias_is_left_alone():
    lora, reference = _lora_pair("qwen2", bias="all")
    report = fusetune.apply(lora)
    reasons = dict(report.left_alone["lora"])
    assert len(reasons) == 2 and all("trainable" in r for r in reasons.values())
    inputs = batch()
    assert_close(loss_and_backward(lora, **inputs), loss_and_backward(reference, **inputs), "loss")
    assert_same_gradients(lora, reference)


@pytest.mark.parametrize(
    ("options", "reason"),
    [(dict(lora_dropout=0.1), "lora_dropout > 0"), (dict(use_dora=True), "variant")],
)
def test_dropout_and_dora_are_left_alone(options, reason):
    lora, reference = _lora_pair("llama", **options)
    report = fusetune.apply(lora)
    assert not report.patched["lora"]
    assert len(report.left_alone["lora"]) == 4 and all(reason in r for _, r in report.left_alone["lora"])
    torch.manual_seed(3)
    loss = loss_and_backward(lora, **batch())
    torch.manual_seed(3)
    assert_close(loss, loss_and_backward(reference, **batch()), "loss")


def test_phi3_fused_projections_with_lora_are_left_alone_with_their_reason():
    """Phi-3's qkv_proj and gate_up_proj hold several projections in one weight: their LoRA layers
    run PEFT's modules, and the report names both, attention and MLP (it named only the MLP)."""
    lora, reference = _lora_pair("phi3")
    report = fusetune.apply(lora)
    assert not report.patched["lora"]
    reasons = [reason for _, reason in report.left_alone["lora"]]
    assert len(reasons) == 4  # two layers, attention and MLP each
    assert sum("fused qkv_proj" in r for r in reasons) == 2
    assert sum("fused gate_up_proj" in r for r in reasons) == 2
    inputs = batch()
    assert_close(loss_and_backward(lora, **inputs), loss_and_backward(reference, **inputs), "loss")


def test_disabled_and_merged_adapters_follow_peft(fused_calls):
    lora, reference = _lora_pair("llama")
    fusetune.apply(lora)
    inputs = batch()
    with torch.no_grad():
        with lora.disable_adapter(), reference.disable_adapter():
            assert_close(lora(**inputs).loss, reference(**inputs).loss, "loss with adapters disabled")
        lora.merge_adapter()
        reference.merge_adapter()
        assert_close(lora(**inputs).loss, reference(**inputs).loss, "loss with adapters merged")
        lora.unmerge_adapter()
        reference.unmerge_adapter()
        assert_close(lora(**inputs).loss, reference(**inputs).loss, "loss after unmerging")
    assert fused_calls["mlp"] > 0


class _CrossAttention(nn.Module):
    """Queries from x, keys and values from another tensor (as mllama's cross-attention layers)."""

    def __init__(self, width: int):
        super().__init__()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self, name, nn.Linear(width, width, bias=False))

    def forward(self, x, states):
        q, k, v = self.q_proj(x), self.k_proj(states), self.v_proj(states)
        weights = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
        return self.o_proj(weights @ v)


def test_projections_with_different_inputs_split_the_group():
    torch.manual_seed(0)
    module = _CrossAttention(24)
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                             init_lora_weights=False)
    torch.manual_seed(1)
    lora = peft.get_peft_model(copy.deepcopy(module), config)
    torch.manual_seed(1)
    reference = peft.get_peft_model(module, copy.deepcopy(config))
    report = fusetune.apply(lora, loss=None)
    assert len(report.patched["lora"]) == 1
    x, states = torch.randn(2, 5, 24), torch.randn(2, 7, 24)
    for step in range(2):
        out, expected = lora(x, states), reference(x, states)
        assert_close(out, expected, f"output, call {step}")
        out.square().sum().backward()
        expected.square().sum().backward()
        assert_same_gradients(lora, reference)
    group = lora.get_base_model().q_proj._fusetune_lora_group
    assert group.split


def test_undo_and_deep_copy():
    lora, reference = _lora_pair("llama")
    report = fusetune.apply(lora)
    duplicate = copy.deepcopy(lora)
    q_proj = duplicate.get_base_model().model.layers[0].self_attn.q_proj
    assert all(member in list(duplicate.modules()) for member in q_proj._fusetune_lora_group.layers)
    report.undo()
    base = lora.get_base_model().model.layers[0]
    assert not isinstance(base.mlp, FusedLoraMLP) and "forward" not in base.self_attn.q_proj.__dict__
    inputs = batch()
    assert_close(loss_and_backward(duplicate, **inputs), loss_and_backward(reference, **inputs), "copy loss")
    assert_close(loss_and_backward(lora, **inputs), loss_and_backward(reference, **inputs), "undone loss")


def test_switch_off_leaves_lora_to_peft():
    lora, _ = _lora_pair("llama")
    report = fusetune.apply(lora, lora=False)
    assert "lora" in report.switched_off and not report.patched["lora"]
    assert not any(isinstance(m, FusedLoraMLP) for m in lora.modules())


def test_4bit_base_weights_are_fused_and_match_peft(fused_calls):
    """QLoRA: NF4 base weights (quantised in place), LoRA on every projection, fused vs PEFT's path.

    Widths are multiples of bitsandbytes' block size: its CPU dequantisation mislays blocks of rows
    that are not (its CUDA path and fusetune's kernel agree with its quantiser everywhere).
    """
    pytest.importorskip("bitsandbytes")
    from fusetune.quantize import quantize_4bit

    model = tiny_model("llama", intermediate_size=128)
    converted = quantize_4bit(model, compute_dtype=torch.float32)
    assert len(converted) == 2 * len(ALL_LINEAR)
    reference = copy.deepcopy(model)
    config = peft.LoraConfig(r=4, target_modules=ALL_LINEAR, init_lora_weights=False)
    torch.manual_seed(1)
    lora = peft.get_peft_model(model, config)
    torch.manual_seed(1)
    lora_reference = peft.get_peft_model(reference, copy.deepcopy(config))
    report = fusetune.apply(lora)
    assert len(report.patched["lora"]) == 4
    inputs = batch()
    assert_close(loss_and_backward(lora, **inputs), loss_and_backward(lora_reference, **inputs), "loss")
    assert_same_gradients(lora, lora_reference)
    assert fused_calls["mlp"] == 2 and sorted(fused_calls["linear"]) == [1, 1, 3, 3]


@pytest.mark.parametrize("reentrant", [False, True])
def test_fused_lora_under_transformers_checkpointing(reentrant, fused_calls):
    """The q/k/v group and the fused MLP recompute correctly inside torch.utils.checkpoint."""
    lora, reference = _lora_pair("llama")
    for model in (lora, reference):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.enable_input_require_grads()
    fusetune.apply(lora)
    inputs = batch()
    assert_close(loss_and_backward(lora, **inputs), loss_and_backward(reference, **inputs), "loss")
    assert_same_gradients(lora, reference)
    assert fused_calls["mlp"] == 4  # each layer's MLP: forward, then its recompute in backward


def test_mlp_row_tiles_match_peft():
    lora, reference = _lora_pair("llama")
    fusetune.apply(lora, mlp_tile_rows=5)  # 2 x 12 tokens: 5 tiles, the last one short
    assert all(m.tile_rows == 5 for m in lora.modules() if isinstance(m, FusedLoraMLP))
    inputs = batch()
    assert_close(loss_and_backward(lora, **inputs), loss_and_backward(reference, **inputs), "loss")
    assert_same_gradients(lora, reference)


def test_4bit_bytes_cast_to_another_dtype_of_the_same_width_are_refused():
    """NF4 bytes stored as bf16 and handed to the forward as fp16 (FSDP2 with param_dtype fp16):
    the same byte count, other bits, so the size check passes; before, the fused path dequantised
    the changed bits silently (the dense weight's relative error went from 0.09 to 2.2). Gathered in
    their own dtype, the plain tensor is read with the layer's quantisation state."""
    pytest.importorskip("bitsandbytes")
    from fusetune.nn.lora import base_weight
    from fusetune.ops.nf4 import dequantize_nf4
    from fusetune.quantize import quantize_4bit

    model = tiny_model("llama", intermediate_size=128)
    quantize_4bit(model, compute_dtype=torch.float32, quant_storage=torch.bfloat16)
    layer = model.model.layers[0].self_attn.q_proj
    stored = layer.weight
    layer.quant_state = stored.quant_state  # as bitsandbytes keeps it on the layer after a forward
    layer._parameters["weight"] = nn.Parameter(stored.data.clone(), requires_grad=False)  # gathered
    alias = base_weight(layer)
    torch.testing.assert_close(dequantize_nf4(alias, alias.quant_state, torch.float32),
                               dequantize_nf4(stored.data, stored.quant_state, torch.float32))
    layer._parameters["weight"] = nn.Parameter(stored.data.to(torch.float16), requires_grad=False)
    with pytest.raises(ValueError, match="stored as torch.bfloat16 but reached its forward as torch.float16"):
        base_weight(layer)


def test_mixed_adapter_batches_follow_peft(fused_calls):
    """PEFT's ``adapter_names=`` (a row per adapter, "__base__" for none) reaches each LoRA layer as a
    forward hook: the fused MLP read the weights without calling its projections, so every row took
    the active adapter (0.84 off PEFT's logits). Projections with hooks now run their own forward."""
    lora, reference = _lora_pair("llama")
    fusetune.apply(lora)
    ids = batch()["input_ids"][:2]
    names = ["__base__", "default"]
    with torch.no_grad():
        got = lora.eval()(input_ids=ids, adapter_names=names).logits
        expected = reference.eval()(input_ids=ids, adapter_names=names).logits
        with reference.disable_adapter():
            base = reference(input_ids=ids).logits
    assert_close(got, expected, "logits")
    assert_close(got[0], base[0], "the __base__ row")
    assert fused_calls["mlp"] == 0
    with torch.no_grad():  # without hooks, the fused paths again
        assert_close(lora(input_ids=ids).logits, reference(input_ids=ids).logits, "logits")
    assert fused_calls["mlp"] == 2


def test_offloaded_weights_run_unfused_with_their_reason():
    """accelerate's offload (``device_map`` with a CPU or disk share) keeps weights on the meta device,
    loaded inside each module's own forward: the LoRA attention and the loss are left alone, naming
    it (the attention was reported fused and the first forward failed)."""
    from accelerate import cpu_offload

    lora, reference = _lora_pair("llama")
    for model in (lora, reference):
        cpu_offload(model.get_base_model(), execution_device=torch.device("cpu"))
    report = fusetune.apply(lora)
    assert not report.patched["lora"] and not report.patched["loss"]
    assert all("meta device" in reason for _, reason in report.left_alone["lora"])
    loss_reasons = [reason for _, reason in report.left_alone["loss"]]
    assert len(loss_reasons) == 1 and "lm_head's weight is on the meta device" in loss_reasons[0]
    inputs = batch()
    with torch.no_grad():
        assert_close(lora(**inputs).loss, reference(**inputs).loss, "loss")


def test_adalora_is_left_alone_naming_why():
    """AdaLoRA keeps its factors in ParameterDicts (and a singular-value vector): PEFT's path runs,
    and the reason says so (it read "0 active LoRA adapters")."""
    model, reference = tiny_model("llama"), tiny_model("llama")
    config = dict(init_r=4, target_r=2, target_modules=["q_proj", "v_proj"], total_step=10)
    config["init_lora_weights"] = False
    torch.manual_seed(1)
    lora = peft.get_peft_model(model, peft.AdaLoraConfig(**config))
    torch.manual_seed(1)
    reference = peft.get_peft_model(reference, peft.AdaLoraConfig(**config))
    report = fusetune.apply(lora)
    assert not report.patched["lora"] and report.left_alone["lora"]
    assert all("not plain LoRA (its lora_A is a ParameterDict)" in r for _, r in report.left_alone["lora"])
    inputs = batch()
    assert_close(loss_and_backward(lora, **inputs), loss_and_backward(reference, **inputs), "loss")


def test_8bit_base_layers_are_left_to_peft_naming_why(tmp_path):
    """bitsandbytes' 8-bit ``Linear8bitLt`` is an ``nn.Linear`` holding int8 weights and their scales
    apart: its LoRA layers run PEFT's path, the report names why, and the loss is PEFT's (they were
    reported fused, and every forward failed advising a cast that would drop the scales)."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_model("llama").save_pretrained(tmp_path)

    def load():
        quantized = AutoModelForCausalLM.from_pretrained(
            tmp_path, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map={"": "cpu"}
        ).train()
        torch.manual_seed(1)
        config = peft.LoraConfig(r=4, target_modules=ALL_LINEAR, init_lora_weights=False)
        return peft.get_peft_model(quantized, config)

    lora, reference = load(), load()
    report = fusetune.apply(lora)
    assert not report.patched["lora"] and report.left_alone["lora"]
    assert all("torch.int8 (Linear8bitLt" in reason for _, reason in report.left_alone["lora"])
    inputs = batch()
    assert_close(loss_and_backward(lora, **inputs), loss_and_backward(reference, **inputs), "loss")
