"""The ops on a GPU that is not the current one.

A model split over GPUs (``device_map="auto"``) calls a layer on ``cuda:1`` while ``cuda:0`` is
current. Triton launches on the current device, whatever the pointers it is given, so every public
op switches to its first tensor's device first (``_launch.on_input_device``). With two GPUs, every
op's output and gradients, its inputs on ``cuda:1`` (busy) and ``cuda:0`` current, must equal the
same call's with ``cuda:1`` current, and stay on ``cuda:1``. On any machine: every public op carries
the switch, switches only where the devices differ, asks nothing of CUDA for calls without a CUDA
tensor, and refuses an input on another device than the first, naming it and the fix.
"""

from __future__ import annotations

import contextlib
import inspect
import re

import pytest
import torch

import fusetune.ops as ops
from fusetune.ops import _launch
from tests.ops import checks, op_calls

TWO_GPUS = checks.DEVICE == "cuda" and torch.cuda.device_count() >= 2
KERNEL_OPS = [name for name in ops.__all__ if not name.endswith("_reference") and name != "LoraWeights"]
# Norm-wise relative error allowed between the two runs: the same kernels on the same device, so
# only a reduction's order may differ (far below one bf16 rounding of the outputs).
SAME_DEVICE_TOLERANCE = 1e-3


def _guarded(function) -> bool:
    """Whether ``on_input_device``'s wrapper is among the wrappers of ``function`` (told by its code:
    the wrappers copy the op's name)."""
    guard = _launch.on_input_device(len).__code__
    seen = []
    inspect.unwrap(function, stop=lambda f: seen.append(getattr(f, "__code__", None)) or False)
    return guard in seen


@pytest.mark.parametrize("name", KERNEL_OPS)
def test_every_public_op_runs_on_its_inputs_device(name):
    assert _guarded(getattr(ops, name)), f"{name} is not wrapped by _launch.public_op"


def test_a_call_without_a_cuda_tensor_asks_nothing_of_cuda(monkeypatch):
    def no_cuda():
        raise AssertionError("queried the current CUDA device")

    monkeypatch.setattr(torch.cuda, "current_device", no_cuda)
    x = torch.randn(3, 8)
    assert _launch.cuda_device_of((None, 2, x)) is None and _launch.cuda_device_of(()) is None
    torch.testing.assert_close(ops.rms_norm(x, None), ops.rms_norm_reference(x, None))


@pytest.mark.parametrize(("current", "switched"), [(0, [torch.device("cuda", 1)]), (1, [])])
def test_the_device_switches_only_where_it_differs(monkeypatch, current, switched):
    entered = []

    @contextlib.contextmanager
    def device(target):
        entered.append(target)
        yield

    monkeypatch.setattr(_launch, "cuda_device_of", lambda args: torch.device("cuda", 1))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    monkeypatch.setattr(torch.cuda, "device", device)
    assert _launch.on_input_device(lambda *args, **kwargs: (args, kwargs))(1, key=2) == ((1,), {"key": 2})
    assert entered == switched


def test_tensors_passed_by_keyword_choose_the_device_too(monkeypatch):
    seen = []
    monkeypatch.setattr(_launch, "cuda_device_of", lambda args: seen.append(args))
    x = torch.randn(2)
    _launch.on_input_device(lambda *args, **kwargs: None)(None, x=x)
    assert len(seen) == 1 and seen[0][0] is None and seen[0][1] is x


def _keep_busy(device_index: int) -> None:
    """Queue about half a second of spinning on the device's current stream: the torch work queued
    there after it (each case's ``x * 2``) is then not done yet when a kernel launched on another
    device would read it."""
    with torch.cuda.device(device_index):
        torch.cuda._sleep(1_000_000_000)


@pytest.mark.skipif(not TWO_GPUS, reason="needs two CUDA devices")
@pytest.mark.parametrize("name", list(op_calls.op_cases("cpu", torch.float32)))
def test_op_on_a_gpu_that_is_not_current_matches_it_current(name):
    """The call with cuda:0 current comes first, on a busy cuda:1: an op that launched on cuda:0
    would read its input before cuda:1 wrote it. Before it the same case runs on cuda:0, so that
    no kernel is compiled or loaded (host time that would outlast the spin) during that call; and
    the other call comes after it, else the caching allocator would hand out blocks still holding
    that call's values and such an op would pass."""
    op_calls.forward_backward(*op_calls.op_cases("cuda:0", torch.bfloat16)[name])
    with torch.cuda.device(1):
        function, leaves = op_calls.op_cases("cuda:1", torch.bfloat16)[name]
    assert torch.cuda.current_device() == 0
    _keep_busy(1)
    got = [t.clone() for t in op_calls.forward_backward(function, leaves)]
    with torch.cuda.device(1):
        expected = op_calls.forward_backward(function, leaves)
    names = ["output"] + [f"gradient {i}" for i in range(len(leaves))]
    for what, out, ref in zip(names, got, expected, strict=True):
        assert out.device == torch.device("cuda", 1), f"{name} {what} is on {out.device}"
        error = checks.relative_error(out, ref)
        assert error <= SAME_DEVICE_TOLERANCE, f"{name} {what}: relative error {error:.3e}"


def _inputs_with_one_elsewhere() -> list:
    """(op, arguments with one tensor on the meta device, that tensor's name) for every op."""
    x, w = torch.randn(3, 8), torch.randn(8)
    q, cos = torch.randn(1, 2, 3, 4), torch.randn(1, 3, 4)
    meta = torch.empty(8, device="meta")
    projection = ops.LoraWeights(torch.randn(5, 8), torch.randn(2, 8), torch.randn(5, 2), 1.0)
    down_elsewhere = ops.LoraWeights(torch.empty(8, 5, device="meta"), None, None, 1.0)
    return [
        (ops.rms_norm, (x, meta), "weight"),
        (ops.add_rms_norm, (x, x.to("meta"), w), "residual"),
        (ops.layer_norm, (x, w, meta), "bias"),
        (ops.rope, (q, q, cos, cos.to("meta")), "sin"),
        (ops.swiglu, (x, x.to("meta")), "up"),
        (ops.geglu, (x, x.to("meta")), "up"),
        (ops.lora_linear, (x, projection._replace(b=projection.b.to("meta"))), "projections[0].b"),
        (ops.lora_glu_mlp, (x, projection, projection, down_elsewhere, "silu"), "down.weight"),
    ]


@pytest.mark.parametrize(("op", "arguments", "elsewhere"), _inputs_with_one_elsewhere(),
                         ids=lambda value: getattr(value, "__name__", None))
def test_an_input_on_another_device_is_refused_by_name(op, arguments, elsewhere):
    with pytest.raises(ValueError, match=rf"{re.escape(elsewhere)} is on meta but .* move it there"):
        op(*arguments)
