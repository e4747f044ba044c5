"""Tensors a checkpointed layer's forward hands to its own recompute, so the recompute need not make
them again.

``fusetune.checkpointing`` runs a layer twice: without a graph in forward, with gradients in backward.
Some of what the second run computes is bitwise what the first computed: an attention output, a
projection's output. An op that can use such tensors *offers* them in forward and *takes* them back
in the recompute, by kind (``"attention"``, ``"projections"``), call by call in the order made. The
checkpoint says which kinds it keeps; it copies their tensors to host memory beside the layer's
input and brings them back a layer ahead in backward. A take outside a recompute, or for a call
whose forward kept nothing, answers None, and the op computes as usual; offers outside a
checkpoint, or of kinds it does not keep, go nowhere.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import torch

__all__ = ["keeping", "offer", "offering", "recomputing", "reusing", "take"]


class _Keeper(threading.local):
    """This thread's checkpoint: ``sink(kind, tensors, state)`` in a layer's forward; ``sources``
    (kind -> iterator of ``(tensors, state)`` or None) in its recompute."""

    sink: Callable[[str, tuple[torch.Tensor, ...] | None, object], None] | None = None
    kinds: frozenset = frozenset()  # what the sink takes
    sources: dict[str, Iterator] | None = None


_KEEPER = _Keeper()


@contextlib.contextmanager
def _active(sink, kinds, sources):
    previous = _KEEPER.sink, _KEEPER.kinds, _KEEPER.sources
    _KEEPER.sink, _KEEPER.kinds, _KEEPER.sources = sink, frozenset(kinds), sources
    try:
        yield
    finally:
        _KEEPER.sink, _KEEPER.kinds, _KEEPER.sources = previous


def keeping(sink: Callable[[str, tuple[torch.Tensor, ...] | None, object], None], kinds):
    """Within the block (a checkpointed layer's forward) offers of ``kinds`` go to ``sink``.

    A checkpointed layer nested in another's forward or recompute keeps nothing of its own: its
    calls offer to, and take from, the outer layer's, so that the outer layer's calls stay paired
    with their kept items (its own recompute, later, computes everything again)."""
    if _KEEPER.sink is not None or _KEEPER.sources is not None:
        return contextlib.nullcontext()
    return _active(sink, kinds, None)


def reusing(kept: dict[str, list]):
    """Within the block (a layer's recompute) each kind's takes get, in order, the items of
    ``kept[kind]``: ``(tensors, state)``, or None for a call to compute again."""
    return _active(None, (), {kind: iter(items) for kind, items in kept.items()})


def offer(kind: str, tensors: tuple[torch.Tensor, ...] | None, state: object = None) -> None:
    """In a checkpointed layer's forward, offer ``tensors`` (None: this call keeps nothing, but
    counts, so the recompute's calls pair with forward's) and the ``state`` that goes with them.
    The tensors must not be written in place afterwards (if they are, the checkpoint notices by
    their version counters and the recompute computes them again)."""
    if offering(kind):
        _KEEPER.sink(kind, tensors, state)


def offering(kind: str) -> bool:
    """Whether offers of ``kind`` are being taken (a checkpointed layer's forward that keeps it)."""
    return _KEEPER.sink is not None and kind in _KEEPER.kinds


def recomputing(kind: str | None = None) -> bool:
    """Whether this is a layer's recompute (with ``kind``: of a layer whose forward kept that kind).
    In the recompute of a layer that keeps ``kind``, a call of that kind takes what its forward
    counterpart kept (and computes as that counterpart did where it kept nothing); in any other, it
    computes as in a plain forward."""
    return _KEEPER.sources is not None and (kind is None or kind in _KEEPER.sources)


def take(kind: str) -> tuple[tuple[torch.Tensor, ...], object] | None:
    """In a recompute, what this call's forward counterpart kept: ``(tensors, state)``, or None."""
    if _KEEPER.sources is None or kind not in _KEEPER.sources:
        return None
    return next(_KEEPER.sources[kind], None)
