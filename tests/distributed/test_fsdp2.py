"""FSDP2 (``fully_shard``) over two CPU processes (gloo) gives the single-process loss and gradients.

A tiny random-weight Llama with PEFT LoRA, patched by ``fusetune.apply`` and then sharded, runs one
forward and backward in two processes, each on its half of a batch; the summed loss and the
gathered gradients (``full_tensor()``) must equal one process's on the whole batch. The ops take
their PyTorch references (``TRITON_INTERPRET=0``, CPU tensors), so this checks the patched
modules and the fused loss under sharding, not the kernels.

Two layouts: ``root`` shards each decoder layer and the root (the head is gathered with the root);
``accelerate`` is what accelerate 1.15 builds for Trainer's FSDP2 (each decoder layer, the input
embeddings, the head in a group of its own, or with the embeddings when tied, then the root), where
the head's weight is only gathered inside the head's own forward. Cases: LoRA, tied embeddings,
and a trainable ``lm_head`` (not LoRA-wrapped, so the fused loss still runs and its gradient is
checked too). All cases run in one pair of processes, spawned once for the module.
"""

from __future__ import annotations

import os
import traceback
from datetime import timedelta

import pytest
import torch
import torch.multiprocessing as mp

WORLD = 2
BATCH = 4
# case -> (layout, tied embeddings, trainable lm_head)
CASES = {
    "lora_root": ("root", False, False),
    "lora_accelerate": ("accelerate", False, False),
    "tied_accelerate": ("accelerate", True, False),
    "trainable_head_accelerate": ("accelerate", False, True),
}


def build(case: str) -> torch.nn.Module:
    """The PEFT LoRA model of ``case``, patched by fusetune, with the same weights in every process."""
    import peft

    import fusetune
    from tests.patch.models import tiny_model

    _, tied, trainable_head = CASES[case]
    model = tiny_model("llama", tie_word_embeddings=tied)
    lora = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False
    )
    torch.manual_seed(1)
    model = peft.get_peft_model(model, lora)
    if trainable_head:
        model.get_base_model().lm_head.weight.requires_grad_(True)
    report = fusetune.apply(model)
    assert report.patched["loss"], report
    return model


def shard(model: torch.nn.Module, layout: str, tied: bool, mesh) -> None:
    from torch.distributed.fsdp import fully_shard

    inner = model.get_base_model()
    for layer in inner.model.layers:
        fully_shard(layer, mesh=mesh)
    if layout == "accelerate":
        if tied:
            fully_shard([inner.model.embed_tokens, inner.lm_head], mesh=mesh)
        else:
            fully_shard(inner.model.embed_tokens, mesh=mesh)
            fully_shard(inner.lm_head, mesh=mesh, reshard_after_forward=False)
    fully_shard(model, mesh=mesh)


def step(model: torch.nn.Module, inputs: dict, items: torch.Tensor, scale: float):
    """One forward and backward as Trainer runs it: the loss over the whole batch's label count,
    scaled by the number of processes (FSDP averages the gradients over them)."""
    output = model(**inputs, num_items_in_batch=items)
    (output.loss * scale).backward()
    return output


def worker(rank: int, store: str, out: str) -> None:
    """Rank ``rank``: every case sharded over two processes; rank 0 saves the results to ``out``."""
    os.environ["TRITON_INTERPRET"] = "0"
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from tests.patch.models import batch

    # A case that fails fails alike in both processes (same code, same data): its traceback is
    # kept for its test and the next case runs.
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120)
    )
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (WORLD,))
    data = batch(size=BATCH)
    items = (data["labels"][:, 1:] != -100).sum()
    part = BATCH // WORLD
    mine = {k: v[rank * part : (rank + 1) * part] for k, v in data.items()}
    results = {}
    for case, (layout, tied, _) in CASES.items():
        try:
            model = build(case)
            shard(model, layout, tied, mesh)
            output = step(model, mine, items, WORLD)
            loss = output.loss.detach().clone()
            dist.all_reduce(loss)
            grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
            results[case] = {"loss": loss, "grads": grads, "fused": output.logits is None}
        except Exception:  # noqa: BLE001 - reported by the case's test
            results[case] = {"error": traceback.format_exc()}
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("fsdp2")
    out = str(folder / "results.pt")
    context = mp.get_context("spawn")
    processes = [context.Process(target=worker, args=(r, str(folder / "store"), out)) for r in range(WORLD)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=300)
        if process.is_alive():
            process.kill()
            process.join()
    assert all(p.exitcode == 0 for p in processes), f"exit codes {[p.exitcode for p in processes]}"
    return torch.load(out)


@pytest.fixture
def reference_ops(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_loss_and_gradients_equal_one_process(case, sharded, reference_ops):
    from tests.patch.models import batch

    model = build(case)
    data = batch(size=BATCH)
    output = step(model, data, (data["labels"][:, 1:] != -100).sum(), 1.0)
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    result = sharded[case]
    assert "error" not in result, result.get("error")
    assert result["fused"] and output.logits is None  # both ran fusetune's fused loss
    torch.testing.assert_close(result["loss"], output.loss.detach(), rtol=1e-5, atol=1e-5)
    assert sorted(result["grads"]) == sorted(expected)
    lora = [n for n in expected if "lora_A" in n or "lora_B" in n]
    assert len(lora) == 2 * 3 * 2  # A and B of three projections in two layers
    if CASES[case][2]:
        assert "base_model.model.lm_head.weight" in expected
    for name, grad in expected.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(result["grads"][name], grad, rtol=1e-5, atol=1e-5, msg=name)
