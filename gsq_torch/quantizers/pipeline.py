"""Layer-by-layer quantization of a transformers MoE model's routed experts: RTN, GPTQ or GSQ.

Dimension legend: T tokens, H hidden, I expert intermediate, E experts, K top-k.

For each decoder layer in turn (its inputs come from the layers before it, already quantized):
move the layer to the device -> run the calibration sequences through it, recording each
experts module's inputs and the full-precision router's choices -> GPTQ Hessians from the routed
tokens -> RTN / GPTQ / GSQ -> per expert and matrix, keep the method's result only where it does
best on held-out tokens (else GPTQ's, or RTN's) -> swap in a :class:`~gsq_torch.nn.GSQFusedMoE` ->
run the sequences again for the next layer's inputs -> move the layer back. Activations live on the CPU; only one decoder layer
(plus the method's state) is on the device at a time.

Progress goes to ``work_dir`` after each layer (packed results, the next layer's inputs, the log);
a later call with the same arguments resumes there and produces the same result. Everything is
seeded; on a CPU the result is bit-identical run to run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..nn.moe import GSQFusedMoE
from ..nn.replace import find_experts, replace_experts
from .calibration import (
    ExpertInputCapture,
    capture_layer_inputs,
    find_decoder_layers,
    group_by_expert,
    load_calibration,
    to_device,
)
from .gptq import GPTQ, QuantResult, make_result, rtn_result
from .gsq import GSQ, GSQConfig, expert_forward

logger = logging.getLogger("gsq_torch.quantize")

METHODS = ("rtn", "gptq", "gsq")
_PROGRESS = "progress.json"
_HIDDEN = "hidden.pt"
_FORMAT_VERSION = 1
# Token chunks for Hessians and evaluations: big enough for the GPU, bounded for memory.
_CHUNK_TOKENS = 4096
# Keep the training tokens on the device when they take at most this much.
_DEVICE_TOKENS_BYTES = 8 << 30


# --- small helpers ------------------------------------------------------------------------------


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _fingerprint(model: nn.Module, samples: Sequence[torch.Tensor], n_train: int, settings: dict) -> str:
    """Hash of what determines the result: the model (config, a slice of its embeddings), the
    calibration tokens and the settings. Resuming requires an equal fingerprint."""
    h = hashlib.sha256()
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embed is not None:  # never quantized: the same weights give the same bytes, before and after
        h.update(embed.weight.detach().reshape(-1)[: 1 << 16].float().cpu().numpy().tobytes())
    config = getattr(model, "config", None)
    h.update((config.to_json_string() if config is not None else type(model).__name__).encode())
    for s in samples:
        h.update(s.to(torch.int64).numpy().tobytes())
        h.update(b"|")
    h.update(json.dumps({"n_train": n_train, **settings}, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_json(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _layer_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _token_chunks(x: torch.Tensor, top_k_index: torch.Tensor, num_experts: int, device: torch.device, dtype):
    """Yield ``(x_pad [E, N, H], counts [E])`` over ``x [T, H]`` in chunks of routed tokens."""
    for t0 in range(0, x.shape[0], _CHUNK_TOKENS):
        xs = x[t0 : t0 + _CHUNK_TOKENS].to(device, dtype)
        yield group_by_expert(xs, top_k_index[t0 : t0 + _CHUNK_TOKENS].to(device), num_experts)


# --- per experts module --------------------------------------------------------------------------


class _Tokens:
    """The routed tokens one experts module saw: ``x [T, H]`` and ``top_k_index [T, K]`` (CPU)."""

    def __init__(self):
        self.x: list[torch.Tensor] = []
        self.idx: list[torch.Tensor] = []

    def __call__(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor) -> None:
        self.x.append(hidden_states.detach().reshape(-1, hidden_states.shape[-1]).to("cpu"))
        self.idx.append(top_k_index.detach().reshape(hidden_states.numel() // hidden_states.shape[-1], -1).to("cpu"))

    def cat(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat(self.x), torch.cat(self.idx).to(torch.int32)


@torch.no_grad()
def _hessians(gate_up, x, idx, device) -> tuple[GPTQ, GPTQ]:
    """GPTQ Hessians of one layer's experts: gate/up from the routed tokens, down from the
    full-precision ``silu(gate x) * up x`` of those tokens."""
    E, two_i, H = gate_up.shape
    g_gate_up, g_down = GPTQ(E, H, device), GPTQ(E, two_i // 2, device)
    for xp, counts in _token_chunks(x, idx, E, device, gate_up.dtype):
        g_gate_up.add_batch(xp, counts)
        gate, up = torch.bmm(xp, gate_up.transpose(1, 2)).chunk(2, dim=-1)
        g_down.add_batch(torch.nn.functional.silu(gate) * up, counts)
    return g_gate_up, g_down


@torch.no_grad()
def _combo_errors(
    x: torch.Tensor,
    idx: torch.Tensor,
    reference: tuple[torch.Tensor, torch.Tensor],
    gate_ups: list[torch.Tensor],
    downs: list[torch.Tensor],
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert summed squared output error of every pair ``(gate_ups[a], downs[b])`` against the
    reference weights over the tokens ``x [T, H]`` routed by ``idx [T, K]``.

    Returns:
        ``(errors [A, B, E] fp64, counts [E])``.
    """
    E = reference[0].shape[0]
    errs = torch.zeros(len(gate_ups), len(downs), E, dtype=torch.float64, device=device)
    counts = torch.zeros(E, dtype=torch.int64, device=device)
    gate_up_ref, down_ref = (w.to(dtype) for w in reference)
    for xp, c in _token_chunks(x, idx, E, device, dtype):
        counts += c
        y_ref = expert_forward(xp, gate_up_ref, down_ref).float()
        for a, gu in enumerate(gate_ups):
            gate, up = torch.bmm(xp, gu.transpose(1, 2)).chunk(2, dim=-1)
            h = torch.nn.functional.silu(gate) * up  # [E, N, I]
            for b, dn in enumerate(downs):
                y = torch.bmm(h, dn.transpose(1, 2)).float()
                errs[a, b] += (y - y_ref).pow_(2).sum(dim=(1, 2)).double()
    return errs, counts


def _objective(err: torch.Tensor, counts: torch.Tensor, hidden: int) -> float:
    """Mean squared error per routed (token, expert) pair and output feature."""
    return float(err.sum() / max(int(counts.sum()) * hidden, 1))


def _pick(use: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per expert (``use [E]``), ``a``'s slice where true, else ``b``'s."""
    return torch.where(use.view(-1, *([1] * (a.dim() - 1))), a, b)


def _train_gsq(
    gate_up, down, init, x, idx, config: GSQConfig, seed: int, device, compute_dtype, progress: bool, desc: str
) -> tuple[tuple[QuantResult, QuantResult], float]:
    """Run GSQ over the training tokens; returns the hard result and the last epoch's soft loss."""
    T = x.shape[0]
    steps_per_epoch = math.ceil(T / config.batch_tokens)
    num_steps = config.epochs * steps_per_epoch
    gsq = GSQ(gate_up, down, init[0], init[1], num_steps, config, seed=seed, compute_dtype=compute_dtype)
    on_device = device.type != "cpu" and x.numel() * x.element_size() <= _DEVICE_TOKENS_BYTES
    xs, ids = (x.to(device), idx.to(device)) if on_device else (x, idx)
    gen = torch.Generator().manual_seed(seed)
    E = gate_up.shape[0]
    last = 0.0
    bar = tqdm(total=num_steps, desc=desc, leave=False, disable=not progress)
    for _ in range(config.epochs):
        perm = torch.randperm(T, generator=gen)
        total = torch.zeros((), dtype=torch.float64, device=device)
        pairs = torch.zeros((), dtype=torch.int64, device=device)  # on the device: no sync per step
        for b0 in range(0, T, config.batch_tokens):
            sel = perm[b0 : b0 + config.batch_tokens].to(xs.device)
            xp, counts = group_by_expert(xs[sel].to(device), ids[sel].to(device), E)
            total += gsq.step(xp, counts)
            pairs += counts.sum()
            bar.update(1)
        last = float(total) / max(int(pairs) * x.shape[1], 1)
    bar.close()
    return gsq.export(), last


def quantize_experts(
    experts: nn.Module,
    tokens: tuple[torch.Tensor, torch.Tensor],
    val_tokens: tuple[torch.Tensor, torch.Tensor],
    method: str,
    *,
    gsq: GSQConfig,
    act_order: bool,
    damp: float,
    seed: int,
    device: torch.device,
    progress: bool = False,
    desc: str = "",
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Quantize one experts module (all its experts batched) from its routed tokens.

    Args:
        experts: a fused experts module with ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``.
        tokens: ``(x [T, H], top_k_index [T, K])`` training tokens (CPU).
        val_tokens: held-out tokens in the same form (may be empty).
        method: ``"rtn"``, ``"gptq"`` or ``"gsq"``.
    Returns:
        ``(packed, log)``: the four tensors of :meth:`GSQFusedMoE.from_packed` by name (on
        ``device``), and the log: the objective on the held-out tokens of each method's own
        result (``rtn``, ``gptq``, ``gsq``) and of the ``final`` one, where each expert's
        ``gate_up`` and ``down`` come from whichever method did best on its held-out tokens
        (``source``: the fraction of matrices from each; experts without training tokens keep GPTQ,
        which is then RTN with the scale search).
    """
    gate_up = experts.gate_up_proj.detach().to(device)
    down = experts.down_proj.detach().to(device)
    E, _, H = gate_up.shape
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x, idx = tokens
    xv, idxv = val_tokens
    if xv.shape[0] == 0:  # no held-out data: judge on (the start of) the training tokens
        xv, idxv = x[: 8 * _CHUNK_TOKENS], idx[: 8 * _CHUNK_TOKENS]
    t0 = time.perf_counter()
    results: dict[str, tuple[QuantResult, QuantResult]] = {"rtn": (rtn_result(gate_up), rtn_result(down))}
    trained = torch.ones(E, dtype=torch.bool, device=device)
    log: dict[str, Any] = {}
    if method in ("gptq", "gsq"):
        g_gate_up, g_down = _hessians(gate_up, x, idx, device)
        trained = g_gate_up.nsamples > 0  # [E]
        results["gptq"] = (g_gate_up.quantize(gate_up, act_order, damp), g_down.quantize(down, act_order, damp))
        del g_gate_up, g_down
    if method == "gsq":
        results["gsq"], log["gsq_train_soft"] = _train_gsq(
            gate_up, down, results["gptq"], x, idx, gsq, seed, device, dtype, progress, desc
        )

    # Safeguard: per expert, the best source for each matrix on held-out tokens (GPTQ first, so a
    # tie keeps it; RTN last, for experts whose few tokens mislead GPTQ's Hessian).
    sources = {"rtn": ["rtn"], "gptq": ["gptq", "rtn"], "gsq": ["gptq", "gsq", "rtn"]}[method]
    gate_ups = [results[m][0].dequantize(dtype) for m in sources]
    downs = [results[m][1].dequantize(dtype) for m in sources]
    errs, counts = _combo_errors(xv, idxv, (gate_up, down), gate_ups, downs, device, dtype)
    unseen = counts == 0
    if len(sources) > 1 and bool((unseen & trained).any()):  # no held-out token: judge on training tokens
        errs_t, _ = _combo_errors(x[: 8 * _CHUNK_TOKENS], idx[: 8 * _CHUNK_TOKENS], (gate_up, down), gate_ups,
                                  downs, device, dtype)
        errs[:, :, unseen] = errs_t[:, :, unseen]
    for i, m in enumerate(sources):
        log[m] = _objective(errs[i, i], counts, H)
    S = len(sources)
    flat = errs.reshape(S * S, E)  # row a * S + b: gate_up from sources[a], down from sources[b]
    choice = torch.where(trained, flat.argmin(dim=0), torch.zeros_like(flat[0], dtype=torch.long))  # no tokens: GPTQ
    log["final"] = _objective(flat.gather(0, choice[None])[0], counts, H)
    src_gu, src_d = choice // S, choice % S  # [E]
    final = []
    for which, src in ((0, src_gu), (1, src_d)):
        codes, scale = results[sources[0]][which].codes, results[sources[0]][which].weight_scale
        for i in range(1, S):
            r = results[sources[i]][which]
            codes, scale = _pick(src == i, r.codes, codes), _pick(src == i, r.weight_scale, scale)
        final.append(make_result(codes, scale))
    log["source"] = {m: float(((src_gu == i).sum() + (src_d == i).sum()) / (2 * E)) for i, m in enumerate(sources)}
    log["seconds"] = time.perf_counter() - t0
    log["val_pairs"] = int(counts.sum())
    packed = {
        "gate_up_proj": final[0].weight,
        "gate_up_proj_scale": final[0].weight_scale,
        "down_proj": final[1].weight,
        "down_proj_scale": final[1].weight_scale,
    }
    return packed, log


# --- the driver -----------------------------------------------------------------------------------


@torch.no_grad()
def _run_layer(layer, hidden, layer_args, device) -> list[torch.Tensor]:
    """Run ``layer`` on every sample (``hidden[i] [S_i, H]`` with its captured arguments); outputs on the CPU."""
    outs = []
    memo: dict[int, Any] = {}
    for h, (args, kwargs) in zip(hidden, layer_args):
        if len(memo) > 64:
            memo.clear()
        args, kwargs = to_device((args, kwargs), device, memo)
        out = _layer_output(layer(h[None].to(device), *args, **kwargs))
        outs.append(out[0].to("cpu"))
    return outs


def quantize_model(
    model: nn.Module,
    calibration: Any,
    method: str = "gsq",
    *,
    tokenizer: Any = None,
    num_samples: int = 512,
    val_samples: int = 32,
    seq_len: int = 2048,
    gsq: GSQConfig | None = None,
    act_order: bool = False,
    damp: float = 0.1,
    device: str | torch.device | None = None,
    work_dir: str | os.PathLike | None = None,
    resume: bool = True,
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Quantize the routed experts of a transformers MoE model to 2 bits, layer by layer.

    Afterwards ``model`` holds :class:`~gsq_torch.nn.GSQFusedMoE` modules (everything else is
    untouched) and, with ``out_dir``, is saved there as a Humming checkpoint.

    Args:
        model: a transformers MoE model (``...ForCausalLM`` or a conditional-generation model),
            best loaded on the CPU: one decoder layer at a time moves to ``device``.
        calibration: anything :func:`~gsq_torch.quantizers.calibration.load_calibration` accepts
            (dataset name or path, ``datasets.Dataset``, list of strings, token tensors).
        method: ``"gsq"`` (GPTQ, then GSQ from GPTQ's result), ``"gptq"`` or ``"rtn"``. Per expert
            and matrix, the result kept is the best of the methods run (RTN included) on the
            held-out tokens; GPTQ wins ties. Experts that see no calibration token get GPTQ with
            ``H = I``, i.e. round-to-nearest with the scale search.
        tokenizer: needed for text calibration data.
        num_samples: training sequences (also used for the GPTQ Hessians).
        val_samples: held-out sequences (the safeguard and the logged objectives).
        seq_len: tokens per sequence.
        gsq: GSQ hyper-parameters (:class:`GSQConfig`).
        act_order: GPTQ in order of decreasing Hessian diagonal (static groups).
        damp: GPTQ dampening, a fraction of ``mean(diag H)``.
        device: where each layer is processed; default CUDA if available.
        work_dir: progress is written here after each layer (the packed experts of each finished
            layer, the next layer's inputs, the log).
        resume: continue from ``work_dir``'s progress (load the model afresh for that). Progress
            of another model, other data or other settings is refused.
        seed: seeds GSQ (per layer) and the batch order.
        out_dir: save the quantized model (and ``tokenizer``) here.
        progress: show tqdm bars.
    Returns:
        one log dict per quantized experts module (see :func:`quantize_experts`): ``layer``,
        ``module``, the objective on the held-out tokens (mean squared error of the expert
        outputs per routed (token, expert) pair and output feature) of ``rtn`` / ``gptq`` / ``gsq``
        and of the ``final`` mix, the ``source`` fractions, ``seconds``.
    Raises:
        ValueError: an unknown method, a model without routed experts, unusable calibration
            data, or a ``work_dir`` holding progress of a different run (with ``resume``).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if num_samples < 1 or val_samples < 0:
        raise ValueError(f"num_samples must be >= 1 and val_samples >= 0, got {num_samples} and {val_samples}")
    gsq = gsq or GSQConfig()
    device = torch.device(device) if device is not None else _default_device()
    layers_name, layers = find_decoder_layers(model)

    samples = load_calibration(calibration, tokenizer, num_samples + val_samples, seq_len, seed=seed)
    n_val = min(val_samples, len(samples) // 2) if len(samples) < num_samples + val_samples else val_samples
    n_train = len(samples) - n_val
    if n_val < val_samples or n_train < num_samples:
        logger.warning("calibration gave %d sequences: using %d for training and %d held out", len(samples), n_train, n_val)

    settings = dict(method=method, seq_len=seq_len, gsq=gsq.to_dict(), act_order=act_order, damp=damp, seed=seed,
                    version=_FORMAT_VERSION)
    fingerprint = _fingerprint(model, samples, n_train, settings)
    work = Path(work_dir) if work_dir is not None else None
    start, logs = 0, []
    if work is not None:
        work.mkdir(parents=True, exist_ok=True)
        if resume and (work / _PROGRESS).exists():
            state = json.loads((work / _PROGRESS).read_text())
            if state.get("fingerprint") != fingerprint:
                raise ValueError(
                    f"{work} holds progress of a different run (model, calibration data or settings differ); "
                    "use another work_dir or resume=False"
                )
            start, logs = state["next_layer"], state["log"]

    hidden, layer_args = capture_layer_inputs(model, layers, samples)
    if start > 0:
        saved = torch.load(work / _HIDDEN, weights_only=True)
        if saved["layer"] != start:
            raise ValueError(f"{work / _HIDDEN} holds inputs of layer {saved['layer']}, expected {start}")
        hidden = saved["hidden"]
        for L in range(start):  # re-install the finished layers
            path = work / f"layer_{L:04d}.pt"
            if path.exists():
                for name, packed in torch.load(path, weights_only=True).items():
                    replace_experts(model, quantized={name: GSQFusedMoE.from_packed(**packed)})

    bar = tqdm(range(len(layers)), desc=f"quantize ({method})", disable=not progress)
    bar.update(start)
    for L in range(start, len(layers)):
        layer = layers[L]
        home = _module_device(layer)
        layer.to(device)
        targets = [(n, m) for n, m in find_experts(layer)]
        layer_results: dict[str, dict[str, torch.Tensor]] = {}
        for rel, experts in targets:
            name = f"{layers_name}.{L}.{rel}"
            train, val = _Tokens(), _Tokens()
            with ExpertInputCapture(experts, train):
                _run_layer(layer, hidden[:n_train], layer_args[L][:n_train], device)
            with ExpertInputCapture(experts, val):
                _run_layer(layer, hidden[n_train:], layer_args[L][n_train:], device)
            val_tokens = val.cat() if val.x else (torch.zeros(0, train.x[0].shape[-1]), torch.zeros(0, 1, dtype=torch.int32))
            packed, log = quantize_experts(
                experts, train.cat(), val_tokens, method, gsq=gsq, act_order=act_order, damp=damp,
                seed=seed * 100_003 + L, device=device, progress=progress, desc=f"layer {L} GSQ",
            )
            del train, val
            replace_experts(model, quantized={name: GSQFusedMoE.from_packed(**packed)})
            layer_results[name] = {k: v.to("cpu") for k, v in packed.items()}
            logs.append({"layer": L, "module": name, **log})
            logger.info("layer %d %s: %s", L, name, ", ".join(
                f"{k}={v:.4g}" for k, v in log.items() if k in ("rtn", "gptq", "gsq", "final", "seconds")))
        hidden = _run_layer(layer, hidden, layer_args[L], device)
        layer.to(home)
        if work is not None:
            if layer_results:
                _atomic_save(layer_results, work / f"layer_{L:04d}.pt")
            _atomic_save({"layer": L + 1, "hidden": hidden}, work / _HIDDEN)
            _atomic_json({"fingerprint": fingerprint, "next_layer": L + 1, "log": logs}, work / _PROGRESS)
        bar.update(1)
    bar.close()
    if out_dir is not None:
        model.save_pretrained(out_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)
    return logs
