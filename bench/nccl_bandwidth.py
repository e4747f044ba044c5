"""What the GPUs' link gives FSDP2: all-gather and reduce-scatter bandwidth between the processes.

FSDP2 all-gathers every sharded parameter before a layer's forward and again before its backward,
and reduce-scatters the gradients; how much of that the step hides depends on how fast the link is.
This times ``all_gather_into_tensor`` and ``reduce_scatter_tensor`` of bf16 buffers (the size a rank
receives, ``--mib``), as FSDP2 calls them, on a ``torchrun`` launch, and prints NCCL's bus bandwidth
(algorithm bandwidth x (world - 1) / world) with the GPUs' topology. Rank 0 writes one record per
collective to ``--out`` (a fresh file). GPUs only (NCCL).

    torchrun --standalone --nproc_per_node 2 bench/nccl_bandwidth.py --out FILE [--mib 1024]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import common
import torch
import torch.distributed as dist


def topology() -> str:
    """``nvidia-smi topo -m``: NVLink (NV#) or PCIe paths between the GPUs ('' without nvidia-smi)."""
    try:
        return subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def seconds_per_call(collective, repeats: int) -> float:
    for _ in range(3):
        collective()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        collective()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--mib", type=int, default=1024, help="bytes a rank receives a call, MiB")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    elements = args.mib * 2**20 // 2
    whole = torch.empty(elements, dtype=torch.bfloat16, device="cuda")
    shard = torch.randn(elements // world, dtype=torch.bfloat16, device="cuda")
    collectives = {
        "all_gather": lambda: dist.all_gather_into_tensor(whole, shard),
        "reduce_scatter": lambda: dist.reduce_scatter_tensor(shard, whole),
    }
    times = {name: seconds_per_call(call, args.repeats) for name, call in collectives.items()}
    if rank == 0:
        common.open_results(args.out)
        print(topology(), flush=True)
        for name, seconds in times.items():
            bus = elements * 2 / seconds * (world - 1) / world / 1e9
            common.record("nccl", {"op": name, "world": world, "mib": args.mib}, "bus_gb_per_s", bus,
                          ms=seconds * 1e3)
            print(f"{name} of {args.mib} MiB on {world} GPUs: {seconds * 1e3:.2f} ms, bus {bus:.0f} GB/s",
                  flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
