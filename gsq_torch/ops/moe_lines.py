"""The fused MoE's decode on the linear op's "lines" kernel shape (a few tokens, bf16).

Two launches, no alignment (``ForwardConfig(True, lines=True)``):

- gate_up: one program per (slot, 64 gate rows, 512-input chunk of H). It reads its expert's 64 gate and 64
  up rows of the chunk in whole 64-byte runs (``linear._lines_tile``), builds the chunk's x as the
  block-diagonal B operand (scale groups as the MMA's N side) and stores fp32 partials
  ``[H / 512, T * K, 2I]``. There is **no split-K fix-up**: the sum over chunks and SiLU(gate) * up happen
  in the down kernel's prologue, after the grid-wide wait that it needs anyway (on an H100 the fix-up is
  a 2.5 µs serial tail of the linear op at M = 1, ``benchmarks/linear_notes.md``).
- down (a programmatic dependent of gate_up): one program per (token, down rows, slot k and 512-input
  chunk of I). Before its wait it reads the routing and its first weight tiles; after it, the slot's
  partials -> act chunk -> B operand; the routing weight scales the fp32 partial; the token's K * I / 512
  splits are added in a fixed order by the last to arrive (``linear._split_fixup``: deterministic).

Weights and scales keep the checkpoint layout; ids outside ``[0, E)`` contribute nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import format
from ._triton import FORMAT_CONSTEXPRS, MAGIC_BF16_PAIR, WGMMA_MIN_WARPS, interpreting, pdl_supported
from .linear import (
    _dec_tile_row,
    _dot_operands,
    _lines_operand,
    _lines_real_k,
    _lines_step,
    _lines_tile,
    _split_fixup,
    _split_locks,
)

CHUNK = 512  # inputs per program: the "lines" operand (128 registers of unpacked codes per thread)


def supported(x: torch.Tensor, H: int, I: int) -> bool:
    """Whether this path can run: bf16 activations (any dtype under the interpreter), H and I whole chunks."""
    return (x.dtype == torch.bfloat16 or interpreting()) and H % CHUNK == 0 and I % CHUNK == 0


@triton.jit
def _chunk_operand(xi, real, NCOL: tl.constexpr, CODE_OFFSET: tl.constexpr, DOT_DTYPE: tl.constexpr,
                   GROUP_SIZE: tl.constexpr):
    """One token's chunk ``xi`` (logical k order, ``real`` its input indices) -> the B operand and constant parts
    of ``linear._lines_operand``, the token's groups in the first ``CHUNK / GROUP_SIZE`` columns."""
    G: tl.constexpr = xi.shape[0] // GROUP_SIZE
    col = tl.arange(0, NCOL)
    grp = ((col % G)[:, None] == (real // GROUP_SIZE)[None, :]) & (col < G)[:, None]
    xt = tl.where(grp, xi[None, :], tl.zeros((NCOL, xi.shape[0]), xi.dtype))
    return _lines_operand(xt, real, CODE_OFFSET, DOT_DTYPE)


@triton.jit
def _chunk_tiles(row0, chunk, stride_w, stride_s, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, W: tl.constexpr,
                 NCOL: tl.constexpr, GROUP_SIZE: tl.constexpr, CODES_PER_WORD: tl.constexpr):
    """Offsets of ``BLOCK_N`` weight rows from ``row0`` over one input chunk, for ``linear._lines_tile``: MMA row ->
    weight row ``n0``, the loaded tile's rows, word and scale offsets, and the scale mask (real group columns)."""
    G: tl.constexpr = CHUNK // GROUP_SIZE
    l = tl.arange(0, BLOCK_N)
    col = tl.arange(0, NCOL)
    n0 = row0 + _dec_tile_row(l, W)
    tile_rows = row0 + l
    w_off = tile_rows.to(tl.int64)[:, None] * stride_w + chunk * (CHUNK // CODES_PER_WORD) + tl.arange(0, 16)[None, :]
    s_off = n0.to(tl.int64)[:, None] * stride_s + chunk * G + (col % G)[None, :]
    smask = (col < G)[None, :] & (l >= 0)[:, None]
    return n0, tile_rows, w_off, s_off, smask


@triton.jit(do_not_specialize=["num_slots"])
def _gate_up_lines_kernel(x_ptr, w_ptr, s_ptr, part_ptr, idx_ptr, num_slots, E, magic, H: tl.constexpr,
                          I: tl.constexpr, K: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, W: tl.constexpr,
                          DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, ASM_STORE: tl.constexpr,
                          GROUP_SIZE: tl.constexpr, BITS: tl.constexpr, CODES_PER_WORD: tl.constexpr,
                          CODE_OFFSET: tl.constexpr, PDL: tl.constexpr = False):
    """Partials ``part[chunk, slot, n]`` of ``W_gate_up[expert(slot)] @ x[token(slot)]`` over one chunk, for
    ``BLOCK_N`` gate rows and the matching up rows (``n`` and ``I + n``)."""
    tl.static_assert(BITS == 2 and CODES_PER_WORD == 16 and GROUP_SIZE == 128,
                     "the layout is for 2-bit codes in groups of 128")
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()  # down reads only the routing and weights before its wait
    G: tl.constexpr = CHUNK // GROUP_SIZE
    NCOL: tl.constexpr = 8  # the MMA's N side: the chunk's 4 groups, padded
    HW: tl.constexpr = H // CODES_PER_WORD
    HG: tl.constexpr = H // GROUP_SIZE
    num_rb: tl.constexpr = I // BLOCK_N
    slot = tl.program_id(0) // num_rb
    rb = tl.program_id(0) % num_rb
    chunk = tl.program_id(1)
    expert = tl.load(idx_ptr + slot)
    if (expert >= 0) & (expert < E):  # a dropped slot's partials are never read
        token = slot // K
        n0, tile_rows, w_off, s_off, smask = _chunk_tiles(rb * BLOCK_N, chunk, HW, HG, CHUNK, BLOCK_N, W, NCOL,
                                                          GROUP_SIZE, CODES_PER_WORD)  # n0: gate rows
        w_e = w_ptr + expert * (2 * I * HW)
        s_e = s_ptr + expert * (2 * I * HG)
        nl, nh, ns = _lines_tile(w_e, s_e, w_off, s_off, tile_rows, n0, 0, 2 * I, HW, HG, smask, True)
        real = _lines_real_k(tl.arange(0, CHUNK), W < WGMMA_MIN_WARPS)
        xb, qx = _chunk_operand(tl.load(x_ptr + token * H + chunk * CHUNK + real), real, NCOL, CODE_OFFSET,
                                DOT_DTYPE, GROUP_SIZE)
        magic32 = magic - 0x01000100  # bf16 32 in either half
        mn = num_slots.to(tl.int64) * (2 * I)
        tok = tl.arange(0, NCOL) // G
        for t in range(2):  # the gate rows, then the up rows (a loop, as in "lines": fewer registers)
            wl, wh, ss = nl, nh, ns
            if t == 0:
                nl, nh, ns = _lines_tile(w_e, s_e, w_off, s_off, tile_rows, n0, I, 2 * I, HW, HG, smask, True)
            _lines_step(wl, wh, ss, xb, qx, tok, magic, magic32, n0 + t * I, 2 * I, num_slots, slot, chunk, mn,
                        part_ptr, part_ptr, 0, 1, BLOCK_N, W, CHUNK // 256, True, ASM_STORE, DOT_DTYPE,
                        INPUT_PRECISION)


@triton.jit(do_not_specialize=["T"])
def _down_lines_kernel(part_gu_ptr, w_ptr, s_ptr, weights_ptr, idx_ptr, out_ptr, part_ptr, lock_ptr, T, E, magic,
                       H: tl.constexpr, I: tl.constexpr, K: tl.constexpr, CHUNK: tl.constexpr,
                       BLOCK_N: tl.constexpr, TILES: tl.constexpr, W: tl.constexpr, SPLIT_BATCH: tl.constexpr, FIX: tl.constexpr,
                       DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, ASM_STORE: tl.constexpr,
                       GROUP_SIZE: tl.constexpr, BITS: tl.constexpr, CODES_PER_WORD: tl.constexpr,
                       CODE_OFFSET: tl.constexpr, PDL: tl.constexpr = False):
    """``out[t] = sum_k w_k W_down[e_k] @ (SiLU(gate) * up)`` for ``TILES * BLOCK_N`` rows of one token: this
    program takes one slot's one chunk of I (split ``k * I / CHUNK + c``); the last split adds them up."""
    tl.static_assert(BITS == 2 and CODES_PER_WORD == 16 and GROUP_SIZE == 128,
                     "the layout is for 2-bit codes in groups of 128")
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()  # the next op waits for this grid before reading out
    G: tl.constexpr = CHUNK // GROUP_SIZE
    NCOL: tl.constexpr = 8
    IW: tl.constexpr = I // CODES_PER_WORD
    IG: tl.constexpr = I // GROUP_SIZE
    CH: tl.constexpr = I // CHUNK  # chunks of I per slot
    HS: tl.constexpr = H // CHUNK  # gate_up's partials per output
    RB: tl.constexpr = TILES * BLOCK_N
    num_rb: tl.constexpr = H // RB
    token = tl.program_id(0) // num_rb
    row0 = (tl.program_id(0) % num_rb) * RB
    split = tl.program_id(1)
    k = split // CH
    chunk = split % CH
    slot = token * K + k
    expert = tl.load(idx_ptr + slot)
    live = (expert >= 0) & (expert < E)
    expert = tl.where(live, expert, 0).to(tl.int64)  # a dropped slot reads expert 0 and adds zeros
    rw = tl.where(live, tl.load(weights_ptr + slot).to(tl.float32), 0.0)
    n0, tile_rows, w_off, s_off, smask = _chunk_tiles(row0, chunk, IW, IG, CHUNK, BLOCK_N, W, NCOL, GROUP_SIZE,
                                                      CODES_PER_WORD)
    w_e = w_ptr + expert * (H * IW)
    s_e = s_ptr + expert * (H * IG)
    # weights are never written by a launch that lets this one start early: load the first tile before the wait
    nl, nh, ns = _lines_tile(w_e, s_e, w_off, s_off, tile_rows, n0, 0, H, IW, IG, smask, True)
    if PDL:
        tl.extra.cuda.gdc_wait()  # gate_up's partials, the split counters
    real = _lines_real_k(tl.arange(0, CHUNK), W < WGMMA_MIN_WARPS)
    f = chunk * CHUNK + real  # the act features of this chunk, k order
    fmask = (f * 0 + live.to(tl.int32)) > 0  # a tensor mask: scalar & tensor trips the interpreter
    g = tl.zeros((CHUNK,), tl.float32)
    u = tl.zeros((CHUNK,), tl.float32)
    mn_gu = T.to(tl.int64) * K * (2 * I)
    for c in tl.static_range(HS):  # gate_up's chunks of H, in order
        row = part_gu_ptr + c * mn_gu + slot.to(tl.int64) * (2 * I)
        g += tl.load(row + f, mask=fmask, other=0.0, cache_modifier=".cg")
        u += tl.load(row + I + f, mask=fmask, other=0.0, cache_modifier=".cg")
    a = (g * tl.sigmoid(g) * u).to(out_ptr.dtype.element_ty)  # act rounds to the activation dtype, as act' does
    xb, qx = _chunk_operand(a, real, NCOL, CODE_OFFSET, DOT_DTYPE, GROUP_SIZE)
    magic32 = magic - 0x01000100
    mn = T.to(tl.int64) * H
    tok = tl.arange(0, NCOL) // G
    for t in range(TILES):  # a loop, not unrolled: fewer registers
        wl, wh, ss = nl, nh, ns
        if t + 1 < TILES:
            nl, nh, ns = _lines_tile(w_e, s_e, w_off, s_off, tile_rows, n0, (t + 1) * BLOCK_N, H, IW, IG, smask,
                                     True)
        # the routing weight goes on the fp32 scales (one rounding, none on the operand)
        _lines_step(wl, wh, ss.to(tl.float32) * rw, xb, qx, tok, magic, magic32, n0 + t * BLOCK_N, H, T, token,
                    split, mn, part_ptr, out_ptr, H, 1, BLOCK_N, W, CHUNK // 256, True, ASM_STORE, DOT_DTYPE,
                    INPUT_PRECISION)
    _split_fixup(part_ptr, out_ptr, lock_ptr, tl.program_id(0), T, H, mn, K * CH, row0, RB, token, 1, H,
                 SPLIT_BATCH, FIX)


def lines_forward(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, gate_up_proj: torch.Tensor,
                  gate_up_proj_scale: torch.Tensor, down_proj: torch.Tensor, down_proj_scale: torch.Tensor,
                  out: torch.Tensor, block_n: int = 64, num_warps: int = 2, block_n_down: int = 64,
                  tiles_down: int = 1, num_warps_down: int = 2, pdl: bool = True) -> torch.Tensor:
    """Run the two launches (contiguous inputs, checked by the caller; ``supported`` must hold)."""
    T, H = x.shape
    E, two_i = gate_up_proj.shape[:2]
    I, K = two_i // 2, idx.shape[1]
    for rows, warps, what in ((block_n, num_warps, "block_n"), (block_n_down, num_warps_down, "block_n_down")):
        if warps not in (1, 2, 4) or rows % (16 * warps):
            raise ValueError(f"decode lines: {what}={rows} must be a multiple of 16 * num_warps ({warps}: 1, 2 or 4)")
    if H % (block_n_down * tiles_down) or I % block_n:
        raise ValueError(f"decode lines: block_n_down * group_m ({block_n_down} x {tiles_down}) must divide H={H} "
                         f"and block_n={block_n} I={I}")
    pdl = pdl and pdl_supported(x.device)
    dot_dtype, precision = _dot_operands(x.dtype)
    S = T * K
    common = dict(DOT_DTYPE=dot_dtype, INPUT_PRECISION=precision, ASM_STORE=not interpreting(),
                  GROUP_SIZE=format.GROUP_SIZE, PDL=pdl, **FORMAT_CONSTEXPRS)
    part_gu = torch.empty((H // CHUNK, S, 2 * I), dtype=torch.float32, device=x.device)
    _gate_up_lines_kernel[(S * (I // block_n), H // CHUNK)](
        x, gate_up_proj, gate_up_proj_scale, part_gu, idx, S, E, MAGIC_BF16_PAIR, H=H, I=I, K=K, CHUNK=CHUNK, BLOCK_N=block_n,
        W=num_warps, **common, num_warps=num_warps, num_stages=1)
    splits = K * (I // CHUNK)
    programs = T * (H // (block_n_down * tiles_down))
    part = torch.empty((splits, T, H), dtype=torch.float32, device=x.device)
    batch = min(16, triton.next_power_of_2(splits))
    _down_lines_kernel[(programs, splits)](
        part_gu, down_proj, down_proj_scale, weights, idx, out, part, _split_locks(x.device, programs), T, E,
        MAGIC_BF16_PAIR, H=H, I=I, K=K, CHUNK=CHUNK, BLOCK_N=block_n_down, TILES=tiles_down, W=num_warps_down,
        SPLIT_BATCH=batch, FIX=32 * num_warps_down * max(1, 64 // batch), **common, num_warps=num_warps_down,
        num_stages=1, **({"launch_pdl": True} if pdl else {}))
    return out
