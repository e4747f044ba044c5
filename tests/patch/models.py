"""Tiny random-weight models of each supported architecture, and the inputs the tests feed them."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 257
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
)
_GEMMA = dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=8, final_logit_softcapping=30.0)

# model_type -> extra config keys on top of _COMMON.
TEXT_ARCHITECTURES = {
    "llama": {},
    "mistral": dict(sliding_window=None),
    "qwen2": {},
    "qwen3": dict(head_dim=16),
    "gemma2": dict(_GEMMA, attn_logit_softcapping=50.0),
    "gemma3_text": dict(_GEMMA),
    "phi3": {},
}


def tiny_model(model_type: str, attn: str = "sdpa", seed: int = 0, **overrides) -> torch.nn.Module:
    """A float32 causal LM of ``model_type`` with random weights, in training mode."""
    config = AutoConfig.for_model(model_type, **{**_COMMON, **TEXT_ARCHITECTURES[model_type], **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    return model.train()


def batch(seed: int = 0, size: int = 2, length: int = 12) -> dict[str, torch.Tensor]:
    """Token ids and labels (some positions set to -100) for a causal LM."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (size, length), generator=generator)
    labels = ids.clone()
    labels[0, :4] = -100
    labels[-1, -3:] = -100
    return {"input_ids": ids, "labels": labels}
