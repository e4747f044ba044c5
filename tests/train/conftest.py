"""Train tests run fusetune's ops as their PyTorch references, not through the Triton interpreter.

tests/conftest.py sets TRITON_INTERPRET=1 for the whole suite so the ops tests exercise the real
kernels on CPU tensors; a training run under the interpreter would take many minutes. The ops
decide per call (``fusetune.ops._launch.use_triton`` reads the variable each time), so setting it
to 0 for each train test (and the subprocesses they start, which inherit the environment) makes
every op take its reference path, exactly as ``fusetune train`` does on a CPU machine. The kernels
themselves are covered by tests/ops and tests/patch.
"""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    yield


@pytest.fixture
def demo_processor():
    from fusetune.train import demo

    return demo.build_processor()
