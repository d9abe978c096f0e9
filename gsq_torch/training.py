"""Fine-tuning GSQ models in plain PyTorch: trainable scales, LoRA targets, frozen 2-bit codes.

What trains in a GSQ model, with any optimizer and training loop:

- every BF16 part (router, attention, shared experts, embeddings, norms, LM head), as usual:
  gradients flow through the 2-bit experts to their inputs and routing weights;
- never the 2-bit codes (int32 words have no gradient);
- optionally the group scales of the 2-bit weights: :func:`set_trainable_scales` (fine-tuning the
  scales of a frozen code, as PV-Tuning and EfficientQAT do);
- optionally peft LoRA adapters on BF16 Linear layers (:func:`lora_target_modules` lists the
  attention and shared-expert projections). Adapters on the 2-bit experts are refused.

Trainable scales are an **fp32 master copy** (an ``nn.Parameter`` under the checkpoint's name).
bf16 keeps 8 significant bits: an optimizer step of lr 1e-5 to 1e-4 on a scale of about 1e-2 changes
it by 0.1 % to 1 %, at or below half a bf16 ulp (0.2 %), so most updates of a bf16 parameter would
round away. The forward uses the master rounded to bf16, exactly what a checkpoint stores (the loss
one sees is that of the model one saves), and the gradient passes that rounding unchanged, as with
mixed-precision master weights. ``state_dict`` and ``save_pretrained`` write bf16 in the plain layout.
The master costs 4 bytes per 128 weights (plus the optimizer's state), about 3 % of the packed size.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch
from torch import nn

from . import format

__all__ = [
    "MASTER_SCALE_DTYPE",
    "keep_scale_dtypes",
    "lora_target_modules",
    "scale_parameters",
    "set_scales_trainable_",
    "set_trainable_scales",
]

MASTER_SCALE_DTYPE = torch.float32

# Modules whose Linear layers LoRA should target (attention of every kind, shared experts).
_LORA_BLOCKS = re.compile(r"(^|\.)(self_attn|linear_attn|attention|attn|shared_experts?)(\.|$)")
_LORA_SKIP = re.compile(r"(^|\.)(shared_expert_gate|gate)$")  # 1-output gates and routers

NO_ADAPTERS_ON_EXPERTS = (
    "the 2-bit routed experts cannot take adapters or parametrizations (peft LoRA `target_parameters` / "
    "`target_modules` on the experts): their packed int32 codes are frozen. Put LoRA on the BF16 attention "
    "and shared experts (gsq_torch.training.lora_target_modules(model)), and/or fine-tune the experts' group "
    "scales (gsq_torch.training.set_trainable_scales(model))"
)


def _gsq_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from .nn import GSQExpertLinear, GSQFusedMoE  # the nn modules import this file

    return [(n, m) for n, m in model.named_modules() if isinstance(m, (GSQExpertLinear, GSQFusedMoE))]


def set_trainable_scales(model: nn.Module, enabled: bool = True) -> list[str]:
    """Make the group scales of every 2-bit module of ``model`` trainable (or frozen again).

    Enabling turns each scale tensor into an fp32 ``nn.Parameter`` with ``requires_grad=True``
    (same name and values); disabling rounds it to bf16 and freezes it. Call it after anything
    that sets ``requires_grad`` wholesale (``model.requires_grad_(False)``, ``peft.get_peft_model``),
    and build the optimizer afterwards: the parameters are new objects.

    Args:
        model: any module holding :class:`~gsq_torch.nn.GSQFusedMoE` / :class:`~gsq_torch.nn.GSQExpertLinear`.
        enabled: trainable (True) or frozen bf16 (False).

    Returns:
        The qualified names of the scale parameters (as in ``model.named_parameters()``).

    Raises:
        ValueError: ``model`` holds no 2-bit module.
    """
    modules = _gsq_modules(model)
    if not modules:
        raise ValueError(
            f"{type(model).__name__} holds no GSQFusedMoE / GSQExpertLinear module (nothing to train)"
        )
    names = []
    for prefix, module in modules:
        module.trainable_scales = enabled
        names += [f"{prefix}.{n}" if prefix else n for n in module.scale_names]
    return names


def scale_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable scale parameters of ``model`` (for an optimizer parameter group of their own)."""
    return [
        p
        for _, m in _gsq_modules(model)
        for n in m.scale_names
        if isinstance(p := getattr(m, n), nn.Parameter) and p.requires_grad
    ]


def lora_target_modules(model: nn.Module) -> list[str]:
    """Names of the BF16 ``nn.Linear`` layers of attention and shared experts, for
    ``peft.LoraConfig(target_modules=...)``.

    Routers, the shared expert's 1-output gate, the LM head and the 2-bit experts are left out.

    Raises:
        ValueError: no such layer (not a transformers MoE model with attention).
    """
    names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and _LORA_BLOCKS.search(n) and not _LORA_SKIP.search(n)
    ]
    if not names:
        raise ValueError(
            f"{type(model).__name__} has no attention or shared-expert nn.Linear layers to adapt"
        )
    return names


# --- module side (used by the nn modules' ``trainable_scales`` switch and ``_apply``) -----------


def _scales_to_format_dtype(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    # state_dict post-hook: a checkpoint always stores bf16 scales, whatever the master's dtype.
    for name in module.scale_names:
        t = state_dict.get(prefix + name)
        if t is not None and t.dtype != format.SCALE_DTYPE:
            state_dict[prefix + name] = t.detach().to(format.SCALE_DTYPE)


def set_scales_trainable_(module: nn.Module, enabled: bool, *, frozen_as_buffer: bool) -> None:
    """Swap ``module``'s scale tensors (``module.scale_names``) for fp32 trainable Parameters
    (``enabled``) or back to frozen bf16 (a buffer if ``frozen_as_buffer``, else a Parameter with
    ``requires_grad=False``). The nn modules' ``trainable_scales`` setter; values are kept (rounded
    to bf16 when freezing)."""
    for name in module.scale_names:
        current = getattr(module, name)
        if enabled:
            if (
                isinstance(current, nn.Parameter)
                and current.requires_grad
                and current.dtype == MASTER_SCALE_DTYPE
            ):
                continue
            new = nn.Parameter(current.detach().to(MASTER_SCALE_DTYPE, copy=True), requires_grad=True)
        else:
            value = current.detach().to(format.SCALE_DTYPE)
            new = value if frozen_as_buffer else nn.Parameter(value, requires_grad=False)
        delattr(module, name)
        if isinstance(new, nn.Parameter):
            module.register_parameter(name, new)
        else:
            module.register_buffer(name, new)
    if enabled and not getattr(module, "_gsq_scale_hook", False):
        register = getattr(module, "register_state_dict_post_hook", None) or module._register_state_dict_hook
        register(_scales_to_format_dtype)
        module._gsq_scale_hook = True


@contextlib.contextmanager
def keep_scale_dtypes(module: nn.Module) -> Iterator[None]:
    """Around ``nn.Module._apply``: device moves reach the scales, dtype casts do not.

    bf16 is part of the format (``model.float()`` must not make a later save write fp32 scales),
    and a trainable fp32 master must not be rounded by ``model.bfloat16()``. The original tensor
    is put back (moved to the new device), so nothing is rounded through another dtype.
    """
    # detach(): a view of the current storage, which `param.data = ...` inside _apply leaves alone.
    saved = {name: getattr(module, name).detach() for name in module.scale_names}
    yield
    for name, old in saved.items():
        new = getattr(module, name)
        if new.dtype == old.dtype:
            continue
        restored = old.to(new.device)
        if isinstance(new, nn.Parameter):
            new.data = restored
            if new.grad is not None:
                new.grad = new.grad.to(old.dtype)
        else:
            setattr(module, name, restored)
