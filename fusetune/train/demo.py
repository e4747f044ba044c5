"""The offline demo: a tiny Qwen2-VL built from a config, its tokenizer and processor, and a
synthetic image -> caption data set (coloured shapes on plain backgrounds).

Nothing here downloads anything. The tokenizer is a word-level ``tokenizers`` model over the demo
vocabulary plus Qwen2-VL's special tokens, wrapped as a ``PreTrainedTokenizerFast`` with a ChatML
chat template like Qwen2-VL's; the processor is Qwen2-VL's (its image processor built from defaults
with the demo's pixel budget). The model weights are random, drawn from a fixed seed, so the same
base model comes back every time (a saved adapter always finds its base).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 210, 20),
    "purple": (140, 40, 170),
}
BACKGROUNDS = {"white": (245, 245, 245), "gray": (128, 128, 128), "black": (15, 15, 15)}
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
PROMPT = "describe the image ."
IMAGE_SIZE = 56  # 4 x 4 patches of 14 pixels = 4 image tokens after Qwen2-VL's 2 x 2 merge
MODEL_SEED = 1234
# Weights drawn with std ~ 1/sqrt(hidden) rather than transformers' 0.02: at 0.02 a 128-wide random
# network's attention scores are all near zero, so every head averages uniformly and only the
# image's mean colour gets through. Wider random weights keep where things are in the image.
INIT_STD = 0.08

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<unk>",
)
WORDS = (
    "system",
    "user",
    "assistant",
    "you",
    "are",
    "a",
    "an",
    "the",
    "describe",
    "image",
    "picture",
    "what",
    "is",
    "in",
    "on",
    "of",
    "and",
    "with",
    "at",
    ".",
    ",",
    "?",
    "top",
    "bottom",
    "left",
    "right",
    "center",
    "middle",
    "background",
    "shape",
    *SHAPES,
    *COLOURS,
    *BACKGROUNDS,
)

# ChatML as Qwen2-VL writes it (no default system prompt): images become
# <|vision_start|><|image_pad|><|vision_end|>, which the processor expands to one pad per token.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def caption(shape: str, colour: str, position: str, background: str) -> str:
    return f"a {colour} {shape} in the {position} on a {background} background ."


def word_tokenizer(
    special_tokens,
    words,
    chat_template: str,
    *,
    pad_token: str,
    eos_token: str,
    unk_token: str = "<unk>",
    bos_token: str | None = None,
):
    """An offline word-level ``PreTrainedTokenizerFast``: ``special_tokens`` (matched whole, never
    split), ``"\\n"`` and ``words`` (split on whitespace, punctuation isolated), with ``chat_template``.

    Small stand-ins for real models' tokenizers in the demo and the tests: token ids are the order
    of ``special_tokens``, then ``"\\n"``, then ``words``.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special_tokens = tuple(dict.fromkeys(special_tokens))
    vocab = {token: i for i, token in enumerate(dict.fromkeys((*special_tokens, "\n", *words)))}
    core = Tokenizer(models.WordLevel(vocab, unk_token=unk_token))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")]
    )
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    core.add_tokens([AddedToken("\n", normalized=False)])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token=unk_token,
        pad_token=pad_token,
        eos_token=eos_token,
        bos_token=bos_token,
        chat_template=chat_template,
        model_max_length=4096,
        padding_side="right",
    )


def build_tokenizer():
    """A word-level fast tokenizer over the demo vocabulary, with Qwen2-VL's special tokens."""
    return word_tokenizer(
        SPECIAL_TOKENS, WORDS, CHAT_TEMPLATE, pad_token="<|endoftext|>", eos_token="<|im_end|>"
    )


def _processor_class():
    from transformers import Qwen2VLProcessor

    class DemoQwen2VLProcessor(Qwen2VLProcessor):
        """Qwen2-VL's processor without the video processor (which needs torchvision): images only."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return DemoQwen2VLProcessor


def build_processor(max_pixels: int = IMAGE_SIZE * IMAGE_SIZE):
    """Qwen2-VL's processor over the demo tokenizer, its image processor built from defaults."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image_processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=max(max_pixels, 28 * 28))
    return _processor_class()(
        image_processor=image_processor, tokenizer=build_tokenizer(), chat_template=CHAT_TEMPLATE
    )


def model_config(tokenizer):
    """A tiny Qwen2-VL config: 2 text layers (hidden 128), 2 vision blocks (hidden 64)."""
    from transformers import AutoConfig

    ids = tokenizer.convert_tokens_to_ids
    return AutoConfig.for_model(
        "qwen2_vl",
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[4, 6, 6]),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=None,
            tie_word_embeddings=False,
            initializer_range=INIT_STD,
        ),
        vision_config=dict(
            depth=2,
            embed_dim=64,
            hidden_size=128,
            num_heads=4,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def build_model(tokenizer, dtype=None):
    """The demo Qwen2VLForConditionalGeneration, random weights from a fixed seed."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    config = model_config(tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(MODEL_SEED)
        model = Qwen2VLForConditionalGeneration(config)
        # A wider output head than the 0.02 initialiser gives: with the head frozen (LoRA trains the
        # layers below it), logits of std-0.02 rows after the final norm stay within about +-3, too
        # flat for confident answers. Pretrained heads have no such limit.
        torch.nn.init.normal_(model.lm_head.weight, std=0.1)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    if dtype is not None:
        _cast_parameters(model, dtype)
    return model


def _cast_parameters(model, dtype) -> None:
    """``model``'s parameters to ``dtype``, its buffers as they are: the rotary frequencies stay in
    float32, as ``from_pretrained(dtype=...)`` keeps them (a ``model.to(dtype)`` alone would round
    them, and the run would train against other frequencies than its saved model loads with)."""
    buffers = [(module, name, value) for module in model.modules() for name, value in module._buffers.items()]
    model.to(dtype)
    for module, name, buffer in buffers:
        module._buffers[name] = buffer


def draw(shape: str, colour: str, position: str, background: str, rng: random.Random, size: int = IMAGE_SIZE):
    """One PIL image: ``shape`` in ``colour`` inside the ``position`` quadrant of a plain background."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), BACKGROUNDS[background])
    pen = ImageDraw.Draw(image)
    half = size // 2
    extent = rng.randint(int(half * 0.7), int(half * 0.8))
    row, col = position.split()
    x0 = (half if col == "right" else 0) + rng.randint(1, half - extent - 1)
    y0 = (half if row == "bottom" else 0) + rng.randint(1, half - extent - 1)
    box = (x0, y0, x0 + extent, y0 + extent)
    fill = COLOURS[colour]
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    else:
        pen.polygon([(x0 + extent / 2, y0), (x0, y0 + extent), (x0 + extent, y0 + extent)], fill=fill)
    return image


def samples(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` chat samples ``{"messages": [user: image + prompt, assistant: caption]}`` with PIL images."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        position, background = rng.choice(POSITIONS), rng.choice(list(BACKGROUNDS))
        image = draw(shape, colour, position, background, rng)
        out.append(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image", "image": image}, {"type": "text", "text": PROMPT}],
                    },
                    {
                        "role": "assistant",
                        "content": [{"type": "text", "text": caption(shape, colour, position, background)}],
                    },
                ]
            }
        )
    return out


def write_dataset(folder: str | Path, n: int, seed: int = 0) -> Path:
    """Write ``n`` demo samples as a folder of PNGs plus ``data.jsonl`` (image paths relative to it)."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, sample in enumerate(samples(n, seed)):
        user, answer = sample["messages"]
        image = user["content"][0]["image"]
        name = f"images/{i:05d}.png"
        image.save(folder / name)
        user = {"role": "user", "content": [{"type": "image", "image": name}, user["content"][1]]}
        lines.append(json.dumps({"messages": [user, answer]}))
    path = folder / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
