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
    ],
)
def test_validation_errors_name_the_key(data, words):
    with pytest.raises(FusetuneError) as error:
        build_config(data)
    for word in words:
        assert word in str(error.value)


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
