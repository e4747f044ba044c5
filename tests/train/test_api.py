"""The Python API: ``fusetune.load_model`` (demo and the from_pretrained path) and its errors."""

from __future__ import annotations

import pytest
import torch

import fusetune
from fusetune.train import demo
from fusetune.train.collator import ChatCollator
from fusetune.train.config import LoraSettings
from fusetune.train.errors import FusetuneError
from fusetune.train.model import lora_targets


def test_load_model_demo_is_a_patched_peft_model():
    model, processor = fusetune.load_model("demo", lora={"r": 4})
    assert type(model).__name__.startswith("PeftModel")
    report = model._fusetune_report
    assert report.patched["loss"] and report.patched["rms_norm"]
    assert model.peft_config["default"].r == 4
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any(".visual." in n for n in trainable) and any("language_model" in n for n in trainable)
    batch = ChatCollator(processor, 64, 56 * 56)(demo.samples(2))
    model.train()
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and 2.0 < loss.item() < 8.0


def test_lora_parts_and_lists():
    base = demo.build_model(demo.build_tokenizer())
    language_only = lora_targets(base, LoraSettings(finetune_vision_layers=False))
    assert "visual" not in language_only and "q_proj" in language_only
    listed = lora_targets(base, LoraSettings(target_modules=["q_proj", "v_proj"]))
    assert "k_proj" not in listed and "qkv" not in listed
    with pytest.raises(FusetuneError, match="no linear layers"):
        lora_targets(base, LoraSettings(target_modules=["nothing_here"]))


def test_unpatched_and_without_lora():
    model, _ = fusetune.load_model("demo", lora=False, kernels="off")
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    assert getattr(model, "_fusetune_report", None) is None


def test_from_pretrained_path_for_a_local_causal_lm(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = demo.build_tokenizer()
    config = AutoConfig.for_model(
        "qwen2",
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    model, loaded = fusetune.load_model(str(tmp_path / "tiny"))
    assert type(model.get_base_model()).__name__ == "Qwen2ForCausalLM"
    assert loaded.chat_template and model._fusetune_report.patched["loss"]
    # ready to fine-tune: in training mode throughout, as from_pretrained's eval mode is not
    assert all(module.training for module in model.modules())


def test_model_errors(tmp_path):
    from transformers import AutoConfig

    AutoConfig.for_model("vit", num_hidden_layers=1).save_pretrained(tmp_path / "vit")
    with pytest.raises(FusetuneError, match="model type 'vit'.*neither a causal LM"):
        fusetune.load_model(str(tmp_path / "vit"))
    with pytest.raises(FusetuneError, match="cannot load model"):
        fusetune.load_model(str(tmp_path / "no-such-folder"))
    if not torch.cuda.is_available():
        with pytest.raises(FusetuneError, match="load_in_4bit needs a CUDA GPU"):
            fusetune.load_model(str(tmp_path / "vit"), load_in_4bit=True)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"max_steps": 0, "epochs": 0}, "'max_steps': must be a positive number"),
        ({"lora": LoraSettings(r=0)}, "'lora.r': must be at least 1"),
        ({"lr_scheduler": "foo"}, "'lr_scheduler': use one of linear"),
        ({"learning_rate": "fast"}, "'learning_rate' must be a number"),
    ],
)
def test_train_checks_a_config_built_in_python(tmp_path, settings, message):
    """``train(TrainConfig(...))`` runs the command line's checks before anything loads."""
    from fusetune.train.config import TrainConfig
    from fusetune.train.runner import train

    with pytest.raises(FusetuneError, match=message):
        train(TrainConfig(output_dir=str(tmp_path / "run"), demo_samples=8, **settings), quiet=True)
    assert not (tmp_path / "run").exists()


def test_load_model_checks_its_lora_settings():
    with pytest.raises(FusetuneError, match="'lora.r': must be at least 1"):
        fusetune.load_model("demo", lora=LoraSettings(r=0))
    with pytest.raises(FusetuneError, match=r"'lora.dropout': must be in \[0, 1\)"):
        fusetune.load_model("demo", lora={"dropout": 1.5})
    with pytest.raises(FusetuneError, match="'lora.alpha' must be an integer"):
        fusetune.load_model("demo", lora={"alpha": "big"})


def test_train_renders_with_the_chat_template_its_config_names(tmp_path):
    """A run's ``chat_template`` reaches the model's loading (a file that is not there is named)."""
    from fusetune.train.config import TrainConfig
    from fusetune.train.runner import train

    missing = tmp_path / "missing.jinja"
    config = TrainConfig(output_dir=str(tmp_path / "run"), demo_samples=8, chat_template=str(missing))
    with pytest.raises(FusetuneError, match=f"chat_template='{missing}' is neither a chat template"):
        train(config, quiet=True)
