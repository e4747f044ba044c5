"""Fused LoRA modules: a PEFT LoRA projection (or a plain frozen linear layer) read as fused-op weights,
and ``FusedLoraMLP``, the gated MLP of a LoRA model computed by one fused autograd function.

PEFT's flags can change after patching (``with model.disable_adapter()``, ``merge_adapter()``,
``set_adapter([...])``), so every forward reads them again through ``projection_weights``, and a
projection that is off the fast path at that moment runs PEFT's own code instead.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from fusetune.nn.glu import FusedGatedMLP
from fusetune.ops._launch import outside_compiled_graphs
from fusetune.ops.lora import LoraWeights, autocast_conflict, lora_glu_mlp, lora_glu_mlp_reference
from fusetune.ops.nf4 import is_4bit


def is_lora_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a PEFT LoRA layer (a ``base_layer`` plus ``lora_A`` / ``lora_B`` dicts)."""
    children = module._modules
    return ("base_layer" in children and "lora_A" in children and "lora_B" in children
            and "scaling" in module.__dict__)


# The readers below run for every projection in every forward (14 times a decoder layer and step, on
# the host's critical path), so they read ``_modules``, ``_parameters`` and ``__dict__`` directly:
# ``nn.Module.__getattr__`` and ``parameters()`` (which walks named_modules generators) cost several
# times more.


def _unreadable(modules: tuple[nn.Module, ...]) -> str | None:
    """Why a sharding engine keeps these modules' parameters from a reader outside their forward.

    The fused paths read a projection's weights from its parent's forward. FSDP2 gathers a unit's
    parameters around the unit's own forward: whole there when the unit is the parent's (a decoder
    layer) or an ancestor's; still sharded DTensors when a module here is a ``fully_shard`` unit
    of its own, or when the call is outside the unit's forward. DeepSpeed ZeRO-3 gathers each
    module's own parameters in that module's forward (``ds_id`` / ``ds_status`` mark them), so
    read from the parent they are empty placeholders. PEFT's modules run instead: the engines
    gather their weights around their own calls.
    """
    unit = next((m for m in modules if isinstance(m, FSDPModule)), None)
    if unit is not None:
        return f"{type(unit).__name__} is a fully_shard unit of its own (sharded when read by its parent)"
    params = [p for m in modules for p in m._parameters.values() if p is not None]
    for param in params:
        if isinstance(param, DTensor):
            return "its weights are sharded DTensors here (outside the forward of the fully_shard unit)"
    for param in params:  # (getattr, not the tensor's __dict__: torch.compile traces this)
        if getattr(param, "ds_id", None) is not None and getattr(param, "ds_status", None) is not None:
            return "DeepSpeed ZeRO-3 partitions its weights (gathered only inside their own module's forward)"
    return None


def base_weight(layer: nn.Linear) -> torch.Tensor:
    """``layer.weight`` as the fused ops read it: a 4-bit weight carries its ``quant_state``.

    bitsandbytes keeps a 4-bit weight's quantisation state on the ``Params4bit`` and on its
    ``Linear4bit`` (``layer.quant_state``). A sharding engine that rebuilds the parameter hands the
    layer a plain tensor of the packed bytes instead: FSDP2 gathers a plain tensor (whole, or the
    one ``whole_parameters`` gives the patch-time check). For such a tensor this returns an alias of
    its storage carrying the layer's ``quant_state``, the state bitsandbytes' own forward restores
    (``fix_4bit_weight_quant_state_from_module``), without replacing the layer's parameter. The
    alias shares the storage FSDP2 gathers into, so backward reads the bytes gathered again there.
    """
    weight = layer._parameters["weight"]
    state = layer.__dict__.get("quant_state")
    if state is None and not is_4bit(weight):
        return weight
    storage = getattr(weight, "quant_storage", None) or layer.__dict__.get("quant_storage")
    if storage is not None and weight.dtype != storage:  # same width, other bits: no size check sees it
        raise ValueError(
            f"fusetune: a {type(layer).__name__}'s 4-bit bytes are stored as {storage} but reached its "
            f"forward as {weight.dtype}: a cast after quantisation changed their bits (a sharding "
            "engine's mixed precision, or model.to(dtype) / .half() on the quantised model). Cast the "
            "model before quantising it (or load it in that dtype); under FSDP2 store the bytes in the "
            "dtype it gathers in (quant_storage / bnb_4bit_quant_storage = FSDP2's param_dtype)."
        )
    if is_4bit(weight):
        return weight
    alias = weight.detach()
    alias.quant_state = state
    return alias


def _frozen_linear(layer: nn.Module) -> LoraWeights | str:
    """A frozen ``nn.Linear`` (bitsandbytes' ``Linear4bit`` included) as base-only weights; a
    4-bit layer's ``compute_dtype`` (``bnb_4bit_compute_dtype``) goes with them, or, where the fused
    ops cannot follow it now (``autocast_conflict``), the reason. A ``Linear4bit`` built without
    one computes in its input's dtype (its own forward then keeps a float32 or bfloat16 input's
    dtype as its compute dtype), and so do the fused ops while it has none."""
    if not isinstance(layer, nn.Linear):
        return f"{type(layer).__name__} is not a linear layer"
    weight, bias = layer._parameters["weight"], layer._parameters.get("bias")
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return "the base weight or bias is trainable (fused LoRA needs a frozen base)"
    if weight.device.type == "meta":
        return "its weights are on the meta device (offloaded: loaded only inside its own forward)"
    if not (weight.is_floating_point() or is_4bit(weight) or "quant_state" in layer.__dict__):
        kind = type(layer).__name__
        return f"its weight is {weight.dtype} ({kind}, e.g. 8-bit): only 16/32-bit and 4-bit are fused"
    unreadable = _unreadable((layer,))
    if unreadable:
        return unreadable
    weight = base_weight(layer)
    compute_dtype = layer.__dict__.get("compute_dtype") if is_4bit(weight) else None
    conflict = autocast_conflict(compute_dtype, weight.device.type)
    return conflict or LoraWeights(weight, None, None, 0.0, bias, compute_dtype)


def _hooked(layer: nn.Module) -> str | None:
    """Why a layer with forward hooks must run its own forward where a fused path would read its
    weights without calling it (a LoRA layer's ``base_layer`` in every fused path; the projections
    of ``FusedLoraMLP``; PEFT's ``adapter_names=`` batches are such a hook, added for the call on
    every LoRA layer). The fused attention still calls each projection, so their hooks run."""
    if layer._forward_pre_hooks or layer._forward_hooks:
        return f"{type(layer).__name__} has forward hooks (e.g. PEFT's adapter_names), run by its forward"
    return None


def projection_weights(layer: nn.Module) -> LoraWeights | str:
    """The fused-op weights of ``layer`` now, or the reason it must run unfused.

    Fast path: a frozen linear layer (its bias frozen too), or a PEFT LoRA layer over one, with exactly one
    active adapter that is plain LoRA (no DoRA or other variant), dropout 0, no LoRA bias and no
    ``fan_in_fan_out``. Disabled adapters, or merged ones, give the base weight alone, as PEFT does.
    Weights a sharding engine has not gathered for this reader (``_unreadable``), weights offloaded
    to the meta device, a base layer with forward hooks (``_hooked``) and a 4-bit base layer whose
    compute dtype the fused ops cannot follow under the autocast now on (``autocast_conflict``)
    run unfused too.
    """
    if not is_lora_layer(layer):
        return _frozen_linear(layer)
    unit = _unreadable((layer,))  # a LoRA layer wrapped by fully_shard on its own
    if unit is not None:
        return unit
    children = layer._modules
    base = _frozen_linear(children["base_layer"])
    if isinstance(base, str):
        return base
    hooked = _hooked(children["base_layer"])  # after the engines' reasons: they hook what they shard
    if hooked:
        return hooked
    if layer.__dict__.get("fan_in_fan_out", False):
        return "fan_in_fan_out LoRA layer"
    if layer.disable_adapters:
        return "adapters are disabled while merged" if layer.merged else base
    if layer.merged:
        return base
    lora_a_dict, lora_b_dict = children["lora_A"]._modules, children["lora_B"]._modules
    active = [name for name in layer.active_adapters if name in lora_a_dict]
    if len(active) != 1:
        factors = children["lora_A"]
        if not isinstance(factors, nn.ModuleDict):  # AdaLoRA's ParameterDict
            return f"{type(layer).__name__} is not plain LoRA (its lora_A is a {type(factors).__name__})"
        return f"{len(active)} active LoRA adapters (the fused path takes exactly one)"
    name = active[0]
    variants = layer.__dict__.get("lora_variant", {})
    if name in variants:
        return f"LoRA variant {type(variants[name]).__name__} (e.g. DoRA)"
    if not isinstance(children["lora_dropout"]._modules[name], nn.Identity):
        return "lora_dropout > 0"
    lora_a, lora_b = lora_a_dict[name], lora_b_dict[name]
    if not (isinstance(lora_a, nn.Linear) and isinstance(lora_b, nn.Linear)) or lora_b.bias is not None:
        return "LoRA layers that are not plain bias-free linear maps"
    weights = base._replace(a=lora_a._parameters["weight"], b=lora_b._parameters["weight"],
                            scale=float(layer.scaling[name]))
    return _unreadable((lora_a, lora_b)) or weights


class FusedLoraMLP(FusedGatedMLP):
    """``down_proj(act(gate_proj(x)) * up_proj(x))`` over PEFT LoRA (or frozen) projections as one
    fused autograd function (``fusetune.ops.lora.lora_glu_mlp``); any projection off the fast path
    at call time sends the whole call through ``FusedGatedMLP`` (PEFT's modules, fused activation).
    ``tile_rows``: run calls with more tokens than this in row tiles (long contexts; see
    ``lora_glu_mlp``). Code that torch.compile traces runs the same maths as plain torch ops
    (``_traced_forward``), without row tiles.
    """

    _PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, children: dict[str, nn.Module], activation: str, tile_rows: int | None = None):
        super().__init__(children, activation)
        self.tile_rows = tile_rows

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self._traced_forward(hidden_states)
        return self._fused_forward(hidden_states)

    def _weights(self) -> list[LoraWeights] | None:
        """The three projections' weights, or None when one is off the fused path or has forward
        hooks (the fused op never calls them, so their hooks would not run)."""
        projections = [getattr(self, name) for name in self._PROJECTIONS]
        if any(_hooked(projection) for projection in projections):
            return None
        weights = [projection_weights(projection) for projection in projections]
        return None if any(isinstance(w, str) for w in weights) else weights

    def _traced_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Compiled code's path: the fused op's maths as plain torch ops, traced into the graph
        (LoRA in the compute dtype, as the fused op runs it, where PEFT would run float32 adapters
        in float32; Inductor fuses the activation; 4-bit base weights through the custom op
        ``nf4_linear``)."""
        weights = self._weights()
        if weights is None:
            return super().forward(hidden_states)
        return lora_glu_mlp_reference(hidden_states, *weights, self.activation)

    @outside_compiled_graphs  # reads its weights at call time, as eager code, like the ops it runs
    def _fused_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weights = self._weights()
        if weights is None:
            return super().forward(hidden_states)
        return lora_glu_mlp(hidden_states, *weights, activation=self.activation, tile_rows=self.tile_rows)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, tile_rows={self.tile_rows}"
