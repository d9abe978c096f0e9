"""GSQExpertLinear: buffers, from_linear, forward, dtype and device moves, state_dict, bad input."""

import pytest
import torch
from torch import nn

from gsq_torch import format
from gsq_torch.nn import GSQExpertLinear
from gsq_torch.quantizers.rtn import quantize_rtn

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make(out_features=40, in_features=256):
    # A coarse scale grid keeps the tests fast; test_from_linear_... checks the default search.
    return GSQExpertLinear.from_linear(nn.Linear(in_features, out_features, bias=False), grid=10)


def test_buffers_have_the_checkpoint_names_shapes_and_dtypes():
    module = GSQExpertLinear(384, 24)
    assert dict(module.named_buffers()).keys() == {"weight", "weight_scale"}
    assert module.weight.shape == (24, 24) and module.weight.dtype == torch.int32
    assert module.weight_scale.shape == (24, 3) and module.weight_scale.dtype == torch.bfloat16
    assert list(module.state_dict()) == ["weight", "weight_scale"]
    assert list(module.parameters()) == []
    assert (module.in_features, module.out_features) == (384, 24)


def test_from_linear_is_round_to_nearest_with_the_scale_search():
    linear = nn.Linear(256, 8, bias=False)
    module = GSQExpertLinear.from_linear(linear)
    weight, weight_scale = quantize_rtn(linear.weight.detach())
    assert torch.equal(module.weight, weight) and torch.equal(module.weight_scale, weight_scale)
    assert (module.in_features, module.out_features) == (256, 8)


def test_forward_matches_the_dequantized_linear():
    module = make().to(DEVICE)
    x = torch.randn(2, 3, 256, device=DEVICE)
    y = module(x)
    assert y.shape == (2, 3, 40) and y.dtype == torch.float32
    torch.testing.assert_close(
        y, nn.functional.linear(x, module.dequantize(torch.float32)), rtol=1e-4, atol=1e-4
    )
    yb = module(x.bfloat16())
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(
        yb.float(),
        nn.functional.linear(x.bfloat16().float(), module.dequantize(torch.float32)),
        rtol=2e-2,
        atol=2e-2,
    )


def test_dequantize_matches_the_format():
    module = make()
    assert torch.equal(module.dequantize(), format.dequantize(module.weight, module.weight_scale))
    assert module.dequantize(torch.float64).dtype == torch.float64


@pytest.mark.parametrize(
    "cast",
    [
        lambda m: m.half(),
        lambda m: m.bfloat16(),
        lambda m: m.float(),
        lambda m: m.double(),
        lambda m: m.to(torch.float16),
        lambda m: m.to("cpu", torch.float32),
    ],
    ids=["half", "bfloat16", "float", "double", "to_fp16", "to_cpu_fp32"],
)
def test_dtype_casts_keep_the_int32_words_and_the_bf16_scales(cast):
    module = make()
    weight, scale = module.weight.clone(), module.weight_scale.clone()
    assert cast(module) is module
    assert module.weight.dtype == torch.int32 and torch.equal(module.weight, weight)
    assert module.weight_scale.dtype == torch.bfloat16 and torch.equal(module.weight_scale, scale)


def test_half_module_runs_fp16_activations():
    module = make().half()
    x = torch.randn(3, 256).half()
    y = module(x)
    assert y.dtype == torch.float16
    torch.testing.assert_close(
        y.float(), x.float() @ module.dequantize(torch.float32).T, rtol=1e-2, atol=1e-2
    )


def test_device_moves_carry_both_buffers():
    module = make().to("meta")
    assert module.weight.device.type == "meta" and module.weight_scale.device.type == "meta"
    assert module.weight.dtype == torch.int32 and module.weight_scale.dtype == torch.bfloat16


@pytest.mark.cuda
def test_to_cuda_and_back_keeps_the_buffers_exact():
    module = make()
    weight, scale = module.weight.clone(), module.weight_scale.clone()
    module.to("cuda").bfloat16()
    assert (
        module.weight.is_cuda and module.weight_scale.is_cuda and module.weight_scale.dtype == torch.bfloat16
    )
    x = torch.randn(5, 256, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(
        module(x).float(), x.float() @ module.dequantize(torch.float32).T, rtol=2e-2, atol=2e-2
    )
    module.cpu()
    assert torch.equal(module.weight, weight) and torch.equal(module.weight_scale, scale)


def test_state_dict_round_trip():
    source = make()
    target = GSQExpertLinear(256, 40)
    target.load_state_dict(source.state_dict())
    assert torch.equal(target.weight, source.weight) and torch.equal(target.weight_scale, source.weight_scale)
    x = torch.randn(2, 256)
    assert torch.equal(target(x), source(x))


def test_from_packed_wraps_tensors_without_copying():
    weight, scale = quantize_rtn(torch.randn(8, 128))
    module = GSQExpertLinear.from_packed(weight, scale)
    assert module.weight is weight and module.weight_scale is scale
    assert (module.in_features, module.out_features) == (128, 8)


def test_gradient_flows_to_the_input_only():
    module = make()
    x = torch.randn(4, 256, requires_grad=True)
    module(x).sum().backward()
    torch.testing.assert_close(
        x.grad, module.dequantize(torch.float32).sum(0).expand(4, -1), rtol=1e-5, atol=1e-5
    )
    assert all(b.grad is None for b in module.buffers())


def test_extra_repr_names_the_sizes_and_the_format():
    text = repr(make(40, 256))
    assert "in_features=256" in text and "out_features=40" in text and "humming-uint2" in text


def test_compiles_fullgraph_inside_a_model():
    model = nn.Sequential(nn.Linear(256, 256), nn.SiLU(), make(16, 256)).to(DEVICE)
    x = torch.randn(3, 256, device=DEVICE)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), model(x))


# --- bad inputs ---------------------------------------------------------------------------------


def test_from_linear_refuses_a_bias():
    with pytest.raises(ValueError, match="bias"):
        GSQExpertLinear.from_linear(nn.Linear(256, 8, bias=True))


def test_from_linear_refuses_in_features_not_multiple_of_128():
    with pytest.raises(ValueError, match="multiple of 128"):
        GSQExpertLinear.from_linear(nn.Linear(200, 8, bias=False))


def test_from_linear_refuses_other_modules():
    with pytest.raises(TypeError, match="nn.Linear"):
        GSQExpertLinear.from_linear(nn.Conv1d(128, 8, 1))


@pytest.mark.parametrize("in_features", [0, 100, 130])
def test_constructor_refuses_bad_in_features(in_features):
    with pytest.raises(ValueError, match="multiple of 128"):
        GSQExpertLinear(in_features, 8)


@pytest.mark.parametrize(
    "weight, scale, error, match",
    [
        (torch.zeros(8, 8, dtype=torch.int64), torch.zeros(8, 1, dtype=torch.bfloat16), TypeError, "int32"),
        (torch.zeros(8, 8, dtype=torch.int32), torch.zeros(8, 1), TypeError, "bf16"),
        (
            torch.zeros(8, 8, dtype=torch.int32),
            torch.zeros(8, 2, dtype=torch.bfloat16),
            ValueError,
            "weight_scale",
        ),
        (
            torch.zeros(2, 8, 8, dtype=torch.int32),
            torch.zeros(2, 8, 1, dtype=torch.bfloat16),
            ValueError,
            "out, in/16",
        ),
    ],
)
def test_from_packed_refuses_bad_tensors(weight, scale, error, match):
    with pytest.raises(error, match=match):
        GSQExpertLinear.from_packed(weight, scale)


def test_forward_refuses_wrong_input_size():
    with pytest.raises(ValueError, match="in_features=256"):
        make()(torch.randn(2, 128))


def test_load_state_dict_refuses_wrong_shapes():
    with pytest.raises(RuntimeError, match="size mismatch"):
        GSQExpertLinear(256, 40).load_state_dict(make(40, 384).state_dict())
