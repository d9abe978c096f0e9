"""gsq::linear: ``y = x @ dequantize(weight, weight_scale).T`` on 2-bit packed weights.

Dimension legend: M rows of x (tokens), N out_features, K in_features, KW = K / 16 packed words.

Pipeline: ``linear()`` validates and calls ``torch.ops.gsq.linear``; on CUDA that runs one Triton
kernel picked from ``CONFIGS`` / ``_default_config``, which dequantizes in registers and never
writes the dense weight to global memory; on the CPU it runs ``linear_reference`` (plain PyTorch,
the oracle). The backward for ``x`` is ``torch.ops.gsq.linear_grad_input`` (``grad_y @ W``; the
transposed GEMM kernel on CUDA); the packed codes are frozen, and a ``weight_scale`` that
requires grad gets ``torch.ops.gsq.linear_grad_scale`` (``ops/linear_backward.py``).

Kernels (bf16 activations):
- "mma" (``_mma_kernel``, decode to a few hundred tokens): swap AB, ``y.T = W @ x.T``, so the
  dequantized weights are the wgmma's A operand, read from registers, and the tokens its N side;
  K is split over programs for small M, the last program of a tile adding the parts (one launch).
- "decode" (``_decode_kernel``, M <= 16, selected by config only): swap AB as "mma", but a program
  owns one K chunk and walks several row tiles, so x goes to shared memory once and the loop has no
  shared memory, barriers or layout shuffles: words load straight into the wgmma's A registers.
- "lines" (``_lines_kernel``, 1-2 tokens, K a multiple of 512): as "decode", but each thread reads
  16-byte runs of whole 64-byte row segments, the scale groups are the MMA's N side (one MMA chain per
  tile, no per-group wait) and 1-2 warps run mma.sync with both operands in registers.
- "lines_warps" (``_lines_warps_kernel``, 1-2 tokens on small layers, K = 512 x 1-16): the "lines" tiles,
  but warp s of a program takes K chunk s, and the program adds its warps' results in shared memory:
  no split-K partials or fix-up.
- "hopper" (``ops/linear_hopper.py``, large M on sm_90, in Gluon): x and packed tiles by TMA, each step's
  weights unpacked into shared memory while the wgmma of the step before runs.
- "gemm" (``_gemm_kernel``, large M elsewhere): x tile as A, the dequantized weight tile as B in shared memory.
fp16 / fp32 activations take the "gemm" and the FMA "gemv" (``_legacy_config``) through tf32.

Dequantization tricks: a 2-bit field OR-ed into the mantissa of a float whose mantissa unit is
the field's lowest bit reads ``base + code`` exactly, one LOP3 instead of shift + mask + convert.
Two bf16 per 32-bit register (``_unpack_words``): one LOP3 and one HADD2 (``- base - 2``) per
two weights. The fp32 version (``_dequant_tile``, ``_gemv_kernel``) puts fields at bits 15..21
of ``2**(23 - P)`` ("windows").
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.errors import PTXASError

from .. import format
from . import linear_hopper
from ._triton import FORMAT_CONSTEXPRS, MAGIC_BF16_PAIR, WGMMA_MIN_WARPS, interpreting, pdl_supported

# --- tuning constants ------------------------------------------------------------------------

_MANTISSA_BITS = 23
_WINDOWS = 4  # shifts per word; fewer windows means larger magic offsets (less fp32 headroom)
_CODES_PER_WINDOW = format.CODES_PER_WORD // _WINDOWS
_P0 = _MANTISSA_BITS - format.BITS * _CODES_PER_WINDOW  # 15: the top field ends at bit 22
_WINDOW_CONSTEXPRS = {"WINDOWS": _WINDOWS, "P0": _P0}
_WORDS_PER_GROUP = format.GROUP_SIZE // format.CODES_PER_WORD
_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Up to this block_m a one-group tile's fp32 dot is scaled (block_m / 8 FFMAs per weight per thread
# row) instead of its bf16 weights (one HMUL2 per pair).
_SCALE_AFTER_DOT_MAX_M = 64
_X_DTYPES = _KERNEL_DTYPES + (torch.float64,)


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters of one kernel. ``block_k`` counts inputs (a multiple of 16 words' codes).

    ``block_m`` tiles the rows of x (tokens), ``block_n`` the rows of W (outputs). For "mma" the
    weight rows are the MMA's M side (64 per warp group) and the tokens its N side (16 at least),
    and ``group_m`` counts the N tiles that walk one x tile before the next (0: all of them).
    For "decode", ``block_k`` is a program's K chunk (128, 256 or 512; the split count is K / block_k),
    ``block_n`` the rows of one loop step, ``group_m`` the steps per program (0: about 4 programs
    per SM) and ``num_stages`` how many steps ahead words are loaded (1 or 2); ``split_k`` is not used.
    "lines" reads the fields alike, with ``block_k`` 512, ``block_m`` 1 or 2 tokens (N side
    ``4 * block_m`` columns, at least 8), ``num_warps`` 1-2 (mma.sync) or 4 (wgmma), and ``num_stages``
    1 or 2 (tiles loaded ahead into registers) or more (a cp.async ring of that depth).
    "lines_warps": ``block_m`` 1 or 2 tokens, ``block_n`` 16 or 32 rows per tile, ``group_m`` tiles per program,
    ``block_k`` 512 and ``num_warps`` K / 512 (one warp per chunk; the launcher takes it from K).
    "hopper" (sm_90, Gluon): ``block_m`` tokens (a multiple of 64 per 4 warps), ``block_n`` weight rows
    (64 or 128), ``block_k`` 64 (x rows of 128 bytes, TMA's swizzle width), ``num_warps`` the MMA warps,
    ``group_m`` the unpacking warps (4 or 8, a second partition), ``num_stages`` x tiles in the TMA ring.
    """

    kernel: str  # "hopper", "mma" (swap-AB tensor cores), "decode", "lines", "lines_warps", "gemv" (FMA) or "gemm"
    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = (
        1  # K split over programs; "mma" adds the parts in its last program, "gemm" in a 2nd kernel
    )


def _m_bucket(m: int) -> int:
    return min(triton.next_power_of_2(max(m, 1)), 4096)


# Tuned entries, keyed by (direction, M bucket, N, K); benchmarks/bench_linear.py --tune prints
# lines to paste here. Missing keys fall back to _default_config.
# Winners of `benchmarks/bench_linear.py --tune` / `--sweep-new` on an H200 (2026-11-27, triton 3.6).
CONFIGS: dict[tuple[str, int, int, int], KernelConfig] = {
    ("forward", 1, 8192, 8192): KernelConfig(kernel='lines', block_m=1, block_n=64, block_k=512, group_m=2, num_warps=2, num_stages=1, split_k=1),  # 12.5-12.7 us (it4 12.8-12.9, gemv 14.8)
    ("forward", 2, 8192, 8192): KernelConfig(kernel='lines', block_m=2, block_n=64, block_k=512, group_m=2, num_warps=2, num_stages=1, split_k=1),  # 13.0 us (decode 20.7, mma 27.8)
    ("forward", 4, 8192, 8192): KernelConfig(kernel='decode', block_m=8, block_n=64, block_k=512, group_m=8, num_warps=4, num_stages=2, split_k=1),  # 22.1 us (mma 27.5)
    ("forward", 16, 8192, 8192): KernelConfig(kernel='decode', block_m=16, block_n=64, block_k=512, group_m=4, num_warps=4, num_stages=1, split_k=1),  # 22.0 us (mma 28.2)
    ("forward", 4096, 8192, 8192): KernelConfig(kernel='hopper', block_m=256, block_n=128, block_k=64, group_m=8, num_warps=8, num_stages=4, split_k=1),  # 846-1043 us, BF16 675-760 (1.20-1.50x across runs; mma 1240; H100 / H200, session 6)
    ("forward", 16, 512, 2048): KernelConfig(kernel='mma', block_m=16, block_n=64, block_k=128, group_m=0, num_warps=4, num_stages=4, split_k=8),  # 5.5 us
    ("forward", 256, 512, 2048): KernelConfig(kernel='mma', block_m=64, block_n=64, block_k=128, group_m=0, num_warps=4, num_stages=4, split_k=4),  # 8.9 us
    ("forward", 16, 2048, 512): KernelConfig(kernel='mma', block_m=16, block_n=64, block_k=128, group_m=0, num_warps=4, num_stages=4, split_k=2),  # 4.9 us
    ("forward", 256, 2048, 512): KernelConfig(kernel='mma', block_m=64, block_n=64, block_k=128, group_m=0, num_warps=4, num_stages=4, split_k=1),  # 5.4 us
}

# Programs wanted in flight: 2 per SM of a 132-SM H100/H200 (3 fit at the decode config's ~160
# registers), so that one program's loads overlap another's math.
_TARGET_PROGRAMS = 264


def _pow2_floor(v: int) -> int:
    return 1 << (max(1, v).bit_length() - 1)


def _split_for(tiles: int, K: int, block_k: int, min_tiles_per_split: int) -> int:
    """Split K until about _TARGET_PROGRAMS programs run, keeping a few K tiles per program."""
    return _pow2_floor(max(1, min(_TARGET_PROGRAMS // max(tiles, 1), K // (block_k * min_tiles_per_split))))


def _legacy_config(M: int, N: int, K: int) -> KernelConfig:
    """Forward configs of the FMA GEMV / tl.dot GEMM (fp16 and fp32 activations; large M)."""
    if M == 1:
        block_kw = max(_WORDS_PER_GROUP, min(256, triton.next_power_of_2(K // format.CODES_PER_WORD)))
        rows_per_tile = max(1, 4 * 32 * 4 // block_kw)  # rows one pass of 4 warps covers (4 words/thread)
        # At most 16 rows (8 per thread at 256 words) keeps the GEMV under 255 registers.
        per_sm = max(1, N // 264)
        block_n = max(min(rows_per_tile, 16), min(16, 1 << (per_sm.bit_length() - 1)))
        return KernelConfig("gemv", block_n=block_n, block_k=block_kw * format.CODES_PER_WORD, num_warps=4)
    if M <= 64:
        block_m = max(16, triton.next_power_of_2(M))
        block_n = 64 if N >= 1024 else 32
        tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
        return KernelConfig(
            "gemm",
            block_m=block_m,
            block_n=block_n,
            block_k=128,
            num_stages=4,
            split_k=_split_for(tiles, K, 128, 2),
        )
    if M <= 256:
        return KernelConfig("gemm", block_m=64, block_n=128, block_k=128, num_stages=3)
    return KernelConfig("gemm", block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)


def lines_warps_supported(M: int, K: int) -> bool:
    """Whether "lines_warps" takes this shape: 1-2 tokens, K a power-of-two count (1-16) of 512-input chunks."""
    chunks = K // 512
    return 1 <= M <= 2 and K % 512 == 0 and 1 <= chunks <= 16 and chunks & (chunks - 1) == 0


def _default_config(direction: str, M: int, N: int, K: int, hopper: bool = True) -> KernelConfig:
    if direction == "backward":  # grad_x [M, K]: tiles over (M, K), reduction over N
        if M <= 16:
            return KernelConfig("gemm", block_m=16, block_n=64, block_k=64, num_warps=4, num_stages=3)
        return KernelConfig(
            "gemm",
            block_m=min(128, max(16, triton.next_power_of_2(M))),
            block_n=64,
            block_k=128,
            num_warps=8 if M > 64 else 4,
            num_stages=3,
        )
    if (M == 1 or (M == 2 and K >= 1024)) and N <= 2048 and K <= 4096 and lines_warps_supported(M, K):
        # Small layers, one or two tokens: "lines_warps" (K over the warps of a program, no split-K fix-up),
        # about 32 programs of 64 / 32 / 16 rows (one-warp programs of 32 rows at K = 512). H200, against the
        # kernels before in the same run: 2048 x 2048 5.80 -> 3.96 us, 1024 x 2048 3.34 -> 3.06, 512 x 2048 2.99 ->
        # 2.69, 2048 x 512 3.03 -> 2.30, 1000 x 4096 9.43 -> 5.12, 1024 x 1024 3.38 -> 2.62; M = 2: 2048 x 2048
        # 6.48 -> 5.92. Slower from 4096 rows or K = 8192 on (4096 x 4096 5.8 -> 9.1, 8192 x 8192 10.6 -> 20.2)
        # and at M = 2, K = 512 (benchmarks/linear_notes.md, Session 11).
        rows = 64 if N > 1024 and K > 512 else 32 if N > 512 else 16
        return KernelConfig("lines_warps", block_m=M, block_n=min(rows, 32), block_k=512, group_m=max(1, rows // 32),
                            num_warps=K // 512, num_stages=1)
    if M <= 2 and K % 512 == 0 and N >= 1024:
        # One or two tokens: "lines" with mma.sync (2 warps, 64 rows per step), about 512 programs.
        return KernelConfig("lines", block_m=M, block_n=64, block_k=512, group_m=0, num_warps=2, num_stages=1)
    if M <= 64 or triton.cdiv(M, 128) * triton.cdiv(N, 128) < _TARGET_PROGRAMS // (4 if hopper else 2):
        # Swap-AB tensor-core kernel: 128 weight rows (64 below N = 1024 or above 32 tokens, where
        # 128 rows take 255 registers) x up to 64 tokens x one scale group per step; K split (at
        # least 2 steps each) until about 2 programs per SM run.
        block_m = min(64, max(16, triton.next_power_of_2(M)))
        block_n = 128 if N >= 1024 and block_m <= 32 else 64
        tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
        return KernelConfig(
            "mma",
            block_m=block_m,
            block_n=block_n,
            block_k=128,
            group_m=0,
            num_warps=4,
            num_stages=4,
            split_k=_split_for(tiles, K, 128, 2),
        )
    if hopper and K >= 1024:
        # sm_90 with Gluon ("hopper", ops/linear_hopper.py; the launcher falls back to the Triton kernels
        # elsewhere): TMA rings, the unpacked tile in shared memory, wgmma overlapping the next unpack.
        # Below 16 K steps its ring's fill is not paid back (2048 x 512, M = 4096: 33.6 us against 27.3).
        if M >= 512 and triton.cdiv(M, 256) * triton.cdiv(N, 128) >= _TARGET_PROGRAMS // 2:
            return KernelConfig("hopper", block_m=256, block_n=128, block_k=64, group_m=8, num_warps=8, num_stages=4)
        return KernelConfig("hopper", block_m=128, block_n=128, block_k=64, group_m=4, num_warps=4, num_stages=4)
    if M >= 1024 and K >= 1024:  # the best Triton config at M = 1024 and 4096 on 8192 x 8192 (H200, session 6)
        return KernelConfig("mma", block_m=256, block_n=128, block_k=64, group_m=0, num_warps=8, num_stages=3)
    # Compute-bound with a full wave of 128 x 128 tiles: the tl.dot GEMM (dequantized tile in shared
    # memory as wgmma's B operand; its bf16 path makes two weights per op, scales prefetched).
    return KernelConfig("gemm", block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)


def pick_config(direction: str, M: int, N: int, K: int) -> KernelConfig:
    """The kernel config for ``direction`` ("forward" / "backward") and these sizes (no CUDA query)."""
    return CONFIGS.get((direction, _m_bucket(M), N, K)) or _default_config(direction, M, N, K)


# --- Triton kernels --------------------------------------------------------------------------
# Kernels and launchers are laid out by hand (one parameter per line would double them).
# fmt: off


@triton.jit
def _window(words, Q: tl.constexpr, P0: tl.constexpr, CODES_PER_WINDOW: tl.constexpr, BITS: tl.constexpr):
    """``words`` shifted so that the fields of codes Q*CPW .. Q*CPW+CPW-1 start at bit P0."""
    SH: tl.constexpr = P0 - BITS * CODES_PER_WINDOW * Q
    if SH > 0:
        return words << SH
    elif SH < 0:
        return words >> (-SH)  # arithmetic: bit 31 smears only above the window, masked off
    else:
        return words


@triton.jit
def _window_value(u, code_mask, P: tl.constexpr):
    """The field at bit P of ``u`` as the fp32 ``2**(23 - P) + code`` (exact).

    ``(127 + 23 - P) << 23`` is the bit pattern of ``2**(23 - P)``, whose mantissa unit is bit P.
    ``code_mask`` (3) is a runtime argument on purpose: as a literal, ptxas re-materialises the
    shifted mask with a MOV before every LOP3 (one extra instruction per weight, seen in SASS).
    """
    return ((u & (code_mask << P)) | ((127 + 23 - P) << 23)).to(tl.float32, bitcast=True)


@triton.jit
def _leaf(words, scale, code_mask, J: tl.constexpr, P0: tl.constexpr, CODES_PER_WINDOW: tl.constexpr,
          BITS: tl.constexpr, CODE_OFFSET: tl.constexpr, DTYPE: tl.constexpr):
    """Weight J of every word: ``(code - CODE_OFFSET) * scale``, exact (then exact in bf16)."""
    P: tl.constexpr = P0 + BITS * (J % CODES_PER_WINDOW)
    v = _window_value(_window(words, J // CODES_PER_WINDOW, P0, CODES_PER_WINDOW, BITS), code_mask, P)
    # v * s - (2**(23-P) + offset) * s: the subtrahend has at most 8 + 9 significant bits, so it is
    # exact in fp32, and the fused result is exactly (code - offset) * s.
    return tl.fma(v, scale, scale * (-((1 << (23 - P)) + CODE_OFFSET))).to(DTYPE)


@triton.jit
def _tree(words, scale, code_mask, J: tl.constexpr, STEP: tl.constexpr, P0: tl.constexpr,
          CODES_PER_WINDOW: tl.constexpr, BITS: tl.constexpr, CODES_PER_WORD: tl.constexpr,
          CODE_OFFSET: tl.constexpr, DTYPE: tl.constexpr):
    """Weights J, J+STEP, ... of every word, joined so that the new axes index the code in order."""
    if STEP == CODES_PER_WORD:
        return _leaf(words, scale, code_mask, J, P0, CODES_PER_WINDOW, BITS, CODE_OFFSET, DTYPE)
    else:
        # The outermost join adds the fastest axis: even codes, then odd (bit 0 of J), and so on.
        return tl.join(
            _tree(words, scale, code_mask, J, 2 * STEP, P0, CODES_PER_WINDOW, BITS, CODES_PER_WORD, CODE_OFFSET,
                  DTYPE),
            _tree(words, scale, code_mask, J + STEP, 2 * STEP, P0, CODES_PER_WINDOW, BITS, CODES_PER_WORD,
                  CODE_OFFSET, DTYPE))


@triton.jit
def _dequant_tile(words, scale, code_mask, ROWS: tl.constexpr, WORDS: tl.constexpr, DTYPE: tl.constexpr,
                  WINDOWS: tl.constexpr, P0: tl.constexpr, BITS: tl.constexpr, CODES_PER_WORD: tl.constexpr,
                  CODE_OFFSET: tl.constexpr):
    """int32 words ``[ROWS, WORDS]``, fp32 scales ``[ROWS, 1 or WORDS]`` -> ``[ROWS, WORDS * 16]`` weights."""
    tile = _tree(words, scale, code_mask, 0, 1, P0, CODES_PER_WORD // WINDOWS, BITS, CODES_PER_WORD, CODE_OFFSET,
                 DTYPE)
    return tl.reshape(tile, (ROWS, WORDS * CODES_PER_WORD))


@triton.jit
def _gemv_tile(w_rows, s_rows, kw0, KW, offs_kw, offs_g, n_mask, EVEN_K: tl.constexpr,
               WORDS_PER_GROUP: tl.constexpr):
    """Words ``[BLOCK_N, BLOCK_KW]`` and bf16 scales ``[BLOCK_N, BLOCK_KW / 8]`` from word ``kw0`` on."""
    kw = kw0 + offs_kw
    if EVEN_K:
        words = tl.load(w_rows + kw[None, :], mask=n_mask[:, None], other=0)
    else:
        words = tl.load(w_rows + kw[None, :], mask=n_mask[:, None] & (kw < KW)[None, :], other=0)
    g = kw0 // WORDS_PER_GROUP + offs_g
    scale = tl.load(s_rows + g[None, :], mask=n_mask[:, None] & (g < KW // WORDS_PER_GROUP)[None, :], other=0.0)
    return words, scale


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, y_ptr, N, KW, stride_xm, stride_wn, stride_sn, stride_ym, code_mask,
                 BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, EVEN_K: tl.constexpr,
                 WORDS_PER_GROUP: tl.constexpr, WINDOWS: tl.constexpr, P0: tl.constexpr, BITS: tl.constexpr,
                 CODES_PER_WORD: tl.constexpr, CODE_OFFSET: tl.constexpr):
    """One row of x per program (axis 1) times BLOCK_N rows of W (axis 0), FMA in fp32.

    Per word: ``sum_j (2**(23-P_j) + c_j) x_j`` (one LOP3 + one FFMA per weight) minus the offset
    ``sum_j (2**(23-P_j) + 2) x_j``, which all rows share (1/BLOCK_N FFMA per weight). At 8 rows
    per thread the inner loop is about 3 SASS instructions per weight. The offsets (up to 258)
    cost fp32 headroom: about 1e-5 relative error, far below a bf16 output's rounding.
    """
    CPW: tl.constexpr = CODES_PER_WORD // WINDOWS
    G: tl.constexpr = BLOCK_KW // WORDS_PER_GROUP
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_kw = tl.arange(0, BLOCK_KW)
    offs_g = tl.arange(0, G)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    s_rows = s_ptr + offs_n.to(tl.int64)[:, None] * stride_sn
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    acc = tl.zeros((BLOCK_N, G), tl.float32)
    words, scale = _gemv_tile(w_rows, s_rows, 0, KW, offs_kw, offs_g, n_mask, EVEN_K, WORDS_PER_GROUP)
    for kw0 in range(0, KW, BLOCK_KW):
        kw = kw0 + offs_kw
        kw_mask = kw < KW
        # Prefetch the next tile (all masked off after the last) so its loads overlap this math.
        next_words, next_scale = _gemv_tile(w_rows, s_rows, kw0 + BLOCK_KW, KW, offs_kw, offs_g, n_mask, False,
                                            WORDS_PER_GROUP)
        part = tl.zeros((BLOCK_N, BLOCK_KW), tl.float32)
        off = tl.zeros((BLOCK_KW,), tl.float32)
        for q in tl.static_range(WINDOWS):
            u = _window(words, q, P0, CPW, BITS)
            for r in tl.static_range(CPW):
                xj = tl.load(x_row + kw * CODES_PER_WORD + (q * CPW + r), mask=kw_mask, other=0.0).to(tl.float32)
                part += _window_value(u, code_mask, P0 + BITS * r) * xj[None, :]
                off += ((1 << (23 - P0 - BITS * r)) + CODE_OFFSET) * xj
        # Scale per group, not per word: 8x fewer scale loads and multiplies.
        part_g = tl.sum(tl.reshape(part, (BLOCK_N, G, WORDS_PER_GROUP)), axis=2)
        off_g = tl.sum(tl.reshape(off, (G, WORDS_PER_GROUP)), axis=1)
        acc += (part_g - off_g[None, :]) * scale.to(tl.float32)
        words, scale = next_words, next_scale
    y = tl.sum(acc, axis=1)
    tl.store(y_ptr + m.to(tl.int64) * stride_ym + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _grouped_pid(pid, num_a, num_b, GROUP: tl.constexpr):
    """Program id -> (a, b) tile, GROUP a-tiles at a time so that their b-tiles stay in L2."""
    width = GROUP * num_b
    first = (pid // width) * GROUP
    size = tl.minimum(num_a - first, GROUP)
    return first + (pid % width) % size, (pid % width) // size


@triton.jit(do_not_specialize=["M"])
def _gemm_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, k_per_split, stride_xm, stride_wn, stride_sn, stride_ym,
                 code_mask, magic, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, DOT_DTYPE: tl.constexpr,
                 INPUT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr, PAIR_DEQUANT: tl.constexpr,
                 GROUP_SIZE: tl.constexpr, WINDOWS: tl.constexpr, P0: tl.constexpr, BITS: tl.constexpr,
                 CODES_PER_WORD: tl.constexpr, CODE_OFFSET: tl.constexpr):
    """``y[M, N] = x[M, K] @ W[N, K].T``; W's tile is dequantized to DOT_DTYPE in registers.

    With SPLIT_K > 1, program axis 1 takes ``k_per_split`` inputs (a multiple of BLOCK_K) and
    writes fp32 partial sums to ``y_ptr`` as ``[SPLIT_K, M, N]`` (summed by ``_sum_splits_kernel``).
    PAIR_DEQUANT (bf16 dots): two weights per 32-bit op (``_unpack_words``) instead of fp32 math.
    The scales of the next tile load one iteration ahead: Triton does not pipeline 2-byte loads,
    and a scale read at the top of the iteration stalled every K step on its latency.
    """
    BLOCK_KW: tl.constexpr = BLOCK_K // CODES_PER_WORD
    WPG: tl.constexpr = GROUP_SIZE // CODES_PER_WORD
    pid_m, pid_n = _grouped_pid(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    k_start = tl.program_id(1) * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_kw = tl.arange(0, BLOCK_KW)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + (k_start + offs_k)[None, :]
    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + (k_start // CODES_PER_WORD + offs_kw)[None, :]
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)  # clamped: scale loads need no row mask
    s_rows = s_ptr + rows * stride_sn
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    scale = _mma_scales(s_rows, rows, k_start, k_end, K, BLOCK_K, GROUP_SIZE)
    for k0 in range(k_start, k_end, BLOCK_K):
        next_scale = _mma_scales(s_rows, rows, k0 + BLOCK_K, k_end, K, BLOCK_K, GROUP_SIZE)
        if EVEN_K:
            a = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
            words = tl.load(w_ptrs, mask=n_mask[:, None], other=0)
        else:
            a = tl.load(x_ptrs, mask=m_mask[:, None] & (k0 + offs_k < K)[None, :], other=0.0)
            kw_mask = k0 // CODES_PER_WORD + offs_kw < K // CODES_PER_WORD
            words = tl.load(w_ptrs, mask=n_mask[:, None] & kw_mask[None, :], other=0)
        if PAIR_DEQUANT:
            if BLOCK_K <= GROUP_SIZE:
                scale_w = scale.to(DOT_DTYPE)[:, None]
            else:
                G: tl.constexpr = BLOCK_K // GROUP_SIZE
                scale_w = tl.reshape(tl.broadcast_to(scale.to(DOT_DTYPE)[:, :, None], (BLOCK_N, G, WPG)),
                                     (BLOCK_N, BLOCK_KW))
            w = _unpack_words(words, magic, scale_w, BLOCK_N, BLOCK_KW, False, True, True, DOT_DTYPE, BITS,
                              CODES_PER_WORD, CODE_OFFSET)
        else:
            if BLOCK_K <= GROUP_SIZE:  # one scale per row for the whole tile
                scale_f = scale.to(tl.float32)[:, None]
            else:
                G2: tl.constexpr = BLOCK_K // GROUP_SIZE
                scale_f = tl.reshape(tl.broadcast_to(scale.to(tl.float32)[:, :, None], (BLOCK_N, G2, WPG)),
                                     (BLOCK_N, BLOCK_KW))
            w = _dequant_tile(words, scale_f, code_mask, BLOCK_N, BLOCK_KW, DOT_DTYPE, WINDOWS, P0, BITS,
                              CODES_PER_WORD, CODE_OFFSET)
        acc = tl.dot(a.to(DOT_DTYPE), tl.trans(w), acc, input_precision=INPUT_PRECISION)
        scale = next_scale
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_KW
    out_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)
    else:
        part_ptrs = y_ptr + (tl.program_id(1) * M + offs_m.to(tl.int64))[:, None] * N + offs_n[None, :]
        tl.store(part_ptrs, acc, mask=out_mask)


@triton.jit
def _sum_splits_kernel(part_ptr, y_ptr, MN, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    """``y = sum(part[SPLIT_K, MN])`` in a fixed order (deterministic, no atomics)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(part_ptr + s * MN + offs, mask=mask, other=0.0)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gemm_t_kernel(g_ptr, w_ptr, s_ptr, o_ptr, M, N, K, stride_gm, stride_wn, stride_sn, stride_om, code_mask,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                   DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, GROUP_SIZE: tl.constexpr,
                   WINDOWS: tl.constexpr, P0: tl.constexpr, BITS: tl.constexpr, CODES_PER_WORD: tl.constexpr,
                   CODE_OFFSET: tl.constexpr):
    """``out[M, K] = g[M, N] @ W[N, K]``: tiles over (M, K), reduction over N (the backward for x)."""
    BLOCK_KW: tl.constexpr = BLOCK_K // CODES_PER_WORD
    WPG: tl.constexpr = GROUP_SIZE // CODES_PER_WORD
    pid_m, pid_k = _grouped_pid(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    kw = pid_k * BLOCK_KW + tl.arange(0, BLOCK_KW)
    m_mask = offs_m < M
    kw_mask = kw < K // CODES_PER_WORD
    g_ptrs = g_ptr + offs_m.to(tl.int64)[:, None] * stride_gm + offs_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + offs_n
        n_mask = rows < N
        g = tl.load(g_ptrs, mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        words = tl.load(w_ptr + rows.to(tl.int64)[:, None] * stride_wn + kw[None, :],
                        mask=n_mask[:, None] & kw_mask[None, :], other=0)
        s_rows = s_ptr + rows.to(tl.int64) * stride_sn
        if BLOCK_K <= GROUP_SIZE:
            scale = tl.load(s_rows + (pid_k * BLOCK_K) // GROUP_SIZE, mask=n_mask, other=0.0)
            scale = scale.to(tl.float32)[:, None]
        else:
            scale = tl.load(s_rows[:, None] + (kw // WPG)[None, :], mask=n_mask[:, None] & kw_mask[None, :],
                            other=0.0).to(tl.float32)
        w = _dequant_tile(words, scale, code_mask, BLOCK_N, BLOCK_KW, DOT_DTYPE, WINDOWS, P0, BITS, CODES_PER_WORD,
                          CODE_OFFSET)
        acc = tl.dot(g.to(DOT_DTYPE), w, acc, input_precision=INPUT_PRECISION)
        g_ptrs += BLOCK_N
    o_ptrs = o_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_k[None, :]
    tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=m_mask[:, None] & (offs_k < K)[None, :])


# --- swap-AB tensor-core kernel ("mma") -----------------------------------------------------
# out^T [N, M] = W [N, K] @ x^T [K, M]. The dequantized weight tile is the MMA's A operand, which
# Hopper's wgmma reads from registers (B only from shared memory), so weights reach the tensor cores
# without program stores, fences and barriers; the tokens are the MMA's N side (16 at least), so one
# kernel serves decode (M = 1) through prefill. Measured on sm_90 SASS (Triton 3.6): per weight about
# 0.5 LOP3 + 0.5 HADD2 + 0.13 shifts; the register-to-fragment shuffle goes through shared memory
# (STS.128 + LDSM, about 0.25 per weight); the legacy FMA GEMV needed about 3.2 per weight.


@triton.jit
def _magic_pair(p, bias, SUBTRACT: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """int32 with a bf16 ``base + code`` in each half -> ``[..., 2]`` (low, high), minus ``bias`` (exact)."""
    q = tl.join(p.to(tl.int16), (p >> 16).to(tl.int16)).to(tl.bfloat16, bitcast=True).to(DOT_DTYPE)
    if SUBTRACT:
        q = q - bias
    return q


@triton.jit
def _unpack_words(words, magic, scale, ROWS: tl.constexpr, WORDS: tl.constexpr, PAIRED: tl.constexpr,
                  HAS_SCALE: tl.constexpr, SUBTRACT: tl.constexpr, DOT_DTYPE: tl.constexpr,
                  BITS: tl.constexpr, CODES_PER_WORD: tl.constexpr, CODE_OFFSET: tl.constexpr):
    """int32 words ``[ROWS, WORDS]`` -> ``[ROWS, WORDS * 16]`` weights ``code - offset`` (times ``scale``).

    Each 32-bit op makes two weights, one per 16-bit half: a 2-bit field OR-ed into the mantissa of
    a bf16 ``base`` reads ``base + code`` exactly (one LOP3 for AND + OR; ``magic`` = 0x43004300, two
    bf16 128s, is a runtime value so that ptxas keeps it in a register), and ``- (base + offset)``
    (HADD2) leaves ``code - offset``. A field at bit 0, 2 or 4 of a half fits base 128, 32 or 8.

    ``PAIRED``: a register holds codes ``s`` and ``s + 8`` (the same field of both halves; windows
    at shifts 0, 6, 12: 2 shifts + 8 LOP3 + 8 HADD2 per word). Code ``s + 8h`` lands at position
    ``2s + h``, so the other operand must be read in that order (``_pair_offsets``).
    Natural order: a register must hold codes ``2j, 2j + 1``; ``Y`` puts bits 2..17 of the word
    (codes 1..8) above bits 0..15 (codes 0..7), so field ``p`` of both halves is the pair ``p, p+1``
    (``Z`` likewise for codes 8..15): 5 shifts + 2 + 8 LOP3 + 8 HADD2 per word.
    ``scale`` (bf16, broadcastable to ``[ROWS, WORDS]``) multiplies exactly: ``code - offset`` is
    0, +-1 or -2. Without ``SUBTRACT`` the weights stay ``base + code`` (see ``_window_bias``).
    """
    tl.static_assert(BITS == 2 and CODES_PER_WORD == 16, "2-bit fields, 16 per word")
    F: tl.constexpr = ((1 << BITS) - 1) * 0x10001  # one field in each half
    m32 = magic - 0x01000100
    m8 = magic - 0x02000200
    b128: tl.constexpr = 128.0 + CODE_OFFSET
    b32: tl.constexpr = 32.0 + CODE_OFFSET
    b8: tl.constexpr = 8.0 + CODE_OFFSET
    # Arithmetic shifts: bit 31 smears only into bits that the masks drop.
    if PAIRED:
        t1 = words >> 6
        t2 = words >> 12
        p0 = _magic_pair((words & F) | magic, b128, SUBTRACT, DOT_DTYPE)  # codes 0 and 8
        p1 = _magic_pair((words & (F << 2)) | m32, b32, SUBTRACT, DOT_DTYPE)
        p2 = _magic_pair((words & (F << 4)) | m8, b8, SUBTRACT, DOT_DTYPE)
        p3 = _magic_pair((t1 & F) | magic, b128, SUBTRACT, DOT_DTYPE)
        p4 = _magic_pair((t1 & (F << 2)) | m32, b32, SUBTRACT, DOT_DTYPE)
        p5 = _magic_pair((t1 & (F << 4)) | m8, b8, SUBTRACT, DOT_DTYPE)
        p6 = _magic_pair((t2 & F) | magic, b128, SUBTRACT, DOT_DTYPE)
        p7 = _magic_pair((t2 & (F << 2)) | m32, b32, SUBTRACT, DOT_DTYPE)  # codes 7 and 15
    else:
        LO: tl.constexpr = 0xFFFF
        y = (words & LO) | ((words << 14) & ~LO)  # codes 0..7 below, 1..8 above
        z = ((words >> 16) & LO) | ((words >> 2) & ~LO)  # codes 8..15 below, 9..16 above
        y8 = y >> 8
        z8 = z >> 8
        p0 = _magic_pair((y & F) | magic, b128, SUBTRACT, DOT_DTYPE)  # codes 0 and 1
        p1 = _magic_pair((y & (F << 4)) | m8, b8, SUBTRACT, DOT_DTYPE)
        p2 = _magic_pair((y8 & F) | magic, b128, SUBTRACT, DOT_DTYPE)
        p3 = _magic_pair((y8 & (F << 4)) | m8, b8, SUBTRACT, DOT_DTYPE)
        p4 = _magic_pair((z & F) | magic, b128, SUBTRACT, DOT_DTYPE)
        p5 = _magic_pair((z & (F << 4)) | m8, b8, SUBTRACT, DOT_DTYPE)
        p6 = _magic_pair((z8 & F) | magic, b128, SUBTRACT, DOT_DTYPE)
        p7 = _magic_pair((z8 & (F << 4)) | m8, b8, SUBTRACT, DOT_DTYPE)  # codes 14 and 15
    if HAS_SCALE:
        sc = scale[:, :, None]
        p0, p1, p2, p3 = p0 * sc, p1 * sc, p2 * sc, p3 * sc
        p4, p5, p6, p7 = p4 * sc, p5 * sc, p6 * sc, p7 * sc
    # Joins add a last axis: [ROWS, WORDS, 2 (h), 2, 2, 2] where the last three index pair
    # j = 4a + 2b + c; moving h last puts pair j at positions 2j, 2j + 1 (its register's halves).
    w = tl.join(tl.join(tl.join(p0, p4), tl.join(p2, p6)), tl.join(tl.join(p1, p5), tl.join(p3, p7)))
    w = tl.permute(w, (0, 1, 3, 4, 5, 2))
    return tl.reshape(w, (ROWS, WORDS * CODES_PER_WORD))


@triton.jit
def _window_bias(BLOCK_K: tl.constexpr, CODE_OFFSET: tl.constexpr):
    """``base + CODE_OFFSET`` of each position of a paired tile: what ``SUBTRACT`` takes off."""
    s = (tl.arange(0, BLOCK_K) % 16) // 2  # the pair (code s and s + 8)
    base = tl.where(s % 3 == 0, 128.0, tl.where(s % 3 == 1, 32.0, 8.0))
    return base + CODE_OFFSET


@triton.jit
def _pair_offsets(BLOCK_K: tl.constexpr, PAIRED: tl.constexpr, CODES_PER_WORD: tl.constexpr):
    """Input offsets ``[BLOCK_K]`` in the order ``_unpack_words`` lays the codes out."""
    k = tl.arange(0, BLOCK_K)
    if PAIRED:
        half: tl.constexpr = CODES_PER_WORD // 2
        k = (k // CODES_PER_WORD) * CODES_PER_WORD + (k % CODES_PER_WORD) // 2 + (k % 2) * half
    return k


@triton.jit
def _mma_scales(s_rows, rows, k0, k_end, K, BLOCK_K: tl.constexpr, GROUP_SIZE: tl.constexpr):
    """Scales of the tile at ``k0``: ``[ROWS]`` when it lies in one group, else ``[ROWS, BLOCK_K / 128]``.

    Zero past ``k_end`` (the prefetch after the last tile reads nothing).
    """
    live = (rows * 0 + k0) < k_end  # a [ROWS] mask: scalar & tensor masks trip the interpreter
    if BLOCK_K <= GROUP_SIZE:
        return tl.load(s_rows + k0 // GROUP_SIZE, mask=live, other=0.0)
    else:
        g = k0 // GROUP_SIZE + tl.arange(0, BLOCK_K // GROUP_SIZE)
        mask = live[:, None] & (g < K // GROUP_SIZE)[None, :]
        return tl.load(s_rows[:, None] + g[None, :], mask=mask, other=0.0)


@triton.jit(do_not_specialize=["M", "num_splits"])  # M only masks: one binary for every M > 1
def _mma_kernel(x_ptr, w_ptr, s_ptr, y_ptr, part_ptr, lock_ptr, M, N, K, kw_per_split, num_splits, stride_xm,
                stride_wn, stride_sn, stride_ym, magic, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr, SPLIT: tl.constexpr, X_VEC: tl.constexpr,
                PAIRED: tl.constexpr,
                SCALE_AFTER_DOT: tl.constexpr, EVEN_K: tl.constexpr, DOT_DTYPE: tl.constexpr,
                INPUT_PRECISION: tl.constexpr, GROUP_SIZE: tl.constexpr, BITS: tl.constexpr,
                CODES_PER_WORD: tl.constexpr, CODE_OFFSET: tl.constexpr):
    """``y[M, N] = x[M, K] @ W[N, K].T`` as ``acc[BLOCK_N, BLOCK_M] = W_tile @ x_tile.T`` (swap AB).

    Program axis 0 walks the (N, M) tiles, N fastest: all N tiles (GROUP_N = 0; the packed weights
    fit in L2, x tiles do not) or GROUP_N of them per x tile,
    axis 1 the ``num_splits`` slices of ``kw_per_split`` words (passed in words so that Triton sees
    their 16-word alignment and loads 16 bytes at a time). With SPLIT each program writes its
    fp32 partial to ``part_ptr`` ``[num_splits, M, N]`` and bumps its tile's counter in ``lock_ptr``;
    the last one to arrive adds the partials in split order (deterministic), stores ``y`` and
    resets the counter to 0 for the next launch. X_VEC (M = 1): x is read once as a vector and
    broadcast over the 16 MMA columns. SCALE_AFTER_DOT: a tile is one scale group, its fp32 dot
    is scaled (cheap when BLOCK_M is small); else the bf16 weights are scaled before the dot.
    """
    BLOCK_KW: tl.constexpr = BLOCK_K // CODES_PER_WORD
    if GROUP_N == 0:  # every N tile of one x tile, then the next x tile
        pid_n = tl.program_id(0) % tl.cdiv(N, BLOCK_N)
        pid_m = tl.program_id(0) // tl.cdiv(N, BLOCK_N)
    else:
        pid_n, pid_m = _grouped_pid(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(M, BLOCK_M), GROUP_N)
    split = tl.program_id(1)
    kw_start = split * kw_per_split
    k_start = kw_start * CODES_PER_WORD
    k_end = tl.minimum(K, k_start + kw_per_split * CODES_PER_WORD)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    m_mask = offs_m < M
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)  # clamped rows: weight loads need no row mask
    kk = _pair_offsets(BLOCK_K, PAIRED, CODES_PER_WORD)
    offs_kw = tl.arange(0, BLOCK_KW)
    w_ptrs = w_ptr + rows[:, None] * stride_wn + (kw_start + offs_kw)[None, :]
    s_rows = s_ptr + rows * stride_sn
    if X_VEC:
        x_ptrs = x_ptr + k_start + kk
        xv = tl.load(x_ptrs, mask=k_start + kk < k_end, other=0.0)  # prefetched like the scales
    else:
        x_ptrs = x_ptr + offs_m.to(tl.int64)[None, :] * stride_xm + (k_start + kk)[:, None]
    scale = _mma_scales(s_rows, rows, k_start, k_end, K, BLOCK_K, GROUP_SIZE)
    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    # X_VEC with one-group tiles: the weights stay base + code (no HADD2, half the dequant work) and
    # the bases' share, sum_k base_k x_k per group, is taken off once per row: corr.
    X_BIAS: tl.constexpr = X_VEC and SCALE_AFTER_DOT
    corr = tl.zeros((BLOCK_N,), tl.float32)
    if X_BIAS:
        bias_k = _window_bias(BLOCK_K, CODE_OFFSET)
    for k0 in range(k_start, k_end, BLOCK_K):
        # The next tile's scales now (2-byte loads are not pipelined by Triton): their latency hides
        # behind this tile's math.
        next_scale = _mma_scales(s_rows, rows, k0 + BLOCK_K, k_end, K, BLOCK_K, GROUP_SIZE)
        if X_VEC:
            x_cur = xv
            xv = tl.load(x_ptrs + BLOCK_K, mask=k0 + BLOCK_K + kk < k_end, other=0.0)
            xT = tl.broadcast_to(x_cur[:, None], (BLOCK_K, BLOCK_M))
        if EVEN_K:
            words = tl.load(w_ptrs)
            if not X_VEC:
                xT = tl.load(x_ptrs, mask=m_mask[None, :], other=0.0)
        else:
            kw_ok = k0 // CODES_PER_WORD + offs_kw < K // CODES_PER_WORD
            words = tl.load(w_ptrs, mask=kw_ok[None, :], other=0)
            if not X_VEC:
                xT = tl.load(x_ptrs, mask=m_mask[None, :] & (k0 + kk < K)[:, None], other=0.0)
        xT = xT.to(DOT_DTYPE)
        if SCALE_AFTER_DOT:
            w = _unpack_words(words, magic, magic, BLOCK_N, BLOCK_KW, PAIRED, False, not X_BIAS, DOT_DTYPE,
                              BITS, CODES_PER_WORD, CODE_OFFSET)
            acc += tl.dot(w, xT, input_precision=INPUT_PRECISION) * scale.to(tl.float32)[:, None]
            if X_BIAS:
                corr += tl.sum(x_cur.to(tl.float32) * bias_k, axis=0) * scale.to(tl.float32)
        else:
            if BLOCK_K <= GROUP_SIZE:
                scale_w = scale.to(DOT_DTYPE)[:, None]
            else:
                G: tl.constexpr = BLOCK_K // GROUP_SIZE
                scale_w = tl.broadcast_to(scale.to(DOT_DTYPE)[:, :, None], (BLOCK_N, G, BLOCK_KW // G))
                scale_w = tl.reshape(scale_w, (BLOCK_N, BLOCK_KW))
            w = _unpack_words(words, magic, scale_w, BLOCK_N, BLOCK_KW, PAIRED, True, True, DOT_DTYPE, BITS,
                              CODES_PER_WORD, CODE_OFFSET)
            acc = tl.dot(w, xT, acc, input_precision=INPUT_PRECISION)
        scale = next_scale
        w_ptrs += BLOCK_KW
        x_ptrs += BLOCK_K
    if X_BIAS:
        acc -= corr[:, None]
    out_mask = n_mask[:, None] & m_mask[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[None, :] * stride_ym + offs_n[:, None]
    if not SPLIT:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)
    else:
        part = part_ptr + offs_m.to(tl.int64)[None, :] * N + offs_n[:, None]
        mn = M.to(tl.int64) * N  # one partial's size
        tl.store(part + split * mn, acc, mask=out_mask)
        tl.debug_barrier()  # every thread's partial is written before the counter says so
        arrived = tl.atomic_add(lock_ptr + tl.program_id(0), 1, sem="release", scope="gpu")  # as _split_fixup
        if arrived == num_splits - 1:
            tl.atomic_xchg(lock_ptr + tl.program_id(0), 0, sem="acquire", scope="gpu")  # reset, then the loads
            total = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
            for s in range(num_splits):
                total += tl.load(part + s * mn, mask=out_mask, other=0.0, cache_modifier=".cg")
            tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=out_mask)


# --- decode kernel ("decode", M <= 16): no shared memory or barriers in its loop -------------
# Swap AB as "mma", but a program owns one K chunk (``BLOCK_K``, a few scale groups) and walks
# ``iters`` tiles of ``BLOCK_N`` weight rows, so the activations are loaded, permuted and handed to
# the MMA (wgmma's B operand in shared memory) once, before the loop; inside it only words and
# scales are loaded. The weights reach the MMA's A registers straight from the loaded words: a
# wgmma / mma.sync A fragment gives thread (warp w, lane 4g + q) rows g and g + 8 of its warp's 16
# and, per 16-wide k chunk, k = 2q, 2q + 1, 2q + 8, 2q + 9 as bf16 pairs; in the permuted k order
#
#     logical k = 64u + 32a + 16b + 8j + 2q + h  <->  physical code 16(2q + u) + 4a + 2b + j + 8h
#
# (per 128-code scale group) the thread that loads words 2q and 2q + 1 of a row (8 bytes) already
# holds exactly its operand. Per 32-bit op (LOP3) the unpack makes the bf16 pair ``base_j + c``
# (codes at bits 2j and 16 + 2j OR-ed into bf16 128 or 32, whose mantissa unit sits at bit 0 or 2),
# the activations are stored permuted, and the constant part ``sum_k (base_k + 2) x_k`` of a group
# (the MMA of a row of code-2 weights, computed once) is subtracted after the MMA. Weight rows
# are permuted the same way (``_dec_tile_row``). The same scheme as ops/moe.py's grouped path,
# kept separate here. With a split K each program stores its fp32 partials; the last program of
# a row block (a counter, as in "mma") adds them in split order: deterministic, one launch.


@triton.jit
def _dec_tile_row(l, W: tl.constexpr):
    """MMA row ``l`` -> the row of the loaded words tile it comes from (``W`` warps along rows)."""
    return (l & 7) + 8 * ((l >> 4) % W) + 8 * W * ((l >> 3) & 1) + 16 * W * (l // (16 * W))


@triton.jit
def _dec_unpack_pairs(words, magic, magic32, BN: tl.constexpr, W: tl.constexpr):
    """The LOP3 part of ``_dec_unpack``: int32 bf16 pairs ``[row, q, u, a, b, j]`` (before the split into halves)."""
    w = tl.reshape(words, (BN // (16 * W), 2, W, 8, 8))
    w = tl.reshape(tl.permute(w, (0, 2, 1, 3, 4)), (BN, 4, 2))  # [row, q, u]
    t = tl.join(w, w >> 8)  # a: codes + 4
    t = tl.join(t, t >> 4)  # b: codes + 2
    # j: the code at bits 2j and 16 + 2j of either half, OR-ed into bf16 128 (mantissa unit 1 at bit
    # 0) or 32 (unit 1/4: bit 2 counts 1) reads base + c. The magics are runtime values, so that
    # AND + OR fuse into one LOP3.
    return tl.join((t & (3 * 0x10001)) | magic, (t & (12 * 0x10001)) | magic32)


@triton.jit
def _dec_unpack(words, magic, magic32, BN: tl.constexpr, W: tl.constexpr, MAGIC_DTYPE: tl.constexpr):
    """Words ``[BN, 8]`` of one scale group -> ``[BN, 128]`` bf16 ``base_j + c``: 128 + c (j = 0) or 32 + c.

    Row l / column k hold words-tile row ``_dec_tile_row(l)`` / the code at logical position k.
    11 integer ops per 16 codes (3 shifts, 8 LOP3), already in the MMA's register layout.
    """
    t = _dec_unpack_pairs(words, magic, magic32, BN, W)
    p = tl.join(t.to(tl.int16), (t >> 16).to(tl.int16))  # h: codes + 8 -> [row, q, u, a, b, j, h]
    p = tl.permute(p, (0, 2, 3, 4, 5, 1, 6))
    return tl.reshape(p, (BN, 128)).to(MAGIC_DTYPE, bitcast=True)


@triton.jit
def _dec_x_group(x_rows, m_mask, k0, K, BLOCK_M: tl.constexpr, DOT_DTYPE: tl.constexpr,
                 CODE_OFFSET: tl.constexpr, EVEN_K: tl.constexpr):
    """Group at input ``k0``: ``x'^T [128, BLOCK_M]`` (permuted) and its constant parts ``[BLOCK_M]``.

    The constant part is ``sum_k (base_k + CODE_OFFSET) x'_k``. (Computing it as the MMA of a row of
    code-2 weights, in the accumulator's layout, kept 32 wgmma descriptors live across the loop:
    166 registers instead of 96.)
    """
    c = tl.arange(0, 128)
    if EVEN_K:
        x = tl.load(x_rows + k0 + c[None, :], mask=m_mask[:, None], other=0.0)
    else:
        x = tl.load(x_rows + k0 + c[None, :], mask=m_mask[:, None] & (k0 + c < K)[None, :], other=0.0)
    # physical c = 32q + 16u + 8h + 4a + 2b + j -> logical [u, a, b, j, q, h]
    xp = tl.reshape(tl.permute(tl.reshape(x.to(DOT_DTYPE), (BLOCK_M, 4, 2, 2, 2, 2, 2)), (0, 2, 4, 5, 6, 1, 3)),
                    (BLOCK_M, 128))
    # j = bit 0 of the physical position: summed in load order (whole rows per warp, no shared memory)
    base = tl.where((c & 1) == 1, 32.0 + CODE_OFFSET, 128.0 + CODE_OFFSET)
    q = tl.sum(x.to(tl.float32) * base[None, :], axis=1)
    return tl.trans(xp), q


@triton.jit
def _dec_group(words, scale, xT, q, magic, magic32, acc, BN: tl.constexpr, W: tl.constexpr,
               MAGIC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """``acc + (W_group x_group)`` for one scale group: the fp32 dot minus its constant part, times the scale."""
    a = _dec_unpack(words, magic, magic32, BN, W, MAGIC_DTYPE).to(DOT_DTYPE)
    part = tl.dot(a, xT, input_precision=INPUT_PRECISION)
    return acc + (part - q[None, :]) * scale.to(tl.float32)[:, None]


@triton.jit
def _dec_tile(w_tile, s_tile, rows, n, dr, N, KW, NG, kw0, g0, stride_wn, stride_sn, G: tl.constexpr,
              WPG: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr):
    """Words ``[BLOCK_N, 8]`` and scales ``[BLOCK_N]`` (MMA row order) per group of the tile ``dr`` rows
    below the first (groups past ``G`` are copies of group 0, never used).

    ``EVEN_N``: ``w_tile`` / ``s_tile`` are the first tile's pointers, advanced by a scalar (no per-row
    address math). Else they are the base pointers and ``rows`` (words-tile order) / ``n`` (MMA
    order) the first tile's rows, clamped here to ``N - 1`` so that loads need no row mask. The word
    column index is written in runs of 2: 8-byte loads, the word pair the MMA layout gives each thread.
    """
    if EVEN_N:
        w_ptrs = w_tile + dr * stride_wn
        s_ptrs = s_tile + dr * stride_sn
    else:
        c = tl.arange(0, 8)
        c = (c // 2) * 2 + c % 2
        w_ptrs = w_tile + tl.minimum(rows + dr, N - 1).to(tl.int64)[:, None] * stride_wn + (kw0 + c)[None, :]
        s_ptrs = s_tile + tl.minimum(n + dr, N - 1).to(tl.int64) * stride_sn + g0
    if EVEN_K:
        w0 = tl.load(w_ptrs)
        s0 = tl.load(s_ptrs)
    else:
        kw_ok = (n * 0 + kw0) < KW  # a [ROWS] mask: scalar & tensor masks trip the interpreter
        w0 = tl.load(w_ptrs, mask=kw_ok[:, None], other=0)
        s0 = tl.load(s_ptrs, mask=kw_ok, other=0.0)
    w1, w2, w3, s1, s2, s3 = w0, w0, w0, s0, s0, s0
    for i in tl.static_range(1, G):
        if EVEN_K:
            wi = tl.load(w_ptrs + i * WPG)
            si = tl.load(s_ptrs + i)
        else:
            ok = (n * 0 + g0 + i) < NG
            wi = tl.load(w_ptrs + i * WPG, mask=ok[:, None], other=0)
            si = tl.load(s_ptrs + i, mask=ok, other=0.0)
        if i == 1:
            w1, s1 = wi, si
        elif i == 2:
            w2, s2 = wi, si
        else:
            w3, s3 = wi, si
    return w0, w1, w2, w3, s0, s1, s2, s3


@triton.jit
def _dec_store(ptrs, vals, mask, ASM: tl.constexpr):
    """Store ``vals`` (fp32, or 16-bit) at ``ptrs``; ASM: one ``st.global`` per element in the registers'
    own layout (``tl.store`` has Triton convert the MMA layout through shared memory first: 2 barriers
    per tile)."""
    if ASM:
        if vals.dtype.primitive_bitwidth == 32:
            tl.inline_asm_elementwise(
                "{ .reg .pred p; setp.ne.b32 p, $3, 0; @p st.global.b32 [$1], $2; mov.b32 $0, 0; }",
                "=r,l,r,r", [ptrs, vals.to(tl.int32, bitcast=True), mask.to(tl.int32)], dtype=tl.int32,
                is_pure=False, pack=1)
        else:
            tl.inline_asm_elementwise(
                "{ .reg .pred p; setp.ne.b32 p, $3, 0; @p st.global.b16 [$1], $2; mov.b32 $0, 0; }",
                "=r,l,h,r", [ptrs, vals.to(tl.int16, bitcast=True), mask.to(tl.int32)], dtype=tl.int32,
                is_pure=False, pack=1)
    else:
        tl.store(ptrs, vals, mask=mask)


@triton.jit(do_not_specialize=["M", "num_splits", "iters"])
def _decode_kernel(x_ptr, w_ptr, s_ptr, y_ptr, part_ptr, lock_ptr, M, N, K, num_splits, iters, stride_xm,
                   stride_wn, stride_sn, stride_ym, magic, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, W: tl.constexpr, SPLIT: tl.constexpr, SPLIT_BATCH: tl.constexpr,
                   FIX: tl.constexpr, AHEAD: tl.constexpr, ASM_STORE: tl.constexpr,
                   EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                   MAGIC_DTYPE: tl.constexpr, GROUP_SIZE: tl.constexpr,
                   BITS: tl.constexpr, CODES_PER_WORD: tl.constexpr, CODE_OFFSET: tl.constexpr,
                   ABLATE: tl.constexpr = 0, KSUB: tl.constexpr = 1):
    """``y[M, N] = x[M, K] @ W[N, K].T``; program (row block x token tile, K chunk).

    Axis 0: ``iters * BLOCK_N`` weight rows (the row blocks of a token tile together), axis 1: the
    ``BLOCK_K`` inputs (``BLOCK_K / 128`` scale groups, static) of split ``program_id(1)``.

    ``ABLATE`` (bits ``DEC_ABL_*``) and ``KSUB`` are timing-only switches (``bench_linear.py --ablate``;
    wrong results): 0 and 1 compile them out. ``KSUB`` > 1: a program walks KSUB consecutive BLOCK_K
    chunks per row tile (the x of the first chunk reused), so the split count is K / (KSUB BLOCK_K).
    """
    tl.static_assert(BITS == 2 and CODES_PER_WORD == 16 and GROUP_SIZE == 128,
                     "the layout is for 2-bit codes in groups of 128")
    tl.static_assert(BLOCK_N % (16 * W) == 0, "block_n must be a multiple of 16 * num_warps")
    G: tl.constexpr = BLOCK_K // GROUP_SIZE
    tl.static_assert(G == 1 or G == 2 or G == 4, "block_k must be 128, 256 or 512")
    WPG: tl.constexpr = GROUP_SIZE // CODES_PER_WORD
    A_NOFIX: tl.constexpr = (ABLATE & 1) != 0  # no counter / last-program sum (partials stored)
    A_NOSTORE: tl.constexpr = (ABLATE & 2) != 0  # no per-tile stores (acc summed into a sink)
    A_NOMMA: tl.constexpr = (ABLATE & 4) != 0  # unpack (LOP3s) but no wgmma; scales kept by an FFMA
    A_LOADS: tl.constexpr = (ABLATE & 8) != 0  # words and scales loaded, neither unpacked nor multiplied
    A_NOX: tl.constexpr = (ABLATE & 16) != 0  # no x prologue (zeros)
    A_KMAJOR: tl.constexpr = (ABLATE & 32) != 0  # words read as if stored [split, N, BLOCK_K / 16]
    A_PIN: tl.constexpr = (ABLATE & 64) != 0  # a barrier right after the next tile's loads (result stays exact)
    if ABLATE != 0 or KSUB != 1:
        tl.static_assert(EVEN_N and EVEN_K, "the ablations take whole tiles and chunks only")
    if A_KMAJOR:
        tl.static_assert(KSUB == 1, "k-major words with one chunk per program only")
    RB = iters * BLOCK_N
    num_rb = tl.cdiv(N, RB)
    pid_rb = tl.program_id(0) % num_rb
    pid_m = tl.program_id(0) // num_rb
    split = tl.program_id(1)
    k_start = split * BLOCK_K
    KW = K // CODES_PER_WORD
    NG = K // GROUP_SIZE
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    magic32 = magic - 0x01000100  # bf16 32 in either half
    # The activations of the chunk, once: G groups (static), each [128, BLOCK_M] and its constant part.
    if A_NOX:
        x0 = tl.zeros((GROUP_SIZE, BLOCK_M), DOT_DTYPE)
        q0 = tl.zeros((BLOCK_M,), tl.float32)
        x1, x2, x3, q1, q2, q3 = x0, x0, x0, q0, q0, q0
    else:
        x0, q0 = _dec_x_group(x_rows, m_mask, k_start, K, BLOCK_M, DOT_DTYPE, CODE_OFFSET, EVEN_K)
        if G > 1:
            x1, q1 = _dec_x_group(x_rows, m_mask, k_start + GROUP_SIZE, K, BLOCK_M, DOT_DTYPE, CODE_OFFSET,
                                  EVEN_K)
        if G > 2:
            x2, q2 = _dec_x_group(x_rows, m_mask, k_start + 2 * GROUP_SIZE, K, BLOCK_M, DOT_DTYPE, CODE_OFFSET,
                                  EVEN_K)
            x3, q3 = _dec_x_group(x_rows, m_mask, k_start + 3 * GROUP_SIZE, K, BLOCK_M, DOT_DTYPE, CODE_OFFSET,
                                  EVEN_K)
    l = tl.arange(0, BLOCK_N)
    trow = _dec_tile_row(l, W)  # MMA row -> words-tile row
    kw0 = k_start // CODES_PER_WORD
    g0 = k_start // GROUP_SIZE
    row0 = pid_rb * RB
    n_tiles = tl.minimum(iters, tl.cdiv(N - row0, BLOCK_N))
    mn = M.to(tl.int64) * N  # one partial's size
    rows = row0 + l  # first tile's rows: words-tile order
    n0 = row0 + trow  # and MMA order
    if EVEN_N:
        c = tl.arange(0, 8)
        c = (c // 2) * 2 + c % 2
        if A_KMAJOR:  # timing only: this program's words as one contiguous [rows, BLOCK_K / 16] block
            WPC: tl.constexpr = BLOCK_K // CODES_PER_WORD
            w_tile = w_ptr + split.to(tl.int64) * N * WPC + rows.to(tl.int64)[:, None] * WPC + c[None, :]
            w_stride = WPC
        else:
            w_tile = w_ptr + rows.to(tl.int64)[:, None] * stride_wn + (kw0 + c)[None, :]
            w_stride = stride_wn
        s_tile = s_ptr + n0.to(tl.int64) * stride_sn + g0
    else:
        w_tile = w_ptr
        s_tile = s_ptr
        w_stride = stride_wn
    if A_NOSTORE:
        sink = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    if A_LOADS:
        wsink = tl.zeros((BLOCK_N, 8), tl.int32)
    elif A_NOMMA:
        wsink = tl.zeros((BLOCK_N, 4), tl.int32)
    if KSUB > 1:
        acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    # Tile t + AHEAD's words and scales are loaded while tile t is computed (registers: AHEAD + 1
    # tiles; past the last tile the loads re-read it, which is cached). With KSUB > 1 (timing only)
    # a step is (tile s // KSUB, chunk s % KSUB).
    w0, w1, w2, w3, s0, s1, s2, s3 = _dec_tile(w_tile, s_tile, rows, n0, 0, N, KW, NG, kw0, g0, w_stride,
                                               stride_sn, G, WPG, EVEN_K, EVEN_N)
    if AHEAD > 1:
        if KSUB > 1:
            v0, v1, v2, v3, u0, u1, u2, u3 = _dec_tile(w_tile + BLOCK_K // CODES_PER_WORD, s_tile + G, rows, n0, 0,
                                                       N, KW, NG, kw0, g0, w_stride, stride_sn, G, WPG, EVEN_K,
                                                       EVEN_N)
        else:
            v0, v1, v2, v3, u0, u1, u2, u3 = _dec_tile(w_tile, s_tile, rows, n0,
                                                       tl.minimum(1, n_tiles - 1) * BLOCK_N, N, KW, NG, kw0, g0,
                                                       w_stride, stride_sn, G, WPG, EVEN_K, EVEN_N)
    for step in range(n_tiles * KSUB):
        if KSUB > 1:
            t = step // KSUB
            nxt = tl.minimum(step + AHEAD, n_tiles * KSUB - 1)
            nw0, nw1, nw2, nw3, ns0, ns1, ns2, ns3 = _dec_tile(
                w_tile + (nxt % KSUB) * (BLOCK_K // CODES_PER_WORD), s_tile + (nxt % KSUB) * G, rows, n0,
                (nxt // KSUB) * BLOCK_N, N, KW, NG, kw0, g0, w_stride, stride_sn, G, WPG, EVEN_K, EVEN_N)
            acc = tl.where(step % KSUB == 0, 0.0, acc)
        else:
            t = step
            dr = tl.minimum(t + AHEAD, n_tiles - 1) * BLOCK_N
            nw0, nw1, nw2, nw3, ns0, ns1, ns2, ns3 = _dec_tile(w_tile, s_tile, rows, n0, dr, N, KW, NG, kw0, g0,
                                                               w_stride, stride_sn, G, WPG, EVEN_K, EVEN_N)
            acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
        if A_PIN:  # ptxas does not move the loads past a barrier (else it sinks them behind the wgmma waits)
            tl.debug_barrier()
        n = n0 + t * BLOCK_N  # output row of each MMA row
        if A_LOADS or A_NOMMA:  # timing only: keep the loads (and the unpack) alive without the MMA
            sc = s0.to(tl.float32)
            if G > 1:
                sc += s1.to(tl.float32)
            if G > 2:
                sc += s2.to(tl.float32) + s3.to(tl.float32)
            acc += sc[:, None] * q0[None, :]
            if A_LOADS:
                ww = w0
                if G > 1:
                    ww = ww ^ w1
                if G > 2:
                    ww = ww ^ w2 ^ w3
                wsink = wsink ^ ww
            else:
                tt = _dec_unpack_pairs(w0, magic, magic32, BLOCK_N, W)
                if G > 1:
                    tt = tt ^ _dec_unpack_pairs(w1, magic, magic32, BLOCK_N, W)
                if G > 2:
                    tt = tt ^ _dec_unpack_pairs(w2, magic, magic32, BLOCK_N, W)
                    tt = tt ^ _dec_unpack_pairs(w3, magic, magic32, BLOCK_N, W)
                tt = tl.xor_sum(tl.xor_sum(tl.xor_sum(tl.xor_sum(tt, axis=5), axis=4), axis=3), axis=2)
                wsink = wsink ^ tt
        else:
            acc = _dec_group(w0, s0, x0, q0, magic, magic32, acc, BLOCK_N, W, MAGIC_DTYPE, DOT_DTYPE,
                             INPUT_PRECISION)
            if G > 1:
                acc = _dec_group(w1, s1, x1, q1, magic, magic32, acc, BLOCK_N, W, MAGIC_DTYPE, DOT_DTYPE,
                                 INPUT_PRECISION)
            if G > 2:
                acc = _dec_group(w2, s2, x2, q2, magic, magic32, acc, BLOCK_N, W, MAGIC_DTYPE, DOT_DTYPE,
                                 INPUT_PRECISION)
                acc = _dec_group(w3, s3, x3, q3, magic, magic32, acc, BLOCK_N, W, MAGIC_DTYPE, DOT_DTYPE,
                                 INPUT_PRECISION)
        if A_NOSTORE:
            sink += acc
        elif KSUB == 1 or step % KSUB == KSUB - 1:
            out_mask = (n < N)[:, None] & m_mask[None, :]
            if SPLIT:
                part = part_ptr + offs_m.to(tl.int64)[None, :] * N + n[:, None]
                _dec_store(part + split * mn, acc, out_mask, ASM_STORE)
            else:
                y_ptrs = y_ptr + offs_m.to(tl.int64)[None, :] * stride_ym + n[:, None]
                _dec_store(y_ptrs, acc.to(y_ptr.dtype.element_ty), out_mask, ASM_STORE)
        if AHEAD > 1:
            w0, w1, w2, w3, s0, s1, s2, s3 = v0, v1, v2, v3, u0, u1, u2, u3
            v0, v1, v2, v3, u0, u1, u2, u3 = nw0, nw1, nw2, nw3, ns0, ns1, ns2, ns3
        else:
            w0, w1, w2, w3, s0, s1, s2, s3 = nw0, nw1, nw2, nw3, ns0, ns1, ns2, ns3
    # Timing only: the sinks are stored under a condition that (practically) never holds, so that
    # nothing they depend on is dead code.
    if A_NOSTORE:
        total = tl.sum(tl.sum(sink, axis=1), axis=0)
        if total == 1.5e-38:
            tl.store(y_ptr, total.to(y_ptr.dtype.element_ty))
    if A_LOADS or A_NOMMA:
        bits = tl.xor_sum(tl.xor_sum(wsink, axis=1), axis=0)
        if bits == 0x5EED1234:
            tl.store(y_ptr, bits.to(tl.float32).to(y_ptr.dtype.element_ty))
    if SPLIT and not A_NOFIX:
        _split_fixup(part_ptr, y_ptr, lock_ptr, tl.program_id(0), M, N, mn, num_splits, row0,
                     tl.minimum(RB, N - row0), pid_m * BLOCK_M, tl.minimum(BLOCK_M, M - pid_m * BLOCK_M), stride_ym,
                     SPLIT_BATCH, FIX)


@triton.jit
def _split_fixup(part_ptr, y_ptr, lock_ptr, lock, M, N, mn, num_splits, row0, R, m0, MT, stride_ym,
                 SPLIT_BATCH: tl.constexpr, FIX: tl.constexpr):
    """Split K, called by every program after its partials are stored: the last of the ``num_splits``
    programs of a block (counter ``lock``) adds the block's ``R`` rows x ``MT`` tokens of partials in
    split order (deterministic), ``SPLIT_BATCH`` splits' loads in flight together (one L2 round trip
    per batch, not per split), stores them and resets the counter (graph-safe)."""
    tl.debug_barrier()  # every thread's partials are written before the counter says so
    # Release only: an acquire here would make every program invalidate its L1 (ncu: ~12 % of the
    # "lines" kernel's stall samples at M = 1). The last program needs no acquire either (CUDA's
    # threadFenceReduction pattern): its partial loads are issued only after the counter's value came
    # back, and they read L2 (.cg), where every other split's stores landed before its increment.
    # An acquire exchange here cost 0.1-0.3 us of the M = 1 tail (H100, benchmarks/linear_notes.md).
    arrived = tl.atomic_add(lock_ptr + lock, 1, sem="release", scope="gpu")
    if arrived == num_splits - 1:
        tl.store(lock_ptr + lock, 0)  # reset for the next call (graph replays): kernel boundaries order it
        for e0 in range(0, R * MT, FIX):
            e = e0 + tl.arange(0, FIX)
            ok = e < R * MT
            off = (m0 + e // R).to(tl.int64) * N + row0 + e % R
            total = tl.zeros((FIX,), tl.float32)
            for sb in range(0, num_splits, SPLIT_BATCH):
                for i in tl.static_range(SPLIT_BATCH):
                    live = ok & ((e * 0 + sb + i) < num_splits)
                    total += tl.load(part_ptr + (sb + i) * mn + off, mask=live, other=0.0, cache_modifier=".cg")
            y_off = (m0 + e // R).to(tl.int64) * stride_ym + row0 + e % R
            tl.store(y_ptr + y_off, total.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _lines_tile(w_ptr, s_ptr, w_off, s_off, tile_rows, mma_rows, dr, N, stride_wn, stride_sn, smask,
                EVEN_N: tl.constexpr):
    """Words of the tile ``dr`` rows down as two ``[BLOCK_N, 16]`` halves of the 512-input chunk (tile-row
    order; 16-byte loads, four threads per row and 64-byte run: two separate 2-D loads, so that every
    Triton version lays them out alike), and its scales ``[BLOCK_N, NCOL]`` (MMA-row order, one column
    per token and group). ``w_off`` / ``s_off``: the first tile's offsets (whole tiles), or the column
    offsets, the rows ``tile_rows`` / ``mma_rows`` then clamped to ``N - 1`` here (a ragged last tile)."""
    if EVEN_N:
        w = w_ptr + w_off + dr * stride_wn
        return tl.load(w), tl.load(w + 16), tl.load(s_ptr + s_off + dr * stride_sn, mask=smask, other=0.0)
    wr = tl.minimum(tile_rows + dr, N - 1).to(tl.int64)
    sr = tl.minimum(mma_rows + dr, N - 1).to(tl.int64)
    w = w_ptr + wr[:, None] * stride_wn + w_off
    return tl.load(w), tl.load(w + 16), tl.load(s_ptr + sr[:, None] * stride_sn + s_off, mask=smask, other=0.0)


@triton.jit
def _lines_unpack(w_lo, w_hi, magic, magic32, BN: tl.constexpr, W: tl.constexpr, H2: tl.constexpr,
                  MMA_V2: tl.constexpr):
    """Words ``[BN, 16]`` x 2 (h2) of one chunk (thread (g, q) of warp w holds words 16 h2 + 4q .. + 3 of
    tile rows g + 8w + 8W e + 16W rep) -> the MMA's A operand ``[BN, 256 H2]`` bf16 ``base + c``
    (base 128 for even codes, 32 for odd) with no data leaving its thread: MMA row l is tile row
    ``_dec_tile_row(l)``, logical k = ((((u 2 + a) 2 + b) 2 + j) 4 + q) 2 + h (wgmma; ``MMA_V2``, for
    mma.sync: ((((u 2 + a) 2 + b) 4 + q) 2 + j) 2 + h) holds code 4a + 2b + j + 8h of word
    16 (u // 4) + 4q + u % 4 (``_lines_real_k``)."""
    w = tl.permute(tl.join(w_lo, w_hi), (0, 2, 1))  # [tile row, h2, 16]
    w = tl.reshape(w, (BN // (16 * W), 2, W, 8, H2, 4, 4))  # [rep, e, w, g, h2, q, v]
    w = tl.reshape(tl.permute(w, (0, 2, 1, 3, 5, 4, 6)), (BN, 4, 4 * H2))  # [l, q, u]
    t = tl.join(w, w >> 8)  # a
    t = tl.join(t, t >> 4)  # b
    t = tl.join((t & (3 * 0x10001)) | magic, (t & (12 * 0x10001)) | magic32)  # j
    p = tl.join(t.to(tl.int16), (t >> 16).to(tl.int16))  # h: [l, q, u, a, b, j, h]
    if MMA_V2:
        p = tl.permute(p, (0, 2, 3, 4, 1, 5, 6))  # k = (u, a, b, q, j, h): mma v2's kWidth 4
    else:
        p = tl.permute(p, (0, 2, 3, 4, 5, 1, 6))  # k = (u, a, b, j, q, h)
    return tl.reshape(p, (BN, 256 * H2)).to(tl.bfloat16, bitcast=True)


@triton.jit
def _lines_real_k(kl, MMA_V2: tl.constexpr):
    """Logical k of ``_lines_unpack``'s operand -> the input index within the chunk."""
    h = kl & 1
    u = kl >> 6
    a = (kl >> 5) & 1
    if MMA_V2:
        j = (kl >> 1) & 1
        q = (kl >> 2) & 3
        b = (kl >> 4) & 1
    else:
        q = (kl >> 1) & 3
        j = (kl >> 3) & 1
        b = (kl >> 4) & 1
    code = 4 * a + 2 * b + j + 8 * h
    return (16 * (u // 4) + 4 * q + u % 4) * 16 + code


@triton.jit
def _lines_operand(xt, real, CODE_OFFSET: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """Block-diagonal x ``[NCOL, BLOCK_K]`` in logical k order (``real``: each k's input index; column
    ``token * G + g`` holds that token's x on group g's inputs, zeros elsewhere) -> the MMA's B operand
    ``[BLOCK_K, NCOL]`` and each column's constant part: x against the base ``_lines_unpack`` adds to a code
    (128 for even codes, 32 for odd) plus ``CODE_OFFSET``, taken off after the MMA."""
    base = tl.where((real & 1) == 1, 32.0 + CODE_OFFSET, 128.0 + CODE_OFFSET)
    qx = tl.sum(xt.to(tl.float32) * base[None, :], axis=1)
    return tl.trans(xt.to(DOT_DTYPE)), qx


@triton.jit
def _lines_step(w_lo, w_hi, ss, xb, qx, tok, magic, magic32, n, N, M, m0, split, mn, part_ptr, y_ptr, stride_ym,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, W: tl.constexpr, H2: tl.constexpr, SPLIT: tl.constexpr,
                ASM_STORE: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """One tile of ``_lines_kernel``: one MMA chain, then per token the sum over its group columns
    of (acc - constant part) x scale, stored (rows ``n``) as the output or this split's partial."""
    a = _lines_unpack(w_lo, w_hi, magic, magic32, BLOCK_N, W, H2, W < WGMMA_MIN_WARPS).to(DOT_DTYPE)
    acc = tl.dot(a, xb, input_precision=INPUT_PRECISION)
    contrib = (acc - qx[None, :]) * ss.to(tl.float32)
    for i in tl.static_range(BLOCK_M):
        out = tl.sum(tl.where((tok == i)[None, :], contrib, 0.0), axis=1)
        ok = (n < N) & ((n * 0 + m0 + i) < M)  # a tensor mask: scalar & tensor trips the interpreter
        if SPLIT:
            _dec_store(part_ptr + split * mn + (m0 + i) * N + n, out, ok, ASM_STORE)
        else:
            _dec_store(y_ptr + (m0 + i).to(tl.int64) * stride_ym + n, out.to(y_ptr.dtype.element_ty), ok, ASM_STORE)


@triton.jit(do_not_specialize=["M", "num_splits", "iters"])
def _lines_kernel(x_ptr, w_ptr, s_ptr, y_ptr, part_ptr, lock_ptr, M, N, K, num_splits, iters, stride_xm,
                  stride_wn, stride_sn, stride_ym, magic, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, W: tl.constexpr, SPLIT: tl.constexpr, SPLIT_BATCH: tl.constexpr,
                  FIX: tl.constexpr, ASM_STORE: tl.constexpr, EVEN_N: tl.constexpr, DOT_DTYPE: tl.constexpr,
                  INPUT_PRECISION: tl.constexpr, STAGES: tl.constexpr, GROUP_SIZE: tl.constexpr,
                  BITS: tl.constexpr, CODES_PER_WORD: tl.constexpr, CODE_OFFSET: tl.constexpr,
                  PDL: tl.constexpr = False):
    """``y[M, N] = x[M, K] @ W[N, K].T`` for a few tokens; program (row block x token tile, K chunk).

    As ``_decode_kernel`` (swap AB, a program owns one ``BLOCK_K`` chunk of K and walks ``iters``
    tiles of ``BLOCK_N`` rows, the next tile's words loaded one step ahead), with two changes that
    the decode kernel's ablations asked for (``benchmarks/linear_notes.md``):

    - whole lines: a thread reads 16 contiguous bytes (two runs per 512 inputs), four threads a
      row's 64-byte run, instead of 8 bytes per group;
    - one MMA chain per tile (wgmma waited once, or mma.sync with 1-2 warps): the scale groups are the
      MMA's N side. Column
      ``token * G + g`` of the B operand holds that token's x on group g's inputs and zeros
      elsewhere, so the fp32 accumulator keeps every group apart and the epilogue takes off the
      constant parts and applies the scales: ``y = sum_g (acc[:, g] - qx[g]) s[:, g]``.
    ``BLOCK_M * BLOCK_K / 128`` columns (at least 8) are the MMA's N: 1-2 tokens cost the same.
    """
    tl.static_assert(BITS == 2 and CODES_PER_WORD == 16 and GROUP_SIZE == 128,
                     "the layout is for 2-bit codes in groups of 128")
    tl.static_assert(BLOCK_N % (16 * W) == 0, "block_n must be a multiple of 16 * num_warps")
    tl.static_assert(BLOCK_K == 512, "block_k must be 512 (the unpacked tile is 128 registers per thread)")
    if PDL:
        # The next launch may start (it waits before reading y). At the start, not after the loop: 11.1 us
        # against 12.7 (H200, 8192 x 8192, M = 1, 2 row tiles per program; at 4 the late trigger wins).
        tl.extra.cuda.gdc_launch_dependents()
    G: tl.constexpr = BLOCK_K // GROUP_SIZE
    H2: tl.constexpr = BLOCK_K // 256
    NCOL: tl.constexpr = G * BLOCK_M if G * BLOCK_M >= 8 else 8
    RB = iters * BLOCK_N
    num_rb = tl.cdiv(N, RB)
    pid_rb = tl.program_id(0) % num_rb
    m0 = (tl.program_id(0) // num_rb) * BLOCK_M
    split = tl.program_id(1)
    k_start = split * BLOCK_K
    col = tl.arange(0, NCOL)
    tok = col // G
    l = tl.arange(0, BLOCK_N)
    trow = _dec_tile_row(l, W)  # MMA row -> tile row
    row0 = pid_rb * RB
    n_tiles = tl.minimum(iters, tl.cdiv(N - row0, BLOCK_N))
    wc = tl.arange(0, 16)
    tile_rows = row0 + l
    n0 = row0 + trow
    w_cols = k_start // CODES_PER_WORD + wc[None, :]
    s_cols = k_start // GROUP_SIZE + (col % G)[None, :]
    if EVEN_N:
        w_off = tile_rows.to(tl.int64)[:, None] * stride_wn + w_cols
        s_off = n0.to(tl.int64)[:, None] * stride_sn + s_cols
    else:
        w_off = w_cols
        s_off = s_cols
    smask = (tok < BLOCK_M)[None, :] & (l >= 0)[:, None]
    if STAGES <= 2:
        # The first STAGES tiles' words and scales go out before x's prologue (and before the PDL wait:
        # weights are never written by a kernel that lets this one start early), so the prologue and
        # the previous launch's tail overlap their DRAM latency.
        nl, nh, ns = _lines_tile(w_ptr, s_ptr, w_off, s_off, tile_rows, n0, 0, N, stride_wn, stride_sn, smask,
                                 EVEN_N)
        ml, mh, ms = nl, nh, ns
        if STAGES == 2:
            ml, mh, ms = _lines_tile(w_ptr, s_ptr, w_off, s_off, tile_rows, n0, tl.minimum(1, n_tiles - 1) * BLOCK_N,
                                     N, stride_wn, stride_sn, smask, EVEN_N)
    if PDL:
        tl.extra.cuda.gdc_wait()  # x (and the split counters) belong to the launches before
    # B operand [BLOCK_K, NCOL] (logical k order) and the constant parts per column, once.
    kl = tl.arange(0, BLOCK_K)
    real = _lines_real_k(kl, W < WGMMA_MIN_WARPS)
    # Built as [NCOL, BLOCK_K] and transposed for the dot. Its conversion to the MMA's B layout goes through
    # shared memory in 2-byte stores (64 STS.U16 per thread, Triton 3.6 and 3.9); built as [BLOCK_K, NCOL]
    # instead, the prologue grows from ~550 to ~700 SASS instructions (session 8).
    grp = (col % G)[:, None] == (real // GROUP_SIZE)[None, :]
    xt = tl.zeros((NCOL, BLOCK_K), x_ptr.dtype.element_ty)
    for i in tl.static_range(BLOCK_M):  # token i's chunk, read once, in logical order
        xi = tl.load(x_ptr + (m0 + i).to(tl.int64) * stride_xm + k_start + real, mask=(real * 0 + m0 + i) < M,
                     other=0.0)
        xt = tl.where(grp & (tok == i)[:, None], xi[None, :], xt)
    xb, qx = _lines_operand(xt, real, CODE_OFFSET, DOT_DTYPE)
    magic32 = magic - 0x01000100  # bf16 32 in either half
    mn = M.to(tl.int64) * N
    if STAGES > 2:  # the loads go by cp.async through shared memory, STAGES - 1 tiles ahead (Triton's pipeliner)
        for t in tl.range(0, n_tiles, num_stages=STAGES):
            wl, wh, ss = _lines_tile(w_ptr, s_ptr, w_off, s_off, tile_rows, n0, t * BLOCK_N, N, stride_wn, stride_sn,
                                     smask, EVEN_N)
            _lines_step(wl, wh, ss, xb, qx, tok, magic, magic32, n0 + t * BLOCK_N, N, M, m0, split, mn, part_ptr,
                        y_ptr, stride_ym, BLOCK_M, BLOCK_N, W, H2, SPLIT, ASM_STORE, DOT_DTYPE, INPUT_PRECISION)
    else:  # the next STAGES tiles' words and scales loaded into registers ahead
        for t in range(n_tiles):
            wl, wh, ss = nl, nh, ns
            if STAGES == 2:
                nl, nh, ns = ml, mh, ms
            # No reload of the last tile. Measured (H200, 8192 x 8192, M = 1): with PDL 10.7 us, against 12.4
            # for an unconditional (clamped) reload, which compiles to 96 registers instead of 122-128
            # (without PDL 12.9 vs 12.4). Not understood yet; a guess: above 96 registers the 1024 programs
            # fill every slot (8 per SM), so the next launch's programs start only as these exit, not
            # alongside their loads.
            if t + STAGES < n_tiles:
                ml, mh, ms = _lines_tile(w_ptr, s_ptr, w_off, s_off, tile_rows, n0, (t + STAGES) * BLOCK_N, N,
                                         stride_wn, stride_sn, smask, EVEN_N)
            if STAGES == 1:
                nl, nh, ns = ml, mh, ms
            _lines_step(wl, wh, ss, xb, qx, tok, magic, magic32, n0 + t * BLOCK_N, N, M, m0, split, mn, part_ptr,
                        y_ptr, stride_ym, BLOCK_M, BLOCK_N, W, H2, SPLIT, ASM_STORE, DOT_DTYPE, INPUT_PRECISION)
    if SPLIT:
        _split_fixup(part_ptr, y_ptr, lock_ptr, tl.program_id(0), M, N, mn, num_splits, row0,
                     tl.minimum(RB, N - row0), m0, tl.minimum(BLOCK_M, M - m0), stride_ym, SPLIT_BATCH, FIX)


# "lines_warps": the "lines" layout with K split over the warps of one program instead of over programs.
# Warp s owns K chunk s, every warp walks the same row tiles with mma.sync
# (the chunks are the batch axis of a 3-D dot, which Triton puts on the warps), and the program adds the warps'
# fp32 results in shared memory in warp order: no partials in global memory, no split counters, no last-program
# fix-up, the same bits on every call. Word tiles are loaded as [warps * 8, 16] (one 8-row slab per warp), which
# keeps each warp's words in the registers the MMA's A operand wants.


@triton.jit
def _warps_rows(w_ptr, w_off, rows, N, stride_wn, E8: tl.constexpr, H: tl.constexpr, EVEN_N: tl.constexpr):
    """Half ``H`` of the words of tile rows ``8 E8 + i % 8`` for thread row i (``rows``: the tile's first row +
    i % 8; ``w_off`` ``[S * 8, 16]``: warp i // 8's chunk / expert offsets): ``[S * 8, 16]`` int32."""
    r = rows + 8 * E8
    if not EVEN_N:
        r = tl.minimum(r, N - 1)
    return tl.load(w_ptr + r.to(tl.int64)[:, None] * stride_wn + w_off + 16 * H)


@triton.jit
def _warps_half(w_ptr, w_off, rows, N, stride_wn, S: tl.constexpr, BN: tl.constexpr, H: tl.constexpr,
                EVEN_N: tl.constexpr):
    """Half ``H`` of one tile's words as ``[S, BN, 16]``, tile row ``l = g + 8 e + 16 rep`` (``BN`` 16 or 32)."""
    j = tl.join(_warps_rows(w_ptr, w_off, rows, N, stride_wn, 0, H, EVEN_N),
                _warps_rows(w_ptr, w_off, rows, N, stride_wn, 1, H, EVEN_N))  # [S * 8, 16, e]
    if BN == 16:
        w = tl.permute(tl.reshape(j, (S, 8, 16, 2)), (0, 3, 1, 2))
    else:
        j2 = tl.join(_warps_rows(w_ptr, w_off, rows, N, stride_wn, 2, H, EVEN_N),
                     _warps_rows(w_ptr, w_off, rows, N, stride_wn, 3, H, EVEN_N))
        w = tl.permute(tl.reshape(tl.join(j, j2), (S, 8, 16, 2, 2)), (0, 4, 3, 1, 2))  # [S, rep, e, g, 16]
    return tl.reshape(w, (S, BN, 16))


@triton.jit
def _warps_tile(w_ptr, s_ptr, w_off, rows, s_off, n, N, stride_wn, stride_sn, smask, S: tl.constexpr,
                BN: tl.constexpr, EVEN_N: tl.constexpr):
    """Words (two ``[S, BN, 16]`` halves of each warp's 512-input chunk) and scales ``[S, BN, NCOL]`` of rows ``n``
    (``s_off`` ``[S, 1, NCOL]``: each warp's chunk / expert scale columns, ``smask`` the real group columns)."""
    lo = _warps_half(w_ptr, w_off, rows, N, stride_wn, S, BN, 0, EVEN_N)
    hi = _warps_half(w_ptr, w_off, rows, N, stride_wn, S, BN, 1, EVEN_N)
    if not EVEN_N:
        n = tl.minimum(n, N - 1)
    return lo, hi, tl.load(s_ptr + n.to(tl.int64)[None, :, None] * stride_sn + s_off, mask=smask, other=0.0)


@triton.jit
def _warps_unpack(w_lo, w_hi, magic, magic32, S: tl.constexpr, BN: tl.constexpr, H2: tl.constexpr):
    """``_lines_unpack`` of one warp per chunk (rows ``g + 8 e + 16 rep`` are the MMA rows in order): words
    ``[S, BN, 16]`` x 2 -> the 3-D dot's A operand ``[S, BN, 256 H2]`` bf16 in mma.sync's k order."""
    w = tl.permute(tl.join(w_lo, w_hi), (0, 1, 3, 2))  # [S, l, h2, 16]
    w = tl.reshape(tl.permute(tl.reshape(w, (S, BN, H2, 4, 4)), (0, 1, 3, 2, 4)), (S, BN, 4, 4 * H2))  # [S, l, q, u]
    t = tl.join(w, w >> 8)  # a
    t = tl.join(t, t >> 4)  # b
    t = tl.join((t & (3 * 0x10001)) | magic, (t & (12 * 0x10001)) | magic32)  # j
    p = tl.join(t.to(tl.int16), (t >> 16).to(tl.int16))  # h: [S, l, q, u, a, b, j, h]
    p = tl.permute(p, (0, 1, 3, 4, 5, 2, 6, 7))  # k = (u, a, b, q, j, h)
    return tl.reshape(p, (S, BN, 256 * H2)).to(tl.bfloat16, bitcast=True)


@triton.jit
def _warps_operand(xi, i, real, CODE_OFFSET: tl.constexpr, NCOL: tl.constexpr, G: tl.constexpr):
    """Token ``i``'s chunks ``xi`` ``[S, 512]`` (logical k order of ``_warps_unpack``, ``real`` the inputs) ->
    its part of the block-diagonal B operand ``[S, NCOL, 512]`` (columns ``i * G + g``) and of the constant
    parts ``[S, NCOL]`` (x against the unpack's bases, per group: k bits 8 and 3 are the group, bit 1 the base)."""
    S: tl.constexpr = xi.shape[0]
    col = tl.arange(0, NCOL)
    mine = (col // G) == i
    grp = ((col % G)[:, None] == (real // 128)[None, :]) & mine[:, None]
    xt = tl.where(grp[None, :, :], xi[:, None, :], tl.zeros((S, NCOL, 512), xi.dtype))
    kl = tl.arange(0, 512)
    base = tl.where(((kl >> 1) & 1) == 1, 32.0 + CODE_OFFSET, 128.0 + CODE_OFFSET)
    qg = tl.sum(tl.sum(tl.reshape(xi.to(tl.float32) * base[None, :], (S, 2, 16, 2, 8)), axis=4), axis=2)
    qg = tl.reshape(qg, (S, G))  # group 2 * (k bit 8) + (k bit 3)
    sel = ((col % G)[:, None] == tl.arange(0, G)[None, :]) & mine[:, None]
    return xt, tl.sum(tl.where(sel[None, :, :], qg[:, None, :], 0.0), axis=2)


@triton.jit
def _warps_step(wl, wh, ss, xb, qx, magic, magic32, S: tl.constexpr, BN: tl.constexpr, TT: tl.constexpr,
                G: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """One row tile: per warp ``sum_g (acc - qx) * ss`` over each token's group columns -> fp32 ``[S, BN, TT]``."""
    a = _warps_unpack(wl, wh, magic, magic32, S, BN, 2).to(DOT_DTYPE)
    acc = tl.dot(a, xb, input_precision=INPUT_PRECISION)  # [S, BN, NCOL]
    contrib = (acc - qx[:, None, :]) * ss
    return tl.sum(tl.reshape(contrib, (S, BN, TT, G)), axis=3)


@triton.jit(do_not_specialize=["M"])
def _lines_warps_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, stride_xm, stride_wn, stride_sn, stride_ym, magic,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TILES: tl.constexpr, S: tl.constexpr,
                        EVEN_N: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                        GROUP_SIZE: tl.constexpr, BITS: tl.constexpr, CODES_PER_WORD: tl.constexpr,
                        CODE_OFFSET: tl.constexpr, PDL: tl.constexpr = False):
    """``y[M, N] = x[M, K] @ W[N, K].T`` for 1-2 tokens, ``K = 512 S``: program (``TILES * BLOCK_N`` rows, token
    tile), warp s the K chunk s; the warps' results added in warp order (deterministic, no split-K fix-up)."""
    tl.static_assert(BITS == 2 and CODES_PER_WORD == 16 and GROUP_SIZE == 128,
                     "the layout is for 2-bit codes in groups of 128")
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()  # the next launch waits before reading y
    CHUNK: tl.constexpr = 512
    G: tl.constexpr = CHUNK // GROUP_SIZE
    NCOL: tl.constexpr = 8  # the MMA's N side: 1-2 tokens x 4 groups, padded
    TT: tl.constexpr = NCOL // G
    RB: tl.constexpr = TILES * BLOCK_N
    num_rb = tl.cdiv(N, RB)
    row0 = (tl.program_id(0) % num_rb) * RB
    m0 = (tl.program_id(0) // num_rb) * BLOCK_M
    n_tiles = tl.minimum(TILES, tl.cdiv(N - row0, BLOCK_N))
    i8 = tl.arange(0, S * 8)
    rows = row0 + i8 % 8
    w_off = ((i8 // 8) * (CHUNK // CODES_PER_WORD))[:, None] + tl.arange(0, 16)[None, :]
    sidx = tl.arange(0, S)
    col = tl.arange(0, NCOL)
    l = tl.arange(0, BLOCK_N)
    s_off = (sidx * G)[:, None, None] + (col % G)[None, None, :]
    smask = ((col // G) < BLOCK_M)[None, None, :] & (l >= 0)[None, :, None] & (sidx >= 0)[:, None, None]
    # The first tile goes out before the wait: weights are never written by a launch that lets this one start early.
    nl, nh, ns = _warps_tile(w_ptr, s_ptr, w_off, rows, s_off, row0 + l, N, stride_wn, stride_sn, smask, S, BLOCK_N,
                             EVEN_N)
    if PDL:
        tl.extra.cuda.gdc_wait()  # x belongs to the launches before
    real = _lines_real_k(tl.arange(0, CHUNK), True)
    xt = tl.zeros((S, NCOL, CHUNK), x_ptr.dtype.element_ty)
    qx = tl.zeros((S, NCOL), tl.float32)
    for i in tl.static_range(BLOCK_M):
        live = ((real * 0 + m0 + i) < M)[None, :] & (sidx >= 0)[:, None]
        xi = tl.load(x_ptr + (m0 + i).to(tl.int64) * stride_xm + (sidx * CHUNK)[:, None] + real[None, :], mask=live,
                     other=0.0)
        xt_i, qx_i = _warps_operand(xi, i, real, CODE_OFFSET, NCOL, G)
        xt += xt_i
        qx += qx_i
    xb = tl.permute(xt.to(DOT_DTYPE), (0, 2, 1))  # [S, CHUNK, NCOL]
    magic32 = magic - 0x01000100  # bf16 32 in either half
    tcol = tl.arange(0, TT)
    for t in range(n_tiles):
        wl, wh, ss = nl, nh, ns
        if t + 1 < n_tiles:
            nl, nh, ns = _warps_tile(w_ptr, s_ptr, w_off, rows + (t + 1) * BLOCK_N, s_off, row0 + (t + 1) * BLOCK_N + l,
                                     N, stride_wn, stride_sn, smask, S, BLOCK_N, EVEN_N)
        out = _warps_step(wl, wh, ss.to(tl.float32), xb, qx, magic, magic32, S, BLOCK_N, TT, G, DOT_DTYPE,
                          INPUT_PRECISION)
        yt = tl.sum(out, axis=0)  # [BLOCK_N, TT]: the chunks in warp order
        n = row0 + t * BLOCK_N + l
        ok = (n < N)[:, None] & (m0 + tcol < M)[None, :] & (tcol < BLOCK_M)[None, :]
        tl.store(y_ptr + (m0 + tcol).to(tl.int64)[None, :] * stride_ym + n[:, None], yt.to(y_ptr.dtype.element_ty),
                 mask=ok)


# --- launchers -------------------------------------------------------------------------------


def _dot_operands(dtype: torch.dtype) -> tuple[tl.dtype, str | None]:
    """Dot operand dtype and precision for activations of ``dtype``.

    bf16 activations dot in bf16 (every ``(code - 2) * scale`` is exact in bf16). fp16 goes
    through tf32, which holds fp16 and bf16 values exactly; fp32 uses 3xTF32. The interpreter
    computes bf16 arithmetic on raw bit patterns, so it always gets fp32.
    """
    if interpreting():
        return tl.float32, "ieee"
    if dtype == torch.bfloat16:
        return tl.bfloat16, None
    return tl.float32, "tf32" if dtype == torch.float16 else "tf32x3"


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# Configs that compile on every Triton tried (3.6, 3.9). Some others trip a Triton bug on Hopper
# ("Illegal shared layout" in OptimizeDotOperands, e.g. block 64x128x64 or 128x256x64); a table
# config that fails to compile falls back to these once, with a warning.
_SAFE_FORWARD = KernelConfig("gemm", block_m=16, block_n=32, block_k=128, num_warps=4, num_stages=3)
_SAFE_BACKWARD = KernelConfig("gemm", block_m=16, block_n=64, block_k=64, num_warps=4, num_stages=3)
_FAILED_CONFIGS: set[KernelConfig] = set()


def _compile_failure(exc: Exception) -> bool:
    """Whether ``exc`` says a kernel could not be built (Triton, Gluon or ptxas), not that it failed to run."""
    return (isinstance(exc, (triton.CompilationError, PTXASError))
            or (isinstance(exc, RuntimeError) and "PassManager" in str(exc)))


def _launch_with_fallback(launch, explicit: KernelConfig | None, picked: KernelConfig, safe: KernelConfig) -> None:
    if explicit is not None:  # tests and the tuner ask for exactly this config
        return launch(explicit)
    cfg = safe if picked in _FAILED_CONFIGS else picked
    try:
        launch(cfg)
    except Exception as exc:
        if cfg == safe or not _compile_failure(exc):
            raise
        # Gluon's API moves between Triton releases: a "hopper" config may not build where the others do.
        language = "Gluon" if cfg.kernel == "hopper" else "Triton"
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        warnings.warn(f"gsq::linear: {language} could not compile {cfg}; using {safe} ({reason})")
        _FAILED_CONFIGS.add(cfg)
        launch(safe)


def _check_launch(a: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> None:
    if a.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"the Triton kernels take bf16, fp16 or fp32 activations, got {a.dtype}")
    if a.dim() != 2 or a.stride(-1) != 1 or weight.stride(-1) != 1 or weight_scale.stride(-1) != 1:
        raise ValueError("launchers take a 2-D activation and weights with contiguous last dimensions")
    if not (a.is_cuda or interpreting()):
        raise ValueError("CPU tensors run the Triton kernels only under TRITON_INTERPRET=1")


# Split-K tile counters, per device: zero between launches (the last program of a tile resets its
# counter), so they are allocated once and stay valid inside CUDA graphs. Launches on two streams
# at once would share them; the library runs its kernels on one stream.
_LOCKS: dict[torch.device, torch.Tensor] = {}
_OLD_LOCKS: list[torch.Tensor] = []  # outgrown buffers stay alive: a captured graph may still use them


def _split_locks(device: torch.device, n: int) -> torch.Tensor:
    locks = _LOCKS.get(device)
    if locks is None or locks.numel() < n:
        if locks is not None:
            _OLD_LOCKS.append(locks)
        locks = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _LOCKS[device] = locks
    return locks


def _launch_mma(x2d: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, y: torch.Tensor,
                cfg: KernelConfig) -> None:
    M, K = x2d.shape
    N = weight.shape[0]
    dot_dtype, precision = _dot_operands(x2d.dtype)  # bf16 here (other dtypes take the legacy kernels)
    split = max(1, min(cfg.split_k, triton.cdiv(K, cfg.block_k)))
    k_per_split = triton.cdiv(triton.cdiv(K, split), cfg.block_k) * cfg.block_k
    split = triton.cdiv(K, k_per_split)  # no empty split
    tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    if split > 1:
        part = torch.empty((split, M, N), dtype=torch.float32, device=y.device)
        locks = _split_locks(y.device, tiles)
    else:
        part = locks = y
    x_vec = M == 1 and cfg.block_m == 16
    _mma_kernel[(tiles, split)](
        x2d, weight, weight_scale, y, part, locks, M, N, K, k_per_split // format.CODES_PER_WORD, split,
        x2d.stride(0), weight.stride(0),
        weight_scale.stride(0), y.stride(0), MAGIC_BF16_PAIR, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, GROUP_N=max(0, cfg.group_m),
        SPLIT=split > 1, X_VEC=x_vec, PAIRED=x_vec,
        SCALE_AFTER_DOT=cfg.block_k == format.GROUP_SIZE and cfg.block_m <= _SCALE_AFTER_DOT_MAX_M,
        EVEN_K=K % cfg.block_k == 0,
        DOT_DTYPE=dot_dtype, INPUT_PRECISION=precision, GROUP_SIZE=format.GROUP_SIZE,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **FORMAT_CONSTEXPRS)


# "lines" programs wanted per launch: 512 (4 row tiles each) beat 256 and 128 at 8192 x 8192 (H200).
_LINES_PROGRAMS = 512


def _decode_iters(cfg: KernelConfig, M: int, N: int, K: int) -> int:
    """Row tiles per "decode" / "lines" program: ``cfg.group_m``, or (0) about 4 programs per SM of
    132 ("decode") or about ``_LINES_PROGRAMS`` programs ("lines")."""
    if cfg.group_m > 0:
        return cfg.group_m
    progs = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n) * triton.cdiv(K, cfg.block_k)
    target = _LINES_PROGRAMS if cfg.kernel == "lines" else 4 * 132
    return max(1, min(16, _pow2_floor(progs // target)))


# Timing-only switches of ``_decode_kernel`` (``ABLATE`` bits; bench_linear.py --ablate). Wrong results.
DEC_ABL_NOFIX = 1  # split K: partials stored, no counter and no last-program sum
DEC_ABL_NOSTORE = 2  # no per-tile stores (the accumulators summed into a sink)
DEC_ABL_NOMMA = 4  # words unpacked (the LOP3s), no wgmma
DEC_ABL_LOADS = 8  # words and scales loaded only (with NOMMA: no unpack either)
DEC_ABL_NOX = 16  # no x prologue
DEC_ABL_KMAJOR = 32  # each program's words read as one contiguous block (as if stored [split, N, block_k / 16])
DEC_ABL_PIN = 64  # a bar.sync right after the next tile's loads are issued (keeps them early; still exact)


def _row_walk_launch(x2d: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, y: torch.Tensor,
                     cfg: KernelConfig, split: int) -> tuple[tuple[int, int], tuple, dict]:
    """Grid, positional arguments and shared keyword arguments of the kernels whose program owns one K
    chunk and walks row tiles ("decode", "lines"): ``split`` chunks, the fp32 partials and split
    counters when there are several, the dot operand type (fp32 under the interpreter)."""
    M, K = x2d.shape
    N = weight.shape[0]
    dot_dtype, precision = _dot_operands(x2d.dtype)  # bf16 here (other dtypes take the legacy kernels)
    batch = min(16, triton.next_power_of_2(split))  # split partials loaded together by the fix-up
    iters = _decode_iters(cfg, M, N, K)
    tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, iters * cfg.block_n)
    if split > 1:
        part = torch.empty((split, M, N), dtype=torch.float32, device=y.device)
        locks = _split_locks(y.device, tiles)
    else:
        part = locks = y
    args = (x2d, weight, weight_scale, y, part, locks, M, N, K, split, iters, x2d.stride(0), weight.stride(0),
            weight_scale.stride(0), y.stride(0), MAGIC_BF16_PAIR)
    kwargs = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, W=cfg.num_warps, SPLIT=split > 1,
                  SPLIT_BATCH=batch, FIX=32 * cfg.num_warps * max(1, 64 // batch), ASM_STORE=not interpreting(),
                  EVEN_N=N % cfg.block_n == 0, DOT_DTYPE=dot_dtype, INPUT_PRECISION=precision,
                  GROUP_SIZE=format.GROUP_SIZE, num_warps=cfg.num_warps, num_stages=1, **FORMAT_CONSTEXPRS)
    return (tiles, split), args, kwargs


def _launch_decode(x2d: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, y: torch.Tensor,
                   cfg: KernelConfig, ablate: int = 0, ksub: int = 1) -> None:
    K = x2d.shape[1]
    N = weight.shape[0]
    if cfg.block_k not in (128, 256, 512) or cfg.block_n % (16 * cfg.num_warps) or cfg.block_m < 8:
        raise ValueError(f"'decode' takes block_k 128/256/512, block_n a multiple of 16 * num_warps and "
                         f"block_m >= 8, got {cfg}")
    if (ablate or ksub != 1) and (K % (cfg.block_k * ksub) or N % cfg.block_n):
        raise ValueError(f"'decode' ablations take whole tiles and chunks, got {cfg} ksub={ksub} on {N}x{K}")
    grid, args, kwargs = _row_walk_launch(x2d, weight, weight_scale, y, cfg, triton.cdiv(K, cfg.block_k * ksub))
    # No PDL here: as in "lines" (first tiles loaded before the wait) it ran 21.8 -> 28.2 us at M = 4 and
    # 20.9 -> 20.5 at M = 16 (H200, 8192 x 8192).
    _decode_kernel[grid](*args, AHEAD=max(1, min(2, cfg.num_stages)), EVEN_K=K % cfg.block_k == 0,
                         MAGIC_DTYPE=tl.bfloat16, ABLATE=ablate, KSUB=ksub, **kwargs)


def _launch_lines(x2d: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, y: torch.Tensor,
                  cfg: KernelConfig) -> None:
    K = x2d.shape[1]
    if cfg.block_k != 512 or K % cfg.block_k or cfg.block_n % (16 * cfg.num_warps) or cfg.block_m not in (1, 2, 4):
        raise ValueError(f"'lines' takes block_k 512 dividing K, block_n a multiple of 16 * num_warps and "
                         f"block_m 1, 2 or 4, got {cfg} for K={K}")
    if cfg.num_warps not in (1, 2, 4):
        raise ValueError(f"'lines' runs 1 or 2 warps (mma.sync) or 4 (wgmma), got {cfg}")
    grid, args, kwargs = _row_walk_launch(x2d, weight, weight_scale, y, cfg, K // cfg.block_k)
    pdl = pdl_supported(x2d.device)  # a programmatic dependent of the launch before: weight loads overlap its tail
    _lines_kernel[grid](*args, STAGES=cfg.num_stages, PDL=pdl, **kwargs, **({"launch_pdl": True} if pdl else {}))


def _launch_lines_warps(x2d: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, y: torch.Tensor,
                        cfg: KernelConfig) -> None:
    M, K = x2d.shape
    N = weight.shape[0]
    if not lines_warps_supported(cfg.block_m, K) or cfg.block_n not in (16, 32) or cfg.group_m < 1:
        raise ValueError(f"'lines_warps' takes block_m 1 or 2, K = 512 x 1, 2, 4, 8 or 16 (got "
                         f"K={K}), block_n 16 or 32 and group_m >= 1 row tiles per program, got {cfg}")
    dot_dtype, precision = _dot_operands(x2d.dtype)
    pdl = pdl_supported(x2d.device)
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.group_m * cfg.block_n),)
    _lines_warps_kernel[grid](
        x2d, weight, weight_scale, y, M, N, x2d.stride(0), weight.stride(0), weight_scale.stride(0), y.stride(0),
        MAGIC_BF16_PAIR, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, TILES=cfg.group_m, S=K // 512,
        EVEN_N=N % cfg.block_n == 0, DOT_DTYPE=dot_dtype, INPUT_PRECISION=precision, GROUP_SIZE=format.GROUP_SIZE,
        PDL=pdl, num_warps=K // 512, num_stages=1, **FORMAT_CONSTEXPRS, **({"launch_pdl": True} if pdl else {}))


def launch_decode_ablation(x2d: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, cfg: KernelConfig,
                           ablate: int = 0, ksub: int = 1) -> torch.Tensor:
    """Timing only (``bench_linear.py --ablate``): the "decode" kernel with ``DEC_ABL_*`` bits ``ablate``
    and ``ksub`` chunks of ``cfg.block_k`` per program (split count K / (ksub block_k)). Only
    ``ablate=0, ksub=1`` computes ``x2d @ W.T``; bf16 activations (or the interpreter)."""
    _check_launch(x2d, weight, weight_scale)
    y = torch.empty((x2d.shape[0], weight.shape[0]), dtype=x2d.dtype, device=x2d.device)
    _launch_decode(x2d, weight, weight_scale, y, cfg, ablate, ksub)
    return y


def launch_linear(x2d: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                  config: KernelConfig | None = None) -> torch.Tensor:
    """Run the Triton forward kernel (GEMV or GEMM by ``config``; default from :func:`pick_config`).

    Args:
        x2d: ``[M, K]`` bf16 / fp16 / fp32, last dimension contiguous.
        weight: int32 ``[N, K / 16]``; weight_scale: bf16 ``[N, K / 128]`` (validated by the caller).
        config: launch parameters; tests use it to run a given path on small shapes.
    Returns:
        ``[M, N]`` in ``x2d.dtype``.
    Raises:
        TypeError, ValueError: activations the kernels cannot take; an unknown ``config.kernel``.
    """
    _check_launch(x2d, weight, weight_scale)
    M, K = x2d.shape
    N = weight.shape[0]
    y = torch.empty((M, N), dtype=x2d.dtype, device=x2d.device)
    if M == 0 or N == 0:
        return y
    KW = K // format.CODES_PER_WORD
    strides = (x2d.stride(0), weight.stride(0), weight_scale.stride(0), y.stride(0))

    def launch(cfg: KernelConfig) -> None:
        if cfg.kernel == "hopper":
            if linear_hopper.supported(x2d, weight, cfg.block_k):
                linear_hopper.launch(x2d, weight, weight_scale, y, cfg.block_m, cfg.block_n, cfg.block_k,
                                     cfg.num_warps, cfg.num_stages, dq_warps=cfg.group_m)
                return
            cfg = _default_config("forward", M, N, K, hopper=False)  # no Gluon, not sm_90, or not bf16
        if cfg.kernel == "gemv":
            if M > 65535:  # one program row per row of x, on grid axis 1
                raise ValueError(f"the GEMV takes at most 65535 rows, got M={M}; use a 'gemm' config")
            block_kw = cfg.block_k // format.CODES_PER_WORD
            _gemv_kernel[(triton.cdiv(N, cfg.block_n), M)](
                x2d, weight, weight_scale, y, N, KW, *strides, format.CODE_MASK, BLOCK_N=cfg.block_n,
                BLOCK_KW=block_kw, EVEN_K=KW % block_kw == 0, WORDS_PER_GROUP=_WORDS_PER_GROUP,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_WINDOW_CONSTEXPRS, **FORMAT_CONSTEXPRS)
            return
        if cfg.kernel in ("mma", "decode", "lines", "lines_warps"):
            if x2d.dtype == torch.bfloat16 or interpreting():
                launcher = {"mma": _launch_mma, "decode": _launch_decode, "lines": _launch_lines,
                            "lines_warps": _launch_lines_warps}[cfg.kernel]
                launcher(x2d, weight, weight_scale, y, cfg)
                return
            cfg = _legacy_config(M, N, K)  # fp16 / fp32 activations: the tf32 kernels keep their precision
            if cfg.kernel == "gemv":
                return launch(cfg)
        if cfg.kernel != "gemm":
            raise ValueError(
                f"unknown kernel {cfg.kernel!r}; expected 'hopper', 'mma', 'decode', 'lines', 'lines_warps', 'gemv' or "
                "'gemm'")
        dot_dtype, precision = _dot_operands(x2d.dtype)
        split = max(1, min(cfg.split_k, triton.cdiv(K, cfg.block_k)))
        k_per_split = triton.cdiv(triton.cdiv(K, split), cfg.block_k) * cfg.block_k
        split = triton.cdiv(K, k_per_split)  # no empty split
        out = y if split == 1 else torch.empty((split, M, N), dtype=torch.float32, device=y.device)
        grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n), split)
        _gemm_kernel[grid](
            x2d, weight, weight_scale, out, M, N, K, k_per_split, *strides, format.CODE_MASK, MAGIC_BF16_PAIR,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, SPLIT_K=split,
            DOT_DTYPE=dot_dtype, INPUT_PRECISION=precision, EVEN_K=K % cfg.block_k == 0,
            PAIR_DEQUANT=dot_dtype == tl.bfloat16 or interpreting(), GROUP_SIZE=format.GROUP_SIZE,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
            **_WINDOW_CONSTEXPRS, **FORMAT_CONSTEXPRS)
        if split > 1:
            block = 1024
            _sum_splits_kernel[(triton.cdiv(M * N, block),)](out, y, M * N, SPLIT_K=split, BLOCK=block,
                                                             num_warps=4)

    with _device_guard(x2d):
        picked = pick_config("forward", M, N, K)
        # A "hopper" config that does not build falls back to the Triton kernels' own default.
        safe = _default_config("forward", M, N, K, hopper=False) if picked.kernel == "hopper" else _SAFE_FORWARD
        _launch_with_fallback(launch, config, picked, safe)
    return y


def launch_linear_grad_input(grad2d: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                             config: KernelConfig | None = None) -> torch.Tensor:
    """Run the Triton backward kernel: ``grad2d [M, N] @ W [N, K] -> [M, K]`` in ``grad2d.dtype``."""
    _check_launch(grad2d, weight, weight_scale)
    M, N = grad2d.shape
    K = weight.shape[1] * format.CODES_PER_WORD
    out = torch.empty((M, K), dtype=grad2d.dtype, device=grad2d.device)
    if M == 0:
        return out
    if N == 0:
        return out.zero_()
    dot_dtype, precision = _dot_operands(grad2d.dtype)
    if precision == "tf32":
        precision = "tf32x3"  # Triton 3.6-3.9 fail to compile this kernel's tf32 wgmma (block_m >= 64)
    strides = (grad2d.stride(0), weight.stride(0), weight_scale.stride(0), out.stride(0))

    def launch(cfg: KernelConfig) -> None:
        grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(K, cfg.block_k),)
        _gemm_t_kernel[grid](
            grad2d, weight, weight_scale, out, M, N, K, *strides, format.CODE_MASK, BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, DOT_DTYPE=dot_dtype,
            INPUT_PRECISION=precision, GROUP_SIZE=format.GROUP_SIZE, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages, **_WINDOW_CONSTEXPRS, **FORMAT_CONSTEXPRS)

    with _device_guard(grad2d):
        _launch_with_fallback(launch, config, pick_config("backward", M, N, K), _SAFE_BACKWARD)
    return out


# fmt: on
# --- reference (CPU implementation and oracle) ------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def linear_reference(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch ``x @ dequantize(weight, weight_scale).T`` in fp32 (fp64 for fp64 x), cast to x.dtype."""
    acc = _compute_dtype(x.dtype)
    return (x.to(acc) @ format.dequantize(weight, weight_scale, acc).T).to(x.dtype)


def linear_grad_input_reference(
    grad: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor
) -> torch.Tensor:
    """Plain PyTorch ``grad @ dequantize(weight, weight_scale)`` in fp32 (fp64 for fp64), cast to grad.dtype."""
    acc = _compute_dtype(grad.dtype)
    return (grad.to(acc) @ format.dequantize(weight, weight_scale, acc)).to(grad.dtype)


# --- registration ----------------------------------------------------------------------------


def _linear_shape(x: torch.Tensor, weight: torch.Tensor) -> tuple[int, ...]:
    return (*x.shape[:-1], weight.shape[0])


def _grad_input_shape(grad: torch.Tensor, weight: torch.Tensor) -> tuple[int, ...]:
    return (*grad.shape[:-1], weight.shape[-1] * format.CODES_PER_WORD)


def _contiguous_rows(t: torch.Tensor, width: int) -> torch.Tensor:
    t2 = t.reshape(-1, width)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


@torch.library.custom_op("gsq::linear", mutates_args=())
def linear_op(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    return linear_reference(x, weight, weight_scale)


@linear_op.register_kernel("cuda")
def _(x, weight, weight_scale):
    if x.dtype not in _KERNEL_DTYPES:  # fp64 (gradcheck, debugging): the reference
        return linear_reference(x, weight, weight_scale)
    y = launch_linear(_contiguous_rows(x, x.shape[-1]), weight.contiguous(), weight_scale.contiguous())
    return y.reshape(_linear_shape(x, weight))


@linear_op.register_fake
def _(x, weight, weight_scale):
    return x.new_empty(_linear_shape(x, weight))


@torch.library.custom_op("gsq::linear_grad_input", mutates_args=())
def linear_grad_input_op(
    grad: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor
) -> torch.Tensor:
    return linear_grad_input_reference(grad, weight, weight_scale)


@linear_grad_input_op.register_kernel("cuda")
def _(grad, weight, weight_scale):
    if grad.dtype not in _KERNEL_DTYPES:
        return linear_grad_input_reference(grad, weight, weight_scale)
    out = launch_linear_grad_input(
        _contiguous_rows(grad, grad.shape[-1]), weight.contiguous(), weight_scale.contiguous()
    )
    return out.reshape(_grad_input_shape(grad, weight))


@linear_grad_input_op.register_fake
def _(grad, weight, weight_scale):
    return grad.new_empty(_grad_input_shape(grad, weight))


def _setup_context(ctx, inputs, output):
    a, weight, weight_scale = inputs
    # The activation (x, or grad_y for linear_grad_input) is kept only for a scale gradient.
    ctx.save_for_backward(a if ctx.needs_input_grad[2] else None, weight, weight_scale)


def _linear_backward(ctx, grad):
    # Scale gradient: gsq::linear_grad_scale (ops/linear_backward.py; a Triton kernel on CUDA).
    x, weight, weight_scale = ctx.saved_tensors
    grad_x = torch.ops.gsq.linear_grad_input(grad, weight, weight_scale) if ctx.needs_input_grad[0] else None
    grad_s = torch.ops.gsq.linear_grad_scale(grad, x, weight, weight_scale) if ctx.needs_input_grad[2] else None
    return grad_x, None, grad_s


def _grad_input_backward(ctx, grad):
    # linear_grad_input is linear in grad_y: its own backward is the forward op (double backward).
    grad_y, weight, weight_scale = ctx.saved_tensors
    gx = torch.ops.gsq.linear(grad, weight, weight_scale) if ctx.needs_input_grad[0] else None
    gs = torch.ops.gsq.linear_grad_scale(grad_y, grad, weight, weight_scale) if ctx.needs_input_grad[2] else None
    return gx, None, gs


linear_op.register_autograd(_linear_backward, setup_context=_setup_context)
linear_grad_input_op.register_autograd(_grad_input_backward, setup_context=_setup_context)


def linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """``x @ dequantize(weight, weight_scale).T`` on 2-bit packed weights (gradients for ``x`` and ``weight_scale``).

    Args:
        x: ``[..., K]`` bf16 (fp16, fp32 and, on the reference path, fp64 accepted).
        weight: int32 ``[N, K / 16]``, Humming uint2 words (see :mod:`gsq_torch.format`).
        weight_scale: bf16 ``[N, K / 128]``.

    Returns:
        ``[..., N]`` in ``x.dtype``.

    Raises:
        TypeError: x not floating point (or of another dtype), weight not int32, weight_scale not bf16.
        ValueError: ``K`` not a positive multiple of 128, shapes that do not fit each other, or tensors on
            different devices.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if x.dtype not in _X_DTYPES:
        raise TypeError(f"x must be bf16, fp16, fp32 or fp64, got {x.dtype}")
    in_features = format.check_packed(weight, weight_scale, name="linear weight")
    if weight.dim() != 2:
        raise ValueError(f"linear weight must be [out, in/16], got shape {tuple(weight.shape)}")
    if weight_scale.dtype != format.SCALE_DTYPE:
        raise TypeError(f"weight_scale must be bf16 (the format's scale dtype), got {weight_scale.dtype}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(
            f"x has shape {tuple(x.shape)}; its last dimension must be in_features={in_features}"
        )
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but weight is on {weight.device}")
    return torch.ops.gsq.linear(x, weight, weight_scale)
