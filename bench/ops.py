"""Ops benchmark: correctness at real shapes, then forward+backward time, peak memory and roofline
fraction of fusetune's ops against PyTorch eager, torch.compile and Liger-Kernel, all in bf16.

    python bench/ops.py --out DIR [--quick] [--ops rms_norm,rope] [--systems fusetune,liger]
                        [--skip-correctness] [--tag h200]

Records go to DIR/ops-<tag>.jsonl (tag "h200" by default), each appended as soon as it is taken;
a table is printed at the end and the exit status is non-zero when a correctness check failed.
``--ops`` / ``--systems`` / ``--skip-correctness`` split a run that would not fit one time limit.

Systems. ``fusetune``: the op under test. ``torch_eager``: the maths as transformers writes it, in
bf16. ``torch_compile``: that eager function under ``torch.compile(dynamic=False)``, compiled once
per shape and warmed before timing. ``liger``: Liger-Kernel's matching autograd Function.
``matmul`` (linear_cross_entropy only): the bare bf16 matmuls the op cannot avoid.

Every system gets freshly made inputs (same seed), so an op that writes into its inputs (Liger's
cross-entropy stores the gradient in the logits buffer, its RMSNorm writes dx into dy) changes the
values later runs see but not the work they do, and never leaks into another system.

Roofline fraction = (minimum work / measured ceiling) / measured time. The minimum work per op is
documented on each op's cost function (bytes for the memory-bound ops, matmul FLOPs for
linear_cross_entropy); the ceilings are a device-to-device copy and an 8192^3 bf16 matmul. Each
step's kernel time (torch.profiler's device time of the same forward + backward) and its roofline
fraction are recorded too: where the host needs longer for a step than the device, the timed step
is the host's and only the kernel time compares kernels.

Without CUDA (``--quick`` on a CPU machine) fusetune's ops run their PyTorch reference,
torch.compile targets the CPU, times are wall-clock, and peak memory and Liger are recorded as
errors: only the plumbing is exercised.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import common
import torch
import torch.nn.functional as F

BF16 = torch.bfloat16
BF16_BYTES = 2
IGNORE = -100
RMS_EPS = 1e-6
LN_EPS = 1e-5
SYSTEMS = ("fusetune", "torch_eager", "torch_compile", "liger")
COMPETITORS = ("torch_eager", "torch_compile", "liger")  # "matmul" is a floor, not a competitor

# Relative errors allowed: bf16 tensors carry one rounding (as the test suite's bf16 tolerance);
# losses are accumulated in float32 by every implementation, so they must agree much more closely.
TENSOR_TOLERANCE = 2e-2
LOSS_TOLERANCE = 1e-3


# --------------------------------------------------------------------------------------------
# Inputs. Each maker returns (inputs, grad_outputs): inputs named as fusetune's parameters, the
# grad_outputs handed to backward (None for a scalar loss).


def _leaf(*shape: int, grad: bool = True, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    """A random bf16 leaf tensor on the benchmark device (drawn in bf16: no float32 temporary)."""
    t = torch.randn(*shape, device=common.device(), dtype=BF16).mul_(scale).add_(shift)
    return t.requires_grad_(grad)


def _labels(tokens: int, vocab: int, variant: str) -> torch.Tensor:
    """Random labels; the ``half_ignored`` variant masks the first half (a prompt, as in SFT)."""
    labels = torch.randint(0, vocab, (tokens,), device=common.device())
    if variant.endswith("half_ignored"):
        labels[: tokens // 2] = IGNORE
    return labels


def make_rms_norm(s: dict, variant: str):
    """x (tokens, hidden) and a weight near 1, as a trained norm's."""
    x = _leaf(s["tokens"], s["hidden"])
    return {"x": x, "weight": _leaf(s["hidden"], scale=0.1, shift=1.0)}, (torch.randn_like(x),)


def make_add_rms_norm(s: dict, variant: str):
    """x, residual and weight; both outputs (normed, sum) receive a gradient, as in a decoder."""
    x = _leaf(s["tokens"], s["hidden"])
    inputs = {"x": x, "residual": _leaf(s["tokens"], s["hidden"]),
              "weight": _leaf(s["hidden"], scale=0.1, shift=1.0)}
    return inputs, (torch.randn_like(x), torch.randn_like(x))


def make_layer_norm(s: dict, variant: str):
    """x, a weight near 1 and a small bias."""
    x = _leaf(s["tokens"], s["hidden"])
    inputs = {"x": x, "weight": _leaf(s["hidden"], scale=0.1, shift=1.0),
              "bias": _leaf(s["hidden"], scale=0.1)}
    return inputs, (torch.randn_like(x),)


def make_glu(s: dict, variant: str):
    """gate and up projections (tokens, intermediate)."""
    gate = _leaf(s["tokens"], s["inter"])
    return {"gate": gate, "up": _leaf(s["tokens"], s["inter"])}, (torch.randn_like(gate),)


def make_rope(s: dict, variant: str):
    """q/k in the attention layout (batch, heads, seq, head_dim); cos/sin as the rotary module
    returns them: (batch, seq, head_dim), duplicated halves, cast to the activation dtype."""
    b, n, d = s["batch"], s["seq"], s["head_dim"]
    q, k = _leaf(b, s["q_heads"], n, d), _leaf(b, s["kv_heads"], n, d)
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, d, 2, device=common.device()) / d))
    angles = torch.outer(torch.arange(n, device=common.device(), dtype=torch.float32), inv_freq)
    emb = torch.cat((angles, angles), dim=-1).expand(b, n, d)
    inputs = {"q": q, "k": k, "cos": emb.cos().to(BF16), "sin": emb.sin().to(BF16)}
    return inputs, (torch.randn_like(q), torch.randn_like(k))


def make_cross_entropy(s: dict, variant: str):
    """bf16 logits (tokens, vocab) and labels; the loss is a scalar, so no grad_output."""
    logits = _leaf(s["tokens"], s["vocab"], scale=2.0)
    return {"logits": logits, "labels": _labels(s["tokens"], s["vocab"], variant)}, (None,)


def make_linear_cross_entropy(s: dict, variant: str):
    """Hidden ~ N(0, 1) and weight ~ N(0, 1/hidden), so logits ~ N(0, 1) as in a trained head."""
    inputs = {"hidden": _leaf(s["tokens"], s["hidden"]),
              "weight": _leaf(s["vocab"], s["hidden"], scale=s["hidden"] ** -0.5,
                              grad=not variant.startswith("frozen")),
              "labels": _labels(s["tokens"], s["vocab"], variant)}
    return inputs, (None,)


# --------------------------------------------------------------------------------------------
# Baselines: the maths as transformers writes it (bf16 activations, float32 where it upcasts).


def eager_rms_norm(x, weight):
    """LlamaRMSNorm.forward."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + RMS_EPS)
    return weight * h.to(x.dtype)


def eager_add_rms_norm(x, residual, weight):
    """The decoder layer's residual add followed by its RMSNorm."""
    total = x + residual
    return eager_rms_norm(total, weight), total


def eager_layer_norm(x, weight, bias):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, LN_EPS)


def eager_swiglu(gate, up):
    """LlamaMLP: act_fn(gate_proj(x)) * up_proj(x) with act_fn = silu."""
    return F.silu(gate) * up


def eager_geglu(gate, up):
    """Gemma's MLP with gelu_pytorch_tanh."""
    return F.gelu(gate, approximate="tanh") * up


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def eager_rope(q, k, cos, sin):
    """apply_rotary_pos_emb with unsqueeze_dim=1."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def eager_cross_entropy(logits, labels):
    """ForCausalLMLoss: logits upcast to float32, then F.cross_entropy."""
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE)


def eager_linear_cross_entropy(hidden, weight, labels):
    """lm_head then ForCausalLMLoss: full logits in bf16, upcast, cross-entropy."""
    return F.cross_entropy(F.linear(hidden, weight).float(), labels, ignore_index=IGNORE)


# --------------------------------------------------------------------------------------------
# Liger-Kernel 0.8.5: the autograd Functions from liger_kernel.ops, with the same arguments its
# nn.Module / functional wrappers pass (defaults of LigerRMSNorm, LigerFusedAddRMSNorm, ...).


def _liger(name: str):
    return getattr(importlib.import_module("liger_kernel.ops"), name)


def liger_rms_norm():
    fn = _liger("LigerRMSNormFunction")  # (X, W, eps, offset, casting_mode, in_place)
    return lambda x, weight: fn.apply(x, weight, RMS_EPS, 0.0, "llama", True)


def liger_add_rms_norm():
    fn = _liger("LigerFusedAddRMSNormFunction")  # (X, R, W, eps, offset, casting_mode, in_place)
    return lambda x, residual, weight: fn.apply(x, residual, weight, RMS_EPS, 0.0, "llama", False)


def liger_layer_norm():
    fn = _liger("LigerLayerNormFunction")  # (X, W, B, eps)
    return lambda x, weight, bias: fn.apply(x, weight, bias, LN_EPS)


def liger_swiglu():
    fn = _liger("LigerSiLUMulFunction")  # (a, b)
    return lambda gate, up: fn.apply(gate, up)


def liger_geglu():
    fn = _liger("LigerGELUMulFunction")  # (a, b); tanh-approximated GELU
    return lambda gate, up: fn.apply(gate, up)


def liger_rope():
    fn = _liger("LigerRopeFunction")  # (q, k, cos, sin, position_ids, unsqueeze_dim, rotary_dim)
    return lambda q, k, cos, sin: fn.apply(q, k, cos, sin, None, 1)


def liger_cross_entropy():
    fn = _liger("LigerCrossEntropyFunction")  # (input, target, weight, ignore_index, ...)
    return lambda logits, labels: fn.apply(logits, labels, None, IGNORE)[0]


def liger_linear_cross_entropy():
    # (input, weight, target, bias, ce_weight, ignore_index, ...)
    fn = _liger("LigerFusedLinearCrossEntropyFunction")
    return lambda hidden, weight, labels: fn.apply(hidden, weight, labels, None, None, IGNORE)[0]


# --------------------------------------------------------------------------------------------
# Minimum work per op, forward + backward. Memory-bound ops return bytes (bf16 elements x 2);
# parameter gradients are counted once (their cross-row reduction is not).


def bytes_rms_norm(s: dict, variant: str):
    """fwd reads x, w, writes y; bwd reads x, dy, w, writes dx, dw: 5 N H + 3 H elements."""
    return "bytes", BF16_BYTES * (5 * s["tokens"] * s["hidden"] + 3 * s["hidden"])


def bytes_add_rms_norm(s: dict, variant: str):
    """fwd reads x, r, w, writes y, s = x + r; bwd reads s, dy, ds, w, writes one tensor that is
    both dx and dr (they are equal), and dw: 8 N H + 3 H elements. Here x and r are both leaves,
    and autograd cannot store one tensor as two leaves' .grad, so the step also copies it once (a
    read and a write, 2 N H more; a system whose backward writes two tensors writes them instead;
    in a decoder the two gradients flow on, uncopied):
    10 N H + 3 H in all. (Before the eighteenth session the count left the copy out.)"""
    return "bytes", BF16_BYTES * (10 * s["tokens"] * s["hidden"] + 3 * s["hidden"])


def bytes_layer_norm(s: dict, variant: str):
    """fwd reads x, w, b, writes y; bwd reads x, dy, w, writes dx, dw, db: 5 N H + 5 H elements."""
    return "bytes", BF16_BYTES * (5 * s["tokens"] * s["hidden"] + 5 * s["hidden"])


def bytes_glu(s: dict, variant: str):
    """fwd reads gate, up, writes out; bwd reads gate, up, dout, writes dgate, dup: 8 N I."""
    return "bytes", BF16_BYTES * 8 * s["tokens"] * s["inter"]


def bytes_rope(s: dict, variant: str):
    """fwd reads q, k, cos, sin, writes q', k'; bwd reads dq', dk', cos, sin, writes dq, dk:
    4 (Q + K) + 4 C elements, Q/K the q/k sizes and C = batch * seq * head_dim."""
    per_head = s["batch"] * s["seq"] * s["head_dim"]
    return "bytes", BF16_BYTES * (4 * (s["q_heads"] + s["kv_heads"]) * per_head + 4 * per_head)


def bytes_cross_entropy(s: dict, variant: str):
    """Read every logit once and write every gradient once (the gradient can be formed in the
    forward pass, the loss being a scalar): 2 N V bf16 elements, plus N int64 labels."""
    return "bytes", BF16_BYTES * 2 * s["tokens"] * s["vocab"] + 8 * s["tokens"]


def flops_linear_cross_entropy(s: dict, variant: str):
    """logits = h W^T, grad_h = dlogits W and, when the weight trains, grad_W = dlogits^T h:
    2 N H V FLOPs each, over all N tokens (an op that skips ignored rows can exceed 1)."""
    matmuls = 2 if variant.startswith("frozen") else 3
    return "flops", matmuls * 2 * s["tokens"] * s["hidden"] * s["vocab"]


def lce_matmuls(inputs: dict, grad_outputs: tuple) -> None:
    """The ``matmul`` system: the bare bf16 matmuls of linear_cross_entropy (see its FLOPs), with
    the logits buffer standing in for dlogits."""
    hidden, weight = inputs["hidden"], inputs["weight"]
    with torch.no_grad():
        logits = hidden @ weight.T
        logits @ weight
        if weight.requires_grad:
            logits.T @ hidden


# --------------------------------------------------------------------------------------------
# The table of ops.


@dataclass(frozen=True)
class Op:
    """One fusetune op: where it lives, its shapes, and how every system runs it."""

    name: str
    module: str
    shapes: tuple[dict, ...]
    quick_shapes: tuple[dict, ...]
    make: Callable
    eager: Callable
    liger: Callable
    cost: Callable
    variants: tuple[str, ...] = ("default",)
    extra_steps: dict = field(default_factory=dict)

    def fusetune(self, reference: bool = False):
        """fusetune's op (or its ``_reference``), imported only when asked for."""
        module = importlib.import_module(f"fusetune.ops.{self.module}")
        return getattr(module, self.name + ("_reference" if reference else ""))


def _norm_shapes(key: str, pairs) -> tuple[dict, ...]:
    return tuple({"tokens": t, key: h} for t, h in pairs)


# Llama-3.2-1B / Qwen2.5-3B (2,048), Llama-3-8B (4,096) and Llama-3-70B (8,192) hidden sizes.
NORM = _norm_shapes("hidden", [(8192, 4096), (8192, 8192), (32768, 4096), (32768, 8192),
                               (8192, 2048), (32768, 2048)])
# Per-head norms (rows: tokens x heads): Qwen3-8B's q_norm (32 heads of 128) and Gemma-3-12B's
# q_norm (16 heads of 256), at 8,192 tokens; and vision towers' norms over 32,768 patches: CLIP
# ViT-L/14's LayerNorm (1,024) and SigLIP-so400m's (1,152, Gemma 3's tower), Qwen2.5-VL's RMSNorm
# (1,280).
HEAD_NORM = _norm_shapes("hidden", [(262144, 128), (131072, 256)])
VISION_NORM = _norm_shapes("hidden", [(32768, 1024), (32768, 1152)])
VISION_RMS_NORM = _norm_shapes("hidden", [(32768, 1280)])
# Hidden sizes that are not a power of two, of models users fine-tune, at 16,384 tokens: Gemma-2-2B
# (2,304), Gemma-3-4B (2,560), Llama-3.2-3B (3,072), Qwen2.5-7B (3,584), Gemma-3-12B (3,840),
# Qwen2.5-14B (5,120), Gemma-3-27B (5,376); LayerNorm at the same sizes (Phi-2's is 2,560). A row
# kernel holds such a row in the next power-of-two block, part of it masked.
ODD_NORM = _norm_shapes("hidden", [(16384, h) for h in (2304, 2560, 3072, 3584, 3840, 5120, 5376)])
# Llama-3-8B and Llama-3-70B MLP widths.
GLU = _norm_shapes("inter", [(8192, 14336), (32768, 14336), (8192, 28672)])
ROPE = tuple({"batch": 1, "seq": n, "q_heads": 32, "kv_heads": 8, "head_dim": 128}
             for n in (8192, 32768)) + (  # Llama-3-8B attention
    {"batch": 1, "seq": 32768, "q_heads": 32, "kv_heads": 8, "head_dim": 64},  # Llama-3.2-1B
    {"batch": 1, "seq": 8192, "q_heads": 16, "kv_heads": 8, "head_dim": 256},  # Gemma-3-12B
)
CE = tuple({"tokens": 8192, "vocab": v} for v in (128256, 152064, 262144))
LCE = ({"tokens": 8192, "hidden": 4096, "vocab": 128256},    # Llama-3-8B
       {"tokens": 16384, "hidden": 3584, "vocab": 152064},   # Qwen2.5-7B
       {"tokens": 8192, "hidden": 2304, "vocab": 262144})    # Gemma-2-2B hidden, Gemma-3 vocab
QUICK_NORM = _norm_shapes("hidden", [(64, 256)])
QUICK_GLU = _norm_shapes("inter", [(64, 512)])
QUICK_ROPE = ({"batch": 1, "seq": 64, "q_heads": 4, "kv_heads": 2, "head_dim": 64},)
QUICK_CE = ({"tokens": 64, "vocab": 1000},)
QUICK_LCE = ({"tokens": 64, "hidden": 128, "vocab": 1000},)

OPS = (
    Op("rms_norm", "rms_norm", NORM + HEAD_NORM + VISION_RMS_NORM + ODD_NORM, QUICK_NORM, make_rms_norm,
       eager_rms_norm, liger_rms_norm, bytes_rms_norm),
    Op("add_rms_norm", "rms_norm", NORM + ODD_NORM, QUICK_NORM, make_add_rms_norm, eager_add_rms_norm,
       liger_add_rms_norm, bytes_add_rms_norm),
    Op("layer_norm", "layer_norm", NORM + VISION_NORM + ODD_NORM, QUICK_NORM, make_layer_norm,
       eager_layer_norm, liger_layer_norm, bytes_layer_norm),
    Op("swiglu", "glu", GLU, QUICK_GLU, make_glu, eager_swiglu, liger_swiglu, bytes_glu),
    Op("geglu", "glu", GLU, QUICK_GLU, make_glu, eager_geglu, liger_geglu, bytes_glu),
    Op("rope", "rope", ROPE, QUICK_ROPE, make_rope, eager_rope, liger_rope, bytes_rope),
    Op("cross_entropy", "cross_entropy", CE, QUICK_CE, make_cross_entropy, eager_cross_entropy,
       liger_cross_entropy, bytes_cross_entropy),
    Op("linear_cross_entropy", "linear_cross_entropy", LCE, QUICK_LCE, make_linear_cross_entropy,
       eager_linear_cross_entropy, liger_linear_cross_entropy, flops_linear_cross_entropy,
       variants=("trainable_weight", "frozen_weight", "trainable_half_ignored", "frozen_half_ignored"),
       extra_steps={"matmul": lce_matmuls}),
)
OPS_BY_NAME = {op.name: op for op in OPS}


def config_of(op: Op, shape: dict, variant: str) -> dict:
    return {"op": op.name, **shape, "variant": variant}


def shapes_of(op: Op, quick: bool) -> tuple[dict, ...]:
    return op.quick_shapes if quick else op.shapes


def cases(op: Op, quick: bool) -> list[tuple[dict, str]]:
    """(shape, variant) pairs of an op, shapes outermost."""
    return [(s, v) for s in shapes_of(op, quick) for v in op.variants]


# --------------------------------------------------------------------------------------------
# Running a system.


def as_tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def forward_backward(forward: Callable, inputs: dict, grad_outputs: tuple) -> tuple:
    """Run ``forward`` on the inputs and backpropagate; gradients land in the inputs' ``.grad``."""
    outs = as_tuple(forward(**inputs))
    torch.autograd.backward(outs, grad_outputs)
    return outs


def autograd_step(forward: Callable) -> Callable:
    """A benchmark step (inputs, grad_outputs) for an autograd forward: forward then backward."""
    def step(inputs: dict, grad_outputs: tuple) -> None:
        forward_backward(forward, inputs, grad_outputs)
    return step


def steps_for(op: Op, compiled: Callable, wanted: tuple[str, ...]) -> dict:
    """{system: step builder}; a builder returns the step, or raises why the system cannot run."""
    builders = {
        "fusetune": lambda: autograd_step(op.fusetune()),
        "torch_eager": lambda: autograd_step(op.eager),
        "torch_compile": lambda: autograd_step(compiled),
        "liger": lambda: autograd_step(op.liger()),
        **{name: (lambda step=step: step) for name, step in op.extra_steps.items()},
    }
    return {name: build for name, build in builders.items() if name in wanted}


@dataclass
class Measured:
    """One system on one case: step time, kernel time and peak memory, each None with why when
    it could not be taken."""

    ms: float | None = None
    kernel_ms: float | None = None
    mib: float | None = None
    errors: dict = field(default_factory=dict)


def _optional(measured: Measured, name: str, take: Callable[[], float]) -> None:
    """Take one more measurement; a failure leaves it None and says why."""
    try:
        setattr(measured, name, take())
    except Exception as exc:
        measured.errors[name] = common.describe(exc)


def warm_step(op: Op, shape: dict, variant: str, step: Callable, warmup: int = 2) -> tuple[Callable, list]:
    """``(run, leaves)``: one forward + backward of ``step`` (a system's step) on the case's inputs,
    made here, each run with fresh gradients (as in training, rather than accumulated ones); run
    ``warmup`` times already (compile / autotune / warm caches)."""
    inputs, grad_outputs = op.make(shape, variant)
    leaves = [t for t in inputs.values() if t.requires_grad]

    def run():
        for leaf in leaves:
            leaf.grad = None
        step(inputs, grad_outputs)

    for _ in range(warmup):
        run()
    return run, leaves


def run_system(op: Op, shape: dict, variant: str, build: Callable, timing: dict) -> Measured:
    """Warm, time, then measure the kernel time and peak memory of one system on one case.

    Any failure before the time is taken propagates; the caller records it.
    """
    torch.manual_seed(0)
    run, leaves = warm_step(op, shape, variant, build())
    common.synchronize()
    measured = Measured(ms=common.time_fwd_bwd(run, grad_to_none=leaves, **timing))
    _optional(measured, "kernel_ms", lambda: common.kernel_ms(run))
    _optional(measured, "mib", lambda: common.peak_memory_mib(run))
    return measured


def measure(op: Op, shape: dict, variant: str, system: str, build: Callable, ceilings: dict,
            timing: dict) -> list[dict]:
    """Time, kernel time, peak memory and roofline fractions of one system on one case, as records.

    A failing or out-of-memory system is a result (value None, its error), not the end of the run.
    """
    try:
        measured = run_system(op, shape, variant, build, timing)
    except Exception as exc:
        error = common.describe(exc)
        measured = Measured(errors={"ms": error, "kernel_ms": error, "mib": error})
    common.release()
    config = config_of(op, shape, variant)
    extra = {"liger": common.environment()["liger"]} if system == "liger" else {}
    kind, work = op.cost(shape, variant)

    def fraction(ms: float | None) -> float | None:
        return None if ms is None else work / ceilings[kind] / (ms / 1000)

    def record(metric: str, value: float | None, source: str) -> dict:
        return common.record(system, config, metric, value, measured.errors.get(source), **extra)

    return [record(common.TIME, measured.ms, "ms"),
            record(common.MEMORY, measured.mib, "mib"),
            record(common.ROOFLINE, fraction(measured.ms), "ms"),
            record(common.KERNEL_TIME, measured.kernel_ms, "kernel_ms"),
            record(common.KERNEL_ROOFLINE, fraction(measured.kernel_ms), "kernel_ms")]


def compiled_eager(op: Op) -> Callable:
    """torch.compile of the op's eager function, fresh for each op.

    Dynamo is reset between ops and its recompile limit raised, so each distinct input signature
    (shape, or which inputs need grad) gets one static-shape compile and none falls back to eager.
    """
    torch._dynamo.reset()
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), 64))
    return torch.compile(op.eager, dynamic=False)


def benchmark(ops, wanted: tuple[str, ...], quick: bool, ceilings: dict, timing: dict) -> list:
    """Every (op, shape, variant, system) measurement, as records."""
    rows = []
    for op in ops:
        steps = steps_for(op, compiled_eager(op), wanted)
        for shape, variant in cases(op, quick):
            for system, build in steps.items():
                start = time.perf_counter()
                rows += measure(op, shape, variant, system, build, ceilings, timing)
                print(f"  {op.name} {common.shape_text(shape)} {variant} {system}: "
                      f"{time.perf_counter() - start:.1f} s", flush=True)
    return rows


# --------------------------------------------------------------------------------------------
# Correctness.


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (inf when out holds NaN or inf)."""
    out64, ref64 = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out64).all():
        return math.inf
    denom = ref64.norm().item()
    diff = (out64 - ref64).norm().item()
    return diff / denom if denom > 0 else diff


def _run_with_grads(forward: Callable, op: Op, shape: dict, variant: str) -> list[torch.Tensor]:
    """Outputs then input gradients of one seeded forward+backward."""
    torch.manual_seed(0)
    inputs, grad_outputs = op.make(shape, variant)
    outs = forward_backward(forward, inputs, grad_outputs)
    return [o.detach() for o in outs] + [t.grad for t in inputs.values() if t.requires_grad]


def tolerance(tensor: torch.Tensor) -> float:
    return LOSS_TOLERANCE if tensor.numel() == 1 else TENSOR_TOLERANCE


def check_against_reference(op: Op, shape: dict, variant: str) -> tuple[float, bool]:
    """Max relative error of fusetune's outputs and gradients against its reference."""
    got = _run_with_grads(op.fusetune(), op, shape, variant)
    want = _run_with_grads(op.fusetune(reference=True), op, shape, variant)
    errors = [(relative_error(g, w), tolerance(w)) for g, w in zip(got, want, strict=True)]
    return max(e for e, _ in errors), all(e <= tol for e, tol in errors)


# Large-vocabulary checks: past 2^31 logits elements (int32 offsets overflow there).
BIG_CE = {"tokens": 16384, "vocab": 262144}
BIG_LCE = {"tokens": 16384, "hidden": 2304, "vocab": 262144}
QUICK_BIG_CE = {"tokens": 64, "vocab": 3000}
QUICK_BIG_LCE = {"tokens": 64, "hidden": 64, "vocab": 3000}
CHUNK = 1024  # rows of float32 logits the chunked reference holds at once


def big_labels(tokens: int, vocab: int) -> torch.Tensor:
    """Random labels with every 5th ignored, including rows in the last chunk."""
    labels = torch.randint(0, vocab, (tokens,), device=common.device())
    labels[::5] = IGNORE
    return labels


def chunked_lse_loss(logits_of: Callable, labels: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Per-row float32 logsumexp and the mean loss over labelled rows, CHUNK rows at a time.

    ``logits_of(rows)`` returns float32 logits for a slice of rows; the full float32 logits are
    never held.
    """
    lse = torch.empty(labels.shape[0], device=labels.device, dtype=torch.float32)
    total = torch.zeros((), device=labels.device, dtype=torch.float64)
    for start in range(0, labels.shape[0], CHUNK):
        rows = slice(start, start + CHUNK)
        z, y = logits_of(rows), labels[rows]
        lse[rows] = torch.logsumexp(z, dim=-1)
        picked = z.gather(1, y.clamp(min=0)[:, None])[:, 0]
        total += ((lse[rows] - picked) * (y != IGNORE)).double().sum()
    return lse, total.item() / (labels != IGNORE).sum().item()


def softmax_grad(z: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor,
                 columns: torch.Tensor, n_valid: int) -> torch.Tensor:
    """d(mean loss)/d logits for rows (z, lse, labels) restricted to vocab ``columns``."""
    onehot = (labels[:, None] == columns[None, :]).float()
    return (torch.exp(z - lse[:, None]) - onehot) * (labels != IGNORE)[:, None] / n_valid


def sample_rows(tokens: int) -> torch.Tensor:
    """Rows checked for gradients: the first and the last CHUNK//4 (past the 2^31 boundary)."""
    part = min(CHUNK // 4, tokens // 2)
    return torch.cat((torch.arange(part), torch.arange(tokens - part, tokens))).to(common.device())


def check_big_cross_entropy(shape: dict) -> tuple[float, bool]:
    """cross_entropy on bf16 logits with more than 2^31 elements: loss and sampled grad rows."""
    torch.manual_seed(0)
    n, v = shape["tokens"], shape["vocab"]
    logits = _leaf(n, v, scale=2.0)
    labels = big_labels(n, v)
    loss = OPS_BY_NAME["cross_entropy"].fusetune()(logits, labels)
    loss.backward()
    x = logits.detach()
    lse, ref_loss = chunked_lse_loss(lambda rows: x[rows].float(), labels)
    rows = sample_rows(n)
    n_valid = int((labels != IGNORE).sum())
    ref_grad = softmax_grad(x[rows].float(), lse[rows], labels[rows],
                            torch.arange(v, device=labels.device), n_valid)
    finite = bool(torch.isfinite(logits.grad).all())
    return _summarise([(abs(loss.item() - ref_loss) / abs(ref_loss), LOSS_TOLERANCE),
                       (relative_error(logits.grad[rows], ref_grad), TENSOR_TOLERANCE)], finite)


def check_big_linear_cross_entropy(shape: dict, frozen: bool = False) -> tuple[float, bool]:
    """linear_cross_entropy whose logits would exceed 2^31 elements: loss, sampled grad_hidden rows
    and (unless the weight is ``frozen``) sampled grad_weight rows, against float32 maths."""
    torch.manual_seed(0)
    n, h, v = shape["tokens"], shape["hidden"], shape["vocab"]
    hidden, weight = _leaf(n, h), _leaf(v, h, scale=h**-0.5, grad=not frozen)
    labels = big_labels(n, v)
    loss = OPS_BY_NAME["linear_cross_entropy"].fusetune()(hidden, weight, labels)
    loss.backward()
    h32, w32 = hidden.detach().float(), weight.detach().float()
    lse, ref_loss = chunked_lse_loss(lambda rows: h32[rows] @ w32.T, labels)
    n_valid = int((labels != IGNORE).sum())
    rows = sample_rows(n)
    d_rows = softmax_grad(h32[rows] @ w32.T, lse[rows], labels[rows],
                          torch.arange(v, device=labels.device), n_valid)
    errors = [(abs(loss.item() - ref_loss) / abs(ref_loss), LOSS_TOLERANCE),
              (relative_error(hidden.grad[rows], d_rows @ w32), TENSOR_TOLERANCE)]
    finite = bool(torch.isfinite(hidden.grad).all())
    if not frozen:
        vocab_ids = torch.cat((labels[rows[-8:]].clamp(min=0), sample_rows(v)))
        d_cols = softmax_grad(h32 @ w32[vocab_ids].T, lse, labels, vocab_ids, n_valid)
        errors.append((relative_error(weight.grad[vocab_ids], d_cols.T @ h32), TENSOR_TOLERANCE))
        finite = finite and bool(torch.isfinite(weight.grad).all())
    return _summarise(errors, finite)


def _summarise(errors: list[tuple[float, float]], finite: bool) -> tuple[float, bool]:
    """(max error, passed) from (error, tolerance) pairs and whether all gradients were finite."""
    return max(e for e, _ in errors), finite and all(e <= tol for e, tol in errors)


def correctness(ops, quick: bool) -> list[dict]:
    """fusetune against its reference at the first real shape of each op and variant, plus the
    past-2^31 cross-entropy cases against chunked float32 maths; one record per check."""
    checks = [(config_of(op, shapes_of(op, quick)[0], v),
               lambda op=op, v=v: check_against_reference(op, shapes_of(op, quick)[0], v))
              for op in ops for v in op.variants]
    names = {op.name for op in ops}
    for name, check, big, quick_big in (
            ("cross_entropy", check_big_cross_entropy, BIG_CE, QUICK_BIG_CE),
            ("linear_cross_entropy", check_big_linear_cross_entropy, BIG_LCE, QUICK_BIG_LCE)):
        if name in names:
            shape = quick_big if quick else big
            checks.append(({"op": name, **shape, "variant": "over_2^31"},
                           lambda check=check, shape=shape: check(shape)))
    if "linear_cross_entropy" in names:  # the frozen weight's path, a vocabulary slice at a time
        shape = QUICK_BIG_LCE if quick else BIG_LCE
        checks.append(({"op": "linear_cross_entropy", **shape, "variant": "over_2^31_frozen"},
                       lambda shape=shape: check_big_linear_cross_entropy(shape, frozen=True)))
    return [run_check(config, check) for config, check in checks]


def run_check(config: dict, check: Callable) -> dict:
    """Run one correctness check, print and record it (an exception counts as a failure)."""
    label = f"{config['op']} {common.shape_text(config)} {config['variant']}"
    try:
        error, passed = check()
        row = common.record("fusetune", config, common.ERROR, error, passed=passed)
    except Exception as exc:
        row = common.record("fusetune", config, common.ERROR, None, common.describe(exc),
                            passed=False)
    common.release()
    status = "ok" if row["passed"] else "FAIL"
    shown = f"{row['value']:.2e}" if row["value"] is not None else row["error"]
    print(f"  [{status}] {label}: max rel error {shown}", flush=True)
    return row



# --------------------------------------------------------------------------------------------
# Output.


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_table(rows: list[dict]) -> None:
    """op, shape, variant, system, ms, MiB, roofline fraction, speed vs the fastest other system."""
    header = ("op", "shape", "variant", "system", "ms", "MiB", "roofline", "speed vs best other")
    lines = [header]
    for (op, shape, variant), systems in common.index(rows).items():
        for system in systems:
            others = [s for s in COMPETITORS + ("fusetune",) if s != system]
            lines.append((op, shape, variant, system,
                          _fmt(common.value(systems, system, common.TIME), ".3f"),
                          _fmt(common.value(systems, system, common.MEMORY), ".0f"),
                          _fmt(common.value(systems, system, common.ROOFLINE), ".2f"),
                          _fmt(common.speed_ratio(systems, system, others), ".2f")))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the JSON lines")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few reps (plumbing)")
    parser.add_argument(
        "--tag", default=None, help="results file is ops-<tag>.jsonl (default: h200 on CUDA, else cpu)"
    )
    parser.add_argument("--ops", default=",".join(op.name for op in OPS), help="comma list")
    parser.add_argument("--systems", default=",".join(SYSTEMS + ("matmul",)), help="comma list")
    parser.add_argument("--skip-correctness", action="store_true")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # fusetune from this checkout
    ops = [OPS_BY_NAME[name] for name in args.ops.split(",")]
    wanted = tuple(args.systems.split(","))
    tag = args.tag or ("h200" if torch.cuda.is_available() else "cpu")  # a CPU run keeps off the H200 file
    path = common.open_results(args.out / f"ops-{tag}.jsonl")
    print(f"environment: {common.environment()}\nresults: {path}", flush=True)
    timing = {"warmup": 1, "rep": 5} if args.quick else {"warmup": 25, "rep": 100}
    ceilings = common.measure_ceilings(2**26 if args.quick else 2**32,
                                       256 if args.quick else 8192, **timing)
    print(f"ceilings: copy {ceilings['bytes'] / 1e9:.0f} GB/s, "
          f"bf16 matmul {ceilings['flops'] / 1e12:.0f} TFLOP/s", flush=True)
    checks = [] if args.skip_correctness else correctness(ops, args.quick)
    rows = benchmark(ops, wanted, args.quick, ceilings, timing)
    print_table(rows)
    failed = [c for c in checks if not c["passed"]]
    if failed:
        print(f"{len(failed)} correctness check(s) failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
