"""Tiny models and checkpoints for tests: every supported MoE family, shrunk to run in seconds on a CPU.

``tiny_config(family)`` / ``tiny_model(family, seed)``: hidden 256, 8 to 16 experts, top-2, expert
intermediate 128, 2 to 4 layers, vocabulary 512 (every quantized input dimension a multiple of
128). ``write_tiny_humming_checkpoint(path)`` writes a checkpoint in exactly the published layout
(conditional-generation prefix ``model.language_model.``, ``model.visual.*`` and ``mtp.*`` tensors,
per-expert packed experts with some negative scales, sharded with an index, the card's
``quantization_config``), without going through gsq-torch's own saving code.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from . import format

FAMILIES = ("qwen3_5_moe", "qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3")

HIDDEN = 256
INTERMEDIATE = 128  # expert intermediate size
VOCAB = 512

_COMMON = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 256, "num_experts_per_tok": 2, "tie_word_embeddings": False}


def tiny_config(family: str, *, conditional: bool = False):
    """A shrunk transformers config of ``family`` (one of :data:`FAMILIES`).

    Args:
        family: ``"qwen3_5_moe"``, ``"qwen3_moe"``, ``"qwen2_moe"``, ``"mixtral"``, ``"olmoe"`` or ``"deepseek_v3"``.
        conditional: for ``qwen3_5_moe``, the vision-language ``Qwen3_5MoeConfig`` (with a tiny
            vision tower) instead of the text config.

    Raises:
        ValueError: an unknown family, or ``conditional`` for a family without a vision model.
    """
    import transformers as tf

    if conditional and family != "qwen3_5_moe":
        raise ValueError(f"conditional=True is only available for qwen3_5_moe, not {family!r}")
    if family == "qwen3_5_moe":
        text = tf.Qwen3_5MoeTextConfig(
            **_COMMON, num_hidden_layers=4, head_dim=64, linear_key_head_dim=64, linear_value_head_dim=64,
            linear_num_key_heads=2, linear_num_value_heads=4, moe_intermediate_size=INTERMEDIATE,
            shared_expert_intermediate_size=INTERMEDIATE, num_experts=16,
        )
        if not conditional:
            return text
        vision = {"depth": 1, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2,
                  "out_hidden_size": HIDDEN, "num_position_embeddings": 16, "patch_size": 16}
        return tf.Qwen3_5MoeConfig(text_config=text.to_dict(), vision_config=vision, tie_word_embeddings=False)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(**_COMMON, num_hidden_layers=2, head_dim=64, intermediate_size=256,
                                 moe_intermediate_size=INTERMEDIATE, num_experts=8, norm_topk_prob=True)
    if family == "qwen2_moe":
        return tf.Qwen2MoeConfig(**_COMMON, num_hidden_layers=2, intermediate_size=256,
                                 moe_intermediate_size=INTERMEDIATE, shared_expert_intermediate_size=INTERMEDIATE,
                                 num_experts=8)
    if family == "mixtral":
        return tf.MixtralConfig(**_COMMON, num_hidden_layers=2, head_dim=64, intermediate_size=INTERMEDIATE,
                                num_local_experts=8)
    if family == "olmoe":
        return tf.OlmoeConfig(**_COMMON, num_hidden_layers=2, intermediate_size=INTERMEDIATE, num_experts=8)
    if family == "deepseek_v3":
        return tf.DeepseekV3Config(
            **{**_COMMON, "num_key_value_heads": 4}, num_hidden_layers=3, intermediate_size=256, moe_intermediate_size=INTERMEDIATE,
            n_routed_experts=8, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
            q_lora_rank=None, kv_lora_rank=64, qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=32,
        )
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def tiny_model(family: str, seed: int = 0, *, conditional: bool = False, dtype: torch.dtype = torch.float32):
    """A randomly initialised tiny model of ``family`` (``...ForCausalLM``, or
    ``Qwen3_5MoeForConditionalGeneration`` with ``conditional``), in eval mode.

    The experts get N(0, 1) weights (transformers' default init is too small for 2-bit
    quantization to matter in tests), so quantization error is visible in the outputs.
    """
    import transformers as tf

    config = tiny_config(family, conditional=conditional)
    torch.manual_seed(seed)
    if conditional:
        model = tf.Qwen3_5MoeForConditionalGeneration(config)
    else:
        model = tf.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "gate_up_proj") and isinstance(module.gate_up_proj, torch.Tensor):
                module.gate_up_proj.normal_(0.0, HIDDEN ** -0.5)
                module.down_proj.normal_(0.0, INTERMEDIATE ** -0.5)
    return model.to(dtype).eval()


# --- the published layout, written independently of gsq-torch's saving --------------------------

_EXPERT_KEY = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<e>\d+)\.(?P<proj>\w+)\.weight$")


def _mtp_tensors(num_experts: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A few BF16 tensors named like Qwen3.5's multi-token-prediction head (skipped when loading)."""
    def rand(*shape):
        return torch.randn(*shape, generator=generator).to(torch.bfloat16)

    out = {
        "mtp.fc.weight": rand(HIDDEN, 2 * HIDDEN),
        "mtp.norm.weight": rand(HIDDEN),
        "mtp.pre_fc_norm_embedding.weight": rand(HIDDEN),
        "mtp.pre_fc_norm_hidden.weight": rand(HIDDEN),
        "mtp.layers.0.input_layernorm.weight": rand(HIDDEN),
        "mtp.layers.0.self_attn.q_proj.weight": rand(HIDDEN, HIDDEN),
        "mtp.layers.0.mlp.gate.weight": rand(num_experts, HIDDEN),
    }
    for e in range(num_experts):
        for proj, shape in (("gate_proj", (INTERMEDIATE, HIDDEN)), ("up_proj", (INTERMEDIATE, HIDDEN)),
                            ("down_proj", (HIDDEN, INTERMEDIATE))):
            out[f"mtp.layers.0.mlp.experts.{e}.{proj}.weight"] = rand(*shape)
    return out


def _quick_quantize(w: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest with scale ``+-2 max|w| / 3`` per group, random signs (no scale search: the
    fixture needs valid codes and some negative scales, fast; not the best scales)."""
    g = w.reshape(*w.shape[:-1], -1, format.GROUP_SIZE)
    sign = torch.randint(0, 2, g.shape[:-1], generator=generator).float() * 2 - 1
    scale = (g.abs().amax(-1) * (2.0 / 3.0) * sign).to(format.SCALE_DTYPE)
    return format.pack(format.quantize_codes(w, scale)), scale


def write_tiny_humming_checkpoint(
    path: str | os.PathLike,
    *,
    conditional: bool = True,
    seed: int = 0,
    ignore: list[str] | None = None,
    max_shard_size: int = 400_000,
    with_mtp: bool = True,
    quantization_config: dict[str, Any] | None = None,
):
    """Write a tiny Qwen3.5-MoE Humming checkpoint in the published layout; return its reference model.

    The BF16 tiny model is saved by transformers (that gives the per-expert BF16 keys, under
    ``model.language_model.`` with ``model.visual.*`` when ``conditional``); then every routed
    expert projection the ``ignore`` list does not name is replaced by round-to-nearest packed
    ``weight`` (int32) + ``weight_scale`` (bf16), ``mtp.*`` tensors are added, and the result is
    re-sharded with an index and the card's ``quantization_config`` in ``config.json``.

    Args:
        path: output directory (created).
        conditional: ``Qwen3_5MoeForConditionalGeneration`` layout (the published one) or the
            text-only ``Qwen3_5MoeForCausalLM`` layout (``model.layers...``).
        seed: for the model's random weights.
        ignore: the ``quantization_config.ignore`` list (default: the published list). An experts
            module it names stays BF16 in the checkpoint.
        max_shard_size: bytes per shard (small, so that even this tiny model is sharded).
        with_mtp: add ``mtp.*`` tensors.
        quantization_config: written instead of the card's (to test bad configs); ``ignore`` still
            decides what is quantized.

    Returns:
        The reference model: the BF16 tiny model whose quantized experts hold the dequantized
        weights (what a correct loader must reproduce), in bf16, eval mode.

    Raises:
        AssertionError: the RTN result has no negative scale (the fixture must contain some).
    """
    from huggingface_hub import split_torch_state_dict_into_shards

    path = Path(path)
    ignore = list(format.DEFAULT_IGNORE) if ignore is None else list(ignore)
    model = tiny_model("qwen3_5_moe", seed, conditional=conditional, dtype=torch.bfloat16)
    tmp = path / "_bf16"
    model.save_pretrained(tmp)
    index = ckpt.SafetensorsIndex.from_dir(tmp)
    tensors = {k: index.load(k) for k in index}
    index.close()

    out: dict[str, torch.Tensor] = {}
    stacks: dict[tuple[str, str], list[str]] = {}  # (experts prefix, projection) -> keys, by expert
    for key, t in tensors.items():
        m = _EXPERT_KEY.match(key)
        if m is None or format.is_ignored(m["prefix"], ignore) or format.is_ignored(key[: -len(".weight")], ignore):
            out[key] = t
        else:
            stacks.setdefault((m["prefix"], m["proj"]), []).append(key)
    negative = 0
    signs = torch.Generator().manual_seed(seed + 1)
    for keys in stacks.values():  # one layer's projection of all experts at once
        keys.sort(key=lambda k: int(_EXPERT_KEY.match(k)["e"]))
        weight, scale = _quick_quantize(torch.stack([tensors[k] for k in keys]).float(), signs)
        negative += int((scale < 0).sum())
        for key, w, s in zip(keys, weight, scale):
            out[key], out[key + "_scale"] = w.clone(), s.clone()
    assert negative > 0, "the fixture must contain negative scales"
    if with_mtp:
        out.update(_mtp_tensors(model.config.get_text_config().num_experts, torch.Generator().manual_seed(seed)))

    for f in tmp.iterdir():
        if f.suffix == ".safetensors" or f.name == ckpt.INDEX_NAME:
            f.unlink()
    split = split_torch_state_dict_into_shards(out, max_shard_size=max_shard_size)
    from safetensors.torch import save_file

    for filename, names in split.filename_to_tensors.items():
        save_file({n: out[n].contiguous() for n in names}, str(tmp / filename), metadata={"format": "pt"})
    if split.is_sharded:
        total = sum(t.numel() * t.element_size() for t in out.values())
        ckpt.write_index(tmp, split.tensor_to_filename, total)
    config = json.loads((tmp / ckpt.CONFIG_NAME).read_text())
    config["quantization_config"] = (
        quantization_config if quantization_config is not None else format.quantization_config_dict(ignore)
    )
    ckpt.write_config(tmp, config)
    path.mkdir(parents=True, exist_ok=True)
    for f in tmp.iterdir():
        f.replace(path / f.name)
    tmp.rmdir()

    # The reference: the same model with the dequantized experts.
    with torch.no_grad():
        deq = {k[: -len("_scale")]: format.dequantize(out[k[: -len("_scale")]], v, torch.float32)
               for k, v in out.items() if k.endswith(".weight_scale")}
        for name, module in model.named_modules():
            if not (hasattr(module, "gate_up_proj") and isinstance(module.gate_up_proj, torch.Tensor)):
                continue
            prefix = name  # transformers saved the experts under the module's own name
            if f"{prefix}.0.gate_proj.weight" not in deq:
                continue
            E = module.gate_up_proj.shape[0]
            gate = torch.stack([deq[f"{prefix}.{e}.gate_proj.weight"] for e in range(E)])
            up = torch.stack([deq[f"{prefix}.{e}.up_proj.weight"] for e in range(E)])
            down = torch.stack([deq[f"{prefix}.{e}.down_proj.weight"] for e in range(E)])
            module.gate_up_proj.copy_(torch.cat([gate, up], dim=1))
            module.down_proj.copy_(down)
    return model


def compressed_tensors_from_humming(src: str | os.PathLike, dst: str | os.PathLike, *, container_bits: int = 2) -> Path:
    """Rewrite a Humming checkpoint as compressed-tensors ``pack-quantized`` (for conversion tests).

    ``container_bits=2`` gives the native int2 layout (``weight_packed`` + ``weight_shape``);
    ``4`` gives GSQ's 4-bit container (8 codes per word, stored ``q + 8``).
    """
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    index = ckpt.SafetensorsIndex.from_dir(src)
    weight_map = {}
    by_file: dict[Path, list[str]] = {}
    for key in index:
        by_file.setdefault(index.file(key), []).append(key)
    total = 0
    for file, keys in by_file.items():
        shard = {}
        for key in keys:
            t = index.load(key)
            if key.endswith(".weight") and key + "_scale" in index:
                codes = format.unpack(t).to(torch.int32)  # [out, in], stored q + 2
                out_f, in_f = codes.shape
                if container_bits == 4:
                    nibbles = (codes - format.CODE_OFFSET + 8).reshape(out_f, -1, 8)
                    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
                    t = (nibbles << shifts).sum(-1, dtype=torch.int32)
                shard[key + "_packed"] = t
                shard[key + "_shape"] = torch.tensor([out_f, in_f], dtype=torch.int64)
            else:
                shard[key] = t
        save_file(shard, str(dst / file.name), metadata={"format": "pt"})
        for k, t in shard.items():
            weight_map[k] = file.name
            total += t.numel() * t.element_size()
    if (src / ckpt.INDEX_NAME).exists():
        ckpt.write_index(dst, weight_map, total)
    config = ckpt.read_config(src)
    humming = config.pop("quantization_config")
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": container_bits, "type": "int", "symmetric": True, "strategy": "group",
                        "group_size": format.GROUP_SIZE, "dynamic": False},
        }},
        "ignore": humming["ignore"],
    }
    ckpt.write_config(dst, config)
    return dst
