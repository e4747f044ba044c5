"""Vision-language models: a patched tiny VLM trains exactly like its unpatched deep copy.

For each architecture (``tests/patch/vlm_models.py``), always with images in the batch: the report
lists the vision tower's and the language model's norms and gated MLPs as patched and the ungated
vision MLPs as left alone; with the image tokens' labels at -100, the fused loss (which never makes
the logits) and every parameter gradient equal the original forward's, with eager and sdpa
attention and with gradient checkpointing; a few AdamW steps give the same loss curve; two
micro-batches with ``num_items_in_batch`` equal one batch; a LoRA model matches; save / load
round-trips; greedy generation with an image gives the same tokens; a second instance is untouched.
The checks shared with the text architectures live in ``tests/patch/checks.py``.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn

import fusetune
from fusetune.nn import FusedGatedMLP, FusedLayerNorm, FusedRMSNorm
from fusetune.nn.lora import is_lora_layer
from fusetune.patch.glu import UNGATED_REASON
from tests.patch.checks import (
    assert_close,
    assert_micro_batches_equal_one_batch,
    assert_other_instance_untouched,
    assert_same_gradients,
    assert_same_greedy_tokens,
    assert_same_loss_curve,
    assert_save_and_load_round_trip,
)
from tests.patch.vlm_models import IMAGE, VLMS, split_rows, tiny_vlm, vlm_batch, vlm_prompt

ARCHS = list(VLMS)
# The attention key bias has an exactly zero gradient (softmax ignores a shift shared by all keys),
# so both models hold only rounding noise there: gradients are compared relative to the larger of
# their own norm and this fraction of the largest gradient norm in the model. (CLIP's k_proj.bias
# noise reaches ~2e-10 of the largest with sdpa and in the micro-batch sum, hence 1e-5.)
_GRAD_FLOOR = 1e-5


def _pair(arch: str, attn: str = "eager", **overrides):
    """(patched model, unpatched deep copy, report)."""
    model = tiny_vlm(arch, attn, **overrides)
    reference = copy.deepcopy(model)
    return model, reference, fusetune.apply(model)


def _run(model: nn.Module, **inputs):
    """Zero the gradients, run the model, backpropagate the loss; return the output."""
    model.zero_grad(set_to_none=True)
    output = model(**inputs)
    output.loss.backward()
    return output


def _assert_same_gradients(model: nn.Module, reference: nn.Module) -> None:
    assert_same_gradients(model, reference, floor=_GRAD_FLOOR)


def _assert_training_matches(model, reference, inputs) -> None:
    out, expected = _run(model, **inputs), _run(reference, **inputs)
    assert out.logits is None  # the fused path ran
    assert_close(out.loss, expected.loss, "loss")
    _assert_same_gradients(model, reference)
    # Same output class, carrying the same base-model fields (cache, image outputs, ...).
    assert type(out) is type(expected)
    present = {k for k, v in expected.items() if v is not None} - {"logits"}
    assert {k for k, v in out.items() if v is not None} == present


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ARCHS)
def test_loss_and_gradients_match(arch, attn):
    # Gemma 3's text config sets final_logit_softcapping (0.2), which Gemma3ForConditionalGeneration
    # does not apply (Gemma3ForCausalLM does): a soft-capped fused loss would differ here.
    # transformers 5.24 takes attn_implementation="sdpa" for every tower of all seven (set on the
    # top config, it reaches the vision and text sub-configs): checked below, so none is skipped.
    model, reference, _ = _pair(arch, attn)
    assert {m.config._attn_implementation for m in model.modules() if hasattr(m, "config")} == {attn}
    inputs = vlm_batch(arch)
    assert (inputs["labels"][inputs["input_ids"] == IMAGE] == -100).all()
    _assert_training_matches(model, reference, inputs)


def _is_rms_norm(module: nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm")


def _is_gated(module: nn.Module) -> bool:
    return {"gate_proj", "up_proj", "down_proj"} <= set(dict(module.named_children()))


def _is_ungated(module: nn.Module) -> bool:
    children = set(dict(module.named_children()))
    return any({f"{p}1", f"{p}2"} <= children for p in ("fc", "linear_fc", "linear_"))


@pytest.mark.parametrize("arch", ARCHS)
def test_report_lists_vision_and_language_parts(arch):
    model, reference, report = _pair(arch)
    spec = VLMS[arch]
    modules = dict(reference.named_modules())
    layer_norms = sorted(n for n, m in modules.items() if isinstance(m, nn.LayerNorm))
    rms_norms = sorted(n for n, m in modules.items() if _is_rms_norm(m))
    gated = sorted(n for n, m in modules.items() if _is_gated(m))
    ungated = sorted(n for n, m in modules.items() if _is_ungated(m))
    assert sorted(report.patched["layer_norm"]) == layer_norms
    assert sorted(report.patched["rms_norm"]) == rms_norms
    assert sorted(report.patched["glu"]) == gated
    # Qwen2.5-VL's vision MLPs are gated (patched); the other vision towers' are ungated (left alone).
    assert bool(ungated) == (arch != "qwen2_5_vl")
    assert sorted(n for n, r in report.left_alone["glu"] if r == UNGATED_REASON) == ungated
    assert report.patched["loss"] == [f"{type(model).__name__}.forward"]
    assert not report.left_alone["rms_norm"] and not report.left_alone["layer_norm"]
    # Both towers got their norms patched, and the language model its gated MLPs.
    norms = report.patched["layer_norm"] + report.patched["rms_norm"]
    assert any(n.startswith(spec.vision + ".") for n in norms)
    assert any(n.startswith(spec.language + ".") for n in norms)
    assert any(n.startswith(spec.language + ".") for n in gated)
    fused = (FusedLayerNorm, FusedRMSNorm, FusedGatedMLP)
    assert all(isinstance(model.get_submodule(n), fused) for n in layer_norms + rms_norms + gated)
    assert ("ungated MLP" in str(report)) == bool(ungated)


def test_qwen2_5_vl_vision_tower_has_gated_mlps_and_rms_norms():
    _, _, report = _pair("qwen2_5_vl")
    assert {"model.visual.blocks.0.mlp", "model.visual.blocks.1.mlp"} <= set(report.patched["glu"])
    assert {"model.visual.blocks.0.norm1", "model.visual.merger.ln_q"} <= set(report.patched["rms_norm"])


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_lora_on_the_language_model_matches(arch):
    model = tiny_vlm(arch)
    reference = copy.deepcopy(model)
    language = VLMS[arch].language.replace(".", r"\.")
    targets = rf"{language}\.layers\.\d+\.(self_attn\.(q_proj|v_proj)|mlp\.(gate_proj|down_proj))"
    config = peft.LoraConfig(r=4, target_modules=targets, lora_dropout=0.0, init_lora_weights=False)
    torch.manual_seed(1)
    lora = peft.get_peft_model(model, config)
    torch.manual_seed(1)
    lora_reference = peft.get_peft_model(reference, copy.deepcopy(config))
    assert any("lora_A" in n for n, _ in lora.named_parameters())
    report = fusetune.apply(lora)
    # Every language-model attention and MLP holding LoRA layers runs the fused LoRA path.
    holders = {name.rpartition(".")[0] for name, m in lora.named_modules() if is_lora_layer(m)}
    assert holders and holders <= set(report.patched["lora"]) and report.patched["loss"]
    inputs = vlm_batch(arch)
    out, expected = _run(lora, **inputs), _run(lora_reference, **inputs)
    assert out.logits is None
    assert_close(out.loss, expected.loss, "loss")
    _assert_same_gradients(lora, lora_reference)


@pytest.mark.parametrize("arch", ARCHS)
def test_num_items_in_batch_micro_batches_equal_one_batch(arch):
    """The batch's two rows as micro-batches (an image each, different label counts), each loss
    scaled by the items of both, sum to the loss of the whole batch (Qwen's flattened patches and
    grids concatenate back along dim 0 as well)."""
    model, reference, _ = _pair(arch)
    micro = split_rows(vlm_batch(arch, seed=1))
    assert_micro_batches_equal_one_batch(model, reference, micro, floor=_GRAD_FLOOR)


@pytest.mark.parametrize("arch", ARCHS)
def test_adamw_loss_curve_matches(arch):
    """``CURVE_STEPS`` AdamW steps (zero_grad each), a fresh one-row batch with its image each step
    (rows 0 and 1 in turn, to keep the interpreted kernels' time down): every step's loss within
    1e-3 (relative) of the unpatched model's.

    At lr 1e-3: at the text tests' 1e-2 these tiny VLMs do not train (the loss rises) and their
    trajectories are chaotic, so the first step's ~1e-7 rounding difference doubles about every
    step (Llava: 1e-7 at step 1, 4e-3 at step 20; two unpatched Llavas, eager against sdpa,
    differ by 5e-3 too); at 1e-3 the loss falls and the curves stay within ~1e-6.
    """
    model, reference, _ = _pair(arch)
    rows = lambda step: split_rows(vlm_batch(arch, seed=step))[step % 2]  # noqa: E731
    assert_same_loss_curve(model, reference, rows, lr=1e-3)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_and_load_round_trip(arch, tmp_path):
    """save_pretrained of the patched model, from_pretrained of the original class: the same keys,
    values, and eval logits and loss on a batch with images."""
    model, reference, _ = _pair(arch)
    assert_save_and_load_round_trip(model, reference, tmp_path, vlm_batch(arch))


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generate_with_an_image_matches(arch):
    model, reference, _ = _pair(arch)
    assert_same_greedy_tokens(model, reference, vlm_prompt(arch))


@pytest.mark.parametrize("arch", ARCHS)
def test_second_instance_is_untouched(arch):
    assert_other_instance_untouched(lambda: tiny_vlm(arch), fusetune.apply, vlm_batch(arch))


@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_checkpointing_matches(arch):
    model, reference, _ = _pair(arch)
    for m in (model, reference):
        m.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    _assert_training_matches(model, reference, vlm_batch(arch))


def test_mllama_for_causal_lm_matches():
    """MllamaForCausalLM: base model ``model`` (its base_model_prefix says "language_model"),
    with ready-made cross-attention states for the cross-attention layer."""
    from transformers import MllamaForCausalLM

    config = tiny_vlm("mllama").config.text_config
    torch.manual_seed(0)
    model = MllamaForCausalLM(config).train()
    reference = copy.deepcopy(model)
    report = fusetune.apply(model)
    assert report.patched["loss"] == ["MllamaForCausalLM.forward"]
    inputs = vlm_batch("mllama")
    text = {"input_ids": inputs["input_ids"], "labels": inputs["labels"]}
    generator = torch.Generator().manual_seed(3)
    text["cross_attention_states"] = torch.randn(2, 6, config.hidden_size, generator=generator)
    out, expected = _run(model, **text), _run(reference, **text)
    assert out.logits is None
    assert_close(out.loss, expected.loss, "loss")
    _assert_same_gradients(model, reference)


def test_gemma3_logits_and_tuple_output():
    """Asked for logits, the fused path returns the head's logits, not soft-capped (the tiny text
    config's cap of 0.2 would squash them), here as a tuple."""
    model, reference, _ = _pair("gemma3")
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight  # tied, as Gemma 3's
    inputs = vlm_batch("gemma3")
    with torch.no_grad():
        loss, logits, *_ = model(**inputs, return_logits=True, return_dict=False)
        expected = reference(**inputs)
    assert_close(logits, expected.logits, "logits")
    assert_close(loss, expected.loss, "loss")
    assert expected.logits.abs().max() > 2 * model.config.text_config.final_logit_softcapping
