"""The small MoE language model that ships with gsq-torch, and its held-out and calibration texts.

``load_tiny_moe()`` -> (Qwen3.5-MoE model, tokenizer) from ``gsq_torch/data/tiny-moe`` (about 9.9 M
parameters, 16 routed experts of which 4 per token, trained on the Python 3.11 documentation; see
``TRAINING.md`` there). ``eval_text()`` and ``calibration_text()`` return disjoint documents of the same
corpus, never seen in training. ``heldout_perplexity()`` is the one definition of perplexity that
``eval.json`` (and the tests) use.
"""

from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path

import torch

__all__ = [
    "calibration_text",
    "eval_text",
    "heldout_perplexity",
    "load_tiny_moe",
    "tiny_moe_path",
    "tiny_moe_reference_metrics",
]

EVAL_SEQ_LEN = 512  # window of heldout_perplexity: the training sequence length


def _data_dir(*parts: str) -> Path:
    # importlib.resources finds the data wherever the package is installed; a lone models.py (the
    # training script's fallback import) uses its own directory.
    root = resources.files(__package__) if __package__ else Path(__file__).resolve().parent
    path = Path(str(root.joinpath("data", *parts)))
    if not path.exists():
        raise FileNotFoundError(
            f"gsq-torch package data {path} is missing; reinstall the package (it ships data/**/*)"
        )
    return path


def tiny_moe_path() -> Path:
    """Directory of the shipped model (``config.json``, ``model.safetensors``, tokenizer files).

    Returns:
        A filesystem path usable with ``from_pretrained``.

    Raises:
        FileNotFoundError: if the package was installed without its data files.
    """
    return _data_dir("tiny-moe")


def load_tiny_moe(
    dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, object]:
    """Load the shipped tiny Qwen3.5-MoE model and its tokenizer with ``from_pretrained``.

    Args:
        dtype: parameter dtype (the checkpoint is bf16; ``torch.float32`` upcasts it exactly).
        device: where to put the model.

    Returns:
        ``(model, tokenizer)``: a ``Qwen3_5MoeForCausalLM`` in eval mode and a fast tokenizer whose
        ``eos_token`` (``<|endoftext|>``) separates documents.

    Raises:
        TypeError: if ``dtype`` is not a floating torch dtype.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    path = tiny_moe_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def eval_text() -> str:
    """Held-out evaluation text (about 210 KB, 20 documents separated by ``<|endoftext|>`` lines)."""
    return _data_dir("text", "eval.txt").read_text(encoding="utf-8")


def calibration_text() -> str:
    """Calibration text for quantization (about 410 KB, 42 documents, disjoint from eval and training)."""
    return _data_dir("text", "calibration.txt").read_text(encoding="utf-8")


def tiny_moe_reference_metrics() -> dict:
    """The shipped model's recorded metrics (``eval.json``): perplexities as ``heldout_perplexity`` computes them."""
    return json.loads((tiny_moe_path() / "eval.json").read_text())


@torch.no_grad()
def heldout_perplexity(
    model: torch.nn.Module,
    tokenizer,
    text: str | None = None,
    max_tokens: int | None = None,
    seq_len: int = EVAL_SEQ_LEN,
    batch_size: int = 8,
) -> float:
    """Perplexity of ``model`` on ``text`` (default: ``eval_text()``).

    The text is tokenized without added special tokens, cut to its first ``max_tokens`` tokens, and split
    into consecutive non-overlapping windows of ``seq_len`` tokens (the last one may be shorter). Each
    window predicts its own tokens 1..n-1 with no context from the previous window. Returns
    ``exp(mean negative log-likelihood)`` over all predicted tokens, computed in fp32.

    Args:
        model: a causal LM returning ``.logits`` [B, S, V].
        tokenizer: the model's tokenizer.
        text: the text to score.
        max_tokens: score only this many leading tokens (None: all).
        seq_len: window length in tokens (>= 2).
        batch_size: windows per forward pass.

    Returns:
        The perplexity (a float >= 1).

    Raises:
        ValueError: if ``seq_len < 2``, ``batch_size < 1`` or the text has fewer than 2 tokens.
    """
    if seq_len < 2 or batch_size < 1:
        raise ValueError(f"need seq_len >= 2 and batch_size >= 1, got {seq_len}, {batch_size}")
    text = eval_text() if text is None else text
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError(f"text has {len(ids)} tokens; need at least 2")
    device = next(model.parameters()).device
    tokens = torch.tensor(ids, dtype=torch.long)
    windows = list(tokens.split(seq_len))
    if len(windows[-1]) < 2:  # a 1-token tail predicts nothing
        windows.pop()
    total_nll, total_count = 0.0, 0
    was_training = model.training
    model.eval()
    # Equal-length windows batch together; the (shorter) tail runs alone.
    groups = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    for group in groups:
        same = [w for w in group if len(w) == len(group[0])]
        for batch in (same, [w for w in group if len(w) != len(group[0])]):
            if not batch:
                continue
            x = torch.stack(batch).to(device)
            logits = model(input_ids=x, use_cache=False).logits.float()
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
            )
            total_nll += nll.item()
            total_count += x[:, 1:].numel()
    model.train(was_training)
    return math.exp(total_nll / total_count)
