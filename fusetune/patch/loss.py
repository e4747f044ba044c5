"""The fused loss path: one generic causal-LM forward that never materialises the logits.

``patch_loss`` sets the model instance's ``forward`` attribute (never the class's) to a wrapper.
In training mode with ``labels``, the wrapper runs the base model (``model.model``) for the hidden
states and computes the loss from them with ``linear_cross_entropy`` straight from
``lm_head.weight`` (or, with ``loss="cross_entropy"``, from materialised logits with fusetune's
cross-entropy). Everything else (no labels, eval, ``generate``, an ``lm_head`` that PEFT has
wrapped, a user-set ``loss_function``, a 2-D ``logits_to_keep``) runs the original forward
untouched.

The same forward serves the vision-language heads (``*ForConditionalGeneration``): their base
model takes the pixel inputs and side inputs (``pixel_values``, ``image_grid_thw``,
``aspect_ratio_ids``, ``cross_attention_mask``, ``mm_token_type_ids``, ...) and returns the
language model's hidden states, so every argument the head does not consume itself is handed to
the base model as the head would hand it, and ``labels`` too where the base model's forward takes
them (Gemma 3). The vocabulary size is the text config's.

Semantics are transformers' ``ForCausalLMLoss``: labels padded with ``ignore_index`` on the right
and shifted left by one (or ``shift_labels`` as given), ``ignore_index``, ``num_items_in_batch``,
``logits_to_keep``, and ``config.final_logit_softcapping`` for the heads that apply it. One
deliberate difference: when every label is ignored the loss is 0 (with zero gradients), where
transformers returns NaN.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from types import MethodType

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

from fusetune.ops._launch import outside_compiled_graphs
from fusetune.ops.cross_entropy import cross_entropy
from fusetune.ops.linear_cross_entropy import linear_cross_entropy
from fusetune.patch.report import PatchReport

LOSS_MODES = ("linear_cross_entropy", "cross_entropy")

# model_type -> whether its head applies final_logit_softcapping (of the text config). Each listed
# head was read (transformers 5.17 to 5.24) to compute exactly: outputs = self.model(<its arguments
# but labels and logits_to_keep; labels too where the base model takes them>),
# logits = lm_head(outputs[0][logits_to_keep]), optionally soft-capped, then
# loss_function(logits, labels, text vocab_size, **kwargs).
KNOWN_HEADS = {
    "llama": False,
    "mistral": False,
    "qwen2": False,
    "qwen3": False,
    "phi3": False,
    "gemma": False,
    "gemma2": True,
    "gemma3_text": True,
    # Vision-language heads (*ForConditionalGeneration), and MllamaForCausalLM (mllama_text_model,
    # whose base model is ``model`` although its base_model_prefix says "language_model").
    "qwen2_vl": False,
    "qwen2_5_vl": False,
    "qwen3_vl": False,
    "llava": False,
    "smolvlm": False,
    "mllama": False,
    "mllama_text_model": False,  # its .float() on the logits is ForCausalLMLoss's own upcast
    "gemma3": False,  # Gemma3ForConditionalGeneration applies no soft-capping (Gemma3ForCausalLM does)
}

# Keyword arguments that belong to the loss, not to the base model.
_LOSS_KWARGS = ("num_items_in_batch", "ignore_index", "shift_labels")
# Keyword arguments of the head forward that the base model does not take.
_HEAD_ONLY = ("labels", "logits_to_keep", "return_dict")


@dataclass
class LossState:
    """Per-instance settings of the fused loss forward, kept on the model as ``_fusetune_loss``.

    ``inner`` is a ``forward`` that was already set on the instance (accelerate does that) and
    that the original path must keep calling; None means the class's forward. The rest is read
    from the model once, at patch time, rather than by every call (which torch.compile traces):
    the original forward's ``parameters``, what the fused path returns (``output_class``) and
    whether the base model's forward takes the labels (Gemma 3's).
    """

    mode: str
    softcap: bool
    inner: Callable | None
    parameters: CallParameters
    output_class: type[ModelOutput]
    base_takes_labels: bool


def _plain_linear(head: nn.Module | None) -> bool:
    return isinstance(head, nn.Linear) and type(head).forward is nn.Linear.forward


def _unreadable_weight(head: nn.Linear) -> str | None:
    """Why the fused loss cannot read ``head.weight`` itself now (the original forward runs): offloaded
    to the meta device (loaded only inside the head's own forward), or float64 (the kernels take
    bfloat16, float16 and float32)."""
    weight = head.weight
    if weight.device.type == "meta":
        return "weight is on the meta device (offloaded: loaded only inside its own forward)"
    if weight.dtype == torch.float64:
        return "weight is float64 (the fused loss takes bfloat16, float16 and float32)"
    return None


def _base_model(model: nn.Module) -> nn.Module | None:
    """The module the head's forward calls for the hidden states: ``base_model_prefix``, else ``model``."""
    for name in (getattr(model, "base_model_prefix", ""), "model"):
        base = getattr(model, name, None) if name else None
        if isinstance(base, nn.Module) and base is not model:
            return base
    return None


def _named_parameters(function: Callable) -> set[str]:
    return {
        p.name
        for p in inspect.signature(function).parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the fused loss cannot stand in for this model's forward, or None when it can."""
    if not isinstance(model, PreTrainedModel):
        return f"{type(model).__name__} is not a transformers PreTrainedModel"
    model_type = getattr(model.config, "model_type", None)
    if model_type not in KNOWN_HEADS:
        return f"the {type(model).__name__} head (model_type {model_type!r}) is not one fusetune has checked"
    base = _base_model(model)
    if base is None:
        return "no base model under base_model_prefix to take the hidden states from"
    head = model.get_output_embeddings()
    if not _plain_linear(head):
        kind = f"{type(head).__module__}.{type(head).__qualname__}"
        return f"lm_head is a {kind}, not a plain torch.nn.Linear (LoRA / modules_to_save on it)"
    if head.out_features != model.config.get_text_config().vocab_size:
        return "lm_head's output size differs from config.vocab_size"
    unread = _unreadable_weight(head)
    if unread:
        return f"lm_head's {unread}"
    if model.loss_function is not ForCausalLMLoss:
        return "loss_function is not transformers' ForCausalLMLoss"
    missing = _named_parameters(model.forward) - _named_parameters(base.forward) - set(_HEAD_ONLY)
    if missing:
        return f"the base model's forward does not take {sorted(missing)}"
    return None


def _softcap(model: PreTrainedModel) -> float | None:
    if not model._fusetune_loss.softcap:
        return None
    return getattr(model.config.get_text_config(), "final_logit_softcapping", None)


def patch_loss(model: PreTrainedModel, mode: str, report: PatchReport) -> None:
    """Install the fused loss forward on ``model`` (instance attribute), recorded in ``report``."""
    inner = model.__dict__.get("forward")
    original = inner if inner is not None else MethodType(type(model).forward, model)
    base_takes_labels = "labels" in _named_parameters(_base_model(model).forward)
    state = LossState(mode, KNOWN_HEADS[model.config.model_type], inner, CallParameters.of(original),
                      _output_class(type(model).forward), base_takes_labels)
    report.set_attr(model, "_fusetune_loss", state)
    report.set_attr(model, "forward", MethodType(_fused_forward_like(type(model).forward), model))


def _fused_forward_like(class_forward: Callable) -> Callable:
    """A function with ``class_forward``'s name, doc and signature that runs ``fused_forward``.

    It closes over nothing of the instance (the state lives on the model), so a deep copy of a
    patched model rebinds it to the copy.
    """

    @functools.wraps(class_forward)
    def forward(self, *args, **kwargs):
        return fused_forward(self, args, kwargs)

    return forward


def _original(model: nn.Module) -> Callable:
    inner = model._fusetune_loss.inner
    # A partial, not a MethodType: torch.compile traces this call, and not MethodType's.
    return inner if inner is not None else functools.partial(type(model).forward, model)


@dataclass(frozen=True)
class CallParameters:
    """A forward's parameters, read once at patch time (torch.compile traces every call of the
    patched forward, and torch 2.11 cannot trace ``inspect.signature``)."""

    positional: tuple[str, ...]  # the parameters a positional argument fills, in order
    keywords: frozenset[str]  # the named parameters a keyword argument may fill
    required: frozenset[str]  # those without a default
    any_keyword: bool  # a ``**kwargs`` takes other names

    @classmethod
    def of(cls, function: Callable) -> CallParameters:
        parameters = inspect.signature(function).parameters.values()
        positional = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        keywords = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        named = [p for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        required = {p.name for p in named if p.default is p.empty}
        any_keyword = any(p.kind is p.VAR_KEYWORD for p in parameters)
        return cls(tuple(positional), frozenset(keywords), frozenset(required), any_keyword)

    def bind(self, args: tuple, kwargs: dict) -> dict | None:
        """All arguments of a call as keywords (``**kwargs`` flattened), or None where
        ``inspect.Signature.bind`` would refuse the call or it fills ``*args``."""
        if len(args) > len(self.positional):
            return None
        arguments = dict(zip(self.positional, args, strict=False))  # args may fill fewer
        for name, value in kwargs.items():
            if name in arguments or (name not in self.keywords and not self.any_keyword):
                return None
            arguments[name] = value
        # not ``required <= arguments.keys()``: torch 2.11 cannot trace that comparison
        return arguments if all(name in arguments for name in self.required) else None


def fused_forward(model: PreTrainedModel, args: tuple, kwargs: dict):
    """The patched forward: the fused loss when training with labels, else the original path."""
    return_logits = kwargs.pop("return_logits", False)
    state = model._fusetune_loss
    original = _original(model)
    arguments = state.parameters.bind(args, kwargs)
    head = model.get_output_embeddings()
    logits_to_keep = (arguments or {}).get("logits_to_keep", 0)
    if (
        arguments is None
        or arguments.get("labels") is None
        or not model.training
        or not _plain_linear(head)
        or _unreadable_weight(head)
        or model.loss_function is not ForCausalLMLoss
        # 2-D positions: transformers 5.17's heads index hidden[:, positions], later ones differ
        or (isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.dim() > 1)
    ):
        return original(*args, **kwargs)
    labels = arguments.pop("labels")
    arguments.pop("logits_to_keep", None)
    return_dict = arguments.pop("return_dict", None)
    loss_kwargs = {name: arguments.pop(name) for name in _LOSS_KWARGS if name in arguments}
    base = _base_model(model)
    if state.base_takes_labels:  # the head hands them on (Gemma 3)
        arguments["labels"] = labels
    outputs = base(**arguments)
    hidden = _keep(outputs[0], logits_to_keep)
    loss, logits = _loss(hidden, head, labels, state.mode, _softcap(model), return_logits, **loss_kwargs)
    output_class = state.output_class
    output = output_class(loss=loss, logits=logits, **_carried_fields(output_class, outputs))
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    return output if return_dict else _as_tuple(output)


def _as_tuple(output) -> tuple:
    """``output`` as transformers' tuple (loss, logits, then the other fields that are set), with
    the logits' slot kept, None where they were not made: ``to_tuple`` drops None fields, which would
    move the cache into the logits' place."""
    fields = output.to_tuple()
    return (fields[0], output.logits, *fields[1 if output.logits is None else 2:])


def _keep(hidden: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """``hidden`` at the positions transformers would compute logits for (``slice_logits_to_keep``)."""
    try:
        from transformers.modeling_utils import slice_logits_to_keep
    except ImportError:  # transformers before 5.2x slices inline, as below
        indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return hidden[:, indices, :]
    return slice_logits_to_keep(hidden, logits_to_keep)


def _softcapped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


def _loss(
    hidden: torch.Tensor,
    head: nn.Linear,
    labels: torch.Tensor,
    mode: str,
    softcap: float | None,
    return_logits: bool,
    num_items_in_batch=None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``ForCausalLMLoss`` of ``head(hidden)``, and the (soft-capped) logits when wanted."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = shift_labels.reshape(-1).to(hidden.device)
    options = dict(ignore_index=ignore_index, softcap=softcap, num_items_in_batch=num_items_in_batch)
    if mode == "cross_entropy":
        logits = head(hidden)
        loss = cross_entropy(logits.reshape(-1, logits.shape[-1]), targets, **options)
        return loss, _softcapped(logits, softcap)
    flat = hidden.reshape(-1, hidden.shape[-1])
    loss = _as_forward_of(
        head, lambda x, y: linear_cross_entropy(x, head.weight, y, bias=head.bias, **options), flat, targets
    )
    return loss, _softcapped(head(hidden), softcap) if return_logits else None


@outside_compiled_graphs
def _as_forward_of(module: nn.Module, function: typing.Callable, *args: torch.Tensor) -> torch.Tensor:
    """``function(*args)`` run as ``module``'s forward, through ``module(*args)``.

    A sharding engine gathers a module's parameters in hooks around its call (FSDP2's unshard of the
    module's group, DeepSpeed ZeRO-3's gather) and arranges the gradients' reduction from the inputs
    and outputs of that call; reading ``head.weight`` outside it would see the local shard. Running
    the fused loss as the head's forward gets the full weight exactly as ``head(hidden)`` would.
    It runs between torch.compile's graphs: traced, setting and deleting the forward attribute made
    torch 2.13 replay a deletion of an attribute that was no longer there.
    """
    own = module.__dict__.get("forward")
    module.forward = function
    try:
        return module(*args)
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own


def _output_class(class_forward: Callable) -> type[ModelOutput]:
    """The output class the head's forward is annotated to return (``tuple | X`` gives X), or
    CausalLMOutputWithPast if none."""
    annotation = inspect.signature(class_forward).return_annotation
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, ModelOutput):
            return candidate
    return CausalLMOutputWithPast


def _carried_fields(output_class: type[ModelOutput], outputs: ModelOutput | tuple) -> dict:
    """The base model's outputs that the head's output class also has (cache, hidden states, image
    outputs, rope deltas, ...): the heads copy those fields by name."""
    if not isinstance(outputs, ModelOutput):
        return {}
    names = {f.name for f in dataclasses.fields(output_class)} - {"loss", "logits"}
    return {name: getattr(outputs, name) for name in names if getattr(outputs, name, None) is not None}
