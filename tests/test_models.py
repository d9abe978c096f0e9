"""The shipped tiny MoE model and texts: present in the package, loadable, and scoring what eval.json says."""

import json

import pytest
import torch

from gsq_torch import models
from gsq_torch.format import GROUP_SIZE

EOT = "<|endoftext|>"


@pytest.fixture(scope="module")
def tiny_fp32():
    return models.load_tiny_moe(dtype=torch.float32)


def test_tiny_moe_dir_has_weights_tokenizer_and_metrics():
    path = models.tiny_moe_path()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "eval.json",
                 "TRAINING.md", "loss.csv"):
        assert (path / name).is_file(), name
    assert (path / "model.safetensors").stat().st_size <= 20_000_000


def test_tiny_moe_config_is_hybrid_moe_with_group_aligned_expert_dims():
    config = json.loads((models.tiny_moe_path() / "config.json").read_text())
    assert config["model_type"] == "qwen3_5_moe_text"
    assert config["architectures"] == ["Qwen3_5MoeForCausalLM"]
    assert set(config["layer_types"]) == {"linear_attention", "full_attention"}
    assert 16 <= config["num_experts"] <= 32 and 2 <= config["num_experts_per_tok"] <= 4
    assert config["shared_expert_intermediate_size"] > 0
    # gate/up read the hidden size, down reads the expert intermediate size: both whole scale groups
    assert config["hidden_size"] % GROUP_SIZE == 0
    assert config["moe_intermediate_size"] % GROUP_SIZE == 0


def test_tiny_moe_loads_with_expected_parameter_count(tiny_fp32):
    model, tokenizer = tiny_fp32
    assert type(model).__name__ == "Qwen3_5MoeForCausalLM"
    n = sum(p.numel() for p in model.parameters())
    assert 5e6 <= n <= 20e6
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.shape == (16, 2 * 128, 256)
    assert experts.down_proj.shape == (16, 256, 128)
    assert len(tokenizer) == model.config.vocab_size
    assert tokenizer.eos_token == EOT and tokenizer.convert_tokens_to_ids(EOT) == model.config.eos_token_id


def test_tiny_moe_heldout_perplexity_matches_eval_json(tiny_fp32):
    model, tokenizer = tiny_fp32
    recorded = models.tiny_moe_reference_metrics()["ppl_first_4096_float32"]
    ppl = models.heldout_perplexity(model, tokenizer, max_tokens=4096)
    assert ppl == pytest.approx(recorded, rel=2e-3)


def test_tiny_moe_bf16_perplexity_close_to_fp32():
    model, tokenizer = models.load_tiny_moe(dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    recorded = models.tiny_moe_reference_metrics()
    ppl = models.heldout_perplexity(model, tokenizer, max_tokens=4096)
    # bf16 activations and top-k routing flips move it a little; the fp32 test is the exact check
    assert ppl == pytest.approx(recorded["ppl_first_4096_float32"], rel=0.05)


def test_tiny_moe_greedy_generation_is_deterministic_text(tiny_fp32):
    model, tokenizer = tiny_fp32
    inputs = tokenizer("The for statement", return_tensors="pt")
    runs = [model.generate(**inputs, max_new_tokens=8, do_sample=False) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    assert runs[0].shape[1] > inputs["input_ids"].shape[1]
    assert tokenizer.decode(runs[0][0]).startswith("The for statement")


def test_eval_and_calibration_texts_are_disjoint_documents():
    eval_docs = [d.strip() for d in models.eval_text().split(EOT) if d.strip()]
    calib_docs = [d.strip() for d in models.calibration_text().split(EOT) if d.strip()]
    assert len(eval_docs) >= 10 and len(calib_docs) >= 20
    assert not set(eval_docs) & set(calib_docs)
    assert 100_000 <= len(models.eval_text().encode()) <= 300_000
    assert 200_000 <= len(models.calibration_text().encode()) <= 500_000


def test_heldout_perplexity_of_uniform_logits_is_vocab_size():
    class Uniform(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, use_cache=False):
            return type("Out", (), {"logits": torch.zeros(*input_ids.shape, 50)})()

    def tokenizer(text, add_special_tokens, verbose):
        return {"input_ids": [ord(c) % 50 for c in text]}

    assert models.heldout_perplexity(Uniform(), tokenizer, "x" * 1300, seq_len=512) == pytest.approx(50.0, rel=1e-5)


def test_heldout_perplexity_rejects_bad_arguments(tiny_fp32):
    model, tokenizer = tiny_fp32
    with pytest.raises(ValueError, match="seq_len"):
        models.heldout_perplexity(model, tokenizer, "some text", seq_len=1)
    with pytest.raises(ValueError, match="tokens"):
        models.heldout_perplexity(model, tokenizer, "a", seq_len=8)


def test_load_tiny_moe_rejects_non_float_dtype():
    with pytest.raises(TypeError, match="dtype"):
        models.load_tiny_moe(dtype=torch.int8)
    with pytest.raises(TypeError, match="dtype"):
        models.load_tiny_moe(dtype="bfloat16")
