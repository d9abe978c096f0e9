"""Shared Triton helpers: the in-register twin of ``format.unpack`` / ``format.dequantize``.

Kernels receive the format's constants as ``tl.constexpr`` arguments (never retyped numbers):
pass ``CODES_PER_WORD=format.CODES_PER_WORD``, ``BITS=format.BITS`` and
``CODE_OFFSET=format.CODE_OFFSET`` from the launcher.
"""

import functools
import os

import torch
import triton
import triton.language as tl

from .. import format

# Launchers pass these straight through as constexpr keyword arguments.
FORMAT_CONSTEXPRS = dict(BITS=format.BITS, CODES_PER_WORD=format.CODES_PER_WORD, CODE_OFFSET=format.CODE_OFFSET)
# Two bf16 128.0 in one int32: a 2-bit field OR-ed in at bit 0 of either half reads 128 + code. Kernels take
# it as a runtime argument, so that ptxas keeps it in a register for the LOP3s of the unpack.
MAGIC_BF16_PAIR = 0x43004300
# tl.dot on sm_90 runs wgmma from one warp group (4 warps) up and mma.sync below. The permuted-unpack kernels
# lay their operands out in the k order of the MMA that will run ("V2": mma.sync's), so they and their
# launchers take the choice from here.
WGMMA_MIN_WARPS = tl.constexpr(4)


def runs_mma_sync(num_warps: int) -> bool:
    """Whether a tensor-core kernel launched with ``num_warps`` warps runs mma.sync (and its k order)."""
    return num_warps < WGMMA_MIN_WARPS.value


def interpreting() -> bool:
    """Whether Triton runs its kernels in the interpreter (``TRITON_INTERPRET=1``: CPU tensors, no compiler)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch: sm_90+ and a Triton that has it (3.4+); never the interpreter.

    The library's kernels that let dependents start early (``gdc_launch_dependents``) never write packed
    weights or scales, so a dependent may read those before its ``gdc_wait``; so may the fused MoE's
    later launches read the op's routing, which its earlier launches only read. Everything else
    (activations, workspaces, split counters) is read, and every store made, after the wait.
    ``GSQ_TORCH_PDL=0`` turns it off (read once per device: tools that cannot follow dependent launches,
    A/B timings)."""
    if interpreting() or os.environ.get("GSQ_TORCH_PDL", "1") == "0":
        return False
    if device.type != "cuda" or not hasattr(tl.extra.cuda, "gdc_wait"):
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


@triton.jit
def unpack_kn(words, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BITS: tl.constexpr,
              CODES_PER_WORD: tl.constexpr, CODE_OFFSET: tl.constexpr):
    """Words ``[BLOCK_K // CODES_PER_WORD, BLOCK_N]`` (K-major: word row r holds inputs
    ``r*16 .. r*16+15``) -> signed code values ``[BLOCK_K, BLOCK_N]`` as int32 in -2..+1."""
    shifts = tl.arange(0, CODES_PER_WORD) * BITS  # [16]
    codes = (words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)  # [K/16, 16, N]
    return tl.reshape(codes, (BLOCK_K, BLOCK_N)) - CODE_OFFSET


@triton.jit
def unpack_nk(words, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BITS: tl.constexpr,
              CODES_PER_WORD: tl.constexpr, CODE_OFFSET: tl.constexpr):
    """Words ``[BLOCK_N, BLOCK_K // CODES_PER_WORD]`` (row-major, as stored) -> signed code
    values ``[BLOCK_N, BLOCK_K]`` as int32 in -2..+1."""
    shifts = tl.arange(0, CODES_PER_WORD) * BITS  # [16]
    codes = (words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)  # [N, K/16, 16]
    return tl.reshape(codes, (BLOCK_N, BLOCK_K)) - CODE_OFFSET
