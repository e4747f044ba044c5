"""A checkpointed layer's attention, kept from forward to backward instead of recomputed.

A checkpointed layer runs twice: without a graph in forward, and again with one when backward reaches
it. Run again, the attention block (the q, k, v and o projections with their adapters, RoPE and the
attention kernel) costs the GPU what it cost the first time, and the host about half the layer's
Python. With offloading on, ``fusetune.checkpointing`` keeps the attention's own graph instead:

- In the checkpointed forward the layer's ``self_attn`` runs with gradients on. Each tensor autograd
  saves for its backward goes to pinned host memory as it is saved (``saved_tensors_hooks``), once per
  storage, and so does the module's output; the graph itself (a few nodes and host handles) stays.
- In the recompute the module is not run: ``_Reattach``, a node that yields the kept output's values,
  stands in for it. Its backward runs the kept graph (``torch.autograd.grad``) with the upstream
  gradients, and hands back the gradients of the attention's input and trainable parameters, so the
  parameters' gradients still flow through the checkpoint's own node and are accumulated once.
- The host copies are fetched back when the layer's backward starts, so they overlap the recompute
  and backward of the layer's MLP.

It is exact: the kept graph is the graph the recompute would have built, on the same values. The one
saved tensor that IS the attention's input (the normed hidden states the projections save) is not
copied at all: the recompute makes it again, bitwise the same, and backward reads that one. Dropout
inside the attention keeps its forward masks (they are in the kept graph), and the RNG state after the
attention is put back in the recompute, so anything drawing random numbers later in the layer draws
what it drew in forward.

The attention is recomputed as before where keeping does not apply: another tensor argument needs
gradients (cross-attention to trainable states), its parameters are sharded (FSDP2's DTensors,
DeepSpeed ZeRO-3), gradients are off, or the recompute calls it on an input of another layout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.checkpoint import get_device_states, set_device_states

from fusetune.host_offload import Offloaded, OffloadStore

try:  # FSDP2's sharded parameters
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor = ()

__all__ = ["KeptAttention", "attention_of", "keeping", "reattaching"]

# Saved tensors whose storage is smaller than this stay on the device: a copy costs more host time
# than the bytes are worth (a log-sum-exp, an adapter's (tokens x rank) product).
KEEP_ON_DEVICE_BYTES = 1 << 20

# A saved view of a storage this many times its own size is copied alone, not with its storage.
_WHOLE_STORAGE_AT_MOST = 2

_INPUT, _STORAGE, _TENSOR = "input", "storage", "tensor"


def attention_of(layer: nn.Module) -> nn.Module | None:
    """The self-attention module of a transformers decoder layer (``self_attn``), or None."""
    module = getattr(layer, "self_attn", None)
    return module if isinstance(module, nn.Module) else None


def _sharded(param: torch.Tensor) -> bool:
    return isinstance(param, DTensor) or hasattr(param, "ds_id")  # FSDP2 / DeepSpeed ZeRO-3


def _hidden_states(args: tuple, kwargs: dict) -> torch.Tensor | None:
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    return hidden if isinstance(hidden, torch.Tensor) and hidden.is_floating_point() else None


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": hidden}
    return (hidden, *args[1:]), kwargs


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def _storage_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A uint8 tensor over the whole storage of ``tensor``."""
    return torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(tensor.untyped_storage())


class _Box:
    """Gradients handed between the kept graph's two ends."""

    __slots__ = ("input_grad", "output_grads")

    def __init__(self):
        self.input_grad: torch.Tensor | None = None
        self.output_grads: tuple = ()


class _Entry(torch.autograd.Function):
    """The kept graph's input: the hidden states' values, hanging from a one-element leaf.

    ``autograd.grad`` needs a tensor to differentiate for; taking the leaf instead of the hidden
    states means the kept graph holds no reference to them. The input's gradient is left in the box.
    """

    @staticmethod
    def forward(ctx, box: _Box, anchor: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        ctx.box = box
        return hidden.detach()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.box.input_grad = grad
        return None, None, None


class _Root(torch.autograd.Function):
    """The kept graph's output: one scalar standing for the module's outputs, which are then dropped
    (their values are on the host). Its backward yields the gradients left in the box."""

    @staticmethod
    def forward(ctx, box: _Box, *outputs: torch.Tensor) -> torch.Tensor:
        ctx.box = box
        ctx.metas = [(o.shape, o.dtype) for o in outputs]
        return outputs[0].new_zeros(())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grads = [g if g is not None else torch.zeros(shape, dtype=dtype, device=grad.device)
                 for g, (shape, dtype) in zip(ctx.box.output_grads, ctx.metas, strict=True)]
        return None, *grads


class _Reattach(torch.autograd.Function):
    """Stands in for the attention in the recompute: its outputs are the kept outputs' values, its
    backward runs the kept graph."""

    @staticmethod
    def forward(ctx, kept: KeptAttention, hidden: torch.Tensor, *params: torch.Tensor):
        ctx.kept = kept
        ctx.save_for_backward(hidden)
        outputs = kept.output_values()
        ctx.mark_non_differentiable(*(o for o, diff in zip(outputs, kept.differentiable, strict=True)
                                      if not diff))
        return tuple(outputs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        (hidden,) = ctx.saved_tensors
        grads = [g for g, diff in zip(grads, ctx.kept.differentiable, strict=True) if diff]
        input_grad, param_grads = ctx.kept.backward(hidden, grads)
        return None, input_grad if ctx.needs_input_grad[1] else None, *param_grads


class KeptAttention:
    """One attention call's graph, kept from the checkpointed forward to backward, its saved tensors
    and outputs on the host (see the module docstring)."""

    def __init__(self, store: OffloadStore, module: nn.Module, params: list[torch.Tensor]):
        self.store = store
        self.module = module
        self.params = params
        self.box = _Box()
        self.anchor: torch.Tensor | None = None
        self.root: torch.Tensor | None = None
        self.input_layout: tuple | None = None  # (size, stride, storage offset, dtype) of the input
        self.input_key: int | None = None
        self.recompute_input: torch.Tensor | None = None
        self.resident: set[int] = set()  # storages alive anyway: parameters, the other arguments
        self.entries: dict[object, Offloaded] = {}  # storage key (or a packed tensor's id) -> host copy
        self.on_device: dict[object, torch.Tensor] = {}  # restored storages the graph reads
        self.graph_keys: set[object] = set()
        self.held: list[torch.Tensor] = []  # the packed tensors, while forward runs
        self.output_packs: list = []
        self.out_spec = None
        self.out_leaves: list = []  # the output's leaves, tensors replaced by None
        self.out_slots: list[int] = []
        self.differentiable: list[bool] = []
        self.rng_after: tuple | None = None

    # ---- forward --------------------------------------------------------------------------------
    def run(self, forward: Callable, args: tuple, kwargs: dict, hidden: torch.Tensor):
        """Call ``forward`` with gradients on and the saved tensors going to the host; returns the
        module's output structure, detached."""
        self.input_layout = (hidden.size(), hidden.stride(), hidden.storage_offset(), hidden.dtype)
        self.input_key = _storage_key(hidden)
        others = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        alive = [*others, *self.module.parameters(), *self.module.buffers()]
        self.resident = {_storage_key(t) for t in alive}
        self.anchor = torch.zeros(1, device=hidden.device, requires_grad=True)
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            entry = _Entry.apply(self.box, self.anchor, hidden)
            args, kwargs = _with_hidden(args, kwargs, entry)
            out = forward(*args, **kwargs)
        leaves, self.out_spec = tree_flatten(out)
        self.out_slots = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        self.out_leaves = [None if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        tensors = [leaves[i] for i in self.out_slots]
        self.differentiable = [t.requires_grad for t in tensors]
        diff = [t for t in tensors if t.requires_grad]
        if diff:
            with torch.enable_grad():
                self.root = _Root.apply(self.box, *diff)
        self.output_packs = [self._pack(t, graph=False) for t in tensors]
        self.held.clear()
        self.rng_after = (torch.get_rng_state(), *get_device_states(hidden))
        return self._structure([t.detach() for t in tensors])

    def _structure(self, tensors: list[torch.Tensor]):
        leaves = list(self.out_leaves)
        for slot, tensor in zip(self.out_slots, tensors, strict=True):
            leaves[slot] = tensor
        return tree_unflatten(leaves, self.out_spec)

    def _pack(self, tensor: torch.Tensor, graph: bool = True):
        key = _storage_key(tensor)
        layout = (tensor.size(), tensor.stride(), tensor.storage_offset(), tensor.dtype)
        if key == self.input_key and tensor.dtype == self.input_layout[3]:
            return _INPUT, layout
        storage_nbytes = tensor.untyped_storage().nbytes()
        if key in self.resident or storage_nbytes < KEEP_ON_DEVICE_BYTES or not storage_nbytes:
            return tensor
        self.held.append(tensor)  # no other tensor takes its address (our key) until run ends
        if storage_nbytes > _WHOLE_STORAGE_AT_MOST * tensor.numel() * tensor.element_size():
            key = ("tensor", len(self.entries))
            self.entries[key] = self.store.save(tensor, chain=False)
            packed = _TENSOR, key
        else:
            if key not in self.entries:
                self.entries[key] = self.store.save(_storage_bytes(tensor), chain=False)
            packed = _STORAGE, key, layout
        if graph:
            self.graph_keys.add(packed[1])
        return packed

    # ---- backward -------------------------------------------------------------------------------
    def prefetch(self) -> None:
        """Start copying every saved tensor and output back (the layer's backward has started)."""
        for entry in self.entries.values():
            self.store.prefetch(entry)

    def _unpack(self, packed) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        if packed[0] == _INPUT:
            size, stride, offset, _ = packed[1]
            base = self.recompute_input
            return base.as_strided(size, stride, base.storage_offset() + offset - self.input_layout[2])
        stored = self._device(packed[1])
        if packed[0] == _TENSOR:
            return stored
        size, stride, offset, dtype = packed[2]
        return torch.empty(0, dtype=dtype, device=stored.device).set_(stored.untyped_storage(), offset, size,
                                                                       stride)

    def _device(self, key) -> torch.Tensor:
        """A host copy back on the device; kept there while the graph may read it again."""
        if key in self.on_device:
            return self.on_device[key]
        restored = self.store.restore(self.entries[key], release=False)
        if key in self.graph_keys:
            self.on_device[key] = restored
        return restored

    def matches(self, hidden: torch.Tensor) -> bool:
        """Whether the recompute's attention input has the forward's layout (its values are the same)."""
        size, stride, _, dtype = self.input_layout
        return hidden.size() == size and hidden.stride() == stride and hidden.dtype == dtype

    def output_values(self) -> list[torch.Tensor]:
        return [self._unpack(packed) for packed in self.output_packs]

    def reattach(self, hidden: torch.Tensor):
        """The module's output in the recompute: the kept values, differentiable through the kept graph."""
        outputs = _Reattach.apply(self, hidden, *self.params)
        cpu_state, devices, states = self.rng_after
        torch.set_rng_state(cpu_state)
        if devices:
            set_device_states(devices, states, device_type=hidden.device.type)
        return self._structure(list(outputs))

    def backward(self, hidden: torch.Tensor, grads: list[torch.Tensor | None]):
        """Run the kept graph: the gradients of the attention's input and of ``params``."""
        if self.root is None:
            raise RuntimeError(
                "fusetune: a kept attention graph was already run backward (or had no differentiable "
                "output); a second backward through a checkpointed layer needs "
                "enable_checkpointing(model, keep_attention=False)."
            )
        self.recompute_input = hidden
        self.box.output_grads = tuple(grads)
        try:
            found = torch.autograd.grad(self.root, [self.anchor, *self.params], torch.ones_like(self.root),
                                        allow_unused=True)
            return self.box.input_grad, list(found[1:])
        finally:
            self.release()

    def release(self) -> None:
        """Drop the graph, the restored tensors and the host copies (their buffers go back to the pool)."""
        self.root = self.anchor = self.recompute_input = None
        self.box = _Box()
        self.on_device.clear()
        for entry in self.entries.values():
            entry.release()
        self.entries.clear()


@contextlib.contextmanager
def _forward_replaced(module: nn.Module, make: Callable[[Callable], Callable]) -> Iterator[None]:
    """Within the block ``module.forward`` is ``make(the forward it had)``, as an instance attribute."""
    had = "forward" in module.__dict__
    previous = module.__dict__.get("forward")
    module.forward = make(module.forward)
    try:
        yield
    finally:
        if had:
            module.forward = previous
        else:
            del module.forward


def keeping(module: nn.Module | None, store: OffloadStore, kept: list[KeptAttention]):
    """Context for a checkpointed forward: each call of ``module`` that can be kept is run by a
    :class:`KeptAttention`, appended to ``kept``."""
    if module is None:
        return contextlib.nullcontext()

    def make(forward: Callable) -> Callable:
        def keeping_forward(*args, **kwargs):
            hidden = _hidden_states(args, kwargs)
            params = [p for p in module.parameters() if p.requires_grad]
            others = [t for t in tree_flatten((args, kwargs))[0]
                      if isinstance(t, torch.Tensor) and t is not hidden and t.requires_grad]
            if hidden is None or others or any(_sharded(p) for p in params) or torch.is_grad_enabled():
                return forward(*args, **kwargs)
            attention = KeptAttention(store, module, params)
            kept.append(attention)
            return attention.run(forward, args, kwargs, hidden)

        return keeping_forward

    return _forward_replaced(module, make)


def reattaching(module: nn.Module | None, kept: list[KeptAttention]):
    """Context for a recompute: the calls of ``module`` take the kept graphs, in forward's order; a
    call without one (or on an input of another layout) runs the module."""
    if module is None or not kept:
        return contextlib.nullcontext()
    waiting = iter(kept)

    def make(forward: Callable) -> Callable:
        def reattaching_forward(*args, **kwargs):
            attention = next(waiting, None)
            hidden = _hidden_states(args, kwargs)
            if attention is None or hidden is None or not attention.matches(hidden):
                return forward(*args, **kwargs)
            return attention.reattach(hidden)

        return reattaching_forward

    return _forward_replaced(module, make)
