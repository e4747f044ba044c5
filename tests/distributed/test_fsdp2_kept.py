"""FSDP2 with fusetune's offloaded checkpointing keeping the LoRA projections' outputs, over two CPU
processes (gloo): the single-process loss and gradients of the same model without checkpointing.

Kept projections are what ``enable_checkpointing`` does by default for layer calls of 8,192 tokens
or more, the long-context runs most likely to be sharded. Under FSDP2 a decoder layer's weights
are gathered inside its forward, and the recompute accumulates the gradients itself (see
``fusetune.checkpointing``); the recompute must still be given the kept outputs and give the
unsharded gradients. The fused kernels run interpreted (``TRITON_INTERPRET=1``) in every process:
their reference path offers nothing to keep.
"""

from __future__ import annotations

import os
from collections import Counter

import torch

from tests.distributed.processes import gloo_mesh, patched, run_cases, run_ranks, shard, step

WORLD = 2
BATCH = 4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = {"root": "root", "accelerate": "accelerate"}


def build():
    """The tiny PEFT LoRA Llama every process starts from (same weights), patched by fusetune."""
    import peft

    from tests.patch.models import tiny_model

    model = tiny_model("llama")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    torch.manual_seed(1)
    model = peft.get_peft_model(model, config)
    patched(model)
    return model


def count_given_projections(calls: Counter) -> None:
    """Count the fused projections' calls in ``calls``: "given" where a recompute was handed the
    kept outputs, "computed" otherwise."""
    from fusetune.ops import lora

    original = lora._project

    def counting(rows, group, given=None):
        calls["given" if given is not None else "computed"] += 1
        return original(rows, group, given)

    lora._project = counting


def run_case(layout: str, rank: int, mesh, data: dict, calls: Counter) -> dict:
    from fusetune.checkpointing import enable_checkpointing

    items = (data["labels"][:, 1:] != -100).sum()
    part = BATCH // WORLD
    mine = {k: v[rank * part : (rank + 1) * part] for k, v in data.items()}
    model = build()
    enable_checkpointing(model, offload=True, keep_projections=True)
    shard(model, mesh, layout)
    calls.clear()
    output = step(model, mine, items, WORLD)
    loss = output.loss.detach().clone()
    torch.distributed.all_reduce(loss)
    return {"loss": loss, "calls": dict(calls),
            "grads": {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}}


def worker(rank: int, folder: str) -> None:
    import torch.distributed as dist

    from tests.patch.models import batch

    mesh = gloo_mesh(rank, WORLD, folder)
    os.environ["TRITON_INTERPRET"] = "1"  # gloo_mesh picks the references; the kept path needs the kernels
    calls = Counter()
    count_given_projections(calls)
    data = batch(size=BATCH)
    run_cases(CASES, lambda name, layout: run_case(layout, rank, mesh, data, calls), rank, folder)
    dist.barrier()
    dist.destroy_process_group()


def test_sharded_checkpointed_steps_keeping_projections_equal_one_unsharded_process(tmp_path, monkeypatch):
    from tests.patch.models import batch

    results = run_ranks(worker, WORLD, str(tmp_path))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = build()
    data = batch(size=BATCH)
    output = step(model, data, (data["labels"][:, 1:] != -100).sum(), 1.0)
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert len(expected) == 2 * len(TARGETS) * 2  # A and B of each target in two layers
    for layout, result in results.items():
        assert "error" not in result, result.get("error")
        # Two layers of a q-k-v call and an o call: four computed forward, four given to the
        # recompute; the MLP's gate-up and down calls are computed.
        assert result["calls"]["given"] == 4, (layout, result["calls"])
        torch.testing.assert_close(result["loss"], output.loss.detach(), rtol=1e-5, atol=1e-5)
        assert sorted(result["grads"]) == sorted(expected)
        for name, grad in expected.items():
            assert grad.abs().max() > 0, name
            torch.testing.assert_close(result["grads"][name], grad, rtol=1e-4, atol=1e-5,
                                       msg=f"{layout}: {name}")
