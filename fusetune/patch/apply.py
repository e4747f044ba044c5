"""``apply`` / ``unapply``: walk a model, let each recognition rule decide, swap, and record."""

from __future__ import annotations

from torch import nn

from fusetune.patch.glu import glu_rule
from fusetune.patch.lora import patch_lora
from fusetune.patch.loss import LOSS_MODES, patch_loss, unsupported_reason
from fusetune.patch.norms import layer_norm_rule, rms_norm_rule
from fusetune.patch.report import PatchReport
from fusetune.patch.rope import rope_rule, unclaimed_rotary
from fusetune.patch.sharding import follow_swap
from fusetune.patch.vision import vision_attention_rule

_REPORT_ATTR = "_fusetune_report"


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (``get_base_model``), or ``model`` itself."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _swap(report: PatchReport, root: nn.Module, name: str, replacement: nn.Module) -> None:
    """Put ``replacement`` in place of submodule ``name`` (recorded for undo); under FSDP2 it then
    receives the gathered parameters in forward as the original did."""
    parent_name, _, child_name = name.rpartition(".")
    follow_swap(root, root.get_submodule(name), replacement)
    report.set_attr(root.get_submodule(parent_name), child_name, replacement)


def apply(
    model: nn.Module,
    *,
    rms_norm: bool = True,
    layer_norm: bool = True,
    rope: bool = True,
    glu: bool = True,
    vision_attention: bool = True,
    lora: bool = True,
    loss: str | None = "linear_cross_entropy",
    mlp_tile_rows: int | None = None,
) -> PatchReport:
    """Patch one loaded transformers model (or PEFT model) in place with fusetune's fused parts.

    Submodules are swapped for ``fusetune.nn`` modules holding the same parameters under the same
    names (state_dict keys, PEFT adapters and optimiser state are unaffected), attention modules
    whose rotary function is verified get an instance ``forward`` calling fusetune's rope, and
    with ``loss`` set, the model instance's ``forward`` computes the training loss without
    materialising logits. With ``lora``, PEFT LoRA attention projections and gated MLPs run as
    fused autograd functions (q, k, v in one pass; gate, up, activation and down in one), also
    over 4-bit (bitsandbytes NF4) base weights; ``mlp_tile_rows`` makes those MLPs run inputs of
    more tokens than that in row tiles, saving only their input (for very long contexts). With
    ``vision_attention``, Qwen2-VL-style vision towers attend within all their windows (or images)
    in one call instead of one call each (``fusetune.nn.vision_attention``). Only
    this instance changes: no class, module global or ``torch.nn.functional`` is touched. Each
    switch turns one kind off; ``loss`` is "linear_cross_entropy", "cross_entropy" or None.

    Returns a ``PatchReport`` (print it for a table) whose ``undo()``, like ``unapply(model)``,
    restores the original modules.
    """
    if loss is not None and loss not in LOSS_MODES:
        raise ValueError(f"fusetune: loss={loss!r}; use one of {LOSS_MODES} or None.")
    existing = getattr(model, _REPORT_ATTR, None)
    if existing is not None and not existing.undone:
        raise RuntimeError("fusetune: this model is already patched; call fusetune.unapply(model) first.")
    report = PatchReport()
    switches = {"rms_norm": rms_norm, "layer_norm": layer_norm, "glu": glu,
                "vision_attention": vision_attention, "rope": rope, "lora": lora, "loss": loss}
    report.switched_off = {kind for kind, on in switches.items() if not on}
    if lora:  # first, so the LoRA MLPs become FusedLoraMLP before the plain GLU rule sees them
        patch_lora(model, report, mlp_tile_rows)
    # The vision attention rule before rope's: rope leaves those modules alone (their rotary is not
    # transformers' apply_rotary_pos_emb), and the first rule with a verdict on a module decides.
    rules = [rule for kind, rule in (("rms_norm", rms_norm_rule), ("layer_norm", layer_norm_rule),
                                     ("glu", glu_rule), ("vision_attention", vision_attention_rule),
                                     ("rope", rope_rule)) if switches[kind]]
    for name, module in list(model.named_modules()):
        decision = next((d for d in (rule(module) for rule in rules) if d is not None), None)
        if decision is None:
            continue
        if decision.attributes:
            for attribute, value in decision.attributes:
                report.set_attr(module, attribute, value)
            report.patched[decision.kind].append(name)
            if decision.reason:  # patched in part
                report.left_alone[decision.kind].append((name, decision.reason))
        elif decision.replacement is None:
            report.left_alone[decision.kind].append((name, decision.reason))
        else:
            _swap(report, model, name, decision.replacement)
            report.patched[decision.kind].append(name)
    if rope and not report.patched["rope"] and not report.left_alone["rope"]:
        report.left_alone["rope"].extend(unclaimed_rotary(model))
    if loss is not None:
        target = _causal_lm(model)
        reason = unsupported_reason(target)
        if reason is None:
            patch_loss(target, loss, report)
            report.patched["loss"].append(f"{type(target).__name__}.forward")
        else:
            report.left_alone["loss"].append((type(target).__name__, reason))
    report.set_attr(model, _REPORT_ATTR, report)
    return report


def unapply(model: nn.Module) -> None:
    """Undo ``apply`` on ``model``: the original modules and forward are back. No-op if unpatched."""
    report = getattr(model, _REPORT_ATTR, None)
    if report is not None:
        report.undo()
