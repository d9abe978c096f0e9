"""The README's main job: the shipped tiny MoE model quantized to 2 bits with RTN, GPTQ and GSQ, end to end.

:func:`run_demo` (``gsq-torch demo``): load the shipped model (bf16) -> cut ``calibration_text()``
into 512-token windows -> held-out perplexity of BF16 -> RTN (``replace_experts``: data-free) ->
GPTQ and GSQ, each its own layer-by-layer ``quantize_model`` run on the same windows -> save GSQ
as a Humming checkpoint -> load it back with ``AutoModelForCausalLM.from_pretrained`` and check
its perplexity equals the in-memory model's -> greedy generation from it. Everything is seeded;
perplexity is :func:`gsq_torch.models.heldout_perplexity` on ``eval_text()``.

Why two quantization runs: each method's model must be built from inputs that its own quantized
earlier layers produce (GPTQ layer 2 sees GPTQ layers 0-1), so GPTQ's by-products inside the GSQ
run (computed on GSQ-quantized inputs) are not the GPTQ model. The GPTQ run costs only its
calibration forwards and Hessians; RTN needs no data at all.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import format
from .models import EVAL_SEQ_LEN, calibration_text, heldout_perplexity, load_tiny_moe, tiny_moe_path
from .nn import GSQFusedMoE, replace_experts
from .nn.replace import find_experts
from .quantizers.gsq import GSQConfig
from .quantizers.pipeline import quantize_model

__all__ = ["DemoResult", "DemoSettings", "FULL", "QUICK", "run_demo"]

METHODS = ("bf16", "rtn", "gptq", "gsq")
LABELS = {"bf16": "BF16", "rtn": "RTN", "gptq": "GPTQ", "gsq": "GSQ"}
PROMPT = "The `os.path` module"
CHECKPOINT_DIR = "tiny-moe-gsq"  # inside the demo's output directory


@dataclass(frozen=True)
class DemoSettings:
    """What the demo runs (the calibration windows are ``EVAL_SEQ_LEN`` = 512 tokens, the training length).

    Attributes:
        num_samples: calibration windows for GPTQ's Hessians and GSQ's training.
        val_samples: held-out calibration windows (the per-matrix safeguard and the logged objectives).
        eval_tokens: score this many leading tokens of ``eval_text()`` (None: all 54 470).
        gsq: GSQ's hyper-parameters.
        max_new_tokens: length of the greedy generation.
    """

    num_samples: int
    val_samples: int
    eval_tokens: int | None
    gsq: GSQConfig
    max_new_tokens: int = 40

    def to_dict(self) -> dict:
        return {**asdict(self), "gsq": self.gsq.to_dict(), "seq_len": EVAL_SEQ_LEN}


# The reference runs ~40k GSQ steps per layer; here a layer gets 144 (3 epochs of 48 steps of 2048
# tokens), so the logits' step size is 5x the reference's 2e-4: Lion moves every logit by lr per step,
# and at 2e-4 the logits hardly leave GPTQ's codes in 144 steps. Everything else is the reference's.
# Swept on the per-layer objective (data/tiny-moe/QUALITY.md): logits lr 5e-4 and 2e-3 do worse, init
# sharpness 30 instead of 6 does worse, and more tokens beat more epochs over fewer tokens.
FULL = DemoSettings(
    num_samples=192,  # 98 304 tokens: all but the last 16 windows of calibration_text()
    val_samples=16,
    eval_tokens=None,
    gsq=GSQConfig(epochs=3, batch_tokens=2048, lr_logits=1e-3),
)
# CI smoke run: the same steps on a slice of the data (a few seconds per stage).
QUICK = DemoSettings(
    num_samples=16,
    val_samples=4,
    eval_tokens=4096,
    gsq=GSQConfig(epochs=2, batch_tokens=2048, lr_logits=1e-3),
    max_new_tokens=16,
)


@dataclass
class DemoResult:
    """What :func:`run_demo` measured.

    Attributes:
        perplexity: held-out perplexity per method (``bf16``, ``rtn``, ``gptq``, ``gsq``).
        reloaded_perplexity: of the GSQ checkpoint loaded back with ``from_pretrained``.
        reload_matches: whether it equals ``perplexity["gsq"]`` (relative difference <= 1e-5).
        sizes: bytes: ``routed_experts_bf16``, ``routed_experts_packed``, ``model_bf16``,
            ``model_quantized`` (parameters, tied embeddings once), ``checkpoint_bf16`` and
            ``checkpoint_gsq`` (safetensors files on disk).
        routed_expert_weights: number of quantized weights.
        checkpoint: directory of the GSQ Humming checkpoint.
        prompt / generation: the greedy generation's prompt and its continuation.
        layer_logs: per quantized method, ``quantize_model``'s log (per-layer objectives, sources, seconds).
        timings: per stage, ``{"wall": s, "cpu": s}`` (CPU: user + system time of this process).
        settings: :meth:`DemoSettings.to_dict` plus seed, device and threads.
        versions: torch / transformers.
    """

    perplexity: dict[str, float]
    reloaded_perplexity: float
    reload_matches: bool
    sizes: dict[str, int]
    routed_expert_weights: int
    checkpoint: str
    prompt: str
    generation: str
    layer_logs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    timings: dict[str, dict[str, float]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def gap_closed(self) -> float:
        """``(ppl_gptq - ppl_gsq) / (ppl_gptq - ppl_bf16)``: the share of GPTQ's gap to BF16 that GSQ closes."""
        p = self.perplexity
        return (p["gptq"] - p["gsq"]) / (p["gptq"] - p["bf16"])

    @property
    def ordered(self) -> bool:
        """Whether perplexity is ordered RTN > GPTQ > GSQ."""
        p = self.perplexity
        return p["rtn"] > p["gptq"] > p["gsq"]

    def bits_per_weight(self, method: str) -> float:
        """Storage per routed-expert weight (16 for BF16; 2 bits of code plus a bf16 scale per 128 weights)."""
        return 16.0 if method == "bf16" else format.bits_per_weight()

    def table(self) -> str:
        """The perplexity / size table as fixed-width text."""
        s = self.sizes
        lines = [
            f"{'method':8s} {'perplexity':>10s} {'vs BF16':>8s} {'bits/weight':>11s} {'routed experts':>15s} "
            f"{'whole model':>12s}"
        ]
        for m in METHODS:
            ppl = self.perplexity[m]
            delta = "" if m == "bf16" else f"{ppl - self.perplexity['bf16']:+8.2f}"
            experts = s["routed_experts_bf16"] if m == "bf16" else s["routed_experts_packed"]
            model = s["model_bf16"] if m == "bf16" else s["model_quantized"]
            lines.append(f"{LABELS[m]:8s} {ppl:10.2f} {delta:>8s} {self.bits_per_weight(m):11.3f} "
                         f"{_mb(experts):>15s} {_mb(model):>12s}")
        return "\n".join(lines)

    def report(self) -> str:
        """Everything a person reads at the end of the demo: table, targets, reload check, generation, time."""
        p = self.perplexity
        eval_tokens = self.settings.get("eval_tokens")
        where = "all of eval_text()" if eval_tokens is None else f"the first {eval_tokens} tokens of eval_text()"
        total = self.timings.get("total", {})
        lines = [
            f"Held-out perplexity on {where} (windows of {EVAL_SEQ_LEN} tokens); routed experts "
            f"({self.routed_expert_weights / 1e6:.2f} M weights) quantized, everything else BF16:",
            "",
            self.table(),
            "",
            f"ordering RTN > GPTQ > GSQ: {'yes' if self.ordered else 'NO'}; GSQ closes "
            f"{100 * self.gap_closed:.0f}% of GPTQ's gap to BF16 (target >= 50%)",
            f"checkpoint: {self.checkpoint} ({_mb(self.sizes['checkpoint_gsq'])} on disk; the BF16 model "
            f"{_mb(self.sizes['checkpoint_bf16'])})",
            f"from_pretrained: perplexity {self.reloaded_perplexity:.4f} vs in memory {p['gsq']:.4f}: "
            f"{'equal' if self.reload_matches else 'DIFFERENT'}",
            "",
            f"greedy generation (GSQ, from the checkpoint): {self.prompt}{self.generation}",
            "",
            f"total {total.get('wall', 0):.0f} s wall, {total.get('cpu', 0):.0f} s CPU (user + system) on "
            f"{self.settings.get('device')} with {self.settings.get('threads')} thread(s)",
        ]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {**asdict(self), "gap_closed": self.gap_closed, "ordered": self.ordered,
                "bits_per_weight": {m: self.bits_per_weight(m) for m in METHODS}}


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _param_bytes(model: nn.Module) -> int:
    """Bytes of the parameters (tied ones once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _routed_expert_bytes(model: nn.Module) -> tuple[int, int]:
    """``(bytes, weights)`` of the routed experts' weight tensors (BF16 or packed with scales)."""
    nbytes = nweights = 0
    quantized = [m for m in model.modules() if isinstance(m, GSQFusedMoE)]
    for experts in quantized + [m for _, m in find_experts(model)]:
        if isinstance(experts, GSQFusedMoE):
            tensors = (experts.gate_up_proj, experts.gate_up_proj_scale, experts.down_proj, experts.down_proj_scale)
            nweights += experts.num_experts * 3 * experts.hidden_dim * experts.intermediate_dim
        else:
            tensors = (experts.gate_up_proj, experts.down_proj)
            nweights += sum(t.numel() for t in tensors)
        nbytes += sum(t.numel() * t.element_size() for t in tensors)
    return nbytes, nweights


def _safetensors_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def _calibration_windows(tokenizer, count: int) -> torch.Tensor:
    """The first ``count`` consecutive ``EVAL_SEQ_LEN``-token windows of ``calibration_text()`` ([count, 512] int64).

    The calibration documents are tokenized as one stream (they are already separated by
    ``<|endoftext|>``), like the training data; 107 238 tokens give 209 windows.
    """
    ids = tokenizer(calibration_text(), add_special_tokens=False, verbose=False)["input_ids"]
    available = len(ids) // EVAL_SEQ_LEN
    if count > available:
        raise ValueError(f"calibration_text() has {available} windows of {EVAL_SEQ_LEN} tokens; {count} were asked for")
    return torch.tensor(ids[: count * EVAL_SEQ_LEN], dtype=torch.long).view(count, EVAL_SEQ_LEN)


class _Stages:
    """Wall and CPU time per named stage, and a progress line per stage."""

    def __init__(self, names: list[str], progress: bool):
        self.timings: dict[str, dict[str, float]] = {}
        self.bar = tqdm(total=len(names), desc="demo", disable=not progress, position=0)
        self.progress = progress
        self.start_wall, self.start_cpu = time.perf_counter(), _cpu_seconds()

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        self.bar.set_postfix_str(name)
        wall, cpu = time.perf_counter(), _cpu_seconds()
        out = fn()
        self.timings[name] = {"wall": time.perf_counter() - wall, "cpu": _cpu_seconds() - cpu}
        if self.progress:
            tqdm.write(f"  {name}: {self.timings[name]['wall']:.1f} s", file=sys.stderr)
        self.bar.update(1)
        return out

    def close(self) -> None:
        self.bar.close()
        self.timings["total"] = {"wall": time.perf_counter() - self.start_wall, "cpu": _cpu_seconds() - self.start_cpu}


def run_demo(
    out_dir: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    quick: bool = False,
    settings: DemoSettings | None = None,
    seed: int = 0,
    threads: int | None = None,
    progress: bool = True,
) -> DemoResult:
    """Quantize the shipped tiny MoE model's routed experts with RTN, GPTQ and GSQ and compare them.

    Writes ``out_dir/tiny-moe-gsq`` (the GSQ model as a Humming checkpoint, with its tokenizer) and
    ``out_dir/demo.json`` (:meth:`DemoResult.to_dict`).

    Args:
        out_dir: output directory (created).
        device: where to quantize and evaluate; default CUDA if available. On a GPU the GSQ noise
            comes from the Triton kernels, so the numbers differ from the CPU's (README).
        quick: the short CI run (:data:`QUICK`) instead of :data:`FULL`.
        settings: explicit settings (overrides ``quick``).
        seed: seeds GSQ and the batch order.
        threads: ``torch.set_num_threads`` for the run (restored after); None leaves torch's setting.
        progress: tqdm bars and a line per stage on stderr.

    Returns:
        A :class:`DemoResult` (``report()`` is the text the CLI prints).

    Raises:
        ValueError: ``threads < 1``, or settings asking for more calibration windows than exist.
    """
    from transformers import AutoModelForCausalLM

    settings = settings or (QUICK if quick else FULL)
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / CHECKPOINT_DIR
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    # transformers logs each fallback kernel it uses (no fla / causal-conv1d here) once per process: noise.
    tf_logger = logging.getLogger("transformers")
    old_level = tf_logger.level
    tf_logger.setLevel(logging.ERROR)
    torch.manual_seed(seed)
    stages = _Stages(["load", "bf16", "rtn", "gptq", "gsq", "save", "reload", "generate"], progress)
    try:
        ppl: dict[str, float] = {}
        logs: dict[str, list[dict[str, Any]]] = {}

        def score(model: nn.Module) -> float:
            return heldout_perplexity(model.to(device), tokenizer, max_tokens=settings.eval_tokens)

        def load():
            model, tok = load_tiny_moe(dtype=torch.bfloat16)  # on the CPU: quantize_model moves one layer at a time
            windows = _calibration_windows(tok, settings.num_samples + settings.val_samples)
            return model, tok, windows

        base, tokenizer, windows = stages.run("load", load)
        experts_bf16, n_weights = _routed_expert_bytes(base)
        model_bf16 = _param_bytes(base)
        ppl["bf16"] = stages.run("bf16", lambda: score(base))
        base.to("cpu")

        def rtn() -> float:
            model = replace_experts(copy.deepcopy(base))
            return score(model)

        ppl["rtn"] = stages.run("rtn", rtn)

        def calibrated(method: str) -> nn.Module:
            model = copy.deepcopy(base)
            logs[method] = quantize_model(
                model, windows, method, num_samples=settings.num_samples, val_samples=settings.val_samples,
                seq_len=EVAL_SEQ_LEN, gsq=settings.gsq, device=device, seed=seed, progress=progress,
            )
            ppl[method] = score(model)
            return model

        stages.run("gptq", lambda: calibrated("gptq"))
        gsq_model = stages.run("gsq", lambda: calibrated("gsq"))
        experts_packed, _ = _routed_expert_bytes(gsq_model)
        model_quantized = _param_bytes(gsq_model)

        def save():
            gsq_model.save_pretrained(ckpt)
            tokenizer.save_pretrained(ckpt)

        stages.run("save", save)
        def reload():
            model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).to(device).eval()
            return model, heldout_perplexity(model, tokenizer, max_tokens=settings.eval_tokens)

        reloaded, ppl_reloaded = stages.run("reload", reload)

        def generate() -> str:
            ids = tokenizer(PROMPT, return_tensors="pt", add_special_tokens=False).input_ids.to(device)
            with torch.no_grad():
                out_ids = reloaded.generate(ids, max_new_tokens=settings.max_new_tokens, do_sample=False,
                                            pad_token_id=tokenizer.pad_token_id)
            return tokenizer.decode(out_ids[0, ids.shape[1]:], skip_special_tokens=True)

        generation = stages.run("generate", generate)
    finally:
        stages.close()
        torch.set_num_threads(old_threads)
        tf_logger.setLevel(old_level)

    import transformers

    result = DemoResult(
        perplexity=ppl,
        reloaded_perplexity=ppl_reloaded,
        reload_matches=math.isclose(ppl_reloaded, ppl["gsq"], rel_tol=1e-5),
        sizes=dict(
            routed_experts_bf16=experts_bf16, routed_experts_packed=experts_packed, model_bf16=model_bf16,
            model_quantized=model_quantized, checkpoint_bf16=_safetensors_bytes(tiny_moe_path()),
            checkpoint_gsq=_safetensors_bytes(ckpt),
        ),
        routed_expert_weights=n_weights,
        checkpoint=str(ckpt),
        prompt=PROMPT,
        generation=generation,
        layer_logs=logs,
        timings=stages.timings,
        settings={**settings.to_dict(), "seed": seed, "device": str(device), "threads": torch.get_num_threads()
                  if threads is None else threads},
        versions={"torch": torch.__version__, "transformers": transformers.__version__},
    )
    (out / "demo.json").write_text(json.dumps(result.to_dict(), indent=1))
    return result

