"""Patching a model whose parameters FSDP2 (``fully_shard``) has already sharded.

At rest every parameter of a ``fully_shard`` unit is a DTensor holding this rank's shard; FSDP2
gathers the whole tensors in the unit's forward (and backward) and sets them on the modules that
held the parameters when ``fully_shard`` ran. Two things follow for ``fusetune.apply`` after
sharding:

- a probe runs a module outside any unit's forward, so ``whole_parameters`` gives it the full
  tensors for the probe (a collective: ``apply`` runs alike on every rank, so the gathers match),
  and the patch-time LoRA check reads the projections as their parent's forward will see them;
- a module swapped in afterwards holding the same ``Parameter`` objects would keep the shards in
  forward, so ``follow_swap`` records it with FSDP2 as one more holder of those parameters (FSDP2's
  own record for tied weights), and FSDP2 then sets the gathered tensors on it too.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor


@contextmanager
def whole_parameters(module: nn.Module) -> Iterator[None]:
    """Within the block, each DTensor parameter in ``module`` is a plain one with the full tensor.

    Every process must enter it with the same modules in the same order (each parameter is
    all-gathered). A module without DTensor parameters is left as it is. A bitsandbytes 4-bit
    weight comes back as FSDP2's forward sees it too: a plain tensor of the packed bytes, which the
    fused paths read with its layer's ``quant_state`` (``fusetune.nn.lora.base_weight``).
    """
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    whole: dict[int, nn.Parameter] = {}  # a parameter tied between modules is gathered once
    try:
        with torch.no_grad():
            for owner in module.modules():
                for name, param in owner._parameters.items():
                    if isinstance(param, DTensor):
                        if id(param) not in whole:
                            whole[id(param)] = nn.Parameter(param.full_tensor(), param.requires_grad)
                        swapped.append((owner, name, param))
        for owner, name, param in swapped:
            owner._parameters[name] = whole[id(param)]
        yield
    finally:
        for owner, name, param in swapped:
            owner._parameters[name] = param


def follow_swap(root: nn.Module, original: nn.Module, replacement: nn.Module) -> None:
    """Have FSDP2 set ``replacement``'s parameters wherever it sets ``original``'s.

    ``replacement`` has just taken ``original``'s place in ``root`` and holds some of its
    parameters (the same objects, possibly under other names). A no-op when ``root`` is not
    sharded, or the parameters are not ``original``'s own (a swapped MLP keeps its children).
    """
    if isinstance(original, FSDPModule):
        raise ValueError(
            f"fusetune.apply: {type(original).__name__} is a fully_shard unit of its own and would "
            "lose FSDP's hooks if swapped; call fusetune.apply before fully_shard (or shard whole "
            "decoder layers)."
        )
    names = {id(param): name for name, param in replacement._parameters.items() if param is not None}
    for info in _module_infos(root):
        modules = [info.module, *info.shared_modules]
        holders = zip(modules, [info.param_name, *info.shared_param_names], strict=True)
        held = next((getattr(module, name) for module, name in holders if module is original), None)
        if held is not None and id(held) in names:
            info.shared_modules.append(replacement)
            info.shared_param_names.append(names[id(held)])


def _module_infos(root: nn.Module) -> Iterator:
    """FSDP2's record of where each parameter it manages in ``root`` lives (``ParamModuleInfo``).

    FSDP2 keeps this record privately: torch 2.11 has one parameter group per unit
    (``_fsdp_param_group``), later versions a list (``_fsdp_param_groups``).
    """
    for unit in root.modules():
        if not isinstance(unit, FSDPModule):
            continue
        state = unit._get_fsdp_state()
        groups = getattr(state, "_fsdp_param_groups", None) or [state._fsdp_param_group]
        for group in filter(None, groups):
            for fsdp_param in group.fsdp_params:
                yield fsdp_param._module_info
