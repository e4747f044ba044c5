"""fusetune.kept_attention: an offloaded checkpoint keeps each causal SDPA output from forward, so
the recompute runs no attention forward, and the gradients stay those of an uncheckpointed model.

Models are tiny random-weight transformers models with LoRA, float32 on CPU (the kept path calls
torch's CPU flash kernel there and cuDNN's on CUDA), compared with an uncheckpointed deep copy and
with plain recompute (``keep_attention=False``). The attention calls are counted by wrapping the
kernel entry points the two paths use: ``F.scaled_dot_product_attention`` (transformers' SDPA
function, so the original path) and ``kept_attention._forward`` (the kept path).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from fusetune import kept_attention
from fusetune.checkpointing import enable_checkpointing
from tests.patch.models import batch, tiny_model
from tests.test_checkpointing import assert_matches, lora, step


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
