"""``fusetune train --nproc 2 --distributed.strategy fsdp2`` for real: two CPU processes over gloo.

The embedded demo (a tiny random-weight Qwen2-VL) trains for two steps under FSDP2, with a held-out
set, a checkpoint and ``save_merged``; then a copy of that output folder is resumed for one more
step. The ops take their PyTorch references (``TRITON_INTERPRET=0``, CPU tensors). Checked:

- the run is sharded (accelerate's FSDP checkpoint file, not DDP), both ranks take part (a RNG
  state per rank) and the logged losses are finite; only rank 0 prints, and the output folder
  holds exactly the expected files;
- the adapter consolidated from the shards, loaded by PEFT on an unsharded demo model in this
  process, gives the held-out loss that the sharded model reported at the end (Trainer's
  ``evaluate``: one batch of two samples per rank, the mean of the two batch losses), and a loss
  far from the untrained model's;
- ``--resume`` continues from ``checkpoint-2``: it says so, leaves that checkpoint as it was (a
  fresh run would write it again) and ends at step 3;
- ``merged/`` loads with ``from_pretrained`` in one process and equals the adapter merged into the
  base here, rounded to bfloat16 as it is saved.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.distributed.train_runs import (
    check_first_run,
    check_resumed,
    load_merged,
    mean_loss,
    run_args,
    sample_batches,
    train_and_resume,
    unsharded_with_adapter,
)

RUN = run_args("fsdp2")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The two-step run (``first``) and its copy resumed to step 3 (``resumed``), with their output."""
    return train_and_resume(tmp_path_factory.mktemp("fsdp2"), RUN)


def test_both_ranks_train_sharded_and_only_rank_0_writes(runs):
    check_first_run(runs["first"], runs["first_run"])
    assert (runs["first"] / "checkpoint-2" / "pytorch_model_fsdp.bin").is_file()  # accelerate's FSDP save


def test_adapter_from_the_shards_gives_the_sharded_models_held_out_loss(runs):
    metrics = json.loads((runs["first"] / "metrics.json").read_text())
    sharded = metrics["eval_loss"]
    assert sharded is not None and math.isfinite(sharded)
    model = unsharded_with_adapter(runs["first"] / "adapter")
    batches = sample_batches(RUN)
    trained = mean_loss(model, batches)
    with model.disable_adapter():
        untrained = mean_loss(model, batches)
    assert abs(trained - sharded) <= 1e-5 * abs(sharded)
    assert abs(trained - untrained) > 0.1


def test_resume_continues_from_the_saved_step(runs):
    check_resumed(runs)


def test_merged_weights_load_in_one_process(runs):
    merged = load_merged(runs["first"])
    sharded = json.loads((runs["first"] / "metrics.json").read_text())["eval_loss"]
    assert abs(mean_loss(merged, sample_batches(RUN)) - sharded) < 0.05 * sharded


def test_unsharded_runs_of_several_processes_are_refused(monkeypatch):
    """What accelerate would silently run as DDP stops with the fix named: any run of several
    processes whose Trainer came out without its engine."""
    from types import SimpleNamespace

    from fusetune.train import distributed
    from fusetune.train.config import DistributedSettings
    from fusetune.train.errors import FusetuneError

    ddp = SimpleNamespace(
        is_fsdp_enabled=False, is_deepspeed_enabled=False, args=SimpleNamespace(device=torch.device("cpu"))
    )
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(FusetuneError, match="2 processes on cpu.*plain data parallel"):
        distributed.check_engine(ddp, DistributedSettings("fsdp2"))
    distributed.check_engine(
        SimpleNamespace(**{**vars(ddp), "is_fsdp_enabled": True}), DistributedSettings("fsdp2")
    )
    distributed.check_engine(ddp, DistributedSettings("off"))
    monkeypatch.setenv("WORLD_SIZE", "1")
    distributed.check_engine(ddp, DistributedSettings("fsdp2"))  # one process: nothing to shard across
