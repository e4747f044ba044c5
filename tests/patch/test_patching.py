"""The patching machinery: switches, undo, instance isolation, the loss path's edges, unknown parts."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import fusetune  # noqa: E402
from fusetune.nn import FusedGatedMLP, FusedRMSNorm  # noqa: E402
from tests.patch.checks import assert_close, assert_same_gradients, loss_and_backward  # noqa: E402
from tests.patch.models import batch, tiny_model  # noqa: E402


class ScaleNorm(nn.Module):
    """A norm fusetune does not know: a weight and an eps, but mean-absolute scaling."""

    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x / (x.abs().mean(-1, keepdim=True) + self.eps)


def _module_types(model: nn.Module) -> dict[str, type]:
    return {name: type(m) for name, m in model.named_modules()}


def test_unknown_switch_and_bad_loss_are_rejected():
    model = tiny_model("llama")
    with pytest.raises(TypeError):
        fusetune.apply(model, rmsnorm=True)
    with pytest.raises(ValueError, match="loss="):
        fusetune.apply(model, loss="fused")
    assert _module_types(model) == _module_types(tiny_model("llama"))


def test_switches_turn_kinds_off():
    model = tiny_model("llama")
    report = fusetune.apply(model, glu=False, rope=False, loss=None)
    assert not any(isinstance(m, FusedGatedMLP) for m in model.modules())
    assert any(isinstance(m, FusedRMSNorm) for m in model.modules())
    assert "forward" not in model.__dict__
    assert not report.patched["loss"] and not report.left_alone["rope"]
    assert "off" in str(report)


def test_double_apply_is_refused_and_undo_allows_again():
    model = tiny_model("llama")
    report = fusetune.apply(model)
    with pytest.raises(RuntimeError, match="already patched"):
        fusetune.apply(model)
    report.undo()
    fusetune.apply(model)


def test_unapply_restores_the_original_model():
    model = tiny_model("llama")
    reference = copy.deepcopy(model)
    before = _module_types(model)
    parameters = dict(model.named_parameters())
    fusetune.apply(model)
    fusetune.unapply(model)
    assert _module_types(model) == before
    assert "forward" not in model.__dict__ and "_fusetune_report" not in model.__dict__
    assert all(p is parameters[n] for n, p in model.named_parameters())
    inputs = batch()
    out, expected = model(**inputs), reference(**inputs)
    assert torch.equal(out.logits, expected.logits)


def test_parameters_are_the_same_objects():
    model = tiny_model("phi3")
    parameters = dict(model.named_parameters())
    fusetune.apply(model)
    assert {n: id(p) for n, p in model.named_parameters()} == {n: id(p) for n, p in parameters.items()}


def test_other_instances_classes_and_globals_are_untouched():
    from transformers.models.llama import modeling_llama

    globals_before = dict(vars(modeling_llama))
    class_forward = modeling_llama.LlamaForCausalLM.forward
    functional = dict(vars(torch.nn.functional))
    model, other = tiny_model("llama"), tiny_model("llama")
    before = _module_types(other)
    fusetune.apply(model)
    assert _module_types(other) == before and "forward" not in other.__dict__
    assert modeling_llama.LlamaForCausalLM.forward is class_forward
    assert dict(vars(modeling_llama)) == globals_before
    assert dict(vars(torch.nn.functional)) == functional


def test_eval_and_no_labels_run_the_original_path():
    model = tiny_model("gemma2", attn="eager")
    reference = copy.deepcopy(model)
    fusetune.apply(model)
    inputs = batch()
    with torch.no_grad():
        train_no_labels = model(input_ids=inputs["input_ids"]).logits
        evaluated = model.eval()(**inputs)
        expected = reference.eval()(**inputs)
        train_expected = reference.train()(input_ids=inputs["input_ids"]).logits
    assert_close(evaluated.logits, expected.logits, "eval logits")
    assert_close(evaluated.loss, expected.loss, "eval loss")
    assert_close(train_no_labels, train_expected, "logits without labels")


def test_fused_path_returns_no_logits_unless_asked():
    model = tiny_model("gemma3_text")
    reference = copy.deepcopy(model)
    fusetune.apply(model)
    inputs = batch()
    assert model(**inputs).logits is None
    out, expected = model(**inputs, return_logits=True), reference(**inputs)
    assert_close(out.logits, expected.logits, "softcapped logits")
    as_tuple = model(**inputs, return_dict=False, use_cache=True)
    expected_tuple = reference(**inputs, return_dict=False, use_cache=True)
    assert isinstance(as_tuple, tuple)
    assert_close(as_tuple[0], expected.loss, "loss from the tuple")
    # transformers' positions: the logits' slot holds None, the cache stays third
    assert as_tuple[1] is None and len(as_tuple) == len(expected_tuple) >= 3
    assert [type(x) for x in as_tuple[2:]] == [type(x) for x in expected_tuple[2:]]


def test_cross_entropy_mode_matches():
    model = tiny_model("gemma2", attn="eager")
    reference = copy.deepcopy(model)
    report = fusetune.apply(model, loss="cross_entropy")
    assert report.patched["loss"]
    inputs = batch()
    assert_close(loss_and_backward(model, **inputs), loss_and_backward(reference, **inputs), "loss")
    assert_same_gradients(model, reference)
    assert_close(model(**inputs).logits, reference(**inputs).logits, "logits")


def test_shift_labels_and_tied_embeddings():
    model = tiny_model("llama", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    reference = copy.deepcopy(model)
    fusetune.apply(model)
    inputs = batch()
    shifted = torch.nn.functional.pad(inputs["labels"], (0, 1), value=-100)[:, 1:].contiguous()
    shifted[1, 2] = -100
    kwargs = dict(inputs, shift_labels=shifted)
    assert_close(loss_and_backward(model, **kwargs), loss_and_backward(reference, **kwargs), "loss")
    assert_same_gradients(model, reference)


def test_lora_lm_head_falls_back_to_the_original_loss():
    peft = pytest.importorskip("peft")
    model = tiny_model("llama")
    reference = copy.deepcopy(model)
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    torch.manual_seed(1)
    lora = peft.get_peft_model(model, config)
    torch.manual_seed(1)
    lora_reference = peft.get_peft_model(reference, copy.deepcopy(config))
    report = fusetune.apply(lora)
    assert "lm_head is a peft.tuners.lora" in dict(report.left_alone["loss"]).get("LlamaForCausalLM", "")
    inputs = batch()
    assert_close(loss_and_backward(lora, **inputs), loss_and_backward(lora_reference, **inputs), "loss")
    assert_same_gradients(lora, lora_reference)


def test_unknown_norm_is_left_alone_and_reported():
    model = tiny_model("llama")
    model.model.norm = ScaleNorm(64)
    reference = copy.deepcopy(model)
    report = fusetune.apply(model)
    assert isinstance(model.model.norm, ScaleNorm)
    assert dict(report.left_alone["rms_norm"])["model.norm"].endswith("(probe mismatch)")
    assert "model.norm" in str(report)
    inputs = batch()
    assert_close(loss_and_backward(model, **inputs), loss_and_backward(reference, **inputs), "loss")
    assert_same_gradients(model, reference)


def test_deep_copy_of_a_patched_model_is_independent():
    model = tiny_model("qwen3")
    fusetune.apply(model)
    clone = copy.deepcopy(model)
    fusetune.unapply(clone)
    assert not any(isinstance(m, FusedRMSNorm) for m in clone.modules())
    assert any(isinstance(m, FusedRMSNorm) for m in model.modules())
    assert model.forward.__self__ is model and model(**batch()).logits is None
    assert clone(**batch()).logits is not None


def _reference_bind(function, args, kwargs):
    """``inspect.Signature.bind``'s arguments, ``**kwargs`` flattened; None where it refuses the call
    or fills ``*args`` (what the fused forward falls back to the original forward for)."""
    import inspect

    try:
        bound = inspect.signature(function).bind(*args, **kwargs)
    except TypeError:
        return None
    arguments = dict(bound.arguments)
    for parameter in inspect.signature(function).parameters.values():
        if parameter.kind is parameter.VAR_KEYWORD:
            arguments.update(arguments.pop(parameter.name, {}))
        elif parameter.kind is parameter.VAR_POSITIONAL and arguments.pop(parameter.name, ()):
            return None
    return arguments


def test_call_parameters_bind_as_inspect_binds():
    from fusetune.patch.loss import CallParameters

    def with_kwargs(input_ids=None, labels=None, *, logits_to_keep=0, **kwargs):
        pass

    def plain(input_ids, labels=None, return_dict=None):
        pass

    def with_args(input_ids=None, *args, labels=None):
        pass

    calls = [((), {}), ((1,), {}), ((1, 2), {}), ((1, 2, 3), {}), ((1,), {"labels": 2}),
             ((1,), {"input_ids": 2}), ((), {"labels": 2, "other": 3}), ((), {"logits_to_keep": 1}),
             ((1, 2), {"return_dict": True}), ((), {"input_ids": 1, "labels": 2})]
    for function in (with_kwargs, plain, with_args):
        parameters = CallParameters.of(function)
        for args, kwargs in calls:
            expected = _reference_bind(function, args, kwargs)
            assert parameters.bind(args, kwargs) == expected, (function.__name__, args, kwargs)


def test_a_float64_model_is_left_alone_naming_why():
    """fusetune's kernels take bf16, fp16 and fp32: a float64 model (gradient checks) keeps its own
    modules and loss, each reason naming the dtype (the loss was patched and its first training
    forward failed; the norms' reason read "probe mismatch")."""
    model, reference = tiny_model("llama").double(), tiny_model("llama").double()
    report = fusetune.apply(model)
    assert not report.patched["rms_norm"] and not report.patched["loss"]
    assert all("float64" in reason for _, reason in report.left_alone["rms_norm"])
    assert all("float64" in reason for _, reason in report.left_alone["loss"])
    inputs = batch()
    torch.testing.assert_close(model(**inputs).loss, reference(**inputs).loss)
