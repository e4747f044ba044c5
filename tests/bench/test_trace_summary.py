"""bench/trace_summary.py on a hand-made Chrome trace whose answers are worked out by hand."""

import gzip
import json

import trace_summary


def event(name: str, ts: float, dur: float, cat: str = "kernel") -> dict:
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}


EVENTS = [
    event("sm90_xmma_gemm_bf16", 0, 40),            # 0-40
    event("flash_fwd_kernel", 30, 20),              # 30-50, overlaps the gemm by 10
    event("Memcpy DtoH (Device -> Pinned)", 70, 10, cat="gpu_memcpy"),  # 70-80
    event("_rms_norm_kernel", 90, 10),              # 90-100
    event("aten::mm", 0, 500, cat="cpu_op"),        # host: not GPU time
    {"ph": "i", "name": "marker", "ts": 5},         # not a complete event
]


def test_busy_idle_and_kinds(tmp_path):
    path = tmp_path / "step.json.gz"
    with gzip.open(path, "wt") as handle:
        json.dump({"traceEvents": EVENTS}, handle)
    summary = trace_summary.summarise(trace_summary.load_events(path), top=2)
    assert summary["span_us"] == 100  # 0 to 100
    assert summary["busy_us"] == 50 + 10 + 10  # [0, 50] + [70, 80] + [90, 100]
    assert abs(summary["idle_fraction"] - 0.30) < 1e-12
    assert summary["kinds"] == {"matmul": 40, "attention": 20, "copy": 10, "other kernels": 10}
    assert [name for name, _, _ in summary["top"]] == ["sm90_xmma_gemm_bf16", "flash_fwd_kernel"]
    # Gaps: 50-70 (20 us) and 80-90 (10 us).
    assert summary["gaps"] == {"under 20 us": (1, 10), "20-200 us": (1, 20), "200 us and over": (0, 0)}
    assert "idle 30.0%" in trace_summary.render(path, summary)


def test_union_counts_overlaps_once():
    assert trace_summary.union_length([(0, 10), (2, 3), (5, 15), (20, 21)]) == 16


def test_no_gpu_events(tmp_path):
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps([event("aten::mm", 0, 5, cat="cpu_op")]))
    summary = trace_summary.summarise(trace_summary.load_events(path), top=5)
    assert "no GPU activity" in trace_summary.render(path, summary)


def test_host_during_long_gaps():
    """A 390 us gap (10 to 400) ended by a kernel launched from thread 1, which spent it in an
    autograd node (170 us of its own), a synchronising call inside it (200 us), the launch itself
    (3 us) and Python between ops (17 us); thread 2's op and the short gap do not count."""
    def on(thread, e, correlation=None):
        e.update(pid=1, tid=thread)
        if correlation is not None:
            e["args"] = {"correlation": correlation}
        return e

    events = [
        on(1, event("gemm", 0, 10), 1), on(1, event("gemm", 400, 10), 2), on(1, event("gemm", 420, 5), 3),
        on(1, event("cudaLaunchKernel", 1, 2, cat="cuda_runtime"), 1),
        on(1, event("cudaLaunchKernel", 395, 3, cat="cuda_runtime"), 2),
        on(1, event("cudaLaunchKernel", 411, 2, cat="cuda_runtime"), 3),
        on(1, event("aten::mm", 0, 5, cat="cpu_op")),
        on(1, event("autograd::Foo", 20, 370, cat="cpu_op")),
        on(1, event("cudaStreamSynchronize", 100, 200, cat="cuda_runtime")),
        on(2, event("aten::copy_", 0, 500, cat="cpu_op")),
    ]
    totals = trace_summary.host_during_long_gaps(events)
    assert totals == {"cudaStreamSynchronize": 200, "autograd::Foo": 170,
                      trace_summary.BETWEEN_OPS: 17, "cudaLaunchKernel": 3}


def test_matmul_shapes():
    """Two addmm_ kernels of one shape, an mm of another, a matmul kernel of an operator without
    shapes, and a non-matmul kernel (not counted); rates worked out by hand."""
    def op(name, ident, dims):
        return {"ph": "X", "cat": "cpu_op", "name": name, "ts": 0, "dur": 1,
                "args": {"External id": ident, "Input Dims": dims}}

    def kernel(name, ident, dur):
        return {"ph": "X", "cat": "kernel", "name": name, "ts": 0, "dur": dur, "args": {"External id": ident}}

    events = [
        op("aten::addmm_", 1, [[64, 32], [64, 128], [128, 32]]), kernel("nvjet_badd", 1, 2.0),
        op("aten::addmm_", 2, [[64, 32], [64, 128], [128, 32]]), kernel("nvjet_badd", 2, 2.0),
        op("aten::mm", 3, [[10, 20], [20, 30]]), kernel("nvjet_bz", 3, 6.0),
        kernel("gemm_from_nowhere", 99, 1.0),
        op("aten::add", 4, [[5], [5]]), kernel("vectorized_elementwise", 4, 50.0),
    ]
    rows = trace_summary.matmul_shapes(events)
    assert [(r["op"], r["dims"], r["calls"], r["us"]) for r in rows] == [
        ("aten::mm", ((10, 20), (20, 30)), 1, 6.0),
        ("aten::addmm_", ((64, 128), (128, 32)), 2, 4.0),
        ("other", (), 1, 1.0),
    ]
    assert abs(rows[0]["tflops"] - 2 * 10 * 20 * 30 / 6.0 / 1e6) < 1e-15
    assert abs(rows[1]["tflops"] - 2 * 2 * 64 * 128 * 32 / 4.0 / 1e6) < 1e-15
    assert rows[2]["tflops"] is None
