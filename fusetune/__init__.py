"""fusetune: fused Triton kernels with hand-written backward passes for fine-tuning LLMs and VLMs."""

__version__ = "0.1.0"
