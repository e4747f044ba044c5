"""Runner switches of the fused paths: ``packing: true`` (packed rows) and ``mlp_tile_rows``."""

from __future__ import annotations

import torch

from fusetune.train.config import load_config


def test_packing_run_trains_on_packed_rows(tmp_path, monkeypatch):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    import fusetune.train.packing as packing
    from fusetune.train.runner import train
    from fusetune.train.varlen import NAME, register

    rows = []
    real_pack = packing.pack

    def recording(samples, config):
        batch = real_pack(samples, config)
        rows.append((len(samples), tuple(batch["input_ids"].shape), int((batch["labels"] != -100).sum())))
        return batch

    monkeypatch.setattr(packing, "pack", recording)
    # The language model's attention: fusetune_varlen (no flash_attn here), given the samples'
    # boundaries and no mask.
    register()
    calls = []

    def attention(
        module, query, key, value, attention_mask, *args, _run=ALL_ATTENTION_FUNCTIONS[NAME], **kwargs
    ):
        calls.append((attention_mask is None, "cu_seq_lens_q" in kwargs, query.shape[2]))
        return _run(module, query, key, value, attention_mask, *args, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._local_mapping, NAME, attention)
    small = ["--demo_samples", "16", "--batch_size", "4", "--eval_split", "0", "--show_samples", "0"]
    options = ["--max_steps", "3", "--output_dir", str(tmp_path), "--packing", "true"]
    config = load_config(None, [*small, *options])
    result = train(config, quiet=True)
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.final_loss))
    # The fail-fast batch plus one per training step, each one row holding all four samples.
    assert len(rows) >= 4 and all(n == 4 and shape[0] == 1 and labels > 0 for n, shape, labels in rows)
    packed_lengths = {shape[1] for _, shape, _ in rows}
    assert calls and all(no_mask and boundaries for no_mask, boundaries, _ in calls)
    assert {length for _, _, length in calls} <= packed_lengths


def test_mlp_tile_rows_reaches_the_fused_lora_mlps():
    from fusetune.nn.lora import FusedLoraMLP
    from fusetune.train.model import load_model

    model, _ = load_model("demo", mlp_tile_rows=8)
    mlps = [m for m in model.modules() if isinstance(m, FusedLoraMLP)]
    assert mlps and all(m.tile_rows == 8 for m in mlps)
    assert load_config(None, ["--mlp_tile_rows", "8"]).mlp_tile_rows == 8
