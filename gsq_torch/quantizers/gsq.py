"""GSQ: learn each weight's 2-bit code and each group's scale by Gumbel-softmax, all experts at once.

Dimension legend: E experts, N tokens per expert (padded), H hidden, I expert intermediate,
R rows, C columns. Pipeline: GPTQ codes -> :func:`init_logits` -> :class:`GSQ`.step on batches of
routed tokens (soft weights from :mod:`.gumbel`, Lion from :mod:`.lion`, tau / kappa / lr
schedules per step) -> :meth:`GSQ.export` (argmax codes, learned scales rounded to bf16).

The objective, per expert: the squared error between the full-precision expert output
``down(silu(gate x) * up x)`` and the soft-quantized one, over the tokens the full-precision
router sends to that expert (before the routing weight), averaged over that expert's tokens.
Experts are independent, so one summed loss trains all of them in one batched pass.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..format import CODEBOOK, NUM_LEVELS, codes_to_values
from .gptq import QuantResult, make_result
from .gumbel import soft_weight
from .lion import Lion

# init_logits works through the experts in chunks of at most this many logits (fp32 temporaries).
_INIT_CHUNK = 1 << 27


@dataclass
class GSQConfig:
    """GSQ's hyper-parameters; the defaults are the reference's.

    Attributes:
        epochs: passes over the training tokens.
        batch_tokens: calibration tokens per optimizer step (each routed to its top-k experts).
        lr_logits / lr_scales: Lion step sizes at the start of the cosine schedule.
        weight_decay: decoupled decay of the logits (the scales get none).
        betas: Lion's ``(beta1, beta2)``.
        tau: temperature, linear from the first to the second value over the steps.
        kappa: logit multiplier, linear likewise.
        final_lr_ratio: the cosine schedule ends at this fraction of each learning rate.
        init_scale / init_sharpness: ``logits = init_scale * (N(0, 1) + init_sharpness * base)``.
        logits_dtype: ``"bfloat16"`` (the reference's) or ``"float32"``.
    """

    epochs: int = 10
    batch_tokens: int = 4096
    lr_logits: float = 2e-4
    lr_scales: float = 1e-4
    weight_decay: float = 1.0
    betas: tuple[float, float] = (0.9, 0.95)
    tau: tuple[float, float] = (2.0, 0.05)
    kappa: tuple[float, float] = (100.0, 500.0)
    final_lr_ratio: float = 0.1
    init_scale: float = 0.01
    init_sharpness: float = 6.0
    logits_dtype: str = "bfloat16"

    def __post_init__(self):
        if self.epochs < 1 or self.batch_tokens < 1:
            raise ValueError(f"epochs and batch_tokens must be >= 1, got {self.epochs} and {self.batch_tokens}")
        if self.logits_dtype not in ("bfloat16", "float32"):
            raise ValueError(f"logits_dtype must be 'bfloat16' or 'float32', got {self.logits_dtype!r}")
        if min(self.tau) <= 0:
            raise ValueError(f"tau must stay positive, got {self.tau}")
        self.betas, self.tau, self.kappa = tuple(self.betas), tuple(self.tau), tuple(self.kappa)

    def to_dict(self) -> dict:
        return asdict(self)


def schedule(step: int, num_steps: int, config: GSQConfig) -> tuple[float, float, float]:
    """``(tau, kappa, lr_factor)`` at ``step`` of ``num_steps``: linear tau / kappa, cosine lr to ``final_lr_ratio``."""
    frac = step / max(num_steps - 1, 1)
    tau = config.tau[0] + (config.tau[1] - config.tau[0]) * frac
    kappa = config.kappa[0] + (config.kappa[1] - config.kappa[0]) * frac
    lr_factor = config.final_lr_ratio + (1 - config.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))
    return tau, kappa, lr_factor


@torch.no_grad()
def init_logits(
    codes: torch.Tensor,
    generator: torch.Generator,
    dtype: torch.dtype = torch.bfloat16,
    init_scale: float = 0.01,
    init_sharpness: float = 6.0,
) -> torch.Tensor:
    """Logits ``[E, R, C, 4]`` that start GSQ near the codes ``[E, R, C]`` (e.g. GPTQ's).

    ``base_k = -0.5 (c - v_k)^2`` centred over ``k`` (``c`` the code's value, ``v`` the codebook);
    ``logits_k = init_scale * (N(0, 1) + init_sharpness * base_k)``. Noise comes from
    ``generator`` (on ``codes.device``), drawn in fixed chunks of experts so the result does not
    depend on memory.
    """
    v = torch.tensor(CODEBOOK, dtype=torch.float32, device=codes.device)
    out = torch.empty(*codes.shape, NUM_LEVELS, dtype=dtype, device=codes.device)
    per_expert = max(codes[0].numel() * NUM_LEVELS, 1)
    chunk = max(1, _INIT_CHUNK // per_expert)
    for e0 in range(0, codes.shape[0], chunk):  # bounds the fp32 temporaries, not the math
        c = codes_to_values(codes[e0 : e0 + chunk], torch.float32).unsqueeze(-1)
        base = -0.5 * (c - v) ** 2
        base -= base.mean(dim=-1, keepdim=True)
        noise = torch.randn(base.shape, generator=generator, device=codes.device, dtype=torch.float32)
        out[e0 : e0 + chunk] = (init_scale * (noise + init_sharpness * base)).to(dtype)
    return out


def expert_forward(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """All experts' SwiGLU MLPs on their own tokens: ``down(silu(gate x) * up x)``.

    Args:
        x: ``[E, N, H]``.
        gate_up: ``[E, 2I, H]`` (gate rows first).
        down: ``[E, H, I]``.
    Returns:
        ``[E, N, H]`` in ``x``'s dtype (zero rows of ``x`` give zero rows).
    """
    gate, up = torch.bmm(x, gate_up.transpose(1, 2)).chunk(2, dim=-1)  # [E, N, I] each
    return torch.bmm(F.silu(gate) * up, down.transpose(1, 2))


@torch.no_grad()
def expert_sq_error(
    x: torch.Tensor,
    gate_up_ref: torch.Tensor,
    down_ref: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    y_ref: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-expert sum of squared output errors (fp32 ``[E]``) of ``(gate_up, down)`` against the reference weights.

    ``y_ref`` (the reference output) may be passed to reuse it across candidates.
    """
    if y_ref is None:
        y_ref = expert_forward(x, gate_up_ref.to(x.dtype), down_ref.to(x.dtype))
    y = expert_forward(x, gate_up.to(x.dtype), down.to(x.dtype))
    return (y.float() - y_ref.float()).pow_(2).sum(dim=(1, 2))


class GSQ:
    """GSQ state of one layer's experts: logits and scales of ``gate_up`` and ``down``, and Lion.

    Args:
        gate_up: full-precision ``[E, 2I, H]`` (the targets' weights).
        down: full-precision ``[E, H, I]``.
        gate_up_init / down_init: the starting point (GPTQ's codes and scales).
        num_steps: optimizer steps planned (sets the schedules).
        config: :class:`GSQConfig`.
        seed: seeds the logit initialisation and every step's Gumbel noise.
        compute_dtype: dtype of the matmuls (default bf16 on CUDA, fp32 elsewhere).
    Raises:
        ValueError: shapes that do not match.
    """

    def __init__(
        self,
        gate_up: torch.Tensor,
        down: torch.Tensor,
        gate_up_init: QuantResult,
        down_init: QuantResult,
        num_steps: int,
        config: GSQConfig | None = None,
        seed: int = 0,
        compute_dtype: torch.dtype | None = None,
    ):
        self.config = config or GSQConfig()
        if gate_up.dim() != 3 or down.dim() != 3 or gate_up.shape[0] != down.shape[0]:
            raise ValueError(f"gate_up must be [E, 2I, H] and down [E, H, I]; got {tuple(gate_up.shape)}, {tuple(down.shape)}")
        if tuple(gate_up_init.codes.shape) != tuple(gate_up.shape) or tuple(down_init.codes.shape) != tuple(down.shape):
            raise ValueError("the initial codes must have the shapes of gate_up and down")
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        device = gate_up.device
        self.compute_dtype = compute_dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        self.gate_up_ref = gate_up.to(self.compute_dtype)
        self.down_ref = down.to(self.compute_dtype)
        self.num_steps, self.seed, self.t = num_steps, seed, 0
        gen = torch.Generator(device=device).manual_seed(seed)
        ldtype = getattr(torch, self.config.logits_dtype)
        cfg = self.config
        self.logits = [
            init_logits(r.codes.to(device), gen, ldtype, cfg.init_scale, cfg.init_sharpness).requires_grad_(True)
            for r in (gate_up_init, down_init)
        ]
        self.scales = [r.weight_scale.to(device, torch.float32).clone().requires_grad_(True) for r in (gate_up_init, down_init)]
        self.optimizer = Lion(
            [
                dict(params=self.logits, lr=cfg.lr_logits, weight_decay=cfg.weight_decay),
                dict(params=self.scales, lr=cfg.lr_scales, weight_decay=0.0),
            ],
            betas=cfg.betas,
        )
        self._base_lrs = [cfg.lr_logits, cfg.lr_scales]

    def _noise_seed(self, matrix: int) -> int:
        # Distinct for every (run seed, step, matrix); stays well inside 63 bits.
        return (self.seed % (1 << 30)) * (1 << 32) + 2 * self.t + matrix

    def soft_weights(self, tau: float, kappa: float) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's soft ``(gate_up [E, 2I, H], down [E, H, I])`` in the compute dtype."""
        return tuple(
            soft_weight(self.logits[m], self.scales[m], tau, kappa, self._noise_seed(m), out_dtype=self.compute_dtype)
            for m in range(2)
        )

    def step(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """One optimizer step on a batch of routed tokens.

        Args:
            x: ``[E, N, H]``, each expert's tokens zero-padded (:func:`.calibration.group_by_expert`).
            counts: ``[E]`` tokens per expert.
        Returns:
            the batch's summed squared error of the soft outputs (fp32 scalar tensor, no sync).
        """
        tau, kappa, lr_factor = schedule(self.t, self.num_steps, self.config)
        for group, base in zip(self.optimizer.param_groups, self._base_lrs):
            group["lr"] = base * lr_factor
        x = x.to(self.compute_dtype)
        with torch.no_grad():
            y_ref = expert_forward(x, self.gate_up_ref, self.down_ref)
        with torch.enable_grad():  # callers may sit under no_grad
            gate_up, down = self.soft_weights(tau, kappa)
            y = expert_forward(x, gate_up, down)
            err = (y.float() - y_ref.float()).pow(2).sum(dim=(1, 2))  # [E]
            denom = (counts.to(err.device, torch.float32) * x.shape[-1]).clamp(min=1.0)
            loss = (err / denom).sum()  # each expert's mean over its own tokens
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        self.optimizer.step()
        self.t += 1
        return err.detach().sum()

    @torch.no_grad()
    def export(self) -> tuple[QuantResult, QuantResult]:
        """Hard result: ``argmax`` codes (no noise) and the learned scales rounded to bf16."""
        out = []
        for logits, scale in zip(self.logits, self.scales):
            codes = logits.argmax(dim=-1).to(torch.uint8)  # codebook order == code order
            out.append(make_result(codes, scale.detach().to(torch.bfloat16)))
        return out[0], out[1]
