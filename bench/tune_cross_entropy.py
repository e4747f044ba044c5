"""Launch configurations of the cross-entropy row kernel, timed on real vocabulary sizes.

The kernel computes each row's loss and its gradient in two passes over the row; whether the second
pass finds the row in L2 decides whether the logits cross HBM two or three times. Each row is split
into segments, one program each, and the last to finish makes the gradient; the segment width, the
vocab block and the warps are swept here on the H200 so the default in
``fusetune/ops/cross_entropy.py`` is measured. The 2,048-row shape is one chunk of
``linear_cross_entropy``, which runs the kernel in place.

History: ``ce-tuning-h200.jsonl`` swept the earlier kernel, one persistent program walking whole
rows (best 2.03-2.06 ms at 8192 x 128256); ``ce-tuning-h200-split*.jsonl`` compared it with the
split kernel in the same calls (1.78-1.87 ms), with and without L2 eviction hints (no difference
beyond 1%), before the persistent kernel and the hints were dropped; in
``ce-tuning-h200-split3.jsonl`` programs that each walked several segments (a persistent split
grid, fewer rows in flight) were 1.3-6x slower, and were dropped too. A resident kernel (each
program held its one-block stretch in registers, waited on its siblings' arrival count and wrote its
own gradient: one read and one write of the logits) was 1.28-1.5x slower than this kernel at every
width, with or without ticket-ordered rows or a back-off in the wait
(``ce-tuning-h200-resident.jsonl``): a program's chain of dependent round trips (ticket, label,
stretch, release, polls, statistics) is not hidden with one or two programs an SM. It was dropped.
Since the ninth session the statistics pass keeps a scalar running max and sum (one exponential an
element instead of two) and the sweep takes wider blocks and 32 warps, as Liger's one-row kernel
does (``ce-tuning-h200-scalar.jsonl``); each setting's kernel time is recorded beside its step time.
Since the sixteenth session the row kernel can also run as a persistent grid (programs walk the
work items in order, so fewer rows are in flight and a row's second read is likelier to hit L2)
with software-pipelined column loops (``RowLaunch.programs_per_sm`` and ``.stages``); the sweep
takes both, and the in-place shapes are the chunks ``linear_cross_entropy`` runs the kernel on.
In the seventeenth session a lagged kernel was swept (``ce-tuning-h200-lagged.jsonl``, 185
settings): a row's gradient was a work item per segment of its own, taken from a ticket counter
some rows (16-256) behind the row's statistics items, so that few rows were read between a
segment's two reads. At 8,192 rows its best setting was 3-5% slower than the tuned launch
(1.62 against 1.57 ms at vocab 128,256): a short lag leaves gradient items waiting on statistics
still in flight (a thousand items are), a long one leaves L2. On 1,024-row in-place chunks it was
5-7% faster (0.249 against 0.269 ms at vocab 152,064), about 0.6% of linear cross-entropy's
time; the kernel was dropped as not worth its synchronisation.
In the eighteenth session ``--kernel deferred`` sweeps the one-pass kernel that linear
cross-entropy now runs on its chunks (``fusetune/ops/deferred_softmax.py``: one read and one write
a row, the softmax's normalisation left to the matmuls), on the chunk shapes, beside the split
kernel's tuned launch on the same chunks. Its first version reduced each block to its max before
writing it (``ce-tuning-h200-deferred-first.jsonl``: 0.44 ms at best against the split kernel's
0.45 at 1024 x 262144); with the next block's load issued before that reduction
(``ce-tuning-h200-deferred-prefetch.jsonl``) 0.90 of the split kernel's time; the loop without
any reduction (each lane's own running max, reduced once a row) is the current one.
The same lane-wise loop in the two-pass kernel's statistics pass (reference from the first block,
each lane's max and sum, reduced once a segment) made that kernel slower, not faster
(``ce-tuning-h200-lanes.jsonl``, ``ops-h200-ce-lanes.jsonl``: at best 1.86 ms at 8192 x 128256
against 1.54-1.57 in earlier calls, 2.10 with the tuned launch against Liger's 1.52 in the same
call): it was reverted, and the statistics pass keeps its scalar running max and sum.
In the nineteenth session a pipelined resident kernel was swept (a persistent grid in which a
group of programs holds a row, a stretch each in registers, and each program loads its next row's
stretch before it waits on its siblings' statistics): 1.46-1.56x slower than the split kernel in
the same call (``ce-tuning-h200-resident-pipelined.jsonl``; bench/RESULTS.md says why). It was
dropped, with its ``--kernel resident`` mode.
In the twentieth session the sweep took the gradient pass's order (``RowLaunch.reverse``: from the
row's last block to its first, so that the bytes read last in the statistics pass, the likeliest
still in L2, are re-read first) and L2 eviction hints (``.l2_hints``) at the three vocabularies
(``ce-tuning-h200-order.jsonl``) and at the few-rows shapes (``--shapes few``,
``ce-tuning-h200-order-few.jsonl``). Backwards with hints was the best setting at every shape:
1.572 -> 1.536 ms at 8192 x 128256, 1.841 -> 1.818 at 152,064, 3.145 -> 3.115 at 262,144;
0.268 -> 0.258 ms at 1024 x 152064, 0.448 -> 0.434 at 1024 x 262144, 0.443 -> 0.427 at
2048 x 128256. Hints alone, forwards, were 0.7-1.1% slower; a persistent grid of one program an SM
(fewer rows in flight) stayed 1.4x slower or worse: too few loads in flight to keep HBM busy.
``--grid keep`` then swept how much of a row the statistics pass asks L2 to keep (its last
``RowLaunch.l2_keep_cols`` columns; the rest are loaded to be evicted first), in two calls
(``ce-tuning-h200-keep*.jsonl``): the last 65,536 columns were the best or within 1% of it at
every shape in both, against keeping all of the row 1.561 -> 1.506 ms at 8192 x 128256,
1.853 -> 1.780 at 152,064, 3.194 -> 3.142 at 262,144 (second call), 1-3% at the few-row shapes;
with the tuned launch 16,384 columns were slower than keeping all, 98,304 in between.
In the twenty-fifth session ``--grid wide`` swept one or two programs an SM that each load
16,384-32,768 columns a step with 16-32 warps (``ce-tuning-h200-wide.jsonl``): at best 1.11-1.20x
slower than the tuned launch (1.744 against 1.506 ms at 8192 x 128256).
Run: ``python bench/tune_cross_entropy.py --out DIR [--kernel deferred]`` (writes
DIR/ce-tuning-<tag>.jsonl).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import common
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # fusetune from this checkout
from fusetune.ops.cross_entropy import RowLaunch, cross_entropy_rows, tuned_launch  # noqa: E402
from fusetune.ops.deferred_softmax import DeferredLaunch, deferred_cross_entropy_rows  # noqa: E402

# --shapes ops: cross_entropy's shapes in bench/ops.py (8,192 rows of Llama 3's, Qwen2.5's and
# Gemma 3's vocabularies), and Llama's once in place, as Liger's kernel writes its gradient.
# --shapes few: up to _FEW_ROWS rows (the tuned launch's other setting), in place, as
# linear_cross_entropy runs the kernel on its chunks where the one-pass kernel does not apply.
SHAPES = {
    "ops": (
        {"tokens": 8192, "vocab": 128256},
        {"tokens": 8192, "vocab": 152064},
        {"tokens": 8192, "vocab": 262144},
        {"tokens": 8192, "vocab": 128256, "in_place": True},
    ),
    "few": (
        {"tokens": 1024, "vocab": 152064, "in_place": True},
        {"tokens": 1024, "vocab": 262144, "in_place": True},
        {"tokens": 2048, "vocab": 128256, "in_place": True},
    ),
}
QUICK_SHAPES = ({"tokens": 16, "vocab": 3000}, {"tokens": 8, "vocab": 3000, "in_place": True})
BLOCKS = (4096, 8192)
WARPS = (8, 16)
PROGRAMS_PER_SM = (0, 1, 2, 4)
STAGES = (None, 3)
# (reverse, l2_hints): the gradient pass's order over the row, and L2 eviction hints.
ORDERS = ((False, False), (True, False), (True, True), (False, True))
QUICK_LAUNCHES = (RowLaunch(1024, 512, 4), RowLaunch(4096, 1024, 4, programs_per_sm=1, stages=2),
                  RowLaunch(1024, 512, 4, reverse=True, l2_hints=True, l2_keep_cols=1024))
# --grid keep: the best settings of the order sweep (backwards, with hints), keeping in L2 only the
# last KEEP_COLS columns a row's statistics pass reads (0: all of them).
KEEP_BASES = (RowLaunch(262144, 8192, 8, reverse=True, l2_hints=True),
              RowLaunch(262144, 8192, 8, programs_per_sm=4, reverse=True, l2_hints=True))
KEEP_COLS = (0, 49152, 65536, 98304)
# --grid wide: a persistent grid of one or two programs an SM, each loading 16,384-32,768 columns a
# step with 16-32 warps, so that few rows are in flight (a row's second read could come from L2)
# and yet each SM has 32-128 KB of loads in flight (the narrower blocks' one-program grid had too
# few to keep HBM busy).
WIDE_LAUNCHES = tuple(
    RowLaunch(262144, block, warps, programs, reverse=True, l2_hints=True, l2_keep_cols=keep)
    for block in (16384, 32768) for warps in (16, 32) for programs in (1, 2) for keep in (0, 65536))

# linear_cross_entropy's chunks: 1,024 rows with a frozen weight, 2,048 with a trainable one.
DEFERRED_SHAPES = tuple({"tokens": rows, "vocab": vocab, "in_place": True}
                        for rows, vocab in ((1024, 152064), (1024, 262144), (2048, 128256), (2048, 262144)))
QUICK_DEFERRED_SHAPES = ({"tokens": 8, "vocab": 3000, "in_place": True},)
DEFERRED_LAUNCHES = tuple(DeferredLaunch(block, warps, programs) for block in (2048, 4096, 8192)
                          for warps in (4, 8, 16, 32) for programs in (0, 4, 8) if block // (32 * warps) >= 2)
QUICK_DEFERRED_LAUNCHES = (DeferredLaunch(512, 4), DeferredLaunch(1024, 4, programs_per_sm=1))


def launches() -> list[RowLaunch]:
    """The split kernel's settings swept: one segment a row (the tuned launch's, up to Gemma's
    vocabulary), each block, warp count, grid, pipelining depth, gradient-pass order and hint."""
    return [RowLaunch(262144, block, warps, programs, stages, reverse, hints) for block in BLOCKS
            for warps in WARPS for programs in PROGRAMS_PER_SM for stages in STAGES
            for reverse, hints in ORDERS]


def keep_launches() -> list[RowLaunch]:
    """The ``--grid keep`` settings: each of KEEP_BASES with each of KEEP_COLS."""
    return [base._replace(l2_keep_cols=keep) for base in KEEP_BASES for keep in KEEP_COLS]


def split_grid(name: str, tokens: int) -> list[RowLaunch]:
    """The split kernel's settings of ``--grid name`` at ``tokens`` rows (``wide``: beside the tuned
    launch, the baseline it must beat)."""
    if name == "full":
        return launches()
    if name == "keep":
        return keep_launches()
    return [tuned_launch(tokens), *WIDE_LAUNCHES]


def split_run(logits, labels, grad, scale, launch):
    """The split kernel's loss and gradient (written to ``grad``) with ``launch``."""
    options = dict(ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None)
    return functools.partial(cross_entropy_rows, logits, labels, grad_scale=scale, grad_out=grad,
                             launch=launch, **options)


def deferred_run(logits, labels, grad, scale, launch):
    """The one-pass kernel's losses and row scales, numerators written over ``logits``. The kernel
    reads hidden rows and the weight only to recompute a row whose logits span over 80 nats, which
    these never do: small stand-ins of the right shapes."""
    del grad  # in place only
    hidden = torch.zeros(logits.shape[0], 64, device=logits.device, dtype=logits.dtype)
    weight = torch.zeros(logits.shape[1], 64, device=logits.device, dtype=logits.dtype)
    return functools.partial(deferred_cross_entropy_rows, logits, hidden, weight, labels, scale,
                             ignore_index=-100, softcap=None, launch=launch)


def sweep_shape(shape: dict, grid, kernel: str, run_of, passes: int, timing: dict) -> None:
    """Time every launch in ``grid`` at one shape (kernel time where CUDA is there), recording each;
    ``passes`` is the number of times a launch moves the logits (for the printed bandwidth)."""
    n, v = shape["tokens"], shape["vocab"]
    logits = torch.randn(n, v, device=common.device(), dtype=torch.bfloat16) * 2
    labels = torch.randint(0, v, (n,), device=logits.device)
    # In place, every timed run overwrites the logits with a gradient (or numerators) that the next
    # one reads as logits: the same bytes move, the values only stay finite.
    grad = logits if shape.get("in_place") else torch.empty_like(logits)
    scale = torch.full((1,), 1.0 / n, device=logits.device)
    reference = reference_grad = None
    if not shape.get("in_place"):  # the split kernel's tuned launch is the reference
        reference, reference_grad = split_run(logits, labels, grad, scale, tuned_launch(n))()
        reference_grad = reference_grad.clone()
    best = None
    for launch in grid:
        config = {"op": "cross_entropy_rows", **shape, "kernel": kernel, **launch._asdict(),
                  "variant": "loss_and_grad"}
        run = run_of(logits, labels, grad, scale, launch)
        try:
            ms = common.time_fwd_bwd(run, **timing)
            kernels = common.kernel_ms(run) if torch.cuda.is_available() else None
        except Exception as exc:  # a configuration the compiler rejects is recorded, not fatal
            common.record("fusetune", config, common.TIME, None, common.describe(exc))
            continue
        if reference is not None:  # the reference's losses and gradient, or the setting is wrong
            losses, run_grad = run()
            error = (losses - reference).abs().max().item()
            grad_error = (run_grad.float() - reference_grad.float()).abs().max().item()
            if error > 1e-4 or grad_error > 1e-2 * reference_grad.float().abs().max().item():
                common.record("fusetune", config, common.TIME, None,
                              f"losses differ by {error:.3g}, gradients by {grad_error:.3g}")
                continue
        common.record("fusetune", config, common.TIME, ms)
        if kernels is not None:
            common.record("fusetune", config, common.KERNEL_TIME, kernels)
        device_ms = ms if kernels is None else kernels  # the kernels' time where it is known
        gbps = passes * n * v * 2 / (device_ms / 1000) / 1e9
        print(f"  {n}x{v} {kernel} launch={launch}: {ms:.3f} ms, kernels {device_ms:.3f} ms "
              f"({gbps:.0f} GB/s if {passes} passes)", flush=True)
        best = min(best or (device_ms, launch), (device_ms, launch), key=lambda pair: pair[0])
    print(f"best {kernel} {n}x{v}: {best}", flush=True)
    common.release()


def main() -> None:
    args, timing = common.sweep_arguments(
        __doc__.split("\n\n")[0], "ce-tuning", {"warmup": 10, "rep": 40},
        lambda parser: (
            parser.add_argument("--kernel", choices=("split", "deferred"), default="split",
                                help="which row kernel to sweep"),
            parser.add_argument("--shapes", choices=tuple(SHAPES), default="ops",
                                help="the split kernel's shapes (see SHAPES)"),
            parser.add_argument("--grid", choices=("full", "keep", "wide"), default="full",
                                help="the split kernel's settings (split_grid)")))
    if torch.cuda.is_available():
        print(f"L2 cache: {torch.cuda.get_device_properties(0).L2_cache_size / 2**20:.0f} MiB", flush=True)
    if args.kernel == "split":
        for shape in QUICK_SHAPES if args.quick else SHAPES[args.shapes]:
            grid = QUICK_LAUNCHES if args.quick else split_grid(args.grid, shape["tokens"])
            sweep_shape(shape, grid, "split", split_run, 3, timing)
        return
    for shape in QUICK_DEFERRED_SHAPES if args.quick else DEFERRED_SHAPES:
        # The split kernel's tuned launch on the same chunk first: the time the new kernel replaces.
        sweep_shape(shape, (tuned_launch(shape["tokens"]),), "split", split_run, 3, timing)
        sweep_shape(shape, QUICK_DEFERRED_LAUNCHES if args.quick else DEFERRED_LAUNCHES, "deferred",
                    deferred_run, 2, timing)


if __name__ == "__main__":
    main()
