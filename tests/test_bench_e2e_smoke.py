"""benchmarks/bench_e2e.py --smoke: the end-to-end benchmark's whole code path on a tiny CPU model."""

import csv
import importlib.util
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_e2e.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_e2e", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_e2e"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e")
    rec = bench.main(["--smoke", "--out", str(out), "--checkpoint-roundtrip", str(out / "ckpt")])
    return rec, out


def _rows(rec, **match):
    return [r for r in rec.rows if all(r[k] == v for k, v in match.items())]


def test_smoke_runs_every_stage_without_failure(smoke):
    rec, _ = smoke
    failed = [n for n in rec.notes if "failed" in n or "cut by" in n]
    assert not failed, failed
    for fig in ("build", "convert", "checkpoint"):
        assert _rows(rec, figure=fig), f"no {fig} row"


@pytest.mark.parametrize("model", ["bf16", "gsq2"])
def test_smoke_measures_decode_and_prefill_of_both_models(smoke, model):
    rec, _ = smoke
    for batch in (1, 2):
        (row,) = _rows(rec, model=model, mode="eager", figure="decode", batch=batch)
        assert row["new_tokens"] == 5 and row["prompt"] == 16
        assert math.isfinite(row["tokens_per_s"]) and row["tokens_per_s"] > 0
        # Scaled to 40 layers the model is slower, never faster.
        assert 0 < row["tokens_per_s_full"] < row["tokens_per_s"]
    (pre,) = _rows(rec, model=model, figure="prefill")
    assert pre["prompt"] == 64 and pre["tokens_per_s"] > 0


@pytest.mark.parametrize("model", ["bf16", "gsq2"])
def test_smoke_breakdown_components_add_up_to_the_step(smoke, model):
    rec, _ = smoke
    rows = {r["component"]: r for r in _rows(rec, model=model, figure="breakdown")}
    assert set(rows) == {"routed experts", "shared expert", "router", "attention", "linear attention", "LM head",
                         "rest", "total"}
    total = rows["total"]["us"]
    assert total > 0
    parts = sum(r["us"] for c, r in rows.items() if c != "total")
    assert parts == pytest.approx(total, rel=1e-6)
    for c in ("routed experts", "shared expert", "router", "attention", "linear attention", "LM head"):
        assert rows[c]["us"] > 0, c  # every hooked module ran inside the profiled decode step
    assert "experts touched" not in (rows["routed experts"]["note"] or "")  # no byte floor without a GPU


def test_smoke_converts_experts_and_reloads_the_checkpoint_exactly(smoke):
    rec, out = smoke
    (conv,) = _rows(rec, figure="convert")
    assert "2 experts modules" in conv["note"]
    (ck,) = _rows(rec, figure="checkpoint")
    assert "['GSQFusedMoE']" in ck["note"]
    assert "max abs logit diff after reload 0" in ck["note"]
    cfg = (out / "ckpt" / "config.json").read_text()
    assert '"quant_method": "humming"' in cfg


def test_smoke_writes_csv_and_markdown_incrementally(smoke):
    rec, out = smoke
    with open(out / "e2e.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(rec.rows)  # one row per figure, one header
    assert set(rows[0]) == set(rec.rows[0])
    md = (out / "e2e.md").read_text()
    for heading in ("## Speed and peak memory", "## 2-bit over BF16", "GPU time of one batch-1 eager decode step",
                    "## Notes"):
        assert heading in md
    assert "compiled: skipped" in md  # generate() compiles only on an accelerator


def test_budget_cuts_a_stage_and_notes_it(bench, tmp_path):
    import time

    rec = bench.Recorder(tmp_path, {}, ["- test"])
    budget = bench.Budget(minutes=10)
    budget.end = time.monotonic() + 1.5
    out = bench.stage(rec, budget, "sleepy", lambda: time.sleep(5), need=0)
    assert out is None
    assert any("sleepy: cut by the time budget" in n for n in rec.notes)
    assert bench.stage(rec, budget, "late", lambda: 1, need=60) is None
    assert any("late: skipped" in n for n in rec.notes)
