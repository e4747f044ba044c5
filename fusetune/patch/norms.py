"""Recognition rules for normalisation layers: RMSNorm (probed) and ``torch.nn.LayerNorm``."""

from __future__ import annotations

import numbers

import torch
from torch import nn

from fusetune.nn import FusedLayerNorm, FusedRMSNorm
from fusetune.ops.rms_norm import rms_norm_reference
from fusetune.patch.probe import extra_forward_arguments, matches, probe_device, probe_input, probe_mode
from fusetune.patch.rules import Decision

# (offset, cast) variants of fusetune's rms_norm, in the order they are tried: Llama's, Gemma's,
# then the two mixed forms. The first that reproduces the module's output exactly wins; failing
# that, the first that reproduces it within rounding.
_RMS_VARIANTS = ((0.0, "llama"), (1.0, "gemma"), (0.0, "gemma"), (1.0, "llama"))


def _epsilon(module: nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(module, name, None)
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)
    return None


def _looks_like_rms_norm(module: nn.Module) -> bool:
    """A leaf with exactly one parameter, a 1-D ``weight``, and an epsilon (or 'RMSNorm' in its name)."""
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.LayerNorm) or not isinstance(weight, nn.Parameter) or weight.dim() != 1:
        return False
    if next(module.children(), None) is not None:
        return False
    if [p for p in module.parameters(recurse=False)] != [weight]:
        return False
    return _epsilon(module) is not None or "RMSNorm" in type(module).__name__


def _probe_dtypes(weight: torch.Tensor) -> list[torch.dtype]:
    """The weight's dtype, plus one of the other precision (mixed precision feeds bf16 to fp32 norms)."""
    return [weight.dtype, torch.bfloat16 if weight.dtype == torch.float32 else torch.float32]


def _rms_variant(module: nn.Module, eps: float, device: torch.device) -> tuple[float, str] | None:
    """The (offset, cast) whose maths reproduces ``module``'s forward on the probes, if any."""
    with probe_mode(module):
        weight = module.weight
        probes = [probe_input(weight.shape[0], dtype, device) for dtype in _probe_dtypes(weight)]
        outputs = [module(x) for x in probes]
        refs = {
            variant: [rms_norm_reference(x, weight, eps, *variant) for x in probes]
            for variant in _RMS_VARIANTS
        }
    for exact in (True, False):
        for variant, expected in refs.items():
            if all(matches(out, ref, exact) for out, ref in zip(outputs, expected, strict=True)):
                return variant
    return None


def rms_norm_rule(module: nn.Module) -> Decision | None:
    """Swap an RMSNorm-shaped module whose forward the probe confirms for ``FusedRMSNorm``."""
    if not _looks_like_rms_norm(module):
        return None
    eps = _epsilon(module)
    if eps is None:
        return Decision("rms_norm", reason="it has no numeric epsilon attribute (eps / variance_epsilon)")
    extra = extra_forward_arguments(module)
    if extra:
        return Decision("rms_norm", reason=f"its forward takes {', '.join(extra)} besides the input "
                                           "(a gated norm): fusetune's norm takes the input alone")
    device = probe_device(module)
    if isinstance(device, str):
        return Decision("rms_norm", reason=f"cannot probe: {device}")
    try:
        variant = _rms_variant(module, eps, device)
    except Exception as error:  # an exotic forward that rejects the probe is simply not ours
        return Decision("rms_norm", reason=f"probe failed ({type(error).__name__}: {error})")
    if variant is None:
        return Decision(
            "rms_norm",
            reason=f"{type(module).__name__}.forward is not an RMSNorm fusetune reproduces (probe mismatch)",
        )
    offset, cast = variant
    return Decision("rms_norm", FusedRMSNorm(module.weight, eps, offset, cast))


def layer_norm_rule(module: nn.Module) -> Decision | None:
    """Swap a ``torch.nn.LayerNorm`` over the last dim (forward not overridden) for ``FusedLayerNorm``."""
    if not isinstance(module, nn.LayerNorm):
        return None
    if type(module).forward is not nn.LayerNorm.forward:
        return Decision("layer_norm", reason=f"{type(module).__name__} overrides LayerNorm.forward")
    if len(module.normalized_shape) != 1:
        return Decision("layer_norm", reason=f"normalises over {module.normalized_shape}, not one dim")
    return Decision("layer_norm", FusedLayerNorm(module.weight, module.bias, module.eps))
