"""Which way of reading a packed 2-bit weight reaches the copy bandwidth? (GPU, timing only.)

Every kernel here only *reads* an int32 ``[N, K / 16]`` weight (the 8192 x 8192 layer: 16.8 MB) and
folds the words into one xor per program, so its time is the cost of the access pattern alone — the
floor any GEMV or decode kernel built on that pattern starts from. Patterns:

- ``rows``: a program reads ``R`` whole rows (R x 2 KB, contiguous) with one ``tl.load``, no loop.
- ``kloop``: a program owns ``R`` rows and walks K in chunks of ``C`` words (``num_stages`` given to
  Triton's pipeliner; it pipelines loads that feed a dot, maybe not these).
- ``rowloop``: a program owns a K chunk of ``C`` words and walks ``T`` row tiles of 64 rows (the
  linear "decode" kernel's order), the next tile loaded one step ahead by hand.
- ``tma``: a program owns 64 (128) rows and ``K / S`` inputs, read as ``[rows, C]`` boxes through a
  host tensor descriptor (TMA) in a loop pipelined ``num_stages`` deep.

Usage (GPU): ``python3 benchmarks/probe_loads.py``; prints one line per pattern: µs, and % of the
measured copy bandwidth. ``TRITON_INTERPRET=1 ... --dry-run`` runs each kernel once on the CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
import triton
import triton.language as tl


@triton.jit
def _rows_kernel(w_ptr, out_ptr, KW: tl.constexpr, R: tl.constexpr):
    r = tl.program_id(0) * R + tl.arange(0, R)
    w = tl.load(w_ptr + r[:, None] * KW + tl.arange(0, KW)[None, :])
    tl.store(out_ptr + tl.program_id(0), tl.xor_sum(tl.xor_sum(w, axis=1), axis=0))


@triton.jit
def _kloop_kernel(w_ptr, out_ptr, KW: tl.constexpr, R: tl.constexpr, C: tl.constexpr, S: tl.constexpr):
    r = tl.program_id(0) * R + tl.arange(0, R)
    kw0 = tl.program_id(1) * (KW // S)
    acc = tl.zeros((R, C), tl.int32)
    for c0 in range(kw0, kw0 + KW // S, C):
        acc ^= tl.load(w_ptr + r[:, None] * KW + (c0 + tl.arange(0, C))[None, :])
    tl.store(out_ptr + tl.program_id(0) * S + tl.program_id(1), tl.xor_sum(tl.xor_sum(acc, axis=1), axis=0))


@triton.jit
def _rowloop_kernel(w_ptr, out_ptr, KW: tl.constexpr, C: tl.constexpr, T: tl.constexpr):
    r = tl.program_id(0) * (64 * T) + tl.arange(0, 64)
    ptrs = w_ptr + r[:, None] * KW + (tl.program_id(1) * C + tl.arange(0, C))[None, :]
    acc = tl.zeros((64, C), tl.int32)
    nxt = tl.load(ptrs)
    for t in range(1, T + 1):
        cur = nxt
        nxt = tl.load(ptrs + tl.minimum(t, T - 1) * 64 * KW)
        acc ^= cur
    tl.store(out_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1),
             tl.xor_sum(tl.xor_sum(acc, axis=1), axis=0))


@triton.jit
def _tma_kernel(desc, out_ptr, KW: tl.constexpr, R: tl.constexpr, C: tl.constexpr, S: tl.constexpr):
    r0 = tl.program_id(0) * R
    kw0 = tl.program_id(1) * (KW // S)
    acc = tl.zeros((R, C), tl.int32)
    for c0 in range(kw0, kw0 + KW // S, C):
        acc ^= desc.load([r0, c0])
    tl.store(out_ptr + tl.program_id(0) * S + tl.program_id(1), tl.xor_sum(tl.xor_sum(acc, axis=1), axis=0))


def patterns():
    """(name, launch(w, out)) for every pattern."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    out = []
    for R, warps in ((4, 4), (8, 4), (16, 4), (16, 8), (32, 8)):
        out.append((f"rows R={R} w{warps}", lambda w, o, R=R, wp=warps: _rows_kernel[(w.shape[0] // R,)](
            w, o, KW=w.shape[1], R=R, num_warps=wp)))
    for R, C, S, st, wp in ((16, 64, 1, 3, 4), (16, 64, 1, 1, 4), (64, 32, 4, 3, 4), (64, 32, 4, 4, 4),
                            (32, 32, 2, 4, 4), (64, 64, 4, 3, 8)):
        out.append((f"kloop R={R} C={C} S={S} st{st} w{wp}",
                    lambda w, o, R=R, C=C, S=S, st=st, wp=wp: _kloop_kernel[(w.shape[0] // R, S)](
                        w, o, KW=w.shape[1], R=R, C=C, S=S, num_warps=wp, num_stages=st)))
    for C, T in ((32, 4), (32, 8), (64, 4), (128, 2)):
        out.append((f"rowloop C={C} T={T}", lambda w, o, C=C, T=T: _rowloop_kernel[
            (w.shape[0] // (64 * T), w.shape[1] // C)](w, o, KW=w.shape[1], C=C, T=T, num_warps=4)))
    for R, C, S, st, wp in ((64, 32, 4, 3, 4), (64, 32, 4, 5, 4), (64, 32, 2, 4, 4), (128, 32, 4, 4, 4),
                            (64, 64, 4, 3, 4), (64, 32, 8, 3, 4), (32, 32, 4, 4, 4)):
        def launch(w, o, R=R, C=C, S=S, st=st, wp=wp):
            desc = TensorDescriptor.from_tensor(w, [R, C])
            _tma_kernel[(w.shape[0] // R, S)](desc, o, KW=w.shape[1], R=R, C=C, S=S, num_warps=wp,
                                              num_stages=st)
        out.append((f"tma R={R} C={C} S={S} st{st} w{wp}", launch))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--k", type=int, default=8192)
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()
    if args.dry_run:
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("--dry-run needs TRITON_INTERPRET=1 in the environment (set before triton is imported)")
        w = torch.randint(-2**31, 2**31 - 1, (256, 512), dtype=torch.int32)
        o = torch.zeros(4096, dtype=torch.int32)
        for name, launch in patterns():
            launch(w, o)
            print("ran", name)
        return
    from common import byte_floor_us, copies_needed, copy_bandwidth_gbs, make_copies, time_us

    gbs = copy_bandwidth_gbs()
    w = torch.randint(-2**31, 2**31 - 1, (args.n, args.k // 16), dtype=torch.int32, device="cuda")
    nbytes = w.numel() * 4
    sets = make_copies([w], copies_needed(nbytes, nbytes))
    o = torch.zeros(1 << 16, dtype=torch.int32, device="cuda")
    floor = byte_floor_us(nbytes, gbs)
    print(f"copy {gbs:.0f} GB/s, {nbytes / 1e6:.1f} MB -> floor {floor:.2f} us, {len(sets)} copies")
    for name, launch in patterns():
        try:
            t = time_us([lambda ws=ws, launch=launch: launch(ws[0], o) for ws in sets])
            print(f"{name:32s} {t.us:8.2f} us {100 * floor / t.us:6.1f} % {t.mode}")
        except Exception as exc:  # noqa: BLE001 - a pattern that does not compile is reported, not fatal
            print(f"{name:32s} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:150]}")


if __name__ == "__main__":
    main()
