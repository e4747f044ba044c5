"""fusetune: fused Triton kernels with hand-written backward passes for fine-tuning LLMs and VLMs.

Public surface: ``apply(model, ...) -> PatchReport``, ``unapply(model)``, ``__version__``. The
patching API is imported on first use, so ``fusetune.ops`` works without transformers installed.
"""

__version__ = "0.1.0"

__all__ = ["PatchReport", "__version__", "apply", "unapply"]


def __getattr__(name: str):
    if name in ("PatchReport", "apply", "unapply"):
        from fusetune import patch

        return getattr(patch, name)
    raise AttributeError(f"module 'fusetune' has no attribute {name!r}")
