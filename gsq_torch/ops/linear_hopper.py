"""The "hopper" kernel of gsq::linear: many tokens on sm_90, written in Gluon.

Why a second language: Triton's ``tl.dot`` on a weight tile dequantized in registers waits for each
wgmma before the next (the operand is rebuilt in the same registers or shared memory every step), so
the tensor cores idle while the next tile is unpacked (``benchmarks/linear_notes.md``). Gluon lets the
kernel own its shared memory, its mbarriers and its warps. One program computes a ``[BLOCK_M, BLOCK_N]``
tile of ``y`` in two warp-specialized partitions that meet only at mbarriers:

- the unpack partition (``DQ_WARPS`` warps) issues the TMA loads (x tiles ``[BLOCK_M, 64]`` into a ring
  of ``STAGES`` slots, packed tiles ``[BLOCK_N, 4]`` words into a ring of 8) and dequantizes each step's
  weights into one of ``B_TILES`` bf16 tiles in shared memory (wgmma's B operand, K-major), running up
  to ``B_TILES`` steps ahead of the MMAs;
- the MMA partition (``num_warps`` warps, one or two warp groups) waits for a step's x and bf16 tiles,
  issues its wgmma asynchronously and, once the wgmma before it has finished, hands that step's slots
  back (``x_empty``, ``b_empty``); then the bf16 epilogue.

Dequantization as in ``ops/linear.py``: a 2-bit field OR-ed into the mantissa of a bf16 128 or 8 reads
``base + code`` (one LOP3 per two weights), minus ``base + 2`` and times the scale, both exact in bf16.
bf16 activations only; the launcher in ``ops/linear.py`` picks this kernel for large M on sm_90 when
Gluon is present (Triton 3.6+), and falls back to the Triton kernels otherwise.
"""

from __future__ import annotations

import torch
import triton

from .. import format
from ._triton import MAGIC_BF16_PAIR

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    # Names that moved between Triton 3.6 and 3.9.
    _cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    AVAILABLE = True
except ImportError:  # a Triton without Gluon: the launcher never picks this kernel
    AVAILABLE = False

_SMEM_BYTES = 227 * 1024  # shared memory one CTA may use on sm_90
_BLOCK_K = 64  # inputs per step: 128 bytes of an x row (TMA's swizzle width), 16 bytes of packed words
_W_STAGES = 8  # packed weight tiles in flight (2-4 KB each)
_B_TILES = 4  # unpacked bf16 tiles: how far the unpack partition may run ahead of the MMAs
# Registers per thread of the unpack partition (setmaxnreg; the MMA partition gets the rest).
_DQ_REGS = {4: 96, 8: 88}


def supported(x: torch.Tensor, weight: torch.Tensor, block_k: int) -> bool:
    """Whether the "hopper" kernel can run these operands: Gluon, an sm_90 GPU, bf16 x, K whole tiles,
    weight rows that TMA can address (16-byte aligned)."""
    K = x.shape[1]
    return (AVAILABLE and x.is_cuda and x.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(x.device)[0] == 9 and K % block_k == 0
            and block_k == _BLOCK_K and weight.data_ptr() % 16 == 0 and weight.stride(0) % 4 == 0)


def b_tiles(block_m: int, block_n: int, num_stages: int) -> int:
    """Unpacked bf16 tiles: 4, or 3 where 4 would not fit next to the x ring."""
    return _B_TILES if smem_bytes(block_m, block_n, num_stages, _B_TILES) <= _SMEM_BYTES else _B_TILES - 1


def smem_bytes(block_m: int, block_n: int, num_stages: int, tiles: int) -> int:
    """Shared memory of one program: the x ring, the packed weight ring, the unpacked bf16 tiles."""
    return (num_stages * block_m * _BLOCK_K * 2 + _W_STAGES * block_n * _BLOCK_K // format.CODES_PER_WORD * 4
            + tiles * block_n * _BLOCK_K * 2)


def check_config(block_m: int, block_n: int, block_k: int, num_warps: int, num_stages: int, dq_warps: int) -> None:
    """Raise ``ValueError`` naming what the kernel cannot take in these launch parameters
    (``num_warps`` the MMA partition's warps, ``dq_warps`` the unpack partition's)."""
    problems = []
    if num_warps not in (4, 8):
        problems.append(f"num_warps {num_warps} (4 or 8: one or two warp groups of MMAs)")
    elif block_m % (16 * num_warps):
        problems.append(f"block_m {block_m} (a multiple of {16 * num_warps}: 16 rows per MMA warp)")
    if block_k != _BLOCK_K:
        problems.append(f"block_k {block_k} (64: 128 bytes of x and 16 of packed words per row)")
    if dq_warps not in _DQ_REGS:
        problems.append(f"group_m {dq_warps} (the unpack partition's warps: 4 or 8)")
    elif block_n not in (64, 128):
        # 256 rows take more registers than the unpack partition has (ptxas asks for 154 at 8 warps);
        # unpacked in two halves with 4 warps they fit but ran slower (benchmarks/linear_notes.md)
        problems.append(f"block_n {block_n} (64 or 128)")
    if num_stages < 2:
        problems.append(f"num_stages {num_stages} (at least 2 x tiles in the ring)")
    if not problems and smem_bytes(block_m, block_n, num_stages, _B_TILES - 1) > _SMEM_BYTES:
        problems.append(f"{smem_bytes(block_m, block_n, num_stages, _B_TILES - 1)} bytes of shared memory "
                        f"(at most {_SMEM_BYTES})")
    if problems:
        raise ValueError("'hopper' config: unsupported " + "; ".join(problems))


if AVAILABLE:
    # fmt: off

    @gluon.jit
    def _pair(p, base, scale2):
        """int32 with a bf16 ``base + code`` in each half -> ``[..., 2]`` bf16 ``(code - 2) * scale``."""
        q = gl.join(p.to(gl.int16), (p >> 16).to(gl.int16)).to(gl.bfloat16, bitcast=True)
        return (q - base) * scale2

    @gluon.jit
    def _unpack(words, scale, magic, ROWS: gl.constexpr, WORDS: gl.constexpr, CODE_OFFSET: gl.constexpr):
        """int32 words ``[ROWS, WORDS]`` -> bf16 weights ``[ROWS, WORDS * 16]`` in natural k order.

        A register must hold codes ``2j, 2j + 1``: ``y`` puts bits 2..17 of the word (codes 1..8) above
        bits 0..15 (codes 0..7), so field ``p`` of both halves is the pair ``p, p + 1`` (``z`` likewise for
        codes 8..15); fields at bit 0 read bf16 128 + code, at bit 4 bf16 8 + code (mantissa units 1 and
        1/16). ``scale`` ``[ROWS, WORDS]`` is exact on ``code - 2`` (0, +-1, -2).
        """
        F: gl.constexpr = 0x30003  # one 2-bit field in each half
        LO: gl.constexpr = 0xFFFF
        m8 = magic - 0x02000200  # two bf16 8.0
        b128: gl.constexpr = 128.0 + CODE_OFFSET
        b8: gl.constexpr = 8.0 + CODE_OFFSET
        s2 = gl.join(scale, scale)
        # Arithmetic shifts: bit 31 smears only into bits that the masks drop.
        y = (words & LO) | ((words << 14) & ~LO)
        z = ((words >> 16) & LO) | ((words >> 2) & ~LO)
        y8 = y >> 8
        z8 = z >> 8
        p0 = _pair((y & F) | magic, b128, s2)  # codes 0 and 1
        p1 = _pair((y & (F << 4)) | m8, b8, s2)  # codes 2 and 3
        p2 = _pair((y8 & F) | magic, b128, s2)
        p3 = _pair((y8 & (F << 4)) | m8, b8, s2)
        p4 = _pair((z & F) | magic, b128, s2)
        p5 = _pair((z & (F << 4)) | m8, b8, s2)
        p6 = _pair((z8 & F) | magic, b128, s2)
        p7 = _pair((z8 & (F << 4)) | m8, b8, s2)  # codes 14 and 15
        # [ROWS, WORDS, h, a, b, c] with pair j = 4a + 2b + c; h (the pair's half) moves last.
        w = gl.join(gl.join(gl.join(p0, p4), gl.join(p2, p6)), gl.join(gl.join(p1, p5), gl.join(p3, p7)))
        w = gl.permute(w, (0, 1, 3, 4, 5, 2))
        return gl.reshape(w, (ROWS, WORDS * 16))

    @gluon.jit
    def _step_scale(s_rows, n_mask, step, n_k, BLOCK_K: gl.constexpr, GROUP_SIZE: gl.constexpr):
        """The scales of step ``step`` (zero past the last step)."""
        return gl.load(s_rows + (step * BLOCK_K) // GROUP_SIZE, mask=n_mask & (step < n_k), other=0.0)

    @gluon.jit
    def _mma_partition(x_smem, b_smem, x_full, x_empty, b_full, b_empty, n_k, BLOCK_M: gl.constexpr,
                       BLOCK_N: gl.constexpr, STAGES: gl.constexpr, B_TILES: gl.constexpr, num_warps: gl.constexpr):
        """wgmma of every step as its x and bf16 tiles land; a step's slots go back once its wgmma is done."""
        ACC_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                             instr_shape=[16, BLOCK_N, 16])
        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, ACC_LAYOUT)
        for i in range(n_k):
            mbarrier.wait(x_full.index(i % STAGES), (i // STAGES) & 1)
            mbarrier.wait(b_full.index(i % B_TILES), (i // B_TILES) & 1)
            acc = warpgroup_mma(x_smem.index(i % STAGES), b_smem.index(i % B_TILES).permute((1, 0)), acc,
                                is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
            # wgmma i - 1 is done in this warp group; after the barrier in every warp group of the partition
            _cta_barrier()
            mbarrier.arrive(x_empty.index((i + STAGES - 1) % STAGES), pred=i > 0)
            mbarrier.arrive(b_empty.index((i + B_TILES - 1) % B_TILES), pred=i > 0)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        return (acc,)  # a tuple: Triton 3.6's warp_specialize takes the default partition's results as one

    @gluon.jit
    def _unpack_partition(x_desc, w_desc, x_smem, w_smem, b_smem, x_full, x_empty, w_full, b_full, b_empty, s_ptr,
                          N, stride_sn, magic, off_m, off_n, n_k, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                          STAGES: gl.constexpr, W_STAGES: gl.constexpr, B_TILES: gl.constexpr,
                          GROUP_SIZE: gl.constexpr, CODES_PER_WORD: gl.constexpr, CODE_OFFSET: gl.constexpr,
                          DQ_WARPS: gl.constexpr):
        """TMA of every step's x and packed tiles; each step's weights unpacked into a free bf16 tile."""
        WORDS: gl.constexpr = BLOCK_K // CODES_PER_WORD
        # A thread owns WPT consecutive words (16 * WPT consecutive inputs) of one row.
        WPT: gl.constexpr = BLOCK_N * WORDS // (32 * DQ_WARPS)
        TW: gl.constexpr = WORDS // WPT  # threads along a row's words
        WORDS_LAYOUT: gl.constexpr = gl.BlockedLayout([1, WPT], [32 // TW, TW], [DQ_WARPS, 1], [1, 0])
        rows = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, WORDS_LAYOUT))
        n_mask = rows < N
        s_rows = s_ptr + gl.minimum(rows, N - 1).to(gl.int64) * stride_sn
        for s in gl.static_range(W_STAGES):
            mbarrier.expect(w_full.index(s), w_desc.block_type.nbytes, pred=s < n_k)
            _tma_load(w_desc, [off_n, s * WORDS], w_full.index(s), w_smem.index(s), pred=s < n_k)
        # Scales are plain loads two steps ahead, each issued after a step's proxy fence (whose MEMBAR
        # would otherwise wait for it).
        scale = _step_scale(s_rows, n_mask, 0, n_k, BLOCK_K, GROUP_SIZE)
        next_scale = _step_scale(s_rows, n_mask, 1, n_k, BLOCK_K, GROUP_SIZE)
        for j in range(n_k):
            # x of step j into its slot once the MMAs have handed it back (a fresh slot passes at once)
            xs = j % STAGES
            mbarrier.wait(x_empty.index(xs), ((j // STAGES) & 1) ^ 1)
            mbarrier.expect(x_full.index(xs), x_desc.block_type.nbytes)
            _tma_load(x_desc, [off_m, j * BLOCK_K], x_full.index(xs), x_smem.index(xs))
            ws = j % W_STAGES
            mbarrier.wait(w_full.index(ws), (j // W_STAGES) & 1)
            words = w_smem.index(ws).load(WORDS_LAYOUT)
            w = _unpack(words, gl.broadcast(gl.expand_dims(scale, 1), words)[0], magic, BLOCK_N, WORDS, CODE_OFFSET)
            bs = j % B_TILES
            mbarrier.wait(b_empty.index(bs), ((j // B_TILES) & 1) ^ 1)
            b_smem.index(bs).store(w)
            fence_async_shared()  # the stores, made visible to the wgmma's async proxy
            scale = next_scale
            next_scale = _step_scale(s_rows, n_mask, j + 2, n_k, BLOCK_K, GROUP_SIZE)
            _cta_barrier()  # (the partition's warps) every tile store and every read of the words slot done
            mbarrier.arrive(b_full.index(bs))
            nxt = j + W_STAGES
            mbarrier.expect(w_full.index(ws), w_desc.block_type.nbytes, pred=nxt < n_k)
            _tma_load(w_desc, [off_n, nxt * WORDS], w_full.index(ws), w_smem.index(ws), pred=nxt < n_k)

    @gluon.jit(do_not_specialize=["M"])
    def _hopper_linear_kernel(x_desc, w_desc, s_ptr, y_ptr, M, N, K, stride_sn, stride_ym, magic,
                              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                              STAGES: gl.constexpr, W_STAGES: gl.constexpr, B_TILES: gl.constexpr,
                              DQ_WARPS: gl.constexpr, DQ_REGS: gl.constexpr, GROUP_SIZE: gl.constexpr,
                              BITS: gl.constexpr, CODES_PER_WORD: gl.constexpr, CODE_OFFSET: gl.constexpr,
                              num_warps: gl.constexpr):
        """``y[M, N] = x[M, K] @ W[N, K].T``; program ``pid`` owns tile (pid // N tiles, pid % N tiles)."""
        gl.static_assert(BITS == 2 and CODES_PER_WORD == 16, "2-bit fields, 16 per word")
        WORDS: gl.constexpr = BLOCK_K // CODES_PER_WORD
        B_LAYOUT: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K], gl.bfloat16)
        num_n = gl.cdiv(N, BLOCK_N)
        pid = gl.program_id(0)
        off_m = (pid // num_n) * BLOCK_M
        off_n = (pid % num_n) * BLOCK_N
        n_k = K // BLOCK_K

        x_smem = gl.allocate_shared_memory(x_desc.dtype, [STAGES, BLOCK_M, BLOCK_K], x_desc.layout)
        w_smem = gl.allocate_shared_memory(w_desc.dtype, [W_STAGES, BLOCK_N, WORDS], w_desc.layout)
        b_smem = gl.allocate_shared_memory(gl.bfloat16, [B_TILES, BLOCK_N, BLOCK_K], B_LAYOUT)
        x_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        x_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        w_full = gl.allocate_shared_memory(gl.int64, [W_STAGES, 1], mbarrier.MBarrierLayout())
        b_full = gl.allocate_shared_memory(gl.int64, [B_TILES, 1], mbarrier.MBarrierLayout())
        b_empty = gl.allocate_shared_memory(gl.int64, [B_TILES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(x_full.index(s), count=1)
            mbarrier.init(x_empty.index(s), count=1)
        for s in gl.static_range(W_STAGES):
            mbarrier.init(w_full.index(s), count=1)
        for s in gl.static_range(B_TILES):
            mbarrier.init(b_full.index(s), count=1)
            mbarrier.init(b_empty.index(s), count=1)
        fence_async_shared()

        acc = gl.warp_specialize([
            (_mma_partition, (x_smem, b_smem, x_full, x_empty, b_full, b_empty, n_k, BLOCK_M, BLOCK_N, STAGES,
                              B_TILES, num_warps)),
            (_unpack_partition, (x_desc, w_desc, x_smem, w_smem, b_smem, x_full, x_empty, w_full, b_full, b_empty,
                                 s_ptr, N, stride_sn, magic, off_m, off_n, n_k, BLOCK_N, BLOCK_K, STAGES,
                                 W_STAGES, B_TILES, GROUP_SIZE, CODES_PER_WORD, CODE_OFFSET, DQ_WARPS)),
        ], [DQ_WARPS], [DQ_REGS])[0]

        ACC_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                             instr_shape=[16, BLOCK_N, 16])
        offs_m = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ACC_LAYOUT))
        offs_n = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, ACC_LAYOUT))
        y_ptrs = y_ptr + gl.expand_dims(offs_m.to(gl.int64) * stride_ym, 1) + gl.expand_dims(offs_n, 0)
        mask = gl.expand_dims(offs_m < M, 1) & gl.expand_dims(offs_n < N, 0)
        gl.store(y_ptrs, acc.to(gl.bfloat16), mask=mask)

    # fmt: on


def launch(x2d: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, y: torch.Tensor,
           block_m: int, block_n: int, block_k: int, num_warps: int, num_stages: int, dq_warps: int = 4) -> None:
    """Run ``y = x2d @ dequantize(weight, weight_scale).T`` (bf16, 2-D, checked by the caller)."""
    check_config(block_m, block_n, block_k, num_warps, num_stages, dq_warps)
    M, K = x2d.shape
    N = weight.shape[0]
    if x2d.data_ptr() % 16 or x2d.stride(0) % 8:  # TMA: 16-byte aligned base and rows
        x2d = x2d.contiguous() if x2d.stride(0) % 8 else x2d.clone()
    x_desc = TensorDescriptor.from_tensor(x2d, [block_m, block_k],
                                          gl.NVMMASharedLayout.get_default_for([block_m, block_k], gl.bfloat16))
    w_desc = TensorDescriptor.from_tensor(weight, [block_n, block_k // format.CODES_PER_WORD],
                                          gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2))
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    _hopper_linear_kernel[grid](
        x_desc, w_desc, weight_scale, y, M, N, K, weight_scale.stride(0), y.stride(0), MAGIC_BF16_PAIR,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, STAGES=num_stages, W_STAGES=_W_STAGES,
        B_TILES=b_tiles(block_m, block_n, num_stages), DQ_WARPS=dq_warps, DQ_REGS=_DQ_REGS[dq_warps],
        GROUP_SIZE=format.GROUP_SIZE, BITS=format.BITS, CODES_PER_WORD=format.CODES_PER_WORD,
        CODE_OFFSET=format.CODE_OFFSET, num_warps=num_warps)
