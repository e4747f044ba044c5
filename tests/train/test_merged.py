"""``save_merged: true``: the shortened demo writes ``merged/``, a plain transformers model folder
whose forward is the adapter's, merged into the base weights and rounded to 16 bits.

The base the adapter is merged into is the one the run trained: ``dtype: auto`` trains in bfloat16
on a GPU that has it (its base weights already rounded to bfloat16) and in float32 on a CPU. The
reference below rounds the demo base's parameters alike; merging into the float32 base instead
differs from a bfloat16 run's merge by one bfloat16 step in most merged weights (about 0.05 in the
logits), which is the base's own rounding, not a fault of the merge.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch


def test_save_merged_loads_with_from_pretrained_and_matches_the_adapter(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from fusetune.train import demo
    from fusetune.train.collator import ChatCollator
    from fusetune.train.model import resolve_dtype

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
    round_parameters(base, resolve_dtype("auto"))  # as the run above trained them
    adapted = PeftModel.from_pretrained(base, out / "adapter").eval()
    with torch.no_grad():
        peft_logits = adapted(**batch).logits
        with adapted.disable_adapter():
            base_logits = adapted(**batch).logits
        reference = adapted.merge_and_unload().eval()
        round_parameters(reference, torch.bfloat16)  # merged/ holds bfloat16 weights
        expected = reference(**batch).logits
        got = merged(**batch).logits
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-4
    # The adapter is in there (not the base weights), up to the 16-bit rounding.
    assert (got - peft_logits).abs().max().item() < 0.1
    assert (peft_logits - base_logits).abs().max().item() > 10 * (got - peft_logits).abs().max().item()


def round_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Round ``model``'s parameters to ``dtype`` in place, keeping them float32: the base weights a run
    in ``dtype`` trains on. Buffers stay as they are (``from_pretrained`` recomputes the rotary
    frequencies in float32 whatever the weights' dtype)."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.to(dtype).float())


@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None,
    reason="load_in_4bit needs a CUDA GPU and bitsandbytes",
)
def test_a_4bit_run_merges_its_adapter_into_the_base_loaded_in_16_bits(tmp_path):
    """``load_in_4bit`` with ``save_merged``: merged/ is the adapter merged into the base loaded again
    in 16 bits. It used to merge into the 4-bit weights (quantising the merge) and then fail at the
    run's very end: bitsandbytes refuses the cast to 16 bits."""
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tests.train.test_model_loading import save_llm

    model_dir = save_llm(tmp_path / "llm")
    chat = [{"role": "user", "content": "what shape ?"}, {"role": "assistant", "content": "a red circle ."}]
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps({"messages": chat}) for _ in range(8)) + "\n")
    out = tmp_path / "run"
    argv = ["--model", str(model_dir), "--dataset", str(tmp_path / "chat.jsonl"), "--load_in_4bit", "true"]
    argv += ["--max_steps", "2", "--batch_size", "2", "--eval_split", "0", "--show_samples", "0"]
    argv += ["--save_merged", "true", "--learning_rate", "1e-2", "--warmup", "0", "--output_dir", str(out)]
    result = subprocess.run(
        [sys.executable, "-m", "fusetune", "train", *argv], capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr[-3000:]
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    original = {name: value.clone() for name, value in base.state_dict().items() if "q_proj.weight" in name}
    expected = PeftModel.from_pretrained(base, out / "adapter").merge_and_unload().state_dict()
    got = merged.state_dict()
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(got[name], value.to(torch.bfloat16)), name
    assert original and not all(torch.equal(got[name], value) for name, value in original.items())
