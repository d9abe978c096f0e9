"""GSQExpertLinear: a bias-free Linear whose weight is stored in the Humming uint2 format.

Buffers (the checkpoint's names): ``weight`` int32 ``[out, in / 16]`` and ``weight_scale`` bf16
``[out, in / 128]``. ``forward`` runs ``gsq::linear`` (Triton on CUDA, PyTorch on the CPU).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import format
from ..ops.linear import linear
from ..quantizers.rtn import quantize_rtn
from ..training import NO_ADAPTERS_ON_EXPERTS, keep_scale_dtypes, set_scales_trainable_


class GSQExpertLinear(nn.Module):
    """``y = x @ W.T`` with ``W = (code - 2) * weight_scale`` held as 2-bit codes.

    No bias: the format stores none, and the experts it is made for have none.

    Dtype casts (``.half()``, ``.bfloat16()``, ``.float()``, ``.to(dtype)``) leave both buffers
    alone: the int32 words are not floating point, and the scales stay bf16 because bf16 is part
    of the format (an fp16 copy could overflow or flush them). Device moves work as usual. The
    activations may be bf16, fp16 or fp32; the output has the activations' dtype.

    Args:
        in_features: K, a positive multiple of 128.
        out_features: N.
        device: where to allocate the (zero) buffers.
    """

    scale_names = ("weight_scale",)  # what ``trainable_scales`` switches (see gsq_torch.training)

    def __init__(self, in_features: int, out_features: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        weight_shape, scale_shape = format.packed_shapes(out_features, in_features)
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("weight", torch.zeros(weight_shape, dtype=format.PACKED_DTYPE, device=device))
        self.register_buffer(
            "weight_scale", torch.zeros(scale_shape, dtype=format.SCALE_DTYPE, device=device)
        )

    @classmethod
    def from_packed(cls, weight: torch.Tensor, weight_scale: torch.Tensor) -> GSQExpertLinear:
        """Wrap already packed tensors (int32 ``[out, in/16]``, bf16 ``[out, in/128]``; not copied).

        Raises:
            TypeError, ValueError: tensors that are not a valid packed 2-D weight (see
                :func:`gsq_torch.format.check_packed`); scales that are not bf16.
        """
        in_features = format.check_packed(weight, weight_scale, name="GSQExpertLinear.weight")
        if weight.dim() != 2:
            raise ValueError(f"GSQExpertLinear.weight must be [out, in/16], got shape {tuple(weight.shape)}")
        if weight_scale.dtype != format.SCALE_DTYPE:
            raise TypeError(f"GSQExpertLinear.weight_scale must be bf16, got {weight_scale.dtype}")
        module = cls(in_features, weight.shape[0], device="meta")
        module.weight, module.weight_scale = weight, weight_scale
        return module

    @classmethod
    def from_linear(cls, linear_module: nn.Linear, **scale_search) -> GSQExpertLinear:
        """Quantize an ``nn.Linear`` by round-to-nearest with the per-group scale search.

        Args:
            linear_module: a bias-free ``nn.Linear`` with ``in_features`` a multiple of 128.
            **scale_search: passed to :func:`gsq_torch.quantizers.rtn.fit_group_scales`.
        Raises:
            TypeError: not an ``nn.Linear``.
            ValueError: it has a bias, or ``in_features`` is not a positive multiple of 128.
        """
        if not isinstance(linear_module, nn.Linear):
            raise TypeError(f"from_linear takes an nn.Linear, got {type(linear_module).__name__}")
        if linear_module.bias is not None:
            raise ValueError(
                "from_linear: the Linear has a bias, but GSQExpertLinear has none (the Humming format stores "
                "weights and scales only); build it with bias=False or add the bias outside the module"
            )
        format.check_in_features(linear_module.in_features)
        weight, weight_scale = quantize_rtn(linear_module.weight.detach(), **scale_search)
        return cls.from_packed(weight, weight_scale)

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The dense weight ``[out, in]`` in ``dtype``."""
        return format.dequantize(self.weight, self.weight_scale.to(format.SCALE_DTYPE), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in]`` -> ``[..., out]`` in ``x.dtype``."""
        if nn.utils.parametrize.is_parametrized(self):
            raise ValueError(NO_ADAPTERS_ON_EXPERTS)
        # A trainable fp32 master scale runs rounded to bf16 (a no-op for bf16 scales).
        return linear(x, self.weight, self.weight_scale.to(format.SCALE_DTYPE))

    @property
    def trainable_scales(self) -> bool:
        """Whether ``weight_scale`` trains. Setting True makes it an fp32 ``nn.Parameter`` (a master copy;
        the forward and ``state_dict`` use it rounded to bf16); False rounds it back to a bf16 buffer."""
        return self.weight_scale.requires_grad

    @trainable_scales.setter
    def trainable_scales(self, enabled: bool) -> None:
        set_scales_trainable_(self, enabled, frozen_as_buffer=True)

    def _apply(self, fn, recurse=True):
        # Let device moves through, but keep the scales bf16 (or a trainable fp32 master) whatever fn casts to.
        with keep_scale_dtypes(self):
            super()._apply(fn, recurse)
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"format=humming-uint2, group_size={format.GROUP_SIZE}, bits_per_weight={format.bits_per_weight()}"
        )
