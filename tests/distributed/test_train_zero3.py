"""``fusetune train --nproc 2 --distributed.strategy deepspeed_zero3`` for real: two CPU processes
on DeepSpeed's CPU accelerator, collectives over gloo.

The embedded demo (a tiny random-weight Qwen2-VL) trains for two steps under ZeRO-3, with a
checkpoint and ``save_merged``; then a copy of that output folder is resumed for one more step.
Under ZeRO-3 a partitioned parameter is an empty placeholder outside its module's forward, so a
plain ``state_dict`` or ``save_pretrained`` would write empty tensors: what is saved must be
gathered. Nothing is held out: on a model this small an evaluation leaves every parameter gathered
(DeepSpeed releases them only past its live-parameter budget), and would hide a save that does not
gather (PEFT's ``save_pretrained`` on rank 0 alone then writes the partitioned ones empty). The
reference for what the run trained is DeepSpeed's own record of it: the fp32 weights
``zero_to_fp32`` reassembles from the two ranks' optimiser shards in the checkpoint, a path apart
from the gathering that wrote the adapter. Checked:

- the run is sharded: each rank's checkpoint shard holds a part of the trainable weights, neither
  all, and the engine's module state holds empty placeholders for every LoRA weight; both ranks take part,
  only rank 0 prints, and the output folder holds exactly the expected files;
- ``adapter/`` holds every trained LoRA weight, whole, equal to the weights reassembled from the
  shards and moved from PEFT's initialisation; loaded by PEFT on an unsharded demo model in this
  process, it gives the logits of that model with the reassembled weights put in by name;
- ``--resume`` continues from ``checkpoint-2`` (shared checks with FSDP2), with DeepSpeed's
  optimiser state restored: its Adam step count reaches 3;
- ``merged/`` loads with ``from_pretrained`` in one process, equals the adapter merged into the
  base here rounded to bfloat16, and gives the adapter model's logits within that rounding;
- a ZeRO-3 checkpoint is refused, naming the fix, by a resumption that cannot continue it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed.train_runs import (
    check_first_run,
    check_resumed,
    load_merged,
    run_args,
    sample_batches,
    train_and_resume,
    unsharded_with_adapter,
)

pytest.importorskip("deepspeed")

RUN = run_args("deepspeed_zero3", held_out=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The two-step run (``first``) and its copy resumed to step 3 (``resumed``), with their output."""
    return train_and_resume(tmp_path_factory.mktemp("zero3"), RUN)


def rank_states(checkpoint: Path, kind: str) -> list[dict]:
    """Each rank's DeepSpeed state file of ``kind`` (``optim`` or ``model``) in ``checkpoint``, in
    rank order."""
    tag = (checkpoint / "latest").read_text().strip()
    files = [checkpoint / tag / f"zero_pp_rank_{rank}_mp_rank_00_{kind}_states.pt" for rank in (0, 1)]
    return [torch.load(path, weights_only=False) for path in files]


def optimiser_shards(checkpoint: Path) -> list[dict]:
    """Each rank's ZeRO-3 optimiser state in ``checkpoint``: its fp32 weights and Adam's state."""
    return [state["optimizer_state_dict"] for state in rank_states(checkpoint, "optim")]


def reassembled(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The trained LoRA weights as DeepSpeed's ``zero_to_fp32`` rebuilds them from the ranks' fp32
    shards in ``checkpoint``, under the PEFT model's parameter names (``...lora_A.default.weight``)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    weights = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint))
    return {name: tensor for name, tensor in weights.items() if ".lora_" in name}


def adapter_names(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``weights`` under the names PEFT saves an adapter with (the adapter's name ``default`` dropped)."""
    return {name.replace(".default.", "."): tensor for name, tensor in weights.items()}


def test_both_ranks_train_sharded_and_only_rank_0_writes(runs):
    check_first_run(runs["first"], runs["first_run"])
    checkpoint = runs["first"] / "checkpoint-2"
    total = sum(tensor.numel() for tensor in reassembled(checkpoint).values())
    shards = optimiser_shards(checkpoint)
    assert all(shard["partition_count"] == 2 for shard in shards)
    held = [sum(group.numel() for group in shard["fp32_flat_groups"]) for shard in shards]
    assert all(0 < count < total for count in held) and sum(held) >= total
    for engine in rank_states(checkpoint, "model"):  # the module's own state_dict on each rank
        lora = {name: tensor for name, tensor in engine["module"].items() if ".lora_" in name}
        assert lora.keys() == reassembled(checkpoint).keys()
        assert all(tensor.numel() == 0 for tensor in lora.values())


def test_adapter_holds_the_trained_weights_gathered_from_the_shards(runs):
    from safetensors.torch import load_file

    first = runs["first"]
    expected = adapter_names(reassembled(first / "checkpoint-2"))
    for folder in (first / "adapter", first / "checkpoint-2"):
        saved = load_file(folder / "adapter_model.safetensors")
        assert saved.keys() == expected.keys()
        for name, tensor in expected.items():
            assert saved[name].shape == tensor.shape and saved[name].numel() > 0, name
            assert torch.equal(saved[name], tensor), name
    # PEFT starts every B at zero: each one moved in training.
    assert all(tensor.abs().max() > 0 for name, tensor in expected.items() if ".lora_B." in name)


def test_adapter_loads_in_one_process_with_the_trained_logits(runs):
    from fusetune.train.config import load_config
    from fusetune.train.model import load_model

    model = unsharded_with_adapter(runs["first"] / "adapter")
    trained, _ = load_model("demo", lora=load_config(None, RUN).lora, kernels="off")
    loaded = trained.load_state_dict(reassembled(runs["first"] / "checkpoint-2"), strict=False)
    assert not loaded.unexpected_keys and not any(".lora_" in name for name in loaded.missing_keys)
    trained.eval()
    with torch.no_grad():
        for batch in sample_batches(RUN):
            logits = model(**batch).logits
            torch.testing.assert_close(logits, trained(**batch).logits)
            with model.disable_adapter():
                assert (logits - model(**batch).logits).abs().max() > 1.0


def test_resume_continues_from_the_saved_step_with_deepspeeds_optimiser_state(runs):
    from safetensors.torch import load_file

    check_resumed(runs)
    # A fresh optimiser would count one step; the restored one counts on from the checkpoint's two.
    for shard in optimiser_shards(runs["resumed"] / "checkpoint-3"):
        steps = [state["step"].item() for state in shard["optimizer_state_dict"]["state"].values()]
        assert steps and all(step == 3 for step in steps)
    saved = load_file(runs["resumed"] / "adapter" / "adapter_model.safetensors")
    expected = adapter_names(reassembled(runs["resumed"] / "checkpoint-3"))
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[name], tensor) for name, tensor in expected.items())


def test_merged_weights_load_in_one_process(runs):
    merged = load_merged(runs["first"])
    model = unsharded_with_adapter(runs["first"] / "adapter")
    with torch.no_grad():
        for batch in sample_batches(RUN):
            logits = model(**batch).logits
            with model.disable_adapter():
                moved = (logits - model(**batch).logits).abs().max()
            # The adapter's change of the logits survives the bfloat16 rounding to within 2%.
            assert (merged(**batch).logits - logits).abs().max() < 0.02 * moved


def test_resume_refuses_a_zero3_checkpoint_it_cannot_continue(runs, monkeypatch):
    from fusetune.train.config import load_config
    from fusetune.train.errors import FusetuneError
    from fusetune.train.runs import resume_checkpoint

    checkpoint = str(runs["first"] / "checkpoint-2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resume_checkpoint(load_config(None, [*RUN, "--resume", checkpoint]), print) == checkpoint
    with pytest.raises(FusetuneError, match="by 2 processes.*only DeepSpeed.*deepspeed_zero3 and --nproc 2"):
        resume_checkpoint(load_config(None, ["--resume", checkpoint]), print)
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(FusetuneError, match=r"by 2 processes.*--nproc 2 \(this run has 1\)"):
        resume_checkpoint(load_config(None, [*RUN, "--resume", checkpoint]), print)
