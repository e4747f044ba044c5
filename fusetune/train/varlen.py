"""``fusetune_varlen``: causal attention kept inside each packed sample, with no (row x row) mask.

A packed row (``fusetune.train.packing``) holds several samples back to back. With sdpa,
transformers keeps them apart with a dense block-diagonal mask, which computes the whole
``row x row`` score matrix and keeps SDPA off its flash and cuDNN kernels. This attention instead runs
each sample's causal attention on its own:

- on CUDA, in float16 / bfloat16, where torch has ``torch.nn.attention.varlen.varlen_attn``: one
  call for all samples (flash attention's varlen kernel, with autograd);
- everywhere else (the CPU, float32, a torch without ``varlen_attn``, a shape or dtype it refuses):
  one ``scaled_dot_product_attention(..., is_causal=True)`` call per sample
(``fusetune.segment_attention``, shared with the Qwen2-VL family's vision attention).

Both give exactly what the block-diagonal mask gives, within a sliding window where the model
has one (``sliding_window``: Mistral, Gemma 2 and 3). ``register()`` adds the implementation to
transformers' ``AttentionInterface`` and its mask function to ``AttentionMaskInterface`` (the mask
function returns None for an unpadded row without a cache, so transformers builds no mask).

The sample boundaries come from the ``cu_seq_lens_q`` / ``cu_seq_lens_k`` keyword arguments (int32
cumulative lengths from 0, as flash attention takes them) that transformers hands the attention
(``PackingCollator`` puts them in the batch); without them, from the text position ids, a new sample
starting wherever the position does not go up by one. They are read off the device (and checked)
once per tensor, so once a step rather than once a layer; ``max_length_q`` / ``max_length_k`` are
not needed. Anything that is not a causal row without a mask (a padded batch, decoding with a
cache, a bidirectional encoder) runs transformers' sdpa attention as it would have, with the mask
transformers builds for it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fusetune import segment_attention as segmented
from fusetune.segment_attention import Segments

NAME = "fusetune_varlen"


def register() -> str:
    """Add ``fusetune_varlen`` to transformers' attention and mask registries (again is a no-op);
    returns its name, for ``attn_implementation``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, mask)
    return NAME


# ------------------------------------------------------------------------------------------------
# Sample boundaries.


def cu_seq_lens(lengths, device=None) -> torch.Tensor:
    """Cumulative sample lengths from 0 as flash attention takes them: int32, ``len(lengths) + 1``."""
    lengths = torch.as_tensor(lengths, dtype=torch.int32, device=device)
    return F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))


def boundaries_from_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """``cu_seq_lens`` of the samples in the flattened ``(batch, seq)`` text position ids: a sample
    starts at each row's first token and wherever the position is not the previous one plus 1."""
    if position_ids.dim() != 2:
        raise ValueError(
            f"fusetune_varlen reads the sample boundaries from 2-D text position ids (batch, seq), got "
            f"shape {tuple(position_ids.shape)}; pass cu_seq_lens_q/cu_seq_lens_k/max_length_q/max_length_k "
            f"(fusetune.train.packing.PackingCollator puts them in the batch)."
        )
    batch, seq = position_ids.shape
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    where = torch.nonzero(starts.flatten()).flatten()
    return torch.cat([where, where.new_full((1,), batch * seq)]).to(torch.int32)



class _LastMask:
    """Whether the last mask transformers asked ``mask`` for was of a packed row (set per forward,
    before the layers run): a packed row whose boundaries do not reach the attention is an error,
    where a plain row without them is one sample per row."""

    packed = False


_last_mask = _LastMask()


def segments(query: torch.Tensor, key: torch.Tensor, kwargs: dict) -> Segments:
    """The samples of the flattened ``batch * seq`` tokens of ``query``: from ``cu_seq_lens_q`` /
    ``cu_seq_lens_k`` where given (the two must agree: causal self-attention), else from the 2-D
    text ``position_ids``, else one sample per row."""
    tokens = query.shape[0] * query.shape[2]
    given_q, given_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if given_q is not None or given_k is not None:
        found = segmented.cached_segments(given_q if given_q is not None else given_k, tokens, query.device)
        if given_q is not None and given_k is not None and given_k is not given_q:
            # (the collator's one tensor becomes two when Trainer moves the batch to the device)
            keys = segmented.cached_segments(given_k, key.shape[0] * key.shape[2], query.device)
            if keys.lengths != found.lengths:
                raise ValueError(
                    "fusetune_varlen runs causal self-attention within each sample: cu_seq_lens_q and "
                    "cu_seq_lens_k must be the same."
                )
        return found
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        if _last_mask.packed:
            raise ValueError(
                "fusetune_varlen got a packed row (transformers found several samples in its position ids) "
                "but neither cu_seq_lens_q/cu_seq_lens_k nor the text position_ids reached the attention: "
                "put the samples' boundaries in the batch (fusetune.train.packing.PackingCollator does; "
                "fusetune.train.packing.boundaries builds them) or set packing: false."
            )
        return segmented.read_segments(torch.arange(0, tokens + 1, query.shape[2], dtype=torch.int32), tokens,
                                       query.device)
    batch = query.shape[0]
    known = segmented.recent.get(position_ids, ("positions", query.device, batch))
    if known is None:
        rows = position_ids
        if rows.dim() == 2 and rows.shape[0] == 1 < batch:
            rows = rows.expand(batch, -1)  # one row of positions for every row, as models make them
        found = segmented.read_segments(boundaries_from_positions(rows), tokens, query.device)
        known = segmented.recent.put(position_ids, ("positions", query.device, batch), found)
    return known


# ------------------------------------------------------------------------------------------------
# transformers' side: the attention and the mask function.


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: ``query`` ``(batch, heads, seq, head_dim)``, ``key`` and
    ``value`` ``(batch, kv_heads, seq, head_dim)``; returns ``((batch, seq, heads, head_dim), None)``."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is not None or not causal or query.shape[2] != key.shape[2] or query.shape[2] <= 1:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            softcap=softcap,
            **kwargs,
        )
    if softcap is not None:
        raise ValueError(
            "fusetune_varlen does not soft-cap attention scores; pack with eager attention "
            "(fusetune.train.packing.use_packed_attention(model, 'eager'), which it picks for such models) "
            "or set packing: false."
        )
    found = segments(query, key, kwargs)
    out = segmented.segment_attention(query, key, value, found, scale=scaling, dropout=dropout,
                                      window=sliding_window)
    return out, None


def mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
):
    """transformers' mask interface: None (no mask at all) for a row without padding, cache or custom
    mask pattern, which ``attention_forward`` splits into its samples; sdpa's mask otherwise."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    plain = (
        not kwargs.get("use_vmap", False)  # transformers sets it for custom (or/and) mask patterns
        and isinstance(q_offset, int)
        and isinstance(kv_offset, int)
        and q_offset == kv_offset == 0
        and q_length == kv_length
    )
    if plain and attention_mask is not None:
        plain = (
            attention_mask.dim() == 2 and attention_mask.shape[-1] == kv_length and bool(attention_mask.all())
        )
    # A mask function other than the plain causal one, without use_vmap: transformers found packed
    # sequences in the position ids (or it is a sliding window); the attention must get boundaries.
    _last_mask.packed = plain and mask_function is not None and mask_function is not causal_mask_function
    if plain:
        return None
    return sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function or causal_mask_function,
        attention_mask=attention_mask,
        **kwargs,
    )
