"""bench/window_attention.py: its variants compute one attention, and its float32 reference is it."""

import torch
import window_attention


def test_the_variants_agree_with_float32_maths_of_the_windowed_mask():
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, 24, 16, generator=generator, dtype=torch.float64) for n in (4, 2, 2))
    grad = torch.randn(1, 4, 24, 16, generator=generator, dtype=torch.float64)
    window = 5
    scores = (q @ window_attention._repeat(k, 2).transpose(-1, -2)) / 4.0  # head size 16
    index = torch.arange(24)
    behind = index[:, None] - index[None, :]
    scores = scores.masked_fill(~((behind >= 0) & (behind < window)), float("-inf"))
    expected = scores.softmax(-1) @ window_attention._repeat(v, 2)
    reference = window_attention._float32_reference(q, k, v, grad, window)
    assert torch.allclose(reference[0].double(), expected, atol=1e-5)
    for variant in ("sdpa_masked", "flash_window"):  # flash_window: its per-segment SDPA on the CPU
        leaves = [t.float().requires_grad_() for t in (q, k, v)]
        out = window_attention.VARIANTS[variant](*leaves, window)
        out.backward(grad.float())
        assert window_attention._error([out.detach(), *(t.grad for t in leaves)], reference) < 1e-5
