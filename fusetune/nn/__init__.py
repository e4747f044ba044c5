"""Drop-in ``nn.Module``s built on fusetune's ops.

Each keeps the parameter names (and so the ``state_dict`` keys) of the transformers module it
replaces, and holds the very same ``Parameter`` objects, so checkpoints, PEFT adapters and
optimisers see no difference.
"""

from fusetune.nn.glu import FusedGatedMLP
from fusetune.nn.layer_norm import FusedLayerNorm
from fusetune.nn.rms_norm import FusedRMSNorm
from fusetune.nn.vision_attention import SegmentedVisionAttention

__all__ = ["FusedGatedMLP", "FusedLayerNorm", "FusedRMSNorm", "SegmentedVisionAttention"]
