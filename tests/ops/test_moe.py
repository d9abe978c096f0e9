"""gsq::fused_moe: the Triton kernels (interpreter on CPU, real on GPU) against the reference.

Dimension legend: T tokens, H hidden, I intermediate, E experts, K top-k.
"""

import dataclasses
import itertools
import textwrap

import pytest
import torch
import torch.nn.functional as F

from gsq_torch import format
from gsq_torch.ops import moe, moe_backward
from gsq_torch.ops.cross_compile import run_compile_script
from gsq_torch.ops.moe import ForwardConfig, MoEConfig, fused_moe, fused_moe_reference, fused_moe_triton

# The natural-order kernels (fp32 activations, backward), block_m 16, both unpack orders.
PAIRED = MoEConfig(16, 64, 128, 2, 4, 2, True, True)
NATURAL = MoEConfig(16, 128, 64, 2, 4, 2, False, False)
# The forward's two paths on CPU shapes: the GEMV decode and the permuted-unpack grouped MMAs
# (scale after the dot at small block_m, on the operand at large).
DECODE = ForwardConfig(True, block_n=16, block_n_down=32, num_warps=4, num_warps_down=4)
GROUPED = ForwardConfig(False, 16, 64, 64, 4, 4, 2)
GROUPED_BIG = ForwardConfig(False, 32, 128, 128, 8, 8, 2, scale_after_dot=False)
# 1-2 warps: mma.sync and its k order for x (prep) and act' (gate_up's epilogue for down)
GROUPED_SYNC = ForwardConfig(False, 16, 32, 32, 2, 2, 2)
GROUPED_SYNC_DOWN = ForwardConfig(False, 16, 64, 16, 4, 1, 2)  # wgmma gate_up, mma.sync down
GROUPED_SYNC_UP = ForwardConfig(False, 16, 16, 64, 1, 4, 2)  # and the other way round


def make_moe(T, K, E=8, H=256, I=128, dtype=torch.float32, device="cpu", seed=0, index=None):
    """Random packed experts (every code value, scales of both signs) and a routing."""
    g = torch.Generator().manual_seed(seed)
    gate_up = format.pack(torch.randint(0, 4, (E, 2 * I, H), generator=g))
    gate_up_scale = (torch.randn(E, 2 * I, H // 128, generator=g) * 0.05).to(torch.bfloat16)
    down = format.pack(torch.randint(0, 4, (E, H, I), generator=g))
    down_scale = (torch.randn(E, H, I // 128, generator=g) * 0.05).to(torch.bfloat16)
    x = torch.randn(T, H, generator=g).to(dtype)
    if index is None:
        index = (
            torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]) if T else torch.zeros(0, K)
        )
    weights = torch.rand(T, K, generator=g)
    args = (x, index.long(), weights, gate_up, gate_up_scale, down, down_scale)
    return tuple(a.to(device) for a in args)


def dense_moe(x, index, weights, gate_up, gate_up_scale, down, down_scale):
    """Token-by-token loop over dense dequantized weights: an oracle independent of the reference."""
    E, I = gate_up.shape[0], gate_up.shape[1] // 2
    w_gu = format.dequantize(gate_up, gate_up_scale, torch.float64)
    w_d = format.dequantize(down, down_scale, torch.float64)
    out = []
    for t in range(x.shape[0]):
        acc = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
        for k in range(index.shape[1]):
            e = int(index[t, k])
            if 0 <= e < E:
                h = w_gu[e] @ x[t].double()
                acc = acc + weights[t, k].double() * (w_d[e] @ (F.silu(h[:I]) * h[I:]))
        out.append(acc)
    return torch.stack(out).to(x.dtype)


def assert_close_to_reference(out, ref, tol=None):
    scale = ref.abs().max().clamp_min(1e-6)
    # fp32: the grouped path subtracts base * sum(x') after the MMA (about 7 bits cancel)
    tol = tol or (1e-4 if out.dtype == torch.float32 else 2e-2)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert ((out.float() - ref.float()).abs().max() / scale) < tol


def compiled_kernels(script):
    """Run a compile script in a fresh process; its ``compiled ...`` lines, split, and the whole stdout."""
    stdout = run_compile_script(script)
    return [line.split() for line in stdout.splitlines() if line.startswith("compiled")], stdout


# --- the reference ---------------------------------------------------------------------------


def test_reference_matches_dense_token_loop():
    args = make_moe(5, 3, index=torch.tensor([[0, 8, 2], [2, 2, 1], [7, 0, 3], [8, 8, 8], [5, 6, 4]]))
    ref = fused_moe_reference(*args)
    torch.testing.assert_close(ref, dense_moe(*args), rtol=1e-5, atol=1e-5)
    assert ref[3].abs().max() == 0  # only padding ids: no contribution


def test_fused_moe_rejects_bad_inputs():
    x, idx, w, gu, gus, d, ds = make_moe(2, 2)
    with pytest.raises(ValueError, match="top_k_weights"):
        fused_moe(x, idx, w[:, :1], gu, gus, d, ds)
    with pytest.raises(TypeError, match="int32"):
        fused_moe(x, idx, w, gu.float(), gus, d, ds)
    with pytest.raises(ValueError, match="down_proj"):
        fused_moe(x, idx, w, gu, gus, d[:, :128], ds[:, :128])


# --- Triton kernels under the interpreter ----------------------------------------------------


@pytest.mark.parametrize(
    "T, K, config",
    [
        (1, 8, None),  # the T = 1 bucket's own config (decode)
        (3, 1, DECODE),  # k = 1
        (3, 3, DECODE),  # K not a power of 2
        (17, 4, GROUPED),  # T * K not a multiple of block_m
        (9, 2, GROUPED_BIG),  # 8 warps, operand scaling
        (17, 4, GROUPED_SYNC),
        (9, 3, GROUPED_SYNC_DOWN),
        (9, 3, GROUPED_SYNC_UP),
        (17, 4, NATURAL),  # natural-order kernels
        (40, 2, PAIRED),
    ],
)
def test_triton_matches_reference(T, K, config):
    args = make_moe(T, K, seed=T)
    out = fused_moe_triton(*args, config=config)
    assert_close_to_reference(out, fused_moe_reference(*args))


@pytest.mark.parametrize("config", [DECODE, GROUPED, GROUPED_SYNC])
def test_triton_skips_padding_ids_and_empty_experts(config):
    # Expert ids == E (transformers' padding slot) contribute nothing; experts 1, 3, 5, 6 get no token.
    index = torch.tensor([[0, 8], [2, 8], [8, 8], [7, 4], [0, 2]])
    args = make_moe(5, 2, index=index)
    out = fused_moe_triton(*args, config=config)
    ref = fused_moe_reference(*args)
    assert_close_to_reference(out, ref)
    assert out[2].abs().max() == 0


def test_triton_all_tokens_on_one_expert():
    args = make_moe(33, 1, E=4, index=torch.full((33, 1), 2))  # 33 rows: 3 blocks of 16, one partly filled
    assert_close_to_reference(fused_moe_triton(*args, config=GROUPED), fused_moe_reference(*args))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_low_precision_activations(dtype):
    # bf16 / fp16 build their own magic-number operands (fp32 MMAs in the interpreter).
    args = make_moe(6, 2, E=4, H=128, dtype=dtype)
    ref = fused_moe_reference(*args)
    assert_close_to_reference(fused_moe_triton(*args, config=GROUPED), ref)
    assert_close_to_reference(fused_moe_triton(*args, config=DECODE), ref)


# --- decode path (GEMV) ----------------------------------------------------------------------

DECODE_SMALL = ForwardConfig(True, block_n=4, block_n_down=8, num_warps=4, num_warps_down=4, pdl=True)


def _float64_reference(args):
    """The reference in float64 on the same (rounded) inputs: the kernels' target, not their peer."""
    x, idx, w, gu, gus, d, ds = args
    return fused_moe_reference(x.double(), idx, w.double(), gu, gus, d, ds)


@pytest.mark.parametrize(
    "T, K, config, index",
    [
        (1, 8, DECODE_SMALL, None),  # T = 1, every expert (E = 8)
        (5, 3, DECODE_SMALL, None),  # T and K not powers of 2, a partial K_PAD
        (3, 1, DECODE_SMALL, None),  # k = 1
        (7, 2, DECODE, torch.full((7, 2), 5)),  # all slots on one expert (twice per token)
        (4, 2, DECODE_SMALL, torch.tensor([[0, 8], [8, 8], [3, -1], [3, 0]])),  # padding ids, idle experts
    ],
)
def test_decode_matches_float64_reference(T, K, config, index):
    args = make_moe(T, K, seed=100 + T, index=index)
    out = fused_moe_triton(*args, config=config)
    _assert_float64_close(out, args, tol=1e-5)
    _assert_dead_rows_zero(out, index)


def _assert_dead_rows_zero(out, index, num_experts=8):
    """Tokens with no slot on a real expert get exactly zero."""
    if index is not None:
        dead = ((index < 0) | (index >= num_experts)).all(dim=1)
        assert (out[dead] == 0).all()


def test_decode_every_code_value_and_negative_scales():
    # Each word holds codes 0, 1, 2, 3 in rotating positions (row r starts at code r % 4), so
    # every (position, code) pair occurs; scales alternate in sign.
    E, H, I, T, K = 2, 256, 128, 2, 2
    pos = torch.arange(H)
    gate_up_codes = (pos[None, :] + torch.arange(2 * I)[:, None]) % 4
    down_codes = (torch.arange(I)[None, :] + torch.arange(H)[:, None]) % 4
    gu = format.pack(gate_up_codes.expand(E, -1, -1))
    d = format.pack(down_codes.expand(E, -1, -1))

    def signed(scale, rows, groups):  # +scale, -scale, ... in memory order
        return (scale * (1 - 2 * (torch.arange(rows * groups) % 2))).view(rows, groups).expand(E, -1, -1)

    gus, ds = signed(0.03, 2 * I, H // 128), signed(0.02, H, I // 128)
    x = torch.randn(T, H)
    idx = torch.tensor([[0, 1], [1, 0]])
    w = torch.rand(T, K)
    args = (x, idx, w, gu.contiguous(), gus.to(torch.bfloat16).contiguous(), d.contiguous(),
            ds.to(torch.bfloat16).contiguous())
    out = fused_moe_triton(*args, config=DECODE_SMALL)
    ref = dense_moe(x.double(), idx, w, *args[3:])
    assert ((out.double() - ref).abs().max() / ref.abs().max()) < 1e-5


def test_decode_is_deterministic_and_pdl_is_launch_only():
    args = make_moe(3, 4, seed=7)
    a = fused_moe_triton(*args, config=DECODE_SMALL)
    b = fused_moe_triton(*args, config=DECODE_SMALL)
    c = fused_moe_triton(*args, config=dataclasses.replace(DECODE_SMALL, pdl=False))
    assert torch.equal(a, b) and torch.equal(a, c)


_DECODE_COMPILE_SCRIPT = textwrap.dedent(r"""
    import torch
    from gsq_torch.ops import moe as M
    from gsq_torch.ops.cross_compile import compile_launch, meta_moe_weights, record_launches

    M.pdl_supported = lambda device: True  # meta tensors, no GPU
    meta = dict(device="meta")
    E, H, I, K = 256, 2048, 512, 8
    weights = meta_moe_weights(E, H, I)
    with record_launches(M, ("_gate_up_gemv_kernel", "_down_gemv_kernel")) as calls:
        for T in (1, 4):
            cfg = M.ForwardConfig(True, block_n=8, block_n_down=8, pdl=True) if T == 4 else M.forward_config(T * K)
            M.fused_moe_triton(torch.empty(T, H, dtype=torch.bfloat16, **meta), torch.empty(T, K, dtype=torch.int64, **meta),
                               torch.empty(T, K, dtype=torch.bfloat16, **meta), *weights, config=cfg)
    for kernel, args, kwargs in calls:
        ptx = compile_launch(kernel, args, kwargs).asm["ptx"]
        print("compiled", kernel.__name__, kwargs["PDL"], "griddepcontrol.wait" in ptx,
              "griddepcontrol.launch_dependents" in ptx, ".local" in ptx)
""")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA tests compile these kernels for the real card")
def test_decode_kernels_compile_for_sm90_with_pdl():
    # The interpreter skips PDL: check that both GEMVs compile for Hopper with it, that gate_up
    # triggers the dependent launch and that down waits (and nothing goes to local memory).
    pytest.importorskip("triton.backends.nvidia")
    lines, stdout = compiled_kernels(_DECODE_COMPILE_SCRIPT)
    pdl_on = [line for line in lines if line[2] == "True"]
    assert len(lines) == 4 and pdl_on, stdout
    for _, name, _, waits, triggers, local in pdl_on:
        assert local == "False"
        assert (waits, triggers) == (("True", "False") if "down" in name else ("False", "True"))


# --- decode on tensor cores (``mma``): one slot per gate_up program, one token per down program --

# 2 * block_n MMA rows over 4 warps, N side 16; and 8 warps for down, N side 8 (= K_PAD at K = 8).
DECODE_MMA = ForwardConfig(True, block_m=16, block_n=64, block_n_down=64, mma=True, pdl=True)
DECODE_MMA_B = ForwardConfig(True, block_m=8, block_n=32, block_n_down=128, num_warps_down=8, mma=True)
# Slots of one expert paired up in gate_up (column 1 of the N side holds the second slot).
DECODE_MMA_PAIR = ForwardConfig(True, block_m=16, block_n=64, block_n_down=64, mma=True, pair=True)
# 2 warps run mma.sync (another operand k order); gate_up then writes act' in down's order (wgmma below).
DECODE_MMA_SYNC = ForwardConfig(True, block_m=16, block_n=32, block_n_down=32, num_warps=2, num_warps_down=2,
                                mma=True, pdl=True)
DECODE_MMA_MIXED = ForwardConfig(True, block_m=16, block_n=32, block_n_down=64, num_warps=2, num_warps_down=4,
                                 mma=True, pair=True)
# x permuted by a prep launch (gate_up's B operand then a masked tile load), in both k orders.
DECODE_MMA_PREP = dataclasses.replace(DECODE_MMA, prep=True)
DECODE_MMA_PREP_SYNC = dataclasses.replace(DECODE_MMA_MIXED, prep=True)


def _assert_float64_close(out, args, tol=3e-4):
    # The MMA paths subtract base * sum(x') after the dot (about 7 bits of the fp32 sum cancel),
    # and the interpreter's fp32 matmul sums in an order that depends on the N side's width:
    # errors of 1e-5 to 1e-4 (the GEMV, which cancels 2 bits, stays below 1e-6).
    ref = _float64_reference(args)
    assert torch.isfinite(out).all()
    err = (out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-6)
    assert err < tol, f"relative error {err:.3g}"


@pytest.mark.parametrize(
    "T, K, config, index",
    [
        (1, 8, DECODE_MMA, None),  # every expert (E = 8)
        (3, 8, DECODE_MMA_B, None),
        (5, 3, DECODE_MMA, None),  # K not a power of 2: a partial K_PAD
        (16, 8, DECODE_MMA_B, None),  # 128 slots
        (3, 1, DECODE_MMA_B, None),  # k = 1: one slot per token, F = block_n_down features
        (16, 1, DECODE_MMA, None),
        (7, 2, DECODE_MMA, torch.full((7, 2), 5)),  # all slots on one expert (twice per token)
        (4, 2, DECODE_MMA_B, torch.tensor([[0, 8], [8, 8], [3, -1], [3, 0]])),  # padding ids, idle experts
        (7, 2, DECODE_MMA_PAIR, torch.full((7, 2), 5)),  # 14 slots of one expert: 7 pairs
        (5, 3, DECODE_MMA_PAIR, torch.tensor([[1, 2, 3], [3, 8, 1], [1, 3, 3], [-1, 0, 1], [4, 5, 6]])),  # odd counts
        (6, 4, DECODE_MMA_PAIR, None),  # random pairs (E = 8)
        (1, 8, DECODE_MMA_PAIR, None),  # no pairs
        (5, 3, DECODE_MMA_SYNC, None),
        (7, 2, DECODE_MMA_SYNC, torch.full((7, 2), 5)),
        (4, 2, DECODE_MMA_SYNC, torch.tensor([[0, 8], [8, 8], [3, -1], [3, 0]])),
        (6, 4, DECODE_MMA_MIXED, None),
        (5, 3, DECODE_MMA_PREP, None),
        (7, 2, DECODE_MMA_PREP_SYNC, torch.full((7, 2), 5)),
        (4, 2, DECODE_MMA_PREP_SYNC, torch.tensor([[0, 8], [8, 8], [3, -1], [3, 0]])),
    ],
)
def test_decode_mma_matches_float64_reference(T, K, config, index):
    args = make_moe(T, K, seed=200 + T, index=index)
    out = fused_moe_triton(*args, config=config)
    _assert_float64_close(out, args)
    _assert_dead_rows_zero(out, index)


def test_decode_mma_every_code_value_and_negative_scales():
    # As for the GEMV: every (position, code) pair, scales alternating in sign along each row.
    E, H, I, T, K = 2, 256, 128, 3, 2
    pos = torch.arange(H)
    gu = format.pack(((pos[None, :] + torch.arange(2 * I)[:, None]) % 4).expand(E, -1, -1))
    d = format.pack(((torch.arange(I)[None, :] + torch.arange(H)[:, None]) % 4).expand(E, -1, -1))

    def signed(scale, rows, groups):
        return (scale * (1 - 2 * (torch.arange(rows * groups) % 2))).view(rows, groups).expand(E, -1, -1)

    args = (torch.randn(T, H), torch.tensor([[0, 1], [1, 0], [1, 1]]), torch.rand(T, K), gu.contiguous(),
            signed(0.03, 2 * I, H // 128).to(torch.bfloat16).contiguous(), d.contiguous(),
            signed(0.02, H, I // 128).to(torch.bfloat16).contiguous())
    for config in (DECODE_MMA, DECODE_MMA_B, DECODE_MMA_PAIR, DECODE_MMA_SYNC, DECODE_MMA_MIXED, DECODE_MMA_PREP,
                   DECODE_MMA_PREP_SYNC):
        out = fused_moe_triton(*args, config=config)
        ref = dense_moe(args[0].double(), *args[1:])
        assert ((out.double() - ref).abs().max() / ref.abs().max()) < 3e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_mma_low_precision_activations(dtype):
    args = make_moe(5, 4, dtype=dtype, seed=3)
    assert_close_to_reference(fused_moe_triton(*args, config=DECODE_MMA), fused_moe_reference(*args))


def test_decode_mma_is_deterministic_and_pdl_is_launch_only():
    args = make_moe(3, 4, seed=7)
    a = fused_moe_triton(*args, config=DECODE_MMA)
    b = fused_moe_triton(*args, config=DECODE_MMA)
    c = fused_moe_triton(*args, config=dataclasses.replace(DECODE_MMA, pdl=False))
    assert torch.equal(a, b) and torch.equal(a, c)
    p = fused_moe_triton(*args, config=DECODE_MMA_PAIR)
    assert torch.equal(p, fused_moe_triton(*args, config=DECODE_MMA_PAIR))
    # prep only moves where bf16 x is permuted (and its constant parts summed): the same values reach
    # the same MMAs
    args = make_moe(3, 4, seed=7, dtype=torch.bfloat16)
    for config in (DECODE_MMA, DECODE_MMA_MIXED):
        prepped = dataclasses.replace(config, prep=True)
        assert torch.equal(fused_moe_triton(*args, config=config), fused_moe_triton(*args, config=prepped))


def test_decode_mma_config_checks_and_fallback():
    args = make_moe(2, 8)
    with pytest.raises(ValueError, match="block_n"):  # 2 * 16 MMA rows over 4 warps
        fused_moe_triton(*args, config=dataclasses.replace(DECODE_MMA, block_n=16))
    with pytest.raises(ValueError, match="block_n_down"):  # 8 slots x 0 features
        fused_moe_triton(*args, config=dataclasses.replace(DECODE_MMA_B, block_n_down=4, num_warps_down=4))
    with pytest.raises(ValueError, match="prep"):
        fused_moe_triton(*args, config=dataclasses.replace(DECODE_MMA_PREP, ablate=moe.ABLATE_GU_NO_X))
    # A token's K slots do not fit the N side (block_m 4 < K = 8): the GEMV takes over.
    out = fused_moe_triton(*args, config=dataclasses.replace(DECODE_MMA, block_m=4))
    gemv = fused_moe_triton(*args, config=dataclasses.replace(moe.GEMV_FALLBACK, pdl=True))
    assert torch.equal(out, gemv)


_MMA_COMPILE_SCRIPT = _DECODE_COMPILE_SCRIPT.replace(
    '("_gate_up_gemv_kernel", "_down_gemv_kernel")', '("_gate_up_slot_kernel", "_down_slot_kernel")').replace(
    "cfg = M.ForwardConfig(True, block_n=8, block_n_down=8, pdl=True) if T == 4 else M.forward_config(T * K)",
    "cfg = M.ForwardConfig(True, block_n=64, block_n_down=64 if T == 4 else 128, num_warps=4 if T == 4 else 2, "
    "num_warps_down=4 if T == 4 else 8, mma=True, pdl=True, pair=T == 4)").replace(
    """".local" in ptx)""", """".local" in ptx, "wgmma.mma_async" in ptx, "mma.sync.aligned" in ptx)""")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA tests compile these kernels for the real card")
def test_decode_mma_kernels_compile_for_sm90():
    # Both kernels compile for Hopper with nothing in local memory, on wgmma (4 or 8 warps) or, the
    # second gate_up (2 warps), on mma.sync; PDL as for the GEMV.
    pytest.importorskip("triton.backends.nvidia")
    assert _MMA_COMPILE_SCRIPT.count("_slot_kernel") == 2 and "mma=True" in _MMA_COMPILE_SCRIPT
    lines, stdout = compiled_kernels(_MMA_COMPILE_SCRIPT)
    assert len(lines) == 4, stdout
    for i, (_, name, pdl, waits, triggers, local, wgmma, mma_sync) in enumerate(lines):
        two_warps = i == 0  # calls: gate_up (2 warps), down (T = 1), gate_up, down (T = 4)
        assert (pdl, local) == ("True", "False")
        assert (wgmma, mma_sync) == (("False", "True") if two_warps else ("True", "False")), (name, stdout)
        assert (waits, triggers) == (("True", "False") if "down" in name else ("False", "True"))


_GROUPED_COMPILE_SCRIPT = textwrap.dedent(r"""
    import torch
    from gsq_torch.ops import moe as M, moe_align as A
    from gsq_torch.ops.cross_compile import compile_launch, meta_moe_weights, record_launches

    M.pdl_supported = lambda device: True  # meta tensors, no GPU
    meta = dict(device="meta")
    E, H, I, K = 256, 2048, 512, 8
    weights = meta_moe_weights(E, H, I)
    with record_launches(M, ("_gate_up_mma_kernel", "_down_mma_kernel", "_prep_x_kernel")) as calls, \
            record_launches(A, [n for n in dir(A) if n.endswith("_kernel")]):
        for T in (64, 1024):  # the mma.sync and a wgmma bucket
            M.fused_moe_triton(torch.empty(T, H, dtype=torch.bfloat16, **meta), torch.empty(T, K, dtype=torch.int64, **meta),
                               torch.empty(T, K, dtype=torch.bfloat16, **meta), *weights)
    for kernel, args, kwargs in calls:
        if kernel.__name__ != "_prep_x_kernel":
            ptx = compile_launch(kernel, args, kwargs).asm["ptx"]
            print("compiled", kernel.__name__, kwargs["num_warps"], ".local" in ptx, "wgmma.mma_async" in ptx,
                  "mma.sync.aligned" in ptx)
""")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA tests compile these kernels for the real card")
def test_grouped_kernels_compile_for_sm90_on_mma_sync_and_wgmma():
    # The grouped buckets' kernels compile for Hopper with nothing in local memory: 1-2 warps on
    # mma.sync (T = 25..256), 4-8 on wgmma.
    pytest.importorskip("triton.backends.nvidia")
    lines, stdout = compiled_kernels(_GROUPED_COMPILE_SCRIPT)
    assert len(lines) == 4, stdout
    for _, name, warps, local, wgmma, mma_sync in lines:
        assert local == "False", (name, stdout)
        assert (wgmma, mma_sync) == (("False", "True") if int(warps) < 4 else ("True", "False")), (name, stdout)
    assert [int(line[2]) < 4 for line in lines] == [True, True, False, False], stdout


# --- the "lines" decode (ops/moe_lines.py) ------------------------------------------------------

LINES = ForwardConfig(True, num_warps=2, num_warps_down=2, group_m=2, pdl=True, lines=True)
LINES_SHAPE = {"E": 4, "H": 512, "I": 1024}  # whole 512-input chunks: 1 of H, 2 of I


@pytest.mark.parametrize("T, K, index", [
    (1, 2, None),
    (3, 2, torch.tensor([[0, -1], [3, 4], [3, 3]])),  # ids outside [0, E) dropped, an expert twice, one never
    (2, 1, None),
])
def test_lines_decode_matches_reference(T, K, index):
    args = make_moe(T, K, dtype=torch.bfloat16, seed=3, index=index, **LINES_SHAPE)
    ref = fused_moe_reference(*args)
    out = fused_moe_triton(*args, config=LINES)
    assert_close_to_reference(out, ref)
    assert_close_to_reference(out, dense_moe(*args))
    # One split order, no atomics: the same bits every call, with or without the early launch, any tiling.
    assert torch.equal(out, fused_moe_triton(*args, config=LINES))
    assert torch.equal(out, fused_moe_triton(*args, config=dataclasses.replace(LINES, pdl=False)))
    assert torch.equal(out, fused_moe_triton(*args, config=dataclasses.replace(LINES, group_m=8)))


def test_lines_config_checks_and_fallback():
    args = make_moe(2, 2, dtype=torch.bfloat16, **LINES_SHAPE)
    with pytest.raises(ValueError, match="block_n_down"):  # 3 x 64 rows do not tile H = 512
        fused_moe_triton(*args, config=dataclasses.replace(LINES, group_m=3))
    with pytest.raises(ValueError, match="num_warps"):
        fused_moe_triton(*args, config=dataclasses.replace(LINES, num_warps=3))
    # H = 256 is not a whole chunk: the lines bucket's inputs take the table without lines.
    args = make_moe(2, 2, dtype=torch.bfloat16)
    assert not moe.moe_lines.supported(args[0], 256, 128)
    out = fused_moe_triton(*args, config=LINES)
    assert torch.equal(out, fused_moe_triton(*args, config=moe.forward_config(2 * 2, lines=False)))
    assert_close_to_reference(out, fused_moe_reference(*args))


_LINES_COMPILE_SCRIPT = textwrap.dedent(r"""
    import torch
    from gsq_torch.ops import linear as L, moe as M, moe_lines as ML
    from gsq_torch.ops.cross_compile import compile_launch, meta_moe_weights, record_launches

    ML.pdl_supported = lambda device: True  # meta tensors, no GPU
    L.interpreting = lambda: False
    meta = dict(device="meta")
    E, H, I, K = 256, 2048, 512, 8
    weights = meta_moe_weights(E, H, I)
    with record_launches(ML, ("_gate_up_lines_kernel", "_down_lines_kernel")) as calls:
        for T in (2, 16):  # the lines buckets (2 and 4 down tiles)
            M.fused_moe_triton(torch.empty(T, H, dtype=torch.bfloat16, **meta), torch.empty(T, K, dtype=torch.int64, **meta),
                               torch.empty(T, K, dtype=torch.bfloat16, **meta), *weights)
    for kernel, args, kwargs in calls:
        ptx = compile_launch(kernel, args, kwargs).asm["ptx"]
        print("compiled", kernel.__name__, ".local" in ptx, "mma.sync.aligned" in ptx, "griddepcontrol.wait" in ptx,
              "griddepcontrol.launch_dependents" in ptx)
""")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA tests compile these kernels for the real card")
def test_lines_kernels_compile_for_sm90():
    # Both kernels compile for Hopper on mma.sync with nothing in local memory; only down waits for the launch
    # before (gate_up is the op's first), both let the next launch start early.
    pytest.importorskip("triton.backends.nvidia")
    lines, stdout = compiled_kernels(_LINES_COMPILE_SCRIPT)
    assert len(lines) == 4, stdout
    for _, name, local, mma_sync, waits, triggers in lines:
        assert (local, mma_sync, triggers) == ("False", "True", "True"), (name, stdout)
        assert waits == ("True" if "down" in name else "False"), (name, stdout)


@pytest.mark.parametrize("v2", [False, True])
def test_permuted_layout_round_trips_and_prep_matches(v2):
    # The MMA k orders (wgmma's, and mma.sync's with V2: bits h, j, q instead of h, q, j): each a
    # permutation of a group, and the prep kernel writes x at those positions, scaled by 4^-j, with
    # base * sum(x') + 2 * sum(x).
    T, H = 5, 256
    x = torch.randn(T, H).to(torch.bfloat16)
    xp, q = torch.empty_like(x), torch.empty(T, H // 128)
    moe._prep_x_kernel[(2, H // 128)](x, xp, q, T, H=H, BLOCK_T=4, MAGIC_BASE=128.0, CODE_OFFSET=2,
                                      GROUP_SIZE=128, V2=v2)
    k = torch.arange(128)
    q_bits, j = ((k >> 2) & 3, (k >> 1) & 1) if v2 else ((k >> 1) & 3, (k >> 3) & 1)
    code = 16 * (2 * q_bits + ((k >> 6) & 1)) + 4 * ((k >> 5) & 1) + 2 * ((k >> 4) & 1) + j + 8 * (k & 1)
    assert sorted(code.tolist()) == list(range(128))
    step = torch.where(j == 1, 0.25, 1.0)
    want = x.float().view(T, -1, 128)[:, :, code] * step
    assert torch.equal(xp.float().view(T, -1, 128), want)
    torch.testing.assert_close(q, (128 * want + 2 * x.float().view(T, -1, 128)).sum(-1))


def test_zero_tokens_returns_empty():
    args = make_moe(0, 2)
    assert fused_moe_triton(*args).shape == (0, 256)
    assert fused_moe(*args).shape == (0, 256)
    gx, gw, _, _ = moe_backward.fused_moe_backward_triton(torch.zeros(0, 256), *args, False)
    assert gx.shape == (0, 256) and gw.shape == (0, 2)


def test_forward_config_buckets_cover_all_sizes():
    assert moe.forward_config(1).decode
    assert moe.forward_config(10**9) == moe.FORWARD_CONFIGS[-1][1]
    assert moe.forward_config(10**9, lines=False) == moe.NO_LINES_CONFIGS[-1][1]
    assert not any(cfg.lines for _, cfg in moe.NO_LINES_CONFIGS)
    for _, cfg in moe.FORWARD_CONFIGS + moe.NO_LINES_CONFIGS:
        if cfg.lines:  # 64-row tiles of mma.sync that divide H and I whenever they are whole 512-input chunks
            assert cfg.decode and cfg.block_n == cfg.block_n_down == 64 and 512 % (64 * cfg.group_m) == 0
            assert cfg.num_warps in (1, 2) and cfg.num_warps_down in (1, 2)
        if not cfg.decode:  # the grouped kernels' layout constraints (checked at launch too)
            # (wgmma takes N >= 16 without a register shuffle; mma.sync, 1-2 warps, takes 8)
            assert cfg.block_m & (cfg.block_m - 1) == 0
            assert cfg.block_m >= 16 or max(cfg.num_warps, cfg.num_warps_down) < 4
            assert cfg.block_n % (16 * cfg.num_warps) == 0 and 128 % cfg.block_n == 0
            assert cfg.num_warps in (1, 2, 4, 8) and cfg.num_warps_down in (1, 2, 4, 8)
            assert cfg.block_n_down % (16 * cfg.num_warps_down) == 0


def test_grouped_config_checks_layout_constraints():
    args = make_moe(2, 2)
    with pytest.raises(ValueError, match="block_n"):
        fused_moe_triton(*args, config=ForwardConfig(False, 16, 32, 64, 4, 4, 2))
    with pytest.raises(ValueError, match=r"block_n_down=16 must be a multiple of 16 \* num_warps \(2: 1 or 2"):
        fused_moe_triton(*args, config=ForwardConfig(False, 16, 32, 16, 2, 2, 2))
    with pytest.raises(ValueError, match=r"num_warps \(3: 1 or 2 run mma.sync, 4 or 8 wgmma\)"):
        fused_moe_triton(*args, config=ForwardConfig(False, 16, 48, 48, 3, 3, 2))


# --- op registration, compile ----------------------------------------------------------------


def test_opcheck_fused_moe():
    args = make_moe(3, 2, E=4, H=128)
    torch.library.opcheck(torch.ops.gsq.fused_moe.default, args)


def test_opcheck_fused_moe_backward():
    args = make_moe(3, 2, E=4, H=128)
    grad = torch.randn(3, 128)
    for scale_grads in (False, True):
        torch.library.opcheck(torch.ops.gsq.fused_moe_backward.default, (grad, *args, scale_grads))


def test_compile_fullgraph_on_cpu():
    args = make_moe(4, 2, E=4, H=128)
    compiled = torch.compile(fused_moe, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), fused_moe(*args))


# --- gradients -------------------------------------------------------------------------------


def test_gradcheck_float64():
    x, idx, w, gu, gus, d, ds = make_moe(
        3, 2, E=3, H=128, dtype=torch.float64, index=torch.tensor([[0, 2], [2, 3], [1, 0]])
    )
    leaves = [x.requires_grad_(True)] + [t.double().requires_grad_(True) for t in (w, gus, ds)]
    # fast_mode: random projections of the Jacobian; the full one takes minutes on 2 cores.
    assert torch.autograd.gradcheck(
        lambda *a: fused_moe(a[0], idx, a[1], gu, a[2], d, a[3]), leaves, fast_mode=True
    )


def test_op_grads_match_autograd_through_dense_weights():
    x, idx, w, gu, gus, d, ds = make_moe(
        4, 2, E=4, H=128, index=torch.tensor([[0, 3], [3, 4], [1, 0], [2, 2]])
    )
    leaves = [
        x.clone().requires_grad_(True),
        w.clone().requires_grad_(True),
        gus.float().requires_grad_(True),
        ds.float().requires_grad_(True),
    ]
    grad = torch.randn(4, 128)
    got = torch.autograd.grad(fused_moe(leaves[0], idx, leaves[1], gu, leaves[2], d, leaves[3]), leaves, grad)
    dense = [t.detach().double().requires_grad_(True) for t in leaves]
    want = torch.autograd.grad(
        dense_moe(dense[0], idx, dense[1], gu, dense[2], d, dense[3]), dense, grad.double()
    )
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


def test_no_scale_grads_unless_requested():
    x, idx, w, gu, gus, d, ds = make_moe(2, 2, E=4, H=128)
    x.requires_grad_(True)
    (gx,) = torch.autograd.grad(fused_moe(x, idx, w, gu, gus, d, ds).sum(), [x])
    assert gx.shape == x.shape and gus.grad is None


@pytest.mark.parametrize("T", [3, 17])
def test_triton_backward_matches_reference(T):
    args = make_moe(T, 2, E=4, seed=T)
    grad = torch.randn(T, 256)
    got = moe_backward.fused_moe_backward_triton(grad, *args, True)
    want = moe_backward.fused_moe_backward_reference(grad, *args, True)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-4 * b.float().abs().max().item())


# --- GPU -------------------------------------------------------------------------------------

QWEN = {"E": 256, "H": 2048, "I": 512}


def _gpu_close(out, ref):
    err = (out.float() - ref.float()).abs().max() / ref.float().abs().max()
    assert err < 2e-2, f"relative error {err:.3g}"


@pytest.mark.cuda
@pytest.mark.parametrize("T", [1, 2, 4, 12, 16, 24, 32, 64, 256, 1024, 4096])
def test_cuda_qwen_shapes_match_reference(T):
    args = make_moe(T, 8, dtype=torch.bfloat16, device="cuda", **QWEN)
    ref = fused_moe_reference(*args)
    _gpu_close(fused_moe(*args), ref)  # the bucket's own path and config
    if T <= 24:  # both paths where either could win
        _gpu_close(fused_moe_triton(*args, config=ForwardConfig(True, block_n=16, block_n_down=16)), ref)
        _gpu_close(fused_moe_triton(*args, config=ForwardConfig(False, 16, 64, 64, 4, 4, 4)), ref)


@pytest.mark.cuda
@pytest.mark.parametrize("config", list(dict.fromkeys(cfg for _, cfg in moe.FORWARD_CONFIGS + moe.NO_LINES_CONFIGS)))
def test_cuda_every_bucket_config(config):
    args = make_moe(64, 8, dtype=torch.bfloat16, device="cuda", **QWEN)
    ref = fused_moe_reference(*args)
    _gpu_close(fused_moe_triton(*args, config=config), ref)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_cuda_other_dtypes(dtype):
    args = make_moe(40, 8, dtype=dtype, device="cuda", **QWEN)
    _gpu_close(fused_moe(*args), fused_moe_reference(*args))


@pytest.mark.cuda
@pytest.mark.parametrize("T", [1, 2, 16, 256])
def test_cuda_graph_capture_and_replay(T):
    args = make_moe(T, 8, dtype=torch.bfloat16, device="cuda", **QWEN)
    x = args[0].clone()
    fused_moe(x, *args[1:])  # compile kernels outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe(x, *args[1:])
    x.copy_(torch.randn_like(x))
    args[1].copy_(torch.randint(0, 256, args[1].shape, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    _gpu_close(out, fused_moe_reference(x, *args[1:]))


@pytest.mark.cuda
@pytest.mark.parametrize("T", [1, 4, 16, 64])
def test_cuda_chained_calls_wait_for_the_launch_before(T):
    # The op's launches are programmatic dependents of each other (weights and routing read before
    # each wait): in a chain of dependent calls (x the output before), eager and in a graph, each
    # output must match the reference on the output before it.
    x, idx, w, *weights = make_moe(T, 8, dtype=torch.bfloat16, device="cuda", **QWEN)

    def chain(h):
        outs = [h]
        for _ in range(3):
            outs.append(fused_moe(outs[-1], idx, w, *weights))  # nothing between the launches
        return outs

    outs = chain(x)
    for h, y in itertools.pairwise(outs):
        _gpu_close(y, fused_moe_reference(h, idx, w, *weights))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = chain(x)
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(replayed, outs))


@pytest.mark.cuda
def test_cuda_compile_fullgraph():
    args = make_moe(16, 8, dtype=torch.bfloat16, device="cuda", **QWEN)
    compiled = torch.compile(fused_moe, fullgraph=True)
    _gpu_close(compiled(*args), fused_moe_reference(*args))


@pytest.mark.cuda
@pytest.mark.parametrize("T", [1, 64, 1024])
def test_cuda_backward_matches_reference(T):
    x, idx, w, gu, gus, d, ds = make_moe(T, 8, dtype=torch.bfloat16, device="cuda", **QWEN)
    leaves = [
        x.requires_grad_(True),
        w.requires_grad_(True),
        gus.requires_grad_(True),
        ds.requires_grad_(True),
    ]
    grad = torch.randn_like(x)
    got = torch.autograd.grad(fused_moe(x, idx, w, gu, gus, d, ds), leaves, grad)
    want = moe_backward.fused_moe_backward_reference(
        grad, x.detach(), idx, w.detach(), gu, gus.detach(), d, ds.detach(), True
    )
    for a, b in zip(got, [want[0], want[1], want[2], want[3]]):
        _gpu_close(a, b)
