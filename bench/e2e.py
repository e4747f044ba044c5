"""End-to-end LoRA / QLoRA fine-tuning steps of full-size models: HF + PEFT, + Liger, Unsloth, fusetune.

    python bench/e2e.py --out FILE [--configs L8-4k,L8-16k,Q7VL,M11,G12,Q7VL-padded,Q7VL-packed]
                        [--systems hf,liger,unsloth,fusetune,fusetune-graph] [--variants bf16_lora,qlora]
                        [--steps 3,8] [--timeout 420] [--budget S] [--tiny] [--profile DIR] [--memory DIR]
                        [--cache DIR] [--keep-folders] [--logs DIR]
    python bench/e2e.py --max-context --out FILE [--configs L8-4k] [--systems ...] [--steps 1,1]
                        [--start 4096] [--ceiling 262144] [--resolution 1024] [--timeout S] [--budget S]

Each (configuration, variant, system) runs in its own process (``--worker``), which prints one line
``E2E-RESULT [records]``; a worker that runs out of memory, crashes or passes ``--timeout`` seconds
gets records with value null and an ``error`` (the exception, the last line of its log, or the
timeout), and the next one starts. Records are appended to FILE after every worker (never
truncated: several calls can fill one file; the report takes the last record of a case). ``--budget``
caps the whole call: a worker gets at most the seconds left, and a case that no longer has a minute
is recorded as not run. Every worker's output goes to ``--logs`` (default: FILE's name + ``-logs``).

Protocol (bench/e2e_models.py builds the models and batches): random bf16 weights, identical in
every worker (seeded, built on the device); LoRA r=16, alpha=16, dropout 0, float32 adapters, on
q,k,v,o,gate,up,down of the language model; SDPA; batch 1; forward under bf16 autocast; torch AdamW
(lr 1e-4) on the LoRA parameters; gradient checkpointing; ``--steps`` warm-up and timed steps, each
timed by wall clock between CUDA synchronisations. Systems:

- ``hf``: transformers + ``peft.get_peft_model``; transformers' non-reentrant checkpointing.
- ``liger``: ``liger_kernel.transformers.apply_liger_kernel_to_<model>()`` (default flags) first, then as hf.
- ``unsloth``: ``FastLanguageModel`` / ``FastVisionModel.from_pretrained`` of a saved folder of the
  same weights (built once per model under ``--cache`` by ``--save-model``, deleted after the model's
  cases unless ``--keep-folders``), their ``get_peft_model`` with the same LoRA settings and
  ``use_gradient_checkpointing="unsloth"``; 4-bit through ``load_in_4bit=True``.
- ``fusetune``: ``peft.get_peft_model``, ``fusetune.apply``, ``enable_checkpointing(offload=True)``
  (which keeps each layer's attention output for the recompute, and, in a captured step, its
  attention projections' outputs; ``--recompute-attention`` turns the first off, the records
  saying ``"keep_attention": false``, and ``--keep-projections always|never`` sets the second for
  every step, the records saying ``"keep_projections": true|false``);
  ``fusetune-nooffload`` is the same with ``offload=False`` (its records say ``"offload": false``);
  ``fusetune-graph`` is ``fusetune`` with each step's forward and backward replayed as a CUDA graph
  (``fusetune.CapturedStep``, captured on the first batch; its records say ``"graph": true``).
- ``qlora``: every system but Unsloth quantizes the built model with ``fusetune.quantize.quantize_4bit``
  (bitsandbytes NF4, double quantization, bf16 compute; ``lm_head`` kept) before PEFT, without
  PEFT's ``prepare_model_for_kbit_training`` (which would upcast the norms to float32).

Records (bench/common.py): system hf|liger|unsloth|fusetune; config {"model", "tokens", "variant"};
metrics tokens_per_s (language-model tokens over the timed steps; ``step_s`` keeps every step's
seconds, warm-up included, for the variance study), static_gib (allocated before the first step:
weights and adapters), peak_allocated_gib (the highest step; ``step_peaks_gib`` each step's, warm-up
included), peak_reserved_gib, loss (step 1; ``losses`` all steps:
step 1 runs identical weights and batch in every system, so its loss must agree), mfu (see
``e2e_models.flops_per_token``; against the H200's 989 TFLOP/s dense bf16). ``--profile DIR`` runs
one more step under ``torch.profiler``, saves its Chrome trace in DIR and prints the top operators by
host and by device time; ``--memory DIR`` records CUDA memory history over the first step and over one
more step after the run, and writes what is allocated at each one's peak (``bench/memory_peak.py``):
``DIR/<case>-first-step.txt`` (the first step makes one-off allocations, and its peak counts in
peak_allocated_gib) and ``DIR/<case>.txt`` (a steady step). ``--tiny`` runs tiny models of the same
architectures (on a CPU too).

Mixed lengths (``Q7VL-padded``, ``Q7VL-packed``; ``e2e_models.step_batches``): warm-up + timed steps of
8 seeded samples each (one image of 224 to 896 pixels a side and 128 to 2,048 text tokens), the same
samples in the same order, padded to the step's longest or packed into one row by
``fusetune.train.packing.pack`` (positions restarting per sample, no attention mask). Their config
has ``mode`` padded|packed and ``batch``; tokens_per_s counts real (non-pad) tokens (``real_tokens``
and ``batch_tokens`` per step), loss is the mean over all steps (packing is exact, so both layouts
should agree), mfu counts each sample's own FLOPs.

``--max-context`` searches, per system and variant, the longest batch-1 length of each configuration's
model that trains (``search_context``): one worker per probe (``--steps`` 1,1 by default) at
``--start``, twice that, ... up to ``--ceiling``, until one fails (out of memory, another error, or
``--timeout``), then bisection to ``--resolution`` tokens (1/64 of the defaults with --tiny). One
record: metric max_context_tokens, config mode max_context, ``probes`` [[tokens, "ok" or the
error]], ``complete`` (False when --budget ran out; the same command again resumes from the
probes already in FILE), ``at_max`` (the longest passing probe's metrics), ``probe_metrics``
[[tokens, metrics]] of every passing probe, start, ceiling, resolution. Each probe's metrics add the
device's and the host's total memory and the worker's peak host memory over its steps
(``device_total_gib``, ``host_total_gib``, ``host_peak_gib``): bench/report.py projects the longest
context past --ceiling from them, a labelled linear extrapolation, not a measured length.
``--oom-above N`` (--tiny only) makes workers past N tokens raise out-of-memory, to exercise the
search on a CPU.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import common
import e2e_models
import memory_peak
import patch_gpu
import report
import torch

HERE = Path(__file__).resolve().parent
RESULT = "E2E-RESULT "
METRICS = ("tokens_per_s", "static_gib", "peak_allocated_gib", "peak_reserved_gib", "loss", "mfu")
SYSTEMS = ("hf", "liger", "unsloth", "fusetune", "fusetune-nooffload", "fusetune-graph")
# --keep-projections: enable_checkpointing's keep_projections (None: kept in captured steps only).
KEEP_PROJECTIONS = {"auto": None, "always": True, "never": False}
VARIANTS = ("bf16_lora", "qlora")
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "UNSLOTH_DISABLE_STATISTICS": "1"}
PACKAGES = {"hf": "peft", "liger": "liger-kernel", "unsloth": "unsloth"}  # each system's version
MIN_WORKER_S = 60  # with less of --budget left, a case is recorded as not run
GIB = 2**30
LORA = dict(r=16, lora_alpha=16, lora_dropout=0.0, bias="none")
CONTEXT = (4096, 262144, 1024)  # --max-context's default start, ceiling and resolution (1/64 when tiny)
MEMORY_FIELDS = ("device_total_gib", "host_total_gib", "host_peak_gib")  # every record's; see memory_fields


@dataclass(frozen=True)
class Case:
    """One worker: a configuration name (``L8-4k``), a variant and a system as given to --systems;
    ``tokens`` (a --max-context probe) replaces the configuration's length."""

    config: str
    variant: str
    system: str
    tokens: int | None = None
    recompute_attention: bool = False  # fusetune: enable_checkpointing(keep_attention=False)
    keep_projections: str = "auto"  # fusetune: enable_checkpointing's keep_projections, KEEP_PROJECTIONS

    @property
    def model(self) -> str:
        return e2e_models.model_of(self.config)

    @property
    def layout(self) -> str | None:
        """"padded" or "packed" for a mixed-length configuration, else None."""
        return e2e_models.MIXED[self.config][1] if self.config in e2e_models.MIXED else None

    @property
    def slug(self) -> str:
        slug = f"{self.config}-{self.variant}-{self.system}"
        return slug if self.tokens is None else f"{slug}-{self.tokens}"

    def record_system(self) -> str:
        return self.system.split("-")[0]

    def record_config(self, tiny: bool, mode: str | None = None) -> dict:
        """The records' config: the model, its tokens or its ``mode`` (padded or packed with the
        samples a step, or ``max_context`` when given), the variant, and the flags that set it apart."""
        mode = mode or self.layout
        config = {"model": self.model}
        if mode is None:
            config["tokens"] = self.tokens or e2e_models.tokens_of(self.config, tiny)
        else:
            config["mode"] = mode
        if self.layout and mode == self.layout:
            config["batch"] = e2e_models.mixed_batch_size(tiny)
        config["variant"] = self.variant
        if self.system == "fusetune-nooffload":
            config["offload"] = False
        if self.system == "fusetune-graph":
            config["graph"] = True
        if self.recompute_attention and self.system.startswith("fusetune"):
            config["keep_attention"] = False
        if KEEP_PROJECTIONS[self.keep_projections] is not None and self.system.startswith("fusetune"):
            config["keep_projections"] = KEEP_PROJECTIONS[self.keep_projections]
        if tiny:
            config["tiny"] = True
        return config


def failed(case: Case, tiny: bool, error: str) -> list[dict]:
    """Records with value null and ``error`` for every metric of ``case``."""
    return [common.record(case.record_system(), case.record_config(tiny), metric, None, error)
            for metric in METRICS]


# ------------------------------------------------------------------------------------------------
# The worker: one case in this process.


def _version(distribution: str | None) -> str | None:
    try:
        return importlib.metadata.version(distribution) if distribution else None
    except importlib.metadata.PackageNotFoundError:
        return None


def unsloth_model(case: Case, model: e2e_models.Model, tokens: int, folder: Path) -> torch.nn.Module:
    """Unsloth's model from the saved folder with its LoRA and its default ("unsloth") checkpointing."""
    import unsloth

    loader = unsloth.FastVisionModel if model.vlm else unsloth.FastLanguageModel
    loaded, _ = loader.from_pretrained(str(folder), max_seq_length=tokens, dtype=torch.bfloat16,
                                       load_in_4bit=case.variant == "qlora", local_files_only=True,
                                       use_exact_model_name=True)
    settings = dict(LORA, use_gradient_checkpointing="unsloth", random_state=e2e_models.SEED)
    if model.vlm:
        peft_model = loader.get_peft_model(loaded, finetune_vision_layers=False,
                                           finetune_language_layers=True, finetune_attention_modules=True,
                                           finetune_mlp_modules=True, **settings)
    else:
        peft_model = loader.get_peft_model(loaded, target_modules=list(e2e_models.LORA_TARGETS), **settings)
    loader.for_training(peft_model)
    return peft_model


def prepare(case: Case, model: e2e_models.Model, tokens: int, dtype: torch.dtype,
            folder: Path | None) -> torch.nn.Module:
    """The model of ``case`` with its LoRA adapters and checkpointing, ready for training steps."""
    if case.system == "unsloth":
        if folder is None:
            raise ValueError("the unsloth system needs --folder (a saved model)")
        return unsloth_model(case, model, tokens, folder)
    if case.system == "liger":
        import liger_kernel.transformers as liger

        getattr(liger, model.liger)()
    import peft

    built = e2e_models.build(model, dtype)
    if case.layout == "packed" and case.system.startswith("fusetune"):
        # fusetune_varlen on the language model (the vision tower keeps sdpa): each packed sample's
        # attention on its own, from the row's cu_seq_lens, instead of sdpa's (row x row) mask.
        e2e_models.use_packed_attention(built)
    if case.variant == "qlora":
        from fusetune.quantize import quantize_4bit

        quantize_4bit(built, compute_dtype=dtype)
    if case.system in ("hf", "liger"):
        built.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = peft.LoraConfig(**LORA, target_modules=e2e_models.lora_targets(model), task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(built, lora)
    if case.system.startswith("fusetune"):
        import fusetune
        from fusetune.checkpointing import enable_checkpointing

        fusetune.apply(peft_model)
        enable_checkpointing(peft_model, offload=case.system != "fusetune-nooffload",
                             keep_attention=not case.recompute_attention,
                             keep_projections=KEEP_PROJECTIONS[case.keep_projections])
    return peft_model


def forward_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """The model's loss on ``batch``, under bf16 autocast on CUDA."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.cuda.is_available()):
        return model(**batch, use_cache=False).loss


def train_step(model: torch.nn.Module, batch: dict, optimizer: torch.optim.Optimizer) -> float:
    """One forward (bf16 autocast on CUDA), backward and AdamW step; the loss, after a full sync."""
    loss = forward_loss(model, batch)
    loss.backward()
    return optimizer_step(optimizer, loss)


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> float:
    """AdamW's step on the gradients backward left, then the loss after a full sync."""
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    common.synchronize()
    return loss.item()


class GraphTrainStep:
    """``fusetune-graph``'s step: a ``fusetune.CapturedStep`` made on the first batch (its warm-up
    steps and capture count in that step's time and memory) and replayed for each batch, then the
    same AdamW step as :func:`train_step`. ``pool_gib``: the graph's pool once captured."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer
        self.captured = None
        self.pool_gib: float | None = None

    def __call__(self, batch: dict) -> float:
        if self.captured is None:
            from fusetune.graphs import CapturedStep

            self.captured = CapturedStep(self.model, functools.partial(forward_loss, self.model), batch)
            self.pool_gib = self.captured.pool_bytes() / GIB
        return optimizer_step(self.optimizer, self.captured(batch))


def step_function(case: Case, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    """``step(batch) -> loss`` for ``case``: :func:`train_step`, or a :class:`GraphTrainStep`."""
    if case.system == "fusetune-graph":
        return GraphTrainStep(model, optimizer)
    return functools.partial(train_step, model, optimizer=optimizer)


def profile_step(step, trace: Path) -> None:
    """One more step under torch.profiler: its Chrome trace to ``trace``, the top operators printed
    by host time and (on CUDA) by device time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, record_shapes=True) as prof:
        step()
    trace.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(trace))
    averages = prof.key_averages()
    print(f"profile: trace {trace}\ntop operators by host (self CPU) time:\n"
          f"{averages.table(sort_by='self_cpu_time_total', row_limit=25)}")
    if torch.cuda.is_available():
        table = averages.table(sort_by="self_device_time_total", row_limit=25)
        print(f"top operators by device time:\n{table}")


def reset_host_peak() -> None:
    """Restart this process's peak resident memory (``ru_maxrss``) from its current size, so that
    host_peak_gib measures the steps rather than the model's loading (Linux; elsewhere a no-op)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def memory_fields(cuda: bool) -> dict:
    """GiB of the device's memory (None without CUDA), of the host's (the cgroup's limit where lower)
    and of this process's peak resident memory since :func:`reset_host_peak` (``ru_maxrss``: KiB on Linux)."""
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        host = min(host, int(Path("/sys/fs/cgroup/memory.max").read_text()))
    except (OSError, ValueError):  # no cgroup v2 limit, or "max"
        pass
    device = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory if cuda else None
    return {"device_total_gib": None if device is None else device / GIB, "host_total_gib": host / GIB,
            "host_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB}


def measure(case: Case, args: argparse.Namespace) -> list[dict]:
    """Build, warm up and time ``case``; its records."""
    model = e2e_models.models(args.tiny)[case.model]
    warmup, timed = args.steps
    steps = e2e_models.step_batches(model, case.config, warmup + timed, args.tiny, case.tokens)
    longest = max(batch["input_ids"].shape[1] for batch, _ in steps)
    if args.oom_above is not None and longest > args.oom_above:
        raise torch.OutOfMemoryError(f"simulated: {longest} tokens is past --oom-above {args.oom_above}")
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    trained = prepare(case, model, longest, dtype, args.folder)
    trainable = [p for p in trained.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    step = step_function(case, trained, optimizer)
    common.synchronize()
    static = torch.cuda.memory_allocated() if cuda else None
    reset_host_peak()
    losses, seconds, step_peaks, reserved_peaks = [], [], [], []
    for index, (cpu_batch, _) in enumerate(steps):
        batch = patch_gpu.to_device(cpu_batch, dtype)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        if index == 0 and args.memory and cuda:  # a warm-up step: the recording's cost is not timed
            losses.append(memory_peak.record_step(functools.partial(step, batch),
                                                  args.memory / f"{case.slug}-first-step.txt",
                                                  f"{case.slug} ({case.system}), first step"))
        else:
            losses.append(step(batch))
        seconds.append(time.perf_counter() - start)
        if cuda:
            step_peaks.append(torch.cuda.max_memory_allocated() / GIB)
            reserved_peaks.append(torch.cuda.max_memory_reserved() / GIB)
    real = [sum(lengths) for _, lengths in steps]
    flops = [e2e_models.step_flops(model, lengths) for _, lengths in steps]
    timed_s = sum(seconds[warmup:])
    # A fixed batch's step-1 loss is the same in every system; mixed steps compare their mean.
    loss = losses[0] if case.layout is None else statistics.fmean(losses)
    values = {"tokens_per_s": sum(real[warmup:]) / timed_s, "loss": loss, "static_gib": None,
              "peak_allocated_gib": None, "peak_reserved_gib": None, "mfu": None}
    if cuda:
        values.update(static_gib=static / GIB, peak_allocated_gib=max(step_peaks),
                      peak_reserved_gib=max(reserved_peaks),
                      mfu=sum(flops[warmup:]) / timed_s / e2e_models.PEAK_FLOPS)
    if args.profile:
        profile_step(lambda: step(batch), args.profile / f"{case.slug}.json")
    if args.memory and cuda:
        memory_peak.record_step(lambda: step(batch),
                                args.memory / f"{case.slug}.txt", f"{case.slug} ({case.system})")
    common_extra = {"steps": [warmup, timed], "trainable_params": sum(p.numel() for p in trainable),
                    "lora_dtype": str(trainable[0].dtype),
                    "system_version": _version(PACKAGES.get(case.system)), **memory_fields(cuda)}
    per_metric = {"tokens_per_s": {"step_s": seconds, "real_tokens": real,
                                   "batch_tokens": [batch["input_ids"].numel() for batch, _ in steps]},
                  "loss": {"losses": losses, "last_loss": losses[-1]},
                  "peak_allocated_gib": {"step_peaks_gib": step_peaks,
                                         **graph_memory(step, static, cuda)},
                  "mfu": {"flops_per_token": sum(flops) / sum(real),
                          "peak_tflops": e2e_models.PEAK_FLOPS / 1e12}}
    config = case.record_config(args.tiny)
    return [common.record(case.record_system(), config, metric, value,
                          None if value is not None else "no CUDA: memory and MFU are measured on a GPU",
                          **common_extra, **per_metric.get(metric, {}))
            for metric, value in values.items()]


def graph_memory(step, static: int | None, cuda: bool) -> dict:
    """For a captured step, the GiB its graph's private pool holds (``graph_pool_gib``) and static +
    pool (``graph_footprint_gib``): what its replays occupy, which no allocation counts once it is
    captured (peak_allocated_gib has the capture's own peak). Empty for other systems."""
    pool = getattr(step, "pool_gib", None)
    if pool is None or not cuda:
        return {}
    return {"graph_pool_gib": pool, "graph_footprint_gib": static / GIB + pool}


def worker(args: argparse.Namespace) -> int:
    """Run one case and print its records as one ``E2E-RESULT`` line (errors included)."""
    case = Case(args.config, args.variant, args.system, args.tokens, args.recompute_attention,
                args.keep_projections)
    try:
        if case.system == "unsloth":
            import unsloth  # noqa: F401  (first: it patches transformers and peft as it is imported)
        records = measure(case, args)
    except Exception as exc:  # torch.OutOfMemoryError above all
        traceback.print_exc()
        records = failed(case, args.tiny, common.describe(exc))
    print(RESULT + json.dumps(records), flush=True)
    return 0


def save_model(args: argparse.Namespace) -> int:
    """Write the model folder Unsloth loads (``--save-model NAME --folder DIR``)."""
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    e2e_models.save_folder(e2e_models.models(args.tiny)[args.save_model], args.folder, dtype)
    return 0


# ------------------------------------------------------------------------------------------------
# The orchestrator: every case in its own process.


def run_process(argv: list[str], log: Path, timeout: float) -> tuple[int | None, str]:
    """Run ``argv`` with its output in ``log``; (exit status or None after a timeout, the log's text).

    The process gets its own session so that a timeout kills its children (compile workers) too.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **OFFLINE},
                                   start_new_session=True)
        try:
            status = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            status = None
    return status, log.read_text(errors="replace")


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def run_case(case: Case, args: argparse.Namespace, timeout: float, folder: Path | None) -> list[dict]:
    """One worker process; its records, or failure records when it printed none."""
    argv = [sys.executable, str(HERE / "e2e.py"), "--worker", "--config", case.config,
            "--variant", case.variant, "--system", case.system, "--steps", ",".join(map(str, args.steps))]
    argv += ["--tiny"] if args.tiny else []
    argv += ["--profile", str(args.profile)] if args.profile else []
    argv += ["--memory", str(args.memory)] if args.memory else []
    argv += ["--folder", str(folder)] if folder else []
    argv += ["--tokens", str(case.tokens)] if case.tokens else []
    argv += ["--oom-above", str(args.oom_above)] if args.oom_above is not None else []
    argv += ["--recompute-attention"] if case.recompute_attention else []
    argv += ["--keep-projections", case.keep_projections]
    status, text = run_process(argv, args.logs / f"{case.slug}.log", timeout)
    lines = [line for line in text.splitlines() if not line.startswith(RESULT)]
    results = [line for line in text.splitlines() if line.startswith(RESULT)]
    if results:
        records = json.loads(results[-1][len(RESULT):])
    else:
        error = f"worker exited {status}: {last_line(text)}"
        records = failed(case, args.tiny, f"timeout after {timeout:.0f} s" if status is None else error)
    if args.profile or all(row["value"] is None for row in records):
        print("\n".join(lines if args.profile else lines[-12:]), flush=True)
    return records


def model_folder(model: str, args: argparse.Namespace, timeout: float) -> tuple[Path | None, str | None]:
    """The saved folder of ``model`` for Unsloth, written first when missing; (folder, None) or
    (None, why it could not be written)."""
    folder = args.cache / f"{model}{'-tiny' if args.tiny else ''}"
    if (folder / "complete").exists():
        return folder, None
    shutil.rmtree(folder, ignore_errors=True)
    print(f"saving {model} for unsloth to {folder}", flush=True)
    argv = [sys.executable, str(HERE / "e2e.py"), "--save-model", model, "--folder", str(folder)]
    argv += ["--tiny"] if args.tiny else []
    status, text = run_process(argv, args.logs / f"save-{model}.log", timeout)
    if status == 0 and (folder / "complete").exists():
        return folder, None
    shutil.rmtree(folder, ignore_errors=True)
    reason = f"timeout after {timeout:.0f} s" if status is None else last_line(text)
    return None, f"could not save the model folder: {reason}"


def summary(records: list[dict]) -> str:
    """One line for one case's records."""
    values = {row["metric"]: row for row in records}
    first = records[0]
    config = first["config"]
    size = config.get("tokens") or config["mode"]
    label = f"{config['model']} {size} {config['variant']} {report.e2e_label(first)}"
    if all(row["value"] is None for row in records):
        return f"  {label}: FAILED: {first['error']}"

    def show(metric: str, spec: str) -> str:
        value = values[metric]["value"]
        return "-" if value is None else format(value, spec)

    steps = values["tokens_per_s"]["step_s"][values["tokens_per_s"]["steps"][0]:]
    return (f"  {label}: {show('tokens_per_s', ',.0f')} tokens/s "
            f"(steps {min(steps):.3f}-{max(steps):.3f} s), "
            f"static {show('static_gib', '.2f')} GiB, peak {show('peak_allocated_gib', '.2f')} "
            f"(reserved {show('peak_reserved_gib', '.2f')}), loss {show('loss', '.4f')} -> "
            f"{values['loss']['last_loss']:.4f}, MFU {show('mfu', '.3f')}")


class UnslothFolder:
    """The saved folder of one model that Unsloth loads: written when a case first needs it (once
    for all the model's cases and probes), removed at the end unless --keep-folders."""

    def __init__(self, model: str, args: argparse.Namespace, left):
        self.model, self.args, self.left = model, args, left
        self.folder: Path | None = None
        self.error: str | None = None

    def get(self) -> tuple[Path | None, str | None]:
        """(folder, None); (None, why it could not be written); (None, None) without the budget to try."""
        if self.folder is None and self.error is None and self.left() >= MIN_WORKER_S:
            self.folder, self.error = model_folder(self.model, self.args, min(self.args.timeout, self.left()))
        return self.folder, self.error

    def remove(self) -> None:
        """Delete the folder (unless --keep-folders): a full-size model's is tens of GiB."""
        if self.folder is not None and not self.args.keep_folders:
            shutil.rmtree(self.folder, ignore_errors=True)


def append(path: Path, records: list[dict]) -> None:
    """Append records to the results file as JSON lines (never truncating it)."""
    with path.open("a") as out:
        out.writelines(json.dumps(row) + "\n" for row in records)


def run_cases(cases: list[Case], args: argparse.Namespace, left, saved: UnslothFolder) -> None:
    """Each case in its own worker, its records appended to --out as soon as it ends."""
    for case in cases:
        folder, error = saved.get() if case.system == "unsloth" else (None, None)
        if left() < MIN_WORKER_S:
            records = failed(case, args.tiny, f"not run: the --budget of {args.budget:.0f} s was spent")
        elif error:
            records = failed(case, args.tiny, error)
        else:
            records = run_case(case, args, min(args.timeout, left()), folder)
        append(args.out, records)
        print(summary(records), flush=True)


# ------------------------------------------------------------------------------------------------
# --max-context: the longest batch-1 sequence each system trains.

OK = "ok"


@dataclass(frozen=True)
class Search:
    """The longest length that fitted (None: not even the first), every probe in order as (tokens,
    "ok" or why it failed), and whether the search ran to its end (False: the budget ran out)."""

    longest: int | None
    probes: list[tuple[int, str]]
    complete: bool


def search_context(probe, start: int, ceiling: int, resolution: int, known: dict | None = None) -> Search:
    """The longest length ``probe`` passes: ``start``, twice that, ... up to ``ceiling`` until one
    fails, then bisection between the last pass and the first failure until they are at most
    ``resolution`` tokens apart (lengths stay multiples of ``resolution`` above ``start``).

    ``probe(tokens)`` returns "ok", why it failed, or None when it could not run (budget spent),
    which ends the search incomplete. Outcomes in ``known`` ({tokens: outcome}, an earlier
    incomplete search's) are taken as they are, so a search resumes where the last one stopped.
    A failure at ``start`` ends the search: nothing fits, or the system is broken.
    """
    known = known or {}
    probes: list[tuple[int, str]] = []

    def fits(tokens: int) -> bool | None:
        outcome = known.get(tokens) or probe(tokens)
        if outcome is None:
            return None
        probes.append((tokens, outcome))
        return outcome == OK

    longest = failing = None
    tokens = start
    while failing is None and (longest is None or longest < ceiling):
        fit = fits(tokens)
        if fit is None:
            return Search(longest, probes, complete=False)
        if not fit:
            failing = tokens
        else:
            longest, tokens = tokens, min(2 * tokens, ceiling)
    while longest is not None and failing is not None and failing - longest > resolution:
        tokens = longest + max(resolution, (failing - longest) // 2 // resolution * resolution)
        fit = fits(tokens)
        if fit is None:
            return Search(longest, probes, complete=False)
        longest, failing = (tokens, failing) if fit else (longest, tokens)
    return Search(longest, probes, complete=True)


def earlier_search(path: Path, system: str, config: dict) -> dict:
    """The last max_context_tokens record of ``system`` and ``config`` in ``path`` ({} if none)."""
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return next((row for row in reversed(rows) if row["metric"] == "max_context_tokens"
                 and row["system"] == system and row["config"] == config), {})


def max_context(case: Case, args: argparse.Namespace, left, saved: UnslothFolder) -> dict:
    """Search ``case``'s longest trainable length, one worker a probe; its max_context_tokens record.

    A probe passes when its worker records a speed; a worker's error (out of memory above all) or
    timeout fails it; a timeout cut short by --budget leaves it undecided. The search resumes the
    probes of an earlier record of the same case in --out. ``probe_metrics`` holds every passing
    probe's speed and memory (with :data:`MEMORY_FIELDS`), ``at_max`` the longest one's.
    """
    config = case.record_config(args.tiny, mode="max_context")
    if args.oom_above is not None:
        config["oom_above"] = args.oom_above
    earlier = earlier_search(args.out, case.record_system(), config)
    measured = {tokens: metrics for tokens, metrics in earlier.get("probe_metrics", [])}
    if earlier.get("value") is not None:
        measured.setdefault(earlier["value"], earlier["at_max"])

    def probe(tokens: int) -> str | None:
        folder, error = saved.get() if case.system == "unsloth" else (None, None)
        if left() < MIN_WORKER_S:
            return None
        if error:
            return error
        limit = min(args.timeout, left())
        records = {row["metric"]: row for row in run_case(replace(case, tokens=tokens), args, limit, folder)}
        speed = records["tokens_per_s"]
        print(f"    {case.system} {tokens:,} tokens: {speed.get('error', OK)}", flush=True)
        if speed["value"] is None:
            return None if speed["error"].startswith("timeout") and limit < args.timeout else speed["error"]
        measured[tokens] = {**{metric: row["value"] for metric, row in records.items()},
                            **{key: speed.get(key) for key in MEMORY_FIELDS}}
        return OK

    search = search_context(probe, args.start, args.ceiling, args.resolution,
                            known=dict(earlier.get("probes", [])))
    error = None
    if search.longest is None:
        error = (f"failed at its shortest length, {search.probes[0][0]:,} tokens: {search.probes[0][1]}"
                 if search.probes else f"not run: the --budget of {args.budget:.0f} s was spent")
    passed = sorted({tokens for tokens, outcome in search.probes if outcome == OK and tokens in measured})
    return common.record(case.record_system(), config, "max_context_tokens", search.longest, error,
                         probes=search.probes, complete=search.complete,
                         at_max=measured.get(search.longest),
                         probe_metrics=[[tokens, measured[tokens]] for tokens in passed],
                         start=args.start, ceiling=args.ceiling,
                         resolution=args.resolution, steps=list(args.steps),
                         system_version=_version(PACKAGES.get(case.system)))


def context_summary(row: dict) -> str:
    """One line for a max_context_tokens record."""
    label = f"{row['config']['model']} {row['config']['variant']} {row['system']}"
    if row["value"] is None:
        return f"  {label}: FAILED: {row['error']}"
    end = "" if row["complete"] else ", incomplete: the budget ran out"
    return f"  {label}: longest context {row['value']:,} tokens ({len(row['probes'])} probes{end})"


def orchestrate(args: argparse.Namespace) -> int:
    """Run every case (or every --max-context search) in workers, appending records to --out as they end."""
    start = time.monotonic()
    budget = args.budget if args.budget is not None else float("inf")

    def left() -> float:
        return budget - (time.monotonic() - start)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    models = list(dict.fromkeys(e2e_models.model_of(name) for name in args.configs))
    print(f"results: {args.out}; logs: {args.logs}", flush=True)
    for model in models:  # a model's configurations together: its Unsloth folder is saved once
        configs = [config for config in args.configs if e2e_models.model_of(config) == model]
        saved = UnslothFolder(model, args, left)
        if args.max_context:  # the model's first configuration stands for it
            for variant in args.variants:
                for system in args.systems:
                    row = max_context(Case(configs[0], variant, system, None, args.recompute_attention,
                                           args.keep_projections), args, left, saved)
                    append(args.out, [row])
                    print(context_summary(row), flush=True)
        else:
            run_cases([Case(config, variant, system, None, args.recompute_attention,
                            args.keep_projections) for config in configs
                       for variant in args.variants for system in args.systems], args, left, saved)
        saved.remove()
    print(f"done in {time.monotonic() - start:.0f} s", flush=True)
    return 0


def _names(text: str, allowed, what: str) -> list[str]:
    names = [name for name in text.split(",") if name]
    unknown = sorted(set(names) - set(allowed))
    if unknown:
        raise SystemExit(f"unknown {what} {unknown}; choose from {sorted(allowed)}")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="JSON-lines results file (appended to)")
    parser.add_argument("--configs", help=f"of {', '.join([*e2e_models.CONFIGS, *e2e_models.MIXED])} "
                        "(default L8-4k,Q7VL,M11; L8-4k with --max-context)")
    parser.add_argument("--systems", default="hf,liger,unsloth,fusetune", help=f"of {', '.join(SYSTEMS)}")
    parser.add_argument("--variants", default="bf16_lora", help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--steps", help="warm-up,timed (default 3,8; 1,1 with --max-context)")
    parser.add_argument("--timeout", type=float, default=420, help="seconds per worker")
    parser.add_argument("--budget", type=float, help="seconds for the whole call")
    parser.add_argument("--tiny", action="store_true", help="tiny models of the same architectures (CPU too)")
    parser.add_argument("--profile", type=Path, help="profile one extra step of each worker; traces here")
    parser.add_argument("--memory", type=Path,
                        help="one extra step of each worker with CUDA memory history; peak reports here")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "fusetune-e2e-models",
                        help="where the model folders for Unsloth are saved")
    parser.add_argument("--keep-folders", action="store_true", help="keep the saved model folders")
    parser.add_argument("--logs", type=Path, help="workers' logs (default: next to --out)")
    parser.add_argument("--max-context", action="store_true",
                        help="search each system's longest trainable length instead (one model a config)")
    parser.add_argument("--start", type=int, help=f"--max-context's first length (default {CONTEXT[0]})")
    parser.add_argument("--ceiling", type=int, help=f"--max-context's longest length (default {CONTEXT[1]})")
    parser.add_argument("--resolution", type=int, help=f"--max-context's resolution (default {CONTEXT[2]})")
    parser.add_argument("--oom-above", type=int,
                        help="--tiny only: a worker past this many tokens raises torch.OutOfMemoryError, "
                        "standing in for a GPU's memory so that --max-context can be tried on a CPU")
    parser.add_argument("--recompute-attention", action="store_true",
                        help='fusetune systems recompute attention in backward (enable_checkpointing\'s '
                             'keep_attention=False); their records say "keep_attention": false')
    parser.add_argument("--keep-projections", choices=list(KEEP_PROJECTIONS), default="auto",
                        help="fusetune systems keep the LoRA projections' outputs for the recompute: "
                             "auto (enable_checkpointing's default: in captured steps), always or never "
                             '(their records say "keep_projections": true or false)')
    parser.add_argument("--worker", action="store_true", help="run one case in this process")
    parser.add_argument("--config", choices=[*e2e_models.CONFIGS, *e2e_models.MIXED])
    parser.add_argument("--tokens", type=int, help="worker: this many tokens instead of the config's")
    parser.add_argument("--variant", choices=VARIANTS)
    parser.add_argument("--system", choices=SYSTEMS)
    parser.add_argument("--folder", type=Path, help="the saved model (unsloth worker, --save-model)")
    saved_models = list(dict.fromkeys(model for model, _ in e2e_models.CONFIGS.values()))
    parser.add_argument("--save-model", choices=saved_models, help="save this model to --folder")
    args = parser.parse_args(argv)
    args.steps = tuple(int(n) for n in (args.steps or ("1,1" if args.max_context else "3,8")).split(","))
    if len(args.steps) != 2 or args.steps[1] < 1:
        parser.error("--steps is warm-up,timed with at least one timed step")
    if args.oom_above is not None and not args.tiny:
        parser.error("--oom-above simulates out-of-memory with --tiny only")
    if args.worker:
        if None in (args.config, args.variant, args.system):
            parser.error("--worker needs --config, --variant and --system")
    elif args.save_model:
        if args.folder is None:
            parser.error("--save-model needs --folder")
    elif args.out is None:
        parser.error("--out is required")
    else:
        allowed = e2e_models.CONFIGS if args.max_context else [*e2e_models.CONFIGS, *e2e_models.MIXED]
        args.configs = _names(args.configs or ("L8-4k" if args.max_context else "L8-4k,Q7VL,M11"), allowed,
                              "configs")
        shrink = e2e_models.TINY_SHRINK if args.tiny else 1
        for name, default in zip(("start", "ceiling", "resolution"), CONTEXT, strict=True):
            if getattr(args, name) is None:
                setattr(args, name, default // shrink)
        args.systems = _names(args.systems, SYSTEMS, "systems")
        args.variants = _names(args.variants, VARIANTS, "variants")
        args.logs = args.logs or args.out.with_name(args.out.stem + "-logs")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # transformers 5.2x renames gradient checkpointing (the old names stay until v6; 5.17 has only them).
    warnings.filterwarnings("ignore", r".*gradient_checkpointing.*deprecated", FutureWarning)
    sys.path.insert(0, str(HERE.parent))  # fusetune from this checkout
    if args.worker:
        return worker(args)
    if args.save_model:
        return save_model(args)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
