"""The grouped-statistics norms on the Triton kernels of ``bkn/kernels/triton_norm.py`` (docs/speed.md, "The GPU path").

:func:`normalize_with_stats` and :func:`renorm_train` here return exactly what their torch
references in ``_function.py`` and ``_renorm_function.py`` return; those call them when
``bkn.kernels.backend_for(x)`` is ``"triton"``. A BKN (or ghost-BN) step is 3 launches forward
(partial moments, finalize, normalize) and 3 backward (partial sums, coefficients, dx), BRN the
same; no host sync: the guard, the step counter and ``1 / steps`` live on the device. The
kernel module is imported on first use, so ``TRITON_INTERPRET`` is read then.
"""

from __future__ import annotations

import math
import struct

import torch

from .. import kernels as _kernels
from . import _checks
from ._grad_shapes import as_dtype as _as_dtype
from ._grad_shapes import sum_to as _sum_to

CPU_TILE = 256  # the interpreter's tile (tests lower it to exercise the merges of chunks)
ROWS = 8  # rows of the backward's coefficient buffer
FW_ROWS = ROWS + 1  # rows of the forward workspace: a finalize's 8, then BKN's prior check flag (W[8, 0, 0])


def _module():
    """The forward kernel module, imported on first use (``TRITON_INTERPRET`` is read then)."""
    from ..kernels import triton_norm

    return triton_norm


def _backward_module():
    from ..kernels import triton_norm_backward

    return triton_norm_backward


def _check_device(x: torch.Tensor):
    tk = _module()
    if x.device.type == "cpu" and not tk.INTERPRETED:
        raise ValueError(
            "the Triton kernels were defined without TRITON_INTERPRET=1 (bkn.kernels.triton_norm was first "
            "imported without it), so they cannot run on CPU tensors: set TRITON_INTERPRET=1 before the first call"
        )
    return tk


def _split(value: float) -> tuple[float, float]:
    """``value`` as float32 ``(hi, lo)`` with ``hi + lo`` = value to ~48 bits (Triton passes floats as float32)."""
    value = float(value)
    if not math.isfinite(value) or abs(value) > 3.0e38:
        return value, 0.0
    hi = struct.unpack("f", struct.pack("f", value))[0]
    return hi, value - hi


def _groups(t: torch.Tensor) -> list[list[int]]:
    """The spatial dims of ``t`` (size 1 dropped) in runs one stride walks (``stride[a] = stride[b] * size[b]``)."""
    groups: list[list[int]] = []
    for i in range(2, t.dim()):
        n, s = t.shape[i], t.stride(i)
        if n == 1:
            continue
        if groups and t.stride(groups[-1][-1]) == s * n:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _strides(t: torch.Tensor, groups: list[list[int]]) -> tuple[int, int, int, int] | None:
    """``(sN, sC, s1, s2)`` of ``t`` viewed with the spatial runs ``groups``; None if its strides do not allow it."""
    out = [t.stride(0), t.stride(1)]
    for dims in groups:
        if any(t.stride(a) != t.stride(b) * t.shape[b] for a, b in zip(dims, dims[1:])):
            return None
        out.append(t.stride(dims[-1]))
    return tuple(out[:2] + [0] * (2 - len(groups)) + out[2:])


def _layout(t: torch.Tensor):
    """``(t, S1, S2, (sN, sC, s1, s2), groups)``: the spatial dims of ``t`` as two strided dims (a copy if they
    cannot be); every other tensor of the op is read or written with the same ``groups`` (:func:`_like`)."""
    groups = _groups(t)
    if len(groups) > 2:
        t = t.contiguous()
        groups = _groups(t)
    sizes = [math.prod(t.shape[i] for i in dims) for dims in groups]
    return (t, *([1] * (2 - len(sizes)) + sizes), _strides(t, groups), groups)


def _like(t: torch.Tensor, groups) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """``t`` (or a contiguous copy, where its strides do not fit ``groups``) and its strides in that view."""
    st = _strides(t, groups)
    if st is None:
        t = t.contiguous()
        st = _strides(t, groups)
    return t, st


def _fresh(x: torch.Tensor, groups) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """An uninitialised tensor like ``x`` (its layout where that fits ``groups``, else contiguous) and its strides."""
    t = torch.empty_like(x)
    if _strides(t, groups) is None:
        t = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return t, _strides(t, groups)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _plan(count: int, gc: int, device: torch.device) -> tuple[int, int, int]:
    """``(BLOCK, chunk, splits)``: tile size, values per program and programs per (group, channel) block.

    On a GPU enough programs to fill it (about 2048 in all); in the interpreter (CPU) small
    tiles and up to 3 chunks, so the tests exercise the merges at small shapes.
    """
    if device.type == "cpu":
        block, most = CPU_TILE, 2
    else:
        block, most = min(1024, max(128, _pow2(count))), max(1, -(-2048 // gc))
    splits = max(1, min(most, -(-count // block)))
    chunk = -(-(-(-count // splits)) // block) * block
    return block, chunk, -(-count // chunk)


def _bstrides(t: torch.Tensor, groups: int, channels: int, what: str) -> tuple[int, int]:
    """Strides (over groups, over channels) reading ``t`` broadcast to (G, C); 0 along broadcast dims."""
    wrong = ValueError(f"{what}: expected a tensor broadcastable to ({groups}, {channels}), got {tuple(t.shape)}")
    if t.dim() > 2:
        raise wrong
    shape = (1,) * (2 - t.dim()) + tuple(t.shape)
    stride = (0,) * (2 - t.dim()) + tuple(t.stride())
    if shape[0] not in (1, groups) or shape[1] not in (1, channels):
        raise wrong
    return (0 if shape[0] == 1 else stride[0]), (0 if shape[1] == 1 else stride[1])


def _per_channel(t, channels: int, what: str):
    if t is not None and (t.dim() != 1 or t.numel() != channels):
        raise ValueError(f"{what}: the Triton kernels take None or shape ({channels},), got {tuple(t.shape)}")
    return None if t is None else t.contiguous()


def _stat_constexprs(x: torch.Tensor):
    tk = _module()
    stat = torch.float64 if x.dtype == torch.float64 else torch.float32  # (torch.promote_types is an aten op)
    return stat, tk.tl.float64 if stat == torch.float64 else tk.tl.float32


def _moments(x, groups: int):
    """Partial moments (launch 1) into a fresh workspace (FW_ROWS + 2 splits, G, C): the finalize's FW_ROWS rows,
    then the partials (at FW_ROWS * G * C). Returns (x, S1, S2, strides, groups of dims, count, plan, workspace)."""
    tk = _check_device(x)
    x, s1, s2, st, layout = _layout(x)
    count = (x.shape[0] // groups) * s1 * s2
    gc = groups * x.shape[1]
    block, chunk, splits = _plan(count, gc, x.device)
    stat, STAT = _stat_constexprs(x)
    ws = torch.empty((FW_ROWS + 2 * splits, groups, x.shape[1]), dtype=stat, device=x.device)
    g = x.shape[0] // groups
    _kernels.launch(tk.stats_partial, (gc, splits), x, ws, FW_ROWS * gc, x.shape[1], g, s1, s2, *st, count, chunk,
                    splits, STAT=STAT, BLOCK=block)  # fmt: skip
    return x, s1, s2, st, layout, count, (block, chunk, splits), ws


def _affine(x, s1, s2, st, layout, groups, count, plan, w, scale_row):
    """y = x * scale + shift (launch 3), in a fresh tensor of x's layout."""
    tk = _module()
    _, STAT = _stat_constexprs(x)
    y, yst = _fresh(x, layout)
    block, chunk, splits = plan
    gc = groups * x.shape[1]
    _kernels.launch(tk.affine, (gc, splits), x, y, w, x.shape[1], x.shape[0] // groups, s1, s2, *st, *yst,
                    count, chunk, SCALE_ROW=scale_row, STAT=STAT, BLOCK=block)  # fmt: skip
    return y


def _backward(ctx, dy, x, weight, w, dmean, dvar, prior):
    """The 3 backward launches; returns (dx or None, the coefficient buffer (ROWS (+ 2 splits), G, C))."""
    tk = _backward_module()
    groups, C = ctx.groups, x.shape[1]
    gc = groups * C
    stat, STAT = _stat_constexprs(x)
    x, s1, s2, st, layout = _layout(x)
    count = (x.shape[0] // groups) * s1 * s2
    block, chunk, splits = ctx.plan
    g = x.shape[0] // groups
    dst = None
    # one allocation: the coefficients' ROWS rows, then the partial sums (at ROWS * G * C)
    out = torch.empty((ROWS + (2 * splits if dy is not None else 0), groups, C), dtype=stat, device=x.device)
    if dy is not None:
        dy, dst = _like(dy, layout)
        _kernels.launch(tk.grad_partial, (gc, splits), x, dy, w, out, ROWS * gc, C, g, s1, s2, *st, *dst, count,
                        chunk, splits, MEAN_ROW=ctx.mean_row, STAT=STAT, BLOCK=block)  # fmt: skip
    mp, vp, p, p_value, reduce_prior, guard = prior if prior is not None else (None, None, None, 0.0, False, False)
    dm_st = _bstrides(dmean, groups, C, "posterior mean gradient") if dmean is not None else (0, 0)
    dv_st = _bstrides(dvar, groups, C, "posterior variance gradient") if dvar is not None else (0, 0)
    mp_st = _bstrides(mp, groups, C, "prior mean") if mp is not None else (0, 0)
    vp_st = _bstrides(vp, groups, C, "prior variance") if vp is not None else (0, 0)
    p_st = _bstrides(p, groups, C, "gain") if p is not None else (0, 0)
    block_c = min(_pow2(C), 64 if x.device.type == "cpu" else 256)
    dummy = w
    _kernels.launch(
        tk.grad_coefficients, (-(-C // block_c),),
        out, w, dummy if weight is None else weight, dummy if dmean is None else dmean,
        dummy if dvar is None else dvar, dummy if mp is None else mp, dummy if vp is None else vp,
        dummy if p is None else p, out, groups, C, count, splits, ROWS * gc, *dm_st, *dv_st, *mp_st, *vp_st, *p_st,
        *_split(p_value), HAS_DY=dy is not None, HAS_WEIGHT=weight is not None, HAS_DM=dmean is not None,
        HAS_DV=dvar is not None, HAS_PRIOR=prior is not None, GAIN_TENSOR=p is not None, HAS_GUARD=guard,
        RENORM=ctx.renorm, REDUCE_PRIOR=reduce_prior, STAT=STAT, BLOCK_C=block_c,
    )  # fmt: skip
    dx = None
    if ctx.needs_input_grad[0]:
        dx, ost = _fresh(x, layout)
        _kernels.launch(tk.input_grad, (gc, splits), x, x if dy is None else dy, dx, out, C, g, s1, s2, *st,
                        *(dst or st), *ost, count, chunk, HAS_DY=dy is not None, STAT=STAT, BLOCK=block)  # fmt: skip
    return dx, out


class TritonNormalize(torch.autograd.Function):
    """``_NormalizeWithStats`` (bkn/layers/_function.py) on the Triton kernels; same inputs and outputs."""

    @staticmethod
    def forward(
        ctx, x, weight, bias, prior_mean, prior_var, gain, obs_mean, obs_var, groups, eps, guard, running, check
    ):
        ctx.set_materialize_grads(False)
        C = x.shape[1]
        gc = groups * C
        weight, bias = _per_channel(weight, C, "weight"), _per_channel(bias, C, "bias")
        stat, STAT = _stat_constexprs(x)
        given = obs_mean is not None
        if given:
            tk = _check_device(x)
            xl, s1, s2, st, layout = _layout(x)
            count = (x.shape[0] // groups) * s1 * s2
            plan = _plan(count, gc, x.device)
            pm, pm2 = _as_dtype(obs_mean, stat).contiguous(), _as_dtype(obs_var, stat).contiguous()
            chunk, splits = count, 1
            w = torch.empty((FW_ROWS, groups, C), dtype=stat, device=x.device)
        else:
            xl, s1, s2, st, layout, count, plan, w = _moments(x, groups)
            tk, pm, pm2 = _module(), w, w
            chunk, splits = plan[1], plan[2]
        if gain is None:
            gain = 0.0
        has_prior = prior_mean is not None and not (isinstance(gain, float) and gain == 0.0)
        gain_tensor = isinstance(gain, torch.Tensor)
        has_guard = has_prior and math.isfinite(guard)
        if check is not None and prior_var is not None and not has_prior:  # the kernel ignores this prior
            _checks.check_prior_var(prior_var.detach(), check)
        rm, rv, steps, momentum = running if running is not None else (None, None, None, 0.0)
        if running is not None and momentum is None and steps is None:
            raise ValueError("normalize_with_stats: momentum=None needs the step counter (running[2])")
        mp_st = _bstrides(prior_mean, groups, C, "prior mean") if has_prior else (0, 0)
        vp_st = _bstrides(prior_var, groups, C, "prior variance") if has_prior else (0, 0)
        p_st = _bstrides(gain, groups, C, "gain") if has_prior and gain_tensor else (0, 0)
        unbiased = count / (count - 1) if count > 1 else 1.0
        block_c = min(_pow2(C), 64 if x.device.type == "cpu" else 1024)
        d = w  # a stand-in for absent pointers (never read)
        _kernels.launch(
            tk.kalman_finalize, (1,),
            pm, pm2, w, prior_mean if has_prior else d, prior_var if has_prior else d,
            gain if has_prior and gain_tensor else d, d if weight is None else weight, d if bias is None else bias,
            d if rm is None else rm, d if rv is None else rv, d if steps is None else steps,
            groups, C, count, chunk, splits, FW_ROWS * gc, *mp_st, *vp_st, *p_st,
            *_split(0.0 if gain_tensor else gain), *_split(eps), *_split(guard * gc if has_guard else 0.0),
            *_split(0.0 if momentum is None else momentum), *_split(unbiased),
            OBS_GIVEN=given, HAS_PRIOR=has_prior, GAIN_TENSOR=gain_tensor, HAS_GUARD=has_guard,
            CHECK=check is not None and has_prior,
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_RUNNING=running is not None,
            HAS_STEPS=steps is not None, MOMENTUM_NONE=momentum is None, STAT=STAT, BLOCK_C=block_c,
        )  # fmt: skip
        if check is not None and has_prior:  # the finalize's flag: 1 if every prior variance is finite and >= 0
            _checks.device_check(w[ROWS, 0, 0], _checks.prior_var_message(check))
        y = _affine(xl, s1, s2, st, layout, groups, count, plan, w, 4)
        ctx.save_for_backward(x, weight, prior_mean if has_prior else None, prior_var if has_prior else None,
                              gain if has_prior and gain_tensor else None, w)  # fmt: skip
        ctx.groups, ctx.plan, ctx.mean_row, ctx.renorm = groups, plan, 2, False
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.prior = (has_prior, 0.0 if gain_tensor else gain, has_guard)
        ctx.shapes = tuple(
            t.shape if isinstance(t, torch.Tensor) else None for t in (weight, bias, prior_mean, prior_var, gain)
        )
        obs_m, obs_v, mean, var = w.unbind(0)[:4]  # (one op)
        ctx.mark_non_differentiable(obs_m, obs_v)
        return y, mean, var, obs_m, obs_v

    @staticmethod
    def backward(ctx, dy, dmean, dvar, _dobs_mean, _dobs_var):
        x, weight, prior_mean, prior_var, gain, w = ctx.saved_tensors
        has_prior, p_value, guard = ctx.prior
        C = x.shape[1]
        weight_shape, bias_shape, mean_shape, var_shape, gain_shape = ctx.shapes
        prior = None
        if has_prior:
            reduce_prior = prior_mean.shape == (C,) and prior_var.shape == (C,)
            prior = (prior_mean, prior_var, gain, p_value, reduce_prior, guard)
        dx, out = _backward(ctx, dy, x, weight, w, dmean, dvar, prior)
        grads = [None] * 13
        grads[0] = dx
        need = ctx.needs_input_grad
        first = out.select(1, 0).unbind(0)  # (C,) rows: the sums over groups
        if need[1]:
            grads[1] = _as_dtype(first[3], weight.dtype)
        if need[2]:
            grads[2] = _as_dtype(first[4], ctx.bias_dtype)
        if has_prior:
            rows = first if reduce_prior else out.unbind(0)
            if need[3]:
                grads[3] = _as_dtype(_sum_to(rows[5], mean_shape), prior_mean.dtype)
            if need[4]:
                grads[4] = _as_dtype(_sum_to(rows[6], var_shape), prior_var.dtype)
            if need[5] and gain is not None:
                grads[5] = _as_dtype(_sum_to(out[7], gain_shape), gain.dtype)
        return tuple(grads)


def normalize_with_stats(x, weight, bias, prior, gain, observed, groups, eps, guard, running, check=None):
    """``bkn.layers._function.normalize_with_stats`` on the Triton kernels (same arguments and results).

    ``check`` (a label): the finalize kernel checks the prior variance (finite, >= 0) into a flag, and one
    :func:`~bkn.layers._checks.device_check` reads it (``torch._assert_async`` on CUDA).
    """
    prior_mean, prior_var = prior if prior is not None else (None, None)
    obs_mean, obs_var = observed if observed is not None else (None, None)
    return TritonNormalize.apply(
        x, weight, bias, prior_mean, prior_var, gain, obs_mean, obs_var, groups, eps, float(guard), running, check
    )


class TritonRenorm(torch.autograd.Function):
    """BRN's training step (``renorm_train``) on the Triton kernels: r and d constant, gamma and beta learned.

    Returns ``y`` and the forward workspace (non-differentiable; rows m_o, v_o, sigma_B, r, d, ...).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mu, sigma, running_var, steps, momentum, rmax, dmax, eps, groups):
        C = x.shape[1]
        weight, bias = _per_channel(weight, C, "weight"), _per_channel(bias, C, "bias")
        stat, STAT = _stat_constexprs(x)
        ctx.set_materialize_grads(False)
        xl, s1, s2, st, layout, count, plan, w = _moments(x, groups)
        tk = _module()
        scheduled = hasattr(rmax, "on_device")  # a RenormSchedule: the limits from the counter, in the kernel
        if scheduled:
            sched, rmax, dmax = rmax, 0.0, 0.0
            schedule = (sched.warmup_steps, sched.rmax_steps, sched.dmax_steps,
                        *_split(sched.rmax_max - 1.0), *_split(sched.dmax_max))  # fmt: skip
        else:
            schedule = (0, 0, 0, 0.0, 0.0, 0.0, 0.0)
        rmax_t, dmax_t = isinstance(rmax, torch.Tensor), isinstance(dmax, torch.Tensor)
        block_c = min(_pow2(C), 64 if x.device.type == "cpu" else 1024)
        _kernels.launch(
            tk.renorm_finalize, (1,),
            w, w, w, w if weight is None else weight, w if bias is None else bias, mu, sigma, running_var, steps,
            rmax if rmax_t else w, dmax if dmax_t else w, groups, C, count, plan[1], plan[2], FW_ROWS * groups * C,
            *_split(eps), *_split(0.0 if momentum is None else momentum),
            *_split(0.0 if rmax_t else rmax), *_split(0.0 if dmax_t else dmax), *schedule,
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, MOMENTUM_NONE=momentum is None,
            RMAX_TENSOR=rmax_t, DMAX_TENSOR=dmax_t, SCHEDULED=scheduled, STAT=STAT, BLOCK_C=block_c,
        )  # fmt: skip
        y = _affine(xl, s1, s2, st, layout, groups, count, plan, w, 5)
        ctx.save_for_backward(x, weight, w)
        ctx.groups, ctx.plan, ctx.mean_row, ctx.renorm = groups, plan, 0, True
        ctx.dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(w)
        return y, w

    @staticmethod
    def backward(ctx, dy, _dw):
        x, weight, w = ctx.saved_tensors
        dx, out = _backward(ctx, dy, x, weight, w, None, None, None)
        grads = [dx] + [None] * 11
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            first = out.select(1, 0).unbind(0)  # (C,) rows: the sums over groups
            if ctx.needs_input_grad[1]:
                grads[1] = _as_dtype(first[3], ctx.dtypes[0])
            if ctx.needs_input_grad[2]:
                grads[2] = _as_dtype(first[4], ctx.dtypes[1])
        return tuple(grads)


def renorm_train(x, weight, bias, running_mean, running_std, running_var, steps, momentum, rmax, dmax, eps, groups):
    """``bkn.layers._renorm_function.renorm_train`` on the Triton kernels: ``(y, m_o, sigma_B, r, d)``, detached.

    The statistics have shape (C,) for one group and (G, C) for several, as the reference's.
    """
    y, w = TritonRenorm.apply(
        x, weight, bias, running_mean, running_std, running_var, steps, momentum, rmax, dmax, eps, groups
    )
    rows = (w.select(1, 0) if groups == 1 else w).unbind(0)
    return y, rows[0], rows[2], rows[3], rows[4]
