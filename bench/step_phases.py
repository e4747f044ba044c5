"""Where an end-to-end step's time goes: host and GPU time of forward, backward and the optimizer,
and Python's garbage collector, step by step.

It runs one ``bench/e2e.py`` worker (same model, batch and system) in this process with
``e2e.train_step`` replaced by a timed copy. Each step prints one line:

    STEP wall 0.575 host fwd 0.233 bwd 0.305 | gpu fwd 0.243 bwd 0.329 opt 0.002 | gc 0.001 s gens [6, 0, 0]

``host``: until forward (backward) returned on the host; ``gpu``: CUDA events recorded between
the phases; ``gc``: seconds inside collections, and how many ran per generation. Where a phase's
GPU time equals its host time the GPU waited on the host (a host-bound step follows the host's
jitter); a long ``gc`` points at Python objects made per step. ``--freeze-gc`` moves every object
alive before the first step out of the collector's reach (``gc.freeze``), to test that.

Run: ``python bench/step_phases.py [--freeze-gc] --config M11 --variant qlora --system fusetune
[--steps 3,8] [--tiny]`` (the e2e worker's arguments). The e2e record is printed last, as the
worker prints it.
"""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import e2e  # noqa: E402
import torch  # noqa: E402


class CollectorClock:
    """Seconds spent in garbage collections, and their count per generation (``gc.callbacks``)."""

    def __init__(self):
        self.seconds = 0.0
        self.counts = [0, 0, 0]
        self._started = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._started
            self.counts[info["generation"]] += 1


class TimedStep:
    """``e2e.train_step`` with each phase timed on the host and, on CUDA, by events."""

    def __init__(self, clock: CollectorClock, freeze_gc: bool):
        self.clock = clock
        self.freeze_gc = freeze_gc
        self.first = True

    def __call__(self, model, batch, optimizer) -> float:
        if self.first and self.freeze_gc:
            gc.collect()
            gc.freeze()
        self.first = False
        collected, counts = self.clock.seconds, list(self.clock.counts)
        cuda = torch.cuda.is_available()
        events = [torch.cuda.Event(enable_timing=True) for _ in range(4)] if cuda else []
        marks = []

        def mark():
            marks.append(time.perf_counter())
            if cuda:
                events[len(marks) - 1].record()

        mark()
        loss = e2e.forward_loss(model, batch)
        mark()
        loss.backward()
        mark()
        value = e2e.optimizer_step(optimizer, loss)  # the e2e step's AdamW step, then a full sync
        mark()
        end = marks[-1]
        gpu = ("gpu fwd {:.3f} bwd {:.3f} opt {:.3f}".format(*(events[i].elapsed_time(events[i + 1]) / 1e3
                                                                for i in range(3))) if cuda else "no gpu")
        ran = [now - before for now, before in zip(self.clock.counts, counts, strict=True)]
        host = [after - before for before, after in zip(marks, marks[1:], strict=False)]
        print(f"STEP wall {end - marks[0]:.3f} host fwd {host[0]:.3f} bwd {host[1]:.3f} | {gpu} | "
              f"gc {self.clock.seconds - collected:.3f} s gens {ran}", flush=True)
        return value


def main(argv: list[str]) -> int:
    freeze_gc = "--freeze-gc" in argv
    argv = [arg for arg in argv if arg != "--freeze-gc"]
    clock = CollectorClock()
    gc.callbacks.append(clock)
    e2e.train_step = TimedStep(clock, freeze_gc)
    return e2e.main(["--worker", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
