"""``gsq-torch demo``: the quick run completes, prints the table, writes a checkpoint that loads back with
the same perplexity; a medium run keeps the quality ordering."""

import json
import re
from dataclasses import replace

import pytest
import torch

from gsq_torch import cli, demo, format, models
from gsq_torch.nn import GSQFusedMoE

ROWS = ("BF16", "RTN", "GPTQ", "GSQ")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """``gsq-torch demo --quick`` once for the module: (exit status, stdout, output dir)."""
    out = tmp_path_factory.mktemp("demo")
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(["demo", "--quick", "--out", str(out), "--threads", "1", "--no-progress"])
    return rc, buf.getvalue(), out


def _table_rows(text):
    rows = {}
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] in ROWS and len(parts) >= 2:
            rows[parts[0]] = float(parts[1])
    return rows


def test_quick_demo_prints_table_with_every_method_and_reload_check(quick_run):
    rc, stdout, _ = quick_run
    assert rc == 0
    rows = _table_rows(stdout)
    assert set(rows) == set(ROWS)
    # 2-bit experts cost perplexity; every method is worse than BF16, RTN the worst.
    assert rows["BF16"] < min(rows["GPTQ"], rows["GSQ"]) and rows["RTN"] > max(rows["GPTQ"], rows["GSQ"])
    assert re.search(r"from_pretrained: perplexity [\d.]+ vs in memory [\d.]+: equal", stdout)
    assert "greedy generation" in stdout and demo.PROMPT in stdout


def test_quick_demo_json_sizes_are_the_format_s_bits_per_weight(quick_run):
    _, _, out = quick_run
    result = json.loads((out / "demo.json").read_text())
    n = result["routed_expert_weights"]
    config = models.load_tiny_moe()[0].config
    assert n == config.num_hidden_layers * config.num_experts * 3 * config.hidden_size * config.moe_intermediate_size
    sizes = result["sizes"]
    assert sizes["routed_experts_bf16"] == 2 * n
    assert sizes["routed_experts_packed"] * 8 == n * format.bits_per_weight()
    # Only the routed experts shrink.
    assert sizes["model_bf16"] - sizes["model_quantized"] == sizes["routed_experts_bf16"] - sizes["routed_experts_packed"]
    assert sizes["checkpoint_gsq"] < sizes["checkpoint_bf16"] / 2
    assert result["bits_per_weight"]["gsq"] == pytest.approx(2.125)
    assert set(result["layer_logs"]) == {"gptq", "gsq"}
    assert [entry["layer"] for entry in result["layer_logs"]["gsq"]] == list(range(config.num_hidden_layers))


def test_quick_demo_checkpoint_loads_with_from_pretrained_and_scores_the_same(quick_run):
    from transformers import AutoModelForCausalLM

    _, _, out = quick_run
    result = json.loads((out / "demo.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out / demo.CHECKPOINT_DIR, dtype=torch.bfloat16)
    experts = [m for m in model.modules() if isinstance(m, GSQFusedMoE)]
    assert len(experts) == model.config.num_hidden_layers
    tokenizer = models.load_tiny_moe()[1]
    ppl = models.heldout_perplexity(model, tokenizer, max_tokens=result["settings"]["eval_tokens"])
    assert ppl == pytest.approx(result["perplexity"]["gsq"], rel=1e-6)
    assert result["reloaded_perplexity"] == pytest.approx(ppl, rel=1e-6)


def test_run_demo_rejects_bad_threads_and_too_many_windows(tmp_path):
    with pytest.raises(ValueError, match="threads"):
        demo.run_demo(tmp_path, quick=True, threads=0, progress=False)
    with pytest.raises(ValueError, match="windows"):
        demo.run_demo(tmp_path, settings=replace(demo.QUICK, num_samples=10_000), threads=1, progress=False)


def _markdown_table(text):
    """method -> perplexity from the first markdown table whose rows start with a method label."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0] in ROWS and cells[0] not in rows:
            rows[cells[0]] = float(cells[1])
    return rows


def test_recorded_quality_figures_agree_and_meet_the_target():
    """README and data/tiny-moe/QUALITY.md show the same full-run table; its BF16 row is eval.json's figure."""
    from pathlib import Path

    quality = _markdown_table((models.tiny_moe_path() / "QUALITY.md").read_text())
    readme = _markdown_table((Path(__file__).parents[1] / "README.md").read_text())
    assert set(quality) == set(ROWS) and readme == quality
    bf16 = json.loads((models.tiny_moe_path() / "eval.json").read_text())["ppl_all_bfloat16"]
    assert quality["BF16"] == pytest.approx(bf16, abs=0.005)
    assert quality["RTN"] > quality["GPTQ"] > quality["GSQ"] > quality["BF16"]
    closed = (quality["GPTQ"] - quality["GSQ"]) / (quality["GPTQ"] - quality["BF16"])
    assert closed >= 0.5


# A shortened full run for CI (about 2 minutes on one core): a quarter of the calibration windows, 2 GSQ
# epochs, the first 16k held-out tokens. Same learning rates and schedule as demo.FULL.
MEDIUM = replace(demo.FULL, num_samples=48, val_samples=8, eval_tokens=16384,
                 gsq=replace(demo.FULL.gsq, epochs=2), max_new_tokens=8)


@pytest.mark.slow
def test_medium_demo_orders_rtn_gptq_gsq(tmp_path):
    """The shortened run keeps the full run's ordering RTN > GPTQ > GSQ."""
    result = demo.run_demo(tmp_path, settings=MEDIUM, threads=1, progress=False)
    assert result.ordered, result.perplexity
    assert result.reload_matches
