"""End to end on one GPU: generate() speed and memory of a Qwen3.6-35B-A3B-shaped model, BF16 vs 2-bit GSQ.

Pipeline (one model on the card at a time, every figure written as soon as it is measured):
  config (Qwen3_5MoeTextConfig defaults) -> meta skeleton -> materialised layer by layer on the GPU, random init
  -> BF16: decode-step breakdown (torch.profiler), compiled generate() at batch 1 and 32 (static cache,
     torch.compile, CUDA graphs), eager generate(), 4096-token prefill, compiled at the other batches
  -> the SAME model's routed experts RTN-quantized in place, layer by layer -> 2-bit: the same figures
  -> optional full-size checkpoint written and re-loaded through from_pretrained.

Every stage runs under a time budget (``--budget-minutes``): a stage that runs out is cut (SIGALRM), noted,
and the script moves on, so the results always hold what was measured. A model shallower than 40 layers
(``--layers``; the default on a card under 100 GB) is measured as is, and its figures are also scaled to
the full depth (columns ``*_full``): per-step time by the share of GPU time spent inside the decoder
layers (from the breakdown), weights exactly, the rest of the memory in proportion.

Usage:
  python3 benchmarks/bench_e2e.py --out benchmarks/results          # budget 8 min, depth chosen by card
  python3 benchmarks/bench_e2e.py --quick --budget-minutes 6         # 32 new tokens
  python3 benchmarks/bench_e2e.py --smoke --out /tmp/e2e             # tiny config on CPU, seconds
"""

from __future__ import annotations

import time

_T0 = time.monotonic()  # the budget counts the imports too

import argparse
import contextlib
import gc
import importlib.util
import math
import os
import shutil
import signal
import statistics
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # gsq_torch without an install
import common

import gsq_torch  # noqa: F401  (registers the ops and, once it exists, the HF quantizer)

FULL_LAYERS = 40  # Qwen3.6-35B-A3B
GIB = 2**30
NAME = "e2e"
COLUMNS = [  # every CSV row carries all of these, so appends keep one header
    "card", "torch", "triton", "transformers", "cuda", "commit", "timestamp", "fla",
    "model", "mode", "figure", "layers", "batch", "prompt", "new_tokens",
    "tokens_per_s", "tokens_per_s_full", "e2e_tokens_per_s", "step_ms", "prefill_ms", "compile_s",
    "peak_gib", "peak_gib_full", "weights_gib", "component", "us", "share", "floor_us", "graph_breaks",
    "graphs", "cudagraph_skips", "graph_launches", "seconds", "note",
]


class OutOfTime(Exception):
    """Raised by SIGALRM when a stage runs past its share of the budget."""


# ----------------------------------------------------------------------------- results


class Recorder:
    """Collects result rows; appends each to ``<out>/e2e.csv`` and rewrites ``<out>/e2e.md`` at once."""

    def __init__(self, out: Path, env: dict[str, str], header: list[str]):
        self.out, self.env, self.header = out, env, header
        self.rows: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.checks: dict[str, str] = {}
        self.compile_s: list[float] = []  # warm-up times of compiled generate() calls (compile + CUDA graphs)

    def add(self, **row: Any) -> dict[str, Any]:
        full = {c: "" for c in COLUMNS}
        full.update(self.env)
        full.update({k: v for k, v in row.items() if v is not None})
        unknown = set(full) - set(COLUMNS)
        if unknown:
            raise ValueError(f"unknown result columns {sorted(unknown)}")
        self.rows.append(full)
        common.write_results([full], NAME, self.out)  # appends the CSV row (and a one-row md, rewritten next)
        self.write()
        return full

    def note(self, text: str) -> None:
        print(f"[e2e] {text}", flush=True)
        self.notes.append(text)
        self.write()

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"{NAME}.md").write_text(self.markdown())

    def markdown(self) -> str:
        parts = ["# End-to-end generate(): BF16 vs 2-bit GSQ", "", *self.header, ""]
        speed = [r for r in self.rows if r["figure"] in ("decode", "prefill")]
        if speed:
            parts += ["## Speed and peak memory", "", common.markdown_table(speed, [
                "model", "mode", "figure", "batch", "prompt", "new_tokens", "tokens_per_s", "tokens_per_s_full",
                "e2e_tokens_per_s", "step_ms", "prefill_ms", "compile_s", "peak_gib", "peak_gib_full",
                "graphs", "graph_breaks", "cudagraph_skips", "graph_launches", "note"]), ""]
        ratios = speedups(self.rows)
        if ratios:
            parts += ["## 2-bit over BF16 (same mode, same batch)", "",
                      common.markdown_table(ratios, ["figure", "mode", "batch", "speedup", "speedup_full"]), ""]
        for model in ("bf16", "gsq2"):
            bd = [r for r in self.rows if r["figure"] == "breakdown" and r["model"] == model]
            if bd:
                parts += [f"## GPU time of one batch-1 eager decode step: {model}", "",
                          common.markdown_table(bd, ["component", "us", "share", "floor_us", "note"]), ""]
            gk = [r for r in self.rows if r["figure"] == "graph kernels" and r["model"] == model]
            if gk:
                parts += [f"## GPU kernel time of one replayed compiled decode step, by kernel family: {model}", "",
                          common.markdown_table(gk, ["batch", "component", "us", "share", "note"]), ""]
        other = [r for r in self.rows if r["figure"] not in ("decode", "prefill", "breakdown", "graph kernels")]
        if other:
            parts += ["## Other figures", "", common.markdown_table(other, [
                "model", "figure", "layers", "seconds", "peak_gib", "weights_gib", "note"]), ""]
        if self.checks:
            parts += ["## Targets (issue 8)", ""] + [f"- {k}: {v}" for k, v in self.checks.items()] + [""]
        if self.notes:
            parts += ["## Notes", ""] + [f"- {n}" for n in self.notes] + [""]
        return "\n".join(parts)


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def speedups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """2-bit tokens/s over BF16 tokens/s for every (figure, mode, batch) measured for both."""
    out = []
    for r in rows:
        if r["model"] != "gsq2" or r["figure"] not in ("decode", "prefill"):
            continue
        for b in rows:
            if b["model"] == "bf16" and (b["figure"], b["mode"], b["batch"]) == (r["figure"], r["mode"], r["batch"]):
                out.append({"figure": r["figure"], "mode": r["mode"], "batch": r["batch"],
                            "speedup": _num(r["tokens_per_s"]) / _num(b["tokens_per_s"]),
                            "speedup_full": _num(r["tokens_per_s_full"]) / _num(b["tokens_per_s_full"])})
    return out


# ----------------------------------------------------------------------------- budget


class Budget:
    """Wall-clock budget from the script's start; ``limit(seconds)`` raises OutOfTime inside the block."""

    def __init__(self, minutes: float):
        self.end = _T0 + minutes * 60.0
        self.fired = False  # set by the alarm: a library may swallow the exception, the flag stays

    def left(self) -> float:
        return self.end - time.monotonic()

    @contextlib.contextmanager
    def limit(self, seconds: float):
        seconds = min(seconds, self.left())
        if seconds <= 1:
            raise OutOfTime("no time left")
        self.fired = False
        usable = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
        if usable:
            def _raise(signum, frame):
                self.fired = True
                raise OutOfTime(f"stage cut after {seconds:.0f} s")

            old = signal.signal(signal.SIGALRM, _raise)
            signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            yield
        finally:
            if usable:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, old)


def stage(rec: Recorder, budget: Budget, name: str, fn: Callable[[], Any], until: float | None = None,
          need: float = 0.0):
    """Run ``fn`` until ``until`` (monotonic; default: the budget's end); a failure or a cut is noted, never fatal.

    Skipped when less than ``need`` seconds are left.
    """
    end = budget.end if until is None else min(until, budget.end)
    left = end - time.monotonic()
    if left < max(need, 1.0):
        rec.note(f"{name}: skipped, {max(left, 0):.0f} s left (needs about {need:.0f} s)")
        return None
    t = time.monotonic()
    print(f"[e2e] {name} ...", flush=True)
    try:
        with budget.limit(left):
            out = fn()
        print(f"[e2e] {name} done in {time.monotonic() - t:.1f} s", flush=True)
        return out
    except Exception as exc:  # noqa: BLE001 - one failed figure must not lose the others
        if isinstance(exc, OutOfTime) or budget.fired:  # torch.compile may wrap the alarm's exception
            rec.note(f"{name}: cut by the time budget after {time.monotonic() - t:.0f} s")
        else:
            rec.note(f"{name}: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
            traceback.print_exc()
    if torch.cuda.is_available():
        with contextlib.suppress(Exception):
            torch.cuda.synchronize()
    return None


# ----------------------------------------------------------------------------- model


def make_config(args: argparse.Namespace):
    """Qwen3_5MoeTextConfig at the Qwen3.6-35B-A3B shape (SPEC §3), or the tiny smoke shape."""
    from transformers import Qwen3_5MoeTextConfig

    if args.smoke:
        cfg = Qwen3_5MoeTextConfig(
            vocab_size=1024, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=64, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=64,
            linear_value_head_dim=64, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=128,
            shared_expert_intermediate_size=128, layer_types=["linear_attention", "full_attention"])
    else:
        # The 5.17 and 5.24 defaults are these already; set explicitly so a changed default can't move the shape.
        cfg = Qwen3_5MoeTextConfig(
            vocab_size=248320, hidden_size=2048, num_hidden_layers=args.layers, num_attention_heads=16,
            num_key_value_heads=2, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=32,
            linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4, num_experts=256,
            num_experts_per_tok=8, moe_intermediate_size=512, shared_expert_intermediate_size=512,
            full_attention_interval=4, tie_word_embeddings=False)
    cfg.eos_token_id, cfg.pad_token_id, cfg.bos_token_id = None, 0, None  # random weights: never stop early
    # bf16 on the GPU; the smoke run uses fp32 because bf16 matmuls are ~1000x slower on CPUs without bf16 units.
    cfg.dtype = torch.float32 if args.smoke else torch.bfloat16
    return cfg


@torch.no_grad()
def _init_(name: str, module: nn.Module, t: torch.Tensor, std: float) -> None:
    """Random init in place on the tensor's device; norms 1-centred as the model expects."""
    kind = type(module).__name__
    if kind.endswith("RMSNormGated") or name == "dt_bias":
        t.fill_(1.0)
    elif kind.endswith("RMSNorm"):
        t.zero_()  # Qwen3.5's RMSNorm scales by (1 + weight)
    elif name == "A_log":
        t.uniform_(0.01, 16).log_()
    else:
        # std 0.02 keeps every pre-norm block's output O(1), so the residual stream stays finite through
        # 40 layers, and router logits of rms ~0.9 spread tokens over many experts.
        t.normal_(0.0, std)


def _materialise(module: nn.Module, device: torch.device, std: float) -> None:
    """Replace every meta parameter under ``module`` by a random one on ``device`` (same dtype)."""
    for sub in module.modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            if p.is_meta:
                new = torch.empty(p.shape, dtype=p.dtype, device=device)
                _init_(name, sub, new, std)
                setattr(sub, name, nn.Parameter(new, requires_grad=False))


def build_model(cfg, device: torch.device, std: float = 0.02, per_layer: Callable[[int, nn.Module], None] | None = None):
    """The causal LM of ``cfg`` with random BF16 weights made directly on ``device``, one layer at a time.

    ``per_layer(i, layer)`` runs right after layer ``i`` is materialised (to quantize it before the next
    one exists, so a full-depth 2-bit model never needs the full BF16 model's memory).
    """
    from transformers import Qwen3_5MoeForCausalLM

    with torch.device("meta"):
        model = Qwen3_5MoeForCausalLM(cfg)
    model.to(cfg.dtype)
    for i, layer in enumerate(model.model.layers):
        _materialise(layer, device, std)
        if per_layer is not None:
            per_layer(i, layer)
    # Non-persistent buffers (rotary inv_freq) have no values on meta: rebuild that module on the device.
    rot = model.model.rotary_emb
    model.model.rotary_emb = type(rot)(config=model.config).to(device)
    _materialise(model, device, std)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"tensors left on meta after materialising: {leftover[:5]}")
    model.eval().requires_grad_(False)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    model.generation_config.do_sample = False
    return model


def experts_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if n.endswith("mlp.experts")]


def expert_bytes(module: nn.Module) -> float:
    """Bytes of one expert's weights (all tensors of the module whose first dim is the expert count)."""
    tensors = list(module.parameters()) + list(module.buffers())
    e = max(t.shape[0] for t in tensors if t.dim() == 3)
    return sum(t.numel() * t.element_size() for t in tensors if t.dim() >= 2 and t.shape[0] == e) / e


def tensor_gib(model: nn.Module) -> float:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())) / GIB


def layer_gib(model: nn.Module) -> float:
    return sum(tensor_gib(layer) for layer in model.model.layers)


def _rtn_fast(w: torch.Tensor, grid: int, chunk_elements: int = 1 << 27) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_rtn`` of ``w [E, out, in]`` with a coarse scale grid, a few experts per call (bounded temporaries)."""
    from gsq_torch.quantizers.rtn import quantize_rtn

    step = max(1, chunk_elements // (w.shape[1] * w.shape[2]))
    parts = [quantize_rtn(w[e:e + step], grid=grid) for e in range(0, w.shape[0], step)]
    return torch.cat([q for q, _ in parts]), torch.cat([s for _, s in parts])


def quantize_layer_fn(rtn_grid: int | None) -> Callable[[int, nn.Module], None]:
    """A ``per_layer`` callback that RTN-quantizes a decoder layer's routed experts in place, on their device.

    ``rtn_grid=None``: ``GSQFusedMoE.from_experts`` (the library's RTN, full scale search, as
    ``replace_experts`` runs it). Otherwise the same RTN with a coarser scale grid
    (``quantize_rtn(grid=...)`` + ``GSQFusedMoE.from_packed``): the weights are random, so the search's
    quality is irrelevant here, and its time (about 3 s a layer on an H100 at the default grid) is not
    what this benchmark measures. Either way the BF16 module is dropped as soon as its layer is done.
    """
    from gsq_torch.nn.moe import GSQFusedMoE
    from gsq_torch.nn.replace import find_experts

    @torch.no_grad()
    def fn(i: int, layer: nn.Module) -> None:
        for name, mod in find_experts(layer):
            if rtn_grid is None:
                new = GSQFusedMoE.from_experts(mod)
            else:
                new = GSQFusedMoE.from_packed(*_rtn_fast(mod.gate_up_proj, rtn_grid), *_rtn_fast(mod.down_proj, rtn_grid))
            parent, _, child = name.rpartition(".")
            setattr(layer.get_submodule(parent) if parent else layer, child, new)

    return fn


def convert_in_place(model: nn.Module, rtn_grid: int | None) -> int:
    """Swap every layer's routed experts for 2-bit ones, layer by layer, freeing BF16 experts as it goes.

    Ends with ``replace_experts(model)``: nothing left to swap, it attaches the Humming
    ``quantization_config`` and quantizer, so ``save_pretrained`` writes a Humming checkpoint.
    """
    from gsq_torch.nn.replace import find_experts, replace_experts

    fn = quantize_layer_fn(rtn_grid)
    for i, layer in enumerate(model.model.layers):
        fn(i, layer)
    if find_experts(model):
        raise RuntimeError(f"experts modules left in BF16: {[n for n, _ in find_experts(model)][:3]}")
    replace_experts(model)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return len(experts_modules(model))


# ----------------------------------------------------------------------------- measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated() / GIB if device.type == "cuda" else math.nan


def allocated_gib(device: torch.device) -> float:
    return torch.cuda.memory_allocated() / GIB if device.type == "cuda" else math.nan


def _step_timer(on_put: Callable[[int], None] | None = None):
    from transformers.generation.streamers import BaseStreamer

    class StepTimer(BaseStreamer):
        """Host time at each put(): the prompt (before prefill), then each new token (after a device sync)."""

        def __init__(self):
            self.times: list[float] = []

        def put(self, value):
            self.times.append(time.perf_counter())
            if on_put is not None:
                on_put(len(self.times) - 1)

        def end(self):
            pass

    return StepTimer()


def generate_timed(model, input_ids: torch.Tensor, new_tokens: int, static: bool, max_cache_len: int,
                   on_put: Callable[[int], None] | None = None) -> dict:
    """Greedy generate(); returns steady decode tokens/s, prefill ms, e2e tokens/s.

    Steady: the first 3 decode steps are left out (1 for runs under 16 tokens): with a fresh static cache,
    CUDA-graph trees re-record once its addresses change.

    ``on_put(i)`` is called when token ``i`` is out (0: the prompt, before the prefill).
    """
    timer = _step_timer(on_put)
    kwargs = {"max_new_tokens": new_tokens, "do_sample": False, "streamer": timer,
              "attention_mask": torch.ones_like(input_ids), "pad_token_id": 0}
    if static:
        # One cache size for every call, so a warm-up and the timed run share the compiled graph.
        kwargs.update(cache_implementation="static", max_cache_len=max_cache_len)
    t0 = time.perf_counter()
    out = model.generate(input_ids, **kwargs)
    sync(input_ids.device)
    total = time.perf_counter() - t0
    if out.shape[1] != input_ids.shape[1] + new_tokens:
        raise RuntimeError(f"generate() made {out.shape[1] - input_ids.shape[1]} tokens, expected {new_tokens}")
    b, ts = input_ids.shape[0], timer.times
    skip = 3 if new_tokens >= 16 else 1
    steps = [ts[i + 1] - ts[i] for i in range(1 + skip, len(ts) - 1)]  # ts[i + 1]: end of decode step i
    decode = b * len(steps) / sum(steps) if steps else math.nan
    return {"tokens_per_s": decode, "step_ms": statistics.median(steps) * 1e3 if steps else math.nan,
            "prefill_ms": (ts[1] - ts[0]) * 1e3 if len(ts) > 1 else math.nan,
            "e2e_tokens_per_s": b * new_tokens / total, "total_s": total}


class ProfileWindow:
    """torch.profiler over the part of a generate() after token ``start`` is out (None: no profiling).

    Use as a context manager around generate() and pass ``on_put`` to :func:`generate_timed`.
    """

    def __init__(self, start: int | None):
        from torch.profiler import ProfilerActivity, profile

        self.start, self.started = start, False
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self.prof = profile(activities=acts) if start is not None else None

    def on_put(self, i: int) -> None:
        if self.prof is not None and i == self.start and not self.started:
            self.prof.start()
            self.started = True

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.started:
            self.prof.stop()

    def events(self):
        return self.prof.events()

    def count(self, fragment: str) -> int:
        return sum(1 for e in self.events() if fragment in e.name)


# Kernel-name families of a compiled (CUDA-graph) decode step; module hooks do not exist there.
KERNEL_FAMILIES = (  # (name fragments, family); first match wins
    (("_gemv_kernel", "_mma_kernel", "_gate_up", "_down_", "_prep_x", "moe_align", "_align"), "gsq (routed experts)"),
    (("gated_delta", "fused_recurrent", "chunk_", "l2norm", "causal_conv", "solve_tril", "wy_fast"), "linear attention (fla)"),
    (("flash", "fmha", "attention", "sdpa", "softmax_warp"), "attention"),
    (("gemv", "gemm", "nvjet", "cutlass", "xmma", "cublas", "splitk"), "cuBLAS GEMV/GEMM"),
    (("triton_",), "inductor fused"),
)


def kernel_family(name: str) -> str:
    low = name.lower()
    return next((fam for frags, fam in KERNEL_FAMILIES if any(f.lower() in low for f in frags)), "other")


def compiled_step_kernels(window: ProfileWindow) -> dict[str, Any] | None:
    """GPU kernel time per family and kernel count of one replayed decode step (None without CUDA events)."""
    kernels = [e for e in window.events() if getattr(e.device_type, "name", "") == "CUDA"]
    steps = window.count("GraphLaunch")
    if not kernels or not steps:
        return None
    fam: dict[str, float] = {}
    for e in kernels:
        f = kernel_family(e.name)
        fam[f] = fam.get(f, 0.0) + (e.time_range.end - e.time_range.start)
    return {"families_us": {k: v / steps for k, v in sorted(fam.items(), key=lambda kv: -kv[1])},
            "kernels": len(kernels) / steps, "total_us": sum(fam.values()) / steps}


def dynamo_counts() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {"graph_breaks": sum(counters["graph_break"].values()),
            "graphs": int(counters["stats"].get("unique_graphs", 0)),
            "cudagraph_skips": int(counters["inductor"].get("cudagraph_skips", 0))}


def graph_break_reasons(limit: int = 3) -> str:
    from torch._dynamo.utils import counters

    return "; ".join(f"{n}x {r[:120]}" for r, n in counters["graph_break"].most_common(limit))


class Categories:
    """Profiler ranges around the modules whose GPU time the breakdown reports (installed on the instance)."""

    RULES = (  # (suffix match on the module name, category); first match wins
        (".mlp.experts", "routed experts"), (".mlp.shared_expert", "shared expert"),
        (".mlp.shared_expert_gate", "shared expert"), (".mlp.gate", "router"), (".self_attn", "attention"),
        (".linear_attn", "linear attention"), ("lm_head", "LM head"),
    )

    def __init__(self, model: nn.Module):
        self.handles, self.top_k_index, self.prefill_experts = [], {}, {}
        self._open: dict[int, list] = {}
        layers = {f"model.layers.{i}" for i in range(len(model.model.layers))}
        for name, mod in model.named_modules():
            cat = next((c for s, c in self.RULES if name.endswith(s)), None)
            if name == "":
                cat = "forward"
            elif name in layers:
                cat = "layer"
            if cat is not None:
                self._hook(mod, "gsq_bd::" + cat, record_routing=cat == "routed experts", key=name)

    def _hook(self, mod: nn.Module, label: str, record_routing: bool, key: str) -> None:
        def pre(m, args, kwargs):
            if record_routing:
                idx = args[1] if len(args) > 1 else kwargs.get("top_k_index")
                self.top_k_index[key] = idx
                if key not in self.prefill_experts:  # the first call is the prompt's prefill
                    self.prefill_experts[key] = int(torch.unique(idx).numel())
            rf = torch.autograd.profiler.record_function(label)
            rf.__enter__()
            self._open.setdefault(id(m), []).append(rf)

        def post(m, args, kwargs, output):
            self._open[id(m)].pop().__exit__(None, None, None)

        self.handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        self.handles.append(mod.register_forward_hook(post, with_kwargs=True))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def breakdown(model, device: torch.device, prompt_len: int, vocab: int, bw_gbs: float) -> dict[str, Any]:
    """Kernel time per component of the last of a few batch-1 eager decode steps (torch.profiler).

    Each category's time is the device time of the kernels launched inside its modules' ranges; "rest"
    is the forward's total minus the categories (norms, residuals, embedding, glue).
    """
    ids = torch.randint(0, vocab, (1, prompt_len), device=device)
    generate_timed(model, ids, 2, static=False, max_cache_len=0)  # warm: kernels compiled, autotuned
    cats = Categories(model)
    # Profile the decode steps only (from the first token on): the prefill would only add parsing time.
    try:
        with ProfileWindow(1) as window:
            generate_timed(model, ids, 3, static=False, max_cache_len=0, on_put=window.on_put)
    finally:
        cats.remove()
    evs = [e for e in window.events() if e.name.startswith("gsq_bd::") and e.device_type.name == "CPU"]
    timed = (lambda e: e.device_time_total) if device.type == "cuda" else (lambda e: e.cpu_time_total)
    fwd = max((e for e in evs if e.name == "gsq_bd::forward"), key=lambda e: e.time_range.start)
    inside = [e for e in evs if e.time_range.start >= fwd.time_range.start and e.time_range.end <= fwd.time_range.end]
    total = timed(fwd)
    comp: dict[str, float] = {}
    for e in inside:
        cat = e.name.split("::", 1)[1]
        comp[cat] = comp.get(cat, 0.0) + timed(e)
    # Routed experts' byte floor: bytes of the experts this step touched (all layers) at the copy bandwidth.
    touched, nbytes = 0, 0.0
    for name, mod in experts_modules(model):
        idx = cats.top_k_index.get(name)
        if idx is None:
            continue
        e = int(torch.unique(idx[(idx >= 0) & (idx < _num_experts(mod))]).numel())
        touched += e
        nbytes += e * expert_bytes(mod)
    spread = statistics.mean(cats.prefill_experts.values()) if cats.prefill_experts else math.nan
    return {"total_us": total, "components": comp, "touched_experts": touched, "touched_bytes": nbytes,
            "prefill_experts": spread,
            "floor_us": common.byte_floor_us(nbytes, bw_gbs) if not math.isnan(bw_gbs) else math.nan,
            "unit": "GPU kernel time" if device.type == "cuda" else "CPU time"}


def _num_experts(mod: nn.Module) -> int:
    return max(t.shape[0] for t in list(mod.parameters()) + list(mod.buffers()) if t.dim() == 3)


def host_rss_peak_during(fn: Callable[[], Any]) -> tuple[Any, float]:
    """Run ``fn`` while a thread samples this process's resident memory; returns (result, peak GiB)."""
    peak, stop = [0], threading.Event()

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        out = fn()
    finally:
        stop.set()
        th.join()
    return out, max(peak[0], rss()) / GIB


# ----------------------------------------------------------------------------- the run


class Run:
    """The measurements of one model (bf16 or gsq2), appended to the recorder as they come."""

    def __init__(self, args, rec: Recorder, budget: Budget, device: torch.device, cfg, bw_gbs: float):
        self.args, self.rec, self.budget, self.device, self.cfg, self.bw = args, rec, budget, device, cfg, bw_gbs
        self.f_layers = math.nan  # share of a decode step's GPU time inside the decoder layers (for scaling)

    # depth scaling: per-step time ~ fixed + layers, weights exactly, other memory in proportion
    def _scale_time(self, tok_s: float) -> float:
        n, f = self.cfg.num_hidden_layers, self.f_layers
        if n == FULL_LAYERS:
            return tok_s
        return tok_s / (1 - f + f * FULL_LAYERS / n) if not math.isnan(f) else math.nan

    def _scale_mem(self, peak: float, model) -> float:
        n = self.cfg.num_hidden_layers
        if n == FULL_LAYERS or math.isnan(peak):
            return peak
        w, lw = tensor_gib(model), layer_gib(model)
        w_full = w + lw * (FULL_LAYERS / n - 1)
        return w_full + (peak - w) * FULL_LAYERS / n

    def prompt(self, batch: int, length: int) -> torch.Tensor:
        g = torch.Generator(device="cpu").manual_seed(1000 * batch + length)
        return torch.randint(0, self.cfg.vocab_size, (batch, length), generator=g).to(self.device)

    def run_breakdown(self, model, tag: str) -> None:
        bd = breakdown(model, self.device, self.args.prompt_len, self.cfg.vocab_size, self.bw)
        total, comp = bd["total_us"], bd["components"]
        self.f_layers = comp.get("layer", math.nan) / total if total else math.nan
        shown = ["routed experts", "shared expert", "router", "attention", "linear attention", "LM head"]
        rest = total - sum(comp.get(c, 0.0) for c in shown)
        for c in shown + ["rest", "total"]:
            us = total if c == "total" else rest if c == "rest" else comp.get(c, 0.0)
            floor, note = None, None
            if c == "routed experts":
                floor = bd["floor_us"]
                note = (f"{bd['touched_experts']} experts touched, {bd['touched_bytes'] / 1e6:.1f} MB; "
                        f"{us / floor:.1f}x the byte floor" if floor and not math.isnan(floor) else None)
            if c == "total":
                note = (f"{bd['unit']}; {self.f_layers:.1%} inside the {self.cfg.num_hidden_layers} decoder layers; "
                        f"the {self.args.prompt_len}-token prefill used {bd['prefill_experts']:.0f} of "
                        f"{self.cfg.num_experts} experts per layer on average (routing spread)")
            self.rec.add(model=tag, mode="eager", figure="breakdown", layers=self.cfg.num_hidden_layers, batch=1,
                         prompt=self.args.prompt_len, component=c, us=us, share=us / total if total else None,
                         floor_us=floor, note=note)

    def run_generate(self, model, tag: str, batch: int, compiled: bool) -> None:
        a = self.args
        new = a.new_tokens if compiled else a.eager_new_tokens
        ids = self.prompt(batch, a.prompt_len)
        max_len = a.prompt_len + max(a.new_tokens, a.eager_new_tokens)
        before = dynamo_counts()
        t = time.perf_counter()
        # Warm-up: compiles and records the CUDA graphs (decode steps: 1 warm, 2 record, 3 and 4 replay), or
        # JIT-compiles. Steps 3 and 4 of a compiled warm-up are profiled to see the CUDA graph replayed.
        window = ProfileWindow(3 if compiled and self.device.type == "cuda" else None)
        with window:
            generate_timed(model, ids, 5 if compiled else 2, static=compiled, max_cache_len=max_len,
                           on_put=window.on_put)
        launches = window.count("GraphLaunch") if window.started else None
        step_kernels = compiled_step_kernels(window) if window.started else None
        warm_s = time.perf_counter() - t
        warm = dynamo_counts()
        reset_peak(self.device)
        r = generate_timed(model, ids, new, static=compiled, max_cache_len=max_len)
        peak = peak_gib(self.device)
        if self.budget.fired:  # the alarm went off inside a library that swallowed it: figures are suspect
            raise OutOfTime("alarm swallowed during generate()")
        after = dynamo_counts()
        extra = {}
        if compiled:
            extra = {k: after[k] - before[k] for k in after}
            extra["compile_s"], extra["graph_launches"] = warm_s, launches
            self.rec.compile_s.append(warm_s)
            if extra["graph_breaks"]:
                self.rec.note(f"{tag} compiled batch {batch}: graph breaks: {graph_break_reasons()}")
            if extra["cudagraph_skips"]:
                self.rec.note(f"{tag} compiled batch {batch}: inductor skipped CUDA graphs "
                              "(rerun with TORCH_LOGS=perf_hints for the reason)")
            if after["graphs"] != warm["graphs"]:
                self.rec.note(f"{tag} compiled batch {batch}: the timed generate() compiled "
                              f"{after['graphs'] - warm['graphs']} more graph(s) (its first decode step is not timed)")
        self.rec.add(model=tag, mode="compiled" if compiled else "eager", figure="decode",
                     layers=self.cfg.num_hidden_layers, batch=batch, prompt=a.prompt_len, new_tokens=new,
                     tokens_per_s=r["tokens_per_s"], tokens_per_s_full=self._scale_time(r["tokens_per_s"]),
                     e2e_tokens_per_s=r["e2e_tokens_per_s"], step_ms=r["step_ms"], prefill_ms=r["prefill_ms"],
                     peak_gib=peak, peak_gib_full=self._scale_mem(peak, model), weights_gib=tensor_gib(model),
                     note="static cache + torch.compile (reduce-overhead)" if compiled else "dynamic cache", **extra)
        if step_kernels:
            for fam, us in [*step_kernels["families_us"].items(), ("total", step_kernels["total_us"])]:
                self.rec.add(model=tag, mode="compiled", figure="graph kernels", layers=self.cfg.num_hidden_layers,
                             batch=batch, component=fam, us=us, share=us / step_kernels["total_us"],
                             note=(f"{step_kernels['kernels']:.0f} kernels per replayed step" if fam == "total"
                                   else None))

    def run_prefill(self, model, tag: str) -> None:
        n = self.args.prefill_len
        ids = self.prompt(1, n)
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits  # warm-up
            finite = bool(logits.isfinite().all())  # random init must keep 40 layers of activations finite
            del logits
            sync(self.device)
            reset_peak(self.device)
            times = []
            for _ in range(2):
                t = time.perf_counter()
                model(input_ids=ids, use_cache=False, logits_to_keep=1)
                sync(self.device)
                times.append(time.perf_counter() - t)
        peak, tok_s = peak_gib(self.device), n / min(times)
        self.rec.add(model=tag, mode="eager", figure="prefill", layers=self.cfg.num_hidden_layers, batch=1,
                     prompt=n, new_tokens=0, tokens_per_s=tok_s,
                     tokens_per_s_full=tok_s * self.cfg.num_hidden_layers / FULL_LAYERS, prefill_ms=min(times) * 1e3,
                     peak_gib=peak, peak_gib_full=self._scale_mem(peak, model), weights_gib=tensor_gib(model),
                     note=f"one forward, last token's logits (finite: {finite}); *_full = x layers/40")

    def measure(self, model, tag: str, until: float) -> None:
        """All figures of one model until ``until`` (monotonic), the issue's targets first.

        Order: breakdown (also gives the depth-scaling share), compiled batch 1, compiled at the
        largest batch, eager at every batch, prefill, compiled at the other batches. A compiled stage
        is skipped when the time left is below the last compile time seen (x1.2): a stage cut half-way
        through its compile would waste the time. After the second compile transformers' graph is
        dynamic in the batch, so further batch sizes only record new CUDA graphs.
        """
        def st(name: str, fn: Callable[[], Any], need: float = 0.0):
            return stage(self.rec, self.budget, f"{tag} {name}", fn, until=until, need=need)

        cuda = self.device.type == "cuda"
        batches = sorted(self.args.batches, key=lambda b: (b != 1, -b))  # 1, then the largest first
        compiled, rest = (batches[:2], batches[2:]) if cuda else ([], [])
        st("breakdown", lambda: self.run_breakdown(model, tag))
        if cuda:
            torch._dynamo.reset()
        for b in compiled:
            need = max(self.args.compile_need_s, 1.2 * max(self.rec.compile_s, default=0.0))
            st(f"compiled batch {b}", lambda b=b: self.run_generate(model, tag, b, compiled=True), need=need)
        for b in batches:
            st(f"eager batch {b}", lambda b=b: self.run_generate(model, tag, b, compiled=False), need=5)
        st("prefill", lambda: self.run_prefill(model, tag), need=5)
        for b in rest:
            st(f"compiled batch {b}", lambda b=b: self.run_generate(model, tag, b, compiled=True), need=20)
        if not cuda:
            self.rec.note(f"{tag} compiled: skipped (generate() compiles only on an accelerator)")


def forget_compiled(model: nn.Module) -> None:
    """Drop compiled graphs and their CUDA-graph memory pools (before the model changes or goes)."""
    for attr in ("_compiled_call", "_last_compile_config"):
        if hasattr(model, attr):
            delattr(model, attr)  # generate() caches the compiled forward on the model
    torch._dynamo.reset()
    with contextlib.suppress(Exception):
        from torch._inductor.cudagraph_trees import reset_cudagraph_trees

        reset_cudagraph_trees()
    gc.collect()
    torch.cuda.empty_cache()


def check_targets(rec: Recorder) -> None:
    """The issue's targets, from the rows measured (full-depth-scaled figures where the model was shallower)."""
    def row(model, mode, batch):
        return next((r for r in rec.rows if (r["model"], r["mode"], r["figure"], r["batch"]) ==
                     (model, mode, "decode", batch)), None)

    q1 = row("gsq2", "compiled", 1) or row("gsq2", "eager", 1)
    if q1:
        rec.checks["2-bit peak memory at batch 1 <= 13 GB"] = (
            f"{_num(q1['peak_gib_full']) * GIB / 1e9:.2f} GB (full depth; measured {_num(q1['peak_gib']) * GIB / 1e9:.2f}"
            f" GB at {q1['layers']} layers, {q1['mode']})")
    for batch, target in ((1, 1.3), (32, 3.0)):
        q, b = row("gsq2", "compiled", batch), row("bf16", "compiled", batch)
        if q and b:
            s = _num(q["tokens_per_s_full"]) / _num(b["tokens_per_s_full"])
            rec.checks[f"batch {batch}: 2-bit compiled >= {target}x BF16 compiled"] = (
                f"{s:.2f}x ({'met' if s >= target else 'MISSED'}; {_num(q['tokens_per_s']):.1f} vs "
                f"{_num(b['tokens_per_s']):.1f} tokens/s measured)")
    comp = [r for r in rec.rows if r["model"] == "gsq2" and r["mode"] == "compiled" and r["figure"] == "decode"]
    if comp:
        breaks = sum(int(_num(r["graph_breaks"]) or 0) for r in comp)
        skips = sum(int(_num(r["cudagraph_skips"]) or 0) for r in comp)
        replayed = all(_num(r["graph_launches"]) > 0 for r in comp)
        rec.checks["2-bit compiled decode: no graph break, replayed as a CUDA graph"] = (
            f"{breaks} graph breaks, {skips} cudagraph skips, cudaGraphLaunch seen in the profiled decode steps: "
            f"{'yes' if replayed else 'NO'} ({len(comp)} batch sizes; "
            f"{'met' if breaks == 0 and skips == 0 and replayed else 'MISSED'})")
    rec.write()


def checkpoint_roundtrip(args, rec: Recorder, device: torch.device, holder: dict[str, Any]) -> None:
    """Write the 2-bit model (rebuilt at full depth if the measured one was shallower) and reload it once.

    The model in ``holder["model"]`` is dropped first, so only one model is ever on the card.
    """
    from transformers import AutoModelForCausalLM

    path = Path(args.checkpoint_roundtrip)
    model = holder.pop("model")
    cfg = model.config
    if cfg.num_hidden_layers != FULL_LAYERS and not args.smoke:
        del model
        reset_peak(device)
        cfg = make_config(argparse.Namespace(**{**vars(args), "layers": FULL_LAYERS}))
        # Each BF16 layer is quantized as soon as it exists: peak = the 2-bit model plus one BF16 layer.
        model = build_model(cfg, device, per_layer=quantize_layer_fn(args.rtn_grid))
        convert_in_place(model, args.rtn_grid)  # layers are done already; this sets the quantization_config
    probe = torch.randint(0, cfg.vocab_size, (1, 16), device=device)
    with torch.no_grad():
        ref = model(input_ids=probe).logits.float()  # compared with the reloaded model's below
    if path.exists():
        shutil.rmtree(path)
    t = time.perf_counter()
    model.save_pretrained(path)
    save_s = time.perf_counter() - t
    disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / GIB
    del model
    reset_peak(device)
    _, rss0 = host_rss_peak_during(lambda: None)
    t = time.perf_counter()
    loaded, host = host_rss_peak_during(
        lambda: AutoModelForCausalLM.from_pretrained(path, dtype=cfg.dtype, device_map=str(device)))
    load_s = time.perf_counter() - t
    dev_peak = peak_gib(device)
    with torch.no_grad():
        diff = loaded(input_ids=probe).logits.float().sub(ref).abs().max()
    kinds = sorted({type(m).__name__ for _, m in experts_modules(loaded)})
    rec.add(model="gsq2", mode="from_pretrained", figure="checkpoint", layers=cfg.num_hidden_layers,
            seconds=load_s, peak_gib=dev_peak, weights_gib=tensor_gib(loaded),
            note=(f"save {save_s:.1f} s, load {load_s:.1f} s, {disk:.2f} GiB on disk, host RSS peak {host:.2f} GiB (before: {rss0:.2f}), "
                  f"experts {kinds}, max abs logit diff after reload {float(diff):.3g}"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=None,
                   help="decoder layers (default: 40 on a card with >= 100 GB, else 20); figures are also scaled to 40")
    p.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes for generate()")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128, help="new tokens per compiled generate()")
    p.add_argument("--eager-new-tokens", type=int, default=32,
                   help="new tokens per eager generate() (host-bound: a few dozen steps give a steady rate)")
    p.add_argument("--prefill-len", type=int, default=4096)
    p.add_argument("--quick", action="store_true", help="32 new tokens compiled, 16 eager")
    p.add_argument("--budget-minutes", type=float, default=8.0)
    p.add_argument("--bf16-share", type=float, default=0.42,
                   help="share of the budget the BF16 model may use before it is converted")
    p.add_argument("--compile-need-s", type=float, default=45.0,
                   help="skip a compiled stage when less time than this is left")
    p.add_argument("--rtn-grid", type=int, default=10,
                   help="RTN scale-search grid (10: 16 candidate scales); 0: GSQFusedMoE.from_experts, the "
                        "library's full search (about 3 s a layer on an H100)")
    p.add_argument("--skip-bf16", action="store_true", help="measure only the 2-bit model")
    p.add_argument("--checkpoint-roundtrip", default=None, metavar="DIR",
                   help="write the full-depth 2-bit checkpoint to DIR and reload it with from_pretrained (slow)")
    p.add_argument("--out", default=str(common.DEFAULT_RESULTS_DIR))
    p.add_argument("--smoke", action="store_true", help="tiny config on CPU (for the test)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",") if b]
    args.rtn_grid = args.rtn_grid or None
    if args.quick:
        args.new_tokens, args.eager_new_tokens = min(args.new_tokens, 32), min(args.eager_new_tokens, 16)
    if args.smoke:
        args.batches, args.prompt_len, args.new_tokens, args.eager_new_tokens = [1, 2], 16, 5, 5
        args.prefill_len, args.layers, args.rtn_grid = 64, 2, 10
    if min(args.new_tokens, args.eager_new_tokens) < 4:
        raise ValueError("--new-tokens and --eager-new-tokens must be >= 4 (the first decode step is not timed)")
    return args


def main(argv: list[str] | None = None) -> Recorder:
    args = parse_args(argv)
    if not args.smoke:
        return _main(args, argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only fight over the (shared) CPU
    try:
        return _main(args, argv)
    finally:
        torch.set_num_threads(threads)


def _main(args: argparse.Namespace, argv: list[str] | None) -> Recorder:
    torch.manual_seed(args.seed)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cuda" and args.layers is None:
        total = torch.cuda.get_device_properties(0).total_memory
        args.layers = FULL_LAYERS if total >= 100e9 else 20
    args.layers = args.layers or FULL_LAYERS
    if not args.smoke and args.layers % 4:
        raise ValueError(f"--layers {args.layers}: use a multiple of 4 to keep 3 linear-attention layers per full one")
    budget = Budget(args.budget_minutes)
    env = common.env_info()
    # The Gated-DeltaNet kernels transformers uses when installed; otherwise its (slow) PyTorch fallbacks.
    env["fla"] = "; ".join(f"{m} {'present' if importlib.util.find_spec(m) else 'absent (torch fallback)'}"
                           for m in ("fla", "causal_conv1d"))
    cfg = make_config(args)
    header = [
        (f"- card: {env['card']}; torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}, "
        f"CUDA {env['cuda']}, commit {env['commit']}; linear attention: {env['fla']}"),
        f"- model: Qwen3.6-35B-A3B text shape (Qwen3_5MoeTextConfig), {cfg.num_hidden_layers} of {FULL_LAYERS} layers"
        + ("" if cfg.num_hidden_layers == FULL_LAYERS else " measured (see *_full)")
        + ("; SMOKE (tiny config on CPU)" if args.smoke else ""),
        (f"- random weights, greedy; prompt {args.prompt_len}, new tokens {args.new_tokens} (compiled) / "
        f"{args.eager_new_tokens} (eager); tokens/s = steady decode (first 3 decode steps excluded)"),
        f"- command: `python3 benchmarks/bench_e2e.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        ("- breakdown: kernel time per module of the last decode step of an eager generate() (torch.profiler); "
        "the routed experts' byte floor is the bytes of the experts that step touched at the copy bandwidth"),
    ]
    if cfg.num_hidden_layers != FULL_LAYERS:
        header.append(
            f"- *_full: scaled to {FULL_LAYERS} layers; step time x (1 - f + f x {FULL_LAYERS}/{cfg.num_hidden_layers})"
            " with f the breakdown's share of GPU time inside the decoder layers; prefill x layers/40; memory = "
            "weights at 40 layers + the rest of the peak x 40/layers (an overestimate)")
    if args.smoke:
        header.append("- SMOKE: the 'bf16' model is fp32 on CPU; figures test the code path, not the speed")
    rec = Recorder(Path(args.out), {k: env[k] for k in env if k in COLUMNS}, header)
    bw = math.nan
    if device.type == "cuda":
        bw = common.copy_bandwidth_gbs()
        rec.header.append(f"- measured copy bandwidth {bw:.0f} GB/s (byte floors use it)")
    print("\n".join(rec.header), flush=True)

    holder: dict[str, Any] = {}
    try:
        _stages(args, rec, budget, device, cfg, bw, holder)
    finally:
        check_targets(rec)
        print(rec.markdown(), flush=True)
    return rec


def _stages(args, rec: Recorder, budget: Budget, device: torch.device, cfg, bw: float, holder: dict) -> None:
    def build():
        t = time.perf_counter()
        m = holder["model"] = build_model(cfg, device)
        sync(device)
        rec.add(model="bf16", figure="build", layers=cfg.num_hidden_layers, seconds=time.perf_counter() - t,
                peak_gib=peak_gib(device), weights_gib=tensor_gib(m),
                note=f"random init on {device.type}; {sum(p.numel() for p in m.parameters()) / 1e9:.2f} B params")

    stage(rec, budget, "build BF16 model", build)
    if "model" not in holder:
        return
    if not args.skip_bf16:
        Run(args, rec, budget, device, cfg, bw).measure(
            holder["model"], "bf16", until=_T0 + args.budget_minutes * 60 * args.bf16_share)
    if device.type == "cuda":
        forget_compiled(holder["model"])
    reset_peak(device)

    def convert():
        t = time.perf_counter()
        m = holder["model"]
        n = convert_in_place(m, args.rtn_grid)
        sync(device)
        rec.add(model="gsq2", figure="convert", layers=cfg.num_hidden_layers, seconds=time.perf_counter() - t,
                peak_gib=peak_gib(device), weights_gib=tensor_gib(m),
                note=f"RTN (grid {args.rtn_grid or 'library default'}) of {n} experts modules in place "
                     f"on {device.type}, layer by layer")
        return n

    if stage(rec, budget, "convert to 2-bit", convert) is None:
        return
    reset_peak(device)
    reserve = 120.0 if args.checkpoint_roundtrip and not args.smoke else 0.0
    Run(args, rec, budget, device, cfg, bw).measure(holder["model"], "gsq2", until=budget.end - reserve)
    if args.checkpoint_roundtrip:
        if device.type == "cuda":
            forget_compiled(holder["model"])
        stage(rec, budget, "checkpoint round trip", lambda: checkpoint_roundtrip(args, rec, device, holder))


if __name__ == "__main__":
    main()
