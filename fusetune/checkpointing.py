"""Activation checkpointing for transformers' decoder layers, optionally offloading each layer's input to
host memory.

``enable_checkpointing(model)`` installs fusetune's checkpoint function on every
``GradientCheckpointingLayer`` instance (the decoder layers of the language model and of the vision
towers): a layer runs without building a graph in forward, keeps only its input, and is recomputed with
gradients in backward. With ``offload=True`` that input (the ``batch x tokens x hidden`` tensor that
dominates memory at long sequences) lives in pinned host memory instead of on the GPU: it is copied out
on a side CUDA stream after an event on the compute stream, and in backward, when a layer's backward
starts, the input of the layer before it is already being copied back on that side stream, so the
copies overlap the recompute. Host buffers are pooled across steps because pinning memory is slow. On a
CPU the same path runs with plain copies and no streams.

How it sits with the rest of the stack:

- transformers calls ``layer._gradient_checkpointing_func(partial(forward or __call__, **kwargs), *args)``
  when the layer is in training mode; only these per-instance attributes and ``gradient_checkpointing``
  are set, so ``model.is_gradient_checkpointing`` reports it, another instance of the class is untouched
  and ``disable_checkpointing`` restores plain behaviour. Do not also turn on transformers'
  checkpointing (``TrainingArguments(gradient_checkpointing=True)``, ``gradient_checkpointing_enable``,
  PEFT's ``prepare_model_for_kbit_training(use_gradient_checkpointing=True)``): it replaces this
  function with torch's; call ``enable_checkpointing`` after those.
- The layer's trainable parameters are inputs of the checkpoint's autograd node and their gradients
  flow back through the outer graph (the recompute uses ``torch.autograd.grad``), so each parameter's
  gradient is accumulated exactly once, by the ordinary backward: DDP works with
  ``find_unused_parameters`` True or False and without ``static_graph`` (a reentrant checkpoint that
  accumulates inside its own backward is what makes DDP report a parameter "marked ready twice").
- FSDP2 (``fully_shard`` per decoder layer): when the layer's parameters are still sharded DTensors at
  the call (transformers versions that checkpoint ``__call__``, so FSDP's hooks run inside), gradients
  are instead accumulated by the recompute's own backward into the unsharded parameters FSDP gathered,
  as torch's reentrant checkpoint does, and FSDP reduces them in its post-backward hook. So it is
  under DeepSpeed ZeRO-3, whose partitioned parameters are empty placeholders at the call.
- The recompute skips what backward never reads: the fused LoRA MLP's down projection (the layer's
  output is only differentiated, its values are thrown away; see ``fusetune.ops.lora.outputs_unread``).
  The first recompute of each layer checks on the autograd graph that nothing between the MLP and the
  layer's output reads values (Llama-style ``residual + mlp(x)``); where something does (Gemma's norm
  after the MLP, mllama's gated cross-attention MLP), that layer is recomputed in full from then on.
- With offloading, each layer's causal SDPA attention output goes to the host beside its input and
  the recompute runs no attention forward (``fusetune.kept_attention``; ``keep_attention=False``
  turns it off), and in a step captured as a CUDA graph (its warm-up included) or a layer call of
  8,192 tokens or more so do the fused LoRA projections' outputs (q, k, v and o), whose matmuls the
  recompute then skips (``keep_projections``). See ``fusetune.kept``.
- Inputs other than the hidden states that need gradients (mllama's ``cross_attention_states``) get
  them, positional or keyword; a frozen input (frozen embeddings with LoRA) still yields an output that
  requires grad when the layer has trainable parameters. Dropout RNG (CPU and device) and autocast are
  replayed for the recompute, as ``torch.utils.checkpoint`` does.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.checkpoint import get_device_states, set_device_states

from fusetune import kept_attention
from fusetune.kept import keeping, reusing
from fusetune.ops._launch import capturing
from fusetune.ops.lora import KEPT_PROJECTIONS, outputs_unread

try:  # FSDP2's sharded parameters
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor = ()

__all__ = ["disable_checkpointing", "enable_checkpointing", "private_offload_store"]


class _HostPool:
    """Reusable host byte buffers for one device (pinned for CUDA), handed out best-fit.

    When no free buffer fits, free buffers are dropped (smallest first) until the pool holds no more
    than the most bytes ever in use at once, so varying sequence lengths cannot grow it without bound.
    """

    def __init__(self, pinned: bool):
        self.pinned = pinned
        self.free: list[torch.Tensor] = []
        self.in_use = 0
        self.high_water = 0

    def take(self, nbytes: int) -> torch.Tensor:
        fitting = [i for i, buffer in enumerate(self.free) if buffer.numel() >= nbytes]
        if fitting:
            buffer = self.free.pop(min(fitting, key=lambda i: self.free[i].numel()))
        else:
            self.high_water = max(self.high_water, self.in_use + nbytes)
            self.free.sort(key=torch.Tensor.numel)
            while self.free and self.in_use + nbytes + sum(b.numel() for b in self.free) > self.high_water:
                self.free.pop(0)
            buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned)
        self.in_use += buffer.numel()
        return buffer

    def give(self, buffer: torch.Tensor) -> None:
        self.in_use -= buffer.numel()
        self.free.append(buffer)

    def give_all(self, buffers: list[torch.Tensor]) -> None:
        for buffer in buffers:
            self.give(buffer)


class _Offloaded:
    """One layer's tensors held on the host: its input, then whatever its forward kept
    (``fusetune.kept_attention``); linked to the entry saved before it (prefetched after it)."""

    __slots__ = ("__weakref__", "buffers", "device", "hosts", "previous", "release", "restored")

    def __init__(self, device: torch.device, previous):
        self.device = device
        self.hosts: list[torch.Tensor] | None = []
        self.buffers: list[torch.Tensor] = []  # the pool's; given back after restore, or when garbage
        self.release: Callable[[], None] | None = None
        self.previous = previous  # weakref to the entry saved just before, or None
        self.restored: tuple[list[torch.Tensor], torch.cuda.Event | None] | None = None


class _OffloadStore:
    """Moves layer inputs to host buffers and back, on one side stream per CUDA device.

    ``for_capture``: the store of a step captured as a CUDA graph (:func:`private_offload_store`),
    whose layers keep their projections by default (``enable_checkpointing``'s ``keep_projections``).
    """

    def __init__(self, for_capture: bool = False):
        self.for_capture = for_capture
        self._pools: dict[torch.device, _HostPool] = {}
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._last: weakref.ref | None = None
        self._held: list[tuple[torch.Tensor, torch.cuda.Event]] = []  # see _free_after_copy

    def __reduce__(self):
        """A pickled or deep-copied store is a new, empty one: a store holds only one step's transient
        state (host buffers, CUDA streams, weak references to its entries), none of which a copy can
        use. The layers sharing a store share its copy (pickle and deepcopy copy an object once)."""
        return _OffloadStore, (self.for_capture,)

    def pool(self, device: torch.device) -> _HostPool:
        if device not in self._pools:
            self._pools[device] = _HostPool(pinned=device.type == "cuda")
        return self._pools[device]

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def save(self, tensor: torch.Tensor) -> _Offloaded:
        """Start copying ``tensor`` to a host buffer; the caller may drop ``tensor`` right away."""
        pool = self.pool(tensor.device)
        entry = _Offloaded(tensor.device, self._last)
        entry.release = weakref.finalize(entry, pool.give_all, entry.buffers)
        self._join_held()  # the layer before's copies: long done by now
        self.add(entry, tensor)
        self._last = weakref.ref(entry)
        return entry

    @torch.compiler.disable(reason="fusetune's offload copies into pooled host buffers as eager code")
    def add(self, entry: _Offloaded, tensor: torch.Tensor) -> None:
        """Copy one more tensor of ``entry``'s layer to the host; :meth:`restore` returns it too.

        Eager even inside compiled code (a kept attention output is offered from within the
        attention's compiled graph): traced, the byte buffer's ``view(dtype)`` came back with the
        wrong shape at the second step."""
        nbytes = tensor.numel() * tensor.element_size()
        buffer = self.pool(tensor.device).take(nbytes)
        entry.buffers.append(buffer)
        host = buffer[:nbytes].view(tensor.dtype).view(tensor.shape)
        if tensor.is_cuda:
            stream = self._stream(tensor.device)
            stream.wait_stream(torch.cuda.current_stream(tensor.device))
            with torch.cuda.stream(stream):
                host.copy_(tensor, non_blocking=True)
            self._free_after_copy(tensor, stream)
        else:
            host.copy_(tensor)
        entry.hosts.append(host)

    def _free_after_copy(self, tensor: torch.Tensor, stream: torch.cuda.Stream) -> None:
        """Let ``tensor``'s memory be reused only after ``stream``'s copy of it has run.

        Eagerly the allocator is told so (``record_stream``). While a CUDA graph is captured the
        allocator would then keep the block from any reuse until the capture ends, so every layer's
        input would stay in the graph's memory (3.55 GiB above the weights at L8 4k, 12 GiB at 16k,
        measured). There the store holds the tensor instead, until the next layer's save (or a
        restore) makes the compute stream wait for the copy (a layer later: long done) and lets it
        go. Only those wait: were each :meth:`add` to wait too, a layer's compute would stall on its
        own copies still in flight (its attention output's, when it offers its o projection's
        output a few hundred microseconds later), and keeping more than the input would cost more
        time than it saves (L8 4k captured: 11,680 tokens/s keeping q, k, v and o with a wait at
        every add, 12,781 with this, 12,186 recomputing them; bench/RESULTS.md).
        """
        if capturing():
            self._held.append((tensor, stream.record_event()))
        else:
            tensor.record_stream(stream)

    def _join_held(self) -> None:
        for tensor, copied in self._held:
            torch.cuda.current_stream(tensor.device).wait_event(copied)
        self._held.clear()

    def _fetch(self, entry: _Offloaded) -> None:
        """Start copying ``entry``'s tensors back to its device (on the side stream for CUDA)."""
        outs = [torch.empty(host.shape, dtype=host.dtype, device=entry.device) for host in entry.hosts]
        event = None
        if entry.device.type == "cuda":
            stream = self._stream(entry.device)
            stream.wait_stream(torch.cuda.current_stream(entry.device))  # ``outs``' memory is free
            with torch.cuda.stream(stream):
                for out, host in zip(outs, entry.hosts, strict=True):
                    out.copy_(host, non_blocking=True)
            event = stream.record_event()
            if not capturing():  # captured: restore's wait orders every use and the free after the copy
                for out in outs:
                    out.record_stream(stream)
        else:
            for out, host in zip(outs, entry.hosts, strict=True):
                out.copy_(host)
        entry.restored = (outs, event)

    def restore(self, entry: _Offloaded) -> list[torch.Tensor]:
        """The saved tensors back on their device, in the order saved, ready on the current stream;
        prefetches the previous entry's."""
        self._join_held()
        if entry.restored is None:
            self._fetch(entry)
        outs, event = entry.restored
        entry.restored, entry.hosts = None, None
        if event is not None:
            torch.cuda.current_stream(entry.device).wait_event(event)
        # Their next user is a device-to-host copy queued after these on the same side stream.
        entry.release()
        previous = entry.previous() if entry.previous is not None else None
        if previous is not None and previous.hosts is not None and previous.restored is None:
            self._fetch(previous)
        return outs


# Autograd nodes whose backward reads no input values: a skipped output may flow through them.
_VALUE_FREE_NODES = frozenset({"AddBackward0", "ToCopyBackward0", "ViewBackward0", "UnsafeViewBackward0",
                               "ReshapeAliasBackward0"})


def _values_unread(outputs, skipped: list) -> bool:
    """Whether every autograd path from ``outputs`` to a ``skipped`` node runs only through nodes in
    ``_VALUE_FREE_NODES``, so that no backward reads a value computed from a skipped output.

    The walk is an explicit stack, not a recursive closure: a closure that calls itself is a
    reference cycle, and the nodes it had seen (the whole graph, saved activations included) would
    then live until the garbage collector ran instead of being freed with the graph.
    """
    targets = set(skipped)
    reaches: dict = {}  # node -> whether a skipped node lies below it (skipped nodes themselves excluded)

    def below(node) -> bool:
        return node in targets or reaches.get(node, False)

    for out in outputs:
        stack = [out.grad_fn]
        while stack:
            node = stack[-1]
            if node is None or node in targets or node in reaches:
                stack.pop()
                continue
            children = [child for child, _ in node.next_functions if child is not None]
            pending = [child for child in children if child not in targets and child not in reaches]
            if pending:  # a graph has no cycles, so this ends; a shared child is resolved once
                stack.extend(pending)
                continue
            reaches[node] = any(below(child) for child in children)
            stack.pop()
    found = [out.grad_fn is not None and below(out.grad_fn) for out in outputs]
    return any(found) and all(type(node).__name__ in _VALUE_FREE_NODES
                              for node, reached in reaches.items() if reached)


# Eager layer calls of at least this many tokens keep their projections by default (enable_checkpointing).
KEEP_PROJECTIONS_FROM = 8192


def _tokens(hidden: torch.Tensor) -> int:
    """Token positions in a layer's hidden states (every dimension but the last)."""
    return hidden.numel() // hidden.shape[-1] if hidden.dim() and hidden.shape[-1] else 0


def _autocast_modes(device_type: str) -> list[tuple[str, bool, torch.dtype]]:
    return [(kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
            for kind in dict.fromkeys((device_type, "cpu"))]


class _Call:
    """What one checkpointed call needs in backward, apart from its saved tensors."""

    def __init__(self, function, spec, leaves: list, store: _OffloadStore | None, offload_at: int | None,
                 params: list[torch.Tensor] | None, owner: _LayerCheckpoint):
        self.function = function
        self.owner = owner  # holds the layer's verdict on skipping unread outputs
        self.spec = spec
        # Non-tensor leaves of the arguments; tensor slots are None (the tensors are saved or offloaded).
        self.constants = [None if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        self.slots = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        self.grad_mask = [leaves[i].requires_grad for i in self.slots]
        self.store = store
        self.offload_at = offload_at  # index into the tensor slots of the one kept on the host
        self.entry: _Offloaded | None = None
        # The offloaded input as forward saw it (a weak reference and its version): autograd checks
        # the saved tensors' versions, the offloaded one is checked by hand.
        self.offloaded_input: tuple[weakref.ref, int] | None = None
        # Tensors the layer's forward offers its recompute (fusetune.kept), by kind, the ones kept
        # going to the host with the layer's input: [kind, state, tensors sent, still valid] per
        # offer; ``watched`` holds each sent tensor and its version until the forward ends.
        projections = owner.keep_projections
        if projections is None:  # the default: kept where the GPU, not the host, sets the pace
            projections = offload_at is not None and (
                store.for_capture or _tokens(leaves[self.slots[offload_at]]) >= KEEP_PROJECTIONS_FROM)
        self.keeps = {kind for kind, wanted in ((kept_attention.KIND, owner.keep_attention),
                                                (KEPT_PROJECTIONS, projections)) if wanted}
        self.keeps = self.keeps if offload_at is not None else set()
        self.offers: list[list] = []
        self.watched: list[tuple[int, torch.Tensor, int]] = []
        self.reused: dict[str, list] | None = None  # per kind, (tensors, state) or None per offer
        self.params = params  # gradients returned for these; None: accumulated by the recompute
        self.device_type = leaves[self.slots[0]].device.type if self.slots else "cpu"
        self.cpu_rng = torch.get_rng_state()
        one_per_device = {leaves[i].device: leaves[i] for i in self.slots}
        # A CUDA graph's capture cannot read or set the device's RNG state; fusetune.graphs refuses
        # models with active dropout, so the layer draws nothing from it there.
        self.rng_devices, self.rng_states = [], []
        if not capturing():
            self.rng_devices, self.rng_states = get_device_states(*one_per_device.values())
        self.autocast = _autocast_modes(self.device_type)
        self.autocast_cache = torch.is_autocast_cache_enabled()
        self.out_spec = None
        self.out_slots: list[int] = []
        self.out_constants: list = []

    def run(self, tensors) -> tuple[torch.Tensor, ...]:
        """Call the layer on these tensors; returns its output's tensors (the rest kept in self)."""
        (args, kwargs) = tree_unflatten(self._fill(self.constants, self.slots, tensors), self.spec)
        out_leaves, self.out_spec = tree_flatten(self.function(*args, **kwargs))
        self.out_slots = [i for i, x in enumerate(out_leaves) if isinstance(x, torch.Tensor)]
        self.out_constants = [None if isinstance(x, torch.Tensor) else x for x in out_leaves]
        return tuple(out_leaves[i] for i in self.out_slots)

    def keep(self, kind: str, tensors: tuple[torch.Tensor, ...] | None, state: object) -> None:
        """Take one offer (of a kind this layer keeps) of the layer's forward: its tensors go to the
        host, beside the input; an offer of None is counted (as a call to compute again)."""
        sent = tensors or ()
        for tensor in sent:
            self.store.add(self.entry, tensor)
            self.watched.append((len(self.offers), tensor, tensor._version))
        self.offers.append([kind, state, len(sent), bool(sent)])

    def forget_changed(self) -> None:
        """At the end of the layer's forward: an offer whose tensor was since written in place (the
        copy may have read either value) is computed again in the recompute."""
        for index, tensor, version in self.watched:
            if tensor._version != version:
                self.offers[index][3] = False
        self.watched = []

    def reuse(self, restored: list[torch.Tensor]) -> None:
        """Pair the kept tensors restored with the layer's input with their offers, for the recompute."""
        tensors = iter(restored)
        self.reused = {}
        for kind, state, count, valid in self.offers:
            taken = tuple(next(tensors) for _ in range(count))
            self.reused.setdefault(kind, []).append((taken, state) if valid else None)
        self.offers = []

    def output(self, tensors) -> object:
        """The layer's output structure around the checkpoint's output tensors."""
        return tree_unflatten(self._fill(self.out_constants, self.out_slots, tensors), self.out_spec)

    @staticmethod
    def _fill(constants: list, slots: list[int], tensors) -> list:
        leaves = list(constants)
        for slot, tensor in zip(slots, tensors, strict=True):
            leaves[slot] = tensor
        return leaves

    def recompute(self, tensors) -> tuple[torch.Tensor, ...]:
        """:meth:`run` again with gradients, as in forward, for backward. Fused MLP outputs are left
        uncomputed once the layer's graph has shown that nothing reads them (checked on the first
        recompute; a layer where something does is run again in full, then and every later time)."""
        if self.owner.skip_unread is not False:
            with self.replay(), outputs_unread() as skipped:
                outputs = self.run(tensors)
            if not skipped or self.owner.skip_unread:
                return outputs
            self.owner.skip_unread = _values_unread(outputs, skipped)
            if self.owner.skip_unread:
                return outputs
            # Free this graph (held by its outputs and the skipped nodes) before the full run builds
            # another: otherwise the two coexist, a layer's activations twice at the first backward.
            del outputs, skipped
        with self.replay():
            return self.run(tensors)

    @contextlib.contextmanager
    def replay(self):
        """RNG state and autocast as they were in forward, with gradients on."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=self.rng_devices, device_type=self.device_type))
            torch.set_rng_state(self.cpu_rng)
            if self.rng_devices:
                set_device_states(self.rng_devices, self.rng_states, device_type=self.device_type)
            stack.enter_context(torch.enable_grad())
            if self.reused is not None:
                stack.enter_context(reusing(self.reused))
            for kind, enabled, dtype in self.autocast:
                stack.enter_context(torch.autocast(kind, dtype=dtype, enabled=enabled,
                                                   cache_enabled=self.autocast_cache))
            yield


def _outside_leaves(outputs, known: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors that autograd would accumulate gradients into from ``outputs`` other than
    ``known``: what a layer's recompute reads that is neither its input nor its parameter (a
    parameter held outside the layer, or, through the rest of the model's graph, any tensor made
    outside the layer)."""
    known_ids = {id(t) for t in known}
    seen, stack, found = set(), [t.grad_fn for t in outputs if t.grad_fn is not None], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) not in known_ids:
            found.append(variable)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def _check_reads(call: _Call, outputs, known: list[torch.Tensor]) -> None:
    """Once a layer: refuse a recompute that reads trainable tensors from outside the layer, whose
    gradients a fusetune checkpoint would not return (torch's checkpoint does)."""
    if call.owner.reads_checked:
        return
    outside = _outside_leaves(outputs, known)
    if outside:
        shapes = ", ".join(str(tuple(t.shape)) for t in outside[:3]) + (", ..." if len(outside) > 3 else "")
        raise RuntimeError(
            f"fusetune: a checkpointed {type(call.owner._layer()).__name__} reads trainable tensors that are "
            f"neither its arguments nor its parameters (shapes {shapes}), "
            "and a fusetune checkpoint returns gradients only for those; register them on the layer or pass "
            "them as arguments, or use torch's checkpointing (fusetune.disable_checkpointing(model), then "
            "model.gradient_checkpointing_enable())."
        )
    call.owner.reads_checked = True


def _check_unmodified(call: _Call) -> None:
    """Refuse a backward whose offloaded layer input was modified in place after the layer's forward
    (as autograd refuses it for a saved tensor): its host copy may hold either value."""
    held, version = call.offloaded_input
    tensor = held()
    if tensor is not None and tensor._version != version:
        raise RuntimeError(
            "fusetune: a checkpointed layer's input was modified in place after the layer's forward "
            f"(version {tensor._version}, saved at {version}); write that code out of place "
            "(x = x + y, not x += y), or use enable_checkpointing(model, offload=False)."
        )


class _Checkpoint(torch.autograd.Function):
    """Forward without a graph, keeping the inputs (one of them offloaded); backward recomputes."""

    @staticmethod
    def forward(ctx, call: _Call, n_anchors: int, *inputs):
        tensors = inputs[n_anchors:]
        if call.offload_at is not None:
            offloaded = tensors[call.offload_at]
            call.entry = call.store.save(offloaded)
            call.offloaded_input = (weakref.ref(offloaded), offloaded._version)
        ctx.save_for_backward(*(t for i, t in enumerate(tensors) if i != call.offload_at))
        ctx.call, ctx.n_anchors = call, n_anchors
        with keeping(call.keep, call.keeps) if call.keeps else contextlib.nullcontext():
            outputs = call.run(tensors)
        call.forget_changed()
        ctx.mark_non_differentiable(*(t for t in outputs if not t.is_floating_point()))
        return outputs

    @staticmethod
    def backward(ctx, *grad_outputs):
        if torch.is_grad_enabled():  # backward(create_graph=True)
            raise RuntimeError(
                "fusetune: a higher-order gradient (create_graph=True) through a fusetune checkpoint, which "
                "does not build a graph of its backward; use fusetune.disable_checkpointing(model) and "
                "torch's checkpointing (model.gradient_checkpointing_enable()) for this loss."
            )
        call = ctx.call
        saved = list(ctx.saved_tensors)
        if call.offload_at is not None and call.entry is None:
            raise RuntimeError(
                "fusetune: a second backward through an offloaded checkpoint (retain_graph=True): the "
                "layer's input left host memory in the first; use enable_checkpointing(model, offload=False)."
            )
        if call.offload_at is not None:
            _check_unmodified(call)
            restored = call.store.restore(call.entry)
            saved.insert(call.offload_at, restored[0])
            call.reuse(restored[1:])
            call.entry = None
            # From here the kept tensors live only while the recompute's graph saves them (the
            # attention output does; a projection output that was only added to the residual
            # does not): held here, they would stay to the layer's backward's end.
            del restored
        inputs = [t.detach().requires_grad_(needs) for t, needs in zip(saved, call.grad_mask, strict=True)]
        outputs = call.recompute(inputs)
        call.reused = None
        pairs = [(out, grad) for out, grad in zip(outputs, grad_outputs, strict=True)
                 if out.requires_grad and grad is not None]
        wanted = [t for t in inputs if t.requires_grad]
        if call.params is None:  # accumulate parameter gradients here (FSDP's unsharded parameters)
            if pairs:
                torch.autograd.backward(*zip(*pairs, strict=True))
            found = [t.grad for t in wanted]
            anchor_grads = [None] * ctx.n_anchors
        else:
            targets = wanted + call.params
            if pairs:
                outs, grads = zip(*pairs, strict=True)
                _check_reads(call, outs, inputs + call.params)
                found = torch.autograd.grad(outs, targets, grads, allow_unused=True)
            else:
                found = [None] * len(targets)
            found, anchor_grads = list(found[: len(wanted)]), list(found[len(wanted):])
        it = iter(found)
        input_grads = [next(it) if t.requires_grad else None for t in inputs]
        return (None, None, *anchor_grads, *input_grads)


def _sharded(param: torch.Tensor) -> bool:
    """Whether ``param`` is sharded at the layer's call (an FSDP2 DTensor, or a DeepSpeed ZeRO-3
    partition, an empty placeholder until gathered): its gradient is then accumulated by the
    recompute's own backward into the gathered parameter, not returned for the placeholder."""
    return isinstance(param, DTensor) or hasattr(param, "ds_id")


class _LayerCheckpoint:
    """The ``_gradient_checkpointing_func`` fusetune installs on one layer."""

    def __init__(self, layer: nn.Module, store: _OffloadStore | None, previous: tuple):
        self._layer = weakref.ref(layer)  # the layer holds this object: no cycle through it
        self.store = store
        self.previous = previous  # the layer's own (func, flag) attributes before enabling, for disable
        self.skip_unread: bool | None = None  # may the recompute skip unread outputs? None: not yet known
        self.reads_checked = False  # whether a recompute was checked to read nothing trainable from outside
        # What the layer's forward keeps for its recompute when offloading (fusetune.kept).
        self.keep_attention = False
        self.keep_projections: bool | None = False  # None: in a captured step's (its store says)

    def __getstate__(self) -> dict:
        """The settings, with the layer held strongly, for ``pickle`` (``torch.save(model)``) and
        ``copy.deepcopy``: a weak reference cannot be pickled, and a deep copy would keep it as it is
        (the copy's layer would run the original layer's parameters). Both record the layer before
        its attributes, this object among them, so the copy's checkpoint gets the copy's layer."""
        return {**self.__dict__, "_layer": self._layer()}

    def __setstate__(self, state: dict) -> None:
        """Back from :meth:`__getstate__`, the layer weakly again; an offloading copy keeps attention
        outputs as the original did, also when loaded in a process that never enabled checkpointing."""
        self.__dict__.update(state, _layer=weakref.ref(state["_layer"]))
        if self.offload and self.keep_attention:
            kept_attention.install()

    @property
    def offload(self) -> bool:
        return self.store is not None

    def __call__(self, function: Callable, *args):
        if not torch.is_grad_enabled():
            return function(*args)
        func, fixed, keywords = function, (), {}
        if isinstance(function, functools.partial):
            func, fixed, keywords = function.func, function.args, function.keywords
        leaves, spec = tree_flatten((fixed + args, keywords))
        params = [p for p in self._layer().parameters() if p.requires_grad]
        tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
        if not params and not any(t.requires_grad for t in tensors):
            return function(*args)  # nothing to differentiate: no graph, nothing to keep
        call = _Call(func, spec, leaves, self.store, self._offload_index(tensors, args, keywords),
                     None if any(_sharded(p) for p in params) else params, self)
        anchors = params if call.params is not None else [torch.empty(0, requires_grad=True)]
        return call.output(_Checkpoint.apply(call, len(anchors), *anchors, *tensors))

    def _offload_index(self, tensors: list, args: tuple, keywords: dict) -> int | None:
        """Position in ``tensors`` of the hidden states: the first positional floating tensor, else the
        ``hidden_states`` keyword; None when not offloading."""
        if not self.offload:
            return None
        candidates = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
        hidden = candidates[0] if candidates else keywords.get("hidden_states")
        return next((i for i, t in enumerate(tensors) if t is hidden), None)


def _layers(model: nn.Module) -> list[nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def enable_checkpointing(
    model: nn.Module,
    *,
    offload: bool = True,
    keep_attention: bool = True,
    keep_projections: bool | None = None,
) -> int:
    """Turn on activation checkpointing for every transformers ``GradientCheckpointingLayer`` in ``model``
    (decoder layers of the LM and of vision towers; works on a PEFT wrapper too), with fusetune's
    checkpoint function: with ``offload=True`` each layer's input hidden states are kept in pinned CPU
    memory (copied on a side CUDA stream) instead of on the GPU and prefetched back one layer ahead in
    backward; ``offload=False`` is plain recompute. Returns the number of layers. Idempotent; calling it
    again with the other ``offload`` switches modes.

    ``keep_attention`` (with ``offload``): each layer's causal SDPA output goes to host memory beside
    its input, with the kernel's log-sum-exp kept on the device (a float32 per token and head), so the
    recompute runs no attention forward (``fusetune.kept_attention``). It doubles the bytes offloaded
    per layer; ``False`` recomputes attention as before.

    ``keep_projections`` (with ``offload``): the outputs of the fused LoRA projections
    (``fusetune.ops.lora.lora_linear``: attention's q, k, v and o) go to the host too, and the
    recompute skips their matmuls. At Llama-3 8B's size that is 2.5x a layer input (144 MiB a layer
    at 4,096 tokens with the attention output), which an H200's host link carries within the
    layer's forward, and one more layer of them is on the device at backward's peak (prefetched).
    It trades GPU work for host work and link bytes, so it pays where the GPU is the limit, which
    is where the default ``None`` keeps them: in a step captured as a CUDA graph
    (``fusetune.CapturedStep``; its warm-up steps too, which fill the host pool the capture may not
    grow), and in eager layer calls of at least ``KEEP_PROJECTIONS_FROM`` (8,192) tokens. On an
    H200 (bench/RESULTS.md): L8 captured at 4,096 tokens 12,781 tokens/s against 12,186
    recomputing them; L8 eager at 8,192 tokens 11,765 against 11,276, and at 16,384 10,410 against
    Unsloth's 8,527 with 3.41 GiB above the weights. Eager steps of 4,096 tokens wait on the host,
    and there keeping them did not pay (the VLM steps measured slower and heavier). ``True`` keeps
    them in every call, ``False`` in none.

    Leave transformers' own gradient checkpointing off (see the module docstring). Under DDP either
    ``find_unused_parameters`` works; under FSDP2 shard per decoder layer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fusetune: enable_checkpointing takes an nn.Module, got {type(model).__name__}.")
    layers = _layers(model)
    if not layers:
        raise ValueError(
            f"fusetune: {type(model).__name__} has no transformers GradientCheckpointingLayer to checkpoint; "
            "pass a transformers model (or its PEFT wrapper) whose decoder layers derive from it."
        )
    if offload and keep_attention:
        kept_attention.install()
    store = _OffloadStore() if offload else None  # shared by the layers: prefetch follows their order
    for layer in layers:
        current = layer.__dict__.get("_gradient_checkpointing_func")
        if isinstance(current, _LayerCheckpoint) and current.offload == offload:
            checkpoint = current
        else:
            previous = current.previous if isinstance(current, _LayerCheckpoint) else (
                current, layer.__dict__.get("gradient_checkpointing"))
            checkpoint = layer._gradient_checkpointing_func = _LayerCheckpoint(layer, store, previous)
        checkpoint.keep_attention = keep_attention
        checkpoint.keep_projections = keep_projections
        layer.gradient_checkpointing = True
    return len(layers)


@contextlib.contextmanager
def private_offload_store(model: nn.Module):
    """Within the block, ``model``'s offloading layers use a store of their own (yielded; None when no
    layer offloads), whose host buffers nothing else takes afterwards.

    A captured CUDA graph (``fusetune.graphs``) copies to and from the very host buffers its capture
    used, on every replay; with the shared store those buffers would go back to its pool and be handed
    to the next eager step. Run warm-up steps and the capture inside one block: the warm-up fills the
    private pool, so the capture itself allocates no pinned memory (which it may not). Layers keep
    their projections in the block unless ``keep_projections=False`` (see ``enable_checkpointing``).
    """
    checkpoints = [layer.__dict__.get("_gradient_checkpointing_func") for layer in _layers(model)]
    offloading = [c for c in checkpoints if isinstance(c, _LayerCheckpoint) and c.offload]
    shared = [c.store for c in offloading]
    store = _OffloadStore(for_capture=True) if offloading else None
    for checkpoint in offloading:
        checkpoint.store = store
    try:
        yield store
    finally:
        for checkpoint, original in zip(offloading, shared, strict=True):
            checkpoint.store = original


def disable_checkpointing(model: nn.Module) -> None:
    """Undo ``enable_checkpointing``: each layer gets back the checkpoint function and flag it had before."""
    for layer in _layers(model):
        current = layer.__dict__.get("_gradient_checkpointing_func")
        if not isinstance(current, _LayerCheckpoint):
            continue
        names = ("_gradient_checkpointing_func", "gradient_checkpointing")
        for name, value in zip(names, current.previous, strict=True):
            if value is None:
                layer.__dict__.pop(name, None)
            else:
                setattr(layer, name, value)
