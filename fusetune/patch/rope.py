"""Rotary embeddings: found and reported, not patched (no instance-level hook exists).

transformers' attention modules call ``apply_rotary_pos_emb`` from their modeling file's module
globals (``LlamaAttention.forward`` and its copies). Swapping that function would change every
model of the class in the process, and re-implementing each attention forward per transformers
version would be a copy of code fusetune cannot keep exact. So each rotary embedding module is
listed as left alone with this reason; ``fusetune.ops.rope`` stays available to code that calls
it directly.
"""

from __future__ import annotations

from torch import nn

from fusetune.patch.rules import Decision

NO_HOOK = (
    "no instance-level hook: attention calls its modeling file's global apply_rotary_pos_emb, "
    "and replacing that would patch every model of the class"
)


def rope_rule(module: nn.Module) -> Decision | None:
    """Report a rotary embedding module (one holding an ``*inv_freq`` buffer) as left alone."""
    if not any(name.endswith("inv_freq") for name, _ in module.named_buffers(recurse=False)):
        return None
    return Decision("rope", reason=NO_HOOK)
