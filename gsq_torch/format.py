"""The Humming uint2 weight format, defined once.

A quantized Linear ``W[out, in]`` is stored as two tensors:

- ``weight``: int32 ``[out, in / 16]``; 16 two-bit codes per word along the input dimension,
  least significant bits first (bit 31 is data, not a sign).
- ``weight_scale``: bf16 ``[out, in / 128]``; one scale per group of 128 inputs.

``W[n, j] = (code[n, j] - 2) * weight_scale[n, j // 128]``: codes 0, 1, 2, 3 mean -2, -1, 0, +1
(offset binary, no zero point). Scales may be negative. Every function here also accepts leading
batch dimensions (for example ``[E, out, in / 16]`` for all experts of a layer).

compressed-tensors ``pack-quantized`` int2 is bit-identical to this layout; GSQ's training
code writes a 4-bit container (8 codes per word, stored as ``q + 8``) converted by
:func:`repack_int4_container`.
"""

from __future__ import annotations

import re
from typing import Any

import torch

BITS = 2
CODES_PER_WORD = 32 // BITS  # 16
GROUP_SIZE = 128
CODE_OFFSET = 2  # stored code = q + CODE_OFFSET
CODE_MASK = (1 << BITS) - 1
NUM_LEVELS = 1 << BITS
# The value of each stored code, in code order: code c means c - CODE_OFFSET.
CODEBOOK = tuple(float(c - CODE_OFFSET) for c in range(NUM_LEVELS))  # (-2., -1., 0., 1.)
Q_MIN, Q_MAX = CODEBOOK[0], CODEBOOK[-1]

PACKED_DTYPE = torch.int32
SCALE_DTYPE = torch.bfloat16

# --- quantization_config (config.json) -------------------------------------------------------

QUANT_METHOD = "humming"
B_DTYPE = "uint2"
SCALE_TYPE = "group"

# Modules the published checkpoint leaves in BF16 (everything but the routed experts).
DEFAULT_IGNORE = [
    "lm_head",
    "re:.*self_attn.*",
    "re:.*linear_attn.*",
    "re:.*visual.*",
    "re:mtp.*",
    "re:.*mlp\\.gate$",
    "re:.*mlp\\.shared_expert_gate$",
    "re:.*shared_expert.*",
]

# vLLM's humming loader accepts these spellings too; we read them and write the card's names.
_CONFIG_ALIASES = {
    "b_dtype": ("b_dtype", "weight_dtype", "dtype"),
    "weight_scale_group_size": ("weight_scale_group_size", "group_size"),
    "weight_scale_type": ("weight_scale_type", "scale_type"),
}


def quantization_config_dict(ignore: list[str] | None = None) -> dict[str, Any]:
    """The flat ``quantization_config`` of a Humming uint2 checkpoint, as on the published card."""
    return {
        "quant_method": QUANT_METHOD,
        "b_dtype": B_DTYPE,
        "weight_scale_group_size": GROUP_SIZE,
        "weight_scale_type": SCALE_TYPE,
        "has_zero_point": False,
        "ignore": list(DEFAULT_IGNORE if ignore is None else ignore),
    }


def parse_quantization_config(config: dict[str, Any]) -> dict[str, Any]:
    """Validate a ``quantization_config`` dict (card keys or vLLM aliases); return the card's form.

    Raises:
        ValueError: the method is not ``humming`` or the config asks for something this format
            is not (another ``b_dtype``, a group size other than 128, a zero point, ...).
    """
    if not isinstance(config, dict):
        raise TypeError(f"quantization_config must be a dict, got {type(config).__name__}")
    method = config.get("quant_method", QUANT_METHOD)
    if method != QUANT_METHOD:
        raise ValueError(f"quantization_config.quant_method is {method!r}; expected {QUANT_METHOD!r}")

    def pick(key: str, default: Any) -> Any:
        for alias in _CONFIG_ALIASES[key]:
            if alias in config:
                return config[alias]
        return default

    b_dtype = pick("b_dtype", B_DTYPE)
    if b_dtype != B_DTYPE:
        raise ValueError(f"quantization_config b_dtype is {b_dtype!r}; only {B_DTYPE!r} is supported")
    group_size = pick("weight_scale_group_size", GROUP_SIZE)
    if group_size != GROUP_SIZE:
        raise ValueError(
            f"quantization_config weight_scale_group_size is {group_size!r}; only {GROUP_SIZE} is supported"
        )
    scale_type = pick("weight_scale_type", SCALE_TYPE)
    if scale_type != SCALE_TYPE:
        raise ValueError(
            f"quantization_config weight_scale_type is {scale_type!r}; only {SCALE_TYPE!r} is supported"
        )
    if config.get("has_zero_point", False):
        raise ValueError("quantization_config has_zero_point is true; the Humming uint2 format has none")
    ignore = config.get("ignore", DEFAULT_IGNORE)
    if not isinstance(ignore, (list, tuple)) or not all(isinstance(p, str) for p in ignore):
        raise ValueError(f"quantization_config ignore must be a list of strings, got {ignore!r}")
    return quantization_config_dict(list(ignore))


def is_ignored(module_name: str, ignore: list[str]) -> bool:
    """Whether ``module_name`` matches the ``ignore`` list: ``re:`` entries are regular
    expressions (``re.match``), others exact names (a trailing-component match also counts,
    so ``lm_head`` matches ``model.lm_head``)."""
    for pattern in ignore:
        if pattern.startswith("re:"):
            if re.match(pattern[3:], module_name):
                return True
        elif module_name == pattern or module_name.endswith("." + pattern):
            return True
    return False


# --- checks ----------------------------------------------------------------------------------


def check_in_features(in_features: int) -> None:
    """Raise ``ValueError`` unless ``in_features`` is a positive multiple of the group size."""
    if in_features <= 0 or in_features % GROUP_SIZE:
        raise ValueError(f"in_features={in_features} must be a positive multiple of {GROUP_SIZE} (the group size)")


def check_packed(
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    in_features: int | None = None,
    name: str = "weight",
) -> int:
    """Validate a packed weight and its scales; return ``in_features``.

    Args:
        weight: int32 ``[..., out, in / 16]``.
        weight_scale: bf16 (any float dtype accepted) ``[..., out, in / 128]``.
        in_features: the expected input size, if known.
        name: what to call the tensor in error messages (for example a checkpoint key).

    Raises:
        TypeError: wrong dtype.
        ValueError: shapes that do not fit each other, ``in_features`` or the group size;
            tensors on different devices.
    """
    if not isinstance(weight, torch.Tensor) or not isinstance(weight_scale, torch.Tensor):
        raise TypeError(f"{name}: weight and weight_scale must be tensors")
    if weight.dtype != PACKED_DTYPE:
        raise TypeError(f"{name}: packed weight must be int32, got {weight.dtype}")
    if not weight_scale.is_floating_point():
        raise TypeError(f"{name}: weight_scale must be a floating tensor (bf16), got {weight_scale.dtype}")
    if weight.dim() < 2:
        raise ValueError(f"{name}: packed weight must be [..., out, in/16], got shape {tuple(weight.shape)}")
    packed_in = weight.shape[-1] * CODES_PER_WORD
    if in_features is None:
        in_features = packed_in
    check_in_features(in_features)
    if packed_in != in_features:
        raise ValueError(
            f"{name}: packed weight has {weight.shape[-1]} words per row = {packed_in} inputs; "
            f"expected in_features={in_features} ({in_features // CODES_PER_WORD} words)"
        )
    expected_scale = (*weight.shape[:-1], in_features // GROUP_SIZE)
    if tuple(weight_scale.shape) != expected_scale:
        raise ValueError(
            f"{name}: weight_scale has shape {tuple(weight_scale.shape)}; expected {expected_scale} "
            f"for a packed weight of shape {tuple(weight.shape)} (one scale per {GROUP_SIZE} inputs)"
        )
    if weight.device != weight_scale.device:
        raise ValueError(f"{name}: weight is on {weight.device} but weight_scale is on {weight_scale.device}")
    return in_features


# --- packing ---------------------------------------------------------------------------------


def _shifts(device: torch.device) -> torch.Tensor:
    return torch.arange(0, 32, BITS, device=device, dtype=torch.int32)  # [16]


def pack(codes: torch.Tensor) -> torch.Tensor:
    """Pack 2-bit codes (integers 0..3) ``[..., in]`` into int32 words ``[..., in / 16]``.

    The code of input ``j`` goes to bits ``2 * (j % 16)`` of word ``j // 16`` (LSB first).

    Raises:
        ValueError: ``in`` is not a multiple of 16, or a code is outside 0..3.
    """
    if codes.shape[-1] % CODES_PER_WORD:
        raise ValueError(f"the last dimension ({codes.shape[-1]}) must be a multiple of {CODES_PER_WORD}")
    if codes.is_floating_point():
        raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
    c = codes.to(torch.int32)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) > CODE_MASK):
        raise ValueError(f"codes must lie in 0..{CODE_MASK}")
    c = c.reshape(*c.shape[:-1], -1, CODES_PER_WORD)  # [..., words, 16]
    # Disjoint bit fields: the sum is the bitwise OR; int32 wrap-around sets bit 31 as data.
    return (c << _shifts(c.device)).sum(dim=-1, dtype=torch.int32)


def unpack(weight: torch.Tensor) -> torch.Tensor:
    """Unpack int32 words ``[..., in / 16]`` into uint8 codes 0..3 ``[..., in]``."""
    if weight.dtype != PACKED_DTYPE:
        raise TypeError(f"packed weight must be int32, got {weight.dtype}")
    # Arithmetic right shift of a negative word only smears bit 31 into bits above the field.
    codes = (weight.unsqueeze(-1) >> _shifts(weight.device)) & CODE_MASK  # [..., words, 16]
    return codes.reshape(*weight.shape[:-1], -1).to(torch.uint8)


def codes_to_values(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Codebook lookup: codes 0..3 -> values -2, -1, 0, +1."""
    return codes.to(dtype) - CODE_OFFSET


def values_to_codes(q: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`codes_to_values` for integer-valued ``q`` in -2..+1 -> uint8 codes."""
    return (q.round().to(torch.int32) + CODE_OFFSET).clamp_(0, CODE_MASK).to(torch.uint8)


def dequantize(
    weight: torch.Tensor, weight_scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """The dense weight ``[..., out, in]`` of a packed weight (in ``dtype``).

    Every product ``(code - 2) * scale`` is exact in bf16 (a scale times 0, +-1 or -2), so the
    result does not depend on the compute dtype beyond the scale's own rounding.
    """
    in_features = check_packed(weight, weight_scale)
    compute = torch.float64 if dtype == torch.float64 else torch.float32  # fp64 scales stay exact (gradcheck)
    values = codes_to_values(unpack(weight), compute)  # [..., out, in]
    values = values.reshape(*values.shape[:-1], in_features // GROUP_SIZE, GROUP_SIZE)
    w = values * weight_scale.to(compute).unsqueeze(-1)
    return w.reshape(*weight.shape[:-1], in_features).to(dtype)


def quantize_codes(w: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest codes ``[..., out, in]`` of ``w`` given fixed group scales ``[..., out, in/128]``.

    ``q = clamp(round(w / scale), -2, 1)``; a zero scale gives code 0 (value 0 is code 2).
    """
    g = w.float().reshape(*w.shape[:-1], -1, GROUP_SIZE)
    s = weight_scale.float().unsqueeze(-1)
    q = torch.where(s != 0, g / s, torch.zeros_like(g)).round().clamp(Q_MIN, Q_MAX)
    return values_to_codes(q).reshape(w.shape)


def repack_int4_container(weight_packed: torch.Tensor) -> torch.Tensor:
    """Convert GSQ's 4-bit container (8 nibbles per int32, stored ``q + 8``) to Humming uint2 words.

    Args:
        weight_packed: int32 ``[..., out, in / 8]``.
    Returns:
        int32 ``[..., out, in / 16]``.
    Raises:
        ValueError: a nibble holds a value outside the 2-bit range -2..+1.
    """
    if weight_packed.dtype != PACKED_DTYPE:
        raise TypeError(f"4-bit container must be int32, got {weight_packed.dtype}")
    shifts = torch.arange(0, 32, 4, device=weight_packed.device, dtype=torch.int32)
    nibbles = (weight_packed.unsqueeze(-1) >> shifts) & 0xF  # [..., words, 8]
    q = nibbles.reshape(*weight_packed.shape[:-1], -1) - 8
    if q.numel() and (int(q.min()) < Q_MIN or int(q.max()) > Q_MAX):
        raise ValueError(
            f"4-bit container holds values {int(q.min())}..{int(q.max())}, outside the 2-bit range "
            f"{int(Q_MIN)}..{int(Q_MAX)}: it is not a 2-bit GSQ result"
        )
    return pack(q + CODE_OFFSET)


def packed_shapes(out_features: int, in_features: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Shapes of ``weight`` and ``weight_scale`` for a Linear ``[out, in]``."""
    check_in_features(in_features)
    return (out_features, in_features // CODES_PER_WORD), (out_features, in_features // GROUP_SIZE)


def bits_per_weight() -> float:
    """Effective storage per weight: 2 bits of code plus a bf16 scale shared by 128 weights."""
    return BITS + 16 / GROUP_SIZE


def __getattr__(name: str):
    # Round-to-nearest is defined once, with the scale search, in quantizers.rtn; reachable here
    # too without an import cycle.
    if name in ("quantize_rtn", "fit_group_scales"):
        from .quantizers import rtn

        return getattr(rtn, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
