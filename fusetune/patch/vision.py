"""Recognition rule for Qwen2-VL-style vision attention (``qkv``, a vision rotary function and
attention within ``cu_seqlens`` segments): swapped for ``SegmentedVisionAttention`` where a probe
shows the swap computes what the module computes."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn

from fusetune.nn.vision_attention import SegmentedVisionAttention
from fusetune.patch.probe import matches, probe_device, probe_input, probe_mode
from fusetune.patch.rules import Decision

KIND = "vision_attention"
ROTARY = "apply_rotary_pos_emb_vision"
PROBE_SEGMENTS = (4, 7)  # two segments of odd lengths: attention must stay inside each


def _forward_parameters(module: nn.Module) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(type(module).forward).parameters)


def _looks_like_vision_attention(module: nn.Module) -> bool:
    """A module with ``qkv`` and ``proj`` submodules and ``num_heads``, whose forward takes ``cu_seqlens``."""
    return (all(isinstance(getattr(module, name, None), nn.Module) for name in ("qkv", "proj"))
            and isinstance(getattr(module, "num_heads", None), int)
            and "cu_seqlens" in _forward_parameters(module))


def _rotary(module: nn.Module) -> Callable | None:
    """The modeling file's vision rotary function, where the class's forward calls it as a global."""
    forward = inspect.unwrap(type(module).forward)
    code, globals_ = getattr(forward, "__code__", None), getattr(forward, "__globals__", {})
    return globals_.get(ROTARY) if code is not None and ROTARY in code.co_names else None


def _probe_arguments(module: nn.Module, width: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Hidden states of two segments, their ``cu_seqlens`` and rotary angles, passed the way the
    module's forward takes them (``position_embeddings``, or the older ``rotary_pos_emb``)."""
    tokens = sum(PROBE_SEGMENTS)
    hidden = probe_input(width, dtype, device).reshape(-1, width)[:1].expand(tokens, width)
    hidden = hidden * torch.linspace(-1.0, 1.0, tokens, device=device, dtype=dtype)[:, None]
    cu = torch.tensor([0, PROBE_SEGMENTS[0], tokens], dtype=torch.int32, device=device)
    half = width // module.num_heads // 2
    angles = torch.outer(torch.arange(tokens, dtype=torch.float32), 0.3 ** torch.arange(half)).to(device)
    if "position_embeddings" in _forward_parameters(module):
        both = torch.cat((angles, angles), dim=-1)
        return {"hidden_states": hidden, "cu_seqlens": cu, "position_embeddings": (both.cos(), both.sin())}
    return {"hidden_states": hidden, "cu_seqlens": cu, "rotary_pos_emb": angles}


def _disagreement(module: nn.Module, replacement: nn.Module, device: torch.device) -> str | None:
    """The mode, eval or training, in which ``replacement`` computes something other than ``module``
    on the probe (training mode shows attention dropout, which the replacement does not apply:
    GLM-4V's vision ``attention_dropout``); None where both agree."""
    width = getattr(module.qkv, "in_features", None)
    if not isinstance(width, int):
        raise ValueError("its qkv has no in_features")
    dtype = next(p.dtype for p in module.parameters() if p.is_floating_point())
    for training in (False, True):
        with probe_mode(module, training):
            arguments = _probe_arguments(module, width, dtype, device)
            if not matches(replacement(**arguments), module(**arguments)):
                return "training mode (dropout?)" if training else "eval mode"
    return None


def vision_attention_rule(module: nn.Module) -> Decision | None:
    """Swap a Qwen2-VL-style vision attention for ``SegmentedVisionAttention`` (probed)."""
    if isinstance(module, SegmentedVisionAttention) or not _looks_like_vision_attention(module):
        return None
    rotary = _rotary(module)
    if rotary is None:
        return Decision(KIND, reason=f"its forward does not call {ROTARY} as a module global")
    device = probe_device(module)
    if isinstance(device, str):
        return Decision(KIND, reason=f"cannot probe: {device}")
    replacement = SegmentedVisionAttention(module, rotary)
    try:
        disagreement = _disagreement(module, replacement, device)
    except Exception as error:  # a forward that rejects the probe's arguments is simply not ours
        return Decision(KIND, reason=f"probe failed ({type(error).__name__}: {error})")
    if disagreement is not None:
        name = type(module).__name__
        return Decision(KIND, reason=f"{name}.forward computes something else in {disagreement}")
    return Decision(KIND, replacement)
