"""GSQ pieces: the soft weight's exact gradients (PyTorch path and Triton kernels under the
interpreter), noise regeneration, Lion, the initialisation, schedules and the hard export."""

import math

import pytest
import torch

from gsq_torch import format
from gsq_torch.quantizers import gumbel
from gsq_torch.quantizers.gptq import rtn_result
from gsq_torch.quantizers.gsq import GSQ, GSQConfig, expert_forward, init_logits, schedule
from gsq_torch.quantizers.lion import Lion, lion_update_


def _logits_and_scale(E=2, R=3, C=256, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(E, R, C, 4, generator=gen) * 0.05).to(dtype)
    scale = torch.randn(E, R, C // 128, generator=gen) * 0.1
    return logits, scale


def _reference_grads(logits, scale, tau, kappa, noise, grad_out):
    lg = logits.float().clone().requires_grad_(True)
    sc = scale.clone().requires_grad_(True)
    w = gumbel.soft_weight_reference(lg, sc, tau, kappa, noise)
    w.backward(grad_out)
    return w.detach(), lg.grad, sc.grad


def test_soft_weight_reference_is_scale_times_expected_level():
    logits, scale = _logits_and_scale()
    noise = torch.randn(logits.shape)
    w = gumbel.soft_weight_reference(logits, scale, 0.7, 150.0, noise)
    y = torch.softmax((150.0 * logits + noise) / 0.7, dim=-1)
    expected = (y * torch.tensor(format.CODEBOOK)).sum(-1) * scale.repeat_interleave(128, dim=-1)
    torch.testing.assert_close(w, expected)


def test_soft_weight_gradients_match_autograd_through_explicit_computation():
    logits, scale = _logits_and_scale()
    tau, kappa, seed = 0.7, 150.0, 1234
    grad_out = torch.randn(logits.shape[:-1])
    noise = gumbel.gumbel_noise_torch(logits.shape, seed, "cpu")
    w_ref, gl_ref, gs_ref = _reference_grads(logits, scale, tau, kappa, noise, grad_out)

    lg = logits.clone().requires_grad_(True)
    sc = scale.clone().requires_grad_(True)
    w = gumbel.soft_weight(lg, sc, tau, kappa, seed, use_triton=False)
    w.backward(grad_out)
    # Same math, different fp32 operation order: equal to rounding.
    torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lg.grad, gl_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sc.grad, gs_ref, rtol=1e-4, atol=1e-4)


def test_soft_weight_analytic_gradient_formula():
    # dW/dl_j = kappa / tau * s * y_j * (v_j - sum_k y_k v_k), checked against the reference's autograd.
    logits, scale = _logits_and_scale(E=1, R=2)
    tau, kappa = 1.3, 120.0
    noise = torch.randn(logits.shape)
    grad_out = torch.randn(logits.shape[:-1])
    _, gl_ref, _ = _reference_grads(logits, scale, tau, kappa, noise, grad_out)
    y = torch.softmax((kappa * logits + noise) / tau, dim=-1)
    v = torch.tensor(format.CODEBOOK)
    wbar = (y * v).sum(-1, keepdim=True)
    s = scale.repeat_interleave(128, dim=-1).unsqueeze(-1)
    expected = kappa / tau * s * grad_out.unsqueeze(-1) * y * (v - wbar)
    torch.testing.assert_close(gl_ref, expected, rtol=1e-4, atol=1e-5)


def test_same_seed_same_sample_other_seed_other_sample():
    logits, scale = _logits_and_scale()
    a = gumbel.soft_weight(logits, scale, 1.0, 100.0, seed=7, use_triton=False)
    b = gumbel.soft_weight(logits, scale, 1.0, 100.0, seed=7, use_triton=False)
    c = gumbel.soft_weight(logits, scale, 1.0, 100.0, seed=8, use_triton=False)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernels_match_reference_with_their_own_noise(dtype):
    # Runs under TRITON_INTERPRET=1 on CPU (tests/conftest.py); the real kernels on a GPU machine.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    logits, scale = _logits_and_scale(E=2, R=2, dtype=dtype)
    logits, scale = logits.to(device), scale.to(device)
    tau, kappa, seed = 0.9, 200.0, 99
    noise = gumbel.gumbel_noise_triton(logits.shape, seed, device)
    # Gumbel(0, 1): mean = Euler's constant, std = pi / sqrt(6).
    assert abs(noise.mean().item() - 0.5772) < 0.1 and abs(noise.std().item() - math.pi / math.sqrt(6)) < 0.1
    grad_out = torch.randn(logits.shape[:-1], device=device)
    w_ref, gl_ref, gs_ref = _reference_grads(logits, scale, tau, kappa, noise, grad_out)

    lg = logits.clone().requires_grad_(True)
    sc = scale.clone().requires_grad_(True)
    w = gumbel.soft_weight(lg, sc, tau, kappa, seed, out_dtype=torch.float32, use_triton=True)
    w.backward(grad_out)
    torch.testing.assert_close(w, w_ref, rtol=1e-4, atol=1e-6)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2 * gl_ref.abs().max().item())
    assert lg.grad.dtype == dtype
    torch.testing.assert_close(lg.grad.float(), gl_ref, **tol)
    torch.testing.assert_close(sc.grad, gs_ref, rtol=1e-4, atol=1e-4)


def test_soft_weight_rejects_bad_shapes():
    logits, scale = _logits_and_scale()
    with pytest.raises(ValueError, match="scale must be"):
        gumbel.soft_weight(logits, scale[..., :1], 1.0, 100.0, 0)
    with pytest.raises(ValueError, match="logits must be"):
        gumbel.soft_weight(logits[..., :3], scale, 1.0, 100.0, 0)
    with pytest.raises(ValueError, match="multiple of 128"):
        gumbel.soft_weight(logits[:, :, :100], scale, 1.0, 100.0, 0)


def test_lion_step_matches_definition_and_triton_kernel():
    p = torch.randn(1000)
    g = torch.randn(1000)
    m = torch.randn(1000)
    lr, wd, b1, b2 = 0.01, 0.5, 0.9, 0.95
    expected_p = p * (1 - lr * wd) - lr * torch.sign(b1 * m + (1 - b1) * g)
    expected_m = b2 * m + (1 - b2) * g
    p1, m1 = p.clone(), m.clone()
    lion_update_(p1, g, m1, lr, wd, b1, b2, use_triton=False)
    torch.testing.assert_close(p1, expected_p)
    torch.testing.assert_close(m1, expected_m)
    # The Triton kernel: on the GPU, or under the interpreter on CPU (tests/conftest.py).
    device = "cuda" if torch.cuda.is_available() else "cpu"
    p2, m2 = p.clone().to(device), m.clone().to(device)
    lion_update_(p2, g.to(device), m2, lr, wd, b1, b2, use_triton=True)
    torch.testing.assert_close(p2.cpu(), expected_p)
    torch.testing.assert_close(m2.cpu(), expected_m)


def test_lion_optimizer_minimises_a_quadratic_with_decoupled_decay():
    x = torch.nn.Parameter(torch.full((10,), 3.0))
    opt = Lion([x], lr=0.05, betas=(0.9, 0.95))
    for _ in range(200):
        opt.zero_grad()
        (x**2).sum().backward()
        opt.step()
    assert x.abs().max() < 0.2
    # With a zero gradient only the decoupled decay acts: p *= (1 - lr * wd) per step.
    y = torch.nn.Parameter(torch.full((4,), 0.5))
    y.grad = torch.zeros_like(y)
    opt = Lion([y], lr=0.01, weight_decay=2.0)
    for _ in range(10):
        opt.step()
    torch.testing.assert_close(y.detach(), torch.full((4,), 0.5 * 0.98**10))
    with pytest.raises(ValueError, match="betas"):
        Lion([x], betas=(0.9, 1.0))


def test_init_logits_prefers_the_given_codes_and_is_centred():
    codes = torch.randint(0, 4, (2, 4, 128), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(0)
    logits = init_logits(codes, gen, torch.float32, init_scale=0.01, init_sharpness=6.0)
    assert logits.shape == (2, 4, 128, 4)
    # Noise 0.01 * N(0, 1) against a margin of 0.03 to the nearest neighbour: most argmaxes agree.
    agree = (logits.argmax(-1) == codes).float().mean()
    assert 0.9 < agree < 1.0
    no_noise = init_logits(codes, gen, torch.float32, init_scale=0.01, init_sharpness=1e6)
    assert torch.equal(no_noise.argmax(-1), codes.long())
    # base is centred over the levels; the noise has mean ~0.
    assert logits.float().mean(-1).abs().mean() < 0.01


def test_schedule_is_linear_in_tau_kappa_and_cosine_in_lr():
    cfg = GSQConfig()
    assert schedule(0, 11, cfg) == pytest.approx((2.0, 100.0, 1.0))
    tau, kappa, lr = schedule(10, 11, cfg)
    assert (tau, kappa, lr) == pytest.approx((0.05, 500.0, 0.1))
    tau, kappa, lr = schedule(5, 11, cfg)
    assert (tau, kappa, lr) == pytest.approx((1.025, 300.0, 0.55))


def _tiny_experts(E=3, H=128, I=128, seed=0):  # noqa: E741
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(E, 2 * I, H, generator=gen) * H**-0.5, torch.randn(E, H, I, generator=gen) * I**-0.5


def test_gsq_step_lowers_soft_loss_and_export_is_plain_layout():
    gate_up, down = _tiny_experts()
    init = rtn_result(gate_up), rtn_result(down)
    cfg = GSQConfig(lr_logits=2e-3, lr_scales=1e-3, tau=(0.5, 0.5), kappa=(300.0, 300.0))
    gsq = GSQ(gate_up, down, *init, num_steps=30, config=cfg, seed=0)
    x = torch.randn(3, 64, 128)
    counts = torch.full((3,), 64)
    losses = [float(gsq.step(x, counts)) for _ in range(30)]
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5])
    gu, dn = gsq.export()
    assert gu.weight.dtype == torch.int32 and gu.weight.shape == (3, 256, 8)
    assert gu.weight_scale.dtype == torch.bfloat16 and dn.weight_scale.shape == (3, 128, 1)
    assert torch.equal(gu.codes, gsq.logits[0].argmax(-1).to(torch.uint8))
    # A zero-padded row contributes no loss: padding two experts' batches changes nothing.
    y = expert_forward(torch.zeros(3, 2, 128), gate_up, down)
    assert (y == 0).all()


def test_gsq_is_deterministic_for_a_seed():
    gate_up, down = _tiny_experts(E=2)
    init = rtn_result(gate_up), rtn_result(down)
    x, counts = torch.randn(2, 16, 128), torch.tensor([16, 10])
    runs = []
    for _ in range(2):
        gsq = GSQ(gate_up, down, *init, num_steps=3, config=GSQConfig(lr_logits=1e-2), seed=3)
        for _ in range(3):
            gsq.step(x, counts)
        runs.append(gsq.logits[0].detach().clone())
    assert torch.equal(runs[0], runs[1])


def test_gsq_config_rejects_bad_values():
    with pytest.raises(ValueError, match="logits_dtype"):
        GSQConfig(logits_dtype="float16")
    with pytest.raises(ValueError, match="epochs"):
        GSQConfig(epochs=0)
