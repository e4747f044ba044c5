"""Two GPUs: sharded LoRA training equals one GPU's, and how the end-to-end step scales from 1 to 2 GPUs.

    python bench/multi_gpu.py equality --out FILE [--models tiny,1b,tiny-nf4,1b-nf4]
                                       [--engines fsdp2,zero3] [--dtypes bf16,fp32] [--steps 20]
    python bench/multi_gpu.py scale --out FILE [--configs L8-4k,Q7VL] [--systems liger,fusetune]
                                    [--gpus 1,2] [--steps 3,8] [--tiny] [--trace DIR]
    python bench/multi_gpu.py report --out FILE [--markdown bench/RESULTS.md]
    (common options of equality and scale: [--timeout 420] [--budget S] [--logs DIR] [--rerun])

The first two are orchestrators: every case runs in its own ``torchrun --standalone`` launch (a
worker: the same subcommand with ``--worker``, e.g. ``torchrun --nproc_per_node 2 bench/multi_gpu.py
equality --worker --model tiny --engine fsdp2 --dtype bf16 --steps 20 --out FILE``), with
``NCCL_NVLS_ENABLE=0`` (NVLink multicast off) in its environment, ``--timeout`` seconds at most, its
log under ``--logs`` (default: FILE's name + ``-logs``). Rank 0 prints one ``MULTI-GPU-RESULT
[records]`` line; the orchestrator appends the records to FILE (never truncating it) or, when the
worker crashed, timed out or printed none, records with value null and an ``error``, and the next case
runs. A case that already has a successful record in FILE (the same config: model, engine, dtype,
steps, ...) is skipped unless ``--rerun``, so the same command resumes after a call was cut short;
``--budget`` caps a call (a case is not started with less than a minute left). Without CUDA the
workers run on CPU processes over gloo, in float32 unless ``equality --dtypes`` asks for bf16
(``scale --tiny``: the tiny stand-ins of bench/e2e_models.py), which is how the plumbing is tested.

Equality (``equality``; records: system fusetune, config {check: equality, model, engine, gpus: 2,
batch, tokens, steps, dtype}). A Llama built from a config with seeded random weights (``tiny``: hidden
64, 2 layers, vocab 512; ``small``: the same 512 wide, its base weights big enough for ZeRO-3 to
partition; ``1b``: Llama-3.2-1B's config, 1.24 B parameters; ``tiny-nf4`` and
``1b-nf4``: QLoRA-FSDP, the same with every linear layer but the head quantised to NF4 by
``fusetune.quantize_4bit``, its bytes stored in the weights' dtype, FSDP2 only; tiny-nf4's layers are
multiples of 64 wide), PEFT LoRA r=16 (alpha 16, dropout 0, float32 adapters) on
q,k,v,o,gate,up,down, ``fusetune.apply``; ``--steps`` AdamW steps (lr 1e-3) on one fixed global batch
of 4 sequences (the same batch every step, so the loss falls and the adapters move far). Each of
``--dtypes`` is its own case (default: bf16 with CUDA, fp32 without):
``bf16``, bf16 base weights and bf16 autocast (CPU autocast on CPU processes); ``fp32``, float32
weights, no autocast, float32 matmuls (TF32 off). Three trainings per case, from the same initial
weights on the same batch. First rank 0 alone trains two unsharded copies, one after the other: the
reference, on the whole batch each step; and the noise reference, which does the sharded run's
arithmetic without sharding: each step it forwards and backwards the batch in the two halves the
ranks get (each half's loss over the whole batch's label count, times 2), the gradients accumulating,
averages them over the halves and takes one AdamW step. Then both ranks train, each on its half of the
batch, the loss normalised by the whole batch's label count (``num_items_in_batch``) and scaled by the
world size, as Trainer does (the engines average the gradients over the ranks). ``fsdp2``:
``fully_shard`` on each decoder layer, then the root (no mixed-precision policy: the frozen base stays
in its dtype, the adapters float32, as on one GPU). ``zero3``: DeepSpeed ZeRO-3 (stage 3, torch AdamW
as a client optimiser), run only where ``deepspeed`` is installed (else a record with error "deepspeed
not installed"), with DeepSpeed's ``bf16`` mode off in both dtypes: bf16 comes from the model's
weights and the autocast, as in the other runs, so every engine runs the same numerics. DeepSpeed's
bf16 mode would not (0.19.8, runtime/engine.py): ``_configure_distributed_model`` casts every floating
parameter to bf16 (``_cast_module_mixed_precision``; buffers are kept), the float32 adapters too, so
the module trains bf16 adapters whose float32 master copies, in the ZeRO-3 optimiser, start from the
rounded values; the gradients are reduce-scattered in bf16 (``communication_data_type`` defaults to
bf16 in that mode, float32 otherwise); and the weights gathered at the end are the bf16 copies.
Without it nothing is cast (the parameter dtype check is a no-op), ZeRO-3 gathers the bf16 base and
the float32 adapters in buckets of one dtype each, and the gradients are reduced in float32, as
FSDP2 reduces them. (DeepSpeed's own ``torch_autocast`` option is not used either: it would reduce the
gradients of every ``nn.Linear``, the adapters', in bf16.)

Metrics, each the sharded run against the reference: ``loss_max_rel_diff`` (the largest per-step
|sharded - single| / |single| loss difference; ``losses``, ``reference_losses`` and ``noise_losses``
keep every step), ``lora_rel_diff`` (||W_sharded - W_single|| / ||W_single|| over all LoRA weights
after the last step) and ``lora_update_rel_diff`` (the same difference over how far training moved
the weights, ||W_single - W_initial||, kept as ``update_norm``: the stricter one, since the weights
themselves include the random initial A matrices that both runs share). Every record also has
``noise_floor``, the same metric of the noise reference against the reference: what rounding alone
does when the matmuls have half the rows and the gradient is summed in two parts;
``diff_from_noise_reference``, the sharded run against the noise reference (small when the engine adds
nothing to that arithmetic); ``fixed_tolerance`` (TOLERANCES, per dtype); ``tolerance``, the effective
bound max(fixed_tolerance, NOISE_FACTOR x noise_floor); and ``within_tolerance`` (value <= tolerance).

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
MODELS = ("tiny", "small", "1b", "tiny-nf4", "1b-nf4")
# The QLoRA-FSDP checks: the model's linear layers (all but the head) quantised to NF4 by
# fusetune.quantize_4bit before PEFT, the packed bytes stored in the weights' dtype (the QLoRA-FSDP
# recipe, the storage FSDP2 shards), computing in it. FSDP2 only: ZeRO-3 does not shard 4-bit weights.
NF4_MODELS = ("tiny-nf4", "1b-nf4")
# fsdp2: FSDP2 shards every parameter (its defaults). fsdp2-frozen-whole: the frozen ones (LoRA's
# base weights: no gradient, no optimizer state) stay whole on every GPU, FSDP2 ignoring them, so no
# step gathers them. fsdp2-gathered: a layer's gathered parameters are kept from its forward to its
# backward (reshard_after_forward=False), one gather a layer a step instead of two.
FSDP2_ENGINES = ("fsdp2", "fsdp2-frozen-whole", "fsdp2-gathered")
ENGINES = (*FSDP2_ENGINES, "zero3")
SCALE_SYSTEMS = ("hf", "liger", "fusetune")
EQUALITY_METRICS = ("loss_max_rel_diff", "lora_rel_diff", "lora_update_rel_diff")
SCALE_METRICS = ("tokens_per_s_per_gpu", "tokens_per_s", "peak_allocated_gib", "static_gib", "loss")
EQUALITY_WORLD = 2
EQUALITY_BATCH = 4  # sequences in the fixed global batch; each of the two ranks trains on 2
EQUALITY_TOKENS = {"tiny": 64, "small": 64, "1b": 1024, "tiny-nf4": 64, "1b-nf4": 1024}
EQUALITY_LR = 1e-3
SCALING_EFFICIENCY = 0.9  # the scaling target: 0.9 x the GPU count, 1.8 x on 2 GPUs
NO_CUDA = "no CUDA: memory is measured on a GPU"  # the error of CPU runs' memory records
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}  # the equality check's --dtypes
# The verdict on a metric is value <= max(fixed bound, NOISE_FACTOR x noise floor), the noise floor
# being the same metric of the noise reference (module docstring), measured in the same call.
# NOISE_FACTOR: how far above the noise floor a sound engine may land. The noise reference shares
# every rounding that sharding brings (matmuls of half the rows, the gradient summed in two parts),
# so a sharded run that adds nothing else lands near the noise floor, but not always on it: AdamW
# over many steps amplifies rounding chaotically (a weight whose gradient is about 0 takes an
# lr-sized step of either sign), so two runs whose roundings differ by the same amount end at
# distances from the reference that differ by a factor of order 1 (sqrt(2) on average for
# independent perturbations of equal size). On CPU processes in bf16 (tiny, 3 and 10 steps) FSDP2
# landed exactly on the noise floor (the same arithmetic), ZeRO-3 (whose AdamW over flat partitions
# rounds differently) at 1.4x and 1.8x it. A fault (a gradient shard lost or not reduced, a loss
# normalised over the wrong count) moves the adapters apart by the order of the update itself
# (lora_update_rel_diff > 0.5), while FSDP2 on H200 in bf16 differed from the single run by 1.5%
# (tiny) and 4.1% (1b) of the update: 3 is a margin over the first that stays well below the second.
NOISE_FACTOR = 3
# Fixed bounds, per metric and dtype: the floor of the verdict, what a difference may always be
# whatever the noise reference shows. fp32 (float32 weights, no autocast): rounding only, the sums of
# two halves against one sum, amplified by the steps; the noise floor is far below them (on CPU
# processes: 8e-8 in the loss, 0 in the weights), so these bounds decide. bf16: the noise floor
# decides; the floor is one bf16 rounding of the compared quantity, 2^-8 = 3.9e-3 relative (the
# spacing of bf16 numbers), below which a difference cannot be told from bf16 rounding. It matters
# only when the noise reference lands unusually close to the reference (FSDP2 on H200 differed by
# 1.5e-5 to 5.3e-4 in the loss, 0.5% to 4% in the weights).
TOLERANCES = {
    "bf16": {"loss_max_rel_diff": 2**-8, "lora_rel_diff": 2**-8, "lora_update_rel_diff": 2**-8},
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


def small_llama_config():
    """The tiny Llama 512 wide: its base weights are above ZeRO-3's persistence threshold (1e5
    elements), so ZeRO-3 partitions them while it keeps the adapters whole, as at 1B, on CPU processes."""
    config = tiny_llama_config()
    config.hidden_size, config.intermediate_size = 512, 768
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 8, 4, 64
    return config


def tiny_nf4_llama_config():
    """The tiny Llama with every linear layer a multiple of 64 wide (bitsandbytes 0.50's CPU forward
    misplaces 4-bit blocks otherwise), for the QLoRA check on CPU processes."""
    config = tiny_llama_config()
    config.hidden_size, config.intermediate_size, config.head_dim = 128, 256, 32
    return config


EQUALITY_SPECS = {"tiny": patch_gpu.Spec("llama-tiny", tiny_llama_config),
                  "small": patch_gpu.Spec("llama-small", small_llama_config),
                  "1b": patch_gpu.Spec("llama-3.2-1b", llama_32_1b_config),
                  "tiny-nf4": patch_gpu.Spec("llama-tiny-nf4", tiny_nf4_llama_config),
                  "1b-nf4": patch_gpu.Spec("llama-3.2-1b", llama_32_1b_config)}


# ------------------------------------------------------------------------------------------------
# Records shared by workers and orchestrator.


def dtype_name() -> str:
    """The default training dtype of this machine's runs: bf16 on CUDA, float32 on CPU processes."""
    return "bf16" if torch.cuda.is_available() else "fp32"


def equality_config(model: str, engine: str, steps: int, dtype: str) -> dict:
    """The config of an equality check's records (``dtype``: bf16 or fp32, see DTYPES)."""
    return {"check": "equality", "model": model, "engine": engine, "gpus": EQUALITY_WORLD,
            "batch": EQUALITY_BATCH, "tokens": EQUALITY_TOKENS[model], "steps": steps, "dtype": dtype}


def scale_config(config_name: str, gpus: int, tiny: bool, engine: str = "fsdp2") -> dict:
    """The config of a scaling run's records (bench/e2e.py's, with the engine and the GPU count)."""
    config = {"model": e2e_models.model_of(config_name), "tokens": e2e_models.tokens_of(config_name, tiny),
              "variant": "bf16_lora", "engine": engine, "gpus": gpus}
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


def fsdp2_options(module: torch.nn.Module, engine: str) -> dict:
    """``fully_shard``'s options for ``module`` under ``engine`` (one of FSDP2_ENGINES)."""
    if engine == "fsdp2-frozen-whole":
        return {"ignored_params": {param for param in module.parameters() if not param.requires_grad}}
    if engine == "fsdp2-gathered":
        return {"reshard_after_forward": False}
    return {}


def shard(model: torch.nn.Module, engine: str = "fsdp2") -> int:
    """``fully_shard`` each decoder layer (and each vision block of a VLM: the model's
    ``_no_split_modules`` classes, as ``fusetune train`` wraps them), then the root, as ``engine``
    (one of FSDP2_ENGINES) says; the layer count."""
    from torch.distributed.fsdp import fully_shard

    from fusetune.train.config import DistributedSettings
    from fusetune.train.distributed import wrap_classes

    names = set(wrap_classes(model, DistributedSettings(strategy="fsdp2")))
    layers = [module for module in model.modules() if type(module).__name__ in names]
    device_mesh = mesh()
    for layer in reversed(layers):  # innermost first, as FSDP2 requires
        fully_shard(layer, mesh=device_mesh, **fsdp2_options(layer, engine))
    fully_shard(model, mesh=device_mesh, **fsdp2_options(model, engine))
    return len(layers)


def use_dtype(dtype: str) -> torch.dtype:
    """``dtype``'s weight dtype (DTYPES), with full float32 matmuls for fp32 (TF32 off, PyTorch's
    default, here made sure of). With :func:`autocast`, the one place where the equality check's
    dtypes differ."""
    if dtype == "fp32":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return DTYPES[dtype]


def autocast(dtype: str):
    """bf16 autocast on this process's device for ``dtype`` bf16 (as bench/e2e.py's steps run on
    CUDA), none for fp32."""
    return torch.autocast(common.device().type, dtype=torch.bfloat16, enabled=dtype == "bf16")


# ------------------------------------------------------------------------------------------------
# Equality worker.


def lora_model(name: str, dtype: str) -> torch.nn.Module:
    """The equality model, its base weights in ``dtype`` (the adapters float32: PEFT's default):
    seeded random weights, LoRA on every projection, patched by fusetune; the same weights and
    adapters in every process and every call."""
    import peft

    import fusetune

    weights_dtype = use_dtype(dtype)
    base = patch_gpu.build(EQUALITY_SPECS[name], weights_dtype, seed=e2e_models.SEED, fast_init=True)
    base.config.use_cache = False
    if name in NF4_MODELS:
        from fusetune.quantize import quantize_4bit

        quantize_4bit(base, compute_dtype=weights_dtype, quant_storage=weights_dtype)
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


def label_count(batch: dict) -> torch.Tensor:
    """The labels of ``batch`` that the loss counts (transformers shifts them by one): the
    ``num_items_in_batch`` every part of the batch is normalised by."""
    return (batch["labels"][:, 1:] != e2e_models.IGNORE).sum()


def part_of(batch: dict, index: int, parts: int) -> dict:
    """Part ``index`` of ``batch`` cut into ``parts`` equal runs of sequences: what rank ``index`` of
    ``parts`` processes trains on."""
    size = EQUALITY_BATCH // parts
    return {key: value[index * size:(index + 1) * size] for key, value in batch.items()}


def lora_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every LoRA weight as a float32 CPU tensor (whole, when sharded: a collective call)."""
    weights = {}
    for name, param in model.named_parameters():
        if "lora_" in name:
            whole = param.full_tensor() if hasattr(param, "full_tensor") else param
            weights[name] = whole.detach().float().cpu().clone()
    return weights


class AdamW:
    """torch AdamW over ``model``'s trainable parameters, called as a DeepSpeed engine is:
    ``backward(loss)`` adds the loss's gradients to the parameters'; ``step()`` divides the sums by
    ``average`` (the count of parts the gradients were summed over, which the engines average over the
    processes), takes the AdamW step and drops the gradients."""

    def __init__(self, model: torch.nn.Module, average: int = 1):
        self.params = [param for param in model.parameters() if param.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=EQUALITY_LR)
        self.average = average

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        if self.average != 1:
            for param in self.params:
                if param.grad is not None:
                    param.grad.div_(self.average)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def train(model, optimiser, parts: list[dict], items: torch.Tensor, scale: int, steps: int,
          dtype: str) -> torch.Tensor:
    """``steps`` training steps on the same ``parts`` of a batch: each step forwards and backwards the
    parts one after another (each loss over the whole batch's ``items`` labels, times ``scale``: the
    count the gradients are averaged over), the gradients accumulating, then ``optimiser.step()``.
    The per-step losses, float32 on the device: each the sum of the parts' losses."""
    losses = []
    for _ in range(steps):
        total = torch.zeros((), dtype=torch.float32, device=common.device())
        for part in parts:
            with autocast(dtype):
                loss = model(**part, num_items_in_batch=items).loss
            optimiser.backward(loss * scale)
            total += loss.detach().float()
        optimiser.step()
        losses.append(total)
    return torch.stack(losses)


def reference_run(name: str, steps: int, dtype: str, parts: int = 1) -> tuple[list[float], dict, dict]:
    """One process, no sharding; (losses, initial and final LoRA). ``parts`` 1: the reference, the
    whole batch each step. ``parts`` = the world size: the noise reference, the sharded run's
    arithmetic without the sharding: each step the ranks' parts of the batch one after another, each
    loss times ``parts`` as on the ranks, the gradients summed over the parts and divided by ``parts``
    (as the engines average them over the ranks; both exact for 2), then one AdamW step."""
    model = lora_model(name, dtype)
    batch = global_batch(name)
    initial = lora_weights(model)
    pieces = [part_of(batch, index, parts) for index in range(parts)]
    losses = train(model, AdamW(model, average=parts), pieces, label_count(batch), parts, steps, dtype)
    return losses.tolist(), initial, lora_weights(model)


def zero3(model: torch.nn.Module):
    """``model`` under DeepSpeed ZeRO-3 with its bf16 mode off (see the module docstring): the
    engine, which trains as ``AdamW`` does (``backward(loss)``, ``step()``)."""
    import deepspeed

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=EQUALITY_LR)
    # "bf16" off in both dtypes: on, DeepSpeed would cast the float32 adapters to bf16 and reduce
    # their gradients in bf16. The bf16 base weights and the autocast give the bf16 compute, and the
    # float32 gradients are reduced in float32, as FSDP2 and the noise reference sum them.
    config = {"train_micro_batch_size_per_gpu": EQUALITY_BATCH // EQUALITY_WORLD,
              "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 3},
              "bf16": {"enabled": False}, "communication_data_type": "fp32",
              "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def zero3_weights(engine) -> dict[str, torch.Tensor]:
    """Every LoRA weight of a ZeRO-3 engine, gathered whole (a collective call)."""
    import deepspeed

    params = [(name, param) for name, param in engine.module.named_parameters() if "lora_" in name]
    with deepspeed.zero.GatheredParameters([param for _, param in params]):
        return {name: param.detach().float().cpu() for name, param in params}


def sharded_run(name: str, engine: str, rank: int, world: int, steps: int,
                dtype: str) -> tuple[list[float], dict]:
    """Every process on its part of the batch under ``engine``; (the whole batch's losses: the
    processes' summed, final LoRA)."""
    import torch.distributed as dist

    model = lora_model(name, dtype)
    batch = global_batch(name)
    mine = [part_of(batch, rank, world)]
    if engine in FSDP2_ENGINES:
        shard(model, engine)
        losses = train(model, AdamW(model), mine, label_count(batch), world, steps, dtype)
        final = lora_weights(model)
    else:
        wrapped = zero3(model)
        losses = train(wrapped, wrapped, mine, label_count(batch), world, steps, dtype)
        final = zero3_weights(wrapped)
    dist.all_reduce(losses)
    return losses.tolist(), final


def norm_difference(ours: dict, theirs: dict, against: dict) -> float:
    """||ours - theirs|| / ||against|| over all tensors together."""
    diff_sq = sum((ours[name] - theirs[name]).double().square().sum().item() for name in theirs)
    ref_sq = sum(tensor.double().square().sum().item() for tensor in against.values())
    return patch_gpu.relative_error(diff_sq, ref_sq)


def step_differences(losses: list[float], reference_losses: list[float]) -> list[float]:
    """|loss - reference| / |reference| per step."""
    return [abs(a - b) / abs(b) for a, b in zip(losses, reference_losses, strict=True)]


def differences(reference: tuple, losses: list[float], final: dict) -> dict[str, float]:
    """The EQUALITY_METRICS of a run (its per-step losses and final LoRA) against ``reference``
    (losses, initial and final LoRA)."""
    reference_losses, initial, weights = reference
    moved = {name: weights[name] - initial[name] for name in weights}
    return {"loss_max_rel_diff": max(step_differences(losses, reference_losses)),
            "lora_rel_diff": norm_difference(final, weights, weights),
            "lora_update_rel_diff": norm_difference(final, weights, moved)}


def verdict(value: float, fixed: float, noise_floor: float) -> tuple[float, bool]:
    """(The effective bound max(fixed, NOISE_FACTOR x noise_floor), whether ``value`` is within it). A
    noise floor that is not a finite number (a diverged noise reference) leaves the fixed bound; a
    value that is not finite is never within."""
    bound = max(fixed, NOISE_FACTOR * noise_floor) if math.isfinite(noise_floor) else fixed
    return bound, bool(math.isfinite(value) and value <= bound)


def equality_records(config: dict, single: tuple, sharded: tuple, noise: tuple) -> list[dict]:
    """The three records of a sharded run (losses, final LoRA) against the reference (``single``:
    losses, initial and final LoRA), each judged against the noise reference's (``noise``, as
    ``single``) difference from the reference."""
    reference_losses, initial, reference = single
    losses, final = sharded
    values = differences(single, losses, final)
    floors = differences(single, noise[0], noise[2])
    from_noise = differences(noise, losses, final)
    moved_norm = math.sqrt(sum((reference[name] - initial[name]).double().square().sum().item()
                               for name in reference))
    extra = {"loss_max_rel_diff": {"losses": losses, "reference_losses": reference_losses,
                                   "noise_losses": noise[0],
                                   "step_rel_diff": step_differences(losses, reference_losses),
                                   "noise_step_rel_diff": step_differences(noise[0], reference_losses)},
             "lora_update_rel_diff": {"update_norm": moved_norm}}
    fixed = TOLERANCES[config["dtype"]]
    records = []
    for metric, value in values.items():
        tolerance, within = verdict(value, fixed[metric], floors[metric])
        records.append(common.record("fusetune", config, metric, value, tolerance=tolerance,
                                     within_tolerance=within, fixed_tolerance=fixed[metric],
                                     noise_floor=floors[metric], noise_factor=NOISE_FACTOR,
                                     diff_from_noise_reference=from_noise[metric], **extra.get(metric, {})))
    return records


def deepspeed_imports() -> bool:
    """Whether DeepSpeed is installed and imports."""
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return False
    return True


def equality(args: argparse.Namespace, rank: int, world: int) -> list[dict]:
    """The equality check of ``args.model`` under ``args.engine`` in ``args.dtype``: rank 0 alone
    trains the reference, then the noise reference (each freed before the next), then all ranks."""
    import torch.distributed as dist

    config = equality_config(args.model, args.engine, args.steps, args.dtype)
    if world != EQUALITY_WORLD:
        raise ValueError(f"the equality check runs on {EQUALITY_WORLD} processes, not {world}")
    if args.engine == "zero3" and args.model in NF4_MODELS:
        raise ValueError(f"{args.model} (4-bit weights) runs under fsdp2 only: ZeRO-3 does not shard 4-bit "
                         "weights; drop zero3 from --engines")
    if args.engine == "zero3" and not deepspeed_imports():
        return failed("fusetune", config, EQUALITY_METRICS, "deepspeed not installed")
    single = noise = None
    if rank == 0:
        single = reference_run(args.model, args.steps, args.dtype)
        common.release()
        noise = reference_run(args.model, args.steps, args.dtype, parts=world)
    common.release()
    dist.barrier()
    sharded = sharded_run(args.model, args.engine, rank, world, args.steps, args.dtype)
    return equality_records(config, single, sharded, noise) if rank == 0 else []


# ------------------------------------------------------------------------------------------------
# Scaling worker.


def timed_steps(model: torch.nn.Module, optimizer, batches: list[dict],
                warmup: int) -> tuple[list[float], float]:
    """bench/e2e.py's training steps; (losses, the slowest process's seconds over the timed steps)."""
    import torch.distributed as dist

    losses, seconds = [], []
    for batch in batches:
        start = time.perf_counter()
        losses.append(e2e.train_step(model, batch, optimizer))
        seconds.append(time.perf_counter() - start)
    slowest = torch.tensor(sum(seconds[warmup:]), dtype=torch.float64, device=common.device())
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return losses, slowest.item()


def profiled_step(model: torch.nn.Module, optimizer, batch: dict, path: Path) -> None:
    """One more training step under torch.profiler (host and GPU activity), its Chrome trace written
    to ``path`` (``bench/trace_summary.py`` reads it: how long the GPU sat idle, and how long NCCL's
    kernels ran)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.profiler.profile(activities=activities) as profiler:
        e2e.train_step(model, batch, optimizer)
        common.synchronize()
    profiler.export_chrome_trace(str(path))


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
    dtype = DTYPES[dtype_name()]  # bf16 on CUDA (bench/e2e.py's steps autocast there), float32 on CPU
    cpu_batch = e2e_models.inputs(model, tokens, args.tiny)
    trained = e2e.prepare(case, model, tokens, dtype, None)
    shard(trained, args.engine)
    common.synchronize()
    static = torch.cuda.memory_allocated() / e2e.GIB if torch.cuda.is_available() else None
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    batch = patch_gpu.to_device(cpu_batch, dtype)
    optimizer = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=1e-4)
    losses, seconds = timed_steps(trained, optimizer, [batch] * (warmup + timed), warmup)
    memory = memory_per_rank(static)
    if args.trace is not None:
        name = f"scale-{args.config}-{args.system}-{args.engine}-{world}gpu-rank{rank}.json.gz"
        profiled_step(trained, optimizer, batch, args.trace / name)
    if rank != 0:
        return []
    per_gpu = tokens * timed / seconds
    values = {"tokens_per_s_per_gpu": per_gpu, "tokens_per_s": per_gpu * world, "loss": losses[0],
              "peak_allocated_gib": _largest(memory, "peak_allocated_gib"),
              "static_gib": _largest(memory, "static_gib")}
    extra = {"steps": [warmup, timed], "timed_s": seconds, "losses": losses, "per_rank": memory,
             "system_version": e2e._version(e2e.PACKAGES.get(args.system))}
    config = scale_config(args.config, world, args.tiny, args.engine)
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
        config = equality_config(args.model, args.engine, args.steps, args.dtype)
    else:
        system, metrics = args.system, SCALE_METRICS
        config = scale_config(args.config, world, args.tiny, args.engine)
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
    """One job per model, dtype and engine."""
    jobs = []
    for model in args.models:
        for dtype in args.dtypes:
            for engine in args.engines:
                argv = ["equality", "--model", model, "--engine", engine, "--dtype", dtype,
                        "--steps", str(args.steps)]
                jobs.append(Job(f"equality-{model}-{engine}-{dtype}", EQUALITY_WORLD, argv, "fusetune",
                                equality_config(model, engine, args.steps, dtype), EQUALITY_METRICS))
    return jobs


def scale_jobs(args: argparse.Namespace) -> list[Job]:
    """One job per configuration, system and GPU count."""
    jobs, steps = [], ",".join(map(str, args.steps))
    for config in args.configs:
        for system in args.systems:
            for gpus in args.gpus:
                argv = ["scale", "--config", config, "--system", system, "--steps", steps,
                        "--engine", args.engine, *(["--tiny"] if args.tiny else []),
                        *(["--trace", str(args.trace)] if args.trace else [])]
                jobs.append(Job(f"scale-{config}-{system}-{args.engine}-{gpus}gpu", gpus, argv, system,
                                scale_config(config, gpus, args.tiny, args.engine), SCALE_METRICS))
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
            bound = f" (bound {row['tolerance']:.3g})" if "tolerance" in row else ""
            flag = "" if row.get("within_tolerance", True) else " (BEYOND TOLERANCE)"
            shown.append(f"{row['metric']} {row['value']:.4g}{bound}{flag}")
    return ", ".join(shown)


def scaling_records(args: argparse.Namespace) -> list[dict]:
    """A ``scaling`` record per configuration and system: tokens/s on the most GPUs over 1 GPU's."""
    rows = load(args.out)
    most = max(args.gpus)
    out = []
    for config_name in args.configs:
        for system in args.systems:
            one, many = (succeeded(rows, system, scale_config(config_name, gpus, args.tiny, args.engine),
                                   "tokens_per_s") for gpus in (1, most))
            config = {**scale_config(config_name, most, args.tiny, args.engine), "gpus": f"1->{most}"}
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
    """Per check (model, engine, dtype) and metric: the sharded run's difference from the reference,
    the noise floor, the effective bound and the verdict (the latest record of each)."""
    latest = {(r["config"]["model"], r["config"]["engine"], r["config"]["dtype"], r["metric"]): r
              for r in rows if r["config"].get("check") == "equality"}
    if not latest:
        return []
    body = []
    for (model, engine, dtype, metric), row in latest.items():
        verdict_cell = ""
        if row["value"] is not None:
            verdict_cell = "yes" if row.get("within_tolerance") else "**no**"
        noise = row.get("noise_floor")
        bound = row.get("tolerance")
        body.append([model, engine, dtype, str(row["config"]["steps"]), metric, _fmt(row, ".2e"),
                     "" if noise is None else format(noise, ".2e"),
                     "" if bound is None or row["value"] is None else format(bound, ".2e"), verdict_cell])
    head = ["model", "engine", "dtype", "steps", "metric", "sharded vs single", "noise floor", "bound",
            "within bound"]
    fixed = "; ".join(f"{dtype} " + ", ".join(f"{metric} {bound:.2g}" for metric, bound in bounds.items())
                      for dtype, bounds in TOLERANCES.items())
    note = (f"The noise floor is the same difference of an unsharded run that trains the ranks' halves of "
            f"the batch one after another, accumulating their gradients: what rounding alone does. The "
            f"bound is max(fixed bound, {NOISE_FACTOR} x noise floor); fixed bounds: {fixed}.")
    if any("noise_floor" not in row and row["value"] is not None for row in latest.values()):
        note += " Records without a noise floor are older ones, judged by the fixed bounds they carry."
    return ["### Sharded (2 GPUs) against one GPU", "", *report.markdown(head, body), "", note]


def scaling_table(rows: list[dict]) -> list[str]:
    """Per model, engine, system and GPU count: tokens/s per GPU and in all, peak GiB per GPU, the
    scaling."""
    runs = {(r["config"]["model"], r["config"]["engine"], r["system"], r["config"]["gpus"], r["metric"]): r
            for r in rows if "engine" in r["config"] and "check" not in r["config"]}
    cases = list(dict.fromkeys(key[:4] for key in runs if key[4] != "scaling"))
    if not cases:
        return []
    body = []
    for model, engine, system, gpus in cases:
        case = (model, engine, system)
        ratio = next((runs[key] for key in runs if key[:3] == case and key[4] == "scaling"), None)
        scaling = _fmt(ratio, ".2f") if gpus != 1 else ""
        body.append([model, engine, system, str(gpus),
                     *(_fmt(runs.get((model, engine, system, gpus, metric)), spec)
                       for metric, spec in (("tokens_per_s_per_gpu", ",.0f"), ("tokens_per_s", ",.0f"),
                                            ("peak_allocated_gib", ".2f"))),
                     scaling])
    head = ["model", "engine", "system", "GPUs", "tokens/s per GPU", "tokens/s", "peak GiB per GPU",
            "scaling"]
    return ["### FSDP2 scaling (batch 1 of 4,096 tokens per GPU)", "", *report.markdown(head, body), "",
            f"Scaling is tokens/s on all GPUs over tokens/s on 1 (FSDP2 over one process); the target is "
            f"{SCALING_EFFICIENCY} x the GPU count (1.8x on 2)."]


def failures(rows: list[dict]) -> list[str]:
    """Each distinct error of the latest record of a system, config and metric once, with the system
    (a failure that a later run of the same case replaced is not listed)."""
    latest = {(row["system"], json.dumps(row["config"], sort_keys=True), row["metric"]): row for row in rows}
    seen = dict.fromkeys((row["system"], row["error"]) for row in latest.values()
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
    equality_parser.add_argument("--dtypes", help=f"of {', '.join(DTYPES)} (default: bf16 with CUDA, "
                                 "fp32 without)")
    equality_parser.add_argument("--steps", type=int, default=20)
    equality_parser.add_argument("--model", choices=MODELS, help="worker: the model")
    equality_parser.add_argument("--engine", choices=ENGINES, help="worker: the engine")
    equality_parser.add_argument("--dtype", choices=list(DTYPES),
                                 help="worker: the dtype (default: as --dtypes)")
    scale_parser = commands.add_parser("scale", parents=[runs], help="tokens/s on 1 and 2 GPUs")
    scale_parser.add_argument("--configs", default="L8-4k,Q7VL", help=f"of {', '.join(e2e_models.CONFIGS)}")
    scale_parser.add_argument("--systems", default="liger,fusetune", help=f"of {', '.join(SCALE_SYSTEMS)}")
    scale_parser.add_argument("--gpus", default="1,2", help="process counts (1 is the baseline)")
    scale_parser.add_argument("--steps", default="3,8", help="warm-up,timed")
    scale_parser.add_argument("--tiny", action="store_true", help="tiny models of the same architectures")
    scale_parser.add_argument("--engine", default="fsdp2", choices=FSDP2_ENGINES, help="how FSDP2 shards")
    scale_parser.add_argument("--trace", type=Path,
                              help="after the timed steps, profile one more and write each rank's Chrome "
                                   "trace to this folder")
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
        if args.command == "equality":
            args.dtype = args.dtype or dtype_name()
        return args
    if args.out is None:
        parser.error("--out is required")
    args.logs = args.logs or args.out.with_name(args.out.stem + "-logs")
    if args.command == "equality":
        args.models = e2e._names(args.models, MODELS, "models")
        args.engines = e2e._names(args.engines, ENGINES, "engines")
        if "zero3" in args.engines and set(args.models) & set(NF4_MODELS):
            parser.error("the 4-bit models (-nf4) run under fsdp2 only: pass --engines fsdp2")
        args.dtypes = e2e._names(args.dtypes or dtype_name(), DTYPES, "dtypes")
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
