"""One training step's forward and backward captured as a CUDA graph and replayed for every batch.

Why: on a full-size Llama-3 8B layer the host needs about as long to run fusetune's Python and
launch a layer's kernels as the GPU needs to run them (bench/RESULTS.md), so the GPU waits on the
host for part of every step. A replayed graph launches the whole step's kernels at once.

    step = fusetune.CapturedStep(model, forward, batch)   # warm-up steps, then the capture
    for batch in batches:
        loss = step(batch)          # the new batch copied in, the graph replayed, grads in .grad
        optimizer.step()
        optimizer.zero_grad()

``forward(batch) -> loss`` is the caller's: the model call (under autocast if wanted) and the loss.
Every batch must have the captured batch's keys, shapes and dtypes (pad to the captured length, or
capture one step per shape); its tensors are copied into the graph's own inputs.

What differs from an eager step, and why:

- Gradients accumulate in ``.grad`` as after an eager backward: a parameter whose ``.grad`` is None
  gets the replay's gradient (the graph's own buffer, no copy), one that has a gradient gets it
  added. A ``.grad`` still holding the graph's buffer from the previous call is copied out before
  the replay overwrites that buffer, so gradient accumulation costs one copy of the trainable
  gradients a micro-step, and ``optimizer.zero_grad()`` (set to None, torch's default) none.
  Making the step leaves the gradients as they were before it (its warm-up steps' are dropped).
- Labels are checked against the vocabulary before each replay (the captured ops cannot read
  values on the host). Linear cross-entropy computes every row, ignored labels included (a row
  count cannot change between replays).
- Models that draw random numbers in training are refused (active dropout, a mixture of experts'
  router jitter, or anything else that moves the device's generator in a warm-up step): a
  checkpointed layer's recompute must draw the random numbers its forward drew, and a capture can
  neither read nor reset the device's RNG state.
- The graph keeps its memory (the step's activations at their peak) while it lives. It is captured
  with the allocator in expandable segments, so that memory is the peak and not the peak plus
  fragmentation (see ``_expandable_segments``).
- One GPU: DDP, FSDP2 and ZeRO-3 models are refused (their gradient hooks and collectives run on
  the host between kernels). No loss scaling: the step calls ``loss.backward()`` itself, so train
  in bf16 (autocast) or fp32, not fp16 with a GradScaler.
- transformers cannot look at the batch while a graph is captured, so it builds every layer's
  full attention mask; the capture gives each attention module the mask its warm-up calls had
  (none, for SDPA's causal kernels, where they had none). A graph captured so has no mask to
  follow: a later batch with padding or packed samples is refused (capture from such a batch).
"""

from __future__ import annotations

import contextlib
import functools
import os
import traceback
import weakref
from collections.abc import Callable, Mapping

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from fusetune.checkpointing import DTensor, private_offload_store
from fusetune.ops._launch import capturing
from fusetune.ops.labels import LabelCheck, flatten_labels

__all__ = [
    "CapturedStep",
    "StaticBatch",
    "active_dropout",
    "add_replayed_gradients",
    "capturable_parameters",
    "capture_failure",
    "check_labels",
    "draws_random_numbers",
    "keep_earlier_gradients",
    "output_size",
    "plain_layout",
]

WARMUP_STEPS = 3  # before capture: Triton compiles, cuBLAS picks its kernels, the host pool fills


# Config settings under which transformers' models draw random numbers in training.
RANDOM_SETTINGS = ("attention_dropout", "router_jitter_noise")


def active_dropout(model: nn.Module) -> list[str]:
    """Where ``model`` draws random numbers in training: dropout modules with p > 0, and configs with
    attention dropout or a router's jitter noise (Mixtral's), by name."""
    found = [name or type(module).__name__ for name, module in model.named_modules()
             if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0 and module.training]
    for name, module in model.named_modules():
        config = module.__dict__.get("config")
        found += [f"{name or type(module).__name__}.config.{setting}" for setting in RANDOM_SETTINGS
                  if getattr(config, setting, 0) and module.training]
    return found


def draws_random_numbers(step: Callable[[], object], rng_state: Callable[[], torch.Tensor]) -> bool:
    """Whether running ``step`` moves the generator whose state ``rng_state`` reads (what
    ``active_dropout`` cannot name: a random draw in a model's own code)."""
    before = rng_state()
    step()
    return not torch.equal(rng_state(), before)


def plain_layout(batch: Mapping) -> bool:
    """Whether ``batch`` has no padding and no packed samples: its ``attention_mask`` (if any) all
    ones, its text ``position_ids`` (if any; the first of M-RoPE's four rows) rising by one along
    each row. One read of the device."""
    checks = []
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor):
        checks.append(mask.bool().all())
    positions = batch.get("position_ids")
    if isinstance(positions, torch.Tensor):
        text = positions[0] if positions.dim() == 3 and positions.shape[0] == 4 else positions
        if text.shape[-1] > 1:
            checks.append((text.diff(dim=-1) == 1).all())
    return not checks or bool(torch.stack(checks).all())


def output_size(model: nn.Module) -> int | None:
    """Rows of the model's output embedding (its vocabulary), or None when it has none."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    weight = getattr(head, "weight", None)
    return None if weight is None else int(weight.shape[0])


def check_labels(batch: Mapping, vocab_size: int | None, ignore_index: int) -> None:
    """Raise the loss's own error for a ``labels`` entry outside [0, vocab_size) (a replayed loss
    cannot: see ``fusetune.ops.cross_entropy.LabelCheck``)."""
    labels = batch.get("labels")
    if isinstance(labels, torch.Tensor):
        LabelCheck(flatten_labels(labels, labels.shape), vocab_size, ignore_index).raise_if_bad()


def capturable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of ``model``, after checking that a step of it can be captured: in
    training mode, without active dropout, on one GPU (no DDP, FSDP or ZeRO-3: their gradient
    hooks and collectives run on the host between kernels, which a replay skips)."""
    if isinstance(model, nn.parallel.DistributedDataParallel) or any(
            isinstance(p, DTensor) or hasattr(p, "ds_id") for p in model.parameters()):
        raise ValueError(
            "fusetune.CapturedStep runs on one GPU: this model is wrapped by DDP or sharded (FSDP2 or "
            "DeepSpeed ZeRO-3), whose gradient hooks and collectives a replayed graph would skip. Train "
            "it without capturing."
        )
    if not model.training:
        raise ValueError("fusetune.CapturedStep: the model is in eval mode; call model.train() first.")
    random = active_dropout(model)
    if random:
        raise ValueError(random_draws(f"({', '.join(random[:5])}{', ...' if len(random) > 5 else ''})"))
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("fusetune.CapturedStep: the model has no trainable parameters.")
    return params


def random_draws(where: str) -> str:
    """The error for a model that draws random numbers in training, ``where`` saying where."""
    return (f"fusetune.CapturedStep: the model draws random numbers in training {where}; set those "
            "probabilities to 0 (e.g. LoRA dropout 0, attention_dropout 0, router_jitter_noise 0) or train "
            "without capturing.")


class StaticBatch:
    """The graph's input tensors: the captured batch's copies, refilled from each new batch.

    Non-tensor values are kept as they were captured; a new batch must repeat them.
    """

    def __init__(self, batch: Mapping):
        if not isinstance(batch, Mapping) or not batch:
            raise TypeError("fusetune.CapturedStep: the batch must be a non-empty dict of model inputs.")
        for key, value in batch.items():
            if not isinstance(value, torch.Tensor) and any(isinstance(leaf, torch.Tensor)
                                                           for leaf in tree_leaves(value)):
                raise TypeError(
                    f"fusetune.CapturedStep: {key} holds tensors inside a {type(value).__name__}; a "
                    "captured step copies in only tensors that are batch values themselves: pass "
                    "each as its own key."
                )
        self.values = {key: value.detach().clone() if isinstance(value, torch.Tensor) else value
                       for key, value in batch.items()}

    def fill(self, batch: Mapping) -> None:
        """Copy ``batch`` in, after checking that it matches the captured one."""
        if set(batch) != set(self.values):
            raise ValueError(
                f"fusetune.CapturedStep: the batch has keys {sorted(batch)}, the captured one "
                f"{sorted(self.values)}; every batch needs the same inputs (capture another step for others)."
            )
        for key, static in self.values.items():
            value = batch[key]
            if not isinstance(static, torch.Tensor):
                if value != static:
                    raise ValueError(
                        f"fusetune.CapturedStep: {key}={value!r} differs from the captured {static!r}; "
                        "non-tensor inputs are fixed at capture."
                    )
                continue
            is_tensor = isinstance(value, torch.Tensor)
            if not is_tensor or value.shape != static.shape or value.dtype != static.dtype:
                got = f"{value.dtype} {tuple(value.shape)}" if is_tensor else type(value).__name__
                raise ValueError(
                    f"fusetune.CapturedStep: {key} is {got}, the captured one {static.dtype} "
                    f"{tuple(static.shape)}; pad or cut batches to the captured shape, or capture a "
                    "step for this shape."
                )
        for key, static in self.values.items():
            if isinstance(static, torch.Tensor):
                static.copy_(batch[key], non_blocking=True)


class CapturedStep:
    """A training step (``forward(batch)`` then ``backward``) captured once as a CUDA graph.

    model: the model being trained (its trainable parameters get the gradients; a PEFT wrapper is
    fine); forward: ``forward(batch) -> scalar loss``; batch: an example batch (dict of inputs on
    the model's device) fixing the keys, shapes and dtypes. ``vocab_size``: what labels are checked
    against (default: the model's output embedding rows); ``ignore_index``: the label that masks a
    position. ``warmup_steps`` eager steps run first (their gradients are dropped and ``.grad`` is
    left as it was; the optimizer is not touched). See the module docstring for what differs from
    an eager step.
    """

    def __init__(self, model: nn.Module, forward: Callable[[dict], torch.Tensor], batch: Mapping, *,
                 vocab_size: int | None = None, ignore_index: int = -100, warmup_steps: int = WARMUP_STEPS):
        self._params = capturable_parameters(model)
        if warmup_steps < 1:
            raise ValueError(
                f"fusetune.CapturedStep: warmup_steps={warmup_steps}; at least one eager step must run "
                "before the capture (Triton compiles and cuBLAS picks its kernels there)."
            )
        if not torch.cuda.is_available():
            raise RuntimeError(
                "fusetune.CapturedStep needs a CUDA device; on a CPU call forward and backward as usual."
            )
        self._vocab = vocab_size if vocab_size is not None else output_size(model)
        if "labels" in batch and self._vocab is None:
            raise ValueError(
                "fusetune.CapturedStep: cannot find the model's output embedding to check labels against; "
                "pass vocab_size=."
            )
        self._ignore_index = ignore_index
        check_labels(batch, self._vocab, ignore_index)
        self._batch = StaticBatch(batch)
        self._graph = torch.cuda.CUDAGraph()
        self._grads, self._reached = [], []
        before = [p.grad for p in self._params]
        # The offload store's buffers stay the graph's: every replay copies through them.
        with private_offload_store(model) as self._store, _masks_as_in_eager(model) as masks:
            # One side stream for the warm-up and the capture: what a library makes once per stream
            # (cuBLAS's workspace) is made in the warm-up, not in the graph's pool.
            stream = torch.cuda.Stream()
            self._warm_up(forward, warmup_steps, stream)
            for p in self._params:
                p.grad = None  # the capture allocates them; each replay then writes them afresh
            try:
                with _expandable_segments(), torch.cuda.graph(self._graph, stream=stream):
                    loss = forward(self._batch.values)
                    loss.backward()
            except torch.OutOfMemoryError:
                raise  # its own message says what to do; it is no host read
            except RuntimeError as error:
                raise RuntimeError(capture_failure(error)) from error
        self._loss = loss.detach()
        self._maskless = masks.dropped  # replays must keep the captured batch's plain layout
        for p, grad in zip(self._params, before, strict=True):
            p.grad, grad = grad, p.grad
            if grad is not None:  # (a parameter this step never reaches gets no gradient)
                self._grads.append(grad)
                self._reached.append(p)
        self._params = self._reached

    def _warm_up(self, forward: Callable, steps: int, side: torch.cuda.Stream) -> None:
        side.wait_stream(torch.cuda.current_stream())

        def step():
            for p in self._params:
                p.grad = None
            forward(self._batch.values).backward()

        with torch.cuda.stream(side):
            for _ in range(steps):
                if draws_random_numbers(step, torch.cuda.get_rng_state):
                    raise ValueError(random_draws("(a warm-up step moved the GPU's random generator)"))
        torch.cuda.current_stream().wait_stream(side)

    def pool_bytes(self) -> int:
        """Device memory the graph holds for as long as it lives: the segments of its private pool,
        where its replays write activations and gradients (the parameters, the optimizer's state and
        the graph's input batch live outside it)."""
        pool = self._graph.pool()
        return sum(segment["total_size"] for segment in torch.cuda.memory_snapshot()
                   if tuple(segment.get("segment_pool_id", ())) == tuple(pool))

    def __call__(self, batch: Mapping) -> torch.Tensor:
        """Run the captured step on ``batch``; returns the loss (a tensor the next call overwrites:
        read or clone it first) and accumulates the gradients in the parameters' ``.grad``."""
        check_labels(batch, self._vocab, self._ignore_index)
        if self._maskless and not plain_layout(batch):
            raise ValueError(
                "fusetune.CapturedStep: this batch has padding (zeros in attention_mask) or packed samples "
                "(position_ids restarting), but the step was captured from a batch without, so its "
                "attention runs with no mask; capture the step from a padded batch, or pad none."
            )
        self._batch.fill(batch)
        earlier = keep_earlier_gradients(self._params, self._grads)
        self._graph.replay()
        add_replayed_gradients(self._params, self._grads, earlier)
        return self._loss


def capture_failure(error: BaseException) -> str:
    """The message for a capture that failed with ``error``: the first error of its chain and where
    the step last called into torch before it, with what a capture cannot do and the fix.

    Why: the CUDA error a host read raises inside a capture (and the one that ending the spoiled
    capture raises after it) names neither the read nor the model code that made it."""
    first = error
    while first.__context__ is not None:
        first = first.__context__
    inside_torch = os.path.dirname(torch.__file__) + os.sep
    frames = [frame for frame in traceback.extract_tb(first.__traceback__)
              if not frame.filename.startswith(inside_torch)]
    where = (f" It last called into torch at {frames[-1].filename}:{frames[-1].lineno} "
             f"({frames[-1].name}).") if frames else ""
    cause = str(first).strip().splitlines()[0] if str(first).strip() else type(first).__name__
    return (
        f"fusetune.CapturedStep: the step could not be captured as a CUDA graph ({cause}).{where} "
        "A captured step may not read a device value on the host: no .item(), .tolist(), nonzero, "
        "boolean-mask indexing or other output whose size depends on the data (Qwen2-VL-family vision "
        "towers read their image grids so). Train this model with eager steps, or move that read "
        "out of forward."
    )


def keep_earlier_gradients(params: list[nn.Parameter],
                           buffers: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """Before a replay: the gradient each parameter already has, which the replay's is added to (None:
    it has none). A ``.grad`` that is still the graph's own buffer (left there by the previous call)
    is copied out first, since the replay overwrites the buffer."""
    earlier = []
    for p, buffer in zip(params, buffers, strict=True):
        grad = p.grad
        if grad is not None and grad.data_ptr() == buffer.data_ptr():
            grad = p.grad = grad.clone()
        earlier.append(grad)
    return earlier


def add_replayed_gradients(params: list[nn.Parameter], buffers: list[torch.Tensor],
                           earlier: list[torch.Tensor | None]) -> None:
    """After a replay: each parameter's ``.grad`` is the replay's gradient (its buffer, where it had
    none) or its earlier gradient plus the replay's, as an eager backward would leave it."""
    for p, buffer, grad in zip(params, buffers, earlier, strict=True):
        if grad is None:
            p.grad = buffer
        else:
            grad.add_(buffer)


ALLOCATOR_SETTINGS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")


@contextlib.contextmanager
def _expandable_segments():
    """Within the block, new device memory comes in expandable segments; the setting is restored on
    exit. Where the process's allocator settings name ``expandable_segments`` (on or off), they are
    left alone: the user's choice wins (some platforms, WSL among them, cannot map such segments).

    Why: the graph keeps its private pool for as long as it lives, and with plain segments that pool
    is the capture's peak allocation plus its fragmentation. The caching allocator gives every
    large request that no free block fits a new segment of its own size, and a segment's free
    blocks never join another's: on L8 at 16,384 tokens the pool held 4.65 GiB for a 3.45 GiB peak.
    An expandable segment is one address range per stream that grows by mapping pages, so free
    neighbours join: the same capture's pool held 3.56 GiB (bench/RESULTS.md). Where this torch has
    no run-time switch for it, the capture runs as it would anyway.
    """
    settings = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    chosen = any("expandable_segments" in os.environ.get(name, "") for name in ALLOCATOR_SETTINGS)
    if settings is None or chosen:
        yield
        return
    settings("expandable_segments:True")
    try:
        yield
    finally:
        settings("expandable_segments:False")


class _MasksAsInEager:
    """Attention calls made while capturing get the mask the warm-up steps had: none, where every
    warm-up call of that attention module had none.

    transformers decides whether a layer may drop its mask for SDPA's causal kernels by looking at
    the batch (padding, packed positions). While a graph is captured it cannot look, so it builds the
    full mask, and SDPA's causal kernels give way to masked ones (about 3x the attention time on
    L8, measured). The warm-up steps run eagerly on the captured batch's layout, so they show which
    layers had no mask; every replayed batch has that layout (same keys and shapes).
    """

    def __init__(self):
        self.maskless: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()
        self.dropped = False  # whether a call while capturing had its mask dropped

    def wrap(self, attention: Callable) -> Callable:
        @functools.wraps(attention)
        def call(module, query, key, value, attention_mask, *args, **kwargs):
            if not capturing():
                self.maskless[module] = self.maskless.get(module, True) and attention_mask is None
            elif self.maskless.get(module, False):
                self.dropped = self.dropped or attention_mask is not None
                attention_mask = None
            return attention(module, query, key, value, attention_mask, *args, **kwargs)

        return call


@contextlib.contextmanager
def _masks_as_in_eager(model: nn.Module):
    """Within the block, the attention functions ``model`` looks up in transformers' registry are
    wrapped by a :class:`_MasksAsInEager` (restored on exit), which the block gets."""
    masks = _MasksAsInEager()
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError:  # pragma: no cover - transformers is what the patched models come from
        yield masks
        return
    configs = (module.__dict__.get("config") for module in model.modules())
    names = {getattr(config, "_attn_implementation", None) for config in configs}
    originals = {name: ALL_ATTENTION_FUNCTIONS[name] for name in names if name in ALL_ATTENTION_FUNCTIONS}
    for name, attention in originals.items():
        ALL_ATTENTION_FUNCTIONS[name] = masks.wrap(attention)
    try:
        yield masks
    finally:
        for name, attention in originals.items():
            ALL_ATTENTION_FUNCTIONS[name] = attention
