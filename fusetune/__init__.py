"""fusetune: fused Triton kernels with hand-written backward passes for fine-tuning LLMs and VLMs.

Public surface: ``apply(model, ...) -> PatchReport``, ``unapply(model)``, ``load_model(name_or_path,
...) -> (model, processor)``, ``enable_checkpointing(model, offload=True)`` /
``disable_checkpointing(model)``, ``quantize_4bit(model)``, ``CapturedStep(model, forward, batch)``
(a training step replayed as a CUDA graph), ``__version__``. The patching and
training APIs are imported on first use, so ``fusetune.ops`` works without transformers installed.
"""

__version__ = "0.1.0"

__all__ = [
    "CapturedStep",
    "PatchReport",
    "__version__",
    "apply",
    "disable_checkpointing",
    "enable_checkpointing",
    "load_model",
    "quantize_4bit",
    "unapply",
]


def __getattr__(name: str):
    if name in ("PatchReport", "apply", "unapply"):
        from fusetune import patch

        return getattr(patch, name)
    if name == "load_model":
        from fusetune.train.model import load_model

        return load_model
    if name in ("enable_checkpointing", "disable_checkpointing"):
        from fusetune import checkpointing

        return getattr(checkpointing, name)
    if name == "CapturedStep":
        from fusetune.graphs import CapturedStep

        return CapturedStep
    if name == "quantize_4bit":
        from fusetune.quantize import quantize_4bit

        return quantize_4bit
    raise AttributeError(f"module 'fusetune' has no attribute {name!r}")
