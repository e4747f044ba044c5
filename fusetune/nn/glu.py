"""``FusedGatedMLP``: the gated MLP of a decoder layer with its activation-times-up fused."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from fusetune.ops.glu import geglu, swiglu

# Activation name -> the fused ``act(gate) * up``.
GLU_OPS = {
    "silu": swiglu,
    "gelu_tanh": partial(geglu, approximate="tanh"),
    "gelu": partial(geglu, approximate="none"),
}


class FusedGatedMLP(nn.Module):
    """``down_proj(act(gate) * up)`` with ``act(gate) * up`` as one fused kernel.

    ``children`` are the replaced MLP's submodules, kept under their names (so state_dict keys and
    PEFT's LoRA layers on them stay as they were): either ``gate_proj`` and ``up_proj`` (Llama and
    most others) or one ``gate_up_proj`` whose output halves are gate then up (Phi-3), plus
    ``down_proj``. Other children (the activation module) are kept too, for code that reads them.
    ``activation`` is a key of ``GLU_OPS``.
    """

    def __init__(self, children: dict[str, nn.Module], activation: str):
        super().__init__()
        if activation not in GLU_OPS:
            raise ValueError(f"fusetune: activation={activation!r}; use one of {sorted(GLU_OPS)}.")
        for name, child in children.items():
            self.add_module(name, child)
        self.activation = activation
        self._fused_gate_up = "gate_up_proj" in children

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self._fused_gate_up:
            gate, up = self.gate_up_proj(hidden_states).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(hidden_states), self.up_proj(hidden_states)
        return self.down_proj(GLU_OPS[self.activation](gate, up))

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"
