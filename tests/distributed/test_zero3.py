"""DeepSpeed ZeRO-3 partitioned parameters keep fusetune's fused LoRA on PEFT's modules.

ZeRO-3 marks each parameter it partitions with ``ds_id`` / ``ds_status`` and gathers a module's own
parameters only inside that module's forward; the fused LoRA paths read the projections' weights
from the parent's forward, where they would be empty placeholders. Marking the parameters of a
real model the same way (without DeepSpeed) must send those calls to PEFT's modules, reported at
patch time and re-checked at call time, with the loss and gradients of the unpatched model.
"""

from __future__ import annotations

import peft
import pytest
import torch

import fusetune
from fusetune.nn.lora import projection_weights
from fusetune.ops.lora import LoraWeights
from tests.patch.models import batch, tiny_model

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_model() -> torch.nn.Module:
    """A tiny PEFT LoRA Llama over every linear layer, the same weights on every call."""
    model = tiny_model("llama")
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=ALL_LINEAR, init_lora_weights=False)
    return peft.get_peft_model(model, config)


def partition(model: torch.nn.Module) -> None:
    """Mark every parameter as ZeRO-3 does (the data stays, so the outputs can be compared)."""
    for index, param in enumerate(model.parameters()):
        param.ds_id = index
        param.ds_status = "NOT_AVAILABLE"


def loss_and_grads(model: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training loss on a fixed batch and every parameter's gradient after its backward."""
    output = model(**batch())
    output.loss.backward()
    return output.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def reference_ops(monkeypatch):
    """The ops' PyTorch references (fast on CPU; the kernels are not what this checks)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture
def no_fused_lora(monkeypatch):
    """Make any call of the fused LoRA ops fail the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a fused LoRA op ran on ZeRO-3 partitioned weights")

    monkeypatch.setattr("fusetune.patch.lora.lora_linear", refuse)
    monkeypatch.setattr("fusetune.nn.lora.lora_glu_mlp", refuse)


@pytest.mark.parametrize("part", ["base_layer", "lora_A", "lora_B"])
def test_projection_weights_name_a_partitioned_parameter(part):
    layer = lora_model().get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(projection_weights(layer), LoraWeights)
    module = layer.base_layer if part == "base_layer" else getattr(layer, part)["default"]
    module.weight.ds_id, module.weight.ds_status = 0, "NOT_AVAILABLE"
    assert "ZeRO-3" in projection_weights(layer)


@pytest.mark.parametrize("when", ["before_apply", "after_apply"])
def test_partitioned_model_runs_peft_modules_with_the_same_gradients(when, no_fused_lora, reference_ops):
    """Partitioned before ``apply``: the report leaves every LoRA block alone, saying why. After
    ``apply`` (the Trainer path: patch, then DeepSpeed partitions): the calls fall back."""
    expected_loss, expected_grads = loss_and_grads(lora_model())
    model = lora_model()
    if when == "before_apply":
        partition(model)
    report = fusetune.apply(model)
    if when == "before_apply":
        assert not report.patched["lora"]
        reasons = [reason for _, reason in report.left_alone["lora"]]
        assert len(reasons) == 4 and all("ZeRO-3" in reason for reason in reasons)
    else:
        assert len(report.patched["lora"]) == 4
        partition(model)
    loss, grads = loss_and_grads(model)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-5)
    assert sorted(grads) == sorted(expected_grads)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)


def test_empty_zero3_placeholders_are_not_probed():
    """Parameters ZeRO-3 has already partitioned are empty outside their module's forward: a probe
    would compare empty tensors, so those modules are left alone with the fix in the reason."""
    model = tiny_model("llama")
    norm = model.model.layers[0].input_layernorm
    norm.weight = torch.nn.Parameter(torch.empty(0))
    norm.weight.ds_id = 0
    report = fusetune.apply(model)
    reasons = dict(report.left_alone["rms_norm"])
    assert "apply fusetune before deepspeed.initialize" in reasons["model.layers.0.input_layernorm"]
    assert "model.layers.0.post_attention_layernorm" in report.patched["rms_norm"]
