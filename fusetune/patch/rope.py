"""Rotary embeddings: each attention instance's ``forward`` is rebound to call fusetune's rope.

transformers' attention modules call ``apply_rotary_pos_emb`` from their modeling file's module
globals (``LlamaAttention.forward`` and its copies). Replacing that global would change every
model of the class in the process, so instead, per attention instance:

1. The class's ``forward`` is unwrapped (``__wrapped__``: ``@deprecate_kwarg`` and the like) to
   the plain function; the rule applies when that function's code loads a global rotary function
   (``apply_rotary_pos_emb``, or another global whose name mentions rotary / rope).
2. Each such global is verified once per function object: its signature must be
   ``(q, k, cos, sin, unsqueeze_dim=...)`` and, on small random inputs (both q/k layouts, a
   broadcast batch, and a partial-rotary ``cos`` where it accepts one), it must compute what
   ``fusetune.ops.rope.rope_reference`` computes. Interleaved RoPE (GLM, Cohere), M-RoPE's
   ``mrope_section`` argument, vision rotary helpers without ``unsqueeze_dim`` fail this and the
   attention module is left alone with the reason.
3. A new function is built from the SAME code object, with a copy of the modeling file's globals
   in which only those names are replaced by fusetune's rope, and the decorator wrappers are
   rebuilt around it (the same wrapper code and closure cells, with the inner function's cell
   swapped), so keyword renames and warnings behave exactly as before. It is bound as the
   instance's ``forward`` attribute (recorded in the report, so ``undo()`` removes it).

Nothing of the instance is closed over (the function is shared by every patched instance of the
class and bound with ``MethodType``), so a deep copy of a patched model rebinds to the copy.

The replacement falls back to the original global for any call the fused op does not take
(non-4-D q/k, cos/sin that do not broadcast the transformers way, float64), and promotes q and k
to cos/sin's dtype first when they differ (as ``q * cos`` would), so every call computes what
the original computed, with the same output dtypes.

The globals copy is a snapshot taken at the first patch: a later reassignment of another global
of the modeling file (by some other library) is not seen by patched instances until they are
unpatched and patched again.
"""

from __future__ import annotations

import dis
import inspect
import re
import types
from collections.abc import Callable, Iterator

import torch
from torch import nn

from fusetune.ops._launch import SUPPORTED_DTYPES
from fusetune.ops.rope import _check, rope, rope_reference
from fusetune.patch.probe import matches
from fusetune.patch.rules import Decision

# A global's name that marks a rotary function: "rotary" or "rope" as a word between underscores.
ROTARY_NAME = re.compile(r"(?:^|_)(?:rotary|rope)(?:_|$)", re.IGNORECASE)
_PARAMETERS = ("q", "k", "cos", "sin", "unsqueeze_dim")

NO_ATTENTION = (
    "no attention module's forward calls a rotary function (apply_rotary_pos_emb) as a module "
    "global, so there is no instance-level hook"
)

# original rotary function -> None (verified) or the reason it is not fusetune's rope.
_VERDICTS: dict[Callable, str | None] = {}
# original rotary function -> the replacement put in the copied globals.
_REPLACEMENTS: dict[Callable, Callable] = {}
# (class forward, names) -> the rebuilt forward (or the reason it cannot be rebuilt).
_FORWARDS: dict[tuple[Callable, tuple[str, ...]], Callable | str] = {}


# --------------------------------------------------------------------------------------------
# Finding the rotary globals an attention forward calls
# --------------------------------------------------------------------------------------------
def _wrapper_chain(function: Callable) -> list[Callable]:
    """``function`` and each ``__wrapped__`` below it, outermost first (as ``inspect.unwrap``)."""
    chain = [function]
    innermost = inspect.unwrap(function)
    while chain[-1] is not innermost:
        chain.append(chain[-1].__wrapped__)
    return chain


def _codes(code: types.CodeType) -> Iterator[types.CodeType]:
    """``code`` and every code object nested in it (inner functions, lambdas, comprehensions)."""
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _codes(const)


def _loaded_globals(function: types.FunctionType) -> set[str]:
    """Names the function's code (nested code included) loads as globals."""
    names = set()
    for code in _codes(function.__code__):
        for instruction in dis.get_instructions(code):
            if instruction.opname in ("LOAD_GLOBAL", "LOAD_NAME") and isinstance(instruction.argval, str):
                names.add(instruction.argval)
    return names


def _rotary_globals(function: types.FunctionType) -> dict[str, Callable]:
    """The rotary functions (by global name) that ``function`` calls from its module globals."""
    found = {}
    for name in sorted(_loaded_globals(function)):
        value = function.__globals__.get(name)
        if ROTARY_NAME.search(name) and callable(value) and not isinstance(value, type):
            found[name] = value
    return found


# --------------------------------------------------------------------------------------------
# Verifying a rotary function's maths against fusetune's rope
# --------------------------------------------------------------------------------------------
def _signature_reason(function: Callable) -> str | None:
    """Why ``function`` cannot be called like ``rope(q, k, cos, sin, unsqueeze_dim)``, or None."""
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return "its signature cannot be read"
    names = tuple(p.name for p in parameters)
    if names != _PARAMETERS or any(p.kind is not p.POSITIONAL_OR_KEYWORD for p in parameters):
        return f"its signature is ({', '.join(names)}), not (q, k, cos, sin, unsqueeze_dim)"
    if parameters[-1].default not in (1, 2) or any(p.default is not p.empty for p in parameters[:4]):
        return "its defaults differ from (q, k, cos, sin, unsqueeze_dim=1 or 2)"
    return None


def _probe_cases(default: int) -> Iterator[tuple[str, dict, int]]:
    """(description, call arguments, layout) probes; the layout is the unsqueeze_dim in effect."""
    generator = torch.Generator().manual_seed(1234)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    batch, q_heads, k_heads, seq, head_dim = 2, 3, 2, 5, 8
    for unsqueeze_dim, explicit, cos_batch, rotary_dim in (
        (default, False, batch, head_dim),  # the call attention modules make: the default layout
        (1, True, batch, head_dim),
        (2, True, batch, head_dim),
        (default, False, 1, head_dim),  # cos/sin broadcast over the batch
        (default, False, batch, head_dim // 2),  # partial rotary, where the function takes it
    ):
        heads_at = 1 if unsqueeze_dim == 1 else 2
        q_shape, k_shape = [batch, seq, seq, head_dim], [batch, seq, seq, head_dim]
        q_shape[heads_at], k_shape[heads_at] = q_heads, k_heads
        # cos/sin are random rather than cat(freqs, freqs): any difference in how the halves of
        # cos and sin are used (interleaving, using one half for both) shows.
        arguments = dict(q=randn(*q_shape), k=randn(*k_shape), cos=randn(cos_batch, seq, rotary_dim),
                         sin=randn(cos_batch, seq, rotary_dim))
        if explicit:
            arguments["unsqueeze_dim"] = unsqueeze_dim
        what = f"unsqueeze_dim={unsqueeze_dim}" + (", cos batch 1" if cos_batch == 1 else "")
        yield (what + (", partial rotary" if rotary_dim < head_dim else "")), arguments, unsqueeze_dim


def _maths_reason(function: Callable) -> str | None:
    """Why ``function`` does not compute ``rope_reference`` on the probes, or None."""
    default = inspect.signature(function).parameters["unsqueeze_dim"].default
    for what, arguments, layout in _probe_cases(default):
        partial = "partial" in what
        with torch.no_grad():
            try:
                out = function(**arguments)
            except Exception as error:  # noqa: BLE001 - any failure means "not this maths"
                if partial:
                    continue  # no partial rotary there: such a model never calls it with one
                return f"it raised {type(error).__name__} on a {what} probe"
            q, k, cos, sin = (arguments[n] for n in _PARAMETERS[:4])
            expected = rope_reference(q, k, cos, sin, layout)
        if not (isinstance(out, tuple) and len(out) == 2 and all(map(matches, out, expected))):
            return f"its output differs from fusetune's rope (rotate-half) on a {what} probe"
    return None


def verdict(function: Callable) -> str | None:
    """None when ``function`` is transformers' rotate-half ``apply_rotary_pos_emb``; else why not.

    Cached per function object, so each modeling file's function is probed once.
    """
    if function not in _VERDICTS:
        _VERDICTS[function] = _signature_reason(function) or _maths_reason(function)
    return _VERDICTS[function]


# --------------------------------------------------------------------------------------------
# The replacement rotary function and the rebuilt forward
# --------------------------------------------------------------------------------------------
def _fused_or_original(original: Callable, q, k, cos, sin, unsqueeze_dim):
    """fusetune's rope where it takes the call; ``original`` for anything else."""
    tensors = (q, k, cos, sin)
    if not all(isinstance(t, torch.Tensor) for t in tensors) or any(
        t.dtype not in SUPPORTED_DTYPES for t in tensors
    ):
        return original(q, k, cos, sin, unsqueeze_dim)
    try:
        _check(q, k, cos, sin, unsqueeze_dim)
    except ValueError:
        return original(q, k, cos, sin, unsqueeze_dim)
    # ``q * cos`` promotes: a bf16 q with float32 cos/sin (autocast) gives float32 outputs.
    q = q.to(torch.promote_types(torch.promote_types(q.dtype, cos.dtype), sin.dtype))
    k = k.to(torch.promote_types(torch.promote_types(k.dtype, cos.dtype), sin.dtype))
    return rope(q, k, cos, sin, unsqueeze_dim)


def _replacement(original: Callable) -> Callable:
    """A function with ``original``'s signature and name that runs ``_fused_or_original``."""
    if original not in _REPLACEMENTS:
        default = inspect.signature(original).parameters["unsqueeze_dim"].default

        def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=default):
            return _fused_or_original(original, q, k, cos, sin, unsqueeze_dim)

        apply_rotary_pos_emb.__name__ = getattr(original, "__name__", apply_rotary_pos_emb.__name__)
        apply_rotary_pos_emb.__doc__ = f"fusetune's rope standing in for {original.__qualname__}."
        apply_rotary_pos_emb.__wrapped_original__ = original
        _REPLACEMENTS[original] = apply_rotary_pos_emb
    return _REPLACEMENTS[original]


def _copy_function(function: types.FunctionType, globals_: dict, closure: tuple | None) -> types.FunctionType:
    """``function``'s code with other globals / closure cells; defaults and attributes copied."""
    copy = types.FunctionType(function.__code__, globals_, function.__name__, function.__defaults__, closure)
    copy.__kwdefaults__ = None if function.__kwdefaults__ is None else dict(function.__kwdefaults__)
    copy.__dict__.update(function.__dict__)
    copy.__qualname__ = function.__qualname__
    copy.__module__ = function.__module__  # taken from the globals' __name__, which a copy may lack
    copy.__doc__ = function.__doc__
    copy.__annotations__ = dict(function.__annotations__)
    return copy


def _globals_copy(function: types.FunctionType, replacements: dict[str, Callable]) -> dict:
    """``function``'s module globals with ``replacements``, and without ``__name__``.

    torch.compile guards a global that an inlined function reads through the module named by its
    globals' ``__name__`` (it re-imports the module), which here would be the modeling file with the
    original rotary function: torch 2.11 failed to build its guard on the replacement's closure
    (``'NoneType' object is not subscriptable``), and 2.13 guarded the original function instead of
    the one called. Without ``__name__`` it guards this dict itself. (A warning raised in the
    forward names its module ``<string>``; relative imports use ``__package__``, which is kept.)
    """
    copy = {**function.__globals__, **replacements}
    del copy["__name__"]
    return copy


def _rebuild(chain: list[Callable], replacements: dict[str, Callable]) -> Callable | str:
    """The wrapper chain around a copy of its innermost function whose globals hold ``replacements``.

    Each wrapper must be a plain function holding the next function in exactly one closure cell
    (``functools.wraps``-style decorators such as ``deprecate_kwarg``); it is copied with that cell
    replaced, so it behaves as before around the new inner function.
    """
    inner = chain[-1]
    rebuilt = _copy_function(inner, _globals_copy(inner, replacements), inner.__closure__)
    for wrapper, wrapped in zip(reversed(chain[:-1]), reversed(chain[1:]), strict=True):
        cells = (wrapper.__closure__ or ()) if isinstance(wrapper, types.FunctionType) else ()
        holding = [i for i, cell in enumerate(cells) if _cell_value(cell) is wrapped]
        if len(holding) != 1:
            name = getattr(wrapper, "__qualname__", wrapper)
            return f"its forward is wrapped by {name!r}, which fusetune cannot rebuild"
        closure = tuple(types.CellType(rebuilt) if i == holding[0] else cell for i, cell in enumerate(cells))
        rebuilt = _copy_function(wrapper, wrapper.__globals__, closure)
        if "__wrapped__" in rebuilt.__dict__:
            rebuilt.__wrapped__ = closure[holding[0]].cell_contents
    return rebuilt


def _cell_value(cell: types.CellType) -> object:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None


def patched_forward(class_forward: Callable) -> Callable | str | None:
    """The forward that calls fusetune's rope, the reason there is none, or None (no rotary call).

    Only the rotary globals whose maths is verified are replaced; others keep the original.
    Cached per class forward, so every instance of a class shares one function object.
    """
    chain = _wrapper_chain(class_forward)
    inner = chain[-1]
    if not isinstance(inner, types.FunctionType):
        return None
    rotary = _rotary_globals(inner)
    if not rotary:
        return None
    reasons = {name: verdict(function) for name, function in rotary.items()}
    verified = tuple(name for name, reason in reasons.items() if reason is None)
    if not verified:
        return "; ".join(f"{name} {reason}" for name, reason in reasons.items())
    key = (class_forward, verified)
    if key not in _FORWARDS:
        _FORWARDS[key] = _rebuild(chain, {name: _replacement(rotary[name]) for name in verified})
    return _FORWARDS[key]


# --------------------------------------------------------------------------------------------
# The rule
# --------------------------------------------------------------------------------------------
def _accelerate_forward(module: nn.Module) -> str | None:
    """The attribute holding the class forward under an accelerate hook, or None."""
    old = module.__dict__.get("_old_forward")
    if isinstance(old, types.MethodType) and old.__self__ is module and old.__func__ is type(module).forward:
        return "_old_forward"
    return None


def rope_rule(module: nn.Module) -> Decision | None:
    """Rebind an attention module's ``forward`` to call fusetune's rope, or say why not.

    None for modules whose class forward calls no global rotary function (rotary embedding
    modules, which compute cos/sin, are left to the model and not reported).
    """
    forward = patched_forward(type(module).forward)
    if forward is None:
        return None
    if isinstance(forward, str):
        return Decision("rope", reason=forward)
    attribute = "forward"
    if "forward" in module.__dict__:
        attribute = _accelerate_forward(module)
        if attribute is None:
            return Decision("rope", reason="the instance already has its own forward attribute")
    return Decision("rope", attributes=((attribute, types.MethodType(forward, module)),),
                    reason=_unfused_calls(type(module).forward))


def _unfused_calls(class_forward: Callable) -> str:
    """For a forward patched only in part, why its other rotary calls stay unfused ("" when none
    does): DeepSeek-V3's attention calls ``apply_rotary_pos_emb`` or, as its default config says,
    ``apply_rotary_pos_emb_interleave``, which is not fusetune's rope, and the report must not
    count that model's rope as fused."""
    inner = _wrapper_chain(class_forward)[-1]
    reasons = {name: verdict(function) for name, function in _rotary_globals(inner).items()}
    unfused = [f"{name} ({reason})" for name, reason in reasons.items() if reason is not None]
    if not unfused:
        return ""
    return (f"patched in part: its forward also calls {', '.join(unfused)}, and the calls its config "
            "routes there stay unfused")


def unclaimed_rotary(model: nn.Module) -> list[tuple[str, str]]:
    """Rotary embedding modules (an ``*inv_freq`` buffer), as left alone, for a model where no
    attention module was recognised as calling a rotary function."""
    return [
        (name, NO_ATTENTION)
        for name, module in model.named_modules()
        if any(b.endswith("inv_freq") for b, _ in module.named_buffers(recurse=False))
    ]
