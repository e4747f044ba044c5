"""The Qwen2-VL family's vision attention with all its windows (or images) in one call.

On a CPU the swapped module runs SDPA per segment, as transformers does, so a patched tower must
train exactly as the original; with ``varlen_attn`` forced on (a stand-in with torch 2.13's
signature that computes in float64), one call per layer must cover every segment, with full (not
causal) attention. On CUDA the real ``varlen_attn`` runs, against the original's per-window SDPA.
"""

from __future__ import annotations

import copy
import functools

import peft
import pytest
import torch
import torch.nn.functional as F
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VLVisionAttention,
    apply_rotary_pos_emb_vision,
)

import fusetune
from fusetune import segment_attention as segmented
from fusetune.nn import SegmentedVisionAttention
from fusetune.patch.vision import vision_attention_rule
from tests.patch.vlm_models import VLMS, _qwen_batch, tiny_vlm

ARCHS = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
# Two rows, one image each: 8 x 8 patches (four of Qwen2.5-VL's 56-pixel windows in the tiny
# config) and 4 x 4 (one window). Qwen3-VL's patches are 16 pixels.
windowed_batch = _qwen_batch(14, ((1, 8, 8), (1, 4, 4)))
PATCH = {"qwen3_vl": 16}


def _vision_lora(arch: str):
    """The tiny VLM with LoRA on its vision attention's qkv and proj (and a copy without fusetune)."""
    model = tiny_vlm(arch, attn="sdpa")
    vision = VLMS[arch].vision.replace(".", r"\.")
    targets = rf"{vision}\.blocks\.\d+\.attn\.(qkv|proj)"
    config = peft.LoraConfig(r=4, target_modules=targets, lora_dropout=0.0, init_lora_weights=False)
    torch.manual_seed(1)
    patched = peft.get_peft_model(model, config)
    reference = copy.deepcopy(patched)
    return patched, reference


def _attention_names(model) -> set[str]:
    return {name for name, module in model.named_modules() if name.endswith("attn")
            and "visual" in name and "lora" not in name}


@pytest.mark.parametrize("arch", ARCHS)
def test_vision_attention_is_swapped_and_trains_as_the_original(arch):
    model, reference = _vision_lora(arch)
    keys = list(model.state_dict())
    report = fusetune.apply(model, loss=None)
    swapped = set(report.patched["vision_attention"])
    assert swapped and swapped == _attention_names(reference)
    assert all(isinstance(model.get_submodule(name), SegmentedVisionAttention) for name in swapped)
    assert list(model.state_dict()) == keys  # the same parameters under the same names

    inputs = _qwen_batch(PATCH.get(arch, 14), ((1, 8, 8), (1, 4, 4)))()
    loss, expected = model(**inputs).loss, reference(**inputs).loss
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    loss.backward()
    expected.backward()
    grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    assert any("visual" in n and "lora" in n for n in grads)
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, grads[name], rtol=1e-5, atol=1e-6, msg=name)

    fusetune.unapply(model)
    assert not any(isinstance(m, SegmentedVisionAttention) for m in model.modules())


def _float64_full_attention(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None,
                            scale=None, window_size=(-1, -1), enable_gqa=False, seqused_k=None,
                            block_table=None, num_splits=None, calls: list):
    """``varlen_attn`` with torch 2.13's signature: records the call and computes each segment's
    full attention in float64."""
    calls.append({"tokens": query.shape[0], "cu": cu_seq_q.tolist(), "max": (max_q, max_k),
                  "window": window_size, "scale": scale})
    parts = []
    for start, end in zip(cu_seq_q.tolist(), cu_seq_q.tolist()[1:], strict=False):
        q, k, v = (t[start:end].transpose(0, 1).double() for t in (query, key, value))
        parts.append(F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(0, 1))
    return torch.cat(parts).to(query.dtype)


def test_one_varlen_call_per_layer_covers_every_window(monkeypatch):
    model, reference = _vision_lora("qwen2_5_vl")
    fusetune.apply(model, loss=None)
    calls = []
    fake = functools.partial(_float64_full_attention, calls=calls)  # keeps the signature call_plan reads
    monkeypatch.setattr(segmented, "varlen_function", lambda: fake)
    monkeypatch.setattr(segmented, "varlen_usable", lambda query, key, dropout: ("fake",))
    reads = []
    real_read = segmented.read_segments
    monkeypatch.setattr(segmented, "read_segments", lambda *args: reads.append(args[0]) or real_read(*args))

    inputs = windowed_batch()
    torch.testing.assert_close(model(**inputs).loss, reference(**inputs).loss, rtol=1e-5, atol=1e-5)
    depth = len(_attention_names(reference))
    assert len(calls) == depth  # one call a layer, however many windows
    windowed, full = calls[0], calls[1]  # block 0 attends in windows, block 1 (fullatt) per image
    assert len(windowed["cu"]) == 6 and len(full["cu"]) == 3  # five windows; two images
    assert all(call["window"] == (-1, -1) for call in calls)  # full attention within a segment
    assert windowed["max"][0] == max(b - a for a, b in zip(windowed["cu"], windowed["cu"][1:], strict=False))
    assert len(reads) == 2  # each boundaries tensor is read on the host once a forward, not once a layer


class _NoAttention(Qwen2_5_VLVisionAttention):
    """Calls the vision rotary function but mixes no tokens: not attention at all."""

    def forward(self, hidden_states, cu_seqlens, position_embeddings=None, **kwargs):
        tokens = hidden_states.shape[0]
        query, key, value = self.qkv(hidden_states).reshape(tokens, 3, self.num_heads, -1).unbind(1)
        query, key = apply_rotary_pos_emb_vision(query, key, *position_embeddings)
        return self.proj((query + value).reshape(tokens, -1))


def test_a_vision_attention_computing_something_else_is_left_alone():
    config = tiny_vlm("qwen2_5_vl").config.vision_config
    decision = vision_attention_rule(_NoAttention(config))
    assert decision.replacement is None and "something else in eval mode" in decision.reason
    assert vision_attention_rule(Qwen2_5_VLVisionAttention(config)).replacement is not None


def test_a_vision_attention_with_dropout_is_left_alone():
    """GLM-4V's vision attention drops out attention weights in training (attention_dropout from
    its config); the swap has no dropout, so the probe in training mode leaves such a module alone."""
    attention = Qwen2_5_VLVisionAttention(tiny_vlm("qwen2_5_vl").config.vision_config)
    attention.attention_dropout = 0.5
    decision = vision_attention_rule(attention)
    assert decision.replacement is None and "in training mode" in decision.reason


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: torch's varlen_attn")
def test_on_cuda_the_varlen_kernel_matches_the_per_window_attention(monkeypatch):
    model, reference = _vision_lora("qwen2_5_vl")
    model, reference = model.to("cuda", torch.bfloat16), reference.to("cuda", torch.bfloat16)
    report = fusetune.apply(model, loss=None)
    assert report.patched["vision_attention"]
    calls = []
    real = segmented.varlen_function()
    assert real is not None, "this torch has no varlen_attn"

    @functools.wraps(real)  # call_plan reads the signature through __wrapped__
    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(segmented, "varlen_function", lambda: counted)
    inputs = {k: v.to("cuda", torch.bfloat16 if v.is_floating_point() else v.dtype)
              for k, v in windowed_batch().items()}
    loss, expected = model(**inputs).loss, reference(**inputs).loss
    assert len(calls) == len(_attention_names(reference))
    torch.testing.assert_close(loss, expected, rtol=2e-2, atol=2e-2)
    loss.backward()
    expected.backward()
    grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    for name, param in model.named_parameters():
        if param.requires_grad:
            scale = grads[name].abs().max().item()
            torch.testing.assert_close(param.grad, grads[name], rtol=5e-2, atol=5e-2 * scale, msg=name)


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_a_patched_vision_tower_runs_under_inference_mode(arch):
    """Tensors made under ``torch.inference_mode`` have no version counter: the vision attention's
    cache of boundaries read one and failed ("Inference tensors do not track version counter"), so a
    patched Qwen VLM could not run an evaluation or ``generate`` written with inference_mode."""
    from tests.patch.vlm_models import vlm_batch

    reference = tiny_vlm(arch, "sdpa").eval()
    model = copy.deepcopy(reference)
    fusetune.apply(model)
    batch = vlm_batch(arch)
    with torch.inference_mode():
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits)
