"""gsq::fused_moe: all routed experts of one MoE layer with 2-bit packed weights.

Dimension legend: T tokens, H hidden, I expert intermediate, E experts, K top-k, TK = T * K
slots (slot ``s = t * K + k``).

``out[t] = sum_k top_k_weights[t, k] * down_e(silu(gate_e x_t) * up_e x_t)`` with
``e = top_k_index[t, k]``; an index outside ``[0, E)`` contributes nothing (transformers uses
``E`` as a padding slot).

CUDA pipeline (Triton), no host synchronisation anywhere; ``FORWARD_CONFIGS`` picks per T * K:

- decode (a few tokens: nearly one expert per slot): 2 launches, no alignment. GEMV gate_up
  (one slot x ROWS gate and up rows per program, CUDA-core FMAs, SiLU * up) -> act [TK, I] fp32
  -> GEMV down with the routing weights and the sum over k (k order) -> out. With ``pdl`` the
  down kernel is a programmatic dependent launch: it loads its weights while gate_up runs.
  With ``mma`` the same two kernels on tensor cores (one slot / one token per program), and with
  ``prep`` a third launch before them that permutes x once for gate_up's MMA. With ``lines``
  (``moe_lines.py``) the linear op's "lines" kernel shape: gate_up split over 512-input chunks with
  no fix-up, its partials summed (and SiLU * up) in the down kernel's prologue.
- grouped: moe_align (slots grouped by expert, padded to block_m) -> prep (x permuted and
  scaled for the MMA) -> gate_up (one expert's block of slots x a tile of gate and up rows;
  SiLU * up epilogue) -> act' -> down (routing weight in the epilogue) -> y [TK, H] -> combine.
  The MMAs take the weights as their A operand straight from the registers the unpack leaves
  them in (a permuted k order, see "grouped path" below): no shared-memory round trip of the
  unpacked tile, which at 2 bits per weight would move 16x the bytes read from memory. 1-2 warps
  per program run mma.sync (its own k order; 8-slot blocks), 4-8 wgmma.

fp32 activations take the decode GEMV or the natural-order kernels over ``moe_align`` blocks
(``MoEConfig``, 3xTF32), which the backward uses too. Results are deterministic (no atomics in
the forward).
Backward: ``moe_backward.py``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .. import format
from . import moe_lines
from ._triton import (
    FORMAT_CONSTEXPRS,
    MAGIC_BF16_PAIR,
    WGMMA_MIN_WARPS,
    interpreting,
    pdl_supported,
    runs_mma_sync,
)
from .moe_align import combine_slots, moe_align_sizes, moe_align_triton


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
            f"top_k_weights has shape {tuple(top_k_weights.shape)}; expected {tuple(top_k_index.shape)} "
            "like top_k_index"
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
    for name, t in (("top_k_index", top_k_index), ("top_k_weights", top_k_weights), ("gate_up_proj",
                                                                                     gate_up_proj),
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
    experts that receive tokens, and returns ``[T, H]`` in ``hidden_states.dtype``. Differentiable
    with respect to ``hidden_states``, ``top_k_weights`` and the scales (the CPU backward uses it).
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
        out = out.index_add(0, tokens, y * flat_weight[slots, None])
    return out.to(hidden_states.dtype)


# --- block configurations --------------------------------------------------------------------


@dataclass(frozen=True)
class ForwardConfig:
    """How the forward runs one token-count bucket (see ``FORWARD_CONFIGS``).

    ``decode``: two launches straight from ``top_k_index`` (no alignment, combine fused into the
    down kernel): GEMVs on CUDA cores, or with ``mma`` the grouped kernels' tensor-core MMAs fed
    one slot per gate_up program and one token per down program. Otherwise the grouped path:
    align -> prep -> gate_up -> down -> combine, tensor-core MMAs over ``moe_align`` blocks of
    ``block_m`` slots.

    Decode with ``mma`` (bf16 / fp16 activations; fp32 takes the GEMV): ``block_m`` is the MMA's
    N side (>= the padded top-k), ``block_n`` the gate (and up) rows of a gate_up program,
    ``block_n_down`` the down MMA's rows: ``K_PAD = next_pow2(K)`` slots x ``block_n_down / K_PAD``
    output features per program.

    Decode with ``lines`` (bf16, H and I multiples of 512; ``ops/moe_lines.py``): the linear op's "lines"
    kernel shape, one program per slot x ``block_n`` gate (and as many up) rows x 512 inputs, gate_up's
    partials summed in the down kernel's prologue; down programs of ``group_m`` tiles of ``block_n_down``
    rows per token and 512-input chunk. Other activations or shapes take ``NO_LINES_CONFIGS``.
    """

    decode: bool
    block_m: int = 16  # grouped: slots per program (the MMA's N side; 8 only on mma.sync)
    block_n: int = 64  # grouped: gate rows (and as many up rows) per program, 64 / 128; decode: GEMV rows
    block_n_down: int = 64  # grouped: output features per down program; decode: GEMV rows
    num_warps: int = 4  # gate_up; block_n a multiple of 16 * num_warps; 1-2 run mma.sync, 4-8 wgmma
    num_warps_down: int = 4
    num_stages: int = 3  # grouped: software-pipelining depth of the weight / activation loads
    group_m: int = 8  # grouped: row blocks that sweep the same weight tiles together (L2 reuse)
    scale_after_dot: bool = True  # grouped: scale a group's fp32 partial (cheap at small block_m)
    pdl: bool = False  # decode: launch down as a programmatic dependent of gate_up (sm_90+)
    mma: bool = False  # decode: tensor-core MMAs (the grouped kernels' unpack) instead of the GEMV
    pair: bool = False  # decode mma: a gate_up program takes two slots of one expert (one weight read)
    prep: bool = False  # decode mma: x permuted once by a prep launch (gate_up cp.async's its B operand)
    lines: bool = False  # decode: the "lines" kernels (ops/moe_lines.py) instead of the slot kernels
    # decode mma, timing only (benchmarks/tune_moe.py --ablate): OR of the ABLATE_* bits below, wrong
    # results. 0 (the default) compiles every ablation out.
    ablate: int = 0


# Timing-only ablations of the decode-on-tensor-cores kernels (ForwardConfig.ablate). gate_up:
ABLATE_GU_NO_MMA = 1  # no wgmma (nor its B operand's smem staging): unpacked tiles XOR-ed into a carry
ABLATE_GU_LOADS_ONLY = 2  # no unpack, no wgmma: the loaded words XOR-ed into a carry
ABLATE_GU_NO_STORE = 4  # no act' / qact epilogue: one fp32 per program stored
ABLATE_GU_NO_X = 8  # no x loads in the loop (values derived from g; the constant parts still loaded)
ABLATE_GU_CONTIG = 16  # same bytes, group-major addresses: each group a contiguous 4 KB (not 32 B / row)
ABLATE_GU = 31
# down:
ABLATE_DN_NO_MMA = 32  # no wgmma: unpacked tiles and act' reduced instead
ABLATE_DN_NO_WAIT = 64  # no griddepcontrol.wait (reads act' while gate_up still runs)
ABLATE_DN = 96


@dataclass(frozen=True)
class MoEConfig:
    """Tile sizes of the natural-order kernels (fp32 activations and the backward).

    Kernels compute ``out^T = W x^T`` ("swap AB"): weight rows are the MMA's M side, so a
    handful of tokens still fills it, and a 64-row weight tile runs on Hopper's wgmma.
    """

    block_m: int  # slots per program (the MMA's N side)
    block_n: int  # gate_up: gate rows (and as many up rows) per program
    block_n_down: int  # down: output features per program
    group_m: int  # grouped path: row blocks that share a weight tile run together (L2 reuse)
    num_warps: int
    num_stages: int
    paired: bool  # unpack 2 codes per 32-bit op (x read in "paired" K order, see _unpack)
    scale_after_dot: bool  # multiply a group's partial dot by its scale (cheap at small block_m)


# The buckets' configs, named where two tables share them (below).
_GEMV_T1 = ForwardConfig(True, block_n=8, block_n_down=16, pdl=True)
# Tensor-core slot decode (`tune_moe.py --decode --mma`): 21.9 / 37.0 us at T = 4 / 8 where the CUDA-core GEMV
# took 22.8 / 43.7 and the grouped path 38.0 / 58.1 (H200). x prepared once (``prep``: a third launch, but no
# per-group staging of gate_up's B operand): 22.1 -> 21.3 us at T = 4, 36.5 -> 34.2 at T = 8.
_SLOT_T4 = ForwardConfig(True, pdl=True, mma=True, prep=True)
# From T = 5 the down kernel on mma.sync with 128-row programs (16 features x 8 slots, 2 warps); H200, same run
# (session 9): T = 6 28.4 -> 25.9 us, T = 8 34.3 -> 31.9, T = 12 48.8 -> 44.0 (T = 4 stays: 21.3, 22.0 with it).
_SLOT_T12 = ForwardConfig(True, block_n_down=128, num_warps_down=2, pdl=True, mma=True, prep=True)
# From T = 13, slot pairs of one expert read its weights once: T = 16 54.2 -> 52.6 us (H200); it beat the grouped
# path up to T = 24 there (T = 20 63.7 -> 61.4, T = 24 79.3 -> 73.6).
_SLOT_T24 = dataclasses.replace(_SLOT_T12, pair=True)
# 8-slot blocks on mma.sync (2 warps per program, no warp-group wait per scale group, an expert's ~1-8 slots
# without padding to 16). H100, against the 16-slot wgmma configs before: T = 32 107.5 -> 95.5 us, T = 64
# 139.4 -> 117.5, T = 128 149.2 -> 132.9, T = 256 157.5 -> 150.7.
_GROUPED_MMA_SYNC = ForwardConfig(False, block_m=8, block_n_down=128, num_warps=2, num_warps_down=2, num_stages=3)
# T >= 1024: wgmma, 128-feature down tiles halve the re-reads of each block's act' (one per feature tile):
# T = 1024 311.6 -> 291.1 us with 32-slot blocks, T = 4096 791.7 -> 752.9 with 64 (H200).
_GROUPED_T1024 = ForwardConfig(False, block_m=32, block_n_down=128, scale_after_dot=False)
_GROUPED_T4096 = ForwardConfig(False, block_m=64, block_n_down=128, scale_after_dot=False)
# The "lines" decode (ops/moe_lines.py: no split-K fix-up in gate_up, its partials summed in down's prologue),
# ``group_m`` down tiles of 64 rows per program. H100, against the buckets before in the same runs (session 10,
# `tune_moe.py --configs`): T = 2 16.3-16.6 -> 14.3-14.6 us, T = 3 20.4 -> 18.5, T = 12 47.8-48.0 -> 42.8-43.1,
# T = 16 57.5-57.6 -> 49.6-49.8, T = 20 63.4 -> 62.6, T = 24 77.2-77.7 -> 72.1-72.9, T = 32 93.9 -> 85.2 (8 tiles);
# slower at T = 4 / 6 (23.1 / 29.7 against 21.8 / 26.8) and even at T = 8 (32.6 against 32.2).
_LINES = ForwardConfig(True, num_warps=2, num_warps_down=2, group_m=4, pdl=True, lines=True)

# (largest T * K of the bucket, config), first match wins. The decode buckets: with 256 experts nearly every slot
# of a few tokens has its own expert, so grouping saves no weight reads and needs no alignment (2-3 launches
# instead of 6). benchmarks/tune_moe.py times candidates per bucket on a GPU and prints such a table.
FORWARD_CONFIGS: tuple[tuple[int | None, ForwardConfig], ...] = (
    (8, _GEMV_T1),  # T = 1 (K = 8): 9.2-9.5 us
    (16, dataclasses.replace(_LINES, group_m=2)),  # T = 2
    (24, _LINES),  # T = 3
    (32, _SLOT_T4),  # T = 4
    (64, _SLOT_T12),  # T = 5..8
    (192, _LINES),  # T = 9..24
    (256, dataclasses.replace(_LINES, group_m=8)),  # T = 25..32
    (2048, _GROUPED_MMA_SYNC),  # T = 33..256
    (8192, _GROUPED_T1024),
    (None, _GROUPED_T4096),
)
# Where the "lines" kernels cannot run (activations other than bf16, H or I not multiples of 512): the table
# before them.
NO_LINES_CONFIGS: tuple[tuple[int | None, ForwardConfig], ...] = (
    (8, _GEMV_T1),
    (32, _SLOT_T4),
    (96, _SLOT_T12),
    (192, _SLOT_T24),
    (2048, _GROUPED_MMA_SYNC),
    (8192, _GROUPED_T1024),
    (None, _GROUPED_T4096),
)


# fp32 activations on the grouped path (3xTF32 MMAs on the natural-order kernels). Not a
# performance target; fp32 decode buckets use the GEMV, which computes in fp32 anyway.
FP32_CONFIG = MoEConfig(16, 64, 64, 8, 4, 2, False, False)
# fp32 activations (or top-k > block_m) in a decode-on-tensor-cores (``mma``) bucket: the GEMV of
# the T = 4 bucket.
GEMV_FALLBACK = ForwardConfig(True, block_n=16, block_n_down=32, num_warps_down=8)


def forward_config(num_slots: int, lines: bool = True) -> ForwardConfig:
    """The ``FORWARD_CONFIGS`` entry for ``num_slots = T * K`` (``NO_LINES_CONFIGS``' without ``lines``)."""
    for bound, cfg in FORWARD_CONFIGS if lines else NO_LINES_CONFIGS:
        if bound is None or num_slots <= bound:
            return cfg
    raise AssertionError("the config tables must end with a catch-all (None) entry")


def dot_constexprs(dtype: torch.dtype) -> dict:
    """How kernels turn codes into MMA operands for activations of ``dtype``.

    A code ``c`` becomes the 16-bit float ``base + c`` by OR-ing it into the float's mantissa
    (``magic``; exact: ``base`` has unit spacing there), then ``- (base + CODE_OFFSET)`` gives
    ``c - CODE_OFFSET`` exactly. The interpreter gets fp32 MMAs (it computes bf16 wrongly).
    """
    if dtype == torch.float16:
        magic = {"magic": 0x64006400, "MAGIC_DTYPE": tl.float16, "MAGIC_BIAS": 1024.0 + format.CODE_OFFSET}
        dot = tl.float16
    else:
        magic = {"magic": MAGIC_BF16_PAIR, "MAGIC_DTYPE": tl.bfloat16, "MAGIC_BIAS": 128.0 + format.CODE_OFFSET}
        dot = tl.bfloat16
    precision = "tf32"  # ignored for 16-bit operands
    if dtype == torch.float32 or interpreting():
        # fp32 activations keep fp32 accuracy: 3xTF32 on tensor cores ("ieee" FMA dots spill badly).
        dot, precision = tl.float32, "ieee" if interpreting() else "tf32x3"
    return dict(**magic, DOT_DTYPE=dot, INPUT_PRECISION=precision)


# --- shared jit helpers ----------------------------------------------------------------------


@triton.jit
def _unpack(words, magic, BN: tl.constexpr, BKW: tl.constexpr, PAIRED: tl.constexpr, BITS: tl.constexpr,
            CODES_PER_WORD: tl.constexpr, MAGIC_DTYPE: tl.constexpr):
    """Words ``[BN, BKW]`` -> ``[BN, BKW * 16]`` 16-bit floats ``base + code``.

    A join tree keeps each word's codes in the thread that loaded it. Each 32-bit op handles two
    codes, ``s`` (bits 0-1) and ``s + 8`` (bits 16-17), which become one bf16 pair. With
    ``PAIRED`` that pair stays adjacent: position ``16w + 2s + h`` holds code ``16w + s + 8h``,
    and the other operand must be read in that order (``_paired_offsets``, a gather). Otherwise
    the pairs are shuffled back to natural order: one more op per pair, but the activations
    are read contiguously, the better trade at large block_m.
    """
    tl.static_assert(CODES_PER_WORD == 16, "the join tree unpacks 16 codes per word")
    t = tl.join(words, words >> (4 * BITS))
    t = tl.join(t, t >> (2 * BITS))
    t = tl.join(t, t >> BITS)  # [BN, BKW, 2, 2, 2]: element s holds codes s and s + 8
    t = (t & (((1 << BITS) - 1) * 0x10001)) | magic  # magic is a runtime value: AND+OR fuse into one LOP3
    p = tl.join(t.to(tl.int16), (t >> 16).to(tl.int16))  # [BN, BKW, 2, 2, 2, 2]
    if not PAIRED:
        p = tl.permute(p, (0, 1, 5, 2, 3, 4))
    return tl.reshape(p, (BN, BKW * CODES_PER_WORD)).to(MAGIC_DTYPE, bitcast=True)


@triton.jit
def _paired_offsets(BK: tl.constexpr, PAIRED: tl.constexpr, CODES_PER_WORD: tl.constexpr):
    """Offsets ``[BK]`` of the K positions as ``_unpack`` lays them out (identity unless PAIRED)."""
    k = tl.arange(0, BK)
    if PAIRED:
        cpw: tl.constexpr = CODES_PER_WORD
        k = (k // cpw) * cpw + (k % cpw) // 2 + (k % 2) * (cpw // 2)
    return k


@triton.jit
def _weight_times_x(w_ptr, s_ptr, rows, k0, xT, magic, IN: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                    acc, PAIRED: tl.constexpr, SCALE_AFTER_DOT: tl.constexpr, DOT_DTYPE: tl.constexpr,
                    INPUT_PRECISION: tl.constexpr, MAGIC_DTYPE: tl.constexpr, MAGIC_BIAS: tl.constexpr,
                    BITS: tl.constexpr, CODES_PER_WORD: tl.constexpr, GROUP_SIZE: tl.constexpr):
    """``acc += W[rows, k0:k0+BK] @ xT`` for one scale group (BK == GROUP_SIZE); ``acc`` [BN, M]."""
    BKW: tl.constexpr = BK // CODES_PER_WORD
    words = tl.load(w_ptr + rows[:, None] * (IN // CODES_PER_WORD) + k0 // CODES_PER_WORD
                    + tl.arange(0, BKW)[None, :])
    scale = tl.load(s_ptr + rows * (IN // GROUP_SIZE) + k0 // GROUP_SIZE)
    w = _unpack(words, magic, BN, BKW, PAIRED, BITS, CODES_PER_WORD, MAGIC_DTYPE).to(DOT_DTYPE) - MAGIC_BIAS
    if SCALE_AFTER_DOT:
        return acc + tl.dot(w, xT, tl.zeros(acc.shape, tl.float32),
                            input_precision=INPUT_PRECISION) * scale.to(tl.float32)[:, None]
    return tl.dot(w * scale.to(DOT_DTYPE)[:, None], xT, acc, input_precision=INPUT_PRECISION)


@triton.jit
def _load_rows_t(ptr, rows, stride, kk, valid):
    """``ptr[rows[m] * stride + kk[k]]`` as ``[BK, BLOCK_M]`` (0 where not valid)."""
    return tl.load(ptr + rows.to(tl.int64)[None, :] * stride + kk[:, None], mask=valid[None, :], other=0.0)


@triton.jit
def _program_rows(route_ptr, block_expert_ptr, num_slots, E, num_n, num_blocks, BLOCK_M: tl.constexpr,
                  GROUP_M: tl.constexpr):
    """This program's (expert, slots [BLOCK_M], valid [BLOCK_M], row positions [BLOCK_M], pid_n,
    live) in a block of ``moe_align``'s sorted slots (rows = positions in that order), grouped so
    that GROUP_M row blocks sweep the same weight tiles together.
    """
    pid = tl.program_id(0)
    m = tl.arange(0, BLOCK_M)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    group_size = tl.minimum(num_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_size
    pid_n = (pid % in_group) // group_size
    # Blocks past moe_align's used length hold expert E: those programs exit at once.
    expert = tl.load(block_expert_ptr + pid_m)
    pos = pid_m * BLOCK_M + m
    slot = tl.load(route_ptr + pos)
    valid = slot < num_slots
    live = (expert >= 0) & (expert < E)
    # (tl.where, not `valid & live`: the interpreter mishandles tensor & scalar on int1.)
    return tl.where(live, expert, 0).to(tl.int64), slot, tl.where(live, valid, False), pos, pid_n, live


# --- forward kernels -------------------------------------------------------------------------


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, s_ptr, act_ptr, preact_ptr, route_ptr, block_expert_ptr, num_slots, E,
                    num_blocks, magic, H: tl.constexpr, I: tl.constexpr, K: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
                    WRITE_ACT: tl.constexpr, WRITE_PREACT: tl.constexpr, ACT_PAIRED: tl.constexpr,
                    PAIRED: tl.constexpr,
                    SCALE_AFTER_DOT: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                    MAGIC_DTYPE: tl.constexpr, MAGIC_BIAS: tl.constexpr, BITS: tl.constexpr,
                    CODES_PER_WORD: tl.constexpr, CODE_OFFSET: tl.constexpr, GROUP_SIZE: tl.constexpr):
    """act[pos, n] = silu(gate) * up (and/or preact[pos] = [gate, up]) for BLOCK_N features n."""
    expert, slot, valid, pos, pid_n, live = _program_rows(route_ptr, block_expert_ptr, num_slots, E,
                                                          I // BLOCK_N, num_blocks, BLOCK_M, GROUP_M)
    if live:
        token = (slot // K).to(tl.int64)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        w_e = w_ptr + expert * (2 * I * (H // CODES_PER_WORD))
        s_e = s_ptr + expert * (2 * I * (H // GROUP_SIZE))
        kk = _paired_offsets(GROUP_SIZE, PAIRED, CODES_PER_WORD)
        gate = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
        up = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
        for k0 in range(0, H, GROUP_SIZE):
            xT = _load_rows_t(x_ptr, token, H, k0 + kk, valid).to(DOT_DTYPE)  # [BK, BLOCK_M]
            gate = _weight_times_x(w_e, s_e, n, k0, xT, magic, H, BLOCK_N, GROUP_SIZE, gate, PAIRED,
                                   SCALE_AFTER_DOT, DOT_DTYPE, INPUT_PRECISION, MAGIC_DTYPE, MAGIC_BIAS,
                                   BITS, CODES_PER_WORD, GROUP_SIZE)
            up = _weight_times_x(w_e, s_e, n + I, k0, xT, magic, H, BLOCK_N, GROUP_SIZE, up, PAIRED,
                                 SCALE_AFTER_DOT, DOT_DTYPE, INPUT_PRECISION, MAGIC_DTYPE, MAGIC_BIAS, BITS,
                                 CODES_PER_WORD, GROUP_SIZE)
        rows = pos.to(tl.int64)[None, :]
        mask = valid[None, :]
        if WRITE_PREACT:
            tl.store(preact_ptr + rows * (2 * I) + n[:, None], gate, mask=mask)
            tl.store(preact_ptr + rows * (2 * I) + I + n[:, None], up, mask=mask)
        if WRITE_ACT:
            act = gate * tl.sigmoid(gate) * up
            if ACT_PAIRED:  # store so that a contiguous read gives the down kernel's paired order
                half: tl.constexpr = CODES_PER_WORD // 2
                col = (n // CODES_PER_WORD) * CODES_PER_WORD + (n % half) * 2 + (n % CODES_PER_WORD) // half
            else:
                col = n
            tl.store(act_ptr + rows * I + col[:, None], act.to(act_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _down_kernel(act_ptr, w_ptr, s_ptr, weights_ptr, y_ptr, route_ptr, block_expert_ptr, num_slots, E,
                 num_blocks, magic, H: tl.constexpr, I: tl.constexpr, K: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, PAIRED: tl.constexpr, SCALE_AFTER_DOT: tl.constexpr,
                 DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, MAGIC_DTYPE: tl.constexpr,
                 MAGIC_BIAS: tl.constexpr, BITS: tl.constexpr, CODES_PER_WORD: tl.constexpr,
                 CODE_OFFSET: tl.constexpr, GROUP_SIZE: tl.constexpr):
    """y[slot, n] = top_k_weights[slot] * down_e(act[pos])[n] for BLOCK_N features n (act is
    stored in the order this kernel reads)."""
    expert, slot, valid, pos, pid_n, live = _program_rows(route_ptr, block_expert_ptr, num_slots, E,
                                                          H // BLOCK_N, num_blocks, BLOCK_M, GROUP_M)
    if live:
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        w_e = w_ptr + expert * (H * (I // CODES_PER_WORD))
        s_e = s_ptr + expert * (H * (I // GROUP_SIZE))
        rows = pos.to(tl.int64)
        acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
        for k0 in range(0, I, GROUP_SIZE):
            aT = _load_rows_t(act_ptr, rows, I, k0 + tl.arange(0, GROUP_SIZE), valid)
            acc = _weight_times_x(w_e, s_e, n, k0, aT.to(DOT_DTYPE), magic, I, BLOCK_N, GROUP_SIZE, acc,
                                  PAIRED, SCALE_AFTER_DOT, DOT_DTYPE, INPUT_PRECISION, MAGIC_DTYPE,
                                  MAGIC_BIAS, BITS, CODES_PER_WORD, GROUP_SIZE)
        rw = tl.load(weights_ptr + slot, mask=valid, other=0.0).to(tl.float32)
        y = acc * rw[None, :]
        tl.store(y_ptr + slot.to(tl.int64)[None, :] * H + n[:, None], y.to(y_ptr.dtype.element_ty),
                 mask=valid[None, :])


# --- grouped path: MMAs on a register-resident unpack (no layout conversion) -----------------
#
# A wgmma / mma.sync A operand in registers gives thread (warp w, lane 4g + q) rows g and g + 8
# of its warp's 16 and, in each 16-wide k chunk, k = 2q, 2q + 1, 2q + 8, 2q + 9, as bf16 pairs.
# Unpacking packed words in natural k order would leave the codes in the wrong threads, and the
# compiler's fix is a round trip of the unpacked tile through shared memory (16x the bytes of
# the packed one). Instead every kernel here works in a permuted k order in which the thread
# that loads words 2q and 2q + 1 of a row (8-byte loads) already holds exactly its operand:
#
#     logical k = 64u + 32a + 16b + 8j + 2q + h  <->  physical code 16(2q + u) + 4a + 2b + j + 8h
#
# (within each 128-code scale group; ``_mma_code`` / ``_mma_pos``). The unpack makes, per 32-bit
# op, a pair of 16-bit floats ``base + c * 4^j`` (codes c at bits 2j and 16 + 2j of the shifted
# word); the other operand is stored permuted and pre-multiplied by ``4^-j`` (exact), and the
# constant part ``base * sum(x') + CODE_OFFSET * sum(x)`` of each group is subtracted after the
# MMA (``q``, computed when x' is written). Rows get the same treatment: words-tile row
# ``_tile_row(l)`` becomes MMA row l. None of this changes results, only where values live;
# it is checked in the sm_90 SASS (no STS/LDSM of the unpacked tile in the loop).


@triton.jit
def _mma_code(k, V2: tl.constexpr = False):
    """Logical position ``k`` (0..127) of a scale group -> the physical code it holds. Bits of k,
    low to high: h, q (2), j, b, a, u for wgmma; h, j, q (2), b, a, u for mma.sync (``V2``: Triton's
    mma-v2 operand of kWidth 4 puts the lane's two bits above two register bits)."""
    if V2:
        q = (k >> 2) & 3
        j = (k >> 1) & 1
    else:
        q = (k >> 1) & 3
        j = (k >> 3) & 1
    return 16 * (2 * q + ((k >> 6) & 1)) + 4 * ((k >> 5) & 1) + 2 * ((k >> 4) & 1) + j + 8 * (k & 1)


@triton.jit
def _mma_pos(c, V2: tl.constexpr = False):
    """Physical code ``c`` (0..127) of a scale group -> its logical position (inverse of _mma_code)."""
    w = c >> 4
    if V2:
        return (64 * (w & 1) + 32 * ((c >> 2) & 1) + 16 * ((c >> 1) & 1) + 2 * (c & 1) + 4 * (w >> 1)
                + ((c >> 3) & 1))
    return (64 * (w & 1) + 32 * ((c >> 2) & 1) + 16 * ((c >> 1) & 1) + 8 * (c & 1) + 2 * (w >> 1)
            + ((c >> 3) & 1))


@triton.jit
def _mma_j(k, V2: tl.constexpr = False):
    """Bit ``j`` of logical position ``k`` (the code's mantissa field: weight ``4^j``)."""
    return (k >> 1) & 1 if V2 else (k >> 3) & 1


@triton.jit
def _mma_step(k, V2: tl.constexpr = False):
    """``4^-j`` of logical position ``k``: the factor its activation is stored with."""
    return tl.where(_mma_j(k, V2) == 1, 0.25, 1.0)


@triton.jit
def _tile_row(l, W: tl.constexpr):
    """MMA row ``l`` -> the words-tile row it is unpacked from (num_warps ``W`` along rows)."""
    return (l & 7) + 8 * ((l >> 4) % W) + 8 * W * ((l >> 3) & 1) + 16 * W * (l // (16 * W))


@triton.jit
def _unpack_mma(words, magic, BN: tl.constexpr, W: tl.constexpr, BITS: tl.constexpr,
                CODES_PER_WORD: tl.constexpr, GROUP_SIZE: tl.constexpr, MAGIC_DTYPE: tl.constexpr,
                V2: tl.constexpr = False):
    """Words ``[BN, 8]`` of one scale group -> ``[BN, 128]`` 16-bit floats ``base + c * 4^j``.

    Output row l / column k hold words-tile row ``_tile_row(l)`` / code ``_mma_code(k)``.
    11 integer ops per 16 codes; the result is already in the MMA's register layout.
    """
    tl.static_assert(BITS == 2 and CODES_PER_WORD == 16 and GROUP_SIZE == 128,
                     "the layout is for 2-bit codes in groups of 128")
    tl.static_assert(BN % (16 * W) == 0, "block_n must be a multiple of 16 * num_warps")
    w = tl.reshape(words, (BN // (16 * W), 2, W, 8, 8))
    w = tl.reshape(tl.permute(w, (0, 2, 1, 3, 4)), (BN, 4, 2))  # [row, q, u]
    t = tl.join(w, w >> 8)  # a: codes + 4
    t = tl.join(t, t >> 4)  # b: codes + 2
    # j: the code at bits 2j (and 16 + 2j) lands in the mantissa with weight 4^j; magic is a
    # runtime value so that AND + OR fuse into one LOP3.
    t = tl.join((t & (3 * 0x10001)) | magic, (t & (12 * 0x10001)) | magic)
    p = tl.join(t.to(tl.int16), (t >> 16).to(tl.int16))  # h: codes + 8 -> [row, q, u, a, b, j, h]
    if V2:
        p = tl.permute(p, (0, 2, 3, 4, 1, 5, 6))  # k = (u, a, b, q, j, h)
    else:
        p = tl.permute(p, (0, 2, 3, 4, 5, 1, 6))  # k = (u, a, b, j, q, h)
    return tl.reshape(p, (BN, GROUP_SIZE)).to(MAGIC_DTYPE, bitcast=True)


@triton.jit
def _group_words(w_e, row0, in_words, BN: tl.constexpr):
    """Pointers ``[BN, 8]`` to the first scale group's words of rows ``row0 ..``.

    The column index is written so that the compiler sees runs of 2: it then loads 8 bytes per
    thread, giving each thread the word pair the MMA layout wants (16-byte loads would not).
    """
    c = tl.arange(0, 8)
    c = (c // 2) * 2 + c % 2
    return w_e + (row0 + tl.arange(0, BN))[:, None] * in_words + c[None, :]


@triton.jit
def _mma_group(words, scale, xT, qx, magic, acc, BN: tl.constexpr, W: tl.constexpr,
               SCALE_AFTER_DOT: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
               MAGIC_DTYPE: tl.constexpr, MAGIC_BASE: tl.constexpr, CODE_OFFSET: tl.constexpr,
               BITS: tl.constexpr, CODES_PER_WORD: tl.constexpr, GROUP_SIZE: tl.constexpr,
               V2: tl.constexpr = False):
    """``acc += W_group @ x_group`` for one scale group; ``acc`` / result ``[BN, BLOCK_M]`` fp32.

    ``xT``: ``[128, BLOCK_M]`` permuted, 4^-j-scaled activations; ``qx``: their ``[BLOCK_M]``
    constant parts (used with SCALE_AFTER_DOT); ``scale``: ``[BN]`` in MMA row order.
    """
    a = _unpack_mma(words, magic, BN, W, BITS, CODES_PER_WORD, GROUP_SIZE, MAGIC_DTYPE, V2).to(DOT_DTYPE)
    if SCALE_AFTER_DOT:  # the bias goes with the constant part: no per-code subtraction
        part = tl.dot(a, xT.to(DOT_DTYPE), input_precision=INPUT_PRECISION)
        return acc + (part - qx[None, :]) * scale.to(tl.float32)[:, None]
    # Large BLOCK_M: scale the operand instead; (base + c 4^j) - (base + CODE_OFFSET 4^j) = (c - 2) 4^j
    # and its product with a bf16 scale are exact.
    k = tl.arange(0, GROUP_SIZE)
    bias = MAGIC_BASE + CODE_OFFSET * tl.where(_mma_j(k, V2) == 1, 4.0, 1.0)
    a = (a - bias.to(DOT_DTYPE)[None, :]) * scale.to(DOT_DTYPE)[:, None]
    return tl.dot(a, xT.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)


@triton.jit
def _prep_x_kernel(x_ptr, xp_ptr, q_ptr, T, H: tl.constexpr, BLOCK_T: tl.constexpr, MAGIC_BASE: tl.constexpr,
                   CODE_OFFSET: tl.constexpr, GROUP_SIZE: tl.constexpr, PDL: tl.constexpr = False,
                   V2: tl.constexpr = False):
    """``xp[t, 128g + k] = x[t, 128g + _mma_code(k, V2)] * 4^-j(k)`` and the constant parts ``q[t, g]``
    (V2: the mma.sync k order)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()  # gate_up may start: it reads xp / q only after its wait
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    g = tl.program_id(1)
    k = tl.arange(0, GROUP_SIZE)
    ok = (t < T)[:, None]
    row = t.to(tl.int64)[:, None] * H + g * GROUP_SIZE
    x = tl.load(x_ptr + row + _mma_code(k, V2)[None, :], mask=ok, other=0.0)
    xs = (x.to(tl.float32) * _mma_step(k, V2)[None, :]).to(x.dtype)  # exact: a power of 2
    tl.store(xp_ptr + row + k[None, :], xs, mask=ok)
    q = tl.sum(MAGIC_BASE * xs.to(tl.float32) + CODE_OFFSET * x.to(tl.float32), axis=1)
    tl.store(q_ptr + t * (H // GROUP_SIZE) + g, q, mask=t < T)


@triton.jit
def _gate_up_mma_kernel(xp_ptr, qx_ptr, w_ptr, s_ptr, act_ptr, qact_ptr, route_ptr, block_expert_ptr,
                        num_slots, E, num_blocks, magic, H: tl.constexpr, I: tl.constexpr, K: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, W: tl.constexpr,
                        SCALE_AFTER_DOT: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                        MAGIC_DTYPE: tl.constexpr, MAGIC_BASE: tl.constexpr, BITS: tl.constexpr,
                        CODES_PER_WORD: tl.constexpr, CODE_OFFSET: tl.constexpr, GROUP_SIZE: tl.constexpr,
                        PDL: tl.constexpr = False, ACT_V2: tl.constexpr = False):
    """act'[pos, n] = silu(gate) * up for BLOCK_N features n of one block of sorted slots.

    act' is stored the way the down kernel reads it (permuted, 4^-j-scaled; ``ACT_V2``: in
    mma.sync's k order), with its constant parts per BLOCK_N features in ``qact[pos, n // BLOCK_N]``.
    1-2 warps (``W``) run mma.sync, with xp in its k order; 4-8 run wgmma.
    PDL (a programmatic dependent of prep, launched after the alignment): the routing (the
    alignment's output) and the first scales are read before waiting for prep's xp / qx.
    """
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()  # down reads only the alignment before its own wait
    V2: tl.constexpr = W < WGMMA_MIN_WARPS
    expert, slot, valid, pos, pid_n, live = _program_rows(route_ptr, block_expert_ptr, num_slots, E,
                                                          I // BLOCK_N, num_blocks, BLOCK_M, GROUP_M)
    if live:
        HW: tl.constexpr = H // CODES_PER_WORD
        G: tl.constexpr = H // GROUP_SIZE
        token = (slot // K).to(tl.int64)
        n = pid_n * BLOCK_N + _tile_row(tl.arange(0, BLOCK_N), W)  # gate feature of each MMA row
        w_e = w_ptr + expert * (2 * I * HW)
        s_e = s_ptr + expert * (2 * I * G)
        gate_words = _group_words(w_e, pid_n * BLOCK_N, HW, BLOCK_N)
        up_words = gate_words + I * HW
        k = tl.arange(0, GROUP_SIZE)
        x_rows = xp_ptr + token[None, :] * H + k[:, None]  # [128, BLOCK_M]
        gate = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
        up = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
        # Scales and constant parts are 2- / 4-byte gathers the pipeliner leaves synchronous:
        # load them one group ahead by hand.
        s_gate = tl.load(s_e + n * G)
        s_up = tl.load(s_e + (n + I) * G)
        if PDL:
            tl.extra.cuda.gdc_wait()  # xp and qx are prep's output
        qx = tl.load(qx_ptr + token * G, mask=valid, other=0.0)
        for g in range(G):
            gn = tl.minimum(g + 1, G - 1)
            s_gate_next = tl.load(s_e + n * G + gn)
            s_up_next = tl.load(s_e + (n + I) * G + gn)
            qx_next = tl.load(qx_ptr + token * G + gn, mask=valid, other=0.0)
            xT = tl.load(x_rows + g * GROUP_SIZE, mask=valid[None, :], other=0.0)
            gw = g * (GROUP_SIZE // CODES_PER_WORD)
            gate = _mma_group(tl.load(gate_words + gw), s_gate, xT, qx, magic, gate, BLOCK_N, W,
                              SCALE_AFTER_DOT, DOT_DTYPE, INPUT_PRECISION, MAGIC_DTYPE, MAGIC_BASE,
                              CODE_OFFSET, BITS, CODES_PER_WORD, GROUP_SIZE, V2)
            up = _mma_group(tl.load(up_words + gw), s_up, xT, qx, magic, up, BLOCK_N, W, SCALE_AFTER_DOT,
                            DOT_DTYPE, INPUT_PRECISION, MAGIC_DTYPE, MAGIC_BASE, CODE_OFFSET, BITS,
                            CODES_PER_WORD, GROUP_SIZE, V2)
            s_gate, s_up, qx = s_gate_next, s_up_next, qx_next
        act = (gate * tl.sigmoid(gate) * up).to(act_ptr.dtype.element_ty)  # rounded as stored
        kd = (n // GROUP_SIZE) * GROUP_SIZE + _mma_pos(n % GROUP_SIZE, ACT_V2)  # where the down kernel reads n
        act_s = (act.to(tl.float32) * _mma_step(kd, ACT_V2)[:, None]).to(act.dtype)  # exact
        rows = pos.to(tl.int64)[None, :]
        tl.store(act_ptr + rows * I + kd[:, None], act_s, mask=valid[None, :])
        q = tl.sum(MAGIC_BASE * act_s.to(tl.float32) + CODE_OFFSET * act.to(tl.float32), axis=0)
        tl.store(qact_ptr + pos * (I // BLOCK_N) + pid_n, q, mask=valid)


@triton.jit
def _sum_parts(ptrs, valid, PARTS: tl.constexpr):
    """Sum of the ``PARTS`` constant parts at ``ptrs[m] + 0 ..`` (one group of act')."""
    q = tl.load(ptrs, mask=valid, other=0.0)
    for part in tl.static_range(1, PARTS):
        q += tl.load(ptrs + part, mask=valid, other=0.0)
    return q


@triton.jit
def _down_mma_kernel(act_ptr, qact_ptr, w_ptr, s_ptr, weights_ptr, y_ptr, route_ptr, block_expert_ptr,
                     num_slots, E, num_blocks, magic, H: tl.constexpr, I: tl.constexpr, K: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GU_BLOCK_N: tl.constexpr,
                     GROUP_M: tl.constexpr, W: tl.constexpr, SCALE_AFTER_DOT: tl.constexpr,
                     DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, MAGIC_DTYPE: tl.constexpr,
                     MAGIC_BASE: tl.constexpr,
                     BITS: tl.constexpr, CODES_PER_WORD: tl.constexpr, CODE_OFFSET: tl.constexpr,
                     GROUP_SIZE: tl.constexpr, PDL: tl.constexpr = False):
    """y[slot, n] = top_k_weights[slot] * down_e(act[pos])[n] for BLOCK_N features n.

    PDL (a programmatic dependent of gate_up): routing, the first scales and the first group's
    weights are read before waiting for gate_up's act' / qact. 1-2 warps (``W``) run mma.sync."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()  # combine reads y only after its wait
    V2: tl.constexpr = W < WGMMA_MIN_WARPS
    expert, slot, valid, pos, pid_n, live = _program_rows(route_ptr, block_expert_ptr, num_slots, E,
                                                          H // BLOCK_N, num_blocks, BLOCK_M, GROUP_M)
    if live:
        IW: tl.constexpr = I // CODES_PER_WORD
        G: tl.constexpr = I // GROUP_SIZE
        PARTS: tl.constexpr = GROUP_SIZE // GU_BLOCK_N  # constant parts per group, from gate_up programs
        n = pid_n * BLOCK_N + _tile_row(tl.arange(0, BLOCK_N), W)
        words = _group_words(w_ptr + expert * (H * IW), pid_n * BLOCK_N, IW, BLOCK_N)
        s_e = s_ptr + expert * (H * G) + n * G
        rows = pos.to(tl.int64)
        a_rows = act_ptr + rows[None, :] * I + tl.arange(0, GROUP_SIZE)[:, None]
        acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
        q_rows = qact_ptr + rows * (I // GU_BLOCK_N)
        scale = tl.load(s_e)
        if PDL:
            tl.extra.cuda.gdc_wait()  # act' and qact are gate_up's output
        qa = _sum_parts(q_rows, valid, PARTS)
        for g in range(G):  # scales and constant parts one group ahead, as in gate_up
            gn = tl.minimum(g + 1, G - 1)
            scale_next = tl.load(s_e + gn)
            qa_next = _sum_parts(q_rows + gn * PARTS, valid, PARTS)
            aT = tl.load(a_rows + g * GROUP_SIZE, mask=valid[None, :], other=0.0)
            acc = _mma_group(tl.load(words + g * (GROUP_SIZE // CODES_PER_WORD)), scale, aT, qa, magic, acc,
                             BLOCK_N, W, SCALE_AFTER_DOT, DOT_DTYPE, INPUT_PRECISION, MAGIC_DTYPE, MAGIC_BASE,
                             CODE_OFFSET, BITS, CODES_PER_WORD, GROUP_SIZE, V2)
            scale, qa = scale_next, qa_next
        rw = tl.load(weights_ptr + slot, mask=valid, other=0.0).to(tl.float32)
        y = acc * rw[None, :]
        tl.store(y_ptr + slot.to(tl.int64)[None, :] * H + n[:, None], y.to(y_ptr.dtype.element_ty),
                 mask=valid[None, :])


# --- decode on tensor cores: one slot per gate_up program, one token per down program -------
#
# The grouped kernels' register-resident unpack and permuted k order without moe_align, prep or
# combine: 2 launches straight from top_k_index, as the GEMV decode, but the MMAs cost about 0.7
# integer ops per code where the GEMV spends 3.3 instructions.
# gate_up: one slot x BLOCK_N gate (and up) rows per program; the token's x is read in the MMA's
# k order (a 2-byte gather, scaled by 4^-j on the fly; its constant parts are one reduction per
# program; or, with PREP, the grouped path's prep launch does both once) into column 0 of the
# BLOCK_M-wide N side (the others are zero; column 1 holds a second slot of the same expert with
# PAIR). act' and qact as the grouped gate_up writes them (one row per slot). down: one token x F
# output features per program; the MMA's rows are the (slot k, feature) pairs of all K slots
# (BLOCK_N = K_PAD * F, each 16-row MMA tile mixes experts: any row may come from any expert), its N
# side the token's K act rows (column k = slot k). Row (k, f) keeps column k; the routing weights
# and the sum over k (a fixed reduction tree) finish in registers: no combine launch, no atomics.


@triton.jit
def _tile_row_inv(r, W: tl.constexpr):
    """Words-tile row ``r`` -> the MMA row unpacked from it (inverse of ``_tile_row``)."""
    return (r & 7) + 8 * ((r // (8 * W)) & 1) + 16 * ((r >> 3) % W) + 16 * W * (r // (16 * W))


@triton.jit
def _x_constant_parts(token_x, H: tl.constexpr, MAGIC_BASE: tl.constexpr, CODE_OFFSET: tl.constexpr,
                      GROUP_SIZE: tl.constexpr):
    """``[H / 128]`` constant parts ``q_g = sum_c x[128 g + c] (base 4^-j(c) + CODE_OFFSET)`` of one
    token's x (the ``q`` of ``_prep_x_kernel``)."""
    c = tl.arange(0, GROUP_SIZE)
    wq = MAGIC_BASE * tl.where((c & 1) == 1, 0.25, 1.0) + CODE_OFFSET
    x = tl.load(token_x + tl.arange(0, H)).to(tl.float32)
    return tl.sum(tl.reshape(x, (H // GROUP_SIZE, GROUP_SIZE)) * wq[None, :], axis=1)


@triton.jit
def _xor(a, b):
    return a ^ b


@triton.jit
def _gate_up_slot_kernel(x_ptr, qx_ptr, w_ptr, s_ptr, act_ptr, qact_ptr, idx_ptr, num_slots, E, magic,
                         H: tl.constexpr, I: tl.constexpr, K: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, W: tl.constexpr, PAIR: tl.constexpr, SLOTS_PAD: tl.constexpr,
                         PDL: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                         MAGIC_DTYPE: tl.constexpr, MAGIC_BASE: tl.constexpr, BITS: tl.constexpr,
                         CODES_PER_WORD: tl.constexpr, CODE_OFFSET: tl.constexpr, GROUP_SIZE: tl.constexpr,
                         ACT_V2: tl.constexpr = False, PREP: tl.constexpr = False, ABLATE: tl.constexpr = 0,
                         ABLATE_STAGES: tl.constexpr = None):
    """act'[slot, n] = silu(gate) * up for BLOCK_N features n of one slot (stored as the grouped
    gate_up stores it: permuted, 4^-j-scaled, constant parts in ``qact[slot, n // BLOCK_N]``).

    One MMA of 2 * BLOCK_N rows: MMA row l is up (bit 3 of l set) or gate of feature
    ``(l & 7) + 8 * (l >> 4)``, so a thread's accumulator rows g and g + 8 are the gate and up of
    one feature (SiLU * up in registers), and 8 warps can share 64 features.
    The constant parts of x are one reduction per program: ``sum_g scale_g * q_g`` is subtracted
    once, after the loop, instead of ``q_g`` per group.
    PAIR: the slots of an expert pair up in slot order (a scan of top_k_index): the program of
    the first of a pair also computes the second (column 1 of the N side), whose program exits,
    so an expert's weights are read once for two of its slots.
    PREP: ``x_ptr`` / ``qx_ptr`` are ``_prep_x_kernel``'s permuted, scaled x and its constant parts
    (launched just before, this kernel its programmatic dependent): each group's B operand is then
    one masked tile load that the pipeliner turns into cp.async, instead of a 2-byte gather, a
    select and a store to shared memory per group; the constant parts are one load per program.
    ABLATE: timing-only variants (the ABLATE_GU_* bits; 0: none). ABLATE_STAGES: num_stages for the
    loop without a dot (the pipeliner leaves such loops alone unless told), None otherwise.
    """
    tl.static_assert(not PREP or ABLATE == 0, "the ablations take PREP = False")
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    V2: tl.constexpr = W < WGMMA_MIN_WARPS  # 1-2 warps: mma.sync (its operand k order); ACT_V2: the down kernel's
    pid = tl.program_id(0)
    NB: tl.constexpr = I // BLOCK_N
    slot = pid // NB
    pid_n = pid % NB
    expert = tl.load(idx_ptr + slot)
    live = (expert >= 0) & (expert < E)
    slot_b = slot
    has_b = slot < 0  # False
    if PAIR:
        j = tl.arange(0, SLOTS_PAD)
        same = (tl.load(idx_ptr + j, mask=j < num_slots, other=-1) == expert) & (j < num_slots)
        live = live & (tl.sum(tl.where(same & (j < slot), 1, 0), axis=0) % 2 == 0)  # first of its pair
        slot_b = tl.min(tl.where(same & (j > slot), j, num_slots), axis=0)  # the next slot of this expert
        has_b = slot_b < num_slots
        slot_b = tl.where(has_b, slot_b, slot)
    if live:
        HW: tl.constexpr = H // CODES_PER_WORD
        G: tl.constexpr = H // GROUP_SIZE
        BN2: tl.constexpr = 2 * BLOCK_N
        w_e = w_ptr + expert.to(tl.int64) * (2 * I * HW)
        s_e = s_ptr + expert.to(tl.int64) * (2 * I * G)
        l = tl.arange(0, BN2)
        row_l = ((l >> 3) & 1) * I + pid_n * BLOCK_N + (l & 7) + 8 * (l >> 4)  # weight row of MMA row l
        li = _tile_row_inv(l, W)  # words-tile row l holds MMA row li
        row_r = ((li >> 3) & 1) * I + pid_n * BLOCK_N + (li & 7) + 8 * (li >> 4)
        c = tl.arange(0, 8)
        c = (c // 2) * 2 + c % 2  # runs of 2: 8-byte loads of the word pairs the MMA layout wants
        words = w_e + row_r[:, None] * HW + c[None, :]
        if ABLATE & 16:  # the program's 64 KB as 16 contiguous 4 KB pieces (one per group)
            words = w_e + pid_n * (BN2 * HW) + tl.arange(0, BN2)[:, None] * 8 + c[None, :]
        s_l = s_e + row_l * G
        x_a = x_ptr + (slot // K).to(tl.int64) * H
        x_b = x_ptr + (slot_b // K).to(tl.int64) * H
        k = tl.arange(0, GROUP_SIZE)
        step = _mma_step(k, V2)
        col = tl.arange(0, BLOCK_M)
        acc = tl.zeros((BN2, BLOCK_M), tl.float32)
        scale = tl.load(s_l)
        if PREP:
            if PDL:
                tl.extra.cuda.gdc_wait()  # xp and qx are prep's output
            ok_col = col < tl.where(has_b, 2, 1)  # the N columns that hold a slot: column 0, (PAIR) 1
            x_tile = tl.where(col == 0, x_a, x_b)[None, :] + k[:, None]  # [128, BLOCK_M]
            for g in range(G):  # scales one group ahead (2-byte gathers the pipeliner leaves alone)
                scale_next = tl.load(s_l + tl.minimum(g + 1, G - 1))
                xT = tl.load(x_tile + g * GROUP_SIZE, mask=ok_col[None, :], other=0.0)
                a = _unpack_mma(tl.load(words + g * (GROUP_SIZE // CODES_PER_WORD)), magic, BN2, W, BITS,
                                CODES_PER_WORD, GROUP_SIZE, MAGIC_DTYPE, V2).to(DOT_DTYPE)
                part = tl.dot(a, xT.to(DOT_DTYPE), input_precision=INPUT_PRECISION)
                acc += part * scale.to(tl.float32)[:, None]
                scale = scale_next
        else:
            if ABLATE & 8:
                xa = step
            else:
                xa = tl.load(x_a + _mma_code(k, V2)).to(tl.float32)  # x in the MMA's k order
            if ABLATE & 3:  # keep-alive carries of the ablated loop
                xkeep = tl.zeros((GROUP_SIZE,), tl.float32)
                wkeep = tl.zeros((BN2, 8), tl.int32)
                akeep = tl.zeros((BN2, GROUP_SIZE), tl.int16)
            if PAIR:
                xb = tl.load(x_b + _mma_code(k, V2)).to(tl.float32)  # (slot's own x when it has no partner)
            for g in tl.range(G, num_stages=ABLATE_STAGES):  # scales and x one group ahead (2-byte
                # gathers the pipeliner leaves alone)
                gn = tl.minimum(g + 1, G - 1)
                scale_next = tl.load(s_l + gn)
                if ABLATE & 8:
                    xa_next = step + g  # (depends on g: the B operand is still staged every group)
                else:
                    xa_next = tl.load(x_a + gn * GROUP_SIZE + _mma_code(k, V2)).to(tl.float32)
                xm = tl.where(col[:, None] == 0, (xa * step)[None, :], 0.0)  # [BLOCK_M, 128]
                if PAIR:
                    xb_next = tl.load(x_b + gn * GROUP_SIZE + _mma_code(k, V2)).to(tl.float32)
                    xm = tl.where(col[:, None] == 1, (xb * step)[None, :], xm)
                xT = tl.trans(xm.to(x_ptr.dtype.element_ty))  # exact: powers of 2
                if ABLATE & 16:
                    wg = tl.load(words + g * (BN2 * 8))
                else:
                    wg = tl.load(words + g * (GROUP_SIZE // CODES_PER_WORD))
                if ABLATE & 3:
                    xkeep += xa
                    acc += scale.to(tl.float32)[:, None]
                    if ABLATE & 2:
                        wkeep ^= wg
                    else:
                        akeep ^= _unpack_mma(wg, magic, BN2, W, BITS, CODES_PER_WORD, GROUP_SIZE,
                                             MAGIC_DTYPE, V2).to(tl.int16, bitcast=True)
                else:
                    a = _unpack_mma(wg, magic, BN2, W, BITS, CODES_PER_WORD, GROUP_SIZE, MAGIC_DTYPE,
                                    V2).to(DOT_DTYPE)
                    part = tl.dot(a, xT.to(DOT_DTYPE), input_precision=INPUT_PRECISION)
                    acc += part * scale.to(tl.float32)[:, None]
                scale, xa = scale_next, xa_next
                if PAIR:
                    xb = xb_next
        s_all = tl.load(s_l[:, None] + tl.arange(0, G)[None, :]).to(tl.float32)  # [BN2, G]
        gs = tl.arange(0, G)
        if PREP:
            qx_a = tl.load(qx_ptr + (slot // K) * G + gs)
        else:
            qx_a = _x_constant_parts(x_a, H, MAGIC_BASE, CODE_OFFSET, GROUP_SIZE)
        corr = tl.sum(s_all * qx_a[None, :], axis=1)
        if ABLATE & 3:
            corr += tl.sum(xkeep, axis=0)
            if ABLATE & 2:
                corr += tl.reduce(wkeep, 1, _xor).to(tl.float32)
            else:
                corr += tl.reduce(akeep, 1, _xor).to(tl.float32)
        if PAIR:
            if PREP:
                qx_b = tl.load(qx_ptr + (slot_b // K) * G + gs)
            else:
                qx_b = _x_constant_parts(x_b, H, MAGIC_BASE, CODE_OFFSET, GROUP_SIZE)
            corr_b = tl.sum(s_all * qx_b[None, :], axis=1)
            acc = tl.where(col[None, :] == 0, acc - corr[:, None],
                           tl.where(col[None, :] == 1, acc - corr_b[:, None], 0.0))
        else:
            acc = tl.where(col[None, :] == 0, acc - corr[:, None], 0.0)
        if ABLATE & 4:
            tl.store(qact_ptr + slot * NB + pid_n, tl.sum(tl.sum(acc, axis=1), axis=0))
        else:
            gate, up = tl.split(tl.permute(tl.reshape(acc, (BN2 // 16, 2, 8, BLOCK_M)), (0, 2, 3, 1)))
            gate = tl.reshape(gate, (BLOCK_N, BLOCK_M))
            up = tl.reshape(up, (BLOCK_N, BLOCK_M))
            n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            act = (gate * tl.sigmoid(gate) * up).to(act_ptr.dtype.element_ty)  # rounded as stored
            kd = (n // GROUP_SIZE) * GROUP_SIZE + _mma_pos(n % GROUP_SIZE, ACT_V2)  # where the down kernel reads n
            act_s = (act.to(tl.float32) * _mma_step(kd, ACT_V2)[:, None]).to(act.dtype)  # exact
            rows = tl.where(col == 0, slot, slot_b)  # act' row of each column
            ok = col < tl.where(has_b, 2, 1)  # the columns that hold a slot
            tl.store(act_ptr + rows.to(tl.int64)[None, :] * I + kd[:, None], act_s, mask=ok[None, :])
            qa = tl.sum(MAGIC_BASE * act_s.to(tl.float32) + CODE_OFFSET * act.to(tl.float32), axis=0)
            tl.store(qact_ptr + rows * NB + pid_n, qa, mask=ok)


@triton.jit
def _down_slot_group(words, scale, aT, qa, magic, acc, BLOCK_N: tl.constexpr, W: tl.constexpr,
                     DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, MAGIC_DTYPE: tl.constexpr,
                     MAGIC_BASE: tl.constexpr, CODE_OFFSET: tl.constexpr, BITS: tl.constexpr,
                     CODES_PER_WORD: tl.constexpr, GROUP_SIZE: tl.constexpr, ABLATE: tl.constexpr = 0):
    """One scale group of the down kernel: ``acc += (W_rows @ act'_g - q_g) * scale``; 1-2 warps run
    mma.sync, whose operand k order differs from wgmma's (``_mma_code``)."""
    V2: tl.constexpr = W < WGMMA_MIN_WARPS
    if ABLATE & 32:  # timing only: no wgmma, the operands reduced instead
        a = _unpack_mma(words, magic, BLOCK_N, W, BITS, CODES_PER_WORD, GROUP_SIZE, MAGIC_DTYPE, V2)
        ka = tl.reduce(a.to(tl.int16, bitcast=True), 1, _xor).to(tl.float32)
        return acc + (ka * scale.to(tl.float32))[:, None] + (tl.sum(aT.to(tl.float32), axis=0) - qa)[None, :]
    return _mma_group(words, scale, aT, qa, magic, acc, BLOCK_N, W, True, DOT_DTYPE, INPUT_PRECISION,
                      MAGIC_DTYPE, MAGIC_BASE, CODE_OFFSET, BITS, CODES_PER_WORD, GROUP_SIZE, V2)


@triton.jit
def _down_slot_kernel(act_ptr, qact_ptr, w_ptr, s_ptr, weights_ptr, idx_ptr, out_ptr, E, magic, H: tl.constexpr,
                      I: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, GU_BLOCK_N: tl.constexpr, W: tl.constexpr, PDL: tl.constexpr,
                      DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, MAGIC_DTYPE: tl.constexpr,
                      MAGIC_BASE: tl.constexpr, BITS: tl.constexpr, CODES_PER_WORD: tl.constexpr,
                      CODE_OFFSET: tl.constexpr, GROUP_SIZE: tl.constexpr, ABLATE: tl.constexpr = 0):
    """out[t, n] = sum_k top_k_weights[t, k] * down_e(act'[t K + k])[n] for F = BLOCK_N / K_PAD
    features n of one token.

    PDL (a programmatic dependent of gate_up): routing, scales and the first 4 groups' weights
    (all of them at I = 512) are loaded before waiting for gate_up; then act' and qact of those
    groups at once. ABLATE: timing-only variants (the ABLATE_DN_* bits; 0: none).
    """
    F: tl.constexpr = BLOCK_N // K_PAD
    IW: tl.constexpr = I // CODES_PER_WORD
    G: tl.constexpr = I // GROUP_SIZE
    PARTS: tl.constexpr = GROUP_SIZE // GU_BLOCK_N
    pid = tl.program_id(0)
    t = pid // (H // F)
    n0 = (pid % (H // F)) * F
    # MMA row l: slot k = l % K_PAD of token t, feature n0 + l // K_PAD; its words sit in
    # words-tile row _tile_row(l), i.e. tile row r holds MMA row _tile_row_inv(r).
    l = tl.arange(0, BLOCK_N)
    k_l = l % K_PAD
    e_l = tl.load(idx_ptr + t * K + tl.minimum(k_l, K - 1))
    ok_l = (e_l >= 0) & (e_l < E) & (k_l < K)
    e_l = tl.where(ok_l, e_l, 0).to(tl.int64)  # dropped slots read expert 0 and are masked out below
    li = _tile_row_inv(l, W)
    k_r = li % K_PAD
    e_r = tl.load(idx_ptr + t * K + tl.minimum(k_r, K - 1))
    e_r = tl.where((e_r >= 0) & (e_r < E) & (k_r < K), e_r, 0).to(tl.int64)
    c = tl.arange(0, 8)
    c = (c // 2) * 2 + c % 2  # runs of 2: 8-byte loads of the word pairs the MMA layout wants
    words = w_ptr + (e_r * H + n0 + li // K_PAD)[:, None] * IW + c[None, :]
    s_l = s_ptr + (e_l * H + n0 + l // K_PAD) * G
    rw = tl.load(weights_ptr + t * K + tl.minimum(k_l, K - 1)).to(tl.float32)
    col = tl.arange(0, BLOCK_M)
    slot_c = t * K + tl.minimum(col, K - 1)
    e_c = tl.load(idx_ptr + slot_c)
    live = (e_c >= 0) & (e_c < E) & (col < K)  # act' rows of dropped slots were never written
    # Up to 4 groups' weights and scales in flight before the wait (g % G: harmless reloads if G < 4).
    w0 = tl.load(words)
    w1 = tl.load(words + (1 % G) * 8)
    w2 = tl.load(words + (2 % G) * 8)
    w3 = tl.load(words + (3 % G) * 8)
    s0 = tl.load(s_l)
    s1 = tl.load(s_l + 1 % G)
    s2 = tl.load(s_l + 2 % G)
    s3 = tl.load(s_l + 3 % G)
    if PDL and not (ABLATE & 64):
        tl.extra.cuda.gdc_wait()  # act' and qact are gate_up's output
    a_rows = act_ptr + slot_c.to(tl.int64)[None, :] * I + tl.arange(0, GROUP_SIZE)[:, None]
    q_rows = qact_ptr + slot_c * (I // GU_BLOCK_N)
    a0 = tl.load(a_rows, mask=live[None, :], other=0.0)
    a1 = tl.load(a_rows + (1 % G) * GROUP_SIZE, mask=live[None, :], other=0.0)
    a2 = tl.load(a_rows + (2 % G) * GROUP_SIZE, mask=live[None, :], other=0.0)
    a3 = tl.load(a_rows + (3 % G) * GROUP_SIZE, mask=live[None, :], other=0.0)
    q0 = _sum_parts(q_rows, live, PARTS)
    q1 = _sum_parts(q_rows + (1 % G) * PARTS, live, PARTS)
    q2 = _sum_parts(q_rows + (2 % G) * PARTS, live, PARTS)
    q3 = _sum_parts(q_rows + (3 % G) * PARTS, live, PARTS)
    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    acc = _down_slot_group(w0, s0, a0, q0, magic, acc, BLOCK_N, W, DOT_DTYPE, INPUT_PRECISION, MAGIC_DTYPE,
                           MAGIC_BASE, CODE_OFFSET, BITS, CODES_PER_WORD, GROUP_SIZE, ABLATE)
    if G > 1:
        acc = _down_slot_group(w1, s1, a1, q1, magic, acc, BLOCK_N, W, DOT_DTYPE, INPUT_PRECISION, MAGIC_DTYPE,
                               MAGIC_BASE, CODE_OFFSET, BITS, CODES_PER_WORD, GROUP_SIZE, ABLATE)
    if G > 2:
        acc = _down_slot_group(w2, s2, a2, q2, magic, acc, BLOCK_N, W, DOT_DTYPE, INPUT_PRECISION, MAGIC_DTYPE,
                               MAGIC_BASE, CODE_OFFSET, BITS, CODES_PER_WORD, GROUP_SIZE, ABLATE)
    if G > 3:
        acc = _down_slot_group(w3, s3, a3, q3, magic, acc, BLOCK_N, W, DOT_DTYPE, INPUT_PRECISION, MAGIC_DTYPE,
                               MAGIC_BASE, CODE_OFFSET, BITS, CODES_PER_WORD, GROUP_SIZE, ABLATE)
    for g in range(4, G):
        acc = _down_slot_group(tl.load(words + g * 8), tl.load(s_l + g),
                               tl.load(a_rows + g * GROUP_SIZE, mask=live[None, :], other=0.0),
                               _sum_parts(q_rows + g * PARTS, live, PARTS), magic, acc, BLOCK_N, W, DOT_DTYPE,
                               INPUT_PRECISION, MAGIC_DTYPE, MAGIC_BASE, CODE_OFFSET, BITS, CODES_PER_WORD,
                               GROUP_SIZE, ABLATE)
    # Row (k, f) keeps column k; then the routing weights and the sum over k, in registers.
    y = tl.sum(tl.where(col[None, :] == k_l[:, None], acc, 0.0), axis=1)
    y = tl.where(ok_l, rw * y, 0.0)  # (where, not a product: dropped slots may hold anything)
    o = tl.sum(tl.reshape(y, (F, K_PAD)), axis=1)
    tl.store(out_ptr + t.to(tl.int64) * H + n0 + tl.arange(0, F), o.to(out_ptr.dtype.element_ty))


# --- decode path: GEMV on CUDA cores ---------------------------------------------------------
#
# One slot (gate_up) or one token (down, all K slots summed in k order: no combine launch) per
# program. Each thread owns one packed word column of all ROWS rows (4-byte loads, a warp reads
# 128 contiguous bytes of a row), so the 16 activations of its column are loaded once and reused
# by every row. A code becomes an fp32 with one LOP3: shifted to mantissa bits 15 + 2i (i = 0..3,
# four codes per shift), OR 1.0: ``f = 1 + c * 2^(2i - 8)``; with ``X = x * 2^(8 - 2i)``,
# ``f X = X + c x``, and ``sum(X + CODE_OFFSET x)`` (per word) is subtracted once.


@triton.jit
def _gemv_shift(words, qd: tl.constexpr, i: tl.constexpr, PRECISE: tl.constexpr):
    """``words`` shifted so that code ``4 qd + i`` sits at bits ``15 + 2i`` (PRECISE: bits 21-22)."""
    sh = 21 - 2 * (4 * qd + i) if PRECISE else 15 - 8 * qd  # (not PRECISE: one shift per qd)
    if sh >= 0:
        t = words << sh
    else:
        t = words >> -sh
    return t


@triton.jit
def _gemv_columns(words, x_ptrs, j, one, THREE_D: tl.constexpr, CODE_OFFSET: tl.constexpr,
                  PRECISE: tl.constexpr):
    """Per-word partials ``sum_s (code_s - CODE_OFFSET) * x[16 j + s]`` (fp32, shape of ``words``).

    ``words``: ``[ROWS, NW]`` with ``x_ptrs`` a scalar pointer to the activation row, or
    (THREE_D) ``[ROWS, K, NW]`` with ``x_ptrs`` ``[K]`` pointers (one activation row per k). ``one`` is
    the bit pattern of 1.0f as a runtime value, so that AND + OR fuse into one LOP3.
    PRECISE (fp32 activations): every code at bits 21-22 (one shift per code; 2 bits of the fp32
    sum cancel instead of up to 8).
    """
    acc = tl.zeros(words.shape, tl.float32)
    if THREE_D:
        csum = tl.zeros((words.shape[1], words.shape[2]), tl.float32)
    else:
        csum = tl.zeros(j.shape, tl.float32)
    for qd in tl.static_range(4):  # codes 4qd .. 4qd + 3
        t = _gemv_shift(words, qd, 0, PRECISE)
        for i in tl.static_range(4):
            if PRECISE:
                t = _gemv_shift(words, qd, i, PRECISE)
            bit = 21 if PRECISE else 15 + 2 * i
            step = 4.0 if PRECISE else 256.0 / (4**i)  # 2^(23 - bit): f = 1 + c 2^(bit - 23)
            f = ((t & (3 << bit)) | one).to(tl.float32, bitcast=True)
            if THREE_D:
                x = tl.load(x_ptrs[:, None] + 16 * j[None, :] + 4 * qd + i).to(tl.float32)  # [K, NW]
                acc += f * (x * step)[None, :, :]
            else:
                x = tl.load(x_ptrs + 16 * j + 4 * qd + i).to(tl.float32)
                acc += f * (x * step)[None, :]
            csum += x * step + CODE_OFFSET * x
    if THREE_D:
        acc -= csum[None, :, :]
    else:
        acc -= csum[None, :]
    return acc


@triton.jit
def _gemv_rows(part, s_row_ptrs, ROWS: tl.constexpr, NW: tl.constexpr, WORDS_PER_GROUP: tl.constexpr):
    """Per-word partials ``[ROWS, NW]`` -> ``[ROWS]``: sum each scale group, scale it, sum groups."""
    g = tl.sum(tl.reshape(part, (ROWS, NW // WORDS_PER_GROUP, WORDS_PER_GROUP)), axis=2)
    s = tl.load(s_row_ptrs[:, None] + tl.arange(0, NW // WORDS_PER_GROUP)[None, :]).to(tl.float32)
    return tl.sum(g * s, axis=1)


@triton.jit
def _gate_up_gemv_kernel(x_ptr, w_ptr, s_ptr, act_ptr, idx_ptr, E, one, H: tl.constexpr, I: tl.constexpr,
                         K: tl.constexpr, ROWS: tl.constexpr, PRECISE: tl.constexpr, PDL: tl.constexpr,
                         CODES_PER_WORD: tl.constexpr, CODE_OFFSET: tl.constexpr, GROUP_SIZE: tl.constexpr):
    """act[slot, n] = silu(gate) * up (fp32) for ROWS features n of one slot.

    PDL: let the down kernel (launched as a programmatic dependent) start as soon as every
    program of this one has started, so that its weight loads overlap this kernel's work.
    """
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    slot = pid // (I // ROWS)
    n0 = (pid % (I // ROWS)) * ROWS
    expert = tl.load(idx_ptr + slot)
    if (expert >= 0) & (expert < E):
        HW: tl.constexpr = H // CODES_PER_WORD
        G: tl.constexpr = H // GROUP_SIZE
        # + 0 of unknown alignment: 4-byte loads, each thread one column of all ROWS rows
        j = tl.arange(0, HW) + (expert >> 30).to(tl.int32)
        # Gate rows n0.. and up rows I + n0.. as one tile: the activations are loaded once for both.
        r2 = tl.arange(0, 2 * ROWS)
        rows = tl.where(r2 < ROWS, n0 + r2, I + n0 + r2 - ROWS)
        w_e = w_ptr + expert.to(tl.int64) * (2 * I * HW)
        s_e = s_ptr + expert.to(tl.int64) * (2 * I * G)
        words = tl.load(w_e + rows[:, None] * HW + j[None, :])
        part = _gemv_columns(words, x_ptr + (slot // K).to(tl.int64) * H, j, one, False, CODE_OFFSET, PRECISE)
        h = _gemv_rows(part, s_e + rows * G, 2 * ROWS, HW, GROUP_SIZE // CODES_PER_WORD)
        gate, up = tl.split(tl.permute(tl.reshape(h, (2, ROWS)), (1, 0)))
        r = n0 + tl.arange(0, ROWS)
        tl.store(act_ptr + slot.to(tl.int64) * I + r, gate * tl.sigmoid(gate) * up)


@triton.jit
def _down_gemv_kernel(act_ptr, w_ptr, s_ptr, weights_ptr, idx_ptr, out_ptr, E, one, H: tl.constexpr,
                      I: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr, ROWS: tl.constexpr,
                      PRECISE: tl.constexpr, PDL: tl.constexpr, CODES_PER_WORD: tl.constexpr,
                      CODE_OFFSET: tl.constexpr, GROUP_SIZE: tl.constexpr):
    """out[t, n] = sum_k top_k_weights[t, k] * down_e(act[t K + k])[n] for ROWS features n.

    All K experts' tiles are one ``[ROWS, K_PAD, I / 16]`` load, so they are in flight together.
    PDL (launched as a programmatic dependent of gate_up): routing, weights and scales are
    loaded before waiting for gate_up to finish; only act is read after the wait.
    """
    pid = tl.program_id(0)
    t = pid // (H // ROWS)
    IW: tl.constexpr = I // CODES_PER_WORD
    G: tl.constexpr = I // GROUP_SIZE
    r = (pid % (H // ROWS)) * ROWS + tl.arange(0, ROWS)
    kk = tl.arange(0, K_PAD)
    slot = t * K + tl.minimum(kk, K - 1)
    expert = tl.load(idx_ptr + slot)
    ok = (expert >= 0) & (expert < E) & (kk < K)
    e = tl.where(ok, expert, 0).to(tl.int64)  # dropped slots read expert 0 and are masked out below
    j = tl.arange(0, IW) + (tl.max(e, axis=0) >> 30).to(tl.int32)  # + 0 of unknown alignment, as in gate_up
    # [ROWS, K_PAD, IW]: rows lead so that warps split rows and each thread keeps all K experts
    words = tl.load(w_ptr + r[:, None, None] * IW + e[None, :, None] * (H * IW) + j[None, None, :])
    s = tl.load(s_ptr + r[:, None, None] * G + e[None, :, None] * (H * G) + tl.arange(0, G)[None, None, :])
    rw = tl.load(weights_ptr + slot).to(tl.float32)
    if PDL:
        tl.extra.cuda.gdc_wait()  # act is gate_up's output
    part = _gemv_columns(words, act_ptr + slot.to(tl.int64) * I, j, one, True, CODE_OFFSET, PRECISE)
    g = tl.sum(tl.reshape(part, (ROWS, K_PAD, G, GROUP_SIZE // CODES_PER_WORD)), axis=3)
    y = tl.sum(g * s.to(tl.float32), axis=2)  # [ROWS, K_PAD]
    # (where, not a product: act rows of dropped slots were never written and may hold NaN)
    y = tl.where(ok[None, :], rw[None, :] * y, 0.0)
    tl.store(out_ptr + t.to(tl.int64) * H + r, tl.sum(y, axis=1).to(out_ptr.dtype.element_ty))


# --- launchers -------------------------------------------------------------------------------


def _contig(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def _launch_opts(cfg: MoEConfig) -> dict:
    # The interpreter ignores warps/stages; real compiles use the bucket's values.
    return {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def gate_up_triton(x, top_k_index, gate_up_proj, gate_up_proj_scale, cfg: MoEConfig, route, *, act=None,
                   preact=None, act_paired: bool = False) -> None:
    """Launch the natural-order gate_up kernel over ``route = moe_align_triton(...)``.

    Writes ``act`` (``[rows, I]``, silu(gate) * up) and/or ``preact`` (fp32 ``[rows, 2I]``:
    [gate, up]) where rows are ``moe_align`` positions.
    """
    T, H = x.shape
    E, two_i = gate_up_proj.shape[:2]
    I, K = two_i // 2, top_k_index.shape[1]
    block_n = min(cfg.block_n, I)
    num_blocks = route[1].numel()
    dummy = act if act is not None else preact
    _gate_up_kernel[(num_blocks * (I // block_n),)](
        x, gate_up_proj, gate_up_proj_scale, dummy if act is None else act, dummy if preact is None else preact,
        *route[:2], T * K, E, num_blocks, H=H, I=I, K=K, BLOCK_M=cfg.block_m, BLOCK_N=block_n,
        GROUP_M=cfg.group_m, WRITE_ACT=act is not None, WRITE_PREACT=preact is not None, ACT_PAIRED=act_paired,
        PAIRED=cfg.paired, SCALE_AFTER_DOT=cfg.scale_after_dot, **dot_constexprs(x.dtype), **FORMAT_CONSTEXPRS,
        GROUP_SIZE=format.GROUP_SIZE, **_launch_opts(cfg))


def down_triton(act, top_k_index, top_k_weights, down_proj, down_proj_scale, y, cfg: MoEConfig, route) -> None:
    """Launch the natural-order down kernel: ``y[slot] = top_k_weights[slot] * down_e(act[row])``
    (``[TK, H]``) over ``route = moe_align_triton(...)``."""
    E, H, packed_i = down_proj.shape
    I = packed_i * format.CODES_PER_WORD
    T, K = top_k_index.shape
    block_n = min(cfg.block_n_down, H)
    num_blocks = route[1].numel()
    _down_kernel[(num_blocks * (H // block_n),)](
        act, down_proj, down_proj_scale, top_k_weights.reshape(-1), y, *route[:2], T * K, E, num_blocks, H=H,
        I=I, K=K, BLOCK_M=cfg.block_m, BLOCK_N=block_n, GROUP_M=cfg.group_m, PAIRED=cfg.paired,
        SCALE_AFTER_DOT=cfg.scale_after_dot, **dot_constexprs(act.dtype), **FORMAT_CONSTEXPRS,
        GROUP_SIZE=format.GROUP_SIZE, **_launch_opts(cfg))


def _mma_constexprs(dtype: torch.dtype) -> dict:
    """Magic numbers of the permuted-unpack kernels: codes become ``base + c * 4^j`` (fp16 / bf16)."""
    d = dot_constexprs(dtype)
    base = 1024.0 if dtype == torch.float16 else 128.0
    return {"magic": d["magic"], "MAGIC_DTYPE": d["MAGIC_DTYPE"], "MAGIC_BASE": base,
            "DOT_DTYPE": d["DOT_DTYPE"], "INPUT_PRECISION": d["INPUT_PRECISION"]}


def _check_mma_rows(tiles: tuple[tuple[str, int, int], ...], warp_choices: tuple[int, ...], choices: str) -> None:
    """Each ``(name, rows, warps)`` of a kernel's MMA tile: rows a multiple of 16 per warp, warps one
    of ``warp_choices`` (described by ``choices``)."""
    for name, rows, warps in tiles:
        if rows % (16 * warps) or warps not in warp_choices:
            raise ValueError(f"{name}={rows} must be a multiple of 16 * num_warps ({warps}: {choices})")


def _check_grouped_config(cfg: ForwardConfig, H: int, I: int) -> None:
    _check_mma_rows((("block_n", cfg.block_n, cfg.num_warps), ("block_n_down", cfg.block_n_down, cfg.num_warps_down)),
                    (1, 2, 4, 8), "1 or 2 run mma.sync, 4 or 8 wgmma")
    if format.GROUP_SIZE % cfg.block_n or I % cfg.block_n or H % cfg.block_n_down:
        raise ValueError(f"block_n={cfg.block_n} must divide {format.GROUP_SIZE} and I={I}, "
                         f"block_n_down={cfg.block_n_down} must divide H={H}")


def _prep_x(x: torch.Tensor, magic_base: float, pdl: bool,
            v2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``_prep_x_kernel``'s launch: x permuted into the MMA's k order (mma.sync's with ``v2``) and
    scaled by 4^-j, and its constant parts ``[T, H / 128]`` fp32; ``pdl``: the next launch may start
    early (it waits for these before reading them)."""
    T, H = x.shape
    G = H // format.GROUP_SIZE
    xp = torch.empty_like(x)
    qx = torch.empty(T, G, dtype=torch.float32, device=x.device)
    block_t = 4 if interpreting() else 8
    _prep_x_kernel[(triton.cdiv(T, block_t), G)](x, xp, qx, T, H=H, BLOCK_T=block_t, MAGIC_BASE=magic_base,
                                                 CODE_OFFSET=format.CODE_OFFSET, GROUP_SIZE=format.GROUP_SIZE,
                                                 PDL=pdl, V2=v2)
    return xp, qx


def _grouped_forward(x, idx, weights, gate_up_proj, gate_up_proj_scale, down_proj, down_proj_scale,
                     cfg: ForwardConfig, out: torch.Tensor) -> torch.Tensor:
    """align -> prep (permuted x) -> gate_up -> down -> combine; 6 launches (7 above 8192 slots)."""
    T, H = x.shape
    E, two_i = gate_up_proj.shape[:2]
    I, K = two_i // 2, idx.shape[1]
    _check_grouped_config(cfg, H, I)
    bm = cfg.block_m
    sorted_ids, block_expert, _ = moe_align_triton(idx, E, bm)
    rows = moe_align_sizes(T * K, E, bm)[1]
    num_blocks = block_expert.numel()
    mc = _mma_constexprs(x.dtype)
    fmt = {"BITS": format.BITS, "CODES_PER_WORD": format.CODES_PER_WORD, "CODE_OFFSET": format.CODE_OFFSET,
           "GROUP_SIZE": format.GROUP_SIZE}
    pdl = pdl_supported(x.device)  # each launch a programmatic dependent of the one before
    launch = {"launch_pdl": True} if pdl else {}
    xp, qx = _prep_x(x, mc["MAGIC_BASE"], pdl, v2=runs_mma_sync(cfg.num_warps))
    act = x.new_empty(rows, I)
    qact = torch.empty(rows, I // cfg.block_n, dtype=torch.float32, device=x.device)
    _gate_up_mma_kernel[(num_blocks * (I // cfg.block_n),)](
        xp, qx, gate_up_proj, gate_up_proj_scale, act, qact, sorted_ids, block_expert, T * K, E, num_blocks,
        H=H, I=I, K=K, BLOCK_M=bm, BLOCK_N=cfg.block_n, GROUP_M=cfg.group_m, W=cfg.num_warps,
        SCALE_AFTER_DOT=cfg.scale_after_dot, **mc, **fmt, PDL=pdl, ACT_V2=runs_mma_sync(cfg.num_warps_down),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch)
    y = x.new_empty(T * K, H)  # weighted expert outputs, one row per slot
    _down_mma_kernel[(num_blocks * (H // cfg.block_n_down),)](
        act, qact, down_proj, down_proj_scale, weights.reshape(-1), y, sorted_ids, block_expert, T * K, E,
        num_blocks, H=H, I=I, K=K, BLOCK_M=bm, BLOCK_N=cfg.block_n_down, GU_BLOCK_N=cfg.block_n,
        GROUP_M=cfg.group_m, W=cfg.num_warps_down, SCALE_AFTER_DOT=cfg.scale_after_dot, **mc, **fmt, PDL=pdl,
        num_warps=cfg.num_warps_down, num_stages=cfg.num_stages, **launch)
    return combine_slots(y, idx, E, out, pdl=pdl)


_ONE_F32 = 0x3F800000  # bit pattern of 1.0f


def _decode_forward(x, idx, weights, gate_up_proj, gate_up_proj_scale, down_proj, down_proj_scale,
                    cfg: ForwardConfig, out: torch.Tensor) -> torch.Tensor:
    """GEMV gate_up (act in fp32) -> GEMV down with the top-k sum; 2 launches."""
    T, H = x.shape
    E, two_i = gate_up_proj.shape[:2]
    I, K = two_i // 2, idx.shape[1]
    rows, rows_down = min(cfg.block_n, I), min(cfg.block_n_down, H)
    if I % rows or H % rows_down:
        raise ValueError(f"decode block_n={rows} must divide I={I} and block_n_down={rows_down} H={H}")
    pdl = cfg.pdl and pdl_supported(x.device)
    fmt = {"CODES_PER_WORD": format.CODES_PER_WORD, "CODE_OFFSET": format.CODE_OFFSET,
           "GROUP_SIZE": format.GROUP_SIZE, "PRECISE": x.dtype == torch.float32, "PDL": pdl}
    act = torch.empty(T * K, I, dtype=torch.float32, device=x.device)
    _gate_up_gemv_kernel[(T * K * (I // rows),)](x, gate_up_proj, gate_up_proj_scale, act, idx, E, _ONE_F32,
                                                 H=H, I=I, K=K, ROWS=rows, **fmt, num_warps=cfg.num_warps,
                                                 num_stages=1)
    _down_gemv_kernel[(T * (H // rows_down),)](act, down_proj, down_proj_scale, weights, idx, out, E,
                                               _ONE_F32, H=H, I=I, K=K, K_PAD=triton.next_power_of_2(K),
                                               ROWS=rows_down, **fmt, num_warps=cfg.num_warps_down,
                                               num_stages=1, **({"launch_pdl": True} if pdl else {}))
    return out


def _check_slot_config(cfg: ForwardConfig, H: int, I: int, K: int) -> None:
    k_pad = triton.next_power_of_2(K)
    _check_mma_rows((("2 * block_n", 2 * cfg.block_n, cfg.num_warps),
                     ("block_n_down", cfg.block_n_down, cfg.num_warps_down)),
                    (1, 2, 4, 8), "1 or 2 run mma.sync, 4 or 8 wgmma")
    if format.GROUP_SIZE % cfg.block_n or I % cfg.block_n:
        raise ValueError(f"block_n={cfg.block_n} must divide {format.GROUP_SIZE} and I={I}")
    if cfg.prep and cfg.ablate:
        raise ValueError("decode mma: the ablations run without prep")
    if cfg.block_m < k_pad or cfg.block_m & (cfg.block_m - 1) or cfg.block_n_down % k_pad \
            or H % (cfg.block_n_down // k_pad):
        raise ValueError(f"decode mma: block_m={cfg.block_m} must be a power of 2 >= next_pow2(K)={k_pad} "
                         f"(the N side), and block_n_down={cfg.block_n_down} / {k_pad} must divide H={H}")


def _slot_forward(x, idx, weights, gate_up_proj, gate_up_proj_scale, down_proj, down_proj_scale,
                  cfg: ForwardConfig, out: torch.Tensor) -> torch.Tensor:
    """Decode on tensor cores: [prep ->] gate_up (one slot per program) -> down (one token per
    program, the top-k sum fused); 2 launches (3 with ``cfg.prep``), act' [TK, I] and its constant
    parts in between."""
    T, H = x.shape
    E, two_i = gate_up_proj.shape[:2]
    I, K = two_i // 2, idx.shape[1]
    _check_slot_config(cfg, H, I, K)
    k_pad = triton.next_power_of_2(K)
    pdl = cfg.pdl and pdl_supported(x.device)
    mc = _mma_constexprs(x.dtype)
    fmt = {"BITS": format.BITS, "CODES_PER_WORD": format.CODES_PER_WORD, "CODE_OFFSET": format.CODE_OFFSET,
           "GROUP_SIZE": format.GROUP_SIZE, "PDL": pdl}
    act = x.new_empty(T * K, I)  # rows of dropped slots are never written nor read
    qact = torch.empty(T * K, I // cfg.block_n, dtype=torch.float32, device=x.device)
    xp, qx, gate_up_launch = x, qact, {}
    if cfg.prep:
        xp, qx = _prep_x(x, mc["MAGIC_BASE"], pdl, v2=runs_mma_sync(cfg.num_warps))
        gate_up_launch = {"launch_pdl": True} if pdl else {}
    _gate_up_slot_kernel[(T * K * (I // cfg.block_n),)](
        xp, qx, gate_up_proj, gate_up_proj_scale, act, qact, idx, T * K, E, H=H, I=I, K=K, BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, W=cfg.num_warps, PAIR=cfg.pair, PREP=cfg.prep, **gate_up_launch,
        SLOTS_PAD=max(256, triton.next_power_of_2(T * K)) if cfg.pair else 1,  # one compile up to T * K = 256
        **mc, **fmt, ACT_V2=runs_mma_sync(cfg.num_warps_down), ABLATE=cfg.ablate & ABLATE_GU,
        ABLATE_STAGES=cfg.num_stages if cfg.ablate & 3 else None, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    _down_slot_kernel[(T * (H // (cfg.block_n_down // k_pad)),)](
        act, qact, down_proj, down_proj_scale, weights, idx, out, E, H=H, I=I, K=K, K_PAD=k_pad,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n_down, GU_BLOCK_N=cfg.block_n, W=cfg.num_warps_down, **mc,
        **fmt, ABLATE=cfg.ablate & ABLATE_DN, num_warps=cfg.num_warps_down, num_stages=1,
        **({"launch_pdl": True} if pdl else {}))
    return out


def fused_moe_triton(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    gate_up_proj_scale: torch.Tensor,
    down_proj: torch.Tensor,
    down_proj_scale: torch.Tensor,
    config: ForwardConfig | MoEConfig | None = None,
) -> torch.Tensor:
    """The Triton fused MoE (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).

    ``config`` overrides the bucket's choice (tests and tuning); a :class:`MoEConfig` runs the
    natural-order grouped kernels (the fp32 path). Same arguments and result as
    :func:`fused_moe`; inputs are not validated here. Launches: decode 2 (3 with ``prep``), grouped 6;
    none for T = 0.
    """
    T, H = hidden_states.shape
    out = hidden_states.new_empty(T, H)
    if T == 0:
        return out
    x, idx, weights = _contig(hidden_states), _contig(top_k_index), _contig(top_k_weights)
    lines_ok = moe_lines.supported(x, H, gate_up_proj.shape[1] // 2)
    cfg = config or forward_config(T * idx.shape[1], lines_ok)
    if isinstance(cfg, ForwardConfig) and cfg.decode and cfg.lines:
        if lines_ok:
            return moe_lines.lines_forward(x, idx, weights, gate_up_proj, gate_up_proj_scale, down_proj,
                                           down_proj_scale, out, cfg.block_n, cfg.num_warps, cfg.block_n_down,
                                           cfg.group_m, cfg.num_warps_down, cfg.pdl)
        cfg = forward_config(T * idx.shape[1], lines=False)  # a given lines config these inputs cannot take
    if isinstance(cfg, ForwardConfig) and cfg.decode and cfg.mma:
        if (x.dtype in (torch.bfloat16, torch.float16) or interpreting()) \
                and triton.next_power_of_2(idx.shape[1]) <= cfg.block_m:
            return _slot_forward(x, idx, weights, gate_up_proj, gate_up_proj_scale, down_proj, down_proj_scale,
                                 cfg, out)
        # fp32 activations (the GEMV computes in fp32), or a top-k wider than the MMA's N side
        cfg = dataclasses.replace(GEMV_FALLBACK, pdl=cfg.pdl)
    if isinstance(cfg, ForwardConfig) and cfg.decode:
        return _decode_forward(x, idx, weights, gate_up_proj, gate_up_proj_scale, down_proj, down_proj_scale,
                               cfg, out)
    if x.dtype == torch.float32 and not interpreting() and isinstance(cfg, ForwardConfig):
        cfg = FP32_CONFIG  # fp32 operands need the natural-order 3xTF32 kernels
    if isinstance(cfg, ForwardConfig):
        return _grouped_forward(x, idx, weights, gate_up_proj, gate_up_proj_scale, down_proj, down_proj_scale,
                                cfg, out)
    E, two_i = gate_up_proj.shape[:2]
    I, K = two_i // 2, idx.shape[1]
    route, rows = moe_align_triton(idx, E, cfg.block_m), moe_align_sizes(T * K, E, cfg.block_m)[1]
    act = x.new_empty(rows, I)
    y = x.new_empty(T * K, H)
    gate_up_triton(x, idx, gate_up_proj, gate_up_proj_scale, cfg, route, act=act, act_paired=cfg.paired)
    down_triton(act, idx, weights, down_proj, down_proj_scale, y, cfg, route)
    return combine_slots(y, idx, E, out)


# --- the custom op ---------------------------------------------------------------------------


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
        hidden_states, top_k_index, top_k_weights, gate_up_proj, gate_up_proj_scale, down_proj,
        down_proj_scale
    )


@fused_moe_op.register_kernel("cuda")
def _(hidden_states, top_k_index, top_k_weights, gate_up_proj, gate_up_proj_scale, down_proj,
      down_proj_scale):
    if hidden_states.dtype == torch.float64:  # gradcheck and friends: no fp64 MMA path
        return fused_moe_reference(hidden_states, top_k_index, top_k_weights, gate_up_proj,
                                   gate_up_proj_scale,
                                   down_proj, down_proj_scale)
    return fused_moe_triton(hidden_states, top_k_index, top_k_weights, gate_up_proj, gate_up_proj_scale,
                            down_proj,
                            down_proj_scale)


@fused_moe_op.register_fake
def _(hidden_states, top_k_index, top_k_weights, gate_up_proj, gate_up_proj_scale, down_proj,
      down_proj_scale):
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

    Differentiable with respect to ``hidden_states``, ``top_k_weights`` and, when they require
    grad, the two scale tensors (the packed codes are frozen).

    Args:
        hidden_states: ``[T, H]`` bf16 / fp16 / fp32 (fp64 runs the reference, for gradcheck).
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
        hidden_states, top_k_index, top_k_weights, gate_up_proj, gate_up_proj_scale, down_proj,
        down_proj_scale
    )
