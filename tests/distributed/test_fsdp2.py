"""FSDP2 (``fully_shard``) over two CPU processes (gloo) gives the single-process loss and gradients.

A tiny random-weight Llama with PEFT LoRA, patched by ``fusetune.apply`` and sharded, runs one
forward and backward in two processes, each on its half of a batch; the summed loss and the
gathered gradients (``full_tensor()``) must equal one process's on the whole batch, unsharded and
patched. The ops take their PyTorch references (``TRITON_INTERPRET=0``, CPU tensors), so this
checks the patched modules and the fused loss under sharding, not the kernels.

Layouts: ``root`` shards each decoder layer and the root (the head is gathered with the root);
``accelerate`` is what accelerate 1.15 builds for Trainer's FSDP2 (each decoder layer, the input
embeddings, the head in a group of its own, or with the embeddings when tied, then the root), where
the head's weight is only gathered inside the head's own forward; ``linear`` also makes every
``nn.Linear`` of the layers a unit of its own (finer than fusetune's fused LoRA can read, so it
falls back to PEFT's modules). fusetune is applied before sharding, as the Trainer path does, or
after it. One case also takes an optimiser step, saves the adapter from the sharded model, and
the test loads it into an unsharded model. All cases run in one pair of processes, spawned once.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass

import pytest
import torch

from tests.distributed.processes import (
    FUSED_LORA_OPS,
    count_fused_calls,
    gloo_mesh,
    patched,
    run_cases,
    run_ranks,
    shard,
    step,
)

WORLD = 2
BATCH = 4
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Case:
    """One sharded run: the ``layout`` (root, accelerate or linear; see above) and the model."""

    layout: str
    targets: tuple[str, ...] = ("q_proj", "v_proj", "up_proj")
    tied: bool = False
    trainable_head: bool = False  # lm_head trained as a whole (not LoRA): the fused loss's gradient
    apply_after_shard: bool = False
    save: bool = False  # step, save the adapter, compare outputs after loading it unsharded


CASES = {
    "lora_root": Case("root"),
    "lora_accelerate": Case("accelerate"),
    "tied_accelerate": Case("accelerate", tied=True),
    "trainable_head_accelerate": Case("accelerate", trainable_head=True),
    "all_linear_root": Case("root", ALL_LINEAR),
    "all_linear_after_shard": Case("accelerate", ALL_LINEAR, apply_after_shard=True, save=True),
    "linear_units": Case("linear", ALL_LINEAR),
    "linear_units_after_shard": Case("linear", ALL_LINEAR, apply_after_shard=True),
}


def build(case: Case, patch: bool = True):
    """The PEFT LoRA model of ``case`` with the same weights in every process, patched by fusetune
    when ``patch``; returns it with the patch report (None when not patched)."""
    import peft

    from tests.patch.models import tiny_model

    model = tiny_model("llama", tie_word_embeddings=case.tied)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(case.targets), init_lora_weights=False)
    torch.manual_seed(1)
    model = peft.get_peft_model(model, lora)
    if case.trainable_head:
        model.get_base_model().lm_head.weight.requires_grad_(True)
    return model, (patched(model) if patch else None)


def trained_logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Take one SGD step on the gradients, then the eval logits of ``input_ids``."""
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def run_case(case: Case, rank: int, mesh, data: dict, calls: Counter, folder: str) -> dict:
    """``case`` in this process on its half of ``data``: the summed loss, the full gradients, what
    was patched, how often the fused LoRA ops ran (``calls``), and (``save``) the logits after a step."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from fusetune.nn.lora import projection_weights

    items = (data["labels"][:, 1:] != -100).sum()
    part = BATCH // WORLD
    mine = {k: v[rank * part : (rank + 1) * part] for k, v in data.items()}
    model, report = build(case, patch=not case.apply_after_shard)
    shard(model, mesh, case.layout, case.tied)
    if case.apply_after_shard:
        report = patched(model)
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    before = sum(calls[op] for op in FUSED_LORA_OPS)
    output = step(model, mine, items, WORLD)
    loss = output.loss.detach().clone()
    dist.all_reduce(loss)
    result = {
        "loss": loss,
        "grads": {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None},
        "fused_loss": output.logits is None,
        "patched": {kind: list(names) for kind, names in report.patched.items() if names},
        "left_alone": {kind: list(pairs) for kind, pairs in report.left_alone.items()},
        "fused_lora_calls": sum(calls[op] for op in FUSED_LORA_OPS) - before,
        "q_proj_at_rest": projection_weights(q_proj),
    }
    if case.save:
        result["logits"] = trained_logits(model, data["input_ids"])
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(model, options=options)  # collective; rank 0 gets it all
        if rank == 0:
            model.save_pretrained(folder, state_dict=state)
    return result


def worker(rank: int, folder: str) -> None:
    """Rank ``rank``: every case sharded over two processes; rank 0 saves the results in ``folder``."""
    import torch.distributed as dist

    from tests.patch.models import batch

    mesh = gloo_mesh(rank, WORLD, folder)
    # A case that fails fails alike in both processes (same code, same data): its traceback is
    # kept for its test and the next case runs.
    data = batch(size=BATCH)
    calls = count_fused_calls()
    run_cases(
        CASES,
        lambda name, case: run_case(case, rank, mesh, data, calls, os.path.join(folder, name)),
        rank,
        folder,
    )
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> tuple[dict, str]:
    """The results of every case from two processes, and the folder holding the saved adapters."""
    folder = str(tmp_path_factory.mktemp("fsdp2"))
    return run_ranks(worker, WORLD, folder), folder


@pytest.fixture
def reference_ops(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def expected_patched(case: Case, reference) -> dict:
    """What the sharded run's report must list as patched: the unsharded report's modules, but no
    fused LoRA over ``Linear`` units of their own."""
    unfused = case.layout == "linear" and case.apply_after_shard
    return {
        kind: list(names)
        for kind, names in reference.patched.items()
        if names and not (unfused and kind == "lora")
    }


@pytest.mark.parametrize("name", list(CASES))
def test_sharded_loss_and_gradients_equal_one_process(name, sharded, reference_ops):
    from tests.patch.models import batch

    case = CASES[name]
    model, reference = build(case)
    data = batch(size=BATCH)
    output = step(model, data, (data["labels"][:, 1:] != -100).sum(), 1.0)
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    result = sharded[0][name]
    assert "error" not in result, result.get("error")
    assert result["fused_loss"] and output.logits is None  # both ran fusetune's fused loss
    assert result["patched"] == expected_patched(case, reference)
    assert reference.patched["lora"]
    torch.testing.assert_close(result["loss"], output.loss.detach(), rtol=1e-5, atol=1e-5)
    assert sorted(result["grads"]) == sorted(expected)
    lora = [n for n in expected if "lora_A" in n or "lora_B" in n]
    assert len(lora) == 2 * len(case.targets) * 2  # A and B of each target in two layers
    if case.trainable_head:
        assert "base_model.model.lm_head.weight" in expected
    for grad_name, grad in expected.items():
        assert grad.abs().max() > 0, grad_name
        torch.testing.assert_close(result["grads"][grad_name], grad, rtol=1e-5, atol=1e-5, msg=grad_name)


@pytest.mark.parametrize("name", list(CASES))
def test_fused_lora_runs_where_fsdp2_gathers_whole_layers(name, sharded):
    """Inside a decoder layer's forward the fused LoRA ops run; with each ``Linear`` a unit of its
    own they never do (the weights stay sharded there) and the report or call says why."""
    case = CASES[name]
    result = sharded[0][name]
    assert "error" not in result, result.get("error")
    at_rest = result["q_proj_at_rest"]  # read outside any forward: a reason, never the shards
    if case.layout == "linear":
        assert result["fused_lora_calls"] == 0
        assert "fully_shard unit of its own" in at_rest
    else:
        assert result["fused_lora_calls"] > 0
        assert "sharded DTensors" in at_rest
    if case.layout == "linear" and case.apply_after_shard:
        reasons = [reason for _, reason in result["left_alone"]["lora"]]
        assert reasons and all("fully_shard unit of its own" in reason for reason in reasons)


def test_adapter_saved_from_shards_loads_on_one_process(sharded, reference_ops):
    """The adapter saved from the trained sharded model, loaded into an unsharded base model, and
    its merged weights, give the sharded model's outputs."""
    import peft

    from tests.patch.models import batch, tiny_model

    [name] = [name for name, case in CASES.items() if case.save]
    results, folder = sharded
    assert "error" not in results[name], results[name].get("error")
    loaded = peft.PeftModel.from_pretrained(tiny_model("llama"), os.path.join(folder, name)).eval()
    input_ids = batch(size=BATCH)["input_ids"]
    with torch.no_grad():
        adapter_logits = loaded(input_ids=input_ids).logits
        merged_logits = loaded.merge_and_unload()(input_ids=input_ids).logits
    untrained, _ = build(CASES[name], patch=False)
    with torch.no_grad():
        assert not torch.allclose(untrained.eval()(input_ids=input_ids).logits, adapter_logits, atol=1e-3)
    torch.testing.assert_close(adapter_logits, results[name]["logits"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(merged_logits, results[name]["logits"], rtol=1e-4, atol=1e-4)
