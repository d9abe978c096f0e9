"""ops/cross_compile: every kernel the default tables launch compiles for Ampere (sm_80) as well.

The tuned tables are keyed by shape, not by card, so an A100 runs the Hopper winners: they must at
least compile there (the Hopper compile tests sit next to each op's tests).
"""

import textwrap

import pytest
import torch

from gsq_torch.ops.cross_compile import run_compile_script

_SCRIPT = textwrap.dedent(r"""
    import torch
    from gsq_torch.ops import linear as L, moe as M, moe_align as A, moe_lines as ML
    from gsq_torch.ops.cross_compile import compile_launch, meta_moe_weights, record_launches

    L._check_launch = lambda *args: None  # meta tensors, no GPU
    L.interpreting = lambda: False
    M.pdl_supported = L.pdl_supported = ML.pdl_supported = lambda device: False  # PDL is Hopper-only
    meta = dict(device="meta")
    E, H, I, K = 256, 2048, 512, 8
    weights = meta_moe_weights(E, H, I)
    kernels = {module: [n for n in dir(module) if n.endswith("_kernel")] for module in (L, M, A, ML)}
    with record_launches(L, kernels[L]) as linear_calls, record_launches(M, kernels[M]) as moe_calls, \
            record_launches(A, kernels[A]) as align_calls, record_launches(ML, kernels[ML]) as lines_calls:
        for rows, N, Kin in [(1, 8192, 8192), (4, 8192, 8192), (16, 8192, 8192), (1, 2048, 512), (1, 512, 2048),
                             (4096, 8192, 8192)]:
            w = torch.empty(N, Kin // 16, dtype=torch.int32, **meta)
            s = torch.empty(N, Kin // 128, dtype=torch.bfloat16, **meta)
            L.launch_linear(torch.empty(rows, Kin, dtype=torch.bfloat16, **meta), w, s)
        w = torch.empty(512, 2048 // 16, dtype=torch.int32, **meta)
        s = torch.empty(512, 2048 // 128, dtype=torch.bfloat16, **meta)
        L.launch_linear(torch.empty(1, 2048, dtype=torch.float16, **meta), w, s)  # fp16 at M = 1: the FMA GEMV
        for T in (1, 2, 4, 16, 64, 1024):  # decode GEMV, lines, slot decode, lines, grouped (mma.sync, wgmma)
            M.fused_moe_triton(torch.empty(T, H, dtype=torch.bfloat16, **meta),
                               torch.empty(T, K, dtype=torch.int64, **meta),
                               torch.empty(T, K, dtype=torch.bfloat16, **meta), *weights)
    names = set()
    for kernel, args, kwargs in linear_calls + moe_calls + align_calls + lines_calls:
        if (kernel.__name__, str(sorted(kwargs.items()))) not in names:
            names.add((kernel.__name__, str(sorted(kwargs.items()))))
            compile_launch(kernel, args, kwargs, capability=80)
            print("compiled", kernel.__name__)
""")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA tests compile the kernels for the real card")
def test_default_kernels_compile_for_sm80():
    pytest.importorskip("triton.backends.nvidia")
    stdout = run_compile_script(_SCRIPT)
    compiled = {line.split()[1] for line in stdout.splitlines() if line.startswith("compiled")}
    # The linear table's kernels and the fused MoE's decode, lines, slot decode and grouped kernels.
    assert {"_align_count_kernel", "_lines_warps_kernel", "_gemv_kernel", "_decode_kernel", "_lines_kernel", "_mma_kernel",
            "_gate_up_gemv_kernel", "_down_gemv_kernel",
            "_gate_up_slot_kernel", "_down_slot_kernel", "_gate_up_mma_kernel", "_down_mma_kernel",
            "_gate_up_lines_kernel", "_down_lines_kernel"} <= compiled
