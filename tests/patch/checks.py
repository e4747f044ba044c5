"""Comparisons the patch tests share: a patched model against its unpatched deep copy."""

from __future__ import annotations

import torch

RTOL = 1e-4


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """``|value - reference| / |reference|`` in the 2-norm (absolute when the reference is 0)."""
    diff = (value.detach().double() - reference.detach().double()).norm()
    scale = reference.detach().double().norm()
    return float(diff / scale) if scale > 0 else float(diff)


def assert_close(value: torch.Tensor, reference: torch.Tensor, what: str, rtol: float = RTOL) -> None:
    error = relative_error(value, reference)
    assert error <= rtol, f"{what}: relative error {error:.2e} > {rtol:.0e}"


def assert_same_gradients(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    """Every trainable parameter's gradient matches the reference model's, name by name."""
    ours = {n: p for n, p in model.named_parameters() if p.requires_grad}
    theirs = {n: p for n, p in reference.named_parameters() if p.requires_grad}
    assert ours.keys() == theirs.keys()
    for name, param in ours.items():
        assert (param.grad is None) == (theirs[name].grad is None), name
        if param.grad is not None:
            assert_close(param.grad, theirs[name].grad, f"grad of {name}")


def loss_and_backward(model: torch.nn.Module, **inputs) -> torch.Tensor:
    """Zero the gradients, run the model, backpropagate the loss; return the detached loss."""
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach()
