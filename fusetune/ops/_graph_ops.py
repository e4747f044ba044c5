"""The ops' kernel launches as ``torch.library`` custom ops, so that torch.compile keeps an op in its
graph instead of breaking the graph around it.

While torch.compile traces a model, it runs an op's Python (its checks, its views, its
``torch.autograd.Function`` forward and backward) on fake tensors, and each launch function wrapped
here becomes one opaque call to the custom op ``fusetune::<name>``; its fake implementation gives
the outputs' shapes, dtypes and strides without running anything, and the compiled code calls the
real launch at run time. ``fullgraph=True`` then works, and the graph on each side of an op is one
graph. Two other ways were worse: traced into, the kernels became Inductor's user-defined Triton
kernels (on an H200 with torch 2.11 add_rms_norm's weight gradient came out NaN, and the loss
kernels failed to compile); left out (``torch.compiler.disable``), every op was a graph break.

Called eagerly, the launch function runs directly: going through the custom op's dispatch cost
28-93 microseconds a call on a 2-core CPU host (measured), more than many of the ops' whole host side.

A launch function takes and returns tensors (a list where the number of outputs depends on the
arguments: custom ops cannot return None), never returns one of its inputs or a view of one, and
writes only tensors it allocates (``mutates_args=()``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from fusetune.ops._launch import on_input_device

NAMESPACE = "fusetune"


def graph_op(name: str, fake: Callable) -> Callable[[Callable], Callable]:
    """Decorator: register ``launch`` as the custom op ``fusetune::<name>`` with ``fake`` as its fake
    implementation (same arguments; returns empty outputs laid out as ``launch``'s are), and return
    a function that calls the custom op while torch.compile traces and ``launch`` itself otherwise.

    The custom op runs ``launch`` on its first tensor's GPU (compiled code may call it with another
    GPU current, in a model split over GPUs: ``_launch.on_input_device``).
    """

    def register(launch: Callable) -> Callable:
        op = torch.library.custom_op(f"{NAMESPACE}::{name}", on_input_device(launch), mutates_args=())
        op.register_fake(fake)

        @functools.wraps(launch)
        def call(*args):
            return op(*args) if torch.compiler.is_compiling() else launch(*args)

        call.custom_op = op
        return call

    return register
