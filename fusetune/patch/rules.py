"""What a recognition rule returns about one module."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Decision:
    """A rule's verdict on a module of its ``kind``: swap in ``replacement``, set instance
    ``attributes`` (``(name, value)`` pairs, e.g. a rebound ``forward``), or leave it (``reason``).
    ``attributes`` with a ``reason`` patch the module in part: it is reported patched, and left
    alone for that reason too."""

    kind: str
    replacement: nn.Module | None = None
    reason: str = ""
    attributes: tuple[tuple[str, object], ...] = ()
