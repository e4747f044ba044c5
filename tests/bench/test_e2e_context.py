"""The end-to-end benchmark's issue-6 modes on CPU: the longest-context search and packed VLM rows.

The search is a pure function over a probe, checked against a fake memory limit (exact answer,
number of probes, a budget that runs out, resuming). The orchestrator then searches a tiny Llama's
longest length with out-of-memory simulated past a given length (``--oom-above``), one worker a
probe, keeping every passing probe's metrics; the report's projection past the ceiling is checked
against lines computed by hand. The packed mode trains the same mixed samples padded and packed:
packing is exact, so in float32 both layouts give the same losses over the same real tokens, in HF
and in fusetune.
"""

from __future__ import annotations

import itertools
import json

import e2e
import e2e_plot
import pytest
import report

OOM = "OutOfMemoryError: CUDA out of memory"


def limit_probe(limit: int, calls: list[int], runs: int | None = None):
    """A probe that passes up to ``limit`` tokens, logs its lengths in ``calls`` and, after ``runs``
    calls, has no budget left (None)."""

    def probe(tokens: int) -> str | None:
        if runs is not None and len(calls) >= runs:
            return None
        calls.append(tokens)
        return e2e.OK if tokens <= limit else OOM

    return probe


def test_search_doubles_then_bisects_to_the_resolution():
    calls: list[int] = []
    found = e2e.search_context(limit_probe(37000, calls), 4096, 262144, 1024)
    assert found.longest == 36864 and found.complete  # the largest multiple of 1,024 under 37,000
    # 4k..32k pass, 64k fails; then halving the gap: 48k, 40k fail, 36k passes, 38k, 37k fail.
    assert calls == [4096, 8192, 16384, 32768, 65536, 49152, 40960, 36864, 38912, 37888]
    assert found.probes == [(t, e2e.OK if t <= 37000 else OOM) for t in calls]


def test_search_stops_at_the_ceiling_and_at_a_failing_start():
    at_ceiling = e2e.search_context(limit_probe(10**9, []), 4096, 100000, 1024)
    assert at_ceiling.longest == 100000 and [t for t, _ in at_ceiling.probes][-2:] == [65536, 100000]
    nothing = e2e.search_context(limit_probe(1000, []), 4096, 100000, 1024)
    assert nothing.longest is None and nothing.complete and nothing.probes == [(4096, OOM)]


def test_search_stopped_by_the_budget_resumes_where_it_stopped():
    first_calls: list[int] = []
    first = e2e.search_context(limit_probe(37000, first_calls, runs=6), 4096, 262144, 1024)
    assert not first.complete and first.longest == 32768 and len(first.probes) == 6
    later_calls: list[int] = []
    resumed = e2e.search_context(limit_probe(37000, later_calls), 4096, 262144, 1024,
                                 known=dict(first.probes))
    assert resumed.longest == 36864 and resumed.complete and len(resumed.probes) == 10
    assert later_calls == [40960, 36864, 38912, 37888]  # only what the first search had not probed


def test_orchestrator_finds_the_simulated_memory_limit_and_resumes(tmp_path):
    out = tmp_path / "context.jsonl"
    argv = ["--tiny", "--max-context", "--out", str(out), "--systems", "hf", "--start", "128",
            "--ceiling", "512", "--resolution", "64", "--oom-above", "200", "--timeout", "100"]
    assert e2e.main(argv) == 0  # the orchestrator here, each probe in its own worker process
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["metric"] == "max_context_tokens" and row["value"] == 192 and row["complete"]
    assert row["config"] == {"model": "L8", "mode": "max_context", "variant": "bf16_lora", "tiny": True,
                             "oom_above": 200}
    assert [tokens for tokens, _ in row["probes"]] == [128, 256, 192]
    assert row["probes"][1][1].startswith("OutOfMemoryError: simulated: 256 tokens")
    assert row["at_max"]["tokens_per_s"] > 0 and row["steps"] == [1, 1]
    # Every passing probe's metrics, with the memory the report projects from.
    assert [tokens for tokens, _ in row["probe_metrics"]] == [128, 192]
    assert row["probe_metrics"][-1][1] == row["at_max"]
    for _, metrics in row["probe_metrics"]:
        assert metrics["tokens_per_s"] > 0 and metrics["loss"] > 0
        assert 0 < metrics["host_peak_gib"] < metrics["host_total_gib"]
        assert set(e2e.MEMORY_FIELDS) <= set(metrics)
    logs = sorted(path.name for path in (tmp_path / "context-logs").iterdir())
    assert logs == [f"L8-4k-bf16_lora-hf-{tokens}.log" for tokens in (128, 192, 256)]
    # The same command again finds every length probed already: no worker runs, the answer stands.
    assert e2e.main(argv) == 0
    again = json.loads(out.read_text().splitlines()[-1])
    assert again["value"] == 192 and again["probes"] == row["probes"] and again["at_max"] == row["at_max"]
    assert again["probe_metrics"] == row["probe_metrics"]
    assert len(list((tmp_path / "context-logs").iterdir())) == 3


@pytest.fixture(scope="module")
def mixed_records() -> dict:
    """{(system, layout): {metric: record}} of tiny Q7VL trained 1 + 2 steps, padded and packed
    (fusetune's ops on their PyTorch references, as in the workers on a CPU: the kernels are tested in
    tests/ops)."""
    # Triton decides at definition whether a kernel is interpreted: define fusetune's kernels under
    # the suite's TRITON_INTERPRET=1 first, or tests run after this fixture find compiled kernels and no GPU.
    import fusetune.ops  # noqa: F401

    out = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "0")
        for system, layout in itertools.product(("hf", "fusetune"), ("padded", "packed")):
            args = e2e.parse_args(["--worker", "--tiny", "--config", f"Q7VL-{layout}", "--variant",
                                   "bf16_lora", "--system", system, "--steps", "1,2"])
            case = e2e.Case(args.config, args.variant, args.system)
            out[system, layout] = {row["metric"]: row for row in e2e.measure(case, args)}
    return out


@pytest.mark.parametrize("system", ["hf", "fusetune"])
def test_packed_rows_train_like_padded_batches(mixed_records, system):
    padded, packed = mixed_records[system, "padded"], mixed_records[system, "packed"]
    assert padded["loss"]["config"] == {"model": "Q7VL", "mode": "padded", "batch": 4, "variant": "bf16_lora",
                                        "tiny": True}
    assert len(packed["loss"]["losses"]) == 3
    assert packed["loss"]["losses"] == pytest.approx(padded["loss"]["losses"], abs=1e-4)
    assert packed["loss"]["value"] == pytest.approx(padded["loss"]["value"], abs=1e-4)
    real = padded["tokens_per_s"]["real_tokens"]
    assert packed["tokens_per_s"]["real_tokens"] == real and len(set(real)) > 1  # mixed lengths
    assert packed["tokens_per_s"]["batch_tokens"] == real  # no padding in a packed row
    assert all(b > r for b, r in zip(padded["tokens_per_s"]["batch_tokens"], real, strict=True))
    assert packed["tokens_per_s"]["value"] > 0 and padded["tokens_per_s"]["value"] > 0


def test_report_and_plot_take_the_new_records(mixed_records, tmp_path):
    records = [row for metrics in mixed_records.values() for row in metrics.values()]
    records.append({**records[0], "system": "unsloth", "config": {"model": "L8", "mode": "max_context",
                    "variant": "bf16_lora"}, "metric": "max_context_tokens", "value": 8192, "complete": True,
                    "ceiling": 262144, "probes": [[8192, "ok"], [16384, OOM]], "at_max": {}})
    records.append({**records[-1], "system": "fusetune", "value": 20480, "complete": False,
                    "probes": [[16384, "ok"], [32768, OOM], [20480, "ok"]],
                    "at_max": {"tokens_per_s": 1234.0, "peak_allocated_gib": 99.5}})
    text = report.section("e2e-test.jsonl", records)
    assert "| L8 | bf16_lora | unsloth | 8,192 | 1.00x |  |  |  |  | 2 | 16,384: OOM |" in text
    assert ("| L8 | bf16_lora | fusetune | >= 20,480 (incomplete) | 2.50x |  |  | 1,234 | 99.50 | 3 "
            "| 32,768: OOM |" in text)
    hf = mixed_records["hf", "padded"]
    speed_up = mixed_records["hf", "packed"]["tokens_per_s"]["value"] / hf["tokens_per_s"]["value"]
    assert "| Q7VL | bf16_lora | hf | " in text and f"| {speed_up:.2f}x |" in text
    assert "### End to end" not in text  # no fixed-length records here
    # The plot shows padded and packed as groups of their own and leaves the searches to the report.
    assert set(e2e_plot.table(records)) == {"Q7VL padded\nbf16_lora", "Q7VL packed\nbf16_lora"}
    assert e2e_plot.plot(records, tmp_path / "e2e.png").stat().st_size > 0


def test_a_resumed_search_keeps_the_metrics_of_the_probes_before(tmp_path, monkeypatch):
    """max_context with workers stood in for: passing below 300 tokens, peak GiB = tokens / 64."""
    out, calls = tmp_path / "context.jsonl", []

    def run_case(case, args, limit, folder):
        calls.append(case.tokens)
        fits = case.tokens <= 300
        fields = {"device_total_gib": 8.0, "host_total_gib": 16.0, "host_peak_gib": 1.0, "error": OOM}
        return [{"metric": metric, "value": (case.tokens / 64 if fits else None), **fields}
                for metric in e2e.METRICS]

    monkeypatch.setattr(e2e, "run_case", run_case)
    args = e2e.parse_args(["--tiny", "--max-context", "--out", str(out), "--systems", "hf", "--start", "128",
                           "--ceiling", "1024", "--resolution", "64", "--budget", "1000"])
    case = e2e.Case("L8-4k", "bf16_lora", "hf")
    first = e2e.max_context(case, args, lambda: 1000 if len(calls) < 3 else 0, None)  # budget for 3 probes
    assert not first["complete"] and calls == [128, 256, 512]
    e2e.append(out, [first])
    resumed = e2e.max_context(case, args, lambda: 1000, None)
    assert resumed["complete"] and resumed["value"] == 256 and calls[3:] == [384, 320]
    assert resumed["probe_metrics"] == first["probe_metrics"]  # both passing probes ran in the first call
    assert [[t, m["peak_allocated_gib"], m["host_total_gib"]] for t, m in resumed["probe_metrics"]] == [
        [128, 2.0, 16.0], [256, 4.0, 16.0]]
    assert resumed["at_max"] == resumed["probe_metrics"][-1][1]


def context_row(system: str, probes: dict, **config) -> dict:
    """A max_context_tokens record of L8 bf16_lora whose search the ceiling (32,768) stopped; ``probes``
    {tokens: (peak allocated GiB, peak host GiB)}, all passing, on a 141 GiB GPU and a 128 GiB host."""
    metrics = [[tokens, {"tokens_per_s": 1000.0, "peak_allocated_gib": gpu, "host_peak_gib": host,
                         "device_total_gib": 141.0, "host_total_gib": 128.0}]
               for tokens, (gpu, host) in sorted(probes.items())]
    config = {"model": "L8", "mode": "max_context", "variant": "bf16_lora", **config}
    return {"system": system, "config": config,
            "metric": "max_context_tokens", "value": max(probes), "complete": True, "ceiling": 32768,
            "probes": [[tokens, "ok"] for tokens in sorted(probes)], "probe_metrics": metrics,
            "at_max": metrics[-1][1] if metrics else {}}


# GPU: 23 GiB at 8k is off the line through the two longest probes, 24 GiB at 16k and 32 GiB at 32k:
# 8 GiB more per 16,384 tokens = 1 GiB per 2,048 tokens, from 24 - 8 = 16 GiB at 0 tokens.
# Host: 20 GiB at 16k, 36 GiB at 32k: 1 GiB per 1,024 tokens from 4 GiB.
PROBES = {8192: (23.0, 2.0), 16384: (24.0, 20.0), 32768: (32.0, 36.0)}


def test_projection_solves_the_line_through_the_two_longest_probes():
    gpu = int((141 - report.DEVICE_RESERVE_GIB - 16) * 2048)  # 251,904 tokens with a 2 GiB reserve
    host = int((128 - report.HOST_RESERVE_GIB - 4) * 1024)  # 118,784 tokens with an 8 GiB reserve
    assert report.line_through([(8192, 23.0), (16384, 24.0), (32768, 32.0)]) == (16.0, 1 / 2048)
    assert report.project_context(context_row("hf", PROBES)) == (gpu, "GPU")  # no offload: GPU only
    assert report.project_context(context_row("unsloth", PROBES)) == (min(gpu, host), "host")
    assert report.project_context(context_row("fusetune", PROBES)) == (host, "host")
    assert report.project_context(context_row("fusetune", PROBES, offload=False)) == (gpu, "GPU")
    # Host memory that grows no more than the GPU's leaves the GPU binding.
    assert report.project_context(context_row("unsloth", {16384: (24.0, 3.0), 32768: (32.0, 3.0)})) == (
        gpu, "GPU")
    # Nothing to project: one passing probe, flat or shrinking peaks, no device memory recorded (CPU).
    assert report.project_context(context_row("unsloth", {32768: (32.0, 36.0)})) is None
    assert report.project_context(context_row("hf", {16384: (30.0, 1.0), 32768: (30.0, 1.0)})) is None
    assert report.project_context(context_row("hf", {16384: (31.0, 1.0), 32768: (30.0, 1.0)})) is None
    cpu = context_row("hf", PROBES)
    for _, metrics in cpu["probe_metrics"]:
        metrics["device_total_gib"] = None
    assert report.project_context(cpu) is None


def test_report_shows_the_projection_beside_the_measured_length():
    records = [context_row("unsloth", PROBES),
               # fusetune: 1 GiB per 8,192 tokens on the GPU from 18 GiB -> 991,232 tokens; host 1 GiB
               # per 2,048 tokens from 4 GiB -> 237,568 tokens, twice Unsloth's 118,784.
               context_row("fusetune", {16384: (20.0, 12.0), 32768: (22.0, 20.0)}),
               context_row("hf", {32768: (60.0, 2.0)})]  # one passing probe: no projection
    text = "\n".join(report.context_table(records))
    start = "| L8 | bf16_lora "  # then system, longest, vs Unsloth, projected, projected vs Unsloth, ...
    assert start + "| unsloth | >= 32,768 | 1.00x | 118,784 (host) | 1.00x | 1,000 | 32.00 | 3 |  |" in text
    assert start + "| fusetune | >= 32,768 | 1.00x | 237,568 (host) | 2.00x | 1,000 | 22.00 | 2 |  |" in text
    assert start + "| hf | >= 32,768 | 1.00x |  |  | 1,000 | 60.00 | 1 |  |" in text
    assert "Only the longest tokens column is a result" in text
    assert "NOT a trained length but a linear extrapolation of measured peaks" in text
