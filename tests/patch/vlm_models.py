"""Tiny random-weight vision-language models, and batches shaped as each one's processor makes them.

Every model has a one- or two-layer language model (hidden 64) and a one-layer vision tower
(hidden 32) on images of 28 to 64 pixels, so a forward and backward take well under a second on
CPU. The batches are built by hand: ``input_ids`` with the right number of image placeholder tokens
(and the begin / end tokens around them where the model uses them), the pixel tensors in the layout
the model's image processor produces, and any side inputs (``image_grid_thw``, ``mm_token_type_ids``,
``token_type_ids``, aspect-ratio ids and masks, cross-attention masks). Labels copy the ids with the
image tokens and a few text positions set to -100.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForImageTextToText

VOCAB = 160
TEXT_TOKENS = 140  # text token ids are drawn from [1, TEXT_TOKENS); the rest are special tokens
IMAGE, VIDEO, BEGIN, END = 150, 151, 152, 153  # placeholder and begin / end-of-image token ids

_TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
# Qwen's multimodal rotary embedding splits the head's 8 frequencies over (time, height, width).
_MROPE = dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3])
_QWEN_TOKENS = dict(
    image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=BEGIN, vision_end_token_id=END
)


@dataclass(frozen=True)
class VLM:
    """How to build one tiny VLM: its config (``model_type`` and keyword arguments) and batch builder."""

    model_type: str
    config: dict
    batch: Callable[[int], dict[str, torch.Tensor]]
    # Which submodule names hold the vision tower and the language model (for the report checks).
    vision: str
    language: str


def _text_ids(generator: torch.Generator, length: int) -> torch.Tensor:
    return torch.randint(1, TEXT_TOKENS, (length,), generator=generator)


def _labels(ids: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
    """``ids`` with the image tokens, the first two positions and row 1's last position at -100."""
    labels = ids.masked_fill(image_tokens, -100)
    labels[:, :2] = -100
    labels[-1, -1] = -100
    return labels


def _sequence(generator: torch.Generator, image_tokens: int, before: int, after: int, wrap: bool):
    """Text, [BEGIN], ``image_tokens`` placeholders, [END], text."""
    parts = [_text_ids(generator, before)]
    parts += [torch.tensor([BEGIN])] if wrap else []
    parts += [torch.full((image_tokens,), IMAGE)]
    parts += [torch.tensor([END])] if wrap else []
    parts += [_text_ids(generator, after)]
    return torch.cat(parts)


def _qwen_batch(patch: int, grids: tuple[tuple[int, int, int], ...]) -> Callable[[int], dict]:
    """Qwen2-VL / 2.5-VL / 3-VL: flattened patches ``(sum t*h*w, 3 * 2 * patch * patch)``, one image a row.

    Each row's image ``(t, h, w)`` (in patches) becomes ``t*h*w / 4`` placeholder tokens (2x2 merge);
    rows are padded on the left (with attention_mask 0) to one length.
    """

    def build(seed: int = 0) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        rows = [_sequence(generator, t * h * w // 4, 3, 5 + i, True) for i, (t, h, w) in enumerate(grids)]
        length = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), length, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, length - len(row):] = row
            mask[i, length - len(row):] = 1
        patches = sum(t * h * w for t, h, w in grids)
        pixels = torch.randn(patches, 3 * 2 * patch * patch, generator=generator)
        image_tokens = ids == IMAGE
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "pixel_values": pixels,
            "image_grid_thw": torch.tensor(grids),
            "mm_token_type_ids": image_tokens.int(),
            "labels": _labels(ids, image_tokens),
        }

    return build


def _llava_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Llava: ``(batch, 3, 28, 28)`` CLIP pixels; 4 patches (the CLS feature dropped) = 4 placeholders."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.stack([_sequence(generator, 4, 2 + i, 8 - i, wrap=False) for i in range(2)])
    image_tokens = ids == IMAGE
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(2, 3, 28, 28, generator=generator),
        "labels": _labels(ids, image_tokens),
    }


def _gemma3_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Gemma 3: ``(batch, 3, 56, 56)`` SigLIP pixels pooled to 4 placeholders, between BOI and EOI.

    ``token_type_ids`` marks the image tokens (1), which attend to each other bidirectionally.
    """
    generator = torch.Generator().manual_seed(seed)
    ids = torch.stack([_sequence(generator, 4, 2 + i, 7 - i, wrap=True) for i in range(2)])
    image_tokens = ids == IMAGE
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(2, 3, 56, 56, generator=generator),
        "token_type_ids": image_tokens.long(),
        "labels": _labels(ids, image_tokens),
    }


def _smolvlm_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """SmolVLM: ``(batch, images, 3, 56, 56)`` pixels; 16 patches pixel-shuffled (x2) to 4 placeholders."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.stack([_sequence(generator, 4, 2 + i, 7 - i, wrap=True) for i in range(2)])
    image_tokens = ids == IMAGE
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(2, 1, 3, 56, 56, generator=generator),
        "pixel_attention_mask": torch.ones(2, 1, 56, 56, dtype=torch.bool),
        "labels": _labels(ids, image_tokens),
    }


def _mllama_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Mllama: ``(batch, images, tiles, 3, 28, 28)`` pixels, one image a row (row 0: 1 tile, row 1: 2).

    One ``<|image|>`` token per image; the text after it cross-attends to the image's tiles
    (``cross_attention_mask`` ``(batch, seq, images, tiles)``, as the processor builds it).
    """
    generator = torch.Generator().manual_seed(seed)
    ids = torch.stack([_sequence(generator, 1, 1, 10, wrap=False) for _ in range(2)])
    image_tokens = ids == IMAGE
    tiles = torch.tensor([1, 2])
    cross = torch.zeros(2, ids.shape[1], 1, 2, dtype=torch.long)
    for row in range(2):
        start = int(image_tokens[row].nonzero()[0])
        cross[row, start:, 0, : tiles[row]] = 1
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(2, 1, 2, 3, 28, 28, generator=generator),
        "aspect_ratio_ids": torch.tensor([[1], [2]]),  # 1: (1, 1); 2: (1, 2) in supported_aspect_ratios
        "aspect_ratio_mask": (torch.arange(2) < tiles[:, None]).long()[:, None, :],
        "cross_attention_mask": cross,
        "labels": _labels(ids, image_tokens),
    }


VLMS = {
    "qwen2_vl": VLM(
        "qwen2_vl",
        dict(
            text_config=dict(_TEXT, rope_parameters=_MROPE),
            vision_config=dict(
                depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14
            ),
            **_QWEN_TOKENS,
        ),
        _qwen_batch(14, ((1, 4, 4), (1, 2, 2))),
        vision="model.visual",
        language="model.language_model",
    ),
    "qwen2_5_vl": VLM(
        "qwen2_5_vl",
        dict(
            text_config=dict(_TEXT, rope_parameters=_MROPE),
            vision_config=dict(
                depth=2, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=14, out_hidden_size=64,
                window_size=56, fullatt_block_indexes=[1],
            ),
            **_QWEN_TOKENS,
        ),
        _qwen_batch(14, ((1, 4, 4), (1, 2, 2))),
        vision="model.visual",
        language="model.language_model",
    ),
    "qwen3_vl": VLM(
        "qwen3_vl",
        dict(
            text_config=dict(_TEXT, head_dim=16, rope_parameters=dict(_MROPE, mrope_interleaved=True)),
            vision_config=dict(
                depth=1, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=16, out_hidden_size=64,
                num_position_embeddings=16, deepstack_visual_indexes=[0],
            ),
            **_QWEN_TOKENS,
        ),
        _qwen_batch(16, ((1, 4, 4), (1, 2, 2))),
        vision="model.visual",
        language="model.language_model",
    ),
    "llava": VLM(
        "llava",
        dict(
            text_config=dict(_TEXT, model_type="llama"),
            vision_config=dict(
                model_type="clip_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                num_attention_heads=2, image_size=28, patch_size=14, projection_dim=32,
            ),
            image_token_index=IMAGE,
            image_seq_length=4,
            vision_feature_layer=-1,
        ),
        _llava_batch,
        vision="model.vision_tower",
        language="model.language_model",
    ),
    "gemma3": VLM(
        "gemma3",
        dict(
            text_config=dict(
                _TEXT, num_attention_heads=2, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
                sliding_window=8, num_hidden_layers=2,
                layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=0.2,
            ),
            vision_config=dict(
                hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                image_size=56, patch_size=14, vision_use_head=False,
            ),
            mm_tokens_per_image=4,
            image_token_index=IMAGE,
            boi_token_index=BEGIN,
            eoi_token_index=END,
        ),
        _gemma3_batch,
        vision="model.vision_tower",
        language="model.language_model",
    ),
    "smolvlm": VLM(
        "smolvlm",
        dict(
            text_config=dict(_TEXT, model_type="llama"),
            vision_config=dict(
                hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                image_size=56, patch_size=14,
            ),
            scale_factor=2,
            image_token_id=IMAGE,
            pad_token_id=0,
        ),
        _smolvlm_batch,
        vision="model.vision_model",
        language="model.text_model",
    ),
    "mllama": VLM(
        "mllama",
        dict(
            text_config=dict(_TEXT, num_hidden_layers=2, cross_attention_layers=[1], pad_token_id=0),
            vision_config=dict(
                hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_global_layers=1,
                attention_heads=2, image_size=28, patch_size=14, max_num_tiles=2,
                intermediate_layers_indices=[0], vision_output_dim=64,
                supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]],
            ),
            image_token_index=IMAGE,
        ),
        _mllama_batch,
        vision="model.vision_model",
        language="model.language_model",
    ),
}


def tiny_vlm(arch: str, attn: str = "eager", seed: int = 0, **overrides) -> torch.nn.Module:
    """A float32 ``*ForConditionalGeneration`` of ``arch`` with random weights, in training mode."""
    spec = VLMS[arch]
    config = AutoConfig.for_model(spec.model_type, **{**spec.config, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, attn_implementation=attn)
    return model.train()


def vlm_batch(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    return VLMS[arch].batch(seed)



def split_rows(inputs: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """One batch of one row for each row of ``inputs`` (its padding kept): concatenated along dim 0
    they give ``inputs`` back. Qwen's flattened patches are cut at each row's ``t*h*w``; every
    other tensor has the batch first."""
    rows = []
    for row in range(inputs["input_ids"].shape[0]):
        one = {key: value[row : row + 1] for key, value in inputs.items()}
        if "image_grid_thw" in inputs:
            sizes = inputs["image_grid_thw"].prod(-1).tolist()
            start = sum(sizes[:row])
            one["pixel_values"] = inputs["pixel_values"][start : start + sizes[row]]
        rows.append(one)
    return rows


def vlm_prompt(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Row 0 of ``vlm_batch`` (its image included) as a ``generate`` prompt: no labels. Row 0 is the
    longest, so it carries no padding."""
    prompt = split_rows(vlm_batch(arch, seed))[0]
    del prompt["labels"]
    assert bool(prompt["attention_mask"].all())
    return prompt
