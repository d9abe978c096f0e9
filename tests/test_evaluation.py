"""Perplexity with a sliding window: window layout, text sources, the shipped model's figure, the
`gsq-torch eval` command, and (when installed) the lm-eval harness on a GSQ model with local data."""

import json
import math
import os

import pytest
import torch
from torch import nn

from gsq_torch.cli import main as cli_main
from gsq_torch.evaluation import EvalResult, _windows, evaluate_perplexity, load_text

VOCAB = 64


pytestmark = pytest.mark.usefixtures("one_thread")


class ByteTokenizer:
    """Token ids = bytes mod VOCAB: enough for the evaluation code (no special tokens)."""

    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": [b % VOCAB for b in text.encode()]}


class Bigram(nn.Module):
    """Logits at position t depend on token t only, so every window layout scores the same NLL."""

    def __init__(self, logits_to_keep: bool = True):
        super().__init__()
        self.table = nn.Embedding(VOCAB, VOCAB)
        if not logits_to_keep:
            self.forward = self._forward  # a signature without logits_to_keep

    def forward(self, input_ids, use_cache=False, logits_to_keep=0):
        logits = self.table(input_ids)
        return type("Out", (), {"logits": logits[:, -logits_to_keep:] if logits_to_keep else logits})()

    def _forward(self, input_ids, use_cache=False):
        return type("Out", (), {"logits": self.table(input_ids)})()


TEXT = "The quick brown fox jumps over the lazy dog. " * 9


def token_nlls(model, text):
    """NLL of predicting token t + 1 from token t, for every t."""
    ids = torch.tensor(ByteTokenizer()(text)["input_ids"])
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(model.table(ids[:-1]), ids[1:], reduction="none")


@pytest.mark.parametrize("seq_len, stride", [(64, 1), (64, 17), (100, 60), (2, 1), (500, 499)])
def test_overlapping_windows_score_every_token_after_the_first_once(seq_len, stride):
    torch.manual_seed(0)
    model = Bigram()
    nlls = token_nlls(model, TEXT)
    for batch_size in (1, 3):
        r = evaluate_perplexity(
            model, ByteTokenizer(), TEXT, seq_len=seq_len, stride=stride, batch_size=batch_size
        )
        assert r.scored_tokens == len(nlls)
        assert r.nll == pytest.approx(nlls.mean().item(), rel=1e-6)
        assert r.perplexity == pytest.approx(math.exp(nlls.mean().item()), rel=1e-6)


@pytest.mark.parametrize("seq_len", [64, 100, 500])
def test_non_overlapping_windows_do_not_predict_each_windows_first_token(seq_len):
    torch.manual_seed(0)
    model = Bigram()
    nlls = token_nlls(model, TEXT)  # nlls[t] predicts token t + 1
    keep = torch.ones(len(nlls), dtype=torch.bool)
    keep[seq_len - 1 :: seq_len] = False  # token k * seq_len starts a window: nothing predicts it
    r = evaluate_perplexity(model, ByteTokenizer(), TEXT, seq_len=seq_len, batch_size=2)
    assert r.scored_tokens == int(keep.sum()) and r.nll == pytest.approx(nlls[keep].mean().item(), rel=1e-6)


def test_models_without_logits_to_keep_give_the_same_result():
    torch.manual_seed(0)
    with_keep = Bigram()
    without = Bigram(logits_to_keep=False)
    without.load_state_dict(with_keep.state_dict())
    a = evaluate_perplexity(with_keep, ByteTokenizer(), TEXT, seq_len=50, stride=20)
    b = evaluate_perplexity(without, ByteTokenizer(), TEXT, seq_len=50, stride=20)
    assert a.nll == pytest.approx(b.nll, rel=1e-6)


def test_windows_overlap_by_seq_len_minus_stride_and_end_at_the_text_end():
    assert _windows(10, 4, 4) == [(0, 4, 4), (4, 8, 4), (8, 10, 2)]
    assert _windows(10, 4, 2) == [(0, 4, 4), (2, 6, 2), (4, 8, 2), (6, 10, 2)]
    assert _windows(3, 8, 8) == [(0, 3, 3)]


def test_uniform_logits_give_vocabulary_size_perplexity():
    model = Bigram()
    with torch.no_grad():
        model.table.weight.zero_()
    r = evaluate_perplexity(model, ByteTokenizer(), TEXT, seq_len=32, stride=8)
    assert r.perplexity == pytest.approx(VOCAB, rel=1e-6)


def test_result_reports_throughput_memory_and_model_size():
    model = Bigram()
    r = evaluate_perplexity(model, ByteTokenizer(), TEXT, seq_len=32, stride=16, max_tokens=100)
    assert isinstance(r, EvalResult) and r.scored_tokens == 99 and r.device == "cpu"
    assert r.processed_tokens == sum(e - b for b, e, _ in _windows(100, 32, 16)) and r.windows == 6
    assert (
        r.tokens_per_second > 0
        and r.seconds > 0
        and r.peak_memory_bytes > 0
        and r.memory_kind == "cpu_peak_rss"
    )
    assert r.model_bytes == VOCAB * VOCAB * 4
    assert "perplexity" in r.summary() and set(r.to_dict()) >= {
        "perplexity",
        "tokens_per_second",
        "peak_memory_bytes",
    }
    model.train()  # the mode is restored afterwards
    evaluate_perplexity(model, ByteTokenizer(), TEXT, seq_len=32)
    assert model.training


def test_non_overlapping_windows_reproduce_the_shipped_models_heldout_perplexity():
    from gsq_torch.models import heldout_perplexity, load_tiny_moe

    model, tokenizer = load_tiny_moe(torch.float32)
    r = evaluate_perplexity(model, tokenizer, max_tokens=1100, seq_len=512, batch_size=2)
    assert r.perplexity == pytest.approx(heldout_perplexity(model, tokenizer, max_tokens=1100), rel=1e-9)
    assert r.scored_tokens == 1100 - 3  # three windows, each predicts all its tokens but the first


# --- text sources ---------------------------------------------------------------------------------


def test_load_text_sources(tmp_path):
    assert load_text("just some text") == "just some text"
    (tmp_path / "a.txt").write_text("from a file\n")
    assert load_text(str(tmp_path / "a.txt")) == "from a file\n"
    assert load_text(tmp_path / "a.txt") == "from a file\n"
    rows = [{"text": "first"}, {"text": ""}, {"text": "second"}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert load_text(tmp_path / "b.jsonl") == "first\n\nsecond"
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([{"body": "x"}, {"body": "y"}]).save_to_disk(str(tmp_path / "saved"))
    assert load_text(dataset=str(tmp_path / "saved"), text_column="body") == "x\n\ny"
    from gsq_torch.models import eval_text

    assert load_text() == eval_text()


def test_load_text_errors(tmp_path):
    with pytest.raises(ValueError, match="not both"):
        load_text("a", dataset="b")
    with pytest.raises(FileNotFoundError):
        load_text(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="empty"):
        load_text("   ")
    (tmp_path / "c.pdf").write_text("x")
    with pytest.raises(ValueError, match="unknown type"):
        load_text(tmp_path / "c.pdf")
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "x"}))
    with pytest.raises(ValueError, match="text_column"):
        load_text(tmp_path / "d.jsonl")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"seq_len": 1}, "seq_len >= 2"),
        ({"stride": 0}, "stride"),
        ({"seq_len": 8, "stride": 9}, "stride"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        evaluate_perplexity(Bigram(), ByteTokenizer(), TEXT, **kwargs)


def test_too_short_text_raises():
    with pytest.raises(ValueError, match="at least 2"):
        evaluate_perplexity(Bigram(), ByteTokenizer(), "a")


# --- the command line -----------------------------------------------------------------------------


def test_cli_eval_on_the_shipped_model_writes_json(tmp_path, capsys):
    from gsq_torch.models import load_tiny_moe

    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    out = tmp_path / "r.json"
    rc = cli_main(
        [
            "eval",
            "tiny-moe",
            "--text",
            str(text),
            "--dtype",
            "float32",
            "--seq-len",
            "64",
            "--stride",
            "32",
            "--json",
            str(out),
        ]
    )
    assert rc == 0 and "perplexity" in capsys.readouterr().out
    result = json.loads(out.read_text())
    model, tokenizer = load_tiny_moe(torch.float32)
    want = evaluate_perplexity(model, tokenizer, TEXT, seq_len=64, stride=32)
    assert result["perplexity"] == pytest.approx(want.perplexity, rel=1e-6) and result["rtn"] is False


def test_cli_eval_reports_a_missing_text_file(tmp_path, capsys):
    assert cli_main(["eval", "tiny-moe", "--text", str(tmp_path / "nope.txt"), "--dtype", "float32"]) == 2
    assert "nope.txt" in capsys.readouterr().err


# --- lm-eval harness (optional) -------------------------------------------------------------------

LM_EVAL_TASK = """\
task: gsq_local_text
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""


def test_lm_eval_harness_runs_a_gsq_model_on_local_data(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from gsq_torch import GSQFusedMoE
    from gsq_torch.models import eval_text, load_tiny_moe
    from gsq_torch.nn.replace import find_experts

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    docs = [d.strip()[:1500] for d in eval_text().split("<|endoftext|>") if d.strip()][:2]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    (tmp_path / "task.yaml").write_text(LM_EVAL_TASK.format(data=tmp_path / "docs.jsonl"))
    model, tokenizer = load_tiny_moe(torch.float32)
    # 2-bit experts without the scale search (fast): the harness sees a GSQ model either way.
    from gsq_torch import replace_experts

    replace_experts(model, quantized={n: GSQFusedMoE.from_experts(m, grid=4) for n, m in find_experts(model)})
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1, max_length=256)
    out = simple_evaluate(
        model=lm, tasks=["gsq_local_text"], task_manager=TaskManager(include_path=str(tmp_path))
    )
    metrics = out["results"]["gsq_local_text"]
    assert 0 < metrics["bits_per_byte,none"] < 8 and math.isfinite(metrics["word_perplexity,none"])
    assert os.environ["HF_DATASETS_OFFLINE"] == "1"
