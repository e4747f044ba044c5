"""The models, inputs and FLOP counts of the end-to-end benchmark (``bench/e2e.py``).

Four full-size architectures with random weights, built from their published configs (nothing is
downloaded): ``L8`` Llama-3.1-8B, ``Q7VL`` Qwen2.5-VL-7B-Instruct (vision tower included), ``M11``
Llama-3.2-11B-Vision (Mllama) and ``G12`` the text part of Gemma-3-12B-it (``Gemma3ForCausalLM``:
sliding-window and global layers, tied embeddings, vocab 262,208). Each also has a tiny stand-in of
the same architecture (``tiny=True``) that runs on a CPU in seconds, so the benchmark's plumbing can
be tested anywhere.

Weights are identical in every process that builds the same model: one seeded random call per
tensor, on the same device, in the same order (``patch_gpu.build``). The Unsloth worker loads the
same weights from a folder that :func:`save_folder` writes from such a build.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import patch_gpu
import torch

IGNORE = -100
SEED = 0
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TINY_SHRINK = 64  # a tiny config runs 1/64 of the full one's tokens
# H200 SXM dense bf16 tensor-core rate from NVIDIA's spec sheet, the MFU denominator.
PEAK_FLOPS = 989e12

# Mllama's supported tile layouts (Llama-3.2-11B-Vision's preprocessor); an image's aspect-ratio id is
# its index here plus one (0 pads), so 2 x 2 tiles is id 6.
MLLAMA_RATIOS = [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]]
MLLAMA_TILES = (2, 2)


def mllama_11b_config(tiny: bool = False):
    """meta-llama/Llama-3.2-11B-Vision's config.json written out (10.67 B parameters), or a tiny
    Mllama (hidden 64, two text layers of which one cross-attends, a one-layer vision tower on 28-pixel
    tiles) of the same shape otherwise."""
    from transformers import MllamaConfig

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    if tiny:
        text = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    cross_attention_layers=[1], num_attention_heads=4, num_key_value_heads=2,
                    bos_token_id=1, eos_token_id=2, pad_token_id=3)
        vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_global_layers=1,
                      attention_heads=2, image_size=28, patch_size=14, intermediate_layers_indices=[0],
                      vision_output_dim=64)
    else:
        text = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=40,
                    cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38], num_attention_heads=32,
                    num_key_value_heads=8, bos_token_id=128000,
                    eos_token_id=128001, pad_token_id=128004)
        vision = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_global_layers=8,
                      attention_heads=16, image_size=560, patch_size=14,
                      intermediate_layers_indices=[3, 7, 15, 23, 30], vision_output_dim=7680)
    text.update(max_position_embeddings=131072, rms_norm_eps=1e-5, rope_parameters=rope,
                tie_word_embeddings=False, hidden_act="silu")
    vision.update(max_num_tiles=4, num_channels=3, norm_eps=1e-5, supported_aspect_ratios=MLLAMA_RATIOS)
    return MllamaConfig(text_config=text, vision_config=vision, image_token_index=text["vocab_size"])


def gemma3_12b_config(tiny: bool = False):
    """The text part of google/gemma-3-12b-it (11.77 B parameters) as a ``Gemma3TextConfig``, or a
    tiny Gemma 3 (hidden 64, heads 32 wide, one sliding-window layer of 16 tokens then one global)
    of the same shape otherwise.

    The published file gives the text config only its sizes, ``sliding_window`` 1,024 and
    ``rope_scaling`` (linear, factor 8); the rest is Gemma3TextConfig's defaults, written out here:
    head_dim 256 (not hidden / heads, 240), ``query_pre_attn_scalar`` 256, no soft-capping, tied
    embeddings, RoPE theta 1,000,000 on the global layers and 10,000 on the sliding ones, and the old
    ``sliding_window_pattern`` 6 (five sliding layers, then a global one) as transformers 5's
    ``layer_types``. EOS is ``<eos>`` (1) and ``<end_of_turn>`` (106), as the -it model's config has.
    """
    from transformers import Gemma3TextConfig

    rope = {"full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
    if tiny:
        sizes = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32,
                     sliding_window=16, layer_types=["sliding_attention", "full_attention"])
    else:
        sizes = dict(vocab_size=262208, hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
                     num_attention_heads=16, num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256,
                     sliding_window=1024, layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 8)
    return Gemma3TextConfig(**sizes, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131072,
                            rms_norm_eps=1e-6, rope_parameters=rope, final_logit_softcapping=None,
                            attn_logit_softcapping=None, attention_bias=False, tie_word_embeddings=True,
                            bos_token_id=2, eos_token_id=[1, 106], pad_token_id=0, initializer_range=0.02)


@dataclass(frozen=True)
class Model:
    """One benchmarked architecture: its patch_gpu spec (config + whether it is a VLM), the Liger
    function that patches it and how to build its batch."""

    name: str
    spec: patch_gpu.Spec
    liger: str

    @property
    def vlm(self) -> bool:
        return self.spec.vlm


def models(tiny: bool) -> dict[str, Model]:
    """L8, Q7VL, M11 and G12, full size or tiny. G12's Liger function is the text-only Gemma 3 one,
    which patches ``Gemma3ForCausalLM`` (``apply_liger_kernel_to_gemma3`` is for the VLM)."""
    llama, qwen = patch_gpu.memory_specs(quick=tiny)
    mllama = patch_gpu.Spec("llama-3.2-11b-vision", lambda: mllama_11b_config(tiny), vlm=True)
    gemma = patch_gpu.Spec("gemma-3-12b", lambda: gemma3_12b_config(tiny))
    return {"L8": Model("L8", llama, "apply_liger_kernel_to_llama"),
            "Q7VL": Model("Q7VL", qwen, "apply_liger_kernel_to_qwen2_5_vl"),
            "M11": Model("M11", mllama, "apply_liger_kernel_to_mllama"),
            "G12": Model("G12", gemma, "apply_liger_kernel_to_gemma3_text")}


# Benchmark configurations: name -> (model, language-model tokens).
CONFIGS = {"L8-4k": ("L8", 4096), "L8-8k": ("L8", 8192), "L8-16k": ("L8", 16384), "L8-32k": ("L8", 32768),
           "Q7VL": ("Q7VL", 4096), "M11": ("M11", 4096), "G12": ("G12", 4096)}


# Mixed-length configurations: name -> (model, layout). The same seeded samples (one square image
# of 224 to 896 pixels and 128 to 2,048 text tokens each) train in the same order, MIXED_BATCH a step,
# either as batches padded to their longest sample or packed back to back into one row.
MIXED = {"Q7VL-padded": ("Q7VL", "padded"), "Q7VL-packed": ("Q7VL", "packed")}
MIXED_BATCH = 8
MIXED_GRIDS = (16, 32, 48, 64)  # patches a side (14 pixels each); 4 patches make one token
MIXED_TEXT = (128, 2048)


def tokens_of(config_name: str, tiny: bool) -> int:
    """The language-model tokens a configuration runs (1/64 of them when tiny)."""
    tokens = CONFIGS[config_name][1]
    return tokens // TINY_SHRINK if tiny else tokens


def model_of(config_name: str) -> str:
    """The model a configuration runs, fixed-length or mixed."""
    return (CONFIGS.get(config_name) or MIXED[config_name])[0]


def mixed_batch_size(tiny: bool) -> int:
    """Samples a step of a mixed configuration (half as many when tiny)."""
    return MIXED_BATCH // 2 if tiny else MIXED_BATCH


def build(model: Model, dtype: torch.dtype) -> torch.nn.Module:
    """``model`` with seeded random weights, built directly on the benchmark device, in train mode.

    Scalar gates (Mllama's cross-attention and vision gates, zero-initialised, so the image would not
    reach the text at all) are set to 0.5 as trained ones are non-zero. Tied output heads (G12's) are
    tied again: the skipped initialisation is also what ties them, so the head would otherwise be a
    second random matrix (1 B more parameters at Gemma's vocabulary, and not the model Unsloth loads
    from the saved folder, which stores the embedding alone); it takes the embedding's weights.
    """
    built = patch_gpu.build(model.spec, dtype, seed=SEED, fast_init=True)
    built.tie_weights()  # as the skipped init_weights would (a no-op where the config ties nothing)
    with torch.no_grad():
        for param in built.parameters():
            if param.numel() == 1:
                param.fill_(0.5)
    built.config.use_cache = False
    return built


def lora_targets(model: Model) -> list[str] | str:
    """PEFT ``target_modules``: the seven projections, in a VLM only inside its language model."""
    if not model.vlm:
        return list(LORA_TARGETS)
    return rf".*language_model.*\.({'|'.join(LORA_TARGETS)})"


# ------------------------------------------------------------------------------------------------
# Inputs (batch 1, built on the CPU with a seeded generator; the worker moves them to the device).


def _qwen_inputs(config, tokens: int, grid: int, seed: int = SEED) -> dict:
    """One ``grid`` x ``grid``-patch image (14 pixels a patch, 2 x 2 patches a token) after 4 text
    tokens, then text up to ``tokens``; labels -100 on the image span."""
    inputs = patch_gpu.image_inputs(config, batch=1, tokens=tokens, seed=seed, grid=grid)
    ids = inputs["input_ids"]
    image = ids == config.image_token_id
    span = image | (ids == config.vision_start_token_id) | (ids == config.vision_end_token_id)
    inputs["labels"] = ids.masked_fill(span, IGNORE)
    from transformers import Qwen2_5_VLForConditionalGeneration

    if "mm_token_type_ids" in inspect.signature(Qwen2_5_VLForConditionalGeneration.forward).parameters:
        inputs["mm_token_type_ids"] = image.int()
    return inputs


def _mllama_inputs(config, tokens: int, tiny: bool) -> dict:
    """One image as 2 x 2 tiles (560 pixels each, 28 when tiny) behind ``<|image|>`` at position 1;
    the text from it on cross-attends to all four tiles. Labels -100 on the first 256 tokens (1/64 of
    that when tiny), the image token included."""
    vision = config.vision_config
    generator = torch.Generator().manual_seed(SEED)
    ids = torch.randint(1, config.text_config.vocab_size, (1, tokens), generator=generator)
    ids[0, 0] = config.text_config.bos_token_id
    ids[0, 1] = config.image_token_index
    labels = ids.clone()
    labels[:, : 256 // TINY_SHRINK if tiny else 256] = IGNORE
    tiles = MLLAMA_TILES[0] * MLLAMA_TILES[1]
    size = vision.image_size
    cross = torch.zeros(1, tokens, 1, vision.max_num_tiles, dtype=torch.long)
    cross[0, 1:, 0, :tiles] = 1
    return {
        "input_ids": ids,
        "labels": labels,
        "pixel_values": torch.randn(1, 1, vision.max_num_tiles, 3, size, size, generator=generator),
        "aspect_ratio_ids": torch.tensor([[MLLAMA_RATIOS.index(list(MLLAMA_TILES)) + 1]]),
        "aspect_ratio_mask": (torch.arange(vision.max_num_tiles) < tiles).long()[None, None, :],
        "cross_attention_mask": cross,
    }


def inputs(model: Model, tokens: int, tiny: bool) -> dict:
    """The batch of one step: random text ids with labels = ids (L8, G12), or an image plus text (VLMs:
    Qwen2.5-VL's a 1024 x 1024 image, 74 x 74 patches or 1,369 tokens, 8 x 8 patches when tiny)."""
    config = model.spec.config()
    if model.name == "Q7VL":
        return _qwen_inputs(config, tokens, grid=8 if tiny else 74)
    if model.name == "M11":
        return _mllama_inputs(config, tokens, tiny)
    return patch_gpu.text_inputs(config.vocab_size, batch=1, tokens=tokens, seed=SEED, ignore_fraction=0.0)


def mixed_samples(model: Model, count: int, tiny: bool) -> list[dict]:
    """``count`` single Qwen2.5-VL samples (batch 1, unpadded) of mixed image sizes and text lengths:
    a grid of ``MIXED_GRIDS`` patches a side and ``MIXED_TEXT`` text tokens, drawn from one seeded
    generator, so sample i is the same whatever ``count`` is (tiny: 4 or 8 patches, 8-48 tokens)."""
    config = model.spec.config()
    merge = config.vision_config.spatial_merge_size
    grids, (shortest, longest) = ((4, 8), (8, 48)) if tiny else (MIXED_GRIDS, MIXED_TEXT)
    generator = torch.Generator().manual_seed(SEED)
    samples = []
    for index in range(count):
        grid = grids[int(torch.randint(len(grids), (1,), generator=generator))]
        text = int(torch.randint(shortest, longest + 1, (1,), generator=generator))
        tokens = 6 + grid * grid // merge**2 + text  # 4 text tokens, the image between its markers, text
        samples.append(_qwen_inputs(config, tokens, grid, seed=SEED + 2 * (index + 1)))
    return samples


_PAD = {"input_ids": 0, "labels": IGNORE, "mm_token_type_ids": 0, "attention_mask": 0}


def padded_batch(samples: list[dict]) -> dict:
    """``samples`` as one batch right-padded to the longest (``attention_mask`` 0 and labels -100 on
    the padding), their images concatenated in order: what a padding collator gives the model."""
    rows = [{**sample, "attention_mask": torch.ones_like(sample["input_ids"])} for sample in samples]
    length = max(row["input_ids"].shape[1] for row in rows)
    batch = {key: torch.cat([torch.nn.functional.pad(row[key], (0, length - row[key].shape[1]), value=fill)
                             for row in rows])
             for key, fill in _PAD.items() if key in rows[0]}
    for key in ("pixel_values", "image_grid_thw"):
        batch[key] = torch.cat([row[key] for row in rows])
    return batch


def packed_row(samples: list[dict], model: Model) -> dict:
    """``samples`` back to back in one row by ``fusetune.train.packing.pack`` (positions restarting
    per sample, no attention mask) with the samples' ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (int32
    cumulative lengths: what a ``fusetune_varlen`` language model reads the samples from; sdpa ignores
    them). ``PackingCollator``'s ``max_length_q`` / ``_k`` are left out: they are ints, which
    ``patch_gpu.to_device`` does not take, and ``fusetune_varlen`` does not need them. The row's
    ``use_cache=False`` is dropped as the training step passes it."""
    from fusetune.train.packing import boundaries, pack

    row = pack(samples, model.spec.config())
    row.pop("use_cache")
    given = boundaries([sample["input_ids"].shape[1] for sample in samples])
    row.update(cu_seq_lens_q=given["cu_seq_lens_q"], cu_seq_lens_k=given["cu_seq_lens_k"])
    return row


def use_packed_attention(built: torch.nn.Module) -> str:
    """Set the language model of a built (sdpa) model to the attention packed rows train with
    (``fusetune.train.packing.use_packed_attention``: ``fusetune_varlen``, or flash attention 2
    where flash_attn is installed); the vision tower keeps sdpa. Returns the implementation."""
    from fusetune.train.packing import use_packed_attention as use

    return use(built)


def step_batches(model: Model, config_name: str, steps: int, tiny: bool,
                 tokens: int | None = None) -> list[tuple[dict, list[int]]]:
    """Every step's batch (on the CPU) with the lengths of the samples in it: the configuration's one
    batch (``tokens`` long when given) every step, or ``steps`` groups of mixed samples padded or packed."""
    if config_name not in MIXED:
        tokens = tokens or tokens_of(config_name, tiny)
        return [(inputs(model, tokens, tiny), [tokens])] * steps
    size = mixed_batch_size(tiny)
    samples = mixed_samples(model, steps * size, tiny)
    groups = [samples[start:start + size] for start in range(0, len(samples), size)]
    collate = padded_batch if MIXED[config_name][1] == "padded" else lambda group: packed_row(group, model)
    return [(collate(group), [sample["input_ids"].shape[1] for sample in group]) for group in groups]


# ------------------------------------------------------------------------------------------------
# Model FLOPs.


def attended_span(tokens: int, window: int | None) -> float:
    """Twice the mean number of keys a query of a causal sequence of ``tokens`` attends to: ``tokens``
    with full attention (the mean is tokens / 2, the approximation flops_per_token has always used),
    and with a sliding window of ``window`` keys shorter than the sequence (transformers'
    ``sliding_window``: query i sees min(i + 1, window) keys, its own included) 2 w - w^2 / tokens,
    the mean w - w^2 / (2 tokens) doubled, which meets ``tokens`` at tokens = w."""
    if window is None or window >= tokens:
        return tokens
    return 2 * window - window * window / tokens


def flops_per_token(model: Model, tokens: int) -> float:
    """Model FLOPs of one training token of the language model, for MFU.

    4 x the language model's matmul parameters (forward 2, backward to the activations 2; the frozen
    weights get no gradient, LoRA's own matmuls and checkpointing's recomputation are not counted;
    q and o are hidden x heads x head_dim, which is not hidden^2 where head_dim is not hidden / heads,
    as in Gemma 3; the output head counts once, tied to the embedding or not: the embedding's lookup
    is no matmul) plus causal self-attention, 6 x heads x head_dim x :func:`attended_span` a layer
    (QK^T and AV over half the context on average, backward twice the forward). A sliding-window
    layer (``layer_types`` "sliding_attention", Gemma 3's local layers) counts only the keys in its
    window: the useful work, although SDPA with the window's mask still computes the whole square,
    so a model with such layers gets a lower MFU than the kernels' actual rate. Not counted: the vision
    tower (frozen, forward only) and Mllama's cross-attention scores over the image tiles, so a VLM's
    MFU is a lower bound.
    """
    text = model.spec.config().get_text_config()
    hidden, heads, layers = text.hidden_size, text.num_attention_heads, text.num_hidden_layers
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim  # q, o; k, v
    per_layer = attention + 3 * hidden * text.intermediate_size
    matmul_params = layers * per_layer + text.vocab_size * hidden
    cross = set(getattr(text, "cross_attention_layers", None) or [])
    kinds = getattr(text, "layer_types", None) or ["full_attention"] * layers
    window = getattr(text, "sliding_window", None)
    spans = sum(attended_span(tokens, window if kind == "sliding_attention" else None)
                for index, kind in enumerate(kinds) if index not in cross)
    return 4 * matmul_params + 6 * heads * head_dim * spans


def step_flops(model: Model, lengths: list[int]) -> float:
    """Model FLOPs of a step over samples of these lengths, each attending within itself (padding,
    which does no useful work, is not counted)."""
    return sum(length * flops_per_token(model, length) for length in lengths)


# ------------------------------------------------------------------------------------------------
# The saved folder Unsloth loads from.


def _special_tokens(config) -> dict[int, str]:
    """{id: token} of the config's special tokens; a pad token at the top text id when it has none."""
    text = config.get_text_config()
    names = {"bos_token_id": "<|bos|>", "eos_token_id": "<|eos|>", "pad_token_id": "<|pad|>",
             "image_token_id": "<|image_pad|>", "image_token_index": "<|image|>",
             "video_token_id": "<|video_pad|>", "vision_start_token_id": "<|vision_start|>",
             "vision_end_token_id": "<|vision_end|>"}
    special: dict[int, str] = {}
    for attribute, token in names.items():
        for source in (config, text):
            value = getattr(source, attribute, None)
            value = value[0] if isinstance(value, list) else value
            if value is not None:
                special.setdefault(value, token)
    if "<|pad|>" not in special.values():
        special[text.vocab_size - 1] = "<|pad|>"
    return special


def tokenizer(config):
    """An offline word-level fast tokenizer as long as the vocabulary (filler tokens ``<tN>``) with
    the model's special tokens at their ids and a pad token distinct from EOS, as Unsloth requires.
    The unknown token is the first filler (``<t0>``; ``<t3>`` for Gemma, whose ids 0-2 are pad, EOS
    and BOS): one outside the vocabulary would be added past its end, beyond the embedding's rows."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = _special_tokens(config)
    size = max(config.get_text_config().vocab_size, max(special) + 1)
    vocab = {special.get(i, f"<t{i}>"): i for i in range(size)}
    unknown = f"<t{min(set(range(size)) - set(special))}>"
    core = Tokenizer(models.WordLevel(vocab, unk_token=unknown))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in special.values()])
    roles = {token: token for token in ("<|bos|>", "<|eos|>", "<|pad|>") if token in special.values()}
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token=unknown, bos_token=roles.get("<|bos|>"),
                                   eos_token=roles.get("<|eos|>"), pad_token="<|pad|>")


def save_folder(model: Model, folder: Path, dtype: torch.dtype) -> Path:
    """Build ``model`` as every other worker does and save it with a tokenizer to ``folder``; a
    ``complete`` marker is written last, so a half-written folder is never taken for a finished one."""
    built = build(model, dtype)
    built.save_pretrained(folder)
    tokenizer(built.config).save_pretrained(folder)
    (folder / "complete").write_text("")
    return folder
