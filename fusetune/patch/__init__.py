"""Patching a loaded transformers model: recognise its parts, swap in fused ones, wire the loss.

``apply(model)`` returns a ``PatchReport``; ``unapply(model)`` (or ``report.undo()``) restores
the original modules. Rules live one kind per file (``norms``, ``glu``, ``rope``, ``loss``).
"""

from fusetune.patch.apply import apply, unapply
from fusetune.patch.report import PatchReport

__all__ = ["PatchReport", "apply", "unapply"]
