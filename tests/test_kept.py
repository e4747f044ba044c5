"""fusetune.kept: an offloaded checkpoint keeps each causal SDPA output (fusetune.kept_attention)
and the fused LoRA projections' outputs from forward, so the recompute runs no attention forward and
no projection matmuls, and the gradients stay those of an uncheckpointed model.

Models are tiny random-weight transformers models with LoRA, float32 on CPU (the kept attention
calls torch's CPU flash kernel there and cuDNN's on CUDA), compared with an uncheckpointed deep copy
and with plain recompute (``keep_attention=False``, ``keep_projections=False``). The attention calls
are counted by wrapping the kernel entry points the two paths use: ``F.scaled_dot_product_attention``
(transformers' SDPA function, so the original path) and ``kept_attention._forward`` (the kept path).
"""

from __future__ import annotations

import contextlib
import copy
import weakref

import pytest
import torch
import torch.nn.functional as F

import fusetune
from fusetune import checkpointing, kept, kept_attention
from fusetune.checkpointing import enable_checkpointing, private_offload_store
from fusetune.ops import lora as lora_ops
from tests.patch.models import batch, tiny_model
from tests.patch.vlm_models import tiny_vlm, vlm_batch
from tests.test_checkpointing import _interpreted_kernels, assert_matches, lora, step


class Calls:
    """How often each attention path ran, per phase of a step."""

    def __init__(self, monkeypatch):
        self.counts = {"sdpa": 0, "kept": 0}
        sdpa, kept = F.scaled_dot_product_attention, kept_attention._forward

        def counted_sdpa(*args, **kwargs):
            self.counts["sdpa"] += 1
            return sdpa(*args, **kwargs)

        def counted_kept(*args, **kwargs):
            self.counts["kept"] += 1
            return kept(*args, **kwargs)

        monkeypatch.setattr(F, "scaled_dot_product_attention", counted_sdpa)
        monkeypatch.setattr(kept_attention, "_forward", counted_kept)

    def take(self) -> dict:
        counts, self.counts = self.counts, {"sdpa": 0, "kept": 0}
        return counts

    def of_step(self, model, inputs) -> tuple[dict, dict]:
        """Counts of one forward, then of its backward."""
        model.zero_grad(set_to_none=True)
        self.take()
        loss = model(**inputs).loss
        forward = self.take()
        loss.backward()
        return forward, self.take()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_kept_attention_matches_and_skips_the_recompute_attention(monkeypatch, arch):
    """GQA (4 query heads, 2 key/value heads); Qwen2's q, k, v have biases."""
    model = lora(tiny_model(arch))
    reference, recomputed = copy.deepcopy(model), copy.deepcopy(model)
    enable_checkpointing(model)
    enable_checkpointing(recomputed, keep_attention=False)
    inputs = batch()
    calls = Calls(monkeypatch)
    assert calls.of_step(model, inputs) == ({"sdpa": 0, "kept": 2}, {"sdpa": 0, "kept": 0})
    assert calls.of_step(recomputed, inputs) == ({"sdpa": 2, "kept": 0}, {"sdpa": 2, "kept": 0})
    assert_matches(model, reference, inputs)
    assert_matches(model, recomputed, inputs)


def test_a_mask_or_a_window_is_run_again_and_the_calls_stay_paired(monkeypatch):
    """Gemma 3's sliding-window layer gets a mask (12 tokens, window 8), so only its full-attention
    layer is kept: the recompute must pair each call with its own forward's."""
    model = lora(tiny_model("gemma3_text", layer_types=["sliding_attention", "full_attention"]))
    reference = copy.deepcopy(model)
    enable_checkpointing(model)
    calls = Calls(monkeypatch)
    inputs = batch()
    assert calls.of_step(model, inputs) == ({"sdpa": 1, "kept": 1}, {"sdpa": 1, "kept": 0})
    assert_matches(model, reference, inputs)


def test_padding_masks_fall_back_to_the_recompute(monkeypatch):
    model = lora(tiny_model("llama"))
    reference = copy.deepcopy(model)
    enable_checkpointing(model)
    inputs = batch()
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["attention_mask"][0, -3:] = 0
    calls = Calls(monkeypatch)
    assert calls.of_step(model, inputs) == ({"sdpa": 2, "kept": 0}, {"sdpa": 2, "kept": 0})
    assert_matches(model, reference, inputs)


def test_nothing_is_kept_without_offloading_or_outside_checkpoints(monkeypatch):
    model = lora(tiny_model("llama"))
    enable_checkpointing(model, offload=False)
    calls = Calls(monkeypatch)
    inputs = batch()
    assert calls.of_step(model, inputs) == ({"sdpa": 2, "kept": 0}, {"sdpa": 2, "kept": 0})
    with torch.no_grad():  # no checkpoint: the wrapped function is transformers' own
        model(**inputs)
    assert calls.take() == {"sdpa": 2, "kept": 0}


def test_kept_bf16_matches_plain_recompute_on_cpu():
    """bf16 weights and activations: the kept output is the very tensor the recompute would make."""
    model = lora(tiny_model("llama")).to(torch.bfloat16)
    recomputed = copy.deepcopy(model)
    enable_checkpointing(model)
    enable_checkpointing(recomputed, keep_attention=False)
    inputs = batch()
    assert torch.equal(step(model, inputs), step(recomputed, inputs))
    for (name, ours), theirs in zip(model.named_parameters(), recomputed.parameters(), strict=True):
        if ours.requires_grad:
            assert torch.equal(ours.grad, theirs.grad), name


def test_install_wraps_once():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert kept_attention.install()
    wrapped = ALL_ATTENTION_FUNCTIONS["sdpa"]
    assert kept_attention.install() and ALL_ATTENTION_FUNCTIONS["sdpa"] is wrapped
    assert wrapped.fusetune_keeps


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: cuDNN's attention kernels")
def test_cuda_bf16_kept_attention_matches_plain_recompute(monkeypatch):
    """On CUDA in bf16 (cuDNN's kernels, called directly): the recompute runs no attention forward
    and the gradients agree with plain recompute's within bf16 rounding."""
    model = lora(tiny_model("llama", hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=256)).to("cuda", torch.bfloat16)
    recomputed = copy.deepcopy(model)
    enable_checkpointing(model)
    enable_checkpointing(recomputed, keep_attention=False)
    inputs = {k: v.cuda() for k, v in batch(size=2, length=200).items()}
    calls = Calls(monkeypatch)
    assert calls.of_step(model, inputs) == ({"sdpa": 0, "kept": 2}, {"sdpa": 0, "kept": 0})
    ours, theirs = step(model, inputs), step(recomputed, inputs)
    assert torch.allclose(ours.float(), theirs.float(), rtol=1e-2)
    for (name, mine), other in zip(model.named_parameters(), recomputed.parameters(), strict=True):
        if mine.requires_grad:
            error = (mine.grad.float() - other.grad.float()).norm() / other.grad.float().norm()
            assert error < 2e-2, f"{name}: relative error {error:.2e}"


def test_a_call_the_kernel_refuses_runs_as_before_from_then_on(monkeypatch):
    """A kernel error on the kept path (cuDNN refusing a GPU or head size) is not the user's: that
    call, and every later one of its signature, runs transformers' function; gradients unchanged."""
    model = lora(tiny_model("llama"))
    reference = copy.deepcopy(model)
    enable_checkpointing(model)
    calls = Calls(monkeypatch)
    refusals = []

    def refuse(*args, **kwargs):
        refusals.append(1)
        raise RuntimeError("no execution plan for this attention")

    monkeypatch.setattr(kept_attention, "_forward", refuse)
    monkeypatch.setattr(kept_attention, "_UNSUPPORTED", set())
    inputs = batch()
    assert calls.of_step(model, inputs) == ({"sdpa": 2, "kept": 0}, {"sdpa": 2, "kept": 0})
    assert len(refusals) == 1  # the second layer's call has the signature the first one's refused
    assert_matches(model, reference, inputs)
    assert len(refusals) == 1


def test_out_of_memory_on_the_kept_path_is_the_users_error(monkeypatch):
    """Running out of memory is not a refusal: it reaches the caller, and nothing is marked unsupported."""
    model = lora(tiny_model("llama"))
    enable_checkpointing(model)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(kept_attention, "_forward", out_of_memory)
    monkeypatch.setattr(kept_attention, "_UNSUPPORTED", set())
    with pytest.raises(torch.OutOfMemoryError):
        model(**batch())
    assert not kept_attention._UNSUPPORTED


# --------------------------------------------------------------------------------------------
# The fused LoRA projections (fusetune.apply; the glu kernels: interpreted on CPU, or CUDA)
# --------------------------------------------------------------------------------------------
def _count_projections(monkeypatch, model) -> dict:
    """``_project`` calls of the language model's attention projections (q, k, v together or
    alone, and o), by phase: computed in forward, computed again in a recompute, or given kept
    outputs there (the fused MLP's calls and other models' are not counted)."""
    counts = {"forward": 0, "recomputed": 0, "given": 0}
    original = lora_ops._project
    attention = {id(m.base_layer.weight) for name, m in model.named_modules()
                 if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) and hasattr(m, "base_layer")
                 and "vision" not in name}

    def counting(rows, group, given=None):
        if id(group.projections[0].weight) in attention:
            phase = "forward" if not kept.recomputing() else "given" if given is not None else "recomputed"
            counts[phase] += 1
        return original(rows, group, given)

    monkeypatch.setattr(lora_ops, "_project", counting)
    return counts


def _step_keeping_projections(monkeypatch, model, device: str) -> dict:
    """One step of ``model`` checkpointed keeping its projections, against an uncheckpointed copy
    (same loss and gradients); the projection calls' counts (``_count_projections``)."""
    reference = copy.deepcopy(model)
    enable_checkpointing(model, keep_projections=True)
    counts = _count_projections(monkeypatch, model)
    assert_matches(model, reference, {k: v.to(device) for k, v in batch(length=7).items()})
    return counts


def _fused_llama(device: str):
    model = lora(tiny_model("llama", num_hidden_layers=2)).to(device)
    fusetune.apply(model)
    return model


@pytest.mark.parametrize(("keep", "captured", "from_tokens"),
                         [(True, False, None), (False, False, None), (None, False, None), (None, True, None),
                          (False, True, None), (None, False, 0), (None, False, 1), (False, False, 0)])
def test_kept_projections_skip_their_matmuls(monkeypatch, keep, captured, from_tokens):
    """Two layers, each with a q-k-v call and an o call: the recompute is given all four calls'
    outputs where they are kept (``keep_projections=True``; by default in a captured step's offload
    store, which ``private_offload_store`` makes for CapturedStep's warm-up and capture, and in
    eager calls of at least ``KEEP_PROJECTIONS_FROM`` tokens, here set to the batch's tokens plus
    ``from_tokens``) and computes them otherwise; the gradients equal the uncheckpointed model's
    over two steps (the second reuses the host buffers)."""
    device = _interpreted_kernels(monkeypatch)
    model = _fused_llama(device)
    reference = copy.deepcopy(model)
    enable_checkpointing(model, keep_projections=keep)
    counts = _count_projections(monkeypatch, model)
    inputs = {k: v.to(device) for k, v in batch(length=7).items()}
    long_enough = False
    if from_tokens is not None:
        monkeypatch.setattr(checkpointing, "KEEP_PROJECTIONS_FROM", inputs["input_ids"].numel() + from_tokens)
        long_enough = from_tokens <= 0
    kept_here = keep if keep is not None else captured or long_enough
    with private_offload_store(model) if captured else contextlib.nullcontext():
        for _ in range(2):
            counts.update(forward=0, recomputed=0, given=0)
            assert_matches(model, reference, inputs)
            assert counts == {"forward": 4, "recomputed": 0 if kept_here else 4,
                              "given": 4 if kept_here else 0}


def test_an_output_written_in_place_after_forward_is_computed_again(monkeypatch):
    """A hook writes o_proj's output in place after it was offered, in the checkpoint's forward (with
    gradients, autograd itself forbids writing a custom Function's output view), so the checkpoint
    drops that offer (its copy may have read either value): the recompute computes o again, and
    the gradients are still the uncheckpointed model's."""
    device = _interpreted_kernels(monkeypatch)
    model = _fused_llama(device)

    def write_in_place(module, args, output):
        if not torch.is_grad_enabled():
            output.mul_(1.0)

    for name, module in model.named_modules():
        if name.endswith("o_proj"):
            module.register_forward_hook(write_in_place)
    counts = _step_keeping_projections(monkeypatch, model, device)
    assert counts == {"forward": 4, "recomputed": 2, "given": 2}


def test_mllama_cross_attention_keeps_its_projections_once_its_group_has_split(monkeypatch):
    """mllama's cross-attention reads keys and values from the image states: its q-k-v group's first
    call (step one's forward) computes all three on the text, then splits. That call's recompute
    counterpart is the query alone, which computes again; every other call's outputs are given,
    and from the second step on all of them. Gradients equal the uncheckpointed model's."""
    device = _interpreted_kernels(monkeypatch)
    model = lora(tiny_vlm("mllama", attn="sdpa")).to(device)
    fusetune.apply(model)
    reference = copy.deepcopy(model)
    enable_checkpointing(model, keep_projections=True)
    counts = _count_projections(monkeypatch, model)
    inputs = {k: v.to(device) for k, v in vlm_batch("mllama").items()}
    for first_step in (True, False):
        counts.update(forward=0, recomputed=0, given=0)
        assert_matches(model, reference, inputs)
        assert counts["forward"] > 0 and counts["given"] > 0
        assert (counts["recomputed"] > 0) == first_step


def test_kept_tensors_are_let_go_once_the_recompute_no_longer_needs_them(monkeypatch):
    """When the layer's backward reaches its q-k-v projections, the tensors its forward kept are
    gone (the o projection's output, added to the residual, is not saved by anything; the attention
    output's node has run): only the layer's input is still held, as the norm's backward needs it."""
    from fusetune.checkpointing import _OffloadStore

    device = _interpreted_kernels(monkeypatch)
    model = _fused_llama(device)
    enable_checkpointing(model, keep_projections=True)
    restored = []
    original = _OffloadStore.restore

    def remembering(store, entry):
        tensors = original(store, entry)
        restored.append([weakref.ref(t) for t in tensors])
        return tensors

    monkeypatch.setattr(_OffloadStore, "restore", remembering)
    alive_at_qkv = []
    projection = next(m for name, m in model.named_modules() if name.endswith("layers.1.self_attn.q_proj"))
    projection.lora_A["default"].weight.register_hook(  # first in the recompute's backward
        lambda grad: alive_at_qkv.append([ref() is not None for ref in restored[0]]))
    model(**{k: v.to(device) for k, v in batch(length=7).items()}).loss.backward()
    # The layer's input, then q, k and v (one fused group), the attention output (kept on a CPU or
    # in bf16 on CUDA; this model is float32) and o's output.
    alive = alive_at_qkv[0]
    assert alive[0] and not any(alive[1:]) and len(alive) == (6 if device == "cpu" else 5)


def test_masked_grouped_query_attention_runs_without_copies_of_keys_and_values(monkeypatch):
    """mllama's cross-attention (4 query heads, 2 key heads, a mask) inside fusetune's checkpoint
    runs SDPA's grouped-query path, in forward and in the recompute, instead of transformers'
    repeat_kv copies; gradients equal the uncheckpointed model's, which copies."""
    from transformers.integrations import sdpa_attention

    model = lora(tiny_vlm("mllama", attn="sdpa"))
    reference = copy.deepcopy(model)
    enable_checkpointing(model)
    inputs = vlm_batch("mllama")
    assert_matches(model, reference, inputs)

    calls = {"repeat_kv": 0, "grouped_with_mask": 0}
    repeat_kv, sdpa = sdpa_attention.repeat_kv, F.scaled_dot_product_attention

    def counted_repeat(*args):
        calls["repeat_kv"] += 1
        return repeat_kv(*args)

    def counted_sdpa(*args, **kwargs):
        calls["grouped_with_mask"] += bool(kwargs.get("enable_gqa") and kwargs.get("attn_mask") is not None)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(sdpa_attention, "repeat_kv", counted_repeat)
    monkeypatch.setattr(F, "scaled_dot_product_attention", counted_sdpa)
    step(model, inputs)
    # One cross-attention layer: its forward and its recompute (in full, as the first step found).
    assert calls == {"repeat_kv": 0, "grouped_with_mask": 2}


@pytest.mark.parametrize("mask_kind", ["float", "bool", "broadcast_keys"])
def test_masked_gqa_equals_transformers_copies(mask_kind):
    """``_masked_gqa`` against transformers' own SDPA function (which copies keys and values to
    every query head) on float, boolean and key-broadcast masks: the same output, and the same
    gradients for q, k and v."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 3, False
    q, k, v = (torch.randn(2, heads, length, 8, dtype=torch.float64, requires_grad=True)
               for heads, length in ((6, 5), (2, 7), (2, 7)))
    allowed = torch.rand(2, 1, 5, 7) < 0.6
    allowed[..., 0] = True
    mask = {"float": torch.zeros(2, 1, 5, 7, dtype=torch.float64).masked_fill(~allowed, -1e9),
            "bool": allowed, "broadcast_keys": allowed[..., :1].expand(2, 1, 5, 1)}[mask_kind]
    ours = kept_attention._masked_gqa(q, k, v, mask, 0.0, 0.3, {})
    assert ours is not None
    theirs = sdpa_attention_forward(module, q, k, v, mask, dropout=0.0, scaling=0.3)
    torch.testing.assert_close(ours[0], theirs[0])
    grad = torch.randn_like(theirs[0])
    expected = torch.autograd.grad(theirs[0], (q, k, v), grad)
    for got, want in zip(torch.autograd.grad(ours[0], (q, k, v), grad), expected, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("case", ["no_mask", "equal_heads", "longer_mask", "softcap"])
def test_masked_gqa_leaves_other_calls_to_transformers(case):
    q, k, v = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    mask = torch.zeros(1, 1, 3, 3)
    kwargs = {}
    if case == "no_mask":
        mask = None
    elif case == "equal_heads":
        k, v = torch.randn(1, 4, 3, 8), torch.randn(1, 4, 3, 8)
    elif case == "longer_mask":
        mask = torch.zeros(1, 1, 3, 5)
    else:
        kwargs = {"softcap": 30.0}
    assert kept_attention._masked_gqa(q, k, v, mask, 0.0, None, kwargs) is None


def test_kept_projections_with_4bit_base_weights(monkeypatch):
    """A QLoRA model (fusetune's NF4 weights, dequantised by the fused projections): the recompute is
    given the four attention calls' outputs and the gradients equal the uncheckpointed model's."""
    pytest.importorskip("bitsandbytes")
    from fusetune.quantize import quantize_4bit

    device = _interpreted_kernels(monkeypatch)
    base = tiny_model("llama", num_hidden_layers=2, intermediate_size=128).to(torch.bfloat16)
    quantize_4bit(base)
    model = lora(base).to(device)
    fusetune.apply(model)
    counts = _step_keeping_projections(monkeypatch, model, device)
    assert counts == {"forward": 4, "recomputed": 0, "given": 4}


class _Nested(torch.nn.Module):
    """A checkpointed layer holding a checkpointed Llama decoder layer, then an attention of its own
    (both causal SDPA calls of one shape: a kept output taken by the wrong call fits)."""

    def __init__(self):
        from transformers import LlamaConfig
        from transformers.modeling_layers import GradientCheckpointingLayer
        from transformers.models.llama.modeling_llama import (
            LlamaAttention,
            LlamaDecoderLayer,
            LlamaRotaryEmbedding,
        )

        super().__init__()
        config = LlamaConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4,
                             num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=64)
        config._attn_implementation = "sdpa"

        class Outer(GradientCheckpointingLayer):
            def __init__(self):
                super().__init__()
                self.inner = LlamaDecoderLayer(config, 0)
                self.attention = LlamaAttention(config, 1)

            def forward(self, hidden, position_embeddings=None):
                hidden = self.inner(hidden, position_embeddings=position_embeddings)
                out, _ = self.attention(hidden, position_embeddings=position_embeddings, attention_mask=None)
                return hidden + out

        torch.manual_seed(0)
        self.outer = Outer()
        self.rotary = LlamaRotaryEmbedding(config)

    def forward(self, hidden):
        positions = self.rotary(hidden, torch.arange(hidden.shape[1])[None])
        return self.outer(hidden, position_embeddings=positions).square().sum()


def test_a_checkpointed_layer_inside_another_takes_its_own_kept_output():
    """The inner layer's calls offer to and take from the outer layer's stream (before, the inner
    checkpoint's forward hid the outer one's items in its recompute, and the outer attention took
    the inner attention's output)."""
    reference = _Nested().train()
    hidden = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(3))
    reference(hidden).backward()
    for mode in (dict(offload=True), dict(offload=True, keep_attention=False), dict(offload=False)):
        model = copy.deepcopy(reference)
        model.zero_grad(set_to_none=True)
        enable_checkpointing(model, **mode)
        model(hidden).backward()
        for (name, got), want in zip(model.named_parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-6, msg=f"{mode} {name}")


def test_a_layer_that_keeps_no_attention_recomputes_it_as_its_forward_ran(monkeypatch):
    """Offloaded without kept attention, a masked grouped-query call runs transformers' own path in
    forward and in the recompute alike (before, the recompute took the enable_gqa path: another
    kernel, whose dropout draws on a GPU need not be the forward's); keeping attention, both phases
    take the enable_gqa path."""
    phases = []
    original = kept_attention._masked_gqa

    def routed(*args):
        out = original(*args)
        if out is not None:
            phases.append("recompute" if kept.recomputing() else "forward")
        return out

    monkeypatch.setattr(kept_attention, "_masked_gqa", routed)
    kept_attention.install()  # as once any model in the process kept attention
    inputs = batch()
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["attention_mask"][0, :3] = 0  # left padding: a mask reaches the attention
    model = lora(tiny_model("llama"))
    enable_checkpointing(model, offload=True, keep_attention=False)
    step(model, inputs)
    assert phases == []
    enable_checkpointing(model, offload=True)
    step(model, inputs)
    assert phases and phases.count("forward") == phases.count("recompute") == len(phases) // 2


def _routed_windows(monkeypatch, cuda: bool = False) -> list[int]:
    """The windows of the calls ``_windowed`` sends to ``segment_attention``. Without ``cuda`` the
    windowed route is opened on the CPU (there ``varlen_attn`` is not called: its per-segment SDPA
    with the window's mask runs)."""
    from fusetune import segment_attention

    if not cuda:
        monkeypatch.setattr(kept_attention, "varlen_usable", lambda query, key, dropout: ("cpu",))
        monkeypatch.setattr(segment_attention, "varlen_function", lambda: None)
    windows, original = [], kept_attention.segment_attention

    def counted(*args, **kwargs):
        windows.append(kwargs["window"])
        return original(*args, **kwargs)

    monkeypatch.setattr(kept_attention, "segment_attention", counted)
    return windows


def test_a_sliding_window_call_takes_the_windowed_kernel_in_forward_and_recompute(monkeypatch):
    """Gemma 3's sliding-window layer (12 tokens, window 8): its mask is the window's own, so the
    call goes to ``segment_attention``'s windowed path (flash attention's window on CUDA), in forward
    and recompute; loss and gradients match the model without checkpointing."""
    windows = _routed_windows(monkeypatch)
    layers = ["sliding_attention"] * 3 + ["full_attention"]
    model = lora(tiny_model("gemma3_text", num_hidden_layers=4, layer_types=layers))
    reference = copy.deepcopy(model)
    enable_checkpointing(model)
    inputs = batch()
    reads, equal = [], torch.equal
    monkeypatch.setattr(torch, "equal", lambda *args: reads.append(1) or equal(*args))
    step(model, inputs)
    # The mask is read off the device once a step: its detached copies in the recompute are known.
    assert windows == [8] * 6 and len(reads) == 1
    assert_matches(model, reference, inputs)


@pytest.mark.parametrize("case", ["padding", "window as long as the rows", "no kept attention"])
def test_other_sliding_window_calls_keep_their_masked_path(monkeypatch, case):
    windows = _routed_windows(monkeypatch)
    window = 12 if case == "window as long as the rows" else 8
    model = lora(tiny_model("gemma3_text", layer_types=["sliding_attention", "full_attention"],
                            sliding_window=window))
    reference = copy.deepcopy(model)
    enable_checkpointing(model, keep_attention=case != "no kept attention")
    inputs = batch()
    if case == "padding":
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        inputs["attention_mask"][0, -3:] = 0
    assert_matches(model, reference, inputs)
    assert windows == []


def test_a_windowed_mask_is_recognised_once_per_tensor(monkeypatch):
    from fusetune.segment_attention import is_windowed_causal, windowed_causal_mask

    reads = []
    equal = torch.equal
    monkeypatch.setattr(torch, "equal", lambda *args: reads.append(1) or equal(*args))
    mask = windowed_causal_mask(12, 5, "cpu")[None, None].expand(3, 1, 12, 12).clone()
    assert is_windowed_causal(mask, 5) and is_windowed_causal(mask, 5) and len(reads) == 1
    assert is_windowed_causal(mask.detach(), 5) and len(reads) == 1  # as a recompute gets it
    assert is_windowed_causal(mask.clone(), 5) and len(reads) == 2  # other memory: read
    assert not is_windowed_causal(mask, 4) and not is_windowed_causal(mask, 6)
    mask[1, 0, 7, 3] = False  # padding-like: one row differs (changed in place, read again)
    assert not is_windowed_causal(mask, 5)
    causal = windowed_causal_mask(12, 12, "cpu")[None, None]
    assert is_windowed_causal(causal, 12) and not is_windowed_causal(causal, 5)
    assert not is_windowed_causal(causal.float(), 12)  # an additive mask
    assert not is_windowed_causal(None, 5)


def test_cuda_bf16_sliding_window_is_as_close_to_float32_as_the_masked_path(monkeypatch):
    """On CUDA in bf16 with Gemma 3's 256-wide heads (200 tokens, window 64): the windowed kernel's
    loss and gradients are no further from the float32 model's than the masked path's (kept
    attention off), the bf16 rounding they both carry."""
    if not torch.cuda.is_available():
        pytest.skip("flash attention's windowed kernel runs on CUDA")
    windows = _routed_windows(monkeypatch, cuda=True)
    config = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=256,
                  query_pre_attn_scalar=256, sliding_window=64, max_position_embeddings=256,
                  layer_types=["sliding_attention", "full_attention"])
    exact = lora(tiny_model("gemma3_text", **config)).to("cuda")
    model, masked = (copy.deepcopy(exact).to(torch.bfloat16) for _ in range(2))
    enable_checkpointing(model)
    enable_checkpointing(masked, keep_attention=False)
    inputs = {k: v.cuda() for k, v in batch(size=2, length=200).items()}
    losses = [step(m, inputs) for m in (model, masked, exact)]
    assert windows == [64, 64]

    def errors(other) -> list[float]:
        return [float((mine.grad.float() - wanted.grad).norm() / wanted.grad.norm())
                for mine, wanted in zip(other.parameters(), exact.parameters(), strict=True)
                if wanted.requires_grad]

    ours, theirs = errors(model), errors(masked)
    assert abs(float(losses[0] - losses[2])) <= 1.5 * abs(float(losses[1] - losses[2])) + 1e-2
    assert max(ours) <= 1.5 * max(theirs) and sum(ours) <= 1.2 * sum(theirs), (max(ours), max(theirs))
