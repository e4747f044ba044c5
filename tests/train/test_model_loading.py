"""``load_model`` on local model folders that are incomplete or not models at all: each is refused
with a FusetuneError that names the fix, before the weights load; complete folders load.

Every folder is built here from a config (random weights) and the demo's word-level tokenizer.
"""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
import torch

from fusetune.train import demo
from fusetune.train.errors import FusetuneError
from fusetune.train.model import load_model

MISSING_TOKENIZER = "; copy them from the base model (tokenizer.json, tokenizer_config.json"
COPY_IMAGE_PROCESSOR = "copy preprocessor_config.json (and processor_config.json) from the base model."


def save_llm(folder, model_type: str = "qwen2", tokenizer: bool = True, vocab_size: int | None = None):
    """A tiny causal LM of ``model_type`` in ``folder``, with the demo tokenizer unless ``tokenizer``
    is False (a model saved without its tokenizer files); its vocabulary the tokenizer's unless
    ``vocab_size`` is given."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    words = demo.build_tokenizer()
    config = AutoConfig.for_model(
        model_type,
        vocab_size=vocab_size or len(words),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    if tokenizer:
        words.save_pretrained(folder)
    return folder


def save_demo_vlm(folder, processor=None):
    """The demo Qwen2-VL in ``folder`` with ``processor`` saved beside it (None: the tokenizer alone)."""
    tokenizer = demo.build_tokenizer()
    demo.build_model(tokenizer).save_pretrained(folder)
    (processor or tokenizer).save_pretrained(folder)
    return folder


def save_llava(folder):
    """A tiny llava with its complete processor (CLIP's PIL image processor, which needs no
    torchvision) in ``folder``."""
    from tests.train.test_collator_vlms import llava_model, llava_processor

    processor = llava_processor()
    llava_model(processor).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def refusal(folder, **kwargs) -> str:
    """The message of the FusetuneError ``load_model`` raises for ``folder``."""
    with pytest.raises(FusetuneError) as caught:
        load_model(str(folder), lora=False, kernels="off", **kwargs)
    return str(caught.value)


# qwen2 builds an empty tokenizer from defaults (1 token, every text encodes to []); llama fails
# with a message about tokenizer backends. Both are a folder saved without its tokenizer.
@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_a_folder_saved_without_its_tokenizer_is_refused(tmp_path, model_type):
    folder = save_llm(tmp_path / "llm", model_type, tokenizer=False)
    message = refusal(folder)
    assert message.startswith(f"the folder {folder} has no tokenizer files{MISSING_TOKENIZER}")


# A tokenizer_config.json with no vocabulary beside it: transformers builds the model type's tokenizer
# from defaults, as it does for a hub repo without tokenizer files: Qwen2's has 1 token (every text
# encodes to []), Gemma's 5 special tokens (every word is <unk>), far fewer than the model's 1000.
@pytest.mark.parametrize("model_type, size", [("qwen2", 1), ("gemma", 5)])
def test_a_tokenizer_built_from_defaults_is_refused(tmp_path, model_type, size):
    folder = save_llm(tmp_path / "llm", model_type, tokenizer=False, vocab_size=1000)
    (folder / "tokenizer_config.json").write_text("{}")
    message = refusal(folder)
    assert f"has {size} token(s) for a model vocabulary of 1000: its tokenizer files are missing" in message
    assert MISSING_TOKENIZER in message


# train() passes its max_pixels (which the processor is then set to); the Python API's default is None.
@pytest.mark.parametrize("max_pixels", [None, 602112])
def test_a_vlm_folder_with_its_tokenizer_alone_is_refused(tmp_path, max_pixels):
    folder = save_demo_vlm(tmp_path / "vlm")
    assert refusal(folder, max_pixels=max_pixels) == (
        f"{folder} is a vision-language model (qwen2_vl) but has no image processor that transformers can "
        f"load (the folder has no preprocessor_config.json); {COPY_IMAGE_PROCESSOR}"
    )


@pytest.mark.parametrize("max_pixels", [None, 602112])
def test_a_vlm_processor_that_comes_back_a_tokenizer_is_refused(tmp_path, max_pixels):
    # fusetune's demo processor is a subclass of Qwen2-VL's: AutoProcessor cannot build it back from
    # its processor_config.json and gives back the bare tokenizer, through which a VLM sees no images.
    folder = save_demo_vlm(tmp_path / "vlm", demo.build_processor())
    message = refusal(folder, max_pixels=max_pixels)
    assert message.startswith(f"{folder} is a vision-language model (qwen2_vl) but has no image processor")
    assert message.endswith(f"(AutoProcessor gave back only a TokenizersBackend); {COPY_IMAGE_PROCESSOR}")


def test_a_vlm_folder_with_its_processor_loads(tmp_path):
    model, processor = load_model(str(save_llava(tmp_path / "llava")), lora=False, kernels="off")
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert type(processor).__name__ == "LlavaProcessor"
    # CLIP's PIL image processor as saved (transformers 5.2x); 5.17 loads its torch twin from the same file
    assert type(processor.image_processor).__name__ in ("CLIPImageProcessorPil", "CLIPImageProcessor")
    assert processor.tokenizer("a red circle .")["input_ids"] == processor.tokenizer.convert_tokens_to_ids(
        ["a", "red", "circle", "."]
    )


@pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is not None, reason="Qwen2-VL's stock processor loads"
)
def test_the_torchvision_hint_is_given_when_torchvision_is_what_is_missing(tmp_path):
    # A folder as Qwen2-VL's hub repos have it: the image processor in preprocessor_config.json of
    # the stock Qwen2VLProcessor, whose video processor needs torchvision.
    folder = save_demo_vlm(tmp_path / "vlm", demo.build_processor())
    saved = json.loads((folder / "processor_config.json").read_text())
    stock = {"processor_class": "Qwen2VLProcessor"}
    (folder / "preprocessor_config.json").write_text(json.dumps(saved["image_processor"] | stock))
    (folder / "processor_config.json").write_text(json.dumps(stock))
    assert refusal(folder) == (
        f"cannot load the processor of {str(folder)!r}: it needs torchvision, which is not installed; "
        f"install the torchvision release built for your torch {torch.__version__} (PyTorch's index has CPU "
        f"and CUDA builds)."
    )


def test_an_adapter_folder_names_its_base_model(tmp_path):
    import peft
    from transformers import AutoModelForCausalLM

    base = save_llm(tmp_path / "base")
    adapter = tmp_path / "run" / "adapter"  # as fusetune writes it: the adapter and the tokenizer
    lora = peft.LoraConfig(r=4, target_modules=["q_proj"])
    peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base), lora).save_pretrained(adapter)
    demo.build_tokenizer().save_pretrained(adapter)
    assert refusal(adapter) == (
        f"{adapter} is a LoRA adapter on {str(base)!r}; set model to that base model (and resume from a "
        f"checkpoint, or merge the adapter, to continue from it)."
    )


def test_a_leading_tilde_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    save_llm(tmp_path / "models" / "llm")
    model, tokenizer = load_model("~/models/llm", lora=False, kernels="off")
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert len(tokenizer) == model.config.vocab_size == len(demo.build_tokenizer())


def test_a_wrapped_message_keeps_one_period(tmp_path):
    # transformers' message for a path that is no folder ends with a period of its own.
    message = refusal(tmp_path / "no-such-folder")
    assert message.startswith(f"cannot load model {str(tmp_path / 'no-such-folder')!r}: ")
    assert re.search(r"[^.]\. Give a hub id, a local folder with config.json, or demo\.$", message)
    assert ".." not in message


def test_a_model_needing_its_own_code_is_refused_without_a_prompt(tmp_path):
    """A folder whose config maps the model to Python files of its own (transformers'
    trust_remote_code): refused, naming why; transformers is never left to prompt for it mid-run."""
    folder = save_llm(tmp_path / "custom")
    config = json.loads((folder / "config.json").read_text())
    config |= {"model_type": "tinycustom", "architectures": ["TinyCustomForCausalLM"],
               "auto_map": {"AutoConfig": "configuration_tiny.TinyConfig",
                            "AutoModelForCausalLM": "modeling_tiny.TinyCustomForCausalLM"}}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_tiny.py").write_text(
        "from transformers import Qwen2Config\n\n\n"
        "class TinyConfig(Qwen2Config):\n    model_type = 'tinycustom'\n")
    message = refusal(folder)
    assert "needs Python code of its own to load (transformers' trust_remote_code)" in message


def test_the_demo_model_in_bf16_keeps_float32_rotary_frequencies_as_from_pretrained_does(tmp_path):
    """A bf16 demo run trains with the rotary frequencies its saved model loads with: float32, as
    ``from_pretrained(dtype=bfloat16)`` keeps them (``model.to(bf16)`` rounded them, about 5e-3 on
    the logits against the saved model)."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    tokenizer = demo.build_processor().tokenizer
    model = demo.build_model(tokenizer, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "saved")
    loaded = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "saved", dtype=torch.bfloat16)
    buffers = dict(model.named_buffers())
    assert buffers and buffers.keys() == dict(loaded.named_buffers()).keys()
    for name, buffer in loaded.named_buffers():
        assert buffer.dtype == buffers[name].dtype == torch.float32, name
        torch.testing.assert_close(buffers[name], buffer, rtol=0, atol=0, msg=name)
    assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}


def test_a_chat_template_given_replaces_the_models_own(tmp_path):
    """``chat_template`` (a file or the text) is what the tokenizer, or a VLM's processor and its
    tokenizer, render chats with and save."""
    from transformers import AutoTokenizer

    from tests.train.test_collator import QWEN3

    folder = save_llm(tmp_path / "model")
    template_file = tmp_path / "qwen3.jinja"
    template_file.write_text(QWEN3)
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    for given in (str(template_file), QWEN3):
        _, tokenizer = load_model(str(folder), lora=False, kernels="off", chat_template=given)
        assert tokenizer.apply_chat_template(chat, tokenize=False) == (
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nyo<|im_end|>\n"
        )
    tokenizer.save_pretrained(tmp_path / "saved")
    assert AutoTokenizer.from_pretrained(tmp_path / "saved").chat_template == QWEN3
    _, processor = load_model("demo", lora=False, kernels="off", chat_template=str(template_file))
    assert processor.chat_template == processor.tokenizer.chat_template == QWEN3


def test_a_chat_template_that_is_neither_a_file_nor_a_template_is_refused(tmp_path):
    message = refusal(save_llm(tmp_path / "model"), chat_template=str(tmp_path / "missing.jinja"))
    assert "neither a chat template (no Jinja tags) nor a file; give the path of a .jinja file" in message
