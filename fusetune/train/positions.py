"""M-RoPE position ids of the Qwen2-VL family, computed with tensor ops instead of per-token Python.

Qwen2-VL, Qwen2.5-VL and Qwen3-VL rotate queries and keys by three position ids per token
(temporal, height, width). Text tokens get the same id on all three rows, counting up by one; the
tokens of an image or video get ``start + (t, h, w)`` over its merged patch grid, and the text after
it resumes at ``start + max(h, w)``. transformers computes this in ``get_rope_index`` with a Python
loop over the rows and ``itertools.groupby`` over every token (``tolist`` on the host) on each
forward; ``mrope_position_ids`` gives the same ids from a handful of whole-batch tensor ops, so the
collator can compute them once per batch and pass them to the model as ``position_ids`` (a model
given ``position_ids`` skips its own computation).

How it works: the image tokens of the flattened batch, in order, are the grids' tokens one grid
after another (transformers numbers ``image_grid_thw`` the same way), so each token's grid and
offset inside it, hence its (t, h, w), come from repeating per-grid values; each token adds an
increment to a running position (1 for text, ``max(h, w)`` on the last token of a grid, 0
elsewhere), so the positions a row's tokens start from are an exclusive cumulative sum, reset at
each packed sample's first token (``sequence_starts``).

The semantics are those of transformers 5 (``mm_token_type_ids`` grouping): after a video, text
resumes at ``start + max(h, w)`` whatever its number of frames, and Qwen2.5-VL spaces a video's
frames by ``int(t * tokens_per_second * second_per_grid_ts)``. (transformers 5.17 truncated
``second_per_grid_ts`` to an integer first; whole seconds agree with both.)
"""

from __future__ import annotations

import torch

from fusetune.train.errors import FusetuneError

_MROPE_MODELS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def mrope_settings(config) -> dict | None:
    """The keyword arguments of ``mrope_position_ids`` for a model config; None for models without M-RoPE.

    ``config`` is a transformers config of the model (or of a PEFT-wrapped model's base model).
    Qwen2.5-VL adds ``tokens_per_second`` (its videos' temporal spacing); Qwen3-VL's videos are
    placed frame by frame (each frame is its own grid between timestamp tokens).
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in _MROPE_MODELS:
        return None
    vision = config.vision_config
    return {
        "spatial_merge_size": vision.spatial_merge_size,
        "image_token_id": config.image_token_id,
        "video_token_id": config.video_token_id,
        "tokens_per_second": getattr(vision, "tokens_per_second", None)
        if model_type == "qwen2_5_vl"
        else None,
        "frames_as_images": model_type == "qwen3_vl",
    }


def _vision_tokens(
    kind: str,
    is_token: torch.Tensor,
    grids: torch.Tensor | None,
    merge: int,
    interval: torch.Tensor | int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``is_token`` tokens of one modality (images or videos) as (their flat indices in the batch,
    their (t, h, w) offsets ``(3, n)``, the flat index of each grid's last token, ``max(h, w)`` of
    each grid: the running text position's increment there).

    ``interval`` (one per grid, or a plain int) spaces the temporal offsets. The count and the
    contiguity of each grid's tokens are checked (a few host syncs per call, none per token).
    """
    where = is_token.reshape(-1).nonzero().squeeze(1)
    count = 0 if grids is None else grids.shape[0]
    if count == 0:
        if where.numel():
            raise FusetuneError(
                f"the input ids hold {where.numel()} {kind} tokens but no {kind}_grid_thw was given; pass "
                f"the processor's {kind}_grid_thw with the input ids."
            )
        empty = where.new_zeros(0)
        return where, where.new_zeros(3, 0), empty, empty
    grids = grids.to(device=where.device, dtype=torch.long)
    t, h, w = grids[:, 0], grids[:, 1] // merge, grids[:, 2] // merge
    sizes = t * h * w
    ends = sizes.cumsum(0)
    expected = int(ends[-1])
    row_length = is_token.shape[-1]
    matched = where.numel() == expected
    if matched:
        first, last = where[ends - sizes], where[ends - 1]
        matched = bool(((last - first + 1 == sizes) & (first // row_length == last // row_length)).all())
    if not matched:
        raise FusetuneError(
            f"the {kind} tokens in the input ids do not match {kind}_grid_thw ({where.numel()} tokens for "
            f"{expected} expected from {count} grids of merge size {merge}, each grid's tokens in one "
            f"run); pass the input ids and {kind}_grid_thw the processor made together."
        )
    # Per token: its grid's (first index in ``where``, h * w, w, h), gathered in one indexing.
    table = torch.stack([ends - sizes, h * w, w, h], 1).repeat_interleave(sizes, 0, output_size=expected)
    offset = torch.arange(expected, device=where.device) - table[:, 0]
    t_offset = offset // table[:, 1]
    if isinstance(interval, torch.Tensor):
        t_offset = (
            t_offset.to(interval.dtype) * interval.repeat_interleave(sizes, output_size=expected)
        ).long()
    else:
        t_offset = t_offset * interval
    offsets = torch.stack([t_offset, (offset // table[:, 2]) % table[:, 3], offset % table[:, 2]])
    return where, offsets, last, torch.maximum(h, w)


def mrope_position_ids(
    input_ids: torch.Tensor,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    *,
    spatial_merge_size: int,
    image_token_id: int,
    video_token_id: int | None = None,
    attention_mask: torch.Tensor | None = None,
    second_per_grid_ts: torch.Tensor | list[float] | None = None,
    tokens_per_second: float | None = None,
    frames_as_images: bool = False,
    sequence_starts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(position ids ``(3, batch, seq)`` int64, rope deltas ``(batch, 1)``) as transformers'
    ``get_rope_index`` of Qwen2-VL / Qwen2.5-VL / Qwen3-VL computes them (see the module docstring).

    ``input_ids`` ``(batch, seq)``; ``image_grid_thw`` / ``video_grid_thw`` ``(n, 3)`` patch grids in
    the order the images / videos appear in the flattened batch; ``attention_mask`` ``(batch, seq)``
    (padding, left or right, gets position 0 and is skipped); ``tokens_per_second`` (Qwen2.5-VL)
    with ``second_per_grid_ts`` (one per video, default 1) spaces video frames;
    ``frames_as_images`` (Qwen3-VL) places each video frame as its own grid. ``sequence_starts``
    ``(batch, seq)`` bool marks the first token of each sample packed into a row: positions restart
    there, so each sample gets the ids it would get alone. ``mrope_settings(config)`` gives the
    keyword arguments for a model. The deltas (max position + 1 - length, per row) are what
    generation adds to text positions; they are meaningless for packed rows.
    """
    if input_ids.dim() != 2:
        raise FusetuneError(
            f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}; add a batch dimension."
        )
    device = input_ids.device
    valid = (
        torch.ones_like(input_ids, dtype=torch.bool)
        if attention_mask is None
        else attention_mask.to(device).bool()
    )
    is_image = (input_ids == image_token_id) & valid
    is_video = (
        (input_ids == video_token_id) & valid if video_token_id is not None else torch.zeros_like(is_image)
    )
    interval: torch.Tensor | int = 1
    if video_grid_thw is not None:
        if frames_as_images:
            video_grid_thw = torch.repeat_interleave(video_grid_thw, video_grid_thw[:, 0], dim=0)
            video_grid_thw = torch.cat([torch.ones_like(video_grid_thw[:, :1]), video_grid_thw[:, 1:]], 1)
        elif tokens_per_second is not None:
            seconds = (
                torch.ones(video_grid_thw.shape[0], dtype=torch.long)
                if second_per_grid_ts is None
                else torch.as_tensor(second_per_grid_ts)
            )
            interval = tokens_per_second * seconds.to(device)
    images = _vision_tokens("image", is_image, image_grid_thw, spatial_merge_size, 1)
    videos = _vision_tokens("video", is_video, video_grid_thw, spatial_merge_size, interval)
    where, offsets, lasts, jumps = (torch.cat(parts, -1) for parts in zip(images, videos, strict=True))
    increment = (valid & ~is_image & ~is_video).long().reshape(-1)  # 1 per text token
    increment[lasts] = jumps
    increment = increment.view_as(input_ids)
    start = increment.cumsum(1).sub_(increment)  # each token's running position, before its own increment
    if sequence_starts is not None:
        starts = sequence_starts.to(device).bool().clone()
        starts[:, 0] = True
        columns = torch.arange(input_ids.shape[1], device=device).expand_as(input_ids)
        first = torch.where(starts, columns, 0).cummax(1).values
        start.sub_(start.gather(1, first))
    position_ids = start.masked_fill_(~valid, 0).expand(3, -1, -1).clone()
    position_ids.view(3, -1)[:, where] += offsets
    deltas = (position_ids.amax(dim=(0, 2)) + 1 - valid.sum(1)).unsqueeze(1)
    return position_ids, deltas
