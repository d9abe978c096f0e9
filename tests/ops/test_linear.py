"""gsq::linear: the op against a float64 reference, the Triton kernels themselves (under the
interpreter on CPU, for real on CUDA), torch.library registration, compile, autograd, CUDA graphs,
and every bad input."""

import dataclasses
import os
import textwrap

import pytest
import torch
import triton

from gsq_torch import format
from gsq_torch.ops import linear as L
from gsq_torch.ops import linear_hopper
from gsq_torch.ops.cross_compile import run_compile_script

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
# The kernels run on CUDA tensors on a GPU, on CPU tensors under the interpreter elsewhere.
needs_kernels = pytest.mark.skipif(
    not (HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"), reason="needs CUDA or TRITON_INTERPRET=1"
)
# Tolerances against float64: relative to each element (output rounding: 1 ulp, since the
# interpreter truncates fp32 to bf16 instead of rounding) plus a small part of the largest output
# (fp32 accumulation, the GEMV's magic-number offsets). A misread format gives errors of order 1.
TOL = {torch.bfloat16: (2**-7, 1e-3), torch.float16: (2**-10, 2e-4), torch.float32: (1e-5, 1e-4)}


def random_packed(out_features, in_features, device=DEVICE):
    codes = torch.randint(0, 4, (out_features, in_features), dtype=torch.uint8)
    codes.view(-1)[:4] = torch.arange(4, dtype=torch.uint8)  # every code value present
    scale = torch.randn(out_features, in_features // format.GROUP_SIZE) * 0.05  # both signs
    return format.pack(codes).to(device), scale.to(torch.bfloat16).to(device)


def reference64(x, weight, weight_scale):
    return x.double() @ format.dequantize(weight, weight_scale, torch.float64).T


def assert_matches(y, ref, dtype):
    rtol, atol = TOL[dtype]
    assert y.dtype == dtype and y.shape == ref.shape
    err = (y.double() - ref).abs()
    bound = rtol * ref.abs() + atol * ref.abs().max().clamp_min(1e-30)
    assert (err <= bound).all(), (
        f"max err {err.max().item():.3e}, worst ratio {(err / bound).max().item():.2f}"
    )


# --- the op -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("M, N, K", [(1, 40, 128), (3, 64, 256), (17, 33, 384), (8, 128, 512)])
def test_op_matches_float64_reference(M, N, K, dtype):
    weight, scale = random_packed(N, K)
    x = torch.randn(M, K, device=DEVICE).to(dtype)
    assert_matches(L.linear(x, weight, scale), reference64(x, weight, scale), dtype)


def test_op_keeps_leading_dims_and_takes_non_contiguous_x():
    weight, scale = random_packed(24, 256)
    x = torch.randn(256, 2, 3, device=DEVICE).permute(1, 2, 0)  # [2, 3, 256], last dim strided
    y = L.linear(x, weight, scale)
    assert y.shape == (2, 3, 24)
    assert_matches(y, reference64(x, weight, scale), torch.float32)
    assert L.linear(x[0, 0], weight, scale).shape == (24,)


def test_op_on_empty_batch():
    weight, scale = random_packed(8, 128)
    assert L.linear(torch.zeros(0, 128, device=DEVICE), weight, scale).shape == (0, 8)


def test_reference_computes_in_float64_for_float64_inputs():
    weight, scale = random_packed(8, 128, "cpu")
    x = torch.randn(2, 128, dtype=torch.float64)
    torch.testing.assert_close(
        L.linear_reference(x, weight, scale), reference64(x, weight, scale), rtol=1e-12, atol=1e-12
    )


# --- the Triton kernels themselves --------------------------------------------------------------

MMA = L.KernelConfig("mma", block_m=16, block_n=64, block_k=128, group_m=0)  # decode: paired x, bias via x
MMA_SPLIT = L.KernelConfig("mma", block_m=16, block_n=64, block_k=128, group_m=0, split_k=3)
MMA_WIDE_K = L.KernelConfig(
    "mma", block_m=16, block_n=64, block_k=256, group_m=0, split_k=2
)  # scaled weights
MMA_BIG_M = L.KernelConfig("mma", block_m=128, block_n=64, block_k=64, group_m=2)  # half a group per step
GEMV = L.KernelConfig("gemv", block_n=16, block_k=256, num_warps=4)
GEMM_SMALL = L.KernelConfig("gemm", block_m=16, block_n=32, block_k=128, num_warps=4)
GEMM_WIDE_K = L.KernelConfig("gemm", block_m=16, block_n=16, block_k=256, num_warps=4)  # 2 groups per tile
GEMM_NARROW_K = L.KernelConfig("gemm", block_m=16, block_n=16, block_k=64, num_warps=4)  # half a group
GEMM_SPLIT_K = L.KernelConfig("gemm", block_m=16, block_n=32, block_k=128, split_k=4)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "config, M, N, K",
    [
        (MMA, 1, 40, 384),  # one row: x read as a vector, weights kept as base + code
        (MMA_SPLIT, 1, 70, 640),  # 5 K tiles over 3 splits (the last shorter), 2 row tiles, N tail
        (MMA_WIDE_K, 1, 64, 384),  # 2 groups per tile, scaled before the dot; K tail
        (MMA_SPLIT, 5, 70, 256),  # natural order, 2 splits of 1 tile
        (L.KernelConfig("mma", block_m=32, block_n=64, block_k=128, group_m=0), 20, 64, 384),
        (MMA_WIDE_K, 33, 130, 640),  # 3 token tiles, scaled weights, K tail, N tail
        (MMA_BIG_M, 20, 130, 384),  # half-group tiles, x tiles grouped 2 N tiles at a time
        (GEMV, 1, 40, 384),  # N not a multiple of 16; K/16 = 24 words: a masked last block
        (GEMV, 1, 16, 512),  # 2 full blocks of K
        (L.KernelConfig("gemv", block_n=4, block_k=128, num_warps=1), 2, 8, 256),  # one row per program
        (GEMM_SMALL, 20, 40, 384),  # M and N not multiples of the blocks
        (GEMM_WIDE_K, 5, 24, 384),  # K not a multiple of block_k: masked K tail
        (GEMM_NARROW_K, 3, 17, 256),
        (GEMM_SPLIT_K, 5, 40, 640),  # 5 K tiles over 3 splits of 2 tiles (the last split shorter)
        (
            L.KernelConfig("gemm", block_m=16, block_n=16, block_k=256, split_k=2),
            3,
            24,
            384,
        ),  # split + K tail
    ],
)
def test_forward_kernel_matches_reference(config, M, N, K, dtype):
    weight, scale = random_packed(N, K)
    x = torch.randn(M, K, device=DEVICE).to(dtype)
    assert_matches(L.launch_linear(x, weight, scale, config), reference64(x, weight, scale), dtype)


@needs_kernels
@pytest.mark.parametrize(
    "config, M, N, K",
    [
        (L.KernelConfig("gemm", block_m=16, block_n=16, block_k=128), 5, 40, 384),  # N tail in the reduction
        (L.KernelConfig("gemm", block_m=16, block_n=32, block_k=256), 18, 24, 384),  # gathered scales, K tail
        (L.KernelConfig("gemm", block_m=16, block_n=16, block_k=64), 1, 16, 256),
    ],
)
def test_backward_kernel_matches_reference(config, M, N, K):
    weight, scale = random_packed(N, K)
    grad = torch.randn(M, N, device=DEVICE)
    ref = grad.double() @ format.dequantize(weight, scale, torch.float64)
    assert_matches(L.launch_linear_grad_input(grad, weight, scale, config), ref, torch.float32)


@needs_kernels
@pytest.mark.parametrize(
    "config",
    [MMA, MMA_WIDE_K, MMA_BIG_M, GEMV, GEMM_SMALL, L.KernelConfig("decode", block_m=16, block_n=64, block_k=256)],
    ids=["mma", "mma-scaled", "mma-big-m", "gemv", "gemm", "decode"],
)
@pytest.mark.parametrize("one_row_at_a_time", [False, True], ids=["rows", "decode"])
def test_kernels_read_every_field_of_the_word(config, one_row_at_a_time):
    # Row n of W has a lone +1 (code 3) at input n of word 0, zeros (code 2) elsewhere, and a -2
    # (code 0) at input 127; x = identity rows, so y reads single weights back exactly. One row at
    # a time runs the decode paths (M = 1).
    K = max(128, config.block_k)
    codes = torch.full((16, K), 2, dtype=torch.uint8)
    codes[torch.arange(16), torch.arange(16)] = 3
    codes[:, 127] = 0
    weight = format.pack(codes).to(DEVICE)
    scale = torch.ones(16, K // format.GROUP_SIZE, dtype=torch.bfloat16, device=DEVICE)
    x = torch.eye(K, device=DEVICE)[list(range(16)) + [127]]
    if one_row_at_a_time:
        y = torch.cat([L.launch_linear(x[i : i + 1], weight, scale, config) for i in range(17)])
    else:
        y = L.launch_linear(x, weight, scale, config)
    assert torch.equal(y.double(), reference64(x, weight, scale))
    assert torch.equal(y[:16], torch.eye(16, device=DEVICE)) and (y[16] == -2).all()


# Decode configs of benchmarks/bench_linear.py --sweep: split counts that are not powers of two
# (the last split shorter), 8 warps (two warp groups of 64 rows), a 6-deep cp.async ring.
SWEEP_CONFIGS = [
    L.KernelConfig("mma", block_m=16, block_n=128, block_k=128, group_m=0, num_stages=4, split_k=3),
    L.KernelConfig("mma", block_m=16, block_n=64, block_k=128, group_m=0, num_stages=6, split_k=6),
    L.KernelConfig("mma", block_m=16, block_n=128, block_k=128, group_m=0, num_warps=8, split_k=2),
]


@needs_kernels
@pytest.mark.parametrize("config", SWEEP_CONFIGS, ids=["split3", "split6-s6", "w8-split2"])
@pytest.mark.parametrize("M, N, K", [(1, 200, 1024), (3, 70, 768), (16, 128, 896)])
def test_sweep_configs_match_float64_reference(config, M, N, K):
    # N = 200 and 70 are not multiples of the row blocks, K = 768 / 896 split into uneven parts
    # (6 asked of 1024: the launcher runs 4 of 2 tiles; 896 over 3: 3, 3, 1 tiles). Every code
    # value is present.
    weight, scale = random_packed(N, K)
    for _ in range(2):  # fresh x; the second launch reuses the split-K counters
        x = torch.randn(M, K, device=DEVICE).to(torch.bfloat16)
        y = L.launch_linear(x, weight, scale, config)
        assert_matches(y, reference64(x, weight, scale), torch.bfloat16)
    assert not L._LOCKS[weight.device].any()


# "decode" (M <= 16): a program owns one K chunk (block_k, 1 to 4 scale groups) and walks group_m
# tiles of block_n rows; K split by block_k, partials added by the last program of a row block.
DECODE_CONFIGS = [
    L.KernelConfig("decode", block_m=8, block_n=64, block_k=512, group_m=2, num_warps=4, num_stages=1),
    L.KernelConfig("decode", block_m=16, block_n=64, block_k=256, group_m=0, num_warps=4, num_stages=1),
    L.KernelConfig("decode", block_m=16, block_n=32, block_k=128, group_m=3, num_warps=2, num_stages=1),
    L.KernelConfig("decode", block_m=8, block_n=128, block_k=512, group_m=1, num_warps=8, num_stages=1),
    L.KernelConfig("decode", block_m=8, block_n=64, block_k=256, group_m=3, num_warps=4, num_stages=2),
]


@needs_kernels
@pytest.mark.parametrize(
    "config", DECODE_CONFIGS, ids=["m8-k512", "m16-k256-auto", "w2-k128", "w8-k512", "k256-2-ahead"]
)
@pytest.mark.parametrize("M, N, K", [(1, 200, 1024), (3, 70, 640), (16, 130, 384), (1, 64, 512), (4, 256, 1024)])
def test_decode_kernel_matches_float64_reference(config, M, N, K):
    # N = 200 / 70 / 130: not multiples of the row tiles (nor of a program's row block); K = 640
    # and 384: the last chunk has fewer groups than block_k (masked), uneven splits; K = 512 with
    # 1, 2 or 4 chunks; N = 64 / 256: whole row tiles (pointers advanced by a scalar). Every code value,
    # both scale signs. Reruns are bitwise equal and leave the
    # split counters at zero.
    if config.block_m < M:
        config = L.KernelConfig(**{**config.__dict__, "block_m": 16})
    _check_split_kernel(config, M, N, K)


def _check_split_kernel(config, M, N, K):
    """A "decode" / "lines" config against float64 on random inputs; a rerun is bitwise equal and
    leaves the split counters at zero."""
    weight, scale = random_packed(N, K)
    x = torch.randn(M, K, device=DEVICE).to(torch.bfloat16)
    y = L.launch_linear(x, weight, scale, config)
    assert_matches(y, reference64(x, weight, scale), torch.bfloat16)
    assert torch.equal(L.launch_linear(x, weight, scale, config), y)
    if weight.device in L._LOCKS:
        assert not L._LOCKS[weight.device].any()


# "lines" (1-2 tokens, K a multiple of 512): 16-byte runs of whole row segments, the scale groups as
# the MMA's N side; 1-2 warps run mma.sync, 4 warps wgmma (two different k orders of the operands).
LINES_CONFIGS = [
    L.KernelConfig("lines", block_m=1, block_n=64, block_k=512, group_m=2, num_warps=2, num_stages=1),
    L.KernelConfig("lines", block_m=1, block_n=16, block_k=512, group_m=3, num_warps=1, num_stages=3),
    L.KernelConfig("lines", block_m=1, block_n=32, block_k=512, group_m=3, num_warps=2, num_stages=2),
    L.KernelConfig("lines", block_m=2, block_n=32, block_k=512, group_m=0, num_warps=2, num_stages=1),
    L.KernelConfig("lines", block_m=1, block_n=64, block_k=512, group_m=1, num_warps=4, num_stages=1),
    L.KernelConfig("lines", block_m=4, block_n=64, block_k=512, group_m=2, num_warps=4, num_stages=3),
]


@needs_kernels
@pytest.mark.parametrize("config", LINES_CONFIGS, ids=["w2", "w1-ring", "w2-2-ahead", "m2-auto", "w4-wgmma", "m4-w4-ring"])
@pytest.mark.parametrize("M, N, K", [(1, 200, 1024), (2, 64, 512), (3, 130, 2048), (1, 256, 512)])
def test_lines_kernel_matches_float64_reference(config, M, N, K):
    # N = 200 / 130: a ragged last row tile (rows clamped, stores masked); K = 512: one chunk, no
    # split; 1024 / 2048: 2 / 4 splits added by the last program. M = 3 on 1- or 2-token tiles: several
    # token tiles with their own counters. Every code value, both scale signs; reruns bitwise equal.
    _check_split_kernel(config, M, N, K)


@needs_kernels
def test_lines_kernel_rejects_shapes_it_cannot_lay_out():
    weight, scale = random_packed(64, 640)
    x = torch.randn(1, 640, device=DEVICE).to(torch.bfloat16)
    for bad in ({"block_k": 256}, {"block_n": 48}, {"block_m": 8}, {"num_warps": 8, "block_n": 128}):
        cfg = L.KernelConfig(**{**LINES_CONFIGS[0].__dict__, **bad})
        with pytest.raises(ValueError, match="lines"):
            L.launch_linear(x[:, :512], weight[:, :32], scale[:, :4], cfg)
    with pytest.raises(ValueError, match="dividing K"):  # K = 640 is not a multiple of 512
        L.launch_linear(x, weight, scale, LINES_CONFIGS[0])


# "lines_warps" (small layers, 1-2 tokens, K = 512 x 1, 2, 4, 8 or 16): warp s of a program takes K chunk s, and
# the program adds its warps' results in shared memory in warp order (no split-K partials or fix-up).
LINES_WARPS_CONFIGS = [
    L.KernelConfig("lines_warps", block_m=1, block_n=32, block_k=512, group_m=2, num_warps=1, num_stages=1),
    L.KernelConfig("lines_warps", block_m=1, block_n=16, block_k=512, group_m=3, num_warps=1, num_stages=1),
    L.KernelConfig("lines_warps", block_m=2, block_n=32, block_k=512, group_m=1, num_warps=1, num_stages=1),
]


@needs_kernels
@pytest.mark.parametrize("config", LINES_WARPS_CONFIGS, ids=["m1-32x2", "m1-16x3", "m2-32x1"])
@pytest.mark.parametrize("M, N, K", [(1, 200, 1024), (2, 64, 512), (3, 130, 2048), (1, 96, 4096)])
def test_lines_warps_kernel_matches_float64_reference(config, M, N, K):
    # 1, 2, 4 or 8 warps (one per 512-input chunk); N = 200 / 130: a ragged last tile (rows clamped, stores
    # masked), 96: a program with fewer tiles than group_m; M = 3: several token tiles. Every code value, both
    # scale signs. The warps add in a fixed order: a rerun, and another count of tiles per program, give the
    # same bits.
    weight, scale = random_packed(N, K)
    x = torch.randn(M, K, device=DEVICE).to(torch.bfloat16)
    y = L.launch_linear(x, weight, scale, config)
    assert_matches(y, reference64(x, weight, scale), torch.bfloat16)
    assert torch.equal(L.launch_linear(x, weight, scale, config), y)
    assert torch.equal(L.launch_linear(x, weight, scale, dataclasses.replace(config, group_m=config.group_m + 1)), y)


@needs_kernels
def test_lines_warps_kernel_rejects_shapes_it_cannot_lay_out():
    weight, scale = random_packed(64, 1536)
    x = torch.randn(1, 1536, device=DEVICE).to(torch.bfloat16)
    with pytest.raises(ValueError, match="lines_warps"):  # 3 chunks of 512: not a power of two
        L.launch_linear(x, weight, scale, LINES_WARPS_CONFIGS[0])
    for bad in ({"block_n": 64}, {"group_m": 0}, {"block_m": 4}):
        with pytest.raises(ValueError, match="lines_warps"):
            L.launch_linear(x[:, :512], weight[:, :32], scale[:, :4], dataclasses.replace(LINES_WARPS_CONFIGS[0], **bad))


@needs_kernels
def test_decode_kernel_takes_more_tokens_than_its_tile():
    # 20 tokens on 8-token tiles: 3 token tiles, each with its own row blocks and counters.
    weight, scale = random_packed(70, 640)
    x = torch.randn(20, 640, device=DEVICE).to(torch.bfloat16)
    y = L.launch_linear(x, weight, scale, DECODE_CONFIGS[0])
    assert_matches(y, reference64(x, weight, scale), torch.bfloat16)


@needs_kernels
def test_decode_ablation_switches_pinned_is_exact_and_the_rest_run():
    # bench_linear.py --ablate: DEC_ABL_PIN (a barrier after the next tile's loads) keeps the result;
    # the other switches and ksub > 1 are timing-only, so they only have to run.
    weight, scale = random_packed(128, 1024)
    x = torch.randn(1, 1024, device=DEVICE).to(torch.bfloat16)
    cfg = L.KernelConfig("decode", block_m=8, block_n=64, block_k=512, group_m=2, num_warps=4, num_stages=2)
    assert_matches(L.launch_decode_ablation(x, weight, scale, cfg, L.DEC_ABL_PIN), reference64(x, weight, scale),
                   torch.bfloat16)
    pure = L.DEC_ABL_LOADS | L.DEC_ABL_NOMMA | L.DEC_ABL_NOSTORE | L.DEC_ABL_NOFIX
    for ablate, ksub in ((L.DEC_ABL_NOMMA, 1), (pure, 1), (L.DEC_ABL_NOX, 1), (L.DEC_ABL_KMAJOR, 1), (0, 2)):
        assert L.launch_decode_ablation(x, weight, scale, cfg, ablate, ksub).shape == (1, 128)
    with pytest.raises(ValueError, match="ablations"):
        L.launch_decode_ablation(x[:, :640], weight[:, :40], scale[:, :5], cfg, L.DEC_ABL_NOFIX)


@needs_kernels
def test_decode_kernel_rejects_shapes_it_cannot_lay_out():
    weight, scale = random_packed(64, 256)
    x = torch.randn(1, 256, device=DEVICE).to(torch.bfloat16)
    for bad in ({"block_k": 1024}, {"block_n": 32}, {"block_m": 4}):
        cfg = L.KernelConfig(**{**DECODE_CONFIGS[0].__dict__, **bad})
        with pytest.raises(ValueError, match="decode"):
            L.launch_linear(x, weight, scale, cfg)


@needs_kernels
def test_split_k_counters_are_reset_for_the_next_launch():
    # The last program of each tile adds the parts and puts its counter back to 0: a second launch
    # (or a graph replay) must see zeros, or it would add stale or missing parts.
    weight, scale = random_packed(70, 640)
    for M in (1, 5):
        for _ in range(2):
            x = torch.randn(M, 640, device=DEVICE)
            assert_matches(
                L.launch_linear(x, weight, scale, MMA_SPLIT), reference64(x, weight, scale), torch.float32
            )
    assert not L._LOCKS[weight.device].any()


def test_default_config_routes_small_batches_to_the_tensor_core_kernel():
    # The rule used where the tuned CONFIGS table has no entry (the table may override it).
    for M in (1, 2):  # one or two tokens, K a multiple of 512: "lines" (mma.sync, 2 warps)
        cfg = L._default_config("forward", M, 8192, 8192)
        assert cfg.kernel == "lines" and cfg.block_m == M and cfg.block_k == 512 and cfg.num_warps == 2
        assert L._decode_iters(cfg, M, 8192, 8192) == 4  # 128 row tiles x 16 splits / 4 = 512 programs
    for M in (3, 16, 64, 128):
        cfg = L._default_config("forward", M, 8192, 8192)
        assert cfg.kernel == "mma" and cfg.block_m >= min(16, M) and cfg.block_k == format.GROUP_SIZE
    # small layers, one or two tokens: "lines_warps" (one warp per 512-input chunk), about 32 programs
    for M, N, K, rows in ((1, 2048, 2048, 64), (1, 512, 2048, 16), (1, 2048, 512, 32), (2, 1024, 2048, 32)):
        cfg = L._default_config("forward", M, N, K)
        assert cfg.kernel == "lines_warps" and cfg.block_m == M and cfg.num_warps == K // 512
        assert cfg.block_n * cfg.group_m == rows and cfg.block_n in (16, 32)
    for M, N, K in ((1, 4096, 4096), (1, 2048, 8192), (1, 2048, 1536), (2, 2048, 512)):  # measured slower, or 3 chunks
        assert L._default_config("forward", M, N, K).kernel == "lines"
    assert L._default_config("forward", 3, 8192, 8192).split_k > 1  # 64 row tiles alone leave SMs idle
    assert L._default_config("forward", 1, 1000, 384).kernel == "mma"  # K not a multiple of 512
    # too few 128 x 128 tiles for the GEMM (enough for the hopper kernel's 128-token tiles)
    assert L._default_config("forward", 4096, 512, 2048, hopper=False).kernel == "mma"
    assert L._default_config("forward", 4096, 512, 2048).block_m == 128
    assert L._default_config("forward", 4096, 2048, 512).kernel == "gemm"  # 8 K steps: the hopper ring's fill
    # Many tokens: the Gluon "hopper" kernel (256-token tiles once they fill the card); where it cannot
    # run (no Gluon, not sm_90, not bf16) the launcher asks for the Triton kernels instead.
    assert L._default_config("forward", 256, 8192, 8192).block_m == 128
    for M in (256, 1024, 4096, 10000):
        cfg = L._default_config("forward", M, 8192, 8192)
        assert cfg.kernel == "hopper" and cfg.block_m == (256 if M >= 1024 else 128)
    assert L._default_config("forward", 512, 8192, 8192, hopper=False).kernel == "gemm"
    for M in (1024, 4096, 10000):
        assert L._default_config("forward", M, 8192, 8192, hopper=False).kernel == "mma"
    for M in (1, 16, 4096):
        assert L._default_config("backward", M, 8192, 8192).kernel == "gemm"
    for M in (1, 7, 300):  # fp16 / fp32 activations take these (the tf32 kernels)
        assert L._legacy_config(M, 768, 1024).kernel in ("gemv", "gemm")


@pytest.mark.parametrize("key", sorted(L.CONFIGS))
def test_config_table_entries_are_launchable(key):
    direction, m_bucket, _, _ = key
    cfg = L.CONFIGS[key]
    assert direction in ("forward", "backward") and m_bucket == L._m_bucket(m_bucket)
    for size in (cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps):
        assert size & (size - 1) == 0  # tl.arange and tl.reshape need powers of two
    assert cfg.split_k >= 1  # any count: the launchers round it to whole K tiles
    if cfg.kernel == "gemv":
        assert direction == "forward" and m_bucket == 1 and cfg.block_k % format.GROUP_SIZE == 0
    elif cfg.kernel == "mma":
        assert direction == "forward" and cfg.block_m >= 16 and cfg.block_n >= 16 and cfg.block_k >= 16
    elif cfg.kernel == "decode":
        assert direction == "forward" and cfg.block_m >= 8 and cfg.block_k in (128, 256, 512)
        assert cfg.block_n % (16 * cfg.num_warps) == 0
    elif cfg.kernel == "lines":
        assert direction == "forward" and cfg.block_m in (1, 2, 4) and cfg.block_k == 512
        assert cfg.block_n % (16 * cfg.num_warps) == 0 and cfg.num_warps in (1, 2, 4) and m_bucket <= 4
    elif cfg.kernel == "lines_warps":
        assert direction == "forward" and L.lines_warps_supported(cfg.block_m, cfg.num_warps * 512)
        assert cfg.block_n in (16, 32) and cfg.group_m >= 1 and cfg.block_k == 512 and m_bucket <= 2
    elif cfg.kernel == "hopper":
        assert direction == "forward"
        linear_hopper.check_config(cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages,
                                   cfg.group_m)
    else:
        assert (
            cfg.kernel == "gemm"
            and cfg.block_k % format.CODES_PER_WORD == 0
            and min(cfg.block_m, cfg.block_n) >= 16
        )


_COMPILE_SCRIPT = textwrap.dedent(r"""
    import torch
    from gsq_torch.ops import linear as L
    from gsq_torch.ops.cross_compile import compile_launch, record_launches

    L._check_launch = lambda *args: None  # meta tensors, no GPU
    L.interpreting = lambda: False
    meta = dict(device="meta")
    kernels = ("_mma_kernel", "_gemv_kernel", "_gemm_kernel", "_gemm_t_kernel", "_sum_splits_kernel", "_decode_kernel",
               "_lines_kernel", "_lines_warps_kernel")
    with record_launches(L, kernels) as calls:
        w, s = torch.empty(2048, 128, dtype=torch.int32, **meta), torch.empty(2048, 16, dtype=torch.bfloat16, **meta)
        L.launch_linear(torch.empty(1, 2048, dtype=torch.bfloat16, **meta), w, s)  # "lines_warps": 4 warps
        for M, N, K, dtype in [(1, 8192, 8192, torch.bfloat16), (16, 512, 2048, torch.bfloat16),
                               (4096, 8192, 8192, torch.bfloat16)]:
            w, s = torch.empty(N, K // 16, dtype=torch.int32, **meta), torch.empty(N, K // 128, dtype=torch.bfloat16, **meta)
            L.launch_linear(torch.empty(M, K, dtype=dtype, **meta), w, s)
            if M == 4096:
                L.launch_linear_grad_input(torch.empty(M, N, dtype=dtype, **meta), w, s)
            else:  # the "decode" kernel (not a default): 8 x 64 x 512 tiles at M = 1, 16 x 64 x 512 at M = 16
                cfg = L.KernelConfig("decode", block_m=max(8, M), block_n=64, block_k=512, group_m=4, num_stages=1)
                L.launch_linear(torch.empty(M, K, dtype=dtype, **meta), w, s, cfg)
        # "lines" with wgmma (4 warps) and with a cp.async ring (the table's M = 1 entry is mma.sync)
        w, s = torch.empty(8192, 512, dtype=torch.int32, **meta), torch.empty(8192, 64, dtype=torch.bfloat16, **meta)
        for cfg in (L.KernelConfig("lines", block_m=2, block_n=64, block_k=512, group_m=4, num_warps=4, num_stages=1),
                    L.KernelConfig("lines", block_m=1, block_n=32, block_k=512, group_m=4, num_warps=2, num_stages=3)):
            L.launch_linear(torch.empty(cfg.block_m, 8192, dtype=torch.bfloat16, **meta), w, s, cfg)
    for kernel, args, kwargs in calls:
        options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
        blocks = {k: v for k, v in kwargs.items() if k.startswith("BLOCK")}
        compile_launch(kernel, args, kwargs)
        print("compiled", kernel.__name__, options, blocks)
""")


@pytest.mark.skipif(HAS_CUDA, reason="the CUDA tests compile these kernels for the real card")
def test_kernels_compile_for_sm90_without_a_gpu():
    # The interpreter does not catch what only the compiler rejects (layouts, shapes, types):
    # compile the default configs of the benchmark shapes for Hopper, as the GPU would.
    pytest.importorskip("triton.backends.nvidia")
    stdout = run_compile_script(_COMPILE_SCRIPT)
    # the table's kernels at M = 1 ("lines"), 16 and 4096, the backward's gemm_t, "decode" at two shapes
    # and "lines" with wgmma and with a cp.async ring; "lines_warps" at 2048 x 2048
    assert stdout.count("compiled") == 9 and "compiled _lines_warps_kernel" in stdout


# --- registration, compile, autograd ------------------------------------------------------------


def test_opcheck_forward_and_backward():
    weight, scale = random_packed(16, 256)
    for requires_grad in (False, True):
        x = torch.randn(3, 256, device=DEVICE, requires_grad=requires_grad)
        torch.library.opcheck(torch.ops.gsq.linear.default, (x, weight, scale))
    grad = torch.randn(2, 5, 16, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.gsq.linear_grad_input.default, (grad, weight, scale))


def test_compile_fullgraph_matches_eager():
    weight, scale = random_packed(24, 256)

    def f(x):
        return torch.nn.functional.silu(L.linear(x * 2, weight, scale))

    x = torch.randn(4, 256, device=DEVICE)
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x))


def test_gradient_matches_dequantized_reference():
    weight, scale = random_packed(40, 384)
    x = torch.randn(2, 3, 384, device=DEVICE, requires_grad=True)
    g = torch.randn(2, 3, 40, device=DEVICE)
    L.linear(x, weight, scale).backward(g)
    ref = g.double() @ format.dequantize(weight, scale, torch.float64)
    assert_matches(x.grad, ref, torch.float32)


def test_gradcheck_and_gradgradcheck_in_float64():
    weight, scale = random_packed(4, 128, "cpu")
    x = torch.randn(2, 128, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: L.linear(t, weight, scale), (x,), fast_mode=True)
    assert torch.autograd.gradgradcheck(lambda t: L.linear(t, weight, scale), (x,), fast_mode=True)


def test_no_gradient_reaches_the_packed_weights():
    weight, scale = random_packed(8, 128)
    x = torch.randn(2, 128, device=DEVICE, requires_grad=True)
    y = L.linear(x, weight, scale)
    (grad_x,) = torch.autograd.grad(y.sum(), x)
    assert grad_x.shape == x.shape and weight.grad is None and scale.grad is None


# --- bad inputs ---------------------------------------------------------------------------------


def _bad_inputs():
    w, s = random_packed(8, 256, "cpu")
    x = torch.randn(2, 256)
    return [
        (
            "in_features",
            (
                torch.randn(2, 80),
                torch.zeros(8, 5, dtype=torch.int32),
                torch.zeros(8, 1, dtype=torch.bfloat16),
            ),
            ValueError,
            "multiple of 128",
        ),
        ("x last dim", (torch.randn(2, 128), w, s), ValueError, "in_features=256"),
        ("x scalar", (torch.tensor(1.0), w, s), ValueError, "in_features"),
        ("x int", (torch.ones(2, 256, dtype=torch.int32), w, s), TypeError, "x must be"),
        ("x not a tensor", ([1.0] * 256, w, s), TypeError, "x must be a tensor"),
        ("weight float", (x, w.float(), s), TypeError, "int32"),
        ("weight 3-D", (x, w[None], s[None]), ValueError, "out, in/16"),
        ("scale shape", (x, w, s[:, :1]), ValueError, "weight_scale has shape"),
        ("scale rows", (x, w, s[:4]), ValueError, "weight_scale has shape"),
        ("scale fp32", (x, w, s.float()), TypeError, "bf16"),
        ("scale int", (x, w, s.to(torch.int32)), TypeError, "floating"),
        ("x device", (x.to("meta"), w, s), ValueError, "meta"),
        ("scale device", (x, w, s.to("meta")), ValueError, "meta"),
    ]


@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda c: c[0])
def test_bad_inputs_raise_clear_errors(case):
    _, args, error, match = case
    with pytest.raises(error, match=match):
        L.linear(*args)


def test_launchers_reject_what_the_kernels_cannot_take():
    w, s = random_packed(8, 256, "cpu")
    with pytest.raises(TypeError, match="bf16, fp16 or fp32"):
        L.launch_linear(torch.randn(2, 256, dtype=torch.float64), w, s)
    with pytest.raises(ValueError, match="2-D"):
        L.launch_linear(torch.randn(256, 2).T, w, s)
    with pytest.raises(ValueError, match="unknown kernel"):
        L.launch_linear(torch.randn(2, 256).to(DEVICE), w.to(DEVICE), s.to(DEVICE), L.KernelConfig("cublas"))


# --- the Gluon "hopper" kernel (large M on sm_90) --------------------------------------------------

HOPPER_CONFIGS = [  # group_m: the unpacking warps
    L.KernelConfig("hopper", block_m=256, block_n=128, block_k=64, group_m=8, num_warps=8, num_stages=4),
    L.KernelConfig("hopper", block_m=128, block_n=128, block_k=64, group_m=4, num_warps=4, num_stages=3),
    L.KernelConfig("hopper", block_m=128, block_n=64, block_k=64, group_m=8, num_warps=8, num_stages=4),
    L.KernelConfig("hopper", block_m=64, block_n=64, block_k=64, group_m=4, num_warps=4, num_stages=5),
    L.KernelConfig("hopper", block_m=256, block_n=128, block_k=64, group_m=4, num_warps=8, num_stages=5),
]
HOPPER_IDS = ["256x128", "128x128-s3", "128x64-w8", "64x64", "256x128-s5-3-tiles"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_warps": 2}, "num_warps 2"),
        ({"block_m": 96}, "block_m 96"),
        ({"block_k": 128}, "block_k 128"),
        ({"block_k": 32}, "block_k 32"),
        ({"block_n": 32}, "block_n 32"),
        ({"block_n": 256}, "block_n 256"),
        ({"dq_warps": 3}, "group_m 3"),
        ({"num_stages": 1}, "num_stages 1"),
        ({"block_m": 256, "num_stages": 6}, "bytes of shared memory"),
    ],
)
def test_hopper_config_errors_name_the_problem(kwargs, match):
    params = {"block_m": 128, "block_n": 128, "block_k": 64, "num_warps": 8, "num_stages": 4, "dq_warps": 8}
    params |= kwargs
    with pytest.raises(ValueError, match=match):
        linear_hopper.check_config(**params)
    for cfg in HOPPER_CONFIGS:  # the tested configs are valid
        linear_hopper.check_config(cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages,
                                   cfg.group_m)


@needs_kernels
def test_hopper_config_falls_back_where_the_kernel_cannot_run():
    # CPU tensors under the interpreter (and fp16 / fp32 x, or a GPU other than sm_90) take the Triton kernels.
    weight, scale = random_packed(70, 384)
    x = torch.randn(5, 384, device=DEVICE).to(torch.float32)
    assert not linear_hopper.supported(x, weight, 64)
    assert_matches(L.launch_linear(x, weight, scale, HOPPER_CONFIGS[1]), reference64(x, weight, scale), torch.float32)


@needs_kernels
def test_hopper_kernel_that_does_not_compile_falls_back_with_a_warning(monkeypatch):
    # A Triton whose Gluon rejects the kernel: the picked config warns once and the Triton kernels run;
    # a config asked for explicitly raises.
    class GluonRejects(triton.CompilationError):
        def __init__(self):
            Exception.__init__(self, "gluon rejects the kernel")
            self.message = "gluon rejects the kernel"

    def fail(*args, **kwargs):
        raise GluonRejects()

    cfg = dataclasses.replace(HOPPER_CONFIGS[1], block_m=64, num_warps=4)
    monkeypatch.setattr(linear_hopper, "supported", lambda *args: True)
    monkeypatch.setattr(linear_hopper, "launch", fail)
    monkeypatch.setattr(L, "pick_config", lambda *args: cfg)
    monkeypatch.setattr(L, "_FAILED_CONFIGS", set())
    weight, scale = random_packed(70, 384)
    x = torch.randn(5, 384, device=DEVICE)
    with pytest.warns(UserWarning, match="Gluon could not compile"):
        y = L.launch_linear(x, weight, scale)
    assert_matches(y, reference64(x, weight, scale), torch.float32)
    assert_matches(L.launch_linear(x, weight, scale), reference64(x, weight, scale), torch.float32)  # no retry
    with pytest.raises(GluonRejects):
        L.launch_linear(x, weight, scale, cfg)


_HOPPER_COMPILE_SCRIPT = textwrap.dedent(r"""
    import torch
    from gsq_torch.ops import linear_hopper as H
    from gsq_torch.ops.cross_compile import compile_launch, record_launches

    meta = dict(device="meta")
    M, N, K = 4096, 8192, 8192
    with record_launches(H, ["_hopper_linear_kernel"]) as calls:
        for cfg in [(256, 128, 64, 8, 4, 8), (128, 128, 64, 4, 4, 4)]:
            H.launch(torch.empty(M, K, dtype=torch.bfloat16, **meta), torch.empty(N, K // 16, dtype=torch.int32, **meta),
                     torch.empty(N, K // 128, dtype=torch.bfloat16, **meta),
                     torch.empty(M, N, dtype=torch.bfloat16, **meta), *cfg)
    for kernel, args, kwargs in calls:
        compiled = compile_launch(kernel, args, kwargs)
        ptx = compiled.asm["ptx"]
        print("compiled", "wgmma.wait_group.sync.aligned 1;" in ptx, "setmaxnreg" in ptx, ".local" in ptx,
              compiled.metadata.shared)
""")


@pytest.mark.skipif(HAS_CUDA, reason="the CUDA tests run this kernel on the real card")
def test_hopper_kernel_compiles_for_sm90_with_wgmma_left_running():
    # Gluon has no interpreter: compile it for sm_90 as the GPU would, and check what the design rests on:
    # a step's wgmma is waited for one step later, the two partitions are warp-specialized (setmaxnreg
    # moves registers between them), nothing spills, the rings fit.
    pytest.importorskip("triton.backends.nvidia")
    if not linear_hopper.AVAILABLE:
        pytest.skip("this Triton has no Gluon")
    lines = [line.split() for line in run_compile_script(_HOPPER_COMPILE_SCRIPT).splitlines()
             if line.startswith("compiled")]
    assert len(lines) == 2
    for _, waits_late, specialized, spills, shared in lines:
        assert waits_late == "True" and specialized == "True" and spills == "False"
        assert int(shared) <= linear_hopper._SMEM_BYTES


# --- CUDA ---------------------------------------------------------------------------------------

QWEN_AND_LARGE = [(512, 2048), (2048, 512), (8192, 8192), (1000, 384)]


@pytest.mark.cuda
@pytest.mark.parametrize("N, K", QWEN_AND_LARGE)
@pytest.mark.parametrize("M", [1, 2, 4, 16, 33, 256, 1024])
def test_cuda_kernels_match_reference(M, N, K):
    weight, scale = random_packed(N, K, "cuda")
    x = torch.randn(M, K, device="cuda").to(torch.bfloat16)
    ref = x.float() @ format.dequantize(weight, scale, torch.float32).T  # fp32 on the card, no TF32
    assert_matches(L.linear(x, weight, scale), ref.double(), torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.parametrize("M", [1, 16])
def test_cuda_split_k_sums_in_a_fixed_order(M):
    # Whichever split program arrives last, it adds the parts in split order: bitwise repeatable.
    weight, scale = random_packed(4096, 4096, "cuda")
    x = torch.randn(M, 4096, device="cuda").to(torch.bfloat16)
    cfg = L.pick_config("forward", M, 4096, 4096)
    # "lines" / "decode" split K into block_k chunks; the others by split_k
    assert (4096 // cfg.block_k if cfg.kernel in ("lines", "decode") else cfg.split_k) > 1, cfg
    first = L.linear(x, weight, scale)
    for _ in range(3):
        assert torch.equal(L.linear(x, weight, scale), first)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("M", [1, 7, 300])
def test_cuda_fp16_and_fp32_activations(M, dtype):
    weight, scale = random_packed(768, 1024, "cuda")
    x = torch.randn(M, 1024, device="cuda").to(dtype)
    assert_matches(L.linear(x, weight, scale), reference64(x, weight, scale), dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("key", sorted(L.CONFIGS))
def test_cuda_every_table_config_matches_reference(key):
    direction, m_bucket, N, K = key
    weight, scale = random_packed(N, K, "cuda")
    if direction == "forward":
        x = torch.randn(m_bucket, K, device="cuda").to(torch.bfloat16)
        y, ref = L.launch_linear(x, weight, scale, L.CONFIGS[key]), reference64(x, weight, scale)
    else:
        g = torch.randn(m_bucket, N, device="cuda").to(torch.bfloat16)
        y = L.launch_linear_grad_input(g, weight, scale, L.CONFIGS[key])
        ref = g.double() @ format.dequantize(weight, scale, torch.float64)
    assert_matches(y, ref, torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.parametrize("M, N, K", [(1, 8192, 8192), (16, 2048, 512), (300, 512, 2048)])
def test_cuda_backward_matches_reference(M, N, K):
    weight, scale = random_packed(N, K, "cuda")
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(M, N, device="cuda").to(torch.bfloat16)
    L.linear(x, weight, scale).backward(g)
    ref = g.float() @ format.dequantize(weight, scale, torch.float32)
    assert_matches(x.grad, ref.double(), torch.bfloat16)


@pytest.mark.cuda
def test_cuda_compile_fullgraph():
    weight, scale = random_packed(2048, 512, "cuda")

    def f(x):
        return L.linear(torch.nn.functional.silu(x), weight, scale) * 2

    for M in (1, 64):
        x = torch.randn(M, 512, device="cuda", dtype=torch.bfloat16)
        torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x))


@pytest.mark.cuda
@pytest.mark.parametrize("M", [1, 16, 512])
def test_cuda_graph_capture_and_replay(M):
    weight, scale = random_packed(2048, 2048, "cuda")
    x = torch.randn(M, 2048, device="cuda", dtype=torch.bfloat16)
    L.linear(x, weight, scale)  # warm up: compile the kernel before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = L.linear(x, weight, scale)
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert_matches(y, reference64(x, weight, scale), torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.parametrize(
    "config", DECODE_CONFIGS[:2] + DECODE_CONFIGS[3:], ids=["m8-k512", "m16-k256-auto", "w8-k512", "k256-2-ahead"]
)
@pytest.mark.parametrize("M, N, K", [(1, 8192, 8192), (4, 8192, 8192), (16, 8192, 8192), (1, 512, 2048), (1, 2048, 512)])
def test_cuda_decode_kernel_matches_reference_and_replays_in_a_graph(config, M, N, K):
    _check_split_kernel_on_cuda(config, M, N, K)


def _check_split_kernel_on_cuda(config, M, N, K):
    """A "decode" / "lines" config against the fp32 reference on the GPU, then replayed in a CUDA graph:
    bitwise the same result, split counters back at zero."""
    weight, scale = random_packed(N, K, "cuda")
    x = torch.randn(M, K, device="cuda").to(torch.bfloat16)
    ref = x.float() @ format.dequantize(weight, scale, torch.float32).T
    y = L.launch_linear(x, weight, scale, config)
    assert_matches(y, ref.double(), torch.bfloat16)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = L.launch_linear(x, weight, scale, config)
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, y)  # fixed-order split sums: bitwise repeatable
    assert not L._LOCKS[weight.device].any()


@pytest.mark.cuda
@pytest.mark.parametrize("config", LINES_CONFIGS,
                         ids=["w2", "w1-ring", "w2-2-ahead", "m2-auto", "w4-wgmma", "m4-w4-ring"])
@pytest.mark.parametrize("M, N, K", [(1, 8192, 8192), (2, 8192, 8192), (1, 2048, 512), (1, 1000, 2048)])
def test_cuda_lines_kernel_matches_reference_and_replays_in_a_graph(config, M, N, K):
    _check_split_kernel_on_cuda(config, M, N, K)


@pytest.mark.cuda
@pytest.mark.parametrize("M", [1, 2])
def test_cuda_lines_chain_waits_for_the_launch_before(M):
    # With PDL each "lines" launch starts during the previous one's tail and loads its weights before
    # its wait: in a chain of dependent calls (each x the output before), eager and in a graph, every
    # output must be the reference applied to the output before it (a read ahead of the wait sees
    # the uninitialised buffer).
    N = K = 2048
    layers = [random_packed(N, K, "cuda") for _ in range(4)]
    x = torch.randn(M, K, device="cuda").to(torch.bfloat16)

    def chain(h):
        outs = [h]
        for weight, scale in layers:
            outs.append(L.launch_linear(outs[-1], weight, scale))
        return outs

    outs = chain(x)
    for (weight, scale), h, y in zip(layers, outs, outs[1:]):
        assert_matches(y, reference64(h, weight, scale), torch.bfloat16)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = chain(x)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(replayed, outs))


@pytest.mark.cuda
@pytest.mark.parametrize("config", HOPPER_CONFIGS, ids=HOPPER_IDS)
@pytest.mark.parametrize("M, N, K", [(300, 1000, 384), (1, 256, 128), (257, 136, 2048), (4096, 512, 2048),
                                     (1024, 8192, 8192)])
def test_cuda_hopper_kernel_matches_reference_and_replays_in_a_graph(config, M, N, K):
    if not linear_hopper.supported(torch.empty(1, K, device="cuda", dtype=torch.bfloat16),
                                   torch.empty(1, K // 16, device="cuda", dtype=torch.int32), config.block_k):
        pytest.skip("the hopper kernel needs Gluon and an sm_90 GPU")
    weight, scale = random_packed(N, K, "cuda")
    # x at an address TMA cannot take (2 bytes past 16-byte alignment): the launcher copies it
    x = torch.randn(M * K + 1, device="cuda").to(torch.bfloat16)[1:].view(M, K)
    ref = x.float() @ format.dequantize(weight, scale, torch.float32).T
    y = L.launch_linear(x, weight, scale, config)
    assert_matches(y, ref.double(), torch.bfloat16)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = L.launch_linear(x, weight, scale, config)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, y)
