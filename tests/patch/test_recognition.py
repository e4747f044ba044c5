"""Recognition by probing: the right RMSNorm variant and GLU activation, and refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from fusetune.nn import FusedGatedMLP, FusedLayerNorm
from fusetune.patch.glu import UNGATED_REASON, glu_rule
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


class _GatedNorm(LlamaRMSNorm):
    """Mamba2's gated RMSNorm (Bamba, Granite-4.0-H, Zamba2): ``norm(x * silu(gate))`` where the
    mixer passes a gate, a plain RMSNorm where it does not (so a probe without one matches)."""

    def forward(self, hidden_states, gate=None):
        if gate is not None:
            hidden_states = hidden_states * nn.functional.silu(gate)
        return super().forward(hidden_states)


def test_a_norm_whose_forward_takes_more_than_its_input_is_left_alone():
    decision = rms_norm_rule(_GatedNorm(32))
    assert decision.replacement is None and "takes gate besides the input" in decision.reason


class _MLP(nn.Module):
    def __init__(self, act: str, act_on_up: bool = False, dropout: float = 0.0, limit: float | None = None):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(16, 24), nn.Linear(16, 24)
        self.down_proj = nn.Linear(24, 16)
        self.act_fn = ACT2FN[act]
        self.act_on_up = act_on_up
        self.dropout, self.limit = dropout, limit  # Seed-OSS's residual dropout, DeepSeek-V4's clamp

    def forward(self, x):
        gate, up = self.gate_proj(x), self.up_proj(x)
        if self.act_on_up:
            gate, up = up, gate
        if self.limit is not None:
            gate, up = gate.clamp(max=self.limit), up.clamp(-self.limit, self.limit)
        out = self.down_proj(self.act_fn(gate) * up)
        return nn.functional.dropout(out, self.dropout, training=self.training)


@pytest.mark.parametrize(
    "act,expected", [("silu", "silu"), ("gelu_pytorch_tanh", "gelu_tanh"), ("gelu", "gelu")]
)
def test_glu_activation_is_identified(act, expected):
    decision = glu_rule(_MLP(act))
    assert isinstance(decision.replacement, FusedGatedMLP) and decision.replacement.activation == expected


def test_glu_with_other_activation_or_maths_is_left_alone():
    assert "not SiLU or GELU" in glu_rule(_MLP("relu")).reason
    assert "forward is not" in glu_rule(_MLP("silu", act_on_up=True)).reason


@pytest.mark.parametrize("options, where",
                         [(dict(dropout=0.1), "training mode"), (dict(limit=10.0), "large inputs")],
                         ids=["dropout", "clamp"])
def test_a_gated_mlp_that_differs_only_in_training_or_at_large_inputs_is_left_alone(options, where):
    """Seed-OSS drops out its MLP's output, DeepSeek-V4 clamps gate and up at 10: an eval-mode probe
    near 1 sees neither. The probe in training mode leaves the random state as it was; with those
    features off the MLP is fused."""
    mlp = _MLP("silu", **options)
    state = torch.random.get_rng_state()
    decision = glu_rule(mlp)
    assert decision.replacement is None
    assert decision.reason.endswith(f"is not down_proj(act(gate) * up) on {where}")
    assert torch.equal(torch.random.get_rng_state(), state)
    off = {name: 0.0 if name == "dropout" else None for name in options}
    assert isinstance(glu_rule(_MLP("silu", **off)).replacement, FusedGatedMLP)


class _TakesPositions(_MLP):
    def forward(self, x, positions=None):
        return super().forward(x)


class _W123(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(16, 24), nn.Linear(24, 16), nn.Linear(16, 24)


class _UpDown(nn.Module):
    def __init__(self):
        super().__init__()
        self.up_proj, self.down_proj = nn.Linear(16, 24), nn.Linear(24, 16)


class _ChunkedProjector(nn.Module):
    """Aya Vision's projector: ``x, gate = linear_1(h).chunk(2)``, then ``linear_2(act(gate) * x)``."""

    def __init__(self):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(16, 48), nn.Linear(24, 16)


class _Experts(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.zeros(4, 48, 16))
        self.down_proj = nn.Parameter(torch.zeros(4, 16, 24))


@pytest.mark.parametrize("module, reason", [
    (_TakesPositions("silu"), "takes positions besides the input"),
    (_UpDown(), UNGATED_REASON),
    (_W123(), "named w1/w2/w3"),
    (_ChunkedProjector(), "gated MLP with gate and up in one linear_1"),
    (_Experts(), "mixture-of-experts"),
], ids=["extra_argument", "ungated_up_down", "w1_w2_w3", "chunked_projector", "experts"])
def test_mlps_fusetune_does_not_fuse_are_listed_with_why(module, reason):
    decision = glu_rule(module)
    assert decision.replacement is None and reason in decision.reason


def test_layer_norm_rule():
    assert isinstance(layer_norm_rule(nn.LayerNorm(8)).replacement, FusedLayerNorm)
    assert layer_norm_rule(nn.LayerNorm((4, 8))).replacement is None
    assert layer_norm_rule(nn.Linear(2, 2)) is None
