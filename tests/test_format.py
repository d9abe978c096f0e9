"""The Humming uint2 format: packing known answers, compressed-tensors identity, dequantize,
the 4-bit container repack, quantization_config, round-to-nearest with the scale search, and
every bad input."""

import pytest
import torch

from gsq_torch import format
from gsq_torch.quantizers.rtn import fit_group_scales, quantize_rtn


def _int32(word: int) -> int:
    """An unsigned 32-bit pattern as the signed int32 torch stores."""
    return word - (1 << 32) if word >= 1 << 31 else word


def _codes(*rows):
    return torch.tensor(rows, dtype=torch.uint8)


# --- packing: hand-computed words ---------------------------------------------------------------


@pytest.mark.parametrize(
    "codes, word",
    [
        ([0] * 16, 0x00000000),
        ([1] + [0] * 15, 0x00000001),  # code of input 0 in bits 0-1
        ([0, 1] + [0] * 14, 0x00000004),  # input 1 in bits 2-3
        ([3] + [0] * 15, 0x00000003),
        ([0] * 15 + [1], 0x40000000),  # input 15 in bits 30-31
        ([0] * 15 + [2], 0x80000000),  # bit 31 set: a negative int32
        ([0, 1, 2, 3] * 4, 0xE4E4E4E4),  # byte 0b11_10_01_00
        ([3] * 16, 0xFFFFFFFF),  # -1 as int32
        ([2] * 16, 0xAAAAAAAA),  # all zeros of the codebook (value 0 is code 2)
    ],
)
def test_pack_known_words(codes, word):
    packed = format.pack(_codes(codes))
    assert packed.dtype == torch.int32 and packed.shape == (1, 1)
    assert packed.item() == _int32(word)
    assert torch.equal(format.unpack(packed), _codes(codes))


def test_pack_sets_bit_31_as_data():
    packed = format.pack(_codes([0] * 15 + [3]))
    assert packed.item() < 0  # bit 31 is the high bit of input 15's code
    assert format.unpack(packed)[0, 15].item() == 3


def test_pack_two_words_per_row_in_input_order():
    codes = _codes([1] + [0] * 15 + [0] * 15 + [2], [0] * 16 + [3] * 16)
    assert format.pack(codes).tolist() == [[1, _int32(0x80000000)], [0, -1]]


def test_pack_unpack_round_trip_over_every_code_value():
    codes = torch.randint(0, 4, (5, 3, 256), dtype=torch.uint8)
    codes[0, 0, :4] = torch.tensor([0, 1, 2, 3])
    assert set(codes.unique().tolist()) == {0, 1, 2, 3}
    packed = format.pack(codes)
    assert packed.shape == (5, 3, 16)
    assert torch.equal(format.unpack(packed), codes)


def test_unpack_reads_every_bit_pattern():
    words = torch.tensor([[-(2**31), 2**31 - 1, -1, 0, 0x12345678]], dtype=torch.int32)
    codes = format.unpack(words).view(5, 16).tolist()
    for word, row in zip([0x80000000, 0x7FFFFFFF, 0xFFFFFFFF, 0, 0x12345678], codes):
        assert row == [(word >> (2 * j)) & 3 for j in range(16)]


def test_pack_matches_compressed_tensors_pack_quantized_int2():
    # compressed-tensors pack-quantized int2: store q + 2 (q in -2..1), 2 bits each, LSB first,
    # 16 values per int32 along the input dimension. Written out independently of format.pack.
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-2, 2, (6, 64), generator=g)
    expected = []
    for row in q.tolist():
        words = []
        for w in range(len(row) // 16):
            word = 0
            for j, value in enumerate(row[16 * w : 16 * w + 16]):
                word |= ((value + 2) & 3) << (2 * j)
            words.append(_int32(word))
        expected.append(words)
    assert format.pack(format.values_to_codes(q.float())).tolist() == expected


def test_codebook_is_offset_binary():
    assert format.CODEBOOK == (-2.0, -1.0, 0.0, 1.0)
    codes = torch.arange(4, dtype=torch.uint8)
    assert format.codes_to_values(codes).tolist() == [-2.0, -1.0, 0.0, 1.0]
    assert torch.equal(format.values_to_codes(torch.tensor([-2.0, -1.0, 0.0, 1.0])), codes)


# --- dequantize ---------------------------------------------------------------------------------


def test_dequantize_known_answers_with_negative_scale():
    codes = torch.tensor([[0, 1, 2, 3] * 32 + [3, 2, 1, 0] * 32], dtype=torch.uint8)  # [1, 256]
    scale = torch.tensor([[0.5, -0.25]], dtype=torch.bfloat16)
    w = format.dequantize(format.pack(codes), scale, torch.float32)
    assert w.shape == (1, 256)
    assert w[0, :4].tolist() == [-1.0, -0.5, 0.0, 0.5]  # (code - 2) * 0.5
    assert w[0, 128:132].tolist() == [-0.25, -0.0, 0.25, 0.5]  # (code - 2) * -0.25, never abs()
    assert w[0, 124:128].tolist() == [-1.0, -0.5, 0.0, 0.5]  # group boundary at input 128


def test_dequantize_batched_over_experts_and_exact_in_bf16():
    codes = torch.randint(0, 4, (3, 8, 256), dtype=torch.uint8)
    scale = (torch.randn(3, 8, 2) * 0.1).to(torch.bfloat16)
    w = format.dequantize(format.pack(codes), scale, torch.float64)
    expected = (codes.double() - 2) * scale.double().repeat_interleave(128, dim=-1)
    assert torch.equal(w, expected)
    assert torch.equal(format.dequantize(format.pack(codes), scale).double(), expected)  # bf16 holds it


# --- GSQ's 4-bit container ----------------------------------------------------------------------


def test_repack_int4_container_known_answer():
    # q = -2, -1, 0, 1 stored as q + 8 = 6, 7, 8, 9 in nibbles, LSB first, 8 per word.
    container = torch.tensor([[_int32(0x98769876), _int32(0x98769876)]], dtype=torch.int32)
    repacked = format.repack_int4_container(container)
    assert repacked.tolist() == [[_int32(0xE4E4E4E4)]]


def test_repack_int4_container_round_trip():
    q = torch.randint(-2, 2, (4, 128))
    nibbles = (q + 8).view(4, 16, 8)
    container = torch.zeros(4, 16, dtype=torch.int64)
    for j in range(8):
        container |= nibbles[..., j] << (4 * j)
    container = torch.where(container >= 2**31, container - 2**32, container).to(torch.int32)
    assert torch.equal(
        format.repack_int4_container(container), format.pack(format.values_to_codes(q.float()))
    )


def test_repack_int4_container_rejects_values_outside_two_bits():
    with pytest.raises(ValueError, match="outside the 2-bit range"):
        format.repack_int4_container(torch.zeros(1, 2, dtype=torch.int32))  # nibble 0 -> q = -8
    with pytest.raises(TypeError, match="int32"):
        format.repack_int4_container(torch.zeros(1, 2, dtype=torch.int64))


# --- quantization_config ------------------------------------------------------------------------

CARD_CONFIG = {
    "quant_method": "humming",
    "b_dtype": "uint2",
    "weight_scale_group_size": 128,
    "weight_scale_type": "group",
    "has_zero_point": False,
    "ignore": [
        "lm_head",
        "re:.*self_attn.*",
        "re:.*linear_attn.*",
        "re:.*visual.*",
        "re:mtp.*",
        "re:.*mlp\\.gate$",
        "re:.*mlp\\.shared_expert_gate$",
        "re:.*shared_expert.*",
    ],
}


def test_quantization_config_writes_the_card_form():
    assert format.quantization_config_dict() == CARD_CONFIG
    assert format.parse_quantization_config(CARD_CONFIG) == CARD_CONFIG


def test_quantization_config_reads_vllm_aliases():
    aliased = {
        "quant_method": "humming",
        "weight_dtype": "uint2",
        "group_size": 128,
        "scale_type": "group",
        "ignore": ["lm_head"],
    }
    assert format.parse_quantization_config(aliased) == {**CARD_CONFIG, "ignore": ["lm_head"]}
    assert format.parse_quantization_config({"dtype": "uint2"})["b_dtype"] == "uint2"


@pytest.mark.parametrize(
    "bad, error, match",
    [
        ({"quant_method": "gptq"}, ValueError, "quant_method"),
        ({"b_dtype": "uint4"}, ValueError, "b_dtype"),
        ({"b_dtype": None, "weight_dtype": "int2"}, ValueError, "b_dtype"),
        ({"weight_scale_group_size": None, "group_size": 64}, ValueError, "group_size"),
        ({"weight_scale_type": "channel"}, ValueError, "weight_scale_type"),
        ({"has_zero_point": True}, ValueError, "has_zero_point"),
        ({"ignore": "lm_head"}, ValueError, "ignore"),
        ({"ignore": [1, 2]}, ValueError, "ignore"),
    ],
)
def test_quantization_config_rejects_bad_values(bad, error, match):
    config = {k: v for k, v in {**CARD_CONFIG, **bad}.items() if v is not None}  # None: drop the key
    with pytest.raises(error, match=match):
        format.parse_quantization_config(config)


def test_quantization_config_must_be_a_dict():
    with pytest.raises(TypeError, match="dict"):
        format.parse_quantization_config(["humming"])


@pytest.mark.parametrize(
    "name, ignored",
    [
        ("lm_head", True),
        ("model.lm_head", True),
        ("model.language_model.layers.3.self_attn.q_proj", True),
        ("model.language_model.layers.0.linear_attn.in_proj_qkvz", True),
        ("model.language_model.layers.0.mlp.gate", True),
        ("model.language_model.layers.0.mlp.shared_expert.down_proj", True),
        ("model.language_model.layers.0.mlp.shared_expert_gate", True),
        ("mtp.layers.0.mlp.experts.1.up_proj", True),
        ("model.visual.blocks.0.attn.qkv", True),
        ("model.language_model.layers.0.mlp.experts.7.gate_proj", False),
        ("model.language_model.layers.0.mlp.experts", False),
        ("my_lm_head", False),
    ],
)
def test_is_ignored_follows_the_card_patterns(name, ignored):
    assert format.is_ignored(name, CARD_CONFIG["ignore"]) is ignored


# --- round to nearest with the scale search -----------------------------------------------------


def test_scale_search_picks_a_negative_scale_where_better():
    # +1.0 and -0.5 fit the codebook exactly only with scale -0.5 (codes -2 and +1); any positive
    # scale must clip +1.0 or round -0.5.
    group = torch.tensor([1.0] * 64 + [-0.5] * 64)
    scale = fit_group_scales(torch.stack([group, -group]))
    assert scale.dtype == torch.bfloat16 and scale.shape == (2, 1)
    assert scale.float().tolist() == [[-0.5], [0.5]]
    weight, weight_scale = quantize_rtn(group[None])
    assert torch.equal(format.dequantize(weight, weight_scale, torch.float32), group[None])


def test_rtn_recovers_exactly_representable_weights():
    codes = torch.randint(0, 4, (8, 256), dtype=torch.uint8)
    codes[..., ::128] = 0  # code -2 in every group pins the scale search's grid point p = 0.75
    scale = (torch.randn(8, 2) * 0.05).to(torch.bfloat16)  # both signs
    w = format.dequantize(format.pack(codes), scale, torch.float32)
    weight, weight_scale = quantize_rtn(w)
    assert torch.equal(format.dequantize(weight, weight_scale, torch.float32), w)


def test_rtn_error_is_bounded_and_no_worse_than_the_plain_scale():
    w = torch.randn(16, 256)
    weight, weight_scale = quantize_rtn(w)
    assert weight.shape == (16, 16) and weight.dtype == torch.int32
    assert weight_scale.shape == (16, 2) and weight_scale.dtype == torch.bfloat16
    deq = format.dequantize(weight, weight_scale, torch.float32)
    # 2-bit RTN of Gaussian weights: about 0.35 relative RMS error; 0.5 would mean a broken search.
    assert ((deq - w).norm() / w.norm()).item() < 0.5
    # Never worse (in the searched norm) than the unsearched scale 2 * max|w| / 3 of either sign.
    groups = w.view(16, 2, 128)
    err = ((deq.view(16, 2, 128) - groups).abs() ** 2.4).sum(-1)
    for sign in (1.0, -1.0):
        s0 = (sign * 2 * groups.abs().amax(-1) / 3).to(torch.bfloat16)
        plain = format.dequantize(format.pack(format.quantize_codes(w, s0)), s0, torch.float32)
        plain_err = ((plain.view(16, 2, 128) - groups).abs() ** 2.4).sum(-1)
        assert (err <= plain_err * (1 + 1e-5)).all()


def test_rtn_all_zero_group_gives_zero_weights():
    weight, weight_scale = quantize_rtn(torch.zeros(2, 128))
    assert torch.equal(format.dequantize(weight, weight_scale, torch.float32), torch.zeros(2, 128))


def test_quantize_rtn_is_reachable_from_format():
    assert format.quantize_rtn is quantize_rtn


# --- bad inputs ---------------------------------------------------------------------------------


def test_pack_rejects_bad_inputs():
    with pytest.raises(ValueError, match="multiple of 16"):
        format.pack(torch.zeros(1, 8, dtype=torch.uint8))
    with pytest.raises(TypeError, match="integer"):
        format.pack(torch.zeros(1, 16))
    with pytest.raises(ValueError, match="0..3"):
        format.pack(torch.full((1, 16), 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="0..3"):
        format.pack(torch.full((1, 16), -1, dtype=torch.int32))


def test_unpack_rejects_non_int32():
    with pytest.raises(TypeError, match="int32"):
        format.unpack(torch.zeros(1, 1, dtype=torch.int64))


@pytest.mark.parametrize(
    "weight, scale, error, match",
    [
        (torch.zeros(4, 8, dtype=torch.int64), torch.zeros(4, 1, dtype=torch.bfloat16), TypeError, "int32"),
        (torch.zeros(4, 8, dtype=torch.int32), torch.zeros(4, 1, dtype=torch.int32), TypeError, "floating"),
        (torch.zeros(8, dtype=torch.int32), torch.zeros(1, dtype=torch.bfloat16), ValueError, "out, in/16"),
        (
            torch.zeros(4, 5, dtype=torch.int32),
            torch.zeros(4, 1, dtype=torch.bfloat16),
            ValueError,
            "multiple of 128",
        ),
        (
            torch.zeros(4, 8, dtype=torch.int32),
            torch.zeros(4, 2, dtype=torch.bfloat16),
            ValueError,
            "weight_scale",
        ),
        (
            torch.zeros(4, 8, dtype=torch.int32),
            torch.zeros(3, 1, dtype=torch.bfloat16),
            ValueError,
            "weight_scale",
        ),
        (
            torch.zeros(4, 8, dtype=torch.int32),
            torch.zeros(4, 1, dtype=torch.bfloat16, device="meta"),
            ValueError,
            "meta",
        ),
    ],
)
def test_check_packed_rejects_bad_inputs(weight, scale, error, match):
    with pytest.raises(error, match=match):
        format.check_packed(weight, scale)
    with pytest.raises(error):
        format.dequantize(weight, scale)


def test_check_packed_names_the_tensor_and_in_features():
    weight, scale = torch.zeros(4, 8, dtype=torch.int32), torch.zeros(4, 1, dtype=torch.bfloat16)
    assert format.check_packed(weight, scale) == 128
    with pytest.raises(ValueError, match="experts.3.down_proj.*in_features=256"):
        format.check_packed(weight, scale, in_features=256, name="experts.3.down_proj")


@pytest.mark.parametrize("bad_in", [0, 64, 100, 200])
def test_in_features_must_be_a_positive_multiple_of_128(bad_in):
    with pytest.raises(ValueError, match="multiple of 128"):
        format.check_in_features(bad_in)
    with pytest.raises(ValueError, match="multiple of 128"):
        format.packed_shapes(8, bad_in)
    if bad_in:
        with pytest.raises(ValueError, match="multiple"):
            quantize_rtn(torch.randn(4, bad_in))


def test_fit_group_scales_rejects_a_ragged_group():
    with pytest.raises(ValueError, match="group size"):
        fit_group_scales(torch.randn(2, 130))


def test_packed_shapes_and_bits_per_weight():
    assert format.packed_shapes(512, 2048) == ((512, 128), (512, 16))
    assert format.bits_per_weight() == 2.125
