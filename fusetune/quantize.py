"""QLoRA base weights for a model that is already built: its nn.Linear layers become NF4 in place.

``quantize_4bit(model)`` does what ``from_pretrained(..., quantization_config=BitsAndBytesConfig(
load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
bnb_4bit_compute_dtype=torch.bfloat16))`` does at load time (bfloat16 is this function's default
compute dtype; BitsAndBytesConfig's is float32), for a model that is already in memory (random
weights built from a config, or a user's bf16 model): every plain ``nn.Linear`` becomes a
``bitsandbytes.nn.Linear4bit`` holding NF4 data (blocksize 64, absmax double-quantised), frozen,
with the original bias. Each weight is quantised on its own device and dropped at once, so the full-
precision model never exists twice.

Which layers stay in full precision, as transformers' bitsandbytes integration decides
(``get_keys_to_not_convert`` + ``_keep_in_fp32_modules``): the output embedding (``lm_head``),
weights tied to another, the module holding the model's last parameter, and the model's
``_keep_in_fp32_modules``; plus every module whose qualified name contains an entry of ``skip``
(transformers' ``llm_int8_skip_modules``). Like transformers, the vision tower and multimodal
projector of a VLM (Qwen2-VL's ``visual``, Llava's ``multi_modal_projector``) are quantised too:
none of the supported VLMs lists them in those places; add ``"visual"`` to ``skip`` to keep them.
Only exact ``nn.Linear`` instances are converted (transformers' rule), so running it twice, or on
an already-quantised model, changes nothing.

Afterwards ``model.is_loaded_in_4bit`` is True, which is how PEFT's ``get_peft_model`` knows to
wrap the layers with its bitsandbytes LoRA layer, and ``model.quantization_method`` is
"bitsandbytes", which makes transformers' ``PreTrainedModel.to`` refuse a dtype cast (as for a
model loaded in 4 bits): a cast would change the bits of bytes stored in a float ``quant_storage``.
"""

from __future__ import annotations

import torch
from torch import nn

_BLOCKSIZE = 64  # transformers' and QLoRA's default
# Dtypes the packed NF4 bytes can be stored as (bnb_4bit_quant_storage): uint8, or the float dtype
# FSDP2 gathers the model in (see quantize_4bit).
_QUANT_STORAGES = (torch.uint8, torch.bfloat16, torch.float16, torch.float32)


def _bitsandbytes():
    try:
        import bitsandbytes
    except ImportError:
        raise ImportError("fusetune.quantize_4bit needs bitsandbytes: pip install bitsandbytes") from None
    return bitsandbytes


def _model_keeps(model: nn.Module) -> set[str]:
    """Qualified module names transformers' bitsandbytes integration keeps in full precision."""
    names = {name for name, _ in model.named_modules()}
    keep: set[str] = set()
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    keep |= {key.removesuffix(".weight") for pair in tied.items() for key in pair}
    parameters = list(model.named_parameters())
    if parameters:
        keep.add(parameters[-1][0].rpartition(".")[0])
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    keep |= {name for name, module in model.named_modules() if output is not None and module is output}
    for key in getattr(model, "_keep_in_fp32_modules", None) or ():
        keep |= {
            name for name in names if name == key or name.endswith("." + key) or name.startswith(key + ".")
        }
    return keep


def _to_linear4bit(
    linear: nn.Linear, bnb, compute_dtype: torch.dtype, double_quant: bool, quant_storage: torch.dtype
) -> nn.Module:
    """A frozen Linear4bit holding ``linear``'s weight as NF4 packed into ``quant_storage``,
    quantised on the weight's device."""
    weight = linear.weight.detach()
    if weight.device.type == "meta":
        raise ValueError(
            "fusetune.quantize_4bit: the model's weights are on the meta device (not materialised); "
            "load or initialise them first (e.g. model.to_empty(device=...) and init), then quantise."
        )
    if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(
            f"fusetune.quantize_4bit: a Linear weight has dtype {weight.dtype}; bitsandbytes quantises "
            f"float32/bfloat16/float16 weights (cast the model first, e.g. model.to(torch.bfloat16))."
        )
    packed_bytes = (weight.numel() + 1) // 2  # two 4-bit codes a byte, an odd count padded
    if packed_bytes % quant_storage.itemsize:
        raise ValueError(
            f"fusetune.quantize_4bit: a {tuple(weight.shape)} weight packs into {packed_bytes} bytes, "
            f"not a whole number of {quant_storage} elements; use quant_storage=torch.uint8, or "
            f"skip this layer."
        )
    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=False,
        compute_dtype=compute_dtype,
        compress_statistics=double_quant,
        quant_type="nf4",
        quant_storage=quant_storage,
        device="meta",
    )
    # Params4bit quantises when moved to a real device (what transformers' loader does).
    layer.weight = bnb.nn.Params4bit(
        weight,
        requires_grad=False,
        blocksize=_BLOCKSIZE,
        compress_statistics=double_quant,
        quant_type="nf4",
        quant_storage=quant_storage,
        module=layer,
    ).to(weight.device)
    layer.bias = linear.bias
    layer.source_cls = nn.Linear
    layer.requires_grad_(False)
    layer.train(linear.training)
    return layer


def quantize_4bit(
    model: nn.Module,
    *,
    skip: tuple[str, ...] | list[str] = ("lm_head",),
    compute_dtype: torch.dtype = torch.bfloat16,
    double_quant: bool = True,
    quant_storage: torch.dtype = torch.uint8,
) -> list[str]:
    """Turn every ``nn.Linear`` of ``model`` into a bitsandbytes NF4 ``Linear4bit``, in place.

    skip: substrings of qualified module names to leave in full precision (added to what
    transformers keeps; see the module docstring). compute_dtype: the dtype Linear4bit computes
    in (bnb_4bit_compute_dtype). double_quant: quantise the absmax too (bnb_4bit_use_double_quant).
    quant_storage: the dtype the packed bytes are stored as (bnb_4bit_quant_storage; the same bytes
    whatever it is). For FSDP2 the QLoRA-FSDP recipe stores them in the compute dtype: accelerate
    shards only floating-point 4-bit weights (uint8 ones stay whole on every process), and FSDP2's
    mixed precision casts floating-point parameters to its param_dtype, which leaves bytes stored
    in that dtype as they are (stored in another float dtype, they would be scrambled).
    Returns the qualified names of the converted layers. Call it before PEFT's get_peft_model.
    """
    bnb = _bitsandbytes()
    if hasattr(model, "peft_config") or any("lora_" in name for name, _ in model.named_modules()):
        raise ValueError(
            "fusetune.quantize_4bit: this model carries PEFT adapters, which would be quantised and "
            "frozen too; quantise the plain model, then call peft.get_peft_model on it."
        )
    if isinstance(skip, str):
        raise TypeError(f"fusetune.quantize_4bit: skip must be a tuple of names, e.g. ({skip!r},).")
    if quant_storage not in _QUANT_STORAGES:
        raise TypeError(
            f"fusetune.quantize_4bit: quant_storage={quant_storage!r}; use torch.uint8, or the float "
            f"dtype the model is sharded in (torch.bfloat16, torch.float16 or torch.float32)."
        )
    keep = _model_keeps(model)
    # Names only: holding the modules themselves would keep every full-precision weight alive.
    targets = [
        name
        for name, module in model.named_modules()
        if type(module) is nn.Linear and name not in keep and not any(entry in name for entry in skip)
    ]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = _to_linear4bit(getattr(parent, child), bnb, compute_dtype, double_quant, quant_storage)
        setattr(parent, child, layer)
        del layer
    if targets:
        model.is_loaded_in_4bit = True
        # transformers' PreTrainedModel.to refuses a dtype cast of a model marked so, as for one loaded in
        # 4 bits (a cast would change the bits of bytes stored in a float dtype).
        model.quantization_method = "bitsandbytes"
    return targets
