"""``bench/ops.py``'s step time with the systems interleaved, at the shapes where the host sets it.

Where an op's kernels take 0.05-0.4 ms, ``ops.py``'s step time (``do_bench``'s median of forward +
backward) is mostly the host's, and ``ops.py`` times the systems one after another: the lent
machine's host changes pace by more than the systems differ, so which one wins such a shape moved
from call to call (``bench/RESULTS.md``, the targets table). Here every system's inputs and step
are made first, then each round times every system once with ``ops.py``'s timer (``do_bench``,
``--rep`` ms, L2 flushed, fresh gradients), the order rotating from round to round; a system's time
is the median over the rounds, so all of them saw the same stretches of the host.

Records: ``time_ms`` per system and case, with ``rounds`` (every round's time) and, on fusetune's,
``ratio`` (the fastest of the others over fusetune: above 1, fusetune is faster). The others are
eager PyTorch, torch.compile and Liger-Kernel: at these shapes eager PyTorch's few ATen calls can
take less host time than any fused op's Python. ``--quick`` runs the quick shapes on a CPU
(plumbing).

    python bench/ops_interleaved.py --out bench/results/ops-interleaved-h200.jsonl
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import common
import ops
import torch

SYSTEMS = ("fusetune", "torch_eager", "torch_compile", "liger")
# (op, shape): the shapes of ops.py where fusetune's kernels take under 0.4 ms and a sequential
# run had its step time behind the faster of torch.compile and Liger's
# (ops-h200-standing-{norms-final,rows,rope}.jsonl).
CASES = (
    ("rms_norm", {"tokens": 8192, "hidden": 2048}),
    ("rms_norm", {"tokens": 8192, "hidden": 4096}),
    ("rms_norm", {"tokens": 8192, "hidden": 8192}),
    ("rms_norm", {"tokens": 262144, "hidden": 128}),
    ("add_rms_norm", {"tokens": 8192, "hidden": 2048}),
    ("add_rms_norm", {"tokens": 8192, "hidden": 4096}),
    ("layer_norm", {"tokens": 8192, "hidden": 4096}),
    ("layer_norm", {"tokens": 16384, "hidden": 3840}),
    ("rope", {"batch": 1, "seq": 8192, "q_heads": 32, "kv_heads": 8, "head_dim": 128}),
    ("rope", {"batch": 1, "seq": 32768, "q_heads": 32, "kv_heads": 8, "head_dim": 128}),
)


def interleaved_case(op: ops.Op, shape: dict, systems: tuple[str, ...], rounds: int, rep: float) -> None:
    variant = op.variants[0]
    config = ops.config_of(op, shape, variant)
    compiled = ops.compiled_eager(op) if "torch_compile" in systems else None
    runners = {}
    for system, build in ops.steps_for(op, compiled, systems).items():
        try:
            torch.manual_seed(0)
            runners[system] = ops.warm_step(op, shape, variant, build())
        except Exception as exc:
            common.record(system, config, common.TIME, None, common.describe(exc))
    common.synchronize()
    times = {system: [] for system in runners}
    for index in range(rounds):
        for system in common.rotation(list(runners), index):
            run, leaves = runners[system]
            times[system].append(common.time_fwd_bwd(run, grad_to_none=leaves, warmup=5, rep=rep))
    medians = {system: statistics.median(values) for system, values in times.items()}
    others = [medians[s] for s in medians if s != "fusetune"]
    for system, value in medians.items():
        extra = {"ratio": min(others) / value} if system == "fusetune" and others else {}
        common.record(system, config, common.TIME, value, rounds=times[system], **extra)
    text = ", ".join(f"{system} {value:.3f}" for system, value in medians.items())
    ratio = f" ({min(others) / medians['fusetune']:.3f}x)" if others and "fusetune" in medians else ""
    print(f"{op.name} {common.shape_text(config)}: {text} ms{ratio}", flush=True)
    del runners
    common.release()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON-lines file to write")
    parser.add_argument("--quick", action="store_true", help="the quick shapes on a CPU (plumbing)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma list")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--rep", type=float, default=30.0, help="do_bench's rep, ms, a round")
    args = parser.parse_args()
    common.open_results(args.out)
    systems = tuple(args.systems.split(","))
    if args.quick:
        cases = [(name, ops.cases(ops.OPS_BY_NAME[name], quick=True)[0][0])
                 for name in dict.fromkeys(name for name, _ in CASES)]
        args.rounds, args.rep = 2, 2.0
    else:
        cases = list(CASES)
    for name, shape in cases:
        interleaved_case(ops.OPS_BY_NAME[name], shape, systems, args.rounds, args.rep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
