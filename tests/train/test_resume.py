"""Which run may write to an output_dir and continue a checkpoint there; a diverged run stops.

- a fresh run refuses an output_dir with an earlier run's outputs (overwrite_output_dir deletes them);
- ``--resume`` refuses a checkpoint of a run with other training settings or another base model,
  naming each difference; output, logging and saving keys, and a longer max_steps (with a note), may
  change;
- the final loss is the last logged loss;
- a loss that is not finite stops the run with the fixes named, without an adapter, keeping the
  checkpoints saved before it;
- output_dir is checked writable before anything loads.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fusetune import cli
from fusetune.train.config import load_config
from fusetune.train.errors import FusetuneError
from fusetune.train.runner import train
from fusetune.train.runs import RUN_RECORD, check_resume_settings

SMALL = ["--demo_samples", "16", "--batch_size", "4", "--gradient_accumulation_steps", "1"]
SMALL += ["--eval_split", "0", "--show_samples", "0", "--save_steps", "2"]


def _run(out: Path, *overrides: str, quiet: bool = True):
    return train(load_config(None, [*SMALL, "--output_dir", str(out), *overrides]), quiet=quiet)


def test_output_dir_of_an_earlier_run_and_what_resume_continues(tmp_path, capsys):
    out = tmp_path / "run"
    result = _run(out, "--max_steps", "4")
    metrics = json.loads((out / "metrics.json").read_text())
    # The final loss is the last logged one (step 4's), not a mean of the last few.
    assert result.final_loss == metrics["final_loss"] == metrics["loss_history"][-1]["loss"]
    assert metrics["loss_history"][-1]["step"] == 4
    record = json.loads((out / "checkpoint-4" / RUN_RECORD).read_text())
    assert record["config"]["learning_rate"] == 3e-3 and record["processes"] == 1

    # Another fresh run there would overwrite the adapter and rotate the checkpoints away.
    with pytest.raises(FusetuneError, match=r"holds an earlier run's outputs \(checkpoint-2, checkpoint-4, "
                       r"adapter.*--resume, pick another output_dir, or set overwrite_output_dir: true"):
        _run(out, "--max_steps", "4", "--seed", "1")

    # Another run's settings: each difference named with both values, and the fixes.
    for change, named in (
        (["--learning_rate", "1e-3", "--seed", "7"], r"learning_rate: 0.003 there, 0.001 here; seed: 0"),
        (["--batch_size", "2", "--gradient_accumulation_steps", "2"], r"batch_size: 4 there, 2 here; gradi"),
        (["--lr_scheduler", "linear"], r"lr_scheduler: 'cosine' there, 'linear' here"),
        (["--model", str(tmp_path / "other-model")], r"model: 'demo' there, '.*other-model' here"),
        (["--lora.r", "8"], r"lora.r: 16 there, 8 here"),
    ):
        with pytest.raises(FusetuneError, match=named + r".*set them back .*fresh run in another output_dir"):
            _run(out, "--max_steps", "4", "--resume", *change)

    # Output, saving and logging keys may change, and max_steps grow (the schedule is recomputed).
    capsys.readouterr()
    changes = ["--save_steps", "3", "--logging_steps", "2", "--show_samples", "1"]
    resumed = _run(out, "--max_steps", "6", "--resume", *changes, quiet=False)
    assert resumed.global_step == 6
    assert "max_steps 4 -> 6" in capsys.readouterr().out

    # overwrite_output_dir deletes the earlier run's outputs, then runs afresh.
    (out / "checkpoint-9").mkdir()  # a checkpoint cut short goes too
    _run(out, "--max_steps", "2", "--overwrite_output_dir")
    assert sorted(path.name for path in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 2
    with pytest.raises(FusetuneError, match="overwrite_output_dir.*drop one"):
        _run(out, "--max_steps", "2", "--overwrite_output_dir", "--resume")


def test_a_checkpoint_without_a_record_is_checked_for_its_base_model(tmp_path, capsys):
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    (checkpoint / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "org/base"}))
    config = load_config(None, ["--model", "org/other"])
    notes = []
    with pytest.raises(FusetuneError, match="on the base model 'org/base', this run loads 'org/other'"):
        check_resume_settings(str(checkpoint), config, notes.append)
    assert RUN_RECORD in notes[0]
    check_resume_settings(str(checkpoint), load_config(None, ["--model", "org/base"]), notes.append)


def test_a_diverged_run_stops_without_saving_the_adapter(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(FusetuneError) as stopped:
        _run(out, "--max_steps", "8", "--save_steps", "1", "--learning_rate", "1e30", "--warmup", "0")
    message = str(stopped.value)
    assert message.startswith("training diverged at step ") and "loss nan" in message
    fixes = ("learning_rate (1e+30 now)", "max_grad_norm (1.0 now)", "dtype: float32", "overwrite_output_dir")
    assert all(fix in message for fix in fixes), message
    step = int(message.split("step ")[1].split(" ")[0])
    assert f"checkpoint-{step - 1} in {out}" in message
    assert not (out / "adapter").exists() and not (out / "metrics.json").exists()
    # No folder for the diverged step; the checkpoints before it hold finite weights and their losses.
    assert sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")) == list(range(1, step))
    weights = load_file(out / f"checkpoint-{step - 1}" / "adapter_model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())
    state = json.loads((out / f"checkpoint-{step - 1}" / "trainer_state.json").read_text())
    assert all(math.isfinite(row["loss"]) for row in state["log_history"] if "loss" in row)


@pytest.mark.parametrize("kind", ["empty", "file", "under a file", "unwritable"])
def test_output_dir_is_checked_before_anything_loads(tmp_path, kind, capsys, monkeypatch):
    (tmp_path / "afile").write_text("")
    path = {
        "empty": "",
        "file": str(tmp_path / "afile"),
        "under a file": str(tmp_path / "afile" / "run"),
        "unwritable": str(tmp_path / "run"),
    }[kind]
    if kind == "unwritable":  # (chmod does not stop root)
        def refuse(self, data):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(Path, "write_bytes", refuse)
    loaded = []
    monkeypatch.setattr("fusetune.train.data.load_splits", lambda config: loaded.append(1))
    assert cli.main(["train", *SMALL, "--max_steps", "2", "--output_dir", path]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    expected = {
        "empty": "output_dir is empty",
        "file": "is a file, not a folder",
        "under a file": "cannot be written (Not a directory)",
        "unwritable": "cannot be written (Permission denied)",
    }[kind]
    assert expected in err and "--output_dir runs/x" in err and not loaded
