"""Tensors parked in host memory while a step does not need them, copied on a side CUDA stream.

``OffloadStore.save`` starts copying a tensor to a pinned host buffer after the work queued so far on
the compute stream, so the caller may drop the tensor at once (its memory is reused only after the
copy has run). ``restore`` brings it back, ready on the compute stream. Entries saved with
``chain=True`` (checkpointed layer inputs) are linked in saving order: restoring one starts fetching
the one saved before it, which backward needs next. Other entries (``fusetune.kept_attention``'s saved
tensors) are fetched when their owner asks (``prefetch``). All copies of a device run on one side
stream in the order they were queued, so a host buffer handed back after its copy back was queued is
overwritten only after that copy. On a CPU the same path runs with plain copies and no streams.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch


class HostPool:
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


class Offloaded:
    """One tensor held on the host; a chained one is linked to the one saved before it."""

    __slots__ = ("__weakref__", "device", "host", "previous", "release", "restored")

    def __init__(self, device: torch.device, host: torch.Tensor, release: Callable[[], None], previous):
        self.device = device
        self.host: torch.Tensor | None = host
        self.release = release  # gives the buffer back to its pool: after restore, or when garbage
        self.previous = previous  # weakref to the chained entry saved just before, or None
        self.restored: tuple[torch.Tensor, torch.cuda.Event | None] | None = None


class OffloadStore:
    """Moves tensors to host buffers and back, on one side stream per CUDA device."""

    def __init__(self):
        self._pools: dict[torch.device, HostPool] = {}
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._last: weakref.ref | None = None

    def pool(self, device: torch.device) -> HostPool:
        if device not in self._pools:
            self._pools[device] = HostPool(pinned=device.type == "cuda")
        return self._pools[device]

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def save(self, tensor: torch.Tensor, chain: bool = True) -> Offloaded:
        """Start copying ``tensor`` to a host buffer; the caller may drop ``tensor`` right away.
        ``chain``: link it to the chained entry saved before it (see the module docstring)."""
        pool = self.pool(tensor.device)
        nbytes = tensor.numel() * tensor.element_size()
        buffer = pool.take(nbytes)
        host = buffer[:nbytes].view(tensor.dtype).view(tensor.shape)
        if tensor.is_cuda:
            stream = self._stream(tensor.device)
            stream.wait_stream(torch.cuda.current_stream(tensor.device))
            with torch.cuda.stream(stream):
                host.copy_(tensor, non_blocking=True)
            tensor.record_stream(stream)  # its memory is reused only after the copy has run
        else:
            host.copy_(tensor)
        entry = Offloaded(tensor.device, host, None, self._last if chain else None)
        entry.release = weakref.finalize(entry, pool.give, buffer)
        if chain:
            self._last = weakref.ref(entry)
        return entry

    def prefetch(self, entry: Offloaded) -> None:
        """Start copying ``entry`` back to its device (on the side stream for CUDA), unless under way."""
        if entry.host is None or entry.restored is not None:
            return
        host = entry.host
        out = torch.empty(host.shape, dtype=host.dtype, device=entry.device)
        event = None
        if entry.device.type == "cuda":
            stream = self._stream(entry.device)
            stream.wait_stream(torch.cuda.current_stream(entry.device))  # ``out``'s memory is free
            with torch.cuda.stream(stream):
                out.copy_(host, non_blocking=True)
            event = stream.record_event()
            out.record_stream(stream)
        else:
            out.copy_(host)
        entry.restored = (out, event)

    def restore(self, entry: Offloaded, release: bool = True) -> torch.Tensor:
        """The saved tensor back on its device, ready on the current stream. ``release``: give the host
        buffer back now (else it stays, and the entry can be restored again, until ``entry.release()``
        or the entry's death); a chained entry then prefetches the one saved before it."""
        self.prefetch(entry)
        out, event = entry.restored
        entry.restored = None
        if event is not None:
            torch.cuda.current_stream(entry.device).wait_event(event)
        if not release:
            return out
        entry.host = None
        # Its next user is a device-to-host copy queued after this one on the same side stream.
        entry.release()
        previous = entry.previous() if entry.previous is not None else None
        if previous is not None:
            self.prefetch(previous)
        return out
