"""Step time and peak memory of offloaded activation checkpointing against plain checkpointing, on a
stack of Llama-3.1-8B-sized decoder layers.

    python bench/offload.py --out DIR [--tag h200] [--layers 16] [--tokens 8192,16384] [--cpu-smoke]

Records go to DIR/offload-<tag>.jsonl (``op`` "decoder_stack", one record per system and metric).
The stack: ``--layers`` transformers ``LlamaDecoderLayer``s (hidden 4096, MLP 14336, 32 query and
8 key/value heads, sdpa causal attention) with random bf16 weights, frozen as under LoRA, on one
sequence whose input requires grad so that backward runs through every layer; the loss is the mean
square of the output. Systems, all on the same stack and input:

- ``torch_eager``: no checkpointing (every activation kept);
- ``hf``: ``torch.utils.checkpoint`` non-reentrant, what ``gradient_checkpointing_enable`` installs;
- ``hf_reentrant``: the same with ``use_reentrant=True``;
- ``fusetune_recompute``: ``fusetune.checkpointing.enable_checkpointing(offload=False)``;
- ``fusetune``: ``enable_checkpointing(offload=True)``, layer inputs in pinned host memory.

Metrics: ``time_ms`` (median forward+backward, ``common.time_fwd_bwd``) and ``peak_mib`` (peak
allocated above the weights and input during one step). The claim checked: offloading costs at most
a few percent of ``hf``'s step time and saves about ``layers x tokens x 4096 x 2`` bytes.
``--cpu-smoke`` runs a tiny float32 stack on the CPU to exercise the script (times only, no memory).
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import common
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from fusetune.checkpointing import enable_checkpointing

SYSTEMS = ("torch_eager", "hf", "hf_reentrant", "fusetune_recompute", "fusetune")
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                rope_theta=500000.0, max_position_embeddings=131072)
TINY = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256)


class DecoderStack(nn.Module):
    """``layers`` Llama decoder layers applied in turn, with the model's rotary embedding."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.rotary = LlamaRotaryEmbedding(config)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
        embeddings = self.rotary(hidden, positions)
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=None, position_ids=positions,
                           position_embeddings=embeddings)
        return hidden


def configure(stack: DecoderStack, system: str) -> None:
    """Switch the stack's layers to ``system``'s checkpointing (from a clean, uncheckpointed state)."""
    for layer in stack.layers:
        for name in ("_gradient_checkpointing_func", "gradient_checkpointing"):
            layer.__dict__.pop(name, None)
    if system.startswith("hf"):
        for layer in stack.layers:
            layer._gradient_checkpointing_func = functools.partial(
                checkpoint, use_reentrant=system == "hf_reentrant")
            layer.gradient_checkpointing = True
    elif system.startswith("fusetune"):
        enable_checkpointing(stack, offload=system == "fusetune")


def build(layers: int, smoke: bool) -> tuple[DecoderStack, torch.dtype]:
    dtype = torch.float32 if smoke else torch.bfloat16
    config = LlamaConfig(**(TINY if smoke else LLAMA_8B), num_hidden_layers=layers, vocab_size=32,
                         attn_implementation="sdpa")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with common.device():
            stack = DecoderStack(config)
    finally:
        torch.set_default_dtype(previous)
    return stack.requires_grad_(False).train(), dtype


def measure(stack: DecoderStack, dtype: torch.dtype, tokens: int, layers: int, smoke: bool) -> list[dict]:
    hidden_size = stack.layers[0].hidden_size
    x = torch.randn(1, tokens, hidden_size, device=common.device(), dtype=dtype, requires_grad=True)

    def step():
        stack(x).float().square().mean().backward()

    config = {"op": "decoder_stack", "layers": layers, "tokens": tokens, "hidden": hidden_size,
              "variant": "fp32" if smoke else "bf16_frozen"}
    rows = []
    for system in SYSTEMS:
        configure(stack, system)
        common.release()
        try:
            rows.append(common.record(system, config, common.TIME,
                                      common.time_fwd_bwd(step, grad_to_none=[x], warmup=200, rep=2000)))
            if not smoke:
                rows.append(common.record(system, config, common.MEMORY, common.peak_memory_mib(step)))
        except Exception as exc:  # noqa: BLE001 - a failed system is recorded, the others still run
            rows.append(common.record(system, config, common.TIME, None, error=common.describe(exc)))
        x.grad = None
    configure(stack, "torch_eager")
    return rows


def summary(rows: list[dict]) -> None:
    """Print each case's systems with time, peak memory and the time relative to ``hf``."""
    for key, systems in common.index(rows).items():
        print(" ".join(str(part) for part in key))
        base = common.value(systems, "hf", common.TIME)
        for system in SYSTEMS:
            ms = common.value(systems, system, common.TIME)
            mib = common.value(systems, system, common.MEMORY)
            ratio = f"{ms / base:.3f}x hf" if ms and base else ""
            print(f"  {system:20s} {ms if ms is not None else float('nan'):10.2f} ms"
                  f"  {mib if mib is not None else float('nan'):10.0f} MiB  {ratio}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the JSON lines")
    parser.add_argument("--tag", default="h200", help="results file is offload-<tag>.jsonl")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--tokens", default="8192,16384", help="sequence lengths, comma list")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny float32 stack (plumbing; runs on a CPU)")
    args = parser.parse_args()
    if not args.cpu_smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --cpu-smoke to exercise the script on a CPU")
    path = common.open_results(args.out / f"offload-{args.tag}.jsonl")
    layers = 2 if args.cpu_smoke else args.layers
    stack, dtype = build(layers, args.cpu_smoke)
    rows = []
    for tokens in [16] if args.cpu_smoke else [int(t) for t in args.tokens.split(",")]:
        rows += measure(stack, dtype, tokens, layers, args.cpu_smoke)
    summary(rows)
    print(f"wrote {path}")
    return 1 if any(row["value"] is None for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
