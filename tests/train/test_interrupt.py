"""Stopping `fusetune train` for real (SIGINT = Ctrl-C, SIGTERM, SIGKILL) and `--resume`; the
out-of-memory message.

The subprocess tests run the shortened demo (`python -m fusetune train ...`), wait until a
checkpoint is on disk, signal the process, then run the same command with `--resume` and check
that training continues from that checkpoint and ends at max_steps. SIGINT and SIGTERM finish the
step, save it and stop (status 130 / 143), and the resumed run ends as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fusetune import cli
from fusetune.train.errors import Interrupted

MAX_STEPS, SAVE_STEPS = 20, 5


def _command(out: Path, max_steps: int = MAX_STEPS) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fusetune",
        "train",
        "--demo_samples",
        "32",
        "--batch_size",
        "4",
        "--eval_split",
        "0",
        "--show_samples",
        "0",
        "--max_steps",
        str(max_steps),
        "--save_steps",
        str(SAVE_STEPS),
        "--output_dir",
        str(out),
    ]


def _complete_checkpoints(out: Path) -> list[int]:
    return sorted(
        int(path.name.split("-")[1])
        for path in out.glob("checkpoint-*")
        if (path / "trainer_state.json").is_file()
    )


def _start_and_signal(out: Path, sig: int) -> subprocess.CompletedProcess:
    """Start the run, wait for its first complete checkpoint, send ``sig``; the finished process."""
    process = subprocess.Popen(
        _command(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy()
    )
    try:
        deadline = time.monotonic() + 60
        while not _complete_checkpoints(out):
            assert process.poll() is None, process.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint written in 60 s"
            time.sleep(0.02)
        process.send_signal(sig)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _resume(out: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [*_command(out), "--resume"], capture_output=True, text=True, timeout=120, env=os.environ.copy()
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _check_finished_from(out: Path, resumed: subprocess.CompletedProcess, checkpoint: int) -> None:
    assert f"resuming from {out / f'checkpoint-{checkpoint}'}" in resumed.stdout
    # The progress bar starts at the checkpoint's step, not at 0.
    assert f"{checkpoint}/{MAX_STEPS} [" in resumed.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == MAX_STEPS
    # Steps up to the checkpoint come from its saved history; each later step ran once after resuming.
    assert [row["step"] for row in metrics["loss_history"]] == list(range(1, MAX_STEPS + 1))
    state = json.loads((out / f"checkpoint-{MAX_STEPS}" / "trainer_state.json").read_text())
    assert state["global_step"] == MAX_STEPS


def _stopped_at(out: Path, stopped: subprocess.CompletedProcess, sig: int) -> int:
    """The step ``sig`` stopped the run at: it was saved, and the message says so, with the fix."""
    assert stopped.returncode == 128 + sig, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    message = re.search(
        rf"fusetune: interrupted \({signal.Signals(sig).name}\) at step (\d+); the last checkpoint is "
        r"(\S+), saved at that step\. Run the same command with --resume to continue from it\.",
        stopped.stderr,
    )
    assert message, stopped.stderr[-3000:]
    step, last = int(message.group(1)), Path(message.group(2))
    assert SAVE_STEPS <= step < MAX_STEPS
    assert last == out / f"checkpoint-{step}" and _complete_checkpoints(out)[-1] == step
    assert not (out / "metrics.json").exists() and not (out / "adapter").exists()
    return step


def test_ctrl_c_saves_the_step_then_resume(tmp_path):
    out = tmp_path / "run"
    step = _stopped_at(out, _start_and_signal(out, signal.SIGINT), signal.SIGINT)
    _check_finished_from(out, _resume(out), step)


def test_sigterm_saves_the_step_and_the_resumed_run_equals_an_uninterrupted_one(tmp_path):
    out = tmp_path / "run"
    step = _stopped_at(out, _start_and_signal(out, signal.SIGTERM), signal.SIGTERM)
    _check_finished_from(out, _resume(out), step)
    whole = tmp_path / "whole"
    result = subprocess.run(
        _command(whole), capture_output=True, text=True, timeout=120, env=os.environ.copy()
    )
    assert result.returncode == 0, result.stderr[-3000:]
    history = [json.loads((run / "metrics.json").read_text())["loss_history"] for run in (out, whole)]
    assert history[0] == history[1]
    adapters = [load_file(run / "adapter" / "adapter_model.safetensors") for run in (out, whole)]
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][key], adapters[1][key]) for key in adapters[0])


def test_a_second_ctrl_c_stops_at_once_and_the_handlers_are_restored(tmp_path):
    """In the process: the first SIGINT at step 4 would save step 4; a second one right after stops
    before that (the last checkpoint is step 3's). Python's own handlers are back afterwards."""
    from transformers import TrainerCallback

    from fusetune.train.config import load_config
    from fusetune.train.runner import train

    class CtrlC(TrainerCallback):
        def __init__(self, times: int) -> None:
            self.times = times

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 4:
                for _ in range(self.times):
                    os.kill(os.getpid(), signal.SIGINT)

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    argv = ["--demo_samples", "16", "--batch_size", "4", "--eval_split", "0", "--show_samples", "0"]
    argv += ["--max_steps", "8", "--save_steps", "3"]
    for times, saved in ((2, 3), (1, 4)):
        config = load_config(None, [*argv, "--output_dir", str(tmp_path / str(times))])
        message = rf"at step 4; the last checkpoint is \S*checkpoint-{saved}\b"
        with pytest.raises(Interrupted, match=message) as stop:
            train(config, quiet=True, callbacks=[CtrlC(times)])
        assert stop.value.status == 130
        assert {sig: signal.getsignal(sig) for sig in before} == before


def test_kill_then_resume_loses_at_most_the_steps_since_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    killed = _start_and_signal(out, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "metrics.json").exists()
    # The newest complete checkpoint is what --resume takes: the steps after it (fewer than
    # save_steps, or exactly save_steps when the kill cut the next checkpoint short) are lost.
    # The progress bar (shown up to some step before the kill) is never past the next save.
    reached = max(int(n) for n in re.findall(rf"(\d+)/{MAX_STEPS} \[", killed.stderr))
    checkpoint = _complete_checkpoints(out)[-1]
    assert reached - checkpoint <= SAVE_STEPS and checkpoint < MAX_STEPS
    _check_finished_from(out, _resume(out), checkpoint)


def test_out_of_memory_is_a_short_error_naming_the_fixes(monkeypatch, tmp_path, capsys):
    from transformers import Trainer

    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Trainer, "train", out_of_memory)
    argv = ["train", "--demo_samples", "8", "--batch_size", "4", "--eval_split", "0", "--max_steps", "2"]
    assert cli.main([*argv, "--output_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("fusetune: error: out of GPU memory at batch_size=4")
    for fix in ("lower batch_size", "max_seq_length", "gradient_checkpointing: on", "load_in_4bit: true"):
        assert fix in err


@pytest.mark.parametrize("state", ["complete", "missing", "cut short"])
def test_resume_skips_a_checkpoint_cut_short(tmp_path, state):
    """A kill while saving leaves the newest folder without trainer_state.json (written last), or with
    it cut short (it is not written atomically): resume passes over it, with a note."""
    from fusetune.train.runs import last_checkpoint

    for step in (5, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-5" / "trainer_state.json").write_text('{"global_step": 5}')
    if state != "missing":
        text = '{"global_step": 10, "log_history": []}'
        cut = text if state == "complete" else text[:20]
        (tmp_path / "checkpoint-10" / "trainer_state.json").write_text(cut)
    notes = []
    last = 10 if state == "complete" else 5
    assert last_checkpoint(tmp_path, notes.append) == str(tmp_path / f"checkpoint-{last}")
    assert len(notes) == (state != "complete")
    assert all("passing over" in note and "checkpoint-10" in note for note in notes)
    assert last_checkpoint(tmp_path / "missing") is None
