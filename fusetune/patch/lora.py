"""Fused LoRA for PEFT models: attention projections and gated MLPs through fusetune's fused ops.

- Gated MLPs (``gate_proj`` / ``up_proj`` / ``down_proj`` with a probed SiLU or GELU) holding LoRA
  layers are swapped for ``FusedLoraMLP`` (same children, so state_dict keys and PEFT are unchanged).
- Attention modules with ``q_proj`` / ``k_proj`` / ``v_proj`` / ``o_proj`` get an instance
  ``forward`` on those LoRA layers. q, k and v form one ``ProjectionGroup``: whichever of the three
  is called first computes all three in one fused pass (``lora_linear``) and holds the other two
  outputs for the calls that follow with the very same input tensor. Attention code calls the three
  with one ``hidden_states`` object, so nothing changes in it; an attention whose three inputs
  differ (cross-attention: keys and values from the image states) is noticed at its first call and
  the group then computes each projection on its own, still fused with its LoRA. ``o_proj`` is a
  group of one.

Vision towers are treated alike where their layers carry these names and LoRA (their MLPs are
mostly ungated, so only attention qualifies). Every call re-checks PEFT's flags
(``fusetune.nn.lora.projection_weights``) and runs PEFT's own forward when a projection is off the
fast path. Code that torch.compile traces runs the fused ops' maths as plain torch ops
(``lora_linear_reference``, ``lora_glu_mlp_reference``; a 4-bit base weight's product is the custom
op ``nf4_linear``), so the layers stay in its graph: on an H200 that compiled step was faster than
one with each fused path a graph break, for more memory (bench/RESULTS.md).
"""

from __future__ import annotations

import types

import torch
from torch import nn

from fusetune.nn.glu import FusedGatedMLP
from fusetune.nn.lora import FusedLoraMLP, is_lora_layer, projection_weights
from fusetune.ops._launch import outside_compiled_graphs
from fusetune.ops.lora import lora_linear, lora_linear_reference
from fusetune.patch.glu import glu_rule
from fusetune.patch.report import PatchReport
from fusetune.patch.sharding import whole_parameters

_QKV = ("q_proj", "k_proj", "v_proj")
_GROUP_ATTR = "_fusetune_lora_group"


class ProjectionGroup:
    """Projections that read the same input, computed together by one ``lora_linear`` call.

    ``pending`` holds the last input and the outputs not yet handed out. A call with another input
    while outputs are still pending means the projections do not share their input: the group
    splits for good and computes each projection alone from then on.
    """

    def __init__(self, layers: list[nn.Module]):
        self.layers = layers
        self.split = len(layers) == 1
        self.pending: tuple[torch.Tensor, list[torch.Tensor | None]] | None = None

    @outside_compiled_graphs  # holds outputs between calls and reads weights as eager code
    def output(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``layer(x)`` through the fused path, or PEFT's forward when a projection is off it."""
        index = next(i for i, member in enumerate(self.layers) if member is layer)
        if self.pending is not None:
            held_input, outputs = self.pending
            if held_input is x and outputs[index] is not None:
                out, outputs[index] = outputs[index], None
                if all(o is None for o in outputs):
                    self.pending = None
                return out
            self.pending = None
            self.split = self.split or any(o is not None for o in outputs)
        members = [layer] if self.split else self.layers
        weights = [projection_weights(member) for member in members]
        if any(isinstance(w, str) for w in weights):
            return type(layer).forward(layer, x)
        outputs = list(lora_linear(x, *weights))
        if self.split:
            return outputs[0]
        out, outputs[index] = outputs[index], None
        self.pending = (x, outputs)
        return out


def _grouped_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Instance ``forward`` of a grouped LoRA projection (extra PEFT arguments: PEFT's own path)."""
    if args or kwargs:
        return type(self).forward(self, x, *args, **kwargs)
    if torch.compiler.is_compiling():
        return _traced_output(self, x)
    return getattr(self, _GROUP_ATTR).output(self, x)


def _traced_output(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` as compiled code runs it: the fused op's maths as plain torch ops, traced into
    the graph (the fused path holds outputs between calls, so it would break the graph at every
    projection), LoRA in the compute dtype as the fused op runs it (PEFT would run float32
    adapters in float32; a 4-bit base weight through the custom op ``nf4_linear``); PEFT's forward
    where the projection is off the fused path."""
    weights = projection_weights(layer)
    if isinstance(weights, str):
        return type(layer).forward(layer, x)
    return lora_linear_reference(x, weights)[0]


def _group(report: PatchReport, layers: list[nn.Module]) -> None:
    group = ProjectionGroup(layers)
    for layer in layers:
        report.set_attr(layer, _GROUP_ATTR, group)
        report.set_attr(layer, "forward", types.MethodType(_grouped_forward, layer))


def _has_lora(layers: list[nn.Module]) -> bool:
    return any(is_lora_layer(layer) for layer in layers)


def _unfusable(layers: dict[str, nn.Module]) -> str | None:
    """Why these projections cannot take the fused path (checked now, and again at every call).

    Weights FSDP2 has sharded are judged whole, as the parent's forward will see them (gathered by
    the unit around it), unless a projection is a unit of its own.
    """
    for name, layer in layers.items():
        with whole_parameters(layer):
            weights = projection_weights(layer)
        if isinstance(weights, str):
            return f"{name}: {weights}"
    return None


def _patch_attention(report: PatchReport, name: str, module: nn.Module) -> None:
    children = dict(module.named_children())
    projections = {p: children[p] for p in (*_QKV, "o_proj")}
    if not _has_lora(list(projections.values())):
        return
    reason = _unfusable(projections)
    if reason is not None:
        report.left_alone["lora"].append((name, reason))
        return
    _group(report, [projections[p] for p in _QKV])
    _group(report, [projections["o_proj"]])
    report.patched["lora"].append(name)


def _patch_mlp(
    report: PatchReport, root: nn.Module, name: str, module: nn.Module, tile_rows: int | None
) -> None:
    children = dict(module.named_children())
    if "gate_up_proj" in children:
        if _has_lora([children["gate_up_proj"], children["down_proj"]]):
            reason = "fused gate_up_proj (Phi-3 layout) is not fused with LoRA"
            report.left_alone["lora"].append((name, reason))
        return
    projections = {p: children[p] for p in FusedLoraMLP._PROJECTIONS}
    if not _has_lora(list(projections.values())):
        return
    reason = _unfusable(projections)
    decision = glu_rule(module)
    if reason is None and (decision is None or not isinstance(decision.replacement, FusedGatedMLP)):
        reason = decision.reason if decision is not None else "not a gated MLP"
    if reason is not None:
        report.left_alone["lora"].append((name, reason))
        return
    parent_name, _, child_name = name.rpartition(".")
    replacement = FusedLoraMLP(children, decision.replacement.activation, tile_rows)
    report.set_attr(root.get_submodule(parent_name), child_name, replacement)
    report.patched["lora"].append(name)


def patch_lora(model: nn.Module, report: PatchReport, mlp_tile_rows: int | None = None) -> None:
    """Fuse every LoRA attention block and gated MLP of ``model`` (see the module docstring);
    ``mlp_tile_rows`` is the MLPs' row tile for long inputs (None: one pass)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, FusedGatedMLP):
            continue
        children = dict(module.named_children())
        if all(p in children for p in (*_QKV, "o_proj")):
            _patch_attention(report, name, module)
        elif {"qkv_proj", "o_proj"} <= children.keys():
            if _has_lora([children["qkv_proj"], children["o_proj"]]):
                reason = "fused qkv_proj (Phi-3 layout) is not fused with LoRA"
                report.left_alone["lora"].append((name, reason))
        elif "down_proj" in children and ("gate_up_proj" in children or
                                          {"gate_proj", "up_proj"} <= children.keys()):
            _patch_mlp(report, model, name, module, mlp_tile_rows)
