"""``mrope_position_ids`` against transformers' own ``get_rope_index`` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL).

Random batches of text, images and videos of different grids (vision tokens wrapped in
vision-start/end tokens, as the processors write them), with no, right or left padding; packed rows
against each sample's ids computed alone by transformers.
"""

from __future__ import annotations

import inspect
import random
from types import SimpleNamespace

import pytest
import torch

from fusetune.train.errors import FusetuneError
from fusetune.train.positions import mrope_position_ids, mrope_settings

TEXT, START, END, IMAGE, VIDEO = 1, 7, 8, 9, 10  # token ids; TEXT stands for any text token
MERGE = 2


def config(model_type: str):
    from transformers import AutoConfig

    vision = {"spatial_merge_size": MERGE}
    if model_type == "qwen2_5_vl":
        vision["tokens_per_second"] = 25
    return AutoConfig.for_model(
        model_type,
        vision_config=vision,
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=START,
    )


def model_class(model_type: str):
    import transformers

    return {
        "qwen2_vl": transformers.Qwen2VLModel,
        "qwen2_5_vl": transformers.Qwen2_5_VLModel,
        "qwen3_vl": transformers.Qwen3VLModel,
    }[model_type]


def reference(model_type, ids, images, videos, attention_mask=None, seconds=None):
    """transformers' get_rope_index, called on a stand-in ``self`` holding only the config."""
    cls = model_class(model_type)
    this = SimpleNamespace(
        config=config(model_type),
        get_vision_position_ids=lambda *args, **kwargs: cls.get_vision_position_ids(None, *args, **kwargs),
    )
    types = (ids == IMAGE).int() + 2 * (ids == VIDEO).int()
    extra = {"second_per_grid_ts": seconds} if seconds is not None else {}
    return cls.get_rope_index(
        this,
        ids,
        mm_token_type_ids=types,
        image_grid_thw=images,
        video_grid_thw=videos,
        attention_mask=attention_mask,
        **extra,
    )


def sample(rng: random.Random, frames_apart: bool, videos: bool = True):
    """(token ids, image grids, video grids) of one random sample: text runs with 0-3 images and
    (when ``videos``) 0-1 videos between them; Qwen3-VL's video frames each in their own run."""
    ids, images, clips = [TEXT] * rng.randint(1, 5), [], []
    kinds = ["image"] * rng.randint(0, 3) + (["video"] * rng.randint(0, 1) if videos else [])
    rng.shuffle(kinds)
    for kind in kinds:
        h, w = MERGE * rng.randint(1, 4), MERGE * rng.randint(1, 4)
        t = 1 if kind == "image" else rng.randint(1, 3)
        (images if kind == "image" else clips).append([t, h, w])
        tokens = (h // MERGE) * (w // MERGE)
        if kind == "video" and frames_apart:
            for _ in range(t):
                ids += [TEXT, START] + [VIDEO] * tokens + [END]
        else:
            ids += [START] + [IMAGE if kind == "image" else VIDEO] * (t * tokens) + [END]
        ids += [TEXT] * rng.randint(1, 6)
    return ids, images, clips


def grids(rows: list[list[int]]) -> torch.Tensor | None:
    return torch.tensor(rows, dtype=torch.long) if rows else None


def batch(rng: random.Random, rows: int, padding: str, frames_apart: bool):
    samples = [sample(rng, frames_apart) for _ in range(rows)]
    length = max(len(ids) for ids, _, _ in samples)
    ids = torch.zeros(rows, length, dtype=torch.long)
    mask = torch.zeros(rows, length, dtype=torch.long)
    for row, (tokens, _, _) in enumerate(samples):
        at = slice(length - len(tokens), length) if padding == "left" else slice(0, len(tokens))
        ids[row, at] = torch.tensor(tokens)
        mask[row, at] = 1
    images = grids([g for _, rows_, _ in samples for g in rows_])
    videos = grids([g for _, _, clips in samples for g in clips])
    return ids, images, videos, (None if padding == "none" else mask)


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_equals_transformers_get_rope_index(model_type, padding):
    rng = random.Random(f"{model_type}-{padding}")
    settings = mrope_settings(config(model_type))
    for _ in range(6):
        ids, images, videos, mask = batch(
            rng, 4, "right" if padding == "none" else padding, model_type == "qwen3_vl"
        )
        if padding == "none":  # equal lengths: fill the right padding with text
            ids[ids == 0] = TEXT
        ours, our_deltas = mrope_position_ids(ids, images, videos, attention_mask=mask, **settings)
        theirs, their_deltas = reference(model_type, ids, images, videos, attention_mask=mask)
        assert ours.dtype == torch.int64 and ours.shape == (3, *ids.shape)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        torch.testing.assert_close(our_deltas, their_deltas, rtol=0, atol=0)


def test_qwen2_5_vl_video_frame_spacing_by_seconds_per_grid():
    rng = random.Random(3)
    settings = mrope_settings(config("qwen2_5_vl"))
    ids, images, videos, mask = batch(rng, 6, "right", False)
    assert videos is not None and (videos[:, 0] > 1).any()
    whole = torch.tensor([2.0] * videos.shape[0])
    ours, _ = mrope_position_ids(
        ids, images, videos, attention_mask=mask, second_per_grid_ts=whole, **settings
    )
    torch.testing.assert_close(
        ours, reference("qwen2_5_vl", ids, images, videos, mask, whole)[0], rtol=0, atol=0
    )
    if "int(next(second_per_grid_ts))" in inspect.getsource(model_class("qwen2_5_vl").get_rope_index):
        pytest.skip("this transformers (5.17) truncates second_per_grid_ts to whole seconds")
    fractional = torch.tensor([0.5, 1.3, 0.25, 2.0, 0.7, 1.5][: videos.shape[0]])
    ours, _ = mrope_position_ids(
        ids, images, videos, attention_mask=mask, second_per_grid_ts=fractional, **settings
    )
    theirs, _ = reference("qwen2_5_vl", ids, images, videos, mask, fractional)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_packed_row_restarts_positions_per_sample(model_type):
    """A row of several samples back to back equals each sample's own ids, concatenated."""
    rng = random.Random(model_type)
    settings = mrope_settings(config(model_type))
    samples = [sample(rng, model_type == "qwen3_vl") for _ in range(5)]
    ids = torch.tensor([[token for tokens, _, _ in samples for token in tokens]])
    starts = torch.zeros_like(ids, dtype=torch.bool)
    expected, at = [], 0
    for tokens, images, clips in samples:
        starts[0, at] = True
        at += len(tokens)
        alone = torch.tensor([tokens])
        expected.append(reference(model_type, alone, grids(images), grids(clips))[0])
    images = grids([g for _, rows, _ in samples for g in rows])
    videos = grids([g for _, _, clips in samples for g in clips])
    ours, _ = mrope_position_ids(ids, images, videos, sequence_starts=starts, **settings)
    torch.testing.assert_close(ours, torch.cat(expected, dim=2), rtol=0, atol=0)


def test_packed_rows_with_padding_after_the_samples():
    """Two packed rows of different lengths, right padded: each row restarts per sample, padding is 0."""
    rng = random.Random(11)
    settings = mrope_settings(config("qwen2_vl"))
    rows = [[sample(rng, False, videos=False) for _ in range(n)] for n in (3, 2)]
    length = max(sum(len(t) for t, _, _ in row) for row in rows) + 3
    ids = torch.zeros(2, length, dtype=torch.long)
    mask, starts = torch.zeros_like(ids), torch.zeros_like(ids, dtype=torch.bool)
    expected = torch.zeros(3, 2, length, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for tokens, images, _ in row:
            span = slice(at, at + len(tokens))
            ids[r, span], mask[r, span], starts[r, at] = torch.tensor(tokens), 1, True
            expected[:, r, span] = reference("qwen2_vl", torch.tensor([tokens]), grids(images), None)[0][:, 0]
            at += len(tokens)
    images = grids([g for row in rows for _, rows_, _ in row for g in rows_])
    ours, _ = mrope_position_ids(ids, images, attention_mask=mask, sequence_starts=starts, **settings)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)


def test_text_only_rows_count_up():
    ids = torch.full((2, 6), TEXT)
    ours, deltas = mrope_position_ids(ids, spatial_merge_size=MERGE, image_token_id=IMAGE)
    torch.testing.assert_close(ours, torch.arange(6).expand(3, 2, 6))
    assert deltas.tolist() == [[0], [0]]


def test_mismatched_grids_name_the_fix():
    ids = torch.tensor([[TEXT, START, IMAGE, IMAGE, IMAGE, END]])
    settings = mrope_settings(config("qwen2_vl"))
    with pytest.raises(FusetuneError, match="image tokens in the input ids do not match image_grid_thw"):
        mrope_position_ids(ids, torch.tensor([[1, 2, 4]]), **settings)  # 2 tokens expected, 3 given
    with pytest.raises(FusetuneError, match="no image_grid_thw was given"):
        mrope_position_ids(ids, None, **settings)
    split = torch.tensor([[TEXT, START, IMAGE, END, IMAGE, END]])  # one grid of 2 tokens cut in two
    with pytest.raises(FusetuneError, match="each grid's tokens in one run"):
        mrope_position_ids(split, torch.tensor([[1, 2, 4]]), **settings)


def test_settings_only_for_mrope_models():
    from transformers import AutoConfig

    assert mrope_settings(AutoConfig.for_model("llama")) is None
    assert mrope_settings(config("qwen2_5_vl"))["tokens_per_second"] == 25
    assert mrope_settings(config("qwen2_vl"))["tokens_per_second"] is None
    assert mrope_settings(config("qwen3_vl"))["frames_as_images"] is True
