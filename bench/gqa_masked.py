"""Masked grouped-query attention without copying keys and values to every query head?

transformers' SDPA attention function calls ``repeat_kv`` on keys and values whenever a mask is
given, because SDPA's ``enable_gqa`` with a mask falls back to its math kernel. At mllama's
cross-attention (32 query heads, 8 key heads, 4,096 text tokens against 6,404 image tokens) that
copy is 100 MiB a layer, live through the layer's backward, and it sits at the peak of M11's step
(bench/results/profiles). This times, in bf16, forward + backward and the peak memory of:

- ``repeat_kv``: transformers' path (copy, then one SDPA call);
- ``enable_gqa``: one SDPA call with ``enable_gqa=True`` and the mask;
- ``group_views``: one SDPA call per key head, its query heads a view and its key and value a
  stride-0 expanded view (no copy), outputs concatenated;

and checks each against ``repeat_kv``'s output and gradients. Results: ``gqa-masked-<tag>.jsonl``;
metrics ``time_ms`` (median of do_bench), ``peak_mib`` and ``max_error``.

    python -m bench.gqa_masked --out bench/results
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.common import TIME, device, peak_memory_mib, record, release, sweep_arguments, time_fwd_bwd

# (name, batch, query heads, key heads, query tokens, key tokens, head size)
SHAPES = [("mllama_cross", 1, 32, 8, 4096, 6404, 128), ("llama_padded_self", 1, 32, 8, 4096, 4096, 128)]


def _repeat(t: torch.Tensor, groups: int) -> torch.Tensor:
    b, h, s, d = t.shape
    return t[:, :, None].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)


def repeat_kv(q, k, v, mask):
    groups = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, _repeat(k, groups), _repeat(v, groups), attn_mask=mask)


def enable_gqa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def group_views(q, k, v, mask):
    b, heads, _, d = q.shape
    groups = heads // k.shape[1]
    outs = []
    for g in range(k.shape[1]):
        shape = (b, groups, k.shape[2], d)
        outs.append(F.scaled_dot_product_attention(
            q[:, g * groups:(g + 1) * groups], k[:, g:g + 1].expand(shape), v[:, g:g + 1].expand(shape),
            attn_mask=mask))
    return torch.cat(outs, dim=1)


VARIANTS = {"repeat_kv": repeat_kv, "enable_gqa": enable_gqa, "group_views": group_views}


def _inputs(b, h, kvh, t, s, d):
    dtype = torch.bfloat16 if device().type == "cuda" else torch.float32
    q, k, v = (torch.randn(b, n, length, d, device=device(), dtype=dtype, requires_grad=True)
               for n, length in ((h, t), (kvh, s), (kvh, s)))
    allowed = torch.rand(b, 1, t, s, device=device()) < 0.7
    allowed[..., 0] = True  # every query sees a key: no row of only masked scores
    mask = torch.zeros(b, 1, t, s, device=device(), dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return q, k, v, mask, torch.randn(b, h, t, d, device=device(), dtype=dtype)


def _measure(name: str, shape: tuple, timing: dict) -> None:
    """Every variant at one shape, checked against the first (``repeat_kv``)."""
    q, k, v, mask, grad = _inputs(*shape)
    fields = ("batch", "heads", "kv_heads", "tokens", "key_tokens", "head_dim")
    reference = None
    for variant, attention in VARIANTS.items():
        config = {**dict(zip(fields, shape, strict=True)), "op": "gqa_masked", "shape": name,
                  "variant": variant}

        def step(attention=attention):
            attention(q, k, v, mask).backward(grad)

        try:
            for t in (q, k, v):
                t.grad = None
            out = attention(q, k, v, mask)
            out.backward(grad)
            results = [t.detach().clone() for t in (out, q.grad, k.grad, v.grad)]
            reference = reference or results
            error = max((a.float() - r.float()).abs().max().item()
                        for a, r in zip(results, reference, strict=True))
            ms = time_fwd_bwd(step, grad_to_none=[q, k, v], **timing)
            peak = peak_memory_mib(step) if device().type == "cuda" else None
        except (RuntimeError, NotImplementedError) as exc:
            record("torch", config, TIME, None, error=f"{type(exc).__name__}: {exc}"[:300])
            print(f"{name:18s} {variant:12s} failed: {exc}", flush=True)
            continue
        record("torch", config, TIME, ms)
        record("torch", config, "max_error", error)
        if peak is not None:
            record("torch", config, "peak_mib", peak)
        print(f"{name:18s} {variant:12s} {ms:8.3f} ms  peak {peak} MiB  max error {error:.3g}", flush=True)


def main() -> None:
    args, timing = sweep_arguments(__doc__.splitlines()[0], "gqa-masked", {"warmup": 25, "rep": 100})
    for name, *shape in [("tiny", 1, 4, 2, 24, 40, 16)] if args.quick else SHAPES:
        _measure(name, tuple(shape), timing)
        release()


if __name__ == "__main__":
    main()
