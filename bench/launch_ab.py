"""What the direct launch path saves the host: fusetune with and without it, interleaved.

The lent machine's host changes pace from minute to minute, by more than this path saves (a QLoRA
step of one model took 100-123 ms in one process), so separate runs of each path cannot be compared.
Here the same model, or the same op's inputs, runs alternately with every kernel launched directly
(``direct``, the default) and through Triton's ``kernel[grid](...)`` each time (``triton``,
``DirectLaunch.enabled`` off), one step or one block of calls each in turn, and each record pairs
the two medians taken side by side in time:

- ``model``: training steps (forward + backward with the loss, no optimizer, no checkpointing) of
  the Llama of ``bench/compiled_speed.py`` (Llama-3.2-1B's shape, or Llama-3.1-8B's with
  ``--model llama-3.1-8b-shape``; 4,096 tokens, bf16, seeded random weights), patched by
  ``fusetune.apply``, with every parameter trained, LoRA r=16, and QLoRA r=16 (``--params``);
- ``ops``: forward + backward of each op at ``bench/ops.py``'s quick shape (64 tokens: the host's
  time alone), blocks of ``--calls`` calls.

Records: ``time_ms`` (model steps) or ``host_us_per_call`` (ops), per path, with ``ratio`` (triton
over direct) on the direct record. ``--quick`` runs a tiny model and few calls on a CPU (plumbing:
there both paths are the same, since no kernel is compiled).

    python bench/launch_ab.py --out bench/results/launch-ab-h200.jsonl
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import common
import compiled_speed
import ops
import torch

PATHS = ("direct", "triton")
PARAMS = ("all", "lora-r16", "qlora-r16")
MODELS = compiled_speed.SHAPES
OP_NAMES = ("rms_norm", "add_rms_norm", "layer_norm", "swiglu", "geglu", "rope", "cross_entropy",
            "linear_cross_entropy")


def interleaved(run: Callable[[], float], rounds: int) -> dict[str, list[float]]:
    """``run()`` (returns one measurement) ``rounds`` times on each path, the paths alternating and
    the first of each pair switching side every round."""
    values = {path: [] for path in PATHS}
    for index in range(rounds):
        for path in common.rotation(PATHS, index):
            with common.launches_through_triton(path == "triton"):
                values[path].append(run())
    return values


def record_pair(config: dict, metric: str, values: dict[str, list[float]], unit: str) -> None:
    medians = {path: statistics.median(values[path]) for path in PATHS}
    ratio = medians["triton"] / medians["direct"]
    common.record("fusetune", config, metric, medians["direct"], ratio=ratio, runs=len(values["direct"]))
    common.record("fusetune_triton_launch", config, metric, medians["triton"], runs=len(values["triton"]))
    name = config.get("op", config.get("params"))
    print(f"{name} {common.shape_text(config)}: direct {medians['direct']:.1f} {unit}, through Triton "
          f"{medians['triton']:.1f} {unit} ({ratio:.3f}x)", flush=True)


def model_pair(args: argparse.Namespace, params: str, device: torch.device, dtype: torch.dtype) -> None:
    """Interleaved training steps of the patched Llama with ``params`` trained, on both paths."""
    import fusetune

    config = {"model": "tiny-llama" if args.quick else args.model, "tokens": args.tokens,
              "dtype": str(dtype).removeprefix("torch."), "params": params}
    model = compiled_speed.build(args.quick, params, dtype, device, MODELS[args.model])
    fusetune.apply(model)
    inputs = compiled_speed.batch(model, args.tokens, device)

    def step() -> float:
        model.zero_grad(set_to_none=True)
        common.synchronize()
        started = time.perf_counter()
        model(**inputs).loss.backward()
        common.synchronize()
        return (time.perf_counter() - started) * 1000

    for path in PATHS:  # compile every kernel, then settle
        with common.launches_through_triton(path == "triton"):
            for _ in range(2):
                step()
    record_pair(config, common.TIME, interleaved(step, args.rounds), "ms")


def op_pair(args: argparse.Namespace, name: str) -> None:
    """Interleaved blocks of forward + backward calls of one op at its quick shape, on both paths."""
    op = ops.OPS_BY_NAME[name]
    shape, variant = ops.cases(op, quick=True)[0]
    step = ops.steps_for(op, None, ("fusetune",))["fusetune"]()
    inputs, grad_outputs = op.make(shape, variant)

    def block() -> float:
        common.synchronize()
        started = time.perf_counter()
        for _ in range(args.calls):
            step(inputs, grad_outputs)
        common.synchronize()
        return (time.perf_counter() - started) / args.calls * 1e6

    for path in PATHS:
        with common.launches_through_triton(path == "triton"):
            block()
    record_pair(ops.config_of(op, shape, variant), "host_us_per_call", interleaved(block, args.rounds), "us")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON-lines file to write")
    parser.add_argument("--quick", action="store_true", help="tiny model, few calls (plumbing, a CPU)")
    parser.add_argument("--parts", default="ops,model", help="any of ops, model")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--model", default="llama-3.2-1b-shape", choices=sorted(MODELS))
    parser.add_argument("--params", default=",".join(PARAMS), help=f"comma list of {', '.join(PARAMS)}")
    args = parser.parse_args()
    sys.path.insert(0, str(compiled_speed.ROOT))  # fusetune from this checkout
    args.rounds, args.calls = (2, 3) if args.quick else (15, 100)
    if args.quick:
        args.tokens = 32
    common.open_results(args.out)
    device = common.device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if "ops" in args.parts:
        for name in OP_NAMES:
            op_pair(args, name)
    if "model" in args.parts:
        for params in args.params.split(","):
            model_pair(args, params, device, dtype)
            common.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
