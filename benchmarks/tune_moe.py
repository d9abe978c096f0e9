"""Time candidate gsq::fused_moe configs per token count on a GPU; print the winners as FORWARD_CONFIGS.

One Qwen3.6 layer (E=256, H=2048, I=512, K=8), the inputs of bench_moe. For each T, every
candidate of ``candidates(T)`` (the current bucket's config first) is checked against
``fused_moe_reference`` (max abs error / max |ref| <= 2e-2, finite) and timed as bench_moe times
``ours`` (CUDA-graph replays, weights rotated out of L2, alignment included). Then, per T, the
ranking and a per-kernel time split of the winner (torch.profiler); last, a ready-to-paste
``FORWARD_CONFIGS`` and, with ``--compare``, the winners against humming-kernels (driven as in
bench_moe; needs ``bash benchmarks/gpu_check.sh install`` first) and the byte floor. About 3 minutes
on an H100 / H200, Triton compiles included; each T gets its share of ``--budget-s`` for candidates
after its first (unused time passes on). Writes ``tune_moe.json`` to ``--out``.

    python3 benchmarks/tune_moe.py --compare --out $OUT
    python3 benchmarks/tune_moe.py --tokens 1 4 16 --budget-s 60
    python3 benchmarks/tune_moe.py --tokens 64 256 --configs "False, block_n=128"   # given configs
    python3 benchmarks/tune_moe.py --dry-run      # CPU, interpreter, tiny shapes: the code path only

``--decode`` is a quicker sweep of the decode (GEMV) path only, made to fit one GPU call of
about 3 minutes: at T = 1, 4, 8, 16, 32 the current bucket config and every ``DECODE_CANDIDATES``
entry are checked (against the reference, and bitwise equal over two runs), timed, and printed
as one table of us per forward (best per T marked), with the per-kernel split of the current
and the best config at T = 1 and 4:

    python3 benchmarks/tune_moe.py --decode --out $OUT

``--mma`` (with ``--decode``) sweeps the decode on tensor cores (``ForwardConfig.mma``) instead:
at T = 4, 8, 16, 32 the current bucket, the best GEMV and grouped configs so far and every
``MMA_CANDIDATES`` entry, checked and timed the same way (all configs compiled first, then
``--budget-s`` paces the timings; about 70 s in all on an H100 / H200, 20-40 s of it compiles):

    python3 benchmarks/tune_moe.py --decode --mma --budget-s 30 --out $OUT

``--ablate`` times where the tensor-core decode's time goes (about 30-40 s with compiles, which run
first in ``--jobs`` parallel processes): at T = 4 and 16 the current bucket config (checked against
the reference) and timing-only variants of it (``ForwardConfig.ablate`` bits, unchecked: their
results are wrong) and of its tile shapes, each as us per forward (CUDA graphs, weights rotated out
of L2) and per kernel (torch.profiler over one eager call per weight copy, so L2-cold too):

    python3 benchmarks/tune_moe.py --ablate --out $OUT
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common
from bench_moe import QWEN36, TINY, HummingMoE, align_block, make_routing, make_weights

from gsq_torch.ops import moe
from gsq_torch.ops.moe import ForwardConfig as C

TOKENS = [1, 4, 16, 64, 256, 1024, 4096]
REL_TOL = 2e-2


def _decode(rows: int, warps: int, rows_down: int, warps_down: int, pdl: bool = False) -> C:
    return C(True, block_n=rows, block_n_down=rows_down, num_warps=warps, num_warps_down=warps_down, pdl=pdl)


# The --decode sweep: rows / warps of gate_up and of down, with and without the programmatic
# dependent launch of down. Fewer rows per program mean more programs (more warps per SM to
# hide latency; down has only H / 16 = 128 programs per token at 16 rows) but more
# instructions per code (activations and the reduction are shared by fewer rows).
DECODE_CANDIDATES = [
    _decode(8, 4, 16, 4), _decode(16, 4, 32, 8),  # the T = 1 and T = 4 buckets before PDL
    _decode(8, 4, 16, 4, True), _decode(16, 4, 32, 8, True), _decode(16, 4, 16, 4, True),
    _decode(8, 4, 8, 4, True), _decode(4, 4, 8, 4, True), _decode(8, 4, 16, 8, True),
    _decode(16, 8, 16, 4, True), _decode(4, 4, 4, 4, True), _decode(16, 4, 8, 4, True),
]
DECODE_TOKENS = [1, 4, 8, 16, 32]


def _mma(rows: int, warps: int, rows_down: int, warps_down: int, block_m: int = 16, pdl: bool = True,
         stages: int = 3, pair: bool = False) -> C:
    return C(True, block_m=block_m, block_n=rows, block_n_down=rows_down, num_warps=warps,
             num_warps_down=warps_down, num_stages=stages, pdl=pdl, mma=True, pair=pair)


# The --decode --mma sweep. gate_up: `rows` gate and as many up rows per program (2 * rows MMA
# rows over `warps`); down: `rows_down` MMA rows = 8 slots x rows_down / 8 output features.
# block_m stays 16: with triton 3.6 an N side of 8 falls back to mma.sync with a register
# shuffle of the unpacked tile (3x the loop's instructions; 3.9 keeps wgmma). All compile for
# sm_90 with no spills (71-123 registers).
MMA_BASELINES = [_decode(16, 4, 32, 8, True), C(False, block_n_down=128, num_stages=4)]
MMA_CANDIDATES = [
    _mma(64, 4, 64, 4),  # 1.5 loop instructions per code, 256 gate_up programs at T = 4
    _mma(64, 8, 128, 8),  # 2.0 per code, twice the warps per program
    _mma(32, 4, 64, 4),  # 2.0 per code, 512 gate_up programs at T = 4
    _mma(128, 8, 128, 8),  # 1.5 per code, 8 warps, 128 programs at T = 4
    _mma(64, 4, 128, 8),
    _mma(64, 4, 64, 4, pdl=False),  # what the early launch of down buys
    _mma(64, 4, 64, 4, pair=True),  # 2 slots of one expert per gate_up program: ~22% fewer at T = 16
    _mma(64, 8, 128, 8, pair=True),
    # 1-2 warps: mma.sync, both operands in registers, no wgmma wait per group (as the linear "lines")
    _mma(32, 2, 32, 2), _mma(32, 2, 32, 2, pair=True), _mma(16, 1, 16, 1), _mma(32, 2, 64, 4),
    _mma(64, 2, 32, 2), _mma(32, 2, 16, 1), _mma(64, 2, 64, 4), _mma(64, 2, 32, 2, pair=True),
    # x permuted once by a prep launch, gate_up's B operand then by cp.async (no per-group staging)
    dataclasses.replace(_mma(64, 4, 64, 4), prep=True), dataclasses.replace(_mma(64, 2, 64, 4, pair=True), prep=True),
    # prep with mma.sync gate_up and / or down
    dataclasses.replace(_mma(32, 2, 32, 2), prep=True), dataclasses.replace(_mma(64, 2, 64, 2), prep=True),
    dataclasses.replace(_mma(64, 4, 32, 2), prep=True), dataclasses.replace(_mma(64, 2, 64, 2, pair=True), prep=True),
    dataclasses.replace(_mma(32, 2, 64, 4, pair=True), prep=True),
]
MMA_TOKENS = [4, 8, 16, 32]


def _grouped(bm: int, bn: int, bnd: int, warps: int, warps_down: int, stages: int, sad: bool = True) -> C:
    return C(False, bm, bn, bnd, warps, warps_down, stages, scale_after_dot=sad)


def candidates(T: int, K: int) -> list[C]:
    """Configs worth timing at T tokens; the current bucket's first. All compile without spills
    (sm_90 resource report): the decode GEMVs at <= 161 registers, the grouped kernels below 255."""
    slots = T * K
    out = [moe.forward_config(slots)]
    if slots <= 128:  # decode (GEMV) path: rows per program and warps of gate_up / down
        out += [_decode(16, 4, 16, 4), _decode(8, 4, 16, 4), _decode(16, 4, 32, 8), _decode(32, 4, 16, 4)]
    if 32 <= slots <= 4096:  # ~1-16 slots per expert: one block of 16 holds an expert's slots
        out += [_grouped(16, 64, 64, 4, 4, 4), _grouped(16, 128, 128, 4, 4, 4),
                _grouped(16, 64, 128, 4, 4, 4)]
        # mma.sync (1-2 warps) on 8-slot blocks: ~1-8 slots per expert without padding to 16
        out += [_grouped(8, 64, 128, 2, 2, 3), _grouped(8, 64, 128, 2, 2, 4), _grouped(8, 64, 64, 2, 2, 3),
                _grouped(8, 64, 256, 2, 2, 3), _grouped(8, 128, 128, 2, 2, 3), _grouped(16, 64, 128, 2, 2, 3)]
    if 512 <= slots <= 4096:
        out += [_grouped(16, 128, 128, 4, 4, 3), _grouped(16, 128, 64, 4, 4, 4)]
    if 4096 <= slots <= 16384:  # ~32 slots per expert
        out += [_grouped(32, 64, 64, 4, 4, 4), _grouped(32, 128, 128, 8, 8, 4),
                _grouped(32, 64, 128, 4, 4, 3)]
    if slots >= 8192:  # compute-bound: scale the operand, not the fp32 partials
        out += [_grouped(64, 128, 128, 8, 8, 3, False), _grouped(64, 64, 64, 4, 4, 3, False),
                _grouped(64, 128, 128, 8, 8, 4, False)]
        # wider N side (128 slots, ~1 block per expert at T = 4096) and mixed gate_up / down tiles
        out += [_grouped(128, 64, 64, 4, 4, 3, False), _grouped(128, 128, 128, 8, 8, 3, False),
                _grouped(64, 64, 128, 4, 8, 3, False), _grouped(64, 128, 64, 8, 4, 3, False),
                _grouped(64, 64, 64, 4, 4, 4, False), _grouped(32, 64, 64, 4, 4, 3, False)]
    if 8192 <= slots <= 16384:  # ~32-64 slots per expert: N sides of 16-32 without padding blocks
        out += [_grouped(16, 64, 64, 4, 4, 3, False), _grouped(16, 64, 64, 4, 4, 4, False),
                _grouped(32, 64, 64, 4, 4, 4, False), _grouped(32, 64, 64, 4, 4, 2, False),
                _grouped(32, 128, 64, 8, 4, 3, False), _grouped(32, 64, 128, 4, 8, 3, False)]
        out += [dataclasses.replace(_grouped(32, 64, 64, 4, 4, 3, False), group_m=g) for g in (1, 4, 16)]
    if slots >= 32768:
        out += [_grouped(128, 64, 64, 4, 4, 4, False), _grouped(128, 64, 64, 4, 4, 2, False),
                _grouped(64, 64, 64, 4, 4, 2, False)]
    if slots >= 8192:  # wider down tiles: each down program re-reads its slots' act' per feature tile
        bm = 32 if slots < 32768 else 64
        out += [_grouped(bm, 64, 128, 4, 4, 3, False), _grouped(bm, 64, 256, 4, 8, 3, False),
                _grouped(bm, 64, 128, 4, 4, 4, False)]
    if slots >= 32768:
        out += [_grouped(32, 128, 128, 8, 8, 4)]
    return list(dict.fromkeys(out))


def _short(cfg: C) -> str:
    if cfg.decode and cfg.mma:
        return (f"mma gate_up {cfg.block_n}r/{cfg.num_warps}w down {cfg.block_n_down}r/{cfg.num_warps_down}w "
                f"bm{cfg.block_m} s{cfg.num_stages}{' pdl' if cfg.pdl else ''}{' pair' if cfg.pair else ''}"
                f"{' prep' if cfg.prep else ''}")
    if cfg.decode:
        return (f"decode gate_up {cfg.block_n}r/{cfg.num_warps}w "
                f"down {cfg.block_n_down}r/{cfg.num_warps_down}w{' pdl' if cfg.pdl else ''}")
    return (f"grouped bm{cfg.block_m} bn{cfg.block_n}/{cfg.block_n_down} "
            f"w{cfg.num_warps}/{cfg.num_warps_down} "
            f"s{cfg.num_stages}{' sad' if cfg.scale_after_dot else ''}"
            f"{f' gm{cfg.group_m}' if cfg.group_m != C.group_m else ''}")


def _repr(cfg: C) -> str:
    """``ForwardConfig(...)`` with the fields that differ from the defaults (paste-able)."""
    default = C(cfg.decode)
    kw = [f"{f.name}={getattr(cfg, f.name)!r}" for f in dataclasses.fields(C)[1:]
          if getattr(cfg, f.name) != getattr(default, f.name)]
    return f"ForwardConfig({', '.join([repr(cfg.decode)] + kw)})"


def _kernel_split(fn) -> str:
    """GPU time per kernel of one eager call (median-free: the sum over 3 calls / 3), by name."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    parts = {}
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0.0)
        if us > 0:
            parts[ev.key] = parts.get(ev.key, 0.0) + us / 3
    top = sorted(parts.items(), key=lambda kv: -kv[1])[:8]
    return ", ".join(f"{k.split('(')[0][:28]} {v:.1f}" for k, v in top)


def decode_sweep(args, shape, dev, bw, time_us, t_start: float) -> None:
    """The ``--decode`` sweep (see the module docstring); writes ``tune_moe_decode.json``."""
    weights = make_weights(shape, dev)
    copy_bytes = shape.E * shape.expert_bytes()
    copies = [weights]
    extra = MMA_BASELINES + MMA_CANDIDATES if args.mma else DECODE_CANDIDATES
    cfgs = list(dict.fromkeys([moe.forward_config(T * shape.K) for T in args.tokens] + extra))
    table: dict[C, dict[int, str]] = {c: {} for c in cfgs}
    results, floors, best = [], {}, {}
    t_total = t_start
    if args.mma:  # compile every config first: --budget-s then paces the timings only
        x, idx, w = make_routing(args.tokens[0], shape, dev, seed=0)
        for cfg in cfgs:
            try:
                moe.fused_moe_triton(x, idx, w, *weights, config=cfg)
            except Exception as exc:  # noqa: BLE001 - reported again when the config is timed
                print(f"  compile FAIL {_short(cfg)}: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        print(f"# compiled {len(cfgs)} configs in {time.perf_counter() - t_start:.0f} s", flush=True)
        t_start = time.perf_counter()
    for ti, T in enumerate(args.tokens):
        deadline = t_start + args.budget_s * (ti + 1) / len(args.tokens)  # unused time passes on
        x, idx, w = make_routing(T, shape, dev, seed=1000 + T)
        ref = moe.fused_moe_reference(x, idx, w, *weights)
        touched = int(idx.unique().numel())
        n = common.copies_needed(touched * shape.expert_bytes(), copy_bytes) if dev.type == "cuda" else 1
        while len(copies) < n:
            copies.append(tuple(t.clone() for t in weights))
        floors[T] = common.byte_floor_us(touched * shape.expert_bytes(), bw)
        current = moe.forward_config(T * shape.K)
        for cfg in [current] + [c for c in cfgs if (c.decode or args.mma) and c != current]:
            if cfg != current and time.perf_counter() > deadline:
                table[cfg][T] = "skip"
                continue
            try:
                out = moe.fused_moe_triton(x, idx, w, *weights, config=cfg)
                again = moe.fused_moe_triton(x, idx, w, *weights, config=cfg)
                err = common.rel_err(out, ref)
                if not math.isfinite(err) or err > REL_TOL:
                    raise ValueError(f"rel err {err:.2e}")
                if not torch.equal(out, again):
                    raise ValueError("two runs differ")
                us = time_us([lambda c=c, cfg=cfg, x=x, idx=idx, w=w: moe.fused_moe_triton(x, idx, w, *c, config=cfg)
                              for c in copies[:n]])
            except Exception as exc:  # noqa: BLE001 - report a failing candidate, go on
                table[cfg][T] = "FAIL"
                print(f"  T={T} FAIL {_short(cfg)}: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
                results.append({"T": T, "config": dataclasses.asdict(cfg), "error": f"{exc}"[:300]})
                continue
            table[cfg][T] = f"{us:.1f}"
            results.append({"T": T, "config": dataclasses.asdict(cfg), "us": us, "rel_err": err})
            if T not in best or us < best[T][0]:
                best[T] = (us, cfg)
        if not args.no_profile and T in ((4, 16) if args.mma else (1, 4)) and T in best:
            for label, cfg in (("current", current), ("best", best[T][1])):
                try:
                    split = _kernel_split(lambda cfg=cfg, x=x, idx=idx, w=w: moe.fused_moe_triton(
                        x, idx, w, *weights, config=cfg))
                    print(f"  T={T} {label} ({_short(cfg)}) kernels us: {split}", flush=True)
                except Exception as exc:  # noqa: BLE001 - a diagnostic only
                    print(f"  (no kernel split: {type(exc).__name__}: {str(exc)[:120]})")

    # The table last: the reply shows the end of the output.
    Ts = [T for T in args.tokens if T in floors]
    print("\n# decode sweep, us per layer forward (* best of the column)")
    head = f"{'config':<48}" + "".join(f"{'T=' + str(T):>9}" for T in Ts)
    print(head)
    print(f"{'byte floor':<48}" + "".join(f"{floors[T]:>9.1f}" for T in Ts))
    print(f"{'current bucket':<48}" + "".join(f"{table[moe.forward_config(T * shape.K)].get(T, '-'):>9}"
                                               for T in Ts))
    for cfg in cfgs:
        name = _short(cfg).replace("decode gate_up ", "gu ").replace("mma gate_up ", "mma gu ")
        cells = []
        for T in Ts:
            v = table[cfg].get(T, "-")
            cells.append(" " + f"{v + ('*' if T in best and best[T][1] == cfg else ''):>8}")
        print(f"{name[:47]:<48}" + "".join(cells))
    for T in Ts:
        if T in best:
            print(f"best T={T}: {best[T][0]:.1f} us  {_repr(best[T][1])}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        path = Path(args.out) / ("tune_moe_mma.json" if args.mma else "tune_moe_decode.json")
        path.write_text(json.dumps({"env": common.env_info(), "copy_GBps": bw, "floors_us": floors,
                                    "results": results}, indent=1))
        print(f"wrote {path}")
    print(f"# total {time.perf_counter() - t_total:.0f} s")


ABLATE_TOKENS = [4, 16]


def ablate_variants(base: C) -> list[tuple[str, C]]:
    """(label, config) of the --ablate run; the first (the current config) is the only one checked."""
    r = dataclasses.replace
    return [
        ("current", base),
        ("gu no wgmma (unpack kept)", r(base, ablate=moe.ABLATE_GU_NO_MMA)),
        ("gu loads only (no unpack)", r(base, ablate=moe.ABLATE_GU_LOADS_ONLY)),
        ("gu no act'/qact stores", r(base, ablate=moe.ABLATE_GU_NO_STORE)),
        ("gu no x loads", r(base, ablate=moe.ABLATE_GU_NO_X)),
        ("gu group-major addr (4KB/grp)", r(base, ablate=moe.ABLATE_GU_CONTIG)),
        ("gu loads only + group-major", r(base, ablate=moe.ABLATE_GU_LOADS_ONLY | moe.ABLATE_GU_CONTIG)),
        ("dn no wgmma", r(base, ablate=moe.ABLATE_DN_NO_MMA)),
        ("dn no pdl wait", r(base, ablate=moe.ABLATE_DN_NO_WAIT)),
        ("s2", r(base, num_stages=2)),
        ("s4", r(base, num_stages=4)),
        ("s6", r(base, num_stages=6)),
        ("gu 128r/8w", r(base, block_n=128, num_warps=8)),
        ("gu 32r/4w", r(base, block_n=32, num_warps=4)),
    ]


def _compile_worker(cfgs: list[C]) -> list[str]:
    """Compile ``cfgs`` (one call each at T = 4) in a spawned process: fills Triton's disk cache."""
    errors = []
    dev = torch.device("cuda")
    weights = make_weights(QWEN36, dev)
    x, idx, w = make_routing(4, QWEN36, dev, seed=0)
    for cfg in cfgs:
        try:
            moe.fused_moe_triton(x, idx, w, *weights, config=cfg)
        except Exception as exc:  # noqa: BLE001 - reported again when timed
            errors.append(f"{_short(cfg)} ablate={cfg.ablate}: {type(exc).__name__}: {str(exc)[:160]}")
    torch.cuda.synchronize()
    return errors


def _profile_chunks(calls: list[list]) -> list[dict[str, float]]:
    """Per group of zero-argument callables: mean GPU us per kernel name over the group's calls
    (one profiler session; kernels attributed to groups by launch order)."""
    from torch.profiler import ProfilerActivity, profile

    for fns in calls:  # warm
        fns[0]()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for fns in calls:
            for fn in fns:
                fn()
            torch.cuda.synchronize()
    kernels = [e for e in prof.events() if "_slot_kernel" in e.name or "_gemv_kernel" in e.name
               or "_mma_kernel" in e.name]
    kernels.sort(key=lambda e: e.time_range.start)
    out, i = [], 0
    for fns in calls:
        per = {}
        n = 2 * len(fns)  # gate_up + down per call
        for e in kernels[i:i + n]:
            name = "gate_up" if "gate_up" in e.name else "down" if "down" in e.name else e.name[:20]
            per[name] = per.get(name, 0.0) + e.time_range.elapsed_us() / len(fns)
        i += n
        out.append(per)
    return out


def ablate_sweep(args, shape, dev, bw, time_us, t_start: float) -> None:
    """The ``--ablate`` run (see the module docstring); writes ``tune_moe_ablate.json``."""
    base = next(cfg for _, cfg in moe.FORWARD_CONFIGS if cfg.decode and cfg.mma)  # the mma bucket's config
    variants = ablate_variants(base)
    if dev.type == "cuda" and args.jobs > 1:  # compile in parallel processes (Triton's disk cache)
        common.compile_in_processes(_compile_worker, [c for _, c in variants], args.jobs)
    weights = make_weights(shape, dev)
    copies = [weights]
    copy_bytes = shape.E * shape.expert_bytes()
    table: dict[str, dict[int, str]] = {label: {} for label, _ in variants}
    results, floors = [], {}
    for T in args.tokens:
        x, idx, w = make_routing(T, shape, dev, seed=1000 + T)
        touched = int(idx.unique().numel())
        n = common.copies_needed(touched * shape.expert_bytes(), copy_bytes) if dev.type == "cuda" else 1
        while len(copies) < n:
            copies.append(tuple(t.clone() for t in weights))
        floors[T] = common.byte_floor_us(touched * shape.expert_bytes(), bw)
        ok = []
        for i, (label, cfg) in enumerate(variants):
            try:
                out = moe.fused_moe_triton(x, idx, w, *weights, config=cfg)
                if i == 0:  # the real config: checked; the ablations compute garbage by design
                    err = common.rel_err(out, moe.fused_moe_reference(x, idx, w, *weights))
                    if not math.isfinite(err) or err > REL_TOL:
                        raise ValueError(f"rel err {err:.2e}")
                us = time_us([lambda c=c, cfg=cfg, x=x, idx=idx, w=w: moe.fused_moe_triton(x, idx, w, *c, config=cfg)
                              for c in copies[:n]])
            except Exception as exc:  # noqa: BLE001 - report, go on
                table[label][T] = "FAIL"
                print(f"  T={T} FAIL {label}: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
                continue
            table[label][T] = f"{us:.1f}"
            ok.append((label, cfg))
            results.append({"T": T, "label": label, "config": dataclasses.asdict(cfg), "us": us})
        if not args.no_profile and dev.type == "cuda":
            try:
                splits = _profile_chunks([[lambda c=c, cfg=cfg, x=x, idx=idx, w=w: moe.fused_moe_triton(
                    x, idx, w, *c, config=cfg) for c in copies[:n]] for _, cfg in ok])
                for (label, _), per in zip(ok, splits):
                    table[label][T] += " (" + "+".join(f"{per.get(k, 0.0):.1f}" for k in ("gate_up", "down")) + ")"
                    results.append({"T": T, "label": label, "kernels_us": per})
            except Exception as exc:  # noqa: BLE001 - a diagnostic only
                print(f"  (no kernel split: {type(exc).__name__}: {str(exc)[:160]})", flush=True)
        print(f"# T={T} done at {time.perf_counter() - t_start:.0f} s", flush=True)

    Ts = [T for T in args.tokens if T in floors]
    print(f"\n# ablations of {_short(base)}: us per forward, graphs, L2-cold "
          "(gate_up + down kernel us, eager profile, L2-cold); only 'current' is checked")
    print(f"{'variant':<32}" + "".join(f"{'T=' + str(T):>24}" for T in Ts))
    print(f"{'byte floor':<32}" + "".join(f"{floors[T]:>24.1f}" for T in Ts))
    for label, _ in variants:
        print(f"{label[:31]:<32}" + "".join(f"{table[label].get(T, '-'):>24}" for T in Ts))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        path = Path(args.out) / "tune_moe_ablate.json"
        path.write_text(json.dumps({"env": common.env_info(), "copy_GBps": bw, "floors_us": floors,
                                    "results": results}, indent=1))
        print(f"wrote {path}")
    print(f"# total {time.perf_counter() - t_start:.0f} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=None,
                        help=f"default {TOKENS} ({DECODE_TOKENS} with --decode)")
    parser.add_argument("--budget-s", type=float, default=170.0,
                        help="stop trying extra candidates after this many seconds")
    parser.add_argument("--replays", type=int, default=10)
    parser.add_argument("--compare", action="store_true", help="time the winners against humming-kernels")
    parser.add_argument("--no-profile", action="store_true", help="skip the per-kernel split of the winners")
    parser.add_argument("--out", default=None, help="folder for tune_moe.json")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, tiny shapes, wall-clock timings: exercises the code path only")
    parser.add_argument("--decode", action="store_true",
                        help="sweep the decode path only (T = 1, 4, 8, 16, 32 unless --tokens), one table")
    parser.add_argument("--mma", action="store_true",
                        help="with --decode: sweep the decode on tensor cores (T = 4, 8, 16, 32 unless --tokens)")
    parser.add_argument("--ablate", action="store_true",
                        help="time-only ablations of the tensor-core decode at T = 4, 16 (unless --tokens)")
    parser.add_argument("--jobs", type=int, default=8, help="--ablate: parallel compile processes")
    parser.add_argument("--configs", nargs="+", default=None, metavar="ARGS",
                        help="time these ForwardConfig(ARGS) (e.g. \"False, block_n=128\") after "
                             "each T's current bucket config, instead of the built-in candidates")
    args = parser.parse_args(argv)
    args.decode = args.decode or args.mma
    args.tokens = args.tokens or (ABLATE_TOKENS if args.ablate else MMA_TOKENS if args.mma
                                  else DECODE_TOKENS if args.decode else TOKENS)
    t_start = time.perf_counter()
    if args.dry_run:
        shape, dev, bw = TINY, torch.device("cpu"), float("nan")
        args.tokens, args.compare, args.no_profile = [T for T in args.tokens if T <= 16], False, True
    else:
        shape, dev, bw = QWEN36, torch.device("cuda"), common.copy_bandwidth_gbs()

    def time_us(fns) -> float:
        if dev.type == "cpu":
            t0 = time.perf_counter()
            fns[0]()
            return (time.perf_counter() - t0) * 1e6
        return common.time_us(fns, replays=args.replays, allow_eager=False).us

    print(f"# {common.env_info()['card']}, copy {bw:.0f} GB/s, torch {torch.__version__}, "
          f"triton {common._version('triton')}", flush=True)
    if args.ablate:
        return ablate_sweep(args, shape, dev, bw, time_us, t_start)
    if args.decode:
        return decode_sweep(args, shape, dev, bw, time_us, t_start)
    weights = make_weights(shape, dev)
    copies = [weights]
    copy_bytes = shape.E * shape.expert_bytes()
    results: dict[int, list[dict]] = {}
    best: dict[int, tuple[float, C]] = {}
    inputs = {}
    for ti, T in enumerate(args.tokens):
        # Each T may spend its share of the budget (plus what earlier T left) on extra candidates.
        deadline = t_start + args.budget_s * (ti + 1) / len(args.tokens)
        x, idx, w = make_routing(T, shape, dev, seed=1000 + T)
        inputs[T] = (x, idx, w)
        ref = moe.fused_moe_reference(x, idx, w, *weights)
        touched = int(idx.unique().numel())
        n = common.copies_needed(touched * shape.expert_bytes(), copy_bytes) if dev.type == "cuda" else 1
        while len(copies) < n:
            copies.append(tuple(t.clone() for t in weights))
        floor = common.byte_floor_us(touched * shape.expert_bytes(), bw)
        print(f"\n## T={T}: {touched} experts, byte floor {floor:.1f} us, {n} weight copies", flush=True)
        rows = []
        todo = candidates(T, shape.K) if args.configs is None else \
            list(dict.fromkeys([moe.forward_config(T * shape.K)] + [eval(f"C({a})") for a in args.configs]))
        for i, cfg in enumerate(todo):
            if i and time.perf_counter() > deadline:
                print(f"  (budget spent: skipping {_short(cfg)})")
                continue
            t0 = time.perf_counter()
            try:
                out = moe.fused_moe_triton(x, idx, w, *weights, config=cfg)
                err = common.rel_err(out, ref)
                if not math.isfinite(err) or err > REL_TOL:
                    raise ValueError(f"rel err {err:.2e}")
                fns = [lambda c=c, cfg=cfg, x=x, idx=idx, w=w: moe.fused_moe_triton(x, idx, w, *c, config=cfg)
                       for c in copies[:n]]
                us = time_us(fns)
            except Exception as exc:  # noqa: BLE001 - report a failing candidate, go on
                print(f"  FAIL {_short(cfg)}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                rows.append({"config": dataclasses.asdict(cfg),
                             "error": f"{type(exc).__name__}: {exc}"[:300]})
                continue
            rows.append({"config": dataclasses.asdict(cfg), "us": us, "rel_err": err})
            print(f"  {us:8.1f} us  err {err:.1e}  {_short(cfg)}  ({time.perf_counter() - t0:.1f} s)",
                  flush=True)
            if T not in best or us < best[T][0]:
                best[T] = (us, cfg)
        results[T] = rows
        if T in best:
            us, cfg = best[T]
            print(f"  best T={T}: {us:.1f} us ({100 * floor / us:.0f}% of the byte floor) {_short(cfg)}")
            if not args.no_profile:
                try:
                    split = _kernel_split(lambda x=x, idx=idx, w=w, cfg=cfg: moe.fused_moe_triton(
                        x, idx, w, *weights, config=cfg))
                    print(f"  kernels (us): {split}")
                except Exception as exc:  # noqa: BLE001 - the split is a diagnostic only
                    print(f"  (no kernel split: {type(exc).__name__}: {str(exc)[:120]})")

    print("\n# paste into gsq_torch/ops/moe.py (bounds are T * K; the last T's config covers the rest):")
    print("FORWARD_CONFIGS: tuple[tuple[int | None, ForwardConfig], ...] = (")
    measured = [T for T in args.tokens if T in best]
    for j, T in enumerate(measured):
        us, cfg = best[T]
        bound = "None" if j == len(measured) - 1 else str(T * shape.K)
        print(f"    ({bound}, {_repr(cfg)}),  # T = {T}: {us:.1f} us")
    print(")", flush=True)

    summary = {}
    if args.compare:
        print("\n# winners vs humming-kernels (same card, same inputs; humming alignment precomputed)",
              flush=True)
        try:
            hm = HummingMoE(weights, shape, measured)
            hm.check_activation()
            hcopies = hm.copies(len(copies))
            print("| T | floor_us | ours_us | humming_us | humming/ours |")
            print("|---|---|---|---|---|")
            for T in measured:
                x, idx, w = inputs[T]
                touched = int(idx.unique().numel())
                n = common.copies_needed(touched * shape.expert_bytes(), copy_bytes)
                cfg = best[T][1]
                ours = common.time_us([lambda c=c, x=x, idx=idx, w=w, cfg=cfg: moe.fused_moe_triton(
                    x, idx, w, *c, config=cfg) for c in copies[:n]], replays=args.replays).us
                a = align_block(idx, shape.E, hm.block_sizes[T * shape.K])
                theirs = common.time_us([lambda c=c, x=x, idx=idx, w=w, a=a: hm.forward(x, idx, w, c, align=a)
                                         for c in hcopies[:n]], replays=args.replays).us
                floor = common.byte_floor_us(touched * shape.expert_bytes(), bw)
                summary[T] = {"floor_us": floor, "ours_us": ours, "humming_us": theirs}
                print(f"| {T} | {floor:.1f} | {ours:.1f} | {theirs:.1f} | {theirs / ours:.2f} |", flush=True)
        except Exception as exc:  # noqa: BLE001 - humming is optional
            print(f"humming comparison failed: {type(exc).__name__}: {exc}")
            traceback.print_exc()

    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        path = Path(args.out) / "tune_moe.json"
        path.write_text(json.dumps({"env": common.env_info(), "copy_GBps": bw, "results": results,
                                    "best": {T: {"us": us, "config": dataclasses.asdict(c)}
                                             for T, (us, c) in best.items()},
                                    "compare": summary}, indent=1))
        print(f"wrote {path}")
    print(f"# total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
