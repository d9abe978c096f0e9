"""replace_experts on tiny random models of every supported family."""

import copy

import pytest
import torch
from torch import nn

from gsq_torch import GSQFusedMoE, replace_experts
from gsq_torch.nn.replace import find_experts, humming_ignore, supported_architectures
from gsq_torch.testing import FAMILIES, tiny_model


def _rtn_quick(model):
    """{name: GSQFusedMoE} for every experts module, with a 1-candidate scale search (fast; the
    tests compare against the dequantized weights, so scale quality does not matter)."""
    return {name: GSQFusedMoE.from_experts(m, grid=2) for name, m in find_experts(model)}


def _dequantized_reference(model, quantized_model):
    """A copy of ``model`` whose experts hold the dequantized weights of ``quantized_model``."""
    ref = copy.deepcopy(model)
    q = dict(quantized_model.named_modules())
    with torch.no_grad():
        for name, experts in find_experts(ref):
            gate_up, down = q[name].dequantize(torch.float32)
            experts.gate_up_proj.copy_(gate_up)
            experts.down_proj.copy_(down)
    return ref


@pytest.fixture(scope="module", params=FAMILIES)
def family_models(request):
    model = tiny_model(request.param)  # fp32: logits are compared in fp32
    quantized = replace_experts(copy.deepcopy(model), quantized=_rtn_quick(model))
    return request.param, _dequantized_reference(model, quantized), quantized


def test_logits_match_dequantized_reference(family_models):
    _, ref, quantized = family_models
    ids = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        expected, got = ref(ids).logits, quantized(ids).logits
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_greedy_generate_gives_identical_tokens(family_models):
    _, ref, quantized = family_models
    ids = torch.randint(0, 512, (1, 5))
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(quantized.generate(ids, **kwargs), ref.generate(ids, **kwargs))


def test_only_routed_experts_are_replaced(family_models):
    _, ref, quantized = family_models
    ref_modules = dict(ref.named_modules())
    replaced = [n for n, m in quantized.named_modules() if isinstance(m, GSQFusedMoE)]
    assert replaced == [n for n, _ in find_experts(ref)] and replaced
    for name, module in quantized.named_modules():
        if isinstance(module, GSQFusedMoE) or any(name.startswith(r + ".") for r in replaced):
            continue
        assert type(module) is type(ref_modules[name]), name  # routers, shared experts, attention as they were


def test_default_rtn_equals_from_experts():
    from transformers import AutoModelForCausalLM

    from gsq_torch.testing import tiny_config

    config = tiny_config("qwen3_moe")
    # The full scale search is slow on a CPU: one layer, one expert.
    config.num_experts, config.num_experts_per_tok, config.num_hidden_layers = 1, 1, 1
    model = AutoModelForCausalLM.from_config(config)
    expected = {n: GSQFusedMoE.from_experts(m) for n, m in find_experts(model)}
    replace_experts(model)
    got = dict(model.named_modules())
    for name, m in expected.items():
        for pname, p in m.named_parameters():
            assert torch.equal(getattr(got[name], pname), p), (name, pname)


def test_replace_experts_is_idempotent():
    model = tiny_model("qwen3_moe")
    replace_experts(model, quantized=_rtn_quick(model))
    before = {n: m for n, m in model.named_modules() if isinstance(m, GSQFusedMoE)}
    assert replace_experts(model) is model
    after = {n: m for n, m in model.named_modules() if isinstance(m, GSQFusedMoE)}
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)


def test_quantized_mapping_replaces_only_the_named_modules():
    model = tiny_model("qwen3_moe")
    first = find_experts(model)[0][0]
    replace_experts(model, quantized={first: GSQFusedMoE.from_experts(model.get_submodule(first), grid=2)})
    assert [n for n, m in model.named_modules() if isinstance(m, GSQFusedMoE)] == [first]
    assert len(find_experts(model)) == 1  # the other layer keeps its BF16 experts


def test_quantized_mapping_rejects_bad_entries():
    model = tiny_model("qwen3_moe")
    name, experts = find_experts(model)[0]
    with pytest.raises(ValueError, match="no routed-experts module"):
        replace_experts(model, quantized={"model.layers.0.mlp.gate": GSQFusedMoE(8, 256, 128)})
    with pytest.raises(ValueError, match="experts, hidden, intermediate"):
        replace_experts(model, quantized={name: GSQFusedMoE(4, 256, 128)})
    with pytest.raises(TypeError, match="GSQFusedMoE"):
        replace_experts(model, quantized={name: experts})
    with pytest.raises(ValueError, match="at most one"):
        replace_experts(model, quantized={}, checkpoint="x")


def test_unsupported_model_error_lists_supported_architectures():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=64))
    with pytest.raises(ValueError, match="llama") as err:
        replace_experts(model)
    for name in ("Qwen3.5/3.6-MoE", "Qwen3-MoE", "Qwen2-MoE", "Mixtral", "OLMoE", "DeepSeek-V3"):
        assert name in str(err.value)
    assert supported_architectures() in str(err.value)


def test_replaced_model_carries_humming_quantization_config():
    model = tiny_model("qwen3_moe")
    replace_experts(model, quantized=_rtn_quick(model))
    qc = model.config.quantization_config.to_dict()
    assert qc["quant_method"] == "humming" and qc["b_dtype"] == "uint2" and qc["weight_scale_group_size"] == 128
    assert model.is_quantized and model.hf_quantizer.is_serializable()


def test_ignore_list_covers_every_bf16_linear():
    from gsq_torch import format

    model = tiny_model("deepseek_v3")  # layer 0 is a dense MLP: not in the published defaults
    replace_experts(model, quantized=_rtn_quick(model))
    ignore = humming_ignore(model)
    assert ignore[: len(format.DEFAULT_IGNORE)] == format.DEFAULT_IGNORE
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            assert format.is_ignored(name, ignore), name
    for name, module in model.named_modules():
        if isinstance(module, GSQFusedMoE):
            assert not format.is_ignored(name, ignore), name
    assert "re:(.*\\.)?layers\\.0\\.mlp\\.gate_proj$" in ignore


def test_ignore_list_keeps_bf16_experts_listed():
    from gsq_torch import format

    model = tiny_model("qwen3_moe")
    first = find_experts(model)[0][0]
    replace_experts(model, quantized={first: GSQFusedMoE.from_experts(model.get_submodule(first), grid=2)})
    ignore = humming_ignore(model)
    bf16 = find_experts(model)[0][0]
    assert format.is_ignored(bf16, ignore) and format.is_ignored(bf16 + ".3.gate_proj", ignore)
    assert not format.is_ignored(first, ignore)


def test_compiled_forward_has_no_graph_break_in_moe_block():
    model = tiny_model("qwen3_5_moe")
    replace_experts(model, quantized=_rtn_quick(model))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(torch.randint(0, 512, (1, 8)))
    for reason in explanation.break_reasons:
        frames = [f"{f.filename}:{f.name}" for f in reason.user_stack]
        assert not any("gsq_torch" in f or "SparseMoeBlock" in f or "Experts" in f for f in frames), (
            reason.reason, frames)
    block = model.model.layers[0].mlp
    compiled = torch.compile(block, fullgraph=True, backend="eager")  # raises on any graph break
    x = torch.randn(1, 5, 256)
    torch.testing.assert_close(compiled(x), block(x))
