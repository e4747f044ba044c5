"""DeepSpeed ZeRO-3 over two CPU processes (gloo) gives the single-process loss and LoRA gradients.

A tiny random-weight Llama with PEFT LoRA on every linear layer, patched by ``fusetune.apply``,
runs one forward and backward under ``deepspeed.initialize`` with ZeRO stage 3 in two processes,
each on its half of a batch; the summed loss and the gathered LoRA gradients
(``deepspeed.utils.safe_get_full_grad``) must equal one unpatched, unpartitioned process's on the
whole batch. The ops take their PyTorch references (``TRITON_INTERPRET=0``, CPU tensors), so this
checks fusetune's patched model under DeepSpeed's partitioning, not the kernels.

Where fusetune meets ZeRO-3: the fused loss runs as ``lm_head``'s forward, where ZeRO-3 gathers
the head's weight, and must run (its ``linear_cross_entropy`` calls are counted). The fused LoRA
paths read the projections' weights from their parent's forward, outside the projections' own
gather, and fusetune keeps them off for parameters ZeRO-3 partitions (``ds_id`` / ``ds_status``),
so no fused LoRA op may run. (DeepSpeed's engine forward also gathers a partitioned parameter read
through a module attribute, registering it with the running module; fusetune does not rely on it.)
``apply`` before partitioning (the Trainer path: patch, then ``deepspeed.initialize``) fuses the
LoRA blocks at patch time and each call falls back to PEFT's modules; ``apply`` on a model built
under ``deepspeed.zero.Init`` (partitioned from the start), or after ``deepspeed.initialize``,
leaves them alone at patch time, saying why.

DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce op (C++, about a minute) in
``init_distributed``; it only serves ``inference_all_reduce``, so the workers skip it, as
``fusetune train`` does (``fusetune.train.distributed.skip_deepspeed_shm_op``), and every
collective runs on gloo.
"""

from __future__ import annotations

import os
import socket
from collections import Counter
from dataclasses import dataclass

import pytest
import torch

from tests.distributed.processes import count_fused_calls, run_cases, run_ranks

pytest.importorskip("deepspeed")

WORLD = 2
BATCH = 4
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ZERO3_REASON = "DeepSpeed ZeRO-3 partitions its weights"


@dataclass(frozen=True)
class Case:
    """One ZeRO-3 run: tied input and output embeddings or not, and when the parameters are
    partitioned: by ``deepspeed.initialize`` after ``apply`` (the default), as the base model is
    made under ``deepspeed.zero.Init`` (before ``apply``), or by ``deepspeed.initialize`` before
    ``apply`` (``apply_after_initialize``)."""

    tied: bool = False
    zero_init: bool = False
    apply_after_initialize: bool = False
    checkpointing: str | None = None  # fusetune's checkpointing of the decoder layers: "offload", "plain"


CASES = {
    "apply_then_initialize": Case(),
    "tied_apply_then_initialize": Case(tied=True),
    "zero_init_then_apply": Case(zero_init=True),
    "initialize_then_apply": Case(apply_after_initialize=True),
    # fusetune's checkpointing failed at the first backward under ZeRO-3 (an invalid gradient of shape
    # [64, 4] for a partitioned parameter's [0] placeholder).
    "checkpointed_offload": Case(checkpointing="offload"),
    "checkpointed_plain": Case(checkpointing="plain"),
}


def ds_config() -> dict:
    """ZeRO stage 3 for two processes of two samples each; a persistence threshold of 0 partitions
    every parameter (the default keeps a tiny model's small ones whole on every rank)."""
    return {
        "train_micro_batch_size_per_gpu": BATCH // WORLD,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "optimizer": {"type": "SGD", "params": {"lr": 0.0}},
        "zero_allow_untested_optimizer": True,
    }


def build(case: Case, patch: bool = True, partitioned: bool = False):
    """The PEFT LoRA model of ``case``, the same weights in every process, patched by fusetune when
    ``patch``; returns it with the patch report (None when not patched). ``partitioned``: the base
    model is made under ``deepspeed.zero.Init`` (see ``partitioned_base``) before PEFT wraps it."""
    import peft

    from tests.patch.models import tiny_model

    model = partitioned_base(case) if partitioned else tiny_model("llama", tie_word_embeddings=case.tied)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(ALL_LINEAR), init_lora_weights=False)
    torch.manual_seed(1)
    model = peft.get_peft_model(model, lora)
    return model, (fusetune_apply(model) if patch else None)


def partitioned_base(case: Case) -> torch.nn.Module:
    """The base model of ``case`` made as transformers makes it under ZeRO-3 (``HfDeepSpeedConfig``
    alive: within ``deepspeed.zero.Init``, each parameter partitioned as its module is made), then
    given the unpartitioned model's weights from rank 0, as ``from_pretrained`` loads a checkpoint."""
    import deepspeed
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    from tests.patch.models import tiny_model

    weights = tiny_model("llama", tie_word_embeddings=case.tied).state_dict()
    zero3 = HfDeepSpeedConfig(ds_config())  # noqa: F841 - transformers reads it through a weak reference
    try:
        model = tiny_model("llama", tie_word_embeddings=case.tied)
    finally:
        unset_hf_deepspeed_config()
    params = dict(model.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0), torch.no_grad():
        for name, param in params.items():
            param.copy_(weights[name])
    return model


def fusetune_apply(model: torch.nn.Module):
    """``fusetune.apply(model)``'s report."""
    import fusetune

    return fusetune.apply(model)


def run_case(case: Case, rank: int, data: dict, calls: Counter) -> dict:
    """``case`` in this process on its half of ``data``: the summed loss, the full LoRA gradients,
    what ``apply`` patched and left alone, and how often the fused ops ran."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad

    from fusetune.nn.lora import projection_weights

    items = (data["labels"][:, 1:] != -100).sum()
    part = BATCH // WORLD
    mine = {k: v[rank * part : (rank + 1) * part] for k, v in data.items()}
    model, report = build(case, patch=not case.apply_after_initialize, partitioned=case.zero_init)
    if case.checkpointing:
        from fusetune.checkpointing import enable_checkpointing

        enable_checkpointing(model, offload=case.checkpointing == "offload")
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config())
    if case.apply_after_initialize:
        report = fusetune_apply(model)
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    calls.clear()
    output = engine(**mine, num_items_in_batch=items)
    engine.backward(output.loss * WORLD)  # ZeRO-3 averages the gradients over the processes
    loss = output.loss.detach().clone()
    dist.all_reduce(loss)
    grads = {n: safe_get_full_grad(p) for n, p in model.named_parameters() if p.requires_grad}
    at_rest = projection_weights(q_proj)  # a reason, or weights that cannot be saved (process group)
    return {
        "loss": loss,
        "grads": {n: g.clone() for n, g in grads.items() if g is not None},
        "logits_none": output.logits is None,
        "partitioned": q_proj.base_layer.weight.numel() == 0,
        "patched": {kind: list(names) for kind, names in report.patched.items() if names},
        "left_alone": {kind: list(pairs) for kind, pairs in report.left_alone.items() if pairs},
        "calls": dict(calls),
        "q_proj_at_rest": at_rest if isinstance(at_rest, str) else type(at_rest).__name__,
    }


def worker(rank: int, folder: str, port: int) -> None:
    """Rank ``rank``: every case under ZeRO-3 over two processes; rank 0 saves the results."""
    os.environ.update(
        TRITON_INTERPRET="0",
        DS_ACCELERATOR="cpu",
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    import deepspeed
    import torch.distributed as dist

    from fusetune.train.distributed import skip_deepspeed_shm_op
    from tests.patch.models import batch

    skip_deepspeed_shm_op()
    deepspeed.init_distributed(dist_backend="gloo")
    torch.set_num_threads(1)
    data = batch(size=BATCH)
    calls = count_fused_calls()
    run_cases(CASES, lambda name, case: run_case(case, rank, data, calls), rank, folder)
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def zero3(tmp_path_factory) -> dict:
    """The results of every case from two processes under DeepSpeed ZeRO-3."""
    folder = str(tmp_path_factory.mktemp("zero3"))
    return run_ranks(worker, WORLD, folder, free_port())


@pytest.fixture
def reference_ops(monkeypatch):
    """The ops' PyTorch references in this process too."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def reference(case: Case):
    """The unpatched, unpartitioned model on the whole batch: its loss and LoRA gradients."""
    from tests.patch.models import batch

    model, _ = build(case, patch=False)
    data = batch(size=BATCH)
    output = model(**data, num_items_in_batch=(data["labels"][:, 1:] != -100).sum())
    output.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return output.loss.detach(), grads


@pytest.mark.parametrize("name", list(CASES))
def test_zero3_loss_and_lora_gradients_equal_one_process(name, zero3, reference_ops):
    result = zero3[name]
    assert "error" not in result, result.get("error")
    loss, grads = reference(CASES[name])
    assert result["partitioned"]
    torch.testing.assert_close(result["loss"], loss, rtol=1e-5, atol=1e-5)
    assert sorted(result["grads"]) == sorted(grads)
    assert len(grads) == 2 * len(ALL_LINEAR) * 2  # A and B of each projection in two layers
    for grad_name, grad in grads.items():
        assert grad.abs().max() > 0, grad_name
        torch.testing.assert_close(result["grads"][grad_name], grad, rtol=1e-5, atol=1e-5, msg=grad_name)


@pytest.mark.parametrize("name", list(CASES))
def test_fused_loss_runs_and_fused_lora_falls_back(name, zero3):
    """The fused loss ran (once per process, in lm_head's forward, no logits); no fused LoRA op ran
    on partitioned weights, and the report says what ``apply`` saw."""
    case, result = CASES[name], zero3[name]
    assert "error" not in result, result.get("error")
    assert result["calls"].get("linear_cross_entropy") == 1 and result["logits_none"]
    assert result["patched"].get("loss")
    assert not result["calls"].get("lora_linear") and not result["calls"].get("lora_glu_mlp")
    assert ZERO3_REASON in result["q_proj_at_rest"]
    if case.zero_init or case.apply_after_initialize:
        assert "lora" not in result["patched"]
        reasons = [reason for _, reason in result["left_alone"]["lora"]]
        assert len(reasons) == 4 and all(ZERO3_REASON in reason for reason in reasons)
    else:
        assert len(result["patched"]["lora"]) == 4  # attention and MLP of each layer, fused at rest
