"""Is folding a LoRA projection's B term into its base matmul faster than adding it as a start term?

``fusetune.ops.lora`` computes ``y = x @ W.T + s (x @ A.T) @ B.T`` as two cuBLAS calls: a small
matmul writes the LoRA term into y, then the base matmul adds onto it (a beta=1 epilogue). The
profile of a Llama-3 8B step (bench/results/profiles) puts those start terms at about 10 ms of a
0.33 s step, all bound by writing y. Folded, one matmul over a longer inner dimension does both:
``[x | s xA] @ [W | B].T``, and in backward ``dY @ [W | B]`` gives dX's base part and dY @ B (for the
LoRA gradients) in one call. What the fold costs: the inner dimension grows by r (a partial tile),
x must sit in a (T, K + r) buffer (a copy, unless whatever makes x writes it there) and W in an
(N, K + r) one.

This times, per projection shape of Llama-3 8B at 4,096 tokens (bf16, r=16), the current two-call
forward and backward, the base matmul alone (the floor), and the folded forms, with and without
the copy of x; ``gate_up_shared`` is gate's folded matmul reading columns [0, K + r) of one
(T, K + 2r) buffer holding [x | s xA_gate | s xA_up] (up would read [r, K + 2r)), so that one copy
of x serves both. Results: ``lora-fold-<tag>.jsonl``; metric ``time_ms`` (median of do_bench).

    python -m bench.lora_fold --out bench/results
"""

from __future__ import annotations

import torch

from bench.common import TIME, device, record, sweep_arguments, time_fwd_bwd

# (name, in features K, out features N) of Llama-3 8B's projections.
SHAPES = [("gate_up", 4096, 14336), ("q_o", 4096, 4096), ("k_v", 4096, 1024), ("down", 14336, 4096)]
TOKENS, RANK, SCALE = 4096, 16, 2.0


def _operands(tokens: int, k: int, n: int, rank: int) -> dict[str, torch.Tensor]:
    def rand(*shape):
        return torch.randn(*shape, device=device(), dtype=torch.bfloat16) / shape[-1] ** 0.5

    x, w, a, b, dy = rand(tokens, k), rand(n, k), rand(rank, k), rand(n, rank), rand(tokens, n)
    xa = x @ a.t()
    xw = torch.cat([x, xa * SCALE], dim=1)
    wb = torch.cat([w, b], dim=1)
    shared = torch.cat([x, xa * SCALE, xa * SCALE], dim=1)
    return {"x": x, "w": w, "a": a, "b": b, "dy": dy, "xa": xa, "xw": xw, "wb": wb, "shared": shared}


def _forward_variants(t: dict[str, torch.Tensor]) -> dict[str, object]:
    k = t["x"].shape[1]

    def start_then_base():
        y = torch.empty(t["x"].shape[0], t["w"].shape[0], dtype=t["x"].dtype, device=t["x"].device)
        y.addmm_(t["xa"], t["b"].t(), beta=0, alpha=SCALE)
        return y.addmm_(t["x"], t["w"].t())

    def folded_with_copy():
        t["xw"][:, :k].copy_(t["x"])
        torch.mul(t["xa"], SCALE, out=t["xw"][:, k:])
        return torch.mm(t["xw"], t["wb"].t())

    return {
        "forward_start_then_base": start_then_base,
        "forward_base_only": lambda: torch.mm(t["x"], t["w"].t()),
        "forward_folded": lambda: torch.mm(t["xw"], t["wb"].t()),
        "forward_folded_with_copy": folded_with_copy,
        "forward_gate_up_shared": lambda: torch.mm(t["shared"][:, : k + RANK], t["wb"].t()),
    }


def _backward_variants(t: dict[str, torch.Tensor]) -> dict[str, object]:
    k = t["x"].shape[1]

    def current():
        dxa = torch.empty(t["dy"].shape[0], RANK, dtype=t["dy"].dtype, device=t["dy"].device)
        dxa.addmm_(t["dy"], t["b"], beta=0, alpha=SCALE)
        return torch.mm(dxa, t["a"]).addmm_(t["dy"], t["w"])

    def folded():
        out = torch.mm(t["dy"], t["wb"])  # [dY @ W | dY @ B]
        return out[:, :k].addmm_(out[:, k:], t["a"], alpha=SCALE)

    return {
        "backward_current": current,
        "backward_base_only": lambda: torch.mm(t["dy"], t["w"]),
        "backward_folded": folded,
    }


def main() -> None:
    args, timing = sweep_arguments(__doc__.splitlines()[0], "lora-fold", {"warmup": 25, "rep": 200})
    tokens, shapes = (64, [("tiny", 96, 160)]) if args.quick else (TOKENS, SHAPES)
    for name, k, n in shapes:
        operands = _operands(tokens, k, n, RANK)
        for variant, fn in {**_forward_variants(operands), **_backward_variants(operands)}.items():
            ms = time_fwd_bwd(fn, **timing)
            config = {"op": "lora_projection", "projection": name, "tokens": tokens, "in": k, "out": n,
                      "rank": RANK, "variant": variant}
            record("matmul", config, TIME, ms)
            print(f"{name:8s} {variant:28s} {ms * 1000:8.1f} us", flush=True)
        del operands


if __name__ == "__main__":
    main()
