"""Tensors a checkpointed layer's forward hands to its own recompute, so the recompute need not make
them again.

``fusetune.checkpointing`` runs a layer twice: without a graph in forward, with gradients in backward.
Some of what the second run computes is bitwise what the first computed: an attention output, an MLP
projection. An op that can use such a tensor *offers* it in forward and *takes* it back in the
recompute, by kind (``"attention"``, ``"mlp_up"``), call by call in the order made. The checkpoint
decides what to keep (it copies kept tensors to host memory beside the layer's input and brings them
back a layer ahead in backward); an offer it declines, and every take outside a recompute, answers
None, and the op computes as usual. Outside a checkpoint, offers go nowhere.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import torch

__all__ = ["keeping", "offer", "offering", "recomputing", "reusing", "take"]


class _Keeper(threading.local):
    """This thread's checkpoint: ``sink(kind, tensor, state)`` in a layer's forward; ``sources``
    (kind -> iterator of ``(tensor, state)`` or None) in its recompute."""

    sink: Callable[[str, torch.Tensor, object], None] | None = None
    sources: dict[str, Iterator] | None = None


_KEEPER = _Keeper()


@contextlib.contextmanager
def _active(sink, sources):
    previous = _KEEPER.sink, _KEEPER.sources
    _KEEPER.sink, _KEEPER.sources = sink, sources
    try:
        yield
    finally:
        _KEEPER.sink, _KEEPER.sources = previous


def keeping(sink: Callable[[str, torch.Tensor | None, object], None]):
    """Within the block (a checkpointed layer's forward) every offer goes to ``sink``."""
    return _active(sink, None)


def reusing(kept: dict[str, list]):
    """Within the block (a layer's recompute) each kind's takes get, in order, the items of
    ``kept[kind]``: ``(tensor, state)``, or None for a call to compute again."""
    return _active(None, {kind: iter(items) for kind, items in kept.items()})


def offer(kind: str, tensor: torch.Tensor | None, state: object = None) -> None:
    """In a checkpointed layer's forward, offer ``tensor`` (None: this call keeps nothing, but
    counts, so the recompute's calls pair with forward's) and the ``state`` that goes with it."""
    if _KEEPER.sink is not None:
        _KEEPER.sink(kind, tensor, state)


def offering() -> bool:
    """Whether offers are being taken (a checkpointed layer's forward)."""
    return _KEEPER.sink is not None


def recomputing() -> bool:
    """Whether this is a layer's recompute, where takes may answer."""
    return _KEEPER.sources is not None


def take(kind: str) -> tuple[torch.Tensor, object] | None:
    """In a recompute, what this call's forward counterpart kept: ``(tensor, state)``, or None."""
    if _KEEPER.sources is None or kind not in _KEEPER.sources:
        return None
    return next(_KEEPER.sources[kind], None)
