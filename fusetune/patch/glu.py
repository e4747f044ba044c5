"""Recognition rule for gated MLPs: ``down_proj(act(gate_proj(x)) * up_proj(x))`` (or Phi-3's fused
``gate_up_proj``), with the activation identified by probing it, not by its class name.

Plain two-layer MLPs ``fc2(act(fc1(x)))`` (the vision towers' CLIP / SigLIP / ViT MLPs and the
projectors, with children ``fc1``/``fc2``, ``linear_fc1``/``linear_fc2`` or ``linear_1``/``linear_2``)
are listed as left alone: fusetune has no fused op for an ungated activation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fusetune.nn import FusedGatedMLP
from fusetune.ops.glu import geglu_reference, swiglu_reference
from fusetune.patch.probe import eval_mode, matches, probe_device, probe_input
from fusetune.patch.rules import Decision

_ACTIVATION_ATTRS = ("act_fn", "activation_fn")

# Activation name (a key of fusetune.nn.glu.GLU_OPS) -> its plain PyTorch function and the
# reference of the fused act(gate) * up.
_ACTIVATIONS = {
    "silu": (F.silu, swiglu_reference),
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), geglu_reference),
    "gelu": (F.gelu, lambda gate, up: geglu_reference(gate, up, approximate="none")),
}


def _projections(module: nn.Module) -> list[str] | None:
    """The projection names of a gated MLP (separate or fused gate/up), or None if it is not one."""
    children = dict(module.named_children())
    if "down_proj" not in children:
        return None
    if "gate_proj" in children and "up_proj" in children:
        return ["gate_proj", "up_proj", "down_proj"]
    if "gate_up_proj" in children:
        return ["gate_up_proj", "down_proj"]
    return None


def _identify_activation(act, device: torch.device) -> str | None:
    """Which of SiLU / tanh-GELU / erf-GELU ``act`` computes, by evaluating it on a float32 ramp."""
    x = torch.linspace(-6.0, 6.0, 241, device=device)
    with torch.no_grad():
        out = act(x)
    for name, (function, _) in _ACTIVATIONS.items():
        if matches(out, function(x)):
            return name
    return None


def _gate_up(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(module, "gate_up_proj"):
        return module.gate_up_proj(x).chunk(2, dim=-1)
    return module.gate_proj(x), module.up_proj(x)


def _forward_matches(module: nn.Module, activation: str, device: torch.device) -> bool:
    """Whether ``module(x)`` equals ``down_proj(act(gate) * up)`` on a probe input."""
    first = module.gate_up_proj if hasattr(module, "gate_up_proj") else module.gate_proj
    width = getattr(first, "in_features", None)
    if width is None:
        return False
    dtype = next((p.dtype for p in first.parameters() if p.is_floating_point()), None)
    if dtype is None:
        return False
    # Inputs that require grad keep bitsandbytes' 4-bit layers on CPU from repacking their weights
    # for inference, a lossy change of layout they make in eval mode for inputs without grad.
    x = probe_input(width, dtype, device).requires_grad_()
    with eval_mode(module), torch.enable_grad():
        gate, up = _gate_up(module, x)
        expected = module.down_proj(_ACTIVATIONS[activation][1](gate, up))
        return matches(module(x), expected)


# Child-name pairs of an ungated two-layer MLP.
_UNGATED = (("fc1", "fc2"), ("linear_fc1", "linear_fc2"), ("linear_1", "linear_2"))

UNGATED_REASON = "ungated MLP fc2(act(fc1(x))): fusetune fuses only gated act(gate) * up"


def _ungated(module: nn.Module) -> bool:
    children = dict(module.named_children())
    return any(all(isinstance(children.get(c), nn.Linear) for c in pair) for pair in _UNGATED)


def glu_rule(module: nn.Module) -> Decision | None:
    """Swap a gated MLP whose activation and forward the probes confirm for ``FusedGatedMLP``."""
    if isinstance(module, FusedGatedMLP):
        return None
    if _projections(module) is None:
        return Decision("glu", reason=UNGATED_REASON) if _ungated(module) else None
    act = next((getattr(module, a) for a in _ACTIVATION_ATTRS if callable(getattr(module, a, None))), None)
    if act is None:
        return Decision("glu", reason="no act_fn / activation_fn to identify")
    device = probe_device(module)
    if isinstance(device, str):
        return Decision("glu", reason=f"cannot probe: {device}")
    try:
        activation = _identify_activation(act, device)
        if activation is None:
            return Decision("glu", reason=f"activation {type(act).__name__} is not SiLU or GELU")
        if not _forward_matches(module, activation, device):
            return Decision("glu", reason=f"{type(module).__name__}.forward is not down_proj(act(gate) * up)")
    except Exception as error:  # an exotic forward that rejects the probe is simply not ours
        return Decision("glu", reason=f"probe failed ({type(error).__name__}: {error})")
    return Decision("glu", FusedGatedMLP(dict(module.named_children()), activation))
