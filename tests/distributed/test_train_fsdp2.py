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
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# 20 demo samples: 16 to train on (two steps of two per rank), 4 held out (one batch per rank).
RUN = ["--distributed.strategy", "fsdp2", "--demo_samples", "20", "--eval_split", "0.2", "--batch_size", "2"]
RUN += ["--gradient_accumulation_steps", "1", "--lr_scheduler", "constant", "--warmup", "0"]
RUN += ["--show_samples", "0", "--save_steps", "2"]
OUTPUTS = {"adapter", "checkpoint-2", "config.yaml", "loss.png", "merged", "metrics.json"}


def fusetune_train(argv: list[str]) -> subprocess.CompletedProcess:
    """``fusetune train --nproc 2 *argv`` in a subprocess; fails the test on a non-zero exit."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run(
        [sys.executable, "-m", "fusetune", "train", "--nproc", "2", *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The two-step run (``first``) and its copy resumed to step 3 (``resumed``), with their output."""
    root = tmp_path_factory.mktemp("fsdp2")
    first = root / "first"
    first_run = fusetune_train([*RUN, "--max_steps", "2", "--save_merged", "--output_dir", str(first)])
    resumed = root / "resumed"
    shutil.copytree(first, resumed)
    shutil.rmtree(resumed / "merged")
    saved = {path: path.stat().st_mtime_ns for path in (resumed / "checkpoint-2").iterdir()}
    resumed_run = fusetune_train([*RUN, "--max_steps", "3", "--resume", "--output_dir", str(resumed)])
    return {
        "first": first,
        "first_run": first_run,
        "resumed": resumed,
        "resumed_run": resumed_run,
        "checkpoint_mtimes": saved,
    }


def held_out_batches() -> list[dict]:
    """The held-out samples of ``RUN`` as Trainer's evaluation splits them: one batch per rank."""
    from fusetune.train import demo
    from fusetune.train.collator import ChatCollator
    from fusetune.train.config import load_config
    from fusetune.train.data import load_splits

    config = load_config(None, RUN)
    _, held_out = load_splits(config)
    assert len(held_out) == 4
    collator = ChatCollator(demo.build_processor(), config.max_seq_length, config.max_pixels)
    return [collator([held_out[i], held_out[i + 1]]) for i in (0, 2)]


def mean_loss(model: torch.nn.Module, batches: list[dict]) -> float:
    """The mean of the per-batch losses of ``model`` in eval mode."""
    with torch.no_grad():
        return sum(model(**batch).loss.item() for batch in batches) / len(batches)


def unsharded_with_adapter(adapter: Path):
    """A freshly built demo model (the same seeded base weights) with ``adapter`` loaded by PEFT."""
    from peft import PeftModel

    from fusetune.train import demo

    base = demo.build_model(demo.build_processor().tokenizer)
    return PeftModel.from_pretrained(base, str(adapter)).eval()


def test_both_ranks_train_sharded_and_only_rank_0_writes(runs):
    out, result = runs["first"], runs["first_run"]
    assert {path.name for path in out.iterdir()} == OUTPUTS
    checkpoint = out / "checkpoint-2"
    assert (checkpoint / "pytorch_model_fsdp.bin").is_file()  # accelerate's FSDP save, not DDP's
    assert (checkpoint / "rng_state_0.pth").is_file() and (checkpoint / "rng_state_1.pth").is_file()
    assert "DDP" not in result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 2
    assert [row["step"] for row in metrics["loss_history"]] == [1, 2]
    assert all(math.isfinite(row["loss"]) for row in metrics["loss_history"])
    assert result.stdout.count("saved: adapter") == 1 and result.stdout.count("data: 16 training") == 1


def test_adapter_from_the_shards_gives_the_sharded_models_held_out_loss(runs):
    metrics = json.loads((runs["first"] / "metrics.json").read_text())
    sharded = metrics["eval_loss"]
    assert sharded is not None and math.isfinite(sharded)
    model = unsharded_with_adapter(runs["first"] / "adapter")
    batches = held_out_batches()
    trained = mean_loss(model, batches)
    with model.disable_adapter():
        untrained = mean_loss(model, batches)
    assert abs(trained - sharded) <= 1e-5 * abs(sharded)
    assert abs(trained - untrained) > 0.1


def test_resume_continues_from_the_saved_step(runs):
    out, result = runs["resumed"], runs["resumed_run"]
    assert f"resuming from {out / 'checkpoint-2'}" in result.stdout
    for path, mtime in runs["checkpoint_mtimes"].items():
        assert path.stat().st_mtime_ns == mtime, f"{path.name} was written again"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 3
    first = json.loads((runs["first"] / "metrics.json").read_text())
    assert metrics["loss_history"][:2] == first["loss_history"]  # restored, not trained again
    assert math.isfinite(metrics["loss_history"][2]["loss"]) and metrics["loss_history"][2]["step"] == 3
    # The third step moved the adapter (constant learning rate) from the checkpoint's.
    from safetensors.torch import load_file

    before = load_file(runs["first"] / "checkpoint-2" / "adapter_model.safetensors")
    after = load_file(out / "adapter" / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[key], after[key]) for key in before)


def test_merged_weights_load_in_one_process(runs):
    from transformers import AutoModelForImageTextToText

    merged = AutoModelForImageTextToText.from_pretrained(runs["first"] / "merged", dtype=torch.float32).eval()
    assert type(merged).__name__ == "Qwen2VLForConditionalGeneration"
    reference = unsharded_with_adapter(runs["first"] / "adapter").merge_and_unload().eval()
    with torch.no_grad():
        for parameter in reference.parameters():  # merged/ holds bfloat16 weights
            parameter.copy_(parameter.to(torch.bfloat16).float())
    expected = dict(reference.named_parameters())
    got = dict(merged.named_parameters())
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[name], expected[name]) for name in expected)
    batches = held_out_batches()
    sharded = json.loads((runs["first"] / "metrics.json").read_text())["eval_loss"]
    assert abs(mean_loss(merged, batches) - sharded) < 0.05 * sharded


def test_unsharded_runs_of_several_processes_are_refused(monkeypatch):
    """What accelerate would silently run as DDP stops with the fix named: DeepSpeed on CPUs before
    the launch, and any run of several processes whose Trainer came out without its engine."""
    from types import SimpleNamespace

    from fusetune.train import distributed
    from fusetune.train.config import DistributedSettings, load_config
    from fusetune.train.errors import FusetuneError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = load_config(None, [])
    config.distributed = DistributedSettings("deepspeed_zero3")  # as if deepspeed were installed
    expected = "deepspeed_zero3: fusetune train runs DeepSpeed on GPUs only.*strategy: fsdp2"
    with pytest.raises(FusetuneError, match=expected):
        distributed.check_nproc(2, config)

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
