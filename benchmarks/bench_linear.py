"""Benchmark gsq::linear (2-bit packed weight) against torch.nn.functional.linear on the BF16 weight.

Dimension legend: M rows of x (tokens), N out_features, K in_features.

Per run: measure the card's copy bandwidth; for each weight shape [N, K] build random packed
weights (every code, signed bf16 scales) and the equal BF16 weight; check the op against
``linear_reference`` at every M; then time both at every M inside CUDA graphs, cycling over enough
weight copies that a graph reads more than 4x L2. Writes ``linear.csv`` / ``linear.md`` to ``--out``.

Columns: ``ours_us`` / ``bf16_us`` (median per call), ``speedup`` (bf16 / ours), ``floor_us``
(bytes of packed weight + scales + x + y over the copy bandwidth), ``ours_pct_floor`` (floor as a
percentage of ours), ``ours_GBps``, ``bf16_pct_floor`` (the same for BF16's bytes), ``config``.

Targets (issue 2), 8192 x 8192: M = 1 at least 5x BF16 and 60% of the byte floor; M = 4096 at
most 1.25x BF16's time. The script prints whether they are met.

``--tune`` times candidate kernel configs per (shape, M) of ``--tune-points`` (checking each
against the reference before and after timing) and prints ``CONFIGS`` lines for
``gsq_torch/ops/linear.py``; with ``--bench`` the normal table follows, run with the winners.
Before timing, ``--jobs`` worker processes compile every kernel the run needs in parallel (Triton's
file cache then serves the timing process). ``--quick`` halves the replays. ``--dry-run`` runs the
Triton kernels on tiny shapes under the interpreter on the CPU (no CUDA needed; timings meaningless).

``--sweep-new`` (about a minute): the "lines" and "decode" kernels' candidates (``decode_candidates``)
against the table's config at M = 1, 2, 4 on 8192 x 8192 and M = 1 on the expert shapes, each checked against the
reference before and after timing; then the op with the winners against F.linear at those points.

``--sweep`` (decode study, about 3 minutes on an H200): M in {1, 4, 16} on 8192 x 8192 and the
two expert shapes; a wide grid of "mma" configs (rows per program, pipeline depth, warps, split K)
and the FMA GEMV, each checked against the dequantized reference before and after timing, printed
with its programs per SM and its nominal bytes in flight per SM (``sweep_candidates``); then the
table with the winners against F.linear and a compact summary.

``--ablate`` (about 30 s): what the "decode" kernel's time at 8192 x 8192 is made of. The best
config at M = 1 (8x64x512 w4, 8 row steps, 2 ahead) and at M = 16 (16x64x512 w4, 4 steps, 1 ahead),
then variants (``_abl_rows``; ``L.DEC_ABL_*``): "pinned" loads (a bar.sync right after the next
tile's loads, so that ptxas cannot sink them behind the wgmma waits; exact, checked) and timing-only
ones: no split-K fix-up, no stores, no wgmma, loads only, no x prologue, k-major (contiguous) words,
and split counts 16 / 8 / 4 / 2 / 1 (``ksub`` chunks of 512 per program, the first chunk's x reused).
Only the baselines and the pinned rows are checked against the reference; the rest compute garbage
by design.

Usage: ``python3 benchmarks/bench_linear.py [--shapes 8192x8192 512x2048] [--tokens 1 4096]
[--out DIR] [--tune [--tune-points 8192x8192:1,16,4096 ...] [--bench]] [--sweep] [--sweep-new] [--quick]
[--dry-run]``.
The one-command GPU check: ``python3 benchmarks/bench_linear.py --tune --bench --quick``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if not torch.cuda.is_available():  # the Triton interpreter must be chosen before gsq_torch imports
    os.environ.setdefault("TRITON_INTERPRET", "1")

import common  # noqa: E402
from gsq_torch import format  # noqa: E402
from gsq_torch.ops import linear as L  # noqa: E402

SHAPES = [(512, 2048), (2048, 512), (8192, 8192)]  # (out, in): Qwen3.6 gate/up, down; a large dense layer
TOKENS = [1, 4, 16, 64, 256, 1024, 4096]
# (N, K) -> M values that --tune sweeps by default: the targets' points and the experts' regimes.
TUNE_POINTS = {(8192, 8192): [1, 16, 4096], (512, 2048): [1, 16, 256], (2048, 512): [1, 16, 256]}

# --sweep: the decode regime, where the op must run near the byte floor.
SWEEP_POINTS = {(8192, 8192): [1, 4, 16], (512, 2048): [1, 4, 16], (2048, 512): [1, 4, 16]}
SM_COUNT = 132  # H100 SXM / H200
# Resident programs per SM of the "mma" decode configs: registers and shared memory from the sm_90
# compile report (Triton 3.9, benchmarks/linear_notes.md), 64K registers and 228 KB per SM.
# Keyed by (block_n, num_warps); x as a vector (M = 1) or as tiles (M > 1) differ a little.
MMA_CTAS_PER_SM = {(128, 4): 3, (64, 4): 4, (128, 8): 2}

DRY_SHAPES, DRY_TOKENS = [(64, 256), (32, 384)], [1, 4, 16]
# bf16 output vs an fp32 reference: a couple of bf16 ulps of the largest output. A misread format
# (code order, offset, scale layout) gives errors of order 1.
REL_TOL = 1e-2


def packed_bytes(N: int, K: int) -> int:
    return N * K // format.CODES_PER_WORD * 4 + N * K // format.GROUP_SIZE * 2


def make_weight(N: int, K: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    codes = torch.randint(0, 4, (N, K), dtype=torch.uint8, generator=g)
    scale = (torch.randn(N, K // format.GROUP_SIZE, generator=g) * 0.02).to(torch.bfloat16)
    return format.pack(codes).to(device), scale.to(device)


def _n_copies(touched_bytes: float, device: torch.device, budget: float) -> int:
    return (
        common.copies_needed(touched_bytes, touched_bytes, max_bytes=budget) if device.type == "cuda" else 2
    )


def _ours(device: torch.device, config: L.KernelConfig | None = None) -> Callable:
    # On the CPU dry run the op would run the PyTorch reference: call the (interpreted) kernels.
    if device.type == "cuda" and config is None:
        return L.linear
    return lambda x, w, s: L.launch_linear(x, w, s, config)


def _describe(cfg: L.KernelConfig) -> str:
    if cfg.kernel == "gemv":
        return f"gemv n{cfg.block_n} k{cfg.block_k} w{cfg.num_warps}"
    if cfg.kernel == "lines_warps":
        return f"lines_warps {cfg.block_m}x{cfg.block_n}x{cfg.block_k} w{cfg.num_warps} it{cfg.group_m}"
    if cfg.kernel in ("decode", "lines"):
        iters = f"it{cfg.group_m}" if cfg.group_m else "it-auto"
        ahead = f"ahead{cfg.num_stages}" if cfg.kernel == "decode" or cfg.num_stages == 1 else f"s{cfg.num_stages}"
        return f"{cfg.kernel} {cfg.block_m}x{cfg.block_n}x{cfg.block_k} w{cfg.num_warps} {iters} {ahead}"
    split = f" split{cfg.split_k}" if cfg.split_k > 1 else ""
    if cfg.kernel == "hopper":
        split = f" dq{cfg.group_m}"  # unpacking warps
    return f"{cfg.kernel} {cfg.block_m}x{cfg.block_n}x{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages}{split}"


def candidates(M: int, N: int, K: int) -> list[L.KernelConfig]:
    """Configs worth timing for one forward shape: the default first, then a few neighbours.

    Few on purpose: every one is a Triton compile (about 10 s each, in parallel) in a short run.
    """
    C = L.KernelConfig
    rep = dataclasses.replace
    default = L.pick_config("forward", M, N, K)
    out: list[L.KernelConfig] = []
    if default.kernel == "mma" and default.block_m <= 64:
        s = default.split_k
        out.append(rep(default, split_k=2 * s))
        if N * K >= 2**24:  # more tiles in flight per program where each streams many
            out += [rep(default, num_stages=6), rep(default, num_stages=6, split_k=2 * s)]
        elif s > 1:
            out.append(rep(default, split_k=s // 2))
        other_n = 64 if default.block_n == 128 else 128
        if other_n == 64 or default.block_m <= 32:  # 128 rows above 32 tokens need 255 registers
            tiles = triton_cdiv(M, default.block_m) * triton_cdiv(N, other_n)
            out.append(rep(default, block_n=other_n, split_k=L._split_for(tiles, K, default.block_k, 2)))
        out.append(L._legacy_config(M, N, K))  # the FMA GEMV / tl.dot GEMM: the kernels before "mma"
    if M >= 256 and triton_cdiv(M, 128) * triton_cdiv(N, 128) >= 64:  # big tiles fill the card
        mma64 = C("mma", block_m=64, block_n=64, block_k=128, group_m=0, num_warps=4, num_stages=4)
        tiles = triton_cdiv(M, 64) * triton_cdiv(N, 64)
        out += [
            C("gemm", block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3),
            C("gemm", block_m=256, block_n=128, block_k=64, num_warps=8, num_stages=3),
            rep(mma64, split_k=L._split_for(tiles, K, 128, 2)),
        ]
        hopper = C("hopper", block_m=128, block_n=128, block_k=64, group_m=4, num_warps=4, num_stages=4)
        out += [rep(hopper, group_m=8), rep(hopper, num_warps=8, group_m=8)]
        if M >= 512:
            out += [rep(hopper, block_m=256, num_warps=8), rep(hopper, block_m=256, num_warps=8, group_m=8),
                    rep(hopper, block_m=256, num_warps=8, group_m=8, num_stages=3)]
        if M >= 1024:
            out += [
                C("gemm", block_m=128, block_n=128, block_k=128, num_warps=8, num_stages=3),
                C("mma", block_m=256, block_n=128, block_k=64, group_m=0, num_warps=8, num_stages=3),
            ]
        else:
            out.append(C("gemm", block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3, split_k=2))
    seen: list[L.KernelConfig] = []
    for c in [default] + out:
        if c not in seen:
            seen.append(c)
    return seen


def _effective_split(cfg: L.KernelConfig, K: int) -> int:
    """The split count the launchers run for ``cfg`` (no empty split)."""
    split = max(1, min(cfg.split_k, triton_cdiv(K, cfg.block_k)))
    return triton_cdiv(K, triton_cdiv(triton_cdiv(K, split), cfg.block_k) * cfg.block_k)


def occupancy(cfg: L.KernelConfig, M: int, N: int, K: int) -> tuple[float, float]:
    """(programs per SM, nominal KB of packed weight in flight per SM) of one launch.

    "mma": ``num_stages - 1`` weight tiles of ``block_n x block_k / 16`` words are in flight per
    resident program (cp.async ring), programs resident per SM from ``MMA_CTAS_PER_SM``. "gemv":
    the next ``block_n x block_k / 16`` words, prefetched into registers, two programs per SM.
    """
    if cfg.kernel == "lines_warps":  # one warp per chunk, one row block per program, ~1 tile of loads in flight
        programs = triton_cdiv(M, cfg.block_m) * triton_cdiv(N, cfg.block_n * cfg.group_m)
        return programs / SM_COUNT, programs * K // 512 * cfg.block_n * 128 / 1024 / SM_COUNT
    if cfg.kernel in ("decode", "lines"):
        # decode: num_stages tiles of words prefetched into registers, ~4-5 CTAs of 4 warps / SM;
        # lines: 1 tile in registers, or num_stages - 1 by cp.async, 3 CTAs of 4 warps / SM (~165 registers)
        iters = L._decode_iters(cfg, M, N, K)
        programs = triton_cdiv(M, cfg.block_m) * triton_cdiv(N, cfg.block_n * iters) * triton_cdiv(K, cfg.block_k)
        resident = min(programs / SM_COUNT, 4 * 4 / cfg.num_warps if cfg.kernel == "decode"
                       else 3 if cfg.num_warps >= 4 else 16 / cfg.num_warps)
        tiles = min(2, cfg.num_stages) if cfg.kernel == "decode" else max(1, cfg.num_stages - 1)
        kb = tiles * cfg.block_n * cfg.block_k // format.CODES_PER_WORD * 4 / 1024
        return programs / SM_COUNT, resident * kb
    if cfg.kernel == "hopper":  # TMA rings: 8 packed weight tiles ahead, as many programs as fit in 228 KB
        from gsq_torch.ops import linear_hopper

        programs = triton_cdiv(M, cfg.block_m) * triton_cdiv(N, cfg.block_n)
        tiles = linear_hopper.b_tiles(cfg.block_m, cfg.block_n, cfg.num_stages)
        smem = linear_hopper.smem_bytes(cfg.block_m, cfg.block_n, cfg.num_stages, tiles)
        resident = min(programs / SM_COUNT, max(1, 228 * 1024 // (smem + 1024)))
        kb = linear_hopper._W_STAGES * cfg.block_n * cfg.block_k // format.CODES_PER_WORD * 4 / 1024
        return programs / SM_COUNT, resident * kb
    if cfg.kernel == "mma":
        programs = triton_cdiv(M, cfg.block_m) * triton_cdiv(N, cfg.block_n) * _effective_split(cfg, K)
        resident = min(programs / SM_COUNT, MMA_CTAS_PER_SM.get((cfg.block_n, cfg.num_warps), 2))
        kb = (cfg.num_stages - 1) * cfg.block_n * cfg.block_k // format.CODES_PER_WORD * 4 / 1024
    else:
        programs = triton_cdiv(N, cfg.block_n) * M
        resident = min(programs / SM_COUNT, 2)
        kb = cfg.block_n * cfg.block_k // format.CODES_PER_WORD * 4 / 1024
    return programs / SM_COUNT, resident * kb


def sweep_candidates(M: int, N: int, K: int) -> list[L.KernelConfig]:
    """The --sweep grid: "mma" shapes x pipeline depths x split counts, and the FMA GEMV (M <= 4).

    Split counts run from one wave of resident programs to about four programs per SM, keeping at
    least two K tiles per split; configs that the launcher would run identically are dropped.
    """
    rep = dataclasses.replace
    out = [L.pick_config("forward", M, N, K), L._default_config("forward", M, N, K)]
    for block_n, warps, stages in [(128, 4, 4), (128, 4, 6), (64, 4, 4), (64, 4, 6), (128, 8, 4)]:
        if block_n > 64 and N < 1024 and stages == 6:
            continue  # few row tiles: the narrow tile's deeper ring covers it
        base = L.KernelConfig("mma", block_m=16, block_n=block_n, block_k=128, group_m=0,
                              num_warps=warps, num_stages=stages)
        tiles = triton_cdiv(M, 16) * triton_cdiv(N, block_n)
        seen_splits = set()
        for split in (1, 2, 3, 4, 6, 8, 12, 16):
            if K // (128 * split) < 2 and split > 1:
                break
            cfg = rep(base, split_k=split)
            eff = _effective_split(cfg, K)
            if eff in seen_splits or tiles * eff > 4 * SM_COUNT + SM_COUNT // 2:
                continue
            seen_splits.add(eff)
            out.append(cfg)
    if M <= 4:
        out.append(L._legacy_config(1, N, K))  # one row of x per program
        table = L.CONFIGS.get(("forward", 1, N, K))
        if table is not None and table.kernel == "gemv":
            out.append(table)
    seen: list[L.KernelConfig] = []
    for c in out:
        if c not in seen:
            seen.append(c)
    return seen


# --sweep-new: the "decode" kernel (no shared memory or barriers in its loop) against the table's
# config and F.linear, in one short GPU command (about a minute with compiles).
SWEEP_NEW_POINTS = {(8192, 8192): [1, 2, 4], (512, 2048): [1], (2048, 512): [1]}


def decode_candidates(M: int, N: int, K: int) -> list[L.KernelConfig]:
    """The table's config, then "lines" configs (M <= 2, K a multiple of 512): (rows per step, warps,
    row steps per program, pipeline: 1 or 2 = tiles ahead in registers, >= 3 = cp.async stages), "lines_warps"
    configs (K = 512 x 1-16), then the best "decode" configs of the previous sweep for reference.
    """
    out = [L.pick_config("forward", M, N, K)]
    if M <= 2 and K % 512 == 0:
        bm = M
        if N * K >= 2**24:  # 1-2 warps run mma.sync (many programs per SM), 4 warps wgmma
            grid = [(bn, w, it, st) for bn, w in ((32, 1), (32, 2), (64, 2)) for it in (2, 4, 8) for st in (1, 2)]
            grid += [(64, 2, 4, 3)]
            if M > 1:
                grid = [(bn, 2, it, st) for bn in (32, 64) for it in (2, 4) for st in (1, 2)]
        else:
            grid = [(16, 1, 1, 1), (32, 2, 1, 1), (32, 2, 2, 1), (64, 2, 1, 3), (64, 4, 1, 1)]
        out += [L.KernelConfig("lines", block_m=bm, block_n=bn, block_k=512, group_m=it, num_warps=w, num_stages=st)
                for bn, w, it, st in grid]
    if L.lines_warps_supported(M, K):  # one warp per 512-input chunk: rows per tile x tiles per program
        out += [L.KernelConfig("lines_warps", block_m=M, block_n=bn, block_k=512, group_m=it, num_warps=K // 512,
                               num_stages=1) for bn, it in ((16, 1), (32, 1), (32, 2), (32, 4)) if bn * it * 8 <= N]
    if N * K >= 2**24:
        out += [L.KernelConfig("decode", block_m=8 if M <= 8 else 16, block_n=64, block_k=512, group_m=it,
                               num_warps=4, num_stages=ahead) for it, ahead in ((4, 1), (8, 2))]
    return out


# --ablate: (label, M, config, ablate bits, ksub). The baselines (ablate 0, ksub 1) come first per M.
_ABL_M1 = L.KernelConfig("decode", block_m=8, block_n=64, block_k=512, group_m=8, num_warps=4, num_stages=2)
_ABL_M16 = L.KernelConfig("decode", block_m=16, block_n=64, block_k=512, group_m=4, num_warps=4, num_stages=1)


def _abl_rows() -> list[tuple[str, int, L.KernelConfig, int, int]]:
    A = L
    pure = A.DEC_ABL_LOADS | A.DEC_ABL_NOMMA | A.DEC_ABL_NOSTORE | A.DEC_ABL_NOFIX
    rows = []
    for M, cfg in ((1, _ABL_M1), (16, _ABL_M16)):
        other = dataclasses.replace(cfg, group_m=4, num_stages=1) if M == 1 else dataclasses.replace(cfg, num_stages=2)
        rows += [
            ("baseline (checked)", M, cfg, 0, 1),
            ("pinned loads: bar.sync after the next tile's loads (checked)", M, cfg, A.DEC_ABL_PIN, 1),
            ("pinned loads, other row steps / ahead (checked)", M, other, A.DEC_ABL_PIN, 1),
            ("no split-K fix-up (partials stored)", M, cfg, A.DEC_ABL_NOFIX, 1),
            ("no stores, no fix-up", M, cfg, A.DEC_ABL_NOFIX | A.DEC_ABL_NOSTORE, 1),
            ("no wgmma (unpack + xor sink)", M, cfg, A.DEC_ABL_NOMMA, 1),
            ("loads only, no stores, no fix-up", M, cfg, pure, 1),
            ("k-major words (contiguous per program)", M, cfg, A.DEC_ABL_KMAJOR, 1),
        ]
        if M == 1:
            rows += [
                ("pinned loads, no fix-up", M, cfg, A.DEC_ABL_PIN | A.DEC_ABL_NOFIX, 1),
                ("no wgmma, no stores, no fix-up", M, cfg, A.DEC_ABL_NOMMA | A.DEC_ABL_NOSTORE | A.DEC_ABL_NOFIX, 1),
                ("no x prologue (ptxas then hoists the loads too)", M, cfg, A.DEC_ABL_NOX, 1),
                ("k-major, loads only, no stores/fix-up", M, cfg, A.DEC_ABL_KMAJOR | pure, 1),
            ]  # split 16 (the baseline) .. 1: ksub chunks per program, programs kept at 256 (128 for split 1)
            for ksub in (2, 4, 8, 16):
                c = dataclasses.replace(cfg, group_m=max(1, cfg.group_m // ksub))
                rows.append((f"split {16 // ksub} (ksub {ksub}, {c.group_m} row steps)", M, c, 0, ksub))
    return rows


def _abl_programs(M: int, N: int, K: int, cfg: L.KernelConfig, ksub: int) -> int:
    return (triton_cdiv(M, cfg.block_m) * triton_cdiv(N, cfg.group_m * cfg.block_n)
            * triton_cdiv(K, cfg.block_k * ksub))


def _abl_weight(N: int, K: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random words (every 32-bit pattern is 16 valid codes) and scales, made on the device."""
    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randint(-(2**31), 2**31 - 1, (N, K // format.CODES_PER_WORD), dtype=torch.int32, device=device,
                      generator=g)
    s = (torch.randn(N, K // format.GROUP_SIZE, device=device, generator=g) * 0.02).to(torch.bfloat16)
    return w, s


def _abl_compile_worker(tasks: list[tuple[int, int, int, L.KernelConfig, int, int]]) -> list[str]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    notes = []
    for N, K, M, cfg, ablate, ksub in tasks:
        try:
            w, s = _abl_weight(N, K, device)
            L.launch_decode_ablation(torch.randn(M, K, device=device).to(torch.bfloat16), w, s, cfg, ablate, ksub)
            if device.type == "cuda":
                torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 - reported; the timing process reports too
            notes.append(f"M={M} ablate={ablate} ksub={ksub}: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
    return notes


def ablate(args, device: torch.device) -> int:
    """--ablate: time the decode baselines and their timing-only variants (8192 x 8192, M = 1 and 16)."""
    N, K = (128, 1024) if args.dry_run else (8192, 8192)
    rows = _abl_rows()
    if args.dry_run:
        rows = [(lab, M, dataclasses.replace(c, group_m=min(c.group_m, 2)), a, k) for lab, M, c, a, k in rows
                if k <= 2]
    t0 = time.perf_counter()
    if device.type == "cuda" and args.jobs > 1:
        keys = {}
        for _, M, cfg, a, k in rows:  # one task per binary (row steps are a runtime value)
            keys.setdefault((dataclasses.replace(cfg, group_m=0), a, k, K // (cfg.block_k * k) > 1),
                            (N, K, M, cfg, a, k))
        common.compile_in_processes(_abl_compile_worker, list(keys.values()), args.jobs)
    wbytes = packed_bytes(N, K)
    n = _n_copies(wbytes, device, args.copy_budget_gb * 1e9)
    wcopies = [_abl_weight(N, K, device, seed=i) for i in range(n)]
    ref_w = format.dequantize(*wcopies[0], torch.float32)
    print(f"\n--ablate: {N}x{K}, {n} weight copies, byte floor {common.byte_floor_us(wbytes, args.bandwidth):.2f} us "
          f"(packed weight + scales); timing-only rows compute wrong results by design", flush=True)
    status = 0
    base_us = {}
    for label, M, cfg, a, k in rows:
        try:
            x = torch.randn(M, K, device=device).to(torch.bfloat16)
            checked = (a & ~L.DEC_ABL_PIN) == 0 and k == 1
            if checked:
                ref = x.float() @ ref_w.T
                err = common.rel_err(L.launch_decode_ablation(x, *wcopies[0], cfg), ref)
                err2 = common.rel_err(L.launch_decode_ablation(x, *wcopies[0], cfg), ref)  # counters reused
                if max(err, err2) > REL_TOL:
                    print(f"  M={M:>2} {label}: WRONG (rel errs {err:.1e}, {err2:.1e})")
                    status = 1
            fns = [lambda w=w, s=s, c=cfg, x=x, a=a, k=k: L.launch_decode_ablation(x, w, s, c, a, k)
                   for w, s in wcopies]
            us = common.time_or_wall(fns, device, args.replays).us
        except Exception as exc:  # noqa: BLE001
            print(f"  M={M:>2} {label}: failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
            status = 1
            continue
        if a == 0 and k == 1:
            base_us[M] = us
        label = label if checked else label + " [timing only]"
        delta = us - base_us.get(M, float("nan"))
        progs = _abl_programs(M, N, K, cfg, k)
        print(f"  M={M:>2} {_describe(cfg):<28} abl={a:>2} ksub={k:>2} {progs:5d} progs  {us:8.2f} us  "
              f"({delta:+7.2f})  {label}", flush=True)
    print(f"--ablate took {time.perf_counter() - t0:.0f} s (compiles included)")
    return status


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _compile_key(M: int, N: int, K: int, cfg: L.KernelConfig) -> tuple:
    """What makes two launches share one Triton binary (the kernels specialize on these only)."""
    split = max(1, min(cfg.split_k, triton_cdiv(K, cfg.block_k)))
    split = triton_cdiv(K, triton_cdiv(triton_cdiv(K, split), cfg.block_k) * cfg.block_k)  # as the launcher
    if cfg.kernel == "lines_warps":  # specialized on the tiling and the chunk count
        return (cfg, K)
    if cfg.kernel in ("decode", "lines"):  # row steps and split count are runtime values
        return (dataclasses.replace(cfg, group_m=0), triton_cdiv(K, cfg.block_k) > 1, K % cfg.block_k == 0)
    # "gemm" takes the split count as a constexpr, "mma" only whether there is one.
    return (cfg, M == 1, split if cfg.kernel == "gemm" else split > 1, K % cfg.block_k == 0)


def _compile_worker(tasks: list[tuple[int, int, int, L.KernelConfig]]) -> list[str]:
    """Run each (N, K, M, config) once on the GPU so that Triton compiles it into its file cache."""
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # cpu: the interpreter (tests)
    notes, weights = [], {}
    for N, K, M, cfg in tasks:
        try:
            if (N, K) not in weights:  # any words will do for compiling
                weights[(N, K)] = (
                    torch.randint(
                        -(2**31), 2**31 - 1, (N, K // format.CODES_PER_WORD), dtype=torch.int32, device=device
                    ),
                    torch.randn(N, K // format.GROUP_SIZE, device=device).to(torch.bfloat16),
                )
            w, s = weights[(N, K)]
            x = torch.randn(M, K, device=device).to(torch.bfloat16)
            L.launch_linear(x, w, s, cfg)
            if device.type == "cuda":
                torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 - reported; the timing process retries and reports too
            notes.append(
                f"{N}x{K} M={M} {_describe(cfg)}: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
            )
    return notes


def precompile(tasks: list[tuple[int, int, int, L.KernelConfig]], jobs: int) -> None:
    """Compile the distinct kernels of ``tasks`` in ``jobs`` processes (Triton compiles are CPU-bound)."""
    unique: dict[tuple, tuple[int, int, int, L.KernelConfig]] = {}
    for N, K, M, cfg in tasks:
        unique.setdefault(_compile_key(M, N, K, cfg), (N, K, M, cfg))
    common.compile_in_processes(_compile_worker, list(unique.values()), jobs)


def _tune_tasks(
    points: dict[tuple[int, int], list[int]], cands=None
) -> list[tuple[int, int, int, L.KernelConfig]]:
    cands = cands or candidates
    return [(N, K, M, c) for (N, K), ms in points.items() for M in ms for c in cands(M, N, K)]


def tune(args, device: torch.device, points: dict[tuple[int, int], list[int]], cands=None) -> dict:
    """Time the candidates (``cands``, default ``candidates``) of every point; returns the winning
    ``CONFIGS`` entries. Also fills ``args.sweep_rows`` with (N, K, M, us, floor_us, config)."""
    cands = cands or candidates
    lines, best_configs = [], {}
    args.sweep_rows = []
    budget = args.copy_budget_gb * 1e9
    for (N, K), tokens in points.items():
        n = _n_copies(packed_bytes(N, K), device, budget)
        wcopies = common.make_copies(make_weight(N, K, device), n)
        ref_w = format.dequantize(*wcopies[0], torch.float32)
        for M in tokens:
            results = []
            floor = common.byte_floor_us(packed_bytes(N, K) + 2 * M * (N + K), args.bandwidth)
            for cfg in cands(M, N, K):
                try:
                    errs = []
                    for _ in range(2):  # fresh inputs; the 2nd call reuses the split-K counters
                        x = torch.randn(M, K, device=device).to(torch.bfloat16)
                        errs.append(common.rel_err(L.launch_linear(x, *wcopies[0], cfg), x.float() @ ref_w.T))
                    fns = [lambda w=w, s=s, c=cfg, x=x: L.launch_linear(x, w, s, c) for w, s in wcopies]
                    us = common.time_or_wall(fns, device, args.replays).us
                    x = torch.randn(M, K, device=device).to(torch.bfloat16)  # after many replays
                    errs.append(common.rel_err(L.launch_linear(x, *wcopies[0], cfg), x.float() @ ref_w.T))
                    if max(errs) > REL_TOL:
                        shown = ", ".join(f"{e:.1e}" for e in errs)
                        print(f"  {N}x{K} M={M} {_describe(cfg)}: WRONG (rel errs {shown})")
                        continue
                except Exception as exc:  # noqa: BLE001 - a config Triton cannot compile is skipped
                    print(
                        f"  {N}x{K} M={M} {_describe(cfg)}: failed ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:100] if str(exc) else ''})"
                    )
                    continue
                results.append((us, cfg))
                per_sm, kb = occupancy(cfg, M, N, K)
                print(
                    f"  {N}x{K} M={M:>5} {_describe(cfg):<34} {us:9.2f} us {100 * floor / us:5.1f}% floor  "
                    f"{per_sm:4.1f} progs/SM {kb:5.1f} KB/SM in flight",
                    flush=True,
                )
            if not results:
                continue
            best_us, best = min(results, key=lambda r: r[0])
            default_us = next(
                (us for us, c in results if c == L.pick_config("forward", M, N, K)), float("nan")
            )
            key = ("forward", L._m_bucket(M), N, K)
            best_configs[key] = best
            args.sweep_rows.append((N, K, M, best_us, floor, best))
            lines.append(
                f'    ("forward", {L._m_bucket(M)}, {N}, {K}): {best!r},  # {best_us:.1f} us, '
                f"default {default_us:.1f} us, {100 * floor / best_us:.0f}% of floor"
            )
        del wcopies
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print("\nCONFIGS entries for gsq_torch/ops/linear.py:")
    print("\n".join(lines), flush=True)
    return best_configs


def run(args, device: torch.device, shapes, tokens) -> tuple[list[dict[str, Any]], list[str]]:
    rows, notes = [], []
    budget = args.copy_budget_gb * 1e9
    ours = _ours(device)
    for N, K in shapes:
        weight, scale = make_weight(N, K, device)
        w_bf16 = format.dequantize(weight, scale, torch.bfloat16)
        xs = {M: torch.randn(M, K, device=device).to(torch.bfloat16) for M in tokens}
        print(
            f"[{N} x {K}] packed {packed_bytes(N, K) / 1e6:.2f} MB, bf16 {N * K * 2 / 1e6:.2f} MB", flush=True
        )
        wrong = set()
        for M in tokens:  # correctness first: a fast wrong kernel is not a result
            try:
                ref = L.linear_reference(xs[M].float(), weight, scale)
                err = common.rel_err(ours(xs[M], weight, scale), ref)
            except Exception as exc:  # noqa: BLE001 - report and go on with the other M
                err = float("nan")
                print(f"  {N}x{K} M={M}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            ok = err <= REL_TOL
            if not ok:
                wrong.add(M)
            notes.append(
                f"check {N}x{K} M={M}: rel err vs linear_reference {err:.2e} ({'ok' if ok else 'FAIL'})"
            )
            if not ok:
                print(f"  {notes[-1]}: WRONG RESULT, not timed")
        n_ours = _n_copies(packed_bytes(N, K), device, budget)
        n_bf16 = _n_copies(N * K * 2, device, budget)
        ours_copies = common.make_copies((weight, scale), n_ours)
        bf16_copies = common.make_copies((w_bf16,), n_bf16)
        for M in tokens:
            if M in wrong:
                continue
            x = xs[M]
            row: dict[str, Any] = {"N": N, "K": K, "M": M}
            try:
                fns = [lambda w=w, s=s, x=x: ours(x, w, s) for w, s in ours_copies]
                t = common.time_or_wall(fns, device, args.replays)
                row.update(ours_us=t.us, ours_mode=f"{t.mode}x{t.calls_per_graph}/{n_ours}c")
                fns = [lambda w=w, x=x: F.linear(x, w) for (w,) in bf16_copies]
                t = common.time_or_wall(fns, device, args.replays)
                row.update(bf16_us=t.us, bf16_mode=f"{t.mode}x{t.calls_per_graph}/{n_bf16}c")
            except Exception as exc:  # noqa: BLE001 - report and go on
                notes.append(f"{N}x{K} M={M} failed: {type(exc).__name__}: {exc}")
                traceback.print_exc()
                continue
            act = 2 * M * (N + K)  # bf16 x in, y out
            floor = common.byte_floor_us(packed_bytes(N, K) + act, args.bandwidth)
            bf16_floor = common.byte_floor_us(N * K * 2 + act, args.bandwidth)
            row.update(
                speedup=row["bf16_us"] / row["ours_us"],
                floor_us=floor,
                ours_pct_floor=100 * floor / row["ours_us"],
                ours_GBps=(packed_bytes(N, K) + act) / row["ours_us"] / 1e3,
                bf16_pct_floor=100 * bf16_floor / row["bf16_us"],
                config=_describe(L.pick_config("forward", M, N, K)),
            )
            rows.append(row)
            print(
                f"  M={M:>5}: ours {row['ours_us']:9.2f} us  bf16 {row['bf16_us']:9.2f} us  "
                f"x{row['speedup']:5.2f}  {row['ours_pct_floor']:5.1f}% of floor  ({row['config']})",
                flush=True,
            )
        del ours_copies, bf16_copies, w_bf16
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, notes


def print_sweep_summary(args, rows: list[dict[str, Any]]) -> None:
    """The --sweep result in one short table: best candidate per point, then the op vs F.linear."""
    print("\nsweep winners (candidate timing; table run below it):")
    head = ("shape", "M", "best us", "%floor", "op us", "bf16 us", "x bf16")
    print("{:>10} {:>3} {:>8} {:>6} {:>7} {:>8} {:>6}  config".format(*head))
    by_point = {(r["N"], r["K"], r["M"]): r for r in rows}
    for N, K, M, us, floor, cfg in getattr(args, "sweep_rows", []):
        r = by_point.get((N, K, M), {})
        print(
            f"{N:>5}x{K:<5} {M:>3} {us:8.2f} {100 * floor / us:6.1f} {r.get('ours_us', float('nan')):7.2f} "
            f"{r.get('bf16_us', float('nan')):8.2f} {r.get('speedup', float('nan')):6.2f}  {_describe(cfg)}"
        )


def check_targets(rows: list[dict[str, Any]]) -> list[str]:
    """Issue 2's targets for 8192 x 8192, as lines saying met / NOT met (or not measured)."""
    big = {r["M"]: r for r in rows if (r["N"], r["K"]) == (8192, 8192)}
    out = []
    if 1 in big:
        r = big[1]
        ok = r["speedup"] >= 5 and r["ours_pct_floor"] >= 60
        out.append(
            f"target 8192x8192 M=1: >= 5x BF16 and >= 60% of floor: x{r['speedup']:.2f}, "
            f"{r['ours_pct_floor']:.0f}% -> {'met' if ok else 'NOT met'}"
        )
    if 4096 in big:
        r = big[4096]
        ratio = r["ours_us"] / r["bf16_us"]
        out.append(
            f"target 8192x8192 M=4096: <= 1.25x BF16 time: {ratio:.2f}x -> {'met' if ratio <= 1.25 else 'NOT met'}"
        )
    return out


def _sustained_loop(fn: Callable, seconds: float) -> tuple[float, float, float]:
    """Run ``fn`` eagerly for about ``seconds``; returns (µs per call, mean SM MHz, mean W) while it ran."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    calls = max(10, int(seconds / max(time.perf_counter() - start, 1e-6)))
    query = ["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits", "-lms", "50",
             f"--id={torch.cuda.current_device()}"]
    smi = subprocess.Popen(query, stdout=subprocess.PIPE, text=True)
    time.sleep(0.3)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    smi.terminate()
    samples = [line.split(", ") for line in smi.communicate()[0].splitlines() if line.count(",") == 1]
    busy = samples[6:-2] or samples or [["nan", "nan"]]  # drop the idle samples at both ends
    mhz = sum(float(s[0]) for s in busy) / len(busy)
    watts = sum(float(s[1]) for s in busy) / len(busy)
    return begin.elapsed_time(end) * 1e3 / calls, mhz, watts


def sustained(seconds: float, device: torch.device) -> int:
    """8192 x 8192, M = 4096: ours and F.linear in long eager loops, with clocks and power (``--sustained``)."""
    if device.type != "cuda":
        print("--sustained needs a CUDA device")
        return 2
    N = K = 8192
    M = 4096
    weight, scale = make_weight(N, K, device)
    dense = format.dequantize(weight, scale, torch.bfloat16)
    x = torch.randn(M, K, device=device).to(torch.bfloat16)
    err = common.rel_err(L.linear(x, weight, scale), x.float() @ dense.float().T)
    print(f"8192x8192 M=4096, {L.pick_config('forward', M, N, K).kernel} kernel, rel err {err:.1e}")
    results = {}
    for name, fn in [("bf16", lambda: F.linear(x, dense)), ("ours", lambda: L.linear(x, weight, scale))] * 2:
        us, mhz, watts = _sustained_loop(fn, seconds)
        results[name] = us
        print(f"  {name}: {us:8.1f} us per call at {mhz:5.0f} MHz, {watts:4.0f} W", flush=True)
    print(f"ours / bf16 (second rounds): {results['ours'] / results['bf16']:.2f}x")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", help="weight shapes OUTxIN (default: 512x2048 2048x512 8192x8192)")
    p.add_argument("--tokens", nargs="+", type=int, help=f"values of M (default: {TOKENS})")
    p.add_argument("--out", default=None, help="results folder (default: benchmarks/results)")
    p.add_argument("--replays", type=int, default=20)
    p.add_argument("--copy-budget-gb", type=float, default=4.0, help="memory for rotated weight copies")
    p.add_argument("--tune", action="store_true", help="time candidate kernel configs, print CONFIGS lines")
    p.add_argument(
        "--tune-points",
        nargs="+",
        help="OUTxIN:M,M,... points to tune (default: 8192x8192:1,16,4096 and 1,16,256 for the experts)",
    )
    p.add_argument("--bench", action="store_true", help="with --tune: then the table, using the winners")
    p.add_argument(
        "--sweep",
        action="store_true",
        help="decode study: the sweep_candidates grid at M = 1, 4, 16 on the three shapes, then the table",
    )
    p.add_argument(
        "--sweep-new",
        action="store_true",
        help="the 'decode' kernel's candidates vs the table config and F.linear (8192x8192 M = 1, 4, 16; "
        "experts M = 1)",
    )
    p.add_argument(
        "--ablate",
        action="store_true",
        help="decode kernel ablations at 8192x8192, M = 1 and 16 (timing-only variants; about 30 s)",
    )
    p.add_argument(
        "--sustained",
        type=float,
        metavar="SECONDS",
        help="instead of the table: 8192x8192 at M = 4096, ours and F.linear each in an eager loop of about "
        "SECONDS, with the SM clock and power nvidia-smi reports meanwhile (clocks set the ratio there)",
    )
    p.add_argument("--quick", action="store_true", help="half the replays (a short GPU session)")
    p.add_argument(
        "--jobs", type=int, default=min(16, os.cpu_count() or 1), help="parallel compile processes"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="tiny shapes on the CPU under the Triton interpreter"
    )
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    if device.type != "cuda" and not args.dry_run:
        print("no CUDA device: use --dry-run for the CPU path")
        return 2
    shapes = (
        [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
        if args.shapes
        else (DRY_SHAPES if args.dry_run else SHAPES)
    )
    tokens = args.tokens or (DRY_TOKENS if args.dry_run else TOKENS)
    cands = None
    if args.sweep:  # the decode study: its own points, shapes and tokens, then the table
        args.tune, args.bench, args.quick, cands = True, True, True, sweep_candidates
        if not args.dry_run:
            shapes, tokens = list(SWEEP_POINTS), sorted({m for ms in SWEEP_POINTS.values() for m in ms})
    if args.sweep_new:
        args.sweep, args.tune, args.bench, args.quick, cands = True, True, True, True, decode_candidates
    torch.manual_seed(0)
    if device.type == "cuda":
        args.bandwidth = common.copy_bandwidth_gbs()
        print(
            f"card: {torch.cuda.get_device_name()}  copy bandwidth {args.bandwidth:.0f} GB/s  "
            f"L2 {common.l2_bytes() / 2**20:.0f} MiB",
            flush=True,
        )
    else:
        args.bandwidth = float("nan")
        print("dry run on CPU: tiny shapes, interpreted kernels, wall-clock timings (meaningless)")

    if args.quick:
        args.replays = max(5, args.replays // 2)
    if args.sustained:
        return sustained(args.sustained, device)
    if args.ablate:
        args.replays = min(args.replays, 10)
        return ablate(args, device)
    points = SWEEP_NEW_POINTS if args.sweep_new else SWEEP_POINTS if args.sweep else TUNE_POINTS
    if args.tune_points:
        points = {}
        for item in args.tune_points:
            shape, ms = item.lower().split(":")
            points[tuple(int(v) for v in shape.split("x"))] = [int(m) for m in ms.split(",")]
    if args.dry_run:  # tiny shapes only
        points = {shape: [1, 3, 16] if args.sweep else [1, 16] for shape in shapes}
    if device.type == "cuda" and args.jobs > 1:
        tasks = _tune_tasks(points, cands) if args.tune else []
        if args.sweep_new:
            pass  # the table run below uses the winners, compiled as candidates
        elif not args.tune or args.bench:
            tasks += [(N, K, M, L.pick_config("forward", M, N, K)) for N, K in shapes for M in tokens]
        precompile(tasks, args.jobs)
    if args.tune:
        best = tune(args, device, points, cands)
        if not args.bench:
            return 0
        L.CONFIGS.update(best)  # the table below runs with the winners
    if args.sweep_new:  # the table at the swept points only
        rows, notes = [], []
        for shape, ms in points.items():
            r, n = run(args, device, [shape], ms)
            rows, notes = rows + r, notes + n
    else:
        rows, notes = run(args, device, shapes, tokens)
    targets = check_targets(rows)
    if args.sweep:
        print_sweep_summary(args, rows)
    for line in targets:
        print(line)
    env = common.env_info()
    preamble = "\n".join(
        [
            f"## gsq::linear vs BF16 F.linear on {env['card']}",
            "",
            (
                f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, commit {env['commit']}, "
                f"{env['timestamp']}. Copy bandwidth {args.bandwidth:.0f} GB/s (read + write). CUDA graphs, weights "
                f"rotated over copies so a graph reads > {common.L2_MULTIPLE}x L2. Floor = (packed weight + scales + "
                "x + y bytes) / copy bandwidth."
            ),
            "",
            *[f"- {line}" for line in targets],
        ]
    )
    columns = [
        "N",
        "K",
        "M",
        "ours_us",
        "bf16_us",
        "speedup",
        "floor_us",
        "ours_pct_floor",
        "ours_GBps",
        "bf16_pct_floor",
        "config",
    ]
    csv_path, md_path = common.write_results(
        [{**env, **r} for r in rows], "linear", args.out, columns, preamble
    )
    with open(md_path, "a") as f:
        f.write("\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    print(f"wrote {csv_path} and {md_path}")
    bad = [n for n in notes if "FAIL" in n or "failed" in n]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
