"""fusetune.checkpointing: offloaded and plain activation checkpointing give the gradients of an
uncheckpointed model, and offloading really keeps the layer inputs off the compute device.

Every model is a tiny random-weight transformers model in float32 on CPU, compared with an
uncheckpointed deep copy (and with transformers' own checkpointing) fed the same batch and RNG seed.
The ops take their PyTorch references (``TRITON_INTERPRET=0``) except in the test that runs
``fusetune.apply``'s fused kernels inside checkpointed layers.
"""

from __future__ import annotations

import copy
import gc
import io
import os
import weakref

import pytest
import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

import fusetune
from fusetune.checkpointing import _HostPool, disable_checkpointing, enable_checkpointing
from fusetune.ops import lora as lora_ops
from tests.patch.checks import assert_close, assert_same_gradients
from tests.patch.models import batch, tiny_model
from tests.patch.vlm_models import tiny_vlm, vlm_batch

RTOL = 1e-5
SUITE_INTERPRET = os.environ.get("TRITON_INTERPRET", "0")  # as the kernels were defined
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VISION_LORA_TARGETS = ["qkv", "fc1", "fc2"]  # Qwen2-VL's vision blocks


@pytest.fixture(autouse=True)
def reference_ops(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def lora(model: nn.Module, dropout: float = 0.0, vision: bool = False) -> nn.Module:
    """PEFT LoRA with random A and B (the default zero B would make every A gradient zero), on the
    language model's linear layers and, with ``vision``, on the vision blocks' too."""
    from peft import LoraConfig, get_peft_model  # here: the distributed test's workers do without it

    targets = LORA_TARGETS + (VISION_LORA_TARGETS if vision else [])
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=dropout,
                        init_lora_weights=False)
    torch.manual_seed(1)
    return get_peft_model(model, config)


def step(model: nn.Module, inputs: dict, seed: int = 0) -> torch.Tensor:
    """One forward and backward from a fixed RNG state; returns the detached loss."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach()


def assert_matches(model: nn.Module, reference: nn.Module, inputs: dict, seed: int = 0) -> None:
    assert_close(step(model, inputs, seed), step(reference, inputs, seed), "loss", RTOL)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert_same_gradients(model, reference)


def checkpointing_on(model: nn.Module) -> bool:
    """What transformers' ``is_gradient_checkpointing`` reports, without its deprecation warning."""
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


@pytest.mark.parametrize("offload", [True, False])
def test_llama_lora_matches_no_checkpointing_and_transformers(offload):
    model = lora(tiny_model("llama"), dropout=0.1)
    reference = copy.deepcopy(model)
    theirs = copy.deepcopy(model)
    theirs.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert enable_checkpointing(model, offload=offload) == 2
    assert checkpointing_on(model)
    inputs = batch()
    assert_matches(model, reference, inputs)
    assert_matches(model, theirs, inputs)


def test_attention_dropout_is_replayed():
    """The recompute draws the same dropout masks as the forward: equal to the uncheckpointed model."""
    model = lora(tiny_model("llama", attn="eager", attention_dropout=0.3))
    reference = copy.deepcopy(model)
    enable_checkpointing(model)
    inputs = batch()
    assert_matches(model, reference, inputs, seed=3)
    # The masks depend on the seed, so a recompute with other masks would not match.
    assert not torch.equal(step(reference, inputs, seed=3), step(reference, inputs, seed=4))


def test_autocast_is_replayed():
    model = lora(tiny_model("llama"))
    reference = copy.deepcopy(model)
    enable_checkpointing(model)
    inputs = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert_matches(model, reference, inputs)
    # bf16 gradients are far from float32 ones, so a recompute outside autocast would not match.
    grad = next(p.grad for p in reference.parameters() if p.requires_grad).clone()
    step(reference, inputs)
    assert not torch.allclose(grad, next(p.grad for p in reference.parameters() if p.requires_grad),
                              rtol=1e-3)


@pytest.mark.parametrize("arch", ["qwen2_vl", "mllama"])
def test_vlm_full_fine_tune_matches(arch):
    """Vision tower and language model layers are checkpointed; mllama's cross_attention_states (a
    keyword argument needing gradients) brings the vision tower its gradients."""
    model = tiny_vlm(arch)
    reference = copy.deepcopy(model)
    layers = enable_checkpointing(model)
    assert layers == sum(isinstance(m, GradientCheckpointingLayer) for m in model.modules()) >= 2
    assert_matches(model, reference, vlm_batch(arch))


@pytest.mark.parametrize("vision", [False, True])
def test_qwen2_vl_lora_on_a_peft_wrapper_matches(vision):
    """Without LoRA on the vision tower its frozen blocks run as is (nothing to differentiate)."""
    model = lora(tiny_vlm("qwen2_vl"), vision=vision)
    reference = copy.deepcopy(model)
    enable_checkpointing(model)
    assert_matches(model, reference, vlm_batch("qwen2_vl"))


def test_fused_kernels_inside_checkpointed_layers(monkeypatch):
    """fusetune.apply's Triton kernels (interpreted on CPU, compiled on CUDA: whichever the suite
    started with, since kernels are defined at import) inside checkpointed layers."""
    monkeypatch.setenv("TRITON_INTERPRET", SUITE_INTERPRET)
    device = "cpu" if SUITE_INTERPRET == "1" or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and SUITE_INTERPRET != "1":
        pytest.skip("the Triton kernels run on CUDA or under TRITON_INTERPRET=1")
    model = tiny_model("llama", attn="eager", num_hidden_layers=1).to(device)
    fusetune.apply(model)
    reference = copy.deepcopy(model)
    enable_checkpointing(model)
    assert_matches(model, reference, {k: v.to(device) for k, v in batch(length=8).items()})


def _interpreted_kernels(monkeypatch) -> str:
    """The device on which this suite's Triton kernels run (see the test above); skips without one."""
    monkeypatch.setenv("TRITON_INTERPRET", SUITE_INTERPRET)
    device = "cpu" if SUITE_INTERPRET == "1" or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and SUITE_INTERPRET != "1":
        pytest.skip("the Triton kernels run on CUDA or under TRITON_INTERPRET=1")
    return device


def _count_down_projections(monkeypatch, model: nn.Module) -> list[int]:
    """Counts the fused MLP's down-projection matmuls (``_project`` calls on a down_proj base weight)."""
    calls = [0]
    original = lora_ops._project
    downs = {id(m.base_layer.weight) for name, m in model.named_modules()
             if name.endswith("down_proj") and hasattr(m, "base_layer")}

    def counting(rows, group, given=None):
        calls[0] += any(id(p.weight) in downs for p in group.projections)
        return original(rows, group, given)

    monkeypatch.setattr(lora_ops, "_project", counting)
    return calls


@pytest.mark.parametrize(("arch", "skipped", "tile_rows"),
                         [("llama", True, None), ("llama", True, 5), ("gemma3_text", False, None)])
def test_recompute_skips_unread_mlp_outputs(monkeypatch, arch, skipped, tile_rows):
    """The recompute leaves the fused LoRA MLP's output uncomputed where nothing reads it (Llama:
    ``residual + mlp``), and computes it where something does (Gemma 3's norm after the MLP); the
    gradients equal the uncheckpointed model's either way, over two steps (the second uses the
    layer's cached verdict)."""
    device = _interpreted_kernels(monkeypatch)
    model = lora(tiny_model(arch, attn="eager", num_hidden_layers=2)).to(device)
    fusetune.apply(model, mlp_tile_rows=tile_rows)
    reference = copy.deepcopy(model)
    enable_checkpointing(model, offload=False)
    down_calls = _count_down_projections(monkeypatch, model)
    inputs = {k: v.to(device) for k, v in batch(length=7).items()}
    for _ in range(2):
        down_calls[0] = 0
        assert_matches(model, reference, inputs)
        layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        assert [m._gradient_checkpointing_func.skip_unread for m in layers] == [skipped] * len(layers)
        # The checkpointed forward runs down once per layer (once per row tile: 14 rows in tiles of
        # 5 make 3); the recompute runs it again only where outputs are read. (Backward's matmuls
        # with down's weight are not _project calls; the reference model's weights are not counted.)
        per_forward = len(layers) * (1 if tile_rows is None else 3)
        expected = per_forward * (1 if skipped else 2)
        assert down_calls[0] == expected


def test_a_refused_skip_frees_its_graph_before_the_full_recompute(monkeypatch):
    """Gemma 3 reads the MLP output, so its first recompute runs the layer twice. The first run's
    graph (its outputs, and the skipped MLP nodes that hold the saved activations) is gone before
    the second run starts, by reference counting alone (the garbage collector is off), so two
    graphs never hold a layer's activations at once."""
    from fusetune import checkpointing

    device = _interpreted_kernels(monkeypatch)
    model = lora(tiny_model("gemma3_text", attn="eager", num_hidden_layers=2)).to(device)
    fusetune.apply(model)
    enable_checkpointing(model, offload=False)
    first_runs: list[weakref.ref] = []
    full_runs = [0]
    values_unread, run = checkpointing._values_unread, checkpointing._Call.run

    def checked(outputs, skipped):
        first_runs.extend(weakref.ref(x) for x in [*outputs, *skipped])
        return values_unread(outputs, skipped)

    def counted(self, tensors):
        if torch.is_grad_enabled() and first_runs:  # a recompute after a check
            assert all(ref() is None for ref in first_runs), "the refused run's graph is still alive"
            full_runs[0] += 1
        return run(self, tensors)

    monkeypatch.setattr(checkpointing, "_values_unread", checked)
    monkeypatch.setattr(checkpointing._Call, "run", counted)
    gc.collect()
    gc.disable()
    try:
        step(model, {k: v.to(device) for k, v in batch(length=7).items()})
    finally:
        gc.enable()
    assert len(first_runs) == 4 and full_runs[0] == 3  # per layer 1 output + 1 skipped node; 3 runs follow


def test_values_unread_follows_every_path_to_the_skipped_node():
    """Only value-free nodes (add, casts, views) may lie between an output and a skipped node."""
    from fusetune.checkpointing import _values_unread

    x = torch.randn(3, 4, requires_grad=True)
    residual = torch.randn(3, 4, requires_grad=True)
    skipped = x * 2.0  # stands for the MLP output: its node is the "skipped" one
    through_add = (residual + skipped).view(12).float()
    assert _values_unread([through_add], [skipped.grad_fn])
    through_norm = residual + torch.nn.functional.layer_norm(skipped, (4,))
    assert not _values_unread([through_norm], [skipped.grad_fn])
    gated = residual + torch.tanh(residual) * skipped  # a gate reads the MLP output's values
    assert not _values_unread([gated], [skipped.grad_fn])
    assert not _values_unread([residual * 3], [skipped.grad_fn])  # the node is not reached at all


class _Block(GradientCheckpointingLayer):
    """A layer with a tuple output (tensor, None, tensor), an extra positional tensor and a keyword
    tensor that may need gradients."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, hidden, scale, *, context=None):
        out = torch.tanh(self.linear(hidden)) * scale + context.sum(0)
        return out, None, out.square().mean(-1)


class _Stack(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(_Block() for _ in range(3))

    def forward(self, hidden, scale, context):
        total = 0.0
        for block in self.blocks:
            hidden, nothing, aux = block(hidden, scale, context=context)
            assert nothing is None
            total = total + aux.sum()
        return hidden.square().sum() + total


def _stack_inputs(seed: int, frozen: bool = False) -> list[torch.Tensor]:
    """hidden, scale and context for ``_Stack`` (hidden needs no gradient when ``frozen``)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {(2, 5, 8): not frozen, (8,): True, (3, 8): True}
    return [torch.randn(shape, generator=generator, requires_grad=needs) for shape, needs in shapes.items()]


@pytest.mark.parametrize("frozen", [False, True])
def test_tuple_outputs_and_gradients_of_every_tensor_argument(frozen):
    """Gradients reach the parameters, the hidden input, a positional and a keyword tensor; with frozen
    parameters and inputs that need none, nothing is checkpointed yet the rest still trains."""
    model = _Stack().train()
    reference = copy.deepcopy(model)
    if frozen:
        for module in (model, reference):
            module.blocks[0].requires_grad_(False)
    enable_checkpointing(model)
    results = []
    for module in (model, reference):
        inputs = _stack_inputs(0, frozen)
        module(*inputs).backward()
        results.append([t.grad for t in inputs])
    for ours, theirs in zip(*results, strict=True):
        assert (ours is None) == (theirs is None)
        if ours is not None:
            assert_close(ours, theirs, "input gradient", RTOL)
    assert_same_gradients(model, reference)


@pytest.mark.parametrize("offload", [True, False])
def test_a_higher_order_gradient_through_the_checkpoint_names_the_fix(offload):
    """backward(create_graph=True) (a gradient penalty): fusetune's checkpoint builds no graph of its
    backward, so it refuses (before, the second-order gradients came out silently wrong)."""
    model = tiny_model("llama")
    enable_checkpointing(model, offload=offload)
    loss = model(**batch()).loss
    with pytest.raises(RuntimeError, match="create_graph=True.*disable_checkpointing"):
        torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], create_graph=True)


class _ReadsOutside(GradientCheckpointingLayer):
    """A layer reading a parameter it does not register (held in a list) and a tensor stashed on
    that holder by the model's forward."""

    def __init__(self, holder: nn.Module):
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.holder = [holder]

    def forward(self, hidden):
        holder = self.holder[0]
        return torch.tanh(self.linear(hidden)) * holder.scale + holder.stash


class _SharedScale(nn.Module):
    def __init__(self, stash: bool):
        super().__init__()
        torch.manual_seed(0)
        self.shared = nn.Module()
        self.shared.scale = nn.Parameter(torch.randn(8))
        self.gate = nn.Linear(8, 8).requires_grad_(stash)  # with stash: the stashed tensor needs a gradient
        self.layers = nn.ModuleList(_ReadsOutside(self.shared) for _ in range(2))

    def forward(self, hidden):
        self.shared.stash = self.gate(hidden).mean(1, keepdim=True)
        for layer in self.layers:
            hidden = layer(hidden)
        return hidden.square().sum()


@pytest.mark.parametrize("offload", [True, False])
@pytest.mark.parametrize("stash", [False, True])
def test_a_layer_reading_trainable_tensors_from_outside_is_refused(offload, stash):
    """A fusetune checkpoint returns gradients for a layer's arguments and parameters only; before,
    a parameter or tensor read from outside the layer silently got none. Now the first backward
    says so; a layer reading only frozen tensors from outside trains as before."""
    model = _SharedScale(stash)
    enable_checkpointing(model, offload=offload)
    hidden = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    with pytest.raises(RuntimeError, match="reads trainable tensors that are neither its arguments"):
        model(hidden).backward()
    frozen = _SharedScale(stash=False)
    frozen.shared.scale.requires_grad_(False)
    reference = copy.deepcopy(frozen)
    enable_checkpointing(frozen, offload=offload)
    frozen(hidden).backward()
    reference(hidden).backward()
    assert_same_gradients(frozen, reference)


class _TanhLayer(GradientCheckpointingLayer):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, hidden):
        return torch.tanh(self.linear(hidden))


def test_an_offloaded_input_modified_in_place_after_the_forward_is_refused():
    """As autograd refuses a saved tensor modified in place: the offloaded input's host copy may
    hold either value (the copy runs on a side stream on a GPU)."""
    torch.manual_seed(0)
    blocks = nn.ModuleList([_TanhLayer(), _TanhLayer()])
    enable_checkpointing(blocks, offload=True)
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    middle = blocks[0](hidden * 1.0)
    out = blocks[1](middle)
    middle.add_(1.0)  # the second block's (offloaded) input, changed after its forward
    with pytest.raises(RuntimeError, match="input was modified in place after the layer's forward"):
        out.sum().backward()
    unchanged = blocks[1](blocks[0](hidden * 1.0))
    unchanged.sum().backward()  # without the in-place change, the same layers train
    assert all(p.grad is not None for p in blocks.parameters())


def _distribute(model: nn.Module, how: str, mesh) -> nn.Module:
    """Wrap ``model`` for two CPU ranks: DDP (finding unused parameters or not) or FSDP2 per block."""
    if how.startswith("ddp"):
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, find_unused_parameters=how == "ddp_find_unused")
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


DISTRIBUTED = ("ddp", "ddp_find_unused", "fsdp2")


def _distributed_worker(rank: int, folder: str) -> None:
    """One of two ranks: for each wrapping, a checkpointed ``_Stack`` on this rank's batch; rank 0
    saves the full gradients."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from tests.distributed.processes import gloo_mesh

    mesh = gloo_mesh(rank, 2, folder)
    results = {}
    for how in DISTRIBUTED:
        model = _Stack().train()
        enable_checkpointing(model)
        wrapped = _distribute(model, how, mesh)  # kept alive through backward: DDP's reducer lives in it
        wrapped(*_stack_inputs(rank)).backward()
        results[how] = {name: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
                        for name, p in model.named_parameters()}
    if rank == 0:
        torch.save(results, f"{folder}/grads.pt")
    del model, wrapped, mesh
    gc.collect()  # the sharded modules and the mesh go before the process group they use
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_and_fsdp2_on_two_processes_match_one(tmp_path):
    """Two gloo ranks give the mean of the two batches' gradients of an uncheckpointed model, under
    DDP (with and without find_unused_parameters) and FSDP2. Under DDP each parameter's gradient must
    reach the reducer once: a checkpoint that accumulates inside its own backward fails here with
    find_unused_parameters ("marked as ready twice")."""
    torch.multiprocessing.start_processes(_distributed_worker, args=(str(tmp_path),), nprocs=2,
                                          start_method="spawn")  # fork can deadlock on threads
    reference = _Stack().train()
    for rank in range(2):
        reference(*_stack_inputs(rank)).backward()
    results = torch.load(tmp_path / "grads.pt")
    assert results.keys() == set(DISTRIBUTED)
    for how, grads in results.items():
        assert grads.keys() == {name for name, _ in reference.named_parameters()}
        for name, p in reference.named_parameters():
            assert_close(grads[name], p.grad / 2, f"{how} grad of {name}", RTOL)


def _record_layer_inputs(model: nn.Module) -> list:
    """Forward pre-hooks that keep a weakref and a copy of every layer's hidden-state input."""
    seen = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        seen.append((weakref.ref(hidden), hidden.detach().clone(), hidden.requires_grad))

    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


@pytest.mark.parametrize("offload", [True, False])
def test_offload_keeps_no_layer_input_on_the_compute_device(offload):
    model = lora(tiny_vlm("qwen2_vl"), vision=True)
    enable_checkpointing(model, offload=offload, keep_attention=False)  # inputs only (see kept attention)
    seen = _record_layer_inputs(model)
    loss = model(**vlm_batch("qwen2_vl")).loss
    gc.collect()
    alive = [ref() is not None for ref, _, _ in seen]
    assert len(seen) == 2
    assert not seen[0][2]  # the frozen patch embedding: the first vision block's input needs no grad
    layer = next(m for m in model.modules() if isinstance(m, GradientCheckpointingLayer))
    store = layer._gradient_checkpointing_func.store
    if offload:
        assert not any(alive)
        # The store holds copies of them, newest first along the prefetch chain.
        entry, held = store._last(), []
        while entry is not None:
            held += entry.hosts
            entry = entry.previous() if entry.previous is not None else None
        assert all(torch.equal(h, c) for h, (_, c, _) in zip(held, reversed(seen), strict=True))
        pool = store.pool(torch.device("cpu"))
        assert pool.in_use == sum(c.numel() * c.element_size() for _, c, _ in seen)
    else:
        assert all(alive) and store is None
    loss.backward()
    if offload:
        assert pool.in_use == 0 and len(pool.free) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: side streams and pinned memory")
def test_cuda_offload_matches_and_keeps_layer_inputs_off_the_device():
    """On CUDA (pinned host buffers, copies on a side stream, prefetch in backward): the gradients of
    the uncheckpointed model, and after forward the layers' inputs' bytes (up to allocator rounding)
    fewer allocated on the device than with plain recompute."""
    layers, inputs = 4, {k: v.cuda() for k, v in batch(size=2, length=64).items()}
    model = lora(tiny_model("llama", attn="eager", hidden_size=256, num_hidden_layers=layers,
                            max_position_embeddings=128)).cuda()
    reference = copy.deepcopy(model)
    allocated = {}
    for offload in (False, True):
        enable_checkpointing(model, offload=offload)
        step(model, inputs)  # first-use allocations (cuBLAS workspaces) out of the measurement
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        loss = model(**inputs).loss
        allocated[offload] = torch.cuda.memory_allocated() - before
        loss.backward()
        model.zero_grad(set_to_none=True)
    inputs_bytes = layers * 2 * 64 * 256 * 4
    assert inputs_bytes <= allocated[False] - allocated[True] <= inputs_bytes + 4096  # allocator blocks
    assert_matches(model, reference, inputs)


def test_host_buffers_are_reused_across_steps():
    model = lora(tiny_model("llama"))
    enable_checkpointing(model)
    pool = model.base_model.model.model.layers[0]._gradient_checkpointing_func.store.pool(
        torch.device("cpu"))
    inputs = batch()
    step(model, inputs)
    first = sorted(b.data_ptr() for b in pool.free)
    step(model, inputs)
    # Each of the two layers' input and kept attention output.
    assert sorted(b.data_ptr() for b in pool.free) == first and len(first) == 4


def test_pool_never_holds_more_than_the_most_ever_in_use():
    pool = _HostPool(pinned=False)
    for size in (100, 300, 50, 1000, 200):
        taken = [pool.take(size) for _ in range(3)]
        assert all(b.numel() >= size for b in taken)
        for buffer in taken:
            pool.give(buffer)
        assert pool.in_use == 0 and sum(b.numel() for b in pool.free) <= pool.high_water
    # The smaller sizes reused the larger buffers; the three 1000-byte ones are all that is kept.
    assert pool.high_water == 3000 and sorted(b.numel() for b in pool.free) == [1000] * 3


def test_disable_restores_plain_behaviour_and_eval_is_unaffected():
    model = lora(tiny_model("llama"))
    reference = copy.deepcopy(model)
    before = model.base_model.model.model.layers[0].__dict__.copy()
    enable_checkpointing(model)
    assert enable_checkpointing(model) == 2  # idempotent
    layer = model.base_model.model.model.layers[0]
    installed = layer._gradient_checkpointing_func
    enable_checkpointing(model)
    assert layer._gradient_checkpointing_func is installed
    enable_checkpointing(model, offload=False)
    assert layer._gradient_checkpointing_func.store is None

    inputs = batch()
    model.eval()
    reference.eval()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference(**inputs).logits)
    model.train()
    with torch.no_grad():  # training mode without gradients: no checkpoint, nothing stored
        assert torch.equal(model(**inputs).loss, reference.train()(**inputs).loss)

    disable_checkpointing(model)
    assert not checkpointing_on(model)
    assert layer.__dict__.keys() == before.keys()
    assert_matches(model, reference, inputs)


def test_disable_gives_back_transformers_checkpointing():
    model = tiny_model("llama")
    model.gradient_checkpointing_enable()
    theirs = model.model.layers[0]._gradient_checkpointing_func
    enable_checkpointing(model)
    disable_checkpointing(model)
    assert model.model.layers[0]._gradient_checkpointing_func is theirs and checkpointing_on(model)


def _copy(model: nn.Module, how: str) -> nn.Module:
    """``model`` deep-copied, or pickled whole and loaded back (``torch.save(model)``)."""
    if how == "deepcopy":
        return copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("offload", [True, False], ids=["offload", "plain"])
@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_a_copy_checkpoints_its_own_layers(monkeypatch, how, offload):
    """A deep copy, or a model saved whole with ``torch.save`` and loaded back, of a checkpointed model
    that has trained a step checkpoints its own layers (each layer runs again in backward, and keeps
    its input and attention output on the host with a store of its own when offloading) and trains
    its own parameters, also once the original is gone; ``disable_checkpointing`` makes it plain."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = lora(tiny_model("llama"))
    reference = copy.deepcopy(model)
    before = set(model.base_model.model.model.layers[0].__dict__)
    enable_checkpointing(model, offload=offload)
    inputs = batch()
    step(model, inputs)  # the offload store now holds host buffers and a weak reference to an entry
    store = model.base_model.model.model.layers[0]._gradient_checkpointing_func.store
    # As in a process that never enabled checkpointing: the copy installs kept attention itself.
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "sdpa", ALL_ATTENTION_FUNCTIONS["sdpa"].__wrapped__)
    copied = _copy(model, how)
    del model
    gc.collect()
    layers = copied.base_model.model.model.layers
    checkpoints = [layer._gradient_checkpointing_func for layer in layers]
    assert all(c._layer() is layer for c, layer in zip(checkpoints, layers, strict=True))
    assert len({id(c.store) for c in checkpoints}) == 1
    assert getattr(ALL_ATTENTION_FUNCTIONS["sdpa"], "fusetune_keeps", False) == offload
    runs = []
    for layer in layers:
        layer.input_layernorm.register_forward_hook(lambda *_: runs.append(None))
    for _ in range(2):
        assert_matches(copied, reference, inputs)
    assert len(runs) == 2 * 2 * len(layers)  # forward and recompute, each step
    if offload:
        assert checkpoints[0].store is not store
        # Each layer's input and attention output, in the copy's own pool.
        assert len(checkpoints[0].store.pool(torch.device("cpu")).free) == 2 * len(layers)

    disable_checkpointing(copied)
    assert not checkpointing_on(copied) and set(layers[0].__dict__) == before
    runs.clear()
    assert_matches(copied, reference, inputs)
    assert len(runs) == len(layers)


def test_compiled_checkpointed_model_matches_eager_over_steps():
    """torch.compile around a model checkpointed with the defaults (offload, attention outputs
    kept): every step's loss and gradients are the uncompiled, uncheckpointed model's."""
    model = lora(tiny_model("llama"))
    reference = copy.deepcopy(model)
    enable_checkpointing(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    inputs = batch()
    for _ in range(3):
        assert_close(step(compiled, inputs), step(reference, inputs), "loss", RTOL)
        assert_same_gradients(model, reference)


def test_bad_input_names_the_fix():
    with pytest.raises(ValueError, match="GradientCheckpointingLayer"):
        enable_checkpointing(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="nn.Module"):
        enable_checkpointing("model")


def test_a_second_backward_through_offloaded_layers_names_the_fix():
    """retain_graph=True and a second backward: plain recompute allows it (and gives the same
    gradients twice), offloading says what to use instead; the next step is unaffected."""
    model = lora(tiny_model("llama"))
    inputs = batch()
    enable_checkpointing(model, offload=False)
    loss = model(**inputs).loss
    loss.backward(retain_graph=True)
    first = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    loss.backward()
    assert all(torch.allclose(p.grad, 2 * g) for p, g in
               zip([p for p in model.parameters() if p.requires_grad], first, strict=True))
    enable_checkpointing(model, offload=True)
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="offload=False"):
        loss.backward()
    step(model, inputs)
