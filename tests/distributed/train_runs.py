"""``fusetune train --nproc 2`` on the demo for the sharded-training tests of each strategy: the run
and its resumption, batches of its samples, the unsharded model with the saved adapter, and the
checks every strategy shares (what the first run wrote, what the resumed run continued, what
``merged/`` holds)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

OUTPUTS = {"adapter", "checkpoint-2", "config.yaml", "loss.png", "merged", "metrics.json"}


def run_args(strategy: str, held_out: bool = True) -> list[str]:
    """The overrides of a two-step run under ``strategy``: 16 demo samples to train on (two steps of
    two per rank) and, with ``held_out``, 4 more held out (one batch per rank); a constant learning
    rate, so every step moves the adapter; a checkpoint every two steps."""
    samples, split = ("20", "0.2") if held_out else ("16", "0")
    run = ["--distributed.strategy", strategy, "--demo_samples", samples, "--eval_split", split]
    run += ["--batch_size", "2", "--gradient_accumulation_steps", "1", "--lr_scheduler", "constant"]
    return run + ["--warmup", "0", "--show_samples", "0", "--save_steps", "2"]


def fusetune_train(argv: list[str]) -> subprocess.CompletedProcess:
    """``fusetune train --nproc 2 *argv`` in a subprocess, the ops on their PyTorch references
    (``TRITON_INTERPRET=0``, CPU tensors, also where GPUs are visible); fails the test on a non-zero
    exit."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, "-m", "fusetune", "train", "--nproc", "2", *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def train_and_resume(root: Path, run: list[str]) -> dict:
    """The two-step run of ``run`` with ``save_merged`` in ``root``/first, and a copy of its output
    (without ``merged/``) resumed to step 3 in ``root``/resumed: both folders, both processes'
    results, and the modification times of ``checkpoint-2``'s files before the resumption."""
    first = root / "first"
    first_run = fusetune_train([*run, "--max_steps", "2", "--save_merged", "--output_dir", str(first)])
    resumed = root / "resumed"
    shutil.copytree(first, resumed)
    shutil.rmtree(resumed / "merged")
    saved = {path: path.stat().st_mtime_ns for path in (resumed / "checkpoint-2").rglob("*")}
    resumed_run = fusetune_train([*run, "--max_steps", "3", "--resume", "--output_dir", str(resumed)])
    return {
        "first": first,
        "first_run": first_run,
        "resumed": resumed,
        "resumed_run": resumed_run,
        "checkpoint_mtimes": saved,
    }


def sample_batches(run: list[str]) -> list[dict]:
    """The held-out samples of ``run`` as Trainer's evaluation splits them (one batch of two per
    rank), or with nothing held out the first four training samples, batched the same way."""
    from fusetune.train import demo
    from fusetune.train.collator import ChatCollator
    from fusetune.train.config import load_config
    from fusetune.train.data import load_splits

    config = load_config(None, run)
    train, held_out = load_splits(config)
    assert held_out is None or len(held_out) == 4
    samples = train if held_out is None else held_out
    collator = ChatCollator(demo.build_processor(), config.max_seq_length, config.max_pixels)
    return [collator([samples[i], samples[i + 1]]) for i in (0, 2)]


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


def check_first_run(out: Path, result: subprocess.CompletedProcess) -> None:
    """The two-step run in ``out`` wrote exactly the expected files, a RNG state per rank (both took
    part), finite losses of steps 1 and 2, and printed from rank 0 alone, without DDP."""
    assert {path.name for path in out.iterdir()} == OUTPUTS
    checkpoint = out / "checkpoint-2"
    assert (checkpoint / "rng_state_0.pth").is_file() and (checkpoint / "rng_state_1.pth").is_file()
    assert "DDP" not in result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 2
    assert [row["step"] for row in metrics["loss_history"]] == [1, 2]
    assert all(math.isfinite(row["loss"]) for row in metrics["loss_history"])
    assert result.stdout.count("saved: adapter") == 1 and result.stdout.count("data: 16 training") == 1


def check_resumed(runs: dict) -> None:
    """``--resume`` continued from ``checkpoint-2``: it says so, leaves that checkpoint as it was (a
    fresh run would write it again), keeps the first two steps' losses (restored, not trained
    again) and ends at step 3, whose update moved the adapter (constant learning rate)."""
    from safetensors.torch import load_file

    out, result = runs["resumed"], runs["resumed_run"]
    assert f"resuming from {out / 'checkpoint-2'}" in result.stdout
    for path, mtime in runs["checkpoint_mtimes"].items():
        assert path.stat().st_mtime_ns == mtime, f"{path.name} was written again"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 3
    first = json.loads((runs["first"] / "metrics.json").read_text())
    assert metrics["loss_history"][:2] == first["loss_history"]
    assert math.isfinite(metrics["loss_history"][2]["loss"]) and metrics["loss_history"][2]["step"] == 3
    before = load_file(runs["first"] / "checkpoint-2" / "adapter_model.safetensors")
    after = load_file(out / "adapter" / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[key], after[key]) for key in before)


def load_merged(out: Path) -> torch.nn.Module:
    """``out``/merged loaded with ``from_pretrained`` in this process, after checking that it holds
    the saved adapter merged into the base here, rounded to bfloat16 as it is saved."""
    from transformers import AutoModelForImageTextToText

    merged = AutoModelForImageTextToText.from_pretrained(out / "merged", dtype=torch.float32).eval()
    assert type(merged).__name__ == "Qwen2VLForConditionalGeneration"
    reference = unsharded_with_adapter(out / "adapter").merge_and_unload().eval()
    with torch.no_grad():
        for parameter in reference.parameters():  # merged/ holds bfloat16 weights
            parameter.copy_(parameter.to(torch.bfloat16).float())
    expected = dict(reference.named_parameters())
    got = dict(merged.named_parameters())
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[name], expected[name]) for name in expected)
    return merged
