"""gsq-torch: 2-bit GSQ (Humming uint2) Mixture-of-Experts models in plain PyTorch.

Importing the package registers the ``torch.ops.gsq`` custom ops and the transformers quantizer
for ``quant_method: "humming"`` checkpoints.
"""

from . import format, ops  # noqa: F401  (ops registers torch.ops.gsq.*)
from . import integrations  # noqa: F401  (registers the "humming" HfQuantizer with transformers)
from .checkpoint import convert_checkpoint, read_quantization_config
from .nn import GSQExpertLinear, GSQFusedMoE, replace_experts
from .quantizers.pipeline import quantize_model

__version__ = "0.1.0"

__all__ = [
    "GSQExpertLinear",
    "GSQFusedMoE",
    "replace_experts",
    "quantize_model",
    "convert_checkpoint",
    "read_quantization_config",
]
