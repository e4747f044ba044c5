"""Numerical recognition: run a module once on a tiny input and compare with fusetune's maths.

Structure (attribute names, parameter shapes) says what a module might be; a probe says what its
forward actually computes, so a module whose maths differs from the fused op is left alone rather
than silently replaced.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from fusetune.patch.sharding import whole_parameters

# Relative tolerance a probe allows, by output dtype: tight in float32; about one rounding step
# in 16-bit types (a different formula misses by far more than that).
_RTOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 2e-2, torch.float16: 4e-3}


@contextmanager
def probe_mode(module: nn.Module, training: bool = False) -> Iterator[None]:
    """Run the block as a probe of ``module``: in eval mode (no dropout) or, with ``training``, in
    training mode (what a training step runs: dropout, where the module has any, shows there), no
    grad, and parameters that FSDP2 has sharded whole (``whole_parameters``); restore every flag
    and parameter, and the random state a training-mode probe's dropout draws from."""
    flags = [(m, m.training) for m in module.modules()]
    module.train(training)
    gpus = sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})
    try:
        with torch.no_grad(), whole_parameters(module), torch.random.fork_rng(devices=gpus):
            yield
    finally:
        for m, training_flag in flags:
            m.training = training_flag


def extra_forward_arguments(module: nn.Module) -> list[str]:
    """The named arguments ``module``'s forward takes after its input (a gated norm's ``gate``): a
    fused module that takes the input alone cannot stand in for it, whatever a probe without them
    shows."""
    try:
        parameters = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):  # no signature to read: nothing known beyond the input
        return []
    named = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
             inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in parameters[1:] if p.kind in named]


def probe_input(width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A fixed (2, 3, width) input with varied magnitudes, the same on every call."""
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn(2, 3, width, generator=generator) * torch.linspace(0.5, 2.0, width)
    return x.to(device=device, dtype=dtype)


def matches(out: torch.Tensor, ref: torch.Tensor, exact: bool = False) -> bool:
    """Same shape and dtype, and equal (``exact``) or equal within the dtype's tolerance."""
    if not isinstance(out, torch.Tensor) or out.shape != ref.shape or out.dtype != ref.dtype:
        return False
    if exact:
        return torch.equal(out, ref)
    rtol = _RTOL.get(out.dtype, 1e-5)
    scale = ref.float().abs().max().clamp_min(1e-6)
    return bool(((out.float() - ref.float()).abs() <= rtol * scale).all())


def probe_device(module: nn.Module) -> torch.device | str:
    """The device of the module's parameters, or a reason why it cannot be probed (nor swapped)."""
    params = list(module.parameters())
    if not params:
        return "it has no parameters to probe with"
    if any(isinstance(m, FSDPModule) for m in module.modules()):
        # A probe would run FSDP's hooks out of turn, and a swap would drop them.
        return "it is or holds a fully_shard unit; apply fusetune before fully_shard to patch it"
    if any(hasattr(p, "ds_id") and p.numel() == 0 for p in params):
        # ZeRO-3 keeps an empty placeholder outside the module's forward: a probe would compare
        # empty tensors and prove nothing.
        return ("DeepSpeed ZeRO-3 has partitioned its parameters; apply fusetune before "
                "deepspeed.initialize / zero.Init (as fusetune train does)")
    device = params[0].device
    if device.type == "meta":
        return "its parameters are on the meta device (patch after loading the weights)"
    if params[0].dtype == torch.float64:
        return "its parameters are float64 (fusetune's kernels take bfloat16, float16 and float32)"
    return device
