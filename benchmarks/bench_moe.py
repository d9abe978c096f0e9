"""Benchmark one Qwen3.6 routed-experts layer: gsq fused_moe vs humming uint2 vs transformers BF16.

Dimension legend: T tokens, E experts (256), H hidden (2048), I expert intermediate (512), K top-k (8).

Per run: measure the card's copy bandwidth; build random 2-bit packed weights (random codes, random
signed bf16 scales) and uniform random routing (top-8 of random logits); check every method against
``fused_moe_reference`` at a few T (and humming's own dequantizer against ``format.dequantize``,
bit for bit); then time every method at every T inside CUDA graphs, cycling over enough weight
copies that the weights a graph reads exceed 4x L2. Writes ``moe.csv`` / ``moe.md`` to ``--out``.

Methods:
    ours         gsq_torch.ops.moe.fused_moe, routing alignment included.
    humming      humming-kernels driven like vLLM's indexed humming MoE path: align -> gate+up
                 GEMM -> SiLU*up -> down GEMM -> weighted top-k sum. The alignment is computed
                 once outside the graph (as in SPEC.md §6's reference figures); ``humming+align``
                 also times our PyTorch alignment (vLLM uses its own CUDA kernel for it).
    grouped_mm / batched_mm
                 transformers' own BF16 experts implementations on the dequantized weights
                 (batched_mm only up to ``--batched-max-tokens``: it gathers [T*K, 2I, H] weights).

Usage: ``python3 benchmarks/bench_moe.py [--tokens 1 4 16] [--out DIR] [--skip-humming] [--dry-run]``.
``--dry-run`` runs the CPU parts on tiny shapes (no CUDA needed).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if not torch.cuda.is_available():  # the Triton interpreter must be chosen before gsq_torch imports
    os.environ.setdefault("TRITON_INTERPRET", "1")

import common  # noqa: E402
from gsq_torch import format  # noqa: E402
from gsq_torch.ops.moe import fused_moe, fused_moe_reference  # noqa: E402

TOKENS = [1, 4, 16, 64, 256, 1024, 4096, 16384]
CHECK_TOKENS = [1, 16, 256]
# bf16 activations and intermediates against an fp32 reference: a few bf16 ulps of the output's
# largest value. A misread format (code order, offset, scale layout) gives errors of order 1.
REL_TOL = 2e-2


@dataclass(frozen=True)
class MoEShape:
    E: int = 256
    H: int = 2048
    I: int = 512  # noqa: E741 - the SPEC's name for the expert intermediate size
    K: int = 8

    def expert_bytes(self) -> int:
        """Packed weights + scales of one expert (gate, up and down)."""
        n_weights = 2 * self.I * self.H + self.H * self.I
        return n_weights // format.CODES_PER_WORD * 4 + n_weights // format.GROUP_SIZE * 2

    def bf16_expert_bytes(self) -> int:
        return 3 * self.I * self.H * 2


QWEN36 = MoEShape()
TINY = MoEShape(E=8, H=256, I=128, K=2)


# ---------------------------------------------------------------------------------------------
# inputs


def make_weights(shape: MoEShape, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random packed experts ``(gate_up_proj, gate_up_proj_scale, down_proj, down_proj_scale)``.

    Codes are uniform over 0..3 (every int32 bit pattern, bit 31 included); scales are signed
    (GSQ's scale search keeps negative ones) with magnitude ~0.02, so activations stay O(1).
    """
    g = torch.Generator(device=device).manual_seed(seed)
    E, H, I = shape.E, shape.H, shape.I  # noqa: E741

    def words(*s):
        return torch.randint(-(2**31), 2**31, s, generator=g, device=device, dtype=torch.int32)

    def scales(*s):
        return (torch.randn(s, generator=g, device=device) * 0.02).to(format.SCALE_DTYPE)

    cpw, gs = format.CODES_PER_WORD, format.GROUP_SIZE
    gate_up = (words(E, 2 * I, H // cpw), scales(E, 2 * I, H // gs))
    return (*gate_up, words(E, H, I // cpw), scales(E, H, I // gs))


def make_routing(T: int, shape: MoEShape, device: torch.device, seed: int) -> tuple[torch.Tensor, ...]:
    """``(hidden_states [T, H] bf16, top_k_index [T, K] int64, top_k_weights [T, K] bf16)``.

    Uniform routing: top-K of random logits, softmax over all experts, renormalised (Qwen3.6's rule).
    """
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(T, shape.H, generator=g, device=device).to(torch.bfloat16)
    probs = torch.randn(T, shape.E, generator=g, device=device).softmax(dim=-1)
    w, idx = probs.topk(shape.K, dim=-1)  # [T, K]
    w = (w / w.sum(dim=-1, keepdim=True)).to(torch.bfloat16)
    return x, idx, w


def dequantize_experts(weights: tuple[torch.Tensor, ...], chunk: int = 16) -> tuple[torch.Tensor, ...]:
    """BF16 ``gate_up [E, 2I, H]`` and ``down [E, H, I]`` of packed experts (chunked: bounded memory)."""
    gu, gus, dn, dns = weights
    E = gu.shape[0]
    gate_up = torch.cat([format.dequantize(gu[e:e + chunk], gus[e:e + chunk]) for e in range(0, E, chunk)])
    down = torch.cat([format.dequantize(dn[e:e + chunk], dns[e:e + chunk]) for e in range(0, E, chunk)])
    return gate_up, down


# ---------------------------------------------------------------------------------------------
# routing alignment in the layout humming's indexed GEMM reads (vLLM's moe_align_block_size)


def align_block(top_k_index: torch.Tensor, num_experts: int, block: int) -> tuple[torch.Tensor, ...]:
    """Group the ``T*K`` (token, k) slots by expert, each expert padded to a multiple of ``block``.

    No host synchronisation (CUDA-graph capturable); output sizes depend only on T, K, E, block.

    Returns:
        ``sorted_ids`` int32 ``[P]``: slot ids ``t*K + k`` grouped by expert (ascending within one),
        padding slots hold ``T*K``; ``expert_ids`` int32 ``[P / block]``: the expert of each block
        (blocks past the used part repeat the last expert and are never read);
        ``num_tokens_padded`` int32 ``[1]``: the used length of ``sorted_ids``.
        ``P = round_up(T*K + E*(block-1), block) + 2*block``.
    """
    flat = top_k_index.reshape(-1)  # [T*K]
    n, dev = flat.numel(), flat.device
    counts = torch.zeros(num_experts, dtype=torch.int32, device=dev)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))  # bincount syncs; this doesn't
    padded = (counts + block - 1) // block * block
    padded_end = torch.cumsum(padded, 0, dtype=torch.int32)  # [E]
    padded_start = padded_end - padded
    start = torch.cumsum(counts, 0, dtype=torch.int32) - counts
    order = torch.sort(flat, stable=True).indices  # [T*K] slots grouped by expert
    e_sorted = flat[order]
    pos = padded_start[e_sorted] + (torch.arange(n, device=dev, dtype=torch.int32) - start[e_sorted])
    # Two spare blocks: a kernel whose M tiles span several CTAs may read a block past the end.
    total = (n + num_experts * (block - 1) + block - 1) // block * block + 2 * block
    sorted_ids = torch.full((total,), n, dtype=torch.int32, device=dev)
    sorted_ids[pos.long()] = order.to(torch.int32)
    block_start = torch.arange(0, total, block, dtype=torch.int32, device=dev)
    expert_ids = torch.searchsorted(padded_end, block_start, right=True).clamp_(max=num_experts - 1)
    expert_ids = expert_ids.to(torch.int32)
    return sorted_ids, expert_ids, padded_end[-1:].clone()


def align_block_loop(top_k_index: torch.Tensor, num_experts: int, block: int) -> tuple[list[int], list[int]]:
    """Obvious per-expert loop version of :func:`align_block` (used parts only): the check oracle."""
    flat = top_k_index.reshape(-1).tolist()
    ids, experts = [], []
    for e in range(num_experts):
        slots = [i for i, x in enumerate(flat) if x == e]
        n_blocks = math.ceil(len(slots) / block)
        ids += slots + [len(flat)] * (n_blocks * block - len(slots))
        experts += [e] * n_blocks
    return ids, experts


# ---------------------------------------------------------------------------------------------
# humming-kernels, driven like vLLM's HummingIndexedExperts (our own code; see README)


class HummingMoE:
    """humming's indexed MoE GEMMs on our plain-layout packed weights.

    Set-up: a module holding ``w13_weight / w13_weight_scale`` (our gate_up, gate rows first, as
    vLLM's w13 = [w1; w3]) and ``w2_weight / w2_weight_scale`` (our down), a humming weight schema
    parsed from our own ``quantization_config``; ``HummingMethod.prepare_layer_meta`` +
    ``transform_humming_layer`` repack them into humming's kernel layout. Tuning configs are
    humming's defaults for the indexed GEMM, restricted to the ``T*K`` intervals we run (the
    launcher picks the interval by ``valid_shape_m``, so the kernels chosen are the same).
    """

    def __init__(self, weights: tuple[torch.Tensor, ...], shape: MoEShape, tokens: list[int]):
        import humming  # noqa: F401
        from humming.config import GemmType
        from humming.layer import HummingMethod
        from humming.schema import BaseWeightSchema

        self.shape = shape
        gu, gus, dn, dns = weights
        layer = torch.nn.Module()
        plain = {"w13_weight": gu, "w13_weight_scale": gus, "w2_weight": dn, "w2_weight_scale": dns}
        for name, t in plain.items():
            setattr(layer, name, torch.nn.Parameter(t.clone(), requires_grad=False))
        # Stream-K fix-up counters, zeroed, one buffer per layer as vLLM and HummingLayer keep them.
        layer.register_buffer("locks", torch.zeros(2048, dtype=torch.int32, device=gu.device))
        schema = BaseWeightSchema.from_config(format.quantization_config_dict())
        self.compute_config = json.dumps({"use_batch_invariant": False, "use_f16_accum": False,
                                          "gemm_type": GemmType.INDEXED.value})
        valid_ms = sorted({T * shape.K for T in tokens})
        self.metas, self.tuning, self.tensors = {}, {}, {}
        for name, n, k in (("w13", 2 * shape.I, shape.H), ("w2", shape.H, shape.I)):
            HummingMethod.prepare_layer_meta(layer, shape_n=n, shape_k=k, weight_schema=schema,
                                             num_experts=shape.E, pad_n_to_multiple=256,
                                             pad_k_to_multiple=128, torch_dtype=torch.bfloat16,
                                             sublayer_name=name)
            HummingMethod.transform_humming_layer(layer, sublayer_name=name)
            self.metas[name] = layer.humming_metas[name]
            configs = HummingMethod.get_default_tuning_configs(layer, gemm_type=GemmType.INDEXED,
                                                               sublayer_name=name)
            self.tuning[name] = [c for c in configs if any(c[0] < m <= c[1] for m in valid_ms)]
            self.tensors[name] = {key.removeprefix(name + "_"): p for key, p in layer.named_parameters()
                                  if key.startswith(name + "_")}
        self.locks = layer.locks
        self.tuning_str = {name: json.dumps(c) for name, c in self.tuning.items()}
        self.block_sizes = {m: self._block_m("w13", m) for m in valid_ms}
        for m in valid_ms:
            if self._block_m("w2", m) != self.block_sizes[m]:  # vLLM aligns once with w13's block size
                print(f"  humming: note: at T*K={m} w13 block_m={self.block_sizes[m]} but w2 block_m="
                      f"{self._block_m('w2', m)}; using w13's for both, as vLLM does")
        self.act_mode = "torch"  # upgraded to humming's fused activation by check_activation()

    def _block_m(self, name: str, valid_m: int) -> int:
        for lo, hi, cfg in self.tuning[name]:
            if lo < valid_m <= hi:
                return int(cfg["block_shape"][0])
        raise ValueError(f"no humming {name} tuning config covers T*K={valid_m}")

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in self.tensors.values() for t in d.values())

    def copies(self, n: int) -> list[dict[str, dict[str, torch.Tensor]]]:
        out = [self.tensors]
        for _ in range(n - 1):
            out.append({name: {k: t.clone() for k, t in d.items()} for name, d in self.tensors.items()})
        return out

    def gemm(self, name: str, tensors: dict[str, torch.Tensor], inputs: torch.Tensor, outputs: torch.Tensor,
             align: tuple[torch.Tensor, ...], top_k: int, valid_m: int) -> torch.Tensor:
        from humming.forward import humming_forward

        sorted_ids, expert_ids, num_tokens_padded = align
        return humming_forward(
            self.metas[name], inputs=inputs, weight=tensors["weight"],
            weight_scale=tensors.get("weight_scale"), zero_point=tensors.get("zero_point"),
            bias=tensors.get("bias"),
            weight_scale_2=tensors.get("weight_scale_2"), outputs=outputs, sorted_ids=sorted_ids,
            expert_ids=expert_ids, num_tokens_padded=num_tokens_padded, locks=self.locks, top_k=top_k,
            valid_shape_m=valid_m, compute_config=self.compute_config, tuning_config=self.tuning_str[name],
        )

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """SiLU(gate) * up of ``[S, 2I]`` -> ``[S, I]``: one humming kernel, or PyTorch as fallback."""
        if self.act_mode == "humming":
            from humming import ops

            return ops.process_input(gate_up, activation_type="binary_split",
                                     activation_impl="a / (1.0f + __expf(-a)) * b")[0]
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def check_activation(self) -> str:
        """Use humming's fused SiLU*up if it runs and matches PyTorch's; returns a note."""
        gu = torch.randn(64, 2 * self.shape.I, device=self.locks.device).to(torch.bfloat16)
        ref = F.silu(gu[:, :self.shape.I].float()) * gu[:, self.shape.I:].float()
        try:
            self.act_mode = "humming"
            out = self.silu_mul(gu)
            err = common.rel_err(out, ref)
            if out.dtype != torch.bfloat16 or tuple(out.shape) != tuple(ref.shape) or err > 1e-2:
                raise ValueError(f"humming activation gave {out.dtype} {tuple(out.shape)}, rel err {err:.2e}")
            return "SiLU*up: humming process_input (one kernel)"
        except Exception as exc:  # noqa: BLE001 - fall back, say why
            self.act_mode = "torch"
            return f"SiLU*up: PyTorch (humming activation unavailable: {type(exc).__name__}: {exc})"[:300]

    def forward(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                tensors: dict[str, dict[str, torch.Tensor]], align: tuple[torch.Tensor, ...] | None = None,
                keep: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """One MoE layer; ``align`` precomputed or (``None``) computed here with :func:`align_block`."""
        T, K = top_k_index.shape
        S = T * K
        if align is None:
            align = align_block(top_k_index, self.shape.E, self.block_sizes[S])
        gate_up = torch.empty(S, 2 * self.shape.I, dtype=torch.bfloat16, device=x.device)
        self.gemm("w13", tensors["w13"], x, gate_up, align, top_k=K, valid_m=S)  # row t*K+k
        act = self.silu_mul(gate_up)  # [S, I]
        down = torch.empty(S, self.shape.H, dtype=torch.bfloat16, device=x.device)
        self.gemm("w2", tensors["w2"], act, down, align, top_k=1, valid_m=S)
        if keep is not None:
            keep["gate_up"] = gate_up
        # weighted sum over k in one launch: [T, 1, K] @ [T, K, H]
        return torch.bmm(top_k_weights.to(down.dtype).unsqueeze(1), down.view(T, K, -1)).squeeze(1)


def check_humming_dequant(weights: tuple[torch.Tensor, ...], experts: int = 4) -> float:
    """Max |humming.dequantize_weight - format.dequantize| over a few experts (0.0 = bit-exact)."""
    from humming import dtypes
    from humming.utils.weight import dequantize_weight

    err = 0.0
    for w, s in ((weights[0], weights[1]), (weights[2], weights[3])):
        theirs = dequantize_weight(w[:experts].contiguous(), s[:experts].contiguous(), None, None,
                                   dtype=dtypes.DataType.from_str(format.B_DTYPE), packed=True)
        ours = format.dequantize(w[:experts], s[:experts], torch.float32)
        err = max(err, float((theirs.float() - ours).abs().max()))
    return err


# ---------------------------------------------------------------------------------------------
# transformers' own BF16 experts


def transformers_experts(
    impl: str, gate_up: torch.Tensor, down: torch.Tensor, shape: MoEShape
) -> torch.nn.Module:
    """A ``Qwen3_5MoeExperts`` holding ``gate_up`` / ``down`` with ``_experts_implementation = impl``."""
    from transformers.models.qwen3_5_moe.configuration_qwen3_5_moe import Qwen3_5MoeTextConfig
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeExperts

    cfg = Qwen3_5MoeTextConfig(hidden_size=shape.H, moe_intermediate_size=shape.I, num_experts=shape.E,
                               num_experts_per_tok=shape.K, hidden_act="silu")
    cfg._experts_implementation = impl
    with torch.device("meta"):
        module = Qwen3_5MoeExperts(cfg)
    module.gate_up_proj = torch.nn.Parameter(gate_up, requires_grad=False)
    module.down_proj = torch.nn.Parameter(down, requires_grad=False)
    return module


# ---------------------------------------------------------------------------------------------
# driver


def _n_copies(touched_bytes: float, copy_bytes: float, device: torch.device, max_bytes: float) -> int:
    if device.type != "cuda":
        return 2
    return common.copies_needed(touched_bytes, copy_bytes, max_bytes=max_bytes)


def run(args) -> list[dict[str, Any]]:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    shape = TINY if args.dry_run else QWEN36
    tokens = args.tokens or ([1, 4, 16] if args.dry_run else TOKENS)
    check_tokens = [T for T in (args.check_tokens or CHECK_TOKENS) if T in tokens] or tokens[:1]
    notes: list[str] = []
    torch.manual_seed(0)

    if device.type == "cuda":
        bw = common.copy_bandwidth_gbs()
        l2 = common.l2_bytes()
        print(f"card: {torch.cuda.get_device_name()}  copy bandwidth {bw:.0f} GB/s  L2 {l2 / 2**20:.0f} MiB")
    else:
        bw, l2 = float("nan"), 0
        print("dry run on CPU: tiny shapes, wall-clock timings (meaningless), no humming")
    notes.append(f"shape E={shape.E} H={shape.H} I={shape.I} K={shape.K}; copy bandwidth {bw:.0f} GB/s "
                 f"(read+write); weights rotated over copies so each graph reads > {common.L2_MULTIPLE}x L2")

    weights = make_weights(shape, device)
    routing = {T: make_routing(T, shape, device, seed=1000 + T) for T in tokens}
    touched = {T: int(torch.unique(routing[T][1]).numel()) for T in tokens}
    rows = {T: {"T": T, "experts_touched": touched[T],
                "floor_us": common.byte_floor_us(touched[T] * shape.expert_bytes(), bw)} for T in tokens}
    refs = {T: fused_moe_reference(*routing[T], *weights) for T in check_tokens}
    copy_budget = args.copy_budget_gb * 1e9

    def record(method: str, T: int, timing: common.Timing, n_copies: int) -> None:
        rows[T][f"{method}_us"] = timing.us
        rows[T][f"{method}_mode"] = f"{timing.mode}x{timing.calls_per_graph}/{n_copies}c"
        if timing.note:
            notes.append(f"{method} T={T}: {timing.note}")
        print(f"  {method:>14} T={T:>6}: {timing.us:10.1f} us  ({timing.mode}, "
              f"{timing.calls_per_graph} calls/graph, {n_copies} weight copies)", flush=True)

    def free():
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    # --- ours --------------------------------------------------------------------------------
    print("ours: gsq_torch.ops.moe.fused_moe", flush=True)
    try:
        for T in check_tokens:
            err = common.rel_err(fused_moe(*routing[T], *weights), refs[T])
            ok = "ok" if err <= REL_TOL else "FAIL"
            notes.append(f"check ours vs fused_moe_reference T={T}: rel err {err:.2e} ({ok})")
            print(f"  check T={T}: rel err {err:.2e} {ok}")
        copy_bytes = shape.E * shape.expert_bytes()
        n_max = _n_copies(min(touched.values()) * shape.expert_bytes(), copy_bytes, device, copy_budget)
        wcopies = common.make_copies(weights, n_max)
        for T in tokens:
            n = _n_copies(touched[T] * shape.expert_bytes(), copy_bytes, device, copy_budget)
            fns = [lambda r=routing[T], w=w: fused_moe(*r, *w) for w in wcopies[:n]]
            record("ours", T, common.time_or_wall(fns, device, args.replays), n)
        del wcopies
    except Exception as exc:  # noqa: BLE001 - report and go on to the baselines
        notes.append(f"ours failed: {type(exc).__name__}: {exc}")
        traceback.print_exc()
    free()

    # --- humming -----------------------------------------------------------------------------
    if args.skip_humming or device.type != "cuda":
        why = "--skip-humming" if args.skip_humming else "no CUDA"
        notes.append(f"humming skipped ({why})")
        print(f"humming: skipped ({why})")
    else:
        print("humming: humming-kernels indexed MoE (JIT compiles on first use)", flush=True)
        try:
            t0 = time.perf_counter()
            hm = HummingMoE(weights, shape, tokens)
            notes.append(hm.check_activation())
            import humming

            notes.append(f"humming-kernels {humming.__version__}; block_m per T*K: {hm.block_sizes}; "
                         f"set-up + compile {time.perf_counter() - t0:.0f} s")
            try:
                derr = check_humming_dequant(weights)
                notes.append(f"check humming dequantize_weight vs format.dequantize: max abs diff {derr:.3g}"
                             f" ({'bit-exact' if derr == 0 else 'MISMATCH'})")
            except Exception as exc:  # noqa: BLE001 - a side check; the GEMM checks below still run
                why = f"{type(exc).__name__}: {exc}"[:250]
                notes.append(f"check humming dequantize_weight: could not run ({why})")
            print(f"  {notes[-1]}")
            for T in check_tokens:
                x, idx, w = routing[T]
                keep: dict[str, torch.Tensor] = {}
                out = hm.forward(x, idx, w, hm.tensors, keep=keep)
                # gate+up alone isolates the weight-format reading from the rest of the pipeline
                S = T * shape.K
                gate_up_deq = format.dequantize(weights[0][idx.reshape(-1)], weights[1][idx.reshape(-1)],
                                                torch.float32) if S <= 512 else None
                err = common.rel_err(out, refs[T])
                msg = f"check humming vs fused_moe_reference T={T}: rel err {err:.2e}"
                if gate_up_deq is not None:
                    gu_ref = torch.einsum("sh,soh->so", x.float().repeat_interleave(shape.K, 0), gate_up_deq)
                    msg += f"; gate+up GEMM alone rel err {common.rel_err(keep['gate_up'], gu_ref):.2e}"
                    del gate_up_deq, gu_ref
                ok = "ok" if err <= REL_TOL else "FAIL (format read differently?)"
                notes.append(f"{msg} ({ok})")
                print(f"  {notes[-1]}")
            copy_bytes = hm.weight_bytes()
            n_max = _n_copies(min(touched.values()) * shape.expert_bytes(), copy_bytes, device, copy_budget)
            hcopies = hm.copies(n_max)
            for T in tokens:
                x, idx, w = routing[T]
                n = _n_copies(touched[T] * shape.expert_bytes(), copy_bytes, device, copy_budget)
                align = align_block(idx, shape.E, hm.block_sizes[T * shape.K])
                fns = [lambda c=c, r=routing[T], a=align: hm.forward(*r, c, align=a) for c in hcopies[:n]]
                record("humming", T, common.time_or_wall(fns, device, args.replays), n)
                fns = [lambda c=c, r=routing[T]: hm.forward(*r, c) for c in hcopies[:n]]
                record("humming+align", T, common.time_or_wall(fns, device, args.replays), n)
            del hcopies, hm
        except Exception as exc:  # noqa: BLE001 - humming is optional: say why and carry on
            notes.append(f"humming failed: {type(exc).__name__}: {str(exc)[:300]}")
            print(f"humming: FAILED, carrying on without it: {type(exc).__name__}: {exc}")
            traceback.print_exc()
    free()

    # --- transformers BF16 -------------------------------------------------------------------
    if args.skip_transformers:
        notes.append("transformers skipped (--skip-transformers)")
    else:
        gate_up, down = dequantize_experts(weights)
        for impl in ("grouped_mm", "batched_mm"):
            print(f"transformers {impl} (BF16 weights)", flush=True)
            try:
                module = transformers_experts(impl, gate_up, down, shape)
                for T in check_tokens:
                    if impl == "batched_mm" and T > args.batched_max_tokens:
                        continue
                    err = common.rel_err(module(*routing[T]), refs[T])
                    notes.append(f"check {impl} vs fused_moe_reference T={T}: rel err {err:.2e}"
                                 f" ({'ok' if err <= REL_TOL else 'FAIL'})")
                copy_bytes = shape.E * shape.bf16_expert_bytes()
                least = min(touched.values()) * shape.bf16_expert_bytes()
                n_max = _n_copies(least, copy_bytes, device, copy_budget)
                mods = [module] + [transformers_experts(impl, gate_up.clone(), down.clone(), shape)
                                   for _ in range(n_max - 1)]
                for T in tokens:
                    if impl == "batched_mm" and T > args.batched_max_tokens:
                        rows[T][f"{impl}_us"] = float("nan")
                        continue
                    n = _n_copies(touched[T] * shape.bf16_expert_bytes(), copy_bytes, device, copy_budget)
                    fns = [lambda m=m, r=routing[T]: m(*r) for m in mods[:n]]
                    record(impl, T, common.time_or_wall(fns, device, args.replays), n)
                del mods, module
            except Exception as exc:  # noqa: BLE001
                notes.append(f"{impl} failed: {type(exc).__name__}: {str(exc)[:300]}")
                traceback.print_exc()
            free()
        del gate_up, down
        notes.append(f"batched_mm skipped above T={args.batched_max_tokens} (gathers [T*K, 2I, H] weights)")

    # --- ratios and output -------------------------------------------------------------------
    env = common.env_info() if device.type == "cuda" else {**common.env_info(), "card": "cpu (dry run)"}
    out_rows = []
    for T in tokens:
        r = rows[T]
        ours = r.get("ours_us", float("nan"))
        r["ours_GBps"] = touched[T] * shape.expert_bytes() / (ours * 1e-6) / 1e9
        r["ours_pct_floor"] = 100 * r["floor_us"] / ours
        for m in ("humming", "humming+align", "grouped_mm", "batched_mm"):
            r[f"{m}/ours"] = r.get(f"{m}_us", float("nan")) / ours
        out_rows.append({**env, "bench": "moe", "copy_GBps": bw, **r})

    cols = ["T", "experts_touched", "floor_us", "ours_us", "ours_pct_floor", "humming_us", "humming/ours",
            "humming+align_us", "grouped_mm_us", "grouped_mm/ours", "batched_mm_us", "batched_mm/ours"]
    preamble = (f"## MoE layer (Qwen3.6 routed experts)\n\n{env['card']}, torch {env['torch']}, triton "
                f"{env['triton']}, transformers {env['transformers']}, commit {env['commit']}, "
                f"{env['timestamp']}."
                "\n\nus per forward, CUDA-graph replays, weights rotated out of L2; `X/ours` > 1 means ours "
                "is faster; `ours_pct_floor` = byte floor (touched experts' packed weights + scales over "
                "the measured copy bandwidth) / our time.\n\n" + "\n".join(f"- {n}" for n in notes))
    csv_path, md_path = common.write_results(out_rows, "moe", args.out, columns=cols, preamble=preamble)
    print()
    print(md_path.read_text())
    print(f"wrote {csv_path} and {md_path}")
    return out_rows


def dry_run_checks() -> None:
    """CPU checks of the pieces that have an oracle: the alignment against the loop version."""
    for T, E, K, block in ((1, 8, 2, 4), (5, 8, 2, 4), (33, 16, 4, 16), (7, 4, 4, 8)):
        idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
        sorted_ids, expert_ids, ntp = align_block(idx, E, block)
        ids, experts = align_block_loop(idx, E, block)
        used = int(ntp)
        assert used == len(ids), (used, len(ids))
        assert sorted_ids[:used].tolist() == ids, "sorted_ids differ from the loop oracle"
        assert expert_ids[:used // block].tolist() == experts, "expert_ids differ from the loop oracle"
        assert sorted_ids.numel() % block == 0 and sorted_ids.numel() >= used
    print("dry run: align_block matches the loop oracle")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", help=f"token counts T (default {TOKENS})")
    p.add_argument("--check-tokens", type=int, nargs="+",
                   help=f"T at which to check correctness (default {CHECK_TOKENS})")
    p.add_argument("--out", help="output folder for moe.csv / moe.md (default benchmarks/results)")
    p.add_argument("--skip-humming", action="store_true", help="do not run humming-kernels")
    p.add_argument("--skip-transformers", action="store_true", help="do not run transformers' BF16 experts")
    p.add_argument("--batched-max-tokens", type=int, default=64, help="largest T for batched_mm (default 64)")
    p.add_argument("--replays", type=int, default=20, help="timed graph replays per measurement (median)")
    p.add_argument("--copy-budget-gb", type=float, default=8.0, help="memory for weight copies per method")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: exercise the code paths only")
    args = p.parse_args(argv)
    if args.tokens and min(args.tokens) < 1:
        p.error("--tokens must be positive")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.dry_run:
        dry_run_checks()
    run(args)


if __name__ == "__main__":
    main()
