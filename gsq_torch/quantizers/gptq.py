"""GPTQ for all experts of a layer at once: H from routed tokens -> Cholesky inverse -> lazy blocks.

Dimension legend: E experts, R rows (out features), C columns (in features), N tokens per expert
(padded), G groups of 128 columns. Every tensor carries the expert dimension first, so the math
runs batched over experts; the only Python loops are over columns and blocks.

Follows Algorithm 1 of GPTQ (Frantar et al., 2022) with the paper's names: ``H`` (Hessian of the
layer-wise squared error, ``2/n sum x x^T``), ``Hinv`` (upper Cholesky factor of ``H^-1``),
``Err1`` (scaled errors of one block), lazy batch updates of 128 columns. Group scales come from
:func:`gsq_torch.quantizers.rtn.fit_group_scales` on the error-updated columns of each group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..format import (
    GROUP_SIZE,
    Q_MAX,
    Q_MIN,
    check_in_features,
    codes_to_values,
    pack,
    quantize_codes,
    values_to_codes,
)
from .rtn import fit_group_scales

# Cholesky of a dampened Hessian rarely fails; when it does, retry with this much more damping
# (a few times), then fall back to H = I (round-to-nearest with the scale search).
_DAMP_RETRY_FACTOR = 10.0
_DAMP_RETRIES = 3
# Scale searches over whole layers run on at most this many weights at a time.
_SCALE_FIT_CHUNK = 1 << 25


@dataclass
class QuantResult:
    """A quantized weight of all experts of a layer.

    Attributes:
        codes: uint8 ``[E, R, C]``, codes 0..3 (value ``code - 2``).
        weight: int32 ``[E, R, C / 16]``, the packed Humming layout.
        weight_scale: bf16 ``[E, R, C / 128]``.
        loss: fp32 ``[E]``, the method's own objective per expert (GPTQ: the paper's
            ``sum (w - q)^2 / Hinv_ii^2 / 2``; RTN: 0).
    """

    codes: torch.Tensor
    weight: torch.Tensor
    weight_scale: torch.Tensor
    loss: torch.Tensor

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight ``[E, R, C]``."""
        return dequantize_codes(self.codes, self.weight_scale, dtype)


def dequantize_codes(codes: torch.Tensor, weight_scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(codes - 2) * scale`` for unpacked codes ``[..., R, C]`` and scales ``[..., R, C / 128]``."""
    q = codes_to_values(codes, torch.float32)
    q = q.reshape(*codes.shape[:-1], -1, GROUP_SIZE) * weight_scale.float().unsqueeze(-1)
    return q.reshape(codes.shape).to(dtype)


def make_result(codes: torch.Tensor, weight_scale: torch.Tensor, loss: torch.Tensor | None = None) -> QuantResult:
    """Bundle codes ``[E, R, C]`` and bf16 scales into a :class:`QuantResult` (packs the codes)."""
    if loss is None:
        loss = torch.zeros(codes.shape[0], dtype=torch.float32, device=codes.device)
    return QuantResult(codes=codes, weight=pack(codes), weight_scale=weight_scale, loss=loss)


class GPTQ:
    """GPTQ for the weights ``W [E, R, C]`` of ``E`` experts that share an input space.

    Call :meth:`add_batch` with each batch of routed tokens, then :meth:`quantize` once per weight
    that reads those inputs (gate and up share one ``H``). Nothing is printed and no module is
    touched: ``quantize`` returns codes, scales and the loss.

    Args:
        num_experts: ``E``.
        columns: ``C``, the input features (a multiple of 128).
        device: where ``H`` lives.
    """

    def __init__(self, num_experts: int, columns: int, device: torch.device | str | None = None):
        check_in_features(columns)
        self.H = torch.zeros(num_experts, columns, columns, dtype=torch.float32, device=device)
        self.nsamples = torch.zeros(num_experts, dtype=torch.float64, device=device)

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor, counts: torch.Tensor) -> None:
        """Fold a batch of tokens into the running mean ``H = 2/n sum x x^T``, per expert.

        Args:
            x: ``[E, N, C]`` (any float dtype), expert ``e``'s tokens in rows ``0..counts[e]-1``
                and zeros after (zero rows add nothing).
            counts: int ``[E]``, tokens per expert in this batch.
        Raises:
            ValueError: shapes do not match ``H``.
        """
        E, C = self.H.shape[0], self.H.shape[1]
        if x.dim() != 3 or x.shape[0] != E or x.shape[2] != C:
            raise ValueError(f"x must be [E={E}, N, C={C}], got shape {tuple(x.shape)}")
        if tuple(counts.shape) != (E,):
            raise ValueError(f"counts must be [E={E}], got shape {tuple(counts.shape)}")
        m = counts.to(self.nsamples)
        total = self.nsamples + m
        # Running mean: old H keeps weight n / (n + m); the batch enters with 2 / (n + m).
        keep = torch.where(total > 0, self.nsamples / total.clamp(min=1), torch.ones_like(total))
        self.H.mul_(keep.float()[:, None, None])
        x = x.to(self.H.device, torch.float32) * torch.sqrt(2.0 / total.clamp(min=1)).float()[:, None, None]
        self.H.baddbmm_(x.transpose(1, 2), x)  # [E, C, C]
        self.nsamples = total

    def quantize(self, W: torch.Tensor, act_order: bool = False, damp: float = 0.1) -> QuantResult:
        """Quantize ``W [E, R, C]`` with this object's ``H`` (see :func:`gptq_quantize`)."""
        H = self.H.clone()
        empty = self.nsamples == 0
        return gptq_quantize(W, H, act_order=act_order, damp=damp, empty=empty)


def _dampened_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Lower Cholesky factor of ``H + damp * mean(diag H) * I`` per expert, retrying with more damping
    where it fails and falling back to the identity."""
    C = H.shape[-1]
    eye = torch.eye(C, dtype=H.dtype, device=H.device)
    mean_diag = torch.diagonal(H, dim1=-2, dim2=-1).mean(-1)  # [E]
    factor = torch.full_like(mean_diag, damp)
    L, info = torch.linalg.cholesky_ex(H + (factor * mean_diag)[:, None, None] * eye)
    for _ in range(_DAMP_RETRIES):
        bad = info != 0
        if not bool(bad.any()):
            return L
        factor = torch.where(bad, factor * _DAMP_RETRY_FACTOR, factor)
        L2, info2 = torch.linalg.cholesky_ex(H[bad] + (factor[bad] * mean_diag[bad])[:, None, None] * eye)
        L[bad], info[bad] = L2, info2
    bad = info != 0
    if bool(bad.any()):
        L[bad] = eye
    return L


@torch.no_grad()
def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    act_order: bool = False,
    damp: float = 0.1,
    empty: torch.Tensor | None = None,
) -> QuantResult:
    """GPTQ-quantize the weights of ``E`` experts to the 2-bit codebook with per-group scales.

    Args:
        W: ``[E, R, C]`` (any float dtype); ``C`` a multiple of 128.
        H: fp32 ``[E, C, C]``, each expert's ``2/n sum x x^T`` (modified in place).
        act_order: quantize columns in order of decreasing ``diag(H)``. Scales are then fitted once
            per group of the original column order before the loop ("static groups"), so the
            result keeps the plain layout.
        damp: dampening as a fraction of ``mean(diag H)``.
        empty: bool ``[E]``, experts that saw no token; they use ``H = I`` (round-to-nearest with
            the scale search). Defaults to experts whose ``H`` is all zero.
    Returns:
        :class:`QuantResult` with the codes in the original column order.
    Raises:
        ValueError: shapes do not fit.
    """
    if W.dim() != 3:
        raise ValueError(f"W must be [E, R, C], got shape {tuple(W.shape)}")
    E, R, C = W.shape
    check_in_features(C)
    if tuple(H.shape) != (E, C, C):
        raise ValueError(f"H must be [E={E}, C={C}, C={C}], got shape {tuple(H.shape)}")
    device = H.device
    W = W.to(device=device, dtype=torch.float32).clone()
    H = H.to(torch.float32)
    eye = torch.eye(C, dtype=torch.float32, device=device)
    if empty is None:
        empty = (H == 0).flatten(1).all(dim=1)
    H[empty] = eye

    # Dead inputs (never non-zero): their weights cannot matter; zero them so the scale fit ignores them.
    dead = torch.diagonal(H, dim1=-2, dim2=-1) == 0  # [E, C]
    H.diagonal(dim1=-2, dim2=-1)[dead] = 1.0
    W.masked_fill_(dead[:, None, :], 0.0)

    G = C // GROUP_SIZE
    if act_order:
        static_scale = fit_scales_chunked(W)  # [E, R, G], fitted before any error update
        perm = torch.argsort(torch.diagonal(H, dim1=-2, dim2=-1), dim=-1, descending=True, stable=True)  # [E, C]
        invperm = torch.argsort(perm, dim=-1)
        W = W.gather(2, perm[:, None, :].expand(E, R, C))
        H = H.gather(1, perm[:, :, None].expand(E, C, C)).gather(2, perm[:, None, :].expand(E, C, C))
        group_of_column = perm // GROUP_SIZE  # [E, C], in quantization order

    L = _dampened_cholesky(H, damp)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)  # [E, C, C], upper

    codes = torch.empty(E, R, C, dtype=torch.uint8, device=device)
    loss = torch.zeros(E, dtype=torch.float32, device=device)
    weight_scale = torch.zeros(E, R, G, dtype=torch.float32, device=device)
    for i1 in range(0, C, GROUP_SIZE):  # one lazy block == one group of 128 columns
        i2 = i1 + GROUP_SIZE
        W1 = W[:, :, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[:, i1:i2, i1:i2]
        if act_order:
            scale_cols = static_scale.float().gather(2, group_of_column[:, None, i1:i2].expand(E, R, GROUP_SIZE))
        else:
            block_scale = fit_group_scales(W1).float()  # [E, R, 1]: the group's columns, error-updated
            weight_scale[:, :, i1 // GROUP_SIZE] = block_scale[:, :, 0]
            scale_cols = block_scale.expand(E, R, GROUP_SIZE)
        for i in range(GROUP_SIZE):
            w = W1[:, :, i]  # [E, R]
            d = Hinv1[:, i, i][:, None]  # [E, 1]
            s = scale_cols[:, :, i]
            safe = torch.where(s == 0, torch.ones_like(s), s)
            q = torch.where(s == 0, torch.zeros_like(w), (w / safe).round().clamp(Q_MIN, Q_MAX))
            Q1[:, :, i] = q
            err = (w - q * s) / d  # [E, R]
            Losses1[:, :, i] = (w - q * s) ** 2 / d**2 / 2
            W1[:, :, i:] -= err[:, :, None] * Hinv1[:, None, i, i:]
            Err1[:, :, i] = err
        codes[:, :, i1:i2] = values_to_codes(Q1)
        loss += Losses1.sum(dim=(1, 2))
        W[:, :, i2:] -= torch.bmm(Err1, Hinv[:, i1:i2, i2:])

    if act_order:
        codes = codes.gather(2, invperm[:, None, :].expand(E, R, C))
        weight_scale = static_scale
    return make_result(codes, weight_scale.to(torch.bfloat16), loss)


def fit_scales_chunked(W: torch.Tensor) -> torch.Tensor:
    """:func:`.rtn.fit_group_scales` of ``W [E, R, C]``, a few experts at a time (its fp32
    temporaries are several times ``W``'s size)."""
    chunk = max(1, _SCALE_FIT_CHUNK // max(W[0].numel(), 1))
    return torch.cat([fit_group_scales(W[e : e + chunk]) for e in range(0, W.shape[0], chunk)])


@torch.no_grad()
def rtn_result(W: torch.Tensor) -> QuantResult:
    """Round-to-nearest with the scale search (:mod:`.rtn`) of ``W [E, R, C]`` as a :class:`QuantResult` (loss 0)."""
    weight_scale = fit_scales_chunked(W)
    return make_result(quantize_codes(W, weight_scale), weight_scale)
