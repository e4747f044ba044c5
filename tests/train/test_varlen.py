"""``fusetune_varlen`` (``fusetune.train.varlen``): causal attention inside each packed sample.

Against SDPA with the block-diagonal causal mask transformers builds for packed rows and against
float64 per-sample maths, forward and backward. The torch ``varlen_attn`` branch runs on CUDA only:
here its call (boundaries, layout, the causal flag of each torch signature, grouped-query heads, the
scale) is checked through fake ``varlen_attn`` functions that compute with the reference.
"""

from __future__ import annotations

import math

import pytest
import torch

from fusetune import segment_attention as segmented
from fusetune.train import varlen


def qkv(lengths, heads=4, kv_heads=2, dim=8, batch=1, seed=0, dtype=torch.float32):
    """Random ``(batch, heads, tokens, dim)`` query and ``(batch, kv_heads, tokens, dim)`` key/value
    that require grad, for samples of ``lengths`` back to back in each row."""
    generator = torch.Generator().manual_seed(seed)
    tokens = sum(lengths)
    shapes = ((batch, heads, tokens, dim), (batch, kv_heads, tokens, dim), (batch, kv_heads, tokens, dim))
    return [torch.randn(shape, generator=generator, dtype=dtype).requires_grad_() for shape in shapes]


def block_diagonal_sdpa(query, key, value, lengths, scale=None):
    """What transformers' sdpa runs on a packed row: SDPA with a dense block-diagonal causal mask."""
    segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    tokens = len(segment)
    causal = torch.ones(tokens, tokens, dtype=torch.bool).tril()
    mask = causal & (segment[:, None] == segment[None, :])
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)
    return out.transpose(1, 2)  # (batch, tokens, heads, dim), as transformers' attention returns


def float64_reference(query, key, value, lengths, scale=None, window=None):
    """Softmax attention of each sample alone, causal (query i sees keys i - window < j <= i where
    ``window`` is given), in float64: ``(batch, tokens, heads, dim)``."""
    query, key, value = (t.double() for t in (query, key, value))
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scale = scale if scale is not None else query.shape[-1] ** -0.5
    parts, start = [], 0
    for n in lengths:
        q, k, v = (t[:, :, start : start + n] for t in (query, key, value))
        scores = q @ k.transpose(-1, -2) * scale
        hidden = torch.ones(n, n, dtype=torch.bool).triu(1)
        if window is not None:
            hidden |= torch.ones(n, n, dtype=torch.bool).tril(-window)
        scores = scores.masked_fill(hidden, -math.inf)
        parts.append(scores.softmax(-1) @ v)
        start += n
    return torch.cat(parts, dim=2).transpose(1, 2)


class Attention(torch.nn.Module):
    """The attributes transformers' attention functions read off the module."""

    def __init__(self, groups=2):
        super().__init__()
        self.is_causal = True
        self.num_key_value_groups = groups


def run(query, key, value, scale=None, **kwargs):
    out, weights = varlen.attention_forward(
        Attention(query.shape[1] // key.shape[1]), query, key, value, None, scaling=scale, **kwargs
    )
    assert weights is None
    return out


def grads(out, tensors, seed=1):
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    return torch.autograd.grad((out * weight).sum(), tensors)


def positions(lengths):
    return torch.cat([torch.arange(n) for n in lengths])[None]


CASES = {
    "odd lengths, gqa": dict(lengths=(7, 1, 13, 4), heads=4, kv_heads=2),
    "one segment": dict(lengths=(11,), heads=2, kv_heads=2),
    "many segments, mqa": dict(lengths=tuple(range(1, 25)), heads=4, kv_heads=1),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("source", ["cu_seq_lens", "position_ids"])
def test_attention_equals_block_diagonal_sdpa_and_float64(case, source):
    settings = CASES[case]
    lengths = settings["lengths"]
    query, key, value = qkv(lengths, settings["heads"], settings["kv_heads"])
    scale = 0.3
    if source == "cu_seq_lens":
        cu = varlen.cu_seq_lens(lengths)
        kwargs = dict(
            cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths), max_length_k=max(lengths)
        )
    else:
        kwargs = dict(position_ids=positions(lengths))
    out = run(query, key, value, scale=scale, **kwargs)
    expected = block_diagonal_sdpa(query, key, value, lengths, scale=scale)
    doubles = [t.detach().double().requires_grad_() for t in (query, key, value)]
    exact = float64_reference(*doubles, lengths, scale=scale)
    assert out.shape == (1, sum(lengths), settings["heads"], 8)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-6)
    for got, want, wanted_exactly in zip(
        grads(out, (query, key, value)),
        grads(expected, (query, key, value)),
        grads(exact, doubles),
        strict=True,
    ):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.double(), wanted_exactly, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("window", [1, 3, 6])
def test_a_sliding_window_limits_each_sample_as_transformers_does(window):
    """Mistral's and Gemma's sliding_window: query i sees keys i - window < j <= i of its own sample
    (against float64 maths); samples no longer than the window are plain causal ones."""
    lengths = (7, 1, 13, 4)
    query, key, value = qkv(lengths, heads=4, kv_heads=2)
    out = run(query, key, value, position_ids=positions(lengths), sliding_window=window)
    doubles = [t.detach().double().requires_grad_() for t in (query, key, value)]
    exact = float64_reference(*doubles, lengths, window=window)
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads(out, (query, key, value)), grads(exact, doubles), strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    if window == 6:  # the 7- and 13-token samples see less than without the window
        assert not torch.allclose(out, run(query, key, value, position_ids=positions(lengths)), atol=1e-3)


def test_rows_of_a_batch_are_samples_of_their_own():
    """Without boundaries each row of a batch is one causal sample; with position ids restarting
    inside the rows, the samples of every row are kept apart."""
    query, key, value = qkv((6, 5), batch=3)
    out = run(query, key, value)
    for row in range(3):
        alone = float64_reference(query[row : row + 1], key[row : row + 1], value[row : row + 1], [11])
        torch.testing.assert_close(out[row : row + 1].double(), alone, rtol=1e-5, atol=1e-6)
    for restart in (positions((6, 5)).expand(3, -1), positions((6, 5))):  # a row each, or one for all
        out = run(query, key, value, position_ids=restart)
        for row in range(3):
            alone = float64_reference(query[row : row + 1], key[row : row + 1], value[row : row + 1], [6, 5])
            torch.testing.assert_close(out[row : row + 1].double(), alone, rtol=1e-5, atol=1e-6)
    # a model given no position ids makes one row of them, 0 to seq - 1, for the whole batch
    out = run(query, key, value, position_ids=torch.arange(11)[None])
    for row in range(3):
        alone = float64_reference(query[row : row + 1], key[row : row + 1], value[row : row + 1], [11])
        torch.testing.assert_close(out[row : row + 1].double(), alone, rtol=1e-5, atol=1e-6)


def test_masked_or_non_causal_calls_run_sdpa_as_they_would_have():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    query, key, value = qkv((5, 4))
    mask = torch.ones(9, 9, dtype=torch.bool).tril()[None, None]
    mask[..., 3] = False
    module = Attention()
    for kwargs in (dict(attention_mask=mask), dict(attention_mask=None, is_causal=False)):
        out, _ = varlen.attention_forward(module, query, key, value, **kwargs)
        expected, _ = sdpa_attention_forward(module, query, key, value, **kwargs)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    decode, _ = varlen.attention_forward(module, query[:, :, -1:], key, value, None)  # one query, cached keys
    expected, _ = sdpa_attention_forward(module, query[:, :, -1:], key, value, None)
    torch.testing.assert_close(decode, expected, rtol=0, atol=0)


def test_mask_function_builds_no_mask_for_a_plain_row_and_sdpas_otherwise():
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    args = dict(
        batch_size=2, q_length=6, kv_length=6, mask_function=causal_mask_function, allow_is_causal_skip=False
    )
    assert varlen.mask(**args) is None
    assert varlen.mask(**args, attention_mask=torch.ones(2, 6, dtype=torch.bool)) is None
    padded = torch.ones(2, 6, dtype=torch.bool)
    padded[1, :2] = False
    torch.testing.assert_close(
        varlen.mask(**args, attention_mask=padded), sdpa_mask(**args, attention_mask=padded)
    )
    decode = dict(args, q_length=1, q_offset=5)
    assert varlen.mask(**decode) is None or varlen.mask(**decode).shape[-2:] == (1, 6)
    custom = varlen.mask(**args, use_vmap=True)  # transformers' flag for an or/and mask pattern
    torch.testing.assert_close(custom, sdpa_mask(**args, use_vmap=True))


@pytest.fixture(autouse=True)
def no_packed_mask_before(monkeypatch):
    """Each test starts as if the last mask transformers built was of a plain row."""
    monkeypatch.setattr(varlen._last_mask, "packed", False)


def test_a_packed_row_whose_boundaries_do_not_reach_the_attention_is_an_error():
    """transformers found samples in the position ids (its mask function is no longer the plain
    causal one) but the model passes neither boundaries nor positions to its attention."""
    from transformers.masking_utils import and_masks, causal_mask_function

    def same_sample(batch, head, q_idx, kv_idx):
        return (q_idx < 5) == (kv_idx < 5)

    args = dict(batch_size=1, q_length=9, kv_length=9, allow_is_causal_skip=False)
    assert varlen.mask(**args, mask_function=and_masks(causal_mask_function, same_sample)) is None
    query, key, value = qkv((5, 4))
    with pytest.raises(ValueError, match="packed row.*PackingCollator"):
        run(query, key, value)
    out = run(query, key, value, position_ids=positions((5, 4)))  # the positions do reach it
    torch.testing.assert_close(
        out.double(), float64_reference(query, key, value, [5, 4]), rtol=1e-5, atol=1e-6
    )
    assert varlen.mask(**args, mask_function=causal_mask_function) is None  # the next, plain, row
    plain = run(query, key, value)
    torch.testing.assert_close(
        plain.double(), float64_reference(query, key, value, [9]), rtol=1e-5, atol=1e-6
    )


def test_wrong_boundaries_and_unsupported_options_name_the_fix():
    query, key, value = qkv((5, 4))
    with pytest.raises(ValueError, match="rise from 0 to the 9 tokens"):
        run(query, key, value, cu_seq_lens_q=varlen.cu_seq_lens([5, 3]))
    with pytest.raises(ValueError, match="2-D text position ids"):
        run(query, key, value, position_ids=positions((5, 4)).expand(3, 1, -1))
    with pytest.raises(ValueError, match="soft-cap.*use_packed_attention\\(model, 'eager'\\)"):
        run(query, key, value, softcap=30.0)


def test_boundaries_from_positions_and_lengths():
    cu = varlen.boundaries_from_positions(positions((3, 1, 4)))
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 4, 8]
    assert varlen.boundaries_from_positions(torch.arange(5).expand(2, -1)).tolist() == [0, 5, 10]
    assert varlen.cu_seq_lens([2, 5]).tolist() == [0, 2, 7] and varlen.cu_seq_lens([2]).dtype == torch.int32


def test_boundaries_are_read_once_per_tensor(monkeypatch):
    """Every layer gets the same boundary tensors: they are read (a device sync on a GPU) once."""
    reads = []
    real = segmented.read_segments
    monkeypatch.setattr(segmented, "read_segments", lambda *args: reads.append(args[0]) or real(*args))
    query, key, value = qkv((5, 4))
    cu, other = varlen.cu_seq_lens([5, 4]), varlen.cu_seq_lens([5, 4])  # as Trainer moves one tensor twice
    for _ in range(3):
        run(query, key, value, cu_seq_lens_q=cu, cu_seq_lens_k=other)
    assert len(reads) == 2
    position_ids = positions((5, 4))
    for _ in range(3):
        run(query, key, value, position_ids=position_ids)
    assert len(reads) == 3
    with pytest.raises(ValueError, match="cu_seq_lens_q and cu_seq_lens_k must be the same"):
        run(query, key, value, cu_seq_lens_q=cu, cu_seq_lens_k=varlen.cu_seq_lens([4, 5]))


# ------------------------------------------------------------------------------------------------
# The varlen_attn branch, through fakes of each torch signature.


def _fake(signature: str, calls: list):
    """A ``varlen_attn`` with one torch release's signature that records its call and computes
    the reference (non-causal unless asked, as the real one)."""

    def compute(query, key, value, cu_q, cu_k, max_q, max_k, causal, scale, gqa, window_size=None):
        calls.append(
            dict(
                query=query,
                key=key,
                value=value,
                cu_q=cu_q,
                cu_k=cu_k,
                max_q=max_q,
                max_k=max_k,
                causal=causal,
                scale=scale,
                gqa=gqa,
                window_size=window_size,
            )
        )
        if key.shape[1] != query.shape[1] and not gqa:
            raise ValueError("Expect query and key/value to have the same number of heads")
        window = None
        if window_size is not None and window_size[1] == 0 and window_size[0] >= 0:
            window = window_size[0] + 1  # flash attention's (keys behind, keys ahead): causal, windowed
        elif not causal:
            raise AssertionError("varlen_attn was not asked for causal attention")
        as_bhsd = [t.transpose(0, 1)[None] for t in (query, key, value)]
        lengths = cu_q.diff().tolist()
        return float64_reference(*as_bhsd, lengths, scale=scale, window=window)[0].to(query.dtype)

    if signature == "2.10":

        def varlen_attn(
            query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None, scale=None
        ):
            return compute(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal, scale, False)
    elif signature == "2.11":

        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                        window_size=(-1, -1)):
            causal = window_size == (-1, 0)
            return compute(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, causal, scale, False,
                           window_size)
    else:

        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                        window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None,
                        num_splits=None):
            causal = window_size == (-1, 0)
            return compute(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, causal, scale, enable_gqa,
                           window_size)

    return varlen_attn


def test_call_plan_reads_each_torch_signature():
    calls = []
    assert segmented.call_plan(_fake("2.10", calls)) == {
        "causal": {"is_causal": True},
        "full": {"is_causal": False},
        "gqa": False,
        "scale": True,
        "window": False,
    }
    assert segmented.call_plan(_fake("2.11", calls)) == {
        "causal": {"window_size": (-1, 0)},
        "full": {"window_size": (-1, -1)},
        "gqa": False,
        "scale": True,
        "window": True,
    }
    assert segmented.call_plan(_fake("2.13", calls))["gqa"] is True
    assert segmented.call_plan(lambda q, k, v, cu_q, cu_k, max_q, max_k: q) is None
    installed = segmented.varlen_function()
    if installed is not None:  # this torch's own: one of the known forms
        plan = segmented.call_plan(installed)
        assert plan is not None and plan["scale"]


@pytest.mark.parametrize("signature", ["2.10", "2.11", "2.13"])
def test_varlen_branch_arguments_and_result(monkeypatch, signature):
    """On 'CUDA' (the gate forced open), one varlen_attn call for the whole row: (tokens, heads,
    dim) tensors, int32 cumulative lengths, the causal flag and GQA the signature takes, the result
    reshaped back to (batch, tokens, heads, dim)."""
    calls = []
    monkeypatch.setattr(segmented, "varlen_function", lambda: _fake(signature, calls))
    monkeypatch.setattr(segmented, "varlen_usable", lambda query, key, dropout: ("fake",))
    lengths = (5, 2, 9)
    query, key, value = qkv(lengths, heads=4, kv_heads=2)
    cu = varlen.cu_seq_lens(lengths)
    out = run(
        query, key, value, scale=0.25, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=9, max_length_k=9
    )
    (call,) = calls
    assert call["query"].shape == (16, 4, 8) and call["query"].stride(-1) == 1
    assert call["key"].shape == ((16, 2, 8) if signature == "2.13" else (16, 4, 8))
    assert call["cu_q"].dtype == torch.int32 and call["cu_q"].tolist() == [0, 5, 7, 16]
    assert (call["max_q"], call["max_k"], call["causal"], call["scale"]) == (9, 9, True, 0.25)
    assert call["gqa"] is (signature == "2.13")
    torch.testing.assert_close(call["query"], query[0].transpose(0, 1), rtol=0, atol=0)
    torch.testing.assert_close(
        out.double(), float64_reference(query, key, value, lengths, scale=0.25), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("signature", ["2.10", "2.11", "2.13"])
def test_varlen_branch_with_a_sliding_window(monkeypatch, signature):
    """A window shorter than the longest sample reaches varlen_attn as flash attention's
    window_size (window - 1 keys behind, none ahead) where it takes one; torch 2.10's, which has
    no window, is not called: SDPA runs per sample with a windowed mask."""
    calls = []
    monkeypatch.setattr(segmented, "varlen_function", lambda: _fake(signature, calls))
    monkeypatch.setattr(segmented, "varlen_usable", lambda query, key, dropout: ("fake",))
    lengths = (5, 2, 9)
    query, key, value = qkv(lengths, heads=4, kv_heads=2)
    out = run(query, key, value, position_ids=positions(lengths), sliding_window=3)
    if signature == "2.10":
        assert calls == []
    else:
        (call,) = calls
        assert call["window_size"] == (2, 0)
    torch.testing.assert_close(
        out.double(), float64_reference(query, key, value, lengths, window=3), rtol=1e-5, atol=1e-6
    )
    calls.clear()  # a window no sample exceeds: the plain causal call
    run(query, key, value, position_ids=positions(lengths), sliding_window=9)
    assert [call["causal"] for call in calls] == [True]


def test_a_refused_window_leaves_plain_varlen_calls_alone(monkeypatch):
    calls = []
    fake = _fake("2.13", calls)

    def no_windows(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                   enable_gqa=False):
        if window_size not in ((-1, 0), (-1, -1)):
            raise RuntimeError("cuDNN backend does not support window attention.")
        return fake(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale, window_size=window_size,
                    enable_gqa=enable_gqa)

    monkeypatch.setattr(segmented, "varlen_function", lambda: no_windows)
    monkeypatch.setattr(segmented, "varlen_usable", lambda query, key, dropout: ("no windows",))
    monkeypatch.setattr(segmented, "_failed", set())
    lengths = (5, 7)
    query, key, value = qkv(lengths)
    with pytest.warns(UserWarning, match="SDPA runs per segment"):
        out = run(query, key, value, position_ids=positions(lengths), sliding_window=4)
    torch.testing.assert_close(
        out.double(), float64_reference(query, key, value, lengths, window=4), rtol=1e-5, atol=1e-6
    )
    run(query, key, value, position_ids=positions(lengths))
    assert calls and calls[-1]["window_size"] == (-1, 0)  # the plain call still goes to varlen_attn


def test_varlen_branch_flattens_the_rows_of_a_batch(monkeypatch):
    """A batch of two rows, each of two samples (position ids restarting): one call over the four."""
    calls = []
    monkeypatch.setattr(segmented, "varlen_function", lambda: _fake("2.13", calls))
    monkeypatch.setattr(segmented, "varlen_usable", lambda query, key, dropout: ("fake",))
    query, key, value = qkv((3, 4), batch=2)
    out = run(query, key, value, position_ids=positions((3, 4)).expand(2, -1))
    (call,) = calls
    assert call["cu_q"].tolist() == [0, 3, 7, 10, 14] and call["max_q"] == 4 and out.shape == (2, 7, 4, 8)
    for row in range(2):
        alone = float64_reference(query[row : row + 1], key[row : row + 1], value[row : row + 1], [3, 4])
        torch.testing.assert_close(out[row : row + 1].double(), alone, rtol=1e-5, atol=1e-6)


def test_varlen_scale_folds_into_the_query_without_a_scale_argument():
    calls = []
    fake = _fake("2.13", calls)

    def no_scale(
        query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, window_size=(-1, -1), enable_gqa=False
    ):
        return fake(
            query,
            key,
            value,
            cu_seq_q,
            cu_seq_k,
            max_q,
            max_k,
            window_size=window_size,
            enable_gqa=enable_gqa,
        )

    query, key, value = (t.detach()[0].transpose(0, 1) for t in qkv((4, 3), heads=2, kv_heads=2))
    cu = varlen.cu_seq_lens([4, 3])
    out = segmented.varlen_call(no_scale, segmented.call_plan(no_scale), query, key, value, cu, 4, scale=0.2)
    expected = float64_reference(*(t.transpose(0, 1)[None] for t in (query, key, value)), [4, 3], scale=0.2)
    torch.testing.assert_close(out.double(), expected[0], rtol=1e-5, atol=1e-6)


def test_a_refused_varlen_call_falls_back_to_sdpa_per_sample(monkeypatch):
    def refusing(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
        raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.")

    monkeypatch.setattr(segmented, "varlen_function", lambda: refusing)
    monkeypatch.setattr(segmented, "varlen_usable", lambda query, key, dropout: ("refusing",))
    monkeypatch.setattr(segmented, "_failed", set())
    query, key, value = qkv((3, 6))
    with pytest.warns(UserWarning, match="SDPA runs per segment"):
        out = run(query, key, value, position_ids=positions((3, 6)))
    torch.testing.assert_close(
        out.double(), float64_reference(query, key, value, [3, 6]), rtol=1e-5, atol=1e-6
    )


def test_varlen_is_for_cuda_only():
    query = torch.zeros(1, 2, 4, 8, dtype=torch.bfloat16)
    assert segmented.varlen_usable(query, query, 0.0) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: torch's varlen_attn")
@pytest.mark.parametrize("window", [None, 32])
def test_on_cuda_the_varlen_kernel_matches_float64(window):
    """bf16 on the GPU (torch's varlen_attn where it takes the call, SDPA per sample where it
    refuses it) against float64 maths, forward and backward, with and without a sliding window."""
    lengths = (70, 3, 130)
    tensors = qkv(lengths, heads=4, kv_heads=2, dim=64)
    query, key, value = (t.detach().to("cuda", torch.bfloat16).requires_grad_() for t in tensors)
    out = run(query, key, value, position_ids=positions(lengths).cuda(), sliding_window=window)
    doubles = [t.detach().double().requires_grad_() for t in tensors]
    exact = float64_reference(*doubles, lengths, window=window)
    torch.testing.assert_close(out.cpu().double(), exact, rtol=2e-2, atol=2e-2)
    weight = torch.randn(exact.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = torch.autograd.grad((out * weight.to(out)).sum(), (query, key, value))
    want = torch.autograd.grad((exact * weight).sum(), doubles)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.cpu().double(), w, rtol=5e-2, atol=5e-2)
