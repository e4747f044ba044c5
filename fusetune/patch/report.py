"""``PatchReport``: what ``fusetune.apply`` changed, what it left alone and why, and the way back."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from torch import nn

KINDS = ("rms_norm", "layer_norm", "glu", "vision_attention", "rope", "lora", "loss")


@dataclass
class PatchReport:
    """Per module kind: the patched module names, and the left-alone ones with the reason.

    ``undo()`` puts every original attribute back (the swapped submodules and the model's
    instance-level ``forward``). The restore list holds plain ``(owner, attribute, old value)``
    records rather than closures, so a deep copy of a patched model (which copies its report
    along with it) undoes itself, not the model it was copied from.
    """

    patched: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    left_alone: dict[str, list[tuple[str, str]]] = field(default_factory=lambda: defaultdict(list))
    switched_off: set[str] = field(default_factory=set)
    _restore: list[tuple[object, str, object]] = field(default_factory=list, repr=False)
    undone: bool = False

    def set_attr(self, owner: object, name: str, value: object) -> None:
        """Set ``owner.name = value``, remembering the old value (None: the attribute was absent)."""
        if isinstance(owner, nn.Module) and name in owner._modules:
            old = owner._modules[name]
        else:
            old = owner.__dict__.get(name)
        self._restore.append((owner, name, old))
        setattr(owner, name, value)

    def replaced_classes(self) -> set[str]:
        """The class names of the modules this patch swapped out (the model holds their fused
        replacements instead)."""
        return {type(old).__name__ for _, _, old in self._restore if isinstance(old, nn.Module)}

    def undo(self) -> None:
        """Restore every original module and attribute, newest change first; idempotent."""
        if self.undone:
            return
        for owner, name, old in reversed(self._restore):
            if old is None:
                owner.__dict__.pop(name, None)
            else:
                setattr(owner, name, old)
        self._restore.clear()
        self.undone = True

    def __str__(self) -> str:
        lines = [f"{'kind':<17}{'patched':>8}{'left alone':>12}"]
        for kind in KINDS:
            if kind in self.switched_off:
                lines.append(f"{kind:<17}{'off':>8}{'-':>12}")
            else:
                lines.append(f"{kind:<17}{len(self.patched[kind]):>8}{len(self.left_alone[kind]):>12}")
        reasons: dict[tuple[str, str], list[str]] = defaultdict(list)
        for kind in KINDS:
            for name, reason in self.left_alone[kind]:
                reasons[kind, reason].append(name or "<model>")
        if reasons:
            lines.append("left alone:")
        for (kind, reason), names in reasons.items():
            shown = ", ".join(names[:2]) + (f" and {len(names) - 2} more" if len(names) > 2 else "")
            lines.append(f"  {kind}: {shown}: {reason}")
        if self.undone:
            lines.append("(undone: the original modules are back)")
        return "\n".join(lines)
