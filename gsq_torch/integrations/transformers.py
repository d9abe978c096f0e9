"""transformers integration: ``from_pretrained`` / ``save_pretrained`` of Humming checkpoints.

Importing this module registers, through transformers' own registries,

- :class:`HummingConfig` for ``quant_method: "humming"`` (card keys and vLLM's aliases in, the
  card's flat form out), and
- :class:`HummingHfQuantizer`, which on the meta skeleton swaps every routed-experts module that
  ``ignore`` does not name for a :class:`~gsq_torch.nn.moe.GSQFusedMoE` placeholder of the exact
  packed shapes, so the per-expert int32 / bf16 tensors load straight into it (no BF16 copy of
  the experts is ever made).

Loading: transformers' own per-model converters (``experts.*.gate_proj.weight`` + ``up_proj`` ->
``experts.gate_up_proj``, Mixtral's ``w1`` / ``w3``) merge the packed weights; this quantizer adds a
copy of each such converter for the ``weight_scale`` tensors, placed before the original.
Saving: :meth:`HummingHfQuantizer.get_state_dict_and_metadata` splits the stacked tensors back
into per-expert keys; transformers then applies its reverse renamings (prefixes) as usual.

Version shims (all here), transformers 5.17 vs 5.24:

- ``HfQuantizer.update_weight_conversions`` takes ``(weight_conversions)`` on 5.17 and
  ``(weight_conversions, model)`` on 5.24 (5.23+): ours accepts both.
- Converter source patterns: on 5.17 ``gate_proj.weight`` also matches ``gate_proj.weight_scale``
  (no end anchor; the scales would load by accident), on 5.24 patterns end on a name boundary and
  the base quantizer handles companions through ``serialized_names``. We set no
  ``serialized_names`` and add explicit scale converters ahead of the originals, which both
  versions match first.
- Dtypes: 5.17 loads every renamed key (e.g. ``model.language_model.*`` -> ``model.*``) of a
  pre-quantized checkpoint in the checkpoint's dtype, whatever ``dtype=`` asked for (a mixed
  bf16 / fp32 model); 5.24 decides per key through ``HfQuantizer.get_new_dtype``. Where that hook
  is missing, :meth:`HummingHfQuantizer._process_model_after_weight_loading` casts the floating
  parameters outside our modules to the requested dtype (keep-in-fp32 modules excepted).
- 5.17 has ``update_tp_plan`` / ``update_ep_plan`` and ``get_param_name``; 5.24 has
  ``update_parallel_plan``, ``get_new_dtype``, ``quantized_element_size``. The defaults are right for
  us on both (int32 params keep their dtype; an int32 word's 4 bytes are its real size).
"""

from __future__ import annotations

import copy
import logging
import re
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.utils.quantization_config import QuantizationConfigMixin

from .. import checkpoint as ckpt
from .. import format
from ..nn.moe import GSQFusedMoE
from ..nn.replace import (
    experts_ignored,
    find_experts,
    humming_ignore,
    model_family,
)

logger = logging.getLogger(__name__)

_ALIASES = {"weight_dtype", "dtype", "group_size", "scale_type"}
# transformers 5.17 (no `get_new_dtype` yet): renamed keys keep the checkpoint's dtype (see above).
_RENAMED_KEYS_KEEP_CHECKPOINT_DTYPE = not hasattr(HfQuantizer, "get_new_dtype")
_SCALE_PARAMS = ("gate_up_proj_scale", "down_proj_scale")


def is_transformers_model(model: nn.Module) -> bool:
    return isinstance(model, PreTrainedModel)


class HummingConfig(QuantizationConfigMixin):
    """``quantization_config`` of a Humming uint2 checkpoint (``quant_method: "humming"``).

    Accepts the published card's keys (``b_dtype``, ``weight_scale_group_size``,
    ``weight_scale_type``, ``has_zero_point``, ``ignore``) and vLLM's aliases (``weight_dtype`` /
    ``dtype``, ``group_size``, ``scale_type``); :meth:`to_dict` writes the card's flat form. Keys it
    does not know are kept and written back.

    Raises:
        ValueError: another ``b_dtype``, a group size other than 128, a zero point, ...
    """

    def __init__(self, ignore: list[str] | None = None, **kwargs: Any) -> None:
        given = {k: v for k, v in kwargs.items() if k in format.quantization_config_dict() or k in _ALIASES}
        extra = {k: v for k, v in kwargs.items() if k not in given and k != "quant_method"}
        if "quant_method" in kwargs:
            given["quant_method"] = kwargs["quant_method"]
        if ignore is not None:
            given["ignore"] = list(ignore)
        card = format.parse_quantization_config(given)
        self.quant_method = format.QUANT_METHOD
        for key, value in card.items():
            if key != "quant_method":
                setattr(self, key, value)
        self._extra = extra

    def to_dict(self) -> dict[str, Any]:
        out = format.quantization_config_dict(list(self.ignore))
        out.update(copy.deepcopy(self._extra))
        return out

    def __iter__(self):
        yield from self.to_dict().items()

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()


def _scale_converter(converter):
    """A copy of an experts converter (``...experts.*.gate_proj.weight`` -> ``...gate_up_proj``)
    that loads the ``weight_scale`` companions into ``..._scale``; ``None`` for other converters."""
    from transformers.core_model_loading import WeightConverter

    sources = list(converter._original_source_patterns)
    targets = list(converter._original_target_patterns)
    if len(targets) != 1 or not re.search(r"(gate_up_proj|down_proj)$", targets[0]):
        return None
    if not sources or not all(s.endswith(".weight") for s in sources):
        return None
    scale = WeightConverter(
        [s + "_scale" for s in sources], [targets[0] + "_scale"], operations=copy.deepcopy(converter.operations)
    )
    # Sub-model scoping (e.g. the language model inside a conditional-generation model).
    scale.scope_prefix = getattr(converter, "scope_prefix", None)
    scale.base_model_prefix = getattr(converter, "base_model_prefix", None)
    return scale


class HummingHfQuantizer(HfQuantizer):
    """transformers quantizer for pre-quantized Humming uint2 MoE checkpoints (loading and saving)."""

    requires_calibration = True  # quantizing on load is replace_experts' job, not from_pretrained's

    def __init__(self, quantization_config: HummingConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.modules_to_quantize: list[str] = []
        self.requested_dtype: torch.dtype | None = None

    def update_dtype(self, dtype):
        self.requested_dtype = dtype if isinstance(dtype, torch.dtype) else None
        return dtype

    # --- before loading: placeholders and checks ----------------------------------------------

    def _process_model_before_weight_loading(self, model: PreTrainedModel, checkpoint_files=None, **kwargs):
        family = model_family(model)
        ignore = list(self.quantization_config.ignore)
        targets = [(n, m) for n, m in find_experts(model) if not experts_ignored(n, family, ignore)]
        if not targets:
            raise ValueError(
                f"{type(model).__name__}: quantization_config.ignore leaves no routed-experts module to load 2-bit"
            )
        if checkpoint_files:
            _check_checkpoint(model, family, targets, checkpoint_files)
        for name, module in targets:
            E, two_i, H = module.gate_up_proj.shape
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, GSQFusedMoE(E, H, two_i // 2, device="meta"))
        self.modules_to_quantize = [n for n, _ in targets]
        return model

    def update_weight_conversions(self, weight_conversions, model=None):
        # 5.17 calls this with one argument, 5.24 with two (see the module docstring).
        from transformers.core_model_loading import WeightConverter

        out = []
        for converter in weight_conversions:
            if isinstance(converter, WeightConverter):
                scale = _scale_converter(converter)
                if scale is not None:
                    out.append(scale)  # first, so it wins over the weight pattern on 5.17
            out.append(converter)
        return out

    # --- after loading ------------------------------------------------------------------------

    def _process_model_after_weight_loading(self, model: PreTrainedModel, **kwargs):
        if _RENAMED_KEYS_KEEP_CHECKPOINT_DTYPE and self.requested_dtype is not None:
            _cast_floating_params(model, self.requested_dtype)
        for name, module in model.named_modules():
            if not isinstance(module, GSQFusedMoE):
                continue
            for pname in _SCALE_PARAMS:
                getattr(module, pname).requires_grad_(False)
            for pname, p in module.named_parameters():
                if p.device.type == "meta" and not _is_offloaded(module):
                    raise ValueError(f"{name}.{pname} was not loaded from the checkpoint")
        return model

    # --- saving -------------------------------------------------------------------------------

    def get_state_dict_and_metadata(self, model: PreTrainedModel):
        """The model's state dict with every GSQFusedMoE split into per-expert checkpoint keys
        (CPU copies, in place of the stacked keys), and the ``ignore`` list brought up to date."""
        family = model_family(model)
        self.quantization_config.ignore = humming_ignore(model, list(self.quantization_config.ignore))
        modules = {n: m for n, m in model.named_modules() if isinstance(m, GSQFusedMoE)}
        stacked = {f"{n}.{p}": n for n in modules for p in ("gate_up_proj", *_SCALE_PARAMS, "down_proj")}
        out, done = {}, set()
        for key, tensor in model.state_dict().items():
            owner = stacked.get(key)
            if owner is None:
                out[key] = tensor
                continue
            if owner in done:
                continue
            done.add(owner)
            order = ("gate_up_proj", "gate_up_proj_scale", "down_proj", "down_proj_scale")
            params = [_materialized(modules[owner], owner, pname) for pname in order]
            per_expert = ckpt.split_expert_tensors(owner, *params, family.expert_names)
            # Copies: safetensors refuses views of one storage, and a GPU model should not double on the GPU.
            out.update({k: v.to("cpu", copy=True) for k, v in per_expert.items()})
        return out, {}

    # --- capabilities -------------------------------------------------------------------------

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True


def _cast_floating_params(model: PreTrainedModel, dtype: torch.dtype) -> None:
    """Cast the floating parameters outside GSQFusedMoE to ``dtype``, except keep-in-fp32 modules
    (the 5.17 shim, see the module docstring)."""
    keep = list(model._get_dtype_plan(dtype)) if hasattr(model, "_get_dtype_plan") else []
    for name, module in model.named_modules():
        if isinstance(module, GSQFusedMoE):
            continue
        for pname, p in module.named_parameters(recurse=False):
            full = f"{name}.{pname}" if name else pname
            if not p.is_floating_point() or p.dtype == dtype or p.device.type == "meta":
                continue
            if any(re.search(pattern, full) for pattern in keep):
                continue
            p.data = p.data.to(dtype)


def _materialized(module: GSQFusedMoE, name: str, pname: str) -> torch.Tensor:
    """A parameter's tensor; for a CPU / disk-offloaded module (accelerate keeps it on meta), read
    from the offload hook's weights map."""
    p = getattr(module, pname)
    if p.device.type != "meta":
        # Trainable scales are fp32 masters (gsq_torch.training); checkpoints store bf16.
        return p.detach().to(format.SCALE_DTYPE) if pname in _SCALE_PARAMS else p.detach()
    weights_map = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
    if weights_map is not None and pname in weights_map:
        return weights_map[pname]
    raise ValueError(f"cannot save {name}.{pname}: it is on the meta device and no offloaded copy was found")


def _is_offloaded(module: nn.Module) -> bool:
    """accelerate keeps disk / CPU-offloaded weights on meta and loads them in a forward hook."""
    hook = getattr(module, "_hf_hook", None)
    return hook is not None and getattr(hook, "offload", False)


def _check_checkpoint(model, family, targets, checkpoint_files) -> None:
    """Validate, from the safetensors headers, every experts tensor the load will need, and that no
    other module of the model is stored quantized (that would load as garbage)."""
    files = [f for f in checkpoint_files if str(f).endswith(".safetensors")]
    if len(files) != len(checkpoint_files):
        raise ValueError("Humming checkpoints must be safetensors; got " + ", ".join(map(str, checkpoint_files)))
    index = ckpt.SafetensorsIndex(files)
    prefixes = []
    for name, module in targets:
        E, two_i, H = module.gate_up_proj.shape
        prefix = ckpt.find_checkpoint_prefix(index, name, family.expert_names, family.checkpoint_renames)
        ckpt.check_expert_tensors(index, prefix, E, H, two_i // 2, family.expert_names)
        prefixes.append(prefix + ".")
    module_names = set()
    for name, _ in model.named_modules():
        module_names.update(ckpt.checkpoint_prefixes(name, family.checkpoint_renames))
    for key in index:
        if not key.endswith(".weight_scale") or key.startswith(tuple(prefixes)):
            continue
        owner = key[: -len(".weight_scale")]
        if owner in module_names:
            raise ValueError(
                f"checkpoint tensor {key!r} in {index.file(key).name}: module {owner!r} is stored quantized, but "
                "gsq-torch loads only routed experts 2-bit (list it in quantization_config.ignore only if it is BF16)"
            )


def attach_humming_quantizer(model: PreTrainedModel, ignore: list[str]) -> HummingHfQuantizer:
    """Mark a model whose experts were replaced outside ``from_pretrained`` as Humming-quantized,
    exactly as ``from_pretrained`` leaves it (config, quantizer, flags), so ``save_pretrained``
    writes a Humming checkpoint."""
    quantizer = HummingHfQuantizer(HummingConfig(ignore=ignore), pre_quantized=True)
    model.hf_quantizer = quantizer
    model.is_quantized = True
    model.quantization_method = format.QUANT_METHOD
    quantizer.postprocess_model(model)
    return quantizer


def _register() -> None:
    # Registered through transformers' own registries. If a transformers release ever ships its
    # own "humming" entries, ours replace them (with a log line), since this package's modules
    # are what the checkpoint is loaded into.
    method = format.QUANT_METHOD
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(method) is not HummingConfig:
        if method in AUTO_QUANTIZATION_CONFIG_MAPPING:
            logger.warning("gsq-torch: replacing transformers' %r quantization config with its own", method)
            del AUTO_QUANTIZATION_CONFIG_MAPPING[method]
        register_quantization_config(method)(HummingConfig)
    if AUTO_QUANTIZER_MAPPING.get(method) is not HummingHfQuantizer:
        if method in AUTO_QUANTIZER_MAPPING:
            logger.warning("gsq-torch: replacing transformers' %r quantizer with its own", method)
            del AUTO_QUANTIZER_MAPPING[method]
        register_quantizer(method)(HummingHfQuantizer)


_register()

__all__ = ["HummingConfig", "HummingHfQuantizer", "attach_humming_quantizer"]
