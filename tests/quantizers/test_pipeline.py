"""quantize_model end to end on tiny MoE models: quality ordering RTN > GPTQ > GSQ on held-out tokens,
identical results after an interrupted and resumed run, from_pretrained of the output, and
quantize_experts' fallbacks."""

from pathlib import Path

import pytest
import torch
from torch import nn

from gsq_torch import format
from gsq_torch.nn import GSQFusedMoE
from gsq_torch.quantizers import pipeline
from gsq_torch.quantizers.gptq import rtn_result
from gsq_torch.quantizers.gsq import GSQConfig
from gsq_torch.quantizers.pipeline import quantize_experts, quantize_model
from gsq_torch.testing import tiny_model

# Short-run GSQ for a CPU test: the reference's 6x init sharpness flips ~2.6% of GPTQ's codes,
# which thousands of steps repair; in a few steps a sharper start and larger steps are needed.
SHORT_GSQ = GSQConfig(epochs=4, batch_tokens=2048, lr_logits=2e-3, lr_scales=1e-3, init_sharpness=30.0)


def _tokens(n, seq_len, seed=0):
    return torch.randint(0, 512, (n, seq_len), generator=torch.Generator().manual_seed(seed))


@pytest.mark.slow
def test_gsq_beats_gptq_beats_rtn_on_heldout_tokens():
    torch.set_num_threads(1)  # deterministic and fast on a shared 2-core machine
    model = tiny_model("qwen3_moe", seed=0)
    logs = quantize_model(model, _tokens(144, 64), "gsq", num_samples=136, val_samples=8, seq_len=64,
                          gsq=SHORT_GSQ, device="cpu", progress=False, seed=0)
    assert [entry["layer"] for entry in logs] == [0, 1]
    for entry in logs:
        # Held-out tokens: never seen by GPTQ's Hessians or GSQ's training.
        assert entry["gptq"] < entry["rtn"]
        assert entry["gsq"] < entry["gptq"]
        # The final mix picks, per expert and matrix, the best method on those tokens.
        assert entry["final"] <= min(entry["gsq"], entry["gptq"], entry["rtn"])
        assert entry["source"]["gsq"] > 0.0 and sum(entry["source"].values()) == pytest.approx(1.0)
    assert all(isinstance(m, GSQFusedMoE) for m in (model.model.layers[0].mlp.experts, model.model.layers[1].mlp.experts))


def _run(tmp, name, monkeypatch=None, fail_on_call=None):
    model = tiny_model("qwen3_moe", seed=0)
    kwargs = dict(num_samples=12, val_samples=4, seq_len=32, gsq=GSQConfig(epochs=1, batch_tokens=256, lr_logits=1e-2),
                  device="cpu", progress=False, seed=3, work_dir=tmp / f"{name}.work", out_dir=tmp / name)
    if fail_on_call is not None:
        calls = []
        real = pipeline.quantize_experts

        def failing(*args, **kw):
            calls.append(1)
            if len(calls) == fail_on_call:
                raise RuntimeError("simulated crash")
            return real(*args, **kw)

        monkeypatch.setattr(pipeline, "quantize_experts", failing)
    logs = quantize_model(model, _tokens(16, 32, seed=1), "gsq", **kwargs)
    return model, logs


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("quantize")
    model, logs = _run(tmp, "full")
    return tmp, model, logs


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_checkpoint_bytes(uninterrupted, monkeypatch):
    tmp, _, logs_full = uninterrupted
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(tmp, "resumed", monkeypatch, fail_on_call=2)  # layer 0 done and saved, then a crash
    assert (tmp / "resumed.work" / "layer_0000.pt").exists()
    assert not (tmp / "resumed.work" / "layer_0001.pt").exists()
    monkeypatch.undo()
    _, logs = _run(tmp, "resumed")  # a fresh process would start from a fresh model like this
    full, resumed = _files(tmp / "full"), _files(tmp / "resumed")
    assert any(name.endswith(".safetensors") for name in full)
    assert full.keys() == resumed.keys()
    for name in full:
        assert full[name] == resumed[name], name
    def strip(entries):  # everything but the wall-clock time
        return [{k: v for k, v in e.items() if k != "seconds"} for e in entries]

    assert strip(logs) == strip(logs_full)


def test_resume_refuses_progress_of_a_different_run(tmp_path):
    work = tmp_path / "w"
    work.mkdir()
    (work / "progress.json").write_text('{"fingerprint": "something else", "next_layer": 1, "log": []}')
    with pytest.raises(ValueError, match="different run"):
        quantize_model(tiny_model("qwen3_moe"), _tokens(4, 16), "rtn", num_samples=2, val_samples=2, seq_len=16,
                       device="cpu", progress=False, work_dir=work)


@pytest.mark.slow
def test_output_checkpoint_loads_with_from_pretrained(uninterrupted):
    from transformers import AutoModelForCausalLM

    tmp, model, _ = uninterrupted
    loaded = AutoModelForCausalLM.from_pretrained(tmp / "full", dtype=torch.float32)
    for L in range(2):
        a, b = model.model.layers[L].mlp.experts, loaded.model.layers[L].mlp.experts
        assert isinstance(b, GSQFusedMoE)
        for name in ("gate_up_proj", "gate_up_proj_scale", "down_proj", "down_proj_scale"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
    ids = _tokens(1, 12, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_rtn_method_gives_round_to_nearest_of_every_expert():
    torch.set_num_threads(1)
    model = tiny_model("qwen3_moe", seed=0)
    experts = model.model.layers[1].mlp.experts
    expected = rtn_result(experts.gate_up_proj.detach()), rtn_result(experts.down_proj.detach())
    logs = quantize_model(model, _tokens(4, 16), "rtn", num_samples=2, val_samples=2, seq_len=16, device="cpu",
                          progress=False)
    new = model.model.layers[1].mlp.experts
    assert torch.equal(new.gate_up_proj, expected[0].weight) and torch.equal(new.down_proj_scale, expected[1].weight_scale)
    assert set(logs[0]) >= {"layer", "module", "rtn"} and "gptq" not in logs[0]


class _Experts(nn.Module):
    def __init__(self, E, H, I):  # noqa: E741
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.gate_up_proj = nn.Parameter(torch.randn(E, 2 * I, H, generator=gen) * H**-0.5)
        self.down_proj = nn.Parameter(torch.randn(E, H, I, generator=gen) * I**-0.5)


def test_quantize_experts_expert_without_tokens_keeps_rtn_with_scale_search():
    torch.set_num_threads(1)
    E, H, I = 3, 128, 128  # noqa: E741
    experts = _Experts(E, H, I)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(300, H, generator=gen)
    idx = torch.tensor([0, 2]).repeat(300, 1)  # expert 1 never routed to
    xv = torch.randn(60, H, generator=gen)
    idxv = torch.tensor([0, 2]).repeat(60, 1)
    packed, log = quantize_experts(experts, (x, idx), (xv, idxv), "gsq",
                                   gsq=GSQConfig(epochs=1, batch_tokens=100, lr_logits=1e-2), act_order=False,
                                   damp=0.1, seed=0, device=torch.device("cpu"))
    rtn_gu, rtn_d = rtn_result(experts.gate_up_proj[1:2].detach()), rtn_result(experts.down_proj[1:2].detach())
    assert torch.equal(packed["gate_up_proj"][1], rtn_gu.weight[0])
    assert torch.equal(packed["gate_up_proj_scale"][1], rtn_gu.weight_scale[0])
    assert torch.equal(packed["down_proj"][1], rtn_d.weight[0])
    format.check_packed(packed["gate_up_proj"], packed["gate_up_proj_scale"], H)
    assert log["final"] <= min(log["gptq"], log["gsq"]) and log["val_pairs"] == 120


def test_quantize_model_rejects_bad_arguments():
    model = tiny_model("qwen3_moe")
    with pytest.raises(ValueError, match="method must be"):
        quantize_model(model, _tokens(2, 8), "awq")
    with pytest.raises(ValueError, match="no decoder layers"):
        quantize_model(nn.Sequential(nn.Linear(4, 4)), _tokens(2, 8), "rtn")
