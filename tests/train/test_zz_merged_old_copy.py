"""``save_merged: true``: the shortened demo writes ``merged/``, a plain transformers model folder
whose forward is the adapter's, merged into the base weights and rounded to 16 bits."""

from __future__ import annotations

import os
import subprocess
import sys

import torch


def test_save_merged_loads_with_from_pretrained_and_matches_the_adapter(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from fusetune.train import demo
    from fusetune.train.collator import ChatCollator

    out = tmp_path / "run"
    argv = ["--max_steps", "5", "--demo_samples", "40", "--batch_size", "8", "--eval_split", "0"]
    argv += ["--show_samples", "0", "--save_steps", "100", "--save_merged", "true", "--output_dir", str(out)]
    result = subprocess.run(
        [sys.executable, "-m", "fusetune", "train", *argv],
        capture_output=True,
        text=True,
        timeout=240,
        env=os.environ.copy(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "merged weights" in result.stdout
    assert (out / "merged" / "config.json").is_file()

    merged = AutoModelForImageTextToText.from_pretrained(out / "merged", dtype=torch.float32).eval()
    assert type(merged).__name__ == "Qwen2VLForConditionalGeneration"
    processor = demo.build_processor()
    batch = ChatCollator(processor, 64, demo.IMAGE_SIZE**2)(demo.samples(4, seed=7))

    base = demo.build_model(processor.tokenizer)  # the same random base weights every time
    adapted = PeftModel.from_pretrained(base, out / "adapter").eval()
    with torch.no_grad():
        peft_logits = adapted(**batch).logits
        with adapted.disable_adapter():
            base_logits = adapted(**batch).logits
        reference = adapted.merge_and_unload().eval()
        # merged/ holds bfloat16 weights: round the reference's weights alike (only the parameters;
        # buffers such as the rotary frequencies are recomputed in float32 by from_pretrained).
        for parameter in reference.parameters():
            parameter.copy_(parameter.to(torch.bfloat16).float())
        expected = reference(**batch).logits
        got = merged(**batch).logits
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-4
    # The adapter is in there (not the base weights), up to the 16-bit rounding.
    assert (got - peft_logits).abs().max().item() < 0.1
    assert (peft_logits - base_logits).abs().max().item() > 10 * (got - peft_logits).abs().max().item()
