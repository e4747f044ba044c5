"""Launching a Triton kernel straight through its compiled kernel once it has been compiled.

``kernel[grid](*args)`` on a ``triton.jit`` function does, at every call, work whose result only
changes when the kernel needs compiling again: it re-reads Triton's settings from the environment,
binds and specialises each argument, builds a string cache key, checks the kernel's globals, and
builds launch metadata for and calls the (empty) launch hooks. The ops make one to three launches a
call and a small model's training step hundreds, so where the host sets a step's pace that is time
the GPU waits. On an H200's host (torch 2.11, Triton 3.6; ``bench/nf4.py --host``,
``bench/results/nf4-host-h200-direct.jsonl``) a bare launch took 25.3 microseconds that way and
14.7 through :class:`DirectLaunch`, against 6.0 for a small torch op.

:func:`direct_launch` wraps a kernel so that a launch goes through Triton once per specialisation
(compiling it, with every one of Triton's checks), and after that straight to the compiled kernel's
launcher, looked up by a key of this module's own: the current device, the specialisation of each
argument (what Triton specialises on, :func:`argument_key`) and the keyword arguments (constexprs and
launch options); a launch whose int arguments repeat earlier values finds it by those values, without
working the specialisation out again (:class:`DirectLaunch`). Triton's path is kept where the
shortcut would skip something it does: under the interpreter (the CPU tests), and while launch hooks
are set (a profiler such as Proton's). The
launcher is called as ``JITFunction.run`` calls it in Triton 3.4 to 3.9 (grid, stream, function,
metadata, launch metadata, the two hooks, then every parameter's value in order, constexprs too);
``pyproject.toml`` allows those versions. What the shortcut skips at every call, Triton's settings
read again (``TRITON_DEBUG`` and the like, part of its compile key) and its check that the globals a
kernel reads have not changed, applies to a kernel's first launch of each key: set such settings
before the ops run.
"""

from __future__ import annotations

import torch

from fusetune.ops._launch import triton

_INT32 = range(-(2**31), 2**31)
_INT64_END = 2**63

# The key of an argument this module does not know how Triton specialises: such a launch always
# goes through Triton.
TRITON_DECIDES = object()

# Entries a kernel's table of launches by argument value holds before it is emptied (DirectLaunch).
VALUE_KEYS = 1024


def argument_key(arg) -> object:
    """What Triton specialises a non-constexpr kernel argument on, as a hashable value.

    Triton 3.4 to 3.9 (``native_specialize_impl``; in 3.4 ``create_specialize_impl``): a tensor by
    its dtype and whether its address is a multiple of 16; an int equal to 1 becomes a constant,
    others by whether they fit 32 or 64 signed bits (else unsigned 64) and are a multiple of 16;
    None is a constant; a bool or float by its type alone. ``tests/ops/test_direct_launch.py``
    checks that arguments Triton tells apart get different keys here. Any other type:
    :data:`TRITON_DECIDES`.
    """
    kind = type(arg)
    if kind is bool or kind is float:
        return kind
    if kind is int:
        return (arg == 1, arg % 16 == 0, arg in _INT32, arg < _INT64_END)
    if arg is None:
        return None
    if isinstance(arg, torch.Tensor):
        return (arg.dtype, arg.data_ptr() % 16 == 0)
    return TRITON_DECIDES


def _hooks_set() -> bool:
    """Whether Triton launch hooks are registered (``HookChain``s from Triton 3.5 on, a function or
    None in 3.4)."""
    runtime = triton.knobs.runtime
    return any(getattr(hook, "calls", hook is not None) for hook in (runtime.launch_enter_hook,
                                                                       runtime.launch_exit_hook))


class DirectLaunch:
    """A ``triton.jit`` kernel whose launches skip Triton's per-call work once compiled (above).

    ``kernel[grid](*args, **keywords)`` works as on the ``triton.jit`` function, with ``grid`` a
    tuple of up to three ints and every constexpr passed by keyword (a positional argument is looked
    up by its specialisation, which a constexpr's value is not); other attributes are the function's.
    ``enabled`` (class-wide) switches the shortcut off, for the benchmark that measures it.

    Two tables find a launch's compiled kernel. ``_compiled`` is keyed by the specialisation
    (:func:`argument_key` of each argument): one entry per compiled kernel. Working that key out
    costs about 0.2 microseconds an int argument in Python, and a kernel with many strides pays it
    at every launch, so ``_by_value`` remembers the entry under a cheaper key that holds the int
    arguments themselves (an int's specialisation is a function of its value). A launch whose int
    values were seen before finds its entry there; new values work out the specialisation once.
    ``_by_value`` is emptied when it reaches :data:`VALUE_KEYS` entries (a training run whose
    sequence lengths all differ), so it stays bounded.
    """

    enabled = True

    def __init__(self, jit_function):
        self.jit_function = jit_function
        params = jit_function.params
        self._names = [param.name for param in params]
        self._positional = next((i for i, param in enumerate(params) if param.is_constexpr), len(params))
        self._defaults = {param.name: param.default for param in params if param.has_default}
        self._compiled: dict[tuple, tuple] = {}
        self._by_value: dict[tuple, tuple] = {}

    def __getattr__(self, name):
        if name == "jit_function":  # not set yet (a copy being made): no attribute to forward to
            raise AttributeError(name)
        return getattr(self.jit_function, name)

    def __getitem__(self, grid):
        return lambda *args, **keywords: self.launch(grid, args, keywords)

    def launch(self, grid, args: tuple, keywords: dict) -> None:
        """Launch on ``grid`` (a tuple of up to three ints) with the kernel's arguments."""
        if not DirectLaunch.enabled:
            self.jit_function[grid](*args, **keywords)
            return
        if len(args) > self._positional:
            name = self._names[self._positional]
            raise TypeError(f"fusetune: pass {name} to {self.fn.__name__} by keyword (it is a constexpr).")
        device = torch.cuda.current_device()
        options = tuple(keywords.items())
        by_value = (device, tuple([arg if type(arg) is int else argument_key(arg) for arg in args]), options)
        entry = self._by_value.get(by_value)
        if entry is None or _hooks_set():
            entry = self._entry(grid, args, keywords, (device, tuple(map(argument_key, args)), options))
            if entry is None:
                return
            if len(self._by_value) >= VALUE_KEYS:
                self._by_value.clear()
            self._by_value[by_value] = entry
        run, function, metadata, constexprs, _ = entry
        run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
            torch._C._cuda_getCurrentRawStream(device), function, metadata, None, None, None,
            *args, *constexprs)

    def _entry(self, grid, args: tuple, keywords: dict, key: tuple) -> tuple | None:
        """The compiled kernel of specialisation ``key`` as ``(launcher, function, metadata, the
        values of the parameters after args, the compiled kernel)`` (the last keeps its module
        loaded); or, where this launch must go through Triton (a new specialisation, hooks set, an
        argument the key does not know), None once it has gone."""
        entry = self._compiled.get(key)
        if entry is not None and not _hooks_set():
            return entry
        compiled = self.jit_function[grid](*args, **keywords)
        if entry is None and TRITON_DECIDES not in key[1]:
            constexprs = tuple(keywords[name] if name in keywords else self._defaults[name]
                               for name in self._names[len(args):])
            self._compiled[key] = (compiled.run, compiled.function, compiled.packed_metadata, constexprs,
                                   compiled)
        return None


def direct_launch(jit_function):
    """``jit_function`` (a ``triton.jit`` kernel) launched through :class:`DirectLaunch`; under the
    interpreter, where ``triton.jit`` gives an interpreted function, that function as it is."""
    if triton is None or not isinstance(jit_function, triton.runtime.JITFunction):
        return jit_function
    return DirectLaunch(jit_function)
