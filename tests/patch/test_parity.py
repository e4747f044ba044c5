"""Per-architecture parity: a patched tiny model trains exactly like its unpatched deep copy."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import fusetune  # noqa: E402
from fusetune.nn import FusedGatedMLP, FusedRMSNorm  # noqa: E402
from tests.patch.checks import (  # noqa: E402
    assert_close,
    assert_micro_batches_equal_one_batch,
    assert_other_instance_untouched,
    assert_same_gradients,
    assert_same_greedy_tokens,
    assert_same_loss_curve,
    assert_save_and_load_round_trip,
    loss_and_backward,
)
from tests.patch.models import TEXT_ARCHITECTURES, batch, tiny_model  # noqa: E402

ARCHS = list(TEXT_ARCHITECTURES)
# Gemma 2 soft-caps attention logits, which transformers runs in eager attention only.
ARCH_ATTN = [(a, attn) for a in ARCHS for attn in ("eager", "sdpa") if not (a == "gemma2" and attn == "sdpa")]


def _attn(arch: str) -> str:
    return "eager" if arch == "gemma2" else "sdpa"


def _pair(arch: str, attn: str | None = None, **apply_options):
    """(patched model, unpatched deep copy, report)."""
    model = tiny_model(arch, attn or _attn(arch))
    reference = copy.deepcopy(model)
    return model, reference, fusetune.apply(model, **apply_options)


@pytest.mark.parametrize("arch,attn", ARCH_ATTN)
def test_loss_and_gradients_match(arch, attn):
    model, reference, _ = _pair(arch, attn)
    inputs = batch()
    assert model(**inputs).logits is None  # the fused path ran
    assert_close(loss_and_backward(model, **inputs), loss_and_backward(reference, **inputs), "loss")
    assert_same_gradients(model, reference)


@pytest.mark.parametrize("arch", ARCHS)
def test_report_lists_what_was_patched(arch):
    model, reference, report = _pair(arch)
    norms = [n for n, m in reference.named_modules() if type(m).__name__.endswith("RMSNorm")]
    mlps = [n for n, m in reference.named_modules() if n.endswith(".mlp")]
    assert sorted(report.patched["rms_norm"]) == sorted(norms)
    assert sorted(report.patched["glu"]) == sorted(mlps)
    assert report.patched["loss"] == [f"{type(model).__name__}.forward"]
    assert report.patched["rope"] == [f"model.layers.{i}.self_attn" for i in range(2)]
    assert not report.left_alone["rope"]
    assert all(isinstance(model.get_submodule(n), FusedRMSNorm) for n in norms)
    assert all(isinstance(model.get_submodule(n), FusedGatedMLP) for n in mlps)
    gemma = arch.startswith("gemma")
    assert {(m.offset, m.cast) for m in model.modules() if isinstance(m, FusedRMSNorm)} == {
        (1.0, "gemma") if gemma else (0.0, "llama")
    }
    table = str(report)
    assert "rms_norm" in table and "rope" in table


@pytest.mark.parametrize("arch", ARCHS)
def test_adamw_loss_curve_matches(arch):
    """``CURVE_STEPS`` AdamW steps on fresh batches: every step's loss within 1e-3 (relative) of the
    original's."""
    model, reference, _ = _pair(arch)
    assert_same_loss_curve(model, reference, lambda step: batch(seed=step))


@pytest.mark.parametrize("arch", ARCHS)
def test_num_items_in_batch_micro_batches_equal_one_batch(arch):
    model, reference, _ = _pair(arch)
    assert_micro_batches_equal_one_batch(model, reference, [batch(seed=1), batch(seed=2)])


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_lora_matches(arch):
    model = tiny_model(arch, _attn(arch))
    reference = copy.deepcopy(model)
    targets = ["q_proj", "v_proj", "down_proj", "gate_up_proj" if arch == "phi3" else "gate_proj"]
    config = peft.LoraConfig(r=4, target_modules=targets, lora_dropout=0.0, init_lora_weights=False)
    torch.manual_seed(1)
    lora = peft.get_peft_model(model, config)
    torch.manual_seed(1)
    lora_reference = peft.get_peft_model(reference, copy.deepcopy(config))
    report = fusetune.apply(lora)
    assert (report.patched["glu"] or report.patched["lora"]) and report.patched["loss"]
    inputs = batch()
    assert_close(loss_and_backward(lora, **inputs), loss_and_backward(lora_reference, **inputs), "loss")
    assert_same_gradients(lora, lora_reference)


def test_apply_before_get_peft_model():
    model, reference, _ = _pair("llama")
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "gate_proj", "up_proj"], init_lora_weights=False)
    torch.manual_seed(1)
    lora = peft.get_peft_model(model, config)
    torch.manual_seed(1)
    lora_reference = peft.get_peft_model(reference, copy.deepcopy(config))
    inputs = batch()
    assert_close(loss_and_backward(lora, **inputs), loss_and_backward(lora_reference, **inputs), "loss")
    assert_same_gradients(lora, lora_reference)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_and_load_round_trip(arch, tmp_path):
    model, reference, _ = _pair(arch)
    assert_save_and_load_round_trip(model, reference, tmp_path, batch())


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generate_matches(arch):
    model, reference, _ = _pair(arch)
    ids = batch()["input_ids"][:1, :5]
    assert_same_greedy_tokens(model, reference, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})


@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_checkpointing_matches(arch):
    model, reference, _ = _pair(arch)
    for m in (model, reference):
        m.gradient_checkpointing_enable()
    inputs = batch()
    assert_close(loss_and_backward(model, **inputs), loss_and_backward(reference, **inputs), "loss")
    assert_same_gradients(model, reference)


@pytest.mark.parametrize("arch", ARCHS)
def test_second_instance_is_untouched(arch):
    assert_other_instance_untouched(lambda: tiny_model(arch, attn=_attn(arch)), fusetune.apply, batch())
