"""The end-to-end benchmark's logic on CPU: tiny models through the whole orchestrator path.

The orchestrator runs each case in its own process and must keep going when one dies: a stand-in
``liger_kernel`` whose patch function kills its process is put on the workers' path, and the hf and
fusetune workers beside it must still record their results, with the same step-1 loss (identical
weights and batch). The protocol's numbers (FLOPs, inputs, the Unsloth tokenizer) are checked in
process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import e2e
import e2e_models
import pytest
import torch

from tests.bench import BENCH, FAKE_LIGER

# r=16 LoRA on the tiny models' 2 layers: L8's q, o 64->64, k, v 64->32; G12's q 64->128 and o back
# (heads of 32, not 64 / 4), k, v 64->64; both gate, up, down 64<->96.
TINY_LORA = {"L8": 2 * 16 * (2 * 128 + 2 * 96 + 3 * 160), "G12": 2 * 16 * (2 * 192 + 2 * 128 + 3 * 160)}


@pytest.mark.parametrize(("config", "model", "systems"), [("L8-4k", "L8", ("hf", "liger", "fusetune")),
                                                      ("G12", "G12", ("hf", "fusetune"))])
def test_orchestrator_records_every_case_and_survives_a_crashed_worker(tmp_path, config, model, systems):
    """Every case's records, a worker's crash (L8's fake Liger) recorded as such; G12 without it,
    its plumbing and its loss only (one worker less to start)."""
    (tmp_path / "fake" / "liger_kernel").mkdir(parents=True)
    (tmp_path / "fake" / "liger_kernel" / "__init__.py").write_text("")
    (tmp_path / "fake" / "liger_kernel" / "transformers.py").write_text(FAKE_LIGER)
    path = os.pathsep.join([str(tmp_path / "fake"), os.environ.get("PYTHONPATH", "")])
    # fusetune's ops run their PyTorch references on CPU tensors (its kernels are tested in tests/ops).
    env = {**os.environ, "PYTHONPATH": path, "TRITON_INTERPRET": "0"}
    out = tmp_path / "e2e-cpu.jsonl"
    out.write_text("")  # records are appended to what is there
    subprocess.run([sys.executable, str(BENCH / "e2e.py"), "--tiny", "--out", str(out), "--configs", config,
                    "--systems", ",".join(systems), "--steps", "1,1", "--timeout", "120"],
                   env=env, check=True, timeout=170)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    by_system = {system: {row["metric"]: row for row in rows if row["system"] == system}
                 for system in systems}
    assert len(rows) == len(systems) * len(e2e.METRICS)
    for system in ("hf", "fusetune"):
        speed = by_system[system]["tokens_per_s"]
        assert speed["value"] > 0, speed
        assert len(speed["step_s"]) == 2 and speed["config"] == {"model": model, "tokens": 64,
                                                                   "variant": "bf16_lora", "tiny": True}
        assert by_system[system]["loss"]["trainable_params"] == TINY_LORA[model]
    assert by_system["fusetune"]["loss"]["value"] == pytest.approx(by_system["hf"]["loss"]["value"], rel=1e-4)
    if "liger" not in systems:
        return
    for row in by_system["liger"].values():
        assert row["value"] is None and row["error"] == "worker exited 3: fake liger crash"
    assert (tmp_path / "e2e-cpu-logs" / f"{config}-bf16_lora-liger.log").exists()


def test_a_worker_past_its_timeout_is_killed(tmp_path):
    status, _ = e2e.run_process([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "log", 1)
    assert status is None


def test_flops_per_token_of_llama_8b():
    """4 x 7.50 B matmul parameters + 6 x 4096 x 4096 attention FLOPs a layer over 32 layers."""
    model = e2e_models.models(tiny=False)["L8"]
    matmul = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336) + 128256 * 4096
    assert e2e_models.flops_per_token(model, 4096) == 4 * matmul + 6 * 4096 * 4096 * 32
    assert 3.2e10 < e2e_models.flops_per_token(model, 4096) < 3.4e10


def test_flops_per_token_of_gemma3_12b_count_the_sliding_window():
    """Gemma 3 12B: q and o are 3840 x 16 heads x 256 (not 3840^2), the tied head counts once, and
    the 40 sliding layers attend to at most 1,024 keys: a mean of 1024 - 1024^2 / (2 x 4096) = 896
    keys a query at 4,096 tokens, against the 8 global layers' 2,048."""
    model = e2e_models.models(tiny=False)["G12"]
    matmul = 48 * (2 * 3840 * 4096 + 2 * 3840 * 2048 + 3 * 3840 * 15360) + 262208 * 3840
    attention = 6 * 16 * 256 * (8 * 4096 + 40 * 2 * 896)
    assert e2e_models.flops_per_token(model, 4096) == 4 * matmul + attention
    # Up to the window, sliding layers attend as global ones do.
    short = 6 * 16 * 256 * 48 * 1024
    assert e2e_models.flops_per_token(model, 1024) == 4 * matmul + short
    assert e2e_models.attended_span(4096, None) == 4096 and e2e_models.attended_span(512, 1024) == 512


def test_gemma3_12b_is_the_published_text_model_and_the_tiny_one_slides():
    """11.77 B parameters (the 12B's text part: its vision tower is the rest), tied head; five
    sliding layers then a global one. The tiny model's window (16) is shorter than its 64 tokens."""
    from transformers import AutoModelForCausalLM

    models = e2e_models.models(tiny=False), e2e_models.models(tiny=True)
    config = models[0]["G12"].spec.config()
    with torch.device("meta"):
        built = AutoModelForCausalLM.from_config(config)
    assert type(built).__name__ == "Gemma3ForCausalLM"
    assert built.lm_head.weight is built.model.embed_tokens.weight
    assert sum(param.numel() for param in built.parameters()) == 11_766_034_176
    assert config.layer_types[:6] == ["sliding_attention"] * 5 + ["full_attention"]
    assert config.layer_types.count("full_attention") == 8 and config.sliding_window == 1024
    assert config.rope_parameters["full_attention"]["factor"] == 8.0
    tiny = models[1]["G12"].spec.config()
    assert tiny.layer_types == ["sliding_attention", "full_attention"]
    assert tiny.sliding_window < e2e_models.tokens_of("G12", tiny=True)
    assert tiny.head_dim * tiny.num_attention_heads != tiny.hidden_size
    assert e2e_models.lora_targets(models[1]["G12"]) == list(e2e_models.LORA_TARGETS)


def test_qwen_inputs_mask_the_image_and_count_4096_tokens():
    model = e2e_models.models(tiny=False)["Q7VL"]
    batch = e2e_models.inputs(model, 4096, tiny=False)
    config = model.spec.config()
    image = batch["input_ids"] == config.image_token_id
    assert batch["input_ids"].shape == (1, 4096) and int(image.sum()) == 1369
    assert batch["pixel_values"].shape == (74 * 74, 3 * 2 * 14 * 14)
    assert batch["image_grid_thw"].tolist() == [[1, 74, 74]]
    assert int((batch["labels"] == -100).sum()) == 1369 + 2  # the image and its begin / end tokens
    assert torch.equal(batch["mm_token_type_ids"].bool(), image)


def test_mllama_inputs_are_four_tiles_behind_one_image_token():
    model = e2e_models.models(tiny=False)["M11"]
    batch = e2e_models.inputs(model, 4096, tiny=False)
    assert batch["pixel_values"].shape == (1, 1, 4, 3, 560, 560)
    assert batch["input_ids"][0, 1] == model.spec.config().image_token_index
    assert batch["aspect_ratio_ids"].tolist() == [[6]]  # 2 x 2 tiles
    assert batch["aspect_ratio_mask"].tolist() == [[[1, 1, 1, 1]]]
    assert batch["cross_attention_mask"][0, :, 0].sum(0).tolist() == [4095] * 4
    assert (batch["labels"][0, :256] == -100).all() and (batch["labels"][0, 256:] >= 0).all()


@pytest.mark.parametrize("name", ["L8", "Q7VL", "M11", "G12"])
def test_unsloth_tokenizer_fits_the_embedding_and_pads_apart_from_eos(name):
    config = e2e_models.models(tiny=True)[name].spec.config()
    tokenizer = e2e_models.tokenizer(config)
    text = config.get_text_config()
    rows = text.vocab_size + (8 if name == "M11" else 0)  # Mllama embeds 8 extra rows
    assert text.vocab_size <= len(tokenizer) <= rows
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    image_id = getattr(config, "image_token_id", None)
    if image_id is not None:
        assert tokenizer.convert_ids_to_tokens(image_id).startswith("<|image")
    if name == "G12":  # Gemma's ids: <pad> 0, <eos> 1 (the first of EOS 1 and <end_of_turn> 106), <bos> 2
        assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id) == (0, 1, 2)
        assert tokenizer.unk_token_id == 3 and len(tokenizer) == text.vocab_size


@pytest.mark.parametrize("name", ["M11", "G12"])
def test_saved_folder_holds_the_same_weights_and_a_tokenizer(tmp_path, name):
    """Unsloth loads this folder: its weights must be those every other worker builds (G12's output
    head tied to its embedding in both)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    model = e2e_models.models(tiny=True)[name]
    e2e_models.save_folder(model, tmp_path, torch.float32)
    auto = AutoModelForImageTextToText if model.vlm else AutoModelForCausalLM
    loaded = auto.from_pretrained(tmp_path, local_files_only=True)
    built = e2e_models.build(model, torch.float32)
    reference = built.state_dict()
    assert loaded.state_dict().keys() == reference.keys()
    assert all(torch.equal(tensor, reference[name]) for name, tensor in loaded.state_dict().items())
    if name == "G12":
        assert built.lm_head.weight is built.model.embed_tokens.weight
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    tokenizer = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert tokenizer.pad_token == "<|pad|>" and (tmp_path / "complete").exists()


def test_fusetune_variants_are_recorded_and_labelled():
    """--recompute-attention marks fusetune's records (and only fusetune's), and the report names it."""
    import report

    plain = e2e.Case("L8-4k", "bf16_lora", "fusetune-graph").record_config(tiny=False)
    recomputed = e2e.Case("L8-4k", "bf16_lora", "fusetune-graph", recompute_attention=True)
    config = recomputed.record_config(tiny=False)
    assert "keep_attention" not in plain and config["keep_attention"] is False and config["graph"] is True
    assert "keep_attention" not in e2e.Case("L8-4k", "bf16_lora", "unsloth",
                                            recompute_attention=True).record_config(tiny=False)
    label = report.e2e_label({"system": "fusetune", "config": config})
    assert label == "fusetune (graph) (attention recomputed)"
    assert report.e2e_label({"system": "fusetune", "config": plain}) == "fusetune (graph)"


@pytest.mark.parametrize(("choice", "recorded", "suffix"),
                         [("auto", None, ""), ("always", True, " (projections kept)"),
                          ("never", False, " (projections recomputed)")])
def test_keep_projections_choices_are_recorded_and_labelled(choice, recorded, suffix):
    """--keep-projections auto (enable_checkpointing's default) leaves fusetune's records as they
    were; always and never mark them, and only fusetune's, and the report names the choice."""
    import report

    config = e2e.Case("L8-4k", "bf16_lora", "fusetune", keep_projections=choice).record_config(tiny=False)
    assert config.get("keep_projections", None) is recorded
    assert "keep_projections" not in e2e.Case("L8-4k", "bf16_lora", "unsloth",
                                              keep_projections=choice).record_config(tiny=False)
    assert report.e2e_label({"system": "fusetune", "config": config}) == "fusetune" + suffix
    assert e2e.KEEP_PROJECTIONS[choice] is recorded
