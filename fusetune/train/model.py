"""``load_model``: a model and its processor/tokenizer, LoRA adapters (PEFT), fusetune's patching.

``"demo"`` builds the offline demo (``fusetune.train.demo``); anything else goes through
transformers' ``from_pretrained`` (a hub id or a local folder): image-text-to-text models with
``AutoModelForImageTextToText`` + ``AutoProcessor``, causal LMs with ``AutoModelForCausalLM`` +
``AutoTokenizer``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fusetune.train.config import STRATEGIES, LoraSettings, lora_settings
from fusetune.train.errors import FusetuneError

# Submodule names that hold a vision tower or the vision -> language projector.
VISION_PARTS = (
    "visual",
    "vision_tower",
    "vision_model",
    "multi_modal_projector",
    "vision_embed_tokens",
    "image_newline",
    "connector",
    "merger",
    "mm_projector",
)
# The VLM families whose collator path (processor outputs, chat template, masking) is tested, each
# through a tiny model of the family (Qwen2.5-VL uses Qwen2-VL's processor and chat template, but
# has no test of its own here).
TESTED_VLMS = ("qwen2_vl", "mllama", "llava")
# The files transformers builds a tokenizer from (a folder with none of them has no tokenizer).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "tekken.json",
)


def _is_vision(name: str) -> bool:
    return any(part in VISION_PARTS for part in name.split("."))


def lora_targets(model: nn.Module, lora: LoraSettings) -> str:
    """A PEFT ``target_modules`` regex for ``lora``'s choice of linear layers in ``model``.

    "all-linear" is every ``nn.Linear`` but the output head; a list keeps the layers whose last
    name is listed. ``finetune_vision_layers`` / ``finetune_language_layers`` keep or drop the
    vision tower (and projector) and the language model. Layer numbers are folded into ``\\d+``
    so the pattern stays short.
    """
    wanted = None if lora.target_modules == "all-linear" else set(lora.target_modules)
    patterns: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not name:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("lm_head", "output", "score") or (wanted is not None and leaf not in wanted):
            continue
        vision = _is_vision(name)
        if (vision and not lora.finetune_vision_layers) or (not vision and not lora.finetune_language_layers):
            continue
        pattern = r"\.\d+\.".join(re.escape(piece) for piece in re.split(r"\.\d+\.", name))
        if pattern not in patterns:
            patterns.append(pattern)
    if not patterns:
        which = "any" if wanted is None else f"the listed ({', '.join(sorted(wanted))})"
        raise FusetuneError(
            f"LoRA found no linear layers matching {which} target modules in the chosen parts "
            f"(vision: {lora.finetune_vision_layers}, language: {lora.finetune_language_layers}); check "
            f"lora.target_modules against the model's module names."
        )
    return "^(?:" + "|".join(patterns) + ")$"


def add_lora(model: nn.Module, lora: LoraSettings):
    """``model`` wrapped by PEFT with LoRA adapters as ``lora`` says."""
    import peft

    config = peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora_targets(model, lora),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(model, config)


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def quantization_config(dtype: torch.dtype, strategy: str = "off"):
    """The ``BitsAndBytesConfig`` ``load_in_4bit`` loads with: NF4, double quantisation (QLoRA's),
    computing in ``dtype`` (bfloat16 for a float32 run).

    Under ``strategy`` fsdp2 the packed bytes are stored in that compute dtype
    (``bnb_4bit_quant_storage``, the QLoRA-FSDP recipe) instead of uint8: accelerate shards only
    floating-point 4-bit weights (it leaves uint8 ones whole on every process), and FSDP2's mixed
    precision, which gathers in the compute dtype, then leaves the bytes as they are.
    """
    from transformers import BitsAndBytesConfig

    compute = dtype if dtype != torch.float32 else torch.bfloat16
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=compute if strategy == "fsdp2" else torch.uint8,
    )


def _quantization(load_in_4bit: bool, dtype: torch.dtype, strategy: str):
    if not load_in_4bit:
        return None
    if not torch.cuda.is_available():
        raise FusetuneError(
            "load_in_4bit needs a CUDA GPU (bitsandbytes' 4-bit kernels) and this machine has none; set "
            "load_in_4bit: false (or --load_in_4bit false) to train in full precision on the CPU."
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise FusetuneError("load_in_4bit needs bitsandbytes: pip install bitsandbytes.") from None
    return quantization_config(dtype, strategy)


def _reason(error: Exception, limit: int = 300) -> str:
    """``error``'s message on one line, at most ``limit`` characters, without its closing period (the
    messages that wrap it go on with a sentence of their own), or its type where it has no message."""
    text = " ".join(str(error).split())[:limit].rstrip(" .")
    return text or type(error).__name__


def _refuse_remote_code(name: str, error: Exception) -> None:
    """Where loading ``name`` failed because it needs its own Python code (``auto_map``), say so:
    fusetune runs no code from a model repo, and transformers, asked not to, does not prompt for it
    in the middle of a run but names an argument fusetune does not take."""
    if "trust_remote_code" in str(error):
        raise FusetuneError(
            f"{name} needs Python code of its own to load (transformers' trust_remote_code), which fusetune "
            "does not run; use a model of an architecture transformers has built in (fusetune info lists "
            "the tested ones)."
        ) from None


def _local_path(name: str) -> str:
    """``name`` with a leading ``~`` expanded where that names an existing path (as the dataset's is);
    anything else (a hub id, a path that is not there) is left for ``from_pretrained`` to judge."""
    expanded = os.path.expanduser(name)
    return expanded if expanded != name and os.path.exists(expanded) else name


def _refuse_adapter(name: str) -> None:
    """Refuse a folder holding only a PEFT adapter (``adapter_config.json``, no ``config.json``), such
    as fusetune's own ``output_dir/adapter``: it is not a model, and transformers would only say that
    its config.json has no model_type. The adapter's config names the base model to give instead."""
    folder = Path(name)
    if not (folder / "adapter_config.json").is_file() or (folder / "config.json").is_file():
        return
    try:
        base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        base = None
    on = f"a LoRA adapter on {base!r}" if base else "a LoRA adapter (its adapter_config.json names no base)"
    raise FusetuneError(
        f"{name} is {on}; set model to that base model (and resume from a checkpoint, or merge the "
        f"adapter, to continue from it)."
    )


def _no_tokenizer(why: str) -> FusetuneError:
    """The error for a model without its tokenizer files: ``why`` says how that showed."""
    return FusetuneError(
        f"{why}; copy them from the base model (tokenizer.json, tokenizer_config.json, chat_template.jinja, "
        f"and tokenizer.model or vocab.json + merges.txt where it has them)."
    )


def _check_tokenizer_files(name: str) -> None:
    """Refuse a local folder with none of ``TOKENIZER_FILES`` (a model saved without its tokenizer)
    before anything loads: transformers would build an empty tokenizer from defaults (or fail with
    a message about its backends) instead of saying so."""
    folder = Path(name)
    if folder.is_dir() and not any((folder / file).is_file() for file in TOKENIZER_FILES):
        raise _no_tokenizer(f"the folder {name} has no tokenizer files")


def _check_tokenizer(name: str, tokenizer, vocab_size: int | None) -> None:
    """Refuse an empty tokenizer, or one far smaller than the model's vocabulary.

    That is what transformers builds from defaults for a hub repo (or a folder) whose tokenizer
    files are missing: a handful of special tokens, which encode every text to nothing or to
    ``<unk>``. A real tokenizer covers about the model's vocabulary (often padded past it, but
    never a hundredfold).
    """
    size = len(tokenizer)
    if size <= 1 or (vocab_size and size * 100 < vocab_size):
        raise _no_tokenizer(
            f"the tokenizer of {name} has {size} token(s) for a model vocabulary of {vocab_size}: "
            f"its tokenizer files are missing",
        )


def _no_image_processor(name: str, model_type: str, why: str) -> FusetuneError:
    """The error for a VLM without an image processor config: ``why`` says how that showed."""
    return FusetuneError(
        f"{name} is a vision-language model ({model_type}) but has no image processor that transformers "
        f"can load ({why}); copy preprocessor_config.json (and processor_config.json) from the base model."
    )


def _check_image_processor_files(name: str, model_type: str) -> None:
    """Refuse a local VLM folder with no image processor config: neither preprocessor_config.json nor
    an ``image_processor`` entry in processor_config.json (where transformers looks for one), as when
    only the model and its tokenizer were saved. AutoProcessor would fail with a message about a
    hub download, or hand back the bare tokenizer."""
    folder = Path(name)
    if not folder.is_dir() or (folder / "preprocessor_config.json").is_file():
        return
    try:
        nested = "image_processor" in json.loads((folder / "processor_config.json").read_text())
    except (OSError, ValueError, TypeError):
        nested = False
    if not nested:
        raise _no_image_processor(name, model_type, "the folder has no preprocessor_config.json")


def _set_max_pixels(image_processor, max_pixels: int) -> None:
    """Cap the pixels per image of an image processor that has such a budget (Qwen2-VL's)."""
    if hasattr(image_processor, "max_pixels"):
        image_processor.max_pixels = max_pixels
        size = getattr(image_processor, "size", None)
        if isinstance(size, dict) and "longest_edge" in size:
            size["longest_edge"] = max_pixels


def _load_processor(name: str, config, vision: bool, max_pixels: int | None):
    """The processor (a VLM's: tokenizer and image processor) or the tokenizer (an LLM's) of ``name``.

    AutoProcessor hands back a bare tokenizer when it cannot build the image processor (from a
    processor_config.json of a processor class it does not know, as a custom one saves, or a hub
    repo without one); a VLM sees no images through that, so it is refused here.
    """
    from transformers import AutoProcessor, AutoTokenizer

    _check_tokenizer_files(name)
    if vision:
        _check_image_processor_files(name, config.model_type)
    try:
        loader = AutoProcessor if vision else AutoTokenizer
        processor = loader.from_pretrained(name, trust_remote_code=False)
    except (OSError, ValueError, ImportError, AttributeError) as error:
        _refuse_remote_code(name, error)
        what = "processor" if vision else "tokenizer"
        if "torchvision" in str(error).lower():  # Qwen2-VL's video processor, for one, needs it
            reason = (
                "it needs torchvision, which is not installed; install the torchvision release built for "
                f"your torch {torch.__version__} (PyTorch's index has CPU and CUDA builds)"
            )
        else:
            reason = _reason(error)
        raise FusetuneError(f"cannot load the {what} of {name!r}: {reason}.") from None
    if vision and getattr(processor, "image_processor", None) is None:
        why = f"AutoProcessor gave back only a {type(processor).__name__}"
        raise _no_image_processor(name, config.model_type, why)
    vocab_size = getattr(config.get_text_config(), "vocab_size", None)
    _check_tokenizer(name, getattr(processor, "tokenizer", processor), vocab_size)
    if vision and max_pixels is not None:
        _set_max_pixels(processor.image_processor, max_pixels)
    return processor


def read_chat_template(value: str) -> str:
    """The text of a ``chat_template`` setting: the template itself (it holds Jinja's "{{" or "{%"),
    or the path of a file holding it (a leading ``~`` expanded)."""
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise FusetuneError(
            f"chat_template={value!r} is neither a chat template (no Jinja tags) nor a file; give the path "
            "of a .jinja file or the template's text."
        )
    return path.read_text(encoding="utf-8")


def use_chat_template(processor, template: str) -> None:
    """Render chats with ``template`` instead of the model's own: set on the processor and on its
    tokenizer (each renders with its own), so that it is also saved with them."""
    processor.chat_template = template
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.chat_template = template


def _load_pretrained(
    name: str, dtype: torch.dtype, load_in_4bit: bool, max_pixels: int | None, strategy: str
):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    name = _local_path(name)
    _refuse_adapter(name)
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=False)
    except (OSError, ValueError) as error:
        _refuse_remote_code(name, error)
        raise FusetuneError(
            f"cannot load model {name!r}: {_reason(error)}. Give a hub id, a local folder with config.json, "
            f"or demo."
        ) from None
    model_type = config.model_type
    quantization = _quantization(load_in_4bit, dtype, strategy)
    if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        auto_model, vision = AutoModelForImageTextToText, True
    elif model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        auto_model, vision = AutoModelForCausalLM, False
    else:
        raise FusetuneError(
            f"model type {model_type!r} ({name}) is neither a causal LM nor an image-text-to-text "
            f"model, which "
            f"is what fusetune train fine-tunes; see `fusetune info` for the architectures it knows."
        )
    # The processor first: its problems (missing files) show before the (possibly long) weights load.
    processor = _load_processor(name, config, vision, max_pixels)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if quantization is not None:
        kwargs |= {"quantization_config": quantization, "device_map": {"": torch.cuda.current_device()}}
    try:
        model = auto_model.from_pretrained(name, trust_remote_code=False, **kwargs)
    except OSError as error:
        raise FusetuneError(f"cannot load the weights of {name!r}: {_reason(error)}.") from None
    if quantization is not None:
        import peft

        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    # from_pretrained hands back eval mode; a model to fine-tune trains (dropout, checkpointing and
    # the fused loss follow the training flag; HF Trainer sets it, a user's own loop may not).
    return model.train(), processor


def load_model(
    name_or_path: str = "demo",
    *,
    load_in_4bit: bool = False,
    lora: LoraSettings | dict | bool | None = None,
    dtype: str = "auto",
    kernels: str = "auto",
    loss: str = "linear_cross_entropy",
    max_pixels: int | None = None,
    mlp_tile_rows: int | None = None,
    strategy: str = "off",
    chat_template: str | None = None,
    verbose: bool = False,
):
    """A model ready to fine-tune and its processor (VLMs) or tokenizer (LLMs): ``(model, processor)``.

    ``lora``: a ``LoraSettings`` or a dict of its fields (None: the defaults, r=16 on every linear
    layer), checked as a config's ``lora`` section is, or False for the plain model.
    ``name_or_path``: "demo", a hub id or a local folder (a leading ``~`` is expanded).
    ``kernels="auto"`` patches the model with ``fusetune.apply`` (its report is
    ``model._fusetune_report``); "off" leaves it unpatched.
    ``load_in_4bit`` quantises the base weights with bitsandbytes (CUDA only). ``mlp_tile_rows``
    goes to ``fusetune.apply`` (row tiles of the fused LoRA MLPs for long inputs). ``strategy``: the
    ``distributed.strategy`` the model will be trained under (off, fsdp2 or deepspeed_zero3); with
    fsdp2, 4-bit weights are stored so that FSDP2 shards them (see ``quantization_config``).
    ``chat_template``: a template's text or a file's path (``read_chat_template``) to render chats
    with instead of the model's own.
    """
    if strategy not in STRATEGIES:
        raise FusetuneError(f"strategy={strategy!r}; use one of {', '.join(STRATEGIES)}.")
    if lora is not False:  # checked before the (possibly long) load
        lora = lora_settings(LoraSettings() if lora is None or lora is True else lora)
    torch_dtype = resolve_dtype(dtype)
    template = read_chat_template(chat_template) if chat_template else None
    if name_or_path == "demo":
        if load_in_4bit:
            raise FusetuneError(
                "load_in_4bit is for real models on a GPU; the demo model trains in full precision. "
                "Set load_in_4bit: false."
            )
        from fusetune.train import demo

        processor = demo.build_processor(max_pixels or demo.IMAGE_SIZE * demo.IMAGE_SIZE)
        model = demo.build_model(processor.tokenizer, dtype=torch_dtype)
    else:
        model, processor = _load_pretrained(name_or_path, torch_dtype, load_in_4bit, max_pixels, strategy)
    if template is not None:
        use_chat_template(processor, template)
    if lora is not False:
        model = add_lora(model, lora)
    if kernels == "auto":
        import fusetune

        report = fusetune.apply(model, loss=loss, mlp_tile_rows=mlp_tile_rows)
        if verbose:
            print(report)
    elif kernels != "off":
        raise FusetuneError(f"kernels={kernels!r}; use auto or off.")
    return model, processor
