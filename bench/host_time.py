"""Host time: what each system's Python and kernel launches cost, and where a step's time is the host's.

Three measurements. The first two use inputs so small that every kernel takes a few
microseconds, so the wall time of a synchronised step is the host's:

- ``layer``: a Llama of tiny width (hidden 256, 4 heads, 64 tokens) with LoRA on the seven
  projections and each system's checkpointing trains at two depths; the difference over the extra
  layers is the host time one decoder layer adds to a step (forward, recompute, backward). Each
  system runs in its own process (Liger patches transformers' classes globally). fusetune's step
  is then profiled with cProfile, its functions listed by own time.
- ``ops``: forward + backward of each memory-bound op at ``ops.py``'s quick shapes, per call, for
  fusetune, Liger, eager PyTorch and torch.compile; fusetune's calls are then profiled with
  cProfile and torch.profiler's CPU table (DIR/host-profile-ops-<tag>.txt).

``fusetune_triton_launch`` (ops) and ``fusetune-triton-launch`` (layer) are fusetune with every
kernel launched through Triton's ``kernel[grid](...)`` each time (``DirectLaunch.enabled`` off), as
before the direct launch path (``fusetune/ops/_direct_launch.py``): the difference is what that path
saves the host.
- ``large`` (GPU only): at the 32,768-token shapes of each norm and of RoPE, the forward + backward time
  ``ops.py`` reports (``do_bench``) beside the sum of the step's kernel times (torch.profiler) and
  the host time of a step left unsynchronised: where the host time exceeds the kernels', the
  benchmark's time is the host's, not the kernels'.

On a full-size L8 step the GPU does ~10 ms of work a layer; a host that needs more than that in
some stretch leaves the GPU idle there (RESULTS.md, "What the host does while the GPU waits").

Run: ``python bench/host_time.py --out DIR [--quick]``; writes DIR/host-<tag>.jsonl and
DIR/host-profile-<tag>.txt.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import json
import pstats
import subprocess
import sys
import time
from pathlib import Path

import common
import e2e
import e2e_models
import ops
import patch_gpu
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # fusetune from this checkout

LAYER_SYSTEMS = ("hf", "liger", "fusetune", "fusetune-nooffload", "fusetune-triton-launch")
DEPTHS = (2, 10)
TOKENS = 64
OP_NAMES = ("rms_norm", "add_rms_norm", "layer_norm", "swiglu", "rope", "cross_entropy")
OP_SYSTEMS = ("fusetune", "fusetune_triton_launch", "liger", "torch_eager")
SYSTEMS = tuple(dict.fromkeys(LAYER_SYSTEMS + OP_SYSTEMS + ("torch_compile",)))


def tiny_llama(layers: int) -> e2e_models.Model:
    """A Llama with ``layers`` decoder layers of hidden 256: the L8 code path at negligible GPU cost."""
    spec = patch_gpu.Spec(f"llama-tiny-{layers}", lambda: patch_gpu._text_config(
        "llama", hidden_size=256, intermediate_size=512, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=1024, max_position_embeddings=1024))
    return e2e_models.Model("L8", spec, "apply_liger_kernel_to_llama")


def step_seconds(system: str, layers: int, steps: int, profile_path: Path | None) -> float:
    """Median wall time of one synchronised training step of ``system`` on the tiny Llama."""
    model = tiny_llama(layers)
    case = e2e.Case(config="L8-4k", variant="bf16_lora", system=system)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    torch.manual_seed(0)
    trained = e2e.prepare(case, model, TOKENS, dtype, None)
    batch = {key: value.to(common.device()) for key, value in patch_gpu.text_inputs(
        1024, batch=1, tokens=TOKENS, seed=0, ignore_fraction=0.0).items()}
    optimizer = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        e2e.train_step(trained, batch, optimizer)

    for _ in range(3):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    if profile_path is not None:
        profile_path.write_text(f"{system}, {layers} layers, {TOKENS} tokens, {common.environment()}\n"
                                f"{_profile_text(step, 5, 40)}")
    return sorted(times)[len(times) // 2]


def _profile_text(step, steps: int, rows: int) -> str:
    """cProfile of ``steps`` calls of ``step``: the ``rows`` functions with the most own time."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    profiler.disable()
    common.synchronize()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).strip_dirs().sort_stats("tottime").print_stats(rows)
    return f"cProfile of {steps} steps\n{text.getvalue()}"


def _torch_profile_text(step, steps: int, rows: int) -> str:
    """torch.profiler's CPU-side table of ``steps`` calls of ``step``: the ``rows`` operators (aten
    ops, autograd nodes, launches) with the most own host time, which cProfile sees only as the
    Python calls that reach them."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        for _ in range(steps):
            step()
        common.synchronize()
    table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
    return f"torch.profiler (CPU) of {steps} steps\n{table}"


def layer_worker(system: str, steps: int, profile_path: Path | None) -> None:
    """Print one JSON line: the step time at each depth (run in a process of its own)."""
    seconds = {}
    with common.launches_through_triton("triton" in system):
        for layers in DEPTHS:
            profile = profile_path if layers == DEPTHS[-1] else None
            seconds[str(layers)] = step_seconds(system, layers, steps, profile)
    print(json.dumps(seconds))


def layer_records(args: argparse.Namespace) -> None:
    """Host milliseconds a decoder layer adds to a step, per system, each in its own process."""
    for system in (s for s in args.systems if s in LAYER_SYSTEMS):
        profile = args.out / f"host-profile-{args.tag}.txt" if system == "fusetune" else None
        command = [sys.executable, __file__, "--worker", system, "--steps", str(args.steps)]
        if profile is not None:
            command += ["--profile", str(profile)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        config = {"op": "decoder_layer_host", "hidden": 256, "tokens": TOKENS, "depths": list(DEPTHS)}
        lines = result.stdout.strip().splitlines()
        if result.returncode != 0 or not lines:
            common.record(system, config, "host_ms_per_layer", None, result.stderr[-300:])
            continue
        seconds = json.loads(lines[-1])
        low, high = (seconds[str(layers)] for layers in DEPTHS)
        per_layer = (high - low) / (DEPTHS[1] - DEPTHS[0]) * 1000
        step_ms = {depth: value * 1000 for depth, value in seconds.items()}
        common.record(system, config, "host_ms_per_layer", per_layer, step_ms=step_ms)
        print(f"{system}: {per_layer:.2f} ms a layer (steps {seconds})", flush=True)


def op_records(args: argparse.Namespace) -> None:
    """Per-call forward + backward wall time of each op at its quick shape (host-bound)."""
    for name in OP_NAMES:
        op = ops.OPS_BY_NAME[name]
        shape, variant = ops.cases(op, quick=True)[0]
        compiled = ops.compiled_eager(op) if "torch_compile" in args.systems else None
        builders = ops.steps_for(op, compiled, tuple(args.systems))
        if "fusetune_triton_launch" in args.systems:
            builders["fusetune_triton_launch"] = ops.steps_for(op, None, ("fusetune",))["fusetune"]
        for system, build in builders.items():
            config = ops.config_of(op, shape, variant)
            try:
                step = build()
                inputs, grad_outputs = op.make(shape, variant)
                with common.launches_through_triton("triton" in system):
                    for _ in range(20):
                        step(inputs, grad_outputs)
                    common.synchronize()
                    start = time.perf_counter()
                    for _ in range(args.calls):
                        step(inputs, grad_outputs)
                    common.synchronize()
                us = (time.perf_counter() - start) / args.calls * 1e6
            except Exception as exc:
                common.record(system, config, "host_us_per_call", None, common.describe(exc))
                continue
            common.record(system, config, "host_us_per_call", us)
            print(f"{name} {system}: {us:.0f} us a forward + backward", flush=True)
            if system == "fusetune":
                call = functools.partial(step, inputs, grad_outputs)
                profiles = (_profile_text(call, args.calls, 30), _torch_profile_text(call, args.calls, 30))
                with (args.out / f"host-profile-ops-{args.tag}.txt").open("a") as out:
                    out.write(f"{name} {common.shape_text(config)}, {args.calls} calls: {profiles[0]}\n"
                              f"{profiles[1]}\n")


LARGE_OPS = ("rms_norm", "add_rms_norm", "layer_norm", "rope")
LARGE_SYSTEMS = ("fusetune", "torch_compile", "liger")
LARGE_TOKENS = 32768  # the "large shapes" of the ops issue's bandwidth target


def unsynchronised_host_ms(step, steps: int = 10) -> float:
    """Host milliseconds per step while the device runs behind (no sync inside the loop)."""
    common.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    host = (time.perf_counter() - start) / steps * 1000
    common.synchronize()
    return host


def large_records(args: argparse.Namespace) -> None:
    """Benchmark time, kernel time and host time of each system's step at each op's largest shape."""
    large = [(ops.OPS_BY_NAME[name], shape, variant) for name in LARGE_OPS
             for shape, variant in ops.cases(ops.OPS_BY_NAME[name], quick=False)
             if LARGE_TOKENS in (shape.get("tokens"), shape.get("seq"))]
    for op, shape, variant in large:
        name = op.name
        config = ops.config_of(op, shape, variant)
        wanted = tuple(s for s in args.systems if s in LARGE_SYSTEMS)
        compiled = ops.compiled_eager(op) if "torch_compile" in wanted else None
        for system, build in ops.steps_for(op, compiled, wanted).items():
            try:
                profile = args.out / f"host-profile-large-{args.tag}.txt" if system == "fusetune" else None
                values = _large_case(op, shape, variant, build(), profile)
            except Exception as exc:
                common.record(system, config, "kernel_ms", None, common.describe(exc))
                continue
            for metric, value in values.items():
                common.record(system, config, metric, value)
            text = ", ".join(f"{k} {v:.3f}" for k, v in values.items())
            print(f"{name} {common.shape_text(config)} {system}: {text}", flush=True)
            common.release()


def _large_case(op: ops.Op, shape: dict, variant: str, system_step, profile_path: Path | None) -> dict:
    step, leaves = ops.warm_step(op, shape, variant, system_step, warmup=3)
    if profile_path is not None:
        with profile_path.open("a") as out:
            out.write(f"{op.name} {common.shape_text(ops.config_of(op, shape, variant))}: "
                      f"{_profile_text(step, 50, 25)}\n")
    return {"benchmark_ms": common.time_fwd_bwd(step, grad_to_none=leaves, warmup=25, rep=100),
            "kernel_ms": common.kernel_ms(step, steps=10), "host_ms": unsynchronised_host_ms(step)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--tag", default="h200")
    parser.add_argument("--quick", action="store_true", help="few steps and calls (plumbing)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"any of {', '.join(SYSTEMS)}")
    parser.add_argument("--parts", default="large,ops,layer", help="any of large, ops, layer")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=20, help=argparse.SUPPRESS)
    parser.add_argument("--profile", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        layer_worker(args.worker, args.steps, args.profile)
        return
    if args.out is None:
        parser.error("--out is required")
    args.systems = [s for s in args.systems.split(",") if s]
    args.steps, args.calls = (3, 5) if args.quick else (20, 300)
    common.open_results(args.out / f"host-{args.tag}.jsonl")
    if "large" in args.parts and torch.cuda.is_available():
        large_records(args)
    if "ops" in args.parts:
        op_records(args)
    if "layer" in args.parts:
        layer_records(args)


if __name__ == "__main__":
    main()
