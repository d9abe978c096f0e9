"""GSQ's soft weight: Gumbel-softmax over the 2-bit codebook, with exact gradients through the sample.

Per weight, 4 logits ``l_k`` over the codebook ``v = (-2, -1, 0, +1)``:
``y = softmax((kappa * l + G) / tau)``, ``W = scale * sum_k y_k v_k`` with Gumbel noise ``G``.
Backward is the exact gradient of that sample (no straight-through estimator):
``dW/dl_j = kappa / tau * scale * y_j * (v_j - sum_k y_k v_k)``, ``dW/dscale = sum_k y_k v_k``.

Memory trick (as in the GSQ reference): the noise comes from a counter-based generator keyed by
``seed``, so backward regenerates it instead of storing ``y`` ([..., 4] floats per weight). On
CUDA one Triton kernel does each direction (Philox noise in registers: logits in, bf16 weight out;
logits and weight grad in, logit and scale grads out); elsewhere a PyTorch path does the same
with ``torch.Generator`` noise. The two paths draw different noise; each is deterministic.

Shapes: logits ``[..., R, C, 4]``, scale ``[..., R, C / 128]`` (fp32), weight ``[..., R, C]``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..format import CODE_OFFSET, CODEBOOK, GROUP_SIZE, NUM_LEVELS

# One Philox call yields 4 uniforms: one per level of the 2-bit codebook.
if NUM_LEVELS != 4:
    raise NotImplementedError(f"the Gumbel kernels draw 4 noises per weight; the codebook has {NUM_LEVELS} levels")
# Programs handle this many groups of 128 weights (x 4 logits): 4 groups = 2048 logits keeps
# registers low while giving each program enough bytes to stream.
_BLOCK_GROUPS = 4
# Avoid log(0) in the Gumbel transform; the clamp moves less than one float32 step of the noise.
_U_MIN = 1e-12


def _check(logits: torch.Tensor, scale: torch.Tensor) -> None:
    if logits.dim() < 3 or logits.shape[-1] != NUM_LEVELS:
        raise ValueError(f"logits must be [..., R, C, {NUM_LEVELS}], got shape {tuple(logits.shape)}")
    C = logits.shape[-2]
    if C % GROUP_SIZE:
        raise ValueError(f"logits have C={C} columns; must be a multiple of {GROUP_SIZE}")
    expected = (*logits.shape[:-2], C // GROUP_SIZE)
    if tuple(scale.shape) != expected:
        raise ValueError(f"scale must be {expected} for logits {tuple(logits.shape)}, got {tuple(scale.shape)}")
    if logits.device != scale.device:
        raise ValueError(f"logits on {logits.device} but scale on {scale.device}")


# --- Triton: noise, forward, backward -------------------------------------------------------


@triton.jit
def _gumbel4(seed, w):
    """Gumbel noise ``[BLOCK, 4]`` for weight indices ``w [BLOCK]`` (int64): one Philox call per weight."""
    u0, u1, u2, u3 = tl.rand4x(seed, w)
    k = tl.arange(0, 4)[None, :]
    u = tl.where(k == 0, u0[:, None], tl.where(k == 1, u1[:, None], tl.where(k == 2, u2[:, None], u3[:, None])))
    u = tl.maximum(u, 1e-12)
    return -tl.log(-tl.log(u))


@triton.jit
def _soft_sample(logits_ptr, seed, w, mask, tau, kappa, LEVELS: tl.constexpr, CODE_OFFSET: tl.constexpr):
    """``y [BLOCK, 4]`` and ``wbar = sum_k y_k v_k [BLOCK]`` for flat weight indices ``w``."""
    k = tl.arange(0, LEVELS)
    offs = w[:, None] * LEVELS + k[None, :]
    # fp32 right after the load: the interpreter computes bf16 arithmetic wrongly, and so it's exact.
    logit = tl.load(logits_ptr + offs, mask=mask[:, None], other=0.0).to(tl.float32)
    z = (kappa * logit + _gumbel4(seed, w)) / tau
    z = z - tl.max(z, axis=1)[:, None]
    e = tl.exp(z)
    y = e / tl.sum(e, axis=1)[:, None]
    v = (k - CODE_OFFSET).to(tl.float32)[None, :]
    return y, tl.sum(y * v, axis=1), v


@triton.jit
def _noise_kernel(out_ptr, seed, NW, BLOCK: tl.constexpr, LEVELS: tl.constexpr):
    w = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = w < NW
    k = tl.arange(0, LEVELS)
    tl.store(out_ptr + w[:, None] * LEVELS + k[None, :], _gumbel4(seed, w), mask=mask[:, None])


@triton.jit
def _soft_fwd_kernel(logits_ptr, scale_ptr, out_ptr, seed, tau, kappa, NG,
                     BLOCK_GROUPS: tl.constexpr, GROUP: tl.constexpr, LEVELS: tl.constexpr,
                     CODE_OFFSET: tl.constexpr):
    g = tl.program_id(0).to(tl.int64) * BLOCK_GROUPS + tl.arange(0, BLOCK_GROUPS)  # [BG]
    w = (g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]).reshape(BLOCK_GROUPS * GROUP)  # flat weights
    gmask = g < NG
    mask = (w // GROUP) < NG
    _, wbar, _ = _soft_sample(logits_ptr, seed, w, mask, tau, kappa, LEVELS, CODE_OFFSET)
    s = tl.load(scale_ptr + g, mask=gmask, other=0.0).to(tl.float32)  # [BG]
    out = wbar.reshape(BLOCK_GROUPS, GROUP) * s[:, None]
    tl.store(out_ptr + w.reshape(BLOCK_GROUPS, GROUP), out.to(out_ptr.dtype.element_ty), mask=gmask[:, None])


@triton.jit
def _soft_bwd_kernel(logits_ptr, scale_ptr, grad_out_ptr, grad_logits_ptr, grad_scale_ptr, seed, tau, kappa, NG,
                     BLOCK_GROUPS: tl.constexpr, GROUP: tl.constexpr, LEVELS: tl.constexpr,
                     CODE_OFFSET: tl.constexpr):
    g = tl.program_id(0).to(tl.int64) * BLOCK_GROUPS + tl.arange(0, BLOCK_GROUPS)
    w = (g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]).reshape(BLOCK_GROUPS * GROUP)
    gmask = g < NG
    mask = (w // GROUP) < NG
    y, wbar, v = _soft_sample(logits_ptr, seed, w, mask, tau, kappa, LEVELS, CODE_OFFSET)
    s = tl.load(scale_ptr + g, mask=gmask, other=0.0).to(tl.float32)
    gw = tl.load(grad_out_ptr + w, mask=mask, other=0.0).to(tl.float32)  # [BLOCK]
    gs = tl.sum((gw * wbar).reshape(BLOCK_GROUPS, GROUP), axis=1)
    tl.store(grad_scale_ptr + g, gs, mask=gmask)
    s_w = tl.broadcast_to(s[:, None], (BLOCK_GROUPS, GROUP)).reshape(BLOCK_GROUPS * GROUP)
    gl = (kappa / tau) * (s_w * gw)[:, None] * y * (v - wbar[:, None])
    k = tl.arange(0, LEVELS)
    tl.store(grad_logits_ptr + w[:, None] * LEVELS + k[None, :], gl.to(grad_logits_ptr.dtype.element_ty),
             mask=mask[:, None])


def _grid(NG: int):
    return (triton.cdiv(NG, _BLOCK_GROUPS),)


def gumbel_noise_triton(shape: tuple[int, ...], seed: int, device: torch.device | str) -> torch.Tensor:
    """The noise the Triton kernels draw for logits of ``shape [..., 4]`` (fp32); for tests."""
    out = torch.empty(shape, dtype=torch.float32, device=device)
    NW = out.numel() // NUM_LEVELS
    BLOCK = 256
    _noise_kernel[(triton.cdiv(NW, BLOCK),)](out, seed, NW, BLOCK=BLOCK, LEVELS=NUM_LEVELS)
    return out


def soft_weight_triton_forward(logits, scale, tau, kappa, seed, out_dtype):
    NG = scale.numel()
    out = torch.empty(logits.shape[:-1], dtype=out_dtype, device=logits.device)
    _soft_fwd_kernel[_grid(NG)](logits, scale, out, seed, float(tau), float(kappa), NG,
                                BLOCK_GROUPS=_BLOCK_GROUPS, GROUP=GROUP_SIZE, LEVELS=NUM_LEVELS,
                                CODE_OFFSET=CODE_OFFSET)
    return out


def soft_weight_triton_backward(logits, scale, grad_out, tau, kappa, seed):
    NG = scale.numel()
    grad_logits = torch.empty_like(logits)
    grad_scale = torch.empty_like(scale, dtype=torch.float32)
    _soft_bwd_kernel[_grid(NG)](logits, scale, grad_out.contiguous(), grad_logits, grad_scale, seed, float(tau),
                                float(kappa), NG, BLOCK_GROUPS=_BLOCK_GROUPS, GROUP=GROUP_SIZE,
                                LEVELS=NUM_LEVELS, CODE_OFFSET=CODE_OFFSET)
    return grad_logits, grad_scale.to(scale.dtype)


# --- PyTorch path ----------------------------------------------------------------------------


def gumbel_noise_torch(shape: tuple[int, ...], seed: int, device: torch.device | str) -> torch.Tensor:
    """Gumbel noise of ``shape`` (fp32) from a ``torch.Generator`` seeded with ``seed``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    u = torch.rand(shape, generator=gen, device=device, dtype=torch.float32).clamp_(min=_U_MIN)
    return -torch.log(-torch.log(u))


def soft_weight_reference(
    logits: torch.Tensor, scale: torch.Tensor, tau: float, kappa: float, noise: torch.Tensor
) -> torch.Tensor:
    """The soft weight written out in plain differentiable PyTorch (fp32); the oracle.

    Args:
        logits: ``[..., R, C, 4]``.
        scale: ``[..., R, C / 128]``.
        noise: fp32 Gumbel noise, same shape as ``logits``.
    Returns:
        fp32 ``[..., R, C]``.
    """
    v = torch.tensor(CODEBOOK, dtype=torch.float32, device=logits.device)
    y = torch.softmax((kappa * logits.float() + noise) / tau, dim=-1)
    wbar = (y * v).sum(-1)  # [..., R, C]
    w = wbar.reshape(*wbar.shape[:-1], -1, GROUP_SIZE) * scale.float().unsqueeze(-1)
    return w.reshape(wbar.shape)


def _torch_sample(logits: torch.Tensor, tau: float, kappa: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``y [..., 4]`` and ``wbar = sum_k y_k v_k [...]`` (fp32) of the sample keyed by ``seed``."""
    z = gumbel_noise_torch(logits.shape, seed, logits.device)
    z.add_(logits.float(), alpha=kappa).div_(tau)
    # Softmax written out: torch's CPU softmax over a last dim of 4 was measured 4x slower than this
    # (it was ~40% of a CPU GSQ step on the tiny model).
    y = z.sub_(z.amax(dim=-1, keepdim=True)).exp_()
    y = y.div_(y.sum(dim=-1, keepdim=True))
    v = torch.tensor(CODEBOOK, dtype=torch.float32, device=logits.device)
    return y, y @ v


def _per_weight(scale: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Group scales ``[..., R, G]`` broadcast to weights ``[..., R, C]`` (fp32)."""
    return scale.float().repeat_interleave(GROUP_SIZE, dim=-1).reshape(shape)


class _SoftWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, scale, tau, kappa, seed, out_dtype, use_triton):
        ctx.save_for_backward(logits, scale)  # leaves of the optimizer: saving them costs nothing
        ctx.args = (tau, kappa, seed, use_triton)
        if use_triton:
            return soft_weight_triton_forward(logits, scale, tau, kappa, seed, out_dtype)
        _, wbar = _torch_sample(logits, tau, kappa, seed)
        return (wbar * _per_weight(scale, wbar.shape)).to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        logits, scale = ctx.saved_tensors
        tau, kappa, seed, use_triton = ctx.args
        if use_triton:
            grad_logits, grad_scale = soft_weight_triton_backward(logits, scale, grad_out, tau, kappa, seed)
        else:
            # Regenerate the same sample, then the exact gradient of W = s * sum_k y_k v_k.
            y, wbar = _torch_sample(logits, tau, kappa, seed)
            g = grad_out.float()
            grad_scale = (g * wbar).reshape(*scale.shape, GROUP_SIZE).sum(-1).to(scale.dtype)
            v = torch.tensor(CODEBOOK, dtype=torch.float32, device=logits.device)
            gsw = g.mul_(_per_weight(scale, g.shape)).mul_(kappa / tau).unsqueeze(-1)  # [..., C, 1]
            grad_logits = (v - wbar.unsqueeze(-1)).mul_(y).mul_(gsw).to(logits.dtype)
        return grad_logits, grad_scale, None, None, None, None, None


def soft_weight(
    logits: torch.Tensor,
    scale: torch.Tensor,
    tau: float,
    kappa: float,
    seed: int,
    out_dtype: torch.dtype = torch.float32,
    use_triton: bool | None = None,
) -> torch.Tensor:
    """One Gumbel-softmax sample of the soft weight, differentiable in ``logits`` and ``scale``.

    Args:
        logits: ``[..., R, C, 4]`` (bf16 or fp32), contiguous.
        scale: fp32 ``[..., R, C / 128]``, contiguous.
        tau: temperature.
        kappa: logit multiplier.
        seed: noise seed; the same seed gives the same sample (and backward reuses it).
        out_dtype: dtype of the returned weight (bf16 feeds bf16 matmuls).
        use_triton: force a path; default Triton on CUDA tensors, PyTorch elsewhere.
    Returns:
        ``[..., R, C]`` in ``out_dtype``.
    Raises:
        ValueError: shapes that do not fit; non-contiguous inputs.
    """
    _check(logits, scale)
    if not logits.is_contiguous() or not scale.is_contiguous():
        raise ValueError("logits and scale must be contiguous")
    if use_triton is None:
        use_triton = logits.is_cuda
    return _SoftWeight.apply(logits, scale, float(tau), float(kappa), int(seed), out_dtype, use_triton)
