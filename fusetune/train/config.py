"""Training configuration: dataclasses with documented defaults, YAML loading, validation, overrides.

A config is a YAML mapping of the keys below (``lora`` and ``distributed`` are nested mappings).
``fusetune train CONFIG.yaml --key value`` applies the command-line overrides over the file, and
the file over the defaults; a nested key is written with a dot (``--lora.r 8``). With no file, the
embedded default (``DEMO_CONFIG``: the offline demo) is the base. Unknown keys and values of the
wrong type are rejected with a ``FusetuneError`` naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from fusetune.train.errors import FusetuneError

GRADIENT_CHECKPOINTING = ("off", "on", "offload")
KERNELS = ("auto", "off")
SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")
DTYPES = ("auto", "float32", "bfloat16", "float16")
STRATEGIES = ("off", "fsdp2", "deepspeed_zero3")
# Keys that take a list of names or one word meaning "the default choice of names".
LIST_KEYS = {"target_modules": "all-linear", "wrap_classes": "auto"}
# Keys with the choice "off", which YAML reads as false.
OFF_KEYS = ("gradient_checkpointing", "kernels", "distributed.strategy")


@dataclass
class LoraSettings:
    """LoRA adapters (PEFT)."""

    r: int = 16
    """Rank of the adapter matrices."""
    alpha: int = 32
    """Scale numerator: the update is scaled by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: Union[str, list[str]] = "all-linear"  # noqa: UP007 (runtime-inspected type)
    """"all-linear" (every nn.Linear but the output head) or a list of leaf names (q_proj, ...)."""
    finetune_vision_layers: bool = True
    """Put adapters on the vision tower and projector too (VLMs)."""
    finetune_language_layers: bool = True
    """Put adapters on the language model."""


@dataclass
class DistributedSettings:
    """Several GPUs: sharding of the weights, gradients and optimiser state (see docs/train.md)."""

    strategy: str = "off"
    """off (one process, or plain data parallel) | fsdp2 (PyTorch FSDP2) | deepspeed_zero3 (needs
    pip install deepspeed). Launch with fusetune train --nproc N, accelerate launch or torchrun."""
    offload_params: bool = False
    """Keep the parameter shards in CPU memory (fsdp2: cpu_offload, which also keeps the gradients
    there and steps the optimiser on the CPU; deepspeed_zero3: offload_param to the CPU)."""
    offload_optimizer: bool = False
    """deepspeed_zero3: keep the optimiser state in CPU memory and step it there (offload_optimizer);
    fsdp2 does this only as part of offload_params."""
    wrap_classes: Union[str, list[str]] = "auto"  # noqa: UP007
    """fsdp2: the module classes sharded as one unit each; auto: the model's _no_split_modules (its
    decoder layers, and vision blocks of a VLM)."""


@dataclass
class TrainConfig:
    """Every key of a ``fusetune train`` config. See ``describe()`` for the one-line docs."""

    model: str = "demo"
    """Hub id, local folder, or "demo" (a tiny random-weight Qwen2-VL built offline)."""
    dataset: str = "demo"
    """"demo" (synthetic shapes), a local .jsonl file, a folder of images with one .jsonl of chat
    messages, a folder saved with datasets' save_to_disk, or a `datasets` hub name."""
    dataset_split: str = "train"
    """Split to load from a `datasets` name or saved folder."""
    eval_split: Union[float, str] = 0.0  # noqa: UP007
    """Held-out part: a fraction (0.1), 0 for none, the path of a second source (data/val.jsonl), or a
    split name (validation) of a `datasets` dataset: a hub name or a saved DatasetDict."""
    demo_samples: int = 1000
    """Size of the synthetic demo data set."""
    chat_template: str = ""
    """A chat template to render samples with instead of the model's own: a .jinja file's path or
    the template's text; it is saved with the adapter and the merged model. Empty: the model's own."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    distributed: DistributedSettings = field(default_factory=DistributedSettings)
    load_in_4bit: bool = False
    """Load the base weights in 4-bit (bitsandbytes NF4, CUDA only); with distributed.strategy fsdp2
    they are stored in the compute dtype so FSDP2 shards them (QLoRA-FSDP); not with deepspeed_zero3."""
    gradient_checkpointing: str = "off"
    """off | on (recompute each decoder layer's activations in backward; transformers' non-reentrant
    checkpointing) | offload (fusetune's checkpointing: also keeps the saved layer inputs in CPU memory)."""
    max_seq_length: int = 2048
    """Longest tokenised sample (image tokens included); longer ones are cut on the right. Every
    sample is checked before training: one that the cut would leave without answer tokens, or cut
    inside its image tokens, stops the run, named (raise max_seq_length, or shorten or remove it)."""
    packing: bool = False
    """Pack each batch's samples, with their images, into one row without padding (Qwen2-VL family
    and text models): positions (M-RoPE included) restart per sample and attention stays inside each
    sample, with no row x row mask (the language model runs fusetune_varlen: torch's varlen flash
    attention on a GPU, SDPA per sample elsewhere; flash_attention_2 where flash_attn is installed);
    the loss equals the padded batch's. batch_size samples make one row."""
    max_pixels: int = 602112
    """Images larger than this many pixels are resized down (aspect kept) before processing."""
    batch_size: int = 2
    """Samples per device per step."""
    gradient_accumulation_steps: int = 4
    """Micro-batches per optimiser step."""
    learning_rate: float = 2e-4
    """Peak learning rate of the LoRA weights (AdamW); > 0."""
    lr_scheduler: str = "linear"
    """linear | cosine | constant | constant_with_warmup | cosine_with_restarts | polynomial."""
    warmup: float = 0.03
    """Warm-up: a fraction of the steps (< 1) or a number of steps (>= 1)."""
    weight_decay: float = 0.0
    """AdamW weight decay (>= 0)."""
    max_grad_norm: float = 1.0
    """Clip the gradients' global norm to this before each optimiser step (0: no clipping)."""
    max_steps: int = -1
    """Optimiser steps; -1 to use epochs. May be raised for a resume (the learning-rate schedule is
    then recomputed over the new length; a note says so)."""
    epochs: float = 1.0
    """Passes over the training set (when max_steps is -1)."""
    seed: int = 42
    """Seed of the weights' init (LoRA), the data order and the eval_split draw; in [0, 2**32)."""
    output_dir: str = "fusetune-output"
    """Folder for checkpoints, the adapter, config.yaml, metrics.json, loss.png (and merged/); created
    and checked writable before anything loads. A fresh run refuses one holding an earlier run's outputs
    (see overwrite_output_dir)."""
    overwrite_output_dir: bool = False
    """Start a fresh run in an output_dir that holds an earlier run's outputs, deleting its checkpoints,
    adapter, merged weights, config.yaml, metrics.json and loss.png first (not with resume)."""
    save_steps: int = 50
    """Write a Trainer checkpoint (adapter, optimiser, scheduler, RNG, and fusetune_run.json: the
    run's config) every this many steps, and on Ctrl-C or SIGTERM (the step finishes, is saved, the
    run stops with status 130 or 143; a second Ctrl-C stops at once)."""
    save_total_limit: int = 2
    """Keep at most this many checkpoints (0: keep them all)."""
    save_merged: bool = False
    """Also save the base model with the adapter merged in, in 16-bit (output_dir/merged). After a
    4-bit or sharded run, the base is loaded again in `dtype` on the CPU for it, and the saved
    adapter merged into that (a merge into the 4-bit weights would quantise it)."""
    resume: Union[bool, str] = False  # noqa: UP007
    """true: continue from the last complete checkpoint in output_dir; or a checkpoint folder. Needs
    the settings its run trained with (model, data, lora, batch, optimiser, schedule, seed, dtype,
    processes: any other value is an error naming it); max_steps / epochs, output, logging, saving and
    speed settings may change."""
    logging_steps: int = 1
    """Log the training loss (and grad norm) every this many steps, at each checkpoint and at the last
    step. A loss or grad norm that is not finite stops the run with an error (no adapter is saved)."""
    eval_steps: int = 0
    """Evaluate every this many steps and at the last step (0: only at the end)."""
    show_samples: int = 4
    """Held-out samples to caption with greedy generation at the end."""
    max_new_tokens: int = 32
    """Token limit of those generations."""
    dtype: str = "auto"
    """auto (bfloat16 on a GPU that has it, else float32) | float32 | bfloat16 | float16."""
    kernels: str = "auto"
    """auto: patch the model with fusetune.apply (Triton on GPU, PyTorch references on CPU);
    off: train the unpatched transformers model."""
    loss: str = "linear_cross_entropy"
    """fusetune.apply's loss: linear_cross_entropy | cross_entropy."""
    mlp_tile_rows: int = 0
    """Run the fused LoRA MLPs on inputs longer than this many tokens in row tiles, keeping only
    their input for backward (very long contexts; costs a second gate/up matmul); 0: off."""
    dataloader_workers: int = 0
    """Data-loading worker processes (0: load in the training process)."""


# The embedded default: the offline demo, sized to train on a laptop CPU in about a minute.
DEMO_CONFIG: dict[str, Any] = {
    "model": "demo",
    "dataset": "demo",
    "demo_samples": 2000,
    "eval_split": 0.05,
    "lora": {
        "r": 16,
        "alpha": 32,
        "dropout": 0.0,
        "target_modules": "all-linear",
        "finetune_vision_layers": True,
        "finetune_language_layers": True,
    },
    "max_seq_length": 64,
    "max_pixels": 56 * 56,
    "batch_size": 16,
    "gradient_accumulation_steps": 1,
    "learning_rate": 3e-3,
    "lr_scheduler": "cosine",
    "warmup": 0.05,
    "max_steps": 900,
    "seed": 0,
    "output_dir": "fusetune-demo",
    "save_steps": 100,
    "show_samples": 6,
    "max_new_tokens": 16,
}


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(key: str, value: Any, hint: Any, from_text: bool) -> Any:
    """``value`` as type ``hint``; strings from the command line are parsed as YAML scalars."""
    raw = value
    if from_text and isinstance(value, str):
        import yaml

        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        # Keep the string for str-typed keys ("1e-3" stays text only where text is wanted).
        value = parsed if parsed is not None else value
    if key in OFF_KEYS and value is False:
        value = "off"  # YAML reads off (and on) as booleans
    if key == "gradient_checkpointing" and value is True:
        value = "on"
    leaf = key.rsplit(".", 1)[-1]
    if leaf in LIST_KEYS and isinstance(value, str) and value != LIST_KEYS[leaf]:
        value = [v.strip() for v in value.split(",") if v.strip()]  # "q_proj,v_proj" or one name
    origin = typing.get_origin(hint)
    options = typing.get_args(hint) if origin in (Union, types.UnionType) else (hint,)
    for option in options:
        ok, converted = _try(value, option)
        if ok:
            return converted
    if from_text and str in options:
        return raw
    names = " or ".join(_type_name(o) for o in options)
    raise FusetuneError(
        f"config key {key!r} must be {names}, got {value!r} ({type(value).__name__}); fix it in the "
        f"config file or the --{key} override."
    )


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is list:
        return "a list of strings"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _try(value: Any, hint: Any) -> tuple[bool, Any]:
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return (isinstance(value, int) and not isinstance(value, bool)), value
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str):
            try:
                return True, float(value)
            except ValueError:
                return False, None
        return False, None
    if hint is str:
        return isinstance(value, str), value
    if typing.get_origin(hint) is list:
        if isinstance(value, str) and "," in value:
            value = [v.strip() for v in value.split(",") if v.strip()]
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        return ok, value
    return False, None


def _build(cls, data: dict[str, Any], prefix: str, from_text: bool):
    if not isinstance(data, dict):
        raise FusetuneError(
            f"config key {prefix.rstrip('.') or 'the config'} must be a mapping, got {data!r}."
        )
    fields, hints = _fields(cls), _hints(cls)
    kwargs = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            known = ", ".join(sorted(fields))
            raise FusetuneError(
                f"unknown config key {prefix + name!r}. "
                f"Known keys{' under ' + prefix.rstrip('.') if prefix else ''}: "
                f"{known}. Run `fusetune train --help` for their meaning."
            )
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{prefix}{name}.", from_text)
        else:
            kwargs[name] = _coerce(prefix + name, value, hint, from_text)
    return cls(**kwargs)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML file, or a ``FusetuneError`` saying why it could not be read."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FusetuneError(f"config file {str(path)!r} not found; give the path of a YAML file.")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise FusetuneError(f"config file {str(path)!r} is not valid YAML: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise FusetuneError(
            f"config file {str(path)!r} must hold a mapping of keys, got {type(data).__name__}."
        )
    return data


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["--lora.r", "8", "--resume"]`` -> ``{"lora": {"r": "8"}, "resume": "true"}``.

    Values stay text here and are typed against the config fields in ``build_config``. A flag
    without a value (followed by another flag or nothing) means true; ``--key=value`` works too.
    """
    out: dict[str, Any] = {}
    i = 0
    while i < len(items):
        item = items[i]
        if not item.startswith("--") or item == "--":
            raise FusetuneError(f"unexpected argument {item!r}; overrides are written --key value.")
        key, eq, value = item[2:].partition("=")
        if not eq:
            if i + 1 < len(items) and not items[i + 1].startswith("--"):
                value = items[i + 1]
                i += 1
            else:
                value = "true"
        node = out
        parts = key.replace("-", "_").split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise FusetuneError(f"override --{key} conflicts with an earlier one.")
        node[parts[-1]] = value
        i += 1
    return out


def build_config(
    file_data: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """Defaults, then ``file_data`` (or the embedded demo config when None), then ``overrides``
    (text values from the command line), typed and validated."""
    base = _build(TrainConfig, DEMO_CONFIG if file_data is None else file_data, "", from_text=False)
    if overrides:
        merged = _merge(to_dict(base), {})
        typed = _build(TrainConfig, overrides, "", from_text=True)
        # Only the keys given on the command line replace the file's values.
        merged = _merge(merged, _pick(to_dict(typed), overrides))
        base = _build(TrainConfig, merged, "", from_text=False)
    validate(base)
    return base


def _pick(values: dict, keys: dict) -> dict:
    return {
        k.replace("-", "_"): (
            _pick(values[k.replace("-", "_")], v) if isinstance(v, dict) else values[k.replace("-", "_")]
        )
        for k, v in keys.items()
    }


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> TrainConfig:
    """A validated ``TrainConfig`` from a YAML file (None: the embedded demo) and overrides."""
    file_data = None if path is None else read_yaml(path)
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    return build_config(file_data, overrides)


def _bad(key: str, why: str) -> FusetuneError:
    return FusetuneError(f"config key {key!r}: {why}")


def validate(config: TrainConfig) -> None:
    """Range and choice checks that the types alone do not catch."""
    numbers = [*vars(config).items(), *((f"lora.{k}", v) for k, v in vars(config.lora).items())]
    for key, value in numbers:
        if isinstance(value, float) and not math.isfinite(value):
            raise _bad(key, f"must be a finite number, got {value}.")
    if config.gradient_checkpointing not in GRADIENT_CHECKPOINTING:
        raise _bad(
            "gradient_checkpointing",
            f"use one of {', '.join(GRADIENT_CHECKPOINTING)}, got {config.gradient_checkpointing!r}.",
        )
    if config.kernels not in KERNELS:
        raise _bad("kernels", f"use one of {', '.join(KERNELS)}, got {config.kernels!r}.")
    if config.lr_scheduler not in SCHEDULES:
        raise _bad("lr_scheduler", f"use one of {', '.join(SCHEDULES)}, got {config.lr_scheduler!r}.")
    if config.dtype not in DTYPES:
        raise _bad("dtype", f"use one of {', '.join(DTYPES)}, got {config.dtype!r}.")
    if config.loss not in ("linear_cross_entropy", "cross_entropy"):
        raise _bad("loss", f"use linear_cross_entropy or cross_entropy, got {config.loss!r}.")
    for key in (
        "batch_size",
        "gradient_accumulation_steps",
        "max_seq_length",
        "max_pixels",
        "save_steps",
        "logging_steps",
        "demo_samples",
        "max_new_tokens",
    ):
        if getattr(config, key) < 1:
            raise _bad(key, f"must be at least 1, got {getattr(config, key)}.")
    if config.learning_rate <= 0:
        raise _bad("learning_rate", f"must be positive, got {config.learning_rate}.")
    if not 0 <= config.seed < 2**32:
        raise _bad("seed", f"must be in [0, 2**32), got {config.seed}.")
    if config.max_steps == 0 or config.max_steps < -1:
        raise _bad(
            "max_steps", f"must be a positive number of steps, or -1 to use epochs; got {config.max_steps}."
        )
    if config.max_steps == -1 and config.epochs <= 0:
        raise _bad("epochs", f"must be positive when max_steps is -1, got {config.epochs}.")
    if isinstance(config.eval_split, float) and not 0.0 <= config.eval_split < 1.0:
        raise _bad("eval_split", f"a fraction must be in [0, 1), got {config.eval_split}.")
    if config.resume not in (False, "") and config.overwrite_output_dir:
        raise _bad(
            "overwrite_output_dir",
            "true starts a fresh run, deleting the earlier one's checkpoints, and resume continues one; "
            "drop one of them.",
        )
    if config.warmup < 0:
        raise _bad("warmup", f"must be >= 0, got {config.warmup}.")
    for key in (
        "show_samples",
        "eval_steps",
        "save_total_limit",
        "dataloader_workers",
        "weight_decay",
        "max_grad_norm",
    ):
        if getattr(config, key) < 0:
            raise _bad(key, f"must be >= 0, got {getattr(config, key)}.")
    if config.mlp_tile_rows < 0:
        raise _bad("mlp_tile_rows", f"must be a number of rows, or 0 for off; got {config.mlp_tile_rows}.")
    _validate_lora(config.lora)
    _validate_distributed(config)


def lora_settings(value: LoraSettings | dict) -> LoraSettings:
    """``value`` (a ``LoraSettings`` or a dict of its fields) typed and checked as a config's ``lora``
    section is (``load_model`` takes either from Python, where no config file was validated)."""
    data = dataclasses.asdict(value) if isinstance(value, LoraSettings) else value
    lora = _build(LoraSettings, data, "lora.", from_text=False)
    _validate_lora(lora)
    return lora


def _validate_lora(lora: LoraSettings) -> None:
    if lora.r < 1 or lora.alpha < 1:
        raise _bad("lora.r" if lora.r < 1 else "lora.alpha", "must be at least 1.")
    if not 0.0 <= lora.dropout < 1.0:
        raise _bad("lora.dropout", f"must be in [0, 1), got {lora.dropout}.")
    if isinstance(lora.target_modules, str) and lora.target_modules != "all-linear":
        raise _bad(
            "lora.target_modules", f'use "all-linear" or a list of module names, got {lora.target_modules!r}.'
        )
    if not (lora.finetune_vision_layers or lora.finetune_language_layers):
        raise _bad(
            "lora", "finetune_vision_layers and finetune_language_layers are both false: nothing to train."
        )


def _validate_distributed(config: TrainConfig) -> None:
    import importlib.util

    settings = config.distributed
    if settings.strategy not in STRATEGIES:
        raise _bad("distributed.strategy", f"use one of {', '.join(STRATEGIES)}, got {settings.strategy!r}.")
    offloads = [k for k in ("offload_params", "offload_optimizer") if getattr(settings, k)]
    if settings.strategy == "off" and offloads:
        raise _bad(
            f"distributed.{offloads[0]}",
            "offloading is part of a sharding strategy; set distributed.strategy: fsdp2 or deepspeed_zero3.",
        )
    if settings.strategy == "fsdp2" and settings.offload_optimizer and not settings.offload_params:
        raise _bad(
            "distributed.offload_optimizer",
            "FSDP2 steps the optimiser on the CPU only when the parameters live there: set "
            "distributed.offload_params: true (it offloads both), or use deepspeed_zero3.",
        )
    if settings.strategy == "deepspeed_zero3":
        if config.load_in_4bit:
            raise _bad(
                "load_in_4bit",
                "4-bit (bitsandbytes) base weights are not supported with deepspeed_zero3; use "
                "distributed.strategy: fsdp2, or load_in_4bit: false.",
            )
        if importlib.util.find_spec("deepspeed") is None:
            raise _bad(
                "distributed.strategy",
                "deepspeed_zero3 needs DeepSpeed: pip install deepspeed (or use strategy: fsdp2).",
            )


def to_dict(config: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def to_yaml(config: TrainConfig) -> str:
    import yaml

    return yaml.safe_dump(to_dict(config), sort_keys=False)


def _key_docs(cls) -> dict[str, str]:
    """The docstring under each field of ``cls`` (read from its source), on one line."""
    import ast
    import inspect

    body = ast.parse(inspect.getsource(cls)).body[0].body
    docs: dict[str, str] = {}
    for i, node in enumerate(body):
        if isinstance(node, ast.AnnAssign) and i + 1 < len(body):
            nxt = body[i + 1]
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _hint_name(hint: Any) -> str:
    options = typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else (hint,)
    names = []
    for option in options:
        if typing.get_origin(option) is list:
            names.append(f"list[{_hint_name(typing.get_args(option)[0])}]")
        else:
            names.append(getattr(option, "__name__", str(option)))
    return " | ".join(names)


def _show(value: Any) -> str:
    """A default as it is written in YAML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, list)):
        return json.dumps(value)
    return repr(value)


def config_keys() -> list[tuple[str, str, str, str]]:
    """``(key, type, default, meaning)`` for every config key: the one source of ``fusetune train
    --help`` and docs/train.md (nested keys as ``lora.r``; defaults are the dataclass defaults, those
    a config file falls back on)."""
    rows = []
    for cls, prefix in ((TrainConfig, ""), (LoraSettings, "lora."), (DistributedSettings, "distributed.")):
        docs, hints, defaults = _key_docs(cls), _hints(cls), to_dict(cls())
        for name in _fields(cls):
            if dataclasses.is_dataclass(hints[name]):
                continue
            rows.append((prefix + name, _hint_name(hints[name]), _show(defaults[name]), docs.get(name, "")))
    return rows


def describe() -> str:
    """One line per config key: name, type, default, meaning (for ``fusetune train --help``)."""
    return "\n".join(
        f"  {key:<31} {kind:<15} {default:<23} {doc}" for key, kind, default, doc in config_keys()
    )


EXAMPLE_YAML = """\
# LoRA on Qwen2.5-VL-7B-Instruct from a JSONL file of chat messages with images.
model: Qwen/Qwen2.5-VL-7B-Instruct
dataset: data/train.jsonl        # image paths in it are relative to data/
eval_split: 0.05
lora:
  r: 16
  alpha: 32
  target_modules: all-linear
  finetune_vision_layers: false
load_in_4bit: false
gradient_checkpointing: on
max_seq_length: 2048
max_pixels: 602112               # 784 x 768; larger images are resized down
batch_size: 2
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
lr_scheduler: cosine
warmup: 0.03
epochs: 2
output_dir: runs/qwen25vl-7b-lora
save_steps: 200
save_merged: true
"""

EXAMPLE_SAMPLE = {
    "messages": [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": "images/0001.png"},
                {"type": "text", "text": "Describe the image."},
            ],
        },
        {"role": "assistant", "content": "A red circle in the top left."},
    ]
}

DATA_FORMATS = """\
Every source becomes the same samples: a list of chat `messages`, each with a `role` (system, user
or assistant) and a `content` that is a string or a list of parts (`{"type": "text", "text": ...}`
or `{"type": "image", "image": ...}`). Only the assistant answers are learned; each sample needs at
least one. Answers are found in the text the model's chat template renders, and checked against
the messages: a sample whose template rewrites an answer stops the run, named. Reasoning models:
Qwen3's template writes an empty `<think>` block before a last answer without reasoning, which is
learned with it; an answer's own `<think>...</think>` is learned where the template keeps it (the
last answer), and one the template drops (Qwen3's before the last user turn, DeepSeek-R1's
everywhere) is refused: split such conversations so that each reasoning answer ends its sample,
or set `chat_template` to a template that keeps reasoning.

- **A JSONL file** (`dataset: data/train.jsonl`), one sample a line:

  ```json
  SAMPLE_LINE
  ```

  An image path is relative to the JSONL file's folder, or absolute. TRL-style rows work too:
  `{"type": "image"}` placeholders filled in order from the row's `"images"` list, or, where the
  messages have none, the images put at the start of the first user turn (as TRL does); images
  left over are an error. A `.json` file may hold the samples as one list.
- **A folder of images with one JSONL file** (`dataset: data/`): the folder's only `.jsonl` file
  (or, among several, `data.jsonl`, `train.jsonl` or `metadata.jsonl`), in the format above, its
  image paths relative to the folder.
- **A `datasets` hub name** (`dataset: user/name`, with `dataset_split`): rows with a `messages`
  column as above (and optionally `images`: PIL images, `{"bytes": ...}` or paths, relative ones
  read from the working directory; encoded images stay in the data set's table, on disk, until their
  batch). Needs
  `pip install datasets`.
- **A folder saved with `datasets`' `save_to_disk`** (`dataset: path/to/saved`): a `Dataset` or a
  `DatasetDict` (its `dataset_split` is used), rows as for a hub name (relative image paths read from
  that folder).
- **`demo`**: the synthetic shapes data set of the offline demo (`demo_samples` samples).

`eval_split` holds out a fraction of the samples (`0.05`), or gives the path of a second source
(`data/val.jsonl`, any of the kinds above), or names a split (`validation`) of the `datasets` source
(a hub name, or a saved `DatasetDict`). A path that does not exist, a split name for a source
without splits (a JSONL file, a folder, a saved `Dataset`, `demo`) or the training split itself is
an error, never the training set again.
""".replace("SAMPLE_LINE", json.dumps(EXAMPLE_SAMPLE))


SEVERAL_GPUS = """\
Set `distributed.strategy` and start one process per GPU. `fusetune train --nproc N CONFIG.yaml`
does it for you: it starts `python -m torch.distributed.run --standalone --nproc_per_node N -m
fusetune train CONFIG.yaml ...` (the other arguments passed on), and refuses an `N` above the
number of visible GPUs, or above 1 with `strategy: off`. `torchrun --nproc_per_node N -m fusetune
train CONFIG.yaml` and `accelerate launch --num_processes N -m fusetune train CONFIG.yaml` work
the same way.

```yaml
distributed:
  strategy: fsdp2            # or deepspeed_zero3 (pip install deepspeed)
  offload_params: false      # parameter shards in CPU memory
  offload_optimizer: false   # deepspeed_zero3: optimiser state in CPU memory
```

- **`fsdp2`** becomes Trainer's FSDP arguments: `fsdp=True` and `fsdp_config` with `version: 2`,
  `auto_wrap_policy: TRANSFORMER_BASED_WRAP`, the layer classes of `distributed.wrap_classes`
  (auto: the model's `_no_split_modules`), `cpu_offload` from `offload_params` and
  `state_dict_type: FULL_STATE_DICT`.
  With `load_in_4bit: true` the NF4 base weights are sharded too (QLoRA-FSDP): their packed bytes
  are stored in the compute dtype (`bnb_4bit_quant_storage`; uint8 weights accelerate would leave
  whole on every process), and the fused LoRA layers read the gathered bytes with the layer's
  quantisation state.
- **`deepspeed_zero3`** becomes a generated ZeRO-3 config (stage 3, `offload_param` /
  `offload_optimizer` to the CPU as set, `stage3_gather_16bit_weights_on_model_save: true`, the
  batch, accumulation, clipping and precision taken from the config). `load_in_4bit` is not
  supported with it; use `fsdp2`.

The model is loaded and patched in every process before Trainer shards it. Checkpoints hold one
consolidated adapter: they load on one GPU, and `--resume` continues on the same number of
processes under the strategy that wrote the checkpoint (each strategy's optimiser state is read by
it only, and a `deepspeed_zero3` checkpoint's shards on as many processes as wrote them; fusetune
refuses anything else before loading). The final
`adapter/` is gathered from the shards; `merged/` is made from it on a freshly loaded base in the
main process's CPU memory. `batch_size` is per process: the effective batch is
`batch_size × gradient_accumulation_steps × N`.

Without GPUs, `--nproc N` runs `N` CPU processes sharded over gloo: slow, but the same path
(sharding, gathering the adapter, checkpoints, `--resume`, `save_merged`), for trying a setup out.
accelerate on its own would run CPU processes as plain data parallel (DDP) and drop the FSDP
settings without a word; fusetune has it shard them, and stops with an error if a run of several
processes would not be sharded as configured. `deepspeed_zero3` runs on DeepSpeed's CPU
accelerator, without the shared-memory all-reduce op it would compile for inference alone.

From Python, with your own Trainer: call `fusetune.apply(model)` on the loaded (and PEFT-wrapped)
model and pass your FSDP2 or DeepSpeed settings to `TrainingArguments` as usual;
`fusetune.train.distributed.training_arguments(settings, model)` gives the ones above (on CPUs,
also call `fusetune.train.distributed.shard_cpu_processes(args, settings)` before `Trainer(...)`).
For 4-bit weights under FSDP2, store the packed bytes in the compute dtype: load with
`quantization_config=fusetune.train.model.quantization_config(torch.bfloat16, "fsdp2")` (or your
`BitsAndBytesConfig` with `bnb_4bit_quant_storage=torch.bfloat16`), or quantise a model in memory
with `fusetune.quantize_4bit(model, quant_storage=torch.bfloat16)`.
"""


CHECKPOINTS = """\
Every `save_steps` steps Trainer writes `output_dir/checkpoint-N/` (the adapter, optimiser,
scheduler and RNG state) with fusetune's `fusetune_run.json` (the run's config and number of
processes); `save_total_limit` keeps the newest few.

- **Stopping.** Ctrl-C (SIGINT) or SIGTERM (what schedulers send before they kill a job) does not
  stop the run where it is: the optimiser step finishes, is saved as `checkpoint-N`, and the run stops
  with `fusetune: interrupted (SIGINT) at step N; the last checkpoint is ...` and status 130 (SIGINT)
  or 143 (SIGTERM, 128 + 15, as a shell reports it). A second Ctrl-C stops at once, without that
  checkpoint (the last one is the newest periodic one). Under `--nproc N`, torchrun and the
  processes run in a session of their own, and the launcher passes each Ctrl-C or SIGTERM it gets
  on to all of them, once, whether it came to the launcher alone (a container's first process, as
  Kubernetes stops it) or to its whole group (a terminal); torchrun kills them 30 s after passing a
  signal on, so a step and its save must fit in that. The processes agree at each step end, so they
  save and stop at the same step even when a signal reaches only some of them. From Python,
  `train()` restores the signal handlers it found when it returns.
- **Resuming.** `--resume` (the same command plus the flag) continues from the newest complete
  checkpoint (one whose `trainer_state.json`, written last, reads back; a folder cut short by a kill
  is passed over, with a note), or `resume: path/to/checkpoint-N`. The result equals an uninterrupted
  run. It needs the settings the checkpoint's run trained with: the model, data (`dataset`,
  `dataset_split`, `eval_split`, `demo_samples`, `chat_template`, `max_seq_length`, `max_pixels`),
  `lora`, batch (`batch_size`, `gradient_accumulation_steps`, the number of processes), optimiser and schedule
  (`learning_rate`, `lr_scheduler`, `warmup`, `weight_decay`, `max_grad_norm`), `seed`, `dtype`,
  `load_in_4bit` and `distributed.strategy`; any other value stops it before anything loads, naming
  each key with both values. Output, saving, logging and evaluation keys, `show_samples`,
  `kernels`, `loss`, `packing`, `gradient_checkpointing`, `mlp_tile_rows`, `dataloader_workers` and
  the offload / wrap settings may change. So may `max_steps` or `epochs`, to train on: Trainer then
  recomputes the learning-rate schedule over the new length (the first step after the checkpoint
  runs at the rate the old schedule set for it), so the run differs from one that had that length
  from the start; a note says so.
- **A fresh run** (no `--resume`) refuses an `output_dir` that holds an earlier run's checkpoints or
  outputs: it would overwrite its adapter and metrics, and rotating its own checkpoints would delete
  the earlier ones. Continue that run with `--resume`, pick another `output_dir`, or set
  `overwrite_output_dir: true` to delete them and start over.
- **Divergence.** A training loss or gradient norm that is not finite (logged as it is: Trainer's
  nan/inf filter is off) stops the run with an error naming `learning_rate`, `max_grad_norm` and
  `dtype`; no adapter is written, and the checkpoints before it stay (every step that saves logs
  its loss first, so none holds diverged weights).
- **Losses.** `metrics.json`'s `first_loss` and `final_loss` (printed as `loss A -> B`) are the
  first and the last logged training loss: each logged loss is the mean over the steps since the
  log before it (one step with `logging_steps: 1`).
"""


def render_docs() -> str:
    """The text of docs/train.md (``python -m fusetune.train.config > docs/train.md``)."""
    table = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for key, kind, default, doc in config_keys():
        cells = (f"`{key}`", f"`{kind}`", f"`{default}`", doc)
        table.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(
        [
            "# fusetune train",
            "",
            "<!-- Generated by `python -m fusetune.train.config > docs/train.md` from",
            "     fusetune/train/config.py; edit there, not here (a test checks they agree). -->",
            "",
            "```",
            "fusetune train [--nproc N] [CONFIG.yaml] [--key value ...]",
            "```",
            "",
            "LoRA fine-tuning of a vision-language model (or a text-only causal LM) from a YAML config.",
            "Command-line overrides win over the file, and the file over the defaults below; a nested",
            "key is written with a dot (`--lora.r 8`), and a bare flag means true (`--resume`). With",
            "no config file the embedded demo config runs (a tiny Qwen2-VL trained offline on the CPU).",
            "",
            "## Example",
            "",
            "```yaml",
            EXAMPLE_YAML.rstrip("\n"),
            "```",
            "",
            "## Data formats",
            "",
            DATA_FORMATS.rstrip("\n"),
            "",
            "## Several GPUs",
            "",
            SEVERAL_GPUS.rstrip("\n"),
            "",
            "## Checkpoints, stopping and resuming",
            "",
            CHECKPOINTS.rstrip("\n"),
            "",
            "## Config keys",
            "",
            "The same table as `fusetune train --help`. Defaults apply to keys a config file leaves out.",
            "",
            *table,
            "",
            "## Validation",
            "",
            "The config is checked before anything loads, by `fusetune train` and by `train(config)`",
            "from Python alike: an unknown key, a value of the wrong type or out of range (a choice not",
            "listed above, a count below 1, a fraction outside [0, 1), a number that is not finite)",
            "stops the run with one line, `fusetune: error: ...`, naming the key and what to write",
            "instead, and exit status 2. So do, before the first step, `distributed.strategy: fsdp2`",
            "without `--nproc` (or torchrun / accelerate launch), an `output_dir` that cannot be",
            "created or written, a fresh run in an `output_dir` holding an earlier run's outputs,",
            "`--resume` with other training settings than the checkpoint's run, and any sample that",
            "fails to load or to fit `max_seq_length`. Under `--nproc N`, an error in one of the",
            "processes is repeated as the launcher's last line, with the same exit status (2, or 130",
            "/ 143 after Ctrl-C / SIGTERM), after torchrun's own report.",
            "",
        ]
    )


if __name__ == "__main__":
    print(render_docs(), end="")
