"""bench/compiled_speed.py: its "ops between graphs" system puts each patched op back outside the
compiled graph (as before the ops became custom ops), and only while that system runs. Its timing
loop is plain; its whole run takes a compile of each system (``--quick`` runs it on a CPU)."""

import compiled_speed
import pytest
import torch

import fusetune.nn.glu as glu_modules
import fusetune.nn.layer_norm as layer_norm_modules
import fusetune.nn.rms_norm as rms_norm_modules
import fusetune.patch.rope as rope_patch
from fusetune.ops import geglu, layer_norm, rms_norm, rope, swiglu

PATCHED = [(rms_norm_modules, "rms_norm", rms_norm), (layer_norm_modules, "layer_norm", layer_norm),
           (glu_modules, "swiglu", swiglu), (glu_modules, "geglu", geglu), (rope_patch, "rope", rope)]


def test_ops_between_graphs_breaks_the_graph_at_each_op_and_only_inside():
    with compiled_speed.ops_between_graphs():
        for module, name, op in PATCHED:
            assert getattr(module, name) is not op
            assert getattr(module, name)._torchdynamo_disable, name
    for module, name, op in PATCHED:
        assert getattr(module, name) is op


def test_ops_between_graphs_makes_a_compiled_norm_two_graphs():
    from torch._dynamo.utils import counters

    norm = torch.nn.RMSNorm(8)

    def function(x):
        return rms_norm_modules.rms_norm(x * 2, norm.weight) + 1

    counts = []
    for context in (compiled_speed.contextlib.nullcontext(), compiled_speed.ops_between_graphs()):
        torch._dynamo.reset()
        counters.clear()
        with context:
            torch.compile(function, backend="eager")(torch.randn(3, 8))
        counts.append(counters["stats"]["unique_graphs"])
    assert counts == [1, 2]


@pytest.mark.parametrize("attention", [True, False])
def test_fused_lora_between_graphs_routes_the_lora_layers_outside_the_graph(attention):
    import peft

    import fusetune
    from fusetune.nn.lora import FusedLoraMLP
    from fusetune.patch.lora import _GROUP_ATTR
    from tests.patch.models import tiny_model
    from tests.patch.test_lora_patch import ALL_LINEAR

    model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=ALL_LINEAR))
    fusetune.apply(model)
    compiled_speed.fused_lora_between_graphs(model, attention=attention)
    mlps = [module for module in model.modules() if isinstance(module, FusedLoraMLP)]
    projections = [module for module in model.modules() if hasattr(module, _GROUP_ATTR)]
    assert (len(mlps), len(projections)) == (2, 2 * 4)  # per layer: the MLP; q, k, v and o
    for module in mlps + projections:
        forward = module.forward
        routed = getattr(getattr(forward, "func", forward), "_torchdynamo_disable", False)
        assert routed == (attention or module in mlps)
