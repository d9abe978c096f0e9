"""Humming checkpoints: the fixture's layout, replace_experts(checkpoint=), saving, conversion, bad input."""

import copy
import filecmp
import json
import os
import shutil

import pytest
import torch

from gsq_torch import GSQFusedMoE, convert_checkpoint, format, replace_experts
from gsq_torch.checkpoint import (
    INDEX_NAME,
    SafetensorsIndex,
    read_quantization_config,
    read_safetensors_header,
)
from gsq_torch.cli import main as cli_main
from gsq_torch.nn.replace import find_experts
from gsq_torch.testing import (
    FAMILIES,
    compressed_tensors_from_humming,
    tiny_model,
    write_tiny_humming_checkpoint,
)

EXPERT = "model.language_model.layers.2.mlp.experts.3.up_proj"


@pytest.fixture(scope="module")
def humming(tmp_path_factory):
    """(path, reference model) of the published-layout fixture (conditional-generation keys)."""
    path = tmp_path_factory.mktemp("humming")
    return path, write_tiny_humming_checkpoint(path)


def _copy(src, tmp_path, name="ckpt"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _logits(model, ids):
    with torch.no_grad():
        return model.to(torch.float32)(input_ids=ids).logits


def _dirs_identical(a, b):
    names = sorted(os.listdir(a))
    return names == sorted(os.listdir(b)) and all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


# --- the fixture -------------------------------------------------------------------------------


def test_fixture_has_the_published_layout(humming):
    path = humming[0]
    index = SafetensorsIndex.from_dir(path)
    keys = index.keys()
    assert (path / INDEX_NAME).exists() and len(index.files) > 1
    assert any(k.startswith("model.visual.") for k in keys) and any(k.startswith("mtp.") for k in keys)
    assert not any(k.startswith("model.layers.") for k in keys)
    for layer in range(4):
        for e in range(16):
            for proj, shape in (("gate_proj", (128, 256)), ("up_proj", (128, 256)), ("down_proj", (256, 128))):
                key = f"model.language_model.layers.{layer}.mlp.experts.{e}.{proj}"
                assert index.entries[key + ".weight"] == ("I32", (shape[0], shape[1] // 16))
                assert index.entries[key + ".weight_scale"] == ("BF16", (shape[0], shape[1] // 128))
    assert index.dtype_name("model.language_model.layers.0.mlp.gate.weight") == "BF16"
    assert index.dtype_name("model.language_model.layers.0.mlp.shared_expert.up_proj.weight") == "BF16"
    assert bool((index.load(EXPERT + ".weight_scale") < 0).any())
    config = json.loads((path / "config.json").read_text())
    assert config["quantization_config"] == format.quantization_config_dict()
    assert config["architectures"] == ["Qwen3_5MoeForConditionalGeneration"]


# --- safetensors headers -----------------------------------------------------------------------


def test_header_reader_names_truncated_file(humming, tmp_path):
    path = _copy(humming[0], tmp_path)
    file = SafetensorsIndex.from_dir(path).file(EXPERT + ".weight")
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(ValueError, match=f"{file.name} is truncated"):
        read_safetensors_header(file)


@pytest.mark.parametrize("content", [b"", b"\x01\x02", b"\xff" * 64, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!!!!!}"])
def test_header_reader_rejects_non_safetensors(tmp_path, content):
    file = tmp_path / "model.safetensors"
    file.write_bytes(content)
    with pytest.raises(ValueError, match="model.safetensors"):
        read_safetensors_header(file)


def test_index_naming_the_wrong_file_is_an_error(humming, tmp_path):
    path = _copy(humming[0], tmp_path)
    index = json.loads((path / INDEX_NAME).read_text())
    other = next(f for f in set(index["weight_map"].values()) if f != index["weight_map"][EXPERT + ".weight"])
    index["weight_map"][EXPERT + ".weight"] = other
    (path / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"{EXPERT}.weight.*{other}"):
        SafetensorsIndex.from_dir(path)


# --- replace_experts(checkpoint=) ----------------------------------------------------------------


def test_replace_experts_from_checkpoint_reproduces_reference(humming):
    path, ref = humming
    model = copy.deepcopy(ref)  # the same non-expert weights; its experts get replaced from disk
    replace_experts(model, checkpoint=path)
    assert len([m for m in model.modules() if isinstance(m, GSQFusedMoE)]) == 4
    index = SafetensorsIndex.from_dir(path)
    experts = model.model.language_model.layers[2].mlp.experts
    assert torch.equal(experts.gate_up_proj[3, 128:], index.load(EXPERT + ".weight"))
    assert torch.equal(experts.gate_up_proj_scale[3, 128:], index.load(EXPERT + ".weight_scale"))
    ids = torch.randint(0, 512, (1, 10))
    torch.testing.assert_close(_logits(model, ids), _logits(copy.deepcopy(ref), ids), atol=1e-4, rtol=1e-4)


def test_replace_experts_from_checkpoint_into_text_only_model(humming):
    from transformers import Qwen3_5MoeForCausalLM

    path, ref = humming
    model = Qwen3_5MoeForCausalLM(ref.config.get_text_config())
    model.model.load_state_dict(ref.model.language_model.state_dict())
    model.lm_head.load_state_dict(ref.lm_head.state_dict())
    replace_experts(model, checkpoint=path)  # model.layers.* finds model.language_model.layers.* on disk
    ids = torch.randint(0, 512, (1, 10))
    torch.testing.assert_close(_logits(model, ids), _logits(copy.deepcopy(ref), ids), atol=1e-4, rtol=1e-4)


def test_replace_experts_needs_a_local_checkpoint_directory(tmp_path):
    model = tiny_model("qwen3_moe")
    with pytest.raises(FileNotFoundError, match="not a local directory"):
        replace_experts(model, checkpoint=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json"):
        replace_experts(model, checkpoint=tmp_path)


def _break_missing(path):
    index = SafetensorsIndex.from_dir(path)
    file = index.file(EXPERT + ".weight")
    tensors = {k: index.load(k) for k in index if index.file(k) == file and k != EXPERT + ".weight"}
    from safetensors.torch import save_file

    save_file(tensors, str(file), metadata={"format": "pt"})
    weight_map = json.loads((path / INDEX_NAME).read_text())
    del weight_map["weight_map"][EXPERT + ".weight"]
    (path / INDEX_NAME).write_text(json.dumps(weight_map))


def _rewrite_tensor(key, fn):
    def apply(path):
        index = SafetensorsIndex.from_dir(path)
        file = index.file(key)
        tensors = {k: index.load(k) for k in index if index.file(k) == file}
        tensors[key] = fn(tensors[key])
        from safetensors.torch import save_file

        save_file(tensors, str(file), metadata={"format": "pt"})

    return apply


def _truncate(path):
    file = SafetensorsIndex.from_dir(path).file(EXPERT + ".weight")
    file.write_bytes(file.read_bytes()[:-100])


def _corrupt_header(path):
    file = SafetensorsIndex.from_dir(path).file(EXPERT + ".weight")
    data = bytearray(file.read_bytes())
    data[10:20] = b"\xff" * 10
    file.write_bytes(bytes(data))


def _set_config(key, value):
    def apply(path):
        config = json.loads((path / "config.json").read_text())
        config["quantization_config"][key] = value
        (path / "config.json").write_text(json.dumps(config))

    return apply


BAD_INPUTS = {
    "missing expert tensor": (_break_missing, f"missing tensor '{EXPERT}.weight'.*int32 \\[128, 16\\]"),
    "wrong shape": (_rewrite_tensor(EXPERT + ".weight", lambda t: t[:, :8].contiguous()),
                    f"{EXPERT}.weight.*I32 \\[128, 8\\]; expected int32 \\[128, 16\\]"),
    "wrong scale dtype": (_rewrite_tensor(EXPERT + ".weight_scale", lambda t: t.float()),
                          f"{EXPERT}.weight_scale.*F32.*expected bf16"),
    "bf16 expert not in ignore": (_rewrite_tensor(EXPERT + ".weight", lambda t: torch.zeros(128, 256, dtype=torch.bfloat16)),
                                  "BF16 \\[128, 256\\].*must be listed in quantization_config.ignore"),
    "unknown b_dtype": (_set_config("b_dtype", "uint4"), "b_dtype is 'uint4'; only 'uint2'"),
    "group size 64": (_set_config("weight_scale_group_size", 64), "group_size is 64; only 128"),
    "truncated shard": (_truncate, "is truncated: tensor"),
    "corrupt header": (_corrupt_header, "corrupt safetensors header"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_checkpoint_is_rejected_by_replace_experts_before_any_replacement(humming, tmp_path, case):
    breaker, message = BAD_INPUTS[case]
    path = _copy(humming[0], tmp_path)
    breaker(path)
    model = copy.deepcopy(humming[1])
    with pytest.raises(ValueError, match=message):
        replace_experts(model, checkpoint=path)
    assert not any(isinstance(m, GSQFusedMoE) for m in model.modules())  # never half-replaced


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_checkpoint_is_rejected_by_from_pretrained(humming, tmp_path, case):
    from transformers import AutoModelForCausalLM

    breaker, message = BAD_INPUTS[case]
    path = _copy(humming[0], tmp_path)
    breaker(path)
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(path)


def test_checkpoint_quantizing_a_non_expert_module_is_rejected(humming, tmp_path):
    from transformers import AutoModelForCausalLM

    path = _copy(humming[0], tmp_path)
    key = "model.language_model.layers.0.mlp.shared_expert.up_proj.weight"
    _rewrite_tensor(key, lambda t: t)(path)  # keep, then add a scale next to it
    index = SafetensorsIndex.from_dir(path)
    file = index.file(key)
    tensors = {k: index.load(k) for k in index if index.file(k) == file}
    tensors[key.replace(".weight", ".weight_scale")] = torch.ones(128, 2, dtype=torch.bfloat16)
    from safetensors.torch import save_file

    save_file(tensors, str(file), metadata={"format": "pt"})
    weight_map = json.loads((path / INDEX_NAME).read_text())
    weight_map["weight_map"][key.replace(".weight", ".weight_scale")] = file.name
    (path / INDEX_NAME).write_text(json.dumps(weight_map))
    with pytest.raises(ValueError, match="shared_expert.up_proj.*stored quantized"):
        AutoModelForCausalLM.from_pretrained(path)


def test_read_quantization_config_accepts_vllm_aliases(humming, tmp_path):
    path = _copy(humming[0], tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "humming", "weight_dtype": "uint2", "group_size": 128,
                                     "scale_type": "group", "ignore": ["lm_head"]}
    (path / "config.json").write_text(json.dumps(config))
    assert read_quantization_config(path) == format.quantization_config_dict(["lm_head"])


# --- saving ------------------------------------------------------------------------------------


@pytest.mark.parametrize("auto_class", ["AutoModelForCausalLM", "AutoModelForImageTextToText"])
def test_save_load_save_is_bit_identical(humming, tmp_path, auto_class):
    import transformers

    cls = getattr(transformers, auto_class)
    path = humming[0]
    model = cls.from_pretrained(path)
    model.save_pretrained(tmp_path / "a", max_shard_size="300KB")
    cls.from_pretrained(tmp_path / "a").save_pretrained(tmp_path / "b", max_shard_size="300KB")
    assert _dirs_identical(tmp_path / "a", tmp_path / "b")
    saved, source = SafetensorsIndex.from_dir(tmp_path / "a"), SafetensorsIndex.from_dir(path)
    assert (tmp_path / "a" / INDEX_NAME).exists() and len(saved.files) > 1
    for key in saved:  # same names (model.language_model...), same bits as the published layout
        assert torch.equal(saved.load(key), source.load(key)), key
    missing = {k.split(".")[0] + "." + k.split(".")[1] for k in source if k not in saved}
    assert missing <= {"mtp.fc", "mtp.norm", "mtp.layers", "mtp.pre_fc_norm_embedding", "mtp.pre_fc_norm_hidden",
                       "model.visual"}
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    qc = config.get("quantization_config") or config["text_config"]["quantization_config"]
    assert qc == format.quantization_config_dict()


@pytest.mark.parametrize("family", FAMILIES)
def test_replaced_model_saves_per_expert_keys_and_reloads(tmp_path, family):
    from transformers import AutoModelForCausalLM

    model = tiny_model(family)
    replace_experts(model, quantized={n: GSQFusedMoE.from_experts(m, grid=2) for n, m in find_experts(model)})
    model.save_pretrained(tmp_path / "a")
    keys = SafetensorsIndex.from_dir(tmp_path / "a").keys()
    gate, down = ("w1", "w2") if family == "mixtral" else ("gate_proj", "down_proj")
    prefix = "block_sparse_moe" if family == "mixtral" else "mlp"
    layer = 1 if family == "deepseek_v3" else 0  # DeepSeek's first layer is dense
    base = f"model.layers.{layer}.{prefix}.experts.7"
    for key in (f"{base}.{gate}.weight", f"{base}.{gate}.weight_scale", f"{base}.{down}.weight_scale"):
        assert key in keys
    assert not any(k.endswith(("gate_up_proj", "gate_up_proj_scale", "down_proj_scale")) for k in keys)

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a", dtype=torch.float32)
    ids = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    loaded.save_pretrained(tmp_path / "b")
    AutoModelForCausalLM.from_pretrained(tmp_path / "b").save_pretrained(tmp_path / "c")
    assert _dirs_identical(tmp_path / "b", tmp_path / "c")
    a, b = SafetensorsIndex.from_dir(tmp_path / "a"), SafetensorsIndex.from_dir(tmp_path / "b")
    for key in (k for k in keys if ".experts." in k):
        assert torch.equal(a.load(key), b.load(key)), key


def test_ignored_experts_load_and_save_as_bf16(tmp_path):
    from transformers import AutoModelForCausalLM

    ignore = format.DEFAULT_IGNORE + ["re:.*layers\\.0\\.mlp\\.experts.*"]
    ref = write_tiny_humming_checkpoint(tmp_path / "src", conditional=False, ignore=ignore, with_mtp=False)
    index = SafetensorsIndex.from_dir(tmp_path / "src")
    assert index.dtype_name("model.layers.0.mlp.experts.0.gate_proj.weight") == "BF16"
    assert "model.layers.0.mlp.experts.0.gate_proj.weight_scale" not in index
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "src")
    layers = model.model.layers
    assert not isinstance(layers[0].mlp.experts, GSQFusedMoE)
    assert all(isinstance(layers[i].mlp.experts, GSQFusedMoE) for i in (1, 2, 3))
    assert torch.equal(layers[0].mlp.experts.down_proj, ref.model.layers[0].mlp.experts.down_proj)
    model.save_pretrained(tmp_path / "out")
    ids = torch.randint(0, 512, (1, 10))
    torch.testing.assert_close(_logits(model, ids), _logits(ref, ids), atol=1e-4, rtol=1e-4)
    saved = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert saved["ignore"] == ignore
    out = SafetensorsIndex.from_dir(tmp_path / "out")
    assert out.dtype_name("model.layers.0.mlp.experts.5.up_proj.weight") == "BF16"
    assert out.dtype_name("model.layers.1.mlp.experts.5.up_proj.weight") == "I32"


# --- conversion --------------------------------------------------------------------------------


@pytest.mark.parametrize("container_bits", [2, 4])
def test_convert_compressed_tensors_gives_the_humming_checkpoint(humming, tmp_path, container_bits):
    src = compressed_tensors_from_humming(humming[0], tmp_path / "ct", container_bits=container_bits)
    ct = SafetensorsIndex.from_dir(src)
    assert ct.shape(EXPERT + ".weight_packed") == (128, 256 // (16 if container_bits == 2 else 8))
    out = convert_checkpoint(src, tmp_path / "humming", progress=False)
    original, converted = SafetensorsIndex.from_dir(humming[0]), SafetensorsIndex.from_dir(out)
    assert sorted(converted.keys()) == sorted(original.keys())
    for key in original:
        assert torch.equal(converted.load(key), original.load(key)), key
    assert sorted(f.name for f in converted.files) == sorted(f.name for f in original.files)  # shard by shard
    assert read_quantization_config(out) == format.quantization_config_dict()


def test_cli_convert(humming, tmp_path, capsys):
    src = compressed_tensors_from_humming(humming[0], tmp_path / "ct")
    assert cli_main(["convert", str(src), str(tmp_path / "out"), "--no-progress"]) == 0
    assert "wrote Humming checkpoint" in capsys.readouterr().out
    assert SafetensorsIndex.from_dir(tmp_path / "out").dtype_name(EXPERT + ".weight") == "I32"
    assert cli_main(["convert", str(tmp_path / "out"), str(tmp_path / "again"), "--no-progress"]) == 2
    assert "already in the Humming format" in capsys.readouterr().err


@pytest.mark.parametrize(
    "change, message",
    [
        ({"group_size": 64}, "group_size=64 \\(expected 128\\)"),
        ({"num_bits": 3}, "num_bits=3"),
        ({"symmetric": False}, "symmetric=false"),
    ],
)
def test_convert_rejects_configs_it_cannot_represent(humming, tmp_path, change, message):
    src = compressed_tensors_from_humming(humming[0], tmp_path / "ct")
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"].update(change)
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        convert_checkpoint(src, tmp_path / "out", progress=False)


def test_convert_rejects_4bit_container_with_values_outside_2bit_range(humming, tmp_path):
    src = compressed_tensors_from_humming(humming[0], tmp_path / "ct", container_bits=4)
    _rewrite_tensor(EXPERT + ".weight_packed", lambda t: torch.full_like(t, 0x0F0F0F0F))(src)
    with pytest.raises(ValueError, match=f"{EXPERT}.weight_packed.*outside the 2-bit range"):
        convert_checkpoint(src, tmp_path / "out", progress=False)
