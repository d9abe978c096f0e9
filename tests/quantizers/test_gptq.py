"""GPTQ batched over experts: matches a plain per-column implementation, handles act-order, dead
columns and experts without tokens, and beats round-to-nearest on held-out inputs."""

import pytest
import torch

from gsq_torch import format
from gsq_torch.quantizers.gptq import GPTQ, gptq_quantize, rtn_result
from gsq_torch.quantizers.rtn import fit_group_scales


def _inputs(E, N, C, seed=0):
    # Correlated inputs (one fixed mixing matrix; samples drawn with `seed`): GPTQ has work to do.
    mix = torch.randn(C, C, generator=torch.Generator().manual_seed(1234)) / C**0.5 + torch.eye(C)
    return torch.randn(E, N, C, generator=torch.Generator().manual_seed(seed)) @ mix


def _gptq_one_matrix(W, H, damp=0.1):
    """Straightforward GPTQ of one matrix ``W [R, C]``: no lazy blocks, every column's error spread
    over all later columns at once; group scale fitted when a group starts."""
    W = W.double().clone()
    H = H.double().clone()
    C = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.diag(H).mean() * torch.eye(C, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes = torch.zeros(W.shape, dtype=torch.uint8)
    scales = []
    for j in range(C):
        if j % format.GROUP_SIZE == 0:
            s = fit_group_scales(W[:, j : j + format.GROUP_SIZE]).float()[:, 0]  # [R]
            scales.append(s)
        w = W[:, j]
        q = (w.float() / s).round().clamp(format.Q_MIN, format.Q_MAX)
        codes[:, j] = format.values_to_codes(q)
        err = (w - (q * s).double()) / U[j, j]
        W[:, j:] -= err[:, None] * U[j, j:][None, :]
    return codes, torch.stack(scales, dim=1).to(torch.bfloat16)


def test_gptq_matches_unbatched_per_column_reference():
    E, R, C = 3, 16, 256
    x = _inputs(E, 400, C)
    W = torch.randn(E, R, C, generator=torch.Generator().manual_seed(1))
    g = GPTQ(E, C)
    g.add_batch(x, torch.full((E,), 400))
    result = g.quantize(W)
    for e in range(E):
        codes, scales = _gptq_one_matrix(W[e], g.H[e])
        assert (result.codes[e] == codes).float().mean() > 0.995
        assert torch.allclose(result.weight_scale[e].float(), scales.float(), rtol=1e-2)
    assert torch.equal(format.unpack(result.weight), result.codes)


def test_add_batch_keeps_running_mean_of_2xxT():
    E, C = 2, 128
    x = _inputs(E, 300, C)
    g = GPTQ(E, C)
    g.add_batch(x[:, :100], torch.tensor([100, 50]))  # expert 1 only has 50 real tokens here...
    g.add_batch(x[:, 100:], torch.tensor([200, 200]))
    x1 = torch.cat([x[1, :50], x[1, 100:]])
    expected = [2 / 300 * x[0].T @ x[0], 2 / 250 * x1.T @ x1]
    x_pad = x.clone()
    x_pad[1, 50:100] = 0  # ...and zero padding after them
    g2 = GPTQ(E, C)
    g2.add_batch(x_pad[:, :100], torch.tensor([100, 50]))
    g2.add_batch(x_pad[:, 100:], torch.tensor([200, 200]))
    for e in range(E):
        torch.testing.assert_close(g2.H[e], expected[e], rtol=1e-4, atol=1e-4)
    assert g2.nsamples.tolist() == [300, 250]


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_heldout_inputs(act_order):
    E, R, C = 2, 32, 256
    x_train, x_test = _inputs(E, 600, C), _inputs(E, 300, C, seed=5)
    W = torch.randn(E, R, C, generator=torch.Generator().manual_seed(2))
    g = GPTQ(E, C)
    g.add_batch(x_train, torch.full((E,), 600))
    gptq, rtn = g.quantize(W, act_order=act_order), rtn_result(W)

    def err(r):
        return ((x_test @ (r.dequantize() - W).transpose(1, 2)) ** 2).sum(dim=(1, 2))

    assert (err(gptq) < 0.9 * err(rtn)).all()
    assert (gptq.loss > 0).all()


def test_act_order_keeps_plain_layout():
    E, R, C = 2, 8, 256
    x = _inputs(E, 400, C) * torch.linspace(0.1, 3.0, C)  # distinct diag(H): a real permutation
    W = torch.randn(E, R, C)
    g = GPTQ(E, C)
    g.add_batch(x, torch.full((E,), 400))
    r = g.quantize(W, act_order=True)
    assert r.weight.shape == (E, R, C // 16) and r.weight_scale.shape == (E, R, C // 128)
    # Static groups: the scales are the scale search of the original columns, group by group.
    torch.testing.assert_close(r.weight_scale, fit_group_scales(W))
    # The codes sit in the original column order: column j dequantizes with group j // 128.
    deq = format.dequantize(r.weight, r.weight_scale, torch.float32)
    assert ((deq - W).abs().mean() < (W.abs().mean() * 0.6))


def test_dead_columns_get_zero_weight_and_do_not_break_cholesky():
    E, R, C = 2, 8, 256
    x = _inputs(E, 300, C)
    x[:, :, 5] = 0
    x[1, :, 200:] = 0
    W = torch.randn(E, R, C)
    g = GPTQ(E, C)
    g.add_batch(x, torch.full((E,), 300))
    r = g.quantize(W)
    deq = r.dequantize()
    assert torch.isfinite(r.loss).all()
    assert (deq[:, :, 5] == 0).all()
    assert (deq[1, :, 200:] == 0).all()
    assert (deq[0, :, 200:] != 0).any()


def test_expert_without_tokens_falls_back_to_rtn_with_scale_search():
    E, R, C = 3, 8, 256
    x = _inputs(E, 200, C)
    x[1] = 0
    W = torch.randn(E, R, C)
    g = GPTQ(E, C)
    g.add_batch(x, torch.tensor([200, 0, 200]))
    r = g.quantize(W)
    rtn = rtn_result(W[1:2])
    assert torch.equal(r.codes[1], rtn.codes[0])
    assert torch.equal(r.weight_scale[1], rtn.weight_scale[0])
    assert not torch.equal(r.codes[0], rtn_result(W[0:1]).codes[0])


def test_gptq_quantize_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple of 128"):
        gptq_quantize(torch.randn(1, 4, 100), torch.eye(100)[None])
    with pytest.raises(ValueError, match="H must be"):
        gptq_quantize(torch.randn(2, 4, 128), torch.eye(128)[None])
    with pytest.raises(ValueError, match="x must be"):
        GPTQ(2, 128).add_batch(torch.randn(2, 4, 256), torch.tensor([4, 4]))
