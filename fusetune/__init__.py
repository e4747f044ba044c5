"""fusetune: fused Triton kernels with hand-written backward passes for fine-tuning LLMs and VLMs.

Public surface: ``apply(model, ...) -> PatchReport``, ``unapply(model)``, ``load_model(name_or_path,
...) -> (model, processor)``, ``__version__``. The patching and training APIs are imported on first
use, so ``fusetune.ops`` works without transformers installed.
"""

__version__ = "0.1.0"

__all__ = ["PatchReport", "__version__", "apply", "load_model", "unapply"]


def __getattr__(name: str):
    if name in ("PatchReport", "apply", "unapply"):
        from fusetune import patch

        return getattr(patch, name)
    if name == "load_model":
        from fusetune.train.model import load_model

        return load_model
    raise AttributeError(f"module 'fusetune' has no attribute {name!r}")
