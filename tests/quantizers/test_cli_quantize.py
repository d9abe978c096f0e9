"""`gsq-torch quantize` on a tiny local model and a local calibration file; GPU runs of the quantizers."""

import json

import pytest
import torch

from gsq_torch.cli import main
from gsq_torch.nn import GSQFusedMoE
from gsq_torch.testing import tiny_model


def _char_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", " "] + [chr(c) for c in range(97, 123)])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", unk_token="<unk>")


@pytest.mark.slow
def test_cli_quantize_writes_a_checkpoint_that_loads(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    model_dir, out = tmp_path / "model", tmp_path / "out"
    tiny_model("qwen3_moe", seed=0).save_pretrained(model_dir)
    _char_tokenizer().save_pretrained(model_dir)
    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(json.dumps({"text": "the quick brown fox jumps over the lazy dog " * 4})
                               for _ in range(20)))
    rc = main(["quantize", str(model_dir), "--method", "gptq", "--calibration", str(calib), "--out", str(out),
               "--samples", "6", "--val-samples", "2", "--seq-len", "64", "--device", "cpu", "--dtype", "float32",
               "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "gptq" in printed and "wrote Humming checkpoint" in printed
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "humming"
    assert (tmp_path / "out.work" / "progress.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(loaded.model.layers[0].mlp.experts, GSQFusedMoE)


def test_cli_quantize_reports_a_bad_calibration_path(tmp_path, capsys):
    model_dir = tmp_path / "model"
    tiny_model("qwen3_moe", seed=0).save_pretrained(model_dir)
    _char_tokenizer().save_pretrained(model_dir)
    rc = main(["quantize", str(model_dir), "--calibration", str(tmp_path / "missing.xyz"), "--out", str(tmp_path / "o"),
               "--device", "cpu"])
    assert rc == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.cuda
def test_gsq_layer_on_gpu_uses_kernels_and_beats_gptq_on_training_tokens():
    from gsq_torch.quantizers.calibration import group_by_expert
    from gsq_torch.quantizers.gptq import GPTQ
    from gsq_torch.quantizers.gsq import GSQ, GSQConfig, expert_forward

    torch.manual_seed(0)
    E, H, I, T = 16, 256, 128, 8192  # noqa: E741
    dev = "cuda"
    gate_up = (torch.randn(E, 2 * I, H, device=dev) * H**-0.5).bfloat16()
    down = (torch.randn(E, H, I, device=dev) * I**-0.5).bfloat16()
    x = torch.randn(T, H, device=dev).bfloat16()
    idx = torch.rand(T, E, device=dev).topk(2, dim=-1).indices
    xp, counts = group_by_expert(x, idx, E)
    g1, g2 = GPTQ(E, H, dev), GPTQ(E, I, dev)
    g1.add_batch(xp, counts)
    gate, up = torch.bmm(xp, gate_up.transpose(1, 2)).chunk(2, dim=-1)
    g2.add_batch(torch.nn.functional.silu(gate) * up, counts)
    init = g1.quantize(gate_up), g2.quantize(down)
    gsq = GSQ(gate_up, down, *init, num_steps=200,
              config=GSQConfig(lr_logits=2e-3, lr_scales=1e-3, init_sharpness=30.0))
    for _ in range(200):
        gsq.step(xp, counts)
    out = gsq.export()
    ref = expert_forward(xp, gate_up, down).float()

    def err(r):
        return (expert_forward(xp, r[0].dequantize(torch.bfloat16), r[1].dequantize(torch.bfloat16)).float() - ref).pow(2).sum()

    assert err(out) < err(init)
    assert gsq.logits[0].grad is None or gsq.logits[0].grad.is_cuda


@pytest.mark.cuda
def test_quantize_model_on_gpu(tmp_path):
    from gsq_torch.quantizers.gsq import GSQConfig
    from gsq_torch.quantizers.pipeline import quantize_model

    model = tiny_model("qwen3_moe", seed=0, dtype=torch.bfloat16)
    tokens = torch.randint(0, 512, (40, 64), generator=torch.Generator().manual_seed(0))
    logs = quantize_model(model, tokens, "gsq", num_samples=32, val_samples=8, seq_len=64, device="cuda",
                          gsq=GSQConfig(epochs=2, batch_tokens=512), progress=False, out_dir=tmp_path / "o")
    assert len(logs) == 2 and all(e["final"] <= e["gptq"] for e in logs)
    assert next(model.parameters()).device.type == "cpu"  # layers go back where they were
