"""replace_experts: swap the routed experts of a transformers MoE model for GSQFusedMoE, on the instance.

Experts modules are found by structure (3-D ``gate_up_proj`` / ``down_proj`` and a
``forward(hidden_states, top_k_index, top_k_weights)``), never by patching classes. Routers,
shared experts and attention stay as they are. What differs between model families (checkpoint
names of the projections, renamed module paths, extra BF16 modules) is in :data:`FAMILIES`.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .. import checkpoint as ckpt
from .. import format
from .moe import GSQFusedMoE, check_experts_module

_FORWARD_ARGS = ("hidden_states", "top_k_index", "top_k_weights")


@dataclass(frozen=True)
class MoEFamily:
    """What gsq-torch needs to know about one model family.

    Attributes:
        name: the architecture as shown in messages.
        model_types: transformers ``config.model_type`` values of the family.
        expert_names: checkpoint names of the (gate, up, down) projections of one expert.
        checkpoint_renames: ``(model_fragment, checkpoint_fragment)`` pairs where the checkpoint
            names a module path differently from the model (Mixtral's ``block_sparse_moe``).
        ignore: BF16 modules the published default ``ignore`` list does not cover, in checkpoint names.
    """

    name: str
    model_types: tuple[str, ...]
    expert_names: tuple[str, str, str] = ckpt.DEFAULT_EXPERT_NAMES
    checkpoint_renames: tuple[tuple[str, str], ...] = ()
    ignore: tuple[str, ...] = ()


FAMILIES: tuple[MoEFamily, ...] = (
    MoEFamily("Qwen3.5/3.6-MoE", ("qwen3_5_moe", "qwen3_5_moe_text")),
    MoEFamily("Qwen3-MoE", ("qwen3_moe",)),
    MoEFamily("Qwen2-MoE", ("qwen2_moe",)),
    MoEFamily(
        "Mixtral",
        ("mixtral",),
        expert_names=("w1", "w3", "w2"),
        checkpoint_renames=((".mlp.", ".block_sparse_moe."),),
        ignore=("re:.*block_sparse_moe\\.gate$",),
    ),
    MoEFamily("OLMoE", ("olmoe",)),
    MoEFamily("DeepSeek-V3", ("deepseek_v3",)),
)


def supported_architectures() -> str:
    """``"Qwen3.5/3.6-MoE (qwen3_5_moe, qwen3_5_moe_text), Qwen3-MoE (qwen3_moe), ..."``."""
    return ", ".join(f"{f.name} ({', '.join(f.model_types)})" for f in FAMILIES)


def _model_types(model: nn.Module) -> list[str]:
    types = []
    for module in model.modules():
        config = getattr(module, "config", None)
        # transformers models (and their sub-models) only: some layers keep a config attribute too.
        if not hasattr(module, "base_model_prefix") or not hasattr(config, "model_type"):
            continue
        types.append(config.model_type)
        get_text = getattr(config, "get_text_config", None)
        if callable(get_text):
            types.append(get_text().model_type)
    return list(dict.fromkeys(types))


def model_family(model: nn.Module) -> MoEFamily:
    """The :class:`MoEFamily` of a transformers model.

    Raises:
        ValueError: the model is not one of the supported architectures (listed in the message).
    """
    types = _model_types(model)
    for family in FAMILIES:
        if any(t in family.model_types for t in types):
            return family
    found = ", ".join(types) or f"a {type(model).__name__} without a transformers config"
    raise ValueError(
        f"gsq-torch does not support this model ({found}); supported architectures: {supported_architectures()}"
    )


def is_routed_experts(module: nn.Module) -> bool:
    """Whether ``module`` is a BF16 fused routed-experts module (not yet replaced)."""
    if isinstance(module, GSQFusedMoE):
        return False
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor)):
        return False
    if gate_up.dim() != 3 or down.dim() != 3:
        return False
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return all(name in params for name in _FORWARD_ARGS)


def find_experts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every BF16 routed-experts module, in model order."""
    return [(name, m) for name, m in model.named_modules() if is_routed_experts(m)]


def experts_ignored(name: str, family: MoEFamily, ignore: list[str]) -> bool:
    """Whether the experts module ``name`` is listed in ``ignore`` (under its model or checkpoint name)."""
    names = ckpt.checkpoint_prefixes(name, family.checkpoint_renames)
    return any(format.is_ignored(n, ignore) or format.is_ignored(n + ".0." + family.expert_names[0], ignore)
               for n in names)


def _experts_dims(module: nn.Module) -> tuple[int, int, int]:
    if isinstance(module, GSQFusedMoE):
        return module.num_experts, module.hidden_dim, module.intermediate_dim
    E, two_i, H = module.gate_up_proj.shape
    return E, H, two_i // 2


def _device_of(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    if p is None or p.device.type == "meta":
        return torch.device("cpu")
    return p.device


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def load_experts_from_checkpoint(
    index: ckpt.SafetensorsIndex,
    name: str,
    module: nn.Module,
    family: MoEFamily,
    device: torch.device | str | None = None,
) -> GSQFusedMoE:
    """The packed experts of model module ``name`` (shaped like ``module``) from a checkpoint.

    Raises:
        ValueError: the checkpoint lacks a tensor, or has one of the wrong shape or dtype.
    """
    E, H, I = _experts_dims(module)
    prefix = ckpt.find_checkpoint_prefix(index, name, family.expert_names, family.checkpoint_renames)
    ckpt.check_expert_tensors(index, prefix, E, H, I, family.expert_names)
    device = _device_of(module) if device is None else device
    tensors = ckpt.stack_expert_tensors(lambda k: index.load(k, device), prefix, E, family.expert_names)
    return GSQFusedMoE.from_packed(*tensors)


def replace_experts(
    model: nn.Module,
    *,
    checkpoint: str | os.PathLike | None = None,
    quantized: Mapping[str, GSQFusedMoE] | None = None,
) -> nn.Module:
    """Swap the routed-experts modules of ``model`` for :class:`GSQFusedMoE`, in place.

    Sources of the 2-bit weights (at most one of ``checkpoint`` / ``quantized``):

    - default: round-to-nearest from each module's own BF16 weights;
    - ``checkpoint``: a local Humming checkpoint directory; experts its ``ignore`` list names stay
      as they are. Every tensor is validated (from the headers) before anything is replaced;
    - ``quantized``: ``{module_name: GSQFusedMoE}`` put in place as given (only those names).

    Modules already replaced are left alone, so calling it twice is a no-op. A transformers model
    also gets the Humming ``quantization_config`` and quantizer attached, so ``save_pretrained``
    writes a Humming checkpoint.

    Args:
        model: a transformers MoE model of a supported family (see :data:`FAMILIES`).
        checkpoint: path of a Humming checkpoint to load the packed experts from.
        quantized: ready modules keyed by the experts module's name in ``model``.

    Returns:
        ``model`` (modified in place).

    Raises:
        ValueError: an unsupported architecture (the supported ones are listed), a model without
            routed experts, a bad checkpoint (naming the tensor / file), or a ``quantized`` entry
            that does not fit the module it replaces.
        TypeError: a ``quantized`` value that is not a GSQFusedMoE.
        FileNotFoundError: ``checkpoint`` is not a local directory, or lacks its files.
    """
    if checkpoint is not None and quantized is not None:
        raise ValueError("pass at most one of checkpoint= and quantized=")
    family = model_family(model)
    replaced_before = [n for n, m in model.named_modules() if isinstance(m, GSQFusedMoE)]
    targets = find_experts(model)
    if not targets and not replaced_before:
        raise ValueError(f"{type(model).__name__} has no routed-experts module (fused 3-D gate_up_proj / down_proj)")

    ignore = None
    new_modules: dict[str, GSQFusedMoE] = {}
    if quantized is not None:
        modules = dict(model.named_modules())
        for name, new in quantized.items():
            if not isinstance(new, GSQFusedMoE):
                raise TypeError(f"quantized[{name!r}] must be a GSQFusedMoE, got {type(new).__name__}")
            old = modules.get(name)
            if old is None or not (is_routed_experts(old) or isinstance(old, GSQFusedMoE)):
                raise ValueError(f"quantized[{name!r}]: the model has no routed-experts module of that name")
            if _experts_dims(old) != _experts_dims(new):
                raise ValueError(
                    f"quantized[{name!r}] has (experts, hidden, intermediate) = {_experts_dims(new)}; "
                    f"the module it replaces has {_experts_dims(old)}"
                )
            device = _device_of(old)
            new_modules[name] = new if _device_of(new) == device else new.to(device)
    elif checkpoint is not None:
        if not os.path.isdir(checkpoint):
            raise FileNotFoundError(
                f"checkpoint={os.fspath(checkpoint)!r} is not a local directory (download a hub checkpoint "
                "first, e.g. with huggingface_hub.snapshot_download)"
            )
        ignore = ckpt.read_quantization_config(checkpoint)["ignore"]
        index = ckpt.SafetensorsIndex.from_dir(checkpoint)
        todo = [(n, m) for n, m in targets if not experts_ignored(n, family, ignore)]
        for name, module in todo:  # validate everything before loading anything
            E, H, I = _experts_dims(module)
            prefix = ckpt.find_checkpoint_prefix(index, name, family.expert_names, family.checkpoint_renames)
            ckpt.check_expert_tensors(index, prefix, E, H, I, family.expert_names)
        for name, module in todo:
            new_modules[name] = load_experts_from_checkpoint(index, name, module, family)
        index.close()
    else:
        for name, module in targets:
            check_experts_module(module)
        for name, module in targets:
            new_modules[name] = GSQFusedMoE.from_experts(module)

    for name, new in new_modules.items():
        _set_submodule(model, name, new)
    if new_modules or replaced_before:
        _attach_quantization(model, family, ignore)
    return model


def default_ignore(family: MoEFamily) -> list[str]:
    """The published default ``ignore`` list plus the family's extra BF16 modules."""
    return list(format.DEFAULT_IGNORE) + [p for p in family.ignore if p not in format.DEFAULT_IGNORE]


def _tail_pattern(name: str) -> str:
    """An ``ignore`` entry for one module that holds under the model's and the checkpoint's prefix."""
    for prefix in ("model.language_model.", "model."):
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    return "re:(.*\\.)?" + re.escape(name) + "$"


def humming_ignore(model: nn.Module, base: list[str] | None = None) -> list[str]:
    """The ``ignore`` list of ``model`` as it stands: ``base`` (default: the published list and the
    family's extras), plus an entry for every BF16 Linear or BF16 experts module it does not cover.

    Raises:
        ValueError: an entry of ``base`` matches a module that is stored 2-bit.
    """
    family = model_family(model)
    base = default_ignore(family) if base is None else list(base)
    quantized = [n for n, m in model.named_modules() if isinstance(m, GSQFusedMoE)]
    for name in quantized:
        if experts_ignored(name, family, base):
            raise ValueError(f"quantization_config.ignore lists {name!r}, but that module is stored 2-bit")
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    out = ckpt.humming_ignore_list(base, quantized=quantized, bf16_weights=linears, entry_for=_tail_pattern)
    for name, _ in find_experts(model):
        if not experts_ignored(name, family, out):
            out.append(_tail_pattern(name)[:-1] + "(\\..*)?$")
    return out


def _attach_quantization(model: nn.Module, family: MoEFamily, ignore: list[str] | None) -> None:
    """Give a transformers model the Humming quantization_config and quantizer, as from_pretrained would."""
    from ..integrations.transformers import attach_humming_quantizer, is_transformers_model

    if not is_transformers_model(model):
        return
    current = getattr(model, "hf_quantizer", None)
    if ignore is None and current is not None and getattr(current.quantization_config, "quant_method", None) == "humming":
        ignore = list(current.quantization_config.ignore)
    attach_humming_quantizer(model, default_ignore(family) if ignore is None else ignore)
