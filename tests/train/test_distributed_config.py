"""The ``distributed`` config section: validation, the Trainer arguments it becomes, ``--nproc``.

Nothing is launched: the FSDP2 arguments are checked as transformers' ``TrainingArguments`` reads
them (``fsdp_plugin_args``, what accelerate's FSDP plugin is built from), the DeepSpeed config as
a dict, and ``--nproc`` through the command it would run.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch
import yaml

from fusetune import cli
from fusetune.train import distributed
from fusetune.train.config import DistributedSettings, build_config, load_config
from fusetune.train.errors import FusetuneError, Interrupted
from fusetune.train.runner import training_arguments


@pytest.fixture
def environment():
    """TrainingArguments sets process environment variables for accelerate; put them back after."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def lora_llama():
    import peft

    from tests.patch.models import tiny_model

    config = peft.LoraConfig(r=2, target_modules=["q_proj"])
    return peft.get_peft_model(tiny_model("llama"), config)


def test_fsdp2_becomes_trainers_fsdp_arguments(lora_llama, environment):
    config = load_config(None, ["--distributed.strategy", "fsdp2", "--distributed.offload_params"])
    args = training_arguments(config, torch.float32, False, lora_llama)
    assert args.fsdp is True and args.deepspeed is None
    plugin = args.fsdp_plugin_args
    assert plugin["fsdp_version"] == 2
    assert plugin["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert plugin["transformer_cls_names_to_wrap"] == "LlamaDecoderLayer"  # through the PEFT wrapper
    assert plugin["cpu_offload"] is True
    assert plugin["state_dict_type"] == "FULL_STATE_DICT"
    assert plugin["reshard_after_forward"] is True


def test_without_a_strategy_no_sharding_arguments(lora_llama, environment):
    args = training_arguments(load_config(None, []), torch.float32, False, lora_llama)
    assert not args.fsdp and args.deepspeed is None


def test_wrap_classes_listed_or_refused(lora_llama):
    assert distributed.wrap_classes(lora_llama, DistributedSettings("fsdp2", wrap_classes=["LlamaMLP"])) == [
        "LlamaMLP"
    ]
    with pytest.raises(FusetuneError, match="Qwen2DecoderLayer not in the model.*LlamaDecoderLayer"):
        distributed.wrap_classes(lora_llama, DistributedSettings("fsdp2", wrap_classes=["Qwen2DecoderLayer"]))
    with pytest.raises(FusetuneError, match="auto found no layer classes.*wrap_classes"):
        distributed.wrap_classes(torch.nn.Linear(2, 2), DistributedSettings("fsdp2"))


def test_wrap_classes_naming_a_class_fusetune_replaced_says_so():
    """LlamaMLP swapped for fusetune's fused MLP: the class is gone from the model because fusetune
    replaced it (the message said it was not in the model)."""
    import fusetune
    from tests.patch.models import tiny_model

    model = tiny_model("llama")
    fusetune.apply(model)  # (it keeps its report on the model, as _fusetune_report)
    with pytest.raises(
        FusetuneError,
        match="fusetune replaced LlamaMLP with its fused modules.*LlamaDecoderLayer.*kernels: off",
    ):
        distributed.wrap_classes(model, DistributedSettings("fsdp2", wrap_classes=["LlamaMLP"]))


@pytest.mark.parametrize("offload", [False, True])
def test_deepspeed_zero3_config(lora_llama, offload):
    settings = DistributedSettings("deepspeed_zero3", offload_params=offload, offload_optimizer=offload)
    arguments = distributed.training_arguments(settings, lora_llama)
    assert list(arguments) == ["deepspeed"]
    config = arguments["deepspeed"]
    zero = config["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert config[key] == "auto"  # Trainer fills these from its own arguments
    if offload:
        assert zero["offload_param"]["device"] == "cpu" and zero["offload_optimizer"]["device"] == "cpu"
        assert config["optimizer"]["type"] == "AdamW"
    else:
        assert "offload_param" not in zero and "offload_optimizer" not in zero and "optimizer" not in config


def _deepspeed_installed(monkeypatch, installed: bool) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: (object() if installed else None) if name == "deepspeed" else real(name, *a),
    )


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["--distributed.strategy", "zero3"], ["distributed.strategy", "fsdp2, deepspeed_zero3"]),
        (["--distributed.offload_params"], ["distributed.offload_params", "strategy: fsdp2"]),
        (
            ["--distributed.strategy", "fsdp2", "--distributed.offload_optimizer"],
            ["distributed.offload_optimizer", "offload_params: true"],
        ),
        (
            ["--distributed.strategy", "deepspeed_zero3", "--load_in_4bit"],
            ["load_in_4bit", "not supported with deepspeed_zero3"],
        ),
    ],
)
def test_bad_distributed_settings_name_the_fix(overrides, words, monkeypatch):
    _deepspeed_installed(monkeypatch, True)
    with pytest.raises(FusetuneError) as error:
        load_config(None, overrides)
    for word in words:
        assert word in str(error.value)


def test_deepspeed_missing_names_the_install(monkeypatch):
    _deepspeed_installed(monkeypatch, False)
    with pytest.raises(FusetuneError, match="pip install deepspeed"):
        load_config(None, ["--distributed.strategy", "deepspeed_zero3"])
    _deepspeed_installed(monkeypatch, True)
    assert load_config(None, ["--distributed.strategy", "deepspeed_zero3"]).distributed.strategy == (
        "deepspeed_zero3"
    )


def test_yaml_section():
    text = "distributed:\n  strategy: off\n  offload_params: false\n"
    assert build_config(yaml.safe_load(text)).distributed == DistributedSettings()  # YAML's off is False
    text = "distributed:\n  strategy: fsdp2\n  wrap_classes: [LlamaDecoderLayer]\n"
    assert build_config(yaml.safe_load(text)).distributed.wrap_classes == ["LlamaDecoderLayer"]


def test_gradient_checkpointing_offload_leaves_trainers_off(lora_llama, environment):
    on = training_arguments(
        load_config(None, ["--gradient_checkpointing", "on"]), torch.float32, False, lora_llama
    )
    assert on.gradient_checkpointing and on.gradient_checkpointing_kwargs == {"use_reentrant": False}
    offload = load_config(None, ["--gradient_checkpointing", "offload"])
    assert not training_arguments(offload, torch.float32, False, lora_llama).gradient_checkpointing


def test_split_nproc():
    assert cli.split_nproc(["run.yaml", "--nproc", "2", "--lora.r", "8"]) == (
        2,
        ["run.yaml", "--lora.r", "8"],
    )
    assert cli.split_nproc(["--nproc=4"]) == (4, [])
    assert cli.split_nproc(["run.yaml"]) == (None, ["run.yaml"])
    with pytest.raises(FusetuneError, match="--nproc 2"):
        cli.split_nproc(["--nproc", "two"])


def test_torchrun_command():
    assert distributed.torchrun_command(2, ["run.yaml", "--max_steps", "5"]) == [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "fusetune",
        "train",
        "run.yaml",
        "--max_steps",
        "5",
    ]


def test_nproc_launches_torchrun_with_the_other_arguments(tmp_path, monkeypatch):
    import subprocess

    path = tmp_path / "run.yaml"
    path.write_text("distributed:\n  strategy: fsdp2\nmax_steps: 3\n")
    launched = []
    monkeypatch.setattr(
        subprocess, "Popen", lambda command, env, **_: launched.append(command) or _Processes(0, env)
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # CPU: any count is allowed (gloo)
    assert cli.main(["train", str(path), "--nproc", "2", "--lora.r", "4"]) == 0
    assert launched == [distributed.torchrun_command(2, [str(path), "--lora.r", "4"])]


class _Processes:
    """torchrun as ``subprocess.Popen`` would start it: each of ``errors`` (one per rank) is reported as
    ``fusetune.cli.main`` in that process reports it, then torchrun exits with ``returncode``."""

    def __init__(self, returncode: int, env: dict, errors: tuple[Exception, ...] = ()):
        self.returncode, self.env, self.errors = returncode, env, errors

    def wait(self) -> int:
        for rank, error in enumerate(self.errors):
            os.environ[distributed.ERROR_DIR_VARIABLE] = self.env[distributed.ERROR_DIR_VARIABLE]
            os.environ["RANK"] = str(rank)
            distributed.report_to_launcher(error)
        return self.returncode


@pytest.mark.parametrize(
    ("errors", "status", "printed"),
    [
        ((FusetuneError("no data"), FusetuneError("no data")), 2, "fusetune: error: no data\n"),
        (
            (FusetuneError("no data"), FusetuneError("no GPU")),
            2,
            "fusetune: error: rank 0: no data\nrank 1: no GPU\n",
        ),
        ((Interrupted("saved in c-4"), Interrupted("saved in c-4")), 130, "fusetune: saved in c-4\n"),
        ((), 1, ""),  # a traceback in a process: torchrun's own report and status
    ],
)
def test_nproc_exits_with_the_processes_error(errors, status, printed, monkeypatch, capsys, environment):
    """A process stopped by a ``FusetuneError`` makes the launcher print that message last and exit with
    status 2 (130 for Ctrl-C), not torchrun's 1 after its failure report."""
    import subprocess

    monkeypatch.setattr(subprocess, "Popen", lambda command, env, **_: _Processes(1, env, errors))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["train", "--nproc", "2", "--distributed.strategy", "fsdp2"]) == status
    assert capsys.readouterr().err == printed


def test_nproc_reports_a_process_error_from_torchrun(tmp_path):
    """The same for real: two processes that cannot load their model."""
    import subprocess

    argv = [
        "--distributed.strategy",
        "fsdp2",
        "--model",
        str(tmp_path / "missing"),
        "--output_dir",
        str(tmp_path),
    ]
    result = subprocess.run(
        [sys.executable, "-m", "fusetune", "train", "--nproc", "2", *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": ""},  # CPU processes, GPUs or not
    )
    assert result.returncode == 2, result.stderr[-3000:]
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"fusetune: error: cannot load model '{tmp_path / 'missing'}'")


def test_nproc_refusals(tmp_path, monkeypatch, capsys):
    fsdp = load_config(None, ["--distributed.strategy", "fsdp2"])
    with pytest.raises(FusetuneError, match="distributed.strategy: fsdp2"):
        distributed.check_nproc(2, load_config(None, []))
    distributed.check_nproc(1, load_config(None, []))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    distributed.check_nproc(2, fsdp)
    with pytest.raises(FusetuneError, match="3 but 2 GPU"):
        distributed.check_nproc(3, fsdp)
    with pytest.raises(FusetuneError, match="at least 1"):
        distributed.check_nproc(0, fsdp)
    assert cli.main(["train", "--nproc", "2"]) == 2  # the demo config has strategy off
    assert "--distributed.strategy fsdp2" in capsys.readouterr().err


def test_offload_run_uses_fusetunes_checkpointing(tmp_path, monkeypatch):
    """``gradient_checkpointing: offload`` trains with fusetune's checkpointing on every decoder layer
    (the demo's language and vision layers) from the runner."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    import fusetune.checkpointing
    from fusetune.train.runner import train

    calls = []
    real = fusetune.checkpointing.enable_checkpointing

    def recording(model, *, offload=True):
        layers = sum(isinstance(m, GradientCheckpointingLayer) for m in model.modules())
        calls.append((offload, layers, real(model, offload=offload)))
        return calls[-1][2]

    monkeypatch.setattr(fusetune.checkpointing, "enable_checkpointing", recording)
    small = ["--demo_samples", "16", "--batch_size", "8", "--eval_split", "0", "--show_samples", "0"]
    config = load_config(
        None,
        [*small, "--max_steps", "2", "--output_dir", str(tmp_path), "--gradient_checkpointing", "offload"],
    )
    result = train(config, quiet=True)
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.final_loss))
    ((offload, layers, enabled),) = calls
    assert offload and layers > 2 and enabled == layers


def test_fsdp2_without_a_launcher_stops_before_loading(tmp_path, monkeypatch):
    """Trainer runs FSDP only under a launcher; without one it would stop after loading everything."""
    from fusetune.train.runner import train

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    config = load_config(
        None,
        ["--distributed.strategy", "fsdp2", "--demo_samples", "16", "--output_dir", str(tmp_path / "run")],
    )
    with pytest.raises(FusetuneError, match=r"'distributed.strategy': fsdp2 .*--nproc N .*strategy: off"):
        train(config, quiet=True)
    assert not (tmp_path / "run").exists()
    zero3 = DistributedSettings("deepspeed_zero3")  # (a config with it needs DeepSpeed installed)
    with pytest.raises(FusetuneError, match=r"'distributed.strategy': deepspeed_zero3 .*--nproc N"):
        distributed.check_launched(zero3)  # (DeepSpeed went looking for MPI after everything loaded)
    monkeypatch.setenv("LOCAL_RANK", "0")  # what torchrun and accelerate launch set
    distributed.check_launched(config.distributed)
    distributed.check_launched(zero3)
    offloading = DistributedSettings("fsdp2", offload_params=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(FusetuneError, match=r"'distributed.offload_params': FSDP2 offloads to pinned host "):
        distributed.check_launched(offloading)  # (FSDP2 failed to pin memory in prepare)


@pytest.mark.parametrize(
    ("files", "writer"),
    [
        (("optimizer.bin", "pytorch_model_fsdp.bin", "rng_state_0.pth", "scheduler.pt"), "fsdp2"),
        (("optimizer.pt", "rng_state.pth", "scheduler.pt"), "off"),
    ],
)
def test_resume_refuses_a_checkpoint_of_another_strategy(tmp_path, files, writer):
    """Files as FSDP2 (accelerate) and one-process Trainer write them beside the adapter: resumed
    under another strategy, Trainer stopped deep in loading ("only supported when using PyTorch
    FSDP", "Can't find a valid checkpoint", a missing optimizer.bin)."""
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    for name in ("adapter_model.safetensors", "trainer_state.json", *files):
        (checkpoint / name).write_bytes(b"")
    assert distributed.saved_under(str(checkpoint)) == writer
    for strategy in ("off", "fsdp2", "deepspeed_zero3"):
        settings = DistributedSettings(strategy)  # (a config with deepspeed_zero3 needs DeepSpeed installed)
        if strategy == writer:
            distributed.check_resume(str(checkpoint), settings)
        else:
            with pytest.raises(FusetuneError, match=f"written with distributed.strategy: {writer}, and only"):
                distributed.check_resume(str(checkpoint), settings)
