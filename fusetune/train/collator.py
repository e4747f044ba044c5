"""The chat collator: chat template, images, label masking, padding (VLMs and text-only LLMs).

For a batch of samples (``fusetune.train.data`` format) it renders each conversation with the
model's chat template, runs the processor (with each sample's images as one list) or the
tokenizer, pads on the right, and sets ``labels`` to the input ids on the assistant answers only:
the tokens after each assistant header up to and including the end-of-turn token, and never past
the start of the next turn's header (or the end of the text). Everything else (system and user
turns, the image tokens, the headers, the padding) is -100. Templates that do not close answers
with an end marker (llava-1.5's "USER: ... ASSISTANT: answer" then the next "USER:") get the
tokenizer's EOS token appended to each assistant answer, labelled, so the model learns to stop.
Every sample's labelled spans are checked against its answers (``check_answers``: one span an
answer, holding its text and the end marker only), so marker text inside a message, or a template
that rewrites answers, stops the run with an error naming the sample instead of moving labels.
Reasoning models' templates: Qwen3's empty think block before a last answer without reasoning is
learned with the answer (``TurnMarkers.answer_prefix``), as is a last answer's own
"<think>...</think>"; reasoning a template drops (Qwen3's before the last user turn) is refused, and
so is a generation prompt that answers do not follow (DeepSeek-R1's "<think>\n"). The ``chat_template``
setting replaces such a template.

Whatever the processor returns goes to the model as it is, so the architecture differences live in
the processor, not here: Qwen2-VL's ``pixel_values`` as flattened patches plus ``image_grid_thw``
(one image token per merged patch), Llama-3.2-Vision's (mllama) tiled ``pixel_values``,
``aspect_ratio_ids``, ``aspect_ratio_mask`` and ``cross_attention_mask`` (one ``<|image|>`` token
per image), llava's CLIP ``pixel_values`` (``<image>`` expanded to the patch count). The image
token ids come from the processor (``image_token_id``); per-token tensors (``[batch, length,
...]``, such as mllama's ``cross_attention_mask``) are cut with the input ids.

The assistant header, the end-of-turn marker (if any) and the next turn's header are read off the
chat template itself (render probe conversations with and without the generation prompt), so any
template that appends a fixed generation prompt works: ChatML (Qwen), Llama 3, Llava's "ASSISTANT:",
Mllama. Images larger than ``max_pixels`` are resized down, keeping their aspect ratio, before the
processor sees them (the Qwen2-VL image processor then rounds each side to its patch grid, so
images of any size batch together). A batch longer than ``max_seq_length`` is cut on the right,
unless that would cut image tokens (an error: raise max_seq_length or lower max_pixels), or leave a
sample no answer token to learn; ``check_lengths`` finds such samples before training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from fusetune.train.data import StoredImage
from fusetune.train.errors import FusetuneError

IGNORE = -100
_PROBE_USER, _PROBE_ANSWER = "fusetuneprobeuser", "fusetuneprobeanswer"
_PROBE_NEXT = "fusetuneprobenext"
# Where an answer's reasoning ends, in the templates of reasoning models (Qwen3, DeepSeek-R1, ...).
_REASONING_END = "</think>"


def _tokenizer(processor):
    return getattr(processor, "tokenizer", processor)


def is_vision_processor(processor) -> bool:
    return getattr(processor, "image_processor", None) is not None


def _render(processor, messages: list[dict], generation_prompt: bool = False) -> str:
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _render_sample(processor, messages: list[dict], generation_prompt: bool, source: str) -> str:
    """``_render`` of one sample; a template that refuses it (Gemma's and Mistral's refuse a
    system message) is an error naming the sample."""
    from jinja2 import TemplateError

    try:
        return _render(processor, messages, generation_prompt)
    except TemplateError as error:
        raise FusetuneError(
            f"{source}: the model's chat template refuses it ({error}); a template without a system role "
            "takes the system prompt folded into the first user message."
        ) from None


@dataclass(frozen=True)
class TurnMarkers:
    """What the chat template writes around an assistant answer, as text."""

    header: str
    """The assistant header (what ``add_generation_prompt`` appends), e.g. "<|im_start|>assistant\n"."""
    end: str
    """The end-of-turn marker after an answer: the template's own, or the EOS token when it has none."""
    closed: bool
    """True when the template itself writes ``end`` after each answer; False when the collator must
    append it (templates such as llava-1.5's, where an answer runs on into the next "USER:")."""
    next_header: str
    """The start of the turn after an answer (e.g. "USER:" or "<|im_start|>user"), "" if none."""
    answer_prefix: str = ""
    """What the template writes between the header and a last answer that it does not take from the
    answer: Qwen3's empty reasoning block "<think>\n\n</think>\n\n" before an answer without
    reasoning. It is labelled with the answer: after the bare header a generation prompt ends with,
    the model writes it itself."""


def turn_markers(processor) -> TurnMarkers:
    """The assistant header, end marker and next turn's header, read off the processor's chat template."""
    vision = is_vision_processor(processor)
    tokenizer = _tokenizer(processor)

    def message(role: str, text: str) -> dict:
        return {"role": role, "content": [{"type": "text", "text": text}] if vision else text}

    if (
        getattr(processor, "chat_template", None) is None
        and getattr(tokenizer, "chat_template", None) is None
    ):
        raise FusetuneError(
            "the model's tokenizer/processor has no chat template, so user and assistant turns cannot be "
            "told "
            "apart; use a chat (instruct) model or a tokenizer folder that has a chat_template."
        )
    user = [message("user", _PROBE_USER)]
    plain = _render(processor, user)
    prompted = _render(processor, user, generation_prompt=True)
    eos = tokenizer.eos_token
    if eos and plain.endswith(eos) and not prompted.startswith(plain):
        if prompted.startswith(plain[: -len(eos)]):  # Phi-3's ends a chat with EOS where it writes no prompt
            plain = plain[: -len(eos)]
    full = _render(processor, [*user, message("assistant", _PROBE_ANSWER)])
    if not prompted.startswith(plain) or len(prompted) == len(plain) or _PROBE_ANSWER not in full:
        raise FusetuneError(
            "cannot find the assistant header in the model's chat template (add_generation_prompt adds "
            "nothing); use a chat template that marks assistant turns."
        )
    header = prompted[len(plain) :]
    answer_at = full.index(_PROBE_ANSWER)
    header_at = full.rfind(header, 0, answer_at)
    if header_at < 0:
        raise FusetuneError(
            f"the chat template's generation prompt {header!r} is not what it writes before an answer "
            f"({full[:answer_at][-len(header) - 20 :]!r}; DeepSeek-R1's opens a think block at generation "
            "only), so answers would be learned after another prompt than generation gives; set "
            "chat_template to a template that writes answers after its generation prompt."
        )
    answer_prefix = full[header_at + len(header) : answer_at]
    tail = full[answer_at + len(_PROBE_ANSWER) :]
    end = tail.strip()
    # Keep only the first marker of a tail such as "<|im_end|>\n" or "</s>" (not a following turn, nor
    # Phi-3's "<|end|>\n<|endoftext|>" EOS): the longest special token the tail starts with.
    specials = {*tokenizer.all_special_tokens}
    specials |= {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
    starts = [special for special in specials if special and tail.lstrip().startswith(special)]
    if starts:
        end = max(starts, key=len)
    closed = bool(end)
    if not closed:
        end = tokenizer.eos_token or ""
    # The next turn's header: what the template writes between an answer (and its end marker) and
    # the text of the user turn that follows it.
    next_header = ""
    try:
        two = _render(
            processor,
            [*user, message("assistant", _PROBE_ANSWER), message("user", _PROBE_NEXT)],
        )
    except Exception:  # noqa: BLE001 - a template that refuses a second turn: no next header
        two = ""
    if _PROBE_NEXT in two and _PROBE_ANSWER in two:
        between = two[two.index(_PROBE_ANSWER) + len(_PROBE_ANSWER) : two.index(_PROBE_NEXT)].strip()
        if closed and between.startswith(end):
            between = between[len(end) :].strip()
        next_header = between
    return TurnMarkers(header, end, closed, next_header, answer_prefix if answer_prefix.strip() else "")


def response_markers(processor) -> tuple[str, str]:
    """(assistant header, end-of-turn marker) as text, read off the processor's chat template.

    The end marker is the template's own, or the EOS token (which the collator then appends to
    each answer) when the template writes none; see ``turn_markers``.
    """
    markers = turn_markers(processor)
    return markers.header, markers.end


def _find(sequence: list[int], pattern: list[int], start: int) -> int:
    """The first index from ``start`` where ``pattern`` occurs in ``sequence``, or -1 (list.index
    finds the candidates: this runs on every token of every sample)."""
    if not pattern:
        return -1
    i = start
    while True:
        try:
            i = sequence.index(pattern[0], i)
        except ValueError:
            return -1
        if sequence[i : i + len(pattern)] == pattern:
            return i
        i += 1


def _fit(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """(width, height) scaled down, aspect kept, to at most ``max_pixels`` pixels."""
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    return max(1, int(width * scale)), max(1, int(height * scale))


def _read_image(image: Any, source: str, read):
    """``read(PIL image)`` of an image given as a path, encoded bytes or a ``StoredImage`` (opened for
    the call, so that nothing decoded stays behind) or as a PIL image."""
    if isinstance(image, StoredImage):
        image = image.read_bytes()
    if not isinstance(image, (str, bytes)):
        return read(image)
    import io

    from PIL import Image, UnidentifiedImageError

    named = f"image {image!r}" if isinstance(image, str) else "its image bytes"
    try:
        with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as handle:
            return read(handle)
    except FileNotFoundError:
        raise FusetuneError(
            f"{source}: {named} is missing; restore it or remove the sample."
        ) from None
    except Image.DecompressionBombError as error:
        raise FusetuneError(
            f"{source}: {named} is larger than PIL decodes safely ({error}); downscale the file, "
            "or raise PIL.Image.MAX_IMAGE_PIXELS if you trust it."
        ) from None
    except (UnidentifiedImageError, OSError) as error:
        raise FusetuneError(
            f"{source}: {named} cannot be read ({type(error).__name__}: {error}); "
            f"replace the file "
            f"with a PNG/JPEG or remove the sample."
        ) from None


def as_rgb(image):
    """An RGB copy of a PIL image, transparent pixels laid over white (as transformers'
    ``convert_to_rgb`` does): a plain ``convert("RGB")`` drops the alpha and turns them black, so a
    dark drawing on a transparent background would vanish."""
    from PIL import Image

    if image.mode not in ("RGBA", "LA", "PA") and "transparency" not in image.info:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def open_image(image: Any, source: str, max_pixels: int):
    """A RGB PIL image from a path, encoded bytes, a ``StoredImage`` or a PIL image, resized under
    ``max_pixels``."""
    image = _read_image(image, source, as_rgb)
    size = _fit(*image.size, max_pixels)
    return image if size == image.size else image.resize(size)


def image_size(image: Any, source: str, max_pixels: int) -> tuple[int, int]:
    """(width, height) of ``open_image(image, ...)``, read without decoding (a file's header)."""
    return _fit(*_read_image(image, source, lambda handle: handle.size), max_pixels)


class ChatCollator:
    """Batches of chat samples -> model inputs with masked ``labels`` (see the module docstring)."""

    def __init__(self, processor, max_seq_length: int = 2048, max_pixels: int = 602112):
        self.processor = processor
        self.tokenizer = _tokenizer(processor)
        self.vision = is_vision_processor(processor)
        self.max_seq_length = max_seq_length
        self.max_pixels = max_pixels
        self.markers = turn_markers(processor)
        encode = self.tokenizer

        def ids(text: str) -> list[int]:
            return encode(text, add_special_tokens=False)["input_ids"] if text else []

        # The header is found without its trailing whitespace, which can merge with an answer's own
        # leading whitespace into one token ("\n" + "\n" -> "\n\n"): the header alone would then not
        # be found, and its answer would silently lose every label.
        core = self.markers.header.rstrip()
        self.header_ids = ids(core)
        self.header_tail_ids = ids(self.markers.header[len(core) :])
        self.end_ids = ids(self.markers.end)
        self.next_header_ids = ids(self.markers.next_header)
        # Answers the template leaves open get the EOS token written after them (and learned).
        self.append_eos = not self.markers.closed and bool(self.markers.end)
        self.image_token_ids = {
            i
            for i in (getattr(processor, "image_token_id", None), getattr(processor, "video_token_id", None))
            if isinstance(i, int)
        }
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise FusetuneError(
                    "the tokenizer has neither a pad token nor an EOS token to pad batches with; set "
                    "pad_token (or eos_token) in the model folder's tokenizer_config.json."
                )
            self.tokenizer.pad_token = self.tokenizer.eos_token

    # -- rendering ------------------------------------------------------------------------------
    def render(
        self, sample: dict, generation_prompt: bool = False, open_images: bool = True
    ) -> tuple[str, list]:
        """The chat-template text of a sample and its images, in order (opened, or as given)."""
        images, messages = [], []
        source = sample.get("_source", "a sample")
        for message in sample["messages"]:
            parts = []
            for part in message["content"]:
                if part["type"] == "image":
                    if not self.vision:
                        raise FusetuneError(
                            f"{source} has an image, but the model is text-only; use a vision-language model "
                            f"or drop the images."
                        )
                    images.append(
                        open_image(part["image"], source, self.max_pixels) if open_images else part["image"]
                    )
                    parts.append({"type": "image"})
                else:
                    parts.append({"type": "text", "text": part["text"]})
            if self.append_eos and message["role"] == "assistant":
                parts.append({"type": "text", "text": self.markers.end})
            if not self.vision:
                parts = "".join(p["text"] for p in parts)
            messages.append({"role": message["role"], "content": parts})
        return _render_sample(self.processor, messages, generation_prompt, source), images

    def prompt(self, sample: dict) -> tuple[dict, str]:
        """Model inputs for generating the last assistant answer, and that answer's text."""
        messages = sample["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        truth = "".join(p.get("text", "") for p in messages[last]["content"])
        text, images = self.render({**sample, "messages": messages[:last]}, generation_prompt=True)
        inputs = self._encode([text], [images])
        return inputs, truth

    def _encode(self, texts: list[str], images: list[list]) -> dict[str, torch.Tensor]:
        """Tokenise ``texts`` (and ``images[i]``, the images of ``texts[i]``), padded on the right.

        Images go to the processor as one list per sample (what Mllama's processor needs to place
        them; the others accept the nesting too). No special tokens are added when the rendered
        text already starts with the BOS token (Llama 3 templates write it themselves); text-only
        templates are taken as complete.
        """
        padding_side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "right"
        try:
            if self.vision:
                return dict(
                    self.processor(
                        text=texts,
                        images=images if any(images) else None,
                        return_tensors="pt",
                        padding=True,
                        add_special_tokens=self._special_tokens(texts),
                    )
                )
            return dict(self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False))
        finally:
            self.tokenizer.padding_side = padding_side

    def _special_tokens(self, texts: list[str]) -> bool:
        """Whether ``texts`` are tokenised with special tokens (see ``_encode``)."""
        bos = self.tokenizer.bos_token
        return self.vision and not (bos and all(text.startswith(bos) for text in texts))

    # -- lengths --------------------------------------------------------------------------------
    def check_lengths(self, samples: list[dict]) -> None:
        """Refuse, before training, samples that ``max_seq_length`` would cut inside their image
        tokens or before their first answer token: ``__call__`` stops on them, but only when their
        batch comes up, mid-run. The error names the first such sample and counts them all.

        Cheap enough for every sample: only the text is tokenised, and each image placeholder in it
        counts as the number of tokens the processor expands it to for an image of that size
        (``_get_num_multimodal_tokens``; a processor without it is taken to keep one token an image,
        as Mllama's does), so image files are read for their size alone.
        """
        rendered = [self.render(sample, open_images=False) for sample in samples]
        texts = [text for text, _ in rendered]
        ids = self.tokenizer(texts, add_special_tokens=self._special_tokens(texts))["input_ids"]
        bad = []
        for sample, sample_ids, (_, sample_images) in zip(samples, ids, rendered, strict=True):
            source = sample.get("_source", "a sample")
            sizes = [image_size(image, source, self.max_pixels) for image in sample_images]
            self.check_answers(sample, sample_ids)
            why = self._cut(torch.tensor(sample_ids), sizes)
            if why:
                bad.append((source, why))
        if bad:
            source, why = bad[0]
            more = f" ({len(bad)} samples in all)" if len(bad) > 1 else ""
            raise FusetuneError(
                f"{source}: max_seq_length={self.max_seq_length} would cut it {why}{more}; raise "
                f"max_seq_length, or shorten or remove such samples"
                f"{', or lower max_pixels' if self.vision else ''}."
            )

    def _cut(self, ids: torch.Tensor, sizes: list[tuple[int, int]]) -> str | None:
        """Why cutting a sample to ``max_seq_length`` fails (None: it does not): ``ids`` are its
        tokens with one placeholder an image, ``sizes`` its images' (width, height), in order."""
        labels = self.mask(ids[None], torch.ones_like(ids)[None])[0]
        image = torch.isin(ids, torch.tensor(sorted(self.image_token_ids), dtype=ids.dtype))
        count = getattr(self.processor, "_get_num_multimodal_tokens", None)
        span = torch.ones_like(ids)
        if count is not None and sizes:
            span[image] = torch.tensor(count(image_sizes=[(h, w) for w, h in sizes]).num_image_tokens)
        end = span.cumsum(0)  # the position after each token once the images are expanded
        if (image & (end > self.max_seq_length)).any():
            return "inside its image tokens"
        if not ((labels != IGNORE) & (end - span < self.max_seq_length)).any():
            return "before its first answer token, leaving nothing to learn"
        return None

    # -- batching -------------------------------------------------------------------------------
    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        texts, images = [], []
        for sample in samples:
            text, sample_images = self.render(sample)
            texts.append(text)
            images.append(sample_images)
        batch = self._encode(texts, images)
        if not self.vision:
            batch.pop("token_type_ids", None)
        ids = batch["input_ids"]
        labels = self.mask(ids, batch["attention_mask"])
        for row, sample in enumerate(samples):  # right padding: a row's tokens are its first `length`
            self.check_answers(sample, ids[row, : int(batch["attention_mask"][row].sum())].tolist())
        cut = ids.shape[1] > self.max_seq_length
        if cut:
            beyond = ids[:, self.max_seq_length :]
            inside = torch.zeros(len(samples), dtype=torch.bool)
            for token in self.image_token_ids:
                inside |= (beyond == token).any(1)
            if inside.any():
                source = samples[int(inside.nonzero()[0])].get("_source", "a sample")
                raise FusetuneError(
                    f"{source} is longer than max_seq_length={self.max_seq_length} inside its image tokens; "
                    f"raise max_seq_length or lower max_pixels."
                )
            length = ids.shape[1]
            for key, value in list(batch.items()):
                if (
                    isinstance(value, torch.Tensor)
                    and value.dim() >= 2
                    and value.shape[:2] == (len(samples), length)
                ):
                    batch[key] = value[:, : self.max_seq_length]
            labels = labels[:, : self.max_seq_length]
        for row, sample in enumerate(samples):
            if not (labels[row] != IGNORE).any():
                why = f" after cutting to max_seq_length={self.max_seq_length}" if cut else ""
                raise FusetuneError(
                    f"{sample.get('_source', f'sample {row}')}: every label is masked{why} "
                    f"(no assistant answer "
                    f"tokens left to learn from); give it an assistant answer"
                    f"{' or raise max_seq_length' if cut else ''}."
                )
        batch["labels"] = labels
        return batch

    def answer_spans(self, sequence: list[int]) -> list[tuple[int, int]]:
        """The (begin, end) token spans of the assistant answers in one row of ids.

        An answer's span runs from its assistant header to the end marker (included), but never past
        the start of the next turn's header, nor the end of the text. The header's trailing
        whitespace is skipped where it stands as its own tokens; where it merged with the answer's
        leading whitespace, that token is the answer's first.
        """
        spans, start, tail = [], 0, self.header_tail_ids
        while (found := _find(sequence, self.header_ids, start)) >= 0:
            begin = found + len(self.header_ids)
            if tail and sequence[begin : begin + len(tail)] == tail:
                begin += len(tail)
            end = len(sequence)
            close = _find(sequence, self.end_ids, begin)
            if close >= 0:
                end = close + len(self.end_ids)
            following = _find(sequence, self.next_header_ids, begin)
            if 0 <= following < end:
                end = following
            spans.append((begin, end))
            start = max(end, begin)
        return spans

    def check_answers(self, sample: dict, sequence: list[int]) -> None:
        """Refuse a sample whose labelled spans are not its assistant answers: one span an answer,
        each holding its answer's text (after the template's ``answer_prefix``, where it writes one)
        and nothing but the end marker beside it (whitespace aside).

        Marker text inside a message (a user turn quoting "ASSISTANT:", an answer holding
        "<|im_end|>") or a template that rewrites answers (Qwen3's and DeepSeek-R1's drop the
        reasoning of earlier answers) would otherwise move labels silently onto other text, or leave
        part of an answer unlearned. Texts are compared as the tokenizer round-trips them, without
        whitespace.
        """
        source = sample.get("_source", "a sample")
        answers = [
            "".join(part.get("text", "") for part in message["content"])
            for message in sample["messages"]
            if message["role"] == "assistant"
        ]
        spans = self.answer_spans(sequence)
        if len(spans) != len(answers):
            raise FusetuneError(
                f"{source}: its rendered chat has {len(spans)} assistant header(s) for {len(answers)} "
                f"answer(s), so the answers cannot be told from the other turns (a message that quotes the "
                f"template's marker {self.markers.header.strip()!r}?); reword or remove the sample."
            )
        for (begin, end), answer in zip(spans, answers, strict=True):
            labelled = self._squashed(self.tokenizer.decode(sequence[begin:end]))
            if any(self._holds(labelled, prefix + answer) for prefix in {"", self.markers.answer_prefix}):
                continue
            read = self.tokenizer.decode(sequence[begin:end])[:80]
            if _REASONING_END in answer and self._holds(labelled, answer.split(_REASONING_END)[-1]):
                raise FusetuneError(
                    f"{source}: the chat template drops the reasoning of its answer {answer[:60]!r} (it "
                    f"renders {read!r}), as Qwen3's does before the last user turn and DeepSeek-R1's "
                    "everywhere, so that reasoning would never be learned; split the conversation so that "
                    "each answer with reasoning ends its sample, or set chat_template to a template that "
                    "keeps it."
                )
            raise FusetuneError(
                f"{source}: the tokens labelled as its answer {answer[:60]!r} read {read!r}: the answer "
                f"holds the template's end marker {self.markers.end!r}, or the chat template rewrites "
                "answers; reword the sample, or set chat_template to a template that renders each answer "
                "as written."
            )

    def _holds(self, labelled: str, answer: str) -> bool:
        """Whether ``labelled`` (squashed) is ``answer`` with at most the end marker beside it."""
        wanted = self._squashed(answer)
        return wanted in labelled and len(labelled) <= len(self._squashed(answer + self.markers.end))

    def _squashed(self, text: str) -> str:
        """``text`` as the tokenizer round-trips it, without whitespace (decoding may space tokens)."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return "".join(self.tokenizer.decode(ids).split())

    def mask(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Labels: ``ids`` on the assistant answers (through the end-of-turn marker), -100 elsewhere.

        An answer's span runs from its assistant header to the end marker (included), but never past
        the start of the next turn's header, nor the end of the text (padding is masked after).
        """
        labels = torch.full_like(ids, IGNORE)
        for row in range(ids.shape[0]):
            for begin, end in self.answer_spans(ids[row].tolist()):
                labels[row, begin:end] = ids[row, begin:end]
        labels[attention_mask == 0] = IGNORE
        for token in self.image_token_ids:
            labels[ids == token] = IGNORE
        return labels
