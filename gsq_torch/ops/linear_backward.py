"""gsq::linear_grad_scale: the gradient of ``gsq::linear`` with respect to ``weight_scale``.

Dimension legend: M rows (tokens), N out_features, K in_features, G = K / 128 scale groups.

With ``W[n, j] = (code[n, j] - 2) * s[n, j // 128]`` and ``y = x @ W.T``:

    grad_s[n, g] = sum_{j in group g} (code[n, j] - 2) * (grad_y.T @ x)[n, j]

On CUDA one Triton kernel computes it without writing anything weight-sized to memory: each
program owns a ``[BLOCK_N, BLOCK_K]`` tile of ``grad_y.T @ x``, accumulates it over a range of M
in fp32 registers (``tl.dot``), then multiplies by the tile's codes (unpacked once, in the
epilogue) and sums each group of 128 inputs: it writes ``[BLOCK_N, BLOCK_K / 128]`` numbers.
Few tiles (small N * K) split M over programs; their fp32 partial sums are added afterwards in a
fixed order (deterministic, no atomics). The cost is that of one GEMM (2 M N K flops), the same
as a dense weight gradient. On the CPU (and for fp64, e.g. gradcheck) it runs
``linear_grad_scale_reference``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .. import format
from ._triton import FORMAT_CONSTEXPRS, interpreting, unpack_nk

_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# About two programs per SM of a 132-SM card before M is split further.
_TARGET_PROGRAMS = 264


@dataclass(frozen=True)
class GradScaleConfig:
    """Launch parameters. ``block_k`` is a multiple of the group size (a group never straddles
    two programs); ``split_m`` None picks the split from the tile count."""

    block_m: int = 64  # rows of grad_y / x per step of the reduction (the dot's K side)
    block_n: int = 64
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 3
    split_m: int | None = None


def pick_config(M: int, N: int, K: int) -> GradScaleConfig:
    """Default tiles: 64 x 128 fp32 accumulator (64 registers per thread at 4 warps)."""
    block_m = 64 if M >= 64 else max(16, triton.next_power_of_2(M))
    return GradScaleConfig(block_m=block_m)


# fmt: off
@triton.jit
def _grad_scale_kernel(g_ptr, x_ptr, w_ptr, part_ptr, M, N, K, m_per_split, stride_gm, stride_xm, stride_wn,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, GROUP_SIZE: tl.constexpr,
                       BITS: tl.constexpr, CODES_PER_WORD: tl.constexpr, CODE_OFFSET: tl.constexpr):
    """``part[split, n, g] = sum_{m in split} g[m, n] * sum_{j in g} (code[n, j] - OFFSET) * x[m, j]``."""
    BLOCK_KW: tl.constexpr = BLOCK_K // CODES_PER_WORD
    GROUPS: tl.constexpr = BLOCK_K // GROUP_SIZE
    num_k = tl.cdiv(K, BLOCK_K)
    pid_n = tl.program_id(0) // num_k  # k fastest: neighbouring programs share grad_y's columns
    pid_k = tl.program_id(0) % num_k
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    k_mask = offs_k < K
    m_lo = split * m_per_split
    m_hi = tl.minimum(m_lo + m_per_split, M)
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)  # (grad_y.T @ x)[n, k] over this split's rows
    for m0 in range(m_lo, m_hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < m_hi
        rows = offs_m.to(tl.int64)[:, None]
        g_mask = m_mask[:, None] & n_mask[None, :]
        x_mask = m_mask[:, None] & k_mask[None, :]
        g = tl.load(g_ptr + rows * stride_gm + offs_n[None, :], mask=g_mask, other=0.0)
        x = tl.load(x_ptr + rows * stride_xm + offs_k[None, :], mask=x_mask, other=0.0)
        acc = tl.dot(tl.trans(g.to(DOT_DTYPE)), x.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)
    kw = pid_k * BLOCK_KW + tl.arange(0, BLOCK_KW)
    words = tl.load(w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + kw[None, :],
                    mask=n_mask[:, None] & (kw < K // CODES_PER_WORD)[None, :], other=0)
    codes = unpack_nk(words, BLOCK_N, BLOCK_K, BITS, CODES_PER_WORD, CODE_OFFSET).to(tl.float32)
    part = tl.sum(tl.reshape(acc * codes, (BLOCK_N, GROUPS, GROUP_SIZE)), axis=2)  # [BLOCK_N, GROUPS]
    offs_g = pid_k * GROUPS + tl.arange(0, GROUPS)
    num_groups = K // GROUP_SIZE
    out = part_ptr + (split * N + offs_n.to(tl.int64))[:, None] * num_groups + offs_g[None, :]
    tl.store(out, part, mask=n_mask[:, None] & (offs_g < num_groups)[None, :])
# fmt: on


def _dot_operands(dtype: torch.dtype) -> tuple[tl.dtype, str | None]:
    """16-bit activations dot natively, fp32 through 3xTF32; the interpreter (which computes
    bf16 arithmetic on raw bit patterns) always in fp32."""
    if interpreting():
        return tl.float32, "ieee"
    if dtype == torch.bfloat16:
        return tl.bfloat16, None
    if dtype == torch.float16:
        return tl.float16, None
    return tl.float32, "tf32x3"


def _check_launch(grad2d: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor) -> None:
    if grad2d.dtype not in _KERNEL_DTYPES or x2d.dtype != grad2d.dtype:
        raise TypeError(
            f"the kernel takes bf16, fp16 or fp32 grad and x of one dtype, got {grad2d.dtype}, {x2d.dtype}"
        )
    if grad2d.dim() != 2 or x2d.dim() != 2 or grad2d.shape[0] != x2d.shape[0]:
        raise ValueError(f"need grad [M, N] and x [M, K], got {tuple(grad2d.shape)} and {tuple(x2d.shape)}")
    if grad2d.stride(-1) != 1 or x2d.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError("grad, x and weight need contiguous last dimensions")
    if not (grad2d.is_cuda or interpreting()):
        raise ValueError("CPU tensors run the Triton kernel only under TRITON_INTERPRET=1")


def launch_linear_grad_scale(
    grad2d: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, config: GradScaleConfig | None = None
) -> torch.Tensor:
    """Run the Triton kernel.

    Args:
        grad2d: ``[M, N]`` gradient of the output, bf16 / fp16 / fp32, last dimension contiguous.
        x2d: ``[M, K]`` input, same dtype, last dimension contiguous.
        weight: int32 ``[N, K / 16]`` packed codes, last dimension contiguous.
        config: launch parameters (tests use it to force splits / tiles).

    Returns:
        fp32 ``[N, K / 128]``.

    Raises:
        TypeError, ValueError: tensors the kernel cannot take.
    """
    _check_launch(grad2d, x2d, weight)
    M, N = grad2d.shape
    K = x2d.shape[1]
    cfg = config or pick_config(M, N, K)
    if cfg.block_k % format.GROUP_SIZE:
        raise ValueError(f"block_k={cfg.block_k} must be a multiple of the group size {format.GROUP_SIZE}")
    out = torch.zeros((N, K // format.GROUP_SIZE), dtype=torch.float32, device=grad2d.device)
    if M == 0 or N == 0:
        return out
    tiles = triton.cdiv(N, cfg.block_n) * triton.cdiv(K, cfg.block_k)
    split = cfg.split_m or max(1, min(triton.cdiv(_TARGET_PROGRAMS, tiles), M // (2 * cfg.block_m)))
    m_per_split = triton.cdiv(triton.cdiv(M, split), cfg.block_m) * cfg.block_m
    split = triton.cdiv(M, m_per_split)  # no empty split
    part = out if split == 1 else torch.empty((split, *out.shape), dtype=torch.float32, device=out.device)
    dot_dtype, precision = _dot_operands(grad2d.dtype)
    guard = torch.cuda.device(grad2d.device) if grad2d.is_cuda else contextlib.nullcontext()
    with guard:
        _grad_scale_kernel[(tiles, split)](
            grad2d,
            x2d,
            weight,
            part,
            M,
            N,
            K,
            m_per_split,
            grad2d.stride(0),
            x2d.stride(0),
            weight.stride(0),
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k,
            DOT_DTYPE=dot_dtype,
            INPUT_PRECISION=precision,
            GROUP_SIZE=format.GROUP_SIZE,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
            **FORMAT_CONSTEXPRS,
        )
    return out if split == 1 else part.sum(0)


# --- reference (CPU implementation and oracle) ------------------------------------------------


def linear_grad_scale_reference(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor
) -> torch.Tensor:
    """Plain PyTorch ``grad_s`` in fp32 (fp64 for fp64 inputs), in ``weight_scale``'s dtype.

    Materialises ``grad.T @ x`` (``[N, K]``): fine for the CPU and as an oracle.
    """
    acc = torch.float64 if torch.float64 in (grad.dtype, x.dtype) else torch.float32
    N, K = weight.shape[0], x.shape[-1]
    gw = grad.reshape(-1, N).to(acc).T @ x.reshape(-1, K).to(acc)  # [N, K]
    codes = format.codes_to_values(format.unpack(weight), acc)  # [N, K]
    gs = (codes * gw).reshape(N, K // format.GROUP_SIZE, format.GROUP_SIZE).sum(-1)
    return gs.to(weight_scale.dtype)


# --- registration ----------------------------------------------------------------------------


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


@torch.library.custom_op("gsq::linear_grad_scale", mutates_args=())
def linear_grad_scale(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor
) -> torch.Tensor:
    """``d sum(grad * linear(x, weight, s)) / d s`` at any ``s`` (the result does not depend on it).

    Args:
        grad: ``[..., N]`` gradient of the output.
        x: ``[..., K]`` the forward's input (same leading dims as ``grad``).
        weight: int32 ``[N, K / 16]``.
        weight_scale: ``[N, K / 128]``; only its dtype (that of the result) and shape are used.

    Returns:
        ``[N, K / 128]`` in ``weight_scale.dtype``.
    """
    return linear_grad_scale_reference(grad, x, weight, weight_scale)


@linear_grad_scale.register_kernel("cuda")
def _(grad, x, weight, weight_scale):
    if grad.dtype not in _KERNEL_DTYPES or x.dtype != grad.dtype:
        return linear_grad_scale_reference(grad, x, weight, weight_scale)
    return launch_linear_grad_scale(_rows(grad), _rows(x), weight.contiguous()).to(weight_scale.dtype)


@linear_grad_scale.register_fake
def _(grad, x, weight, weight_scale):
    return weight_scale.new_empty(weight_scale.shape)


def _setup_context(ctx, inputs, output):
    grad, x, weight, weight_scale = inputs
    ctx.save_for_backward(grad, x, weight)
    ctx.scale_dtype = weight_scale.dtype


def _backward(ctx, gbar):
    # Bilinear in (grad, x): d/d grad = linear(x, W with scales gbar); d/d x = grad @ (W with scales gbar).
    grad, x, weight = ctx.saved_tensors
    s = gbar.to(ctx.scale_dtype)
    d_grad = torch.ops.gsq.linear(x, weight, s).to(grad.dtype) if ctx.needs_input_grad[0] else None
    d_x = torch.ops.gsq.linear_grad_input(grad, weight, s).to(x.dtype) if ctx.needs_input_grad[1] else None
    return d_grad, d_x, None, None


linear_grad_scale.register_autograd(_backward, setup_context=_setup_context)
