"""gsq::fused_moe: all routed experts of one MoE layer with 2-bit packed weights.

Dimension legend: T tokens, H hidden, I expert intermediate, E experts, K top-k, TK = T * K
slots (slot ``s = t * K + k``).

``out[t] = sum_k top_k_weights[t, k] * down_e(silu(gate_e x_t) * up_e x_t)`` with
``e = top_k_index[t, k]``; an index outside ``[0, E)`` contributes nothing (transformers uses
``E`` as a padding slot).

CUDA pipeline (Triton), no host synchronisation anywhere:

- grouped (many slots): moe_align (slots grouped by expert, padded to block_m) -> gate_up
  (one expert's block of slots x a tile of gate and up rows; SiLU * up epilogue) -> act
  -> down (routing weight in the epilogue) -> y [TK, H] -> combine (sum over k in k order).
- decode (T * K <= DECODE_MAX_SLOTS): no alignment; one slot per program. gate_up splits its
  reduction over H across programs (fp32 parts; the down kernel adds them and applies SiLU),
  so a single token still launches a few hundred programs. Then down -> y -> combine.

Every kernel dequantizes in registers: a code is OR-ed into the mantissa of a 16-bit float
(two codes per 32-bit op), and the MMA runs on tensor cores with weight rows as its M side.
Results are deterministic (no atomics in the forward). Backward: ``moe_backward.py``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .. import format
from ._triton import FORMAT_CONSTEXPRS
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
class MoEConfig:
    """Tile sizes of one token-count bucket (see ``FORWARD_CONFIGS``).

    Kernels compute ``out^T = W x^T`` ("swap AB"): weight rows are the MMA's M side, so a
    handful of tokens still fills it, and a 64-row weight tile runs on Hopper's wgmma.
    """

    block_m: int  # slots per program (the MMA's N side); 16 on the decode path (1 used)
    block_n: int  # gate_up: gate rows (and as many up rows) per program
    block_n_down: int  # down: output features per program
    group_m: int  # grouped path: row blocks that share a weight tile run together (L2 reuse)
    num_warps: int
    num_stages: int
    paired: bool  # unpack 2 codes per 32-bit op (x read in "paired" K order, see _unpack)
    scale_after_dot: bool  # multiply a group's partial dot by its scale (cheap at small block_m)
    split_k: int = 1  # decode: programs sharing one gate_up row block's reduction over H


# Slots (T * K) up to which the decode path runs: sorting 64 slots saves almost no weight
# reads (with 256 experts nearly every slot has its own expert) and costs launches.
DECODE_MAX_SLOTS = 64
# (largest T * K of the bucket, config), first match wins. Guesses from the instruction counts
# of the sm_90 SASS; benchmarks/tune_moe.py sweeps them on a GPU.
FORWARD_CONFIGS: tuple[tuple[int | None, MoEConfig], ...] = (
    (8, MoEConfig(16, 64, 64, 1, 4, 4, True, True, split_k=4)),  # T = 1: 256 gate_up programs
    (DECODE_MAX_SLOTS, MoEConfig(16, 64, 64, 1, 4, 4, True, True, split_k=2)),
    (1024, MoEConfig(16, 64, 64, 8, 4, 4, True, True)),
    (4096, MoEConfig(32, 64, 64, 8, 4, 4, True, True)),
    (16384, MoEConfig(64, 64, 64, 8, 4, 3, False, False)),
    (None, MoEConfig(128, 128, 128, 8, 8, 3, False, False)),
)


# fp32 activations (3xTF32 MMAs, twice the operand bytes): small tiles that fit, grouped path
# only (the decode kernels spill in fp32). Not a performance target.
FP32_CONFIG = MoEConfig(16, 64, 64, 8, 4, 2, False, False)


def forward_config(num_slots: int) -> MoEConfig:
    """The ``FORWARD_CONFIGS`` entry for ``num_slots = T * K``."""
    for bound, cfg in FORWARD_CONFIGS:
        if bound is None or num_slots <= bound:
            return cfg
    raise AssertionError("FORWARD_CONFIGS must end with a catch-all (None) entry")


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


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
        magic = {"magic": 0x43004300, "MAGIC_DTYPE": tl.bfloat16, "MAGIC_BIAS": 128.0 + format.CODE_OFFSET}
        dot = tl.bfloat16
    precision = "tf32"  # ignored for 16-bit operands
    if dtype == torch.float32 or _interpret():
        # fp32 activations keep fp32 accuracy: 3xTF32 on tensor cores ("ieee" FMA dots spill badly).
        dot, precision = tl.float32, "ieee" if _interpret() else "tf32x3"
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
def _load_rows_t(ptr, rows, stride, kk, valid, SORTED: tl.constexpr):
    """``ptr[rows[m] * stride + kk[k]]`` as ``[BK, BLOCK_M]`` (0 where not valid).

    Decode programs hold one real row (lane 0): one vector load, placed in column 0, instead
    of a [BK, BLOCK_M] masked gather whose masked-off lanes still cost instructions.
    """
    if SORTED:
        return tl.load(ptr + rows.to(tl.int64)[None, :] * stride + kk[:, None], mask=valid[None, :],
                       other=0.0)
    row0 = tl.max(rows, axis=0).to(tl.int64)  # all lanes hold the same row
    v = tl.load(ptr + row0 * stride + kk)
    return tl.where(valid[None, :], v[:, None], tl.zeros((1, valid.shape[0]), v.dtype))


@triton.jit
def _program_rows(route_ptr, block_expert_ptr, num_slots, E, num_n, num_blocks, BLOCK_M: tl.constexpr,
                  GROUP_M: tl.constexpr, SORTED: tl.constexpr, K: tl.constexpr, SPLIT_K: tl.constexpr = 1):
    """This program's (expert, slots [BLOCK_M], valid [BLOCK_M], row positions [BLOCK_M], pid_n,
    split, live).

    SORTED: a block of ``moe_align``'s sorted slots (rows = positions in that order), grouped so
    that GROUP_M row blocks sweep the same weight tiles together. Else (decode): one slot per
    program, read straight from ``top_k_index`` (``route_ptr``), in its lane 0, and the
    reduction may be split over SPLIT_K programs (``split`` is this program's part).
    """
    pid = tl.program_id(0)
    m = tl.arange(0, BLOCK_M)
    split = 0
    if SORTED:
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
    else:
        pid_m = pid // (num_n * SPLIT_K)
        pid_n = (pid // SPLIT_K) % num_n
        split = pid % SPLIT_K
        expert = tl.load(route_ptr + pid_m).to(tl.int32)
        slot = pid_m + m * 0
        pos = slot
        valid = m == 0
    live = (expert >= 0) & (expert < E)
    # (tl.where, not `valid & live`: the interpreter mishandles tensor & scalar on int1.)
    return tl.where(live, expert, 0).to(tl.int64), slot, tl.where(live, valid, False), pos, pid_n, split, live


# --- forward kernels -------------------------------------------------------------------------


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, s_ptr, act_ptr, preact_ptr, route_ptr, block_expert_ptr, num_slots, E,
                    num_blocks, magic, H: tl.constexpr, I: tl.constexpr, K: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
                    SORTED: tl.constexpr, WRITE_ACT: tl.constexpr, WRITE_PREACT: tl.constexpr,
                    ACT_PAIRED: tl.constexpr, SPLIT_K: tl.constexpr, PAIRED: tl.constexpr,
                    SCALE_AFTER_DOT: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                    MAGIC_DTYPE: tl.constexpr, MAGIC_BIAS: tl.constexpr, BITS: tl.constexpr,
                    CODES_PER_WORD: tl.constexpr, CODE_OFFSET: tl.constexpr, GROUP_SIZE: tl.constexpr):
    """act[pos, n] = silu(gate) * up (and/or preact[pos] = [gate, up]) for BLOCK_N features n.

    With SPLIT_K > 1 (decode) each program sums H / SPLIT_K inputs and writes its fp32 part of
    [gate, up] to preact row ``pos * SPLIT_K + split``; the down kernel adds the parts up.
    """
    expert, slot, valid, pos, pid_n, split, live = _program_rows(route_ptr, block_expert_ptr, num_slots, E,
                                                                 I // BLOCK_N, num_blocks, BLOCK_M, GROUP_M,
                                                                 SORTED, K, SPLIT_K)
    if live:
        token = (slot // K).to(tl.int64)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        w_e = w_ptr + expert * (2 * I * (H // CODES_PER_WORD))
        s_e = s_ptr + expert * (2 * I * (H // GROUP_SIZE))
        kk = _paired_offsets(GROUP_SIZE, PAIRED, CODES_PER_WORD)
        gate = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
        up = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
        for k0 in range(split * (H // SPLIT_K), (split + 1) * (H // SPLIT_K), GROUP_SIZE):
            xT = _load_rows_t(x_ptr, token, H, k0 + kk, valid, SORTED).to(DOT_DTYPE)  # [BK, BLOCK_M]
            gate = _weight_times_x(w_e, s_e, n, k0, xT, magic, H, BLOCK_N, GROUP_SIZE, gate, PAIRED,
                                   SCALE_AFTER_DOT, DOT_DTYPE, INPUT_PRECISION, MAGIC_DTYPE, MAGIC_BIAS,
                                   BITS, CODES_PER_WORD, GROUP_SIZE)
            up = _weight_times_x(w_e, s_e, n + I, k0, xT, magic, H, BLOCK_N, GROUP_SIZE, up, PAIRED,
                                 SCALE_AFTER_DOT, DOT_DTYPE, INPUT_PRECISION, MAGIC_DTYPE, MAGIC_BIAS, BITS,
                                 CODES_PER_WORD, GROUP_SIZE)
        rows = pos.to(tl.int64)[None, :]
        mask = valid[None, :]
        if WRITE_PREACT:
            prow = rows * SPLIT_K + split
            tl.store(preact_ptr + prow * (2 * I) + n[:, None], gate, mask=mask)
            tl.store(preact_ptr + prow * (2 * I) + I + n[:, None], up, mask=mask)
        if WRITE_ACT:
            act = gate * tl.sigmoid(gate) * up
            if ACT_PAIRED:  # store so that a contiguous read gives the down kernel's paired order
                half: tl.constexpr = CODES_PER_WORD // 2
                col = (n // CODES_PER_WORD) * CODES_PER_WORD + (n % half) * 2 + (n % CODES_PER_WORD) // half
            else:
                col = n
            tl.store(act_ptr + rows * I + col[:, None], act.to(act_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _down_kernel(act_ptr, preact_ptr, w_ptr, s_ptr, weights_ptr, y_ptr, route_ptr, block_expert_ptr,
                 num_slots, E, num_blocks, magic, H: tl.constexpr, I: tl.constexpr, K: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, SORTED: tl.constexpr,
                 ACT_SPLITS: tl.constexpr, PAIRED: tl.constexpr, SCALE_AFTER_DOT: tl.constexpr,
                 DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, MAGIC_DTYPE: tl.constexpr,
                 MAGIC_BIAS: tl.constexpr, BITS: tl.constexpr, CODES_PER_WORD: tl.constexpr,
                 CODE_OFFSET: tl.constexpr, GROUP_SIZE: tl.constexpr):
    """y[slot, n] = top_k_weights[slot] * down_e(act[pos])[n] for BLOCK_N features n.

    ACT_SPLITS > 0: act is not stored; it is silu(gate) * up of the summed split-K parts in
    ``preact`` (decode), computed here in the order this kernel reads.
    """
    expert, slot, valid, pos, pid_n, _, live = _program_rows(route_ptr, block_expert_ptr, num_slots, E,
                                                             H // BLOCK_N, num_blocks, BLOCK_M, GROUP_M,
                                                             SORTED, K)
    if live:
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        w_e = w_ptr + expert * (H * (I // CODES_PER_WORD))
        s_e = s_ptr + expert * (H * (I // GROUP_SIZE))
        rows = pos.to(tl.int64)
        acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
        for k0 in range(0, I, GROUP_SIZE):
            if ACT_SPLITS > 0:  # decode: one row, so sum and activate a vector, then broadcast
                tl.static_assert(not SORTED, "split-K parts exist on the decode path only")
                kk = k0 + _paired_offsets(GROUP_SIZE, PAIRED, CODES_PER_WORD)
                gate = tl.zeros((GROUP_SIZE,), tl.float32)
                up = tl.zeros((GROUP_SIZE,), tl.float32)
                for part in tl.static_range(ACT_SPLITS):
                    p = preact_ptr + (tl.max(rows, axis=0) * ACT_SPLITS + part) * (2 * I) + kk
                    gate += tl.load(p)
                    up += tl.load(p + I)
                a = (gate * tl.sigmoid(gate) * up).to(act_ptr.dtype.element_ty)  # rounded like a stored act
                aT = tl.where(valid[None, :], a[:, None], tl.zeros((1, BLOCK_M), a.dtype))
            else:  # act is stored in the order this kernel reads
                kk = k0 + tl.arange(0, GROUP_SIZE)
                aT = _load_rows_t(act_ptr, rows, I, kk, valid, SORTED)
            acc = _weight_times_x(w_e, s_e, n, k0, aT.to(DOT_DTYPE), magic, I, BLOCK_N, GROUP_SIZE, acc,
                                  PAIRED, SCALE_AFTER_DOT, DOT_DTYPE, INPUT_PRECISION, MAGIC_DTYPE,
                                  MAGIC_BIAS, BITS, CODES_PER_WORD, GROUP_SIZE)
        rw = tl.load(weights_ptr + slot, mask=valid, other=0.0).to(tl.float32)
        y = acc * rw[None, :]
        tl.store(y_ptr + slot.to(tl.int64)[None, :] * H + n[:, None], y.to(y_ptr.dtype.element_ty),
                 mask=valid[None, :])


# --- launchers -------------------------------------------------------------------------------


def _contig(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def _launch_opts(cfg: MoEConfig) -> dict:
    # The interpreter ignores warps/stages; real compiles use the bucket's values.
    return {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def _grid(top_k_index, route, cfg: MoEConfig, n_blocks: int, split_k: int = 1):
    """(block_m, grid, num_blocks, route args) of a decode (``route is None``) or grouped launch."""
    if route is None:
        num_slots = top_k_index.numel()
        return 16, (num_slots * n_blocks * split_k,), num_slots, (top_k_index.reshape(-1), top_k_index)
    num_blocks = route[1].numel()
    return cfg.block_m, (num_blocks * n_blocks,), num_blocks, route[:2]


def decode_split_k(cfg: MoEConfig, hidden: int) -> int:
    """The config's split of the reduction over H, reduced to a divisor of the group count."""
    return math.gcd(cfg.split_k, hidden // format.GROUP_SIZE)


def gate_up_triton(x, top_k_index, gate_up_proj, gate_up_proj_scale, cfg: MoEConfig, route=None, *,
                   act=None, preact=None, act_paired: bool = False, split_k: int = 1) -> None:
    """Launch the gate_up kernel: decode (``route is None``) or over ``route = moe_align(...)``.

    Writes ``act`` (``[rows, I]``, silu(gate) * up) and/or ``preact`` (fp32 ``[rows * split_k,
    2I]``: [gate, up], or split-K parts of them) where rows are slots (decode) or ``moe_align``
    positions. ``split_k > 1`` only on the decode path, with ``preact`` and no ``act``.
    """
    T, H = x.shape
    E, two_i = gate_up_proj.shape[:2]
    I, K = two_i // 2, top_k_index.shape[1]
    block_n = min(cfg.block_n, I)
    block_m, grid, num_blocks, route_args = _grid(top_k_index, route, cfg, I // block_n, split_k)
    dummy = act if act is not None else preact
    _gate_up_kernel[grid](x, gate_up_proj, gate_up_proj_scale, dummy if act is None else act,
                          dummy if preact is None else preact, *route_args, T * K, E, num_blocks, H=H, I=I,
                          K=K, BLOCK_M=block_m, BLOCK_N=block_n, GROUP_M=cfg.group_m,
                          SORTED=route is not None, WRITE_ACT=act is not None,
                          WRITE_PREACT=preact is not None, ACT_PAIRED=act_paired, SPLIT_K=split_k,
                          PAIRED=cfg.paired, SCALE_AFTER_DOT=cfg.scale_after_dot, **dot_constexprs(x.dtype),
                          **FORMAT_CONSTEXPRS, GROUP_SIZE=format.GROUP_SIZE, **_launch_opts(cfg))


def down_triton(act, top_k_index, top_k_weights, down_proj, down_proj_scale, y, cfg: MoEConfig, route=None, *,
                preact=None, splits: int = 0) -> None:
    """Launch the down kernel: ``y[slot] = top_k_weights[slot] * down_e(act[row])`` (``[TK, H]``).

    ``splits > 0``: act comes from the ``splits`` split-K parts in ``preact`` (decode).
    """
    E, H, packed_i = down_proj.shape
    I = packed_i * format.CODES_PER_WORD
    T, K = top_k_index.shape
    block_n = min(cfg.block_n_down, H)
    block_m, grid, num_blocks, route_args = _grid(top_k_index, route, cfg, H // block_n)
    _down_kernel[grid](act, act if preact is None else preact, down_proj, down_proj_scale,
                       top_k_weights.reshape(-1), y, *route_args, T * K, E, num_blocks, H=H, I=I, K=K,
                       BLOCK_M=block_m, BLOCK_N=block_n, GROUP_M=cfg.group_m, SORTED=route is not None,
                       ACT_SPLITS=splits, PAIRED=cfg.paired, SCALE_AFTER_DOT=cfg.scale_after_dot,
                       **dot_constexprs(act.dtype), **FORMAT_CONSTEXPRS, GROUP_SIZE=format.GROUP_SIZE,
                       **_launch_opts(cfg))


def fused_moe_triton(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    gate_up_proj_scale: torch.Tensor,
    down_proj: torch.Tensor,
    down_proj_scale: torch.Tensor,
    config: MoEConfig | None = None,
    decode: bool | None = None,
) -> torch.Tensor:
    """The Triton fused MoE (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).

    ``config`` / ``decode`` override the bucket's choice (tests and tuning); the default picks
    the decode path for ``T * K <= DECODE_MAX_SLOTS``. Same arguments and result as
    :func:`fused_moe`; inputs are not validated here. Launches: decode 3 (gate_up, down,
    combine), grouped 5-6 (align 2-3, gate_up, down, combine); none for T = 0.
    """
    T, H = hidden_states.shape
    E, two_i = gate_up_proj.shape[:2]
    I, K = two_i // 2, top_k_index.shape[1]
    out = hidden_states.new_empty(T, H)
    if T == 0:
        return out
    x, idx, weights = _contig(hidden_states), _contig(top_k_index), _contig(top_k_weights)
    if hidden_states.dtype == torch.float32 and not _interpret():
        config, decode = config or FP32_CONFIG, False if decode is None else decode
    cfg = config or forward_config(T * K)
    if decode is None:
        decode = T * K <= DECODE_MAX_SLOTS
    y = x.new_empty(T * K, H)  # weighted expert outputs, one row per slot
    if decode:
        split_k = decode_split_k(cfg, H)
        if split_k > 1:
            preact = torch.empty(T * K * split_k, 2 * I, dtype=torch.float32, device=x.device)
            gate_up_triton(x, idx, gate_up_proj, gate_up_proj_scale, cfg, preact=preact, split_k=split_k)
            down_triton(x, idx, weights, down_proj, down_proj_scale, y, cfg, preact=preact, splits=split_k)
            return combine_slots(y, idx, E, out)
        route, rows = None, T * K
    else:
        route, rows = moe_align_triton(idx, E, cfg.block_m), moe_align_sizes(T * K, E, cfg.block_m)[1]
    act = x.new_empty(rows, I)
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
