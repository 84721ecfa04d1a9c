"""Triton kernels of the grouped-statistics norms (ghost BN, BRN, BKN): docs/speed.md, "The GPU path".

Every batch-statistic norm normalizes ``x`` (N, C, *S) per (group, channel): the group ``gi``
holds samples ``gi * g .. (gi + 1) * g - 1`` (``g = N / G``), and a (group, channel) block is its
``n = g * S1 * S2`` values (the spatial dims viewed as two, ``S1 x S2``, each with its own stride,
so contiguous, channels_last and sliced inputs are read in place). A block is cut into
``splits`` chunks of ``chunk`` values; a program handles one (block, chunk). The kernels:

* :func:`stats_partial`: per (block, chunk) the mean and the centred ``M2`` (Chan's merge of
  per-tile means and centred sums; never E[x^2] - E[x]^2), in float32 (float64 for float64);
* :func:`kalman_finalize` (one program): merges the chunks (Chan), BKN's guard on the device
  (``sum(v_p / v_o) >= guard * G * C`` drops the prior: the posterior is then exactly the
  observation), the posterior, the running buffers (and the step counter), ``scale`` and
  ``shift``; :func:`renorm_finalize` the same for BRN (``r``, ``d`` and its running estimates);
* :func:`affine`: ``y = x * scale + shift``;
* backward (``triton_norm_backward.py``): ``grad_partial`` (``sum dy`` and ``sum dy (x - m)``
  per chunk), then ``grad_coefficients`` (merges the chunks, the closed-form coefficients of
  ``bkn/layers/_function.py`` with the gradients arriving at the posterior, the prior's and
  gain's gradients, weight and bias gradients summed over groups), then ``input_grad``
  (``dx = ws dy + x_coef x + const``). Partial sums go to buffers reduced in order: no atomics,
  the results are deterministic.

Python floats reach a Triton kernel as float32; the float64 path needs them exact, so each
float parameter is passed as two float32 (``hi``, ``lo = v - hi``) and joined by :func:`_f64`.
The kernels call Triton's builtins only (``tl.reduce`` with ``tl.sum``'s combine function, not
``tl.sum`` or ``tl.zeros``, which triton defines as jit functions when it is imported): then
they run in the interpreter even where triton was imported before ``TRITON_INTERPRET=1`` was set,
as in a test process. Whether the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, CPU tensors) is fixed
when this module is first imported (``INTERPRETED``). The launches (grid, block sizes) and the
workspace layouts are in ``bkn/layers/_triton_function.py``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import interpreting

INTERPRETED = interpreting()


@triton.jit
def _total(a):
    """Sum over axis 0: ``tl.sum``'s own reduction called directly (``tl.sum`` is a jit function: see the module
    docstring); the interpreter recognises its combine function and sums with numpy."""
    return tl.reduce(a, 0, tl.standard._sum_combine)


@triton.jit
def _f64(hi, lo):
    one = tl.full([], 1.0, tl.float64)  # (a float argument is a Python float in the interpreter: no .to)
    return hi * one + lo * one


@triton.jit
def _offsets(k, group, c, g, S1, S2, sN, sC, s1, s2):
    """Element offsets of indices ``k`` of the (group, channel) block (int64)."""
    per_n = S1 * S2
    n = k // per_n
    rem = k - n * per_n
    i1 = rem // S2
    i2 = rem - i1 * S2
    row = (group * g + n).to(tl.int64)
    return row * sN + c.to(tl.int64) * sC + i1.to(tl.int64) * s1 + i2.to(tl.int64) * s2


@triton.jit
def _program_block(C, chunk, count):
    """This program's share of the grid (axis 0: (group, channel) blocks, axis 1: their chunks).

    Returns ``(gc, sp, GC, group, c, start, end)``: the block's index ``gc = group * C + c``, the chunk
    ``sp``, the number of blocks ``GC``, and the chunk's values ``start .. end - 1`` of the block's ``count``.
    """
    gc = tl.program_id(0)
    sp = tl.program_id(1)
    GC = tl.num_programs(0)
    group = gc // C
    c = gc - group * C
    start = sp * chunk
    end = tl.minimum(start + chunk, count)
    return gc, sp, GC, group, c, start, end


@triton.jit
def stats_partial(
    X, PS, PS_OFF, C, g, S1, S2, sN, sC, s1, s2, count, chunk, splits, STAT: tl.constexpr, BLOCK: tl.constexpr
):
    PS = PS + PS_OFF  # the partials live in the finalize's workspace, after its rows (one allocation)
    gc, sp, GC, group, c, start, end = _program_block(C, chunk, count)
    n_acc = tl.full([], 0.0, STAT)
    mean = tl.full([], 0.0, STAT)
    m2 = tl.full([], 0.0, STAT)
    for b in range(start, end, BLOCK):
        k = b + tl.arange(0, BLOCK)
        mask = k < end
        x = tl.load(X + _offsets(k, group, c, g, S1, S2, sN, sC, s1, s2), mask=mask, other=0.0).to(STAT)
        nb = tl.minimum(end - b, BLOCK).to(STAT)
        bmean = _total(x) / nb
        dev = tl.where(mask, x - bmean, 0.0)
        bm2 = _total(dev * dev)
        total = n_acc + nb
        delta = bmean - mean
        mean += delta * (nb / total)
        m2 += bm2 + delta * delta * (n_acc * nb / total)
        n_acc = total
    tl.store(PS + gc * splits + sp, mean)  # PS (2, G*C, splits): means, then M2s
    tl.store(PS + GC * splits + gc * splits + sp, m2)


@triton.jit
def _merged(PM, PM2, gc, mask, count, chunk, splits, OBS_GIVEN: tl.constexpr, STAT: tl.constexpr):
    """(mean, biased var) of blocks ``gc`` from the chunks' partials (Chan); or the given moments."""
    if OBS_GIVEN:
        mean = tl.load(PM + gc, mask=mask, other=0.0).to(STAT)
        var = tl.load(PM2 + gc, mask=mask, other=1.0).to(STAT)
    else:
        n_acc = tl.full([], 0.0, STAT)
        mean = tl.load(PM + gc * splits, mask=mask, other=0.0).to(STAT)
        m2 = tl.load(PM2 + gc * splits, mask=mask, other=0.0).to(STAT)
        n_acc = tl.minimum(chunk, count).to(STAT)
        for s in range(1, splits):
            ns = tl.minimum(chunk, count - s * chunk).to(STAT)
            pm = tl.load(PM + gc * splits + s, mask=mask, other=0.0).to(STAT)
            pm2 = tl.load(PM2 + gc * splits + s, mask=mask, other=0.0).to(STAT)
            total = n_acc + ns
            delta = pm - mean
            mean += delta * (ns / total)
            m2 += pm2 + delta * delta * (n_acc * ns / total)
            n_acc = total
        var = m2 / n_acc
    return mean, var


@triton.jit
def _running_factor(STEPS, mom_hi, mom_lo, HAS_STEPS: tl.constexpr, MOMENTUM_NONE: tl.constexpr):
    """Counts the step in STEPS (if given); the EMA factor (momentum, or 1 / steps), float64."""
    factor = _f64(mom_hi, mom_lo)
    if HAS_STEPS:
        steps = tl.load(STEPS) + 1
        tl.store(STEPS, steps)
        if MOMENTUM_NONE:
            factor = 1.0 / steps.to(tl.float64)
    return factor


@triton.jit
def kalman_finalize(
    PM, PM2, W, MP, VP, P, WEIGHT, BIAS, RM, RV, STEPS,  # pointers
    G, C, count, chunk, splits, PS_OFF,
    smg, smc, svg, svc, spg, spc,  # strides of prior mean, var, gain over (G, C) (0: broadcast)
    p_hi, p_lo, eps_hi, eps_lo, thr_hi, thr_lo, mom_hi, mom_lo, unb_hi, unb_lo,
    OBS_GIVEN: tl.constexpr, HAS_PRIOR: tl.constexpr, GAIN_TENSOR: tl.constexpr, HAS_GUARD: tl.constexpr,
    CHECK: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RUNNING: tl.constexpr,
    HAS_STEPS: tl.constexpr, MOMENTUM_NONE: tl.constexpr, STAT: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """W (8, G, C): obs mean, obs var, mean, var, scale, shift, inv_std, use (W[7, 0, 0], 1 or 0).

    CHECK: W[8, 0, 0] = 1 if every prior variance is finite and >= 0, else 0 (the caller's device check).

    PM: stats_partial's PS (at PS_OFF; PM2 unused), or with OBS_GIVEN the given (G, C) mean and var PM, PM2.
    """
    GC = G * C
    if not OBS_GIVEN:
        PM = PM + PS_OFF
        PM2 = PM + GC * splits
    eps = _f64(eps_hi, eps_lo).to(STAT)
    use = tl.full([], 1, tl.int1)  # the prior is used unless the guard drops it
    if HAS_PRIOR and HAS_GUARD:
        ratio = tl.full([], 0.0, STAT)
        for c0 in range(0, C, BLOCK_C):
            cs = c0 + tl.arange(0, BLOCK_C)
            cm = cs < C
            for gi in range(0, G):
                _, vo = _merged(PM, PM2, gi * C + cs, cm, count, chunk, splits, OBS_GIVEN, STAT)
                vp = tl.load(VP + gi * svg + cs * svc, mask=cm, other=0.0).to(STAT)
                ratio += _total(tl.where(cm, vp / tl.where(cm, vo, 1.0), 0.0))
        use = ~(ratio.to(tl.float64) >= _f64(thr_hi, thr_lo))  # nan: kept, as the torch guard
    if HAS_RUNNING:
        factor = _running_factor(STEPS, mom_hi, mom_lo, HAS_STEPS, MOMENTUM_NONE)
        unbiased = _f64(unb_hi, unb_lo)
    bad = tl.full([], 0, tl.int32)  # prior variances that are negative, infinite or NaN (CHECK)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        cm = cs < C
        sum_m = tl.full([BLOCK_C], 0.0, STAT)
        sum_v = tl.full([BLOCK_C], 0.0, STAT)
        for gi in range(0, G):
            gc = gi * C + cs
            mo, vo = _merged(PM, PM2, gc, cm, count, chunk, splits, OBS_GIVEN, STAT)
            mean = mo
            var = vo
            if HAS_PRIOR:
                mp = tl.load(MP + gi * smg + cs * smc, mask=cm, other=0.0).to(STAT)
                vp_in = tl.load(VP + gi * svg + cs * svc, mask=cm, other=0.0)
                if CHECK:  # in the prior's own dtype, as check_prior_var (NaN fails both comparisons)
                    ok = (vp_in >= 0) & (vp_in < float("inf"))
                    bad += tl.sum(tl.where(cm & ~ok, 1, 0).to(tl.int32), axis=0)
                vp = vp_in.to(STAT)
                if GAIN_TENSOR:
                    p = tl.load(P + gi * spg + cs * spc, mask=cm, other=0.0).to(STAT)
                else:
                    p = _f64(p_hi, p_lo).to(STAT)
                d = mo - mp
                mean = tl.where(use, mo - p * d, mo)
                var = tl.where(use, vo * (1 - p) + vp * p + d * d * (p - p * p), vo)
            inv_std = 1.0 / tl.sqrt(var + eps)
            scale = inv_std
            if HAS_WEIGHT:
                scale = scale * tl.load(WEIGHT + cs, mask=cm, other=1.0).to(STAT)
            shift = -mean * scale
            if HAS_BIAS:
                shift += tl.load(BIAS + cs, mask=cm, other=0.0).to(STAT)
            tl.store(W + gc, mo, mask=cm)
            tl.store(W + GC + gc, vo, mask=cm)
            tl.store(W + 2 * GC + gc, mean, mask=cm)
            tl.store(W + 3 * GC + gc, var, mask=cm)
            tl.store(W + 4 * GC + gc, scale, mask=cm)
            tl.store(W + 5 * GC + gc, shift, mask=cm)
            tl.store(W + 6 * GC + gc, inv_std, mask=cm)
            sum_m += mean
            sum_v += var
        if HAS_RUNNING:
            _ema(RM, RV, cs, cm, sum_m / G, sum_v / G, factor, unbiased)
    tl.store(W + 7 * GC, use.to(STAT))
    if CHECK:
        tl.store(W + 8 * GC, tl.where(bad == 0, 1.0, 0.0).to(STAT))


@triton.jit
def _ema(RM, RV, cs, cm, mean, var, factor, unbiased):
    """running = running * (1 - f) + f * stat (var scaled by ``unbiased``), in the buffers' dtype."""
    rm = tl.load(RM + cs, mask=cm, other=0.0)
    rv = tl.load(RV + cs, mask=cm, other=0.0)
    f = factor.to(rm.dtype)
    rm = rm * (1 - f) + f * mean.to(rm.dtype)
    rv = rv * (1 - f) + (factor * unbiased).to(rv.dtype) * var.to(rv.dtype)
    tl.store(RM + cs, rm, mask=cm)
    tl.store(RV + cs, rv, mask=cm)


@triton.jit
def _ramp(step, warmup, end):
    """``RenormSchedule._tensor_ramp``: 0 up to ``warmup``, linear to 1 at ``end``, then 1 (float64 ``step``)."""
    one = tl.full([], 1.0, tl.float64)  # (an int argument may be a constexpr: no .to)
    w = warmup * one
    e = end * one
    linear = tl.where(step <= w, 0.0, tl.where(step >= e, 1.0, (step - w) / tl.maximum(e - w, one)))
    return tl.where(e <= w, tl.where(step > w, 1.0, 0.0), linear).to(tl.float64)


@triton.jit
def renorm_finalize(
    PM, PM2, W, WEIGHT, BIAS, MU, SIGMA, RVAR, STEPS, RMAX, DMAX,  # pointers
    G, C, count, chunk, splits, PS_OFF,
    eps_hi, eps_lo, mom_hi, mom_lo, rmax_hi, rmax_lo, dmax_hi, dmax_lo,
    warmup, rmax_end, dmax_end, rgain_hi, rgain_lo, dmaxmax_hi, dmaxmax_lo,  # RenormSchedule (SCHEDULED)
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, MOMENTUM_NONE: tl.constexpr,
    RMAX_TENSOR: tl.constexpr, DMAX_TENSOR: tl.constexpr, SCHEDULED: tl.constexpr, STAT: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    """BRN. W (8, G, C): m_o, v_o, sigma_B, r, d, scale, shift, 1 / sigma_B. Updates mu, sigma, running_var, steps.

    SCHEDULED: rmax and dmax are ``RenormSchedule.on_device`` at the counter's value before this
    step (float64, the same arithmetic), with ``rgain = rmax_max - 1`` and ``dmaxmax = dmax_max``.
    """
    GC = G * C
    PM = PM + PS_OFF
    PM2 = PM + GC * splits
    eps = _f64(eps_hi, eps_lo)
    if SCHEDULED:  # read before _running_factor counts the step
        step = tl.load(STEPS).to(tl.float64)
        rmax_s = 1.0 + _f64(rgain_hi, rgain_lo) * _ramp(step, warmup, rmax_end)
        dmax_s = _f64(dmaxmax_hi, dmaxmax_lo) * _ramp(step, warmup, dmax_end)
    factor = _running_factor(STEPS, mom_hi, mom_lo, True, MOMENTUM_NONE)
    if SCHEDULED:  # 1 / rmax in float64, then the statistics' dtype (as the reference with 0-d float64 limits)
        rmin = (1.0 / rmax_s).to(STAT)
        rmax = rmax_s.to(STAT)
        dmax = dmax_s.to(STAT)
    elif RMAX_TENSOR:  # 1 / rmax in the limit's dtype, as the torch reference computes it
        rmax_t = tl.load(RMAX)
        rmin = (1.0 / rmax_t).to(STAT)
        rmax = rmax_t.to(STAT)
    else:
        rmax = _f64(rmax_hi, rmax_lo).to(STAT)
        rmin = 1.0 / rmax
    if not SCHEDULED:
        if DMAX_TENSOR:
            dmax = tl.load(DMAX).to(STAT)
        else:
            dmax = _f64(dmax_hi, dmax_lo).to(STAT)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        cm = cs < C
        mu = tl.load(MU + cs, mask=cm, other=0.0)
        sigma = tl.load(SIGMA + cs, mask=cm, other=1.0)
        mu_s = mu.to(STAT)
        sigma_s = sigma.to(STAT)
        sum_m = tl.full([BLOCK_C], 0.0, STAT)
        sum_s = tl.full([BLOCK_C], 0.0, STAT)
        for gi in range(0, G):
            gc = gi * C + cs
            mo, vo = _merged(PM, PM2, gc, cm, count, chunk, splits, False, STAT)
            std_b = tl.sqrt(vo + eps.to(STAT))
            r = tl.minimum(tl.maximum(std_b / sigma_s, rmin), rmax)
            d = tl.minimum(tl.maximum((mo - mu_s) / sigma_s, -dmax), dmax)
            inv_std = 1.0 / std_b
            scale = r * inv_std
            shift = d
            if HAS_WEIGHT:
                w = tl.load(WEIGHT + cs, mask=cm, other=1.0).to(STAT)
                scale = scale * w
                shift = shift * w
            if HAS_BIAS:
                shift += tl.load(BIAS + cs, mask=cm, other=0.0).to(STAT)
            shift -= mo * scale
            tl.store(W + gc, mo, mask=cm)
            tl.store(W + GC + gc, vo, mask=cm)
            tl.store(W + 2 * GC + gc, std_b, mask=cm)
            tl.store(W + 3 * GC + gc, r, mask=cm)
            tl.store(W + 4 * GC + gc, d, mask=cm)
            tl.store(W + 5 * GC + gc, scale, mask=cm)
            tl.store(W + 6 * GC + gc, shift, mask=cm)
            tl.store(W + 7 * GC + gc, inv_std, mask=cm)
            sum_m += mo
            sum_s += std_b
        f = factor.to(mu.dtype)
        mu = mu + f * ((sum_m / G).to(mu.dtype) - mu)
        sigma = sigma + f * ((sum_s / G).to(sigma.dtype) - sigma)
        tl.store(MU + cs, mu, mask=cm)
        tl.store(SIGMA + cs, sigma, mask=cm)
        tl.store(RVAR + cs, sigma * sigma - eps.to(sigma.dtype), mask=cm)


@triton.jit
def affine(
    X, Y, FW, C, g, S1, S2, sN, sC, s1, s2, yN, yC, y1, y2, count, chunk,
    SCALE_ROW: tl.constexpr, STAT: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """y = x * scale + shift per (group, channel) block (FW rows SCALE_ROW, SCALE_ROW + 1 of a finalize)."""
    gc, sp, GC, group, c, start, end = _program_block(C, chunk, count)
    scale = tl.load(FW + SCALE_ROW * GC + gc)
    shift = tl.load(FW + (SCALE_ROW + 1) * GC + gc)
    for b in range(start, end, BLOCK):
        k = b + tl.arange(0, BLOCK)
        mask = k < end
        x = tl.load(X + _offsets(k, group, c, g, S1, S2, sN, sC, s1, s2), mask=mask, other=0.0)
        y = x.to(STAT) * scale + shift
        tl.store(Y + _offsets(k, group, c, g, S1, S2, yN, yC, y1, y2), y.to(Y.dtype.element_ty), mask=mask)
