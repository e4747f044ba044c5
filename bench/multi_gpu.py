"""Two GPUs: sharded LoRA training equals one GPU's, and how the end-to-end step scales from 1 to 2 GPUs.

    python bench/multi_gpu.py equality --out FILE [--models tiny,1b] [--engines fsdp2,zero3] [--steps 20]
    python bench/multi_gpu.py scale --out FILE [--configs L8-4k,Q7VL] [--systems liger,fusetune]
                                    [--gpus 1,2] [--steps 3,8] [--tiny]
    python bench/multi_gpu.py report --out FILE [--markdown bench/RESULTS.md]
    (common options of equality and scale: [--timeout 420] [--budget S] [--logs DIR] [--rerun])

The first two are orchestrators: every case runs in its own ``torchrun --standalone`` launch (a
worker: the same subcommand with ``--worker``, e.g. ``torchrun --nproc_per_node 2 bench/multi_gpu.py
equality --worker --model tiny --engine fsdp2 --steps 20 --out FILE``), with ``NCCL_NVLS_ENABLE=0``
(NVLink multicast off) in its environment, ``--timeout`` seconds at most, its log under ``--logs``
(default: FILE's name + ``-logs``). Rank 0 prints one ``MULTI-GPU-RESULT [records]`` line; the
orchestrator appends the records to FILE (never truncating it) or, when the worker crashed, timed out
or printed none, records with value null and an ``error``, and the next case runs. A case that
already has a successful record in FILE is skipped unless ``--rerun``, so the same command resumes
after a call was cut short; ``--budget`` caps a call (a case is not started with less than a minute
left). Without CUDA the workers run on CPU processes over gloo in float32 (``scale --tiny``: the tiny
stand-ins of bench/e2e_models.py), which is how the plumbing is tested.

Equality (``equality``; records: system fusetune, config {check: equality, model, engine, gpus: 2,
batch, tokens, steps, dtype}). A Llama built from a config with seeded random weights (``tiny``: hidden
64, 2 layers, vocab 512; ``1b``: Llama-3.2-1B's config, 1.24 B parameters), PEFT LoRA r=16 (alpha 16,
dropout 0, float32 adapters) on q,k,v,o,gate,up,down, ``fusetune.apply``; ``--steps`` AdamW steps (lr
1e-3) on one fixed global batch of 4 sequences (the same batch every step, so the loss falls and the
adapters move far), bf16 weights and bf16 autocast on CUDA. First rank 0 alone trains an unsharded
copy on the whole batch (the reference), then both ranks train, each on half of the batch, the loss
normalised by the whole batch's label count (``num_items_in_batch``) and scaled by the world size, as
Trainer does. ``fsdp2``: ``fully_shard`` on each decoder layer, then the root (no mixed-precision
policy: the frozen base stays bf16, the adapters float32, as on one GPU). ``zero3``: DeepSpeed ZeRO-3
(stage 3, bf16, torch AdamW as a client optimiser), run only where ``deepspeed`` is installed (else a
record with error "deepspeed not installed"). Metrics: ``loss_max_rel_diff`` (the largest per-step
|sharded - single| / |single| loss difference; ``losses`` and ``reference_losses`` keep every step),
``lora_rel_diff`` (||W_sharded - W_single|| / ||W_single|| over all LoRA weights after the last step)
and ``lora_update_rel_diff`` (the same difference over how far training moved the weights,
||W_single - W_initial||: the stricter one, as the adapters' A matrices start random and barely move).
Each record has ``tolerance`` and ``within_tolerance`` (see TOLERANCES).

Scaling (``scale``; records: system liger|fusetune, config {model, tokens, variant bf16_lora, engine
fsdp2, gpus}). The end-to-end protocol of bench/e2e.py (its models, batches and system set-up: liger's
patch function before building, fusetune's ``apply`` and ``enable_checkpointing(offload=True)``,
transformers' checkpointing for liger) with every process training its own batch 1 of 4,096 tokens
(the same batch on each rank), sharded with ``fully_shard`` on each decoder layer and vision block,
then the root, on 2 GPUs and on 1 GPU (FSDP2 over a world of one: the same code and the same
numerics, so the ratio isolates what the second GPU and its communication cost; the unsharded 1-GPU
numbers are bench/e2e.py's). ``--steps`` warm-up and timed steps. Metrics: tokens_per_s_per_gpu (a
rank's tokens over the slowest rank's timed seconds), tokens_per_s (all GPUs), peak_allocated_gib
(the largest over ranks; ``per_rank`` lists each), static_gib (after sharding, before the first step),
loss (step 1). After the runs, a ``scaling`` record per configuration and system: tokens/s on the most
GPUs over tokens/s on 1 GPU, with ``target`` 1.8 x (for 2 GPUs) and ``meets_target``.

``report`` writes FILE's tables into the Markdown document (its section between ``<!-- begin NAME
-->`` markers, as bench/report.py does for the other results).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import common
import e2e
import e2e_models
import patch_gpu
import report
import torch

HERE = Path(__file__).resolve().parent
RESULT = "MULTI-GPU-RESULT "
NCCL = {"NCCL_NVLS_ENABLE": "0"}  # NVLink multicast (NVLS) stays off on these machines
MODELS = ("tiny", "1b")
ENGINES = ("fsdp2", "zero3")
SCALE_SYSTEMS = ("hf", "liger", "fusetune")
EQUALITY_METRICS = ("loss_max_rel_diff", "lora_rel_diff", "lora_update_rel_diff")
SCALE_METRICS = ("tokens_per_s_per_gpu", "tokens_per_s", "peak_allocated_gib", "static_gib", "loss")
EQUALITY_WORLD = 2
EQUALITY_BATCH = 4  # sequences in the fixed global batch; each of the two ranks trains on 2
EQUALITY_TOKENS = {"tiny": 64, "1b": 1024}
EQUALITY_LR = 1e-3
SCALING_EFFICIENCY = 0.9  # the scaling target: 0.9 x the GPU count, 1.8 x on 2 GPUs
NO_CUDA = "no CUDA: memory is measured on a GPU"  # the error of CPU runs' memory records
# Allowed differences between the sharded and the single-GPU run, per metric and dtype. float32 (the
# CPU runs): rounding only, the sums of two halves against one sum. bf16: sharding changes the shape of
# every matmul (half the rows) and the order of the gradient sums, so every bf16-rounded activation
# (2^-9 = 2e-3 relative) rounds differently; the per-step loss bound is the one bench/patch_gpu.py
# allows a patched model against its unpatched copy on one GPU. Adam's normalised steps then carry
# that noise into the weights for 20 steps: the adapters may move differently by a few per cent of how
# far they moved, while a real fault (a missing gradient shard, a gradient not reduced, a loss split
# or normalised wrongly) moves them differently by the order of the update itself (> 0.5). Against the
# weights themselves (mostly the random A matrices, identical in both runs) the bound is 10x smaller.
TOLERANCES = {
    "bf16": {"loss_max_rel_diff": 2e-2, "lora_rel_diff": 1e-2, "lora_update_rel_diff": 1e-1},
    "fp32": {"loss_max_rel_diff": 1e-4, "lora_rel_diff": 1e-5, "lora_update_rel_diff": 1e-3},
}


def llama_32_1b_config():
    """meta-llama/Llama-3.2-1B's config.json, written out (1.24 B parameters, tied embeddings)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, hidden_act="silu",
        max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=128000, eos_token_id=128001, initializer_range=0.02,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
    )


def tiny_llama_config():
    """A two-layer Llama small enough for CPU processes."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


EQUALITY_SPECS = {"tiny": patch_gpu.Spec("llama-tiny", tiny_llama_config),
                  "1b": patch_gpu.Spec("llama-3.2-1b", llama_32_1b_config)}


# ------------------------------------------------------------------------------------------------
# Records shared by workers and orchestrator.


def dtype_name() -> str:
    """The training dtype of this machine's runs: bf16 on CUDA, float32 on CPU processes."""
    return "bf16" if torch.cuda.is_available() else "fp32"


def equality_config(model: str, engine: str, steps: int) -> dict:
    """The config of an equality check's records."""
    return {"check": "equality", "model": model, "engine": engine, "gpus": EQUALITY_WORLD,
            "batch": EQUALITY_BATCH, "tokens": EQUALITY_TOKENS[model], "steps": steps, "dtype": dtype_name()}


def scale_config(config_name: str, gpus: int, tiny: bool) -> dict:
    """The config of a scaling run's records (bench/e2e.py's, with the engine and the GPU count)."""
    config = {"model": e2e_models.model_of(config_name), "tokens": e2e_models.tokens_of(config_name, tiny),
              "variant": "bf16_lora", "engine": "fsdp2", "gpus": gpus}
    if tiny:
        config["tiny"] = True
    return config


def failed(system: str, config: dict, metrics: tuple[str, ...], error: str) -> list[dict]:
    """Records with value null and ``error`` for each of ``metrics``."""
    return [common.record(system, config, metric, None, error) for metric in metrics]


# ------------------------------------------------------------------------------------------------
# Worker set-up: one process of a torchrun launch.


def init_distributed() -> tuple[int, int]:
    """Join torchrun's process group (NCCL on this rank's GPU, gloo on CPU processes); (rank, world)."""
    import torch.distributed as dist

    os.environ.update(NCCL)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(minutes=10))
    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    return dist.get_rank(), dist.get_world_size()


def mesh():
    """A one-dimensional device mesh over every process."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(common.device().type, (dist.get_world_size(),))


def shard(model: torch.nn.Module) -> int:
    """``fully_shard`` each decoder layer (and each vision block of a VLM: the model's
    ``_no_split_modules`` classes, as ``fusetune train`` wraps them), then the root; the layer count."""
    from torch.distributed.fsdp import fully_shard

    from fusetune.train.config import DistributedSettings
    from fusetune.train.distributed import wrap_classes

    names = set(wrap_classes(model, DistributedSettings(strategy="fsdp2")))
    layers = [module for module in model.modules() if type(module).__name__ in names]
    device_mesh = mesh()
    for layer in reversed(layers):  # innermost first, as FSDP2 requires
        fully_shard(layer, mesh=device_mesh)
    fully_shard(model, mesh=device_mesh)
    return len(layers)


def autocast():
    """bf16 autocast on CUDA (as bench/e2e.py's steps run), nothing on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.cuda.is_available())


# ------------------------------------------------------------------------------------------------
# Equality worker.


def lora_model(name: str) -> torch.nn.Module:
    """The equality model: seeded random weights, LoRA on every projection, patched by fusetune; the
    same weights and adapters in every process and every call."""
    import peft

    import fusetune

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    base = patch_gpu.build(EQUALITY_SPECS[name], dtype, seed=e2e_models.SEED, fast_init=True)
    base.config.use_cache = False
    torch.manual_seed(e2e_models.SEED + 1)
    lora = peft.LoraConfig(**e2e.LORA, target_modules=list(e2e_models.LORA_TARGETS), task_type="CAUSAL_LM")
    model = peft.get_peft_model(base, lora)
    fusetune.apply(model)
    return model


def global_batch(name: str) -> dict:
    """The fixed global batch on the device: 4 random sequences, some labels -100 (a prompt in the
    first, a tail in the last, so the two halves hold different label counts)."""
    vocab = EQUALITY_SPECS[name].config().vocab_size
    batch = patch_gpu.text_inputs(vocab, EQUALITY_BATCH, EQUALITY_TOKENS[name], seed=e2e_models.SEED)
    return patch_gpu.to_device(batch, torch.float32)


def lora_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every LoRA weight as a float32 CPU tensor (whole, when sharded: a collective call)."""
    weights = {}
    for name, param in model.named_parameters():
        if "lora_" in name:
            whole = param.full_tensor() if hasattr(param, "full_tensor") else param
            weights[name] = whole.detach().float().cpu().clone()
    return weights


def train(model, step, batch: dict, items: torch.Tensor, world: int, steps: int) -> list[float]:
    """``steps`` training steps on ``batch``, this process's part of a batch shared by ``world``
    processes: the loss over the whole batch's ``items`` labels, times ``world`` (the engines average
    the gradients over the processes), then ``step(loss)`` (backward and optimiser). The losses, summed
    over the processes when ``world`` > 1: the whole batch's."""
    import torch.distributed as dist

    losses = []
    for _ in range(steps):
        with autocast():
            loss = model(**batch, num_items_in_batch=items).loss
        step(loss * world)
        total = loss.detach().float().clone()
        if world > 1:
            dist.all_reduce(total)
        losses.append(total.item())
    return losses


def adamw_step(model: torch.nn.Module):
    """A step function (backward, AdamW, zero the gradients) over ``model``'s trainable parameters."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=EQUALITY_LR)

    def step(loss: torch.Tensor) -> None:
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def single_run(name: str, steps: int) -> tuple[list[float], dict, dict]:
    """The reference: one process, the whole batch, no sharding; (losses, initial and final LoRA)."""
    model = lora_model(name)
    batch = global_batch(name)
    initial = lora_weights(model)
    items = (batch["labels"][:, 1:] != e2e_models.IGNORE).sum()
    losses = train(model, adamw_step(model), batch, items, 1, steps)
    return losses, initial, lora_weights(model)


def zero3(model: torch.nn.Module):
    """``model`` under DeepSpeed ZeRO-3 (bf16 on CUDA); (the engine, its step function)."""
    import deepspeed

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=EQUALITY_LR)
    config = {"train_micro_batch_size_per_gpu": EQUALITY_BATCH // EQUALITY_WORLD,
              "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 3},
              "bf16": {"enabled": torch.cuda.is_available()}, "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)

    def step(loss: torch.Tensor) -> None:
        engine.backward(loss)
        engine.step()

    return engine, step


def zero3_weights(engine) -> dict[str, torch.Tensor]:
    """Every LoRA weight of a ZeRO-3 engine, gathered whole (a collective call)."""
    import deepspeed

    params = [(name, param) for name, param in engine.module.named_parameters() if "lora_" in name]
    with deepspeed.zero.GatheredParameters([param for _, param in params]):
        return {name: param.detach().float().cpu() for name, param in params}


def sharded_run(name: str, engine: str, rank: int, world: int, steps: int) -> tuple[list[float], dict]:
    """Every process on its half of the batch under ``engine``; (summed losses, final LoRA)."""
    model = lora_model(name)
    batch = global_batch(name)
    items = (batch["labels"][:, 1:] != e2e_models.IGNORE).sum()
    part = EQUALITY_BATCH // world
    mine = {key: value[rank * part:(rank + 1) * part] for key, value in batch.items()}
    if engine == "fsdp2":
        shard(model)
        losses = train(model, adamw_step(model), mine, items, world, steps)
        return losses, lora_weights(model)
    wrapped, step = zero3(model)
    losses = train(wrapped, step, mine, items, world, steps)
    return losses, zero3_weights(wrapped)


def norm_difference(ours: dict, theirs: dict, against: dict) -> float:
    """||ours - theirs|| / ||against|| over all tensors together."""
    diff_sq = sum((ours[name] - theirs[name]).double().square().sum().item() for name in theirs)
    ref_sq = sum(tensor.double().square().sum().item() for tensor in against.values())
    return patch_gpu.relative_error(diff_sq, ref_sq)


def equality_records(config: dict, single: tuple, sharded: tuple) -> list[dict]:
    """The three difference records of a sharded run against the single-GPU one."""
    reference_losses, initial, reference = single
    losses, final = sharded
    steps = [abs(a - b) / abs(b) for a, b in zip(losses, reference_losses, strict=True)]
    moved = {name: reference[name] - initial[name] for name in reference}
    values = {"loss_max_rel_diff": max(steps), "lora_rel_diff": norm_difference(final, reference, reference),
              "lora_update_rel_diff": norm_difference(final, reference, moved)}
    moved_norm = math.sqrt(sum(tensor.double().square().sum().item() for tensor in moved.values()))
    extra = {"loss_max_rel_diff": {"losses": losses, "reference_losses": reference_losses,
                                   "step_rel_diff": steps},
             "lora_update_rel_diff": {"update_norm": moved_norm}}
    tolerances = TOLERANCES[config["dtype"]]
    return [common.record("fusetune", config, metric, value, tolerance=tolerances[metric],
                          within_tolerance=bool(value <= tolerances[metric]), **extra.get(metric, {}))
            for metric, value in values.items()]


def deepspeed_imports() -> bool:
    """Whether DeepSpeed is installed and imports."""
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return False
    return True


def equality(args: argparse.Namespace, rank: int, world: int) -> list[dict]:
    """The equality check of ``args.model`` under ``args.engine``: rank 0 alone first, then all ranks."""
    import torch.distributed as dist

    config = equality_config(args.model, args.engine, args.steps)
    if world != EQUALITY_WORLD:
        raise ValueError(f"the equality check runs on {EQUALITY_WORLD} processes, not {world}")
    if args.engine == "zero3" and not deepspeed_imports():
        return failed("fusetune", config, EQUALITY_METRICS, "deepspeed not installed")
    single = single_run(args.model, args.steps) if rank == 0 else None
    common.release()
    dist.barrier()
    sharded = sharded_run(args.model, args.engine, rank, world, args.steps)
    return equality_records(config, single, sharded) if rank == 0 else []


# ------------------------------------------------------------------------------------------------
# Scaling worker.


def timed_steps(model: torch.nn.Module, batches: list[dict], warmup: int) -> tuple[list[float], float]:
    """bench/e2e.py's training steps; (losses, the slowest process's seconds over the timed steps)."""
    import torch.distributed as dist

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    losses, seconds = [], []
    for batch in batches:
        start = time.perf_counter()
        losses.append(e2e.train_step(model, batch, optimizer))
        seconds.append(time.perf_counter() - start)
    slowest = torch.tensor(sum(seconds[warmup:]), dtype=torch.float64, device=common.device())
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return losses, slowest.item()


def memory_per_rank(static: float | None) -> list[dict]:
    """Every process's static and peak allocated GiB (None without CUDA), gathered on all ranks."""
    import torch.distributed as dist

    mine = {"static_gib": static, "peak_allocated_gib": None}
    if torch.cuda.is_available():
        mine["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / e2e.GIB
    ranks: list = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)
    return ranks


def throughput(args: argparse.Namespace, rank: int, world: int) -> list[dict]:
    """``args.system`` on ``args.config`` sharded over ``world`` processes; rank 0 gets the records."""
    case = e2e.Case(args.config, "bf16_lora", args.system)
    model = e2e_models.models(args.tiny)[case.model]
    warmup, timed = args.steps
    tokens = e2e_models.tokens_of(args.config, args.tiny)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    cpu_batch = e2e_models.inputs(model, tokens, args.tiny)
    trained = e2e.prepare(case, model, tokens, dtype, None)
    shard(trained)
    common.synchronize()
    static = torch.cuda.memory_allocated() / e2e.GIB if torch.cuda.is_available() else None
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    batch = patch_gpu.to_device(cpu_batch, dtype)
    losses, seconds = timed_steps(trained, [batch] * (warmup + timed), warmup)
    memory = memory_per_rank(static)
    if rank != 0:
        return []
    per_gpu = tokens * timed / seconds
    values = {"tokens_per_s_per_gpu": per_gpu, "tokens_per_s": per_gpu * world, "loss": losses[0],
              "peak_allocated_gib": _largest(memory, "peak_allocated_gib"),
              "static_gib": _largest(memory, "static_gib")}
    extra = {"steps": [warmup, timed], "timed_s": seconds, "losses": losses, "per_rank": memory,
             "system_version": e2e._version(e2e.PACKAGES.get(args.system))}
    config = scale_config(args.config, world, args.tiny)
    return [common.record(args.system, config, metric, values[metric],
                          None if values[metric] is not None else NO_CUDA, **extra)
            for metric in SCALE_METRICS]


def _largest(ranks: list[dict], key: str) -> float | None:
    """The largest of the processes' ``key`` values (None when none has one)."""
    values = [row[key] for row in ranks if row[key] is not None]
    return max(values) if values else None


def worker(args: argparse.Namespace) -> int:
    """One process of a torchrun launch: run the case, rank 0 prints (and appends to --out) its records."""
    import torch.distributed as dist

    rank, world = init_distributed()
    if args.command == "equality":
        system, metrics = "fusetune", EQUALITY_METRICS
        config = equality_config(args.model, args.engine, args.steps)
    else:
        system, metrics, config = args.system, SCALE_METRICS, scale_config(args.config, world, args.tiny)
    try:
        records = (equality if args.command == "equality" else throughput)(args, rank, world)
    except Exception as exc:  # out of memory above all; the same failure on every rank
        traceback.print_exc()
        records = failed(system, config, metrics, common.describe(exc))
    if rank == 0:
        print(RESULT + json.dumps(records), flush=True)
        if args.out:
            e2e.append(args.out, records)
    dist.destroy_process_group()
    return 0


# ------------------------------------------------------------------------------------------------
# Orchestrator.


@dataclass
class Job:
    """One torchrun launch: a name for its log, its processes, the worker's arguments, and the
    system, config and metrics of the records it must produce."""

    slug: str
    nproc: int
    argv: list[str]
    system: str
    config: dict
    metrics: tuple[str, ...]


def equality_jobs(args: argparse.Namespace) -> list[Job]:
    """One job per model and engine."""
    jobs = []
    for model in args.models:
        for engine in args.engines:
            argv = ["equality", "--model", model, "--engine", engine, "--steps", str(args.steps)]
            jobs.append(Job(f"equality-{model}-{engine}", EQUALITY_WORLD, argv, "fusetune",
                            equality_config(model, engine, args.steps), EQUALITY_METRICS))
    return jobs


def scale_jobs(args: argparse.Namespace) -> list[Job]:
    """One job per configuration, system and GPU count."""
    jobs, steps = [], ",".join(map(str, args.steps))
    for config in args.configs:
        for system in args.systems:
            for gpus in args.gpus:
                argv = ["scale", "--config", config, "--system", system, "--steps", steps,
                        *(["--tiny"] if args.tiny else [])]
                jobs.append(Job(f"scale-{config}-{system}-{gpus}gpu", gpus, argv, system,
                                scale_config(config, gpus, args.tiny), SCALE_METRICS))
    return jobs


def load(path: Path) -> list[dict]:
    """The records in ``path`` (none when it does not exist)."""
    return report.load(path) if path.exists() else []


def succeeded(rows: list[dict], system: str, config: dict, metric: str) -> dict | None:
    """The last record of ``system``, ``config`` and ``metric`` in ``rows`` that has a value."""
    return next((row for row in reversed(rows) if row["system"] == system and row["config"] == config
                 and row["metric"] == metric and row["value"] is not None), None)


def launch(job: Job, args: argparse.Namespace, timeout: float) -> list[dict]:
    """``job`` in its own torchrun launch (bench/e2e.py's run_process: own session, killed at the
    timeout); its records, or failure records when it printed none."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(job.nproc),
            str(HERE / "multi_gpu.py"), *job.argv, "--worker"]
    status, text = e2e.run_process(argv, args.logs / f"{job.slug}.log", timeout)
    results = [line for line in text.splitlines() if line.startswith(RESULT)]
    if results:
        return json.loads(results[-1][len(RESULT):])
    return failed(job.system, job.config, job.metrics, launch_error(status, text, timeout))


def launch_error(status: int | None, text: str, timeout: float) -> str:
    """Why a launch printed no records: the timeout, or its exit status with the workers' last line
    (the last before torchrun's own report of the failed processes)."""
    if status is None:
        return f"timeout after {timeout:.0f} s"
    workers = re.split(r"^.*failed \(exitcode: ", text, maxsplit=1, flags=re.MULTILINE)[0]
    return f"launch exited {status}: {e2e.last_line(workers)}"


def run_jobs(jobs: list[Job], args: argparse.Namespace) -> None:
    """Each job not yet done in --out, in order, its records appended as soon as it ends."""
    start = time.monotonic()
    budget = args.budget if args.budget is not None else math.inf
    for job in jobs:
        if not args.rerun and succeeded(load(args.out), job.system, job.config, job.metrics[0]):
            print(f"  {job.slug}: done earlier, skipped", flush=True)
            continue
        left = budget - (time.monotonic() - start)
        if left < e2e.MIN_WORKER_S:
            print(f"  {job.slug}: not run, the --budget of {budget:.0f} s is spent", flush=True)
            continue
        records = launch(job, args, min(args.timeout, left))
        e2e.append(args.out, records)
        print(f"  {job.slug}: {summary(records)}", flush=True)


def summary(records: list[dict]) -> str:
    """One line for a job's records."""
    failures = [row for row in records if row["value"] is None and row["error"] != NO_CUDA]
    if failures:
        return f"FAILED: {failures[0]['error']}"
    shown = []
    for row in records:
        if row["value"] is not None:
            flag = "" if row.get("within_tolerance", True) else " (BEYOND TOLERANCE)"
            shown.append(f"{row['metric']} {row['value']:.4g}{flag}")
    return ", ".join(shown)


def scaling_records(args: argparse.Namespace) -> list[dict]:
    """A ``scaling`` record per configuration and system: tokens/s on the most GPUs over 1 GPU's."""
    rows = load(args.out)
    most = max(args.gpus)
    out = []
    for config_name in args.configs:
        for system in args.systems:
            one, many = (succeeded(rows, system, scale_config(config_name, gpus, args.tiny), "tokens_per_s")
                         for gpus in (1, most))
            config = {**scale_config(config_name, most, args.tiny), "gpus": f"1->{most}"}
            if one is None or many is None:
                out.append(common.record(system, config, "scaling", None,
                                         f"missing the tokens/s of 1 or {most} GPUs in {args.out.name}"))
                continue
            ratio = many["value"] / one["value"]
            target = SCALING_EFFICIENCY * most
            out.append(common.record(system, config, "scaling", ratio, target=target,
                                     meets_target=bool(ratio >= target)))
    return out


def orchestrate(args: argparse.Namespace) -> int:
    """Run the subcommand's jobs, appending records to --out (then the scaling ratios, for scale)."""
    os.environ.update(NCCL)  # inherited by every launch
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(f"results: {args.out}; logs: {args.logs}", flush=True)
    start = time.monotonic()
    if args.command == "equality":
        run_jobs(equality_jobs(args), args)
    else:
        if 1 not in args.gpus:
            raise SystemExit("--gpus must include 1, the baseline of the scaling ratio")
        run_jobs(scale_jobs(args), args)
        records = scaling_records(args)
        e2e.append(args.out, records)
        for row in records:
            value = f"{row['value']:.2f}x" if row["value"] is not None else row["error"]
            print(f"  scaling {row['config']['model']} {row['system']} {row['config']['gpus']}: {value}")
    print(f"done in {time.monotonic() - start:.0f} s", flush=True)
    return 0


# ------------------------------------------------------------------------------------------------
# Report.


def _fmt(row: dict | None, spec: str) -> str:
    if row is None:
        return ""
    return "err" if row["value"] is None else format(row["value"], spec)


def equality_table(rows: list[dict]) -> list[str]:
    """Model, engine, steps and the three differences (with the tolerance verdict) per check."""
    latest = {(r["config"]["model"], r["config"]["engine"], r["metric"]): r for r in rows
              if r["config"].get("check") == "equality"}
    cases = list(dict.fromkeys(key[:2] for key in latest))
    if not cases:
        return []
    body = []
    for model, engine in cases:
        cells = [latest.get((model, engine, metric)) for metric in EQUALITY_METRICS]
        verdicts = [cell.get("within_tolerance") for cell in cells if cell and cell["value"] is not None]
        verdict = "" if not verdicts else ("yes" if all(verdicts) else "**no**")
        config = next(cell for cell in cells if cell)["config"]
        body.append([model, engine, str(config["steps"]), config["dtype"],
                     *(_fmt(cell, ".2e") for cell in cells), verdict])
    head = ["model", "engine", "steps", "dtype", "loss max rel diff", "LoRA rel diff", "LoRA update rel diff",
            "within tolerance"]
    bounds = ", ".join(f"{metric} {bound:g}" for metric, bound in TOLERANCES["bf16"].items())
    return ["### Sharded (2 GPUs) against one GPU", "", *report.markdown(head, body), "",
            f"bf16 tolerances: {bounds}."]


def scaling_table(rows: list[dict]) -> list[str]:
    """Per model, system and GPU count: tokens/s per GPU and in all, peak GiB per GPU, the scaling."""
    runs = {(r["config"]["model"], r["system"], r["config"]["gpus"], r["metric"]): r for r in rows
            if "engine" in r["config"] and "check" not in r["config"]}
    cases = list(dict.fromkeys(key[:3] for key in runs if key[3] != "scaling"))
    if not cases:
        return []
    body = []
    for model, system, gpus in cases:
        ratio = next((runs[key] for key in runs if key[:2] == (model, system) and key[3] == "scaling"), None)
        scaling = _fmt(ratio, ".2f") if gpus != 1 else ""
        body.append([model, system, str(gpus), *(_fmt(runs.get((model, system, gpus, metric)), spec)
                                                 for metric, spec in (("tokens_per_s_per_gpu", ",.0f"),
                                                                      ("tokens_per_s", ",.0f"),
                                                                      ("peak_allocated_gib", ".2f"))),
                     scaling])
    head = ["model", "system", "GPUs", "tokens/s per GPU", "tokens/s", "peak GiB per GPU", "scaling"]
    return ["### FSDP2 scaling (batch 1 of 4,096 tokens per GPU)", "", *report.markdown(head, body), "",
            f"Scaling is tokens/s on all GPUs over tokens/s on 1 (FSDP2 over one process); the target is "
            f"{SCALING_EFFICIENCY} x the GPU count (1.8x on 2)."]


def failures(rows: list[dict]) -> list[str]:
    """Each distinct error once, with the system."""
    seen = dict.fromkeys((row["system"], row["error"]) for row in rows
                         if row["value"] is None and row["error"] != NO_CUDA)
    return ["### Failures", "", *(f"- **{system}**: `{error}`" for system, error in seen)] if seen else []


def write_report(args: argparse.Namespace) -> int:
    """Replace (or append) --out's section in --markdown."""
    rows = load(args.out)
    if not rows:
        raise SystemExit(f"no records in {args.out}")
    name = args.out.name
    parts = [[f"## {name}", "", report.header(rows)], equality_table(rows), scaling_table(rows),
             failures(rows)]
    body = "\n\n".join("\n".join(part) for part in parts if part)
    text = f"<!-- begin {name} -->\n{body}\n<!-- end {name} -->"
    document = args.markdown.read_text() if args.markdown.exists() else report.TITLE
    args.markdown.write_text(report.replace_section(document, name, text))
    print(f"wrote {args.markdown}")
    return 0


# ------------------------------------------------------------------------------------------------
# Command line.


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    runs = argparse.ArgumentParser(add_help=False)
    runs.add_argument("--out", type=Path, help="JSON-lines results file (appended to)")
    runs.add_argument("--timeout", type=float, default=420, help="seconds per launch")
    runs.add_argument("--budget", type=float, help="seconds for the whole call")
    runs.add_argument("--logs", type=Path, help="launches' logs (default: next to --out)")
    runs.add_argument("--rerun", action="store_true", help="run cases that already succeeded in --out again")
    runs.add_argument("--worker", action="store_true", help="one process of a torchrun launch")
    equality_parser = commands.add_parser("equality", parents=[runs], help="sharded against single-GPU")
    equality_parser.add_argument("--models", default="tiny,1b", help=f"of {', '.join(MODELS)}")
    equality_parser.add_argument("--engines", default="fsdp2,zero3", help=f"of {', '.join(ENGINES)}")
    equality_parser.add_argument("--steps", type=int, default=20)
    equality_parser.add_argument("--model", choices=MODELS, help="worker: the model")
    equality_parser.add_argument("--engine", choices=ENGINES, help="worker: the engine")
    scale_parser = commands.add_parser("scale", parents=[runs], help="tokens/s on 1 and 2 GPUs")
    scale_parser.add_argument("--configs", default="L8-4k,Q7VL", help=f"of {', '.join(e2e_models.CONFIGS)}")
    scale_parser.add_argument("--systems", default="liger,fusetune", help=f"of {', '.join(SCALE_SYSTEMS)}")
    scale_parser.add_argument("--gpus", default="1,2", help="process counts (1 is the baseline)")
    scale_parser.add_argument("--steps", default="3,8", help="warm-up,timed")
    scale_parser.add_argument("--tiny", action="store_true", help="tiny models of the same architectures")
    scale_parser.add_argument("--config", choices=list(e2e_models.CONFIGS), help="worker: the configuration")
    scale_parser.add_argument("--system", choices=SCALE_SYSTEMS, help="worker: the system")
    report_parser = commands.add_parser("report", help="write --out's tables into --markdown")
    report_parser.add_argument("--out", type=Path, required=True, help="the JSON-lines results file")
    report_parser.add_argument("--markdown", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args(argv)
    if args.command == "report":
        return args
    if args.command == "scale":
        args.steps = tuple(int(n) for n in args.steps.split(","))
        if len(args.steps) != 2 or args.steps[1] < 1:
            parser.error("--steps is warm-up,timed with at least one timed step")
    if args.worker:
        needed = ("model", "engine") if args.command == "equality" else ("config", "system")
        if None in (getattr(args, name) for name in needed):
            parser.error(f"a {args.command} worker needs --{' and --'.join(needed)}")
        return args
    if args.out is None:
        parser.error("--out is required")
    args.logs = args.logs or args.out.with_name(args.out.stem + "-logs")
    if args.command == "equality":
        args.models = e2e._names(args.models, MODELS, "models")
        args.engines = e2e._names(args.engines, ENGINES, "engines")
    else:
        args.configs = e2e._names(args.configs, e2e_models.CONFIGS, "configs")
        args.systems = e2e._names(args.systems, SCALE_SYSTEMS, "systems")
        args.gpus = [int(n) for n in args.gpus.split(",") if n]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # transformers 5.2x renames gradient checkpointing (the old names stay until v6; 5.17 has only them).
    warnings.filterwarnings("ignore", r".*gradient_checkpointing.*deprecated", FutureWarning)
    sys.path.insert(0, str(HERE.parent))  # fusetune from this checkout
    if args.command == "report":
        return write_report(args)
    return worker(args) if args.worker else orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
