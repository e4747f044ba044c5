"""The runner's bookkeeping around Trainer: the last step's loss is logged, and evaluated once."""

from __future__ import annotations

from types import SimpleNamespace

from transformers import TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import DefaultFlowCallback

from fusetune.train.runner import _last_step_logger, final_eval_loss


def test_the_last_step_is_logged_whatever_logging_steps_is(tmp_path):
    """With logging_steps above max_steps Trainer alone would log no loss at all."""
    args = TrainingArguments(output_dir=str(tmp_path), logging_steps=5, report_to="none", use_cpu=True)
    state = TrainerState(max_steps=7, logging_steps=5)
    logged = []
    for step in range(1, 8):
        state.global_step = step
        control = TrainerControl()
        for callback in (DefaultFlowCallback(), _last_step_logger()):  # Trainer's order
            callback.on_step_end(args, state, control)
        logged.append(control.should_log)
    assert logged == [False, False, False, False, True, False, True]


def test_the_last_step_is_evaluated_once():
    """eval_steps > 0: Trainer evaluates the last step itself; the runner reuses that loss."""

    def trainer(history):
        calls = []
        state = SimpleNamespace(global_step=4, log_history=history)
        return SimpleNamespace(state=state, evaluate=lambda: calls.append(1) or {"eval_loss": 9.0}), calls

    evaluated, calls = trainer(
        [{"step": 2, "eval_loss": 3.0}, {"loss": 2.5, "step": 4}, {"step": 4, "eval_loss": 2.0}]
    )
    assert final_eval_loss(evaluated) == 2.0 and calls == []
    at_the_end, calls = trainer([{"step": 2, "eval_loss": 3.0}, {"loss": 2.5, "step": 4}])
    assert final_eval_loss(at_the_end) == 9.0 and calls == [1]
