"""Sliding-window attention: SDPA with the window's mask against flash attention's windowed kernel.

transformers gives a sliding-window layer (Gemma 3's local layers, Mistral's) a bool mask and SDPA
computes every query-key pair of the square; flash attention's window skips the key blocks outside
it. ``fusetune.kept_attention._windowed`` sends such calls to the windowed kernel (through
``fusetune.segment_attention``). This times, in bf16, forward + backward of one layer's attention
at Gemma-3-12B's local layers (16 query heads, 8 key heads of 256, 4,096 tokens, window 1,024):

- ``sdpa_masked``: transformers' path (keys and values repeated to the query heads, SDPA with the mask);
- ``flash_window``: ``segment_attention`` with the window (``varlen_attn``'s ``window_size``);
- ``sdpa_causal``: plain causal SDPA without a window (a global layer), for scale;

and checks the first two against float32 maths (SDPA's math kernel on float32 copies, the mask):
metric ``relative_error`` (the worst of the output's and the three gradients' norm-wise errors).
Results: ``window-attention-<tag>.jsonl``, metrics ``time_ms`` (median of do_bench), ``relative_error``.

    python -m bench.window_attention --out bench/results
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.common import TIME, device, record, release, sweep_arguments, time_fwd_bwd
from fusetune.segment_attention import batch_segments, segment_attention, windowed_causal_mask

# (name, batch, query heads, key heads, tokens, head size, window)
SHAPES = [("gemma3_12b_local", 1, 16, 8, 4096, 256, 1024)]


def _repeat(t: torch.Tensor, groups: int) -> torch.Tensor:
    b, h, s, d = t.shape
    return t[:, :, None].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)


def sdpa_masked(q, k, v, window):
    groups = q.shape[1] // k.shape[1]
    mask = windowed_causal_mask(q.shape[2], window, q.device)
    return F.scaled_dot_product_attention(q, _repeat(k, groups), _repeat(v, groups), attn_mask=mask)


def flash_window(q, k, v, window):
    found = batch_segments(q.shape[0], q.shape[2], q.device)
    return segment_attention(q, k, v, found, window=window).transpose(1, 2)


def sdpa_causal(q, k, v, window):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


VARIANTS = {"sdpa_masked": sdpa_masked, "flash_window": flash_window, "sdpa_causal": sdpa_causal}


def _float32_reference(q, k, v, grad, window) -> list[torch.Tensor]:
    """Output and gradients of the masked attention in float32 with SDPA's math kernel."""
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        out = sdpa_masked(*leaves, window)
    out.backward(grad.float())
    return [out.detach(), *(t.grad for t in leaves)]


def _error(results, reference) -> float:
    return max(float((a.float() - r).norm() / r.norm()) for a, r in zip(results, reference, strict=True))


def _measure(name: str, shape: tuple, timing: dict) -> None:
    b, h, kvh, t, d, window = shape
    dtype = torch.bfloat16 if device().type == "cuda" else torch.float32
    generator = torch.Generator(device=device()).manual_seed(0)
    q, k, v = (torch.randn(b, n, t, d, device=device(), dtype=dtype, generator=generator).requires_grad_()
               for n in (h, kvh, kvh))
    grad = torch.randn(b, h, t, d, device=device(), dtype=dtype, generator=generator)
    reference = _float32_reference(q, k, v, grad, window)
    fields = ("batch", "heads", "kv_heads", "tokens", "head_dim", "window")
    for variant, attention in VARIANTS.items():
        config = {**dict(zip(fields, shape, strict=True)), "op": "window_attention", "shape": name,
                  "variant": variant}

        def step(attention=attention):
            attention(q, k, v, window).backward(grad)

        for leaf in (q, k, v):
            leaf.grad = None
        out = attention(q, k, v, window)
        out.backward(grad)
        error = None
        if variant != "sdpa_causal":
            error = _error([out.detach(), q.grad, k.grad, v.grad], reference)
            record("torch" if variant == "sdpa_masked" else "fusetune", config, "relative_error", error)
        ms = time_fwd_bwd(step, grad_to_none=[q, k, v], **timing)
        record("torch" if variant != "flash_window" else "fusetune", config, TIME, ms)
        shown = "" if error is None else f"  relative error {error:.3g} against float32"
        print(f"{name:18s} {variant:13s} {ms:8.3f} ms{shown}", flush=True)


def main() -> None:
    args, timing = sweep_arguments(__doc__.splitlines()[0], "window-attention", {"warmup": 25, "rep": 100})
    for name, *shape in [("tiny", 1, 4, 2, 40, 16, 8)] if args.quick else SHAPES:
        _measure(name, tuple(shape), timing)
        release()


if __name__ == "__main__":
    main()
