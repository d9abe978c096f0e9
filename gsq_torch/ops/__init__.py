"""Custom ops under ``torch.ops.gsq``; importing this package registers them."""

# The linear function is ops.linear.linear: re-exporting it here would shadow the module.
from . import linear  # noqa: F401  (registers gsq::linear)
from . import linear_backward  # noqa: F401  (registers gsq::linear_grad_scale)
from . import moe  # noqa: F401  (registers gsq::fused_moe)
from . import moe_backward  # noqa: F401  (registers gsq::fused_moe's autograd; imports moe)
from .moe import fused_moe

__all__ = ["fused_moe", "linear"]
