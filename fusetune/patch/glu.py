"""Recognition rule for gated MLPs: ``down_proj(act(gate_proj(x)) * up_proj(x))`` (or Phi-3's fused
``gate_up_proj``), with the activation identified by probing it, not by its class name.

Probed three ways (inputs near 1, inputs a hundred times larger, and training mode), so that a
forward that clamps gate and up or adds dropout of its own is left alone, and one whose forward
takes more than its input is never swapped. Plain two-layer MLPs ``fc2(act(fc1(x)))`` (the vision
towers' CLIP / SigLIP / ViT MLPs and the projectors, with children ``fc1``/``fc2``,
``linear_fc1``/``linear_fc2`` or ``linear_1``/``linear_2``, and ungated ``up_proj``/``down_proj``),
gated MLPs under other names (``w1``/``w2``/``w3``) and mixture-of-experts blocks holding 3-D expert
weights are listed as left alone: fusetune fuses dense gated MLPs with these names only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fusetune.nn import FusedGatedMLP
from fusetune.ops.glu import geglu_reference, swiglu_reference
from fusetune.patch.probe import extra_forward_arguments, matches, probe_device, probe_input, probe_mode
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


# How much larger than the plain probe the second probe input is: large enough that a clamp of
# gate and up (DeepSeek-V4's swiglu_limit of 10) changes the output, which inputs near 1 never show.
_LARGE_PROBE = 100.0


def _forward_mismatch(module: nn.Module, activation: str, device: torch.device) -> str | None:
    """Why ``module(x)`` cannot be taken for ``down_proj(act(gate) * up)``, or None where it can: it
    must equal it on a plain probe input and a large one in eval mode, and on the plain one in
    training mode (a forward that adds dropout of its own, as Seed-OSS's does, differs there; its
    projections' dropout, PEFT's, is judged by the LoRA path)."""
    first = module.gate_up_proj if hasattr(module, "gate_up_proj") else module.gate_proj
    width = getattr(first, "in_features", None)
    if width is None:
        return f"its first projection, a {type(first).__name__}, has no in_features to probe it with"
    dtype = next((p.dtype for p in first.parameters() if p.is_floating_point()), None)
    if dtype is None:
        return "its first projection has no floating-point weight to probe it with"
    # Inputs that require grad keep bitsandbytes' 4-bit layers on CPU from repacking their weights
    # for inference, a lossy change of layout they make in eval mode for inputs without grad.
    x = probe_input(width, dtype, device).requires_grad_()
    probes = (("inputs near 1", x, False), ("large inputs", x * _LARGE_PROBE, False),
              ("training mode", x, True))
    for what, probe, training in probes:
        with probe_mode(module, training), torch.enable_grad():
            gate, up = _gate_up(module, probe)
            expected = module.down_proj(_ACTIVATIONS[activation][1](gate, up))
            if not matches(module(probe), expected):
                return f"{type(module).__name__}.forward is not down_proj(act(gate) * up) on {what}"
    return None


# Child-name pairs of an ungated two-layer MLP (Arcee's and Apertus' up_proj / down_proj when no
# gate_proj is there).
_UNGATED = (("fc1", "fc2"), ("linear_fc1", "linear_fc2"), ("linear_1", "linear_2"), ("up_proj", "down_proj"))

UNGATED_REASON = "ungated MLP fc2(act(fc1(x))): fusetune fuses only gated act(gate) * up"

# A gated MLP under other names (LFM2's w2(silu(w1(x)) * w3(x))).
_OTHER_NAMES = ("w1", "w2", "w3")

# Direct parameters of a mixture-of-experts block that holds every expert's projection as one
# (experts, out, in) tensor (Qwen3-MoE, Mixtral, OLMoE, GraniteMoE in transformers 5).
_EXPERT_WEIGHTS = ("gate_up_proj", "down_proj", "gate_proj", "up_proj")


def _linears(module: nn.Module, names: tuple[str, ...]) -> bool:
    children = dict(module.named_children())
    return all(isinstance(children.get(name), nn.Linear) for name in names)


def _unrecognised(module: nn.Module) -> str | None:
    """Why a module shaped like an MLP but not like the gated MLPs fusetune fuses is left alone
    (listed in the report), or None for any other module."""
    pair = next((pair for pair in _UNGATED if _linears(module, pair)), None)
    if pair is not None:
        first, second = (getattr(module, name) for name in pair)
        if first.out_features == 2 * second.in_features:  # Aya Vision's projector: x, gate = chunk(2)
            return (f"gated MLP with gate and up in one {pair[0]} (in an order fusetune does not check): "
                    "fusetune recognises gate_proj, up_proj (or gate_up_proj) and down_proj")
        return UNGATED_REASON
    if _linears(module, _OTHER_NAMES):
        return ("gated MLP named w1/w2/w3: fusetune recognises gate_proj, up_proj (or gate_up_proj) "
                "and down_proj")
    weights = dict(module.named_parameters(recurse=False))
    if any(name in weights and weights[name].dim() == 3 for name in _EXPERT_WEIGHTS):
        return "mixture-of-experts weights (one 3-D tensor for all experts): fusetune fuses dense gated MLPs"
    return None


def glu_rule(module: nn.Module) -> Decision | None:
    """Swap a gated MLP whose activation and forward the probes confirm for ``FusedGatedMLP``."""
    if isinstance(module, FusedGatedMLP):
        return None
    if _projections(module) is None:
        reason = _unrecognised(module)
        return None if reason is None else Decision("glu", reason=reason)
    extra = extra_forward_arguments(module)
    if extra:
        return Decision("glu", reason=f"its forward takes {', '.join(extra)} besides the input: "
                                      "fusetune's gated MLP takes the input alone")
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
        mismatch = _forward_mismatch(module, activation, device)
        if mismatch is not None:
            return Decision("glu", reason=mismatch)
    except Exception as error:  # an exotic forward that rejects the probe is simply not ours
        return Decision("glu", reason=f"probe failed ({type(error).__name__}: {error})")
    return Decision("glu", FusedGatedMLP(dict(module.named_children()), activation))
