"""nn.Modules holding 2-bit packed weights: one Linear, and all routed experts of an MoE layer."""

from .linear import GSQExpertLinear
from .moe import GSQFusedMoE
from .replace import replace_experts

__all__ = ["GSQExpertLinear", "GSQFusedMoE", "replace_experts"]
