"""``train(config)``: one fine-tuning run on Hugging Face Trainer, PEFT LoRA and fusetune's kernels.

What it writes to ``output_dir``: ``checkpoint-N/`` every ``save_steps`` steps and on SIGINT /
SIGTERM (Trainer's: the adapter, optimiser, scheduler and RNG state, what ``resume`` continues from,
with fusetune's ``fusetune_run.json``: the run's config; see runs.py and stopping.py), and at the end
``adapter/`` (the LoRA adapter and the processor), ``config.yaml`` (the config as it ran),
``metrics.json`` (loss history; ``first_loss`` and ``final_loss``, the first and the last logged
training loss; eval loss, runtime, generated samples) and ``loss.png`` (the loss curve; needs
matplotlib), plus ``merged/`` with ``save_merged``. A fresh run refuses an ``output_dir`` holding an
earlier run's outputs unless ``overwrite_output_dir``; a loss that is not finite stops the run.

In a run of several processes (``distributed.strategy`` fsdp2 or deepspeed_zero3, started by
``fusetune train --nproc N``, ``torchrun`` or ``accelerate launch``) every rank trains and gathers,
and the main process alone prints and writes: the adapter consolidated from the shards, and the
merged weights from that adapter on a freshly loaded base, so both load on one GPU.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from fusetune.train import distributed
from fusetune.train.config import TrainConfig, build_config, to_dict, to_yaml
from fusetune.train.errors import FusetuneError, Interrupted
from fusetune.train.runs import last_checkpoint, prepare_output_dir, record_callback, resume_checkpoint
from fusetune.train.stopping import StopOnSignal, finite_loss_callback


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    first_loss: float | None
    final_loss: float | None
    eval_loss: float | None = None
    samples: list[dict[str, str]] = field(default_factory=list)
    runtime_s: float = 0.0
    files: dict[str, str] = field(default_factory=dict)


def _say(quiet: bool, *args: Any) -> None:
    if not quiet:
        print(*args, flush=True)


def _progress_callback(quiet: bool):
    from transformers import TrainerCallback

    class LossProgress(TrainerCallback):
        """One tqdm bar over the optimiser steps with the latest loss and learning rate."""

        def __init__(self) -> None:
            self.bar = None

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero and not quiet:
                from tqdm.auto import tqdm

                self.bar = tqdm(
                    total=state.max_steps,
                    initial=state.global_step,
                    desc="training",
                    unit="step",
                    dynamic_ncols=True,
                )

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.bar is not None and logs:
                shown = {}
                if "loss" in logs:
                    shown["loss"] = f"{logs['loss']:.3f}"
                if "learning_rate" in logs:
                    shown["lr"] = f"{logs['learning_rate']:.1e}"
                if "eval_loss" in logs:
                    shown["eval"] = f"{logs['eval_loss']:.3f}"
                if shown:
                    self.bar.set_postfix(shown, refresh=False)

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return LossProgress()


def _last_step_logger():
    from transformers import TrainerCallback

    class LogLastStep(TrainerCallback):
        """Log the loss at the last step too, whatever ``logging_steps`` is: the final loss in
        metrics.json and the curve in loss.png come from the logged losses."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_log = True

    return LogLastStep()


# The keys of a checkpoint's adapter_config.json that must match this run's LoRA, with the config
# keys that set them (target_modules is the regex of the layers that lora_targets picks).
RESUME_LORA_KEYS = {
    "r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "target_modules": "lora.target_modules / finetune_vision_layers / finetune_language_layers",
}


def check_resume_lora(checkpoint: str, lora) -> None:
    """Refuse to resume ``checkpoint`` when its adapter has other LoRA settings than ``lora`` (this
    run's ``peft.LoraConfig``): its weights (another r) or optimiser state (other layers) would not
    load, and Trainer would stop with a tensor size or parameter group mismatch."""
    saved_file = Path(checkpoint) / "adapter_config.json"
    if not saved_file.is_file():
        return
    saved = json.loads(saved_file.read_text())
    for key, name in RESUME_LORA_KEYS.items():
        ours = getattr(lora, key)
        if saved.get(key) != ours:
            values = "" if key == "target_modules" else f" ({ours} here, {saved.get(key)} there)"
            raise FusetuneError(
                f"resume: {name} differs from the checkpoint {checkpoint}'s{values}; resuming needs the "
                f"LoRA settings it was trained with: set them back, or use a fresh output_dir to start over."
            )


def _loss_history(log_history: list[dict]) -> list[tuple[int, float]]:
    return [(row["step"], row["loss"]) for row in log_history if "loss" in row and "step" in row]


def final_eval_loss(trainer) -> float | None:
    """The eval loss after the last step: Trainer's own when it evaluated that step (eval_steps > 0
    does), so that it is not run and logged twice; else from one evaluation now."""
    step = trainer.state.global_step
    done = [
        row["eval_loss"] for row in trainer.state.log_history if "eval_loss" in row and row["step"] == step
    ]
    return done[-1] if done else trainer.evaluate().get("eval_loss")


def plot_losses(
    history: list[tuple[int, float]], path: Path, eval_points: list[tuple[int, float]]
) -> str | None:
    """Save the loss curve as a PNG; returns a note instead when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return (
            "loss curve not drawn: matplotlib is not installed (pip install matplotlib); "
            "the numbers are in metrics.json"
        )
    figure, axes = plt.subplots(figsize=(6, 3.6), dpi=110)
    if history:
        steps, losses = zip(*history, strict=True)
        axes.plot(steps, losses, label="train loss", linewidth=1.2)
    if eval_points:
        steps, losses = zip(*eval_points, strict=True)
        axes.plot(steps, losses, "o-", label="eval loss")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_yscale("log")
    axes.grid(True, alpha=0.3)
    axes.legend()
    axes.set_title("fusetune train")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return None


def generate_samples(model, collator, dataset, count: int, max_new_tokens: int) -> list[dict[str, str]]:
    """Greedy answers of the model for the first ``count`` samples, next to the truth."""
    if count <= 0 or dataset is None or len(dataset) == 0:
        return []
    tokenizer = collator.tokenizer
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for index in range(min(count, len(dataset))):
                inputs, truth = collator.prompt(dataset[index])
                inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
                generated = model.generate(
                    **inputs,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )
                answer = tokenizer.decode(
                    generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
                )
                # Compare as the tokenizer writes text back (its spacing), not as the data set spells it.
                written = tokenizer.decode(
                    tokenizer(truth, add_special_tokens=False)["input_ids"], skip_special_tokens=True
                )
                out.append(
                    {
                        "truth": truth.strip(),
                        "generated": answer.strip(),
                        "match": " ".join(written.split()) == " ".join(answer.split()),
                    }
                )
    finally:
        model.train(was_training)
    return out


def _checkpointing_arguments(arguments_class, on: bool) -> dict:
    """TrainingArguments' checkpointing switch and its keyword arguments (non-reentrant), under the
    names this transformers has: ``activation_checkpointing*`` from 5.2x on, where the older
    ``gradient_checkpointing*`` names are deprecated, else those."""
    names = {known.name for known in fields(arguments_class)}
    name = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {name: on, f"{name}_kwargs": {"use_reentrant": False} if on else None}


def training_arguments(config: TrainConfig, dtype: torch.dtype, has_eval: bool, model: torch.nn.Module):
    """Trainer's arguments for ``config``; ``model`` (built and patched) names FSDP2's layer classes.

    ``gradient_checkpointing: on`` is Trainer's (transformers' non-reentrant checkpointing);
    ``offload`` was enabled on the model by fusetune and Trainer must not install its own over it.
    """
    from transformers import TrainingArguments

    cuda = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=config.output_dir,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        max_steps=config.max_steps,
        num_train_epochs=config.epochs,
        logging_steps=config.logging_steps,
        logging_nan_inf_filter=False,  # log a nan loss as nan (finite_loss_callback stops the run on it)
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit or None,
        eval_strategy="steps" if has_eval and config.eval_steps > 0 else "no",
        eval_steps=config.eval_steps or None,
        seed=config.seed,
        data_seed=config.seed,
        report_to="none",
        remove_unused_columns=False,
        label_names=["labels"],
        dataloader_num_workers=config.dataloader_workers,
        **_checkpointing_arguments(TrainingArguments, config.gradient_checkpointing == "on"),
        bf16=cuda and dtype == torch.bfloat16,
        fp16=cuda and dtype == torch.float16,
        use_cpu=not cuda,
        disable_tqdm=False,
        **distributed.training_arguments(config.distributed, model),
    )


def train(config: TrainConfig, quiet: bool = False, callbacks: list | None = None) -> TrainResult:
    """Run one fine-tuning job as ``config`` says (see the module docstring for what it writes).

    ``config`` is checked first as the command line checks it (a ``TrainConfig`` built in Python
    has not been). ``callbacks``: extra ``transformers.TrainerCallback`` objects for the Trainer.
    """
    from transformers import ProgressCallback, Trainer, set_seed
    from transformers.utils import logging as hf_logging

    from fusetune.train.collator import ChatCollator
    from fusetune.train.data import load_splits
    from fusetune.train.model import load_model, resolve_dtype

    config = build_config(to_dict(config))
    distributed.check_launched(config.distributed)
    started = time.perf_counter()
    quiet = quiet or not distributed.is_main_process()
    sharded = config.distributed.strategy != "off"
    distributed.select_device()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    hf_logging.set_verbosity_error()
    warnings.filterwarnings(
        "ignore", message=r".*is deprecated and will be removed in v6.*", category=FutureWarning
    )
    set_seed(config.seed)
    if config.model == "demo" and not torch.cuda.is_available():
        # The demo's matrices are tiny: one thread is as fast as several, and it does not stall
        # (several threads slow down many times over when another process holds a core).
        torch.set_num_threads(1)
    prepare_output_dir(config, lambda text: _say(quiet, text))
    checkpoint = resume_checkpoint(config, lambda text: _say(quiet, text))
    output_dir = Path(config.output_dir)

    train_set, eval_set = load_splits(config)
    _say(
        quiet,
        f"data: {len(train_set)} training samples"
        + (f", {len(eval_set)} held out" if eval_set is not None else "")
        + f" ({config.dataset})",
    )
    dtype = resolve_dtype(config.dtype)
    model, processor = load_model(
        config.model,
        load_in_4bit=config.load_in_4bit,
        lora=config.lora,
        dtype=config.dtype,
        kernels=config.kernels,
        loss=config.loss,
        max_pixels=config.max_pixels,
        mlp_tile_rows=config.mlp_tile_rows or None,
        strategy=config.distributed.strategy,
        chat_template=config.chat_template or None,
    )
    if checkpoint:
        check_resume_lora(checkpoint, model.peft_config["default"])
    if config.packing:
        from fusetune.train.packing import use_packed_attention

        # fusetune_varlen (or flash attention 2 where flash_attn is installed) on the language model:
        # each packed sample's attention on its own, without a (row x row) mask.
        attention = use_packed_attention(model)
        _say(quiet, f"packing: {config.batch_size} samples a row; the language model runs {attention}")
    if config.gradient_checkpointing == "offload":
        from fusetune.checkpointing import enable_checkpointing

        enable_checkpointing(model, offload=True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    base = getattr(model, "get_base_model", lambda: model)()
    _say(
        quiet,
        f"model: {config.model} ({type(base).__name__}, {total / 1e6:.2f}M parameters, "
        f"{trainable / 1e6:.2f}M trainable LoRA r={config.lora.r}); kernels: {config.kernels}",
    )
    report = getattr(model, "_fusetune_report", None)
    if report is not None:
        patched = {k: len(v) for k, v in report.patched.items() if v}
        _say(
            quiet,
            "fusetune.apply: " + (", ".join(f"{k} {n}" for k, n in patched.items()) or "nothing patched"),
        )

    collator = ChatCollator(processor, config.max_seq_length, config.max_pixels)
    train_collator = collator
    if config.packing:
        from fusetune.train.packing import PackingCollator

        train_collator = PackingCollator(collator, model.config)
    train_collator(list(train_set.samples[: config.batch_size]))  # fail fast on the first batch's data
    for dataset in (train_set, eval_set):
        if dataset is not None:
            collator.check_lengths(dataset.samples)

    args = training_arguments(config, dtype, eval_set is not None, model)
    distributed.shard_cpu_processes(args, config.distributed)
    trainer = Trainer(
        model=model, args=args, train_dataset=train_set, eval_dataset=eval_set, data_collator=train_collator
    )
    distributed.check_engine(trainer, config.distributed)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(_progress_callback(quiet))
    trainer.add_callback(_last_step_logger())
    for callback in callbacks or []:
        trainer.add_callback(callback)
    stop = StopOnSignal()
    # In this order, after the others: a save decided at a step end is logged (and so checked), then
    # the checkpoint's folder gets the run's record.
    for callback in (stop.callback(), finite_loss_callback(config), record_callback(config)):
        trainer.add_callback(callback)
    if checkpoint:
        _say(quiet, f"resuming from {checkpoint}")
    try:
        with stop:
            trainer.train(resume_from_checkpoint=checkpoint)
    except torch.OutOfMemoryError:
        raise FusetuneError(
            f"out of GPU memory at batch_size={config.batch_size}, max_seq_length={config.max_seq_length}, "
            f"max_pixels={config.max_pixels}: lower batch_size (raise gradient_accumulation_steps to keep "
            f"the effective batch), lower max_seq_length or max_pixels, set gradient_checkpointing: on, "
            f"or load_in_4bit: true."
        ) from None
    except KeyboardInterrupt:
        last = last_checkpoint(config.output_dir)
        where = (
            f"the last checkpoint is {last}"
            if last
            else f"no checkpoint was written yet (every {config.save_steps} steps)"
        )
        raise Interrupted(
            f"interrupted at step {trainer.state.global_step}; {where}. "
            f"Run the same command with --resume to "
            f"continue from it."
        ) from None
    interrupted = stop.interrupted(config.output_dir)
    if interrupted:
        raise interrupted

    history = _loss_history(trainer.state.log_history)
    eval_loss = final_eval_loss(trainer) if eval_set is not None else None
    eval_points = [(row["step"], row["eval_loss"]) for row in trainer.state.log_history if "eval_loss" in row]
    shown = generate_samples(
        model,
        collator,
        eval_set if eval_set is not None else train_set,
        config.show_samples,
        config.max_new_tokens,
    )

    files: dict[str, str] = {}
    adapter_dir = output_dir / "adapter"
    files["adapter"] = str(adapter_dir)
    if sharded:
        # Every rank takes part in gathering the shards; the main process writes one adapter.
        trainer.save_model(str(adapter_dir))
    if not distributed.is_main_process():
        trainer.accelerator.wait_for_everyone()  # the main process writes the rest, then merges
        return TrainResult(output_dir, trainer.state.global_step, None, None, eval_loss, shown, 0.0, files)
    output_dir.mkdir(parents=True, exist_ok=True)
    if not sharded:
        model.save_pretrained(adapter_dir)
    try:
        processor.save_pretrained(adapter_dir)
    except Exception as error:  # noqa: BLE001 - the adapter is saved; the processor copy is a convenience
        _say(quiet, f"note: processor not saved with the adapter ({type(error).__name__}: {error})")
    (output_dir / "config.yaml").write_text(to_yaml(config))
    files["config"] = str(output_dir / "config.yaml")

    first = history[0][1] if history else None
    final = history[-1][1] if history else None
    runtime = time.perf_counter() - started
    matches = sum(s["match"] for s in shown)
    metrics = {
        "global_step": trainer.state.global_step,
        "first_loss": first,
        "final_loss": final,
        "eval_loss": eval_loss,
        "runtime_s": round(runtime, 2),
        "train_samples": len(train_set),
        "eval_samples": len(eval_set) if eval_set is not None else 0,
        "samples": shown,
        "samples_exact_match": f"{matches}/{len(shown)}",
        "loss_history": [{"step": s, "loss": v} for s, v in history],
        "eval_history": [{"step": s, "eval_loss": v} for s, v in eval_points],
    }
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    files["metrics"] = str(output_dir / "metrics.json")
    note = plot_losses(history, output_dir / "loss.png", eval_points)
    if note:
        _say(quiet, f"note: {note}")
    else:
        files["loss_curve"] = str(output_dir / "loss.png")

    if config.save_merged:
        # Sharded weights cannot merge in place, nor 4-bit ones without quantising the merge (and a
        # bitsandbytes model refuses the cast to 16 bits): those merge into the base loaded again.
        reload = sharded or config.load_in_4bit
        whole = distributed.reload_with_adapter(config, adapter_dir) if reload else model
        files["merged"] = str(save_merged(whole, processor, output_dir / "merged", dtype))
    if distributed.world_size() > 1:
        trainer.accelerator.wait_for_everyone()  # the other ranks wait for these files, then exit

    if shown:
        _say(quiet, f"\nheld-out samples (greedy, {matches}/{len(shown)} exact):")
        for sample in shown:
            _say(quiet, f"  truth:     {sample['truth']}\n  generated: {sample['generated']}")
    if first is not None and final is not None:
        _say(
            quiet,
            f"\nloss {first:.3f} -> {final:.3f} in {trainer.state.global_step} steps"
            + (f"; eval loss {eval_loss:.3f}" if eval_loss is not None else "")
            + f" ({runtime:.0f} s)",
        )
    _say(
        quiet,
        f"saved: adapter {adapter_dir}, config, metrics"
        + (", loss curve" if "loss_curve" in files else "")
        + (", merged weights" if config.save_merged else "")
        + f" in {output_dir}",
    )
    return TrainResult(output_dir, trainer.state.global_step, first, final, eval_loss, shown, runtime, files)


def save_merged(model, processor, path: Path, dtype: torch.dtype) -> Path:
    """The base model with the adapter merged in, in 16-bit (bfloat16 unless training ran in float16).

    The adapter merges into the base as this run holds it, the weights it trained against: a bfloat16
    run (``dtype: auto`` on a GPU) has its base in bfloat16 already, so its merge differs from a merge
    into the float32 original by that rounding. PEFT adds the float32 LoRA update in float32 and rounds
    once (tests/train/test_merged_keys.py checks every saved tensor against that).
    """
    import fusetune

    fusetune.unapply(model)
    merged = model.merge_and_unload()
    half = torch.float16 if dtype == torch.float16 else torch.bfloat16
    merged.to(half).save_pretrained(path)
    try:
        processor.save_pretrained(path)
    except Exception:  # noqa: BLE001 - see the adapter's processor copy
        pass
    return path
