"""The VLM collator on Llama-3.2-Vision (mllama) and llava, with tiny offline processors and models.

Each processor is the real transformers class over an image processor built from its defaults
with a small size and a word-level tokenizer (``demo.word_tokenizer``) that has the model's special
tokens and a chat template in the model's style. The collated batch then goes through a tiny model
of the same family, built from a config, patched by ``fusetune.apply``, for one forward and backward.
"""

from __future__ import annotations

import pytest
import torch

import fusetune
from fusetune.train import demo
from fusetune.train.collator import IGNORE, ChatCollator, response_markers, turn_markers

# Llama 3 style: the template writes <|begin_of_text|> itself; images are one <|image|> token.
MLLAMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|image|>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
MLLAMA_SPECIAL = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|image|>",
    "<|python_tag|>",
    "<|finetune_right_pad_id|>",
    "<unk>",
)
# Llava 1.5 style ("USER: <image>\n... ASSISTANT: ..."), with </s> closing each answer.
LLAVA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% if message['role'] == 'assistant' %}</s>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
# Llava 1.5 as it is often written: no end marker after an answer, the next "USER:" follows it.
LLAVA_OPEN_TEMPLATE = LLAVA_TEMPLATE.replace("</s>", "")
LLAVA_SPECIAL = ("<s>", "</s>", "<image>", "<pad>", "<unk>")
LLAVA_WORDS = (*demo.WORDS, "USER", "ASSISTANT", ":")


def mllama_processor():
    from transformers import MllamaProcessor
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    tokenizer = demo.word_tokenizer(
        MLLAMA_SPECIAL,
        demo.WORDS,
        MLLAMA_TEMPLATE,
        pad_token="<|finetune_right_pad_id|>",
        eos_token="<|eot_id|>",
        bos_token="<|begin_of_text|>",
    )
    images = MllamaImageProcessorPil(size={"height": 56, "width": 56}, max_image_tiles=2)
    return MllamaProcessor(image_processor=images, tokenizer=tokenizer, chat_template=MLLAMA_TEMPLATE)


def llava_processor(template: str = LLAVA_TEMPLATE):
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = demo.word_tokenizer(
        LLAVA_SPECIAL, LLAVA_WORDS, template, pad_token="<pad>", eos_token="</s>", bos_token="<s>"
    )
    images = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    # 28 x 28 pixels in 14-pixel patches: 4 patches + CLS, the CLS dropped ("default") = 4 tokens.
    return LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=template,
    )


def _text_config(tokenizer, **extra) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **extra,
    )


def mllama_model(processor):
    from transformers import AutoConfig, MllamaForConditionalGeneration

    tokenizer = processor.tokenizer
    config = AutoConfig.for_model(
        "mllama",
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_global_layers=1,
            attention_heads=2,
            image_size=56,
            patch_size=14,
            max_num_tiles=2,
            supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]],  # those of max_image_tiles=2
            intermediate_layers_indices=[0],
            vision_output_dim=64,  # hidden_size x (1 + one intermediate layer)
        ),
        text_config=_text_config(tokenizer, cross_attention_layers=[1]),
        image_token_index=processor.image_token_id,
    )
    torch.manual_seed(0)
    return MllamaForConditionalGeneration(config)


def llava_model(processor):
    from transformers import AutoConfig, LlavaForConditionalGeneration

    tokenizer = processor.tokenizer
    config = AutoConfig.for_model(
        "llava",
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        ),
        text_config=dict(model_type="llama", **_text_config(tokenizer)),
        image_token_index=processor.image_token_id,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config)


def _sample(answer: str, size=(56, 56), images: int = 1):
    from PIL import Image

    content = [{"type": "image", "image": Image.new("RGB", size, (200, 0, 0))} for _ in range(images)]
    return {
        "messages": [
            {"role": "user", "content": [*content, {"type": "text", "text": "describe the image ."}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ]
    }


def _learned(processor, batch, row: int) -> list[str]:
    tokens = processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][row])
    return [t for t, label in zip(tokens, batch["labels"][row].tolist(), strict=True) if label != IGNORE]


def _train_step(model, batch) -> float:
    report = fusetune.apply(model)
    assert report.patched["loss"], report
    model.train()
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and 2.0 < loss.item() < 8.0  # about log(vocab) for random weights
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    return loss.item()


def test_mllama_markers_masking_and_tiles():
    processor = mllama_processor()
    assert response_markers(processor) == ("<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>")
    collator = ChatCollator(processor, max_seq_length=64, max_pixels=112 * 112)
    batch = collator([_sample("a red circle ."), _sample("a blue square in the top left .", size=(112, 56))])
    tokens = [processor.tokenizer.convert_ids_to_tokens(row) for row in batch["input_ids"]]
    prompt = [
        "<|begin_of_text|>",  # once: the template writes it, so the processor adds none
        "<|start_header_id|>",
        "user",
        "<|end_header_id|>",
        "\n",
        "\n",
        "<|image|>",
        "describe",
        "the",
        "image",
        ".",
        "<|eot_id|>",
        "<|start_header_id|>",
        "assistant",
        "<|end_header_id|>",
        "\n",
        "\n",
    ]
    assert tokens[0][:17] == prompt and tokens[1][:17] == prompt
    labels = batch["labels"]
    kept = [(labels[row] != IGNORE).nonzero().flatten().tolist() for row in range(2)]
    assert kept[0] == list(range(17, 22))  # "a red circle ." + <|eot_id|>
    assert kept[1] == list(range(17, 26))  # "a blue square in the top left ." + <|eot_id|>
    assert torch.equal(labels[1, 17:26], batch["input_ids"][1, 17:26])
    assert _learned(processor, batch, 0) == ["a", "red", "circle", ".", "<|eot_id|>"]
    # Row 0 is padded on the right to row 1's length: padding masked, attention 0.
    assert batch["input_ids"].shape == (2, 26)
    assert batch["attention_mask"][0, 22:].sum() == 0 and (labels[0, 22:] == IGNORE).all()
    assert tokens[0][22:] == ["<|finetune_right_pad_id|>"] * 4
    # Tiles: the square image takes one 56 x 56 tile, the 2:1 one two (aspect ratio ids 1 and 2).
    assert batch["pixel_values"].shape == (2, 1, 2, 3, 56, 56)
    assert batch["aspect_ratio_ids"].tolist() == [[1], [2]]
    assert batch["aspect_ratio_mask"].tolist() == [[[1, 0]], [[1, 1]]]
    # Text attends to the image from its <|image|> token on, over the image's tiles only.
    cross = batch["cross_attention_mask"]
    assert cross.shape == (2, 26, 1, 2)
    assert cross[0, :6].sum() == 0 and (cross[0, 6:, 0, 0] == 1).all() and cross[0, :, 0, 1].sum() == 0
    assert (cross[1, 6:, 0] == 1).all()


def test_mllama_several_images_and_cut():
    processor = mllama_processor()
    collator = ChatCollator(processor, max_seq_length=64, max_pixels=112 * 112)
    batch = collator([_sample("a red circle .", images=2), _sample("a square .", size=(40, 90))])
    assert batch["pixel_values"].shape[:3] == (2, 2, 2)  # padded to 2 images of up to 2 tiles
    assert batch["cross_attention_mask"].shape[2] == 2
    image = processor.image_token_id
    assert (batch["input_ids"] == image).sum(1).tolist() == [2, 1]
    assert (batch["labels"][batch["input_ids"] == image] == IGNORE).all()
    assert _learned(processor, batch, 1) == ["a", "square", ".", "<|eot_id|>"]
    short = ChatCollator(processor, max_seq_length=20, max_pixels=112 * 112)(
        [_sample("a red circle in the top left .")]
    )
    assert short["input_ids"].shape[1] == short["cross_attention_mask"].shape[1] == 20
    assert (short["labels"][0] != IGNORE).nonzero().flatten().tolist() == [17, 18, 19]


def test_mllama_batch_trains_a_tiny_model():
    processor = mllama_processor()
    collator = ChatCollator(processor, max_seq_length=64, max_pixels=112 * 112)
    batch = collator([_sample("a red circle ."), _sample("a blue square .", size=(112, 56))])
    _train_step(mllama_model(processor), batch)


def test_llava_markers_image_tokens_and_masking():
    processor = llava_processor()
    assert response_markers(processor) == ("ASSISTANT:", "</s>")
    collator = ChatCollator(processor, max_seq_length=64, max_pixels=112 * 112)
    batch = collator([_sample("a red circle ."), _sample("a blue square in the top left .", size=(112, 56))])
    tokens = [processor.tokenizer.convert_ids_to_tokens(row) for row in batch["input_ids"]]
    prompt = ["USER", ":", *["<image>"] * 4, "\n", "describe", "the", "image", ".", "ASSISTANT", ":"]
    assert tokens[0][:13] == prompt and tokens[1][:13] == prompt
    assert batch["pixel_values"].shape == (2, 3, 28, 28)  # both images resized and cropped alike
    labels = batch["labels"]
    assert (labels[0] != IGNORE).nonzero().flatten().tolist() == list(range(13, 18))
    assert (labels[1] != IGNORE).nonzero().flatten().tolist() == list(range(13, 22))
    assert _learned(processor, batch, 0) == ["a", "red", "circle", ".", "</s>"]
    assert batch["input_ids"].shape == (2, 22)
    assert tokens[0][18:] == ["<pad>"] * 4 and batch["attention_mask"][0, 18:].sum() == 0
    assert (labels[0, 18:] == IGNORE).all()
    assert (labels[batch["input_ids"] == processor.image_token_id] == IGNORE).all()


def test_llava_batch_trains_a_tiny_model():
    processor = llava_processor()
    collator = ChatCollator(processor, max_seq_length=64, max_pixels=112 * 112)
    batch = collator([_sample("a red circle ."), _sample("a blue square .", size=(112, 56), images=2)])
    assert (batch["input_ids"] == processor.image_token_id).sum(1).tolist() == [4, 8]
    _train_step(llava_model(processor), batch)


@pytest.mark.parametrize("build", [mllama_processor, llava_processor])
def test_generation_prompt(build):
    processor = build()
    collator = ChatCollator(processor, max_seq_length=64, max_pixels=112 * 112)
    inputs, truth = collator.prompt(_sample("a red circle ."))
    assert truth == "a red circle ." and "pixel_values" in inputs
    ids = inputs["input_ids"][0].tolist()
    header = collator.header_ids + collator.header_tail_ids
    assert ids[-len(header) :] == header  # ends on the assistant header
    assert ids.count(processor.tokenizer.bos_token_id) <= 1


def _two_turns(first: str, second: str) -> dict:
    sample = _sample(first)
    sample["messages"] += [
        {"role": "user", "content": [{"type": "text", "text": "what is the shape ?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": second}]},
    ]
    return sample


def test_llava_without_end_marker_markers():
    processor = llava_processor(LLAVA_OPEN_TEMPLATE)
    markers = turn_markers(processor)
    assert (markers.header, markers.end, markers.closed, markers.next_header) == (
        "ASSISTANT:",
        "</s>",  # the EOS token, which the template does not write: the collator appends it
        False,
        "USER:",
    )
    assert turn_markers(llava_processor()).closed  # the template with </s> closes its answers itself
    assert ChatCollator(llava_processor(), 64).append_eos is False


def test_llava_without_end_marker_single_turn_learns_to_stop():
    processor = llava_processor(LLAVA_OPEN_TEMPLATE)
    collator = ChatCollator(processor, max_seq_length=64, max_pixels=112 * 112)
    assert collator.append_eos
    batch = collator([_sample("a red circle ."), _sample("a blue square in the top left .")])
    tokens = [processor.tokenizer.convert_ids_to_tokens(row) for row in batch["input_ids"]]
    prompt = ["USER", ":", *["<image>"] * 4, "\n", "describe", "the", "image", ".", "ASSISTANT", ":"]
    assert tokens[0][:18] == [*prompt, "a", "red", "circle", ".", "</s>"]
    labels = batch["labels"]
    assert (labels[0] != IGNORE).nonzero().flatten().tolist() == list(range(13, 18))  # answer + </s>
    assert (labels[1] != IGNORE).nonzero().flatten().tolist() == list(range(13, 22))
    assert _learned(processor, batch, 0) == ["a", "red", "circle", ".", "</s>"]
    assert torch.equal(labels[1, 13:22], batch["input_ids"][1, 13:22])
    assert tokens[0][18:] == ["<pad>"] * 4 and (labels[0, 18:] == IGNORE).all()


def test_llava_without_end_marker_two_turns():
    processor = llava_processor(LLAVA_OPEN_TEMPLATE)
    collator = ChatCollator(processor, max_seq_length=64, max_pixels=112 * 112)
    batch = collator([_two_turns("a red circle .", "a circle ."), _sample("a blue square .")])
    tokens = processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][0])
    assert tokens[13:] == [
        *["a", "red", "circle", ".", "</s>"],  # 13-17: first answer + EOS
        *["USER", ":", "what", "is", "the", "shape", "?"],  # 18-24: the second user turn
        *["ASSISTANT", ":"],  # 25-26
        *["a", "circle", ".", "</s>"],  # 27-30: second answer + EOS
    ]
    labels = batch["labels"]
    kept = (labels[0] != IGNORE).nonzero().flatten().tolist()
    assert kept == [13, 14, 15, 16, 17, 27, 28, 29, 30]
    assert (labels[0, 18:27] == IGNORE).all()  # the second user turn and its header are not learned
    assert _learned(processor, batch, 0) == ["a", "red", "circle", ".", "</s>", "a", "circle", ".", "</s>"]
    assert (labels[1] != IGNORE).nonzero().flatten().tolist() == list(range(13, 18))  # answer + </s>
    assert (labels[1, 18:] == IGNORE).all()  # padding
    # Without the appended EOS (text rendered by the template alone), a span still stops at "USER:".
    text = processor.apply_chat_template(
        [
            {"role": "user", "content": [{"type": "text", "text": "describe the image ."}]},
            {"role": "assistant", "content": [{"type": "text", "text": "a red circle ."}]},
            {"role": "user", "content": [{"type": "text", "text": "what is the shape ?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "a circle ."}]},
        ],
        tokenize=False,
    )
    ids = processor.tokenizer([text], return_tensors="pt", add_special_tokens=False)["input_ids"]
    raw = collator.mask(ids, torch.ones_like(ids))
    learned = processor.tokenizer.convert_ids_to_tokens(ids[0][raw[0] != IGNORE])
    assert learned == ["a", "red", "circle", ".", "a", "circle", "."]


def test_llava_without_end_marker_generation_prompt():
    processor = llava_processor(LLAVA_OPEN_TEMPLATE)
    collator = ChatCollator(processor, max_seq_length=64, max_pixels=112 * 112)
    inputs, truth = collator.prompt(_two_turns("a red circle .", "a circle ."))
    assert truth == "a circle ."
    tokens = processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])
    # Earlier answers end in EOS as in training; the prompt ends on the assistant header.
    assert tokens[13:] == [
        *["a", "red", "circle", ".", "</s>"],
        *["USER", ":", "what", "is", "the", "shape", "?"],
        *["ASSISTANT", ":"],
    ]


def test_llava_without_end_marker_trains_a_tiny_model():
    processor = llava_processor(LLAVA_OPEN_TEMPLATE)
    collator = ChatCollator(processor, max_seq_length=64, max_pixels=112 * 112)
    batch = collator([_two_turns("a red circle .", "a circle ."), _sample("a blue square .")])
    _train_step(llava_model(processor), batch)


@pytest.mark.parametrize("build", [mllama_processor, llava_processor])
def test_check_lengths_agrees_with_the_cut(build):
    """Mllama keeps one <|image|> token an image, llava expands <image> by the image's size: the up-front
    check from token counts reaches the collator's verdict on each sample, images in later turns too."""
    from PIL import Image

    from tests.train.test_collator import cut_verdict

    second = _two_turns("a red circle .", "a circle .")
    second["messages"][2]["content"].insert(0, {"type": "image", "image": Image.new("RGB", (90, 40))})
    samples = [_sample("a red circle .", images=2), _sample("a square .", size=(40, 90)), second]
    seen = set()
    for length in range(2, 60):
        collator = ChatCollator(build(), max_seq_length=length, max_pixels=112 * 112)
        for sample in samples:
            expected = cut_verdict(collator, sample)
            assert cut_verdict(collator.check_lengths, sample) == expected, (length, sample)
            seen.add(expected)
    assert seen == {None, "image", "answer"}
