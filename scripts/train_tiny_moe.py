"""Train the tiny Qwen3.5-MoE language model that gsq-torch ships (gsq_torch/data/tiny-moe).

Pipeline: corpus from scripts/prepare_corpus.py (train / valid / eval splits + tokenizer) -> a
Qwen3_5MoeForCausalLM built from TINY_MOE_CONFIG, seeded init -> AdamW, linear warm-up + cosine decay,
bf16 autocast on CUDA, cross-entropy + Switch load-balancing loss on the routers -> valid loss every
``--eval-every`` steps, the best state kept -> held-out perplexity -> save_pretrained (bf16) + loss.csv
+ summary.json in ``--out``.

Time-bounded: ``--steps auto`` times the first steps and picks the number of steps that fits
``--max-minutes`` (capped by ``--max-epochs``); the run stops cleanly at the deadline whatever happens.
summary.json records the step count, so ``--steps N`` reproduces a run's schedule.

GPU run (the shipped model; one H100, about 5 minutes)::

    python3 scripts/train_tiny_moe.py --corpus carry/corpus --out $OUT/tiny-moe --max-minutes 5

then, on the CPU machine, install its output into the package (merges the shards, recomputes eval.json
on CPU, draws the loss curve)::

    python3 scripts/train_tiny_moe.py --install-from <dir with the run's output>

Smoke test on CPU (< 1 minute): ``python3 scripts/train_tiny_moe.py --cpu-smoke --out /tmp/smoke``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import sys
import time
import types
from pathlib import Path

START = time.monotonic()  # the time budget counts from interpreter start-up (imports included)

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
PACKAGE_MODEL_DIR = REPO / "gsq_torch" / "data" / "tiny-moe"

# The architecture (see TRAINING.md). Every quantized input dim (hidden 256 for gate/up, moe_intermediate
# 128 for down) is a multiple of the 128-wide scale group. 3 Gated-DeltaNet layers + 1 full-attention
# layer mirror the 3:1 pattern of Qwen3.5/3.6. tie_word_embeddings keeps the bf16 file under 20 MB.
TINY_MOE_CONFIG = {
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "full_attention_interval": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 64,
    "linear_value_head_dim": 64,
    "linear_conv_kernel_dim": 4,
    "num_experts": 16,
    "num_experts_per_tok": 4,
    "moe_intermediate_size": 128,
    "shared_expert_intermediate_size": 128,
    "max_position_embeddings": 2048,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    "tie_word_embeddings": True,
    "router_aux_loss_coef": 0.01,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
}


def build_model(tokenizer, seed: int):
    """A freshly initialised Qwen3_5MoeForCausalLM (fp32, CPU; the init depends only on ``seed``)."""
    from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

    config = Qwen3_5MoeTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_MOE_CONFIG,
    )
    config.architectures = ["Qwen3_5MoeForCausalLM"]
    torch.manual_seed(seed)
    return Qwen3_5MoeForCausalLM(config)


def dense_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """Routed experts computed for every token, weighted by a dense [T, E] routing matrix that is zero
    off the top-k: the same function and gradients as the sparse loop, in a few large einsums with no
    host sync (E=16 experts of width 128 make the wasted FLOPs cheap; training is launch-bound).
    Legend: T tokens, H hidden, E experts, I expert intermediate."""
    T = hidden_states.shape[0]
    dense = torch.zeros(T, self.num_experts, dtype=hidden_states.dtype, device=hidden_states.device)
    dense = dense.scatter(1, top_k_index, top_k_weights.to(hidden_states.dtype))  # [T, E]
    gate_up = torch.einsum("th,eoh->eto", hidden_states, self.gate_up_proj)  # [E, T, 2I]
    gate, up = gate_up.chunk(2, dim=-1)
    out = torch.einsum("eti,ehi->eth", self.act_fn(gate) * up, self.down_proj)  # [E, T, H]
    return torch.einsum("eth,te->th", out, dense)


def use_dense_experts(model) -> None:
    """Swap the routed experts' forward on the instances (parameters and saved keys are unchanged)."""
    for module in model.modules():
        if type(module).__name__.endswith("Experts") and hasattr(module, "gate_up_proj"):
            module.forward = types.MethodType(dense_experts_forward, module)


def flatten_batched_triangular_solves() -> None:
    """Make torch.linalg.solve_triangular see 3-D batches. The Gated-DeltaNet fallback solves
    [B, heads, chunks, 64, 64] systems, and torch 2.13's CPU path for 5-D batches was measured at up to
    100x slower than the same solves flattened to one batch dim (identical results). On CUDA one batch dim
    is the batched-trsm layout anyway. A patch local to this training process."""
    solve = torch.linalg.solve_triangular

    def flat_solve(A, B, *, upper, left=True, unitriangular=False, out=None):
        if out is not None or A.dim() <= 3 or A.shape[:-2] != B.shape[:-2]:
            return solve(A, B, upper=upper, left=left, unitriangular=unitriangular, out=out)
        X = solve(A.reshape(-1, *A.shape[-2:]), B.reshape(-1, *B.shape[-2:]), upper=upper, left=left,
                  unitriangular=unitriangular)
        return X.view(*B.shape[:-2], *X.shape[-2:])

    torch.linalg.solve_triangular = flat_solve


def load_balancing_loss(router_logits, num_experts: int, top_k: int) -> torch.Tensor:
    """Switch-Transformer auxiliary loss E * sum_e f_e P_e averaged over layers (1.0 when balanced)."""
    losses = []
    for logits in router_logits:  # [T, E] per layer
        probs = logits.float().softmax(-1)
        chosen = torch.zeros_like(probs).scatter(1, probs.topk(top_k, dim=-1).indices, 1.0)
        losses.append(num_experts * (chosen.mean(0) / top_k * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def tokenize_file(tokenizer, path: Path) -> torch.Tensor:
    ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def mean_loss(model, tokens: torch.Tensor, seq_len: int, batch_size: int, device, autocast) -> float:
    """Mean next-token loss over non-overlapping full windows of ``tokens``."""
    n = (len(tokens) - 1) // seq_len
    windows = tokens[: n * seq_len].view(n, seq_len)
    model.eval()
    total, count = 0.0, 0
    for i in range(0, n, batch_size):
        x = windows[i : i + batch_size].to(device)
        with autocast():
            logits = model(input_ids=x, use_cache=False).logits
        total += F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
        ).item()
        count += x[:, 1:].numel()
    model.train()
    return total / count


def import_models_module():
    """gsq_torch.models, or models.py alone if another part of the package fails to import."""
    sys.path.insert(0, str(REPO))
    try:
        from gsq_torch import models
    except Exception:  # noqa: BLE001  (training must not depend on unrelated package code)
        import importlib.util

        spec = importlib.util.spec_from_file_location("gsq_models", REPO / "gsq_torch" / "models.py")
        models = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(models)
    return models


def cosine_lr(step: int, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(args) -> dict:
    from transformers import AutoTokenizer

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    flatten_batched_triangular_solves()
    use_bf16 = device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    tokenizer_dir = args.tokenizer or (args.corpus / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    train_tokens = tokenize_file(tokenizer, args.corpus / "train.txt")
    valid_tokens = tokenize_file(tokenizer, args.corpus / "valid.txt")[: args.valid_tokens]
    print(f"train {len(train_tokens):,} tokens, valid {len(valid_tokens):,} tokens", flush=True)

    model = build_model(tokenizer, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    n_expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    print(f"{n_params / 1e6:.2f} M parameters ({n_expert / 1e6:.2f} M in routed experts)", flush=True)
    model.to(device).train()
    if args.experts == "auto":  # measured: dense wins on the GPU (launch-bound), the loop on a CPU
        args.experts = "dense" if device.type == "cuda" else "eager"
    if args.experts == "dense":
        use_dense_experts(model)
    elif args.experts != "default":
        model.set_experts_implementation(args.experts)
    cfg = model.config

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda",
    )
    gen = torch.Generator().manual_seed(args.seed)
    tokens_per_step = args.batch_size * args.seq_len
    max_steps_by_epochs = int(args.max_epochs * len(train_tokens) / tokens_per_step)
    deadline = START + 60 * args.max_minutes - args.reserve_seconds
    total_steps = args.steps if args.steps != "auto" else None
    planned = int(total_steps or max_steps_by_epochs)

    log_path = args.out / "loss.csv"
    args.out.mkdir(parents=True, exist_ok=True)
    log_file = open(log_path, "w", newline="")  # noqa: SIM115  (flushed per row, closed after the loop)
    log = csv.writer(log_file)
    log.writerow(["step", "tokens", "epoch", "elapsed_s", "lr", "train_loss", "aux_loss", "valid_loss"])
    best = {"valid_loss": float("inf"), "step": 0, "state": None}
    run_loss = torch.zeros((), device=device)
    run_aux = torch.zeros((), device=device)
    run_n = 0
    t_first = None
    step = 0
    stopped_by = "steps"
    while True:
        if total_steps is None and step == args.timing_steps + 2:
            # Time the steps after the first two (allocator warm-up) and fit the rest in the budget; the
            # 0.85 margin pays for the periodic validation passes.
            per_step = (time.monotonic() - t_first) / args.timing_steps
            fit = int((deadline - START - (t_first - START)) / per_step * 0.85)
            total_steps = max(step + 1, min(fit, max_steps_by_epochs))
            print(f"{per_step * 1e3:.1f} ms/step -> {total_steps} steps "
                  f"({total_steps * tokens_per_step / len(train_tokens):.2f} epochs)", flush=True)
        if step >= (total_steps or planned):
            break
        if time.monotonic() > deadline:
            stopped_by = "time"
            print(f"time budget reached at step {step}", flush=True)
            break
        if step == 2:
            t_first = time.monotonic()
        lr = cosine_lr(step, total_steps or planned, args.lr, args.warmup, args.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(train_tokens) - args.seq_len - 1, (args.batch_size,), generator=gen)
        batch = torch.stack([train_tokens[s : s + args.seq_len + 1] for s in starts.tolist()]).to(device)
        with autocast():
            out = model(input_ids=batch[:, :-1], use_cache=False, output_router_logits=True)
        ce = F.cross_entropy(out.logits.float().reshape(-1, cfg.vocab_size), batch[:, 1:].reshape(-1))
        aux = load_balancing_loss(out.router_logits, cfg.num_experts, cfg.num_experts_per_tok)
        (ce + cfg.router_aux_loss_coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        run_loss += ce.detach()
        run_aux += aux.detach()
        run_n += 1
        step += 1
        last = step == (total_steps or planned)
        do_eval = step % args.eval_every == 0 or last
        if step % args.log_every == 0 or do_eval:
            valid = ""
            if do_eval:
                valid = mean_loss(model, valid_tokens, args.seq_len, args.eval_batch_size, device, autocast)
                if valid < best["valid_loss"]:
                    best = {"valid_loss": valid, "step": step,
                            "state": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}}
            elapsed = time.monotonic() - START
            row = [step, step * tokens_per_step, round(step * tokens_per_step / len(train_tokens), 3),
                   round(elapsed, 1), f"{lr:.3e}", round((run_loss / run_n).item(), 4),
                   round((run_aux / run_n).item(), 4), round(valid, 4) if valid != "" else ""]
            log.writerow(row)
            log_file.flush()
            print(" ".join(f"{k}={v}" for k, v in zip(
                ["step", "tokens", "epoch", "t", "lr", "loss", "aux", "valid"], row)), flush=True)
            run_loss.zero_()
            run_aux.zero_()
            run_n = 0
    log_file.close()

    if best["step"] != step:  # stopped by the deadline between two validations: score the last state too
        valid = mean_loss(model, valid_tokens, args.seq_len, args.eval_batch_size, device, autocast)
        if valid < best["valid_loss"]:
            best = {"valid_loss": valid, "step": step, "state": None}
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    models = import_models_module()
    eval_tokens = None if not args.cpu_smoke else 2048
    eval_path = args.corpus / "eval.txt"
    model_fp32 = model.float().eval()  # the training experts forward stays: same function, no fp32 grouped_mm
    ppl = models.heldout_perplexity(model_fp32, tokenizer, eval_path.read_text(encoding="utf-8"),
                                    max_tokens=eval_tokens)
    print(f"best valid loss {best['valid_loss']:.4f} at step {best['step']}; held-out perplexity {ppl:.3f}",
          flush=True)

    model_bf16 = model_fp32.to(torch.bfloat16).to("cpu")
    model_bf16.config.use_cache = True
    # Shards stay under the device tool's 16 MiB per-file limit; --install-from merges them.
    model_bf16.save_pretrained(args.out, max_shard_size=args.max_shard_size)
    # No tokenizer files here: the run's output must stay within 8 files (device tool); --install-from
    # takes the tokenizer from the corpus directory it was trained with.
    summary = {
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "reproduce_with": f"--steps {total_steps or planned} --seed {args.seed}",
        "seed": args.seed,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "parameters": n_params,
        "routed_expert_parameters": n_expert,
        "train_tokens": len(train_tokens),
        "steps": step,
        "planned_steps": total_steps or planned,
        "stopped_by": stopped_by,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "tokens_seen": step * tokens_per_step,
        "epochs": round(step * tokens_per_step / len(train_tokens), 3),
        "lr": args.lr, "warmup": args.warmup, "min_lr_ratio": args.min_lr_ratio,
        "weight_decay": args.weight_decay, "clip": args.clip, "experts": args.experts,
        "best_step": best["step"],
        "best_valid_loss": round(best["valid_loss"], 4),
        "heldout_ppl_fp32_on_train_device": round(ppl, 4),
        "heldout_tokens": eval_tokens or "all",
        "wall_seconds": round(time.monotonic() - START, 1),
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1), flush=True)
    return summary


# ---------------------------------------------------------------------------------------------------------
# Installing a run's output into the package (CPU machine).

def install(src: Path, tokenizer_dir: Path, dst: Path = PACKAGE_MODEL_DIR) -> dict:
    """Copy a training run into ``dst`` as one bf16 ``model.safetensors`` plus the tokenizer it was
    trained with, recompute ``eval.json`` on this machine's CPU (fp32 and bf16) with the package's
    ``heldout_perplexity``, and draw ``loss.png`` when matplotlib is available."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    dst.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for shard in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(shard))
    for old in dst.glob("model*.safetensors*"):
        old.unlink()
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    os.chmod(dst / "model.safetensors", 0o644)  # save_file creates it owner-only
    for name in ("config.json", "loss.csv", "summary.json"):
        shutil.copyfile(src / name, dst / name)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_dir / name, dst / name)
    tokenizer = AutoTokenizer.from_pretrained(dst)
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id).save_pretrained(dst)
    models = import_models_module()
    metrics = {"definition": "gsq_torch.models.heldout_perplexity on eval_text(), seq_len 512, "
                             "non-overlapping windows, CPU", "torch": torch.__version__,
               "transformers": __import__("transformers").__version__}
    text = models.eval_text()
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(dst, dtype=dtype).eval()
        name = str(dtype).removeprefix("torch.")
        for n in (4096, 8192):
            metrics[f"ppl_first_{n}_{name}"] = round(models.heldout_perplexity(model, tokenizer, text, n), 4)
        metrics[f"ppl_all_{name}"] = round(models.heldout_perplexity(model, tokenizer, text), 4)
    metrics["heldout_tokens_all"] = len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    (dst / "eval.json").write_text(json.dumps(metrics, indent=1) + "\n")
    draw_loss_curve(dst / "loss.csv", dst / "loss.png")
    write_results_section(dst)
    print(json.dumps(metrics, indent=1))
    return metrics


RESULTS_BEGIN, RESULTS_END = "<!-- results:begin -->", "<!-- results:end -->"


def write_results_section(dst: Path) -> None:
    """Rewrite the generated part of TRAINING.md (between the results markers) from summary.json,
    eval.json and loss.csv, so that installing a new run keeps the document true."""
    doc_path = dst / "TRAINING.md"
    if not doc_path.exists():
        return
    summary = json.loads((dst / "summary.json").read_text())
    metrics = json.loads((dst / "eval.json").read_text())
    with open(dst / "loss.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["valid_loss"]]
    stride = max(1, math.ceil(len(rows) / 16))
    shown = rows[::stride] + ([rows[-1]] if (len(rows) - 1) % stride else [])
    lines = [
        RESULTS_BEGIN,
        "",
        (f"Trained on **{summary['device']}** (torch {summary['torch']}, transformers {summary['transformers']}): "
         f"{summary['steps']} steps of {summary['batch_size']} x {summary['seq_len']} tokens "
         f"({summary['tokens_seen']:,} tokens, {summary['epochs']} epochs of the {summary['train_tokens']:,}-token "
         f"training split) in {summary['wall_seconds']} s wall time, stopped by {summary['stopped_by']}. "
         f"Best validation loss {summary['best_valid_loss']} at step {summary['best_step']} (the weights shipped)."),
        "",
        (f"Command: `python3 scripts/{summary['command']}` (reproduce the schedule with "
         f"`{summary['reproduce_with']}`)."),
        "",
        "Held-out perplexity (`gsq_torch.models.heldout_perplexity`, CPU, 512-token windows; `eval.json`):",
        "",
        "| dtype | first 4096 tokens | first 8192 tokens | all {} tokens |".format(metrics["heldout_tokens_all"]),
        "|---|---|---|---|",
        *[f"| {d} | {metrics[f'ppl_first_4096_{d}']} | {metrics[f'ppl_first_8192_{d}']} | {metrics[f'ppl_all_{d}']} |"
          for d in ("float32", "bfloat16")],
        "",
        "Loss curve (`loss.csv`, nats per token; train loss averaged over the last logging interval):",
        "",
        "| step | tokens | epoch | lr | train loss | valid loss |",
        "|---|---|---|---|---|---|",
        *[f"| {r['step']} | {int(r['tokens']):,} | {r['epoch']} | {r['lr']} | {r['train_loss']} | {r['valid_loss']} |"
          for r in shown],
        "",
        "![loss curve](loss.png)" if (dst / "loss.png").exists() else "",
        "",
        RESULTS_END,
    ]
    doc = doc_path.read_text()
    head, _, rest = doc.partition(RESULTS_BEGIN)
    _, _, tail = rest.partition(RESULTS_END)
    doc_path.write_text(head + "\n".join(lines) + tail)


def draw_loss_curve(csv_path: Path, png_path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no loss.png")
        return
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    steps = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    ax.plot(steps, [float(r["train_loss"]) for r in rows], label="train")
    val = [(int(r["step"]), float(r["valid_loss"])) for r in rows if r["valid_loss"]]
    ax.plot([s for s, _ in val], [v for _, v in val], "o-", ms=3, label="valid")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("tiny-moe training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train (or install) the tiny MoE model shipped by gsq-torch.")
    p.add_argument("--corpus", type=Path, default=REPO / "carry" / "corpus")
    p.add_argument("--tokenizer", type=Path, default=None, help="default: <corpus>/tokenizer")
    p.add_argument("--out", type=Path)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2,
                   help="CPU threads (1 is several times faster on a 2-core machine shared with other jobs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", default="auto", help="number of optimizer steps, or 'auto' (fit the time)")
    p.add_argument("--max-minutes", type=float, default=5.0, help="wall-time budget including start-up")
    p.add_argument("--reserve-seconds", type=float, default=25.0, help="kept for final eval and save")
    p.add_argument("--max-epochs", type=float, default=12.0)
    p.add_argument("--timing-steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--experts", default="auto",
                   help="auto | dense | default | a transformers experts implementation (eager, grouped_mm)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--valid-tokens", type=int, default=65536)
    p.add_argument("--max-shard-size", default="12MB")
    p.add_argument("--cpu-smoke", action="store_true", help="a few tiny steps on CPU (< 1 minute)")
    p.add_argument("--install-from", type=Path, help="install a finished run's output into the package")
    args = p.parse_args(argv)
    if args.steps != "auto":
        args.steps = int(args.steps)
    if args.cpu_smoke:
        args.device, args.steps, args.batch_size, args.seq_len = "cpu", 6, 2, 128
        args.warmup, args.log_every, args.eval_every, args.valid_tokens = 2, 2, 3, 1024
        args.max_minutes = min(args.max_minutes, 1.0)
        args.reserve_seconds = 10.0
    if args.install_from is None and args.out is None:
        p.error("--out is required (except with --install-from)")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.install_from is not None:
        torch.set_num_threads(args.threads)
        install(args.install_from, args.tokenizer or (args.corpus / "tokenizer"))
        return
    train(args)


if __name__ == "__main__":
    main()
