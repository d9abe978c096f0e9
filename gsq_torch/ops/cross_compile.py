"""Compile a launcher's Triton kernels for an NVIDIA GPU on a machine without one.

The interpreter runs the kernels' arithmetic but not the compiler, which alone rejects bad layouts,
dot shapes or types and decides registers, spills and instruction order. So the tests, and the
SASS studies behind ``benchmarks/*_notes.md``, record the launches a launcher makes on meta tensors
(:func:`record_launches`, :func:`meta_moe_weights`) and compile each one for Hopper (:func:`compile_launch`). Use it in a
process without ``TRITON_INTERPRET`` (the interpreter swaps the kernels out when it is set):
:func:`run_compile_script` starts one from a process that has it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import torch
import triton

from .. import format

_POINTER_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32",
                  torch.int32: "*i32", torch.int64: "*i64"}
# Launch keywords that are compile options rather than kernel arguments.
_OPTION_KEYS = ("num_warps", "num_stages", "launch_pdl", "maxnreg")

Launch = tuple[Any, tuple, dict]  # (JITFunction, positional args, keyword args)


@contextlib.contextmanager
def record_launches(module: ModuleType, names: tuple[str, ...] | list[str]) -> Iterator[list[Launch]]:
    """Within the block, ``module.<name>[grid](...)`` appends ``(kernel, args, kwargs)`` instead of launching."""
    calls: list[Launch] = []

    class _Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((self.kernel, args, kwargs))

    saved = {name: getattr(module, name) for name in names}
    try:
        for name, kernel in saved.items():
            setattr(module, name, _Recorder(kernel))
        yield calls
    finally:
        for name, kernel in saved.items():
            setattr(module, name, kernel)


def meta_moe_weights(num_experts: int, hidden: int, intermediate: int) -> tuple[torch.Tensor, ...]:
    """Meta tensors shaped like the fused MoE's packed weights, to record its launches without a GPU:
    ``(gate_up, gate_up_scale, down, down_scale)``."""
    out = []
    for rows, cols in ((2 * intermediate, hidden), (hidden, intermediate)):
        (w_rows, w_cols), (s_rows, s_cols) = format.packed_shapes(rows, cols)
        out += [torch.empty(num_experts, w_rows, w_cols, dtype=torch.int32, device="meta"),
                torch.empty(num_experts, s_rows, s_cols, dtype=torch.bfloat16, device="meta")]
    return tuple(out)


def compile_launch(kernel, args: tuple, kwargs: dict, capability: int = 90):
    """Compile one recorded launch for CUDA ``sm_<capability>``; returns Triton's compiled kernel.

    Arguments are specialised as the runtime would: tensors become pointers aligned to 16 bytes,
    integers that are multiples of 16 (and not ``do_not_specialize``) get the divisibility hint.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kwargs = dict(kwargs)
    gluon = type(kernel).__name__ == "GluonJITFunction"
    options = {key: kwargs[key] for key in _OPTION_KEYS if key in kwargs}
    for key in options:
        if not (gluon and key in kernel.arg_names):  # a Gluon kernel may read num_warps as a constexpr too
            del kwargs[key]
    values = dict(zip(kernel.arg_names, args), **kwargs)
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(kernel.arg_names, kernel.params)):
        if name not in values and not param.has_default:
            raise TypeError(f"{kernel.__name__}: no value for its argument {name!r}")
        value = values.get(name, param.default)  # a launch may leave defaults out
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name], attrs[(i,)] = _POINTER_TYPES[value.dtype], [["tt.divisibility", 16]]
        elif type(value).__name__ == "TensorDescriptor":  # Gluon's TMA descriptor, as its runtime spells it
            element = _POINTER_TYPES[value.base.dtype][1:]
            signature[name] = f"tensordesc<{element}{list(value.block_shape)},{value.layout!r}>"
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if isinstance(value, int) and value % 16 == 0 and not param.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
    if gluon:
        from triton.experimental.gluon._runtime import GluonASTSource

        source = GluonASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    else:
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)


def run_compile_script(script: str, timeout: float = 600) -> str:
    """Run the Python ``script`` in a fresh process without ``TRITON_INTERPRET``; return its stdout.

    Raises ``RuntimeError`` with the tail of its output when it exits non-zero.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"compile script exited {proc.returncode}:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    return proc.stdout
