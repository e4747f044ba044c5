"""Fused ops: Triton kernels with hand-written backward passes, each with a PyTorch reference.

CUDA tensors (or any tensor under ``TRITON_INTERPRET=1``) run the kernels; plain CPU tensors run
the ``*_reference`` functions, which are also what the tests compare the kernels with. Every op
launches on its input's GPU, whichever is current (a model split over GPUs). Under ``torch.compile``
the norms, RoPE, the GLUs, linear_cross_entropy (its reduced loss) and nf4_linear stay in the
compiled graph (their launches are custom ops, ``_graph_ops``); cross_entropy and the LoRA ops run
as they are, between graphs (``_launch``).
"""

from fusetune.ops.cross_entropy import cross_entropy, cross_entropy_reference
from fusetune.ops.glu import geglu, geglu_reference, swiglu, swiglu_reference
from fusetune.ops.layer_norm import layer_norm, layer_norm_reference
from fusetune.ops.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from fusetune.ops.lora import (
    LoraWeights,
    lora_glu_mlp,
    lora_glu_mlp_reference,
    lora_linear,
    lora_linear_reference,
)
from fusetune.ops.nf4 import dequantize_nf4, dequantize_nf4_reference
from fusetune.ops.nf4_linear import nf4_linear
from fusetune.ops.rms_norm import add_rms_norm, add_rms_norm_reference, rms_norm, rms_norm_reference
from fusetune.ops.rope import rope, rope_reference

__all__ = [
    "LoraWeights",
    "add_rms_norm",
    "add_rms_norm_reference",
    "cross_entropy",
    "cross_entropy_reference",
    "geglu",
    "geglu_reference",
    "layer_norm",
    "layer_norm_reference",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "lora_glu_mlp",
    "lora_glu_mlp_reference",
    "lora_linear",
    "lora_linear_reference",
    "dequantize_nf4",
    "dequantize_nf4_reference",
    "nf4_linear",
    "rms_norm",
    "rms_norm_reference",
    "rope",
    "rope_reference",
    "swiglu",
    "swiglu_reference",
]
