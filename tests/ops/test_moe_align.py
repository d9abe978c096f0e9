"""gsq::moe_align (slots grouped by expert) and combine_slots: Triton (interpreter / GPU) vs reference."""

import pytest
import torch

from gsq_torch.ops import moe_align as ma
from gsq_torch.ops.moe_align import (
    combine_slots,
    moe_align,
    moe_align_reference,
    moe_align_sizes,
    moe_align_triton,
)


def check_invariants(index, num_experts, block_m, sorted_ids, block_expert, num_padded):
    """Every routed slot once, in slot order within its expert's block_m-padded segment."""
    flat = index.reshape(-1).long().cpu()
    num_slots = flat.numel()
    sorted_ids, block_expert, used = sorted_ids.cpu(), block_expert.cpu(), int(num_padded.cpu())
    assert (sorted_ids.numel(), block_expert.numel()) == moe_align_sizes(num_slots, num_experts, block_m)[
        ::-1
    ]
    assert used % block_m == 0 and used <= sorted_ids.numel()
    assert (sorted_ids[used:] == num_slots).all() and (block_expert[used // block_m :] == num_experts).all()
    real = sorted_ids[sorted_ids < num_slots]
    routed = ((flat >= 0) & (flat < num_experts)).nonzero().squeeze(1)
    assert torch.equal(real.sort().values, routed)  # each routed slot exactly once, no dropped ones
    block_of = torch.arange(used) // block_m
    for e in range(num_experts):
        rows = (block_expert[block_of] == e).nonzero().squeeze(1)
        slots = sorted_ids[rows]
        mine = (flat == e).nonzero().squeeze(1)
        assert rows.numel() == -(-mine.numel() // block_m) * block_m  # segment padded to block_m
        assert torch.equal(slots[: mine.numel()], mine)  # slot order, padding at the end
        assert (slots[mine.numel() :] == num_slots).all()
    assert (block_expert[: used // block_m].diff() >= 0).all()  # segments in expert order


CASES = [
    (1, 8, 256, 16),
    (3, 2, 8, 16),
    (17, 4, 8, 16),  # slots not a multiple of block_m
    (40, 8, 8, 64),
    (300, 8, 64, 32),  # several chunks
    (1100, 8, 256, 64),  # > 32 chunks: the separate scan kernel
]


@pytest.mark.parametrize("T, K, E, block_m", CASES)
def test_triton_matches_reference_and_invariants(T, K, E, block_m):
    g = torch.Generator().manual_seed(T)
    index = torch.randint(0, E + 1, (T, K), generator=g)  # E: transformers' padding slot
    want = moe_align_reference(index, E, block_m)
    check_invariants(index, E, block_m, *want)
    got = moe_align_triton(index, E, block_m)
    for a, b in zip(got, want):
        assert a.dtype == torch.int32 and torch.equal(a, b)


def test_all_slots_on_one_expert_and_int32_ids():
    index = torch.full((37, 2), 3, dtype=torch.int32)
    got = moe_align_triton(index, 5, 16)
    check_invariants(index, 5, 16, *got)
    assert int(got[2]) == 80 and got[1][:5].tolist() == [3] * 5


def test_only_padding_ids_gives_no_blocks():
    index = torch.full((4, 2), 6)
    sorted_ids, block_expert, num_padded = moe_align_triton(index, 6, 16)
    assert int(num_padded) == 0 and (sorted_ids == 8).all() and (block_expert == 6).all()


def test_zero_tokens():
    out = moe_align(torch.zeros(0, 4, dtype=torch.long), 8, 16)
    assert [t.numel() for t in out] == [0, 0, 1] and int(out[2]) == 0


def test_bad_block_m_rejected():
    with pytest.raises(ValueError, match="power of 2"):
        moe_align(torch.zeros(2, 2, dtype=torch.long), 4, 24)
    with pytest.raises(TypeError, match="int64 or int32"):
        moe_align(torch.zeros(2, 2), 4, 16)


def test_opcheck_moe_align():
    index = torch.randint(0, 9, (5, 3))
    torch.library.opcheck(torch.ops.gsq.moe_align.default, (index, 8, 16))


def test_combine_sums_routed_slots_in_k_order():
    index = torch.tensor([[0, 4], [4, 4], [1, 2]])  # 4 == E: padding
    y = torch.randn(6, 32)
    y[[1, 2, 3]] = float("nan")  # rows of dropped slots are never read
    out = combine_slots(y, index, 4, torch.empty(3, 32, dtype=torch.bfloat16))
    want = torch.stack([y[0], torch.zeros(32), y[4] + y[5]]).to(torch.bfloat16)
    torch.testing.assert_close(out, want)


def test_chunk_constants_fit_the_kernels():
    for chunk in (ma._SMALL_CHUNK, ma._CHUNK):
        assert chunk % ma._SUB == 0 and chunk & (chunk - 1) == 0


def test_both_chunk_sizes_and_both_scan_paths():
    # 64-slot chunks (fused scan), 128-slot chunks with the fused scan and with the scan kernel.
    for T, K in ((300, 8), (600, 8), (1100, 8)):
        index = torch.randint(0, 40, (T, K))
        chunk = ma._SMALL_CHUNK if T * K <= ma._SMALL_CHUNK_MAX_SLOTS else ma._CHUNK
        assert (T * K // chunk > ma._FUSED_SCAN_MAX_CHUNKS) == (T == 1100)
        got = moe_align_triton(index, 40, 16)
        for a, b in zip(got, moe_align_reference(index, 40, 16)):
            assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.parametrize("T", [1, 16, 256, 4096, 16384])
def test_cuda_matches_reference(T):
    index = torch.randint(0, 256, (T, 8), device="cuda")
    for block_m in (16, 64, 128):
        got = moe_align(index, 256, block_m)
        want = moe_align_reference(index, 256, block_m)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
