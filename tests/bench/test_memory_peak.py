"""bench/memory_peak.py on a hand-made memory history whose peak is worked out by hand."""

import memory_peak


def alloc(addr: int, size: int, filename: str, line: int = 1) -> dict:
    frames = [{"filename": "/usr/lib/python3/site-packages/torch/functional.py", "line": 9, "name": "mm"},
              {"filename": f"/x/site-packages/{filename}", "line": line, "name": "forward"}]
    return {"action": "alloc", "addr": addr, "size": size, "frames": frames}


def free(addr: int) -> list[dict]:
    return [{"action": "free_requested", "addr": addr}, {"action": "free_completed", "addr": addr}]


EVENTS = [
    alloc(1, 100, "fusetune/ops/lora.py", 10),    # live 100
    alloc(2, 50, "fusetune/ops/lora.py", 10),     # 150
    *free(1),                                     # 50
    alloc(3, 300, "transformers/llama.py", 7),    # 350: the peak
    alloc(4, 10, "peft/lora.py", 3),              # 360: the peak
    *free(3),                                     # 60
    alloc(1, 200, "fusetune/ops/lora.py", 10),    # 260 (address reused)
    {"action": "segment_alloc", "addr": 99, "size": 1 << 30},  # not an allocation
]


def test_peak_and_what_is_live_then():
    peak, groups = memory_peak.peak_allocations(EVENTS)
    assert peak == 360
    assert groups == [("transformers/llama.py:7 forward", 300, 1), ("fusetune/ops/lora.py:10 forward", 50, 1),
                      ("peft/lora.py:3 forward", 10, 1)]
    text = memory_peak.render("L8", peak, groups)
    assert "step peak 0.0 MiB" in text and "transformers/llama.py:7 forward" in text


def test_allocations_outside_known_code_are_grouped_together():
    event = {"action": "alloc", "addr": 5, "size": 8, "frames": [{"filename": "/usr/lib/torch/x.py"}]}
    _, groups = memory_peak.peak_allocations([event])
    assert groups == [(memory_peak._site([]), 8, 1)]
