"""Comparisons the patch tests share: a patched model against its unpatched deep copy.

The helpers take the models and the inputs (or a batch builder), so the text architectures
(``test_parity.py``) and the vision-language models (``test_vlm.py``) run the same checks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

RTOL = 1e-4
CURVE_RTOL = 1e-3  # per-step relative difference of two AdamW loss curves


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """``|value - reference| / |reference|`` in the 2-norm (absolute when the reference is 0)."""
    diff = (value.detach().double() - reference.detach().double()).norm()
    scale = reference.detach().double().norm()
    return float(diff / scale) if scale > 0 else float(diff)


def assert_close(value: torch.Tensor, reference: torch.Tensor, what: str, rtol: float = RTOL) -> None:
    error = relative_error(value, reference)
    assert error <= rtol, f"{what}: relative error {error:.2e} > {rtol:.0e}"


def assert_same_gradients(model: nn.Module, reference: nn.Module, floor: float = 0.0) -> None:
    """Every trainable parameter's gradient matches the reference model's, name by name.

    Each gradient is compared relative to the larger of its reference's norm and ``floor`` times
    the largest reference gradient norm in the model (for gradients that are exactly zero in
    theory, so both models hold only rounding noise there).
    """
    ours = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    theirs = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    assert ours.keys() == theirs.keys()
    norms = [float(g.double().norm()) for g in theirs.values() if g is not None]
    least = floor * max(norms, default=0.0)
    for name, grad in ours.items():
        expected = theirs[name]
        assert (grad is None) == (expected is None), name
        if grad is None:
            continue
        scale = max(float(expected.double().norm()), least)
        diff = float((grad.double() - expected.double()).norm())
        error = diff / scale if scale > 0 else diff
        assert error <= RTOL, f"grad of {name}: relative error {error:.2e} > {RTOL:.0e}"


def loss_and_backward(model: nn.Module, **inputs) -> torch.Tensor:
    """Zero the gradients, run the model, backpropagate the loss; return the detached loss."""
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach()


# AdamW steps a loss-curve check takes: each step's loss follows from every update before it, so a
# difference in the gradients compounds along the curve (4, down from 20, 10 and then 6, keeps the
# CPU suite inside CI's 15 minutes; the gradients themselves are compared step by step elsewhere).
CURVE_STEPS = 4


def adamw_loss_curve(
    model: nn.Module, batches: Callable[[int], dict], steps: int = CURVE_STEPS, lr: float = 1e-2
) -> torch.Tensor:
    """The losses of ``steps`` AdamW steps (zero_grad each step) on ``batches(step)``."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    curve = []
    for step in range(steps):
        optimizer.zero_grad()
        curve.append(loss_and_backward(model, **batches(step)))
        optimizer.step()
    return torch.stack(curve)


def assert_same_loss_curve(
    model: nn.Module, reference: nn.Module, batches: Callable[[int], dict], lr: float = 1e-2
) -> None:
    """``CURVE_STEPS`` AdamW steps: every step's loss within ``CURVE_RTOL`` (relative) of the reference's."""
    ours, theirs = adamw_loss_curve(model, batches, lr=lr), adamw_loss_curve(reference, batches, lr=lr)
    step_error = ((ours - theirs).abs() / theirs.abs()).max().item()
    assert step_error <= CURVE_RTOL, f"loss curves differ by up to {step_error:.2e} (relative) at some step"


def assert_micro_batches_equal_one_batch(
    model: nn.Module, reference: nn.Module, micro: list[dict], floor: float = 0.0
) -> None:
    """Micro-batch losses summed with ``num_items_in_batch`` (patched) equal, with the gradients,
    the loss of the batches concatenated along dim 0 (reference)."""
    items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
    model.zero_grad(set_to_none=True)
    total = sum(model(**b, num_items_in_batch=torch.tensor(items)).loss for b in micro)
    total.backward()
    big = {key: torch.cat([b[key] for b in micro]) for key in micro[0]}
    assert_close(total.detach(), loss_and_backward(reference, **big), "accumulated loss")
    assert_same_gradients(model, reference, floor)


def assert_save_and_load_round_trip(model: nn.Module, reference: nn.Module, path, inputs: dict) -> None:
    """The patched model's ``save_pretrained`` loads back (``from_pretrained`` of the original class)
    with the reference's keys, in order, the same values, and the same eval outputs on ``inputs``."""
    assert list(model.state_dict()) == list(reference.state_dict())
    model.save_pretrained(path)
    loaded = type(reference).from_pretrained(path, attn_implementation=reference.config._attn_implementation)
    assert list(loaded.state_dict()) == list(reference.state_dict())
    expected = reference.state_dict()
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, expected[name]), name
    with torch.no_grad():
        out, want = loaded.eval()(**inputs), reference.eval()(**inputs)
    assert torch.equal(out.logits, want.logits)
    assert torch.equal(out.loss, want.loss)


def assert_same_greedy_tokens(model: nn.Module, reference: nn.Module, prompt: dict, new_tokens: int = 4):
    """Greedy ``generate`` from ``prompt`` (keyword inputs) gives the same tokens in eval mode."""
    models = (model, reference)
    tokens = [m.eval().generate(**prompt, max_new_tokens=new_tokens, do_sample=False) for m in models]
    assert tokens[0].shape[1] > prompt["input_ids"].shape[1]
    assert torch.equal(tokens[0], tokens[1])


def assert_other_instance_untouched(make: Callable[[], nn.Module], apply: Callable, inputs: dict) -> None:
    """Patching one model leaves a second of the same class (built by ``make``) as it was: module
    types, no instance ``forward``, the class's ``forward``, and the same training loss and logits
    as a third, never-patched one."""
    model, other, pristine = make(), make(), make()
    forward = type(other).forward
    types = {name: type(m) for name, m in other.named_modules()}
    apply(model)
    assert type(model) is type(other)
    assert {name: type(m) for name, m in other.named_modules()} == types
    assert "forward" not in other.__dict__ and type(other).forward is forward
    out, want = other(**inputs), pristine(**inputs)
    assert out.logits is not None
    assert torch.equal(out.logits, want.logits) and torch.equal(out.loss, want.loss)
