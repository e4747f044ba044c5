"""fusetune.kept_attention: a checkpointed layer's attention kept from forward to backward, its saved
tensors in host memory, gives the uncheckpointed model's loss and gradients while the attention runs
once per layer and step instead of twice.

Every saved tensor goes through the host here (the size under which tensors stay on the device is set
to 0), so the storage copies, the views rebuilt over them and the attention input read from the
recompute are all exercised. Models are tiny random-weight transformers models in float32 on CPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

import fusetune
from fusetune import kept_attention
from fusetune.checkpointing import enable_checkpointing
from tests.patch.models import batch, tiny_model
from tests.patch.vlm_models import tiny_vlm, vlm_batch
from tests.test_checkpointing import _interpreted_kernels, assert_matches, lora, reference_ops, step

__all__ = ["reference_ops"]  # the autouse fixture: the ops take their PyTorch references


@pytest.fixture(autouse=True)
def everything_to_the_host(monkeypatch):
    monkeypatch.setattr(kept_attention, "KEEP_ON_DEVICE_BYTES", 0)


def count_attention_calls(monkeypatch) -> list[int]:
    """Counts the calls of SDPA, which transformers' sdpa attention looks up at each call."""
    calls = [0]
    original = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    return calls


def host_pool(model: nn.Module) -> kept_attention.OffloadStore:
    layer = next(m for m in model.modules() if isinstance(m, GradientCheckpointingLayer))
    return layer._gradient_checkpointing_func.store.pool(torch.device("cpu"))


@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text"])
def test_matches_the_uncheckpointed_model_and_runs_attention_once(monkeypatch, arch, keep):
    """LoRA dropout 0.1 draws random numbers inside the attention and after it (the MLP's adapters):
    the recompute must see the RNG state forward left after the attention. Two steps: the second
    reuses the host buffers."""
    model = lora(tiny_model(arch), dropout=0.1)
    reference = copy.deepcopy(model)
    layers = enable_checkpointing(model, keep_attention=keep)
    calls = count_attention_calls(monkeypatch)
    inputs = batch()
    for seed in (0, 1):
        calls[0] = 0
        assert_matches(model, reference, inputs, seed=seed)
        # per layer: forward, recompute unless kept; the uncheckpointed reference: once more each
        assert calls[0] == layers * (1 if keep else 2) + layers
        assert host_pool(model).in_use == 0


def test_the_attention_tensors_wait_on_the_host(monkeypatch):
    """After forward the host holds each layer's input and its attention's saved tensors and output;
    after backward every buffer is back in the pool and the attention ran once per layer."""
    model = lora(tiny_model("llama"))
    enable_checkpointing(model)
    plain = copy.deepcopy(model)
    enable_checkpointing(plain, keep_attention=False)
    calls = count_attention_calls(monkeypatch)
    inputs = batch()
    held = {}
    for name, candidate in (("kept", model), ("plain", plain)):
        loss = candidate(**inputs).loss
        held[name] = host_pool(candidate).in_use
        loss.backward()
        assert host_pool(candidate).in_use == 0
    hidden = 2 * 12 * 64 * 4  # one layer input: batch x tokens x hidden, float32
    assert held["plain"] == 2 * hidden
    # q, k, v, the attention output and more per layer: several layer inputs' worth each
    assert held["kept"] > held["plain"] + 2 * 3 * hidden
    assert calls[0] == 2 + 2 * 2


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_fused_kernels_with_kept_attention(monkeypatch, arch):
    """fusetune.apply's kernels (RoPE, RMSNorm, fused LoRA: its q, k and v share one saved input, a
    view of the attention's input that backward reads from the recompute). Gemma 3's first recompute
    runs twice (its MLP output is read), taking the kept outputs twice."""
    device = _interpreted_kernels(monkeypatch)
    model = lora(tiny_model(arch, num_hidden_layers=2)).to(device)
    fusetune.apply(model)
    reference = copy.deepcopy(model)
    layers = enable_checkpointing(model)
    calls = count_attention_calls(monkeypatch)
    inputs = {k: v.to(device) for k, v in batch(length=7).items()}
    for _ in range(2):
        calls[0] = 0
        assert_matches(model, reference, inputs)
        assert calls[0] == layers + layers


@pytest.mark.parametrize("arch", ["qwen2_vl", "mllama"])
def test_vlm_full_fine_tune_matches(arch):
    """Vision blocks and mllama's cross-attention layers (keys and values from image states that need
    gradients) are recomputed; the language model's self-attention layers are kept."""
    model = tiny_vlm(arch)
    reference = copy.deepcopy(model)
    enable_checkpointing(model)
    assert_matches(model, reference, vlm_batch(arch))


class _Attention(nn.Module):
    """Stands for an attention module: a projection with dropout, returning (output, None)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.dropout = nn.Dropout(0.5)

    def forward(self, hidden_states, scale):
        return self.dropout(self.proj(hidden_states)) * scale, None


class _Layer(GradientCheckpointingLayer):
    """Dropout before and after the attention, which also takes a second tensor argument."""

    def __init__(self):
        super().__init__()
        self.self_attn = _Attention()
        self.dropout = nn.Dropout(0.5)

    def forward(self, hidden, scale):
        attended, _ = self.self_attn(self.dropout(hidden), scale)
        return self.dropout(attended) + hidden


class _Stack(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(_Layer() for _ in range(2))

    def forward(self, hidden, scale):
        for layer in self.layers:
            hidden = layer(hidden, scale)
        return hidden.square().sum()


@pytest.mark.parametrize("scale_needs_grad", [False, True])
def test_random_numbers_and_other_arguments(scale_needs_grad):
    """Dropout masks before, inside and after the attention are forward's; an attention whose other
    tensor argument needs gradients is recomputed instead (and still correct)."""
    model = _Stack().train()
    reference = copy.deepcopy(model)
    enable_checkpointing(model)
    hidden = torch.randn(3, 5, 8, requires_grad=True)
    scale = torch.randn(8, requires_grad=scale_needs_grad)
    grads = []
    for candidate in (model, reference):
        torch.manual_seed(7)
        candidate(hidden, scale).backward()
        grads.append([hidden.grad.clone(), *(p.grad.clone() for p in candidate.parameters())]
                     + ([scale.grad.clone()] if scale_needs_grad else []))
        hidden.grad = scale.grad = None
    for mine, theirs in zip(*grads, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-6)
    # the masks depend on the seed: the same step under another seed differs
    torch.manual_seed(8)
    reference(hidden, scale).backward()
    assert not torch.allclose(hidden.grad, grads[1][0])


def test_bad_uses_name_the_fix():
    model = lora(tiny_model("llama"))
    with pytest.raises(ValueError, match="offload=True"):
        enable_checkpointing(model, offload=False, keep_attention=True)
    enable_checkpointing(model)
    loss = model(**batch()).loss
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()
    step(model, batch())  # the next step is unaffected
