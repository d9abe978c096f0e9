"""Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms") with decoupled weight decay.

``u = sign(beta1 * m + (1 - beta1) * g)``; ``p <- p * (1 - lr * wd) - lr * u``;
``m <- beta2 * m + (1 - beta2) * g``. One momentum buffer per parameter, kept in the
parameter's dtype. Written here rather than taken from a package: it is a few lines, and GSQ's
logits (4 per weight, several GB per layer) want one fused pass over memory, which the Triton
kernel below gives on CUDA (3 reads, 2 writes per element, a single rounding of ``p``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 2048


@triton.jit
def _lion_kernel(p_ptr, g_ptr, m_ptr, n, lr, decay, beta1, beta2, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    p = tl.load(p_ptr + i, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + i, mask=mask).to(tl.float32)
    m = tl.load(m_ptr + i, mask=mask).to(tl.float32)
    c = beta1 * m + (1.0 - beta1) * g
    u = tl.where(c > 0, 1.0, tl.where(c < 0, -1.0, 0.0))
    tl.store(p_ptr + i, (p * decay - lr * u).to(p_ptr.dtype.element_ty), mask=mask)
    tl.store(m_ptr + i, (beta2 * m + (1.0 - beta2) * g).to(m_ptr.dtype.element_ty), mask=mask)


def lion_update_(p: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, lr: float, weight_decay: float,
                 beta1: float, beta2: float, use_triton: bool | None = None) -> None:
    """One Lion step on ``p`` in place (and its momentum ``exp_avg``); all three contiguous, same shape."""
    if use_triton is None:
        use_triton = p.is_cuda
    decay = 1.0 - lr * weight_decay
    if use_triton:
        n = p.numel()
        _lion_kernel[(triton.cdiv(n, _BLOCK),)](p, grad, exp_avg, n, float(lr), float(decay), float(beta1),
                                               float(beta2), BLOCK=_BLOCK)
        return
    # fp32 arithmetic then one rounding, like the kernel (bf16 p would lose the decay otherwise).
    # Out of place: .float() of an fp32 tensor is the tensor itself.
    g, m = grad.float(), exp_avg.float()
    u = (m * beta1 + g * (1.0 - beta1)).sign_()
    p.copy_(p.float() * decay - lr * u)
    exp_avg.copy_(m * beta2 + g * (1.0 - beta2))


class Lion(torch.optim.Optimizer):
    """Lion with decoupled weight decay.

    Args:
        params: parameters or parameter groups (each group may set ``lr`` and ``weight_decay``).
        lr: step size.
        betas: ``(beta1, beta2)``: interpolation for the update sign and for the momentum.
        weight_decay: decoupled decay, applied as ``p *= 1 - lr * weight_decay``.
    Raises:
        ValueError: negative ``lr`` / ``weight_decay`` or betas outside ``[0, 1)``.
    """

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0):
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise TypeError("Lion does not support sparse gradients")
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                lion_update_(p, p.grad.contiguous(), state["exp_avg"], group["lr"], group["weight_decay"],
                             beta1, beta2, use_triton=p.is_cuda and p.is_contiguous())
        return loss
