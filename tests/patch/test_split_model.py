"""A patched model split over two GPUs trains as the same model on one GPU, unpatched.

``from_pretrained(..., device_map="auto")`` on a machine with several GPUs puts each decoder layer
on one of them and moves every module's inputs to its device with hooks (accelerate's). The layers on
the second GPU are called while the first is current, and Triton launches on the current device:
each op must switch to its inputs' device (``fusetune.ops._launch.on_input_device``). Here the
embeddings and the first layer stay on ``cuda:0``, the rest on ``cuda:1``, with pre-hooks that
move inputs as accelerate's do; the loss and every trainable gradient (float32) must match the
unpatched model on ``cuda:0`` alone, plain and with LoRA on every projection.
"""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")

import fusetune  # noqa: E402
from tests.ops import checks as op_checks  # noqa: E402
from tests.patch import checks  # noqa: E402
from tests.patch.models import batch, tiny_model  # noqa: E402
from tests.patch.test_lora_patch import ALL_LINEAR  # noqa: E402

TWO_GPUS = op_checks.DEVICE == "cuda" and torch.cuda.device_count() >= 2


def _to(value, device: torch.device):
    """``value`` with every tensor in it (tuples, lists and dicts too) on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(item, device) for item in value)
    if isinstance(value, dict):
        return {key: _to(item, device) for key, item in value.items()}
    return value


def _place(module: torch.nn.Module, device: torch.device) -> None:
    """``module`` on ``device``, its inputs moved there before each call (as accelerate's hooks do)."""
    module.to(device)
    module.register_forward_pre_hook(lambda _, args, kwargs: (_to(args, device), _to(kwargs, device)),
                                     with_kwargs=True)


def _model(lora: bool) -> torch.nn.Module:
    model = tiny_model("llama")
    if lora:
        torch.manual_seed(1)
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=ALL_LINEAR, lora_dropout=0.0,
                                 init_lora_weights=False)
        model = peft.get_peft_model(model, config)
    return model


def _split(model: torch.nn.Module) -> torch.nn.Module:
    """The embeddings and the first layer on cuda:0; the other layers, the norm and the head on cuda:1."""
    model.to("cuda:0")
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    second = torch.device("cuda", 1)
    for module in [*causal_lm.model.layers[1:], causal_lm.model.norm, causal_lm.lm_head]:
        _place(module, second)
    return model


def _loss_and_gradients(model: torch.nn.Module, inputs: dict) -> tuple[torch.Tensor, dict]:
    loss = checks.loss_and_backward(model, **inputs)
    return loss.cpu(), {name: p.grad.cpu() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.skipif(not TWO_GPUS, reason="needs two CUDA devices")
@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
def test_patched_model_split_over_two_gpus_trains_as_one_gpu_unpatched(lora):
    inputs = {key: value.to("cuda:0") for key, value in batch().items()}
    expected_loss, expected = _loss_and_gradients(_model(lora).to("cuda:0"), inputs)
    split = _split(_model(lora))
    fusetune.apply(split)
    assert torch.cuda.current_device() == 0
    loss, gradients = _loss_and_gradients(split, inputs)
    checks.assert_close(loss, expected_loss, "loss")
    assert gradients.keys() == expected.keys() and len(gradients) > 0
    for name, gradient in gradients.items():
        checks.assert_close(gradient, expected[name], f"grad of {name}")
