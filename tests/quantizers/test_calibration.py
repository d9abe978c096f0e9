"""Calibration data (strings, local datasets, chat messages, token tensors), layer-input capture and
per-expert grouping of routed tokens."""

import json

import pytest
import torch

from gsq_torch.quantizers.calibration import (
    ExpertInputCapture,
    capture_layer_inputs,
    find_decoder_layers,
    group_by_expert,
    load_calibration,
    to_device,
)
from gsq_torch.testing import tiny_model


@pytest.fixture(scope="module")
def char_tokenizer():
    """A character-level tokenizer built in memory (no hub), with an EOS token and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", " ", ":", "|"] + [chr(c) for c in range(97, 123)])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", unk_token="<unk>")
    tok.chat_template = "{% for m in messages %}|{{ m['role'] }}: {{ m['content'] }}{% endfor %}"
    return tok


def test_strings_are_packed_into_sequences_with_eos_between_documents(char_tokenizer):
    texts = ["abc", "de", "fghij", "klm"]
    seqs = load_calibration(texts, char_tokenizer, num_samples=3, seq_len=4, seed=0)
    assert len(seqs) == 3 and all(s.shape == (4,) and s.dtype == torch.long for s in seqs)
    stream = torch.cat(seqs).tolist()
    eos = char_tokenizer.eos_token_id
    assert stream.count(eos) >= 2  # documents are separated
    # Same seed, same sequences; another seed shuffles the documents differently.
    assert all(torch.equal(a, b) for a, b in zip(seqs, load_calibration(texts, char_tokenizer, 3, 4, seed=0)))


def test_too_little_text_and_missing_tokenizer_are_clear_errors(char_tokenizer):
    with pytest.raises(ValueError, match="fewer than one sequence"):
        load_calibration(["ab"], char_tokenizer, num_samples=2, seq_len=100)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        load_calibration(["abc"], None)
    with pytest.raises(TypeError, match="must be a dataset name"):
        load_calibration(3.5, char_tokenizer)


def test_local_jsonl_with_text_column(tmp_path, char_tokenizer):
    path = tmp_path / "calib.jsonl"
    path.write_text("\n".join(json.dumps({"text": "hello world " * 3, "id": i}) for i in range(5)))
    seqs = load_calibration(str(path), char_tokenizer, num_samples=4, seq_len=16)
    assert len(seqs) == 4
    assert char_tokenizer.convert_tokens_to_ids("h") in torch.cat(seqs).tolist()
    with pytest.raises(ValueError, match="no column 'body'"):
        load_calibration(str(path), char_tokenizer, num_samples=1, seq_len=4, text_column="body")


def test_chat_messages_go_through_the_chat_template(tmp_path, char_tokenizer):
    path = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}] * 4
    path.write_text("\n".join(json.dumps(r) for r in rows))
    seqs = load_calibration(str(path), char_tokenizer, num_samples=2, seq_len=8)
    text = char_tokenizer.decode(torch.cat(seqs).tolist())
    assert "|" in text and ":" in text  # the template's markup is there


def test_token_tensors_are_used_as_given():
    tokens = torch.randint(0, 100, (5, 7))
    seqs = load_calibration(tokens, num_samples=3, seq_len=999)
    assert len(seqs) == 3 and all(torch.equal(s, t) for s, t in zip(seqs, tokens))
    ragged = load_calibration([torch.arange(3), torch.arange(5)])
    assert [s.numel() for s in ragged] == [3, 5]
    with pytest.raises(ValueError, match="integer"):
        load_calibration(torch.randn(2, 3))


def test_group_by_expert_pads_each_experts_tokens_in_order():
    x = torch.arange(5.0)[:, None].expand(5, 4).clone()  # token t is the row of t's
    top_k_index = torch.tensor([[0, 2], [2, 1], [0, 3], [3, 2], [2, 0]])  # expert 3 = the padding slot E
    x_pad, counts = group_by_expert(x, top_k_index, num_experts=3)
    assert counts.tolist() == [3, 1, 4]
    assert x_pad.shape == (3, 4, 4)
    assert x_pad[0, :, 0].tolist() == [0, 2, 4, 0]
    assert x_pad[1, :, 0].tolist() == [1, 0, 0, 0]
    assert x_pad[2, :, 0].tolist() == [0, 1, 3, 4]
    assert (x_pad[0, 3] == 0).all() and (x_pad[1, 1:] == 0).all()


def test_capture_records_each_layers_inputs_without_computing_layers():
    model = tiny_model("qwen3_moe", seed=0)
    _, layers = find_decoder_layers(model)
    samples = [torch.randint(0, 512, (9,)), torch.randint(0, 512, (9,))]
    hidden, layer_args = capture_layer_inputs(model, layers, samples)
    assert "forward" not in layers[0].__dict__  # stubs removed
    with torch.no_grad():
        ref = model(input_ids=samples[1][None], output_hidden_states=True).hidden_states
    torch.testing.assert_close(hidden[1], ref[0][0])
    # Running the layers on the captured arguments reproduces the model's own hidden states.
    h = hidden[1][None]
    with torch.no_grad():
        for i, layer in enumerate(layers):
            args, kwargs = to_device(layer_args[i][1], "cpu")
            out = layer(h, *args, **kwargs)
            h = out[0] if isinstance(out, tuple) else out
            if i + 1 < len(layers):
                torch.testing.assert_close(h, ref[i + 1], rtol=1e-5, atol=1e-5)
    # Equal tensors of different samples (rotary tables of equal length) are stored once.
    pe0, pe1 = layer_args[0][0][1]["position_embeddings"], layer_args[0][1][1]["position_embeddings"]
    assert pe0[0] is pe1[0]


def test_expert_capture_sees_hidden_states_and_router_choice():
    model = tiny_model("qwen3_moe", seed=0)
    experts = model.model.layers[0].mlp.experts
    seen = []
    with ExpertInputCapture(experts, lambda x, idx: seen.append((x.shape, idx.shape, int(idx.max())))), torch.no_grad():
        model(input_ids=torch.randint(0, 512, (1, 6)))
    assert seen == [((6, 256), (6, 2), seen[0][2])] and seen[0][2] < 8
    assert not experts._forward_pre_hooks
