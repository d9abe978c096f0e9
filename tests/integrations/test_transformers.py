"""from_pretrained of Humming checkpoints through the registered quantizer; config; device maps."""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import gsq_torch  # noqa: F401  (registers the quantizer)
from gsq_torch import GSQFusedMoE, format
from gsq_torch.integrations.transformers import HummingConfig, HummingHfQuantizer
from gsq_torch.testing import write_tiny_humming_checkpoint

CARD = format.quantization_config_dict()


@pytest.fixture(scope="module")
def humming(tmp_path_factory):
    path = tmp_path_factory.mktemp("humming")
    return path, write_tiny_humming_checkpoint(path)


def _logits(model, ids):
    with torch.no_grad():
        return model.to(torch.float32)(input_ids=ids).logits


# --- config and registration -------------------------------------------------------------------


def test_humming_is_registered_with_transformers():
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    assert AUTO_QUANTIZATION_CONFIG_MAPPING["humming"] is HummingConfig
    assert AUTO_QUANTIZER_MAPPING["humming"] is HummingHfQuantizer


def test_config_round_trips_the_card_unchanged():
    assert HummingConfig.from_dict(CARD).to_dict() == CARD
    assert dict(HummingConfig.from_dict(CARD)) == CARD


def test_config_accepts_vllm_aliases_and_writes_card_keys():
    aliases = {"quant_method": "humming", "weight_dtype": "uint2", "group_size": 128, "scale_type": "group",
               "ignore": ["lm_head"]}
    assert HummingConfig.from_dict(aliases).to_dict() == format.quantization_config_dict(["lm_head"])
    assert HummingConfig.from_dict({"quant_method": "humming", "dtype": "uint2"}).to_dict() == CARD


def test_config_keeps_unknown_keys():
    assert HummingConfig.from_dict({**CARD, "produced_by": "gsq"}).to_dict() == {**CARD, "produced_by": "gsq"}


@pytest.mark.parametrize(
    "change, message",
    [({"b_dtype": "uint4"}, "b_dtype is 'uint4'"), ({"weight_dtype": "uint3"}, "b_dtype is 'uint3'"),
     ({"weight_scale_group_size": 64}, "group_size is 64"), ({"group_size": 32}, "group_size is 32"),
     ({"has_zero_point": True}, "has_zero_point is true"), ({"weight_scale_type": "channel"}, "scale_type is 'channel'")],
)
def test_config_rejects_what_the_format_is_not(change, message):
    config = {k: v for k, v in CARD.items() if k not in ("b_dtype", "weight_scale_group_size") or k not in change}
    config.update(change)
    if "weight_dtype" in change:
        del config["b_dtype"]
    if "group_size" in change:
        del config["weight_scale_group_size"]
    with pytest.raises(ValueError, match=message):
        HummingConfig.from_dict(config)


def test_quantizer_capabilities():
    q = HummingHfQuantizer(HummingConfig(), pre_quantized=True)
    assert q.is_serializable() and q.is_trainable and q.is_compileable
    with pytest.raises(ValueError, match="pre-quantized"):
        HummingHfQuantizer(HummingConfig(), pre_quantized=False)


# --- from_pretrained ---------------------------------------------------------------------------


class _FloatExpertsWatch(TorchDispatchMode):
    """Records every real (non-meta) floating tensor an op produces with a stacked-experts shape
    ``[E, out, in]``: what merging BF16 per-expert tensors (a BF16 copy of the experts) would make."""

    def __init__(self, num_experts, shapes):
        super().__init__()
        self.num_experts, self.shapes, self.seen = num_experts, shapes, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            real = isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type != "meta"
            if real and t.dim() == 3 and t.shape[0] == self.num_experts and tuple(t.shape[1:]) in self.shapes:
                self.seen.append((func, tuple(t.shape)))
        return out


@pytest.mark.parametrize("auto_class", ["AutoModelForCausalLM", "AutoModelForImageTextToText"])
def test_from_pretrained_loads_packed_experts_without_a_bf16_copy(humming, monkeypatch, auto_class):
    import transformers

    monkeypatch.setenv("HF_DEACTIVATE_ASYNC_LOAD", "1")  # load in this thread, where the watch sees it
    path = humming[0]
    watch = _FloatExpertsWatch(16, {(256, 256), (128, 256), (256, 128)})  # [E, 2I, H], [E, I, H], [E, H, I]
    with watch:
        model, info = getattr(transformers, auto_class).from_pretrained(path, output_loading_info=True)
    assert watch.seen == []
    assert not info["missing_keys"] and not info["mismatched_keys"]
    experts = [m for m in model.modules() if isinstance(m, GSQFusedMoE)]
    assert len(experts) == 4
    assert all(m.gate_up_proj.dtype == torch.int32 and m.down_proj_scale.dtype == torch.bfloat16 for m in experts)
    assert not any(p.requires_grad for m in experts for p in m.parameters())
    assert model.hf_quantizer.quantization_config.to_dict() == CARD


@pytest.mark.parametrize("auto_class", ["AutoModelForCausalLM", "AutoModelForImageTextToText"])
def test_from_pretrained_logits_match_reference(humming, auto_class):
    import transformers

    path, ref = humming
    model = getattr(transformers, auto_class).from_pretrained(path)
    ids = torch.randint(0, 512, (1, 10))
    torch.testing.assert_close(_logits(model, ids), _logits(copy.deepcopy(ref), ids), atol=1e-4, rtol=1e-4)


def test_text_only_load_skips_vision_and_mtp(humming):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(humming[0], output_loading_info=True)
    names = [n for n, _ in model.named_parameters()]
    assert not any("visual" in n or n.startswith("mtp") for n in names)
    assert not info["unexpected_keys"] or all("visual" in k or k.startswith("mtp") for k in info["unexpected_keys"])


def test_loaded_model_generates_like_reference(humming):
    from transformers import AutoModelForCausalLM

    path, ref = humming
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ref = copy.deepcopy(ref).to(torch.float32)
    ids = torch.randint(0, 512, (1, 5))
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(model.generate(ids, **kwargs), ref.generate(input_ids=ids, **kwargs))


def test_ignore_list_naming_every_experts_module_is_an_error(humming, tmp_path):
    import json
    import shutil

    from transformers import AutoModelForCausalLM

    path = tmp_path / "ckpt"
    shutil.copytree(humming[0], path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["ignore"] = CARD["ignore"] + ["re:.*experts.*"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="leaves no routed-experts module"):
        AutoModelForCausalLM.from_pretrained(path)


# --- device maps (what a CPU allows; several GPUs below) ----------------------------------------


@pytest.mark.parametrize("device_map", ["auto", "cpu-dict", "disk-offload"])
def test_device_map_loading(humming, device_map, tmp_path):
    from transformers import AutoModelForCausalLM

    path = humming[0]
    kwargs = {}
    if device_map == "cpu-dict":
        kwargs["device_map"] = {"": "cpu"}
    elif device_map == "disk-offload":
        kwargs["device_map"] = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                                "model.layers.2": "cpu", "model.layers.3": "disk", "model.norm": "cpu",
                                "model.rotary_emb": "cpu", "lm_head": "cpu"}
        kwargs["offload_folder"] = str(tmp_path / "offload")
    else:
        kwargs["device_map"] = "auto"
    expected = AutoModelForCausalLM.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if device_map == "disk-offload":
        assert model.model.layers[1].mlp.experts.gate_up_proj.device.type == "meta"  # on disk until used
    ids = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected(ids).logits, rtol=0, atol=0)
    out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 11)
    if device_map == "disk-offload":  # saving reads the offloaded experts back: same bits as the source
        from gsq_torch.checkpoint import SafetensorsIndex

        model.save_pretrained(tmp_path / "saved")
        saved, source = SafetensorsIndex.from_dir(tmp_path / "saved"), SafetensorsIndex.from_dir(path)
        assert any(".experts." in k for k in saved)
        assert all(torch.equal(saved.load(k), source.load(k)) for k in saved)


@pytest.mark.cuda
@pytest.mark.parametrize("placement", ["explicit", "auto"])
def test_model_spread_over_gpus_matches_one_gpu(humming, placement):
    from transformers import AutoModelForCausalLM

    n = torch.cuda.device_count()
    if n < 2:
        pytest.skip("needs two or more GPUs")
    path = humming[0]
    # fp32: in bf16 the split model's logits differ in the last bits, and a near-tie flips a greedy token.
    one = AutoModelForCausalLM.from_pretrained(path, device_map={"": 0}, dtype=torch.float32)
    if placement == "explicit":  # layers 0-1 on the first GPU, 2-3 on the last, the rest split too
        device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 0, "model.layers.2": n - 1,
                      "model.layers.3": n - 1, "model.norm": n - 1, "model.rotary_emb": n - 1, "lm_head": n - 1}
        many = AutoModelForCausalLM.from_pretrained(path, device_map=device_map, dtype=torch.float32)
        devices = {str(m.gate_up_proj.device) for m in many.modules() if isinstance(m, GSQFusedMoE)}
        assert devices == {"cuda:0", f"cuda:{n - 1}"}
    else:
        budget = sum(p.numel() * p.element_size() for p in one.parameters()) // n + (1 << 20)
        many = AutoModelForCausalLM.from_pretrained(path, device_map="auto", max_memory={i: budget for i in range(n)},
                                                    dtype=torch.float32)
        assert len({d for d in many.hf_device_map.values()}) >= 2, many.hf_device_map
    ids = torch.randint(0, 512, (2, 16), device="cuda:0")
    with torch.no_grad():
        torch.testing.assert_close(many(ids).logits.to("cuda:0"), one(ids).logits, rtol=1e-4, atol=1e-4)
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(many.generate(ids, **kwargs).to("cuda:0"), one.generate(ids, **kwargs))


@pytest.mark.cuda
def test_static_cache_generate_compiles_and_matches_eager_on_gpu(humming):
    from transformers import AutoModelForCausalLM

    # fp32: in bf16 two correct implementations may flip a top-k routing choice or a greedy token.
    model = AutoModelForCausalLM.from_pretrained(humming[0], device_map={"": 0}, dtype=torch.float32)
    ids = torch.randint(0, 512, (1, 8), device="cuda")
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0, "output_scores": True,
              "return_dict_in_generate": True}
    eager = model.generate(ids, **kwargs)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = model.generate(ids, cache_implementation="static", **kwargs)
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    torch.testing.assert_close(torch.stack(compiled.scores), torch.stack(eager.scores), rtol=1e-2, atol=1e-2)
    assert torch.equal(compiled.sequences, eager.sequences)
