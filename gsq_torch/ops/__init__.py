"""Custom ops under ``torch.ops.gsq``; importing this package registers them."""

from . import moe  # noqa: F401  (registers gsq::fused_moe)
from .moe import fused_moe

__all__ = ["fused_moe"]
