"""linear_cross_entropy's matmuls one chunk at a time, in the operand orders cuBLAS could be given.

With a frozen weight the op's time over the bare matmuls is its cross-entropy kernels plus what the
matmuls lose by running on chunks of rows. The chunk's hidden gradient ``dlogits @ weight`` is a
long-K product with a small output (rows x hidden); cuBLAS may tile its transpose
``weight.T @ dlogits.T`` (hidden x rows) better, or cut along the vocabulary into a batched product
whose partial sums are then added (split-K by hand). With a trainable weight each chunk also adds
``dlogits.T @ hidden`` into the (vocab x hidden) bfloat16 gradient, a product whose reduction is
only a chunk long and which reads and writes the whole gradient; on short chunks it waits on
memory, so it is also timed beside the hidden gradient (both only read the chunk's logits) on a
second stream, against the two in turn. This times, per shape and chunk size, each chunk product
(the transposed order including its copy back into row-major rows), scaled to the whole batch,
beside the same products over all rows at once.
Run on the GPU: ``python bench/lce_matmul_orders.py --out DIR`` writes
DIR/lce-matmul-orders-<tag>.jsonl.
"""

from __future__ import annotations

import common
import torch

SHAPES = ({"tokens": 8192, "hidden": 4096, "vocab": 128256},
          {"tokens": 16384, "hidden": 3584, "vocab": 152064},
          {"tokens": 8192, "hidden": 2304, "vocab": 262144})
QUICK_SHAPES = ({"tokens": 64, "hidden": 32, "vocab": 504},)
CHUNKS = (128, 256, 512, 1024, 2048)
QUICK_CHUNKS = (16, 32)
# Vocabulary pieces of the hand-made split-K hidden gradient (every listed vocabulary divides by it).
SPLITS = 8


def products(hidden: torch.Tensor, weight: torch.Tensor, dlogits: torch.Tensor, out: torch.Tensor,
             weight_grad: torch.Tensor) -> dict:
    """The chunk products, named, each a call that writes where the op writes."""
    logits = torch.empty_like(dlogits)
    rows, vocab = dlogits.shape
    pieces = torch.empty(SPLITS, rows, weight.shape[1], device=out.device, dtype=out.dtype)

    def hidden_grad_split_k():
        torch.bmm(dlogits.view(rows, SPLITS, vocab // SPLITS).transpose(0, 1),
                  weight.view(SPLITS, vocab // SPLITS, -1), out=pieces)
        torch.sum(pieces, 0, out=out)

    def both_gradients_in_turn():
        torch.mm(dlogits, weight, out=out)
        weight_grad.addmm_(dlogits.t(), hidden)

    side = torch.cuda.Stream() if torch.cuda.is_available() else None

    def both_gradients_side_by_side():
        if side is None:  # no second stream on a CPU: the plumbing runs them in turn
            both_gradients_in_turn()
            return
        main = torch.cuda.current_stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            weight_grad.addmm_(dlogits.t(), hidden)
        torch.mm(dlogits, weight, out=out)
        main.wait_stream(side)

    return {
        "logits": lambda: torch.mm(hidden, weight.t(), out=logits),
        "hidden_grad": lambda: torch.mm(dlogits, weight, out=out),
        "hidden_grad_transposed": lambda: out.copy_(torch.mm(weight.t(), dlogits.t()).t()),
        "hidden_grad_split_k": hidden_grad_split_k,
        "weight_grad_accumulate": lambda: weight_grad.addmm_(dlogits.t(), hidden),
        "both_gradients_in_turn": both_gradients_in_turn,
        "both_gradients_side_by_side": both_gradients_side_by_side,
    }


def main() -> None:
    def more(parser):
        parser.add_argument("--chunks", help=f"rows per chunk, comma list (default {CHUNKS})")
        parser.add_argument("--products", help="only these products, comma list (default all)")

    args, timing = common.sweep_arguments(__doc__.split("\n\n")[0], "lce-matmul-orders",
                                          {"warmup": 25, "rep": 100}, more)
    chunks = tuple(int(c) for c in args.chunks.split(",")) if args.chunks else CHUNKS
    wanted = set(args.products.split(",")) if args.products else None
    for shape in QUICK_SHAPES if args.quick else SHAPES:
        n, h, v = shape["tokens"], shape["hidden"], shape["vocab"]
        dev = common.device()
        weight = torch.randn(v, h, device=dev, dtype=torch.bfloat16) * h**-0.5
        weight_grad = torch.zeros_like(weight)
        for rows in (*(QUICK_CHUNKS if args.quick else chunks), n):
            hidden = torch.randn(rows, h, device=dev, dtype=torch.bfloat16)
            dlogits = torch.randn(rows, v, device=dev, dtype=torch.bfloat16) * 1e-3
            out = torch.empty(rows, h, device=dev, dtype=torch.bfloat16)
            for name, run in products(hidden, weight, dlogits, out, weight_grad).items():
                if wanted is not None and name not in wanted:
                    continue
                ms = common.time_fwd_bwd(run, **timing)
                whole = ms * n / rows  # the batch's worth of chunks (the last one may be short)
                config = {"op": "lce_chunk_matmul", **shape, "chunk_rows": rows, "product": name}
                common.record("torch", config, common.TIME, whole)
                print(f"  {common.shape_text(shape)} rows={rows} {name}: {ms:.3f} ms a chunk, "
                      f"{whole:.2f} ms the batch", flush=True)
            del hidden, dlogits, out
            common.release()


if __name__ == "__main__":
    main()
