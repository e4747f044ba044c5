"""``load_model``: a model and its processor/tokenizer, LoRA adapters (PEFT), fusetune's patching.

``"demo"`` builds the offline demo (``fusetune.train.demo``); anything else goes through
transformers' ``from_pretrained`` (a hub id or a local folder): image-text-to-text models with
``AutoModelForImageTextToText`` + ``AutoProcessor``, causal LMs with ``AutoModelForCausalLM`` +
``AutoTokenizer``.
"""

from __future__ import annotations

import re
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


def _load_pretrained(
    name: str, dtype: torch.dtype, load_in_4bit: bool, max_pixels: int | None, strategy: str
):
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
        AutoTokenizer,
    )
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise FusetuneError(
            f"cannot load model {name!r}: {first}. Give a hub id, a local folder with config.json, or demo."
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
    kwargs: dict[str, Any] = {"dtype": dtype}
    if quantization is not None:
        kwargs |= {"quantization_config": quantization, "device_map": {"": torch.cuda.current_device()}}
    try:
        model = auto_model.from_pretrained(name, **kwargs)
    except OSError as error:
        raise FusetuneError(f"cannot load the weights of {name!r}: {str(error)[:300]}") from None
    try:
        if vision:
            processor = AutoProcessor.from_pretrained(name)
            if max_pixels is not None and hasattr(processor.image_processor, "max_pixels"):
                processor.image_processor.max_pixels = max_pixels
                size = getattr(processor.image_processor, "size", None)
                if isinstance(size, dict) and "longest_edge" in size:
                    size["longest_edge"] = max_pixels
        else:
            processor = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, ImportError, AttributeError) as error:
        raise FusetuneError(
            f"cannot load the {'processor' if vision else 'tokenizer'} of {name!r}: {str(error)[:300]} "
            f"(Qwen2-VL's video processor needs torchvision: pip install torchvision)."
        ) from None
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
    verbose: bool = False,
):
    """A model ready to fine-tune and its processor (VLMs) or tokenizer (LLMs): ``(model, processor)``.

    ``lora``: a ``LoraSettings`` or a dict of its fields (None: the defaults, r=16 on every linear
    layer), checked as a config's ``lora`` section is, or False for the plain model.
    ``kernels="auto"`` patches the model with ``fusetune.apply`` (its report is
    ``model._fusetune_report``); "off" leaves it unpatched.
    ``load_in_4bit`` quantises the base weights with bitsandbytes (CUDA only). ``mlp_tile_rows``
    goes to ``fusetune.apply`` (row tiles of the fused LoRA MLPs for long inputs). ``strategy``: the
    ``distributed.strategy`` the model will be trained under (off, fsdp2 or deepspeed_zero3); with
    fsdp2, 4-bit weights are stored so that FSDP2 shards them (see ``quantization_config``).
    """
    if strategy not in STRATEGIES:
        raise FusetuneError(f"strategy={strategy!r}; use one of {', '.join(STRATEGIES)}.")
    if lora is not False:  # checked before the (possibly long) load
        lora = lora_settings(LoraSettings() if lora is None or lora is True else lora)
    torch_dtype = resolve_dtype(dtype)
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
