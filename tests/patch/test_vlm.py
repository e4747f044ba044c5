"""Vision-language models: a patched tiny VLM trains exactly like its unpatched deep copy.

For each architecture (``tests/patch/vlm_models.py``): the report lists the vision tower's and the
language model's norms and gated MLPs as patched and the ungated vision MLPs as left alone; with
images in the batch and the image tokens' labels at -100, the fused loss (which never makes the
logits) and every parameter gradient equal the original forward's.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn

import fusetune
from fusetune.nn import FusedGatedMLP, FusedLayerNorm, FusedRMSNorm
from fusetune.patch.glu import UNGATED_REASON
from tests.patch.checks import RTOL, assert_close
from tests.patch.vlm_models import VLMS, tiny_vlm, vlm_batch

ARCHS = list(VLMS)
# The attention key bias has an exactly zero gradient (softmax ignores a shift shared by all keys),
# so both models hold only rounding noise there: gradients are compared relative to the larger of
# their own norm and this fraction of the largest gradient norm in the model.
_GRAD_FLOOR = 1e-6


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
    ours = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    theirs = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    assert ours.keys() == theirs.keys()
    largest = max(float(g.norm()) for g in theirs.values() if g is not None)
    for name, grad in ours.items():
        expected = theirs[name]
        assert (grad is None) == (expected is None), name
        if grad is None:
            continue
        scale = max(float(expected.double().norm()), _GRAD_FLOOR * largest)
        error = float((grad.double() - expected.double()).norm()) / scale
        assert error <= RTOL, f"grad of {name}: relative error {error:.2e} > {RTOL:.0e}"


def _assert_training_matches(model, reference, inputs) -> None:
    out, expected = _run(model, **inputs), _run(reference, **inputs)
    assert out.logits is None  # the fused path ran
    assert_close(out.loss, expected.loss, "loss")
    _assert_same_gradients(model, reference)
    # Same output class, carrying the same base-model fields (cache, image outputs, ...).
    assert type(out) is type(expected)
    present = {k for k, v in expected.items() if v is not None} - {"logits"}
    assert {k for k, v in out.items() if v is not None} == present


@pytest.mark.parametrize(
    "arch,attn", [(a, "eager") for a in ARCHS] + [(a, "sdpa") for a in ("qwen2_5_vl", "gemma3")]
)
def test_loss_and_gradients_match(arch, attn):
    # Gemma 3's text config sets final_logit_softcapping (0.2), which Gemma3ForConditionalGeneration
    # does not apply (Gemma3ForCausalLM does): a soft-capped fused loss would differ here.
    model, reference, _ = _pair(arch, attn)
    inputs = vlm_batch(arch)
    assert (inputs["labels"][inputs["input_ids"] == 150] == -100).all()
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
    assert report.patched["glu"] and report.patched["loss"]
    inputs = vlm_batch(arch)
    out, expected = _run(lora, **inputs), _run(lora_reference, **inputs)
    assert out.logits is None
    assert_close(out.loss, expected.loss, "loss")
    _assert_same_gradients(lora, lora_reference)


def test_qwen2_5_vl_num_items_in_batch_micro_batches_equal_one_batch():
    model, reference, _ = _pair("qwen2_5_vl")
    micro = [vlm_batch("qwen2_5_vl", seed=1), vlm_batch("qwen2_5_vl", seed=2)]
    items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
    model.zero_grad()
    total = sum(model(**b, num_items_in_batch=torch.tensor(items)).loss for b in micro)
    total.backward()
    big = {key: torch.cat([b[key] for b in micro]) for key in micro[0]}
    expected = _run(reference, **big).loss
    assert_close(total.detach(), expected, "accumulated loss")
    _assert_same_gradients(model, reference)


def test_qwen2_5_vl_greedy_generate_with_an_image_matches():
    model, reference, _ = _pair("qwen2_5_vl")
    inputs = vlm_batch("qwen2_5_vl")
    t, h, w = inputs["image_grid_thw"][0].tolist()
    prompt = {
        "input_ids": inputs["input_ids"][:1],
        "attention_mask": inputs["attention_mask"][:1],
        "mm_token_type_ids": inputs["mm_token_type_ids"][:1],
        "pixel_values": inputs["pixel_values"][: t * h * w],
        "image_grid_thw": inputs["image_grid_thw"][:1],
    }
    tokens = [m.eval().generate(**prompt, max_new_tokens=4, do_sample=False) for m in (model, reference)]
    assert torch.equal(tokens[0], tokens[1])


def test_mllama_gradient_checkpointing_matches():
    model, reference, _ = _pair("mllama")
    for m in (model, reference):
        m.gradient_checkpointing_enable()
    _assert_training_matches(model, reference, vlm_batch("mllama"))


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
