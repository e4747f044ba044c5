"""bench/multi_gpu.py's logic on CPU: its orchestrators launch two-process torchrun workers over gloo.

The equality check (tiny Llama, float32, a few steps) under FSDP2, and under ZeRO-3 where DeepSpeed
is installed (else its "deepspeed not installed" record), must find the sharded run equal to the
single-process one to float32 rounding. The scaling run (tiny L8 stand-in) must record tokens/s on
1 and 2 processes and a scaling ratio, while a stand-in ``liger_kernel`` whose patch function kills
its processes makes the liger cases fail with that error and the rest still run. A second call of
the same command skips what succeeded, and the report writes both tables.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import multi_gpu
import pytest
import torch

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


def test_sharded_training_equals_one_process_in_float32(results):
    _, rows, _ = results
    fsdp2 = pick(rows, check="equality", engine="fsdp2")
    assert set(fsdp2) == set(multi_gpu.EQUALITY_METRICS)
    assert fsdp2["loss_max_rel_diff"]["config"] == {"check": "equality", "model": "tiny", "engine": "fsdp2",
                                                    "gpus": 2, "batch": 4, "tokens": 64, "steps": 3,
                                                    "dtype": "fp32"}
    losses = fsdp2["loss_max_rel_diff"]["reference_losses"]
    assert len(losses) == 3 and losses[-1] < losses[0]  # it trained
    assert fsdp2["lora_update_rel_diff"]["update_norm"] > 0  # the adapters moved
    for row in fsdp2.values():
        assert row["value"] < 1e-5 and row["within_tolerance"], row


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
        log = folder / "multi-gpu-cpu-logs" / f"scale-L8-4k-liger-{gpus}gpu.log"
        assert "fake liger crash" in log.read_text()
    one, two = (pick(rows, system="fusetune", gpus=gpus)["tokens_per_s"]["value"] for gpus in (1, 2))
    scaling = pick(rows, system="fusetune", gpus="1->2")["scaling"]
    assert scaling["value"] == pytest.approx(two / one) and scaling["target"] == pytest.approx(1.8)
    assert pick(rows, system="liger", gpus="1->2")["scaling"]["value"] is None


def test_a_second_call_skips_what_succeeded(results):
    out, rows, folder = results
    again = ["equality", "--models", "tiny", "--engines", "fsdp2", "--steps", "3", "--out", str(out)]
    output = run(again, folder)
    assert "equality-tiny-fsdp2: done earlier, skipped" in output
    assert len(out.read_text().splitlines()) == len(rows)


def test_report_writes_both_tables(results, tmp_path):
    out, _, _ = results
    markdown = tmp_path / "RESULTS.md"
    markdown.write_text("# Benchmark results\n\nnotes kept\n")
    multi_gpu.main(["report", "--out", str(out), "--markdown", str(markdown)])
    text = markdown.read_text()
    assert "notes kept" in text and "<!-- begin multi-gpu-cpu.jsonl -->" in text
    assert "| tiny | fsdp2 | 3 | fp32 |" in text
    assert "| L8 | fusetune | 2 |" in text and "launch exited 1" in text


def test_a_difference_beyond_the_tolerance_is_flagged():
    """A sharded run whose adapters moved 20% differently from the single run's is flagged."""
    config = multi_gpu.equality_config("tiny", "fsdp2", 2)
    initial = {"lora_A": torch.ones(4)}
    reference = {"lora_A": torch.full((4,), 2.0)}
    records = multi_gpu.equality_records(config, ([3.0, 2.0], initial, reference),
                                         ([3.0, 2.0], {"lora_A": torch.full((4,), 2.2)}))
    by_metric = {row["metric"]: row for row in records}
    assert by_metric["loss_max_rel_diff"]["value"] == 0 and by_metric["loss_max_rel_diff"]["within_tolerance"]
    assert by_metric["lora_update_rel_diff"]["value"] == pytest.approx(0.2)
    assert by_metric["lora_rel_diff"]["value"] == pytest.approx(0.1)
    assert not by_metric["lora_update_rel_diff"]["within_tolerance"]
