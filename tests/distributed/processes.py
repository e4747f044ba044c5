"""Running a test's worker in two spawned processes and reading back what rank 0 saved."""

from __future__ import annotations

import os
from collections.abc import Callable

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
