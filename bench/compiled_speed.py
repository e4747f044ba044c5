"""A training step of a compiled Llama, with and without fusetune, against the same steps run eagerly.

Since the norms, RoPE and the GLUs launch their kernels through ``torch.library`` custom ops
(``fusetune/ops/_graph_ops.py``), ``torch.compile`` keeps a patched model's layers in one graph; the
fused loss still runs between graphs (one break, at the end). This measures what that is worth. Every
system runs the same model (Llama-3.2-1B's shape: hidden 2,048, 16 layers, vocab 128,256, tied
embeddings; or Llama-3.1-8B's with ``--model llama-3.1-8b-shape``; seeded random weights, bf16,
sdpa; every parameter trained), one row of ``--tokens`` tokens, forward + backward with the loss,
no optimizer:

- ``hf`` / ``hf-compiled``: transformers as it is, eager and ``torch.compile(model)``;
- ``fusetune`` / ``fusetune-compiled``: after ``fusetune.apply(model)``, eager and compiled;
- ``fusetune-triton-launch``: ``fusetune`` with every kernel launched through Triton's
  ``kernel[grid](...)`` each time, as before the direct launch path (``fusetune/ops/_direct_launch.py``);
- ``fusetune-captured``: the eager patched step captured as a CUDA graph (``fusetune.CapturedStep``,
  a GPU only), each step a replay; its peak is the graph's pool (``CapturedStep.pool_bytes``);
- ``fusetune-compiled-breaks``: compiled with the patched ops called as before this change, each
  between compiled graphs (``torch.compiler.disable``): one graph break at every op;
- ``liger`` / ``liger-compiled``: Liger-Kernel's ``apply_liger_kernel_to_llama`` (it patches
  transformers' classes, so these run last).

With ``--lora`` the model is wrapped in PEFT LoRA (r=16, alpha 32, on all seven projections; only
the adapters train) before each system sets it up; ``--qlora`` quantises its linear layers to 4 bits
(``fusetune.quantize_4bit``) first. Compiled, a patched model's LoRA layers then run
the fused ops' maths as plain torch ops inside the graph (``fusetune/patch/lora.py``);
``fusetune-compiled-fused-lora`` runs them through the fused LoRA ops between graphs instead, as
before that change (each attention projection group and MLP one graph break), and
``fusetune-compiled-fused-mlp`` only the MLPs (one break a layer).

Records: ``time_ms`` (median wall time of ``--steps`` steps after ``--warmup``, each ending in the
loss's ``.item()``), with the first step's wall time (``first_step_s``, compiling included) and the
graphs torch.compile made (``compiled_graphs``), and the peak memory a step allocates (``peak_mib``).
With ``--profile DIR`` (a GPU) each system also records ``kernel_ms``, the device time of a step
(kernels, copies and memsets summed, so the gaps where the device waits for the host are left
out), and writes the profiler's table of a step's kernels to ``DIR/compiled-<tag>-<system>.txt``;
with ``--host-profile DIR``, a cProfile of three steps (the host's Python, by own time) to
``DIR/compiled-host-<tag>-<system>.txt``.
``--quick`` runs a tiny model in float32 with ``aot_eager`` on a CPU.

    python bench/compiled_speed.py --out bench/results
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import sys
import time
from pathlib import Path

import common
import torch

ROOT = Path(__file__).resolve().parents[1]
SYSTEMS = ("hf", "hf-compiled", "fusetune", "fusetune-triton-launch", "fusetune-captured",
           "fusetune-compiled", "fusetune-compiled-breaks", "fusetune-compiled-fused-lora",
           "fusetune-compiled-fused-mlp", "liger", "liger-compiled")
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
                tie_word_embeddings=True, rms_norm_eps=1e-5)
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
                rms_norm_eps=1e-5)
SHAPES = {"llama-3.2-1b-shape": LLAMA_1B, "llama-3.1-8b-shape": LLAMA_8B}
TINY = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=257, max_position_embeddings=256, tie_word_embeddings=True)


def build(quick: bool, params: str, dtype: torch.dtype, device: torch.device,
          shape: dict | None = None) -> torch.nn.Module:
    """The Llama of this benchmark (``shape``: another Llama config's fields in place of
    Llama-3.2-1B's) with seeded random weights, in training mode. ``params``:
    "all" trains every parameter; "lora-r16" makes it a PEFT model whose adapters are the trained
    parameters; "qlora-r16" quantises its linear layers to 4 bits first (fusetune's NF4 weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**(TINY if quick else shape or LLAMA_1B), use_cache=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=dtype)
    if params == "qlora-r16":
        from fusetune.quantize import quantize_4bit

        quantize_4bit(model, compute_dtype=dtype)
    if params != "all":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(**LORA, task_type="CAUSAL_LM"))
    return model.train()


def batch(model: torch.nn.Module, tokens: int, device: torch.device) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=generator).to(device)
    return {"input_ids": ids, "labels": ids}


@contextlib.contextmanager
def ops_between_graphs():
    """The patched modules' ops called as they were before they became custom ops: each one run as
    it is between torch.compile's graphs (the benchmark's ``-breaks`` system)."""
    import fusetune.nn.glu as glu_modules
    import fusetune.nn.layer_norm as layer_norm_modules
    import fusetune.nn.rms_norm as rms_norm_modules
    import fusetune.patch.rope as rope_patch

    names = [(rms_norm_modules, "rms_norm"), (layer_norm_modules, "layer_norm"), (glu_modules, "swiglu"),
             (glu_modules, "geglu"), (rope_patch, "rope")]
    saved = [getattr(module, name) for module, name in names]
    for (module, name), op in zip(names, saved, strict=True):
        setattr(module, name, torch.compiler.disable(op))
    try:
        yield
    finally:
        for (module, name), op in zip(names, saved, strict=True):
            setattr(module, name, op)


def fused_lora_between_graphs(model: torch.nn.Module, attention: bool = True) -> None:
    """Route a patched model's LoRA MLPs and (with ``attention``) its LoRA attention projections
    through the fused LoRA ops, between compiled graphs, as before compiled calls took the traced
    path (the benchmark's ``-fused-lora`` and ``-fused-mlp`` systems)."""
    from fusetune.nn.lora import FusedLoraMLP
    from fusetune.patch.lora import _GROUP_ATTR

    for module in model.modules():
        if isinstance(module, FusedLoraMLP):
            module.forward = module._fused_forward
        elif attention and hasattr(module, _GROUP_ATTR):
            module.forward = functools.partial(getattr(module, _GROUP_ATTR).output, module)


def prepare(system: str, model: torch.nn.Module, backend: str):
    """``model`` set up as ``system`` runs it: the callable a step calls."""
    torch._dynamo.utils.counters.clear()  # the graph count is this system's
    if system.startswith("fusetune"):
        import fusetune

        fusetune.apply(model)
        if system.endswith(("-fused-lora", "-fused-mlp")):
            fused_lora_between_graphs(model, attention=system.endswith("-fused-lora"))
    elif system.startswith("liger"):
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        # Liger patches a model instance's modules: the transformers model inside a PEFT wrapper.
        apply_liger_kernel_to_llama(model=getattr(model, "get_base_model", lambda: model)())
    if "-compiled" in system:
        torch._dynamo.reset()
        return torch.compile(model, backend=backend)
    return model


def profile_steps(step, table: Path, steps: int = 3) -> float:
    """Device milliseconds a step of ``step`` takes (the profiler's kernels, copies and memsets
    summed); the profiler's table, by device time, goes to ``table``. The table also has the host
    ops that launched the kernels, each with its kernels' time; the sum counts the kernels only."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    common.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages()
    table.parent.mkdir(parents=True, exist_ok=True)
    table.write_text(events.table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=90))
    on_device = (event.self_device_time_total for event in events if event.device_type == DeviceType.CUDA)
    return sum(on_device) / steps / 1000


def host_profile_steps(step, table: Path, steps: int = 3) -> None:
    """cProfile of ``steps`` steps of ``step``: the 45 functions with the most own time (file names
    without their folders) go to ``table``."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    profiler.disable()
    with table.open("w") as out:
        pstats.Stats(profiler, stream=out).strip_dirs().sort_stats("tottime").print_stats(45)


def measure(system: str, args: argparse.Namespace, backend: str, dtype: torch.dtype,
            device: torch.device) -> None:
    """Build, set up and time one system; its records."""
    config = {"model": "tiny-llama" if args.quick else args.model, "tokens": args.tokens,
              "dtype": str(dtype).removeprefix("torch."), "backend": backend,
              "params": "qlora-r16" if args.qlora else "lora-r16" if args.lora else "all"}
    model = build(args.quick, config["params"], dtype, device, SHAPES[args.model])
    inputs = batch(model, args.tokens, device)
    called = prepare(system, model, backend)

    def step() -> float:
        model.zero_grad(set_to_none=True)
        loss = called(**inputs).loss
        loss.backward()
        return loss.item()

    captured = None
    if system == "fusetune-captured":
        from fusetune.graphs import CapturedStep

        captured = CapturedStep(model, lambda batch: called(**batch).loss, inputs)

        def step() -> float:
            model.zero_grad(set_to_none=True)
            return captured(inputs).item()

    breaks = ops_between_graphs() if system.endswith("-breaks") else contextlib.nullcontext()
    with breaks, common.launches_through_triton(system.endswith("-triton-launch")):
        started = time.perf_counter()
        loss = step()
        first = time.perf_counter() - started
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]  # 0 when not compiled
        for _ in range(args.warmup):
            step()
        times, peak = [], None
        for _ in range(args.steps):
            common.synchronize()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            started = time.perf_counter()
            step()  # loss.item() waits for the device
            times.append((time.perf_counter() - started) * 1000)
            if captured is not None:
                peak = captured.pool_bytes() / common.MIB  # a replay allocates nothing of its own
            elif device.type == "cuda":
                peak = (torch.cuda.max_memory_allocated() - before) / common.MIB
        kernel = None
        if args.profile is not None:
            kernel = profile_steps(step, args.profile / f"compiled-{args.tag}-{system}.txt")
        if args.host_profile is not None:
            host_profile_steps(step, args.host_profile / f"compiled-host-{args.tag}-{system}.txt")
    ms = statistics.median(times)
    common.record(system, config, common.TIME, ms, first_step_s=first, loss=loss, steps=args.steps,
                  compiled_graphs=graphs)
    if peak is not None:
        common.record(system, config, common.MEMORY, peak)
    if kernel is not None:
        common.record(system, config, common.KERNEL_TIME, kernel)
        print(f"{system:26s} kernels {kernel:9.2f} ms a step", flush=True)
    print(f"{system:26s} {ms:9.2f} ms, first {first:6.1f} s, {graphs} graphs, loss {loss:.4f}, "
          f"peak {peak} MiB", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the JSON lines")
    parser.add_argument("--tag", default="h200", help="results file is compiled-speed-<tag>.jsonl")
    parser.add_argument("--quick", action="store_true", help="tiny model, float32, aot_eager (a CPU)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma list of " + ", ".join(SYSTEMS))
    parser.add_argument("--lora", action="store_true", help="PEFT LoRA r=16 on every projection")
    parser.add_argument("--qlora", action="store_true", help="the same LoRA over 4-bit (NF4) base weights")
    parser.add_argument("--profile", type=Path, help="directory for each system's kernel table (a GPU)")
    parser.add_argument("--host-profile", type=Path, help="directory for each system's cProfile of 3 steps")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--model", default="llama-3.2-1b-shape", choices=sorted(SHAPES),
                        help="the Llama shape (default Llama-3.2-1B's)")
    parser.add_argument("--warmup", type=int, default=2, help="steps after the first before timing")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))  # fusetune from this checkout
    systems = args.systems.split(",")
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        parser.error(f"unknown systems {unknown}; choose from {', '.join(SYSTEMS)}")
    # Liger patches transformers' classes for every later model: its systems go last.
    systems.sort(key=lambda name: name.startswith("liger"))
    cuda = torch.cuda.is_available() and not args.quick
    device = torch.device("cuda" if cuda else "cpu")
    dtype, backend = (torch.bfloat16, "inductor") if cuda else (torch.float32, "aot_eager")
    path = common.open_results(args.out / f"compiled-speed-{args.tag}.jsonl")
    print(f"environment: {common.environment()}\nresults: {path}", flush=True)
    for system in systems:
        try:
            measure(system, args, backend, dtype, device)
        except Exception as exc:  # one system's failure is recorded; the others still run
            common.record(system, {"tokens": args.tokens}, common.TIME, None, common.describe(exc))
            print(f"{system}: {common.describe(exc)}", flush=True)
        common.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
