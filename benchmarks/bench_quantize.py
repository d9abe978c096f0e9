"""Cost of quantizing one full-size Qwen3.6 routed-experts layer with RTN, GPTQ and GSQ.

Shape: E = 256 experts, H = 2048, I = 512 (gate_up ``[256, 1024, 2048]``, down ``[256, 2048, 512]``),
random N(0, 1/fan_in) BF16 weights. Calibration is synthetic: N(0, 1) hidden states, each token
routed to 8 distinct experts uniformly at random (top-8 of random logits), so each expert gets
about ``tokens * 8 / 256`` tokens.

Measured (wall clock with CUDA synchronisation, peak memory from ``torch.cuda.max_memory_allocated``):

- RTN with the scale search of both matrices;
- GPTQ: Hessian accumulation per 4096 tokens, then the quantization of gate_up and down;
- GSQ: initialisation, then a fixed number of optimizer steps of ``--batch-tokens`` tokens
  (time per step after warm-up, and its parts: soft weights, Lion).

Projected: a layer and 40 layers at the reference's settings (4096 training sequences of 4096
tokens, 10 epochs, 512 GPTQ sequences) and at gsq-torch's defaults (512 sequences of 2048 tokens,
10 epochs), for the chosen ``--batch-tokens`` per step.

Usage: ``python3 benchmarks/bench_quantize.py --out DIR [--steps 20] [--batch-tokens 4096]``
(about 2 minutes on an H100). ``--dry-run`` runs tiny shapes on the CPU (meaningless timings).

``--quality`` instead quantizes the shipped tiny Qwen3.5-MoE (``gsq_torch.models``) on its
calibration text with RTN, GPTQ, GSQ at the reference's hyper-parameters and GSQ with a short-run
setting, and reports the held-out expert-output error per layer, held-out perplexity and time.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from gsq_torch.quantizers.calibration import group_by_expert  # noqa: E402
from gsq_torch.quantizers.gptq import rtn_result  # noqa: E402
from gsq_torch.quantizers.gsq import GSQ, GSQConfig, schedule  # noqa: E402
from gsq_torch.quantizers.pipeline import _hessians  # noqa: E402

QWEN36 = dict(E=256, H=2048, I=512, K=8)
TINY = dict(E=8, H=256, I=128, K=2)
REFERENCE = dict(train_seqs=4096, gptq_seqs=512, seq_len=4096, epochs=10)
DEFAULTS = dict(train_seqs=512, gptq_seqs=512, seq_len=2048, epochs=10)
LAYERS = 40


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device):
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return out, time.perf_counter() - t0, peak


def _routing(T, E, K, gen, device):
    return torch.rand(T, E, generator=gen, device=device).topk(K, dim=-1).indices  # [T, K] distinct experts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    ap.add_argument("--steps", type=int, default=20, help="timed GSQ steps (after 3 warm-up steps)")
    ap.add_argument("--batch-tokens", type=int, default=4096, help="calibration tokens per GSQ step")
    ap.add_argument("--hessian-tokens", type=int, default=16384, help="tokens for the timed Hessian accumulation")
    ap.add_argument("--logits-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU")
    ap.add_argument("--quality", action="store_true", help="quantize the shipped tiny model; objectives and perplexity")
    ap.add_argument("--samples", type=int, default=128, help="--quality: calibration sequences of 512 tokens")
    args = ap.parse_args()
    if args.quality:
        return quality(args)

    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    shape = TINY if args.dry_run or device.type != "cuda" else QWEN36
    if device.type != "cuda" and not args.dry_run:
        print("no CUDA device: running the dry run (tiny shapes, CPU)")
    E, H, I, K = shape["E"], shape["H"], shape["I"], shape["K"]  # noqa: E741
    steps = min(args.steps, 3) if device.type != "cuda" else args.steps
    batch_tokens = min(args.batch_tokens, 512) if device.type != "cuda" else args.batch_tokens
    hessian_tokens = min(args.hessian_tokens, 1024) if device.type != "cuda" else args.hessian_tokens
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    gate_up = (torch.randn(E, 2 * I, H, generator=gen, device=device) * H**-0.5).to(dtype)
    down = (torch.randn(E, H, I, generator=gen, device=device) * I**-0.5).to(dtype)
    print(f"device {device} ({common.env_info()['card']}), E={E} H={H} I={I} K={K}, batch_tokens={batch_tokens}")

    rows = []

    def row(phase, seconds, peak, **extra):
        r = {**common.env_info(), "phase": phase, "seconds": seconds, "peak_gib": peak, **extra}
        rows.append(r)
        print(f"{phase:28s} {seconds:9.3f} s   peak {peak:6.2f} GiB   {extra if extra else ''}")
        return r

    # RTN
    (_, _), t, peak = _timed(lambda: (rtn_result(gate_up), rtn_result(down)), device)
    row("rtn (gate_up + down)", t, peak)

    def gptq_phase():
        # Hessians from routed tokens, then the two quantizations; H is freed on return.
        x = torch.randn(hessian_tokens, H, generator=gen, device=device).to(dtype)
        idx = _routing(hessian_tokens, E, K, gen, device)
        (g_gu, g_d), t_hess, peak = _timed(lambda: _hessians(gate_up, x, idx, device), device)
        row("gptq hessians", t_hess, peak, tokens=hessian_tokens, per_4096_tokens_s=t_hess * 4096 / hessian_tokens)
        r_gu, t_gu, peak = _timed(lambda: g_gu.quantize(gate_up), device)
        row("gptq quantize gate_up", t_gu, peak)
        r_d, t_d, peak = _timed(lambda: g_d.quantize(down), device)
        row("gptq quantize down", t_d, peak)
        return (r_gu, r_d), t_hess * 4096 / hessian_tokens, t_gu + t_d

    def gsq_phase(init):
        cfg = GSQConfig(batch_tokens=batch_tokens, logits_dtype=args.logits_dtype)
        total_steps = 3 + steps
        gsq, t_init, peak = _timed(lambda: GSQ(gate_up, down, *init, num_steps=total_steps, config=cfg, seed=0), device)
        row("gsq init", t_init, peak)
        batches = []
        for _ in range(4):  # a few distinct batches, cycled
            xb = torch.randn(batch_tokens, H, generator=gen, device=device).to(dtype)
            batches.append(group_by_expert(xb, _routing(batch_tokens, E, K, gen, device), E))
        for i in range(3):
            gsq.step(*batches[i % len(batches)])
        _, t_steps, peak = _timed(lambda: [gsq.step(*batches[i % len(batches)]) for i in range(steps)], device)
        step_s = t_steps / steps
        row("gsq step", step_s, peak, steps=steps, batch_tokens=batch_tokens)
        # Parts of a step: the two soft-weight samples (forward only) and the Lion update.
        tau, kappa, _ = schedule(0, total_steps, cfg)
        _, t_soft, _ = _timed(lambda: [gsq.soft_weights(tau, kappa) for _ in range(5)], device)
        row("gsq soft weights (fwd)", t_soft / 5, float("nan"))
        for p in gsq.logits + gsq.scales:
            p.grad = torch.zeros_like(p)
        _, t_lion, _ = _timed(lambda: [gsq.optimizer.step() for _ in range(5)], device)
        row("gsq lion step", t_lion / 5, float("nan"))
        _, t_export, _ = _timed(gsq.export, device)
        row("gsq export", t_export, float("nan"))
        return t_init + t_export, step_s

    init, hess_per_4k, t_quant = gptq_phase()
    t_fixed, step_s = gsq_phase(init)

    # Projections per layer and for 40 layers.
    lines = []
    for name, s in (("reference settings", REFERENCE), ("gsq-torch defaults", DEFAULTS)):
        train_tokens = s["train_seqs"] * s["seq_len"]
        gptq_tokens = s["gptq_seqs"] * s["seq_len"]
        n_steps = s["epochs"] * math.ceil(train_tokens / batch_tokens)
        gptq_layer = hess_per_4k * gptq_tokens / 4096 + t_quant
        gsq_layer = gptq_layer + t_fixed + n_steps * step_s
        row(f"projected layer, {name}", gsq_layer, float("nan"), gsq_steps=n_steps, gptq_layer_s=gptq_layer)
        lines.append(
            f"- {name} ({s['train_seqs']} x {s['seq_len']} tokens, {s['epochs']} epochs, {batch_tokens} tokens/step = "
            f"{n_steps} steps): GPTQ {gptq_layer:.1f} s/layer, GSQ {gsq_layer / 60:.1f} min/layer, "
            f"{LAYERS} layers: GPTQ {LAYERS * gptq_layer / 60:.1f} min, GSQ {LAYERS * gsq_layer / 3600:.2f} h "
            f"(routed experts only; the layer forwards that capture activations are not included)"
        )
    preamble = (
        f"# Quantizing one Qwen3.6 routed-experts layer (E={E}, H={H}, I={I}, top-{K})\n\n"
        f"Card: {common.env_info()['card']}. Random weights, synthetic N(0,1) tokens routed uniformly.\n\n"
        + "\n".join(lines)
    )
    csv_path, md_path = common.write_results(
        rows, "quantize", args.out, columns=["card", "phase", "seconds", "peak_gib", "steps", "batch_tokens", "gsq_steps"],
        preamble=preamble,
    )
    print("\n".join(lines))
    print(f"wrote {csv_path} and {md_path}")


def quality(args) -> None:
    """RTN / GPTQ / GSQ on the shipped tiny model: held-out objective per layer, perplexity, time."""
    from gsq_torch.models import calibration_text, heldout_perplexity, load_tiny_moe
    from gsq_torch.quantizers.pipeline import quantize_model

    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    samples = 8 if device == "cpu" else args.samples
    max_eval = 4096 if device == "cpu" else None
    settings = [
        ("bf16", None, None),
        ("rtn", "rtn", None),
        ("gptq", "gptq", None),
        ("gsq (reference hyper-parameters)", "gsq", GSQConfig(epochs=10, batch_tokens=4096)),
        ("gsq (short run: sharper init, 10x lr)", "gsq",
         GSQConfig(epochs=10, batch_tokens=4096, lr_logits=2e-3, lr_scales=1e-3, init_sharpness=30.0)),
    ]
    rows = []
    for name, method, cfg in settings:
        model, tok = load_tiny_moe(dtype=torch.bfloat16)
        t0 = time.perf_counter()
        logs = []
        if method is not None:
            logs = quantize_model(model, [calibration_text()], method, tokenizer=tok, num_samples=samples,
                                  val_samples=16, seq_len=512, gsq=cfg, device=device, progress=False, seed=0)
        seconds = time.perf_counter() - t0
        ppl = heldout_perplexity(model.to(device), tok, max_tokens=max_eval)
        r = {**common.env_info(), "setting": name, "seconds": seconds, "heldout_ppl": ppl,
             "objective_final": sum(e["final"] for e in logs) / max(len(logs), 1) if logs else float("nan"),
             "per_layer": " ".join(f"{e['final']:.3g}" for e in logs),
             "source_gsq": sum(e["source"].get("gsq", 0.0) for e in logs) / max(len(logs), 1) if logs else float("nan")}
        rows.append(r)
        print(f"{name:40s} {seconds:7.1f} s  ppl {ppl:8.3f}  objective {r['objective_final']:.4g}  [{r['per_layer']}]")
    preamble = (f"# Quantizing the shipped tiny Qwen3.5-MoE ({samples} x 512 calibration tokens)\n\n"
                "objective: held-out mean squared error of the expert outputs per routed pair and feature, "
                "averaged over layers; source_gsq: fraction of expert matrices taken from GSQ.")
    common.write_results(rows, "quantize_quality", args.out,
                         columns=["card", "setting", "seconds", "heldout_ppl", "objective_final", "source_gsq",
                                  "per_layer"], preamble=preamble)


if __name__ == "__main__":
    main()
