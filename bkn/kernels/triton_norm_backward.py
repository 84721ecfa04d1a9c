"""The backward kernels of the grouped-statistics norms (the forward and the layout: ``triton_norm.py``).

``grad_partial`` sums ``dy`` and ``dy (x - m)`` (centred, so no cancellation when ``|m|`` is far
larger than the spread) per (group, channel, chunk) into a buffer; ``grad_coefficients`` reduces
the chunks in order (deterministic, no atomics) and computes the closed-form coefficients of
``bkn/layers/_function.py`` (``_backward_coefficients``), with the gradients that arrive at the
posterior from later layers' priors, and the prior's, gain's, weight's and bias's gradients;
``input_grad`` writes ``dx = ws dy + x_coef x + const``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_norm import _f64, _offsets, _program_block, _total


@triton.jit
def grad_partial(
    X, DY, FW, PS, PS_OFF, C, g, S1, S2, sN, sC, s1, s2, dN, dC, d1, d2, count, chunk, splits,
    MEAN_ROW: tl.constexpr, STAT: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """PS (2, G*C, splits): per chunk sum(dy) and sum(dy * (x - m)) (centred by the mean m, FW row MEAN_ROW)."""
    PS = PS + PS_OFF
    gc, sp, GC, group, c, start, end = _program_block(C, chunk, count)
    m = tl.load(FW + MEAN_ROW * GC + gc)
    acc1 = tl.full([BLOCK], 0.0, STAT)
    acc2 = tl.full([BLOCK], 0.0, STAT)
    for b in range(start, end, BLOCK):
        k = b + tl.arange(0, BLOCK)
        mask = k < end
        x = tl.load(X + _offsets(k, group, c, g, S1, S2, sN, sC, s1, s2), mask=mask, other=0.0).to(STAT)
        dy = tl.load(DY + _offsets(k, group, c, g, S1, S2, dN, dC, d1, d2), mask=mask, other=0.0).to(STAT)
        acc1 += dy
        acc2 += dy * tl.where(mask, x - m, 0.0)
    tl.store(PS + gc * splits + sp, _total(acc1))
    tl.store(PS + GC * splits + gc * splits + sp, _total(acc2))


@triton.jit
def grad_coefficients(
    PS, FW, WEIGHT, DM, DV, MP, VP, P, OUT,  # pointers
    G, C, count, splits, PS_OFF,
    dmg, dmc, dvg, dvc, smg, smc, svg, svc, spg, spc,
    p_hi, p_lo,
    HAS_DY: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_DM: tl.constexpr, HAS_DV: tl.constexpr,
    HAS_PRIOR: tl.constexpr, GAIN_TENSOR: tl.constexpr, HAS_GUARD: tl.constexpr, RENORM: tl.constexpr,
    REDUCE_PRIOR: tl.constexpr, STAT: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """The backward's per-(group, channel) algebra (``_backward_coefficients`` in bkn/layers/_function.py).

    FW: the forward's workspace (BKN rows: m_o 0, v_o 1, m 2, inv_std 6, use 7[0]; BRN: m_o 0,
    r 3, d 4, inv_std 7, the mean m = m_o). OUT (8, G, C): ws, x_coef, const, dweight, dbias
    (summed over groups into row [0, :]), d prior mean, d prior var (summed into row [0, :] if
    REDUCE_PRIOR), d gain.
    """
    GC = G * C
    PS = PS + PS_OFF
    inv_n = 1.0 / (count * tl.full([], 1.0, STAT))  # (an int argument is int32: 1.0 / count would be float32)
    cb = tl.program_id(0)
    cs = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cs < C
    if HAS_PRIOR and HAS_GUARD:
        use = tl.load(FW + 7 * GC) != 0
    dw_sum = tl.full([BLOCK_C], 0.0, STAT)
    db_sum = tl.full([BLOCK_C], 0.0, STAT)
    dmp_sum = tl.full([BLOCK_C], 0.0, STAT)
    dvp_sum = tl.full([BLOCK_C], 0.0, STAT)
    for gi in range(0, G):
        gc = gi * C + cs
        s1 = tl.full([BLOCK_C], 0.0, STAT)
        s2 = tl.full([BLOCK_C], 0.0, STAT)
        if HAS_DY:
            for s in range(0, splits):
                s1 += tl.load(PS + gc * splits + s, mask=cm, other=0.0)
                s2 += tl.load(PS + GC * splits + gc * splits + s, mask=cm, other=0.0)
        mo = tl.load(FW + gc, mask=cm, other=0.0)
        if RENORM:
            inv_std = tl.load(FW + 7 * GC + gc, mask=cm, other=0.0)
        else:
            inv_std = tl.load(FW + 6 * GC + gc, mask=cm, other=0.0)
        s2 = s2 * inv_std  # sum(dy * xhat)
        ws = inv_std
        if HAS_WEIGHT:
            ws = ws * tl.load(WEIGHT + cs, mask=cm, other=1.0).to(STAT)
        if RENORM:
            r = tl.load(FW + 3 * GC + gc, mask=cm, other=0.0)
            ws = ws * r
            dw_sum += r * s2 + tl.load(FW + 4 * GC + gc, mask=cm, other=0.0) * s1
        else:
            dw_sum += s2
        db_sum += s1
        dmean = -ws * s1
        dvar = ws * inv_std * s2 * -0.5
        if HAS_DM:
            dmean += tl.load(DM + gi * dmg + cs * dmc, mask=cm, other=0.0).to(STAT)
        if HAS_DV:
            dvar += tl.load(DV + gi * dvg + cs * dvc, mask=cm, other=0.0).to(STAT)
        dobs_mean = dmean
        dobs_var = dvar
        if HAS_PRIOR:
            if GAIN_TENSOR:
                p = tl.load(P + gi * spg + cs * spc, mask=cm, other=0.0).to(STAT)
            else:
                p = _f64(p_hi, p_lo).to(STAT)
            mp = tl.load(MP + gi * smg + cs * smc, mask=cm, other=0.0).to(STAT)
            vp = tl.load(VP + gi * svg + cs * svc, mask=cm, other=0.0).to(STAT)
            vo = tl.load(FW + GC + gc, mask=cm, other=0.0)
            d = mo - mp
            cross = d * dvar * (2 * (p - p * p))
            dobs_mean = dmean * (1 - p) + cross
            dobs_var = dvar * (1 - p)
            dgain = (vp - vo + d * d * (1 - 2 * p)) * dvar - d * dmean
            dmp = dmean * p - cross
            dvp = dvar * p
            if HAS_GUARD:  # selected, not multiplied by p = 0: exact, and no 0 * inf
                dobs_mean = tl.where(use, dobs_mean, dmean)
                dobs_var = tl.where(use, dobs_var, dvar)
                dgain = tl.where(use, dgain, 0.0)
                dmp = tl.where(use, dmp, 0.0)
                dvp = tl.where(use, dvp, 0.0)
            tl.store(OUT + 7 * GC + gc, dgain, mask=cm)
            if REDUCE_PRIOR:
                dmp_sum += dmp
                dvp_sum += dvp
            else:
                tl.store(OUT + 5 * GC + gc, dmp, mask=cm)
                tl.store(OUT + 6 * GC + gc, dvp, mask=cm)
        x_coef = dobs_var * (2.0 * inv_n)
        const = dobs_mean * inv_n - x_coef * mo
        tl.store(OUT + gc, ws, mask=cm)
        tl.store(OUT + GC + gc, x_coef, mask=cm)
        tl.store(OUT + 2 * GC + gc, const, mask=cm)
    tl.store(OUT + 3 * GC + cs, dw_sum, mask=cm)
    tl.store(OUT + 4 * GC + cs, db_sum, mask=cm)
    if HAS_PRIOR and REDUCE_PRIOR:
        tl.store(OUT + 5 * GC + cs, dmp_sum, mask=cm)
        tl.store(OUT + 6 * GC + cs, dvp_sum, mask=cm)


@triton.jit
def input_grad(
    X, DY, DX, COEF, C, g, S1, S2, sN, sC, s1, s2, dN, dC, d1, d2, oN, oC, o1, o2, count, chunk,
    HAS_DY: tl.constexpr, STAT: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """dx = ws * dy + x_coef * x + const (COEF rows 0..2 of grad_coefficients' OUT)."""
    gc, sp, GC, group, c, start, end = _program_block(C, chunk, count)
    ws = tl.load(COEF + gc)
    x_coef = tl.load(COEF + GC + gc)
    const = tl.load(COEF + 2 * GC + gc)
    for b in range(start, end, BLOCK):
        k = b + tl.arange(0, BLOCK)
        mask = k < end
        x = tl.load(X + _offsets(k, group, c, g, S1, S2, sN, sC, s1, s2), mask=mask, other=0.0).to(STAT)
        dx = x * x_coef + const
        if HAS_DY:
            dy = tl.load(DY + _offsets(k, group, c, g, S1, S2, dN, dC, d1, d2), mask=mask, other=0.0).to(STAT)
            dx += ws * dy
        tl.store(DX + _offsets(k, group, c, g, S1, S2, oN, oC, o1, o2), dx.to(DX.dtype.element_ty), mask=mask)
