"""``fusetune train``: LoRA fine-tuning of VLMs and LLMs from a YAML config, on HF Trainer + PEFT.

``load_config`` reads and validates a config, ``train`` runs it, ``load_model`` returns a patched
PEFT model and its processor; ``FusetuneError`` is every user-facing problem (bad config, data or
environment) with its fix in the message. The heavy imports (transformers, peft) happen on use.
"""

from fusetune.train.config import DEMO_CONFIG, LoraSettings, TrainConfig, load_config
from fusetune.train.errors import FusetuneError

__all__ = [
    "DEMO_CONFIG",
    "FusetuneError",
    "LoraSettings",
    "TrainConfig",
    "load_config",
    "load_model",
    "train",
]


def __getattr__(name: str):
    if name == "load_model":
        from fusetune.train.model import load_model

        return load_model
    if name == "train":
        from fusetune.train.runner import train

        return train
    raise AttributeError(f"module 'fusetune.train' has no attribute {name!r}")
