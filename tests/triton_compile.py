"""Compile the analytic transition's Triton kernels for a GPU target, on a machine without one.

``python tests/triton_compile.py`` (from the repository root, ``TRITON_INTERPRET`` unset) runs each
kernel of :mod:`bkn.kernels.triton_analytic` through triton's compiler for CUDA sm_90 (an H100/H200),
float32 and float64, at the block sizes the launches use, down to PTX: what the interpreter
does not check (constexpr branches, types of kernel arguments, the compiled library calls).
Prints one line a kernel; exits 1 if any fails. ``tests/test_triton_analytic.py`` runs it (slow).
"""

from __future__ import annotations

import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def _cases(dtype):
    from bkn.kernels import triton_analytic as k

    return {
        k._relu_fwd: dict(DTYPE=dtype, BLOCK=1024),
        k._relu_bwd: dict(DTYPE=dtype, BLOCK=1024),
        k._norm_relu_fwd: dict(DTYPE=dtype, BLOCK=1024, HAS_EXTRA=True),
        k._norm_relu_bwd: dict(DTYPE=dtype, BLOCK=256, HAS_EXTRA=False),
        k._conv_fwd: dict(DTYPE=dtype, MOMENTS=True, BG=4, BO=4, BI=64, BK=16),
        k._conv_input_grads: dict(DTYPE=dtype, BG=4, BO=64, BC=16),
        k._conv_norm_relu_grads: dict(DTYPE=dtype, BG=4, BO=64, BC=16, HAS_EXTRA=True),
        k._weight_grad: dict(DTYPE=dtype, FACTORS=True, HAS_BASE=True, BG=4, BO=4, BI=64, BK=16),
    }


def main() -> int:
    target = GPUTarget("cuda", 90, 32)
    failed = 0
    for name, dtype in (("fp32", tl.float32), ("fp64", tl.float64)):
        for fn, constants in _cases(dtype).items():
            names = fn.arg_names
            signature = {
                n: "constexpr"
                if n in constants
                else f"*{name}"
                if n.endswith("_ptr")
                else "fp32"
                if n.startswith("eps")
                else "i32"
                for n in names
            }
            constexprs = {(names.index(n),): v for n, v in constants.items()}
            try:
                compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=target)
                print(f"ok {name} {fn.__name__}: {len(compiled.asm['ptx'])} characters of PTX")
            except Exception as error:  # report every kernel, then fail
                failed += 1
                print(f"FAILED {name} {fn.__name__}: {type(error).__name__}: {error}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
