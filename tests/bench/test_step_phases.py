"""bench/step_phases.py on CPU: an e2e worker's steps timed phase by phase, its record still printed."""

from __future__ import annotations

import gc
import json

import e2e
import step_phases


def test_collector_clock_counts_a_collection_and_its_time():
    clock = step_phases.CollectorClock()
    gc.callbacks.append(clock)
    try:
        gc.collect(1)
    finally:
        gc.callbacks.remove(clock)
    assert clock.counts[1] >= 1 and clock.seconds > 0


def test_every_step_of_a_worker_is_timed_and_its_record_printed(monkeypatch, capsys):
    monkeypatch.setattr(e2e, "train_step", e2e.train_step)  # restored after: main replaces it
    callbacks = list(gc.callbacks)
    try:
        status = step_phases.main(["--freeze-gc", "--config", "L8-4k", "--variant", "bf16_lora",
                                   "--system", "fusetune", "--steps", "1,2", "--tiny"])
    finally:
        gc.callbacks[:] = callbacks
        gc.unfreeze()
    lines = capsys.readouterr().out.splitlines()
    steps = [line for line in lines if line.startswith("STEP ")]
    assert status == 0 and len(steps) == 3
    assert all("host fwd" in line and "no gpu" in line and "gens [" in line for line in steps)
    records = json.loads(next(line for line in lines if line.startswith(e2e.RESULT))[len(e2e.RESULT):])
    speed = next(r for r in records if r["metric"] == "tokens_per_s")
    assert speed["value"] > 0 and len(speed["step_s"]) == 3
