"""Perplexity, throughput and memory of a causal LM (a GSQ model or any other) on a text.

``load_text`` gets the text (a string, a local file, or a ``datasets`` name); ``evaluate_perplexity``
tokenizes it once and slides a window of ``seq_len`` tokens over it in steps of ``stride``: each
window scores only the tokens no earlier window scored, so every token after the first is
predicted once, with up to ``seq_len - stride`` tokens of context carried over. ``stride ==
seq_len`` gives non-overlapping windows (the definition of :func:`gsq_torch.models.heldout_perplexity`).
"""

from __future__ import annotations

import inspect
import math
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

__all__ = ["EvalResult", "evaluate_perplexity", "load_text"]

_TEXT_COLUMNS = ("text", "content", "document")
_DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
# Positions per fp32 cross-entropy chunk: bounds the fp32 copy of [positions, vocab] logits.
_CE_CHUNK = 1024


@dataclass
class EvalResult:
    """What :func:`evaluate_perplexity` measured.

    Attributes:
        perplexity: ``exp(nll)``.
        nll: mean negative log-likelihood per scored token, in nats.
        scored_tokens: tokens predicted (each once).
        processed_tokens: tokens run through the model (window overlaps count again).
        windows: forward windows.
        seconds: wall time of the forward passes and losses (tokenization excluded).
        tokens_per_second: ``processed_tokens / seconds``.
        peak_memory_bytes: on CUDA, ``torch.cuda.max_memory_allocated`` during the evaluation; on the
            CPU, the process's peak resident set size so far (``ru_maxrss``, not reset per call).
        memory_kind: ``"cuda_max_allocated"`` or ``"cpu_peak_rss"``.
        model_bytes: bytes of the model's parameters and buffers (2-bit experts at their packed size).
        seq_len, stride: the window and its step, in tokens.
        device: where the model ran.
    """

    perplexity: float
    nll: float
    scored_tokens: int
    processed_tokens: int
    windows: int
    seconds: float
    tokens_per_second: float
    peak_memory_bytes: int
    memory_kind: str
    model_bytes: int
    seq_len: int
    stride: int
    device: str

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """One line: perplexity, tokens, speed, memory."""
        return (
            f"perplexity {self.perplexity:.4f} (nll {self.nll:.4f}) over {self.scored_tokens} tokens; "
            f"{self.tokens_per_second:.0f} tokens/s on {self.device}; "
            f"peak memory {self.peak_memory_bytes / 2**20:.0f} MiB ({self.memory_kind}), "
            f"model {self.model_bytes / 2**20:.1f} MiB"
        )


def _join_column(ds, text_column: str | None, where: str) -> str:
    columns = list(ds.column_names)
    column = text_column or next((c for c in _TEXT_COLUMNS if c in columns), None)
    if column is None or column not in columns:
        raise ValueError(f"{where} has columns {columns}; pass text_column= (one of them holding text)")
    # Blank-line joins, as perplexity on wikitext-style datasets is usually computed.
    return "\n\n".join(t for t in ds[column] if t)


def load_text(
    text: str | os.PathLike | None = None,
    *,
    dataset: str | None = None,
    dataset_config: str | None = None,
    split: str = "test",
    text_column: str | None = None,
) -> str:
    """The text to evaluate on.

    Args:
        text: the text itself, or the path of a local file: ``.txt`` (read as is) or
            ``.json`` / ``.jsonl`` / ``.csv`` / ``.parquet`` (rows of ``text_column`` joined by blank
            lines). None with no ``dataset``: the held-out text shipped with gsq-torch
            (:func:`gsq_torch.models.eval_text`).
        dataset: a ``datasets`` name (e.g. ``"wikitext"`` with ``dataset_config="wikitext-2-raw-v1"``)
            or a directory saved with ``save_to_disk``.
        dataset_config: the dataset's configuration name.
        split: the dataset's split.
        text_column: the column holding text (default: ``text`` / ``content`` / ``document``).

    Returns:
        The text.

    Raises:
        ValueError: both ``text`` and ``dataset``, an empty text, an unknown file type, no text column.
        FileNotFoundError: a path-like ``text`` that does not exist.
    """
    if text is not None and dataset is not None:
        raise ValueError("pass text= or dataset=, not both")
    if dataset is not None:
        import datasets

        if os.path.isdir(dataset):
            ds = datasets.load_from_disk(dataset)
        else:
            ds = datasets.load_dataset(dataset, dataset_config, split=split)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"dataset {dataset!r} has splits {list(ds)}, not {split!r}")
            ds = ds[split]
        out = _join_column(ds, text_column, f"dataset {dataset!r}")
    elif text is None:
        from .models import eval_text

        out = eval_text()
    elif isinstance(text, os.PathLike) or (
        isinstance(text, str) and "\n" not in text and os.path.isfile(text)
    ):
        path = os.fspath(text)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"text file {path!r} does not exist")
        ext = os.path.splitext(path)[1].lower()
        if ext in _DATA_FILE_BUILDERS:
            import datasets

            ds = datasets.load_dataset(_DATA_FILE_BUILDERS[ext], data_files=path, split="train")
            out = _join_column(ds, text_column, f"file {path!r}")
        elif ext in (".txt", ".md", ".rst", ""):
            with open(path, encoding="utf-8") as f:
                out = f.read()
        else:
            raise ValueError(
                f"text file {path!r}: unknown type {ext!r}; use .txt or one of {sorted(_DATA_FILE_BUILDERS)}"
            )
    elif isinstance(text, str):
        out = text
    else:
        raise TypeError(f"text must be a string or a path, got {type(text).__name__}")
    if not out.strip():
        raise ValueError("the text to evaluate on is empty")
    return out


def _input_device(model: torch.nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


def _model_bytes(model: torch.nn.Module) -> int:
    tensors = {t.data_ptr(): t for t in (*model.parameters(), *model.buffers()) if t.device.type != "meta"}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


def _windows(n: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, scored)``: window ``ids[begin:end]`` scores its last ``scored`` positions."""
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + seq_len, n)
        out.append((begin, end, end - prev_end))
        prev_end = end
        if end == n:
            break
    return out


@torch.no_grad()
def evaluate_perplexity(
    model: torch.nn.Module,
    tokenizer,
    text: str | os.PathLike | None = None,
    *,
    dataset: str | None = None,
    dataset_config: str | None = None,
    split: str = "test",
    text_column: str | None = None,
    seq_len: int = 512,
    stride: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 1,
) -> EvalResult:
    """Perplexity of a causal LM on a text with a sliding window, plus tokens/s and peak memory.

    The text (see :func:`load_text` for ``text`` / ``dataset`` / ``dataset_config`` / ``split`` /
    ``text_column``) is tokenized without special tokens and cut to ``max_tokens``. Windows of
    ``seq_len`` tokens start every ``stride`` tokens; each scores only its tokens that no earlier
    window scored (the first window scores all its tokens but the first). Losses are computed in
    fp32 from the logits.

    Args:
        model: a causal LM whose forward takes ``input_ids`` and returns ``.logits`` ``[B, S, V]``
            (any transformers ``...ForCausalLM``, GSQ or not). Run in eval mode, restored after.
        tokenizer: its tokenizer.
        seq_len: window length in tokens (>= 2).
        stride: step between windows, 1..seq_len (default ``seq_len``: no overlap).
        max_tokens: evaluate only the first ``max_tokens`` tokens.
        batch_size: windows of equal length per forward pass.

    Returns:
        :class:`EvalResult`.

    Raises:
        ValueError: bad ``seq_len`` / ``stride`` / ``batch_size``, fewer than 2 tokens, or a bad text source.
    """
    stride = seq_len if stride is None else stride
    if seq_len < 2 or not 1 <= stride <= seq_len or batch_size < 1:
        raise ValueError(
            "need seq_len >= 2, 1 <= stride <= seq_len and batch_size >= 1; "
            f"got {seq_len}, {stride}, {batch_size}"
        )
    source = load_text(
        text, dataset=dataset, dataset_config=dataset_config, split=split, text_column=text_column
    )
    ids = tokenizer(source, add_special_tokens=False, verbose=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError(f"the text has {len(ids)} tokens; need at least 2")
    tokens = torch.tensor(ids, dtype=torch.long)
    windows = _windows(len(tokens), seq_len, stride)
    device = _input_device(model)
    takes_logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
    was_training = model.training
    model.eval()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    nll_sum, scored, processed = 0.0, 0, 0
    start = time.perf_counter()
    i = 0
    while i < len(windows):
        # Equal-length windows scoring equally many tokens batch together (all but the last one or two).
        group = [windows[i]]
        while len(group) < batch_size and i + len(group) < len(windows):
            nxt = windows[i + len(group)]
            if nxt[1] - nxt[0] != group[0][1] - group[0][0] or nxt[2] != group[0][2]:
                break
            group.append(nxt)
        i += len(group)
        length, to_score = group[0][1] - group[0][0], group[0][2]
        x = torch.stack([tokens[b:e] for b, e, _ in group]).to(device)  # [B, L]
        keep = min(to_score + 1, length)  # logits of the positions that predict scored tokens
        kwargs = {"logits_to_keep": keep} if takes_logits_to_keep else {}
        logits = model(input_ids=x, use_cache=False, **kwargs).logits[:, -keep:]  # [B, keep, V]
        predicted = min(to_score, length - 1)
        targets = x[:, length - predicted :]  # [B, predicted]
        logits = logits[:, keep - 1 - predicted : keep - 1]
        for c in range(0, predicted, _CE_CHUNK):
            chunk = logits[:, c : c + _CE_CHUNK].float()
            nll_sum += F.cross_entropy(
                chunk.reshape(-1, chunk.shape[-1]), targets[:, c : c + _CE_CHUNK].reshape(-1), reduction="sum"
            ).item()
        scored += predicted * len(group)
        processed += length * len(group)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    else:
        peak, kind = _peak_rss_bytes(), "cpu_peak_rss"
    model.train(was_training)
    nll = nll_sum / scored
    return EvalResult(
        perplexity=math.exp(nll),
        nll=nll,
        scored_tokens=scored,
        processed_tokens=processed,
        windows=len(windows),
        seconds=seconds,
        tokens_per_second=processed / seconds if seconds > 0 else float("inf"),
        peak_memory_bytes=int(peak),
        memory_kind=kind,
        model_bytes=_model_bytes(model),
        seq_len=seq_len,
        stride=stride,
        device=str(device),
    )
