"""Launching the analytic transition's Triton kernels (:mod:`bkn.kernels.triton_analytic`): output tensors,
strides, block sizes and grids, one function a kernel. Strided inputs are read in place (a norm's
bias expanded over the groups, a channels_last weight); outputs are contiguous.

Block sizes: a program's largest tile holds at most ``_budget()`` elements (4096 on a GPU, for its
registers; 65536 in the interpreter, where a program is a few numpy operations and fewer, larger
programs run faster). Float arguments reach a kernel as float32: ``eps`` travels as three float32
parts (:func:`_eps_parts`) that a float64 kernel sums back exactly.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import triton
import triton.language as tl

from . import interpreting
from . import triton_analytic as kern

_DTYPES = {torch.float64: tl.float64}  # else the sums run in float32 (float16, bfloat16 inputs stored back)


def _dtype(t: torch.Tensor):
    return _DTYPES.get(t.dtype, tl.float32)


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _budget() -> int:
    """Elements a program's largest tile may hold: registers on a GPU, numpy arrays in the interpreter."""
    return 1 << 16 if interpreting() else 1 << 12


def _arg(t: torch.Tensor) -> torch.Tensor:
    # The interpreter copies arguments through numpy, which refuses tensors that require grad.
    return t.detach() if interpreting() and t.requires_grad else t


def _eps_parts(eps: float) -> tuple[float, float, float]:
    """``eps`` as three float32 values whose sum, formed in float64, is ``eps`` (float64 kernels need all its bits)."""
    hi = float(np.float32(eps))
    mid = float(np.float32(eps - hi))
    return hi, mid, float(np.float32(eps - hi - mid))


def _elementwise_block(n: int) -> int:
    return min(_pow2(n), 1024)


def _over_entries(kernel, var: torch.Tensor, inputs, rest, **meta) -> tuple[torch.Tensor, torch.Tensor]:
    """One launch of the elementwise ``kernel`` over the ``G * C`` entries of (G, C) ``var``; its two outputs.

    The kernel's arguments: ``*inputs``, two fresh (G, C) outputs of ``var``'s dtype, ``G * C``, ``C``,
    ``*rest``, then ``meta`` with ``DTYPE`` (from ``var``) and ``BLOCK`` (the grid covers the entries).
    """
    G, C = var.shape
    out_a = torch.empty((G, C), dtype=var.dtype, device=var.device)
    out_b = torch.empty_like(out_a)
    block = _elementwise_block(G * C)
    kern._launch(
        kernel,
        (triton.cdiv(G * C, block),),
        *inputs,
        out_a,
        out_b,
        G * C,
        C,
        *rest,
        **meta,
        DTYPE=_dtype(var),
        BLOCK=block,
    )
    return out_a, out_b


def relu_forward(mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(E relu X, Var relu X)`` for ``X ~ N(mean, var)``, (G, C) each: one launch."""
    return _over_entries(kern._relu_fwd, var, (_arg(mean), _arg(var)), (*mean.stride(), *var.stride()))


def relu_backward(g_first, g_var, mean, var) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d mean, d var)`` of :func:`relu_forward`: one launch."""
    return _over_entries(
        kern._relu_bwd,
        var,
        (g_first, g_var, _arg(mean), _arg(var)),
        (*g_first.stride(), *g_var.stride(), *mean.stride(), *var.stride()),
    )


def _extra_args(var, extra_mean, extra_var):
    if extra_mean is None:
        return var, var, (0, 0), (0, 0), False
    return _arg(extra_mean), _arg(extra_var), extra_mean.stride(), extra_var.stride(), True


def norm_relu_forward(var, weight, bias, eps: float, extra_mean=None, extra_var=None):
    """Moments of ``relu`` of a norm's affine output (plus ``extra`` moments): one launch."""
    em, ev, sem, sev, has_extra = _extra_args(var, extra_mean, extra_var)
    return _over_entries(
        kern._norm_relu_fwd,
        var,
        (_arg(var), _arg(weight), _arg(bias), em, ev),
        (*var.stride(), weight.stride(0), bias.stride(0), *sem, *sev, *_eps_parts(eps)),
        HAS_EXTRA=has_extra,
    )


def _norm_relu_grad_outputs(var: torch.Tensor, has_extra: bool) -> tuple[torch.Tensor, ...]:
    """Fresh ``(d var, d gamma, d beta, d extra_mean, d extra_var)`` of the norm-ReLU rule for (G, C) ``var``,
    in the order its gradient kernels take them (``d var`` again in place of the extras' without extras)."""
    G, C = var.shape
    d_var = torch.empty((G, C), dtype=var.dtype, device=var.device)
    d_weight = torch.empty(C, dtype=var.dtype, device=var.device)
    d_bias = torch.empty_like(d_weight)
    d_em = torch.empty_like(d_var) if has_extra else d_var
    d_ev = torch.empty_like(d_var) if has_extra else d_var
    return d_var, d_weight, d_bias, d_em, d_ev


def _norm_relu_grads(outputs: tuple[torch.Tensor, ...], has_extra: bool) -> tuple:
    """What the norm-ReLU gradient launches return: their outputs, the extras' None without extras."""
    d_var, d_weight, d_bias, d_em, d_ev = outputs
    return d_var, d_weight, d_bias, (d_em if has_extra else None), (d_ev if has_extra else None)


def norm_relu_backward(g_first, g_var, var, weight, bias, eps: float, extra_mean=None, extra_var=None):
    """``(d var, d gamma, d beta, d extra_mean, d extra_var)`` of :func:`norm_relu_forward` (the last two
    None without extra moments): one launch."""
    G, C = var.shape
    em, ev, sem, sev, has_extra = _extra_args(var, extra_mean, extra_var)
    outputs = _norm_relu_grad_outputs(var, has_extra)
    block = min(_pow2(C), 256)
    kern._launch(
        kern._norm_relu_bwd,
        (triton.cdiv(C, block),),
        g_first,
        g_var,
        _arg(var),
        _arg(weight),
        _arg(bias),
        em,
        ev,
        *outputs,
        G,
        C,
        *g_first.stride(),
        *g_var.stride(),
        *var.stride(),
        weight.stride(0),
        bias.stride(0),
        *sem,
        *sev,
        *_eps_parts(eps),
        HAS_EXTRA=has_extra,
        DTYPE=_dtype(var),
        BLOCK=block,
    )
    return _norm_relu_grads(outputs, has_extra)


def _taps(weight: torch.Tensor) -> tuple[torch.Tensor, int, int, int, int, int]:
    """``(weight, O, I, K, stride of o, of i, of a tap)``: the taps as one strided run (else a contiguous copy)."""
    if weight.dim() == 2:
        return weight, *weight.shape, 1, *weight.stride(), 0
    shape, stride = weight.shape, weight.stride()
    taps = [(n, s) for n, s in zip(shape[2:], stride[2:]) if n != 1]
    if any(s != taps[j + 1][1] * taps[j + 1][0] for j, (_, s) in enumerate(taps[:-1])):
        weight = weight.contiguous()  # taps not one strided run (a permuted kernel): rare
        return _taps(weight)
    return weight, shape[0], shape[1], math.prod(shape[2:]), stride[0], stride[1], (taps[-1][1] if taps else 0)


def _conv_blocks(G: int, O: int, I: int, K: int) -> tuple[int, int, int, int]:
    """``(BG, BO, BI, BK)`` for the (BG, BO, BI) and (BO, BI, BK) tiles of the convolution kernels."""
    budget = _budget()
    bg, bk = _pow2(G), _pow2(K)
    bo = min(_pow2(O), 16 if interpreting() else 4)
    bi = min(_pow2(I), max(1, budget // (bo * max(bg, bk))))
    return bg, bo, bi, bk


def conv_forward(weight: torch.Tensor, mean=None, var=None, groups: int = 1):
    """``(mean_out, var_out, S1, S2)`` of the convolution rule for a (O, I / groups, *k) weight and (G, I) moments
    (``mean=None``: the tap sums only, the first two None): one launch, one pass over the weight."""
    weight, O, I, K, swo, swi, swk = _taps(weight)
    dtype, device = (var if var is not None else weight).dtype, weight.device
    s1 = torch.empty((O, I), dtype=dtype, device=device)
    s2 = torch.empty_like(s1)
    moments = mean is not None
    G = var.shape[0] if moments else 1
    mo = torch.empty((G, O), dtype=dtype, device=device) if moments else s1
    vo = torch.empty_like(mo) if moments else s1
    m, v = (_arg(mean), _arg(var)) if moments else (s1, s1)
    bg, bo, bi, bk = _conv_blocks(G, O, I, K)
    kern._launch(
        kern._conv_fwd,
        (triton.cdiv(O, bo),),
        _arg(weight),
        m,
        v,
        mo,
        vo,
        s1,
        s2,
        G,
        O,
        I,
        O // groups,
        K,
        swo,
        swi,
        swk,
        *m.stride(),
        *v.stride(),
        MOMENTS=moments,
        DTYPE=_dtype(s1),
        BG=bg,
        BO=bo,
        BI=bi,
        BK=bk,
    )
    return (mo if moments else None), (vo if moments else None), s1, s2


def conv_input_grads(s1, s2, g_mean, g_var, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d mean, d var)`` = ``(g_mean @ S1, g_var @ S2)`` per convolution group: one launch."""
    O, I = s1.shape
    G = g_mean.shape[0]
    c_in = I * groups
    d_mean = torch.empty((G, c_in), dtype=s1.dtype, device=s1.device)
    d_var = torch.empty_like(d_mean)
    bg = _pow2(G)
    bc = min(_pow2(c_in), 64 if interpreting() else 16)
    bo = min(_pow2(O // groups), max(1, _budget() // (bg * bc)))
    kern._launch(
        kern._conv_input_grads,
        (triton.cdiv(c_in, bc),),
        s1,
        s2,
        g_mean,
        g_var,
        d_mean,
        d_var,
        G,
        O,
        I,
        O // groups,
        c_in,
        *g_mean.stride(),
        *g_var.stride(),
        DTYPE=_dtype(s1),
        BG=bg,
        BO=bo,
        BC=bc,
    )
    return d_mean, d_var


def weight_grad(weight, factors=None, sums=None, groups: int = 1, base=None, in_place: bool = False):
    """``dS1 + 2 W dS2`` (broadcast over the taps), plus ``base`` where given (written into it with
    ``in_place``), for ``factors = (g_mean, mean, g_var, var)`` (dS1 = g_mean^T @ mean per group,
    dS2 likewise) or ``sums = (dS1, dS2)`` ((O, I) each): one launch, one pass over the weight."""
    w, O, I, K, swo, swi, swk = _taps(weight)
    out = base if in_place else torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    b = out if base is None else base
    for t in (b, out):
        if t.shape != weight.shape or _taps(t)[0] is not t:
            raise ValueError(
                f"weight_grad: a gradient of shape {tuple(t.shape)} and strides {t.stride()}: expected the weight's "
                f"shape {tuple(weight.shape)} with its taps one strided run"
            )
    sbo, sbi, sbk = _taps(b)[4:]
    soo, soi, sok = _taps(out)[4:]
    if factors is not None:
        a, x, bb, y = factors
        G = a.shape[0]
        args = (_arg(a), _arg(x), _arg(bb), _arg(y))
        strides = (*a.stride(), *x.stride(), *bb.stride(), *y.stride())
    else:
        G = 1
        d1, d2 = sums[0].contiguous(), sums[1].contiguous()
        args, strides = (d1, d1, d2, d2), (0,) * 8
    bg, bo, bi, bk = _conv_blocks(G, O, I, K)
    grid = (triton.cdiv(O, bo), triton.cdiv(I, bi))
    kern._launch(
        kern._weight_grad,
        grid,
        _arg(w),
        args[0],
        args[1],
        args[2],
        args[3],
        _arg(b),
        out,
        G,
        O,
        I,
        O // groups,
        K,
        swo,
        swi,
        swk,
        sbo,
        sbi,
        sbk,
        soo,
        soi,
        sok,
        *strides,
        FACTORS=factors is not None,
        HAS_BASE=base is not None,
        DTYPE=_dtype(out),
        BG=bg,
        BO=bo,
        BI=bi,
        BK=bk,
    )
    return out


def conv_norm_relu_grads(s1, s2, g_mean, g_var, groups, var, weight, bias, eps: float, extra_mean=None, extra_var=None):
    """The gradients of the norm-ReLU rule's inputs (as :func:`norm_relu_backward`) through the convolution rule
    after it (as :func:`conv_input_grads`), from the convolution's output gradients: one launch."""
    O, I = s1.shape
    G, c_in = var.shape
    em, ev, sem, sev, has_extra = _extra_args(var, extra_mean, extra_var)
    outputs = _norm_relu_grad_outputs(var, has_extra)
    bg = _pow2(G)
    bc = min(_pow2(c_in), 64 if interpreting() else 16)
    bo = min(_pow2(O // groups), max(1, _budget() // (bg * bc)))
    kern._launch(
        kern._conv_norm_relu_grads,
        (triton.cdiv(c_in, bc),),
        s1, s2, g_mean, g_var, _arg(var), _arg(weight), _arg(bias), em, ev, *outputs,
        G, O, I, O // groups, c_in, *g_mean.stride(), *g_var.stride(), *var.stride(), weight.stride(0),
        bias.stride(0), *sem, *sev, *_eps_parts(eps), HAS_EXTRA=has_extra, DTYPE=_dtype(var), BG=bg, BO=bo, BC=bc,
    )  # fmt: skip
    return _norm_relu_grads(outputs, has_extra)
