"""Config parsing, validation errors and command-line overrides."""

from __future__ import annotations

import pytest

from fusetune.train.config import (
    DEMO_CONFIG,
    TrainConfig,
    build_config,
    describe,
    load_config,
    parse_overrides,
)
from fusetune.train.errors import FusetuneError


def test_no_file_gives_the_embedded_demo():
    config = load_config()
    assert config.model == "demo" and config.dataset == "demo"
    assert config.max_steps == DEMO_CONFIG["max_steps"]
    assert config.lora.r == DEMO_CONFIG["lora"]["r"]


def test_file_values_over_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "model: some/model\ndataset: data.jsonl\nlora:\n  r: 4\n  target_modules: [q_proj, v_proj]\n"
        "gradient_checkpointing: on\nlearning_rate: 1e-4\n"
    )
    config = load_config(path)
    assert config.model == "some/model"
    assert config.lora.r == 4 and config.lora.alpha == 32  # untouched keys keep their defaults
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.gradient_checkpointing == "on"  # YAML's `on` is a boolean; read as the choice
    assert config.learning_rate == 1e-4
    assert config.batch_size == TrainConfig().batch_size


def test_command_line_overrides_win_over_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("max_steps: 100\nlearning_rate: 0.001\nlora:\n  r: 4\n  alpha: 8\noutput_dir: out\n")
    config = load_config(
        path,
        [
            "--max_steps",
            "7",
            "--lora.r",
            "2",
            "--learning_rate=5e-5",
            "--resume",
            "--output_dir",
            "123",
            "--lora.target_modules",
            "q_proj,k_proj",
        ],
    )
    assert config.max_steps == 7
    assert config.learning_rate == 5e-5
    assert config.lora.r == 2 and config.lora.alpha == 8
    assert config.resume is True
    assert config.output_dir == "123"  # a str key keeps the text
    assert config.lora.target_modules == ["q_proj", "k_proj"]


def test_overrides_over_the_demo():
    config = load_config(None, ["--max_steps", "3", "--eval_split", "0"])
    assert config.max_steps == 3 and config.eval_split == 0.0
    assert config.batch_size == DEMO_CONFIG["batch_size"]


def test_parse_overrides_nesting():
    assert parse_overrides(["--lora.r", "8", "--save_merged"]) == {"lora": {"r": "8"}, "save_merged": "true"}


@pytest.mark.parametrize(
    "data, words",
    [
        ({"modle": "x"}, ["unknown config key 'modle'", "model"]),
        ({"lora": {"rank": 4}}, ["unknown config key 'lora.rank'"]),
        ({"max_steps": "ten"}, ["'max_steps' must be an integer", "'ten'"]),
        ({"learning_rate": [1]}, ["'learning_rate' must be a number"]),
        ({"load_in_4bit": "yes please"}, ["'load_in_4bit' must be true/false"]),
        ({"lora": 3}, ["lora must be a mapping"]),
        ({"gradient_checkpointing": "sometimes"}, ["gradient_checkpointing", "off, on, offload"]),
        ({"batch_size": 0}, ["batch_size", "at least 1"]),
        ({"max_steps": 0}, ["max_steps"]),
        ({"eval_split": 1.5}, ["eval_split"]),
        (
            {"lora": {"finetune_vision_layers": False, "finetune_language_layers": False}},
            ["nothing to train"],
        ),
        ({"lora": {"target_modules": 3}}, ["lora.target_modules"]),
        ({"weight_decay": -1}, ["'weight_decay'", ">= 0", "-1"]),
        ({"seed": -1}, ["'seed'", "[0, 2**32)", "-1"]),
        ({"seed": 2**32}, ["'seed'", "[0, 2**32)"]),
        ({"mlp_tile_rows": -1}, ["'mlp_tile_rows'", "0 for off", "-1"]),
        ({"learning_rate": float("nan")}, ["'learning_rate'", "finite", "nan"]),
        ({"weight_decay": float("inf")}, ["'weight_decay'", "finite", "inf"]),
        ({"epochs": float("inf")}, ["'epochs'", "finite"]),
        ({"warmup": float("nan")}, ["'warmup'", "finite"]),
        ({"lora": {"dropout": float("nan")}}, ["'lora.dropout'", "finite"]),
    ],
)
def test_validation_errors_name_the_key(data, words):
    with pytest.raises(FusetuneError) as error:
        build_config(data)
    for word in words:
        assert word in str(error.value)


def test_numbers_from_the_command_line_are_range_checked():
    for argv, key in (
        (["--learning_rate", ".nan"], "'learning_rate': must be a finite number"),
        (["--weight_decay", "-1"], "'weight_decay': must be >= 0"),
        (["--seed", "-1"], "'seed': must be in [0, 2**32)"),
        (["--mlp_tile_rows", "-1"], "'mlp_tile_rows': must be a number of rows"),
    ):
        with pytest.raises(FusetuneError) as error:
            load_config(None, argv)
        assert key in str(error.value)
    assert load_config(None, ["--seed", str(2**32 - 1), "--mlp_tile_rows", "0"]).seed == 2**32 - 1


def test_off_in_yaml_for_every_key_that_has_it(tmp_path):
    # YAML reads a bare off as false; each key whose choices include "off" takes it as that choice.
    path = tmp_path / "run.yaml"
    path.write_text("kernels: off\ngradient_checkpointing: off\ndistributed:\n  strategy: off\n")
    config = load_config(path)
    assert (config.kernels, config.gradient_checkpointing, config.distributed.strategy) == ("off",) * 3
    assert load_config(None, ["--kernels", "off"]).kernels == "off"
    with pytest.raises(FusetuneError, match="'kernels': use one of auto, off, got 'on'"):
        load_config(None, ["--kernels", "on"])


def test_save_total_limit_zero_keeps_every_checkpoint():
    import torch

    from fusetune.train.config import config_keys
    from fusetune.train.runner import training_arguments

    doc = next(doc for key, _, _, doc in config_keys() if key == "save_total_limit")
    assert "0: keep them all" in doc
    config = load_config(None, ["--save_total_limit", "0"])
    assert training_arguments(config, torch.float32, False, None).save_total_limit is None


def test_override_of_wrong_type_is_an_error():
    with pytest.raises(FusetuneError, match="'batch_size' must be an integer"):
        load_config(None, ["--batch_size", "two"])
    with pytest.raises(FusetuneError, match="unknown config key 'bogus'"):
        load_config(None, ["--bogus", "1"])


def test_bad_files(tmp_path):
    with pytest.raises(FusetuneError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(FusetuneError, match="must hold a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("model: [unclosed\n")
    with pytest.raises(FusetuneError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")


def test_every_key_is_documented():
    text = describe()
    for name in (
        "model",
        "dataset",
        "lora.r",
        "lora.finetune_vision_layers",
        "gradient_checkpointing",
        "resume",
        "save_merged",
        "max_pixels",
        "kernels",
    ):
        assert f"  {name} " in text
    assert "(no doc)" not in text


def test_checkpointing_on_reaches_trainer_under_its_current_names():
    """``gradient_checkpointing: on`` turns on Trainer's non-reentrant checkpointing, under the
    names this transformers has (``activation_checkpointing*`` from 5.2x on), with no deprecation
    warning."""
    import warnings

    import torch

    from fusetune.train.runner import training_arguments

    config = load_config(None, ["--gradient_checkpointing", "on"])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*checkpointing.*deprecated", category=FutureWarning)
        args = training_arguments(config, torch.float32, False, None)
    current = hasattr(args, "activation_checkpointing")
    name = "activation_checkpointing" if current else "gradient_checkpointing"
    assert getattr(args, name) is True
    assert getattr(args, f"{name}_kwargs") == {"use_reentrant": False}
