"""gsq::linear_grad_scale: the Triton kernel (interpreter on CPU, real on CUDA) against the float64
reference, registration, gradcheck of gsq::linear with respect to its scales, and a Hopper compile."""

import os
import textwrap

import pytest
import torch

from gsq_torch import format
from gsq_torch.ops import linear as L
from gsq_torch.ops import linear_backward as LB
from gsq_torch.ops.cross_compile import run_compile_script

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
needs_kernels = pytest.mark.skipif(
    not (HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"), reason="needs CUDA or TRITON_INTERPRET=1"
)


pytestmark = pytest.mark.usefixtures("one_thread")


def random_packed(out_features, in_features, device=DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 4, (out_features, in_features), dtype=torch.uint8, generator=g)
    codes.view(-1)[:4] = torch.arange(4, dtype=torch.uint8)  # every code value present
    scale = torch.randn(out_features, in_features // format.GROUP_SIZE, generator=g) * 0.05
    return format.pack(codes).to(device), scale.to(torch.bfloat16).to(device)


def dense_grad_scale(grad, x, weight):
    """d/ds of sum(grad * x @ W.T) through the dense weight, in float64 (the chain rule by hand)."""
    gw = grad.double().reshape(-1, grad.shape[-1]).T @ x.double().reshape(-1, x.shape[-1])  # [N, K]
    codes = format.codes_to_values(format.unpack(weight), torch.float64)
    return (codes * gw).reshape(weight.shape[0], -1, format.GROUP_SIZE).sum(-1)


def assert_close_to(got, want, rtol):
    err = (got.double() - want).abs().max().item()
    assert err <= rtol * want.abs().max().item(), f"max err {err:.3g} vs max {want.abs().max().item():.3g}"


def test_reference_equals_chain_rule_through_dense_weight():
    weight, scale = random_packed(24, 384, "cpu")
    x, grad = torch.randn(2, 5, 384, dtype=torch.float64), torch.randn(2, 5, 24, dtype=torch.float64)
    s = scale.double().requires_grad_(True)
    y = x @ format.dequantize(weight, s, torch.float64).T
    (want,) = torch.autograd.grad(y, s, grad)
    got = LB.linear_grad_scale_reference(grad, x, weight, scale.double())
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got, dense_grad_scale(grad, x, weight))


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "M, N, K, config",
    [
        (5, 40, 256, None),  # M below one block, N not a multiple of the tile
        (130, 64, 384, LB.GradScaleConfig(block_m=16, split_m=3)),  # M split over programs, uneven
        (33, 17, 512, LB.GradScaleConfig(block_m=16, block_n=16, block_k=256)),  # 2 groups per program
        (64, 8, 128, LB.GradScaleConfig(block_m=16, split_m=64)),  # more splits asked than rows allow
    ],
)
def test_kernel_matches_reference(M, N, K, config, dtype):
    weight, _ = random_packed(N, K, seed=M)
    g = torch.Generator().manual_seed(1)
    grad = torch.randn(M, N, generator=g).to(DEVICE, dtype)
    x = torch.randn(M, K, generator=g).to(DEVICE, dtype)
    got = LB.launch_linear_grad_scale(grad, x, weight, config)
    assert got.dtype == torch.float32 and got.shape == (N, K // format.GROUP_SIZE)
    # fp32 accumulation of exact products of (rounded) inputs: errors far below the inputs' rounding.
    assert_close_to(
        got.cpu(),
        dense_grad_scale(grad.cpu(), x.cpu(), weight.cpu()),
        rtol=1e-5 if dtype == torch.float32 else 1e-3,
    )


@needs_kernels
def test_kernel_reads_every_field_of_the_word():
    # One-hot codes: a misplaced field shows up in the wrong group or row.
    N, K = 4, 256
    codes = torch.full((N, K), format.CODE_OFFSET, dtype=torch.uint8)  # value 0 everywhere
    for n, j in [(0, 0), (1, 15), (2, 130), (3, 255)]:
        codes[n, j] = 3  # value +1
    weight = format.pack(codes).to(DEVICE)
    x = torch.arange(1.0, K + 1).repeat(3, 1).to(DEVICE)  # x[m, j] = j + 1
    grad = torch.ones(3, N, device=DEVICE)
    got = LB.launch_linear_grad_scale(grad, x, weight, LB.GradScaleConfig(block_m=16, block_n=16))
    want = torch.zeros(N, 2)
    want[0, 0], want[1, 0], want[2, 1], want[3, 1] = 3 * 1, 3 * 16, 3 * 131, 3 * 256
    torch.testing.assert_close(got.cpu(), want)


def test_empty_batch_gives_zero_gradient():
    weight, scale = random_packed(8, 128)
    out = torch.ops.gsq.linear_grad_scale(
        torch.zeros(0, 8, device=DEVICE), torch.zeros(0, 128, device=DEVICE), weight, scale
    )
    assert out.shape == scale.shape and out.dtype == scale.dtype and not out.any()


def test_launcher_rejects_what_the_kernel_cannot_take():
    weight, _ = random_packed(8, 256, "cpu")
    with pytest.raises(TypeError, match="one dtype"):
        LB.launch_linear_grad_scale(torch.randn(2, 8), torch.randn(2, 256, dtype=torch.float64), weight)
    with pytest.raises(ValueError, match="grad \\[M, N\\] and x \\[M, K\\]"):
        LB.launch_linear_grad_scale(torch.randn(3, 8), torch.randn(2, 256), weight)
    with pytest.raises(ValueError, match="multiple of the group size"):
        LB.launch_linear_grad_scale(
            torch.randn(2, 8).to(DEVICE),
            torch.randn(2, 256).to(DEVICE),
            weight.to(DEVICE),
            LB.GradScaleConfig(block_k=64),
        )


def test_opcheck_linear_grad_scale():
    weight, scale = random_packed(16, 256)
    grad = torch.randn(2, 3, 16, device=DEVICE, requires_grad=True)
    x = torch.randn(2, 3, 256, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.gsq.linear_grad_scale.default, (grad, x, weight, scale))


def test_gradcheck_linear_wrt_input_and_scales_in_float64():
    weight, scale = random_packed(4, 256, "cpu")
    x = torch.randn(3, 256, dtype=torch.float64, requires_grad=True)
    s = scale.double().requires_grad_(True)
    # The op (not the wrapper, which insists on bf16 scales) on float64 scales.
    assert torch.autograd.gradcheck(lambda a, b: torch.ops.gsq.linear(a, weight, b), (x, s), fast_mode=True)
    assert torch.autograd.gradgradcheck(
        lambda a, b: torch.ops.gsq.linear(a, weight, b), (x, s), fast_mode=True
    )


def test_wrapper_gradient_reaches_bf16_scales_that_require_grad():
    weight, scale = random_packed(40, 384)
    s = scale.clone().requires_grad_(True)
    x = torch.randn(2, 3, 384, device=DEVICE)
    g = torch.randn(2, 3, 40, device=DEVICE)
    L.linear(x, weight, s).backward(g)
    assert s.grad.dtype == torch.bfloat16 and s.grad.shape == s.shape
    assert_close_to(s.grad.cpu(), dense_grad_scale(g.cpu(), x.cpu(), weight.cpu()), rtol=2**-7)


def test_no_input_is_kept_for_the_backward_unless_scales_train():
    weight, scale = random_packed(8, 128)
    x = torch.randn(2, 128, device=DEVICE, requires_grad=True)
    y = L.linear(x, weight, scale)
    saved = [t for t in y.grad_fn.saved_tensors if t is not None]
    assert len(saved) == 2 and all(t.data_ptr() != x.data_ptr() for t in saved)  # weight and weight_scale


_COMPILE_SCRIPT = textwrap.dedent(r"""
    import torch
    from gsq_torch.ops import linear_backward as LB
    from gsq_torch.ops.cross_compile import compile_launch, record_launches

    LB._check_launch = lambda *args: None  # meta tensors, no GPU
    LB.interpreting = lambda: False
    meta = dict(device="meta")
    with record_launches(LB, ["_grad_scale_kernel"]) as calls:
        for M, N, K, dtype in [(4096, 512, 2048, torch.bfloat16), (4096, 2048, 512, torch.float16),
                               (100, 256, 256, torch.float32)]:
            grad, x = torch.empty(M, N, dtype=dtype, **meta), torch.empty(M, K, dtype=dtype, **meta)
            LB.launch_linear_grad_scale(grad, x, torch.empty(N, K // 16, dtype=torch.int32, **meta))
    for kernel, args, kwargs in calls:
        compiled = compile_launch(kernel, args, kwargs)
        print("compiled", kwargs["DOT_DTYPE"], "wgmma" in compiled.asm["ptx"])
""")


@pytest.mark.skipif(HAS_CUDA, reason="the CUDA tests compile the kernel for the real card")
def test_kernel_compiles_for_sm90_without_a_gpu():
    # The interpreter does not catch what only the compiler rejects (layouts, dot shapes, types).
    pytest.importorskip("triton.backends.nvidia")
    stdout = run_compile_script(_COMPILE_SCRIPT)
    lines = [ln for ln in stdout.splitlines() if ln.startswith("compiled")]
    assert len(lines) == 3 and all(ln.endswith("True") for ln in lines), stdout  # tensor-core MMAs


# --- CUDA -----------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("N, K", [(512, 2048), (2048, 512), (1000, 384)])
@pytest.mark.parametrize("M", [1, 16, 333, 4096])
def test_cuda_kernel_matches_reference(M, N, K):
    weight, _ = random_packed(N, K, "cuda")
    grad = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    got = LB.launch_linear_grad_scale(grad, x, weight)
    assert_close_to(got.cpu(), dense_grad_scale(grad.cpu(), x.cpu(), weight.cpu()), rtol=1e-3)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_cuda_kernel_other_dtypes(dtype):
    weight, _ = random_packed(256, 512, "cuda")
    grad = torch.randn(300, 256, device="cuda", dtype=dtype)
    x = torch.randn(300, 512, device="cuda", dtype=dtype)
    got = LB.launch_linear_grad_scale(grad, x, weight)
    assert_close_to(got.cpu(), dense_grad_scale(grad.cpu(), x.cpu(), weight.cpu()), rtol=1e-4)


@pytest.mark.cuda
def test_cuda_compiled_training_step_with_trainable_scales():
    weight, scale = random_packed(512, 2048, "cuda")
    master = torch.nn.Parameter(scale.float())
    x = torch.randn(64, 2048, device="cuda", dtype=torch.bfloat16)

    def step(x):
        return L.linear(x, weight, master.to(torch.bfloat16)).float().square().mean()

    torch.compile(step, fullgraph=True)(x).backward()
    compiled = master.grad.clone()
    master.grad = None
    step(x).backward()
    assert_close_to(compiled.cpu(), master.grad.double().cpu(), rtol=1e-2)
