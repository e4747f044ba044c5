"""rope: forward and q/k gradients vs the reference (same dtype) and transformers' maths in
float64."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import pytest
import torch

from fusetune.ops._launch import use_triton
from fusetune.ops.rope import rope, rope_reference
from tests.ops import checks

rope_module = importlib.import_module("fusetune.ops.rope")  # the module: fusetune.ops.rope is the function


# --------------------------------------------------------------------------------------------
# transformers' apply_rotary_pos_emb, written out here as the independent reference
# --------------------------------------------------------------------------------------------
def hf_rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def hf_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    rotary_dim = cos.shape[-1]  # partial rotary as in transformers' partial-rotary models
    q_rot, q_pass = q[..., :rotary_dim], q[..., rotary_dim:]
    k_rot, k_pass = k[..., :rotary_dim], k[..., rotary_dim:]
    q_embed = q_rot * cos + hf_rotate_half(q_rot) * sin
    k_embed = k_rot * cos + hf_rotate_half(k_rot) * sin
    return torch.cat((q_embed, q_pass), dim=-1), torch.cat((k_embed, k_pass), dim=-1)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------
def randn(gen, *shape, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(checks.DEVICE)


def rotary_tables(gen, batch, seq, rotary_dim, dtype, base=10000.0):
    """cos/sin as a rotary embedding makes them: positions x inv_freq, cat(freqs, freqs)."""
    offsets = torch.randint(0, 50, (batch, 1), generator=gen)
    positions = (torch.arange(seq)[None, :] + offsets).double()
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2).double() / rotary_dim))
    freqs = positions[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(checks.DEVICE, dtype), emb.sin().to(checks.DEVICE, dtype)


def random_tables(gen, batch, seq, rotary_dim, dtype):
    """Unrelated angles per feature (both halves differ), like pre-folded M-RoPE tables."""
    angles = randn(gen, batch, seq, rotary_dim, scale=3.0)
    return angles.cos().to(dtype), angles.sin().to(dtype)


@dataclass(frozen=True)
class Case:
    batch: int
    cos_batch: int
    seq: int
    cos_seq: int
    q_heads: int
    k_heads: int
    head_dim: int
    rotary_dim: int
    unsqueeze_dim: int
    layout: str  # "contiguous" | "transposed" (heads/seq swapped in memory) | "sliced"
    tables: str = "rotary"  # "rotary" | "random"


CASES = {
    "attention_transpose_gqa": Case(2, 2, 13, 13, 3, 1, 10, 10, 1, "transposed"),
    "bshd_broadcast_batch": Case(2, 1, 7, 7, 3, 3, 6, 6, 2, "contiguous"),
    "partial_sliced_gqa": Case(2, 1, 7, 7, 3, 1, 10, 6, 1, "sliced", "random"),
    "partial_bshd_transposed": Case(2, 2, 13, 13, 4, 2, 16, 8, 2, "transposed"),
    "decode_seq_broadcast": Case(3, 3, 1, 1, 5, 1, 12, 12, 1, "contiguous", "random"),
    "seq_broadcast_table": Case(2, 1, 7, 1, 3, 1, 10, 4, 2, "sliced"),
    # Head dims whose launch takes two heads a program (rope._HEADS_BY_HALF): several head blocks,
    # the last one part-masked.
    "head_dim_64_two_heads_a_program": Case(1, 1, 5, 5, 5, 3, 64, 64, 1, "contiguous"),
    "head_dim_256_two_heads_a_program": Case(2, 2, 3, 3, 3, 2, 256, 256, 2, "transposed"),
}


def layout(x, case):
    """x (in the case's logical shape) stored the way the case asks."""
    if case.layout == "transposed" and case.unsqueeze_dim == 1:
        # How attention modules make q/k: a (b, s, h, d) projection viewed as (b, h, s, d).
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if case.layout == "transposed":
        return checks.transposed_layout(x)
    if case.layout == "sliced":
        return checks.non_contiguous(x)
    return x


def make_inputs(case, dtype, seed):
    gen = torch.Generator().manual_seed(seed)

    def qk(heads):
        if case.unsqueeze_dim == 1:
            shape = (case.batch, heads, case.seq, case.head_dim)
        else:
            shape = (case.batch, case.seq, heads, case.head_dim)
        return layout(randn(gen, *shape).to(dtype), case)

    q, k = qk(case.q_heads), qk(case.k_heads)
    if case.layout != "contiguous":
        assert not q.is_contiguous()  # (k with one head may still count as contiguous)
    make = rotary_tables if case.tables == "rotary" else random_tables
    cos, sin = make(gen, case.cos_batch, case.cos_seq, case.rotary_dim, dtype)
    grad_q = randn(gen, *q.shape).to(dtype)
    grad_k = randn(gen, *k.shape).to(dtype)
    return q, k, cos, sin, grad_q, grad_k


def run(fn, q, k, cos, sin, grad_q, grad_k, unsqueeze_dim, cast=None):
    """Forward and q/k gradients of fn on fresh leaf copies (optionally cast first)."""
    cast = cast or (lambda t: t)
    q = cast(q.detach()).requires_grad_()
    k = cast(k.detach()).requires_grad_()
    q_out, k_out = fn(q, k, cast(cos), cast(sin), unsqueeze_dim)
    ((q_out * cast(grad_q)).sum() + (k_out * cast(grad_k)).sum()).backward()
    return q_out.detach(), k_out.detach(), q.grad, k.grad


def assert_case(case, dtype, seed):
    q, k, cos, sin, grad_q, grad_k = make_inputs(case, dtype, seed)
    out = run(rope, q, k, cos, sin, grad_q, grad_k, case.unsqueeze_dim)
    assert out[0].shape == q.shape and out[1].shape == k.shape
    assert out[0].dtype == dtype and out[1].dtype == dtype
    assert out[2].dtype == dtype and out[3].dtype == dtype
    if case.layout == "transposed" and use_triton(q):  # the kernels keep a dense layout
        assert out[0].stride() == q.stride()

    ref = run(rope_reference, q, k, cos, sin, grad_q, grad_k, case.unsqueeze_dim)
    exact = run(hf_apply_rotary_pos_emb, q, k, cos, sin, grad_q, grad_k, case.unsqueeze_dim,
                cast=torch.Tensor.double)
    for name, o, r, e in zip(("q_embed", "k_embed", "dq", "dk"), out, ref, exact, strict=True):
        checks.assert_matches_reference(o, r, dtype, name)
        checks.assert_close_to_float64(o, e, dtype, name)


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", checks.DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_forward_and_grads(name, dtype):
    assert_case(CASES[name], dtype, seed=list(CASES).index(name))


def test_head_blocks(monkeypatch):
    """More heads than a program takes: q's three head blocks and k's two, each last one masked."""
    monkeypatch.setattr(rope_module, "_MAX_HEADS", 2)
    monkeypatch.setattr(rope_module, "_blocks", rope_module._blocks.__wrapped__)  # not the cached launches
    assert_case(Case(1, 1, 5, 5, 5, 3, 8, 8, 1, "transposed"), torch.float32, seed=7)


def test_partial_rotary_passes_features_through():
    case = CASES["partial_sliced_gqa"]
    q, k, cos, sin, _, _ = make_inputs(case, torch.float32, seed=3)
    q_out, k_out = rope(q, k, cos, sin, case.unsqueeze_dim)
    assert torch.equal(q_out[..., case.rotary_dim:], q[..., case.rotary_dim:])
    assert torch.equal(k_out[..., case.rotary_dim:], k[..., case.rotary_dim:])


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_matches_transformers_in_same_dtype(dtype):
    """What transformers itself computes in bf16/fp16 (tables cast to the model dtype)."""
    case = CASES["attention_transpose_gqa"]
    q, k, cos, sin, grad_q, grad_k = make_inputs(case, dtype, seed=11)
    out = run(rope, q, k, cos, sin, grad_q, grad_k, case.unsqueeze_dim)
    hf = run(hf_apply_rotary_pos_emb, q, k, cos, sin, grad_q, grad_k, case.unsqueeze_dim)
    for name, o, r in zip(("q_embed", "k_embed", "dq", "dk"), out, hf, strict=True):
        checks.assert_matches_reference(o, r, dtype, name)


def test_float32_tables_with_bf16_inputs():
    case = CASES["bshd_broadcast_batch"]
    q, k, cos, sin, grad_q, grad_k = make_inputs(case, torch.bfloat16, seed=5)
    gen = torch.Generator().manual_seed(5)
    cos, sin = rotary_tables(gen, case.cos_batch, case.cos_seq, case.rotary_dim, torch.float32)
    out = run(rope, q, k, cos, sin, grad_q, grad_k, case.unsqueeze_dim)
    exact = run(hf_apply_rotary_pos_emb, q, k, cos, sin, grad_q, grad_k, case.unsqueeze_dim,
                cast=torch.Tensor.double)
    assert out[0].dtype == torch.bfloat16
    for name, o, e in zip(("q_embed", "k_embed", "dq", "dk"), out, exact, strict=True):
        checks.assert_close_to_float64(o, e, torch.bfloat16, name)


def test_grad_of_q_only():
    """k without grad and k_embed unused: the backward rotates only dq."""
    case = CASES["attention_transpose_gqa"]
    q, k, cos, sin, grad_q, _ = make_inputs(case, torch.float32, seed=13)
    q = q.detach().requires_grad_()
    q_out, k_out = rope(q, k, cos, sin, case.unsqueeze_dim)
    assert not k_out.requires_grad
    (q_out * grad_q).sum().backward()
    q64 = q.detach().double().requires_grad_()
    q_ref, _ = hf_apply_rotary_pos_emb(q64, k.double(), cos.double(), sin.double())
    (q_ref * grad_q.double()).sum().backward()
    checks.assert_close_to_float64(q.grad, q64.grad, torch.float32, "dq")


def test_cos_sin_requiring_grad_fall_back_to_autograd():
    case = CASES["partial_bshd_transposed"]
    q, k, cos, sin, grad_q, grad_k = make_inputs(case, torch.float32, seed=17)

    def grads(fn, cast):
        leaves = [cast(t.detach()).requires_grad_() for t in (q, k, cos, sin)]
        q_out, k_out = fn(*leaves, unsqueeze_dim=case.unsqueeze_dim)
        ((q_out * cast(grad_q)).sum() + (k_out * cast(grad_k)).sum()).backward()
        return [t.grad for t in leaves]

    got = grads(rope, lambda t: t)
    want = grads(hf_apply_rotary_pos_emb, torch.Tensor.double)
    for name, g, w in zip(("dq", "dk", "dcos", "dsin"), got, want, strict=True):
        checks.assert_close_to_float64(g, w, torch.float32, name)


def _inputs(q_shape=(2, 3, 7, 8), k_shape=(2, 1, 7, 8), cos_shape=(2, 7, 8), dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    q, k = randn(gen, *q_shape).to(dtype), randn(gen, *k_shape).to(dtype)
    return q, k, randn(gen, *cos_shape), randn(gen, *cos_shape)


@pytest.mark.parametrize(
    "kwargs, unsqueeze_dim, error, match",
    [
        (dict(cos_shape=(2, 7, 7)), 1, ValueError, "even"),
        (dict(cos_shape=(2, 7, 10)), 1, ValueError, "at most head_dim"),
        (dict(), 3, ValueError, "unsqueeze_dim"),
        (dict(cos_shape=(3, 7, 8)), 1, ValueError, "batch"),
        (dict(cos_shape=(2, 5, 8)), 1, ValueError, "seq length"),
        (dict(cos_shape=(7, 8)), 1, ValueError, "3-D"),
        (dict(q_shape=(2, 3, 7)), 1, ValueError, "4-D"),
        (dict(k_shape=(2, 1, 7, 6)), 1, ValueError, "head_dim"),
        (dict(k_shape=(2, 1, 6, 8)), 1, ValueError, "seq"),
        (dict(dtype=torch.float64), 1, TypeError, "dtype"),
    ],
)
def test_errors(kwargs, unsqueeze_dim, error, match):
    q, k, cos, sin = _inputs(**kwargs)
    with pytest.raises(error, match=match):
        rope(q, k, cos, sin, unsqueeze_dim)


def test_cos_sin_shape_mismatch():
    q, k, cos, sin = _inputs()
    with pytest.raises(ValueError, match="same shape"):
        rope(q, k, cos, sin[:, :, :6])


def test_dispatch():
    """Under the interpreter (or on CUDA) the Triton autograd.Function runs; cos/sin with grad
    take the reference path."""
    q, k, cos, sin = _inputs()
    q.requires_grad_()
    if not use_triton(q):
        pytest.skip("plain CPU tensors without the interpreter use the reference")
    assert type(rope(q, k, cos, sin)[0].grad_fn).__name__ == "_RoPEBackward"
    cos.requires_grad_()
    assert type(rope(q, k, cos, sin)[0].grad_fn).__name__ != "_RoPEBackward"


def test_expanded_upstream_grad():
    """loss = out.sum() hands the backward a stride-0 (expanded) gradient."""
    case = CASES["partial_bshd_transposed"]
    q, k, cos, sin, _, _ = make_inputs(case, torch.float32, seed=19)
    q1, k1 = q.detach().requires_grad_(), k.detach().requires_grad_()
    q_out, k_out = rope(q1, k1, cos, sin, case.unsqueeze_dim)
    (q_out.sum() + k_out.sum()).backward()
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    q_ref, k_ref = hf_apply_rotary_pos_emb(q64, k64, cos.double(), sin.double(), case.unsqueeze_dim)
    (q_ref.sum() + k_ref.sum()).backward()
    checks.assert_close_to_float64(q1.grad, q64.grad, torch.float32, "dq")
    checks.assert_close_to_float64(k1.grad, k64.grad, torch.float32, "dk")
