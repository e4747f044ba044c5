"""``FusedLayerNorm``: a LayerNorm layer running ``fusetune.ops.layer_norm.layer_norm``."""

from __future__ import annotations

import torch
from torch import nn

from fusetune.ops.layer_norm import layer_norm


class FusedLayerNorm(nn.Module):
    """LayerNorm over the last dim (``torch.nn.LayerNorm`` maths), as one fused kernel.

    Holds the replaced layer's ``weight`` and ``bias`` (either may be None) as the same
    ``Parameter`` objects, so the state_dict keys are unchanged.
    """

    def __init__(self, weight: nn.Parameter | None, bias: nn.Parameter | None, eps: float):
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return layer_norm(hidden_states, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        shape = None if self.weight is None else tuple(self.weight.shape)
        return f"{shape}, eps={self.eps}, bias={self.bias is not None}"
