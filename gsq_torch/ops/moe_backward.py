"""Backward of gsq::fused_moe: gradients for hidden_states, top_k_weights and (optionally) the scales.

Dimension legend as in ``moe.py``; ``g = grad_out [T, H]``, ``w`` the routing weights, rows are
``moe_align`` positions. CUDA pipeline (Triton, frozen packed codes, no dense weights in memory):

    align -> gate_up (recompute preact [rows, 2I] fp32, and act when scale grads are wanted)
    -> down^T: gd = down_e^T g[t]; grad_w[slot] = <gd, act>; dgu = SiLU-backward(w * gd)
    -> gate_up^T: dx[slot] = gate_up_e^T dgu -> combine over k -> grad_x
    [-> scale grads: dL/ds[n, grp] = sum_rows dY[row, n] * (codes[n, grp] . X[row, grp]), atomics]

Recomputing gate_up costs one forward GEMM and saves storing [T*K, 2I] activations in forward.
The CPU path is autograd through the plain-PyTorch reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import format
from ._triton import FORMAT_CONSTEXPRS, interpreting
from .moe import (
    FP32_CONFIG,
    MoEConfig,
    _contig,
    _program_rows,
    _unpack,
    dot_constexprs,
    gate_up_triton,
)
from .moe_align import combine_slots, moe_align_sizes, moe_align_triton

# Backward buckets (T * K bound, config); only block_m / block_n / warps / stages are used.
BACKWARD_CONFIGS: tuple[tuple[int | None, MoEConfig], ...] = (
    (1024, MoEConfig(16, 64, 64, 8, 4, 3, False, False)),
    (None, MoEConfig(64, 64, 64, 8, 4, 3, False, False)),
)
_BLOCK_K = 64  # reduction tile of the transposed kernels (their scale varies along it anyway)


def backward_config(num_slots: int) -> MoEConfig:
    for bound, cfg in BACKWARD_CONFIGS:
        if bound is None or num_slots <= bound:
            return cfg
    raise AssertionError("BACKWARD_CONFIGS must end with a catch-all (None) entry")


@triton.jit
def _transposed_tile(w_ptr, s_ptr, j, n0, magic, IN: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
                     DOT_DTYPE: tl.constexpr, MAGIC_DTYPE: tl.constexpr, MAGIC_BIAS: tl.constexpr,
                     BITS: tl.constexpr, CODES_PER_WORD: tl.constexpr, GROUP_SIZE: tl.constexpr):
    """``W[j, n0:n0+BN]^T`` -> ``[BN, BK]`` (rows j of a packed ``[*, IN/16]`` weight, one scale group)."""
    BNW: tl.constexpr = BN // CODES_PER_WORD
    words = tl.load(w_ptr + j[:, None] * (IN // CODES_PER_WORD) + n0 // CODES_PER_WORD
                    + tl.arange(0, BNW)[None, :])  # [BK, BNW]
    scale = tl.load(s_ptr + j * (IN // GROUP_SIZE) + n0 // GROUP_SIZE).to(DOT_DTYPE)  # [BK]
    w = _unpack(words, magic, BK, BNW, False, BITS, CODES_PER_WORD, MAGIC_DTYPE).to(DOT_DTYPE) - MAGIC_BIAS
    return tl.trans(w * scale[:, None])


@triton.jit
def _down_t_kernel(g_ptr, w_ptr, s_ptr, weights_ptr, preact_ptr, dgu_ptr, partial_ptr, route_ptr,
                   block_expert_ptr, num_slots, E, num_blocks, magic, H: tl.constexpr, I: tl.constexpr,
                   K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   GROUP_M: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                   MAGIC_DTYPE: tl.constexpr, MAGIC_BIAS: tl.constexpr, BITS: tl.constexpr,
                   CODES_PER_WORD: tl.constexpr, CODE_OFFSET: tl.constexpr, GROUP_SIZE: tl.constexpr):
    expert, slot, valid, pos, pid_n, live = _program_rows(route_ptr, block_expert_ptr, num_slots, E,
                                                          I // BLOCK_N, num_blocks, BLOCK_M, GROUP_M)
    if live:
        token = (slot // K).to(tl.int64)
        n0 = pid_n * BLOCK_N
        i = n0 + tl.arange(0, BLOCK_N)
        w_e = w_ptr + expert * (H * (I // CODES_PER_WORD))
        s_e = s_ptr + expert * (H * (I // GROUP_SIZE))
        gd = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)  # (down_e^T g)[i, row]
        for h0 in range(0, H, BLOCK_K):
            h = h0 + tl.arange(0, BLOCK_K)
            gT = tl.load(g_ptr + token[None, :] * H + h[:, None], mask=valid[None, :], other=0.0)
            a = _transposed_tile(w_e, s_e, h, n0, magic, I, BLOCK_K, BLOCK_N, DOT_DTYPE, MAGIC_DTYPE,
                                 MAGIC_BIAS, BITS, CODES_PER_WORD, GROUP_SIZE)
            gd = tl.dot(a, gT.to(DOT_DTYPE), gd, input_precision=INPUT_PRECISION)
        rows = pos.to(tl.int64)[None, :]
        mask = valid[None, :]
        gate = tl.load(preact_ptr + rows * (2 * I) + i[:, None], mask=mask, other=0.0)
        up = tl.load(preact_ptr + rows * (2 * I) + I + i[:, None], mask=mask, other=0.0)
        sig = tl.sigmoid(gate)
        silu = gate * sig
        # grad of top_k_weights: <g, down act> = <down^T g, act>, partial over this block of I.
        tl.store(partial_ptr + slot.to(tl.int64) * (I // BLOCK_N) + pid_n, tl.sum(gd * silu * up, axis=0),
                 mask=valid)
        dact = gd * tl.load(weights_ptr + slot, mask=valid, other=0.0).to(tl.float32)[None, :]
        tl.store(dgu_ptr + rows * (2 * I) + i[:, None], dact * up * (sig + silu * (1.0 - sig)), mask=mask)
        tl.store(dgu_ptr + rows * (2 * I) + I + i[:, None], dact * silu, mask=mask)


@triton.jit
def _gate_up_t_kernel(dgu_ptr, w_ptr, s_ptr, dx_ptr, route_ptr, block_expert_ptr, num_slots, E, num_blocks,
                      magic, H: tl.constexpr, I: tl.constexpr, K: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                      DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, MAGIC_DTYPE: tl.constexpr,
                      MAGIC_BIAS: tl.constexpr, BITS: tl.constexpr, CODES_PER_WORD: tl.constexpr,
                      CODE_OFFSET: tl.constexpr, GROUP_SIZE: tl.constexpr):
    expert, slot, valid, pos, pid_n, live = _program_rows(route_ptr, block_expert_ptr, num_slots, E,
                                                          H // BLOCK_N, num_blocks, BLOCK_M, GROUP_M)
    if live:
        n0 = pid_n * BLOCK_N
        h = n0 + tl.arange(0, BLOCK_N)
        w_e = w_ptr + expert * (2 * I * (H // CODES_PER_WORD))
        s_e = s_ptr + expert * (2 * I * (H // GROUP_SIZE))
        rows = pos.to(tl.int64)[None, :]
        acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)  # (gate_up_e^T dgu)[h, row]
        for j0 in range(0, 2 * I, BLOCK_K):
            j = j0 + tl.arange(0, BLOCK_K)
            dT = tl.load(dgu_ptr + rows * (2 * I) + j[:, None], mask=valid[None, :], other=0.0)
            a = _transposed_tile(w_e, s_e, j, n0, magic, H, BLOCK_K, BLOCK_N, DOT_DTYPE, MAGIC_DTYPE,
                                 MAGIC_BIAS, BITS, CODES_PER_WORD, GROUP_SIZE)
            acc = tl.dot(a, dT.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)
        tl.store(dx_ptr + slot.to(tl.int64)[None, :] * H + h[:, None], acc, mask=valid[None, :])


@triton.jit
def _scale_grad_kernel(x_ptr, dy_ptr, weights_ptr, w_ptr, gs_ptr, route_ptr, block_expert_ptr, num_slots, E,
                       num_blocks, magic, N: tl.constexpr, IN: tl.constexpr, K: tl.constexpr,
                       X_BY_TOKEN: tl.constexpr, DY_BY_TOKEN: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, DOT_DTYPE: tl.constexpr,
                       INPUT_PRECISION: tl.constexpr, MAGIC_DTYPE: tl.constexpr, MAGIC_BIAS: tl.constexpr,
                       BITS: tl.constexpr, CODES_PER_WORD: tl.constexpr, CODE_OFFSET: tl.constexpr,
                       GROUP_SIZE: tl.constexpr):
    """gs[e, n, grp] += sum_rows dY[row, n] * sum_{k in grp} (code[n, k] - OFFSET) * X[row, k].

    X rows: x[token] (X_BY_TOKEN) or a [rows, IN] buffer; dY rows: w[slot] * g[token]
    (DY_BY_TOKEN) or a fp32 [rows, N] buffer. Blocks of one expert meet in fp32 atomics.
    """
    expert, slot, valid, pos, pid_n, live = _program_rows(route_ptr, block_expert_ptr, num_slots, E,
                                                          N // BLOCK_N, num_blocks, BLOCK_M, GROUP_M)
    if live:
        token = (slot // K).to(tl.int64)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = valid[None, :]
        if DY_BY_TOKEN:
            dyT = tl.load(dy_ptr + token[None, :] * N + n[:, None], mask=mask, other=0.0).to(tl.float32)
            dyT *= tl.load(weights_ptr + slot, mask=valid, other=0.0).to(tl.float32)[None, :]
        else:
            dyT = tl.load(dy_ptr + pos.to(tl.int64)[None, :] * N + n[:, None], mask=mask, other=0.0)
        x_rows = token if X_BY_TOKEN else pos.to(tl.int64)
        w_e = w_ptr + expert * (N * (IN // CODES_PER_WORD))
        BKW: tl.constexpr = GROUP_SIZE // CODES_PER_WORD
        for k0 in range(0, IN, GROUP_SIZE):
            xT = tl.load(x_ptr + x_rows[None, :] * IN + k0 + tl.arange(0, GROUP_SIZE)[:, None], mask=mask,
                         other=0.0)
            words = tl.load(w_e + n[:, None] * (IN // CODES_PER_WORD) + k0 // CODES_PER_WORD
                            + tl.arange(0, BKW)[None, :])
            codes = _unpack(words, magic, BLOCK_N, BKW, False, BITS, CODES_PER_WORD, MAGIC_DTYPE)
            z = tl.dot(codes.to(DOT_DTYPE) - MAGIC_BIAS, xT.to(DOT_DTYPE), input_precision=INPUT_PRECISION)
            tl.atomic_add(gs_ptr + (expert * N + n) * (IN // GROUP_SIZE) + k0 // GROUP_SIZE, tl.sum(z * dyT,
                                                                                                    axis=1))


def fused_moe_backward_triton(grad_out, hidden_states, top_k_index, top_k_weights, gate_up_proj,
                              gate_up_proj_scale,
                              down_proj, down_proj_scale, scale_grads: bool, config: MoEConfig | None = None):
    """Triton backward (CUDA, or CPU under ``TRITON_INTERPRET=1``); see :func:`fused_moe_backward`."""
    T, H = hidden_states.shape
    E, two_i = gate_up_proj.shape[:2]
    I, K = two_i // 2, top_k_index.shape[1]
    dev = hidden_states.device
    grad_x = torch.zeros_like(hidden_states)
    grad_w = torch.zeros_like(top_k_weights)
    g_gus = torch.zeros(gate_up_proj_scale.shape if scale_grads else (0,), dtype=torch.float32, device=dev)
    g_ds = torch.zeros(down_proj_scale.shape if scale_grads else (0,), dtype=torch.float32, device=dev)
    if T == 0:
        return grad_x, grad_w, g_gus.to(gate_up_proj_scale.dtype), g_ds.to(down_proj_scale.dtype)
    if hidden_states.dtype == torch.float32 and not interpreting():
        config = config or FP32_CONFIG
    cfg = config or backward_config(T * K)
    x, idx, g = _contig(hidden_states), _contig(top_k_index), _contig(grad_out)
    weights = _contig(top_k_weights).reshape(-1)
    route = moe_align_triton(idx, E, cfg.block_m)
    sorted_ids, block_expert = route[:2]
    rows = moe_align_sizes(T * K, E, cfg.block_m)[1]
    num_blocks = block_expert.numel()
    preact = torch.empty(rows, 2 * I, dtype=torch.float32, device=dev)
    act = x.new_empty(rows, I) if scale_grads else None
    gate_up_triton(x, idx, gate_up_proj, gate_up_proj_scale, cfg, route, act=act, preact=preact)

    bn_i, bn_h = min(cfg.block_n, I, format.GROUP_SIZE), min(cfg.block_n_down, H, format.GROUP_SIZE)
    common = dict(**dot_constexprs(hidden_states.dtype), **FORMAT_CONSTEXPRS, GROUP_SIZE=format.GROUP_SIZE,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    dgu = torch.empty(rows, 2 * I, dtype=torch.float32, device=dev)
    partial = torch.zeros(T * K, I // bn_i, dtype=torch.float32, device=dev)
    _down_t_kernel[(num_blocks * (I // bn_i),)](
        g, down_proj, down_proj_scale, weights, preact, dgu, partial, sorted_ids, block_expert, T * K, E,
        num_blocks, H=H, I=I, K=K, BLOCK_M=cfg.block_m, BLOCK_N=bn_i, BLOCK_K=min(_BLOCK_K, H),
        GROUP_M=cfg.group_m, **common)
    grad_w.copy_(partial.sum(1).view(T, K))

    dx = torch.empty(T * K, H, dtype=torch.float32, device=dev)
    _gate_up_t_kernel[(num_blocks * (H // bn_h),)](
        dgu, gate_up_proj, gate_up_proj_scale, dx, sorted_ids, block_expert, T * K, E, num_blocks, H=H, I=I,
        K=K, BLOCK_M=cfg.block_m, BLOCK_N=bn_h, BLOCK_K=min(_BLOCK_K, 2 * I), GROUP_M=cfg.group_m, **common)
    combine_slots(dx, idx, E, grad_x)

    if scale_grads:
        for xs, dy, w, gs, n_out, n_in, x_by_token, dy_by_token in (
            (x, dgu, gate_up_proj, g_gus, 2 * I, H, True, False),
            (act, g, down_proj, g_ds, H, I, False, True),
        ):
            bn = min(cfg.block_n, n_out)
            _scale_grad_kernel[(num_blocks * (n_out // bn),)](xs, dy, weights, w, gs, sorted_ids,
                                                              block_expert, T * K, E, num_blocks, N=n_out,
                                                              IN=n_in, K=K, X_BY_TOKEN=x_by_token,
                                                              DY_BY_TOKEN=dy_by_token, BLOCK_M=cfg.block_m,
                                                              BLOCK_N=bn, GROUP_M=cfg.group_m, **common)
    return grad_x, grad_w, g_gus.to(gate_up_proj_scale.dtype), g_ds.to(down_proj_scale.dtype)


def fused_moe_backward_reference(grad_out, hidden_states, top_k_index, top_k_weights, gate_up_proj,
                                 gate_up_proj_scale, down_proj, down_proj_scale, scale_grads: bool):
    """Plain PyTorch backward (fp32, fp64 for fp64 inputs), expert by expert; the CPU kernel.

    Written out rather than autograd: custom-op kernels run below the autograd dispatch key.
    """
    acc = torch.float64 if hidden_states.dtype == torch.float64 else torch.float32
    T, H = hidden_states.shape
    E, K, I = gate_up_proj.shape[0], top_k_index.shape[1], gate_up_proj.shape[1] // 2
    dev = hidden_states.device
    grad_x = torch.zeros(T, H, dtype=acc, device=dev)
    grad_w = torch.zeros(T * K, dtype=acc, device=dev)
    g_gus = torch.zeros(gate_up_proj_scale.shape if scale_grads else (0,), dtype=acc, device=dev)
    g_ds = torch.zeros(down_proj_scale.shape if scale_grads else (0,), dtype=acc, device=dev)
    flat_expert = top_k_index.reshape(-1)  # [T*K]
    flat_token = torch.arange(T, device=dev).repeat_interleave(K)  # [T*K]
    flat_weight = top_k_weights.reshape(-1).to(acc)
    G = grad_out.to(acc)

    def group_sum(codes_times_grad):  # [N, IN] -> [N, IN / 128]: d loss / d scale of each group
        return codes_times_grad.reshape(codes_times_grad.shape[0], -1, format.GROUP_SIZE).sum(-1)

    for e in torch.unique(flat_expert).tolist():
        if not 0 <= e < E:
            continue
        slots = (flat_expert == e).nonzero().squeeze(1)
        tokens = flat_token[slots]
        x = hidden_states[tokens].to(acc)  # [n, H]
        w_gu = format.dequantize(gate_up_proj[e], gate_up_proj_scale[e], acc)  # [2I, H]
        w_d = format.dequantize(down_proj[e], down_proj_scale[e], acc)  # [H, I]
        h = x @ w_gu.T  # [n, 2I]
        gate, up = h[:, :I], h[:, I:]
        sig = torch.sigmoid(gate)
        act = gate * sig * up  # [n, I]
        g = G[tokens]  # [n, H]
        gd = g @ w_d  # [n, I]: down^T g
        grad_w[slots] = (gd * act).sum(1)
        dact = gd * flat_weight[slots, None]
        dh = torch.cat([dact * up * sig * (1 + gate * (1 - sig)), dact * gate * sig], 1)  # [n, 2I]
        grad_x.index_add_(0, tokens, dh @ w_gu)
        if scale_grads:
            codes_gu = format.codes_to_values(format.unpack(gate_up_proj[e]), acc)  # [2I, H]
            codes_d = format.codes_to_values(format.unpack(down_proj[e]), acc)  # [H, I]
            g_gus[e] = group_sum(codes_gu * (dh.T @ x))
            g_ds[e] = group_sum(codes_d * ((g * flat_weight[slots, None]).T @ act))
    return (grad_x.to(hidden_states.dtype), grad_w.view(T, K).to(top_k_weights.dtype),
            g_gus.to(gate_up_proj_scale.dtype), g_ds.to(down_proj_scale.dtype))


@torch.library.custom_op("gsq::fused_moe_backward", mutates_args=())
def fused_moe_backward(
    grad_out: torch.Tensor,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    gate_up_proj_scale: torch.Tensor,
    down_proj: torch.Tensor,
    down_proj_scale: torch.Tensor,
    scale_grads: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``sum(grad_out * fused_moe(...))``.

    Returns:
        ``(grad_hidden_states [T, H], grad_top_k_weights [T, K], grad_gate_up_proj_scale,
        grad_down_proj_scale)``, each in its input's dtype; the scale gradients are empty
        (shape ``[0]``) unless ``scale_grads``.
    """
    return fused_moe_backward_reference(grad_out, hidden_states, top_k_index, top_k_weights, gate_up_proj,
                                        gate_up_proj_scale, down_proj, down_proj_scale, scale_grads)


@fused_moe_backward.register_kernel("cuda")
def _(grad_out, hidden_states, top_k_index, top_k_weights, gate_up_proj, gate_up_proj_scale, down_proj,
      down_proj_scale, scale_grads):
    fn = fused_moe_backward_reference if hidden_states.dtype == torch.float64 else fused_moe_backward_triton
    return fn(grad_out, hidden_states, top_k_index, top_k_weights, gate_up_proj, gate_up_proj_scale,
              down_proj,
              down_proj_scale, scale_grads)


@fused_moe_backward.register_fake
def _(grad_out, hidden_states, top_k_index, top_k_weights, gate_up_proj, gate_up_proj_scale, down_proj,
      down_proj_scale, scale_grads):
    def like(t):
        return torch.empty_like(t) if scale_grads else t.new_empty(0)

    return (torch.empty_like(hidden_states), torch.empty_like(top_k_weights), like(gate_up_proj_scale),
            like(down_proj_scale))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_out):
    x, idx, w, gate_up_proj, gus, down_proj, ds = ctx.saved_tensors
    need = ctx.needs_input_grad  # the int32 codes never require grad
    scale_grads = bool(need[4] or need[6])
    gx, gw, g_gus, g_ds = torch.ops.gsq.fused_moe_backward(grad_out, x, idx, w, gate_up_proj, gus, down_proj,
                                                           ds,
                                                           scale_grads)
    return (gx if need[0] else None, None, gw if need[2] else None, None, g_gus if need[4] else None, None,
            g_ds if need[6] else None)


torch.library.register_autograd("gsq::fused_moe", _backward, setup_context=_setup_context)
