"""A signal under several processes: every rank saves and stops at the same step.

torchrun passes SIGINT / SIGTERM on to every process, but a scheduler or a user may signal one rank
only; a rank stopping alone would leave the others waiting in their next collective. Two CPU
processes over gloo run the stop callback's step end with the signal in rank 0 only: both decide to
save and stop there, on that signal; at a step end without a signal neither stops. And for real:
Ctrl-C (SIGINT to the launcher's process group) during ``fusetune train --nproc 2`` under FSDP2 saves
one checkpoint of the step both ranks finished, and the launcher exits with status 130 and the message.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerControl, TrainerState

from tests.distributed.processes import gloo_mesh, run_ranks
from tests.distributed.train_runs import run_args


def _worker(rank: int, folder: str) -> None:
    from fusetune.train.stopping import StopOnSignal

    gloo_mesh(rank, 2, folder)
    stop = StopOnSignal()
    callback = stop.callback()
    args = SimpleNamespace(device=torch.device("cpu"))
    state = TrainerState(max_steps=10, global_step=3)
    quiet = TrainerControl()
    callback.on_step_end(args, state, quiet)
    assert not quiet.should_save and not quiet.should_training_stop and stop.step is None
    stop.signum = signal.SIGTERM if rank == 0 else 0
    state.global_step = 4
    control = TrainerControl()
    callback.on_step_end(args, state, control)
    assert control.should_save and control.should_training_stop
    assert (stop.step, stop.signum) == (4, signal.SIGTERM)
    assert stop.interrupted(folder).status == 143
    if rank == 0:
        torch.save({"stopped": stop.step}, os.path.join(folder, "results.pt"))


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    assert run_ranks(_worker, 2, str(tmp_path), timeout=120) == {"stopped": 4}


@pytest.mark.parametrize(
    ("signum", "to_group"),
    [(signal.SIGINT, True), (signal.SIGTERM, False)],
    ids=["ctrl-c to the terminal's group", "sigterm to the launcher alone"],
)
def test_a_signal_under_nproc_2_saves_one_checkpoint_of_both_ranks(tmp_path, signum, to_group):
    """Ctrl-C reaches the launcher's whole group; a container's stop (Kubernetes) sends SIGTERM to
    its first process alone, which the launcher passes on: either way both ranks save one checkpoint
    at the same step and the launcher exits 128 + the signal (SIGTERM to the launcher alone used to
    kill it and leave torchrun and the ranks running on)."""
    out = tmp_path / "run"
    argv = [*run_args("fsdp2", held_out=False), "--max_steps", "40", "--output_dir", str(out)]
    process = subprocess.Popen(
        [sys.executable, "-m", "fusetune", "train", "--nproc", "2", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's job
        env={**os.environ, "TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": ""},  # gloo on CPUs, GPUs or not
    )
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoint-2" / "trainer_state.json").is_file():
            assert process.poll() is None, process.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint written in 240 s"
            time.sleep(0.05)
        if to_group:
            os.killpg(process.pid, signum)
        else:
            process.send_signal(signum)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    assert process.returncode == 128 + signum, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"fusetune: interrupted ({signal.Signals(signum).name}) at step "), stderr[-3000:]
    step = int(last.split("at step ")[1].split(";")[0])
    checkpoint = out / f"checkpoint-{step}"
    assert f"the last checkpoint is {checkpoint}, saved at that step" in last
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == step
    assert (checkpoint / "rng_state_0.pth").is_file() and (checkpoint / "rng_state_1.pth").is_file()
    assert not (out / "adapter").exists()
