"""Round-to-nearest with a per-group scale search: the one scale fit every quantizer uses.

For each group of 128 inputs of each row, the scale starts at ``2 * max|w| / 3`` and is refined
by a grid search over shrink factors ``p`` in ``[1.0, 0.21]`` of both signs, keeping the scale that
minimises ``sum |dequant(w) - w| ** norm`` (GPTQ's ``norm=2.4``). Negative scales matter because
the codebook {-2, -1, 0, +1} is asymmetric.
"""

from __future__ import annotations

import torch

from ..format import GROUP_SIZE, Q_MAX, Q_MIN, SCALE_DTYPE, check_in_features, pack, quantize_codes


def shrink_grid(grid: int = 100, max_shrink: float = 0.8) -> list[float]:
    """The shrink factors tried: ``1 - i / grid`` for ``i < max_shrink * grid`` (1.0 down to 0.21)."""
    return [1.0 - i / grid for i in range(int(max_shrink * grid))]


@torch.no_grad()
def fit_group_scales(
    w: torch.Tensor,
    norm: float = 2.4,
    grid: int = 100,
    max_shrink: float = 0.8,
    group_size: int = GROUP_SIZE,
) -> torch.Tensor:
    """Best bf16 scale per group of ``w [..., out, in]``; returns ``[..., out, in / group_size]`` (bf16).

    Every candidate is rounded to bf16 before it is scored, so the scale chosen is the best one
    that can actually be stored. Ties keep the earlier candidate (positive before negative,
    larger before smaller), which makes the result deterministic.
    """
    if w.shape[-1] % group_size:
        raise ValueError(f"in_features={w.shape[-1]} must be a multiple of the group size {group_size}")
    g = w.float().reshape(*w.shape[:-1], -1, group_size)  # [..., out, G, 128]
    base = g.abs().amax(dim=-1) * (2.0 / 3.0)  # [..., out, G]
    best_err = torch.full_like(base, float("inf"))
    best = torch.zeros_like(base)
    for p in shrink_grid(grid, max_shrink):
        for sign in (1.0, -1.0):
            s = (base * (sign * p)).to(SCALE_DTYPE).float()
            safe = torch.where(s == 0, torch.ones_like(s), s).unsqueeze(-1)
            q = (g / safe).round_().clamp_(Q_MIN, Q_MAX)
            err = (q.mul_(safe).sub_(g)).abs_().pow_(norm).sum(dim=-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, s, best)
    return best.to(SCALE_DTYPE)


@torch.no_grad()
def quantize_rtn(w: torch.Tensor, **scale_search) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest 2-bit quantization of ``w [..., out, in]`` (``in`` a multiple of 128).

    Returns:
        ``(weight, weight_scale)``: int32 ``[..., out, in / 16]`` and bf16 ``[..., out, in / 128]``
        in the Humming layout. Keyword arguments go to :func:`fit_group_scales`.
    """
    check_in_features(w.shape[-1])
    weight_scale = fit_group_scales(w, **scale_search)
    return pack(quantize_codes(w, weight_scale)), weight_scale
