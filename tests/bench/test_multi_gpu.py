"""bench/multi_gpu.py's logic on CPU: its orchestrators launch two-process torchrun workers over gloo.

The equality check (tiny Llama, float32, a few steps) under FSDP2, and under ZeRO-3 where DeepSpeed
is installed (else its "deepspeed not installed" record), must find the sharded run equal to the
single-process one to float32 rounding (the tiny Llama with 4-bit base weights too, under FSDP2),
and so must the noise reference (the batch's halves one after another, gradients accumulated) be.
The accumulation itself is checked on a toy model with plain SGD, where a wrong scaling would show.
The verdict is max(fixed bound, NOISE_FACTOR x noise floor) on made-up numbers. The scaling run
(tiny L8 stand-in) must record tokens/s on 1 and 2 processes and a scaling ratio, while a stand-in
``liger_kernel`` whose patch function kills its processes makes the liger cases fail with that error
and the rest still run. A second call of the same command skips what succeeded, in the same dtype
only: its bf16 case runs (in bf16, on CPU) and is judged against its own noise floor. ``--trace``
writes each process's profiled step. The report writes both tables.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import multi_gpu
import pytest
import torch
import trace_summary

from tests.bench import BENCH, FAKE_LIGER


def run(args: list[str], tmp_path: Path) -> str:
    """``bench/multi_gpu.py *args`` with the stand-in liger on the path and fusetune's ops on their
    PyTorch references (its kernels are tested in tests/ops); its output."""
    fake = tmp_path / "fake" / "liger_kernel"
    fake.mkdir(parents=True, exist_ok=True)
    (fake / "__init__.py").write_text("")
    (fake / "transformers.py").write_text(FAKE_LIGER)
    path = os.pathsep.join([str(tmp_path / "fake"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, str(BENCH / "multi_gpu.py"), *args], env=env,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> tuple[Path, list[dict], Path]:
    """The records of one equality and one scaling call, and the folder they ran in."""
    folder = tmp_path_factory.mktemp("multi_gpu")
    out = folder / "multi-gpu-cpu.jsonl"
    run(["equality", "--models", "tiny", "--engines", "fsdp2,zero3", "--steps", "3", "--out", str(out),
         "--timeout", "120"], folder)
    run(["scale", "--tiny", "--configs", "L8-4k", "--systems", "liger,fusetune", "--gpus", "1,2",
         "--steps", "1,2", "--out", str(out), "--timeout", "120"], folder)
    return out, [json.loads(line) for line in out.read_text().splitlines()], folder


def pick(rows: list[dict], **match) -> dict[str, dict]:
    """{metric: record} of the records whose config has the ``match`` items (system too)."""
    system = match.pop("system", None)
    return {row["metric"]: row for row in rows if (system is None or row["system"] == system)
            and all(row["config"].get(key) == value for key, value in match.items())}


def check_noise_floors(records: dict[str, dict], dtype: str) -> None:
    """Every record carries its noise floor, a finite number, and the verdict is the value against
    max(fixed bound of ``dtype``, NOISE_FACTOR x noise floor)."""
    for metric, row in records.items():
        noise = row["noise_floor"]
        assert isinstance(noise, float) and math.isfinite(noise), row
        assert row["fixed_tolerance"] == multi_gpu.TOLERANCES[dtype][metric]
        assert row["tolerance"] == pytest.approx(max(row["fixed_tolerance"], multi_gpu.NOISE_FACTOR * noise))
        assert row["within_tolerance"] == (row["value"] <= row["tolerance"])
        assert math.isfinite(row["diff_from_noise_reference"])


def test_sharded_training_equals_one_process_in_float32(results):
    _, rows, _ = results
    fsdp2 = pick(rows, check="equality", engine="fsdp2")
    assert set(fsdp2) == set(multi_gpu.EQUALITY_METRICS)
    assert fsdp2["loss_max_rel_diff"]["config"] == {"check": "equality", "model": "tiny", "engine": "fsdp2",
                                                    "gpus": 2, "batch": 4, "tokens": 64, "steps": 3,
                                                    "dtype": "fp32"}
    losses = fsdp2["loss_max_rel_diff"]["reference_losses"]
    assert len(losses) == 3 and losses[-1] < losses[0]  # it trained
    assert len(fsdp2["loss_max_rel_diff"]["noise_losses"]) == 3
    assert fsdp2["lora_update_rel_diff"]["update_norm"] > 0  # the adapters moved
    for row in fsdp2.values():
        assert row["value"] < 1e-5 and row["within_tolerance"], row
        # The noise reference (the halves one after another, gradients accumulated) equals the
        # whole-batch reference to float32 rounding, and FSDP2 does its arithmetic.
        assert row["noise_floor"] < 1e-5 and row["diff_from_noise_reference"] < 1e-6, row
    check_noise_floors(fsdp2, "fp32")


def test_zero3_equals_one_process_or_says_deepspeed_is_missing(results):
    _, rows, _ = results
    zero3 = pick(rows, check="equality", engine="zero3")
    assert set(zero3) == set(multi_gpu.EQUALITY_METRICS)
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        assert all(row["error"] == "deepspeed not installed" for row in zero3.values())
        return
    for row in zero3.values():
        assert row["value"] < 1e-4 and row["within_tolerance"], row
        assert row["noise_floor"] < 1e-5, row
    check_noise_floors(zero3, "fp32")


class ToyLM(torch.nn.Module):
    """An embedding and a head, with transformers' loss: cross-entropy summed over the shifted
    labels, divided by ``num_items_in_batch``."""

    def __init__(self, vocab: int):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(vocab, 16)
        self.head = torch.nn.Linear(16, vocab)

    def forward(self, input_ids, labels, num_items_in_batch):
        logits = self.head(self.embed(input_ids))[:, :-1].flatten(0, 1)
        loss = torch.nn.functional.cross_entropy(logits, labels[:, 1:].flatten(), ignore_index=-100,
                                                 reduction="sum")
        return SimpleNamespace(loss=loss / num_items_in_batch)


def toy_training(parts: int, average: int, sgd: bool) -> tuple[list[float], dict]:
    """multi_gpu's training loop over the tiny batch in ``parts`` parts, the gradients divided by
    ``average``, with AdamW or (``sgd``) plain SGD, whose step follows the gradient's scale (AdamW's
    hardly does); (losses, final weights)."""
    batch = multi_gpu.global_batch("tiny")
    model = ToyLM(multi_gpu.EQUALITY_SPECS["tiny"].config().vocab_size)
    optimiser = multi_gpu.AdamW(model, average=average)
    if sgd:
        optimiser.optimizer = torch.optim.SGD(optimiser.params, lr=5.0)
    pieces = [multi_gpu.part_of(batch, index, parts) for index in range(parts)]
    assert sum(len(piece["labels"]) for piece in pieces) == multi_gpu.EQUALITY_BATCH
    losses = multi_gpu.train(model, optimiser, pieces, multi_gpu.label_count(batch), parts, 3, "fp32")
    return losses.tolist(), {name: param.detach().clone() for name, param in model.named_parameters()}


@pytest.mark.parametrize("sgd", [False, True], ids=["adamw", "sgd"])
def test_the_accumulated_halves_equal_the_whole_batch_to_float32_rounding(sgd):
    """The noise reference's arithmetic (each half's loss over the whole batch's label count times 2,
    gradients accumulated, then averaged) is the whole batch's gradient: the same training, to
    float32 rounding; without the averaging, SGD's steps come out twice as long."""
    whole_losses, whole = toy_training(parts=1, average=1, sgd=sgd)
    halves_losses, halves = toy_training(parts=2, average=2, sgd=sgd)
    assert whole_losses[-1] < whole_losses[0]  # it trained
    assert halves_losses == pytest.approx(whole_losses, rel=1e-6)
    for name in whole:
        torch.testing.assert_close(halves[name], whole[name], rtol=1e-5, atol=1e-6)
    if sgd:
        _, unaveraged = toy_training(parts=2, average=1, sgd=True)
        assert (unaveraged["head.weight"] - whole["head.weight"]).abs().max() > 1e-3


def test_scaling_records_and_a_crashed_system_recorded_as_failed(results):
    _, rows, folder = results
    for gpus in (1, 2):
        fusetune = pick(rows, system="fusetune", model="L8", gpus=gpus)
        expected = {"model": "L8", "tokens": 64, "variant": "bf16_lora", "engine": "fsdp2", "gpus": gpus}
        assert fusetune["tokens_per_s_per_gpu"]["config"] == {**expected, "tiny": True}
        per_gpu = fusetune["tokens_per_s_per_gpu"]["value"]
        assert per_gpu > 0 and fusetune["tokens_per_s"]["value"] == pytest.approx(gpus * per_gpu)
        assert len(fusetune["loss"]["per_rank"]) == gpus and len(fusetune["loss"]["losses"]) == 3
        assert fusetune["peak_allocated_gib"]["error"] == multi_gpu.NO_CUDA  # no CUDA here
        liger = pick(rows, system="liger", model="L8", gpus=gpus)
        assert set(liger) == set(multi_gpu.SCALE_METRICS)
        # The error ends with the workers' last line before torchrun's report: the crash message,
        # unless the other process printed after it.
        assert all(row["value"] is None and row["error"].startswith("launch exited 1: ")
                   for row in liger.values())
        log = folder / "multi-gpu-cpu-logs" / f"scale-L8-4k-liger-fsdp2-{gpus}gpu.log"
        assert "fake liger crash" in log.read_text()
    one, two = (pick(rows, system="fusetune", gpus=gpus)["tokens_per_s"]["value"] for gpus in (1, 2))
    scaling = pick(rows, system="fusetune", gpus="1->2")["scaling"]
    assert scaling["value"] == pytest.approx(two / one) and scaling["target"] == pytest.approx(1.8)
    assert pick(rows, system="liger", gpus="1->2")["scaling"]["value"] is None


def test_a_second_call_skips_what_succeeded_in_the_same_dtype_only(results, tmp_path):
    """fp32 succeeded in the first call: skipped. bf16 (on CPU processes: bf16 weights, CPU autocast)
    is another case: it runs, the worker trains in bf16 and judges it against its own noise floor."""
    out, rows, _ = results
    copy = tmp_path / out.name
    shutil.copy(out, copy)
    again = ["equality", "--models", "tiny", "--engines", "fsdp2", "--dtypes", "fp32,bf16", "--steps", "3",
             "--out", str(copy)]
    output = run(again, tmp_path)
    assert "equality-tiny-fsdp2-fp32: done earlier, skipped" in output
    assert "equality-tiny-fsdp2-bf16: done earlier" not in output
    added = [json.loads(line) for line in copy.read_text().splitlines()][len(rows):]
    bf16 = pick(added, check="equality", engine="fsdp2")
    assert len(added) == 3 and set(bf16) == set(multi_gpu.EQUALITY_METRICS)
    assert all(row["config"]["dtype"] == "bf16" for row in added)
    assert (tmp_path / f"{copy.stem}-logs" / "equality-tiny-fsdp2-bf16.log").exists()
    # Trained in bf16, not in float32 under another name: its losses and noise are bf16's.
    fp32 = pick(rows, check="equality", engine="fsdp2")
    bf16_losses = bf16["loss_max_rel_diff"]["reference_losses"]
    assert bf16_losses != pytest.approx(fp32["loss_max_rel_diff"]["reference_losses"], rel=1e-5)
    assert bf16["lora_update_rel_diff"]["noise_floor"] > 1e-3  # bf16 rounding, far above float32's
    check_noise_floors(bf16, "bf16")
    for row in bf16.values():
        assert row["within_tolerance"], row


def test_the_dtype_option_defaults_by_device_and_reaches_every_job():
    args = multi_gpu.parse_args(["equality", "--out", "x.jsonl", "--models", "tiny",
                                 "--engines", "fsdp2,zero3", "--dtypes", "bf16,fp32"])
    jobs = multi_gpu.equality_jobs(args)
    assert [job.slug for job in jobs] == ["equality-tiny-fsdp2-bf16", "equality-tiny-zero3-bf16",
                                          "equality-tiny-fsdp2-fp32", "equality-tiny-zero3-fp32"]
    for job in jobs:
        assert job.argv[job.argv.index("--dtype") + 1] == job.config["dtype"] == job.slug.rsplit("-", 1)[1]
    default = "bf16" if torch.cuda.is_available() else "fp32"
    assert multi_gpu.parse_args(["equality", "--out", "x.jsonl"]).dtypes == [default]
    worker = multi_gpu.parse_args(["equality", "--worker", "--model", "tiny", "--engine", "fsdp2"])
    assert worker.dtype == default
    with pytest.raises(SystemExit):
        multi_gpu.parse_args(["equality", "--out", "x.jsonl", "--dtypes", "fp16"])


def test_the_4bit_check_quantises_the_base_and_trains_it_under_fsdp2(tmp_path):
    """tiny-nf4: every projection a bitsandbytes 4-bit layer storing its bytes in the weights' dtype
    (the head left whole), and FSDP2 over two processes equal to one process in float32."""
    bnb = pytest.importorskip("bitsandbytes")
    model = multi_gpu.lora_model("tiny-nf4", "fp32")
    quantised = [name for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)]
    assert len(quantised) == 2 * 7 and not any("lm_head" in name for name in quantised)
    assert all(module.weight.dtype == torch.float32 for module in model.modules()
               if isinstance(module, bnb.nn.Linear4bit))
    out = tmp_path / "multi-gpu-nf4.jsonl"
    run(["equality", "--models", "tiny-nf4", "--engines", "fsdp2", "--steps", "3", "--out", str(out),
         "--timeout", "120"], tmp_path)
    records = pick([json.loads(line) for line in out.read_text().splitlines()], model="tiny-nf4")
    assert set(records) == set(multi_gpu.EQUALITY_METRICS)
    assert records["lora_update_rel_diff"]["update_norm"] > 0  # the adapters moved
    for row in records.values():
        assert row["value"] < 1e-5 and row["within_tolerance"], row
    check_noise_floors(records, "fp32")


@pytest.fixture
def one_process_group():
    """A gloo process group of this process alone (FSDP2 over a world of one), torn down after. Its
    store is in memory: no port to find free, or to collide with another run's."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("engine", multi_gpu.FSDP2_ENGINES)
def test_the_fsdp2_engines_shard_what_they_say(engine, one_process_group):
    """fsdp2 shards every parameter; fsdp2-frozen-whole leaves the frozen base weights plain tensors
    (FSDP2 never gathers them) and shards the adapters; fsdp2-gathered shards all and, after a
    forward, still holds each layer's gathered parameters (until its backward)."""
    from torch.distributed.tensor import DTensor

    model = multi_gpu.lora_model("tiny", "fp32")
    assert multi_gpu.shard(model, engine) == 2
    frozen = [p for p in model.parameters() if not p.requires_grad]
    trained = [p for p in model.parameters() if p.requires_grad]
    assert frozen and trained and all(isinstance(p, DTensor) for p in trained)
    assert all(isinstance(p, DTensor) != (engine == "fsdp2-frozen-whole") for p in frozen)
    model(**multi_gpu.global_batch("tiny"))
    gate = dict(model.named_modules())["base_model.model.model.layers.0.mlp.gate_proj"]
    assert isinstance(gate.lora_A["default"].weight, DTensor) == (engine != "fsdp2-gathered")


def test_the_fsdp2_engines_train_as_one_process_does(tmp_path):
    out = tmp_path / "multi-gpu-engines.jsonl"
    run(["equality", "--models", "tiny", "--engines", "fsdp2-frozen-whole,fsdp2-gathered", "--steps", "3",
         "--out", str(out), "--timeout", "120"], tmp_path)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    for engine in ("fsdp2-frozen-whole", "fsdp2-gathered"):
        records = pick(rows, engine=engine)
        assert set(records) == set(multi_gpu.EQUALITY_METRICS)
        for row in records.values():
            assert row["value"] < 1e-5 and row["within_tolerance"], row


def test_the_4bit_models_are_refused_under_zero3():
    with pytest.raises(SystemExit):
        multi_gpu.parse_args(["equality", "--out", "x.jsonl", "--models", "1b-nf4", "--engines", "zero3"])


def test_report_writes_both_tables(results, tmp_path):
    out, _, _ = results
    markdown = tmp_path / "RESULTS.md"
    markdown.write_text("# Benchmark results\n\nnotes kept\n")
    multi_gpu.main(["report", "--out", str(out), "--markdown", str(markdown)])
    text = markdown.read_text()
    assert "notes kept" in text and "<!-- begin multi-gpu-cpu.jsonl -->" in text
    assert "| tiny | fsdp2 | fp32 | 3 | lora_update_rel_diff |" in text and "| noise floor | bound |" in text
    assert "| L8 | fsdp2 | fusetune | 2 |" in text and "launch exited 1" in text


def test_trace_writes_each_ranks_profiled_step(tmp_path):
    """--trace: after its timed steps every process profiles one more step and writes its Chrome
    trace, which holds the step's training operators."""
    out, traces = tmp_path / "multi-gpu-trace.jsonl", tmp_path / "traces"
    run(["scale", "--tiny", "--configs", "L8-4k", "--systems", "fusetune", "--gpus", "1,2", "--steps", "1,1",
         "--out", str(out), "--timeout", "120", "--trace", str(traces)], tmp_path)
    names = sorted(path.name for path in traces.iterdir())
    assert names == ["scale-L8-4k-fusetune-fsdp2-1gpu-rank0.json.gz",
                     *(f"scale-L8-4k-fusetune-fsdp2-2gpu-rank{rank}.json.gz" for rank in (0, 1))]
    for name in names:
        events = trace_summary.load_events(traces / name)
        assert any(event["name"] == "Optimizer.step#AdamW.step" for event in events)
        assert any("_LoraLinear" in event["name"] for event in events)  # fusetune's fused LoRA ran


def test_a_failure_replaced_by_a_later_success_is_not_reported():
    config = {"model": "L8", "engine": "fsdp2", "gpus": 2}
    failed_row = {"system": "fusetune", "config": config, "metric": "scaling", "value": None, "error": "cut"}
    later = {**failed_row, "value": 1.6, "error": None}
    assert multi_gpu.failures([failed_row, later]) == []
    assert multi_gpu.failures([later, failed_row]) == ["### Failures", "", "- **fusetune**: `cut`"]


def test_the_verdict_is_the_larger_of_the_fixed_bound_and_the_scaled_noise_floor():
    factor = multi_gpu.NOISE_FACTOR
    bound, within = multi_gpu.verdict(0.05, 1e-3, 0.02)  # the noise floor decides
    assert bound == pytest.approx(factor * 0.02) and within == (0.05 <= factor * 0.02)
    assert multi_gpu.verdict(1.01 * factor * 0.02, 1e-3, 0.02) == (pytest.approx(factor * 0.02), False)
    assert multi_gpu.verdict(5e-4, 1e-3, 1e-6) == (1e-3, True)  # the fixed bound decides
    assert multi_gpu.verdict(2e-3, 1e-3, 1e-6) == (1e-3, False)
    assert multi_gpu.verdict(2e-3, 1e-3, 0.0) == (1e-3, False)
    assert multi_gpu.verdict(5e-4, 1e-3, math.nan) == (1e-3, True)  # a diverged noise reference
    assert multi_gpu.verdict(math.nan, 1e-3, 0.1) == (pytest.approx(factor * 0.1), False)
    assert multi_gpu.verdict(math.inf, 1e-3, math.inf) == (1e-3, False)


def made_up_records(dtype: str, noise_weight: float) -> dict[str, dict]:
    """Records of a sharded run whose adapter moved 20% differently from the reference's (1 -> 2:
    the sharded run ends at 2.2), with a noise reference that ends at ``noise_weight``."""
    config = multi_gpu.equality_config("tiny", "fsdp2", 2, dtype)
    initial = {"lora_A": torch.ones(4)}
    single = ([3.0, 2.0], initial, {"lora_A": torch.full((4,), 2.0)})
    noise = ([3.0, 2.0], initial, {"lora_A": torch.full((4,), noise_weight)})
    sharded = ([3.0, 2.0], {"lora_A": torch.full((4,), 2.2)})
    records = multi_gpu.equality_records(config, single, sharded, noise)
    return {row["metric"]: row for row in records}


def test_a_difference_beyond_the_tolerance_is_flagged():
    """In fp32, with no rounding noise, adapters that moved 20% differently are flagged."""
    by_metric = made_up_records("fp32", noise_weight=2.0)
    assert by_metric["loss_max_rel_diff"]["value"] == 0 and by_metric["loss_max_rel_diff"]["within_tolerance"]
    assert by_metric["lora_update_rel_diff"]["value"] == pytest.approx(0.2)
    assert by_metric["lora_rel_diff"]["value"] == pytest.approx(0.1)
    update = by_metric["lora_update_rel_diff"]
    assert update["noise_floor"] == 0
    assert update["tolerance"] == multi_gpu.TOLERANCES["fp32"]["lora_update_rel_diff"]
    assert not update["within_tolerance"]


def test_a_difference_is_judged_against_the_noise_floor():
    """bf16: the same 20% is within the bound when the noise reference itself moved 10% differently
    (bound 3 x 0.1), and flagged when it moved 5% differently (bound 3 x 0.05)."""
    noisy = made_up_records("bf16", noise_weight=2.1)["lora_update_rel_diff"]
    assert noisy["noise_floor"] == pytest.approx(0.1)
    assert noisy["tolerance"] == pytest.approx(multi_gpu.NOISE_FACTOR * 0.1)
    assert noisy["fixed_tolerance"] == multi_gpu.TOLERANCES["bf16"]["lora_update_rel_diff"]
    assert noisy["diff_from_noise_reference"] == pytest.approx(0.1 / 1.1, rel=1e-5)  # 2.2 vs 2.1, moved 1.1
    assert noisy["within_tolerance"]
    quiet = made_up_records("bf16", noise_weight=2.05)["lora_update_rel_diff"]
    assert quiet["tolerance"] == pytest.approx(multi_gpu.NOISE_FACTOR * 0.05)
    assert not quiet["within_tolerance"]
