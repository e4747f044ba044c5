"""Recognition by probing: the right RMSNorm variant and GLU activation, and refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from fusetune.nn import FusedGatedMLP, FusedLayerNorm
from fusetune.patch.glu import glu_rule
from fusetune.patch.norms import layer_norm_rule, rms_norm_rule


def _randomised(norm: nn.Module, dtype: torch.dtype) -> nn.Module:
    with torch.no_grad():
        norm.weight.copy_(torch.randn(norm.weight.shape))
    return norm.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "norm_class,variant", [(LlamaRMSNorm, (0.0, "llama")), (Gemma3RMSNorm, (1.0, "gemma"))]
)
def test_rms_norm_variant_is_found_by_probing(norm_class, variant, dtype):
    norm = _randomised(norm_class(32, eps=1e-5), dtype)
    decision = rms_norm_rule(norm)
    fused = decision.replacement
    assert (fused.offset, fused.cast, fused.eps) == (*variant, 1e-5)
    assert fused.weight is norm.weight


def test_rms_norm_on_meta_device_is_left_alone():
    with torch.device("meta"):
        norm = LlamaRMSNorm(16)
    decision = rms_norm_rule(norm)
    assert decision.replacement is None and "meta" in decision.reason


class _MLP(nn.Module):
    def __init__(self, act: str, act_on_up: bool = False):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(16, 24), nn.Linear(16, 24)
        self.down_proj = nn.Linear(24, 16)
        self.act_fn = ACT2FN[act]
        self.act_on_up = act_on_up

    def forward(self, x):
        gate, up = self.gate_proj(x), self.up_proj(x)
        if self.act_on_up:
            gate, up = up, gate
        return self.down_proj(self.act_fn(gate) * up)


@pytest.mark.parametrize(
    "act,expected", [("silu", "silu"), ("gelu_pytorch_tanh", "gelu_tanh"), ("gelu", "gelu")]
)
def test_glu_activation_is_identified(act, expected):
    decision = glu_rule(_MLP(act))
    assert isinstance(decision.replacement, FusedGatedMLP) and decision.replacement.activation == expected


def test_glu_with_other_activation_or_maths_is_left_alone():
    assert "not SiLU or GELU" in glu_rule(_MLP("relu")).reason
    assert "forward is not" in glu_rule(_MLP("silu", act_on_up=True)).reason


def test_layer_norm_rule():
    assert isinstance(layer_norm_rule(nn.LayerNorm(8)).replacement, FusedLayerNorm)
    assert layer_norm_rule(nn.LayerNorm((4, 8))).replacement is None
    assert layer_norm_rule(nn.Linear(2, 2)) is None
