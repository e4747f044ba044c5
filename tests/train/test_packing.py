"""Packed rows against the unpacked padded batch: same loss and gradients, samples kept apart.

Models: the offline tiny Qwen2-VL of the demo (sdpa), a tiny Qwen2.5-VL built from a config over the
same processor, a tiny Llama (1-D positions); each with sdpa's block-diagonal mask and with
``fusetune_varlen`` (``use_packed_attention``, no mask at all). References: the padded batch
through the same model in sdpa, each sample collated alone, transformers' own ``get_rope_index``.
"""

from __future__ import annotations

import pytest
import torch

from fusetune.train import demo, varlen
from fusetune.train.collator import IGNORE, ChatCollator
from fusetune.train.errors import FusetuneError
from fusetune.train.packing import (
    PackingCollator,
    attention_implementation,
    boundaries,
    pack,
    unbatch,
    use_packed_attention,
)

SIZES = {0: (84, 112), 2: (112, 56), 3: (56, 56)}  # images of different grids; sample 1 has none


@pytest.fixture(scope="module")
def processor():
    return demo.build_processor(max_pixels=112 * 112)


@pytest.fixture(scope="module")
def collator(processor):
    return ChatCollator(processor, max_seq_length=512)


@pytest.fixture(scope="module")
def samples():
    """Four chat samples: images of three sizes, one with two images, one with none."""
    out = demo.samples(4, seed=5)
    for index, size in SIZES.items():
        content = out[index]["messages"][0]["content"]
        content[0]["image"] = content[0]["image"].resize(size)
    out[1]["messages"][0]["content"] = [{"type": "text", "text": "what is in the picture ?"}]
    out[2]["messages"][0]["content"].insert(
        0, {"type": "image", "image": out[3]["messages"][0]["content"][0]["image"]}
    )
    return out


def qwen2_5_vl(tokenizer):
    """A tiny Qwen2.5-VL with the demo's vocabulary and token ids (its processor input is Qwen2-VL's)."""
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    base = demo.model_config(tokenizer)
    config = AutoConfig.for_model(
        "qwen2_5_vl",
        text_config=base.text_config.to_dict(),
        vision_config=dict(
            depth=2,
            hidden_size=64,
            out_hidden_size=128,
            intermediate_size=128,
            num_heads=4,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,
            fullatt_block_indexes=[1],
        ),
        **{key: getattr(base, key) for key in ("image_token_id", "video_token_id", "vision_start_token_id")},
    )
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(config)


def loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_training_step(model, padded, packed):
    loss, grads = loss_and_grads(model, padded)
    packed_loss, packed_grads = loss_and_grads(model, packed)
    torch.testing.assert_close(packed_loss, loss, rtol=1e-5, atol=1e-6)
    assert packed_grads.keys() == grads.keys() and len(grads) > 10
    for name, grad in grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_packed_loss_and_gradients_equal_the_padded_batch(processor, collator, samples, family):
    model = demo.build_model(processor.tokenizer) if family == "qwen2_vl" else qwen2_5_vl(processor.tokenizer)
    model.train()
    packed = PackingCollator(collator, model.config)(samples)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    assert packed["position_ids"].shape == (4, *packed["input_ids"].shape)
    assert_same_training_step(model, collator(samples), packed)


def test_packed_loss_through_fusetune_apply(processor, collator, samples):
    import fusetune

    model = demo.build_model(processor.tokenizer)
    model.train()
    expected, _ = loss_and_grads(model, collator(samples))
    fusetune.apply(model)
    loss, _ = loss_and_grads(model, PackingCollator(collator, model.config)(samples))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("changed", [0, 2])
def test_samples_do_not_see_each_other(processor, collator, samples, changed):
    """Changing one sample's answer tokens and image changes its own logits only, not those of the
    samples before or after it in the row."""
    model = demo.build_model(processor.tokenizer).eval()
    order = [samples[i] for i in ((1, 0, 2) if changed == 0 else (0, 2, 1))]  # the changed one mid-row
    parts = unbatch(collator(order), model.config)
    edited = [dict(part) for part in parts]
    ids = edited[1]["input_ids"].clone()
    answer = edited[1]["labels"] != IGNORE
    ids[answer] = ids[answer].flip(0)
    edited[1]["input_ids"] = ids
    edited[1]["pixel_values"] = edited[1]["pixel_values"] + 0.5
    with torch.no_grad():
        before = model(**pack(parts, model.config)).logits[0]
        after = model(**pack(edited, model.config)).logits[0]
    first, second = (part["input_ids"].shape[1] for part in parts[:2])
    mine = slice(first, first + second)
    for other in (slice(0, first), slice(first + second, None)):
        torch.testing.assert_close(after[other], before[other], rtol=0, atol=1e-6)
    assert not torch.allclose(after[mine], before[mine], atol=1e-3)


def test_unbatch_gives_each_sample_as_collated_alone(processor, collator, samples):
    config = demo.model_config(processor.tokenizer)
    parts = unbatch(collator(samples), config)
    assert len(parts) == len(samples)
    for part, sample in zip(parts, samples, strict=True):
        alone = collator([sample])
        alone.pop("attention_mask")
        assert part.keys() == alone.keys()
        for key, value in alone.items():
            torch.testing.assert_close(part[key], value, rtol=0, atol=0, msg=key)


def test_packed_row_positions_labels_and_images(processor, collator, samples):
    """Positions restart per sample (text row: 0..n-1; M-RoPE rows: transformers' ids of the sample
    alone), labels are -100 on each sample's first token, images stay in order."""
    model = demo.build_model(processor.tokenizer)
    parts = unbatch(collator(samples), model.config)
    row = pack(parts, model.config)
    at = 0
    for part in parts:
        n = part["input_ids"].shape[1]
        alone, _ = model.model.get_rope_index(
            part["input_ids"], part["mm_token_type_ids"], image_grid_thw=part.get("image_grid_thw")
        )
        torch.testing.assert_close(row["position_ids"][0, 0, at : at + n], torch.arange(n))
        torch.testing.assert_close(row["position_ids"][1:, :, at : at + n], alone, rtol=0, atol=0)
        assert row["labels"][0, at] == IGNORE
        torch.testing.assert_close(row["labels"][0, at + 1 : at + n], part["labels"][0, 1:])
        at += n
    assert at == row["input_ids"].shape[1]
    with_images = [part for part in parts if "pixel_values" in part]
    assert len(with_images) == 3 and len({tuple(g) for g in row["image_grid_thw"].tolist()}) == 3
    torch.testing.assert_close(row["pixel_values"], torch.cat([p["pixel_values"] for p in with_images]))
    torch.testing.assert_close(row["image_grid_thw"], torch.cat([p["image_grid_thw"] for p in with_images]))


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def text_samples(lengths=(9, 17, 5, 12)):
    generator = torch.Generator().manual_seed(1)
    out = []
    for index, n in enumerate(lengths):
        ids = torch.randint(1, 64, (1, n), generator=generator)
        labels = ids.clone()
        if index % 2:  # a prompt that is not learned; the others learn from their first token on
            labels[0, : n // 3] = IGNORE
        out.append({"input_ids": ids, "labels": labels})
    return out


def padded(samples):
    length = max(s["input_ids"].shape[1] for s in samples)
    batch = {
        "input_ids": torch.zeros(len(samples), length, dtype=torch.long),
        "labels": torch.full((len(samples), length), IGNORE),
        "attention_mask": torch.zeros(len(samples), length, dtype=torch.long),
    }
    for row, sample in enumerate(samples):
        n = sample["input_ids"].shape[1]
        batch["input_ids"][row, :n] = sample["input_ids"][0]
        batch["labels"][row, :n] = sample["labels"][0]
        batch["attention_mask"][row, :n] = 1
    return batch


def test_text_model_packed_equals_padded_with_1d_positions():
    model = tiny_llama().train()
    samples = text_samples()
    row = pack(samples, model.config)
    torch.testing.assert_close(
        row["position_ids"], torch.cat([torch.arange(n) for n in (9, 17, 5, 12)])[None]
    )
    assert_same_training_step(model, padded(samples), row)
    # HF Trainer's num_items_in_batch: the label tokens past each row's first, the same count packed
    count = padded(samples)["labels"][:, 1:].ne(IGNORE).sum()
    assert (
        row["labels"][:, 1:].ne(IGNORE).sum()
        == count
        == sum(s["labels"][0, 1:].ne(IGNORE).sum() for s in samples)
    )
    assert unbatch(padded(samples), model.config)[1]["input_ids"].shape == (1, 17)


def test_text_model_samples_do_not_see_each_other():
    model = tiny_llama().eval()
    samples = text_samples()
    changed = [dict(s) for s in samples]
    changed[1]["input_ids"] = (samples[1]["input_ids"] + 1) % 64
    with torch.no_grad():
        before = model(**pack(samples, model.config)).logits[0]
        after = model(**pack(changed, model.config)).logits[0]
    torch.testing.assert_close(after[:9], before[:9], rtol=0, atol=1e-6)
    torch.testing.assert_close(after[26:], before[26:], rtol=0, atol=1e-6)
    assert not torch.allclose(after[9:26], before[9:26], atol=1e-3)


def test_unsupported_inputs_name_the_fix(processor):
    from transformers import AutoConfig

    config = demo.model_config(processor.tokenizer)
    sample = {**text_samples()[0], "cross_attention_mask": torch.ones(1, 9, 1, 4)}
    with pytest.raises(FusetuneError, match="cross_attention_mask.*packing: false"):
        pack([sample], config)
    with pytest.raises(FusetuneError, match="not 'llava'.*packing: false"):
        pack(text_samples(), AutoConfig.for_model("llava"))
    with pytest.raises(FusetuneError, match="split a collated batch with unbatch"):
        pack([padded(text_samples())], config)
    config.text_config._attn_implementation = "paged|sdpa"
    with pytest.raises(
        FusetuneError, match="use_packed_attention.*attn_implementation='(fusetune_varlen|flash)"
    ):
        PackingCollator(None, config)


def test_pack_leaves_out_empty_samples_and_takes_an_all_ones_mask():
    """An empty sample adds nothing (first, middle or last: the row is the one without it); a
    processor's all-ones attention_mask is dropped; a padded sample, or an empty one with an image,
    names the fix."""
    config = tiny_llama().config
    samples = text_samples()
    empty = {"input_ids": torch.zeros(1, 0, dtype=torch.long), "labels": torch.zeros(1, 0, dtype=torch.long)}
    expected = pack(samples, config)
    for at in (0, 2, 4):
        row = pack([*samples[:at], empty, *samples[at:]], config)
        assert row.keys() == expected.keys()
        for key in ("input_ids", "labels", "position_ids"):
            torch.testing.assert_close(row[key], expected[key], rtol=0, atol=0)
    masked = [{**sample, "attention_mask": torch.ones_like(sample["input_ids"])} for sample in samples]
    torch.testing.assert_close(pack(masked, config)["input_ids"], expected["input_ids"], rtol=0, atol=0)
    masked[1]["attention_mask"][0, -2:] = 0
    with pytest.raises(FusetuneError, match="sample 1 is padded.*unbatch"):
        pack(masked, config)
    with pytest.raises(FusetuneError, match="nothing to pack"):
        pack([empty], config)
    with_image = {**empty, "pixel_values": torch.zeros(4, 8), "image_grid_thw": torch.tensor([[1, 2, 2]])}
    with pytest.raises(FusetuneError, match="sample 0 has no tokens but has image"):
        pack([with_image, *samples], demo.model_config(demo.build_processor().tokenizer))
    padding_row = {"input_ids": torch.zeros(2, 6, dtype=torch.long), "labels": torch.full((2, 6), IGNORE),
                   "attention_mask": torch.tensor([[1] * 6, [0] * 6])}
    # the all-padding row left out
    assert pack(unbatch(padding_row, config), config)["input_ids"].shape == (1, 6)


def test_pack_refuses_a_sample_whose_patches_are_not_its_grids(processor, collator, samples):
    """Rows of pixel_values moved from one sample to another keep the total right: packed, the first
    sample's image would silently be made of the next one's patches."""
    config = demo.model_config(processor.tokenizer)
    parts = unbatch(collator(samples), config)
    first, last = parts[0], parts[3]
    moved = int(last["pixel_values"].shape[0])
    joined = torch.cat([first["pixel_values"], last["pixel_values"]])
    parts[0] = {**first, "pixel_values": joined[: len(joined) - 2 * moved]}
    parts[3] = {**last, "pixel_values": joined[len(joined) - 2 * moved :]}
    wanted = int(first["image_grid_thw"].prod(-1).sum())
    with pytest.raises(FusetuneError, match=f"sample 0 has {wanted - moved} rows of pixel_values where its "
                                            f"image_grid_thw takes {wanted}"):
        pack(parts, config)


def test_video_samples_without_seconds_take_transformers_default_among_samples_with_them():
    """Qwen2.5-VL: one video sample gives second_per_grid_ts, the next does not. Each sample's M-RoPE
    ids in the row are transformers' get_rope_index of that sample alone (no seconds: 1 a video)."""
    from tests.train.test_positions import END, MERGE, START, TEXT, VIDEO, config, reference

    def video_sample(grid, seconds=None):
        t, h, w = grid
        ids = [TEXT] * 3 + [START] + [VIDEO] * (t * h * w // MERGE**2) + [END] + [TEXT] * 2
        ids = torch.tensor([ids])
        sample = {"input_ids": ids, "mm_token_type_ids": 2 * (ids == VIDEO).int(),
                  "video_grid_thw": torch.tensor([grid]), "pixel_values_videos": torch.zeros(t * h * w, 8)}
        if seconds is not None:
            sample["second_per_grid_ts"] = torch.tensor([seconds])
        return sample

    samples = [video_sample([2, 4, 4], seconds=2.0), video_sample([3, 2, 4])]
    row = pack(samples, config("qwen2_5_vl"))
    torch.testing.assert_close(row["second_per_grid_ts"], torch.tensor([2.0, 1.0]))
    at = 0
    for sample in samples:
        n = sample["input_ids"].shape[1]
        alone, _ = reference("qwen2_5_vl", sample["input_ids"], None, sample["video_grid_thw"],
                             seconds=sample.get("second_per_grid_ts"))
        torch.testing.assert_close(row["position_ids"][1:, :, at : at + n], alone, rtol=0, atol=0)
        at += n


def tiny_text_model(model_type: str, attention: str = "sdpa", **settings):
    """A tiny random ``model_type`` language model (float64, training mode, ``attention``) of the test
    vocabulary."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type, vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **settings
    )
    config._attn_implementation = attention
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).double().train()


@pytest.mark.parametrize(
    "model_type, settings",
    [
        ("mistral", dict(sliding_window=4)),
        ("gemma3_text", dict(head_dim=16, sliding_window=4, query_pre_attn_scalar=16)),
        ("gemma2", dict(head_dim=16, sliding_window=4, query_pre_attn_scalar=16, attn_logit_softcapping=50.0,
                        attention="eager")),
    ],
)
def test_sliding_window_and_softcapped_models_pack_as_their_samples_alone(model_type, settings):
    """Samples longer than the sliding window (Mistral, Gemma 3) pack under fusetune_varlen, which
    keeps the window; Gemma 2's soft-capped attention scores, which it does not compute, pack under
    the eager attention use_packed_attention picks for it, and asking fusetune_varlen names that.
    Reference: each sample alone, its loss over the batch's label count (num_items_in_batch)."""
    model = tiny_text_model(model_type, **settings)
    samples = text_samples()
    items = sum(int(sample["labels"][0, 1:].ne(IGNORE).sum()) for sample in samples)
    model.zero_grad()
    expected_loss = sum(model(**sample, num_items_in_batch=items).loss for sample in samples)
    expected_loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    chosen = use_packed_attention(model)
    assert chosen == ("eager" if model_type == "gemma2" else attention_implementation())
    row = pack(samples, model.config)
    if chosen == varlen.NAME:
        row.update(boundaries([s["input_ids"].shape[1] for s in samples]))
    loss, got = loss_and_grads(model, {**row, "num_items_in_batch": items})
    # float64 maths, but Gemma's norms round through float32: within 1e-6 of each gradient's scale
    torch.testing.assert_close(loss, expected_loss.detach(), rtol=1e-6, atol=1e-9)
    assert got.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=0, atol=1e-6 * grad.abs().max().item(), msg=name)
    if model_type == "gemma2":
        with pytest.raises(FusetuneError, match="use_packed_attention\\(model, 'eager'\\)"):
            use_packed_attention(model, varlen.NAME)


def test_attention_implementation_prefers_flash_varlen(monkeypatch):
    import importlib.util

    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    flash = torch.cuda.is_available() and importlib.util.find_spec("flash_attn")
    assert attention_implementation() == ("flash_attention_2" if flash else varlen.NAME)
    assert (
        varlen.NAME in AttentionInterface._global_mapping
        and varlen.NAME in AttentionMaskInterface._global_mapping
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "flash_attn" else None)
    assert attention_implementation() == "flash_attention_2"


# ------------------------------------------------------------------------------------------------
# fusetune_varlen: the same training step without any mask.


def record_attention(monkeypatch):
    """Record every call of the fusetune_varlen and sdpa attention functions (which implementation,
    the module's class, whether a mask came, whether the sample boundaries came) and every mask
    fusetune_varlen's mask function returned."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    calls, masks = [], []
    for name in (varlen.NAME, "sdpa"):

        def record(
            module,
            query,
            key,
            value,
            attention_mask,
            *args,
            _name=name,
            _run=ALL_ATTENTION_FUNCTIONS[name],
            **kwargs,
        ):
            calls.append((_name, type(module).__name__, attention_mask is None, "cu_seq_lens_q" in kwargs))
            return _run(module, query, key, value, attention_mask, *args, **kwargs)

        monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._local_mapping, name, record)

    def record_mask(*args, _run=ALL_MASK_ATTENTION_FUNCTIONS[varlen.NAME], **kwargs):
        masks.append(_run(*args, **kwargs))
        return masks[-1]

    monkeypatch.setitem(ALL_MASK_ATTENTION_FUNCTIONS._local_mapping, varlen.NAME, record_mask)
    return calls, masks


def with_lora(model):
    """``model`` with LoRA on every linear layer, the B matrices random (zero B would leave A without
    gradient)."""
    from fusetune.train.config import LoraSettings
    from fusetune.train.model import add_lora

    model = add_lora(model, LoraSettings(r=4))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model.train()


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llama"])
def test_varlen_packed_loss_and_lora_gradients_equal_the_padded_batch(
    processor, collator, samples, family, monkeypatch
):
    """With fusetune_varlen on the language model: the packed row's loss and every LoRA gradient
    are the padded batch's under sdpa; the attention got the collator's boundaries and no mask (the
    mask function returned None), and the vision tower ran sdpa."""
    if family == "llama":
        base, batch, collate = tiny_llama(), text_samples(), padded
    else:
        base = (
            demo.build_model(processor.tokenizer) if family == "qwen2_vl" else qwen2_5_vl(processor.tokenizer)
        )
        batch, collate = samples, collator
    model = with_lora(base)
    expected_loss, expected = loss_and_grads(model, collate(batch))
    assert use_packed_attention(model) == varlen.NAME  # no flash_attn here
    config = base.config
    assert config.get_text_config()._attn_implementation == varlen.NAME
    if family != "llama":
        assert config.vision_config._attn_implementation == "sdpa"
    padded_loss, _ = loss_and_grads(model, collate(batch))  # padding: sdpa with its mask
    torch.testing.assert_close(padded_loss, expected_loss, rtol=1e-6, atol=1e-7)
    row = PackingCollator(collate, config)(batch)
    lengths = [part["input_ids"].shape[1] for part in unbatch(collate(batch), config)]
    assert row["cu_seq_lens_q"].dtype == torch.int32 and row["cu_seq_lens_q"].tolist() == [
        sum(lengths[:i]) for i in range(len(lengths) + 1)
    ]
    assert (
        row["max_length_q"] == row["max_length_k"] == max(lengths)
        and row["cu_seq_lens_k"] is row["cu_seq_lens_q"]
    )
    calls, masks = record_attention(monkeypatch)
    loss, grads = loss_and_grads(model, row)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == expected.keys() and len(grads) > 10 and all("lora_" in name for name in grads)
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert masks and all(mask is None for mask in masks)  # no (row x row) mask was built
    text = [call for call in calls if "Vision" not in call[1]]
    assert len(text) == config.get_text_config().num_hidden_layers
    assert all(call == (varlen.NAME, call[1], True, True) for call in text)
    vision = [call for call in calls if "Vision" in call[1]]
    assert (family == "llama") != bool(vision) and all(call[0] == "sdpa" for call in vision)


def test_varlen_without_boundaries_reads_the_text_positions(processor, collator, samples):
    """A packed row without cu_seq_lens (``pack`` alone) gives the same loss: the attention finds the
    samples where the text position ids restart."""
    model = demo.build_model(processor.tokenizer).train()
    expected, _ = loss_and_grads(model, collator(samples))
    use_packed_attention(model)
    row = pack(unbatch(collator(samples), model.config), model.config)
    assert "cu_seq_lens_q" not in row
    loss, _ = loss_and_grads(model, row)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_varlen_model_still_generates(processor, collator, samples):
    """Generation with a cache (decoding one query against the cached keys) under fusetune_varlen
    gives the sdpa model's tokens and logits."""
    model = demo.build_model(processor.tokenizer).eval()
    inputs, _ = collator.prompt(samples[0])
    settings = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        expected = model.generate(**inputs, **settings)
        use_packed_attention(model)
        got = model.generate(**inputs, **settings)
    torch.testing.assert_close(got.sequences, expected.sequences, rtol=0, atol=0)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), rtol=1e-5, atol=1e-5)


def test_boundaries_and_which_collators_pass_them(processor):
    given = boundaries([3, 1, 4])
    assert given.keys() == {"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"}
    assert given["cu_seq_lens_q"].dtype == torch.int32 and given["cu_seq_lens_q"].tolist() == [0, 3, 4, 8]
    assert (
        given["cu_seq_lens_k"].tolist() == [0, 3, 4, 8]
        and given["max_length_q"] == given["max_length_k"] == 4
    )
    config = demo.model_config(processor.tokenizer)
    assert not PackingCollator(None, config).with_boundaries  # sdpa: the position ids do it
    config.text_config._attn_implementation = "flash_attention_2"
    assert PackingCollator(None, config).with_boundaries
    config.vision_config._attn_implementation = "flash_attention_2"  # 5.17 hands them to the vision tower too
    assert not PackingCollator(None, config).with_boundaries


def test_use_packed_attention_refuses_the_vlms_pack_refuses():
    """Gemma 3's image tokens attend both ways; under fusetune_varlen an unpadded row's mask came back
    None and they attended causally (logits 3.8e-2 off at the image tokens), silently. The VLMs that
    ``pack`` refuses are now refused where packed attention is set, as ``pack`` refuses them."""
    from tests.patch.vlm_models import tiny_vlm

    model = tiny_vlm("gemma3", "sdpa")
    with pytest.raises(FusetuneError, match="supports text models and the Qwen2-VL family, not 'gemma3'"):
        use_packed_attention(model)
    assert model.config.get_text_config()._attn_implementation == "sdpa"
