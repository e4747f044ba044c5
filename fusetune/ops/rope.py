"""Rotary position embedding (RoPE), rotate-half form, applied to q and k in one launch.

``rope(q, k, cos, sin, unsqueeze_dim)`` computes exactly what transformers'
``apply_rotary_pos_emb`` computes::

    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    q_embed = q * cos + rotate_half(q) * sin        # rotate_half(x) = cat(-x2, x1)
    k_embed = k * cos + rotate_half(k) * sin

with partial rotary: when ``rotary_dim = cos.shape[-1]`` is smaller than ``head_dim`` only the
first ``rotary_dim`` features are rotated and the rest pass through unchanged.

Kernel layout: a 2-D grid of (block of (batch, seq) tokens) x (block of heads), the head blocks
of q first, then those of k. Each program loads its tokens' cos/sin rows and rotates its
(tokens x heads x half rotary dim) tile. cos/sin rows are read once per head block (from L2 after
the first) rather than once per head, and many small programs keep enough loads in flight. With
``x1, x2`` the two halves of the rotated part and ``c1, c2, s1, s2`` the halves of cos and sin::

    forward:   o1 = x1*c1 - x2*s1      o2 = x2*c2 + x1*s2
    backward:  d1 = g1*c1 + g2*s2      d2 = g2*c2 - g1*s1

The backward is the transposed rotation, i.e. the forward with ``(s1, s2) -> (-s2, -s1)``, so one
kernel serves both directions and nothing but cos/sin is saved. cos/sin are not assumed to be
``cat(freqs, freqs)`` (both halves are read), so pre-folded M-RoPE tables work as well.
"""

from __future__ import annotations

import functools

import torch
from torch.autograd.function import once_differentiable

from fusetune.ops._direct_launch import direct_launch
from fusetune.ops._graph_ops import graph_op
from fusetune.ops._launch import (
    cdiv,
    check_float,
    check_same_device,
    interpreting,
    next_power_of_2,
    public_op,
    triton,
    use_triton,
)

if triton is not None:
    import triton.language as tl

# Largest (tokens x heads x half rotary dim) tile a program holds on the GPU, the most heads in it,
# and its warps: the fastest kernels at 8,192 and 32,768 Llama-3-8B tokens on the H200 (0.94 and
# 0.82 of copy bandwidth; rows-tuning-h200-rope2d.jsonl). Under the interpreter a program takes as
# many tokens as fit a far larger tile: it pays per program, not per element.
_MAX_TILE = 4096
_MAX_HEADS = 4
_WARPS = 4
_INTERPRETER_TILE = 2**16
# Half rotary widths (powers of two) whose kernels were faster with fewer heads a program: head dim 64
# (Llama-3.2-1B) and 256 (Gemma 3) with two heads (0.186 -> 0.178 ms at 32,768 tokens, 0.117 ->
# 0.109 at 8,192; at head dim 128 two heads were 14% slower at 32,768 tokens:
# rows-tuning-h200-rope-heads.jsonl, kernel time).
_HEADS_BY_HALF = {32: 2, 128: 2}


# --------------------------------------------------------------------------------------------
# Validation shared by the op and its reference
# --------------------------------------------------------------------------------------------
def _check(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           unsqueeze_dim: int) -> None:
    if unsqueeze_dim not in (1, 2):
        raise ValueError(
            f"fusetune.rope: unsqueeze_dim must be 1 (q, k laid out as (batch, heads, seq, "
            f"head_dim)) or 2 ((batch, seq, heads, head_dim)), got {unsqueeze_dim!r}."
        )
    for name, t in (("q", q), ("k", k)):
        if t.dim() != 4:
            raise ValueError(
                f"fusetune.rope: {name} must be 4-D (batch, heads, seq, head_dim) or (batch, seq, "
                f"heads, head_dim), got shape {tuple(t.shape)}."
            )
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 3:
            raise ValueError(
                f"fusetune.rope: {name} must be 3-D (batch, seq, rotary_dim) as the model's rotary "
                f"embedding returns it, got shape {tuple(t.shape)} (for a (seq, rotary_dim) table "
                f"pass {name}.unsqueeze(0))."
            )
    check_same_device("q", q, k=k, cos=cos, sin=sin)
    if cos.shape != sin.shape:
        raise ValueError(
            f"fusetune.rope: cos and sin must have the same shape, got {tuple(cos.shape)} and "
            f"{tuple(sin.shape)}."
        )
    seq_dim = 3 - unsqueeze_dim  # 2 for (b, h, s, d), 1 for (b, s, h, d)
    if q.shape[0] != k.shape[0] or q.shape[seq_dim] != k.shape[seq_dim] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"fusetune.rope: q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch, seq "
            f"and head_dim (unsqueeze_dim={unsqueeze_dim}); only the head counts may differ."
        )
    batch, seq, head_dim = q.shape[0], q.shape[seq_dim], q.shape[3]
    rotary_dim = cos.shape[2]
    if rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > head_dim:
        raise ValueError(
            f"fusetune.rope: rotary_dim = cos.shape[-1] = {rotary_dim} must be even, positive and "
            f"at most head_dim = {head_dim}."
        )
    if cos.shape[0] not in (1, batch):
        raise ValueError(
            f"fusetune.rope: cos/sin batch {cos.shape[0]} does not broadcast to the q/k batch "
            f"{batch} (it must be 1 or {batch})."
        )
    if cos.shape[1] not in (1, seq):
        raise ValueError(
            f"fusetune.rope: cos/sin seq length {cos.shape[1]} does not match the q/k seq length "
            f"{seq} (dim {seq_dim} with unsqueeze_dim={unsqueeze_dim}); it must be 1 or {seq}."
        )


# --------------------------------------------------------------------------------------------
# PyTorch reference
# --------------------------------------------------------------------------------------------
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``apply_rotary_pos_emb`` with partial rotary, computed in float32.

    Differentiable through autograd in q, k, cos and sin. Returns q's and k's dtypes.
    """
    _check(q, k, cos, sin, unsqueeze_dim)
    rotary_dim = cos.shape[-1]
    cos = cos.unsqueeze(unsqueeze_dim).float()
    sin = sin.unsqueeze(unsqueeze_dim).float()

    def apply(x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x_rot, x_pass = x32[..., :rotary_dim], x32[..., rotary_dim:]
        x_rot = x_rot * cos + _rotate_half(x_rot) * sin
        return torch.cat((x_rot, x_pass), dim=-1).to(x.dtype)

    return apply(q), apply(k)


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _rotate_heads(x_ptr, o_ptr, x_base, o_base, token_mask, first_head, n_heads, x_sh, o_sh,
                      c1, c2, s1, s2, cols, col_mask, pcols, pcol_mask,
                      HALF: tl.constexpr, BLOCK_H: tl.constexpr, HAS_PASS: tl.constexpr):
        """Rotate heads [first_head, first_head + BLOCK_H) (those below ``n_heads``) of a block of
        tokens: one (tokens, heads, half rotary dim) tile.

        ``x_base`` / ``o_base`` hold each token's offset; features have unit stride.
        """
        heads = first_head + tl.arange(0, BLOCK_H)
        th_mask = token_mask[:, None] & (heads < n_heads)[None, :]
        x_row = x_ptr + x_base[:, None, None] + heads.to(tl.int64)[None, :, None] * x_sh
        o_row = o_ptr + o_base[:, None, None] + heads.to(tl.int64)[None, :, None] * o_sh
        mask = th_mask[:, :, None] & col_mask[None, None, :]
        x1 = tl.load(x_row + cols[None, None, :], mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_row + HALF + cols[None, None, :], mask=mask, other=0.0).to(tl.float32)
        o1 = x1 * c1[:, None, :] - x2 * s1[:, None, :]
        o2 = x2 * c2[:, None, :] + x1 * s2[:, None, :]
        tl.store(o_row + cols[None, None, :], o1.to(o_ptr.dtype.element_ty), mask=mask)
        tl.store(o_row + HALF + cols[None, None, :], o2.to(o_ptr.dtype.element_ty), mask=mask)
        if HAS_PASS:
            pmask = th_mask[:, :, None] & pcol_mask[None, None, :]
            kept = tl.load(x_row + pcols[None, None, :], mask=pmask, other=0.0)
            tl.store(o_row + pcols[None, None, :], kept.to(o_ptr.dtype.element_ty), mask=pmask)

    @direct_launch
    @triton.jit
    def _rope_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr,
                     n_tokens, seq_len, n_q_heads, n_k_heads, q_blocks,
                     q_sb, q_ss, q_sh, k_sb, k_ss, k_sh,
                     qo_sb, qo_ss, qo_sh, ko_sb, ko_ss, ko_sh,
                     c_sb, c_ss, s_sb, s_ss,
                     HALF: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                     HAS_Q: tl.constexpr, HAS_K: tl.constexpr, HAS_PASS: tl.constexpr,
                     BACKWARD: tl.constexpr):
        tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        token_mask = tokens < n_tokens
        b = tokens // seq_len
        s = tokens - b * seq_len

        cols = tl.arange(0, BLOCK_HALF)
        col_mask = cols < HALF
        cs_mask = token_mask[:, None] & col_mask[None, :]
        c_row = cos_ptr + (b * c_sb + s * c_ss)[:, None] + cols[None, :]
        s_row = sin_ptr + (b * s_sb + s * s_ss)[:, None] + cols[None, :]
        c1 = tl.load(c_row, mask=cs_mask, other=0.0).to(tl.float32)
        c2 = tl.load(c_row + HALF, mask=cs_mask, other=0.0).to(tl.float32)
        s1 = tl.load(s_row, mask=cs_mask, other=0.0).to(tl.float32)
        s2 = tl.load(s_row + HALF, mask=cs_mask, other=0.0).to(tl.float32)
        if BACKWARD:  # transposed rotation: (s1, s2) -> (-s2, -s1)
            t1 = -s2
            t2 = -s1
        else:
            t1 = s1
            t2 = s2

        pcols = 2 * HALF + tl.arange(0, BLOCK_PASS)
        pcol_mask = pcols < HEAD_DIM

        # Head blocks 0 .. q_blocks - 1 are q's, the rest k's.
        head_block = tl.program_id(1)
        if HAS_Q:
            if head_block < q_blocks:
                _rotate_heads(q_ptr, qo_ptr, b * q_sb + s * q_ss, b * qo_sb + s * qo_ss, token_mask,
                              head_block * BLOCK_HQ, n_q_heads, q_sh, qo_sh, c1, c2, t1, t2, cols,
                              col_mask, pcols, pcol_mask, HALF, BLOCK_HQ, HAS_PASS)
        if HAS_K:
            if head_block >= q_blocks:
                _rotate_heads(k_ptr, ko_ptr, b * k_sb + s * k_ss, b * ko_sb + s * ko_ss, token_mask,
                              (head_block - q_blocks) * BLOCK_HK, n_k_heads, k_sh, ko_sh, c1, c2, t1,
                              t2, cols, col_mask, pcols, pcol_mask, HALF, BLOCK_HK, HAS_PASS)


def _heads_and_strides(x: torch.Tensor, unsqueeze_dim: int) -> tuple[int, int, int, int]:
    """x's head count and its (batch, seq, head) strides, whichever of the two layouts it has."""
    batch_stride, stride_1, stride_2, _ = x.stride()
    if unsqueeze_dim == 1:  # (batch, heads, seq, head_dim)
        return x.shape[1], batch_stride, stride_2, stride_1
    return x.shape[2], batch_stride, stride_1, stride_2


def _table(t: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """cos/sin with unit feature stride, and its (batch, seq) strides (0 where broadcast)."""
    batch_stride, seq_stride, feature_stride = t.stride()
    if feature_stride != 1:
        t = t.contiguous()
        batch_stride, seq_stride, _ = t.stride()
    batch, seq, _ = t.shape
    return t, 0 if batch == 1 else batch_stride, 0 if seq == 1 else seq_stride


def _unit_stride(x: torch.Tensor | None) -> torch.Tensor | None:
    return x if x is None or x.stride(-1) == 1 else x.contiguous()


def _outputs(q: torch.Tensor | None, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
             unsqueeze_dim: int, backward: bool, q_dtype: torch.dtype, k_dtype: torch.dtype,
             ) -> list[torch.Tensor]:
    """New outputs of :func:`_launch`: one for each of q and k given, in ``q_dtype`` / ``k_dtype``,
    in the input's layout where it is dense (e.g. a transposed projection), else contiguous."""
    return [torch.empty_like(_unit_stride(x), dtype=dtype)
            for x, dtype in ((q, q_dtype), (k, k_dtype)) if x is not None]


def _placed(outs: list[torch.Tensor], inputs: tuple) -> list[torch.Tensor | None]:
    """``outs`` (one for each of ``inputs`` that is not None) in their inputs' places, None elsewhere."""
    present = iter(outs)
    return [None if x is None else next(present) for x in inputs]


@functools.lru_cache(maxsize=256)
def _blocks(half: int, head_dim: int, n_q: int, n_k: int, n_tokens: int, interpreted: bool,
            ) -> tuple[int, int, int, int, int]:
    """``(BLOCK_HALF, BLOCK_PASS, BLOCK_HQ, BLOCK_HK, BLOCK_T)`` of a launch: heads per program,
    then tokens to fill the tile (many more under the interpreter). Cached: it is the same for
    every layer of a model."""
    block_half = next_power_of_2(half)
    block_pass = next_power_of_2(max(head_dim - 2 * half, 1))
    heads_cap = min(_HEADS_BY_HALF.get(block_half, _MAX_HEADS), max(1, _MAX_TILE // block_half))
    block_hq = min(next_power_of_2(max(n_q, 1)), heads_cap)
    block_hk = min(next_power_of_2(max(n_k, 1)), heads_cap)
    tile = max(block_hq, block_hk) * block_half
    block_t = next_power_of_2(max(1, (_INTERPRETER_TILE if interpreted else _MAX_TILE) // tile))
    return block_half, block_pass, block_hq, block_hk, min(block_t, next_power_of_2(n_tokens))


@graph_op("rope", fake=_outputs)
def _launch(q: torch.Tensor | None, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
            unsqueeze_dim: int, backward: bool, q_dtype: torch.dtype, k_dtype: torch.dtype,
            ) -> list[torch.Tensor]:
    """Rotate q and k (either may be None) by cos/sin; backward=True applies the inverse. Returns
    the outputs of those given (``_outputs``)."""
    q, k = _unit_stride(q), _unit_stride(k)
    outs = _outputs(q, k, cos, sin, unsqueeze_dim, backward, q_dtype, k_dtype)
    q_out, k_out = _placed(outs, (q, k))
    if q is None and k is None:
        return outs
    # A missing one is replaced by the other (never touched: HAS_Q / HAS_K are off).
    q_in, q_out = (q, q_out) if q is not None else (k, k_out)
    k_in, k_out = (k, k_out) if k is not None else (q_in, q_out)
    batch, seq, head_dim = q_in.shape[0], q_in.shape[3 - unsqueeze_dim], q_in.shape[3]
    n_tokens = batch * seq
    if n_tokens == 0:
        return outs
    n_q, *q_strides = _heads_and_strides(q_in, unsqueeze_dim)
    n_k, *k_strides = _heads_and_strides(k_in, unsqueeze_dim)
    n_q, n_k = (n_q if q is not None else 0), (n_k if k is not None else 0)
    cos, c_sb, c_ss = _table(cos)
    sin, s_sb, s_ss = _table(sin)
    half = cos.shape[-1] // 2
    block_half, block_pass, block_hq, block_hk, block_t = _blocks(half, head_dim, n_q, n_k, n_tokens,
                                                                  interpreting())
    q_blocks = cdiv(n_q, block_hq)
    _rope_kernel[(cdiv(n_tokens, block_t), q_blocks + cdiv(n_k, block_hk))](
        q_in, k_in, q_out, k_out, cos, sin,
        n_tokens, seq, n_q, n_k, q_blocks,
        *q_strides, *k_strides,
        *_heads_and_strides(q_out, unsqueeze_dim)[1:], *_heads_and_strides(k_out, unsqueeze_dim)[1:],
        c_sb, c_ss, s_sb, s_ss,
        HALF=half, HEAD_DIM=head_dim, BLOCK_HALF=block_half, BLOCK_PASS=block_pass,
        BLOCK_T=block_t, BLOCK_HQ=block_hq, BLOCK_HK=block_hk,
        HAS_Q=q is not None, HAS_K=k is not None, HAS_PASS=head_dim > 2 * half,
        BACKWARD=backward, num_warps=_WARPS,
    )
    return tuple(outs)


class _RoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, unsqueeze_dim):
        q_out, k_out = _launch(q, k, cos, sin, unsqueeze_dim, False, q.dtype, k.dtype)
        ctx.save_for_backward(cos, sin)
        ctx.unsqueeze_dim = unsqueeze_dim
        ctx.dtypes = (q.dtype, k.dtype)
        ctx.set_materialize_grads(False)
        for out, needs_grad in zip((q_out, k_out), ctx.needs_input_grad[:2], strict=True):
            if not needs_grad:
                ctx.mark_non_differentiable(out)
        return q_out, k_out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_q, grad_k):
        cos, sin = ctx.saved_tensors
        grads = [g if wanted else None
                 for g, wanted in zip((grad_q, grad_k), ctx.needs_input_grad[:2], strict=True)]
        dq, dk = _placed(_launch(*grads, cos, sin, ctx.unsqueeze_dim, True, *ctx.dtypes), grads)
        return dq, dk, None, None, None


@public_op
def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply rotary position embedding to q and k, as transformers' ``apply_rotary_pos_emb``.

    Args:
        q: (batch, q_heads, seq, head_dim) with ``unsqueeze_dim=1`` (the attention modules'
            layout, usually a transposed view) or (batch, seq, q_heads, head_dim) with
            ``unsqueeze_dim=2``. bf16/fp16/fp32, any strides.
        k: the same layout as q; may have fewer heads (GQA/MQA).
        cos, sin: (batch or 1, seq or 1, rotary_dim) as the model's rotary embedding returns them
            (M-RoPE sections already folded in). ``rotary_dim < head_dim`` rotates only the first
            ``rotary_dim`` features (partial rotary); it must be even.
        unsqueeze_dim: 1 or 2, as in transformers.

    Returns:
        (q_embed, k_embed) in q's and k's dtypes and shapes, computed in float32.

    Gradients flow to q and k through a Triton backward (the inverse rotation, recomputed from
    cos/sin). If cos or sin require grad, the op falls back to :func:`rope_reference` (plain
    autograd) so their gradients are correct rather than silently dropped.
    """
    _check(q, k, cos, sin, unsqueeze_dim)
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        check_float(name, t)
    if not use_triton(q, k, cos, sin) or cos.requires_grad or sin.requires_grad:
        return rope_reference(q, k, cos, sin, unsqueeze_dim)
    return _RoPE.apply(q, k, cos, sin, unsqueeze_dim)
