"""The command line: the demo end to end (shortened), ``info``, errors without tracebacks, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fusetune import cli
from fusetune.train.config import load_config
from fusetune.train.errors import FusetuneError

# A short demo: few samples, few steps; the ops run their references (see conftest.py).
SMALL = [
    "--demo_samples",
    "64",
    "--batch_size",
    "8",
    "--eval_split",
    "0",
    "--show_samples",
    "1",
    "--max_new_tokens",
    "4",
    "--save_steps",
    "3",
]


def test_default_job_end_to_end(tmp_path):
    """`python -m fusetune train --max_steps 15`: the loss falls and every output is written."""
    out = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fusetune",
            "train",
            "--max_steps",
            "15",
            "--output_dir",
            str(out),
            "--demo_samples",
            "300",
            "--eval_split",
            "0.05",
            "--show_samples",
            "2",
            "--max_new_tokens",
            "12",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=os.environ.copy(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training" in result.stderr and "loss=" in result.stderr  # the progress bar with the loss
    assert "held-out samples" in result.stdout and "truth:" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 15
    assert metrics["final_loss"] < 0.6 * metrics["first_loss"], metrics
    assert len(metrics["loss_history"]) == 15 and metrics["eval_loss"] is not None
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert load_config(out / "config.yaml").max_steps == 15  # the saved config is a valid config
    assert (out / "loss.png").stat().st_size > 1000


def test_info(capsys):
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    for word in ("fusetune 0.", "torch ", "transformers ", "gpu", "kernels:", "qwen2_vl", "llama"):
        assert word in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--bogus", "1"], "unknown config key 'bogus'"),
        (["train", "--max_steps", "many"], "'max_steps' must be an integer"),
        (["train", "missing.yaml"], "config file 'missing.yaml' not found"),
        (["train", "--dataset", "./nothing.jsonl"], "not found"),
        (["train", "--gradient_checkpointing", "sometimes"], "gradient_checkpointing"),
        (["train", "--load_in_4bit", "true"], "load_in_4bit"),
        (["frobnicate"], "unknown command"),
    ],
)
def test_errors_are_one_line_without_traceback(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_help_lists_the_keys(capsys):
    assert cli.main(["train", "--help"]) == 0
    assert "lora.finetune_vision_layers" in capsys.readouterr().out


def test_resume_after_interruption(tmp_path, capsys):
    """Stop (Ctrl-C) after step 4, with a checkpoint at step 3; --resume continues from it to step 8."""
    from transformers import TrainerCallback

    from fusetune.train.runner import train

    class CtrlC(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 4:
                raise KeyboardInterrupt

    out = str(tmp_path / "run")
    config = load_config(None, [*SMALL, "--max_steps", "8", "--output_dir", out])
    with pytest.raises(
        FusetuneError, match=r"interrupted at step 4; the last checkpoint is .*checkpoint-3.*--resume"
    ):
        train(config, quiet=True, callbacks=[CtrlC()])
    assert (Path(out) / "checkpoint-3" / "trainer_state.json").is_file()
    assert not (Path(out) / "adapter").exists()

    # Other LoRA settings than the checkpoint's: its weights or optimiser state would not load.
    for change, message in (
        (["--lora.r", "8"], r".*checkpoint-3 was trained with other settings \(lora.r: 16 there, 8 here\)"),
        (["--lora.finetune_vision_layers", "false"], r"lora.finetune_vision_layers: True there, False here"),
    ):
        changed = load_config(None, [*SMALL, "--max_steps", "8", "--output_dir", out, "--resume", *change])
        with pytest.raises(FusetuneError, match=message + ".*set them back.*another output_dir"):
            train(changed, quiet=True)

    resumed = load_config(None, [*SMALL, "--max_steps", "8", "--output_dir", out, "--resume"])
    result = train(resumed)
    assert "resuming from" in capsys.readouterr().out
    assert result.global_step == 8
    steps = [row["step"] for row in json.loads((Path(out) / "metrics.json").read_text())["loss_history"]]
    assert steps == list(range(1, 9))  # steps 1-3 from the checkpoint's history, 4-8 after resuming
    state = json.loads((Path(out) / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["global_step"] == 8


def test_resume_without_checkpoint_is_an_error(tmp_path):
    config = load_config(
        None, [*SMALL, "--max_steps", "2", "--output_dir", str(tmp_path / "none"), "--resume"]
    )
    from fusetune.train.runner import train

    with pytest.raises(FusetuneError, match="no checkpoint in output_dir"):
        train(config, quiet=True)
