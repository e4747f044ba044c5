"""The ``fusetune`` command: ``fusetune train [CONFIG.yaml] [--key value ...]`` and ``fusetune info``.

Problems with the input or the setup (``FusetuneError``) print one line, ``fusetune: error: ...``,
and exit with status 2, without a traceback. Ctrl-C (SIGINT) or SIGTERM during training finishes the
optimiser step, saves a checkpoint, prints where it is and how to resume, also without a traceback,
and exits with status 130 (SIGINT) or 143 (SIGTERM); a second Ctrl-C stops at once.
"""

from __future__ import annotations

import sys

USAGE = """usage: fusetune train [--nproc N] [CONFIG.yaml] [--key value ...]
       fusetune info

train   LoRA fine-tuning from a YAML config; command-line overrides win over the file (nested keys
        with a dot: --lora.r 8; a bare flag means true: --resume). With no config, the embedded
        default runs: a tiny Qwen2-VL with random weights learns to caption synthetic shapes on the CPU.
        Trainer writes a checkpoint every save_steps steps, and one more on Ctrl-C or SIGTERM (it
        finishes the step, saves and stops; a second Ctrl-C stops at once); after a stop or a kill,
        run the same command with --resume to continue from the last one.
        --nproc N: train on N GPUs of this machine (without GPUs: N CPU processes);
        starts N processes with torchrun (python -m torch.distributed.run --standalone
        --nproc_per_node N -m fusetune train ...). Needs distributed.strategy fsdp2 or
        deepspeed_zero3; accelerate launch and torchrun work too.
info    versions, GPU, which kernels run (Triton or the PyTorch references), supported architectures.
"""


def _train_help() -> str:
    from fusetune.train.config import describe

    return USAGE + "\nconfig keys (key, type, default, meaning; also in docs/train.md):\n" + describe() + "\n"


def split_nproc(argv: list[str]) -> tuple[int | None, list[str]]:
    """``--nproc N`` (or ``--nproc=N``) taken out of ``argv``: ``(N or None, the other arguments)``."""
    from fusetune.train.errors import FusetuneError

    rest: list[str] = []
    nproc = None
    items = iter(argv)
    for item in items:
        if item == "--nproc" or item.startswith("--nproc="):
            value = item.partition("=")[2] if "=" in item else next(items, "")
            if not value.isdigit():
                raise FusetuneError(f"--nproc takes a number of processes, got {value!r}: --nproc 2.")
            nproc = int(value)
        else:
            rest.append(item)
    return nproc, rest


def train_command(argv: list[str]) -> int:
    from fusetune.train.config import load_config

    if any(a in ("-h", "--help") for a in argv):
        print(_train_help())
        return 0
    nproc, argv = split_nproc(argv)
    train_argv = list(argv)
    path = None
    if argv and not argv[0].startswith("--"):
        path, argv = argv[0], argv[1:]
    config = load_config(path, argv)
    if nproc is not None:
        from fusetune.train import distributed

        distributed.check_nproc(nproc, config)
        return distributed.run_processes(nproc, train_argv)
    from fusetune.train.distributed import is_main_process
    from fusetune.train.runner import train

    if is_main_process():
        print(
            f"fusetune train: {'config ' + path if path else 'the embedded demo config'}"
            f"{' with overrides' if argv else ''}; output in {config.output_dir}",
            flush=True,
        )
    train(config)
    return 0


def info_command() -> str:
    """The text of ``fusetune info``."""
    import platform

    import torch

    import fusetune

    lines = [
        f"fusetune {fusetune.__version__}",
        f"python {platform.python_version()} ({platform.machine()})",
        f"torch {torch.__version__}",
    ]
    for name in (
        "triton",
        "transformers",
        "peft",
        "accelerate",
        "bitsandbytes",
        "datasets",
        "PIL",
        "matplotlib",
        "trl",
    ):
        try:
            module = __import__(name)
            lines.append(f"{name if name != 'PIL' else 'pillow'} {getattr(module, '__version__', '?')}")
        except ImportError:
            lines.append(f"{name if name != 'PIL' else 'pillow'} not installed")
    from fusetune.ops import _launch

    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            lines.append(
                f"gpu {index}: {props.name}, {props.total_memory / 2**30:.0f} GiB, "
                f"compute capability {props.major}.{props.minor}"
            )
    else:
        lines.append("gpu: none (CUDA not available)")
    if _launch.triton is None:
        kernels = "PyTorch references everywhere (triton not installed)"
    elif _launch.interpreting():
        kernels = "Triton kernels through the CPU interpreter (TRITON_INTERPRET=1; slow, for tests)"
    elif torch.cuda.is_available():
        kernels = "Triton kernels on CUDA tensors; PyTorch references on CPU tensors"
    else:
        kernels = "PyTorch references (no GPU; Triton kernels run on CUDA tensors)"
    lines.append(f"kernels: {kernels}")
    from fusetune.patch.loss import KNOWN_HEADS
    from fusetune.train.model import TESTED_VLMS

    lines.append("fused loss heads: " + ", ".join(sorted(KNOWN_HEADS)))
    lines.append("norms, GLU MLPs and rotary embeddings: recognised by structure in any architecture")
    lines.append(
        "train: causal LMs and image-text-to-text models; VLM collator tested on "
        + ", ".join(TESTED_VLMS)
        + "; demo model: qwen2_vl"
    )
    return "\n".join(lines)


def _report_to_launcher(error: Exception) -> None:
    """Hand ``error`` to the ``--nproc`` launcher that started this process, if one did."""
    from fusetune.train.distributed import report_to_launcher

    report_to_launcher(error)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from fusetune.train.errors import FusetuneError, Interrupted

    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    try:
        if command == "train":
            return train_command(rest)
        if command == "info":
            print(info_command())
            return 0
        print(f"fusetune: error: unknown command {command!r}\n{USAGE}", file=sys.stderr)
        return 2
    except Interrupted as error:
        _report_to_launcher(error)
        print(f"fusetune: {error}", file=sys.stderr)
        return error.status
    except FusetuneError as error:
        _report_to_launcher(error)
        print(f"fusetune: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "fusetune: interrupted; run the same command with --resume to continue from the last checkpoint.",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
