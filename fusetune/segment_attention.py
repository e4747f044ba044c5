"""Attention within segments of a flattened token sequence: one ``varlen_attn`` call, or SDPA per segment.

Packed text rows (``fusetune.train.varlen``: causal, one segment per sample) and the Qwen2-VL
family's vision towers (``fusetune.nn.vision_attention``: full attention, one segment per window
or image) both attend within segments given by cumulative lengths (``cu``, int32, from 0). On
CUDA in float16 / bfloat16, where torch has ``torch.nn.attention.varlen.varlen_attn``, all the
segments go to flash attention's variable-length kernel in one call; everywhere else (the CPU,
float32, a torch without it, a shape it refuses) SDPA runs once per segment. Both give what a
block-diagonal mask would. Causal attention may also be limited to a sliding window (Mistral's and
Gemma's ``sliding_window``): flash attention's ``window_size`` where ``varlen_attn`` takes it, else
a windowed causal mask on each segment longer than the window.

``varlen_attn``'s signature changed between torch releases: 2.10 takes ``is_causal``; 2.11 has no
``is_causal`` and takes ``window_size`` ((-1, 0) causal, (-1, -1) full; compared as a tuple) and no
``enable_gqa`` (key/value heads are repeated to the query heads); 2.12 on take ``enable_gqa``. The
call is built from the installed function's signature (``call_plan``).

The boundaries are read off the device (and checked) once per tensor (``cached_segments``): the
layers of one forward share one boundaries tensor, so the host waits for the GPU once a step, not
once a layer.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F

_HALF = (torch.float16, torch.bfloat16)
_MAX_HEAD_DIM = 256  # flash attention's limit
# (device type, dtype, head_dim, kv heads == heads[, "window"]) varlen_attn refused
_failed: set[tuple] = set()


class Segments(NamedTuple):
    """Segments (samples, windows) of a flattened sequence: ``cu`` (int32 cumulative lengths on the
    attention's device), ``lengths`` and the longest."""

    cu: torch.Tensor
    lengths: tuple[int, ...]
    longest: int


def _same_view(held: torch.Tensor, tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is ``held`` or a view of the same memory laid out alike: a checkpoint's
    recompute gets its saved tensors back detached, new objects over the same storage (with the
    same version counter). ``held`` is kept alive by the cache, so its memory cannot have been
    freed and reused by another tensor."""
    if held is tensor:
        return True
    return (
        held.device == tensor.device
        and held.dtype == tensor.dtype
        and held.shape == tensor.shape
        and held.stride() == tensor.stride()
        and held.storage_offset() == tensor.storage_offset()
        and held.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr()
    )


class _Recent:
    """Results for the last few tensors seen. The same boundaries reach every layer of a forward
    (and, detached, its recompute: ``_same_view``), so they are read off the device once a step,
    not once a layer. Eight: a packed VLM step has up to five at once (the vision tower's window
    and image boundaries, the text rows' query and key boundaries, their position ids). A tensor
    made under ``torch.inference_mode`` has no version counter to tell an in-place change by, so
    its results are not kept (read once a layer there)."""

    def __init__(self, size: int = 8):
        self.size, self.entries = size, []

    def get(self, tensor: torch.Tensor, extra):
        if tensor.is_inference():
            return None
        for held, version, result in self.entries:
            if version == (tensor._version, extra) and _same_view(held, tensor):
                return result
        return None

    def put(self, tensor: torch.Tensor, extra, result):
        if not tensor.is_inference():
            self.entries = [(tensor, (tensor._version, extra), result), *self.entries[: self.size - 1]]
        return result


recent = _Recent()


def cached_segments(cu: torch.Tensor, tokens: int, device) -> Segments:
    """``read_segments(cu, ...)`` once per tensor (the layers of a forward share one boundaries tensor)."""
    known = recent.get(cu, (tokens, device))
    return known if known is not None else recent.put(cu, (tokens, device), read_segments(cu, tokens, device))


def read_segments(cu: torch.Tensor, tokens: int, device) -> Segments:
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


def windowed_causal_mask(length: int, window: int, device) -> torch.Tensor:
    """``(length, length)`` bool mask of causal attention within a sliding window, as transformers
    defines it: query i sees key j where ``i - window < j <= i``."""
    index = torch.arange(length, device=device)
    behind = index[:, None] - index[None, :]
    return (behind >= 0) & (behind < window)


window_masks = _Recent(size=2)


def is_windowed_causal(mask, window: int) -> bool:
    """Whether ``mask`` (a ``(batch or 1, 1, length, length)`` bool attention mask) is the causal
    mask of a ``window``-token sliding window for every row: what transformers builds for a
    sliding-window layer of a batch without padding. Read off the device once per mask tensor (the
    layers of a forward share one); while a CUDA graph is being captured, where nothing may be
    read, a mask not read before is taken as not windowed."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 4:
        return False
    length = mask.shape[-1]
    if mask.shape[1] != 1 or mask.shape[-2] != length:
        return False
    known = window_masks.get(mask, window)
    if known is not None:
        return known
    if mask.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    expected = windowed_causal_mask(length, window, mask.device)
    return window_masks.put(mask, window, bool(torch.equal(mask, expected.expand(mask.shape))))


@functools.lru_cache(maxsize=8)
def batch_segments(batch: int, length: int, device: torch.device) -> Segments:
    """The segments of an unpadded ``(batch, length)`` batch flattened: one a row."""
    cu = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=device)
    return Segments(cu, (length,) * batch, length)


def _sdpa(q, k, v, scale, dropout, causal, window, gqa) -> torch.Tensor:
    """SDPA on one segment: causal (within ``window`` where it is shorter than the segment) or full."""
    if causal and window is not None and q.shape[2] > window:
        mask = windowed_causal_mask(q.shape[2], window, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale,
                                              enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scale, is_causal=causal,
                                          enable_gqa=gqa)


def per_segment_attention(query, key, value, lengths, scale=None, dropout=0.0, causal=True,
                          window=None) -> torch.Tensor:
    """SDPA (causal, within the last ``window`` tokens where given, or full with ``causal=False``)
    on each ``lengths`` segment of ``(1, heads, tokens, head_dim)`` tensors (key and value may have
    fewer heads: grouped-query attention), concatenated: ``(1, heads, tokens, head_dim)``."""
    gqa = key.shape[1] != query.shape[1]
    parts = [
        _sdpa(q, k, v, scale, dropout, causal, window, gqa)
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
    (no mask within a segment), "gqa": takes enable_gqa, "scale": takes scale, "window": takes
    window_size (a sliding window)}``, or None where it cannot do causal attention."""
    parameters = inspect.signature(function).parameters
    if "is_causal" in parameters:  # torch 2.10
        causal, full = {"is_causal": True}, {"is_causal": False}
    elif "window_size" in parameters:  # torch 2.11 on: causal is window_size == (-1, 0), a tuple
        causal, full = {"window_size": (-1, 0)}, {"window_size": (-1, -1)}
    else:
        return None
    return {"causal": causal, "full": full, "gqa": "enable_gqa" in parameters, "scale": "scale" in parameters,
            "window": "window_size" in parameters}


def varlen_call(function, plan, query, key, value, cu, longest, scale=None, causal=True,
                window=None) -> torch.Tensor:
    """``function`` (a ``varlen_attn``) on ``(tokens, heads, head_dim)`` tensors with the same
    query and key boundaries ``cu``, called as ``plan`` says: causal (or full; causal within the
    last ``window`` tokens where given, flash attention's window of ``window - 1`` keys behind),
    grouped-query heads through ``enable_gqa`` or repeated, ``scale`` passed or folded into the
    query."""
    if window is not None:
        kwargs = {"window_size": (window - 1, 0)}
    else:
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


def varlen_usable(query, key, dropout) -> tuple | None:
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
                      causal=True, window=None) -> torch.Tensor:
    """Attention (causal, or full with ``causal=False``) within each of the ``found`` segments of
    the flattened ``(batch, heads, seq, head_dim)`` tensors, as ``(batch, seq, heads, head_dim)``:
    one ``varlen_attn`` call where it can, else SDPA per segment. ``window``: causal attention sees
    only the last ``window`` tokens (transformers' ``sliding_window``); None for no limit."""
    batch, heads, seq, dim = query.shape
    if not causal or (window is not None and window >= found.longest):
        window = None  # no segment reaches past the window
    usable = varlen_usable(query, key, dropout)
    if usable is not None and window is not None:
        usable = None if (*usable, "window") in _failed else (*usable, "window")
    function = varlen_function() if usable is not None else None
    plan = call_plan(function) if function is not None else None
    if plan is not None and (window is None or plan["window"]):
        try:
            out = varlen_call(
                function, plan, _flat(query), _flat(key), _flat(value), found.cu, found.longest, scale,
                causal, window,
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
    out = per_segment_attention(flat(query), flat(key), flat(value), lengths, scale, dropout, causal, window)
    return out.reshape(heads, batch, seq, dim).permute(1, 2, 0, 3)
