"""The "hopper" kernel of gsq::linear: many tokens on sm_90, written in Gluon.

Why a second language: Triton's ``tl.dot`` on a weight tile dequantized in registers waits for each
wgmma before the next (the operand is rebuilt in the same registers or shared memory every step), so
the tensor cores idle while the next tile is unpacked (``benchmarks/linear_notes.md``). Gluon lets the
kernel own its shared memory and the wgmma groups:

- x tiles ``[BLOCK_M, BLOCK_K]`` and packed weight tiles ``[BLOCK_N, BLOCK_K / 16]`` arrive by TMA
  into a ring of ``STAGES`` slots (one mbarrier each);
- each step's weights are dequantized by all threads into one of three bf16 tiles in shared memory
  (the wgmma's B operand, K-major), while the wgmma of the step before runs: the MMA of step i is
  issued asynchronously, the threads wait only for step i - 1's (``warpgroup_mma_wait(1)``), then
  unpack step i + 1;
- one CTA barrier per step orders the unpacked tile's stores before its wgmma; the third tile is what
  lets that single barrier also cover the reuse of a tile (a tile is rewritten two steps after the
  wgmma that read it, which every warp group has waited for by then).

Dequantization as in ``ops/linear.py``: a 2-bit field OR-ed into the mantissa of a bf16 128 or 8 reads
``base + code`` (one LOP3 per two weights), minus ``base + 2`` and times the scale, both exact in bf16.
bf16 activations only; the launcher in ``ops/linear.py`` picks this kernel for large M on sm_90 when
Gluon is present (Triton 3.6+), and falls back to the Triton kernels otherwise.
"""

from __future__ import annotations

import torch
import triton

from .. import format

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

_MAGIC_BF16 = 0x43004300  # two bf16 128.0 (see _unpack)


_SMEM_BYTES = 227 * 1024  # shared memory one CTA may use on sm_90
_W_STAGES = 8  # packed weight tiles in flight (2-4 KB each: loaded further ahead than x)
_W_STAGES_TIGHT = 4  # where 8 would not fit next to the x ring


def supported(x: torch.Tensor, weight: torch.Tensor, block_k: int) -> bool:
    """Whether the "hopper" kernel can run these operands: Gluon, an sm_90 GPU, bf16 x, K whole tiles,
    weight rows that TMA can address (16-byte aligned)."""
    K = x.shape[1]
    return (AVAILABLE and x.is_cuda and x.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(x.device)[0] == 9 and K % block_k == 0
            and block_k % format.CODES_PER_WORD == 0 and format.GROUP_SIZE % block_k == 0
            and weight.data_ptr() % 16 == 0 and weight.stride(0) % 4 == 0)


def smem_bytes(block_m: int, block_n: int, block_k: int, num_stages: int, in_flight: int,
               w_stages: int = _W_STAGES) -> int:
    """Shared memory of one program: the x ring, the packed weight ring, the unpacked bf16 tiles."""
    return (num_stages * block_m * block_k * 2 + w_stages * block_n * block_k // format.CODES_PER_WORD * 4
            + (in_flight + 2) * block_n * block_k * 2)


def w_stages(block_m: int, block_n: int, block_k: int, num_stages: int, in_flight: int) -> int:
    """Packed weight tiles in the ring: 8, or 4 where 8 would not fit."""
    fits = smem_bytes(block_m, block_n, block_k, num_stages, in_flight) <= _SMEM_BYTES
    return _W_STAGES if fits else _W_STAGES_TIGHT


def check_config(block_m: int, block_n: int, block_k: int, num_warps: int, num_stages: int, in_flight: int) -> None:
    """Raise ``ValueError`` naming what the kernel cannot take in these launch parameters."""
    problems = []
    if num_warps not in (4, 8):
        problems.append(f"num_warps {num_warps} (4 or 8: one or two warp groups)")
    elif block_m % (16 * num_warps):
        problems.append(f"block_m {block_m} (a multiple of {16 * num_warps}: 16 rows per warp)")
    if block_k != 64:
        # x rows of a tile at most TMA's 128-byte swizzle; packed rows at least TMA's 16-byte box
        problems.append(f"block_k {block_k} (64: 128 bytes of x and 16 of packed words per row)")
    elif num_warps in (4, 8):
        words = block_n * block_k // format.CODES_PER_WORD
        if block_n not in (64, 128, 256) or words % (32 * num_warps):
            problems.append(f"block_n {block_n} (64, 128 or 256, every thread unpacking whole words of one row)")
    if in_flight not in (1, 2):
        problems.append(f"group_m {in_flight} (wgmma steps in flight: 1 or 2)")
    if num_stages < in_flight + 2:
        problems.append(f"num_stages {num_stages} (at least group_m + 2 x tiles, or the ring never runs ahead)")
    if not problems:
        used = smem_bytes(block_m, block_n, block_k, num_stages, in_flight, _W_STAGES_TIGHT)
        if used > _SMEM_BYTES:
            problems.append(f"{used} bytes of shared memory (at most {_SMEM_BYTES})")
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
    def _load_tile(desc, smem, bars, step, row, col_per_step, n_k, SLOTS: gl.constexpr):
        """TMA of tile ``[row, step * col_per_step]`` into ring slot ``step % SLOTS`` (if the step exists)."""
        slot = step % SLOTS
        live = step < n_k
        mbarrier.expect(bars.index(slot), desc.block_type.nbytes, pred=live)
        _tma_load(desc, [row, step * col_per_step], bars.index(slot), smem.index(slot), pred=live)

    @gluon.jit
    def _step_scale(s_rows, n_mask, step, n_k, BLOCK_K: gl.constexpr, GROUP_SIZE: gl.constexpr):
        """The scales of step ``step`` (zero past the last step)."""
        return gl.load(s_rows + (step * BLOCK_K) // GROUP_SIZE, mask=n_mask & (step < n_k), other=0.0)

    @gluon.jit
    def _dequant_step(w_smem, w_bars, b_smem, scale, magic, step, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                      W_STAGES: gl.constexpr, B_TILES: gl.constexpr, WORDS_LAYOUT: gl.constexpr,
                      CODES_PER_WORD: gl.constexpr, CODE_OFFSET: gl.constexpr):
        """Unpack step ``step``'s weights (once their TMA has landed) into bf16 tile ``step % B_TILES``."""
        WORDS: gl.constexpr = BLOCK_K // CODES_PER_WORD
        slot = step % W_STAGES
        mbarrier.wait(w_bars.index(slot), (step // W_STAGES) & 1)
        words = w_smem.index(slot).load(WORDS_LAYOUT)
        scale2d = gl.broadcast(gl.expand_dims(scale, 1), words)[0]
        w = _unpack(words, scale2d, magic, BLOCK_N, WORDS, CODE_OFFSET)
        b_smem.index(step % B_TILES).store(w)

    @gluon.jit(do_not_specialize=["M"])
    def _hopper_linear_kernel(x_desc, w_desc, s_ptr, y_ptr, M, N, K, stride_sn, stride_ym, magic,
                              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                              STAGES: gl.constexpr, W_STAGES: gl.constexpr, IN_FLIGHT: gl.constexpr,
                              GROUP_SIZE: gl.constexpr, BITS: gl.constexpr, CODES_PER_WORD: gl.constexpr,
                              CODE_OFFSET: gl.constexpr, num_warps: gl.constexpr):
        """``y[M, N] = x[M, K] @ W[N, K].T``; program ``pid`` owns tile (pid // N tiles, pid % N tiles).

        Rings: ``STAGES`` x tiles, ``W_STAGES`` packed weight tiles (small: loaded further ahead),
        ``IN_FLIGHT + 2`` unpacked bf16 tiles; ``IN_FLIGHT`` wgmma steps may run while a step is unpacked.
        Slot reuse rests on the barrier that ends every step: by the end of step i every warp group has
        waited for wgmma i - IN_FLIGHT and every thread has unpacked step i + 1.
        """
        gl.static_assert(BITS == 2 and CODES_PER_WORD == 16, "2-bit fields, 16 per word")
        WORDS: gl.constexpr = BLOCK_K // CODES_PER_WORD
        B_TILES: gl.constexpr = IN_FLIGHT + 2
        # Unpack layout: a thread owns WPT consecutive words (16 * WPT consecutive inputs) of one row.
        WPT: gl.constexpr = BLOCK_N * WORDS // (32 * num_warps)
        TW: gl.constexpr = WORDS // WPT  # threads along a row's words
        WORDS_LAYOUT: gl.constexpr = gl.BlockedLayout([1, WPT], [32 // TW, TW], [num_warps, 1], [1, 0])
        ACC_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                             instr_shape=[16, BLOCK_N, 16])
        B_LAYOUT: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K], gl.bfloat16)

        num_n = gl.cdiv(N, BLOCK_N)
        pid = gl.program_id(0)
        off_m = (pid // num_n) * BLOCK_M
        off_n = (pid % num_n) * BLOCK_N
        n_k = K // BLOCK_K

        x_smem = gl.allocate_shared_memory(x_desc.dtype, [STAGES, BLOCK_M, BLOCK_K], x_desc.layout)
        w_smem = gl.allocate_shared_memory(w_desc.dtype, [W_STAGES, BLOCK_N, WORDS], w_desc.layout)
        b_smem = gl.allocate_shared_memory(gl.bfloat16, [B_TILES, BLOCK_N, BLOCK_K], B_LAYOUT)
        x_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        w_bars = gl.allocate_shared_memory(gl.int64, [W_STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(x_bars.index(s), count=1)
        for s in gl.static_range(W_STAGES):
            mbarrier.init(w_bars.index(s), count=1)
        fence_async_shared()
        for s in gl.static_range(W_STAGES):
            _load_tile(w_desc, w_smem, w_bars, s, off_n, WORDS, n_k, W_STAGES)
        for s in gl.static_range(STAGES):
            _load_tile(x_desc, x_smem, x_bars, s, off_m, BLOCK_K, n_k, STAGES)

        rows = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, WORDS_LAYOUT))
        n_mask = rows < N
        s_rows = s_ptr + gl.minimum(rows, N - 1).to(gl.int64) * stride_sn
        _dequant_step(w_smem, w_bars, b_smem, _step_scale(s_rows, n_mask, 0, n_k, BLOCK_K, GROUP_SIZE), magic, 0,
                      BLOCK_N, BLOCK_K, W_STAGES, B_TILES, WORDS_LAYOUT, CODES_PER_WORD, CODE_OFFSET)
        # Scales are plain loads, one step ahead of their unpack so that their latency hides.
        scale = _step_scale(s_rows, n_mask, 1, n_k, BLOCK_K, GROUP_SIZE)
        fence_async_shared()
        _cta_barrier()

        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, ACC_LAYOUT)
        for i in range(n_k):
            mbarrier.wait(x_bars.index(i % STAGES), (i // STAGES) & 1)
            acc = warpgroup_mma(x_smem.index(i % STAGES), b_smem.index(i % B_TILES).permute((1, 0)), acc,
                                is_async=True)
            # Refills, while the wgmma runs: the words of step i were unpacked last step; the x tile of
            # step i - IN_FLIGHT - 1 was read by a wgmma that every warp group has waited for.
            _load_tile(w_desc, w_smem, w_bars, i + W_STAGES, off_n, WORDS, n_k, W_STAGES)
            if i > IN_FLIGHT:
                _load_tile(x_desc, x_smem, x_bars, i - IN_FLIGHT - 1 + STAGES, off_m, BLOCK_K, n_k, STAGES)
            next_scale = _step_scale(s_rows, n_mask, i + 2, n_k, BLOCK_K, GROUP_SIZE)
            acc = warpgroup_mma_wait(num_outstanding=IN_FLIGHT, deps=(acc,))
            if i + 1 < n_k:
                _dequant_step(w_smem, w_bars, b_smem, scale, magic, i + 1, BLOCK_N, BLOCK_K, W_STAGES, B_TILES,
                              WORDS_LAYOUT, CODES_PER_WORD, CODE_OFFSET)
            scale = next_scale
            fence_async_shared()
            _cta_barrier()
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        for s in gl.static_range(STAGES):
            mbarrier.invalidate(x_bars.index(s))
        for s in gl.static_range(W_STAGES):
            mbarrier.invalidate(w_bars.index(s))

        offs_m = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ACC_LAYOUT))
        offs_n = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, ACC_LAYOUT))
        y_ptrs = y_ptr + gl.expand_dims(offs_m.to(gl.int64) * stride_ym, 1) + gl.expand_dims(offs_n, 0)
        mask = gl.expand_dims(offs_m < M, 1) & gl.expand_dims(offs_n < N, 0)
        gl.store(y_ptrs, acc.to(gl.bfloat16), mask=mask)

    # fmt: on


def launch(x2d: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, y: torch.Tensor,
           block_m: int, block_n: int, block_k: int, num_warps: int, num_stages: int, in_flight: int = 1) -> None:
    """Run ``y = x2d @ dequantize(weight, weight_scale).T`` (bf16, 2-D, checked by the caller)."""
    check_config(block_m, block_n, block_k, num_warps, num_stages, in_flight)
    M, K = x2d.shape
    N = weight.shape[0]
    if x2d.data_ptr() % 16 or x2d.stride(0) % 8:  # TMA: 16-byte aligned base and rows
        x2d = x2d.contiguous() if x2d.stride(0) % 8 else x2d.clone()
    words = block_k // format.CODES_PER_WORD
    x_desc = TensorDescriptor.from_tensor(x2d, [block_m, block_k],
                                          gl.NVMMASharedLayout.get_default_for([block_m, block_k], gl.bfloat16))
    w_desc = TensorDescriptor.from_tensor(weight, [block_n, words],
                                          gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2))
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    _hopper_linear_kernel[grid](
        x_desc, w_desc, weight_scale, y, M, N, K, weight_scale.stride(0), y.stride(0), _MAGIC_BF16,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, STAGES=num_stages,
        W_STAGES=w_stages(block_m, block_n, block_k, num_stages, in_flight),
        IN_FLIGHT=in_flight, GROUP_SIZE=format.GROUP_SIZE,
        BITS=format.BITS, CODES_PER_WORD=format.CODES_PER_WORD, CODE_OFFSET=format.CODE_OFFSET,
        num_warps=num_warps)
