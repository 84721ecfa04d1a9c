"""Compile the Triton kernels for a GPU target, on a machine without one.

``python tests/triton_compile.py [analytic] [norm]`` (from the repository root, ``TRITON_INTERPRET``
unset; no argument: both) runs each kernel through triton's compiler for CUDA sm_90 (an H100/H200)
down to PTX: what the interpreter does not check (constexpr branches, types of kernel arguments,
the compiled library calls).

* ``analytic``: the kernels of :mod:`bkn.kernels.triton_analytic`, float32 and float64, at the
  block sizes the launches use;
* ``norm``: the kernels of the grouped-statistics norms (:mod:`bkn.kernels.triton_norm` and
  :mod:`bkn.kernels.triton_norm_backward`) with the argument types and the constexpr variants of
  the launches in ``bkn/layers/_triton_function.py``: inputs float32, bfloat16 (statistics in
  float32) and float64; a Python int argument is ``i32`` (``i64`` past 2**31, a constexpr when it
  is 1, as triton specializes it: the ``ones`` variants), a Python float ``fp32``, the step
  counter ``*i64``.

Prints one line a kernel and variant; exits 1 if any fails. ``tests/test_triton_analytic.py`` and
``tests/test_triton_norm.py`` run it (slow).
"""

from __future__ import annotations

import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)


def compile_case(label: str, fn, types: dict, constants: dict, ones=()) -> int | None:
    """Compile ``fn`` with ``types`` (argument name -> signature type, every non-constexpr argument),
    ``constants`` (name -> constexpr value) and the int arguments ``ones`` equal to 1 (constexprs, as the
    launch specializes them); pointers 16-byte aligned. Prints one line; the PTX's length, None if it failed."""
    names = fn.arg_names
    values = dict(constants, **dict.fromkeys(ones, 1))
    constexpr = {p.name for p in fn.params if p.is_constexpr}
    missing = [n for n in names if n not in values and (n in constexpr or n not in types)]
    extra = [n for n in list(types) + list(values) if n not in names or (n in types and n in values)]
    if missing or extra:
        print(f"FAILED {label} {fn.__name__}: the script's signature: missing {missing}, unknown or twice {extra}")
        return None
    signature = {n: "constexpr" if n in values else types[n] for n in names}
    constexprs = {(names.index(n),): v for n, v in values.items()}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if signature[n].startswith("*")}
    try:
        source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(source, target=TARGET)
    except Exception as error:  # report every kernel, then fail
        print(f"FAILED {label} {fn.__name__}: {type(error).__name__}: {error}")
        return None
    size = len(compiled.asm["ptx"])
    print(f"ok {label} {fn.__name__}: {size} characters of PTX")
    return size


def _analytic_cases(dtype):
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


def analytic() -> list[int | None]:
    """The analytic transition's kernels, float32 and float64: pointers of the dtype, eps* float, other ints."""
    results = []
    for name, dtype in (("fp32", tl.float32), ("fp64", tl.float64)):
        for fn, constants in _analytic_cases(dtype).items():
            types = {
                n: f"*{name}" if n.endswith("_ptr") else "fp32" if n.startswith("eps") else "i32"
                for n in fn.arg_names
                if n not in constants
            }
            results.append(compile_case(name, fn, types, constants))
    return results


# The norms' launches (bkn/layers/_triton_function.py): which tensor each pointer argument is.
# "x": the input's dtype (x, y, dy, dx); "stat": the statistics' (workspaces, the given moments, the
# gradients of the posterior's mean and var); "param": weight, bias, prior, gain, running buffers,
# BRN's tensor limits (where absent the launch passes the workspace: "stat"); "steps": the counter.
_NORM_POINTERS = {
    "stats_partial": dict(X="x", PS="stat"),
    "affine": dict(X="x", Y="x", FW="stat"),
    "kalman_finalize": dict(
        PM="stat",
        PM2="stat",
        W="stat",
        MP="param",
        VP="param",
        P="param",
        WEIGHT="param",
        BIAS="param",
        RM="param",
        RV="param",
        STEPS="steps",
    ),  # fmt: skip
    "renorm_finalize": dict(
        PM="stat",
        PM2="stat",
        W="stat",
        WEIGHT="param",
        BIAS="param",
        MU="param",
        SIGMA="param",
        RVAR="param",
        STEPS="steps",
        RMAX="param",
        DMAX="param",
    ),  # fmt: skip
    "grad_partial": dict(X="x", DY="x", FW="stat", PS="stat"),
    "grad_coefficients": dict(
        PS="stat", FW="stat", WEIGHT="param", DM="stat", DV="stat", MP="param", VP="param", P="param", OUT="stat"
    ),  # fmt: skip
    "input_grad": dict(X="x", DY="x", DX="x", COEF="stat"),
}
# The pointers a launch replaces by the workspace when a constexpr is False (those then "*stat").
_ABSENT = {
    "kalman_finalize": dict(
        HAS_PRIOR=("MP", "VP"),
        GAIN_TENSOR=("P",),
        HAS_WEIGHT=("WEIGHT",),
        HAS_BIAS=("BIAS",),
        HAS_RUNNING=("RM", "RV"),
        HAS_STEPS=("STEPS",),
    ),  # fmt: skip
    "renorm_finalize": dict(HAS_WEIGHT=("WEIGHT",), HAS_BIAS=("BIAS",), RMAX_TENSOR=("RMAX",), DMAX_TENSOR=("DMAX",)),
    "grad_coefficients": dict(
        HAS_WEIGHT=("WEIGHT",), HAS_DM=("DM",), HAS_DV=("DV",), HAS_PRIOR=("MP", "VP"), GAIN_TENSOR=("P",)
    ),  # fmt: skip
}
_ON = dict(HAS_WEIGHT=True, HAS_BIAS=True)
# (variant, constexprs, the int arguments equal to 1) per kernel; STAT is added per dtype.
_TILE_ONES = ("S1", "S2", "splits")  # an (N, C) input in one chunk
_NORM_VARIANTS = {
    "stats_partial": [("", dict(BLOCK=1024), ()), ("ones", dict(BLOCK=128), _TILE_ONES)],
    "affine": [
        ("bkn", dict(SCALE_ROW=4, BLOCK=1024), ()),
        ("brn ones", dict(SCALE_ROW=5, BLOCK=128), ("S1", "S2", "y2", "s2")),
    ],
    "kalman_finalize": [
        ("ghost-bn", dict(OBS_GIVEN=False, HAS_PRIOR=False, GAIN_TENSOR=False, HAS_GUARD=False, CHECK=False,
                          **_ON, HAS_RUNNING=True, HAS_STEPS=True, MOMENTUM_NONE=False), ()),
        ("bkn float-gain guard check 1/steps",
         dict(OBS_GIVEN=False, HAS_PRIOR=True, GAIN_TENSOR=False, HAS_GUARD=True, CHECK=True, **_ON,
              HAS_RUNNING=True, HAS_STEPS=True, MOMENTUM_NONE=True), ()),
        ("bkn given-moments tensor-gain no-affine no-running",
         dict(OBS_GIVEN=True, HAS_PRIOR=True, GAIN_TENSOR=True, HAS_GUARD=False, CHECK=False, HAS_WEIGHT=False,
              HAS_BIAS=False, HAS_RUNNING=False, HAS_STEPS=False, MOMENTUM_NONE=False), ()),
        ("bkn momentum no-counter",
         dict(OBS_GIVEN=False, HAS_PRIOR=True, GAIN_TENSOR=True, HAS_GUARD=True, CHECK=False, HAS_WEIGHT=True,
              HAS_BIAS=False, HAS_RUNNING=True, HAS_STEPS=False, MOMENTUM_NONE=False), ()),
        ("bkn ones",
         dict(OBS_GIVEN=False, HAS_PRIOR=True, GAIN_TENSOR=False, HAS_GUARD=True, CHECK=True, HAS_WEIGHT=False,
              HAS_BIAS=True, HAS_RUNNING=True, HAS_STEPS=True, MOMENTUM_NONE=False),
         ("G", "splits", "smg", "svg", "spc")),
    ],
    "renorm_finalize": [
        ("float-limits momentum", dict(**_ON, MOMENTUM_NONE=False, RMAX_TENSOR=False, DMAX_TENSOR=False,
                                       SCHEDULED=False), ()),
        ("tensor-limits 1/steps no-affine", dict(HAS_WEIGHT=False, HAS_BIAS=False, MOMENTUM_NONE=True,
                                                 RMAX_TENSOR=True, DMAX_TENSOR=True, SCHEDULED=False), ()),
        ("scheduled", dict(**_ON, MOMENTUM_NONE=False, RMAX_TENSOR=False, DMAX_TENSOR=False, SCHEDULED=True), ()),
        ("scheduled 1/steps ones", dict(HAS_WEIGHT=True, HAS_BIAS=False, MOMENTUM_NONE=True, RMAX_TENSOR=False,
                                        DMAX_TENSOR=False, SCHEDULED=True), ("G", "splits", "warmup", "dmax_end")),
    ],
    "grad_partial": [("bkn", dict(MEAN_ROW=2, BLOCK=1024), ()), ("brn ones", dict(MEAN_ROW=0, BLOCK=128), _TILE_ONES)],
    "grad_coefficients": [
        ("ghost-bn", dict(HAS_DY=True, HAS_WEIGHT=True, HAS_DM=False, HAS_DV=False, HAS_PRIOR=False,
                          GAIN_TENSOR=False, HAS_GUARD=False, RENORM=False, REDUCE_PRIOR=False), ()),
        ("bkn tensor-gain guard reduce", dict(HAS_DY=True, HAS_WEIGHT=True, HAS_DM=True, HAS_DV=True, HAS_PRIOR=True,
                                              GAIN_TENSOR=True, HAS_GUARD=True, RENORM=False, REDUCE_PRIOR=True), ()),
        ("bkn float-gain no-dy", dict(HAS_DY=False, HAS_WEIGHT=False, HAS_DM=True, HAS_DV=False, HAS_PRIOR=True,
                                      GAIN_TENSOR=False, HAS_GUARD=False, RENORM=False, REDUCE_PRIOR=False), ()),
        ("brn ones", dict(HAS_DY=True, HAS_WEIGHT=True, HAS_DM=False, HAS_DV=False, HAS_PRIOR=False,
                          GAIN_TENSOR=False, HAS_GUARD=False, RENORM=True, REDUCE_PRIOR=False), ("G", "splits")),
    ],
    "input_grad": [
        ("", dict(HAS_DY=True, BLOCK=1024), ()),
        ("no-dy ones", dict(HAS_DY=False, BLOCK=128), ("S1", "S2", "s2", "d2", "o2")),
    ],
}  # fmt: skip
# The int arguments past 2**31 in a large input (i64): a "large" variant of the first variant of these kernels.
_LARGE = {
    "stats_partial": ("sN", "PS_OFF"),
    "affine": ("sN", "yN"),
    "grad_partial": ("sN", "dN", "PS_OFF"),
    "input_grad": ("sN", "dN", "oN"),
}
_BLOCK_C = {"kalman_finalize": 1024, "renorm_finalize": 1024, "grad_coefficients": 256}
# (name, input, statistics, parameters)
_NORM_DTYPES = (
    ("fp32", "fp32", "fp32", "fp32"),
    ("bf16", "bf16", "fp32", "fp32"),
    ("bf16-params", "bf16", "fp32", "bf16"),
    ("fp64", "fp64", "fp64", "fp64"),
)
_STAT = {"fp32": tl.float32, "fp64": tl.float64}


def _norm_types(fn, constants, dtypes) -> dict:
    """Signature types of ``fn``'s arguments: pointers by role, ``*_hi``/``*_lo`` fp32, other ints i32."""
    x, stat, param = dtypes
    name = fn.__name__
    roles = dict(_NORM_POINTERS[name])
    for flag, pointers in _ABSENT.get(name, {}).items():
        if not constants[flag]:
            roles.update(dict.fromkeys(pointers, "stat"))
    by_role = {"x": x, "stat": stat, "param": param, "steps": "i64"}
    types = {}
    for n in fn.arg_names:
        if n in roles:
            types[n] = "*" + by_role[roles[n]]
        elif n.endswith(("_hi", "_lo")):
            types[n] = "fp32"
        else:
            types[n] = "i32"
    return {n: t for n, t in types.items() if n not in constants and not fn.params[fn.arg_names.index(n)].is_constexpr}


def norm() -> list[int | None]:
    """The grouped-statistics norms' kernels, every variant of ``_NORM_VARIANTS`` in every dtype of ``_NORM_DTYPES``."""
    from bkn.kernels import triton_norm, triton_norm_backward

    results = []
    for label, *dtypes in _NORM_DTYPES:
        for name, variants in _NORM_VARIANTS.items():
            if label == "bf16-params" and name not in _ABSENT:  # no parameter pointer
                continue
            fn = getattr(triton_norm, name, None) or getattr(triton_norm_backward, name)
            if name in _LARGE:
                variants = [*variants, ("large", variants[0][1], ())]
            for variant, constexprs, ones in variants:
                constants = dict(constexprs, STAT=_STAT[dtypes[1]])
                if name in _BLOCK_C:
                    constants["BLOCK_C"] = _BLOCK_C[name] if "ones" not in variant else 64
                types = {n: t for n, t in _norm_types(fn, constants, dtypes).items() if n not in ones}
                if variant == "large":
                    types.update(dict.fromkeys(_LARGE[name], "i64"))
                results.append(compile_case(f"{label} {variant}".strip(), fn, types, constants, ones))
    return results


SUITES = {"analytic": analytic, "norm": norm}


def main(argv: list[str]) -> int:
    unknown = [a for a in argv if a not in SUITES]
    if unknown:
        print(f"unknown suites {unknown}; choose from {sorted(SUITES)}")
        return 2
    results = [size for suite in argv or SUITES for size in SUITES[suite]()]
    sizes = [size for size in results if size is not None]
    failed = len(results) - len(sizes)
    span = f", {min(sizes)} to {max(sizes)} characters of PTX" if sizes else ""
    print(f"{len(sizes)} of {len(results)} kernel variants compiled{span}" + (f"; {failed} FAILED" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
