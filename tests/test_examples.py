"""Every script in examples/ runs (shortened with --quick) so that none of them rots.

They run in-process (runpy), on a 2-layer Qwen3.5-MoE with 8 experts and the shipped tokenizer (the
shipped model itself takes longer to quantize than these tests should): quantize.py writes the
Humming checkpoint that the other examples load.
"""

import runpy
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


pytestmark = pytest.mark.usefixtures("one_thread")


def run_example(name, args, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / name), *map(str, args)])
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def small_bf16(tmp_path_factory):
    """A BF16 Qwen3.5-MoE checkpoint (linear + full attention, 8 experts, top-2), the shipped tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gsq_torch.models import tiny_moe_path
    from gsq_torch.testing import tiny_config

    config = tiny_config("qwen3_5_moe")
    config.num_hidden_layers, config.layer_types = 2, ["linear_attention", "full_attention"]
    config.num_experts, config.num_experts_per_tok, config.vocab_size = 8, 2, 8192
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("small_bf16")
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_moe_path()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def humming(small_bf16, tmp_path_factory):
    """quantize.py's output (RTN, --quick), and what it printed."""
    out = tmp_path_factory.mktemp("humming") / "ckpt"
    with pytest.MonkeyPatch.context() as mp:
        args = ["--model", small_bf16, "--out", out, "--method", "rtn", "--quick", "--device", "cpu"]
        mp.setattr(sys, "argv", ["quantize.py", *map(str, args)])
        runpy.run_path(str(EXAMPLES / "quantize.py"), run_name="__main__")
    return out


def test_examples_are_short_and_documented():
    scripts = sorted(EXAMPLES.glob("*.py"))
    assert {p.name for p in scripts} >= {
        "generate.py",
        "quantize.py",
        "finetune_scales.py",
        "finetune_lora.py",
        "evaluate.py",
    }
    for script in scripts:
        text = script.read_text()
        assert len(text.splitlines()) < 100, script.name
        assert text.startswith('"""') and "--quick" in text, script.name


def test_quantize_writes_a_humming_checkpoint(humming):
    import json

    config = json.loads((humming / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "humming"
    assert (humming / "tokenizer.json").exists()


def test_generate_eager_and_compiled_with_a_static_cache(humming, monkeypatch, capsys):
    out = run_example(
        "generate.py",
        ["--model", humming, "--quick", "--compile", "--compile-backend", "aot_eager", "--device", "cpu"],
        monkeypatch,
        capsys,
    )
    assert "2 layers of 2-bit experts" in out and "same tokens as eager: True" in out


def test_finetune_scales_saves_bf16_scales(humming, tmp_path, monkeypatch, capsys):
    from gsq_torch.checkpoint import SafetensorsIndex

    out = run_example(
        "finetune_scales.py",
        ["--model", humming, "--quick", "--out", tmp_path / "tuned", "--device", "cpu"],
        monkeypatch,
        capsys,
    )
    assert "training 4 scale tensors" in out and "held-out perplexity" in out and "first / last 5" in out
    index = SafetensorsIndex.from_dir(tmp_path / "tuned")
    scales = [k for k in index if k.endswith("weight_scale")]
    assert scales and {index.dtype_name(k) for k in scales} == {"BF16"}
    index.close()


def test_finetune_lora_round_trips_the_adapter(humming, tmp_path, monkeypatch, capsys):
    pytest.importorskip("peft")
    out = run_example(
        "finetune_lora.py",
        ["--model", humming, "--quick", "--out", tmp_path / "adapter", "--device", "cpu"],
        monkeypatch,
        capsys,
    )
    assert "same logits: True" in out and "held-out perplexity" in out
    assert (tmp_path / "adapter" / "adapter_config.json").exists()


def test_evaluate_compares_bf16_and_2bit(small_bf16, humming, monkeypatch, capsys):
    out = run_example(
        "evaluate.py",
        ["--bf16", small_bf16, "--quantized", humming, "--quick", "--seq-len", 128, "--device", "cpu"],
        monkeypatch,
        capsys,
    )
    assert "BF16" in out and "2-bit checkpoint" in out and "perplexity" in out
