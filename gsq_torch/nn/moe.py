"""GSQFusedMoE: all routed experts of one MoE layer with 2-bit packed weights.

Dimension legend: T tokens, E experts, H hidden, I expert intermediate, K top-k.

A drop-in for transformers' fused experts modules (``Qwen3_5MoeExperts`` and friends): the same
``forward(hidden_states, top_k_index, top_k_weights)`` contract, the same parameter names
(``gate_up_proj`` gate rows first, ``down_proj``), plus one bf16 scale tensor per packed weight.
The forward runs :func:`gsq_torch.ops.moe.fused_moe`. Checkpoints store the experts one by one
(``experts.{e}.gate_proj.weight`` ...); :mod:`gsq_torch.checkpoint` splits and stacks them.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import format
from ..ops.moe import fused_moe
from ..quantizers.rtn import quantize_rtn
from ..training import NO_ADAPTERS_ON_EXPERTS, keep_scale_dtypes, set_scales_trainable_

# RTN's scale search holds a few fp32 temporaries of the chunk it quantizes; 2**24 weights per
# chunk keeps that under a few hundred MB for any expert size.
_RTN_CHUNK_ELEMENTS = 1 << 24

_SCALE_NAMES = ("gate_up_proj_scale", "down_proj_scale")


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


def _is_silu(act_fn: nn.Module | None) -> bool:
    if act_fn is None:
        return False
    if isinstance(act_fn, nn.SiLU):
        return True
    # transformers' ACT2FN["silu"] is its own SiLUActivation class (plain x * sigmoid(x)).
    return type(act_fn).__name__ in ("SiLUActivation", "SiLU")


class GSQFusedMoE(nn.Module):
    """Routed experts of one MoE layer, 2-bit Humming uint2 weights, fused forward.

    Parameters (``requires_grad=False``; the scales may be made trainable by flipping it):

    - ``gate_up_proj``: int32 ``[E, 2I, H / 16]``, rows ``[:I]`` gate, ``[I:]`` up.
    - ``gate_up_proj_scale``: bf16 ``[E, 2I, H / 128]``.
    - ``down_proj``: int32 ``[E, H, I / 16]``.
    - ``down_proj_scale``: bf16 ``[E, H, I / 128]``.

    Args:
        num_experts: E.
        hidden_dim: H, a multiple of 128.
        intermediate_dim: I, a multiple of 128.
        device: where to allocate the (zero) placeholders, e.g. ``"meta"`` for a skeleton.

    Raises:
        ValueError: a dimension that is not positive or not a multiple of the group size.
    """

    scale_names = _SCALE_NAMES  # what ``trainable_scales`` switches (see gsq_torch.training)

    def __init__(
        self,
        num_experts: int,
        hidden_dim: int,
        intermediate_dim: int,
        *,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if num_experts <= 0:
            raise ValueError(f"num_experts must be positive, got {num_experts}")
        format.check_in_features(hidden_dim)
        format.check_in_features(intermediate_dim)
        self.num_experts = num_experts
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        E, H, I = num_experts, hidden_dim, intermediate_dim
        wpc, gs = format.CODES_PER_WORD, format.GROUP_SIZE
        self.gate_up_proj = _frozen(torch.zeros(E, 2 * I, H // wpc, dtype=format.PACKED_DTYPE, device=device))
        self.gate_up_proj_scale = _frozen(torch.zeros(E, 2 * I, H // gs, dtype=format.SCALE_DTYPE, device=device))
        self.down_proj = _frozen(torch.zeros(E, H, I // wpc, dtype=format.PACKED_DTYPE, device=device))
        self.down_proj_scale = _frozen(torch.zeros(E, H, I // gs, dtype=format.SCALE_DTYPE, device=device))

    # --- construction ------------------------------------------------------------------------

    @classmethod
    def from_packed(
        cls,
        gate_up_proj: torch.Tensor,
        gate_up_proj_scale: torch.Tensor,
        down_proj: torch.Tensor,
        down_proj_scale: torch.Tensor,
    ) -> GSQFusedMoE:
        """Wrap packed tensors (not copied) in a module.

        Args:
            gate_up_proj: int32 ``[E, 2I, H / 16]``, gate rows first.
            gate_up_proj_scale: bf16 ``[E, 2I, H / 128]`` (another float dtype is rounded to bf16).
            down_proj: int32 ``[E, H, I / 16]``.
            down_proj_scale: bf16 ``[E, H, I / 128]`` (likewise).

        Raises:
            TypeError, ValueError: a tensor of the wrong dtype, shape or device (named in the message).
        """
        E, H, I = check_experts_tensors(gate_up_proj, gate_up_proj_scale, down_proj, down_proj_scale)
        module = cls(E, H, I, device="meta")
        module.gate_up_proj = _frozen(gate_up_proj)
        module.gate_up_proj_scale = _frozen(gate_up_proj_scale.to(format.SCALE_DTYPE))
        module.down_proj = _frozen(down_proj)
        module.down_proj_scale = _frozen(down_proj_scale.to(format.SCALE_DTYPE))
        return module

    @classmethod
    @torch.no_grad()
    def from_experts(cls, module: nn.Module, **scale_search) -> GSQFusedMoE:
        """Round-to-nearest quantize a transformers fused experts module (``Qwen3_5MoeExperts`` ...).

        Args:
            module: has floating ``gate_up_proj [E, 2I, H]`` (gate rows first), ``down_proj [E, H, I]``
                and a SiLU ``act_fn``; no biases, not transposed.
            scale_search: keyword arguments of :func:`gsq_torch.quantizers.rtn.fit_group_scales`
                (e.g. a coarser ``grid``).

        Returns:
            A new module on the same device as ``module``'s weights.

        Raises:
            TypeError: ``module`` lacks the fused 3-D expert weights.
            ValueError: an activation other than SiLU, biases, a transposed layout, or H / I not
                multiples of 128.
        """
        check_experts_module(module)
        return cls.from_packed(
            *_rtn_chunked(module.gate_up_proj, **scale_search), *_rtn_chunked(module.down_proj, **scale_search)
        )

    # --- use ---------------------------------------------------------------------------------

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """``out[t] = sum_k top_k_weights[t, k] * down_e(silu(gate_e x_t) * up_e x_t)``, ``e = top_k_index[t, k]``.

        Args:
            hidden_states: ``[..., H]`` (leading dims are flattened to T and restored).
            top_k_index: ``[..., K]`` int64 expert ids; ids outside ``[0, E)`` contribute nothing.
            top_k_weights: ``[..., K]`` routing weights.

        Returns:
            ``[..., H]`` in ``hidden_states.dtype``.
        """
        if nn.utils.parametrize.is_parametrized(self):  # e.g. peft LoRA `target_parameters` on gate_up_proj
            raise ValueError(NO_ADAPTERS_ON_EXPERTS)
        x = hidden_states.reshape(-1, self.hidden_dim)  # [T, H]
        T, K = x.shape[0], top_k_index.shape[-1]
        out = fused_moe(
            x,
            top_k_index.reshape(T, K),
            top_k_weights.reshape(T, K),
            self.gate_up_proj,
            self.gate_up_proj_scale.to(format.SCALE_DTYPE),  # trainable fp32 masters run rounded to bf16
            self.down_proj,
            self.down_proj_scale.to(format.SCALE_DTYPE),
        )
        return out.reshape(hidden_states.shape)

    @torch.no_grad()
    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
        """The dense expert weights: ``(gate_up_proj [E, 2I, H], down_proj [E, H, I])`` in ``dtype``."""
        return (
            format.dequantize(self.gate_up_proj, self.gate_up_proj_scale.to(format.SCALE_DTYPE), dtype),
            format.dequantize(self.down_proj, self.down_proj_scale.to(format.SCALE_DTYPE), dtype),
        )

    @property
    def trainable_scales(self) -> bool:
        """Whether the two scale tensors train. Setting True makes them fp32 ``nn.Parameter`` master
        copies (the forward and ``state_dict`` use them rounded to bf16); False rounds them back to
        frozen bf16. See :mod:`gsq_torch.training`."""
        return all(getattr(self, name).requires_grad for name in _SCALE_NAMES)

    @trainable_scales.setter
    def trainable_scales(self, enabled: bool) -> None:
        set_scales_trainable_(self, enabled, frozen_as_buffer=False)

    def _apply(self, fn, recurse=True):
        # The scales are part of the format: `model.to(torch.float32)` must not turn them into fp32
        # (a later save would write fp32 scales), nor `model.bfloat16()` round a trainable fp32 master.
        with keep_scale_dtypes(self):
            super()._apply(fn, recurse)
        return self

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, "
            f"intermediate_dim={self.intermediate_dim}, bits={format.BITS}, group_size={format.GROUP_SIZE}"
        )


# --- checks ----------------------------------------------------------------------------------


def check_experts_tensors(
    gate_up_proj: torch.Tensor,
    gate_up_proj_scale: torch.Tensor,
    down_proj: torch.Tensor,
    down_proj_scale: torch.Tensor,
) -> tuple[int, int, int]:
    """Validate the four packed tensors of one layer's experts; return ``(E, H, I)``.

    Raises:
        TypeError, ValueError: naming the tensor and what was expected.
    """
    for name, t in (("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 3-D packed tensor [E, out, in/16], got {shape}")
    E, two_i = gate_up_proj.shape[:2]
    if two_i % 2:
        raise ValueError(f"gate_up_proj has {two_i} rows per expert; expected 2 * I (gate rows, then up rows)")
    H = format.check_packed(gate_up_proj, gate_up_proj_scale, name="gate_up_proj")
    I = two_i // 2
    format.check_packed(down_proj, down_proj_scale, in_features=I, name="down_proj")
    if tuple(down_proj.shape[:2]) != (E, H):
        raise ValueError(
            f"down_proj has shape {tuple(down_proj.shape)}; expected [E={E}, H={H}, I/16={I // format.CODES_PER_WORD}] "
            f"to match gate_up_proj {tuple(gate_up_proj.shape)}"
        )
    if gate_up_proj.device != down_proj.device:
        raise ValueError(f"gate_up_proj is on {gate_up_proj.device} but down_proj is on {down_proj.device}")
    return E, H, I


def check_experts_module(module: nn.Module) -> None:
    """Raise unless ``module`` is a fused experts module :meth:`GSQFusedMoE.from_experts` can quantize.

    Raises:
        TypeError: no floating 3-D ``gate_up_proj`` / ``down_proj``.
        ValueError: shapes that do not fit, biases, a transposed layout, a custom gate, or an
            activation other than SiLU.
    """
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    name = type(module).__name__
    if not (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor)):
        raise TypeError(f"{name} has no fused expert weights gate_up_proj / down_proj")
    if gate_up.dim() != 3 or down.dim() != 3 or not gate_up.is_floating_point() or not down.is_floating_point():
        raise TypeError(
            f"{name}: expected floating 3-D gate_up_proj [E, 2I, H] and down_proj [E, H, I], got "
            f"{gate_up.dtype} {tuple(gate_up.shape)} and {down.dtype} {tuple(down.shape)}"
        )
    if getattr(module, "is_transposed", False):
        raise ValueError(f"{name} stores transposed expert weights ([E, H, 2I]); only [E, 2I, H] is supported")
    if getattr(module, "has_bias", False) or getattr(module, "gate_up_proj_bias", None) is not None:
        raise ValueError(f"{name} has expert biases; the 2-bit format has none")
    if not getattr(module, "has_gate", True):
        raise ValueError(f"{name} has no gate projection; GSQFusedMoE computes silu(gate x) * up x")
    act_fn = getattr(module, "act_fn", None)
    if not _is_silu(act_fn):
        raise ValueError(
            f"{name} uses activation {type(act_fn).__name__}; GSQFusedMoE supports SiLU (silu(gate x) * up x) only"
        )
    E, two_i, H = gate_up.shape
    if two_i % 2 or tuple(down.shape) != (E, H, two_i // 2):
        raise ValueError(
            f"{name}: gate_up_proj {tuple(gate_up.shape)} and down_proj {tuple(down.shape)} do not fit "
            "[E, 2I, H] and [E, H, I]"
        )
    format.check_in_features(H)
    format.check_in_features(two_i // 2)


def _rtn_chunked(w: torch.Tensor, **scale_search) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_rtn`` over ``w [E, out, in]`` a few experts at a time (bounded temporaries)."""
    per_expert = w.shape[1] * w.shape[2]
    step = max(1, _RTN_CHUNK_ELEMENTS // max(per_expert, 1))
    parts = [quantize_rtn(w[e : e + step].detach(), **scale_search) for e in range(0, w.shape[0], step)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
