"""docs/train.md is generated from fusetune/train/config.py, like ``fusetune train --help``."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from fusetune import cli
from fusetune.train import config as config_module
from fusetune.train.config import EXAMPLE_YAML, build_config, config_keys, render_docs

DOCS = Path(__file__).resolve().parents[2] / "docs" / "train.md"


def test_docs_match_the_config_source():
    # Regenerate with: python -m fusetune.train.config > docs/train.md
    assert DOCS.read_text() == render_docs()


def test_every_key_has_type_default_and_meaning(capsys):
    rows = config_keys()
    keys = [key for key, _, _, _ in rows]
    def names(cls):
        return [f.name for f in config_module.dataclasses.fields(cls)]

    sections = {"lora": config_module.LoraSettings, "distributed": config_module.DistributedSettings}
    fields = [name for name in names(config_module.TrainConfig) if name not in sections]
    nested = [f"{section}.{name}" for section, cls in sections.items() for name in names(cls)]
    assert keys == fields + nested
    assert all(kind and default and doc for _, kind, default, doc in rows), rows
    assert cli.main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    docs = DOCS.read_text()
    for key, kind, default, doc in rows:
        assert f"  {key} " in text and doc in text
        assert f"| `{key}` | `{kind.replace('|', chr(92) + '|')}` | `{default}` |" in docs


def test_example_config_is_valid():
    data = yaml.safe_load(EXAMPLE_YAML)
    config = build_config(data)
    assert config.model == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert config.gradient_checkpointing == "on" and config.lora.finetune_vision_layers is False
    assert config.dataset.endswith(".jsonl")


def test_documented_jsonl_sample_loads(tmp_path):
    from PIL import Image

    from fusetune.train.data import load_samples

    line = next(row for row in render_docs().splitlines() if row.strip().startswith('{"messages"'))
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "0001.png")
    (tmp_path / "train.jsonl").write_text(json.dumps(json.loads(line)) + "\n")
    for spec in (tmp_path / "train.jsonl", tmp_path):  # the file, and the folder holding it
        (sample,) = load_samples(str(spec))
        assert [m["role"] for m in sample["messages"]] == ["user", "assistant"]
        assert sample["messages"][0]["content"][0]["image"] == str(tmp_path / "images" / "0001.png")
