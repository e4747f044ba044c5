"""Runner switches of the fused paths: ``packing: true`` (packed rows) and ``mlp_tile_rows``."""

from __future__ import annotations

import torch

from fusetune.train.config import load_config


def test_packing_run_trains_on_packed_rows(tmp_path, monkeypatch):
    import fusetune.train.packing as packing
    from fusetune.train.runner import train

    rows = []
    real_pack = packing.pack

    def recording(samples, config):
        batch = real_pack(samples, config)
        rows.append((len(samples), tuple(batch["input_ids"].shape), int((batch["labels"] != -100).sum())))
        return batch

    monkeypatch.setattr(packing, "pack", recording)
    small = ["--demo_samples", "16", "--batch_size", "4", "--eval_split", "0", "--show_samples", "0"]
    options = ["--max_steps", "3", "--output_dir", str(tmp_path), "--packing", "true"]
    config = load_config(None, [*small, *options])
    result = train(config, quiet=True)
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.final_loss))
    # The fail-fast batch plus one per training step, each one row holding all four samples.
    assert len(rows) >= 4 and all(n == 4 and shape[0] == 1 and labels > 0 for n, shape, labels in rows)


def test_mlp_tile_rows_reaches_the_fused_lora_mlps():
    from fusetune.nn.lora import FusedLoraMLP
    from fusetune.train.model import load_model

    model, _ = load_model("demo", mlp_tile_rows=8)
    mlps = [m for m in model.modules() if isinstance(m, FusedLoraMLP)]
    assert mlps and all(m.tile_rows == 8 for m in mlps)
    assert load_config(None, ["--mlp_tile_rows", "8"]).mlp_tile_rows == 8
