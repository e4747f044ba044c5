"""Running a test's worker in two spawned processes, its cases inside them, and reading back what
rank 0 saved; counting the fused ops' calls inside the workers; the FSDP2 workers' set-up, sharding
and training step."""

from __future__ import annotations

import os
import traceback
from collections import Counter
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.multiprocessing as mp


def run_ranks(worker: Callable, world: int, folder: str, *args, timeout: float = 300) -> dict:
    """Start ``worker(rank, folder, *args)`` in ``world`` spawned processes, wait for them (killing
    any still running after ``timeout`` seconds), require every exit code to be 0, and return the
    ``results.pt`` the workers left in ``folder``."""
    context = mp.get_context("spawn")
    processes = [context.Process(target=worker, args=(rank, folder, *args)) for rank in range(world)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=timeout)
        if process.is_alive():
            process.kill()
            process.join()
    assert all(p.exitcode == 0 for p in processes), f"exit codes {[p.exitcode for p in processes]}"
    return torch.load(os.path.join(folder, "results.pt"))


def run_cases(cases: dict, run: Callable, rank: int, folder: str) -> None:
    """``run(case)`` for every case in this process; rank 0 saves the results (a failing case's
    traceback under ``error``, so its own test reports it) to ``folder``/results.pt for ``run_ranks``.
    A case fails alike in every process, so the processes stay in step."""
    results = {}
    for name, case in cases.items():
        try:
            results[name] = run(name, case)
        except Exception:  # noqa: BLE001 - reported by the case's test
            results[name] = {"error": traceback.format_exc()}
    if rank == 0:
        torch.save(results, os.path.join(folder, "results.pt"))


def count_calls(module, name: str, calls: Counter) -> None:
    """Count in ``calls`` every call of ``module.name`` from here on."""
    function = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls[name] += 1
        return function(*args, **kwargs)

    setattr(module, name, wrapper)


FUSED_LORA_OPS = ("lora_linear", "lora_glu_mlp")


def count_fused_calls() -> Counter:
    """Counters of the fused loss (``linear_cross_entropy``) and the fused LoRA ops
    (``FUSED_LORA_OPS``), as the patched modules call them, from here on."""
    import fusetune.nn.lora
    import fusetune.patch.lora
    import fusetune.patch.loss

    calls = Counter()
    count_calls(fusetune.patch.loss, "linear_cross_entropy", calls)
    count_calls(fusetune.patch.lora, "lora_linear", calls)
    count_calls(fusetune.nn.lora, "lora_glu_mlp", calls)
    return calls


def gloo_mesh(rank: int, world: int, folder: str):
    """Join the ``world`` CPU processes of a test over gloo (rendezvous in ``folder``) and return
    their one-dimensional device mesh. fusetune's ops take their PyTorch references there
    (``TRITON_INTERPRET=0``, CPU tensors): the workers check sharding, not the kernels."""
    os.environ["TRITON_INTERPRET"] = "0"
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group(
        "gloo",
        init_method=f"file://{folder}/store",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=120),
    )
    torch.set_num_threads(1)
    return init_device_mesh("cpu", (world,))


def patched(model: torch.nn.Module):
    """``fusetune.apply(model)``'s report; the fused loss must be among what it patched."""
    import fusetune

    report = fusetune.apply(model)
    assert report.patched["loss"], report
    return report


def shard(model: torch.nn.Module, mesh, layout: str, tied: bool = False) -> None:
    """``fully_shard`` the PEFT-wrapped causal LM ``model`` in ``layout``, innermost units first (as
    FSDP2 requires): ``root`` shards each decoder layer and the root; ``accelerate`` also the input
    embeddings and the head (one group with the embeddings when ``tied``), as accelerate does;
    ``linear`` also every ``nn.Linear`` of the layers on its own."""
    from torch.distributed.fsdp import fully_shard

    inner = model.get_base_model()
    for layer in inner.model.layers:
        if layout == "linear":
            for module in layer.modules():
                if isinstance(module, torch.nn.Linear):
                    fully_shard(module, mesh=mesh)
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
