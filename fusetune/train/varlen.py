"""``fusetune_varlen``: causal attention kept inside each packed sample, with no (row x row) mask.

A packed row (``fusetune.train.packing``) holds several samples back to back. With sdpa,
transformers keeps them apart with a dense block-diagonal mask, which computes the whole
``row x row`` score matrix and keeps SDPA off its flash and cuDNN kernels. This attention instead runs
each sample's causal attention on its own:

- on CUDA, in float16 / bfloat16, where torch has ``torch.nn.attention.varlen.varlen_attn``: one
  call for all samples (flash attention's varlen kernel, with autograd);
- everywhere else (the CPU, float32, a torch without ``varlen_attn``, a shape or dtype it refuses):
  one ``scaled_dot_product_attention(..., is_causal=True)`` call per sample.

Both give exactly what the block-diagonal mask gives. ``register()`` adds the implementation to
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

``varlen_attn``'s signature changed between torch releases: 2.10 takes ``is_causal``; 2.11 has no
``is_causal`` and takes ``window_size=(-1, 0)`` for causal attention (compared as a tuple) and no
``enable_gqa`` (key/value heads are repeated to the query heads); 2.12 on take ``enable_gqa``. The
call is built from the installed function's signature.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F

NAME = "fusetune_varlen"

_HALF = (torch.float16, torch.bfloat16)
_MAX_HEAD_DIM = 256  # flash attention's limit
_failed: set[tuple] = set()  # (device type, dtype, head_dim, kv heads == heads) varlen_attn refused


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


class Segments(NamedTuple):
    """A row's samples: ``cu`` (int32 cumulative lengths on the attention's device), ``lengths``
    and the longest."""

    cu: torch.Tensor
    lengths: tuple[int, ...]
    longest: int


class _Recent:
    """Results for the last few tensors seen. The same boundaries reach every layer of a forward
    (and its recompute), so they are read off the device once a step, not once a layer."""

    def __init__(self, size: int = 4):
        self.size, self.entries = size, []

    def get(self, tensor: torch.Tensor, extra):
        for held, version, result in self.entries:
            if held is tensor and version == (tensor._version, extra):
                return result
        return None

    def put(self, tensor: torch.Tensor, extra, result):
        self.entries = [(tensor, (tensor._version, extra), result), *self.entries[: self.size - 1]]
        return result


_recent = _Recent()


class _LastMask:
    """Whether the last mask transformers asked ``mask`` for was of a packed row (set per forward,
    before the layers run): a packed row whose boundaries do not reach the attention is an error,
    where a plain row without them is one sample per row."""

    packed = False


_last_mask = _LastMask()


def cached_segments(cu: torch.Tensor, tokens: int, device) -> Segments:
    """``_read(cu, ...)`` once per tensor (the layers of a forward share one boundaries tensor)."""
    known = _recent.get(cu, (tokens, device))
    return known if known is not None else _recent.put(cu, (tokens, device), _read(cu, tokens, device))


def _read(cu: torch.Tensor, tokens: int, device) -> Segments:
    """``cu`` checked (it must rise from 0 to ``tokens``), read, and on ``device``."""
    values = cu.tolist()
    if (
        cu.dim() != 1
        or len(values) < 2
        or values[0] != 0
        or values[-1] != tokens
        or any(b < a for a, b in zip(values, values[1:], strict=False))
    ):
        raise ValueError(
            f"cu_seq_lens must rise from 0 to the {tokens} tokens of the row, got {values[:8]}"
            f"{'...' if len(values) > 8 else ''}; build them from the packed samples' lengths "
            f"(fusetune.train.varlen.cu_seq_lens)."
        )
    lengths = tuple(b - a for a, b in zip(values, values[1:], strict=False))
    return Segments(cu.to(device=device, dtype=torch.int32), lengths, max(lengths))


def segments(query: torch.Tensor, key: torch.Tensor, kwargs: dict) -> Segments:
    """The samples of the flattened ``batch * seq`` tokens of ``query``: from ``cu_seq_lens_q`` /
    ``cu_seq_lens_k`` where given (the two must agree: causal self-attention), else from the 2-D
    text ``position_ids``, else one sample per row."""
    tokens = query.shape[0] * query.shape[2]
    given_q, given_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if given_q is not None or given_k is not None:
        found = cached_segments(given_q if given_q is not None else given_k, tokens, query.device)
        if given_q is not None and given_k is not None and given_k is not given_q:
            # (the collator's one tensor becomes two when Trainer moves the batch to the device)
            if cached_segments(given_k, key.shape[0] * key.shape[2], query.device).lengths != found.lengths:
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
        return _read(torch.arange(0, tokens + 1, query.shape[2], dtype=torch.int32), tokens, query.device)
    known = _recent.get(position_ids, ("positions", query.device))
    if known is None:
        found = _read(boundaries_from_positions(position_ids), tokens, query.device)
        known = _recent.put(position_ids, ("positions", query.device), found)
    return known


# ------------------------------------------------------------------------------------------------
# The two kernels' paths.


def per_segment_attention(query, key, value, lengths, scale=None, dropout=0.0, causal=True) -> torch.Tensor:
    """SDPA (causal, or full with ``causal=False``) on each ``lengths`` segment of ``(1, heads,
    tokens, head_dim)`` tensors (key and value may have fewer heads: grouped-query attention),
    concatenated: ``(1, heads, tokens, head_dim)``."""
    gqa = key.shape[1] != query.shape[1]
    parts = [
        F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout, scale=scale, is_causal=causal, enable_gqa=gqa
        )
        for q, k, v in zip(
            query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2), strict=True
        )
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def varlen_function():
    """torch's ``varlen_attn``, or None where this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.lru_cache(maxsize=8)
def call_plan(function) -> dict | None:
    """How to call this ``varlen_attn``: ``{"causal": {keyword: value}, "full": {keyword: value}
    (no mask within a segment), "gqa": takes enable_gqa, "scale": takes scale}``, or None where it
    cannot do causal attention."""
    parameters = inspect.signature(function).parameters
    if "is_causal" in parameters:  # torch 2.10
        causal, full = {"is_causal": True}, {"is_causal": False}
    elif "window_size" in parameters:  # torch 2.11 on: causal is window_size == (-1, 0), a tuple
        causal, full = {"window_size": (-1, 0)}, {"window_size": (-1, -1)}
    else:
        return None
    return {"causal": causal, "full": full, "gqa": "enable_gqa" in parameters, "scale": "scale" in parameters}


def varlen_call(function, plan, query, key, value, cu, longest, scale=None, causal=True) -> torch.Tensor:
    """``function`` (a ``varlen_attn``) on ``(tokens, heads, head_dim)`` tensors with the same
    query and key boundaries ``cu``, called as ``plan`` says: causal (or full), grouped-query heads
    through ``enable_gqa`` or repeated, ``scale`` passed or folded into the query."""
    kwargs = dict(plan["causal" if causal else "full"])
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        if plan["gqa"]:
            kwargs["enable_gqa"] = True
        else:  # query head h reads key/value head h // groups, as transformers' repeat_kv
            key = key.repeat_interleave(groups, dim=1)
            value = value.repeat_interleave(groups, dim=1)
    if scale is not None:
        if plan["scale"]:
            kwargs["scale"] = scale
        elif scale != query.shape[-1] ** -0.5:
            query = query * (scale * query.shape[-1] ** 0.5)
    return function(query, key, value, cu, cu, longest, longest, **kwargs)


def _varlen_usable(query, key, dropout) -> tuple | None:
    """The key under which this call may use ``varlen_attn``, or None where it may not."""
    head_dim = query.shape[-1]
    if not (query.is_cuda and query.dtype in _HALF and dropout == 0.0) or head_dim > _MAX_HEAD_DIM:
        return None
    if key.shape[-1] != head_dim or query.dtype != key.dtype:
        return None
    usable = (query.device.type, query.dtype, head_dim, key.shape[1] == query.shape[1])
    return None if usable in _failed else usable


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    """``(batch, heads, seq, dim)`` -> ``(batch * seq, heads, dim)``, last dimension contiguous."""
    batch, heads, seq, dim = tensor.shape
    flat = tensor.transpose(1, 2).reshape(batch * seq, heads, dim)
    return flat if flat.stride(-1) == 1 else flat.contiguous()


def segment_attention(query, key, value, found: Segments, scale=None, dropout=0.0,
                      causal=True) -> torch.Tensor:
    """Attention (causal, or full with ``causal=False``) within each of the ``found`` segments of
    the flattened ``(batch, heads, seq, head_dim)`` tensors, as ``(batch, seq, heads, head_dim)``:
    one ``varlen_attn`` call where it can, else SDPA per segment."""
    batch, heads, seq, dim = query.shape
    usable = _varlen_usable(query, key, dropout)
    function = varlen_function() if usable is not None else None
    plan = call_plan(function) if function is not None else None
    if plan is not None:
        try:
            out = varlen_call(
                function, plan, _flat(query), _flat(key), _flat(value), found.cu, found.longest, scale, causal
            )
            return out.view(batch, seq, heads, dim)
        except (RuntimeError, ValueError, NotImplementedError) as error:
            _failed.add(usable)
            warnings.warn(
                f"torch varlen_attn refused {query.dtype} heads {heads}/{key.shape[1]} x {dim} "
                f"({str(error).splitlines()[0][:200]}); SDPA runs per segment instead.",
                stacklevel=2,
            )

    def flat(t):  # (batch, heads, seq, dim) -> (1, heads, batch * seq, dim)
        return t if t.shape[0] == 1 else t.transpose(0, 1).reshape(1, t.shape[1], -1, t.shape[-1])

    lengths = list(found.lengths)
    out = per_segment_attention(flat(query), flat(key), flat(value), lengths, scale, dropout, causal)
    return out.reshape(heads, batch, seq, dim).permute(1, 2, 0, 3)


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
            "fusetune_varlen does not soft-cap attention scores; load the model with eager attention."
        )
    found = segments(query, key, kwargs)
    if sliding_window is not None and found.longest > sliding_window:
        raise ValueError(
            f"fusetune_varlen has no sliding-window attention and a sample ({found.longest} tokens) is "
            f"longer than the model's window of {sliding_window}; set packing: false."
        )
    out = segment_attention(query, key, value, found, scale=scaling, dropout=dropout)
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
