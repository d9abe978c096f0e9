"""gsq::moe_align: group the (token, k) slots of a routing by expert, on the GPU, without host sync.

Dimension legend: T tokens, K top-k, E experts, TK = T * K slots (slot ``s = t * K + k``).

Pipeline: count (a histogram of each chunk of slots) -> [scan (prefix over chunks, many chunks
only)] -> scatter (each chunk's slots go to its expert's segment, in slot order). Every output
has a static upper-bound size; the used length lives in a device tensor that kernels read to
exit early, so the whole thing is CUDA-graph capturable and never syncs with the host.

Also here: :func:`combine_slots`, the inverse step that sums per-slot rows back into tokens.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import interpreting

# Slots per program: sub-blocks of 32 keep the in-chunk rank (a 32 x 32 comparison) cheap; small
# chunks give more programs (the scatter is latency-bound). Measured (H200, whole alignment, CUDA
# graphs): 64-slot chunks up to 4096 slots, then 128: 6.9 / 6.6 / 8.3 / 12.4 us at T * K = 512 /
# 2048 / 8192 / 32768, where 256-slot chunks of 64-slot sub-blocks took 16.1 / 12.4 / 13.1 / 13.2.
_SMALL_CHUNK, _CHUNK = 64, 128
_SMALL_CHUNK_MAX_SLOTS = 4096
_SUB = 32
# Up to this many chunks the scatter kernel sums the chunk counts itself (2 launches);
# above it a scan kernel does the prefix once (3 launches) instead of once per program.
_FUSED_SCAN_MAX_CHUNKS = 64
_SCAN_EXPERTS = 32
_SCAN_CHUNKS = 64


def moe_align_sizes(num_slots: int, num_experts: int, block_m: int) -> tuple[int, int]:
    """Static sizes ``(max_blocks, max_padded)`` of :func:`moe_align`'s outputs.

    Each expert's segment is its slot count rounded up to ``block_m``; at most ``min(E, TK)``
    experts are non-empty, so ``sum_e ceil(c_e / block_m) <= TK // block_m + min(E, TK)``.
    """
    max_blocks = num_slots // block_m + min(num_experts, num_slots)
    return max_blocks, max_blocks * block_m


def _check_align_args(top_k_index: torch.Tensor, num_experts: int, block_m: int) -> None:
    if top_k_index.dim() != 2:
        raise ValueError(f"top_k_index must be [T, K], got shape {tuple(top_k_index.shape)}")
    if top_k_index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"top_k_index must be int64 or int32, got {top_k_index.dtype}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if block_m < 1 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a positive power of 2, got {block_m}")
    if top_k_index.numel() >= 2**31 - num_experts * block_m:
        raise ValueError(f"too many slots ({top_k_index.numel()}) for int32 slot ids")


def moe_align_reference(
    top_k_index: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain PyTorch :func:`moe_align` (the CPU implementation and the kernels' oracle)."""
    _check_align_args(top_k_index, num_experts, block_m)
    dev = top_k_index.device
    flat = top_k_index.reshape(-1).long()  # [TK]
    num_slots = flat.numel()
    max_blocks, max_padded = moe_align_sizes(num_slots, num_experts, block_m)
    sorted_ids = torch.full((max_padded,), num_slots, dtype=torch.int32, device=dev)
    block_expert = torch.full((max_blocks,), num_experts, dtype=torch.int32, device=dev)
    valid = (flat >= 0) & (flat < num_experts)
    counts = torch.bincount(flat[valid], minlength=num_experts)  # [E]
    padded = (counts + block_m - 1) // block_m * block_m
    starts = torch.cumsum(padded, 0) - padded
    order = torch.sort(torch.where(valid, flat, num_experts), stable=True).indices[: int(valid.sum())]
    experts = flat[order]
    rank = torch.arange(order.numel(), device=dev) - (torch.cumsum(counts, 0) - counts)[experts]
    sorted_ids[starts[experts] + rank] = order.to(torch.int32)
    nblocks = padded // block_m
    used = int(nblocks.sum())
    block_expert[:used] = torch.repeat_interleave(torch.arange(num_experts, device=dev),
                                                  nblocks).to(torch.int32)
    num_padded = padded.sum().reshape(1).to(torch.int32)
    return sorted_ids, block_expert, num_padded


# --- kernels ---------------------------------------------------------------------------------


@triton.jit
def _load_ids(ids_ptr, offs, num_slots, E):
    """Expert ids of slots ``offs`` as int32 and whether each is a real routing (in range)."""
    ids = tl.load(ids_ptr + offs, mask=offs < num_slots, other=-1).to(tl.int32)
    valid = (offs < num_slots) & (ids >= 0) & (ids < E)
    return tl.where(valid, ids, 0), valid


@triton.jit
def _align_count_kernel(ids_ptr, counts_ptr, sorted_ptr, num_slots, E, max_padded, fill_per_program,
                        CHUNK: tl.constexpr, E_PAD: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * CHUNK + tl.arange(0, CHUNK)
    ids, valid = _load_ids(ids_ptr, offs, num_slots, E)
    tl.store(counts_ptr + pid * E_PAD + tl.arange(0, E_PAD), tl.histogram(ids, E_PAD, mask=valid))
    # Every position starts as the padding sentinel; the scatter kernel (launched after this
    # one on the same stream) overwrites the real ones.
    start = pid * fill_per_program
    for q in range(start, tl.minimum(start + fill_per_program, max_padded), CHUNK):
        pos = q + tl.arange(0, CHUNK)
        tl.store(sorted_ptr + pos, tl.full((CHUNK,), 0, tl.int32) + num_slots, mask=pos < max_padded)


@triton.jit
def _align_scan_kernel(counts_ptr, prefix_ptr, totals_ptr, num_chunks, E_PAD: tl.constexpr,
                       BLOCK_E: tl.constexpr, BLOCK_P: tl.constexpr):
    """Exclusive prefix of the chunk counts over chunks, for a block of experts."""
    cols = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    carry = tl.zeros((BLOCK_E,), tl.int32)
    for p0 in range(0, num_chunks, BLOCK_P):
        rows = p0 + tl.arange(0, BLOCK_P)
        mask = (rows < num_chunks)[:, None]
        c = tl.load(counts_ptr + rows[:, None] * E_PAD + cols[None, :], mask=mask, other=0)
        incl = tl.cumsum(c, axis=0)
        tl.store(prefix_ptr + rows[:, None] * E_PAD + cols[None, :], incl - c + carry[None, :], mask=mask)
        carry += tl.sum(c, axis=0)
    tl.store(totals_ptr + cols, carry)


@triton.jit
def _align_scatter_kernel(ids_ptr, counts_ptr, prefix_ptr, totals_ptr, sorted_ptr, block_expert_ptr,
                          num_padded_ptr, num_slots, E, num_chunks, max_blocks, blocks_per_program,
                          BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, SUB: tl.constexpr, E_PAD: tl.constexpr,
                          P_PAD: tl.constexpr, FUSED_SCAN: tl.constexpr):
    pid = tl.program_id(0)
    experts = tl.arange(0, E_PAD)
    if FUSED_SCAN:
        rows = tl.arange(0, P_PAD)
        c = tl.load(counts_ptr + rows[:, None] * E_PAD + experts[None, :], mask=(rows < num_chunks)[:, None],
                    other=0)  # [P, E]
        total = tl.sum(c, axis=0)
        before = tl.sum(tl.where((rows < pid)[:, None], c, 0), axis=0)
    else:
        total = tl.load(totals_ptr + experts)
        before = tl.load(prefix_ptr + pid * E_PAD + experts)
    padded = tl.where(experts < E, (total + BLOCK_M - 1) // BLOCK_M * BLOCK_M, 0)
    seg_end = tl.cumsum(padded, axis=0)
    cursor = seg_end - padded + before  # where this chunk's next slot of each expert goes

    # Slots in slot order: rank among equal experts inside a sub-block, plus the running cursor.
    earlier = tl.arange(0, SUB)[None, :] < tl.arange(0, SUB)[:, None]  # [i, j]: j before i
    for i in tl.static_range(CHUNK // SUB):
        offs = pid * CHUNK + i * SUB + tl.arange(0, SUB)
        ids, valid = _load_ids(ids_ptr, offs, num_slots, E)
        same = (ids[:, None] == ids[None, :]) & valid[None, :] & earlier
        rank = tl.sum(same.to(tl.int32), axis=1)
        pos = tl.gather(cursor, ids, axis=0) + rank
        tl.store(sorted_ptr + pos, offs.to(tl.int32), mask=valid)
        cursor += tl.histogram(ids, E_PAD, mask=valid)

    # Block b belongs to the first expert whose segment ends after b * BLOCK_M; E past the end.
    seg_end_valid = tl.where(experts < E, seg_end, 2**31 - 1)
    start = pid * blocks_per_program
    for b0 in range(start, tl.minimum(start + blocks_per_program, max_blocks), SUB):
        b = b0 + tl.arange(0, SUB)
        owner = tl.sum((seg_end_valid[None, :] <= (b * BLOCK_M)[:, None]).to(tl.int32), axis=1)
        tl.store(block_expert_ptr + b, tl.minimum(owner, E), mask=b < max_blocks)
    if pid == 0:
        tl.store(num_padded_ptr, tl.sum(padded, axis=0))


def moe_align_triton(
    top_k_index: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton :func:`moe_align` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``)."""
    _check_align_args(top_k_index, num_experts, block_m)
    dev = top_k_index.device
    ids = top_k_index.reshape(-1)
    if not ids.is_contiguous():
        ids = ids.contiguous()
    num_slots = ids.numel()
    max_blocks, max_padded = moe_align_sizes(num_slots, num_experts, block_m)
    sorted_ids = torch.empty(max_padded, dtype=torch.int32, device=dev)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=dev)
    if num_slots == 0:
        return sorted_ids, block_expert, torch.zeros(1, dtype=torch.int32, device=dev)
    num_padded = torch.empty(1, dtype=torch.int32, device=dev)  # written by the scatter's program 0 (no fill launch)
    e_pad = triton.next_power_of_2(num_experts)
    chunk = _SMALL_CHUNK if num_slots <= _SMALL_CHUNK_MAX_SLOTS else _CHUNK
    num_chunks = triton.cdiv(num_slots, chunk)
    counts = torch.empty(num_chunks, e_pad, dtype=torch.int32, device=dev)
    fill = triton.cdiv(triton.cdiv(max_padded, num_chunks), chunk) * chunk
    _align_count_kernel[(num_chunks,)](ids, counts, sorted_ids, num_slots, num_experts, max_padded, fill,
                                       CHUNK=chunk, E_PAD=e_pad)
    fused = num_chunks <= _FUSED_SCAN_MAX_CHUNKS
    if fused:
        prefix = totals = counts  # unused
    else:
        prefix = torch.empty_like(counts)
        totals = torch.empty(e_pad, dtype=torch.int32, device=dev)
        _align_scan_kernel[(triton.cdiv(e_pad, _SCAN_EXPERTS),)](
            counts, prefix, totals, num_chunks, E_PAD=e_pad, BLOCK_E=min(_SCAN_EXPERTS, e_pad),
            BLOCK_P=_SCAN_CHUNKS)
    blocks_per_program = triton.cdiv(triton.cdiv(max_blocks, num_chunks), _SUB) * _SUB
    _align_scatter_kernel[(num_chunks,)](ids, counts, prefix, totals, sorted_ids, block_expert, num_padded,
                                         num_slots, num_experts, num_chunks, max_blocks, blocks_per_program,
                                         BLOCK_M=block_m, CHUNK=chunk, SUB=_SUB, E_PAD=e_pad,
                                         P_PAD=triton.next_power_of_2(num_chunks) if fused else 1,
                                         FUSED_SCAN=fused)
    return sorted_ids, block_expert, num_padded


# --- the custom op ---------------------------------------------------------------------------


@torch.library.custom_op("gsq::moe_align", mutates_args=())
def moe_align_op(top_k_index: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor,
                                                                                     torch.Tensor,
                                                                                   torch.Tensor]:
    return moe_align_reference(top_k_index, num_experts, block_m)


@moe_align_op.register_kernel("cuda")
def _(top_k_index, num_experts, block_m):
    return moe_align_triton(top_k_index, num_experts, block_m)


@moe_align_op.register_fake
def _(top_k_index, num_experts, block_m):
    _check_align_args(top_k_index, num_experts, block_m)
    max_blocks, max_padded = moe_align_sizes(top_k_index.numel(), num_experts, block_m)
    new = top_k_index.new_empty
    return (new(max_padded, dtype=torch.int32), new(max_blocks, dtype=torch.int32), new(1, dtype=torch.int32))


def moe_align(
    top_k_index: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group the routing slots by expert, each expert's segment padded to ``block_m``.

    Args:
        top_k_index: ``[T, K]`` int64 / int32 expert ids; ids outside ``[0, E)`` are dropped
            (transformers uses ``E`` as a padding slot).
        num_experts: ``E``.
        block_m: a power of 2, the row block of the grouped GEMM.

    Returns:
        ``(sorted_ids, block_expert, num_padded)``:

        - ``sorted_ids``: int32 ``[max_padded]``, slot ids ``t * K + k`` grouped by expert
          (increasing expert, slots in increasing order inside a segment), each segment padded
          to a multiple of ``block_m`` with the sentinel ``T * K``; entries past the used length
          are the sentinel too.
        - ``block_expert``: int32 ``[max_blocks]``, the expert of each block of ``block_m``
          entries; ``E`` for blocks past the used length.
        - ``num_padded``: int32 ``[1]``, the used length (a multiple of ``block_m``).

        ``(max_blocks, max_padded) = moe_align_sizes(T * K, E, block_m)``.

    Raises:
        ValueError, TypeError: bad shapes, dtypes or sizes.
    """
    return torch.ops.gsq.moe_align(top_k_index, num_experts, block_m)


# --- combine: per-slot rows back to tokens ---------------------------------------------------


@triton.jit
def _combine_kernel(y_ptr, ids_ptr, out_ptr, T, H, E, K: tl.constexpr, BLOCK_T: tl.constexpr,
                    BLOCK_H: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:
        tl.extra.cuda.gdc_wait()  # y is the down kernel's output
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    acc = tl.zeros((BLOCK_T, BLOCK_H), tl.float32)
    for k in tl.static_range(K):
        e = tl.load(ids_ptr + tok * K + k, mask=tok < T, other=-1)
        ok = (tok < T) & (e >= 0) & (e < E)  # rows of dropped slots were never written
        y = tl.load(y_ptr + (tok * K + k).to(tl.int64)[:, None] * H + cols[None, :],
                    mask=ok[:, None] & (cols < H)[None, :], other=0.0)
        acc += y.to(tl.float32)
    tl.store(out_ptr + tok.to(tl.int64)[:, None] * H + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(tok < T)[:, None] & (cols < H)[None, :])


def combine_slots(y: torch.Tensor, top_k_index: torch.Tensor, num_experts: int,
                  out: torch.Tensor, pdl: bool = False) -> torch.Tensor:
    """``out[t] = sum_k y[t * K + k]`` over the slots with an expert id in ``[0, E)``, in k order.

    Args:
        y: ``[T * K, H]`` per-slot rows (rows of dropped slots are never read).
        top_k_index: ``[T, K]`` expert ids.
        num_experts: ``E``.
        out: ``[T, H]`` written in place (any float dtype; the sum runs in fp32).
        pdl: launch as a programmatic dependent of the kernel before (which wrote ``y``; sm_90+).
    """
    T, K = top_k_index.shape
    H = out.shape[1]
    if T == 0:
        return out
    y, top_k_index = y.contiguous(), top_k_index.contiguous()
    block_h = min(triton.next_power_of_2(H), 256)
    block_t = 4 if interpreting() else max(1, 2048 // block_h)
    _combine_kernel[(triton.cdiv(T, block_t), triton.cdiv(H, block_h))](
        y, top_k_index, out, T, H, num_experts, K=K, BLOCK_T=block_t, BLOCK_H=block_h, PDL=pdl,
        **({"launch_pdl": True} if pdl else {}))
    return out
