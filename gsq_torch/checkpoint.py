"""Humming checkpoints on disk: read and validate per-expert tensors, stack them, convert others.

A Humming checkpoint is a transformers checkpoint (sharded safetensors + index, ``config.json``
with a flat ``quantization_config``, see :func:`gsq_torch.format.quantization_config_dict`) whose
routed experts are stored one by one in the plain layout::

    {prefix}.{e}.gate_proj.weight        int32 [I, H / 16]     {prefix}.{e}.gate_proj.weight_scale  bf16 [I, H / 128]
    {prefix}.{e}.up_proj.weight          int32 [I, H / 16]     {prefix}.{e}.up_proj.weight_scale    bf16 [I, H / 128]
    {prefix}.{e}.down_proj.weight        int32 [H, I / 16]     {prefix}.{e}.down_proj.weight_scale  bf16 [H, I / 128]

(``prefix`` is e.g. ``model.language_model.layers.3.mlp.experts``; Mixtral names the three
projections ``w1`` / ``w3`` / ``w2``). Everything reads safetensors headers first, so a bad
checkpoint is rejected, naming the tensor and file, before any tensor is loaded.

:func:`convert_checkpoint` turns a compressed-tensors ``pack-quantized`` checkpoint (native int2,
or GSQ's 4-bit container) into a Humming checkpoint, one shard at a time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import format

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

# Names of the three projections of one expert, in (gate, up, down) order.
DEFAULT_EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")

_ST_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_READABLE = {"I32": "int32", "BF16": "bf16"}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


# --- safetensors headers ---------------------------------------------------------------------


def read_safetensors_header(path: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (safetensors dtype string, shape) of one file, from its header only.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a safetensors file, its header is corrupt, or it is
            truncated (the header describes more data than the file holds).
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: {size} bytes, too short to be a safetensors file (truncated?)")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise ValueError(
                f"{path}: header length field says {n} bytes but the file has {size} bytes: "
                "not a safetensors file, or truncated"
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(  # noqa: TRY004  (a corrupt file, not a wrong argument type)
            f"{path}: corrupt safetensors header (not a JSON object)"
        )
    data_size = size - 8 - n
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(int(s) for s in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: corrupt safetensors header entry for tensor {name!r}: {entry!r}") from None
        numel = 1
        for s in shape:
            numel *= s
        if dtype in _ST_ITEMSIZE and end - begin != numel * _ST_ITEMSIZE[dtype]:
            raise ValueError(
                f"{path}: corrupt safetensors header: tensor {name!r} {dtype} {list(shape)} needs "
                f"{numel * _ST_ITEMSIZE[dtype]} bytes but spans {end - begin}"
            )
        if end > data_size:
            raise ValueError(
                f"{path} is truncated: tensor {name!r} ends at data byte {end} but the file holds only "
                f"{data_size} bytes of data"
            )
        out[name] = (dtype, shape)
    return out


class SafetensorsIndex:
    """The tensors of a (possibly sharded) safetensors checkpoint, known from the headers.

    Args:
        files: the shard files. With ``weight_map`` (from ``model.safetensors.index.json``),
            every name it lists must be in the file it names.
        weight_map: tensor name -> file name (relative to the files' directory).

    Raises:
        ValueError: a corrupt or truncated file, or an index naming a tensor its file lacks.
    """

    def __init__(self, files: Iterable[str | os.PathLike], weight_map: Mapping[str, str] | None = None) -> None:
        self.files = [Path(f) for f in files]
        self.entries: dict[str, tuple[str, tuple[int, ...]]] = {}
        self.location: dict[str, Path] = {}
        for file in self.files:
            if file.suffix != ".safetensors":
                raise ValueError(f"{file}: only safetensors checkpoints are supported")
            if not file.exists():
                raise FileNotFoundError(f"checkpoint shard {file} is missing")
            for name, entry in read_safetensors_header(file).items():
                self.entries[name] = entry
                self.location[name] = file
        if weight_map is not None:
            for name, fname in weight_map.items():
                where = self.location.get(name)
                if where is None or where.name != Path(fname).name:
                    raise ValueError(
                        f"the checkpoint index lists tensor {name!r} in {fname}, but that file does not hold it"
                    )
        self._handles: dict[Path, Any] = {}

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> SafetensorsIndex:
        """Open the checkpoint in directory ``path`` (``model.safetensors.index.json`` or ``model.safetensors``).

        Raises:
            FileNotFoundError: neither file exists.
            ValueError: a corrupt index or shard.
        """
        path = Path(path)
        index_file = path / INDEX_NAME
        if index_file.exists():
            try:
                weight_map = json.loads(index_file.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index_file}: corrupt checkpoint index ({e!r})") from None
            files = sorted({path / f for f in weight_map.values()})
            return cls(files, weight_map)
        if (path / SINGLE_NAME).exists():
            return cls([path / SINGLE_NAME])
        raise FileNotFoundError(f"{path}: no {INDEX_NAME} or {SINGLE_NAME} (not a safetensors checkpoint directory)")

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def __iter__(self):
        return iter(self.entries)

    def keys(self) -> list[str]:
        return list(self.entries)

    def dtype_name(self, name: str) -> str:
        """The safetensors dtype string (``"I32"``, ``"BF16"`` ...) of tensor ``name``."""
        return self.entries[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def file(self, name: str) -> Path:
        return self.location[name]

    def load(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """Read one tensor onto ``device``.

        Raises:
            KeyError: no such tensor.
            ValueError: the file could not be read (naming it).
        """
        if name not in self.location:
            raise KeyError(f"the checkpoint has no tensor {name!r}")
        file = self.location[name]
        try:
            handle = self._handles.get(file)
            if handle is None:
                handle = self._handles[file] = safe_open(str(file), framework="pt", device="cpu")
            t = handle.get_tensor(name)
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"{file}: could not read tensor {name!r} ({e})") from e
        return t.to(device)

    def close(self) -> None:
        self._handles.clear()


# --- quantization_config ---------------------------------------------------------------------


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of a checkpoint directory as a dict.

    Raises:
        FileNotFoundError, ValueError: no or unreadable ``config.json``.
    """
    config_file = Path(path) / CONFIG_NAME
    if not config_file.exists():
        raise FileNotFoundError(f"{path}: no {CONFIG_NAME}")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file}: not valid JSON ({e})") from None


def find_quantization_config(config: Mapping[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """``(quantization_config, where)``: at the top level or in ``text_config`` (``where`` names it)."""
    if isinstance(config.get("quantization_config"), dict):
        return config["quantization_config"], None
    text = config.get("text_config")
    if isinstance(text, dict) and isinstance(text.get("quantization_config"), dict):
        return text["quantization_config"], "text_config"
    return None, None


def read_quantization_config(path: str | os.PathLike) -> dict[str, Any]:
    """The validated Humming ``quantization_config`` of the checkpoint in ``path`` (card keys).

    Raises:
        ValueError: no ``quantization_config``, another method, an unknown ``b_dtype``, a group
            size other than 128, ... (naming ``config.json``).
    """
    config_file = Path(path) / CONFIG_NAME
    qc, _ = find_quantization_config(read_config(path))
    if qc is None:
        raise ValueError(f"{config_file} has no quantization_config: not a Humming checkpoint")
    try:
        return format.parse_quantization_config(qc)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{config_file}: {e}") from None


# --- per-expert keys -------------------------------------------------------------------------


def expert_key(prefix: str, expert: int, proj: str, tensor: str) -> str:
    """``{prefix}.{expert}.{proj}.{tensor}``, e.g. ``...mlp.experts.3.gate_proj.weight_scale``."""
    return f"{prefix}.{expert}.{proj}.{tensor}"


def checkpoint_prefixes(module_name: str, renames: Iterable[tuple[str, str]] = ()) -> list[str]:
    """Where a model's experts module may sit in a checkpoint, most likely first.

    Covers the conditional-generation prefix (``model.language_model.`` vs ``model.``), a missing
    base-model prefix, and per-family renames (``(model_fragment, checkpoint_fragment)`` pairs,
    e.g. Mixtral's ``.mlp.`` -> ``.block_sparse_moe.``).
    """
    bases = [module_name]
    if module_name.startswith("model.language_model."):
        bases.append("model." + module_name[len("model.language_model."):])
    elif module_name.startswith("model."):
        bases.append("model.language_model." + module_name[len("model."):])
        bases.append(module_name[len("model."):])
    out = []
    for base in bases:
        out.append(base)
        for src, dst in renames:
            if src in base:
                out.append(base.replace(src, dst))
    return list(dict.fromkeys(out))


def find_checkpoint_prefix(
    index: SafetensorsIndex,
    module_name: str,
    names: tuple[str, str, str] = DEFAULT_EXPERT_NAMES,
    renames: Iterable[tuple[str, str]] = (),
) -> str:
    """The checkpoint prefix of the experts module ``module_name``.

    Raises:
        ValueError: the checkpoint holds no expert tensors for it.
    """
    candidates = checkpoint_prefixes(module_name, renames)
    for prefix in candidates:
        if expert_key(prefix, 0, names[0], "weight") in index:
            return prefix
    raise ValueError(
        f"the checkpoint has no expert tensors for module {module_name!r}: looked for "
        + ", ".join(repr(expert_key(p, 0, names[0], "weight")) for p in candidates)
    )


def _expected_shapes(hidden_dim: int, intermediate_dim: int) -> list[tuple[int, int]]:
    """(out, in) of gate, up, down."""
    return [(intermediate_dim, hidden_dim), (intermediate_dim, hidden_dim), (hidden_dim, intermediate_dim)]


def check_expert_tensors(
    index: SafetensorsIndex,
    prefix: str,
    num_experts: int,
    hidden_dim: int,
    intermediate_dim: int,
    names: tuple[str, str, str] = DEFAULT_EXPERT_NAMES,
) -> None:
    """Check, from the headers, that the checkpoint holds exactly experts ``0..E-1`` of ``prefix``,
    each projection as an int32 packed ``weight`` and a bf16 ``weight_scale`` of the right shapes.

    Raises:
        ValueError: naming the first missing, extra or misshapen tensor, its file, and what was expected.
    """
    for e in range(num_experts):
        for proj, (out_f, in_f) in zip(names, _expected_shapes(hidden_dim, intermediate_dim)):
            w_shape, s_shape = format.packed_shapes(out_f, in_f)
            for tensor, want_dtype, want_shape in (("weight", "I32", w_shape), ("weight_scale", "BF16", s_shape)):
                key = expert_key(prefix, e, proj, tensor)
                what = f"{_READABLE[want_dtype]} {list(want_shape)}"
                if key not in index:
                    raise ValueError(
                        f"the checkpoint is missing tensor {key!r} (expected {what}: expert {e} of "
                        f"{num_experts}, hidden {hidden_dim}, intermediate {intermediate_dim})"
                    )
                dtype, shape = index.entries[key]
                if dtype != want_dtype or tuple(shape) != tuple(want_shape):
                    hint = ""
                    if tensor == "weight" and dtype != "I32":
                        hint = " (a BF16 expert must be listed in quantization_config.ignore)"
                    raise ValueError(
                        f"checkpoint tensor {key!r} in {index.file(key).name} is {dtype} {list(shape)}; "
                        f"expected {what} for a 2-bit packed {proj} with group size {format.GROUP_SIZE}{hint}"
                    )
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    for key in index:
        m = pattern.match(key)
        if m and int(m.group(1)) >= num_experts:
            raise ValueError(
                f"checkpoint tensor {key!r} in {index.file(key).name} belongs to expert {m.group(1)}, "
                f"but the model's layer has {num_experts} experts"
            )


def stack_expert_tensors(
    load: Callable[[str], torch.Tensor],
    prefix: str,
    num_experts: int,
    names: tuple[str, str, str] = DEFAULT_EXPERT_NAMES,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack per-expert tensors into ``(gate_up_proj, gate_up_proj_scale, down_proj, down_proj_scale)``.

    Args:
        load: tensor name -> tensor (e.g. :meth:`SafetensorsIndex.load`).

    Returns:
        int32 ``[E, 2I, H/16]``, bf16 ``[E, 2I, H/128]``, int32 ``[E, H, I/16]``, bf16 ``[E, H, I/128]``.
    """
    gate, up, down = names

    def stacked(proj: str, tensor: str) -> torch.Tensor:
        return torch.stack([load(expert_key(prefix, e, proj, tensor)) for e in range(num_experts)])

    gate_up = torch.cat([stacked(gate, "weight"), stacked(up, "weight")], dim=1)
    gate_up_scale = torch.cat([stacked(gate, "weight_scale"), stacked(up, "weight_scale")], dim=1)
    return gate_up, gate_up_scale, stacked(down, "weight"), stacked(down, "weight_scale")


def split_expert_tensors(
    prefix: str,
    gate_up_proj: torch.Tensor,
    gate_up_proj_scale: torch.Tensor,
    down_proj: torch.Tensor,
    down_proj_scale: torch.Tensor,
    names: tuple[str, str, str] = DEFAULT_EXPERT_NAMES,
) -> dict[str, torch.Tensor]:
    """Per-expert checkpoint tensors of one layer (views, no copies), the inverse of
    :func:`stack_expert_tensors`: gate rows ``[:I]``, up rows ``[I:]``."""
    gate, up, down = names
    intermediate = gate_up_proj.shape[1] // 2
    out = {}
    for e in range(gate_up_proj.shape[0]):
        out[expert_key(prefix, e, gate, "weight")] = gate_up_proj[e, :intermediate]
        out[expert_key(prefix, e, gate, "weight_scale")] = gate_up_proj_scale[e, :intermediate]
        out[expert_key(prefix, e, up, "weight")] = gate_up_proj[e, intermediate:]
        out[expert_key(prefix, e, up, "weight_scale")] = gate_up_proj_scale[e, intermediate:]
        out[expert_key(prefix, e, down, "weight")] = down_proj[e]
        out[expert_key(prefix, e, down, "weight_scale")] = down_proj_scale[e]
    return out


# --- writing ---------------------------------------------------------------------------------


def shard_name(i: int, n: int) -> str:
    """transformers' shard file name: ``model-00001-of-00003.safetensors`` (``model.safetensors`` if one)."""
    return SINGLE_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def write_index(path: str | os.PathLike, weight_map: Mapping[str, str], total_size: int) -> None:
    """Write ``model.safetensors.index.json`` (keys sorted, as transformers writes it)."""
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (Path(path) / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def write_config(path: str | os.PathLike, config: Mapping[str, Any]) -> None:
    (Path(path) / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# --- conversion ------------------------------------------------------------------------------


def _check_compressed_tensors_config(qc: Mapping[str, Any], where: str) -> list[str]:
    """Validate a compressed-tensors ``pack-quantized`` 2-bit config; return its ``ignore`` list."""
    method = qc.get("quant_method")
    if method == format.QUANT_METHOD:
        raise ValueError(f"{where}: the checkpoint is already in the Humming format")
    if method != "compressed-tensors":
        raise ValueError(f"{where}: quant_method is {method!r}; expected 'compressed-tensors'")
    groups = qc.get("config_groups") or {}
    if not groups:
        raise ValueError(f"{where}: compressed-tensors config has no config_groups")
    for gname, group in groups.items():
        fmt = group.get("format", qc.get("format"))
        if fmt != "pack-quantized":
            raise ValueError(f"{where}: config group {gname!r} has format {fmt!r}; expected 'pack-quantized'")
        w = group.get("weights") or {}
        problems = []
        if w.get("num_bits") not in (2, 4):
            problems.append(f"num_bits={w.get('num_bits')!r} (expected 2, or 4 for GSQ's 4-bit container)")
        if w.get("type", "int") != "int":
            problems.append(f"type={w.get('type')!r} (expected 'int')")
        if not w.get("symmetric", True):
            problems.append("symmetric=false (the Humming format has no zero point)")
        if w.get("strategy", "group") != "group":
            problems.append(f"strategy={w.get('strategy')!r} (expected 'group')")
        if w.get("group_size") != format.GROUP_SIZE:
            problems.append(f"group_size={w.get('group_size')!r} (expected {format.GROUP_SIZE})")
        if problems:
            raise ValueError(f"{where}: config group {gname!r} cannot be converted: " + "; ".join(problems))
    ignore = qc.get("ignore", [])
    return list(ignore) if ignore else []


def _convert_packed(
    key: str, packed: torch.Tensor, weight_shape: torch.Tensor | None
) -> torch.Tensor:
    """compressed-tensors ``weight_packed`` (2-bit, or 4-bit container) -> Humming ``weight``."""
    if packed.dtype != format.PACKED_DTYPE or packed.dim() != 2:
        raise ValueError(f"{key}: expected an int32 2-D packed weight, got {packed.dtype} {list(packed.shape)}")
    if weight_shape is None:
        raise ValueError(f"{key}: the checkpoint has no matching weight_shape tensor")
    out_f, in_f = (int(s) for s in weight_shape.tolist())
    if packed.shape[0] != out_f:
        raise ValueError(f"{key}: {packed.shape[0]} rows but weight_shape says {out_f}")
    format.check_in_features(in_f)
    if packed.shape[1] * format.CODES_PER_WORD == in_f:  # native int2: bit-identical
        return packed
    if packed.shape[1] * 8 == in_f:  # GSQ's 4-bit container
        try:
            return format.repack_int4_container(packed)
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from None
    raise ValueError(
        f"{key}: {packed.shape[1]} words per row fit neither 2-bit ({in_f // format.CODES_PER_WORD}) nor "
        f"4-bit ({in_f // 8}) packing of weight_shape {[out_f, in_f]}"
    )


def convert_checkpoint(
    src: str | os.PathLike, dst: str | os.PathLike, *, progress: bool = True
) -> Path:
    """Convert a compressed-tensors ``pack-quantized`` checkpoint into a Humming checkpoint.

    Native int2 (``weight_packed`` renamed to ``weight``, ``weight_shape`` dropped) and GSQ's
    4-bit container (repacked at 2 bits) are accepted. Streams one shard at a time (memory about
    one shard), keeps shard names, rewrites the index and ``config.json`` (the Humming
    ``quantization_config`` with the source's ``ignore`` list) and copies the other files.

    Args:
        src: the compressed-tensors checkpoint directory.
        dst: the output directory (created; must not hold a checkpoint already).
        progress: show a tqdm bar (bytes converted).

    Returns:
        ``dst`` as a Path.

    Raises:
        ValueError: the source is not a convertible checkpoint (naming the tensor or file), or
            ``dst`` already holds a checkpoint.
    """
    from tqdm.auto import tqdm

    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise ValueError("convert_checkpoint: src and dst must differ")
    config = read_config(src)
    qc, where = find_quantization_config(config)
    if qc is None:
        raise ValueError(f"{src / CONFIG_NAME} has no quantization_config: not a compressed-tensors checkpoint")
    ignore = _check_compressed_tensors_config(qc, str(src / CONFIG_NAME))
    index = SafetensorsIndex.from_dir(src)
    for key in index:
        for bad in ("weight_zero_point", "weight_g_idx"):
            if key.endswith("." + bad):
                raise ValueError(f"{key} in {index.file(key).name}: {bad} is not supported by the Humming format")

    dst.mkdir(parents=True, exist_ok=True)
    if (dst / INDEX_NAME).exists() or (dst / SINGLE_NAME).exists():
        raise ValueError(f"{dst} already holds a checkpoint")

    quantized_modules = [k[: -len(".weight_packed")] for k in index if k.endswith(".weight_packed")]
    bf16_modules = [
        k[: -len(".weight")] for k in index
        if k.endswith(".weight") and len(index.shape(k)) == 2 and index.dtype_name(k) in ("BF16", "F16", "F32")
    ]
    weight_map, total_size = {}, 0
    by_file: dict[Path, list[str]] = {}
    for key in index:
        by_file.setdefault(index.file(key), []).append(key)
    total_bytes = sum(f.stat().st_size for f in by_file)
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="Converting", disable=not progress) as bar:
        for file in sorted(by_file):
            shard = {}
            for key in sorted(by_file[file]):
                if key.endswith(".weight_shape"):
                    continue
                t = index.load(key)
                if key.endswith(".weight_packed"):
                    base = key[: -len("_packed")]  # ...weight
                    shape_key = base + "_shape"
                    t = _convert_packed(key, t, index.load(shape_key) if shape_key in index else None)
                    key = base
                elif (
                    key.endswith(".weight_scale")
                    and key.replace("weight_scale", "weight_packed") in index
                    and t.dtype != format.SCALE_DTYPE
                ):
                    raise ValueError(f"{key} in {file.name} is {t.dtype}; expected bf16 scales")
                shard[key] = t.contiguous()
            save_file(shard, str(dst / file.name), metadata={"format": "pt"})
            for key, t in shard.items():
                weight_map[key] = file.name
                total_size += t.numel() * t.element_size()
            del shard
            index._handles.pop(file, None)
            bar.update(file.stat().st_size)
    if len(by_file) > 1 or (src / INDEX_NAME).exists():
        write_index(dst, weight_map, total_size)

    new_qc = format.quantization_config_dict(
        humming_ignore_list(ignore, quantized=quantized_modules, bf16_weights=bf16_modules)
    )
    if where is None:
        config["quantization_config"] = new_qc
    else:
        config[where]["quantization_config"] = new_qc
    write_config(dst, config)
    for item in src.iterdir():
        if item.is_file() and item.suffix != ".safetensors" and item.name not in (INDEX_NAME, CONFIG_NAME):
            shutil.copy2(item, dst / item.name)
    return dst


def humming_ignore_list(
    base: Iterable[str],
    quantized: Iterable[str],
    bf16_weights: Iterable[str] = (),
    entry_for: Callable[[str], str] | None = None,
) -> list[str]:
    """The ``ignore`` list of a Humming checkpoint: ``base`` plus the published defaults, plus an
    exact name for every 2-D BF16 weight (a Linear) that neither covers; embeddings excepted.

    Args:
        base: entries to keep first (e.g. the source checkpoint's or the loaded config's list).
        quantized: names of the modules stored 2-bit; no entry may match them.
        bf16_weights: names of modules with a 2-D floating ``weight`` (candidates to ignore).
        entry_for: the entry to add for an uncovered name (default: the exact name).

    Raises:
        ValueError: an entry of ``base`` matches a quantized module.
    """
    quantized = list(quantized)
    base = list(base)
    for entry in base:
        hit = next((q for q in quantized if format.is_ignored(q, [entry])), None)
        if hit is not None:
            raise ValueError(f"ignore entry {entry!r} matches {hit!r}, which is stored 2-bit")
    out = list(base)
    for entry in format.DEFAULT_IGNORE:
        if entry not in out and not any(format.is_ignored(q, [entry]) for q in quantized):
            out.append(entry)
    quantized_set = set(quantized)
    for name in bf16_weights:
        if name in quantized_set or "embed" in name.rsplit(".", 1)[-1] or format.is_ignored(name, out):
            continue
        out.append(entry_for(name) if entry_for is not None else name)
    return out

