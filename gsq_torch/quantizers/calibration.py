"""Calibration data and activation capture: token sequences -> layer inputs -> each expert's routed tokens.

Dimension legend: S sequence length, T tokens, H hidden, K top-k, E experts, N tokens per expert.

1. :func:`load_calibration` turns a ``datasets`` dataset (hub name or local path; a text column or
   chat messages through the tokenizer's chat template), a list of strings, or token tensors into
   ``num_samples`` sequences of ``seq_len`` tokens.
2. :func:`capture_layer_inputs` runs the model once per sequence with every decoder layer stubbed
   out: it records the first layer's input and the keyword arguments each layer receives
   (rotary embeddings, masks), all on the CPU, without computing any layer.
3. :class:`ExpertInputCapture` hooks an experts module and sees each call's
   ``(hidden_states [T, H], top_k_index [T, K])``: the tokens the full-precision router sends to
   each expert. :func:`group_by_expert` pads them into ``[E, N, H]`` for batched math.
"""

from __future__ import annotations

import inspect
import os
import random
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

# --- calibration sequences --------------------------------------------------------------------

_TEXT_COLUMNS = ("text", "content", "prompt")
_MESSAGE_COLUMNS = ("messages", "conversations", "conversation")
_DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".txt": "text", ".csv": "csv", ".parquet": "parquet"}


def _load_dataset(source: str, split: str, dataset_config: str | None):
    import datasets

    if os.path.isdir(source) and (
        os.path.exists(os.path.join(source, "dataset_info.json")) or os.path.exists(os.path.join(source, "dataset_dict.json"))
    ):
        ds = datasets.load_from_disk(source)
    elif os.path.isfile(source):
        ext = os.path.splitext(source)[1].lower()
        if ext not in _DATA_FILE_BUILDERS:
            raise ValueError(f"calibration file {source!r}: unknown extension {ext!r}; use one of {sorted(_DATA_FILE_BUILDERS)}")
        ds = datasets.load_dataset(_DATA_FILE_BUILDERS[ext], data_files=source, split="train")
    else:
        ds = datasets.load_dataset(source, dataset_config, split=split)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"calibration dataset {source!r} has splits {list(ds)}, not {split!r}")
        ds = ds[split]
    return ds


def _example_texts(ds, tokenizer, text_column: str | None, messages_column: str | None) -> Iterable[tuple[str, bool]]:
    """Yield ``(text, is_chat)`` per example."""
    columns = list(ds.column_names)
    if messages_column is None and text_column is None:
        messages_column = next((c for c in _MESSAGE_COLUMNS if c in columns), None)
        if messages_column is None:
            text_column = next((c for c in _TEXT_COLUMNS if c in columns), None)
        if messages_column is None and text_column is None:
            raise ValueError(
                f"calibration dataset has columns {columns}; name the text column (text_column=...) or the chat "
                f"messages column (messages_column=...)"
            )
    column = messages_column or text_column
    if column not in columns:
        raise ValueError(f"calibration dataset has no column {column!r} (columns: {columns})")
    if messages_column is not None and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"column {messages_column!r} holds chat messages but the tokenizer has no chat template")
    for example in ds:
        value = example[column]
        if messages_column is not None:
            yield tokenizer.apply_chat_template(value, tokenize=False), True
        elif isinstance(value, str):
            yield value, False
        else:
            raise ValueError(f"text column {column!r} holds {type(value).__name__}, not strings")


def _pack(texts: Iterable[tuple[str, bool]], tokenizer, num_samples: int, seq_len: int) -> list[torch.Tensor]:
    """Tokenize texts into one stream (documents separated by EOS) and cut ``seq_len`` pieces."""
    eos = getattr(tokenizer, "eos_token_id", None)
    stream: list[int] = []
    needed = num_samples * seq_len
    for text, is_chat in texts:
        if not text:
            continue
        # Chat templates already write their special tokens.
        ids = tokenizer(text, add_special_tokens=not is_chat, verbose=False)["input_ids"]
        stream.extend(ids)
        if eos is not None and (not ids or ids[-1] != eos):
            stream.append(eos)
        if len(stream) >= needed:
            break
    n = min(num_samples, len(stream) // seq_len)
    if n == 0:
        raise ValueError(f"calibration text has {len(stream)} tokens: fewer than one sequence of seq_len={seq_len}")
    return [torch.tensor(stream[i * seq_len : (i + 1) * seq_len], dtype=torch.long) for i in range(n)]


def load_calibration(
    source: Any,
    tokenizer: Any = None,
    num_samples: int = 128,
    seq_len: int = 2048,
    *,
    text_column: str | None = None,
    messages_column: str | None = None,
    split: str = "train",
    dataset_config: str | None = None,
    seed: int = 0,
) -> list[torch.Tensor]:
    """Calibration sequences: a list of int64 token tensors ``[S]``.

    Args:
        source: one of
            - a ``datasets`` hub name, a directory saved with ``save_to_disk``, or a data file
              (``.json``, ``.jsonl``, ``.txt``, ``.csv``, ``.parquet``);
            - a ``datasets.Dataset``;
            - a list of strings;
            - token ids: an integer tensor ``[N, S]`` or a list of ``[S_i]`` tensors (used as given,
              at most ``num_samples`` of them; ``seq_len`` is ignored).
        tokenizer: a transformers tokenizer; needed for text.
        num_samples: how many sequences (fewer if the text runs out; at least one).
        seq_len: tokens per sequence. Texts are tokenized into one stream (EOS between
            documents) and cut into pieces of this length.
        text_column / messages_column: which column holds plain text or chat messages (rendered
            with the tokenizer's chat template). Default: ``messages``/``conversations`` if present,
            else ``text``/``content``/``prompt``.
        split / dataset_config: for hub datasets.
        seed: examples are shuffled with this seed before packing.
    Returns:
        list of int64 CPU tensors.
    Raises:
        ValueError / TypeError: an unusable source, no tokenizer for text, too little text.
    """
    if num_samples < 1 or seq_len < 1:
        raise ValueError(f"num_samples and seq_len must be >= 1, got {num_samples} and {seq_len}")
    if isinstance(source, torch.Tensor):
        if source.dim() != 2 or source.is_floating_point():
            raise ValueError(f"token tensor must be an integer [N, S] tensor, got {source.dtype} {tuple(source.shape)}")
        source = list(source)
    if isinstance(source, (list, tuple)) and source and all(isinstance(s, torch.Tensor) for s in source):
        out = []
        for i, s in enumerate(source[:num_samples]):
            if s.dim() != 1 or s.is_floating_point() or s.numel() == 0:
                raise ValueError(f"token sequence {i} must be a non-empty 1-D integer tensor, got {s.dtype} {tuple(s.shape)}")
            out.append(s.detach().to("cpu", torch.long))
        return out
    if tokenizer is None:
        raise ValueError("calibration text needs a tokenizer (pass tokenizer=...)")
    if isinstance(source, (list, tuple)):
        if not source or not all(isinstance(s, str) for s in source):
            raise TypeError("a calibration list must hold strings or token tensors")
        texts = list(source)
        random.Random(seed).shuffle(texts)
        return _pack(((t, False) for t in texts), tokenizer, num_samples, seq_len)
    datasets = sys.modules.get("datasets")  # a Dataset object means the package is imported already
    if isinstance(source, str):
        ds = _load_dataset(source, split, dataset_config)
    elif datasets is not None and isinstance(source, datasets.Dataset):
        ds = source
    else:
        raise TypeError(
            f"calibration source must be a dataset name/path, a datasets.Dataset, a list of strings or token "
            f"tensors; got {type(source).__name__}"
        )
    ds = ds.shuffle(seed=seed)
    return _pack(_example_texts(ds, tokenizer, text_column, messages_column), tokenizer, num_samples, seq_len)


# --- finding the layers and experts -------------------------------------------------------------


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(name, layers)``: the ``nn.ModuleList`` whose entries hold the most routed-experts modules
    (BF16 ones, :func:`gsq_torch.nn.replace.is_routed_experts`, or already 2-bit ones).

    Raises:
        ValueError: the model has no routed-experts module inside a layer list.
    """
    from ..nn.moe import GSQFusedMoE
    from ..nn.replace import is_routed_experts

    best: tuple[str, nn.ModuleList] | None = None
    best_hits = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList):
            continue
        hits = sum(any(is_routed_experts(m) or isinstance(m, GSQFusedMoE) for m in layer.modules()) for layer in module)
        if hits > best_hits:
            best, best_hits = (name, module), hits
    if best is None:
        raise ValueError(
            f"{type(model).__name__} has no decoder layers holding routed-experts modules (fused 3-D "
            "gate_up_proj / down_proj); is it a transformers (>= 5) MoE model?"
        )
    return best


# --- capture ------------------------------------------------------------------------------------


class _StopForward(Exception):
    pass


class _CpuStore:
    """Moves captured objects to the CPU, storing equal tensors once (masks and rotary tables repeat
    across layers and samples)."""

    def __init__(self, pool_size: int = 64):
        self.pool: list[torch.Tensor] = []
        self.pool_size = pool_size

    def __call__(self, obj: Any, memo: dict[int, Any]) -> Any:
        if isinstance(obj, torch.Tensor):
            if id(obj) in memo:
                return memo[id(obj)]
            cpu = obj.detach().to("cpu")
            for t in self.pool:
                if t.shape == cpu.shape and t.dtype == cpu.dtype and torch.equal(t, cpu):
                    cpu = t
                    break
            else:
                self.pool = (self.pool + [cpu])[-self.pool_size :]
            memo[id(obj)] = cpu
            return cpu
        if isinstance(obj, tuple):
            return tuple(self(o, memo) for o in obj)
        if isinstance(obj, list):
            return [self(o, memo) for o in obj]
        if isinstance(obj, dict):
            return {k: self(v, memo) for k, v in obj.items()}
        return obj


def to_device(obj: Any, device: torch.device | str, memo: dict[int, Any] | None = None) -> Any:
    """Move tensors inside nested tuples / lists / dicts to ``device`` (each distinct tensor once per ``memo``)."""
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = obj.to(device)
        return memo[id(obj)]
    if isinstance(obj, tuple):
        return tuple(to_device(o, device, memo) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device, memo) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device, memo) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, layers: nn.ModuleList, samples: Sequence[torch.Tensor]
) -> tuple[list[torch.Tensor], list[list[tuple[tuple, dict]]]]:
    """Record what each decoder layer is called with, computing no layer.

    Every layer's ``forward`` is replaced on the instance (for the duration of the call) by a stub
    that records its arguments and returns its input unchanged; the last stub stops the forward.
    The modules before the layers (embeddings, rotary tables, masks) run where they are.

    Args:
        model: a transformers model taking ``input_ids``.
        layers: its decoder layers (:func:`find_decoder_layers`).
        samples: int64 token sequences ``[S_i]``.
    Returns:
        ``(hidden, layer_args)``: ``hidden[i]`` is sample ``i``'s first-layer input ``[S_i, H]``;
        ``layer_args[l][i]`` is ``(args, kwargs)`` of layer ``l`` for sample ``i`` without the
        hidden states. Everything on the CPU.
    Raises:
        RuntimeError: the model's forward did not reach the last layer.
    """
    store = _CpuStore()
    n = len(layers)
    hidden: list[torch.Tensor] = []
    layer_args: list[list[tuple[tuple, dict]]] = [[] for _ in range(n)]
    seen: dict[int, Any] = {}

    def make_stub(i: int) -> Callable:
        def stub(*args, **kwargs):
            hs = args[0] if args else kwargs.pop("hidden_states")
            seen[i] = (tuple(args[1:]), kwargs)
            if i == 0:
                seen["hidden"] = hs
            if i == n - 1:
                raise _StopForward
            return hs

        return stub

    device = model.get_input_embeddings().weight.device
    for i, layer in enumerate(layers):
        layer.forward = make_stub(i)
    try:
        for ids in samples:
            seen.clear()
            try:
                model(input_ids=ids[None].to(device), use_cache=False)
            except _StopForward:
                pass
            if len(seen) != n + 1:
                raise RuntimeError("the model's forward did not call every decoder layer; cannot capture its inputs")
            memo: dict[int, Any] = {}
            hidden.append(seen["hidden"][0].detach().to("cpu"))
            for i in range(n):
                layer_args[i].append(store(seen[i], memo))
    finally:
        for layer in layers:
            if "forward" in layer.__dict__:
                del layer.forward
    return hidden, layer_args


class ExpertInputCapture:
    """Context manager: calls ``fn(hidden_states [T, H], top_k_index [T, K])`` on each call of an experts module.

    The first two arguments of the module's ``forward`` are taken, positionally or by name
    (``hidden_states``, then ``top_k_index`` / ``topk_indices`` / whatever the model calls it).
    """

    def __init__(self, experts: nn.Module, fn: Callable[[torch.Tensor, torch.Tensor], None]):
        self.experts, self.fn = experts, fn
        self.signature = inspect.signature(experts.forward)
        self.handle = None

    def _hook(self, module, args, kwargs):
        bound = self.signature.bind(*args, **kwargs)
        values = list(bound.arguments.values())
        self.fn(values[0], values[1])

    def __enter__(self):  # -> the capture itself
        self.handle = self.experts.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def group_by_expert(
    x: torch.Tensor, top_k_index: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather each expert's routed tokens into a zero-padded batch.

    Args:
        x: ``[T, H]`` tokens.
        top_k_index: int ``[T, K]`` expert of each token's ``k``-th slot; indices outside
            ``[0, E)`` (transformers' padding slot ``E``) are skipped.
        num_experts: ``E``.
    Returns:
        ``(x_pad [E, N, H], counts [E])``: expert ``e``'s tokens in rows ``0..counts[e]-1`` in
        token order, zeros after; ``N = max(counts)`` (at least 1).
    """
    if x.dim() != 2 or top_k_index.dim() != 2 or top_k_index.shape[0] != x.shape[0]:
        raise ValueError(f"x must be [T, H] and top_k_index [T, K]; got {tuple(x.shape)} and {tuple(top_k_index.shape)}")
    T, K = top_k_index.shape
    device = x.device
    flat = top_k_index.to(device=device, dtype=torch.long).reshape(-1)  # [T*K]
    valid = (flat >= 0) & (flat < num_experts)
    flat = torch.where(valid, flat, torch.full_like(flat, num_experts))
    token = torch.arange(T, device=device).repeat_interleave(K)
    order = torch.argsort(flat, stable=True)
    sorted_e, sorted_tok = flat[order], token[order]
    counts_all = torch.bincount(flat, minlength=num_experts + 1)
    counts = counts_all[:num_experts]
    starts = torch.cumsum(counts_all, 0) - counts_all
    pos = torch.arange(flat.numel(), device=device) - starts[sorted_e]
    N = max(int(counts.max()) if num_experts else 0, 1)
    keep = sorted_e < num_experts
    index = torch.full((num_experts, N), -1, dtype=torch.long, device=device)
    index[sorted_e[keep], pos[keep]] = sorted_tok[keep]
    x_pad = x[index.clamp(min=0)]  # [E, N, H]
    return x_pad.masked_fill_((index < 0).unsqueeze(-1), 0), counts
