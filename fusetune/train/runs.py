"""What a run keeps in ``output_dir``, and which run may go on from a checkpoint there.

A fresh run needs an ``output_dir`` it can write, checked before anything loads, and one without an
earlier run's outputs: it would overwrite that run's adapter and metrics, and Trainer's rotation of its
own checkpoints would delete the earlier ones. ``overwrite_output_dir: true`` deletes them first.

Every checkpoint holds ``fusetune_run.json``: the config of the run that wrote it and its number of
processes, written as the checkpoint's folder is made. ``resume`` continues a checkpoint only under the
same training settings: a changed learning rate would be silently replaced by the scheduler state's,
and another batch, seed, data set or model would make a run that is neither the old one nor a new one.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fusetune.train import distributed
from fusetune.train.config import TrainConfig, to_dict
from fusetune.train.errors import FusetuneError

RUN_RECORD = "fusetune_run.json"
# What a run writes in output_dir besides its checkpoint-N folders.
OUTPUTS = ("adapter", "merged", "config.yaml", "metrics.json", "loss.png")
# Config keys a resumed run may change: where and how often it writes, logs and evaluates, and how it
# computes (the same numbers, other kernels, memory or speed). Every other key is a training setting.
FREE_KEYS = {
    "output_dir",
    "overwrite_output_dir",
    "resume",
    "save_steps",
    "save_total_limit",
    "save_merged",
    "logging_steps",
    "eval_steps",
    "show_samples",
    "max_new_tokens",
    "kernels",
    "loss",
    "mlp_tile_rows",
    "packing",
    "gradient_checkpointing",
    "dataloader_workers",
    "distributed.offload_params",
    "distributed.offload_optimizer",
    "distributed.wrap_classes",
}
# Keys a resumed run may change that change the learning-rate schedule: Trainer recomputes it.
LENGTH_KEYS = ("max_steps", "epochs")

Say = Callable[[str], None]


def prepare_output_dir(config: TrainConfig, say: Say) -> None:
    """Make sure ``output_dir`` is a folder this process can write, and, for a fresh run, one without
    an earlier run's outputs (deleted first with ``overwrite_output_dir``; else refused)."""
    folder = _writable_folder(config.output_dir)
    if config.resume not in (False, ""):
        return
    earlier = earlier_outputs(folder)
    if not earlier:
        return
    names = ", ".join(path.name for path in earlier)
    if not config.overwrite_output_dir:
        raise FusetuneError(
            f"output_dir {folder} holds an earlier run's outputs ({names}); a fresh run would overwrite "
            f"them and delete its checkpoints. Continue that run with --resume, pick another output_dir, "
            f"or set overwrite_output_dir: true (--overwrite_output_dir) to delete them and start over."
        )
    if distributed.is_main_process():
        for path in earlier:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        say(f"overwrite_output_dir: deleted the earlier run's {names} in {folder}")


def _writable_folder(output_dir: str) -> Path:
    """``output_dir`` as a folder, created if missing, after writing and deleting a file in it."""
    if not output_dir.strip():
        raise FusetuneError("output_dir is empty; give the folder to write the run to (--output_dir runs/x).")
    folder = Path(output_dir)
    probe = folder / f".fusetune-write-test-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        what = "is a file, not a folder" if folder.is_file() else f"cannot be written ({error.strerror})"
        raise FusetuneError(
            f"output_dir {str(folder)!r} {what}; give a folder you can write to (--output_dir runs/x)."
        ) from None
    return folder


def earlier_outputs(folder: Path) -> list[Path]:
    """The checkpoints and outputs of a run in ``folder``, complete or not."""
    checkpoints = sorted(path for path in folder.glob("checkpoint-*") if path.is_dir())
    return checkpoints + [folder / name for name in OUTPUTS if (folder / name).exists()]


def _read_json(path: Path) -> Any:
    """The JSON in ``path``, or None where it is missing or cut short."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_complete(checkpoint: Path) -> bool:
    """Whether ``checkpoint`` was saved to the end: Trainer writes ``trainer_state.json`` last, after
    the weights, optimiser, scheduler and RNG state, so a kill while saving leaves it missing or cut
    short (it is not written atomically) and resuming would fail on it."""
    return isinstance(_read_json(checkpoint / "trainer_state.json"), dict)


def last_checkpoint(output_dir: str | Path, say: Say | None = None) -> str | None:
    """The highest-numbered complete ``checkpoint-N`` folder in ``output_dir``, or None; ``say`` gets a
    note for each newer one passed over as incomplete."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    steps = []
    for path in folder.glob("checkpoint-*"):
        step = path.name.removeprefix("checkpoint-")
        if step.isdigit() and path.is_dir():
            steps.append((int(step), path))
    for _, path in sorted(steps, reverse=True):
        if is_complete(path):
            return str(path)
        if say is not None:
            say(f"note: passing over {path}: its trainer_state.json is missing or cut short (saving stopped)")
    return None


def resume_checkpoint(config: TrainConfig, say: Say) -> str | None:
    """The checkpoint folder to resume from (``resume``), or None to start fresh; refuses one that
    this run cannot continue: another run's settings, or a DeepSpeed checkpoint that this run's
    strategy or process count cannot read."""
    if config.resume is False or config.resume == "":
        return None
    if isinstance(config.resume, str) and config.resume.lower() not in ("true", "last"):
        path = Path(config.resume)
        if not is_complete(path):
            raise FusetuneError(
                f"resume={config.resume!r} is not a complete Trainer checkpoint folder (its "
                f"trainer_state.json is missing or cut short); give another, or resume: true for the last "
                f"complete one in output_dir."
            )
        last = str(path)
    else:
        last = last_checkpoint(config.output_dir, say)
    if last is None:
        raise FusetuneError(
            f"resume: no checkpoint in output_dir {config.output_dir!r} to continue from "
            f"(checkpoints are written every save_steps={config.save_steps} steps); drop --resume to "
            f"start fresh, or point output_dir at the earlier run."
        )
    distributed.check_resume(last, config.distributed)
    check_resume_settings(last, config, say)
    return last


def run_record(config: TrainConfig) -> dict[str, Any]:
    """What a checkpoint records of its run: the config, and the number of processes."""
    return {"config": to_dict(config), "processes": distributed.world_size()}


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"lora": {"r": 8}}`` -> ``{"lora.r": 8}``."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _same(theirs: Any, ours: Any) -> bool:
    """Equal values, or two spellings of one existing path (a model or data folder)."""
    if theirs == ours:
        return True
    if not (isinstance(theirs, str) and isinstance(ours, str) and Path(theirs).exists()):
        return False
    return Path(theirs).resolve() == Path(ours).resolve()


def check_resume_settings(checkpoint: str, config: TrainConfig, say: Say) -> None:
    """Refuse to continue ``checkpoint`` under training settings other than its run's, naming each
    difference; a changed ``max_steps`` or ``epochs`` is allowed, with a note on the schedule."""
    record = _read_json(Path(checkpoint) / RUN_RECORD)
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        say(
            f"note: {checkpoint} has no {RUN_RECORD} (an older checkpoint): only its LoRA settings and "
            f"base model can be checked against this run's."
        )
        _check_base_model(checkpoint, config.model)
        return
    theirs = {**_flat(record["config"]), "processes": record.get("processes", 1)}
    ours = _flat(run_record(config)["config"]) | {"processes": distributed.world_size()}
    checked = [key for key in ours if key in theirs and key not in FREE_KEYS and key not in LENGTH_KEYS]
    differing = [key for key in checked if not _same(theirs[key], ours[key])]
    if differing:
        listed = "; ".join(f"{key}: {theirs[key]!r} there, {ours[key]!r} here" for key in differing)
        raise FusetuneError(
            f"resume: {checkpoint} was trained with other settings ({listed}). Resuming continues that run: "
            f"set them back (its config is in {Path(checkpoint) / RUN_RECORD}), or start a fresh run in "
            f"another output_dir."
        )
    changed = [key for key in LENGTH_KEYS if not _same(theirs.get(key), ours[key])]
    if changed:
        listed = ", ".join(f"{key} {theirs.get(key)} -> {ours[key]}" for key in changed)
        say(
            f"note: {listed} since {checkpoint}: Trainer recomputes the learning-rate schedule "
            f"({config.lr_scheduler}, warmup {config.warmup}) over the new length; the first step after the "
            f"checkpoint runs at the rate the old schedule set for it, the later ones follow the new one, "
            f"so the run differs from one that had this length from the start."
        )


def _check_base_model(checkpoint: str, model: str) -> None:
    """Refuse ``checkpoint`` when its adapter names another base model than ``model``."""
    adapter = _read_json(Path(checkpoint) / "adapter_config.json")
    base = adapter.get("base_model_name_or_path") if isinstance(adapter, dict) else None
    if base and not _same(base, model):
        raise FusetuneError(
            f"resume: {checkpoint}'s adapter was trained on the base model {base!r}, this run loads "
            f"{model!r}; set model back to it, or start a fresh run in another output_dir."
        )


def record_callback(config: TrainConfig):
    """A Trainer callback writing ``fusetune_run.json`` into each checkpoint's folder just before
    Trainer saves it, so that a complete checkpoint has it: Trainer logs, then saves, in one call, so
    the step that is to save is logged and the record written as it is (after the callbacks before this
    one saw the logs: a diverged step leaves no folder)."""
    from transformers import TrainerCallback

    record = json.dumps(run_record(config), indent=2)

    class RecordRun(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if control.should_save:
                control.should_log = True

        def on_log(self, args, state, control, logs=None, **kwargs):
            if control.should_save and state.is_world_process_zero:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                folder.mkdir(parents=True, exist_ok=True)
                (folder / RUN_RECORD).write_text(record)

    return RecordRun()
