"""Stopping a training run cleanly: on SIGINT / SIGTERM, and when the loss stops being finite.

A signal does not stop the process where it is: ``StopOnSignal`` notes it, and at the end of the
optimiser step its callback has Trainer save a checkpoint of that step and stop, after which the runner
raises ``Interrupted`` naming the checkpoint. SIGTERM is what schedulers send before they kill a job;
SIGINT is Ctrl-C, and a second one raises ``KeyboardInterrupt`` at once (Python's own behaviour). In a
run of several processes the ranks agree at each step end, with an all-reduce of the signal they got,
so that all of them save and stop at the same step whether the signal reached one rank or all.

``FiniteLoss`` stops the run with an error at the first logged loss or gradient norm that is not
finite, before a checkpoint or the adapter holds the diverged weights (every save is logged first).
"""

from __future__ import annotations

import math
import signal
import threading
from pathlib import Path

import torch

from fusetune.train.config import TrainConfig
from fusetune.train.errors import FusetuneError, Interrupted
from fusetune.train.runs import last_checkpoint

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def agreed_signal(signum: int, device: torch.device) -> int:
    """The largest signal number any rank of the run got (0: none); ``signum`` alone in one process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return signum
    flag = torch.tensor([signum], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


class StopOnSignal:
    """``with StopOnSignal() as stop:`` catches SIGINT and SIGTERM inside the block (in the main
    thread; elsewhere Python allows no handlers and nothing changes), restoring the previous handlers
    after it, as ``train`` is also called from Python programs with handlers of their own."""

    def __init__(self) -> None:
        self.signum = 0
        self.step: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without the checkpoint
        self.signum = self.signum or signum

    def callback(self):
        """The Trainer callback that saves and stops at the step end where a signal arrived."""
        from transformers import TrainerCallback

        stop = self

        class SaveAndStop(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                signum = agreed_signal(stop.signum, args.device)
                if signum and state.global_step < state.max_steps:
                    stop.signum, stop.step = signum, state.global_step
                    control.should_save = True
                    control.should_training_stop = True

        return SaveAndStop()

    def interrupted(self, output_dir: str) -> Interrupted | None:
        """The error to stop with after Trainer saved and stopped for a signal, or None."""
        if self.step is None:
            return None
        name, last = signal.Signals(self.signum).name, last_checkpoint(output_dir)
        return Interrupted(
            f"interrupted ({name}) at step {self.step}; the last checkpoint is {last}, "
            f"saved at that step. Run the same command with --resume to continue from it.",
            128 + self.signum,
        )


def finite_loss_callback(config: TrainConfig):
    """A Trainer callback that stops the run at the first logged training loss or gradient norm that
    is not finite (Trainer would log it, or with its nan/inf filter hide it as 0, and save the diverged
    weights as the adapter). Every step that saves a checkpoint logs first, so no checkpoint holds them."""
    from transformers import TrainerCallback

    class FiniteLoss(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if control.should_save:
                control.should_log = True

        def on_log(self, args, state, control, logs=None, **kwargs):
            values = {key: (logs or {}).get(key) for key in ("loss", "grad_norm")}
            if all(value is None or math.isfinite(value) for value in values.values()):
                return
            raise FusetuneError(diverged(config, state.global_step, values, last_checkpoint(args.output_dir)))

    return FiniteLoss()


def diverged(config: TrainConfig, step: int, values: dict, checkpoint: str | None) -> str:
    """The message for a loss or gradient norm that is not finite at ``step``, naming the fixes."""
    shown = ", ".join(f"{key} {value}" for key, value in values.items() if value is not None)
    clipping = f"max_grad_norm ({config.max_grad_norm} now{'' if config.max_grad_norm else ': off'})"
    where = (
        f"The last checkpoint, {Path(checkpoint).name} in {Path(checkpoint).parent}, was saved before it."
        if checkpoint
        else "No checkpoint was written before it."
    )
    return (
        f"training diverged at step {step} ({shown}); the run stopped without saving the adapter. Lower "
        f"learning_rate ({config.learning_rate:g} now), clip the gradients with a lower {clipping}, or "
        f"train in dtype: float32 ({config.dtype} now); then start over in another output_dir, or with "
        f"overwrite_output_dir: true. {where}"
    )
