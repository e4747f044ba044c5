"""The direct launch path (``fusetune/ops/_direct_launch.py``): its key tells apart every argument
Triton's own specialisation tells apart, and a launch goes through Triton exactly when the key is new
(or a hook, the switch or an unknown argument type says so), otherwise to the compiled kernel's
launcher with the arguments in the kernel's order.

The launcher itself needs a GPU: on CPU the launch's Triton side and the compiled kernel are stand-ins
that record their calls; on CUDA (``TRITON_INTERPRET=0``) the last test compares real launches both ways.
"""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from fusetune.ops import _direct_launch
from fusetune.ops._direct_launch import DirectLaunch, argument_key, direct_launch
from tests.ops.checks import DEVICE

STREAM = 1234


def _tensors() -> list[torch.Tensor]:
    """Tensors of several dtypes at addresses 16-aligned and not (views at an element offset)."""
    out = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.uint8):
        base = torch.zeros(64, dtype=dtype)
        out += [base[offset:] for offset in (0, 1, 2, 4, 8, 16)]
    return out


INTS = [-(2**31) - 16, -(2**31) - 1, -(2**31), -17, -16, -1, 0, 1, 2, 15, 16, 17, 2**31 - 16, 2**31 - 1,
        2**31, 2**32, 2**63 - 16, 2**63 - 1, 2**63, 2**64 - 16]


def test_key_separates_what_triton_specialises_apart():
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend

    backend = CUDABackend(GPUTarget("cuda", 90, 32))
    arguments = [*_tensors(), *INTS, 0.0, 1.0, -2.5, 1e30, True, False, None]
    specialised = [native_specialize_impl(backend, arg, False, True, True) for arg in arguments]
    keys = [argument_key(arg) for arg in arguments]
    assert _direct_launch.TRITON_DECIDES not in keys
    for (key_a, spec_a), (key_b, spec_b) in itertools.combinations(zip(keys, specialised, strict=True), 2):
        if spec_a != spec_b:
            assert key_a != key_b, (spec_a, spec_b)


def test_unknown_argument_types_are_left_to_triton():
    assert argument_key(np.int64(3)) is _direct_launch.TRITON_DECIDES
    assert argument_key((1, 2)) is _direct_launch.TRITON_DECIDES


def _kernel(x_ptr, y_ptr, n, scale, STEP: tl.constexpr, FLAG: tl.constexpr = 7):
    pass


class _Compiled:
    """A stand-in compiled kernel: records what its launcher is called with."""

    function, packed_metadata = "function", "metadata"

    def __init__(self):
        self.runs = []

    def run(self, *args):
        self.runs.append(args)


class _Triton:
    """A stand-in ``triton.jit`` function: real parameters, launches recorded, one compiled kernel
    per launch through it (kept in ``compiled``)."""

    def __init__(self):
        self.params = triton.runtime.JITFunction(_kernel).params
        self.fn = _kernel
        self.launches = []
        self.compiled = []

    def __getitem__(self, grid):
        def launch(*args, **keywords):
            self.launches.append((grid, args, keywords))
            self.compiled.append(_Compiled())
            return self.compiled[-1]
        return launch


@pytest.fixture
def launcher(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: STREAM, raising=False)
    return DirectLaunch(_Triton())


def test_a_repeated_specialisation_launches_the_compiled_kernel(launcher):
    x, y = torch.zeros(32), torch.zeros(32)
    launcher[(5,)](x, y, 48, 0.5, STEP=4)
    assert len(launcher.launches) == 1
    [compiled] = launcher.jit_function.compiled
    x2, y2 = torch.ones(64), torch.ones(64)
    for _ in range(2):  # new values of the same specialisation, then the same values again
        launcher[(6, 2)](x2, y2, 32, 2.0, STEP=4)
    assert len(launcher.launches) == 1  # not through Triton again
    launch = (6, 2, 1, STREAM, "function", "metadata", None, None, None)
    # keywords and defaults in the kernel's order
    assert compiled.runs == [(*launch, x2, y2, 32, 2.0, 4, 7)] * 2


def test_the_table_of_launches_by_value_stays_bounded(launcher, monkeypatch):
    monkeypatch.setattr(_direct_launch, "VALUE_KEYS", 4)
    x, y = torch.zeros(32), torch.zeros(32)
    for n in range(16, 16 * 12, 16):  # eleven values, one specialisation
        launcher[(1,)](x, y, n, 0.5, STEP=4)
        assert len(launcher._by_value) <= 4
    assert len(launcher.launches) == 1
    assert len(launcher.jit_function.compiled[0].runs) == 10


@pytest.mark.parametrize(
    "change", ["misaligned", "dtype", "one", "not_multiple_of_16", "wide_int", "constexpr", "option"])
def test_a_new_specialisation_goes_through_triton(launcher, change):
    x, y = torch.zeros(32), torch.zeros(32)
    first = dict(args=(x, y, 48, 0.5), keywords=dict(STEP=4))
    second = {
        "misaligned": dict(args=(x[1:], y, 48, 0.5), keywords=dict(STEP=4)),
        "dtype": dict(args=(x.half(), y, 48, 0.5), keywords=dict(STEP=4)),
        "one": dict(args=(x, y, 1, 0.5), keywords=dict(STEP=4)),
        "not_multiple_of_16": dict(args=(x, y, 47, 0.5), keywords=dict(STEP=4)),
        "wide_int": dict(args=(x, y, 2**32, 0.5), keywords=dict(STEP=4)),
        "constexpr": dict(args=(x, y, 48, 0.5), keywords=dict(STEP=8)),
        "option": dict(args=(x, y, 48, 0.5), keywords=dict(STEP=4, num_warps=8)),
    }[change]
    for call in (first, second, second):
        launcher[(1,)](*call["args"], **call["keywords"])
    assert len(launcher.launches) == 2  # the second specialisation once, then directly
    assert sum(len(compiled.runs) for compiled in launcher.jit_function.compiled) == 1


def test_hooks_switch_and_unknown_arguments_go_through_triton(launcher):
    x, y = torch.zeros(32), torch.zeros(32)
    for _ in range(2):  # through Triton, then remembered by value
        launcher[(1,)](x, y, 48, 0.5, STEP=4)
    hook = triton.knobs.runtime.launch_enter_hook
    if not hasattr(hook, "add"):
        pytest.fail(f"Triton's launch hooks are a {type(hook)}; _direct_launch._hooks_set reads HookChains")
    probe = lambda metadata: None  # noqa: E731
    hook.add(probe)
    try:
        launcher[(1,)](x, y, 48, 0.5, STEP=4)
    finally:
        hook.remove(probe)
    assert len(launcher.launches) == 2
    DirectLaunch.enabled = False
    try:
        launcher[(1,)](x, y, 48, 0.5, STEP=4)
    finally:
        DirectLaunch.enabled = True
    assert len(launcher.launches) == 3
    for _ in range(2):
        launcher[(1,)](x, y, np.int64(48), 0.5, STEP=4)
    assert len(launcher.launches) == 5
    launcher[(1,)](x, y, 48, 0.5, STEP=4)
    assert len(launcher.launches) == 5


def test_attributes_are_the_kernels_and_a_copy_works(launcher):
    assert launcher.fn is _kernel
    copied = copy.copy(launcher)
    assert copied.fn is _kernel and copied.jit_function is launcher.jit_function


def test_a_constexpr_passed_by_position_is_refused(launcher):
    with pytest.raises(TypeError, match="pass STEP to _kernel by keyword"):
        launcher[(1,)](torch.zeros(4), torch.zeros(4), 4, 0.5, 4)


def test_interpreted_kernels_are_left_as_they_are():
    if DEVICE == "cuda":
        pytest.skip("the interpreter is off")
    interpreted = triton.jit(_kernel)
    assert direct_launch(interpreted) is interpreted


def test_direct_launches_match_triton_launches_on_a_gpu():
    """On CUDA: an op's outputs and gradients launched directly equal those launched through Triton,
    with rows at aligned and misaligned addresses."""
    if DEVICE != "cuda":
        pytest.skip("needs CUDA with TRITON_INTERPRET=0 (the CPU suite checks the launch logic above)")
    from fusetune.ops import rms_norm
    from fusetune.ops.rms_norm import _rms_norm_forward_kernel

    assert isinstance(_rms_norm_forward_kernel, DirectLaunch)
    base = torch.randn(37 * 333 + 3, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(333, device="cuda", dtype=torch.bfloat16)

    def run(offset):
        x = base[offset:offset + 37 * 333].view(37, 333).detach().requires_grad_()
        w = weight.detach().requires_grad_()
        y = rms_norm(x, w)
        y.backward(torch.ones_like(y))
        return y, x.grad, w.grad

    for offset in (0, 1, 0, 1):
        DirectLaunch.enabled = False
        try:
            through_triton = run(offset)
        finally:
            DirectLaunch.enabled = True
        direct = run(offset)
        for a, b in zip(through_triton, direct, strict=True):
            assert torch.equal(a, b)


def test_every_launched_kernel_in_the_ops_is_wrapped():
    """Each ``[grid](...)`` launch in fusetune/ops is of a kernel decorated ``@direct_launch`` (read
    from the source: under the interpreter the decorator hands kernels back unwrapped)."""
    import ast
    from pathlib import Path

    import fusetune.ops

    launched, wrapped = set(), set()
    for path in Path(fusetune.ops.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
                if isinstance(node.func.value, ast.Name) and node.func.value.id.endswith("_kernel"):
                    launched.add(node.func.value.id)
            if isinstance(node, ast.FunctionDef):
                names = {d.id for d in node.decorator_list if isinstance(d, ast.Name)}
                if "direct_launch" in names:
                    wrapped.add(node.name)
    assert len(launched) >= 15
    assert launched <= wrapped, f"launched without @direct_launch: {sorted(launched - wrapped)}"
