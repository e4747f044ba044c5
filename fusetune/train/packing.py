"""Padding-free packing: a batch's samples, with their images, back to back in one row.

The row has no padding and no ``attention_mask``; the sample boundaries travel in the position ids,
which restart at 0 on each sample's first token, and (``PackingCollator``) in the flash-attention
keyword arguments ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (int32 cumulative sample lengths from 0) and
``max_length_q`` / ``max_length_k``. The row carries ``use_cache=False``: a model whose config says
``use_cache`` would otherwise make a cache, in training too, and then attend across samples.

Attention stays inside each sample with:

- ``fusetune_varlen`` (``fusetune.train.varlen``, what ``attention_implementation`` picks without
  the ``flash_attn`` package): each sample's causal attention on its own, one torch ``varlen_attn``
  call (flash kernels) on a CUDA GPU in bf16/fp16, SDPA per sample otherwise; transformers builds no
  mask at all;
- flash attention 2 (``flash_attn`` installed): its varlen path, with the boundaries above or found
  where the position ids restart;
- sdpa, eager or flex attention: transformers' ``masking_utils`` reads the packed sequences off the
  text position ids and builds a block-diagonal causal mask, exact but a dense ``row x row`` mask
  (sdpa then cannot use its flash kernels and computes every score).

``use_packed_attention(model)`` sets the language model's attention; a VLM's vision tower keeps its
own (sdpa), and attends within each image by its grid. Qwen2-VL-family models (M-RoPE) take
``position_ids`` of shape ``(4, 1, n)``: the text positions, then the three M-RoPE rows
(``fusetune.train.positions``, each sample's ids as if alone); text models take ``(1, n)``. The
``cu_seq_lens_*`` arguments reach the vision tower too in transformers 5.17 (5.24 drops them there):
harmless to its sdpa attention, a clash with a flash-attention vision tower, which passes its own, so
``PackingCollator`` leaves them out when the vision tower runs flash attention.

Labels are -100 on each sample's first token, so the last token of one sample never learns to
predict the next sample; ``pixel_values`` and the grids are concatenated in order. The loss is then
the unpacked batch's: the mean over the same label tokens. With gradient accumulation, HF Trainer's
``num_items_in_batch`` counts the labels that are not -100 (past the first token of the row): the
same count as the padded batch's, so accumulated steps are weighted the same as without packing.
"""

from __future__ import annotations

import importlib.util

import torch

from fusetune.train import varlen
from fusetune.train.collator import IGNORE
from fusetune.train.errors import FusetuneError
from fusetune.train.positions import mrope_position_ids, mrope_settings

_PER_TOKEN = ("input_ids", "labels", "mm_token_type_ids")
_VISION = {  # key -> (the modality it belongs to, whether it has one row per patch or per grid)
    "pixel_values": ("image", "patch"),
    "image_grid_thw": ("image", "grid"),
    "pixel_values_videos": ("video", "patch"),
    "video_grid_thw": ("video", "grid"),
    "second_per_grid_ts": ("video", "grid"),
}
_ATTENTION = ("sdpa", "eager", "flex_attention", varlen.NAME)


def attention_implementation() -> str:
    """The attention for packed rows: flash attention 2 (varlen) where the ``flash_attn`` package
    and a CUDA GPU are there, else ``fusetune_varlen`` (registered with transformers by this call)."""
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return varlen.register()


def _softcapping_attention() -> str:
    """The attention for packed rows of a model that soft-caps its scores: flash attention 2 where
    ``attention_implementation`` picks it (it soft-caps), else eager (a block-diagonal mask)."""
    implementation = attention_implementation()
    return "eager" if implementation == varlen.NAME else implementation


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def use_packed_attention(model, implementation: str | None = None) -> str:
    """Set the attention of ``model``'s language model (``model``: a transformers model, or a PEFT
    model around one) to ``implementation``, by default ``attention_implementation()``, or eager
    attention for a model that soft-caps its attention scores (Gemma 2), which ``fusetune_varlen``
    does not; a VLM's vision tower keeps its own. Returns the implementation set. A VLM that
    ``pack`` refuses is refused here too: Gemma 3's image tokens attend both ways, which a packed
    row's causal segments would silently drop."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    _settings(config)
    text = _text_config(config)
    if getattr(text, "attn_logit_softcapping", None) is not None:
        if implementation == varlen.NAME:
            raise FusetuneError(
                f"{varlen.NAME} does not soft-cap attention scores, which {config.model_type} does; pack "
                f"with eager attention (use_packed_attention(model, 'eager')) or set packing: false."
            )
        implementation = implementation or _softcapping_attention()
    implementation = implementation or attention_implementation()
    if implementation == varlen.NAME:
        varlen.register()
    if text is config:
        base.set_attn_implementation(implementation)
    else:
        keys = [key for key in getattr(config, "sub_configs", {}) if getattr(config, key, None) is text]
        if not keys:
            raise FusetuneError(
                f"cannot find the language model's config among {config.model_type}'s sub-configs to set "
                f"its attention; set packing: false."
            )
        base.set_attn_implementation({keys[0]: implementation})
    if _text_config(base.config)._attn_implementation != implementation:
        raise FusetuneError(
            f"{type(base).__name__} kept {_text_config(base.config)._attn_implementation!r} attention where "
            f"packing asked for {implementation!r}; set packing: false."
        )
    return implementation


def boundaries(lengths) -> dict:
    """The flash-attention keyword arguments that give a packed row's samples (of ``lengths``
    tokens, in order) to the attention: ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (int32 cumulative
    lengths from 0) and ``max_length_q`` / ``max_length_k`` (ints)."""
    lengths = [int(n) for n in lengths]
    cu = varlen.cu_seq_lens(lengths)
    return {
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": max(lengths),
        "max_length_k": max(lengths),
    }


def _passes_boundaries(config) -> bool:
    """Whether packed batches for a model of ``config`` carry ``boundaries``: for fusetune_varlen and
    flash language models, unless a vision tower runs flash attention (it would get them too, in
    transformers 5.17, on top of its own)."""
    attention = _text_config(config)._attn_implementation or ""
    vision = getattr(getattr(config, "vision_config", None), "_attn_implementation", None) or ""
    return (attention == varlen.NAME or "flash" in attention) and "flash" not in vision


def _settings(config) -> dict | None:
    """M-RoPE settings of a packable model; None for a text model; an error for other VLMs."""
    settings = mrope_settings(config)
    if settings is None and getattr(config, "vision_config", None) is not None:
        raise FusetuneError(
            f"packing supports text models and the Qwen2-VL family, not {config.model_type!r}; "
            f"set packing: false."
        )
    return settings


def _check(keys, allowed) -> None:
    unknown = sorted(set(keys) - set(allowed))
    if unknown:
        raise FusetuneError(
            f"packing does not know how to pack {', '.join(unknown)} (a model input other than token ids, "
            f"labels and Qwen2-VL-style images); set packing: false."
        )


def unbatch(batch: dict[str, torch.Tensor], config) -> list[dict[str, torch.Tensor]]:
    """The samples of a collated, padded batch, each alone and without padding.

    Per-token tensors keep the tokens where ``attention_mask`` is 1 (left or right padding), as
    ``(1, n)``; ``pixel_values``, grids and ``second_per_grid_ts`` are split by the images and
    videos each row's tokens hold.
    """
    _check(batch, {*_PER_TOKEN, *_VISION, "attention_mask"})
    ids = batch["input_ids"]
    keep = batch.get("attention_mask", torch.ones_like(ids)).bool()
    samples = [
        {key: batch[key][row][keep[row]][None] for key in _PER_TOKEN if key in batch}
        for row in range(len(ids))
    ]
    settings = _settings(config)
    for kind in ("image", "video"):
        grids = batch.get(f"{kind}_grid_thw")
        if grids is None:
            continue
        merge = settings["spatial_merge_size"]
        tokens = (ids == settings[f"{kind}_token_id"]) & keep
        # Row r holds the grids whose tokens end within the first (tokens in rows <= r) tokens.
        ends = (grids.prod(-1) // merge**2).cumsum(0)
        counts = torch.searchsorted(ends, tokens.sum(1).cumsum(0), right=True).diff(prepend=ends.new_zeros(1))
        split = {"grid": counts.tolist()}
        split["patch"] = [int(part.prod(-1).sum()) for part in grids.split(split["grid"])]
        for key, (modality, unit) in _VISION.items():
            if modality == kind and key in batch:
                for sample, part in zip(samples, batch[key].split(split[unit]), strict=True):
                    if len(part):  # a sample without images has no image inputs, as when collated alone
                        sample[key] = part
    return samples


def _unpadded(sample: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """``sample`` checked to be one unpadded sample: ``input_ids`` of shape (1, length), an
    ``attention_mask`` (a processor's output for one sample) only if all ones, and then dropped."""
    shape = tuple(sample["input_ids"].shape)
    if len(shape) != 2 or shape[0] != 1:
        raise FusetuneError(
            f"pack takes single samples of input_ids (1, length), got {shape} (sample {index}); split a "
            f"collated batch with unbatch first."
        )
    mask = sample.get("attention_mask")
    if mask is None:
        return sample
    if not bool(mask.bool().all()):
        raise FusetuneError(
            f"sample {index} is padded (its attention_mask has zeros); pack takes unpadded samples: "
            f"split a padded batch with unbatch first."
        )
    return {key: value for key, value in sample.items() if key != "attention_mask"}


def _check_vision_rows(sample: dict[str, torch.Tensor], index: int) -> None:
    """Each modality's patch rows in ``sample`` are the ones its own grids take: packed, a sample's
    surplus rows would silently become the next sample's image."""
    for patches, (modality, unit) in _VISION.items():
        if unit != "patch" or patches not in sample:
            continue
        grids = sample.get(f"{modality}_grid_thw")
        wanted = 0 if grids is None else int(grids.prod(-1).sum())
        if sample[patches].shape[0] != wanted:
            raise FusetuneError(
                f"sample {index} has {sample[patches].shape[0]} rows of {patches} where its "
                f"{modality}_grid_thw takes {wanted}; give each sample its own {modality} inputs "
                f"(unbatch splits a collated batch so)."
            )


def _with_seconds(samples: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """Where some samples give ``second_per_grid_ts``, the video samples without it get 1 a video
    (transformers' default), so that the joined seconds stay one per joined video."""
    given = [sample["second_per_grid_ts"] for sample in samples if "second_per_grid_ts" in sample]
    if not given:
        return samples
    return [
        {**sample, "second_per_grid_ts": torch.ones(len(sample["video_grid_thw"]), dtype=given[0].dtype)}
        if "video_grid_thw" in sample and "second_per_grid_ts" not in sample
        else sample
        for sample in samples
    ]


def _packable(samples: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """``samples`` checked for packing, without the empty ones (they add nothing; one with images
    is an error) and with every video's seconds where some are given."""
    checked = []
    for index, sample in enumerate(samples):
        sample = _unpadded(sample, index)
        _check(sample, {*_PER_TOKEN, *_VISION})
        _check_vision_rows(sample, index)
        if sample["input_ids"].shape[1]:
            checked.append(sample)
        elif any(key in sample for key in _VISION):
            raise FusetuneError(f"sample {index} has no tokens but has image or video inputs; drop it.")
    if not checked:
        raise FusetuneError("nothing to pack: the batch has no samples with tokens.")
    return _with_seconds(checked)


def pack(samples: list[dict[str, torch.Tensor]], config) -> dict[str, torch.Tensor]:
    """One row (batch of 1) holding ``samples`` back to back: ``input_ids``, ``labels`` (-100 on each
    sample's first token), ``mm_token_type_ids`` if given, ``position_ids`` restarting per sample
    (``(4, 1, n)`` for M-RoPE models, ``(1, n)`` otherwise), the vision inputs concatenated, and
    ``use_cache=False``.

    Each sample is a dict of ``(1, length)`` per-token tensors without padding (``unbatch`` makes
    them from a collated batch) plus its own ``pixel_values`` / ``image_grid_thw`` (and video
    inputs); ``config`` is the model's config. An all-ones ``attention_mask`` is dropped; empty
    samples are left out; a video sample without ``second_per_grid_ts`` among samples with it gets
    transformers' default, 1 a video.
    """
    settings = _settings(config)
    samples = _packable(samples)
    row = {
        key: torch.cat([sample[key] for sample in samples], dim=1)
        for key in _PER_TOKEN
        if all(key in sample for sample in samples)
    }
    lengths = torch.tensor([sample["input_ids"].shape[1] for sample in samples])
    starts = lengths.cumsum(0) - lengths
    if "labels" in row:
        row["labels"][0, starts] = IGNORE
    first = torch.zeros_like(row["input_ids"], dtype=torch.bool)
    first[0, starts] = True
    text = torch.arange(row["input_ids"].shape[1]) - starts.repeat_interleave(lengths)
    for key in _VISION:
        parts = [sample[key] for sample in samples if key in sample]
        if parts:
            row[key] = torch.cat(parts)
    row["use_cache"] = False  # with a cache, transformers would not look for packed sequences
    if settings is None:
        row["position_ids"] = text[None]
        return row
    mrope, _ = mrope_position_ids(
        row["input_ids"],
        row.get("image_grid_thw"),
        row.get("video_grid_thw"),
        second_per_grid_ts=row.get("second_per_grid_ts"),
        sequence_starts=first,
        **settings,
    )
    row["position_ids"] = torch.cat([text.view(1, 1, -1), mrope])
    return row


class PackingCollator:
    """A collator whose batches are one packed row: ``collator``'s padded batch, split into its
    samples (``unbatch``) and packed (``pack``) for the model of ``config``, plus the samples'
    ``boundaries`` (``cu_seq_lens_q`` / ``cu_seq_lens_k`` / ``max_length_q`` / ``max_length_k``)
    where the language model runs ``fusetune_varlen`` or flash attention.

    The language model must run one of the attentions that keep packed samples apart:
    ``fusetune_varlen`` or flash attention (fast; ``use_packed_attention(model)`` sets what
    ``attention_implementation()`` picks), or sdpa, eager or flex attention (a block-diagonal mask).
    """

    def __init__(self, collator, config):
        attention = getattr(_text_config(config), "_attn_implementation", None)
        if attention is not None and attention not in _ATTENTION and "flash" not in attention:
            raise FusetuneError(
                f"packing needs fusetune_varlen, flash, sdpa, eager or flex attention to keep samples apart; "
                f"the language model runs {attention!r}: set it with "
                f"fusetune.train.packing.use_packed_attention(model) (attn_implementation="
                f"{attention_implementation()!r})."
            )
        _settings(config)
        self.collator = collator
        self.config = config
        self.with_boundaries = _passes_boundaries(config)

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        parts = unbatch(self.collator(samples), self.config)
        row = pack(parts, self.config)
        if self.with_boundaries:
            row.update(boundaries([part["input_ids"].shape[1] for part in parts]))
        return row
