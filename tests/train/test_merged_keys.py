"""``save_merged`` in process, without a training run: every tensor of the ``merged/`` folder it writes,
loaded back with ``from_pretrained``, is the base as trained plus the LoRA update, rounded once to 16 bits.

Fast enough for every CI run, and it covers what the slow end-to-end test (test_merged.py) cannot see
on a CPU: a bfloat16 run (what ``dtype: auto`` trains in on a GPU) merges into its bfloat16 base, and
nothing is renamed, dropped, re-initialised, tied or re-typed between the merge and the load.
"""

from __future__ import annotations

import pytest
import torch


def lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """PEFT's LoRA layers of ``model`` by their name in the plain (unwrapped) model."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    return {name: module for name, module in base.named_modules() if isinstance(module, LoraLayer)}


def randomise_lora_b(model: torch.nn.Module) -> None:
    """Non-zero LoRA B matrices (PEFT starts them at zero), drawn from a fixed seed: a trained adapter,
    its update a few 16-bit steps of the base weights."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in lora_layers(model).values():
            weight = module.lora_B["default"].weight
            weight.copy_(torch.randn(weight.shape, generator=generator) * 0.01)


def merged_by_hand(model: torch.nn.Module, half: torch.dtype) -> dict[str, torch.Tensor]:
    """What ``merged/`` should hold, by name: each base parameter as the run holds it, plus
    ``scaling * B @ A`` where LoRA adapts it, summed in float32 and rounded once to ``half``."""
    layers = lora_layers(model)
    expected = {}
    with torch.no_grad():
        for name, parameter in model.get_base_model().named_parameters():
            if ".lora_" in name:
                continue
            expected[name.replace(".base_layer.", ".")] = parameter.float()
        for name, module in layers.items():
            a, b = module.lora_A["default"].weight.float(), module.lora_B["default"].weight.float()
            expected[f"{name}.weight"] = expected[f"{name}.weight"] + module.scaling["default"] * (b @ a)
    return {name: tensor.to(half) for name, tensor in expected.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_every_saved_tensor_round_trips_to_the_merge(tmp_path, dtype):
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText

    from fusetune.train import demo
    from fusetune.train.model import load_model
    from fusetune.train.runner import save_merged

    model, processor = load_model("demo", dtype=str(dtype).removeprefix("torch."), lora={"r": 4, "alpha": 8})
    randomise_lora_b(model)
    config = model.get_base_model().config
    expected = merged_by_hand(model, torch.bfloat16)
    path = save_merged(model, processor, tmp_path / "merged", dtype)

    with safe_open(str(path / "model.safetensors"), "pt") as saved:
        assert {saved.get_slice(name).get_dtype() for name in saved.keys()} == {"BF16"}
    loaded, info = AutoModelForImageTextToText.from_pretrained(
        path, dtype=torch.float32, output_loading_info=True
    )
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    state = loaded.state_dict()
    assert sorted(state) == sorted(expected)
    differing = [name for name, tensor in expected.items() if not torch.equal(state[name], tensor.float())]
    assert not differing, f"merged/ differs from the merge in {differing}"
    # The output head stays its own matrix, and the positions are encoded as in the trained model.
    text = loaded.config.text_config
    assert loaded.config.tie_word_embeddings is False and text.tie_word_embeddings is False
    assert loaded.lm_head.weight.data_ptr() != loaded.get_input_embeddings().weight.data_ptr()
    assert text.rope_parameters == config.text_config.rope_parameters
    fresh = dict(demo.build_model(processor.tokenizer).named_buffers())  # float32 buffers from the config
    buffers = dict(loaded.named_buffers())
    assert sorted(buffers) == sorted(fresh)
    assert all(torch.equal(buffers[name], fresh[name]) for name in fresh)
