"""gsq::fused_moe: all routed experts of one MoE layer with 2-bit packed weights.

Dimension legend: T tokens, H hidden, I expert intermediate, E experts, K top-k.

``out[t] = sum_k top_k_weights[t, k] * down_e(silu(gate_e x_t) * up_e x_t)`` with
``e = top_k_index[t, k]``; an index outside ``[0, E)`` contributes nothing (transformers uses
``E`` as a padding slot).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import format


def check_moe_inputs(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    gate_up_proj_scale: torch.Tensor,
    down_proj: torch.Tensor,
    down_proj_scale: torch.Tensor,
) -> None:
    """Raise a ``ValueError`` / ``TypeError`` naming the first input that does not fit."""
    if hidden_states.dim() != 2:
        raise ValueError(f"hidden_states must be [T, H], got shape {tuple(hidden_states.shape)}")
    if hidden_states.dtype not in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        raise TypeError(f"hidden_states must be bf16, fp16, fp32 or fp64, got {hidden_states.dtype}")
    T, H = hidden_states.shape
    if top_k_index.dim() != 2 or top_k_index.shape[0] != T:
        raise ValueError(f"top_k_index must be [T={T}, K], got shape {tuple(top_k_index.shape)}")
    if top_k_index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"top_k_index must be int64 or int32, got {top_k_index.dtype}")
    if tuple(top_k_weights.shape) != tuple(top_k_index.shape):
        raise ValueError(
            f"top_k_weights has shape {tuple(top_k_weights.shape)}; expected {tuple(top_k_index.shape)} like top_k_index"
        )
    if not top_k_weights.is_floating_point():
        raise TypeError(f"top_k_weights must be floating point, got {top_k_weights.dtype}")
    if gate_up_proj.dim() != 3 or down_proj.dim() != 3:
        raise ValueError(
            f"gate_up_proj must be [E, 2I, H/16] and down_proj [E, H, I/16]; got {tuple(gate_up_proj.shape)} "
            f"and {tuple(down_proj.shape)}"
        )
    E, two_i = gate_up_proj.shape[:2]
    format.check_packed(gate_up_proj, gate_up_proj_scale, in_features=H, name="gate_up_proj")
    if two_i % 2:
        raise ValueError(f"gate_up_proj has {two_i} rows; expected 2 * I (gate rows, then up rows)")
    intermediate = two_i // 2
    format.check_packed(down_proj, down_proj_scale, in_features=intermediate, name="down_proj")
    if tuple(down_proj.shape[:2]) != (E, H):
        raise ValueError(f"down_proj must be [E={E}, H={H}, I/16], got shape {tuple(down_proj.shape)}")
    for name, t in (("top_k_index", top_k_index), ("top_k_weights", top_k_weights), ("gate_up_proj", gate_up_proj),
                    ("down_proj", down_proj)):
        if t.device != hidden_states.device:
            raise ValueError(f"{name} is on {t.device} but hidden_states is on {hidden_states.device}")


def fused_moe_reference(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    gate_up_proj_scale: torch.Tensor,
    down_proj: torch.Tensor,
    down_proj_scale: torch.Tensor,
) -> torch.Tensor:
    """Plain PyTorch fused MoE: the CPU implementation and the oracle of the kernels.

    Computes in float32 (float64 for float64 inputs) from the exactly dequantized weights of the
    experts that receive tokens, and returns ``[T, H]`` in ``hidden_states.dtype``.
    """
    acc = torch.float64 if hidden_states.dtype == torch.float64 else torch.float32
    T, H = hidden_states.shape
    E, K = gate_up_proj.shape[0], top_k_index.shape[1]
    intermediate = gate_up_proj.shape[1] // 2
    out = torch.zeros(T, H, dtype=acc, device=hidden_states.device)
    flat_expert = top_k_index.reshape(-1)  # [T*K]
    flat_token = torch.arange(T, device=hidden_states.device).repeat_interleave(K)  # [T*K]
    flat_weight = top_k_weights.reshape(-1).to(acc)
    for e in torch.unique(flat_expert).tolist():
        if not 0 <= e < E:
            continue
        slots = (flat_expert == e).nonzero().squeeze(1)
        tokens = flat_token[slots]
        x = hidden_states[tokens].to(acc)  # [n, H]
        gate_up = x @ format.dequantize(gate_up_proj[e], gate_up_proj_scale[e], acc).T  # [n, 2I]
        act = F.silu(gate_up[:, :intermediate]) * gate_up[:, intermediate:]  # [n, I]
        y = act @ format.dequantize(down_proj[e], down_proj_scale[e], acc).T  # [n, H]
        out.index_add_(0, tokens, y * flat_weight[slots, None])
    return out.to(hidden_states.dtype)


@torch.library.custom_op("gsq::fused_moe", mutates_args=())
def fused_moe_op(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    gate_up_proj_scale: torch.Tensor,
    down_proj: torch.Tensor,
    down_proj_scale: torch.Tensor,
) -> torch.Tensor:
    return fused_moe_reference(
        hidden_states, top_k_index, top_k_weights, gate_up_proj, gate_up_proj_scale, down_proj, down_proj_scale
    )


@fused_moe_op.register_fake
def _(hidden_states, top_k_index, top_k_weights, gate_up_proj, gate_up_proj_scale, down_proj, down_proj_scale):
    return torch.empty_like(hidden_states)


def fused_moe(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    gate_up_proj_scale: torch.Tensor,
    down_proj: torch.Tensor,
    down_proj_scale: torch.Tensor,
) -> torch.Tensor:
    """Run all routed experts of one layer on 2-bit packed weights.

    Args:
        hidden_states: ``[T, H]`` bf16 / fp16 / fp32.
        top_k_index: ``[T, K]`` int64 expert ids (ids outside ``[0, E)`` are skipped).
        top_k_weights: ``[T, K]`` routing weights.
        gate_up_proj: int32 ``[E, 2I, H / 16]``, gate rows first, then up rows.
        gate_up_proj_scale: bf16 ``[E, 2I, H / 128]``.
        down_proj: int32 ``[E, H, I / 16]``.
        down_proj_scale: bf16 ``[E, H, I / 128]``.

    Returns:
        ``[T, H]`` in ``hidden_states.dtype``.

    Raises:
        ValueError, TypeError: an input of the wrong shape, dtype or device (named in the message).
    """
    check_moe_inputs(hidden_states, top_k_index, top_k_weights, gate_up_proj, gate_up_proj_scale, down_proj,
                     down_proj_scale)
    return torch.ops.gsq.fused_moe(
        hidden_states, top_k_index, top_k_weights, gate_up_proj, gate_up_proj_scale, down_proj, down_proj_scale
    )
