"""RoPE patching: each attention instance's forward is rebound to call fusetune's rope.

Checks parity per architecture, isolation (other instances, classes and module globals), undo,
deep copy, the decorator wrapper kept intact, the fallback for calls the fused op does not take,
and rotary functions with other maths (interleaved, M-RoPE's extra argument) left alone.
"""

from __future__ import annotations

import copy
import inspect
import sys
import types
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

import fusetune  # noqa: E402
import fusetune.patch.rope as rope_patch  # noqa: E402
from fusetune.ops.rope import rope_reference  # noqa: E402
from tests.patch.checks import assert_close, assert_same_gradients, loss_and_backward  # noqa: E402
from tests.patch.models import TEXT_ARCHITECTURES, VOCAB, batch, tiny_model  # noqa: E402

ARCHS = list(TEXT_ARCHITECTURES)
# Gemma 2 soft-caps attention logits, which transformers runs in eager attention only.
ARCH_ATTN = [(a, attn) for a in ARCHS for attn in ("eager", "sdpa") if not (a == "gemma2" and attn == "sdpa")]
ROPE_ONLY = dict(rms_norm=False, layer_norm=False, glu=False, loss=None)


def _batch() -> dict[str, torch.Tensor]:
    """A short batch: the rope kernel runs one interpreter program per token."""
    return batch(length=6)


def _attention(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if type(m).__name__.endswith("Attention")}


def _modeling(model: nn.Module) -> types.ModuleType:
    return sys.modules[type(model).__module__]


@pytest.fixture
def rope_calls(monkeypatch):
    """Counts the calls that reach fusetune's rope from a patched attention module."""
    calls, fused = [], rope_patch.rope

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return fused(*args, **kwargs)

    monkeypatch.setattr(rope_patch, "rope", counting)
    return calls


@pytest.mark.parametrize("arch,attn", ARCH_ATTN)
def test_rope_is_patched_and_trains_identically(arch, attn, rope_calls):
    model = tiny_model(arch, attn)
    reference = copy.deepcopy(model)
    modeling = _modeling(model)
    global_rope = modeling.apply_rotary_pos_emb
    report = fusetune.apply(model, **ROPE_ONLY)
    attention = _attention(model)
    assert sorted(report.patched["rope"]) == sorted(attention) and len(attention) == 2
    assert not report.left_alone["rope"]
    for module in attention.values():
        assert module.forward.__self__ is module
        assert module.forward.__func__ is not type(module).forward
        assert module.forward.__func__.__code__ is type(module).forward.__code__  # the same wrapper
    assert modeling.apply_rotary_pos_emb is global_rope
    inputs = _batch()
    assert_close(loss_and_backward(model, **inputs), loss_and_backward(reference, **inputs), "loss")
    assert len(rope_calls) == 2  # one per layer: the fused op ran
    assert_same_gradients(model, reference)


@pytest.mark.parametrize("arch", ARCHS)
def test_other_instances_class_and_global_are_untouched(arch):
    model, other = tiny_model(arch, "eager"), tiny_model(arch, "eager")
    modeling = _modeling(model)
    global_rope = modeling.apply_rotary_pos_emb
    attention_class = type(next(iter(_attention(model).values())))
    class_forward = attention_class.forward
    fusetune.apply(model)
    assert attention_class.forward is class_forward
    assert modeling.apply_rotary_pos_emb is global_rope
    for module in _attention(other).values():
        assert "forward" not in module.__dict__
        assert module.forward.__func__ is class_forward


def test_undo_restores_the_class_forward():
    model = tiny_model("llama")
    reference = copy.deepcopy(model)
    report = fusetune.apply(model)
    report.undo()
    for module in _attention(model).values():
        assert "forward" not in module.__dict__
        assert module.forward.__func__ is type(module).forward
    inputs = batch()
    assert torch.equal(model(**inputs).logits, reference(**inputs).logits)


def test_deep_copy_is_rebound_and_independent(rope_calls):
    model = tiny_model("qwen3")
    fusetune.apply(model, **ROPE_ONLY)
    clone = copy.deepcopy(model)
    for module in _attention(clone).values():
        assert module.forward.__self__ is module
    fusetune.unapply(clone)
    assert all("forward" not in m.__dict__ for m in _attention(clone).values())
    assert all(m.forward.__self__ is m for m in _attention(model).values())
    inputs = _batch()
    assert_close(loss_and_backward(model, **inputs), loss_and_backward(clone, **inputs), "loss")
    assert len(rope_calls) == 2  # the patched original only
    assert_same_gradients(model, clone)


def test_deprecated_keyword_still_renamed(rope_calls):
    """The ``@deprecate_kwarg`` wrapper is rebuilt around the new forward, not dropped: the patched
    attention warns as the unpatched one does (transformers 5.24 deprecates its ``past_key_values``;
    5.17 does not) and fills the cache under the new name."""
    from transformers import DynamicCache

    model = tiny_model("llama").eval()
    reference = copy.deepcopy(model)
    fusetune.apply(model, **ROPE_ONLY)
    hidden = torch.randn(1, 5, 64)
    positions = torch.arange(5)[None]
    outputs, caches, warned = [], [], []
    for m in (model, reference):
        cache = DynamicCache(config=m.config)
        position_embeddings = m.model.rotary_emb(hidden, positions)
        attention = m.model.layers[0].self_attn
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            outputs.append(attention(hidden, position_embeddings, None, past_key_values=cache)[0])
        warned.append([str(w.message) for w in caught if issubclass(w.category, FutureWarning)])
        caches.append(cache)
    assert len(rope_calls) == 1
    assert warned[0] == warned[1]
    assert_close(outputs[0], outputs[1], "attention output")
    assert caches[0].get_seq_length() == caches[1].get_seq_length() == 5


def test_replacement_falls_back_or_promotes_like_the_original():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    replacement = rope_patch._replacement(apply_rotary_pos_emb)
    assert inspect.signature(replacement) == inspect.signature(apply_rotary_pos_emb)
    # (seq, heads, dim) q/k with a 2-D cos: not the fused op's layout, so the original runs.
    q, k, cos, sin = torch.randn(5, 3, 8), torch.randn(5, 2, 8), torch.randn(5, 8), torch.randn(5, 8)
    for out, ref in zip(replacement(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin), strict=True):
        assert torch.equal(out, ref)
    # bf16 q/k with float32 cos/sin (autocast) give float32 outputs, as ``q * cos`` does.
    q, k = torch.randn(2, 3, 5, 8).bfloat16(), torch.randn(2, 2, 5, 8).bfloat16()
    cos, sin = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    for out, ref in zip(replacement(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin), strict=True):
        assert out.dtype == ref.dtype == torch.float32
        assert_close(out, ref, "promoted rope")


def test_partial_rotary_is_verified():
    from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb

    assert rope_patch.verdict(apply_rotary_pos_emb) is None
    replacement = rope_patch._replacement(apply_rotary_pos_emb)
    q, k = torch.randn(2, 3, 5, 8), torch.randn(2, 2, 5, 8)
    cos, sin = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    for out, ref in zip(replacement(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin), strict=True):
        assert_close(out, ref, "partial rotary")


# A tiny "modeling file" of our own: attention modules calling rotary functions from this module's
# globals, with maths fusetune's rope does not share (interleaved; M-RoPE's extra argument) or does.
def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    """GLM-style interleaved RoPE: rotates (x0, x1), (x2, x3), ... pairs."""

    def rotate_pairs(x):
        return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)

    cos = cos.unsqueeze(unsqueeze_dim)[..., : cos.shape[-1] // 2].repeat_interleave(2, dim=-1)
    sin = sin.unsqueeze(unsqueeze_dim)[..., : sin.shape[-1] // 2].repeat_interleave(2, dim=-1)
    return q * cos + rotate_pairs(q) * sin, k * cos + rotate_pairs(k) * sin


def apply_multimodal_rotary_pos_emb(q, k, cos, sin, mrope_section, unsqueeze_dim=1):
    cos = torch.cat([m[i % 3] for i, m in enumerate(cos.split(mrope_section * 2, dim=-1))], dim=-1)
    sin = torch.cat([m[i % 3] for i, m in enumerate(sin.split(mrope_section * 2, dim=-1))], dim=-1)
    return rope_reference(q, k, cos, sin, unsqueeze_dim)


def apply_rope_half(q, k, cos, sin, unsqueeze_dim=1):
    """Rotate-half RoPE under another name, written differently."""
    half = q.shape[-1] // 2
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    q1, q2, k1, k2 = q[..., :half], q[..., half:], k[..., :half], k[..., half:]
    c1, c2, s1, s2 = cos[..., :half], cos[..., half:], sin[..., :half], sin[..., half:]
    return (torch.cat((q1 * c1 - q2 * s1, q2 * c2 + q1 * s2), -1),
            torch.cat((k1 * c1 - k2 * s1, k2 * c2 + k1 * s2), -1))


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(16, 16), nn.Linear(16, 8)

    def heads(self, x):
        q, k = self.q_proj(x).view(2, 5, 2, 8), self.k_proj(x).view(2, 5, 1, 8)
        return q.transpose(1, 2), k.transpose(1, 2)


class InterleavedAttention(_Attention):
    def forward(self, x, cos, sin):
        return apply_rotary_pos_emb(*self.heads(x), cos, sin)


class MultimodalAttention(_Attention):
    def forward(self, x, cos, sin):
        return apply_multimodal_rotary_pos_emb(*self.heads(x), cos, sin, [2, 1, 1])


class HalfAttention(_Attention):
    def forward(self, x, cos, sin):
        return apply_rope_half(*self.heads(x), cos, sin)


class RotaryEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("inv_freq", torch.ones(4), persistent=False)


def test_other_maths_is_left_alone_and_reported():
    model = nn.ModuleDict(dict(interleaved=InterleavedAttention(), multimodal=MultimodalAttention()))
    model["rotary"] = RotaryEmbedding()
    report = fusetune.apply(model, loss=None)
    assert not report.patched["rope"]
    reasons = dict(report.left_alone["rope"])
    assert reasons.keys() == {"interleaved", "multimodal"}
    assert reasons["interleaved"].startswith("apply_rotary_pos_emb its output differs")
    assert "mrope_section" in reasons["multimodal"]
    assert all("forward" not in m.__dict__ for m in model.values())
    assert "interleaved" in str(report)


def test_rotate_half_under_another_name_is_patched(rope_calls):
    model = nn.ModuleDict({"attention": HalfAttention(), "rotary": RotaryEmbedding()})
    reference = copy.deepcopy(model)
    report = fusetune.apply(model, loss=None)
    assert report.patched["rope"] == ["attention"] and not report.left_alone["rope"]
    assert globals()["apply_rope_half"] is HalfAttention.forward.__globals__["apply_rope_half"]
    x, cos, sin = torch.randn(2, 5, 16), torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    for out, ref in zip(model["attention"](x, cos, sin), reference["attention"](x, cos, sin), strict=True):
        assert_close(out, ref, "rope under another name")
    assert len(rope_calls) == 1


def test_rotary_module_without_a_recognised_attention_is_reported():
    report = fusetune.apply(nn.ModuleDict({"rotary": RotaryEmbedding()}), loss=None)
    assert report.left_alone["rope"] == [("rotary", rope_patch.NO_ATTENTION)]


def test_accelerate_hook_keeps_wrapping_the_patched_forward(rope_calls):
    hooks = pytest.importorskip("accelerate.hooks")
    model = tiny_model("mistral")
    reference = copy.deepcopy(model)
    attention = model.model.layers[0].self_attn
    hooks.add_hook_to_module(attention, hooks.ModelHook())
    hooked_forward = attention.forward
    report = fusetune.apply(model, **ROPE_ONLY)
    assert attention.forward is hooked_forward
    assert attention._old_forward.__func__ is not type(attention).forward
    inputs = _batch()
    assert_close(loss_and_backward(model, **inputs), loss_and_backward(reference, **inputs), "loss")
    assert len(rope_calls) == 2
    assert_same_gradients(model, reference)
    report.undo()
    assert attention._old_forward.__func__ is type(attention).forward


def test_compiled_forward_guards_the_rotary_function_it_calls(monkeypatch):
    """torch.compile guards what a patched forward reads from its own globals, not from the modeling
    file's: another library replacing the file's rotary function (Liger does) recompiles nothing.
    (Guarded through the file, torch 2.11 failed to compile a patched model at all.)"""
    from torch._dynamo.utils import counters

    model = tiny_model("llama")
    fusetune.apply(model, **ROPE_ONLY)
    ids = _batch()["input_ids"]
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager")
    expected = compiled(input_ids=ids).logits
    graphs = counters["stats"]["unique_graphs"]
    monkeypatch.setattr(_modeling(model), "apply_rotary_pos_emb", lambda *args, **kwargs: None)
    assert torch.equal(compiled(input_ids=ids).logits, expected)
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize("interleave", [True, False], ids=["interleaved", "rotate_half"])
def test_a_forward_patched_in_part_is_reported_so(rope_calls, interleave):
    """DeepSeek-V3's attention calls apply_rotary_pos_emb or, as its default config says,
    apply_rotary_pos_emb_interleave (not fusetune's rope): it was reported patched with nothing left
    alone while, by default, fusetune's rope never ran. Now it is also reported left alone, naming
    the unfused function; training matches the unpatched model either way."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "deepseek_v3", hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, vocab_size=VOCAB, kv_lora_rank=16, q_lora_rank=32,
        qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, head_dim=8, n_routed_experts=4,
        num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1, rope_interleave=interleave,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).train()
    reference = copy.deepcopy(model)
    report = fusetune.apply(model, **ROPE_ONLY)
    assert report.patched["rope"] == ["model.layers.0.self_attn"]
    (name, reason), = report.left_alone["rope"]
    assert name == "model.layers.0.self_attn"
    assert reason.startswith("patched in part: its forward also calls apply_rotary_pos_emb_interleave (")
    inputs = _batch()
    assert_close(loss_and_backward(model, **inputs), loss_and_backward(reference, **inputs), "loss")
    assert_same_gradients(model, reference)
    assert len(rope_calls) == (0 if interleave else 1)
