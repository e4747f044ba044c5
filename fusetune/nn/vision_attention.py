"""``SegmentedVisionAttention``: a Qwen2-VL-style vision attention with all its segments in one call.

The vision towers of the Qwen2-VL family (Qwen2-VL, Qwen2.5-VL and their kin) attend within
segments of the flattened patch sequence given by ``cu_seqlens``: one segment per image (Qwen2-VL,
and Qwen2.5-VL's full-attention layers) or per 112-pixel window (Qwen2.5-VL's other layers, about
a hundred windows an image). Unless the model runs flash attention, transformers' attention reads
the segment lengths on the host (``.tolist()``, which waits for the GPU) and calls SDPA once per
segment: on Qwen2.5-VL-7B with one 1024x1024 image, some 2,800 SDPA calls a forward, each a few
microseconds of GPU work and tens of microseconds of host time, so the tower runs at the host's
pace. This module computes the same attention with one ``varlen_attn`` call (flash attention's
variable-length kernel) per layer where torch has it and the tensors suit it (CUDA, 16-bit), with
the boundaries read once per forward, and otherwise SDPA per segment as transformers does.

It holds the original module's ``qkv`` and ``proj`` (same objects, same names: LoRA adapters and
checkpoints see no change) and calls the modeling file's own rotary function, so everything but
the attention call is the original's code. ``fusetune.patch.vision`` swaps it in only after a
probe shows it computes what the original computes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fusetune.segment_attention import cached_segments, segment_attention


class SegmentedVisionAttention(nn.Module):
    """``original``'s attention (``qkv`` -> rotary -> attention within each ``cu_seqlens`` segment
    -> ``proj``), with the segments in one call. ``rotary(q, k, cos, sin) -> (q, k)`` is the
    modeling file's ``apply_rotary_pos_emb_vision``."""

    def __init__(self, original: nn.Module, rotary: Callable):
        super().__init__()
        self.qkv = original.qkv
        self.proj = original.proj
        self.num_heads = original.num_heads
        self.scaling = getattr(original, "scaling", None)
        self.config = original.config
        self.is_causal = False
        self.rotary = rotary

    def forward(
        self,
        hidden_states: torch.Tensor,
        cu_seqlens: torch.Tensor,
        rotary_pos_emb: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        tokens = hidden_states.shape[0]
        qkv = self.qkv(hidden_states).reshape(tokens, 3, self.num_heads, -1)
        query, key, value = qkv.permute(1, 0, 2, 3).unbind(0)
        if position_embeddings is None:  # transformers before position_embeddings: the angles
            angles = torch.cat((rotary_pos_emb, rotary_pos_emb), dim=-1)
            position_embeddings = (angles.cos(), angles.sin())
        query, key = self.rotary(query, key, *position_embeddings)
        found = cached_segments(cu_seqlens, tokens, hidden_states.device)
        # (tokens, heads, head_dim) -> (1, heads, tokens, head_dim), attention -> (1, tokens, heads, head_dim)
        out = segment_attention(*(t.transpose(0, 1).unsqueeze(0) for t in (query, key, value)), found,
                                scale=self.scaling, causal=False)
        return self.proj(out.reshape(tokens, -1))
