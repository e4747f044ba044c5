"""The attention output of a checkpointed layer, kept from its forward for its recompute.

A checkpointed decoder layer runs twice: once without a graph in forward, once with gradients in
backward. The second attention forward is pure repetition: q, k and v come out bitwise the same, so
the output and softmax statistics do too. At Llama-3 8B's size and 4,096 tokens that repetition is
about 9 ms of a 0.33 s step on an H200 (the cuDNN forward kernel, 0.28 ms a layer).

So, inside ``fusetune.checkpointing``'s offloading checkpoint, transformers' SDPA attention
function is replaced by one that, in forward, calls the fused attention kernel directly (cuDNN's on
CUDA, the flash kernel on CPU) to get the output and the row log-sum-exp, and offers both to the
checkpoint (``fusetune.kept``: the output goes to host memory with the layer's input, and comes back
with it, a layer ahead, in backward; the log-sum-exp, a float32 per row and head, stays on the
device). In the recompute it runs no attention at all: an autograd node returns the kept output, and its
backward calls the kernel's backward on the recomputed q, k and v. Gradients are plain recompute's
(bitwise where SDPA would have picked the same kernel).

Only the plain causal case is kept: no mask (SDPA's ``is_causal`` path), no dropout, no position
bias, softcap or sinks, equal query and key lengths, bf16/fp16 on CUDA (with cuDNN's SDPA enabled)
or any float on CPU. Any other call, and any the kernel refuses (cuDNN on another GPU, say: then
every call of that shape from then on), is run by the original function in forward and again in
the recompute, as before; of those, calls with a mask and fewer key than query heads (mllama's
cross-attention) run SDPA's grouped-query path instead of transformers' copies of the keys and
values (``_masked_gqa``), and sliding-window calls whose mask is the window's own (Gemma 3's local
layers, on CUDA) run flash attention's windowed kernel, which skips what the window masks
(``_windowed``). Outside a fusetune checkpoint the function is the original one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from fusetune import kept as keeper
from fusetune.segment_attention import batch_segments, is_windowed_causal, segment_attention, varlen_usable

__all__ = ["KIND", "KeptAttention", "install"]

KIND = "attention"  # what this module offers and takes (fusetune.kept)


class KeptAttention(NamedTuple):
    """What backward needs of one attention call besides q, k and v: the kernel's log-sum-exp and
    its other outputs (``extras``: cuDNN's sequence offsets, lengths and RNG tensors), the scale,
    and the output shape, to check the recompute's call against."""

    lse: torch.Tensor
    extras: tuple
    scale: float | None
    shape: torch.Size


# --------------------------------------------------------------------------------------------
# The fused kernels, called directly for their log-sum-exp
# --------------------------------------------------------------------------------------------
def _forward(query, key, value, scale):
    """Causal attention of (B, H, T, D) tensors (key and value may have fewer heads, GQA): the
    output (B, H, T, D), the log-sum-exp and the kernel's other outputs backward takes."""
    if query.is_cuda:
        out = torch.ops.aten._scaled_dot_product_cudnn_attention(
            query, key, value, None, True, 0.0, True, False, scale=scale
        )
        return out[0], out[1], tuple(out[2:8])  # cum_seq_q, cum_seq_k, max_q, max_k, philox seed/offset
    output, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, 0.0, True, scale=scale
    )
    return output, lse, ()


def _backward(grad, query, key, value, output, kept: KeptAttention):
    if query.is_cuda:
        cum_q, cum_k, max_q, max_k, seed, offset = kept.extras
        return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            grad, query, key, value, output, kept.lse, seed, offset, None, cum_q, cum_k, max_q, max_k,
            0.0, True, scale=kept.scale,
        )
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad, query, key, value, output, kept.lse, 0.0, True, scale=kept.scale
    )


class _FromKept(torch.autograd.Function):
    """Returns the kept output (B, T, H, D); backward is the attention kernel's, on the recomputed
    q, k, v (B, H, T, D)."""

    @staticmethod
    def forward(ctx, query, key, value, output, kept: KeptAttention):
        ctx.save_for_backward(query, key, value, output)
        ctx.kept = kept
        return output  # autograd returns an input as a view of it, with this node as its grad_fn

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        query, key, value, output = ctx.saved_tensors
        # The kernel's output was the transpose of this layout; its gradient takes the same one.
        grads = _backward(grad.transpose(1, 2), query, key, value, output.transpose(1, 2), ctx.kept)
        return (*grads, None, None)


_KEPT_DTYPES = {"cuda": (torch.bfloat16, torch.float16),
                "cpu": (torch.float32, torch.bfloat16, torch.float16)}
# Keyword arguments of transformers' sdpa_attention_forward that change what it computes.
_CHANGES_RESULT = ("position_bias", "softcap", "s_aux")


def _keepable(module, query, key, value, attention_mask, dropout, is_causal, kwargs) -> bool:
    """Whether this attention call is the plain causal case the kept path computes (see the module
    docstring); transformers' SDPA function would call SDPA's ``is_causal`` kernels for it."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    return (
        attention_mask is None
        and not dropout
        and causal is True
        and all(kwargs.get(name) is None for name in _CHANGES_RESULT)
        and not kwargs.get("output_attentions", False)
        and query.dim() == key.dim() == value.dim() == 4
        and query.shape[2] == key.shape[2] > 1
        and query.shape[-1] == key.shape[-1] == value.shape[-1]
        and query.shape[1] % key.shape[1] == 0
        and query.dtype in _KEPT_DTYPES.get(query.device.type, ())
        and query.dtype == key.dtype == value.dtype
        and (not query.is_cuda or torch.backends.cuda.cudnn_sdp_enabled())  # the user's choice
        and _signature(query, key) not in _UNSUPPORTED
        and not torch.jit.is_tracing()
    )


# Calls whose kernel refused them once (cuDNN's attention on another GPU, head size or version):
# (device, dtype, head size, query heads, key heads). Those run the original function from then on.
_UNSUPPORTED: set[tuple] = set()


def _signature(query: torch.Tensor, key: torch.Tensor) -> tuple:
    return (query.device, query.dtype, query.shape[-1], query.shape[1], key.shape[1])


def _masked_gqa(query, key, value, attention_mask, dropout, scaling, kwargs) -> tuple | None:
    """A masked grouped-query call (fewer key than query heads, a mask) as one SDPA call with
    ``enable_gqa``, or None for any other call.

    transformers' SDPA function copies keys and values to every query head (``repeat_kv``) when a
    mask is given, because SDPA's grouped-query support once fell back to its math kernel with one.
    On an H200 with torch 2.11 it does not (``bench/gqa_masked.py``, ``gqa-masked-h200.jsonl``): at
    mllama's cross-attention it is faster (5.85 against 6.01 ms forward + backward) and holds 75 MiB
    less; the copies are 100 MiB live at the peak of M11's step. Same maths as the copies: query
    head h reads key head h // (query heads / key heads).
    """
    if (
        not isinstance(attention_mask, torch.Tensor)
        or query.dim() != 4
        or key.shape[1] == query.shape[1]
        or query.shape[1] % key.shape[1]
        or any(kwargs.get(name) is not None for name in _CHANGES_RESULT)
        or kwargs.get("output_attentions", False)
        or attention_mask.shape[-1] not in (1, key.shape[-2])  # transformers versions differ on longer ones
        or query.device.type not in ("cuda", "cpu")
        or torch.jit.is_tracing()
    ):
        return None
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                         scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def _windowed(query, key, value, attention_mask, dropout, scaling, kwargs) -> tuple | None:
    """A sliding-window layer's call (transformers' ``sliding_window``: Gemma 3's local layers,
    Mistral's) whose mask is exactly the window's causal mask, as flash attention's windowed kernel
    (``segment_attention``, one segment a row), or None for any other call.

    SDPA with that mask computes every query-key pair of the square and masks most of them: at
    Gemma-3-12B's 1,024-token window and 4,096 tokens, 16 heads of 256, cuDNN's masked kernels took
    0.96 ms forward and 3.1 ms backward a layer on an H200. Flash attention's window skips the key
    blocks outside it. Same maths as the mask; CUDA in 16 bits only (elsewhere the call is left to
    SDPA, which the windowed fallback would only repeat)."""
    window = kwargs.get("sliding_window")
    if (
        not isinstance(window, int)
        or query.dim() != 4
        or key.dim() != 4
        or query.shape[2] != key.shape[2]
        or query.shape[2] <= window
        or any(kwargs.get(name) is not None for name in _CHANGES_RESULT)
        or kwargs.get("output_attentions", False)
        or varlen_usable(query, key, dropout) is None
        or torch.jit.is_tracing()
        or not is_windowed_causal(attention_mask, window)
    ):
        return None
    found = batch_segments(query.shape[0], query.shape[2], query.device)
    return segment_attention(query, key, value, found, scale=scaling, dropout=dropout, window=window), None


def _keeping_attention(sdpa: Callable) -> Callable:
    """transformers' SDPA attention function with the kept path around it."""

    @functools.wraps(sdpa)
    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                  **kwargs):
        def original():
            return sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                        is_causal=is_causal, **kwargs)

        def unkept():  # a call of a fusetune checkpoint that is not kept
            for route in (_windowed, _masked_gqa):
                routed = route(query, key, value, attention_mask, dropout, scaling, kwargs)
                if routed is not None:
                    return routed
            return original()

        if keeper.recomputing(KIND):
            reused = keeper.take(KIND)
            if reused is None:
                return unkept()
            (output,), kept = reused
            if kept.shape != (query.shape[0], query.shape[2], query.shape[1], value.shape[-1]):
                raise RuntimeError(
                    f"fusetune: a layer's recompute called attention with other shapes than its forward "
                    f"({tuple(query.shape)} against a kept output of {tuple(kept.shape)}); disable kept "
                    "attention with enable_checkpointing(model, keep_attention=False) and report this."
                )
            return _FromKept.apply(query, key, value, output, kept), None
        if not keeper.offering(KIND):
            return original()
        if not _keepable(module, query, key, value, attention_mask, dropout, is_causal, kwargs):
            keeper.offer(KIND, None)
            return unkept()
        try:
            out, lse, extras = _forward(query, key, value, scaling)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, NotImplementedError):  # the kernel does not take this call: as before
            _UNSUPPORTED.add(_signature(query, key))
            keeper.offer(KIND, None)
            return unkept()
        output = out.transpose(1, 2).contiguous()  # transformers' layout; a view when q was one
        keeper.offer(KIND, (output,), KeptAttention(lse, extras, scaling, output.shape))
        return output, None

    attention.fusetune_keeps = True
    return attention


def install() -> bool:
    """Wrap transformers' registered "sdpa" attention function with the kept path (once; the
    wrapper runs the original outside fusetune's checkpoints). False where transformers has none."""
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError:  # pragma: no cover - transformers is what checkpointed models come from
        return False
    if "sdpa" not in ALL_ATTENTION_FUNCTIONS:
        return False
    current = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if not getattr(current, "fusetune_keeps", False):
        ALL_ATTENTION_FUNCTIONS["sdpa"] = _keeping_attention(current)
    return True
