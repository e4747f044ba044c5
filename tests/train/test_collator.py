"""The VLM collator on the Qwen2-VL family: label masking at exact positions, images, padding."""

from __future__ import annotations

import pytest
import torch

from fusetune.train import demo
from fusetune.train.collator import IGNORE, ChatCollator, response_markers
from fusetune.train.errors import FusetuneError


def _sample(answer: str, size=(56, 56), colour=(200, 0, 0), system: str | None = None, source="s"):
    from PIL import Image

    messages = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
    messages += [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": Image.new("RGB", size, colour)},
                {"type": "text", "text": "describe the image ."},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]
    return {"messages": messages, "_source": source}


def test_markers_read_off_the_chat_template(demo_processor):
    assert response_markers(demo_processor) == ("<|im_start|>assistant\n", "<|im_end|>")


def test_labels_only_on_the_answer_exact_positions(demo_processor):
    collator = ChatCollator(demo_processor, max_seq_length=64, max_pixels=56 * 56)
    batch = collator([_sample("a red circle in the top left ."), _sample("a blue square .")])
    tokens = [demo_processor.tokenizer.convert_ids_to_tokens(row) for row in batch["input_ids"]]
    # <|im_start|> user \n <|vision_start|> 4 x <|image_pad|> <|vision_end|>
    # describe the image . <|im_end|> \n
    # <|im_start|> assistant \n | answer ... <|im_end|> | \n (padding)
    assert tokens[0][:18] == [
        "<|im_start|>",
        "user",
        "\n",
        "<|vision_start|>",
        *["<|image_pad|>"] * 4,
        "<|vision_end|>",
        "describe",
        "the",
        "image",
        ".",
        "<|im_end|>",
        "\n",
        "<|im_start|>",
        "assistant",
        "\n",
    ]
    labels = batch["labels"]
    kept = [(labels[row] != IGNORE).nonzero().flatten().tolist() for row in range(2)]
    assert kept[0] == list(range(18, 27))  # "a red circle in the top left ." + <|im_end|>
    assert kept[1] == list(range(18, 23))  # "a blue square ." + <|im_end|>
    assert tokens[0][26] == "<|im_end|>" and tokens[1][22] == "<|im_end|>"
    assert torch.equal(labels[0, 18:27], batch["input_ids"][0, 18:27])
    # Row 1 is padded on the right: its padding is masked and has attention 0.
    assert batch["attention_mask"][1, 24:].sum() == 0 and (labels[1, 24:] == IGNORE).all()
    image = demo_processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert (labels[batch["input_ids"] == image] == IGNORE).all()


def test_system_turn_and_several_answers(demo_processor):
    collator = ChatCollator(demo_processor, max_seq_length=128, max_pixels=56 * 56)
    sample = _sample("a red circle .", system="you are a picture describe")
    sample["messages"] += [
        {"role": "user", "content": [{"type": "text", "text": "what is the shape ?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a circle ."}]},
    ]
    batch = collator([sample])
    tokens = demo_processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][0])
    learned = [t for t, label in zip(tokens, batch["labels"][0].tolist(), strict=True) if label != IGNORE]
    assert learned == ["a", "red", "circle", ".", "<|im_end|>", "a", "circle", ".", "<|im_end|>"]


def test_images_of_different_sizes_batch_together():
    processor = demo.build_processor(max_pixels=112 * 112)
    collator = ChatCollator(processor, max_seq_length=256, max_pixels=112 * 112)
    batch = collator(
        [
            _sample("a red square .", size=(56, 56)),
            _sample("a big one .", size=(112, 84)),
            _sample("a huge one .", size=(900, 900)),
        ]
    )
    grids = batch["image_grid_thw"].tolist()
    assert grids[0] == [1, 4, 4] and grids[1] == [1, 6, 8]
    t, h, w = grids[2]
    assert h * w * 14 * 14 <= 112 * 112  # the 900 x 900 image came down under max_pixels
    assert batch["pixel_values"].shape[0] == sum(a * b * c for a, b, c in grids)
    image = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    counts = (batch["input_ids"] == image).sum(1).tolist()
    assert counts == [a * b * c // 4 for a, b, c in grids]
    assert (batch["labels"][batch["input_ids"] == image] == IGNORE).all()
    for row in range(3):
        assert (batch["labels"][row] != IGNORE).any()


def test_all_masked_sample_is_an_error(demo_processor):
    collator = ChatCollator(demo_processor, max_seq_length=18, max_pixels=56 * 56)
    with pytest.raises(FusetuneError, match="every label is masked after cutting to max_seq_length=18"):
        collator([_sample("a red circle .", source="data.jsonl line 3")])
    short = ChatCollator(demo_processor, max_seq_length=6, max_pixels=56 * 56)
    with pytest.raises(FusetuneError, match="inside its image tokens"):
        short([_sample("a red circle .")])


def test_cut_keeps_the_start(demo_processor):
    collator = ChatCollator(demo_processor, max_seq_length=21, max_pixels=56 * 56)
    batch = collator([_sample("a red circle in the top left .")])
    assert batch["input_ids"].shape[1] == 21 and batch["labels"].shape[1] == 21
    assert (batch["labels"][0] != IGNORE).nonzero().flatten().tolist() == [18, 19, 20]


def test_missing_and_unreadable_images(tmp_path, demo_processor):
    collator = ChatCollator(demo_processor, max_seq_length=64, max_pixels=56 * 56)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    sample = _sample("a red circle .", source="data.jsonl line 2")
    sample["messages"][0]["content"][0]["image"] = str(broken)
    with pytest.raises(FusetuneError, match="data.jsonl line 2: image .*broken.png.* cannot be read"):
        collator([sample])
    sample["messages"][0]["content"][0]["image"] = str(tmp_path / "gone.png")
    with pytest.raises(FusetuneError, match="gone.png' is missing"):
        collator([sample])


def test_generation_prompt(demo_processor):
    collator = ChatCollator(demo_processor, max_seq_length=64, max_pixels=56 * 56)
    inputs, truth = collator.prompt(_sample("a red circle ."))
    tokens = demo_processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])
    assert tokens[-3:] == ["<|im_start|>", "assistant", "\n"] and truth == "a red circle ."
    assert "image_grid_thw" in inputs


def cut_verdict(call, sample) -> str | None:
    """How ``call([sample])`` ends: None (it passes), or the cut it stops on."""
    try:
        call([sample])
    except FusetuneError as error:
        return "image" if "inside its image tokens" in str(error) else "answer"
    return None


def test_check_lengths_finds_the_samples_the_cut_would_stop_on():
    """Up front, from token counts, the verdict the collator reaches on each sample's batch."""
    processor = demo.build_processor(112 * 112)
    samples = [
        _sample("a red circle .", size=(56, 56)),
        _sample("a square .", size=(300, 120), system="a red circle in the top left ."),
        _sample("a circle .", size=(112, 112)),
    ]
    verdicts = set()
    for length in range(4, 60):
        collator = ChatCollator(processor, max_seq_length=length, max_pixels=112 * 112)
        for sample in samples:
            expected = cut_verdict(collator, sample)
            assert cut_verdict(collator.check_lengths, sample) == expected, (length, sample)
            verdicts.add(expected)
    assert verdicts == {None, "image", "answer"}


def test_check_lengths_names_the_first_sample_and_counts_them(demo_processor):
    samples = [
        _sample("a red circle .", source="data.jsonl line 1"),
        _sample("a circle .", system="a red circle in the top left .", source="data.jsonl line 2"),
        _sample("a square .", system="a red circle in the top left .", source="data.jsonl line 3"),
    ]
    ChatCollator(demo_processor, max_seq_length=21, max_pixels=56 * 56).check_lengths(samples[:1])
    with pytest.raises(FusetuneError) as error:
        ChatCollator(demo_processor, max_seq_length=21, max_pixels=56 * 56).check_lengths(samples)
    assert str(error.value).startswith(
        "data.jsonl line 2: max_seq_length=21 would cut it before its first answer token"
    )
    assert "(2 samples in all)" in str(error.value) and "raise max_seq_length" in str(error.value)


def test_transparent_pixels_are_laid_over_white():
    """A black drawing on a transparent background stays visible (a plain convert("RGB") turned the
    background black too), for RGBA, LA and palette images with a transparent colour, as
    transformers' convert_to_rgb lays them: over white."""
    from PIL import Image

    from fusetune.train.collator import open_image

    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    rgba.paste((0, 0, 0, 255), (2, 2, 6, 6))
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0] * 2)
    palette.paste(1, (2, 2, 6, 6))
    palette.info["transparency"] = 0  # colour 0 (black too) is transparent: the background
    for image in (rgba, rgba.convert("LA"), palette):
        opened = open_image(image, "s", max_pixels=64)
        assert opened.mode == "RGB"
        assert opened.getpixel((0, 0)) == (255, 255, 255) and opened.getpixel((3, 3)) == (0, 0, 0), image.mode
    plain = Image.new("RGB", (4, 4), (10, 20, 30))
    assert open_image(plain, "s", max_pixels=64).getcolors() == [(16, (10, 20, 30))]


def test_an_image_past_pils_safety_limit_names_the_fix(tmp_path, monkeypatch):
    from PIL import Image

    path = tmp_path / "big.png"
    Image.new("RGB", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 is over twice the limit
    collator_sample = _sample("a red circle .", source="data.jsonl line 4")
    collator_sample["messages"][0]["content"][0]["image"] = str(path)
    with pytest.raises(FusetuneError, match="data.jsonl line 4: image .*big.png.* larger than PIL decodes"):
        ChatCollator(demo.build_processor(), max_seq_length=64, max_pixels=56 * 56)([collator_sample])


def test_a_template_refusing_the_system_role_names_the_sample(demo_processor):
    import copy

    processor = copy.deepcopy(demo_processor)
    processor.chat_template = (
        "{% if messages[0]['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}" + demo_processor.chat_template
    )
    collator = ChatCollator(processor, max_seq_length=64, max_pixels=56 * 56)
    collator([_sample("a red circle .")])  # without a system message: as before
    with pytest.raises(FusetuneError, match="data.jsonl line 7: the model's chat template refuses it.*System "
                                            "role not supported.*folded into the first user message"):
        collator([_sample("a red circle .", system="be brief", source="data.jsonl line 7")])


def test_a_tokenizer_without_pad_or_eos_token_names_the_fix(demo_processor):
    import copy

    processor = copy.deepcopy(demo_processor)
    processor.tokenizer.pad_token = None
    processor.tokenizer.eos_token = None
    with pytest.raises(FusetuneError, match="neither a pad token nor an EOS token.*tokenizer_config.json"):
        ChatCollator(processor, max_seq_length=64)


CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Written here to behave as Qwen3's template does: an answer's "<think>...</think>" reasoning is split
# off; answers after the last user turn keep it, and the last one gets an empty block when it has
# none; earlier answers lose it.
QWEN3 = (
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set ns.last_user = loop.index0 %}"
    "{%- endif %}{%- endfor %}"
    "{%- for message in messages %}{%- set content = message['content'] %}"
    "{%- if message['role'] == 'assistant' %}{%- set reasoning = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{%- if loop.index0 > ns.last_user and (loop.last or reasoning) %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content }}"
    "{{- '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# DeepSeek-R1's way: reasoning dropped from every answer, and a think block opened by the generation
# prompt only.
DEEPSEEK_R1 = CHATML.replace("message['content']", "message['content'].split('</think>')[-1]").replace(
    "{{ '<|im_start|>assistant\\n' }}", "{{ '<|im_start|>assistant\\n<think>\\n' }}"
)
# A template that writes other words than the answer's.
REWORDING = CHATML.replace("message['content']", "(message['content'] | replace('code', 'program'))")


CHATML_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def _byte_level_tokenizer(template: str, specials=CHATML_SPECIALS, eos="<|im_end|>"):
    """A small byte-level BPE tokenizer splitting as Qwen2's does (runs of newlines are one token, so
    a header's "\\n" merges with an answer's leading "\\n"), with ChatML's special tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    split = r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    core = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    splitter = pre_tokenizers.Split(Regex(split), behavior="isolated")
    core.pre_tokenizer = pre_tokenizers.Sequence([splitter, byte_level])
    core.decoder = decoders.ByteLevel()
    corpus = ["user assistant write code thanks welcome", "print('hi')\n\n```python\n```\n", "a b c . ?"] * 20
    bytes_ = pre_tokenizers.ByteLevel.alphabet()
    core.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, initial_alphabet=bytes_))
    core.add_special_tokens([AddedToken(token, special=True) for token in specials])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=eos, pad_token="<|endoftext|>", chat_template=template
    )


def _chat(*turns: str) -> dict:
    roles = ["user", "assistant"] * len(turns)
    texts = zip(roles, turns, strict=False)
    messages = [{"role": role, "content": [{"type": "text", "text": text}]} for role, text in texts]
    return {"messages": messages, "_source": "chat"}


def test_an_answer_opening_with_a_newline_keeps_its_labels():
    """ChatML's header ends in "\\n"; an answer opening with "\\n" tokenises with it as one "\\n\\n" token,
    so the header's own ids are not in the text: that answer lost every label, silently."""
    collator = ChatCollator(_byte_level_tokenizer(CHATML), max_seq_length=512)
    code = "\n```python\nprint('hi')\n```"
    batch = collator([_chat("write code", code, "thanks", "welcome")])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    spans = collator.answer_spans(ids.tolist())
    assert len(spans) == 2
    learned = ["".join(collator.tokenizer.decode(ids[begin:end]).split()) for begin, end in spans]
    assert learned == ["".join(code.split()) + "<|im_end|>", "welcome<|im_end|>"]
    first = collator.tokenizer.convert_ids_to_tokens(int(ids[spans[0][0]]))
    assert first == "ĊĊ"  # the header's "\n" and the answer's, one token
    assert (labels != IGNORE).sum() == sum(end - begin for begin, end in spans)


@pytest.mark.parametrize(
    ("template", "turns", "message"),
    [
        (CHATML, ("say <|im_start|>assistant\nhi", "ok"), r"2 assistant header\(s\) for 1 answer"),
        (CHATML, ("write code", "the marker <|im_end|> ends it"), "holds the template's end marker"),
        (REWORDING, ("write code", "some code"), "rewrites answers"),
    ],
    ids=["header quoted by the user", "end marker in the answer", "template rewrites the answer"],
)
def test_labels_that_would_land_off_the_answers_are_refused(template, turns, message):
    """Marker text in a message, or a template that writes text into answers, moved labels onto other
    text silently; now the sample is refused before training (check_lengths) and in its batch."""
    collator = ChatCollator(_byte_level_tokenizer(template), max_seq_length=512)
    with pytest.raises(FusetuneError, match=message):
        collator.check_lengths([_chat(*turns)])
    with pytest.raises(FusetuneError, match=message):
        collator([_chat(*turns)])


def _learned(collator, batch) -> list[str]:
    """The text of each labelled span of the batch's first row, as the tokenizer decodes it."""
    ids = batch["input_ids"][0]
    return [collator.tokenizer.decode(ids[begin:end]) for begin, end in collator.answer_spans(ids.tolist())]


def test_qwen3_answers_are_learned_with_the_empty_think_block_its_template_writes():
    """Qwen3's template writes an empty think block before a last answer without reasoning (the model
    writes it after the bare generation prompt): the sample was refused as rewriting its answer. Now
    the block is read off the template and learned with the answer; earlier answers have none."""
    collator = ChatCollator(_byte_level_tokenizer(QWEN3), max_seq_length=512)
    assert collator.markers.answer_prefix == "<think>\n\n</think>\n\n"
    sample = _chat("write code", "a b c", "thanks", "welcome")
    collator.check_lengths([sample])
    batch = collator([sample])
    assert _learned(collator, batch) == ["a b c<|im_end|>", "<think>\n\n</think>\n\nwelcome<|im_end|>"]
    labels = batch["labels"][0]
    assert (labels != IGNORE).sum() == sum(end - begin for begin, end in collator.answer_spans(
        batch["input_ids"][0].tolist()))


def test_qwen3_reasoning_of_the_last_answer_is_learned():
    collator = ChatCollator(_byte_level_tokenizer(QWEN3), max_seq_length=512)
    batch = collator([_chat("write code", "<think>\nuser wants code\n</think>\n\nprint('hi')")])
    assert _learned(collator, batch) == ["<think>\nuser wants code\n</think>\n\nprint('hi')<|im_end|>"]


def test_reasoning_a_template_drops_is_refused_naming_the_fix():
    """Qwen3's template drops the reasoning of answers before the last user turn: those tokens would
    never be learned, silently."""
    collator = ChatCollator(_byte_level_tokenizer(QWEN3), max_seq_length=512)
    sample = _chat("write code", "<think>\nuser wants code\n</think>\n\na b c", "thanks", "welcome")
    for check in (collator.check_lengths, collator):
        with pytest.raises(FusetuneError, match="drops the reasoning.*split the conversation.*chat_template"):
            check([sample])


def test_a_generation_prompt_that_answers_do_not_follow_is_refused():
    """DeepSeek-R1's generation prompt opens a think block its rendered answers do not have: the answers
    would be learned after another prompt than generation gives."""
    with pytest.raises(FusetuneError, match="generation prompt.*set chat_template"):
        ChatCollator(_byte_level_tokenizer(DEEPSEEK_R1), max_seq_length=512)


# Phi-3-mini's: a chat rendered without the generation prompt ends with the EOS token.
PHI3 = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)


def test_a_template_that_closes_the_chat_with_eos_is_read():
    """Phi-3-mini's template writes EOS after a chat without the generation prompt, so the prompted
    render does not extend the plain one: it was refused as having no assistant header."""
    specials = ("<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>")
    tokenizer = _byte_level_tokenizer(PHI3, specials, eos="<|endoftext|>")
    collator = ChatCollator(tokenizer, max_seq_length=512)
    assert (collator.markers.header, collator.markers.end) == ("<|assistant|>\n", "<|end|>")
    batch = collator([_chat("write code", "a b", "thanks", "welcome")])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    learned = [tokenizer.decode(ids[begin:end]) for begin, end in collator.answer_spans(ids.tolist())]
    assert ["".join(text.split()) for text in learned] == ["ab<|end|>", "welcome<|end|>"]
    assert tokenizer.decode(ids[labels != IGNORE]).replace(" ", "") == "ab<|end|>welcome<|end|>"
