"""``FusedRMSNorm``: an RMSNorm layer running ``fusetune.ops.rms_norm.rms_norm``."""

from __future__ import annotations

import torch
from torch import nn

from fusetune.ops.rms_norm import rms_norm


class FusedRMSNorm(nn.Module):
    """RMSNorm over the last dim with a learned scale, as one fused kernel.

    ``offset`` and ``cast`` select the variant (see ``rms_norm``): ``offset=0, cast="llama"`` is
    ``LlamaRMSNorm`` (and Mistral's, Qwen's, Phi-3's), ``offset=1, cast="gemma"`` is Gemma's
    ``(1 + weight)`` norm. ``weight`` is kept as given (the same ``Parameter`` object), so the
    state_dict key stays ``weight``.
    """

    def __init__(self, weight: nn.Parameter, eps: float, offset: float = 0.0, cast: str = "llama"):
        super().__init__()
        self.weight = weight
        self.eps = eps
        self.offset = offset
        self.cast = cast

    @property
    def variance_epsilon(self) -> float:
        """The name ``LlamaRMSNorm`` gives its epsilon, for code that reads it."""
        return self.eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, self.weight, self.eps, self.offset, self.cast)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, offset={self.offset}, cast={self.cast!r}"
