"""fusetune.graphs: a training step captured as a CUDA graph, and what the ops do while one is captured.

On a CPU: the batch and model checks, the label check the replay relies on, the private offload
store, the gradient accumulation across replays, and which models' steps read nothing on the host
while captured (the linear cross-entropy's capture path is tested with the op). On CUDA: captured
steps against eager steps of the same model on new batches, bf16 and 4-bit, text and mllama.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap

import peft
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fusetune
from fusetune import graphs
from fusetune.checkpointing import enable_checkpointing, private_offload_store
from fusetune.ops import _launch
from tests.patch.models import VOCAB, batch, tiny_model
from tests.patch.vlm_models import tiny_vlm, vlm_batch

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_llama(dropout: float = 0.0, **overrides) -> torch.nn.Module:
    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=LORA_TARGETS)
    return peft.get_peft_model(tiny_model("llama", **overrides), config)


# --------------------------------------------------------------------------------------------
# Checks made before capture and before every replay (CPU)
# --------------------------------------------------------------------------------------------
def test_static_batch_copies_a_matching_batch_in():
    static = graphs.StaticBatch(batch(seed=0))
    fresh = batch(seed=1)
    static.fill(fresh)
    for key, value in fresh.items():
        assert torch.equal(static.values[key], value)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda b: {**b, "attention_mask": torch.ones_like(b["input_ids"])}, "same inputs"),
        (lambda b: {k: v[:, :-1] for k, v in b.items()}, "pad or cut batches"),
        (lambda b: {**b, "input_ids": b["input_ids"].int()}, "pad or cut batches"),
        (lambda b: {**b, "labels": b["labels"].tolist()}, "pad or cut batches"),
    ],
    ids=["keys", "shape", "dtype", "not a tensor"],
)
def test_static_batch_refuses_another_layout(change, message):
    static = graphs.StaticBatch(batch(seed=0))
    before = {k: v.clone() for k, v in static.values.items()}
    with pytest.raises(ValueError, match=message):
        static.fill(change(batch(seed=1)))
    for key, value in before.items():  # nothing was copied in
        assert torch.equal(static.values[key], value)


def test_static_batch_refuses_another_constant():
    static = graphs.StaticBatch({**batch(seed=0), "use_cache": False})
    with pytest.raises(ValueError, match="fixed at capture"):
        static.fill({**batch(seed=1), "use_cache": True})


def test_active_dropout_names_every_source_of_randomness():
    assert graphs.active_dropout(lora_llama()) == []
    found = graphs.active_dropout(lora_llama(dropout=0.1))
    assert found and all("lora_dropout" in name for name in found)
    assert len(found) == 2 * len(LORA_TARGETS)  # two layers
    attention = graphs.active_dropout(lora_llama(attention_dropout=0.1))
    assert any(name.endswith("config.attention_dropout") for name in attention)
    assert graphs.active_dropout(lora_llama(dropout=0.1).eval()) == []
    from transformers import AutoConfig, AutoModelForCausalLM

    mixtral = AutoConfig.for_model("mixtral", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                   num_local_experts=2, router_jitter_noise=0.1)
    jitter = graphs.active_dropout(AutoModelForCausalLM.from_config(mixtral).train())
    assert any(name.endswith("config.router_jitter_noise") for name in jitter)


def test_a_random_draw_in_a_step_is_found_by_the_generator_it_moves():
    """What active_dropout cannot name (a model's own torch.rand): the warm-up step moves the
    generator (on CUDA, the GPU's; the CPU's here)."""
    assert graphs.draws_random_numbers(lambda: torch.rand(3), torch.get_rng_state)
    assert not graphs.draws_random_numbers(lambda: torch.ones(3) * 2, torch.get_rng_state)


def test_plain_layout_tells_padded_and_packed_batches():
    """A graph captured from a batch without padding has no mask to follow: later batches must keep
    that layout (no zeros in attention_mask, text position ids rising by one along each row)."""
    plain = {**batch(seed=0), "attention_mask": torch.ones(2, 12, dtype=torch.long),
             "position_ids": torch.arange(12).expand(2, 12)}
    assert graphs.plain_layout(plain) and graphs.plain_layout(batch(seed=0))
    padded = {**plain, "attention_mask": plain["attention_mask"].clone()}
    padded["attention_mask"][1, :3] = 0
    assert not graphs.plain_layout(padded)
    packed = {**plain, "position_ids": torch.cat([torch.arange(5), torch.arange(7)]).expand(2, 12)}
    assert not graphs.plain_layout(packed)
    mrope = torch.arange(12).expand(4, 2, 12).clone()
    assert graphs.plain_layout({"position_ids": mrope})
    mrope[0, :, 6:] -= 6  # the text row restarts: two samples
    assert not graphs.plain_layout({"position_ids": mrope})


def test_static_batch_refuses_tensors_inside_other_values():
    with pytest.raises(TypeError, match="pixel_values holds tensors inside a list"):
        graphs.StaticBatch({**batch(seed=0), "pixel_values": [torch.zeros(3)]})


def test_output_size_reads_the_vocabulary_through_peft():
    assert graphs.output_size(lora_llama()) == VOCAB
    assert graphs.output_size(torch.nn.Linear(3, 4)) is None


def test_batch_labels_are_checked_against_the_vocabulary():
    good = batch(seed=0)
    graphs.check_labels(good, VOCAB, -100)
    graphs.check_labels({"input_ids": good["input_ids"]}, VOCAB, -100)  # nothing to check
    bad = {**good, "labels": good["labels"].clone()}
    bad["labels"][1, 2] = VOCAB
    with pytest.raises(ValueError, match=f"label {VOCAB} is outside the vocabulary"):
        graphs.check_labels(bad, VOCAB, -100)


def test_models_a_capture_cannot_replay_are_refused_with_the_fix():
    model = lora_llama()
    assert graphs.capturable_parameters(model) == [p for p in model.parameters() if p.requires_grad]
    with pytest.raises(ValueError, match="model.train"):
        fusetune.CapturedStep(lora_llama().eval(), lambda b: None, batch())
    with pytest.raises(ValueError, match="set those probabilities to 0"):
        fusetune.CapturedStep(lora_llama(dropout=0.1), lambda b: None, batch())
    with pytest.raises(ValueError, match="at least one eager step"):
        fusetune.CapturedStep(model, lambda b: None, batch(), warmup_steps=0)
    frozen = tiny_model("llama").requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        graphs.capturable_parameters(frozen)
    sharded = lora_llama()
    next(sharded.parameters()).ds_id = 0  # how DeepSpeed ZeRO-3 marks its parameters
    with pytest.raises(ValueError, match="runs on one GPU"):
        graphs.capturable_parameters(sharded)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error a machine without CUDA gives")
def test_capture_without_cuda_says_what_to_do():
    model = lora_llama()
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        fusetune.CapturedStep(model, lambda b: model(**b).loss, batch())


def test_captured_attention_calls_get_the_masks_the_warm_up_had(monkeypatch):
    received = []

    def attention(module, query, key, value, attention_mask, **kwargs):
        received.append(attention_mask)
        return query

    masks = graphs._MasksAsInEager()
    wrapped = masks.wrap(attention)
    causal, windowed = torch.nn.Module(), torch.nn.Module()
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    for _ in range(2):  # warm-up: one module always without a mask, the other once with one
        wrapped(causal, None, None, None, None)
    wrapped(windowed, None, None, None, None)
    wrapped(windowed, None, None, None, mask)
    monkeypatch.setattr(graphs, "capturing", lambda: True)
    received.clear()
    wrapped(causal, None, None, None, mask)
    wrapped(windowed, None, None, None, mask)
    wrapped(torch.nn.Module(), None, None, None, mask)  # never seen in warm-up
    assert received[0] is None and received[1] is mask and received[2] is mask
    assert masks.dropped  # so the step refuses batches that need the mask (plain_layout)
    quiet = graphs._MasksAsInEager()
    quiet.wrap(attention)(causal, None, None, None, None)
    monkeypatch.setattr(graphs, "capturing", lambda: True)
    quiet.wrap(attention)(causal, None, None, None, None)  # nothing to drop
    assert not quiet.dropped


def test_attention_registry_is_restored_after_capture_warm_up():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = lora_llama()
    before = ALL_ATTENTION_FUNCTIONS["sdpa"]
    with graphs._masks_as_in_eager(model):
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is not before
        model(**batch()).loss.backward()
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is before


@pytest.mark.parametrize(("name", "value"), [
    ("PYTORCH_ALLOC_CONF", "max_split_size_mb:512,expandable_segments:True"),
    ("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:False"),
    ("PYTORCH_ALLOC_CONF", "max_split_size_mb:512"),
    (None, None),
])
def test_capture_switches_expandable_segments_on_for_itself_only(monkeypatch, name, value):
    """The capture asks the allocator for expandable segments and switches them off again after,
    unless the process's allocator settings chose either way (then it leaves them alone)."""
    calls = []
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", calls.append, raising=False)
    for setting in graphs.ALLOCATOR_SETTINGS:
        monkeypatch.delenv(setting, raising=False)
    if name:
        monkeypatch.setenv(name, value)
    with graphs._expandable_segments():
        inside = list(calls)
    if value and "expandable_segments" in value:
        assert calls == []
    else:
        assert inside == ["expandable_segments:True"]
        assert calls == ["expandable_segments:True", "expandable_segments:False"]


def test_capture_runs_where_torch_cannot_switch_segments(monkeypatch):
    monkeypatch.delattr(torch._C, "_accelerator_setAllocatorSettings", raising=False)
    with graphs._expandable_segments():
        value = torch.ones(3).sum()
    assert value == 3


# --------------------------------------------------------------------------------------------
# The private offload store
# --------------------------------------------------------------------------------------------
def _stores(model) -> list:
    return [layer._gradient_checkpointing_func.store for layer in model.base_model.model.model.layers]


def test_private_offload_store_is_used_inside_and_kept_after():
    model = lora_llama()
    enable_checkpointing(model, offload=True)
    shared = _stores(model)
    assert len(set(map(id, shared))) == 1
    with private_offload_store(model) as store:
        assert all(s is store for s in _stores(model)) and store is not shared[0]
        model(**batch()).loss.backward()
    assert _stores(model) == shared
    private_buffers = {id(b) for b in store.pool(torch.device("cpu")).free}
    # Each layer's input and kept attention output, back in the private pool after backward.
    assert len(private_buffers) == 4
    model(**batch(seed=1)).loss.backward()
    shared_buffers = {id(b) for b in shared[0].pool(torch.device("cpu")).free}
    assert shared_buffers and not shared_buffers & private_buffers


def test_private_offload_store_without_offloading_yields_none():
    model = lora_llama()
    enable_checkpointing(model, offload=False)
    with private_offload_store(model) as store:
        assert store is None
        model(**batch()).loss.backward()


# What a captured stream may not do: read a device value on the host (an item, a count of nonzeros,
# a data-dependent output size, a comparison whose answer the host branches on).
HOST_READS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim",
              "unique_consecutive", "repeat_interleave", "bincount", "equal", "is_nonzero"}


class _HostReads(TorchDispatchMode):
    """The ops (and boolean-mask indexing) of a step that would read a value on the host."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        masks = name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                         for i in args[1] if i is not None)
        if name in HOST_READS or masks:
            self.found.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def as_if_captured(monkeypatch):
    """transformers and fusetune's ops both see a stream being captured (as in ``torch.cuda.graph``)."""
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    capturing = _launch.capturing
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("fusetune") and \
                getattr(module, "capturing", None) is capturing:
            monkeypatch.setattr(module, "capturing", lambda: True)
    assert graphs.capturing()


def _lora_step_model(model: torch.nn.Module) -> torch.nn.Module:
    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS)
    model = peft.get_peft_model(model, config)
    fusetune.apply(model)
    enable_checkpointing(model, offload=True)
    return model


@pytest.mark.parametrize("arch", ["llama", "mllama", "qwen2_vl"])
def test_a_step_reads_no_device_value_on_the_host_while_captured(arch, as_if_captured):
    """Whether a model's training step can be captured at all: Llama's and mllama's (the e2e
    benchmark's captured L8 and M11) read nothing on the host once transformers and fusetune's ops
    see a capture; Qwen2-VL's vision code reads its image grids (``.tolist()``), so it cannot be."""
    model = _lora_step_model(tiny_model("llama") if arch == "llama" else tiny_vlm(arch, attn="sdpa"))
    inputs = batch() if arch == "llama" else vlm_batch(arch)
    with _HostReads() as reads:
        model(**inputs).loss.backward()
    if arch == "qwen2_vl":
        assert "_local_scalar_dense.default" in reads.found
    else:
        assert reads.found == []


def _split_badly(x: torch.Tensor):
    return torch.split(x, [1, 1])  # torch's own Python raises, below this frame


def test_a_failed_capture_names_the_first_error_and_where_the_step_called_torch():
    try:
        try:
            _split_badly(torch.zeros(3))
        except RuntimeError:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")  # noqa: B904 (chained as __exit__ chains it)
    except RuntimeError as ending:
        message = graphs.capture_failure(ending)
    assert "could not be captured" in message and "previous error" not in message
    assert "split_with_sizes expects split_sizes to sum exactly to 3" in message
    line = _split_badly.__code__.co_firstlineno + 1
    assert f"test_graphs.py:{line} (_split_badly)" in message
    assert "eager steps" in message


def _replay_writing(buffers: list[torch.Tensor], values: list[float]):
    for buffer, value in zip(buffers, values, strict=True):
        buffer.fill_(value)


def test_replayed_gradients_accumulate_like_eager_backwards():
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))]
    buffers = [torch.empty(3), torch.empty(2, 2)]  # the graph's gradient buffers
    expected = [torch.zeros(3), torch.zeros(2, 2)]
    params[1].grad = torch.full((2, 2), 10.0)  # an eager step's gradient
    expected[1] += 10
    for values in ([1.0, 2.0], [3.0, 4.0], [5.0, 6.0]):
        earlier = graphs.keep_earlier_gradients(params, buffers)
        _replay_writing(buffers, values)
        graphs.add_replayed_gradients(params, buffers, earlier)
        for p, want, value in zip(params, expected, values, strict=True):
            want += value
            torch.testing.assert_close(p.grad, want, rtol=0, atol=0)
    assert params[0].grad.data_ptr() != buffers[0].data_ptr()  # copied out before the second replay

    for p in params:  # zero_grad(set_to_none=True): the next replay's buffer is the gradient, no copy
        p.grad = None
    earlier = graphs.keep_earlier_gradients(params, buffers)
    _replay_writing(buffers, [7.0, 8.0])
    graphs.add_replayed_gradients(params, buffers, earlier)
    assert [p.grad.data_ptr() for p in params] == [b.data_ptr() for b in buffers]
    torch.testing.assert_close(params[1].grad, torch.full((2, 2), 8.0), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Captured steps against eager ones (CUDA)
# --------------------------------------------------------------------------------------------
def _forward(model, inputs):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        return model(**inputs, use_cache=False).loss


def _clear_grads(model):
    for p in model.parameters():
        p.grad = None


def _trainable_grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _eager_step(model, inputs):
    _clear_grads(model)
    loss = _forward(model, inputs)
    loss.backward()
    return loss.detach().clone(), _trainable_grads(model)


def _assert_grads_close(got: dict, want: dict):
    assert got.keys() == want.keys()
    for name, w in want.items():
        scale = w.abs().max().item()
        torch.testing.assert_close(got[name], w, rtol=2e-2, atol=2e-2 * scale, msg=name)


def _cuda_model(four_bit: bool, arch: str = "llama") -> torch.nn.Module:
    base = tiny_model("llama", num_hidden_layers=3) if arch == "llama" else tiny_vlm(arch, attn="sdpa")
    base = base.to("cuda", torch.bfloat16)
    if four_bit:
        fusetune.quantize_4bit(base, compute_dtype=torch.bfloat16)
    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS)
    model = peft.get_peft_model(base, config)
    fusetune.apply(model)
    enable_checkpointing(model, offload=True)
    return model


def _cuda_batch(seed: int, arch: str = "llama") -> dict:
    inputs = batch(seed=seed, size=1, length=48) if arch == "llama" else vlm_batch(arch, seed=seed)
    return {key: value.to("cuda", torch.bfloat16 if value.is_floating_point() else value.dtype)
            for key, value in inputs.items()}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: graph capture")
@pytest.mark.parametrize("arch, four_bit", [("llama", False), ("llama", True), ("mllama", False)],
                         ids=["bf16", "nf4", "mllama"])
def test_captured_step_matches_eager_steps(arch, four_bit):
    if four_bit:
        pytest.importorskip("bitsandbytes")
    model = _cuda_model(four_bit, arch)
    batches = [_cuda_batch(seed, arch) for seed in range(3)]
    eager = [_eager_step(model, b) for b in batches]
    assert not torch.equal(eager[0][0], eager[1][0])

    step = fusetune.CapturedStep(model, functools.partial(_forward, model), batches[0])
    for inputs, (loss, grads) in zip(batches, eager, strict=True):
        _clear_grads(model)
        got_loss = step(inputs).clone()
        torch.testing.assert_close(got_loss, loss, rtol=1e-2, atol=1e-2)
        _assert_grads_close(_trainable_grads(model), grads)

    # An eager step in between (its own offload buffers) leaves the next replay exact.
    _eager_step(model, batches[2])
    _clear_grads(model)
    step(batches[1])
    _assert_grads_close(_trainable_grads(model), eager[1][1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: graph capture")
def test_captured_steps_accumulate_gradients_as_eager_backwards_do():
    model = _cuda_model(False)
    batches = [_cuda_batch(seed) for seed in range(3)]
    _clear_grads(model)
    for inputs in batches:
        _forward(model, inputs).backward()
    summed = _trainable_grads(model)
    _eager_step(model, batches[0])
    first = _trainable_grads(model)

    step = fusetune.CapturedStep(model, functools.partial(_forward, model), batches[1])
    _assert_grads_close(_trainable_grads(model), first)  # making the step left .grad alone
    for inputs in batches[1:]:  # added to the first batch's; the second call copies out of the graph
        step(inputs)
    _assert_grads_close(_trainable_grads(model), summed)
    _clear_grads(model)
    for inputs in batches:  # from no gradient: the first replay's buffer, then added to
        step(inputs)
    _assert_grads_close(_trainable_grads(model), summed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: graph capture")
def test_captured_step_refuses_bad_batches_before_replaying():
    model = _cuda_model(False)
    step = fusetune.CapturedStep(model, functools.partial(_forward, model), _cuda_batch(0))
    assert step.pool_bytes() > 0
    loss = step(_cuda_batch(1)).clone()
    bad = _cuda_batch(2)
    bad["labels"][0, 5] = VOCAB + 3
    with pytest.raises(ValueError, match="outside the vocabulary"):
        step(bad)
    with pytest.raises(ValueError, match="pad or cut"):
        step({k: v[:, :-2] for k, v in _cuda_batch(2).items()})
    torch.testing.assert_close(step(_cuda_batch(1)).clone(), loss, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: graph capture")
def test_a_step_captured_without_padding_refuses_a_padded_batch():
    """Captured from a batch with an all-ones attention_mask, the graph's attention has no mask: a
    padded batch is refused (before, its padding was silently attended to), a plain one replays."""
    model = _cuda_model(False)
    plain = {**_cuda_batch(0), "attention_mask": torch.ones(1, 48, dtype=torch.long, device="cuda")}
    step = fusetune.CapturedStep(model, functools.partial(_forward, model), plain)
    padded = {**_cuda_batch(1), "attention_mask": plain["attention_mask"].clone()}
    padded["attention_mask"][0, :5] = 0
    with pytest.raises(ValueError, match="captured from a batch without"):
        step(padded)
    _clear_grads(model)
    step({**_cuda_batch(1), "attention_mask": plain["attention_mask"]})
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: graph capture")
def test_a_parameter_the_step_never_reaches_keeps_its_gradient():
    """A trainable parameter outside the step's graph (a vision adapter on a text batch) gets no
    gradient from a replay and keeps the one it had (before, the replay failed on its None buffer)."""
    model = _cuda_model(False)
    unused = torch.nn.Parameter(torch.ones(3, device="cuda"))
    model.register_parameter("unused", unused)
    unused.grad = torch.full_like(unused, 2.0)
    step = fusetune.CapturedStep(model, functools.partial(_forward, model), _cuda_batch(0))
    step(_cuda_batch(1))
    torch.testing.assert_close(unused.grad, torch.full_like(unused, 2.0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: graph capture")
def test_captured_step_memory_stays_near_the_eager_steps():
    """The graph's pool holds about what an eager step allocates above the weights: offloaded layer
    inputs are released during the capture, not kept to its end (16 layers of 4 MiB inputs here).
    Unless the process chose otherwise, the pool lies in expandable segments and allocations after
    the capture do not."""
    base = tiny_model("llama", hidden_size=1024, intermediate_size=1024, num_hidden_layers=16,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096)
    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS)
    model = peft.get_peft_model(base.to("cuda", torch.bfloat16), config)
    fusetune.apply(model)
    enable_checkpointing(model, offload=True, keep_projections=True)  # eager steps keep what the capture does
    inputs = {key: value.cuda() for key, value in batch(seed=0, size=1, length=2048).items()}
    _eager_step(model, inputs)
    for p in model.parameters():
        p.grad = None
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    _eager_step(model, inputs)
    eager_added = torch.cuda.max_memory_allocated() - start
    step = fusetune.CapturedStep(model, functools.partial(_forward, model), inputs)
    assert step.pool_bytes() < 1.5 * eager_added, (step.pool_bytes(), eager_added)
    if not any("expandable_segments" in os.environ.get(name, "") for name in graphs.ALLOCATOR_SETTINGS):
        pool = [segment for segment in torch.cuda.memory_snapshot()
                if tuple(segment.get("segment_pool_id", ())) == tuple(step._graph.pool())]
        assert pool and all(segment["is_expandable"] for segment in pool)
        after = torch.empty(32 << 20, dtype=torch.uint8, device="cuda").data_ptr()  # outside the capture
        segment = next(s for s in torch.cuda.memory_snapshot()
                       if s["address"] <= after < s["address"] + s["total_size"])
        assert not segment["is_expandable"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: graph capture")
def test_under_capture_a_layers_copies_are_joined_at_the_next_layers_save():
    """While a graph is captured, a layer's further tensors (kept attention and projection outputs)
    go to the host without the compute stream waiting for its earlier copies still in flight; the
    next layer's save waits for them all and lets them go. Each replay takes the tensors' values
    out and back."""
    from fusetune.checkpointing import _OffloadStore

    store = _OffloadStore()
    first, second, third = (torch.empty(1024, 1024, device="cuda") for _ in range(3))
    warm = store.save(first)  # fills the pool with three buffers: a capture may not pin host memory
    store.add(warm, second)
    store.restore(store.save(third))
    store.restore(warm)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        entry = store.save(first)
        store.add(entry, second)
        assert [id(held) for held, _ in store._held] == [id(first), id(second)]
        following = store.save(third)
        assert [id(held) for held, _ in store._held] == [id(third)]
        back = store.restore(following) + store.restore(entry)  # joins every copy into the capture
    for value in (1.0, 2.0):
        for i, tensor in enumerate((first, second, third)):
            tensor.fill_(value + i)
        graph.replay()
        torch.cuda.synchronize()
        assert [t.flatten()[0].item() for t in back] == [value + 2, value, value + 1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: graph capture")
def test_a_step_reading_the_host_is_refused_with_where_it_read(tmp_path):
    """In its own process: a capture spoiled by a host read leaves the CUDA stream state of the
    process it failed in behind it."""
    script = tmp_path / "host_read.py"
    script.write_text(textwrap.dedent("""
        import functools, torch, fusetune
        from tests.test_graphs import _cuda_model, _cuda_batch, _forward

        def forward(model, inputs):
            labelled = inputs["labels"].ne(-100).sum().item()  # read on the host
            return _forward(model, inputs) * labelled

        model = _cuda_model(False)
        try:
            fusetune.CapturedStep(model, functools.partial(forward, model), _cuda_batch(0))
        except RuntimeError as error:
            print(error)
    """))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, str(script)], cwd=root, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": root})
    assert "fusetune.CapturedStep: the step could not be captured" in done.stdout, done.stderr[-2000:]
    assert "host_read.py:6 (forward)" in done.stdout
