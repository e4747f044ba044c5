"""QLoRA under FSDP2 over two CPU processes (gloo): 4-bit base weights sharded, the single-process result.

A tiny random-weight Llama (every linear layer a multiple of 64 wide: bitsandbytes 0.50's CPU
forward misplaces blocks otherwise) is quantised to NF4 by ``fusetune.quantize_4bit``, gets PEFT
LoRA on every linear layer, is patched by ``fusetune.apply`` and sharded with ``fully_shard`` on
each decoder layer and the root. Each process runs one forward and backward on its half of a batch;
the summed loss and the gathered LoRA gradients must equal one process's on the whole batch with the
same quantised weights, unsharded and unpatched: PEFT's bitsandbytes layers over bitsandbytes' own
4-bit matmul (computing in float32, as the fused path does here).

At rest each packed weight is a DTensor holding half the bytes. FSDP2 gathers it as a plain tensor
without bitsandbytes' ``quant_state``; the fused LoRA ops read it with the layer's state
(``fusetune.nn.lora.base_weight``), and must run for every projection. Cases: bytes stored as
bfloat16 (the QLoRA-FSDP storage the train path uses under fsdp2) and as uint8; fusetune applied
after sharding (the patch-time check reads the gathered bytes); every linear layer a unit of its
own, where the fused path cannot read the weights and PEFT's bitsandbytes layers run on the
gathered tensor instead. The ops take their PyTorch references (``TRITON_INTERPRET=0``, CPU
tensors). All cases run in one pair of processes, spawned once.
"""

from __future__ import annotations

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

pytest.importorskip("bitsandbytes")

WORLD = 2
BATCH = 4
LAYERS = 2  # tests.patch.models.tiny_model's decoder layers


@dataclass(frozen=True)
class Case:
    """One sharded run: how the packed bytes are stored and the ``layout`` (``root`` or ``linear``:
    see ``tests.distributed.processes.shard``)."""

    storage: torch.dtype = torch.bfloat16
    layout: str = "root"
    apply_after_shard: bool = False


CASES = {
    "bf16_storage": Case(),
    "uint8_storage": Case(torch.uint8),
    "bf16_storage_after_shard": Case(apply_after_shard=True),
    "linear_units": Case(layout="linear"),
}


def build(case: Case) -> torch.nn.Module:
    """The NF4-quantised PEFT LoRA model of ``case``, the same weights in every process."""
    import peft

    from fusetune.quantize import quantize_4bit
    from tests.patch.models import tiny_model

    model = tiny_model("llama", intermediate_size=128)
    quantize_4bit(model, compute_dtype=torch.float32, quant_storage=case.storage)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    torch.manual_seed(1)
    return peft.get_peft_model(model, lora)


def run_case(case: Case, rank: int, mesh, data: dict, calls: Counter) -> dict:
    """``case`` in this process on its half of ``data``: the summed loss, the full LoRA gradients,
    what was patched, how often each fused LoRA op ran, and the first q_proj weight at rest."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    items = (data["labels"][:, 1:] != -100).sum()
    part = BATCH // WORLD
    mine = {k: v[rank * part : (rank + 1) * part] for k, v in data.items()}
    model = build(case)
    report = None if case.apply_after_shard else patched(model)
    shard(model, mesh, case.layout)
    if case.apply_after_shard:
        report = patched(model)
    weight = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    before = {op: calls[op] for op in FUSED_LORA_OPS}
    output = step(model, mine, items, WORLD)
    loss = output.loss.detach().clone()
    dist.all_reduce(loss)
    return {
        "loss": loss,
        "grads": {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None},
        "fused_loss": output.logits is None,
        "patched_lora": list(report.patched["lora"]),
        "fused_lora_calls": {op: calls[op] - before[op] for op in FUSED_LORA_OPS},
        "weight_at_rest": (
            isinstance(weight, DTensor),
            weight.dtype,
            weight.to_local().numel(),
            weight.numel(),
        ),
    }


def worker(rank: int, folder: str) -> None:
    """Rank ``rank``: every case sharded over two processes; rank 0 saves the results in ``folder``."""
    import torch.distributed as dist

    from tests.patch.models import batch

    mesh = gloo_mesh(rank, WORLD, folder)
    data = batch(size=BATCH)
    calls = count_fused_calls()
    run_cases(CASES, lambda name, case: run_case(case, rank, mesh, data, calls), rank, folder)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> dict:
    """The results of every case from two processes."""
    return run_ranks(worker, WORLD, str(tmp_path_factory.mktemp("fsdp2_qlora")))


@pytest.fixture(scope="module")
def reference() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss and LoRA gradients of one process on the whole batch: the same quantised weights
    (uint8 storage: the same bytes), unsharded and unpatched."""
    from tests.patch.models import batch

    model = build(Case(torch.uint8))
    data = batch(size=BATCH)
    output = step(model, data, (data["labels"][:, 1:] != -100).sum(), 1.0)
    return output.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", list(CASES))
def test_sharded_qlora_loss_and_gradients_equal_one_unpatched_process(name, sharded, reference):
    loss, expected = reference
    result = sharded[name]
    assert "error" not in result, result.get("error")
    assert result["fused_loss"]
    torch.testing.assert_close(result["loss"], loss, rtol=1e-5, atol=1e-5)
    assert sorted(result["grads"]) == sorted(expected)
    assert len(expected) == 2 * 7 * LAYERS and all("lora_" in n for n in expected)  # A, B of 7 linears
    for grad_name, grad in expected.items():
        assert grad.abs().max() > 0, grad_name
        torch.testing.assert_close(result["grads"][grad_name], grad, rtol=1e-5, atol=1e-5, msg=grad_name)


@pytest.mark.parametrize("name", list(CASES))
def test_4bit_weights_are_sharded_and_the_fused_lora_ops_read_them_gathered(name, sharded):
    """Half of each packed weight per process at rest; every attention and MLP patched, and in a
    decoder layer's forward each runs its fused op (q, k, v as one call): none with ``Linear`` units."""
    case = CASES[name]
    result = sharded[name]
    assert "error" not in result, result.get("error")
    is_dtensor, dtype, local, whole = result["weight_at_rest"]
    assert is_dtensor and dtype == case.storage and local * WORLD == whole
    assert len(result["patched_lora"]) == 2 * LAYERS  # self_attn and mlp of each layer
    fused = {"lora_linear": 2 * LAYERS, "lora_glu_mlp": LAYERS}  # (q, k, v) and o; the MLP
    assert result["fused_lora_calls"] == (dict.fromkeys(fused, 0) if case.layout == "linear" else fused)
