"""Whole-model checks of ``fusetune.apply`` on a GPU: parity of a patched model with its unpatched
deep copy, and the peak memory of a fine-tuning step at real model sizes.

    python bench/patch_gpu.py --out DIR [--quick] [--tag h200] [--skip-parity] [--skip-memory]
                              [--variants lora,frozen]

Records go to DIR/patch-<tag>.jsonl (tag "h200" by default), each appended as soon as it is taken;
a summary table is printed at the end and the exit status is non-zero when a check failed.

Parity (``op`` "apply_parity"). Small random-weight llama, qwen2, gemma3_text and qwen2_5_vl models
(2 layers, sdpa attention; the VLM gets one image per sequence) are built in bf16 on CUDA, deep
copied, and one copy is patched. Both run forward+backward in train mode on the same batch (batch
2, 256 tokens, some labels -100). Recorded: the loss relative difference and the gradient relative
error, per parameter (the maximum over parameters, with its name) and over all parameters together
(the norm-weighted global one, ||g - g_ref|| / ||g_ref|| over the concatenated gradients). Passing
needs loss rel diff <= 2e-2 and global gradient error <= 5e-2.

Memory (``op`` "apply_memory"). Llama-3.1-8B and Qwen2.5-VL-7B-Instruct architectures, random bf16
weights built directly on the GPU without initialisation cost, one sequence of 4,096 tokens (labels
valid except the first 10%), train mode, gradient checkpointing (non-reentrant). Two settings,
each run unpatched and then patched on the same model instance: ``lora`` (PEFT LoRA r=16 on
q,k,v,o,gate,up,down, the usual fine-tuning set-up) and ``frozen`` (every base weight frozen,
``enable_input_require_grads`` so backward runs through the layers). Recorded per run: the static
memory allocated before the step, the peak allocated during one forward+backward (after a warm-up
step), and the full logits' size (tokens x vocab, x4 bytes in the float32 that transformers' loss
upcasts to, x2 in bf16). The check, from the issue: the patched step's peak over static must stay
below the float32 logits alone, and the unpatched peak must exceed the patched one by at least the
bf16 logits. The VLM input is text only (the memory claim is about the loss over the text vocab).

``--quick`` uses tiny configs for both parts and runs anywhere: without CUDA (set
``TRITON_INTERPRET=1`` so that fusetune's Triton kernels run in the interpreter) parity runs in
float32 with float32 tolerances and the memory part runs its steps but records its numbers as
errors, so only the script's logic is exercised.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import common
import torch

IGNORE = -100
GIB = 2**30
BF16 = torch.bfloat16

# (loss relative difference, global gradient relative error) allowed per parity dtype. In bf16 the
# two models do not round alike: fusetune's fused kernels keep float32 inside and round to bf16 once
# per op, where eager bf16 rounds after each of its small ops (RMSNorm's scale, the activation, the
# product, the log-softmax pieces), so the reference is itself off by a few bf16 ulps per layer;
# the bounds leave room for that, not for a wrong formula. float32 (the CPU --quick run) must agree
# to float32 rounding.
TOLERANCES = {torch.bfloat16: (2e-2, 5e-2), torch.float32: (1e-4, 1e-3)}

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = ("lora", "frozen")


# --------------------------------------------------------------------------------------------
# Model configurations.


@dataclass(frozen=True)
class Spec:
    """One model: its name in records, how to make its config, and whether it takes images."""

    name: str
    config: Callable[[], object]
    vlm: bool = False


def _text_config(model_type: str, **fields):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **fields)


def _small_vlm_config(quick: bool):
    """A 2-layer Qwen2.5-VL with a 2-block vision tower; M-RoPE sections sum to head_dim / 2."""
    from transformers import Qwen2_5_VLConfig

    hidden, heads, vocab = (64, 4, 512) if quick else (256, 4, 4096)
    head_dim = hidden // heads
    section = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]
    text = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=1024,
                rms_norm_eps=1e-6, use_sliding_window=False, bos_token_id=None, eos_token_id=None,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": section})
    vision = dict(depth=2, hidden_size=32 if quick else 128, intermediate_size=64 if quick else 256,
                  num_heads=2, in_channels=3, out_hidden_size=hidden, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1], tokens_per_second=2)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                            vision_start_token_id=vocab - 4, vision_end_token_id=vocab - 3,
                            image_token_id=vocab - 2, video_token_id=vocab - 1)


def parity_specs(quick: bool) -> list[Spec]:
    """The four small parity models (hidden 256-512, vocab 4k-32k; tinier with --quick)."""
    if quick:
        small = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=256)
        sizes = {"llama": dict(small, vocab_size=512), "qwen2": dict(small, vocab_size=384),
                 "gemma3_text": dict(small, vocab_size=640, head_dim=16, query_pre_attn_scalar=16,
                                     sliding_window=8)}
    else:
        sizes = {
            "llama": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=32000, max_position_embeddings=1024),
            "qwen2": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=6,
                          num_key_value_heads=2, vocab_size=16384, max_position_embeddings=1024),
            "gemma3_text": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=1, head_dim=128,
                                query_pre_attn_scalar=128, vocab_size=8192, max_position_embeddings=1024,
                                sliding_window=128),
        }
    # Gemma 3: one sliding and one full layer, and the final-logit soft-cap the fused loss applies.
    sizes["gemma3_text"].update(layer_types=["sliding_attention", "full_attention"],
                                final_logit_softcapping=30.0)
    specs = [Spec(name, lambda name=name, fields=fields: _text_config(name, **fields))
             for name, fields in sizes.items()]
    return specs + [Spec("qwen2_5_vl", lambda: _small_vlm_config(quick), vlm=True)]


def llama31_8b_config():
    """meta-llama/Llama-3.1-8B's config.json, written out."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, hidden_act="silu",
        max_position_embeddings=131072, rms_norm_eps=1e-5, attention_bias=False, mlp_bias=False,
        tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001, initializer_range=0.02,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
    )


def qwen25_vl_7b_config():
    """Qwen/Qwen2.5-VL-7B-Instruct's config.json, written out from memory of the published file
    (8.29B parameters, as published). The file's ``rope_theta`` and ``rope_scaling`` ({"type":
    "mrope", "mrope_section": [16, 24, 24]}) are given in transformers 5's ``rope_parameters`` form,
    and its vision ``in_chans`` as ``in_channels``."""
    from transformers import Qwen2_5_VLConfig

    text = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, hidden_act="silu",
                max_position_embeddings=128000, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                 "mrope_section": [16, 24, 24]}, sliding_window=32768,
                use_sliding_window=False, max_window_layers=28, attention_dropout=0.0,
                bos_token_id=151643, eos_token_id=151645, initializer_range=0.02)
    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3,
                  out_hidden_size=3584, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                  window_size=112, fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2,
                  hidden_act="silu")
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                            image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                            vision_end_token_id=151653)


def memory_specs(quick: bool) -> list[Spec]:
    """The two real-size models (tiny stand-ins with --quick)."""
    if quick:
        return [Spec("llama-3.1-8b", lambda: _text_config(
                    "llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)),
                Spec("qwen2.5-vl-7b", lambda: _small_vlm_config(quick=True), vlm=True)]
    return [Spec("llama-3.1-8b", llama31_8b_config), Spec("qwen2.5-vl-7b", qwen25_vl_7b_config, vlm=True)]


# --------------------------------------------------------------------------------------------
# Building models and inputs.


def _no_init_weights():
    """transformers' context that skips weight initialisation (its module moved across 5.x)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def _fill(model: torch.nn.Module, std: float) -> None:
    """Random weights for an uninitialised model: normal(0, std) matrices, ones in norm weights,
    zeros in biases (Llama / Qwen norms scale by their weight)."""
    with torch.no_grad():
        for module in model.modules():
            is_norm = "norm" in type(module).__name__.lower()
            for param in module.parameters(recurse=False):
                if param.dim() > 1:
                    param.normal_(0.0, std)
                else:
                    param.fill_(1.0 if is_norm else 0.0)


def build(spec: Spec, dtype: torch.dtype, seed: int, fast_init: bool = False) -> torch.nn.Module:
    """``spec``'s model with random weights, created directly on the benchmark device, in train mode.

    ``fast_init`` skips transformers' initialisation (tens of seconds on a CPU for 8B parameters,
    and pointless here) and fills the weights with one random call per tensor on the device.
    """
    import transformers

    config = spec.config()
    auto = transformers.AutoModelForImageTextToText if spec.vlm else transformers.AutoModelForCausalLM
    torch.manual_seed(seed)
    context = _no_init_weights() if fast_init else contextlib.nullcontext()
    with torch.device(common.device()), context:
        model = auto.from_config(config, dtype=dtype, attn_implementation="sdpa")
    if fast_init:
        _fill(model, getattr(config.get_text_config(), "initializer_range", 0.02))
    return model.train()


def _vocab(model: torch.nn.Module) -> int:
    return model.config.get_text_config().vocab_size


_SPECIAL_IDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


def _text_ids(config) -> int:
    """Upper bound of random text ids: below a VLM's image/video tokens (a stray image token
    without pixels is an error), else the whole vocabulary."""
    special = [getattr(config, name) for name in _SPECIAL_IDS if getattr(config, name, None) is not None]
    return min([config.get_text_config().vocab_size, *special])


def text_inputs(vocab: int, batch: int, tokens: int, seed: int, ignore_fraction: float | None = None) -> dict:
    """Random token ids and labels. Labels are ids (transformers shifts them); -100 on the first
    ``ignore_fraction`` of every sequence, or by default on a prompt in the first sequence and a
    tail in the last."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, tokens), generator=generator)
    labels = ids.clone()
    if ignore_fraction is not None:
        labels[:, : int(tokens * ignore_fraction)] = IGNORE
    else:
        labels[0, : tokens // 4] = IGNORE
        labels[-1, -tokens // 8:] = IGNORE
    return {"input_ids": ids, "labels": labels}


def image_inputs(config, batch: int, tokens: int, seed: int, grid: int) -> dict:
    """Text with one ``grid`` x ``grid``-patch image per sequence (after 4 text tokens), for a
    Qwen2.5-VL: ids with the image's placeholder tokens, labels -100 on the image span,
    ``pixel_values`` (patches x 3*2*14*14) and ``image_grid_thw``."""
    vision = config.vision_config
    inputs = text_inputs(_text_ids(config), batch, tokens, seed)
    placeholders = grid * grid // vision.spatial_merge_size**2
    start = 4
    ids, labels = inputs["input_ids"], inputs["labels"]
    ids[:, start] = config.vision_start_token_id
    ids[:, start + 1: start + 1 + placeholders] = config.image_token_id
    ids[:, start + 1 + placeholders] = config.vision_end_token_id
    labels[:, start: start + 2 + placeholders] = IGNORE
    patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    generator = torch.Generator().manual_seed(seed + 1)
    inputs["pixel_values"] = torch.randn(batch * grid * grid, patch, generator=generator)
    inputs["image_grid_thw"] = torch.tensor([[1, grid, grid]] * batch)
    return inputs


def to_device(inputs: dict, dtype: torch.dtype) -> dict:
    """Inputs on the benchmark device; floating tensors (pixels) in the model's dtype."""
    return {key: value.to(common.device(), dtype=dtype if value.is_floating_point() else None)
            for key, value in inputs.items()}


def loss_and_backward(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """Fresh gradients, one forward (only the loss is kept) and its backward; the detached loss."""
    model.zero_grad(set_to_none=True)
    loss = model(**inputs, use_cache=False).loss
    loss.backward()
    return loss.detach().float()


def patched_kinds(report) -> str:
    """'rms_norm 5, glu 2, loss 1' from a PatchReport."""
    return ", ".join(f"{kind} {len(names)}" for kind, names in report.patched.items() if names)


def loss_left_alone(report) -> str | None:
    """Why the fused loss was not installed, or None when it was."""
    reasons = report.left_alone.get("loss") or []
    return "; ".join(f"{name}: {reason}" for name, reason in reasons) or None


# --------------------------------------------------------------------------------------------
# Parity.


def relative_error(diff_sq: float, ref_sq: float) -> float:
    """sqrt(diff_sq / ref_sq) (the absolute error when the reference is 0)."""
    return math.sqrt(diff_sq / ref_sq) if ref_sq > 0 else math.sqrt(diff_sq)


def gradient_errors(model: torch.nn.Module, reference: torch.nn.Module) -> tuple[float, str, float]:
    """(max per-parameter relative error, that parameter's name, global relative error)."""
    ours = {name: p for name, p in model.named_parameters() if p.requires_grad}
    theirs = {name: p for name, p in reference.named_parameters() if p.requires_grad}
    if ours.keys() != theirs.keys():
        raise AssertionError(f"parameter names differ: {sorted(ours.keys() ^ theirs.keys())[:4]}")
    worst, worst_name, diff_total, ref_total = -1.0, "", 0.0, 0.0
    for name, param in ours.items():
        grad, ref = param.grad, theirs[name].grad
        if (grad is None) != (ref is None):
            raise AssertionError(f"{name}: gradient present in only one model")
        if grad is None:
            continue
        diff_sq = (grad.double() - ref.double()).square().sum().item()
        ref_sq = ref.double().square().sum().item()
        error = relative_error(diff_sq, ref_sq) if math.isfinite(diff_sq) else math.inf
        if error > worst:
            worst, worst_name = error, name
        diff_total += diff_sq
        ref_total += ref_sq
    if worst < 0:
        raise AssertionError("no parameter received a gradient")
    return worst, worst_name, relative_error(diff_total, ref_total)


def parity(spec: Spec, dtype: torch.dtype, quick: bool) -> dict:
    """Patched vs unpatched deep copy of one small model: records and a summary row."""
    import fusetune

    variant = "bf16" if dtype == BF16 else "fp32"
    config = {"op": "apply_parity", "model": spec.name, "variant": variant}
    loss_tol, grad_tol = TOLERANCES[dtype]
    row = {"check": "parity", "model": spec.name, "variant": variant}
    try:
        reference = build(spec, dtype, seed=0)
        model = copy.deepcopy(reference)
        report = fusetune.apply(model)
        tokens = 32 if quick else 256
        if spec.vlm:
            inputs = image_inputs(model.config, batch=2, tokens=tokens, seed=0, grid=4 if quick else 8)
        else:
            inputs = text_inputs(_text_ids(model.config), batch=2, tokens=tokens, seed=0)
        inputs = to_device(inputs, dtype)
        loss = loss_and_backward(model, inputs)
        ref_loss = loss_and_backward(reference, inputs)
        loss_diff = relative_error((loss - ref_loss).double().square().item(),
                                   ref_loss.double().square().item())
        if not math.isfinite(loss.item()):
            loss_diff = math.inf
        worst, worst_name, global_error = gradient_errors(model, reference)
    except Exception as exc:
        error = common.describe(exc)
        for metric in ("loss_rel_diff", "grad_rel_err"):
            common.record("fusetune", config, metric, None, error, passed=False)
        print(f"  [FAIL] parity {spec.name} {variant}: {error}", flush=True)
        return {**row, "status": "FAIL", "detail": error}
    finally:
        model = reference = None
        common.release()
    loss_ok, grad_ok = loss_diff <= loss_tol, global_error <= grad_tol
    extra = {"patched": patched_kinds(report), "loss_left_alone": loss_left_alone(report)}
    common.record("fusetune", config, "loss_rel_diff", loss_diff, passed=loss_ok, tolerance=loss_tol,
                  loss=loss.item(), reference_loss=ref_loss.item(), **extra)
    common.record("fusetune", config, "grad_rel_err", global_error, passed=grad_ok, tolerance=grad_tol,
                  max_param_rel_err=worst, max_param=worst_name, **extra)
    status = "ok" if loss_ok and grad_ok else "FAIL"
    detail = (f"loss {loss_diff:.1e} (<= {loss_tol:.0e}), grad {global_error:.1e} (<= {grad_tol:.0e}), "
              f"worst param {worst:.1e} ({worst_name}); patched: {extra['patched']}")
    if extra["loss_left_alone"]:
        detail += f"; loss NOT fused: {extra['loss_left_alone']}"
    print(f"  [{status}] parity {spec.name} {variant}: {detail}", flush=True)
    return {**row, "status": status, "detail": detail}


# --------------------------------------------------------------------------------------------
# Memory.


def logits_bytes(tokens: int, vocab: int) -> tuple[int, int]:
    """Bytes of the full logits in float32 (transformers' loss upcasts to it) and in bf16."""
    return tokens * vocab * 4, tokens * vocab * 2


def measure(model: torch.nn.Module, inputs: dict) -> dict:
    """One warm-up step, then static and peak allocated bytes of one forward+backward and its loss.

    The warm-up takes the one-off allocations (cuBLAS workspace, kernel launch state) out of the
    measured step. Without CUDA the step still runs (plumbing) and the sizes are None.
    """
    loss_and_backward(model, inputs)
    model.zero_grad(set_to_none=True)
    common.release()
    losses = []

    def step() -> None:
        losses.append(loss_and_backward(model, inputs).item())

    if not torch.cuda.is_available():
        step()
        return {"static": None, "peak": None, "loss": losses[0]}
    static = torch.cuda.memory_allocated()
    added = common.peak_memory_mib(step) * common.MIB
    model.zero_grad(set_to_none=True)
    return {"static": static, "peak": static + added, "loss": losses[0]}


def run_system(model, inputs, system: str, config: dict) -> dict:
    """Measure one system and record static_gib / peak_allocated_gib; {"error": ...} when it failed."""
    try:
        result = measure(model, inputs)
    except Exception as exc:  # torch.OutOfMemoryError above all: the unpatched step may not fit
        result = {"error": common.describe(exc)}
    finally:
        model.zero_grad(set_to_none=True)
        common.release()
    if "error" in result:
        for metric in ("static_gib", "peak_allocated_gib"):
            common.record(system, config, metric, None, result["error"])
        print(f"    {system}: {result['error']}", flush=True)
        return result
    if result["static"] is None:
        for metric in ("static_gib", "peak_allocated_gib"):
            common.record(system, config, metric, None, "no CUDA: memory is measured with the CUDA "
                          "caching allocator; the step ran for plumbing only", loss=result["loss"])
        print(f"    {system}: step ran (loss {result['loss']:.4f}); no CUDA, no memory numbers", flush=True)
        return result
    common.record(system, config, "static_gib", result["static"] / GIB, loss=result["loss"])
    common.record(system, config, "peak_allocated_gib", result["peak"] / GIB, loss=result["loss"],
                  step_gib=(result["peak"] - result["static"]) / GIB)
    print(f"    {system}: static {result['static'] / GIB:.2f} GiB, peak {result['peak'] / GIB:.2f} GiB "
          f"(step +{(result['peak'] - result['static']) / GIB:.2f} GiB), loss {result['loss']:.4f}",
          flush=True)
    return result


def verdict(config: dict, unpatched: dict, patched: dict, fp32_bytes: int, bf16_bytes: int,
            loss_fused: bool) -> tuple[str, str]:
    """Record the memory check and return (status, detail)."""
    if "error" in patched:
        common.record("fusetune", config, "memory_check", None, patched["error"], passed=False)
        return "FAIL", f"patched step failed: {patched['error']}"
    if patched["static"] is None:
        common.record("fusetune", config, "memory_check", None, "no CUDA: not measured", passed=None)
        before = "failed" if "error" in unpatched else f"{unpatched['loss']:.4f}"
        return "skip", (f"no CUDA, not measured; steps ran (loss unpatched {before}, "
                        f"patched {patched['loss']:.4f})")
    step = patched["peak"] - patched["static"]
    below_logits = step < fp32_bytes
    if "error" in unpatched:  # the unpatched step could not run at all (OOM): nothing to compare
        saving, below_unpatched = None, "out of memory" in unpatched["error"].lower()
    else:
        saving = unpatched["peak"] - patched["peak"]
        below_unpatched = saving >= bf16_bytes
    passed = below_logits and below_unpatched
    common.record("fusetune", config, "memory_check", float(passed), passed=passed, loss_fused=loss_fused,
                  patched_step_gib=step / GIB, limit_fp32_logits_gib=fp32_bytes / GIB,
                  saving_gib=None if saving is None else saving / GIB, needed_saving_gib=bf16_bytes / GIB,
                  unpatched_error=unpatched.get("error"))
    shown_saving = "n/a (unpatched OOM)" if saving is None else f"{saving / GIB:.2f} GiB"
    detail = (f"patched step +{step / GIB:.2f} GiB (< fp32 logits {fp32_bytes / GIB:.2f}: "
              f"{'yes' if below_logits else 'NO'}); saving vs unpatched {shown_saving} "
              f"(>= bf16 logits {bf16_bytes / GIB:.2f}: {'yes' if below_unpatched else 'NO'}); "
              f"static {patched['static'] / GIB:.1f} GiB")
    if not loss_fused:
        detail += "; loss NOT fused"
    return ("ok" if passed else "FAIL"), detail


def _lora(model: torch.nn.Module):
    import peft

    config = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS,
                             task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


def memory(spec: Spec, quick: bool, variants: tuple[str, ...]) -> list[dict]:
    """Both settings of one real-size model: build once, measure unpatched, patch, measure, unpatch."""
    import fusetune

    dtype = BF16 if torch.cuda.is_available() else torch.float32
    tokens = 64 if quick else 4096
    rows = []
    model = peft_model = target = report = None
    common.release()  # the previous model's last references went with its call's frame
    try:
        model = build(spec, dtype, seed=0, fast_init=True)
        vocab = _vocab(model)
        fp32_bytes, bf16_bytes = logits_bytes(tokens, vocab)
        inputs = text_inputs(_text_ids(model.config), batch=1, tokens=tokens, seed=0, ignore_fraction=0.1)
        inputs = to_device(inputs, dtype)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.requires_grad_(False)
        print(f"  {spec.name}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, "
              f"{tokens} tokens, vocab {vocab}", flush=True)
        for variant in variants:
            label = f"{'bf16' if dtype == BF16 else 'fp32'}_{variant}_gc"
            config = {"op": "apply_memory", "model": spec.name, "tokens": tokens, "variant": label}
            common.record("transformers", config, "logits_gib", fp32_bytes / GIB, dtype="float32",
                          bf16_gib=bf16_bytes / GIB)
            print(f"   {variant}:", flush=True)
            if variant == "lora":
                peft_model = _lora(model)
                target = peft_model
            else:
                model.enable_input_require_grads()
                target = model
            unpatched = run_system(target, inputs, "transformers", config)
            report = fusetune.apply(target)
            loss_fused = bool(report.patched["loss"])
            if not loss_fused:
                print(f"    loss NOT fused: {loss_left_alone(report)}", flush=True)
            patched = run_system(target, inputs, "fusetune", config)
            fusetune.unapply(target)
            status, detail = verdict(config, unpatched, patched, fp32_bytes, bf16_bytes, loss_fused)
            print(f"  [{status}] memory {spec.name} {label}: {detail}", flush=True)
            rows.append({"check": "memory", "model": spec.name, "variant": label, "status": status,
                         "detail": detail})
            if variant == "lora":
                model = peft_model.unload()  # the base model again, LoRA layers removed
                peft_model = target = None
            else:
                model.disable_input_require_grads()
                target = None
    except Exception as exc:
        error = common.describe(exc)
        common.record("fusetune", {"op": "apply_memory", "model": spec.name, "tokens": tokens,
                                   "variant": "setup"}, "memory_check", None, error, passed=False)
        print(f"  [FAIL] memory {spec.name}: {error}", flush=True)
        rows.append({"check": "memory", "model": spec.name, "variant": "-", "status": "FAIL",
                     "detail": error})
    finally:
        model = peft_model = target = report = None  # drop the last references before freeing
        common.release()
    return rows


# --------------------------------------------------------------------------------------------
# Output.


def print_table(rows: list[dict]) -> None:
    """One line per check: check, model, variant, status, then the details."""
    columns = ("check", "model", "variant", "status")
    lines = [{key: key for key in (*columns, "detail")}, *rows]
    widths = {key: max(len(str(line[key])) for line in lines) for key in columns}
    print()
    for line in lines:
        print("  ".join(str(line[key]).ljust(width) for key, width in widths.items()) + "  " + line["detail"])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the JSON lines")
    parser.add_argument("--quick", action="store_true", help="tiny configs (plumbing; runs on a CPU)")
    parser.add_argument("--tag", default="h200", help="results file is patch-<tag>.jsonl")
    parser.add_argument("--skip-parity", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="memory settings, comma list")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    # transformers 5.2x renames gradient checkpointing (the old names stay until v6; 5.17 has only them).
    warnings.filterwarnings("ignore", r".*gradient_checkpointing.*deprecated", FutureWarning)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # fusetune from this checkout
    variants = tuple(args.variants.split(","))
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown --variants {sorted(unknown)}; choose from {VARIANTS}")
    path = common.open_results(args.out / f"patch-{args.tag}.jsonl")
    print(f"environment: {common.environment()}\nresults: {path}", flush=True)
    rows: list[dict] = []
    if not args.skip_parity:
        dtype = BF16 if torch.cuda.is_available() else torch.float32
        print(f"parity ({'bf16' if dtype == BF16 else 'fp32'}):", flush=True)
        rows += [parity(spec, dtype, args.quick) for spec in parity_specs(args.quick)]
    if not args.skip_memory:
        print("memory:", flush=True)
        for spec in memory_specs(args.quick):
            rows += memory(spec, args.quick, variants)
    print_table(rows)
    failed = [row for row in rows if row["status"] == "FAIL"]
    if failed:
        print(f"{len(failed)} check(s) failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
