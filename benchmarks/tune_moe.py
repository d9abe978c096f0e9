"""Sweep gsq::fused_moe block configs per token count on the GPU; print the best per T.

Times ``fused_moe_triton(..., config=cfg, decode=...)`` end to end (alignment included) in a
CUDA graph with the weights rotated out of L2 (``common.time_us``), over a small grid around
``FORWARD_CONFIGS``. Paste the winners into ``gsq_torch/ops/moe.py``'s ``FORWARD_CONFIGS``.

    python3 benchmarks/tune_moe.py                 # T = 1 .. 16384, Qwen3.6 layer
    python3 benchmarks/tune_moe.py --tokens 1 4 16 --quick
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from bench_moe import QWEN36, make_routing, make_weights

from gsq_torch.ops import moe


def candidates(T: int, K: int, quick: bool) -> list[tuple[bool, moe.MoEConfig]]:
    """(decode, config) pairs worth timing at T tokens."""
    slots = T * K
    out = [(slots <= moe.DECODE_MAX_SLOTS, moe.forward_config(slots))]
    if slots <= 128:  # decode path
        for bn, bnd, warps, stages, split in itertools.product(
            (32, 64), (32, 64, 128), (4,), (3, 4), (1, 2, 4)
        ):
            if quick and (bnd == 128 or stages == 3):
                continue
            out.append((True, moe.MoEConfig(16, bn, bnd, 1, warps, stages, True, True, split)))
    if slots >= 32:  # grouped path
        for bm, bn, bnd, warps, stages, paired in itertools.product(
            (16, 32, 64, 128), (64, 128), (64, 128), (4, 8), (3, 4), (True, False)
        ):
            if (
                bm * 8 > max(slots, 128)
                or (quick and (stages == 3 or bnd != bn))
                or (bm >= 128 and warps == 4)
            ):
                continue
            out.append((False, moe.MoEConfig(bm, bn, bnd, 8, warps, stages, paired, bm <= 32)))
    return list(dict.fromkeys(out))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64, 256, 1024, 4096, 16384])
    parser.add_argument("--quick", action="store_true", help="a smaller grid")
    args = parser.parse_args(argv)
    shape = QWEN36
    dev = torch.device("cuda")
    weights = make_weights(shape, dev)
    copies = [weights]
    print(f"# {torch.cuda.get_device_name()}")
    for T in args.tokens:
        x, idx, w = make_routing(T, shape, dev, seed=T)
        ref = moe.fused_moe_reference(x, idx, w, *weights)
        # Enough weight copies that the experts this routing touches cycle through > L2.
        touched = idx.unique().numel() * shape.expert_bytes()
        n_copies = common.copies_needed(touched, shape.E * shape.expert_bytes())
        while len(copies) < n_copies:
            copies.append(tuple(t.clone() for t in weights))
        print(f"# T={T}: {n_copies} weight copies")
        results = []
        for decode, cfg in candidates(T, shape.K, args.quick):
            try:
                out = moe.fused_moe_triton(x, idx, w, *weights, config=cfg, decode=decode)
                err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                fns = [
                    lambda c=c, cfg=cfg, d=decode, x=x, idx=idx, w=w: moe.fused_moe_triton(
                        x, idx, w, *c, config=cfg, decode=d
                    )
                    for c in copies[:n_copies]
                ]
                us = common.time_us(fns, allow_eager=False).us
            except Exception as exc:  # noqa: BLE001 - a config that fails to compile (shared memory) is skipped
                print(f"T={T:6d} skip {cfg}: {type(exc).__name__}: {str(exc)[:120]}")
                continue
            results.append((us, decode, cfg, err))
        results.sort(key=lambda r: r[0])
        default_us = results and next(
            (r[0] for r in results if r[2] == moe.forward_config(T * shape.K)), None
        )
        for us, decode, cfg, err in results[:5]:
            print(f"T={T:6d} {us:9.1f} us  decode={decode!s:5} err={err:.1e}  {cfg}")
        print(f"T={T:6d} current bucket config: {default_us} us\n")


if __name__ == "__main__":
    main()
