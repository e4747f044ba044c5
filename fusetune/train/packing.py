"""Padding-free packing: a batch's samples, with their images, back to back in one row.

The row has no padding and no ``attention_mask``; the sample boundaries travel in the position ids,
which restart at 0 on each sample's first token. transformers 5 turns that into attention kept
inside each sample: with no attention mask and no cache (the row carries ``use_cache=False``: a
model whose config says ``use_cache`` would otherwise make one, in training too, and then attend
across samples), ``masking_utils`` reads the packed
sequences off the text position ids and builds a block-diagonal causal mask (sdpa, eager, flex
attention), and flash attention, for a batch of one row, takes its varlen path with
``cu_seqlens`` found where the position ids restart. Qwen2-VL-family models (M-RoPE) take
``position_ids`` of shape ``(4, 1, n)``: the text positions, then the three M-RoPE rows
(``fusetune.train.positions``, each sample's ids as if alone); text models take ``(1, n)``.
(Passing ``cu_seq_lens_*`` keyword arguments instead does not work for these VLMs: they reach the
vision tower too, which sets its own.)

Labels are -100 on each sample's first token, so the last token of one sample never learns to
predict the next sample; ``pixel_values`` and the grids are concatenated in order (the vision
tower attends within each image by its grid). The loss is then the unpacked batch's: the mean over
the same label tokens. With gradient accumulation, HF Trainer's ``num_items_in_batch`` counts the
labels that are not -100 (past the first token of the row): the same count as the padded batch's,
so accumulated steps are weighted the same as without packing.
"""

from __future__ import annotations

import importlib.util

import torch

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
_ATTENTION = ("sdpa", "eager", "flex_attention")


def attention_implementation() -> str:
    """The attention to load a model with for packed rows: flash attention 2 (varlen) where the
    ``flash_attn`` package and a CUDA GPU are there, else sdpa (a block-diagonal mask)."""
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


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


def pack(samples: list[dict[str, torch.Tensor]], config) -> dict[str, torch.Tensor]:
    """One row (batch of 1) holding ``samples`` back to back: ``input_ids``, ``labels`` (-100 on each
    sample's first token), ``mm_token_type_ids`` if given, ``position_ids`` restarting per sample
    (``(4, 1, n)`` for M-RoPE models, ``(1, n)`` otherwise), the vision inputs concatenated, and
    ``use_cache=False``.

    Each sample is a dict of ``(1, length)`` per-token tensors without padding (``unbatch`` makes
    them from a collated batch) plus its own ``pixel_values`` / ``image_grid_thw`` (and video
    inputs); ``config`` is the model's config.
    """
    if not samples:
        raise FusetuneError("nothing to pack: the batch has no samples.")
    settings = _settings(config)
    for sample in samples:
        shape = tuple(sample["input_ids"].shape)
        if len(shape) != 2 or shape[0] != 1:
            raise FusetuneError(
                f"pack takes single samples of input_ids (1, length), got {shape}; split a collated "
                f"batch with unbatch first."
            )
        _check(sample, {*_PER_TOKEN, *_VISION})
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
    samples (``unbatch``) and packed (``pack``) for the model of ``config``.

    The model must run sdpa, eager, flex or flash attention (``attention_implementation`` picks
    one), the ones transformers keeps inside each packed sample.
    """

    def __init__(self, collator, config):
        attention = getattr(config, "_attn_implementation", None)
        if attention is not None and attention not in _ATTENTION and "flash" not in attention:
            raise FusetuneError(
                f"packing needs sdpa, eager, flex or flash attention to keep samples apart; the model "
                f"runs {attention!r}: load it with attn_implementation={attention_implementation()!r}."
            )
        _settings(config)
        self.collator = collator
        self.config = config

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        return pack(unbatch(self.collator(samples), self.config), self.config)
