"""GSQFusedMoE: construction, validation, forward contract, dequantize, dtype of the scales."""

import pytest
import torch
from torch import nn

from gsq_torch import format
from gsq_torch.nn.moe import GSQFusedMoE
from gsq_torch.ops.moe import fused_moe_reference
from gsq_torch.quantizers.rtn import quantize_rtn

E, H, I = 4, 256, 128


class _Experts(nn.Module):
    """Stand-in for transformers' fused experts module (same attributes and forward contract)."""

    def __init__(self, act_fn: nn.Module | None = None):
        super().__init__()
        self.num_experts, self.hidden_dim, self.intermediate_dim = E, H, I
        self.gate_up_proj = nn.Parameter(torch.randn(E, 2 * I, H) * H**-0.5)
        self.down_proj = nn.Parameter(torch.randn(E, H, I) * I**-0.5)
        self.act_fn = nn.SiLU() if act_fn is None else act_fn

    def forward(self, hidden_states, top_k_index, top_k_weights):
        raise NotImplementedError


def _packed(num_experts=E, hidden=H, intermediate=I):
    gate_up = quantize_rtn(torch.randn(num_experts, 2 * intermediate, hidden), grid=2)
    down = quantize_rtn(torch.randn(num_experts, hidden, intermediate), grid=2)
    return (*gate_up, *down)


def _routing(T, K=2):
    index = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    weights = torch.softmax(torch.randn(T, K), dim=-1)
    return index, weights


def test_placeholder_has_exact_packed_shapes_and_dtypes_on_meta():
    m = GSQFusedMoE(E, H, I, device="meta")
    shapes = {n: (tuple(p.shape), p.dtype, p.device.type, p.requires_grad) for n, p in m.named_parameters()}
    assert shapes == {
        "gate_up_proj": ((E, 2 * I, H // 16), torch.int32, "meta", False),
        "gate_up_proj_scale": ((E, 2 * I, H // 128), torch.bfloat16, "meta", False),
        "down_proj": ((E, H, I // 16), torch.int32, "meta", False),
        "down_proj_scale": ((E, H, I // 128), torch.bfloat16, "meta", False),
    }
    assert (m.num_experts, m.hidden_dim, m.intermediate_dim) == (E, H, I)


@pytest.mark.parametrize("hidden, intermediate", [(200, 128), (256, 64)])
def test_constructor_rejects_dims_not_multiple_of_group(hidden, intermediate):
    with pytest.raises(ValueError, match="multiple of 128"):
        GSQFusedMoE(E, hidden, intermediate)


def test_from_experts_equals_rtn_of_each_expert():
    experts = _Experts()
    m = GSQFusedMoE.from_experts(experts, grid=2)
    for e in range(E):
        w, s = quantize_rtn(experts.gate_up_proj[e].detach(), grid=2)
        assert torch.equal(m.gate_up_proj[e], w) and torch.equal(m.gate_up_proj_scale[e], s)
        w, s = quantize_rtn(experts.down_proj[e].detach(), grid=2)
        assert torch.equal(m.down_proj[e], w) and torch.equal(m.down_proj_scale[e], s)


def test_from_experts_rejects_activation_other_than_silu():
    with pytest.raises(ValueError, match="GELU.*SiLU"):
        GSQFusedMoE.from_experts(_Experts(act_fn=nn.GELU()))


def test_from_experts_rejects_biases_and_transposed_layout():
    experts = _Experts()
    experts.has_bias = True
    with pytest.raises(ValueError, match="biases"):
        GSQFusedMoE.from_experts(experts)
    experts = _Experts()
    experts.is_transposed = True
    with pytest.raises(ValueError, match="transposed"):
        GSQFusedMoE.from_experts(experts)


def test_from_experts_rejects_module_without_fused_weights():
    with pytest.raises(TypeError, match="gate_up_proj"):
        GSQFusedMoE.from_experts(nn.Linear(4, 4))


def test_from_packed_names_the_bad_tensor():
    gu, gus, d, ds = _packed()
    with pytest.raises(ValueError, match="down_proj"):
        GSQFusedMoE.from_packed(gu, gus, d[:, :128], ds[:, :128])
    with pytest.raises(ValueError, match="gate_up_proj: weight_scale has shape"):
        GSQFusedMoE.from_packed(gu, gus[..., :1], d, ds)
    with pytest.raises(TypeError, match="int32"):
        GSQFusedMoE.from_packed(gu.float(), gus, d, ds)
    with pytest.raises(ValueError, match="2 \\* I"):
        GSQFusedMoE.from_packed(gu[:, :-1], gus[:, :-1], d, ds)


def test_forward_matches_reference_and_restores_leading_dims():
    m = GSQFusedMoE.from_packed(*_packed())
    x = torch.randn(2, 3, H)
    index, weights = _routing(6)
    out = m(x, index.view(2, 3, -1), weights.view(2, 3, -1))
    assert out.shape == (2, 3, H) and out.dtype == x.dtype
    ref = fused_moe_reference(x.view(6, H), index, weights, m.gate_up_proj, m.gate_up_proj_scale, m.down_proj,
                              m.down_proj_scale)
    torch.testing.assert_close(out.view(6, H), ref)


def test_forward_matches_dense_experts_computation():
    m = GSQFusedMoE.from_packed(*_packed())
    gate_up, down = m.dequantize(torch.float64)
    x = torch.randn(5, H, dtype=torch.float64)
    index, weights = _routing(5)
    weights = weights.double()
    expected = torch.zeros(5, H, dtype=torch.float64)
    for t in range(5):
        for k in range(index.shape[1]):
            e = int(index[t, k])
            g, u = (gate_up[e] @ x[t]).chunk(2)
            expected[t] += weights[t, k] * (down[e] @ (torch.nn.functional.silu(g) * u))
    torch.testing.assert_close(m(x, index, weights), expected)


def test_dequantize_returns_dense_weights_in_plain_layout():
    m = GSQFusedMoE.from_packed(*_packed())
    gate_up, down = m.dequantize()
    assert gate_up.shape == (E, 2 * I, H) and down.shape == (E, H, I) and gate_up.dtype == torch.bfloat16
    torch.testing.assert_close(gate_up, format.dequantize(m.gate_up_proj, m.gate_up_proj_scale), rtol=0, atol=0)
    torch.testing.assert_close(down, format.dequantize(m.down_proj, m.down_proj_scale), rtol=0, atol=0)


def test_scales_stay_bf16_when_module_is_cast():
    m = GSQFusedMoE.from_packed(*_packed())
    before = m.down_proj_scale.detach().clone()
    m.to(torch.float32)
    assert m.gate_up_proj_scale.dtype == torch.bfloat16 and m.down_proj_scale.dtype == torch.bfloat16
    assert m.gate_up_proj.dtype == torch.int32
    assert torch.equal(m.down_proj_scale, before)


def test_scales_can_be_made_trainable():
    m = GSQFusedMoE.from_packed(*_packed())
    m.gate_up_proj_scale.requires_grad_(True)
    assert [n for n, p in m.named_parameters() if p.requires_grad] == ["gate_up_proj_scale"]


def test_extra_repr_names_the_dims_and_format():
    assert "num_experts=4, hidden_dim=256, intermediate_dim=128, bits=2, group_size=128" in repr(GSQFusedMoE(E, H, I))


def test_forward_with_no_tokens_returns_empty():
    m = GSQFusedMoE.from_packed(*_packed())
    out = m(torch.zeros(0, H), torch.zeros(0, 2, dtype=torch.int64), torch.zeros(0, 2))
    assert out.shape == (0, H)
