"""The Python each op's forward + backward costs the host, with every Triton launch stubbed out.

On a GPU the host's time per call is Python, torch's dispatch and the kernel launches together, and it
moves with the machine (``bench/host_time.py``, ``bench/launch_ab.py``). This takes the launches
out: it runs on a CPU under Triton's interpreter (``TRITON_INTERPRET=1``, so fusetune's and Liger's
ops take their Triton paths on CPU tensors) with every Triton kernel launch replaced by a call that
does nothing, and times ``bench/ops.py``'s forward + backward step of each op at its quick shape
(RoPE with head dim 128) for fusetune and Liger-Kernel. The outputs are garbage; the time is the
Python and torch's CPU dispatch around the launches. Only the ops whose Python reads no kernel
output are timed (the losses read label counts back).

Records: ``python_us_per_call``. Run on a CPU: ``python bench/python_host.py --out FILE``.
"""

from __future__ import annotations

import argparse
import os
import sys
import timeit
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton's kernels

import common  # noqa: E402
import ops  # noqa: E402
import triton.runtime.interpreter as interpreter  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # fusetune from this checkout

OP_NAMES = ("rms_norm", "add_rms_norm", "layer_norm", "swiglu", "geglu", "rope")
SYSTEMS = ("fusetune", "liger")
ROPE_SHAPE = {"batch": 1, "seq": 64, "q_heads": 4, "kv_heads": 2, "head_dim": 128}


def stub_launches() -> None:
    """Every interpreted Triton kernel's launch does nothing from here on."""
    interpreter.InterpretedFunction.__getitem__ = lambda self, grid: (lambda *args, **kwargs: None)


def python_us(op: ops.Op, shape: dict, build, calls: int) -> float:
    run, _ = ops.warm_step(op, shape, op.variants[0], build(), warmup=50)
    return min(timeit.repeat(run, number=calls, repeat=5)) / calls * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON-lines file to write")
    parser.add_argument("--calls", type=int, default=1000)
    args = parser.parse_args()
    common.open_results(args.out)
    stub_launches()
    for name in OP_NAMES:
        op = ops.OPS_BY_NAME[name]
        shape = ROPE_SHAPE if name == "rope" else ops.cases(op, quick=True)[0][0]
        config = ops.config_of(op, shape, op.variants[0])
        for system, build in ops.steps_for(op, None, SYSTEMS).items():
            try:
                us = python_us(op, shape, build, args.calls)
            except Exception as exc:
                common.record(system, config, "python_us_per_call", None, common.describe(exc))
                continue
            common.record(system, config, "python_us_per_call", us)
            print(f"{name} {common.shape_text(config)} {system}: {us:.1f} us", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
