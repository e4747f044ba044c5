"""Several GPUs: the ``distributed`` config section as Trainer arguments, and the ``--nproc`` launcher.

fusetune adds no engine of its own: ``distributed.strategy: fsdp2`` becomes HF Trainer's FSDP
arguments (accelerate then calls ``fully_shard`` on each wrapped layer class, the embeddings, the
head and the root) and ``deepspeed_zero3`` a generated DeepSpeed ZeRO-3 config. The model is built
and patched (``fusetune.apply``) on every rank before Trainer shards it, so the patching sees whole
weights; the sharded parts then run inside their modules' forward, where the engines gather them.

``fusetune train --nproc N`` starts ``N`` processes with ``torchrun`` (``python -m
torch.distributed.run``), each running the same ``fusetune train`` command without ``--nproc``. A
process stopped by a ``FusetuneError`` (or Ctrl-C) leaves its message in a folder the launcher
names in ``FUSETUNE_ERROR_DIR``; the launcher repeats it as its own last line and exits as one
process would (status 2, or 130 / 143 after SIGINT / SIGTERM), where torchrun alone ends with its
failure report and status 1. torchrun starts each process in a session of its own, so Ctrl-C in the
terminal reaches torchrun, which passes it on to every process once (and kills them 30 s later).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fusetune.train.config import DistributedSettings, TrainConfig
from fusetune.train.errors import FusetuneError, Interrupted

ERROR_DIR_VARIABLE = "FUSETUNE_ERROR_DIR"


def world_size() -> int:
    """The number of processes of this run (torchrun and accelerate set ``WORLD_SIZE``)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Whether this process writes the outputs and prints (rank 0, or a run of one process)."""
    return int(os.environ.get("RANK", "0")) == 0


def select_device() -> None:
    """Bind this process to its own GPU (``LOCAL_RANK``) before the model loads.

    Trainer does this too, but later: 4-bit loading places the weights on the current device,
    which is GPU 0 in every process until it is set.
    """
    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))


def wrap_classes(model: nn.Module, settings: DistributedSettings) -> list[str]:
    """The class names FSDP2 shards as one unit each: ``settings.wrap_classes``, or with "auto" the
    ``_no_split_modules`` of the transformers models inside ``model`` (a PEFT wrapper is looked
    through), keeping the names that occur in it."""
    present = {type(module).__name__ for module in model.modules()}
    if settings.wrap_classes != "auto":
        missing = [name for name in settings.wrap_classes if name not in present]
        report = getattr(model, "_fusetune_report", None)
        replaced = [name for name in missing if report is not None and name in report.replaced_classes()]
        if replaced:
            layers = ", ".join(_declared(model)) or "none declared"
            raise FusetuneError(
                f"distributed.wrap_classes: fusetune replaced {', '.join(replaced)} with its fused modules "
                f"(kernels: auto); wrap the decoder layer classes ({layers}), which hold them (a sub-layer "
                f"module sharded on its own would turn the fused paths off), or set kernels: off."
            )
        if missing:
            raise FusetuneError(
                f"distributed.wrap_classes: {', '.join(missing)} not in the model; its decoder layer "
                f"classes include {', '.join(_declared(model)) or 'none declared'} (or use auto)."
            )
        return list(settings.wrap_classes)
    names = [name for name in _declared(model) if name in present]
    if not names:
        raise FusetuneError(
            f"distributed.wrap_classes: auto found no layer classes in {type(model).__name__} "
            f"(no _no_split_modules); list its decoder layer class in distributed.wrap_classes."
        )
    return names


def _declared(model: nn.Module) -> list[str]:
    """Every ``_no_split_modules`` entry of the modules in ``model``, in order, without repeats."""
    names: list[str] = []
    for module in model.modules():
        for name in getattr(type(module), "_no_split_modules", None) or []:
            if name not in names:
                names.append(name)
    return names


def fsdp_config(model: nn.Module, settings: DistributedSettings) -> dict[str, Any]:
    """TrainingArguments' ``fsdp_config`` for FSDP2 (the keys transformers 5.1x-5.2x read)."""
    return {
        "version": 2,
        "reshard_after_forward": True,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_layer_cls_to_wrap": wrap_classes(model, settings),
        "cpu_offload": settings.offload_params,
        # One consolidated adapter per checkpoint: it loads on one GPU, and resumes on as many ranks.
        "state_dict_type": "FULL_STATE_DICT",
    }


def deepspeed_config(settings: DistributedSettings) -> dict[str, Any]:
    """A DeepSpeed ZeRO-3 config; its "auto" values are filled in by Trainer from its arguments."""
    zero: dict[str, Any] = {
        "stage": 3,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto",
        # Gather the whole weights when saving: checkpoints load without DeepSpeed, on one GPU.
        "stage3_gather_16bit_weights_on_model_save": True,
    }
    config: dict[str, Any] = {
        "zero_optimization": zero,
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
    }
    if settings.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if settings.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        # An offloaded optimiser must be DeepSpeed's own CPU AdamW, not Trainer's torch one.
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
        }
    return config


def training_arguments(settings: DistributedSettings, model: nn.Module) -> dict[str, Any]:
    """The TrainingArguments keywords of ``settings`` (empty for strategy off)."""
    if settings.strategy == "fsdp2":
        return {"fsdp": True, "fsdp_config": fsdp_config(model, settings)}
    if settings.strategy == "deepspeed_zero3":
        return {"deepspeed": deepspeed_config(settings)}
    return {}


def shard_cpu_processes(args: Any, settings: DistributedSettings) -> None:
    """Let accelerate shard CPU processes with FSDP2 (over gloo) as it shards GPU processes, and
    DeepSpeed start them without compiling an op it does not need (``skip_deepspeed_shm_op``).

    accelerate (1.15: ``AcceleratorState.__init__``, accelerate/state.py) takes its FSDP branch only
    for processes on an accelerator (``MULTI_GPU``, ``MULTI_XPU``, ...); for processes on the CPU
    (``MULTI_CPU``) it drops the FSDP plugin without a word and Trainer wraps the model in DDP.
    Presented as ``MULTI_GPU`` before Trainer builds its Accelerator, they take that branch, as on
    GPUs; the device stays the CPU and the process group gloo, which ``fully_shard`` runs on.
    ``args`` is the run's ``TrainingArguments``; call this before ``Trainer(...)`` and before
    anything reads ``args.device`` (which sets up the process group).
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if settings.strategy == "deepspeed_zero3":
        skip_deepspeed_shm_op()
        return
    if settings.strategy != "fsdp2":
        return
    _ = args.device  # sets up the process group and accelerate's PartialState, as Trainer would
    state = PartialState()
    if state.distributed_type == DistributedType.MULTI_CPU:
        state.distributed_type = DistributedType.MULTI_GPU


def skip_deepspeed_shm_op() -> None:
    """Have DeepSpeed's communication backend go without its shared-memory all-reduce op.

    With its CPU accelerator (no GPU), DeepSpeed JIT-compiles that C++ op in ``init_distributed``
    (a compiler and about a minute) for ``inference_all_reduce`` alone, which training does not
    call; without it every collective runs on the process group (gloo). Call this before the
    process group is set up (``TrainingArguments.device``, ``deepspeed.init_distributed``); on GPUs
    DeepSpeed builds no such op and this changes nothing. The attribute ``deepspeed.comm.torch`` is
    the torch package (re-exported), hence ``sys.modules``.
    """
    import importlib

    importlib.import_module("deepspeed.comm.torch")
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def check_engine(trainer: Any, settings: DistributedSettings) -> None:
    """Refuse a run of several processes where accelerate left the configured engine off.

    Without it Trainer would run plain data parallel (DDP), every process holding the whole model
    and optimiser state, while the config says sharded.
    """
    if settings.strategy == "off" or world_size() == 1:
        return
    fsdp = settings.strategy == "fsdp2"
    enabled = trainer.is_fsdp_enabled if fsdp else trainer.is_deepspeed_enabled
    if enabled:
        return
    import accelerate

    fix = (
        "run on GPUs, or with accelerate 1.15 (whose FSDP fusetune runs on CPU processes)"
        if fsdp
        else "launch with fusetune train --nproc N or torchrun, without an accelerate config that sets "
        "another distributed type"
    )
    raise FusetuneError(
        f"distributed.strategy {settings.strategy}: accelerate {accelerate.__version__} did not turn it on "
        f"for these {world_size()} processes on {trainer.args.device.type}, which would run as plain data "
        f"parallel (DDP), each with the whole model; {fix}."
    )


def saved_under(checkpoint: str) -> str | None:
    """The strategy whose files a Trainer checkpoint holds: "deepspeed_zero3" (a ``latest`` tag and
    per-process optimiser shards), "fsdp2" (accelerate's ``pytorch_model_fsdp.bin`` and
    ``optimizer.bin``), "off" (Trainer's own ``optimizer.pt``), or None where it has no optimiser
    state."""
    folder = Path(checkpoint)
    if (folder / "latest").is_file():
        return "deepspeed_zero3"
    if (folder / "optimizer.bin").is_file() or any(folder.glob("pytorch_model_fsdp*")):
        return "fsdp2"
    if (folder / "optimizer.pt").is_file():
        return "off"
    return None


def check_resume(checkpoint: str, settings: DistributedSettings) -> None:
    """Refuse to resume a checkpoint that this run cannot continue, naming the fix.

    Each strategy writes its own optimiser state, which only it reads: Trainer stops deep in loading
    on another's (FSDP2 without FSDP, a one-process checkpoint under FSDP2 or DeepSpeed), or would
    restore the adapter and the step and silently start a fresh optimiser (DeepSpeed's shards
    without DeepSpeed). DeepSpeed keeps one shard per process (``<tag>/*zero_pp_rank_R_
    *_optim_states.pt``, the tag named by ``latest``) and reads them on as many processes only.
    """
    writer = saved_under(checkpoint)
    if writer is None or (writer == settings.strategy and writer != "deepspeed_zero3"):
        return
    if writer != "deepspeed_zero3":
        raise FusetuneError(
            f"resume: {checkpoint} was written with distributed.strategy: {writer}, and only that "
            f"strategy reads its optimiser state; resume with distributed.strategy: {writer} (the "
            f"adapter alone, adapter_model.safetensors, loads anywhere)."
        )
    latest = Path(checkpoint) / "latest"
    saved = len(list((latest.parent / latest.read_text().strip()).glob("*zero_pp_rank_*_optim_states.pt")))
    if settings.strategy != "deepspeed_zero3":
        raise FusetuneError(
            f"resume: {checkpoint} was written under DeepSpeed ZeRO-3 by {saved} processes, and only "
            f"DeepSpeed reads its optimiser state; resume with distributed.strategy: deepspeed_zero3 "
            f"and --nproc {saved} (the adapter alone, adapter_model.safetensors, loads anywhere)."
        )
    if saved != world_size():
        raise FusetuneError(
            f"resume: {checkpoint} was written under DeepSpeed ZeRO-3 by {saved} processes, and DeepSpeed "
            f"resumes its optimiser shards on as many only; run with --nproc {saved} (this run has "
            f"{world_size()})."
        )


def check_launched(settings: DistributedSettings) -> None:
    """Refuse a distributed strategy in a process that no launcher started, or FSDP2's offloading
    where there is no GPU (its pinned host memory needs one), before anything loads.

    Trainer runs FSDP only under a launcher (torchrun and accelerate launch set ``LOCAL_RANK``);
    otherwise it stops late, after the data and the model have loaded, with an error that names
    neither ``--nproc`` nor the config key. DeepSpeed, unlaunched, goes looking for MPI there.
    """
    if settings.strategy == "fsdp2" and settings.offload_params and not torch.cuda.is_available():
        raise FusetuneError(
            "config key 'distributed.offload_params': FSDP2 offloads to pinned host memory, which needs a "
            "GPU; on CPU processes (a setup tried out without GPUs) set it to false."
        )
    if settings.strategy != "off" and "LOCAL_RANK" not in os.environ:
        raise FusetuneError(
            f"config key 'distributed.strategy': {settings.strategy} runs one process per GPU under a "
            "launcher; start it with fusetune train --nproc N (or torchrun / accelerate launch), or set "
            "distributed.strategy: off to train in this one process."
        )


def check_nproc(nproc: int, config: TrainConfig) -> None:
    """Refuse an ``--nproc`` the config or the machine cannot run, naming the fix."""
    if nproc < 1:
        raise FusetuneError(f"--nproc {nproc}: give the number of processes to start, at least 1.")
    if nproc > 1 and config.distributed.strategy == "off":
        raise FusetuneError(
            f"--nproc {nproc} with distributed.strategy off; set distributed.strategy: fsdp2 (or "
            f"deepspeed_zero3) in the config, or add --distributed.strategy fsdp2."
        )
    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise FusetuneError(
            f"--nproc {nproc} but {torch.cuda.device_count()} GPU(s) are visible; use --nproc "
            f"{torch.cuda.device_count()} or fewer (CUDA_VISIBLE_DEVICES picks which)."
        )


def torchrun_command(nproc: int, train_argv: list[str]) -> list[str]:
    """The command that runs ``fusetune train *train_argv`` in ``nproc`` processes on this machine."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        "-m",
        "fusetune",
        "train",
        *train_argv,
    ]


def run_processes(nproc: int, train_argv: list[str]) -> int:
    """Run ``fusetune train *train_argv`` in ``nproc`` processes; torchrun's status, or a process's error.

    Raises the first rank's ``FusetuneError`` (``Interrupted`` for Ctrl-C) when a process reported
    one, so that the launcher prints it and exits as a single process would.

    torchrun and its processes run in a session of their own, and the launcher passes each SIGINT
    and SIGTERM it gets on to all of them, once: a signal sent to the launcher alone (a container's
    first process, as Kubernetes stops it) reaches the processes, which save a checkpoint and stop,
    and one sent to the launcher's whole group reaches them once, not twice.
    """
    command = torchrun_command(nproc, train_argv)
    print(f"fusetune train: starting {nproc} processes: {' '.join(command)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="fusetune-errors-") as folder:
        env = {**os.environ, ERROR_DIR_VARIABLE: folder}
        process = subprocess.Popen(command, env=env, start_new_session=True)
        with _signals_passed_on(process):
            status = process.wait()
        reports = _reports(Path(folder))
    if status == 0 or not reports:
        return status
    interrupted = all(report["interrupted"] for report in reports)
    messages = list(dict.fromkeys(report["message"] for report in reports))
    message = (
        messages[0]
        if len(messages) == 1
        else "\n".join(f"rank {report['rank']}: {report['message']}" for report in reports)
    )
    if interrupted:
        raise Interrupted(message, reports[0].get("status", 130))
    raise FusetuneError(message)


@contextlib.contextmanager
def _signals_passed_on(process: subprocess.Popen) -> Iterator[None]:
    """SIGINT and SIGTERM passed on to ``process``'s session (torchrun and its processes) for the block,
    the previous handlers restored after it (``train`` may run inside a program with its own; outside
    the main thread, where Python sets no handlers, nothing changes)."""

    def pass_on(signum, frame):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)

    signums = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
    previous = {signum: signal.signal(signum, pass_on) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def report_to_launcher(error: FusetuneError) -> None:
    """Leave ``error`` for the ``--nproc`` launcher, when this process is one it started."""
    folder = os.environ.get(ERROR_DIR_VARIABLE)
    if not folder or not Path(folder).is_dir():
        return
    rank = int(os.environ.get("RANK", "0"))
    report = {"rank": rank, "interrupted": isinstance(error, Interrupted), "message": str(error)}
    if isinstance(error, Interrupted):
        report["status"] = error.status
    (Path(folder) / f"rank{rank}.json").write_text(json.dumps(report))


def _reports(folder: Path) -> list[dict[str, Any]]:
    """The errors the processes left in ``folder``, by rank."""
    reports = [json.loads(path.read_text()) for path in folder.glob("rank*.json")]
    return sorted(reports, key=lambda report: report["rank"])


def reload_with_adapter(config: TrainConfig, adapter_dir: Path) -> nn.Module:
    """The unsharded base model of ``config`` on the CPU with the adapter saved in ``adapter_dir``.

    After a sharded run this is how the merged weights are made: from the consolidated adapter
    file, as a user would load it on one GPU, rather than from the shards; after a 4-bit run, so
    that the adapter merges into 16-bit weights rather than being quantised with the 4-bit ones.
    """
    import peft

    from fusetune.train.model import load_model

    with _zero3_off():
        base, _ = load_model(
            config.model, lora=False, kernels="off", dtype=config.dtype, max_pixels=config.max_pixels
        )
        return peft.PeftModel.from_pretrained(base, str(adapter_dir))


@contextlib.contextmanager
def _zero3_off() -> Iterator[None]:
    """transformers' global ZeRO-3 switch turned off for the block, then restored.

    ``TrainingArguments`` with a ZeRO-3 config registers it for the whole process, and from then on
    transformers builds every model (``from_pretrained``, and ``_from_config``, with which the demo
    builds its vision tower) under ``deepspeed.zero.Init``: partitioned across the ranks, with
    collectives the other ranks never join when the main process alone loads, so it hangs.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    registered = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = registered
